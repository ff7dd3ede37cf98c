"""`nanoseek sft`: supervised fine-tuning on chat / reasoning traces (DeepSeek-R1 sections 2.3.1 and 2.4: the
"cold start" before RL, the 800k-sample SFT, and distillation into small models, which is SFT only).

Data: JSONL, one conversation a line, either {"messages": [{"role", "content"}, ...]} or
{"prompt": ..., "completion": ...} (an optional "system" field becomes the system message).

Loss: next-token cross-entropy on assistant tokens only (content + the EOS that ends the turn), from
tokenizer.encode_chat_with_mask; system and user tokens are context, never targets. The mean is over target
tokens of the whole batch (every assistant token weighs the same, long answers are not down-weighted).

Packing: conversations are packed first-fit, in shuffled order, into rows of seq_len + 1 tokens. Each
conversation keeps its own RoPE positions (restarting at 0) and a block-diagonal causal mask stops it from
attending to the others in its row, so a packed conversation gets exactly the logits it would get alone; no
compute goes to padding beyond the tail of each row. Conversations longer than a row are cut (counted in the
summary). The MoE router bias is frozen (no aux-loss-free update during fine-tuning); MTP is not trained here.

Checkpoints, `latest`, metrics.jsonl and --resume are as in pretraining; batch order is a function of
(seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.model import Transformer
from nanoseek.plot import plot_run
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.distill_loss import exact_loss
from nanoseek.train.loop import Run, lr_at, make_optimizer
from nanoseek.train.teacher import check_same_tokenizer


@dataclass
class SFTConfig:
    model: str = ""  # starting checkpoint with tokenizer.json
    data: str = ""  # JSONL conversations
    out: str = "runs/sft"
    steps: int | None = None  # default: enough for `epochs` passes over the packed rows
    epochs: float = 2.0  # R1's final SFT: 2 epochs
    batch_size: int = 8  # packed rows per step
    seq_len: int = 512
    lr: float = 1e-4
    warmup: int | None = None  # default: 5% of steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 0
    keep: int | None = None
    resume: bool = False
    max_bad_steps: int = 5
    teacher: str = ""  # logit distillation: a checkpoint sharing the tokenizer (nanoseek.train.distill)
    kd_weight: float = 0.0  # loss = CE + kd_weight * divergence(student, teacher) on the same target tokens
    kd_beta: float = 0.0  # the divergence: 0 forward KL(teacher || student) (Hinton et al. 2015), 1 reverse


# ---------------------------------------------------------------------------------------------- data
def load_conversations(path: str) -> list[list[dict]]:
    """Read a JSONL file of {"messages": [...]} or {"prompt", "completion"[, "system"]} lines."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SFT data file not found: {path!r}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(row, dict) and isinstance(row.get("messages"), list):
                messages = row["messages"]
            elif isinstance(row, dict) and "prompt" in row and "completion" in row:
                messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [
                    {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
            else:
                raise ValueError(f"{path}:{n}: expected {{\"messages\": [...]}} or {{\"prompt\", \"completion\"}}")
            if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
                raise ValueError(f"{path}:{n}: the conversation has no assistant message, so nothing to learn")
            out.append(messages)
    if not out:
        raise ValueError(f"{path} holds no conversations")
    return out


@dataclass
class PackedRows:
    """Packed training rows of seq_len + 1 tokens: ids, loss mask (on the *token*: 1 if it is a target),
    per-token RoPE position and document index (-1 for padding)."""

    ids: torch.Tensor  # [N, L] int64
    target: torch.Tensor  # [N, L] bool
    positions: torch.Tensor  # [N, L] int64
    doc: torch.Tensor  # [N, L] int64
    truncated: int = 0


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> PackedRows:
    """First-fit packing of (ids, mask) conversations into rows of seq_len + 1 tokens (inputs are row[:-1],
    targets row[1:]). A conversation longer than a row is cut to fit."""
    L = seq_len + 1
    rows: list[list[tuple[list[int], list[int]]]] = []
    space: list[int] = []
    truncated = 0
    for ids, mask in examples:
        if len(ids) > L:
            ids, mask, truncated = ids[:L], mask[:L], truncated + 1
        for r, free in enumerate(space):  # first row with room
            if free >= len(ids):
                rows[r].append((ids, mask))
                space[r] -= len(ids)
                break
        else:
            rows.append([(ids, mask)])
            space.append(L - len(ids))
    N = len(rows)
    out = PackedRows(torch.full((N, L), pad_id, dtype=torch.long), torch.zeros(N, L, dtype=torch.bool),
                     torch.zeros(N, L, dtype=torch.long), torch.full((N, L), -1, dtype=torch.long), truncated)
    for r, docs in enumerate(rows):
        at = 0
        for d, (ids, mask) in enumerate(docs):
            n = len(ids)
            out.ids[r, at: at + n] = torch.tensor(ids)
            out.target[r, at: at + n] = torch.tensor(mask, dtype=torch.bool)
            out.positions[r, at: at + n] = torch.arange(n)
            out.doc[r, at: at + n] = d
            at += n
    return out


def batch_indices(step: int, batch_size: int, n_rows: int, seed: int) -> list[int]:
    """Rows for a step (from 1): a fresh permutation per epoch, seeded by (seed, epoch); pure in its arguments."""
    start = (step - 1) * batch_size
    out = []
    for i in range(start, start + batch_size):
        epoch, j = divmod(i, n_rows)
        perm = random.Random(f"sft|{seed}|{epoch}").sample(range(n_rows), n_rows)
        out.append(perm[j])
    return out


def _packed_forward(model, ids, positions, doc) -> torch.Tensor:
    """Logits [B, L-1, V] of packed rows: token i sees token j iff j <= i and both are in the same conversation."""
    x, d, pos = ids[:, :-1], doc[:, :-1], positions[:, :-1]
    t = x.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    mask = (causal[None] & (d[:, :, None] == d[:, None, :])).unsqueeze(1)  # [B, 1, t, t]
    return model(x, positions=pos, mask=mask).float()


def sft_loss(model, ids: torch.Tensor, target: torch.Tensor, positions: torch.Tensor, doc: torch.Tensor,
             teacher=None, kd_weight: float = 0.0, kd_beta: float = 0.0, stats: dict | None = None):
    """(mean CE over target tokens, number of target tokens) for packed rows [B, L] (inputs [:, :-1]).

    With a teacher and kd_weight > 0 the loss adds kd_weight times the mean token divergence to the teacher's
    distribution at the same target positions (logit-level distillation on the traces); `stats` then receives
    "ce" and "kd"."""
    logits = _packed_forward(model, ids, positions, doc)
    y, keep = ids[:, 1:], target[:, 1:]
    n = int(keep.sum())
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    loss = torch.where(keep, ce, torch.zeros_like(ce)).sum() / max(n, 1)
    if teacher is not None and kd_weight > 0:
        with torch.no_grad():
            t_logits = _packed_forward(teacher, ids, positions, doc)
        kd = exact_loss(logits, t_logits, keep, kd_beta)
        if stats is not None:
            stats.update(ce=loss.item(), kd=kd.item())
        loss = loss + kd_weight * kd
    return loss, n


# ---------------------------------------------------------------------------------------------- loop
def train(tc: SFTConfig, progress: bool = True, plot: bool = False) -> dict:
    """Run (or resume) SFT of tc.model on tc.data; returns a summary."""
    if not tc.model or not tc.data:
        raise ValueError("--model (a checkpoint with tokenizer.json) and --data (JSONL) are required")
    tokenizer = load_tokenizer(tc.model)
    conversations = load_conversations(tc.data)
    encoded = [tokenizer.encode_chat_with_mask(m) for m in conversations]
    random.Random(f"sft-order|{tc.seed}").shuffle(encoded)
    rows = pack(encoded, tc.seq_len, tokenizer.pad_id)
    n_rows = rows.ids.shape[0]
    steps = tc.steps or max(1, math.ceil(tc.epochs * n_rows / tc.batch_size))
    warmup = tc.warmup if tc.warmup is not None else steps // 20
    torch.manual_seed(tc.seed)
    model = Transformer.from_pretrained(tc.model, dtype=torch.float32).train()
    if tc.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq-len {tc.seq_len} exceeds the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    teacher = None
    if tc.kd_weight > 0:
        if not tc.teacher:
            raise ValueError("--kd-weight needs --teacher: a checkpoint that shares the student's tokenizer")
        check_same_tokenizer(tc.teacher, tc.model)
        teacher = Transformer.from_pretrained(tc.teacher, dtype=torch.float32).eval().requires_grad_(False)
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay)
    run = Run(tc.out, steps, "sft", model, optimizer, save_every=tc.save_every, keep=tc.keep,
              max_bad_steps=tc.max_bad_steps, tokenizer_dir=tc.model, progress=progress, plot=plot_run)
    try:
        tokens_seen = run.start(tc.resume).get("tokens_seen", 0)
        for step in run:
            t0 = time.perf_counter()
            step_lr = run.set_lr(lr_at(step, steps, tc.lr, warmup, "cosine", tc.min_lr_ratio))
            idx = batch_indices(step, tc.batch_size, n_rows, tc.seed)
            kd_stats: dict = {}
            loss, n = sft_loss(model, rows.ids[idx], rows.target[idx], rows.positions[idx], rows.doc[idx],
                               teacher, tc.kd_weight, tc.kd_beta, kd_stats)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
            applied = run.update(step, loss.item(), grad_norm)
            real = int((rows.doc[idx] >= 0).sum())
            tokens_seen += real
            rec = {"step": step, "loss": loss.item(), "lr": step_lr, "grad_norm": grad_norm, "target_tokens": n,
                   "tokens": tokens_seen, "tokens_per_s": real / (time.perf_counter() - t0),
                   "skipped_steps": run.guard.skipped, **kd_stats}
            if not applied:
                rec["skipped"] = True
            run.log(rec, loss=rec["loss"])
            run.save(step, train_config=dataclasses.asdict(tc), tokens_seen=tokens_seen)
    finally:
        run.close()
    return run.summary(plot, final_loss=run.last.get("loss"), conversations=len(encoded), packed_rows=n_rows,
                       truncated=rows.truncated)

"""Pipeline parallelism with torch.distributed.pipelining (https://pytorch.org/docs/stable/distributed.pipelining.html).

The blocks (MTP modules last) are split into contiguous stages (accounting.pipeline_stages); each rank runs one
stage (1F1B) or two (interleaved 1F1B: stages r and r + pp; DualPipeV: stages r and 2 pp - 1 - r, the V shape that
puts the first and last stages, embedding and head, on one rank as DeepSeek-V3's DualPipe does). Within a stage,
the stage's ranks are an ordinary (dp, ep) layout: FSDP and expert parallelism as in nanoseek.distributed.

What travels between stages: the hidden state and, when MTP is trained, the embedding of the next tokens
(Emb(t_{i+1}), computed by the first stage with the one embedding table), so the last stage's MTP module needs no
copy of the embedding and its gradient flows back to the first stage through the pipeline. The sequence-wise
balance loss of each stage's MoE layers enters the backward through its output (AttachAux), and each stage counts
its experts' tokens per micro-batch for the bias update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.accounting import pipeline_stages
from nanoseek.config import ModelConfig
from nanoseek.model.block import Block
from nanoseek.model.moe import MoE
from nanoseek.model.mtp import MTPModule
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding
from nanoseek.train import balance

SCHEDULES = ("1f1b", "interleaved", "dualpipev")


def rank_stages(schedule: str, pp: int, pp_rank: int) -> tuple[int, list[int]]:
    """(number of stages, this rank's stage indices) for a schedule."""
    if schedule == "1f1b":
        return pp, [pp_rank]
    if schedule == "interleaved":
        return 2 * pp, [pp_rank, pp_rank + pp]
    if schedule == "dualpipev":
        return 2 * pp, [pp_rank, 2 * pp - 1 - pp_rank]
    raise ValueError(f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


class AttachAux(torch.autograd.Function):
    """Identity on x; in the backward, the scalar `aux` gets gradient 1, so a loss computed inside a stage joins
    the backward though only the stage's output is handed on (the final loss lives on the last stage)."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_shape = aux.shape
        return x.clone()  # not a view: V-shaped schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(ctx.aux_shape, device=grad.device, dtype=torch.float32)


class RankModel(nn.Module):
    """Everything one rank holds, under the Transformer's parameter names (checkpoints, initialisation and the
    optimizer see the usual names): the embedding on the first stage's rank, the blocks of its stages, and the
    final norm, head and MTP modules on the last stage's rank."""

    def __init__(self, cfg: ModelConfig, blocks: list[int], first: bool, last: bool):
        super().__init__()
        if cfg.tie_word_embeddings:  # the embedding and the head sit on different stages' ranks
            raise ValueError("--pp > 1 does not support a model with tie_word_embeddings (the `nano` preset): "
                             "train it with --pp 1")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if first else None
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in blocks if i < cfg.num_hidden_layers})
        self.mtp = nn.ModuleList(MTPModule(cfg, i - cfg.num_hidden_layers + 1) for i in blocks
                                 if i >= cfg.num_hidden_layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if last else None
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if last else None

    def init_weights(self, seed: int) -> None:
        from nanoseek.model.init import init_parameters_
        init_parameters_(self, seed, self.config.initializer_range)

    def set_recompute(self, mode: str) -> None:
        for m in self.modules():
            if isinstance(m, Block):
                m.recompute = mode


class Stage(nn.Module):
    """One pipeline stage's forward over modules owned by a RankModel. Inputs: token ids (first stage) or the
    previous stage's outputs; outputs: the hidden state (plus the next tokens' embedding when MTP is trained), or
    on the last stage the logits with the MTP logits appended along the sequence (one tensor for the loss)."""

    def __init__(self, rank_model: RankModel, blocks: list[int], first: bool, last: bool, use_mtp: bool,
                 balance_alpha: float):
        super().__init__()
        cfg = rank_model.config
        self.cfg, self.first, self.last, self.use_mtp, self.alpha = cfg, first, last, use_mtp, balance_alpha
        if first:
            self.embed_tokens = rank_model.embed_tokens
        self.layers = nn.ModuleList(rank_model.layers[str(i)] for i in blocks if i < cfg.num_hidden_layers)
        self.mtp = nn.ModuleList(rank_model.mtp[i - cfg.num_hidden_layers] for i in blocks
                                 if i >= cfg.num_hidden_layers and use_mtp)
        if last:
            self.norm, self.lm_head = rank_model.norm, rank_model.lm_head
        self.rope = RotaryEmbedding(cfg)
        self.counts: torch.Tensor | None = None  # tokens per expert per MoE layer, summed over micro-batches
        self.balance_sum = 0.0

    def moe_layers(self) -> list[MoE]:
        return [m for part in (self.layers, self.mtp) for m in part.modules() if isinstance(m, MoE)]

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None):
        if self.first:
            ids = x
            x = self.embed_tokens(ids)
            if self.use_mtp:
                emb = self.embed_tokens(ids[:, 1:])
        t = x.shape[1]
        cos, sin = self.rope(torch.arange(t, device=x.device))
        for layer in self.layers:
            x = layer(x, cos, sin)
        out = x
        if self.last:
            h = self.norm(x)
            logits = [self.lm_head(h)]
            for module in self.mtp:  # depth 1 (DeepSeek-V3's one MTP module)
                c, s = self.rope(torch.arange(t - 1, device=x.device))
                logits.append(self.lm_head(module.shared_head.norm(module(h[:, :-1], emb, c, s))))
            out = torch.cat(logits, dim=1)
        moe = self.moe_layers()
        if moe:
            counts = torch.stack([m.last_routing.counts for m in moe]).detach()
            self.counts = counts if self.counts is None else self.counts + counts
            if self.alpha > 0 and torch.is_grad_enabled():
                aux = balance.balance_loss(moe, x.shape[0], self.alpha)
                self.balance_sum += float(aux.detach())
                out = AttachAux.apply(out, aux)
        if not self.last and self.use_mtp:
            return out, emb.clone()  # a new tensor (V-shaped schedules detach outputs in place)
        return out


def stage_io(cfg: ModelConfig, first: bool, last: bool, use_mtp: bool, mb: int, t: int, dtype=torch.float32):
    """Meta tensors shaped like a stage's inputs and outputs for one micro-batch of mb sequences of t tokens, so
    the schedule need not infer them by running the stage on placeholder data (which would pollute the expert
    counts and logged losses)."""
    def act(*shape):  # activations carry gradients between stages
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=True)

    hidden = (act(mb, t, cfg.hidden_size),) + ((act(mb, t - 1, cfg.hidden_size),) if use_mtp else ())
    inputs = (torch.empty(mb, t, dtype=torch.long, device="meta"),) if first else hidden
    outputs = (act(mb, 2 * t - 1 if use_mtp else t, cfg.vocab_size),) if last else hidden
    return inputs, outputs


def split_loss(out: torch.Tensor, t: int):
    """The last stage's output back into (logits [b, t, V], MTP logits [b, t-1, V] or None)."""
    return out[:, :t], (out[:, t:] if out.shape[1] > t else None)


def loss_fn_for(mtp_lambda: float, parts: list, evaluating: dict | None = None):
    """The pipeline schedule's loss on the last stage: CE + lambda * MTP CE (the balance loss joins through
    AttachAux); (CE, MTP CE) of every micro-batch are appended to `parts` for logging. While
    evaluating["on"], the main CE alone."""

    def loss_fn(out, y):
        t = y.shape[1]
        logits, mtp = split_loss(out, t)
        main = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if mtp is None or (evaluating or {}).get("on"):
            parts.append((main.detach(), torch.zeros(())))
            return main
        mtp_loss = F.cross_entropy(mtp.flatten(0, 1).float(), y[:, 1:].flatten())
        parts.append((main.detach(), mtp_loss.detach()))
        return main + mtp_lambda * mtp_loss

    return loss_fn


def stage_layout(cfg: ModelConfig, schedule: str, pp: int, pp_rank: int):
    """(num_stages, [(stage index, blocks, first, last)] for this rank, all blocks this rank holds)."""
    num_stages, mine = rank_stages(schedule, pp, pp_rank)
    split = pipeline_stages(cfg, num_stages)
    stages = [(s, split[s], s == 0, s == num_stages - 1) for s in mine]
    return num_stages, stages, sorted(b for _, blocks, _, _ in stages for b in blocks)


def make_schedule(schedule: str, stages: list, n_microbatches: int, loss_fn):
    from torch.distributed import pipelining as pl

    if schedule == "1f1b":
        return pl.Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn)
    if schedule == "interleaved":
        return pl.ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn)
    if not hasattr(pl, "ScheduleDualPipeV"):
        raise ValueError(f"--pp-schedule dualpipev needs torch.distributed.pipelining.ScheduleDualPipeV (torch >= "
                         f"2.9; this is {torch.__version__}): use 1f1b or interleaved")
    return pl.ScheduleDualPipeV(stages, n_microbatches, loss_fn=loss_fn)

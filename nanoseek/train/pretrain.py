"""`nanoseek pretrain`: next-token pretraining of a DeepSeek-V3-style model on prepared token shards.

Per step (one global batch of --batch-size sequences, split into micro-batches for gradient accumulation):
    loss = CE(main) + lambda * mean_k CE(MTP depth k) + alpha * sequence-wise balance loss
then gradient clipping, AdamW on fp32 master weights, and the auxiliary-loss-free bias update from the whole
batch's expert counts. Defaults are the papers' (DeepSeek-V3 sections 2.1.2, 2.2 and 4.2): lambda 0.3, alpha 1e-4,
gamma 1e-3, AdamW betas (0.9, 0.95), weight decay 0.1, clipping at 1.0.

Under torchrun (WORLD_SIZE > 1) the same loop runs data parallel (FSDP2) and, with --ep E, expert parallel
(nanoseek/distributed.py); with --pp P the blocks are split into pipeline stages (nanoseek/pipeline.py). Every rank
draws the same global batch and trains on its own slice, so an N-process run follows the 1-process run. A
distributed run saves sharded checkpoints (nanoseek/train/sharded.py), which resume on any number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek import distributed
from nanoseek.config import ModelConfig
from nanoseek.data import TokenDataset, load_manifest
from nanoseek.fp8 import FP8Recipe
from nanoseek.fp8.modules import convert_to_fp8
from nanoseek.model.transformer import Transformer
from nanoseek.plot import plot_run
from nanoseek.train import balance
from nanoseek.train.loop import Run, lr_at, make_optimizer
from nanoseek.train import sharded
from nanoseek.train.state import load_checkpoint

DEFAULT_LR = {"nano": 3e-3, "tiny": 3e-3, "small": 1e-3}  # V3's own peak is 2.2e-4 (the default for the large presets)


@dataclass
class TrainConfig:
    preset: str = "tiny"
    data: str = ""
    out: str = "runs/pretrain"
    steps: int = 200
    batch_size: int = 16  # global batch, in sequences
    micro_batch_size: int | None = None  # per forward; None = the whole batch at once
    seq_len: int = 256
    lr: float | None = None
    warmup: int | None = None  # default: 10% of steps, at most 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    bias_gamma: float = balance.GAMMA
    balance_alpha: float = balance.ALPHA
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 0  # 0: save only at the end
    keep: int | None = None
    seed: int = 0
    fp8: str | None = None  # None, "block" (V3's 1x128 / 128x128 scaling) or "tensor" (one scale per tensor)
    resume: bool = False
    max_bad_steps: int = 5
    config: str | None = None  # a config.json used instead of the preset (vocab_size still comes from the data)
    ep: int = 1  # expert-parallel degree under torchrun (routed experts split over groups of ep ranks)
    pp: int = 1  # pipeline stages under torchrun (nanoseek/pipeline.py)
    pp_schedule: str = "1f1b"  # 1f1b, interleaved or dualpipev
    pp_microbatches: int | None = None  # pipeline micro-batches per step; default 2 pp
    recompute: str = "none"  # activation recomputation per block: none, block or selective (model/block.py)

    def model_config(self, vocab_size: int) -> ModelConfig:
        cfg = ModelConfig.from_json(self.config) if self.config else ModelConfig.from_preset(self.preset)
        cfg = cfg.replace(vocab_size=vocab_size, torch_dtype="float32")
        if self.seq_len > cfg.max_position_embeddings:
            raise ValueError(f"--seq-len {self.seq_len} exceeds the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        return cfg


def _uses_mtp(model: Transformer, tc: TrainConfig) -> bool:
    return tc.mtp_lambda > 0 and len(model.mtp) > 0


def routed_moe_layers(model: Transformer, tc: TrainConfig) -> list:
    """The MoE layers a training forward runs: the MTP blocks' only when MTP is trained (with --mtp-lambda 0
    they never route, so they have no counts for balancing and no scores for the balance loss)."""
    return model.moe_layers(include_mtp=_uses_mtp(model, tc))


def compute_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor, tc: TrainConfig):
    """(total loss, parts for logging) for one micro-batch."""
    use_mtp = _uses_mtp(model, tc)
    out = model(x, return_mtp=use_mtp)
    logits, mtp = out if use_mtp else (out, [])
    main = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    # MTP depth k at position i predicts token i+k+1, which is y[:, i+k]
    mtp_loss = (sum(F.cross_entropy(m.flatten(0, 1).float(), y[:, k:].flatten()) for k, m in enumerate(mtp, 1))
                / len(mtp)) if mtp else torch.zeros((), device=x.device)
    moe = routed_moe_layers(model, tc)
    bal = balance.balance_loss(moe, x.shape[0], tc.balance_alpha) if moe and tc.balance_alpha > 0 else torch.zeros(())
    parts = {"loss": main.detach(), "mtp_loss": mtp_loss.detach(), "balance_loss": bal.detach()}
    return main + tc.mtp_lambda * mtp_loss + bal, parts


@torch.no_grad()
def evaluate(model: Transformer, val, tc: TrainConfig, info=None) -> float:
    """Mean validation cross-entropy over the first eval_batches sequential batches. Distributed (`info`), each
    rank takes its slice of every batch and the sums are reduced, so the value is the single-process one."""
    model.eval()
    total, n = 0.0, 0
    for i, (x, y) in enumerate(val.iter_sequential(tc.micro_batch_size or tc.batch_size)):
        if i >= tc.eval_batches:
            break
        if info is not None:
            x, y = (t.tensor_split(info.world_size)[info.rank].to(info.device) for t in (x, y))
            if x.shape[0] == 0:  # a short last batch: run a dummy row so every rank joins the collectives
                model(val.iter_sequential(1).__next__()[0].to(info.device))
                continue
        logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        n += y.numel()
    if info is not None:
        total, n = distributed.all_reduce_sum(torch.tensor([total, float(n)], dtype=torch.float64, device=info.device)).tolist()
    model.train()
    return total / max(1, n)


def train(tc: TrainConfig, progress: bool = True, plot: bool = False) -> dict:
    """Run (or resume) a pretraining run; returns a summary. See the module docstring for the objective.

    Under torchrun (WORLD_SIZE > 1) this process joins the group, trains its share and leaves the group again;
    otherwise it is the plain single-process loop."""
    info = distributed.init_distributed()
    if info is None and (tc.ep != 1 or tc.pp != 1):
        raise ValueError(f"--ep {tc.ep} / --pp {tc.pp} need several processes: launch with torchrun --nproc_per_node N")
    try:
        summary = _train(tc, progress, info, plot) if tc.pp == 1 else _train_pipeline(tc, progress, info, plot)
    except BaseException:
        distributed.shutdown(info, clean=False)
        raise
    distributed.shutdown(info)
    return summary


def _setup(tc: TrainConfig) -> tuple[ModelConfig, FP8Recipe | None]:
    """The model config (vocab_size from the data) and FP8 recipe both layouts start from; seeds torch."""
    if not tc.data:
        raise ValueError("--data is required: a directory made by `nanoseek data prepare`")
    manifest = load_manifest(tc.data)
    recipe = FP8Recipe.parse(tc.fp8)
    torch.manual_seed(tc.seed)
    return tc.model_config(manifest["vocab_size"]), recipe


def _train(tc: TrainConfig, progress: bool, info, plot: bool) -> dict:
    cfg, recipe = _setup(tc)
    micro = tc.micro_batch_size or tc.batch_size
    if tc.batch_size % micro:
        raise ValueError(f"--batch-size {tc.batch_size} must be a multiple of --micro-batch-size {micro}")
    world = info.world_size if info else 1
    if micro % world:
        raise ValueError(f"the micro-batch ({micro} sequences) must split evenly over {world} processes: "
                         "change --batch-size / --micro-batch-size or the number of processes")
    model = distributed.build_model(cfg, tc.seed, info.device if info else torch.device("cpu"), info, tc.ep,
                                    convert=(lambda m: convert_to_fp8(m, recipe)) if recipe else None)
    model.set_recompute(tc.recompute)
    moe = routed_moe_layers(model, tc)

    def step(data):
        parts_sum, grad_norm, counts = forward_backward(model, data, tc, info, moe)
        return parts_sum, grad_norm, counts, lambda: balance.update_bias(moe, counts, tc.bias_gamma)

    return _run(tc, progress, info, plot, model, cfg, step, lambda val: evaluate(model, val, tc, info))


def _train_pipeline(tc: TrainConfig, progress: bool, info, plot: bool) -> dict:
    """The training loop with --pp stages (nanoseek/pipeline.py): the same objective, batches and updates as
    _train; each step's micro-batches run through the pipeline schedule."""
    from nanoseek import pipeline

    cfg, recipe = _setup(tc)
    if tc.micro_batch_size not in (None, tc.batch_size):
        raise ValueError("with --pp the pipeline makes the micro-batches: leave --micro-batch-size unset "
                         "(see --pp-microbatches)")
    rp = pipeline.build_rank_pipeline(tc, cfg, info, recipe)

    def step(data):
        parts_sum, counts = pipeline.train_step(rp, *data.batch(tc.batch_size))
        grad_norm = float(distributed.clip_grad_norm_(rp.rank_model, tc.grad_clip))
        return parts_sum, grad_norm, counts, lambda: pipeline.update_bias(rp, counts, tc.bias_gamma)

    return _run(tc, progress, info, plot, rp.rank_model, cfg, step,
                lambda val: pipeline.evaluate(rp, val, tc.batch_size, tc.eval_batches))


def _run(tc: TrainConfig, progress: bool, info, plot: bool, model, cfg: ModelConfig, step_fn, evaluate_fn) -> dict:
    """The step loop both layouts share: the learning-rate schedule, one step's gradients (`step_fn(data)` ->
    loss parts, gradient norm, expert counts, and the bias update that goes with the optimizer step), the
    non-finite guard, the metrics line (validation through `evaluate_fn(val)` on eval steps) and checkpoints."""
    lr = tc.lr if tc.lr is not None else DEFAULT_LR.get(tc.preset, 2.2e-4)
    warmup = tc.warmup if tc.warmup is not None else min(100, tc.steps // 10)
    optimizer = make_optimizer(model, lr, tc.weight_decay)
    data = TokenDataset(tc.data, "train", tc.seq_len, seed=tc.seed)
    val = TokenDataset(tc.data, "val", tc.seq_len) if tc.eval_every else None
    tokenizer_dir = os.path.join(tc.data, "tokenizer")
    run = Run(tc.out, tc.steps, "pretrain", model, optimizer, save_every=tc.save_every, keep=tc.keep,
              max_bad_steps=tc.max_bad_steps, tokenizer_dir=tokenizer_dir if os.path.isdir(tokenizer_dir) else None,
              progress=progress, is_main=info is None or info.rank == 0, plot=plot_run)
    if info is not None:  # each rank writes its own shards (torch.distributed.checkpoint)
        config_json = json.dumps(cfg.to_dict(), indent=2) + "\n"
        run.save_fn = lambda step, state: sharded.save_sharded(tc.out, step, model, optimizer, state, config_json,
                                                               run.tokenizer_dir, tc.keep)
    run.load_fn = lambda path: _load(path, model, optimizer, info)
    try:
        state = run.start(tc.resume)
        if state:
            data.load_state_dict(state["data"])
        tokens_seen = state.get("tokens_seen", 0)
        for step in run:
            t0 = time.perf_counter()
            step_lr = run.set_lr(lr_at(step, tc.steps, lr, warmup, tc.schedule, tc.min_lr_ratio))
            parts_sum, grad_norm, counts, update_bias = step_fn(data)
            applied = run.update(step, parts_sum["loss"], grad_norm)
            if applied:
                update_bias()
            tokens_seen += tc.batch_size * tc.seq_len
            rec = {"step": step, **parts_sum, "lr": step_lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                   "tokens_per_s": tc.batch_size * tc.seq_len / (time.perf_counter() - t0),
                   "skipped_steps": run.guard.skipped, **balance.load_stats(counts)}
            if not applied:
                rec["skipped"] = True
            if val is not None and (step % tc.eval_every == 0 or step == tc.steps):
                rec["val_loss"] = evaluate_fn(val)
            run.log(rec, loss=parts_sum["loss"], tok_s=rec["tokens_per_s"])
            run.save(step, train_config=dataclasses.asdict(tc), data=data.state_dict(), tokens_seen=tokens_seen,
                     world_size=info.world_size if info else 1)
    finally:
        run.close()
    return run.summary(plot, final_loss=run.last.get("loss"), val_loss=run.last.get("val_loss"), tokens=tokens_seen)


def forward_backward(model, data, tc: TrainConfig, info, moe: list) -> tuple[dict, float, list[torch.Tensor]]:
    """One step's gradients: every micro-batch of the global batch forward and backward (each rank on its slice),
    then gradient clipping. Returns the loss parts averaged over the batch (and ranks), the gradient norm before
    clipping, and each routed MoE layer's expert counts over the whole global batch (for the bias update)."""
    micro = tc.micro_batch_size or tc.batch_size
    accum, (world, rank) = tc.batch_size // micro, (info.world_size, info.rank) if info else (1, 0)
    counts = [torch.zeros(m.gate.cfg.n_routed_experts, dtype=torch.long) for m in moe]
    parts_sum = {"loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
    for _ in range(accum):
        x, y = data.batch(micro)
        if info is not None:
            x, y = (t.tensor_split(world)[rank].to(info.device) for t in (x, y))
        loss, parts = compute_loss(model, x, y, tc)
        (loss / accum).backward()
        for c, layer in zip(counts, moe):
            c += layer.last_routing.counts.cpu()
        for k, v in parts.items():
            parts_sum[k] += v.item() / accum
    if info is None:
        return parts_sum, float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)), counts
    grad_norm = float(distributed.clip_grad_norm_(model, tc.grad_clip))
    # losses: mean over ranks (equal slices); expert counts: summed over ranks, so the bias update and the load
    # statistics see the whole global batch, identically on every rank
    reduced = distributed.all_reduce_sum(torch.tensor(list(parts_sum.values()), dtype=torch.float64,
                                                      device=info.device)) / world
    if counts:
        counts = list(distributed.all_reduce_sum(torch.stack(counts).to(info.device)).cpu())
    return dict(zip(parts_sum, reduced.tolist())), grad_norm, counts


def _load(path, model, optimizer, info) -> dict:
    """Resume from either kind of checkpoint on any layout: a sharded one (saved by several processes; DCP
    reshards it) or a transformers-layout one (saved by one process; a distributed run reads only its slices)."""
    if sharded.is_sharded_checkpoint(path):
        return sharded.load_sharded(path, model, optimizer)
    if info is None:
        return load_checkpoint(path, model, optimizer)
    return sharded.load_pretrained_slices(path, model, optimizer)

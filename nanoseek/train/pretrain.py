"""`nanoseek pretrain`: next-token pretraining of a DeepSeek-V3-style model on prepared token shards.

Per step (one global batch of --batch-size sequences, split into micro-batches for gradient accumulation):
    loss = CE(main) + lambda * mean_k CE(MTP depth k) + alpha * sequence-wise balance loss
then gradient clipping, AdamW on fp32 master weights, and the auxiliary-loss-free bias update from the whole
batch's expert counts. Defaults are the papers' (REFERENCE sections 3-4): lambda 0.3, alpha 1e-4, gamma 1e-3,
AdamW betas (0.9, 0.95), weight decay 0.1, clipping at 1.0.

Under torchrun (WORLD_SIZE > 1) the same loop runs data parallel (FSDP2) and, with --ep E, expert parallel; see
nanoseek/distributed.py. Every rank draws the same global batch and trains on its own slice, so an N-process run
follows the 1-process run; checkpoints hold the whole model and optimizer, whatever the number of processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanoseek.config import ModelConfig
from nanoseek.model.transformer import Transformer
from nanoseek.train import balance
from nanoseek.train.loop import MetricsLog, NonFiniteGuard, lr_at, make_optimizer
from nanoseek.train.state import latest_checkpoint, load_checkpoint, save_checkpoint

DEFAULT_LR = {"tiny": 3e-3, "small": 1e-3}  # V3's own peak is 2.2e-4 (the default for the large presets)


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
    fp8: bool = False
    resume: bool = False
    max_bad_steps: int = 5
    config: str | None = None  # a config.json whose fields override the preset (vocab_size comes from the data)
    ep: int = 1  # expert-parallel degree under torchrun (routed experts split over groups of ep ranks)

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
    if _uses_mtp(model, tc):
        return model.moe_layers()
    in_mtp = set(map(id, model.mtp.modules()))
    return [m for m in model.moe_layers() if id(m) not in in_mtp]


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
        from nanoseek.distributed import all_reduce_sum
        total, n = all_reduce_sum(torch.tensor([total, float(n)], dtype=torch.float64, device=info.device)).tolist()
    model.train()
    return total / max(1, n)


def train(tc: TrainConfig, progress: bool = True) -> dict:
    """Run (or resume) a pretraining run; returns a summary. See the module docstring for the objective.

    Under torchrun (WORLD_SIZE > 1) this process joins the group, trains its share and leaves the group again;
    otherwise it is the plain single-process loop."""
    from nanoseek import distributed

    info = distributed.init_distributed()
    if info is None and tc.ep != 1:
        raise ValueError(f"--ep {tc.ep} needs several processes: launch with torchrun --nproc_per_node N")
    try:
        summary = _train(tc, progress, info)
    except BaseException:
        distributed.shutdown(info, clean=False)
        raise
    distributed.shutdown(info)
    return summary


def _train(tc: TrainConfig, progress: bool, info) -> dict:
    from nanoseek import distributed
    from nanoseek.data import TokenDataset, load_manifest

    if not tc.data:
        raise ValueError("--data is required: a directory made by `nanoseek data prepare`")
    manifest = load_manifest(tc.data)
    micro = tc.micro_batch_size or tc.batch_size
    if tc.batch_size % micro:
        raise ValueError(f"--batch-size {tc.batch_size} must be a multiple of --micro-batch-size {micro}")
    accum = tc.batch_size // micro
    world, rank = (info.world_size, info.rank) if info else (1, 0)
    is_main = rank == 0
    if micro % world:
        raise ValueError(f"the micro-batch ({micro} sequences) must split evenly over {world} processes: "
                         "change --batch-size / --micro-batch-size or the number of processes")
    if tc.fp8 and tc.ep > 1:
        raise ValueError("--fp8 with --ep > 1 is not supported yet: expert-parallel experts run unquantised")
    torch.manual_seed(tc.seed)
    cfg = tc.model_config(manifest["vocab_size"])
    model = Transformer(cfg).train()  # the same initial weights on every rank (same seed), sharded below
    if tc.fp8:
        from nanoseek.fp8 import convert_to_fp8
        convert_to_fp8(model)
    lr = tc.lr if tc.lr is not None else DEFAULT_LR.get(tc.preset, 2.2e-4)
    warmup = tc.warmup if tc.warmup is not None else min(100, tc.steps // 10)
    if info is not None:
        model.to(info.device)
        distributed.parallelize(model, distributed.make_mesh(info, tc.ep), ep=tc.ep)
    optimizer = make_optimizer(model, lr, tc.weight_decay)
    # rank 0's sampler on every rank: all draw the same global batch, each trains on its slice
    data = TokenDataset(tc.data, "train", tc.seq_len, seed=tc.seed)
    val = TokenDataset(tc.data, "val", tc.seq_len) if tc.eval_every else None
    guard = NonFiniteGuard(tc.max_bad_steps)
    tokenizer_dir = os.path.join(tc.data, "tokenizer")
    tokenizer_dir = tokenizer_dir if os.path.isdir(tokenizer_dir) else None

    start, tokens_seen = 0, 0
    if tc.resume:
        path = latest_checkpoint(tc.out)
        if path is None:
            raise ValueError(f"--resume: {tc.out} has no complete checkpoint to resume from")
        if info is None:
            state = load_checkpoint(path, model, optimizer)
        else:
            state = _load_distributed(path, model, optimizer, cfg, lr, tc)
        if state["train_config"]["steps"] != tc.steps:
            raise ValueError(f"--resume with --steps {tc.steps}, but the run was started with --steps "
                             f"{state['train_config']['steps']}: the schedule would change")
        data.load_state_dict(state["data"])
        guard.load_state_dict(state["guard"])
        start, tokens_seen = state["step"], state["tokens_seen"]
    if is_main:
        os.makedirs(tc.out, exist_ok=True)
    log = MetricsLog(tc.out, start) if is_main else None
    moe = routed_moe_layers(model, tc)
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and is_main), desc="pretrain",
               dynamic_ncols=True)
    last: dict = {}
    try:
        for step in range(start + 1, tc.steps + 1):
            t0 = time.perf_counter()
            step_lr = lr_at(step, tc.steps, lr, warmup, tc.schedule, tc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            counts = [torch.zeros(cfg.n_routed_experts, dtype=torch.long) for _ in moe]
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
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
            else:
                grad_norm = float(distributed.clip_grad_norm_(model, tc.grad_clip))
                # losses: mean over ranks (equal slices); expert counts: summed over ranks, so the bias update
                # and the load statistics see the whole global batch, identically on every rank
                reduced = distributed.all_reduce_sum(torch.tensor(list(parts_sum.values()), dtype=torch.float64,
                                                                  device=info.device)) / world
                parts_sum = dict(zip(parts_sum, reduced.tolist()))
                if counts:
                    counts = list(distributed.all_reduce_sum(torch.stack(counts).to(info.device)).cpu())
            applied = guard.check(step, parts_sum["loss"], grad_norm)
            if applied:
                optimizer.step()
                balance.update_bias(moe, counts, tc.bias_gamma)
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += tc.batch_size * tc.seq_len
            dt = time.perf_counter() - t0
            rec = {"step": step, **parts_sum, "lr": step_lr,
                   "grad_norm": grad_norm, "tokens": tokens_seen, "tokens_per_s": tc.batch_size * tc.seq_len / dt,
                   "skipped_steps": guard.skipped, **balance.load_stats(counts)}
            if not applied:
                rec["skipped"] = True
            if val is not None and (step % tc.eval_every == 0 or step == tc.steps):
                rec["val_loss"] = evaluate(model, val, tc, info)
            if log is not None:
                log.write(rec)
            last = rec
            bar.set_postfix(loss=f"{parts_sum['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update(1)
            if step == tc.steps or (tc.save_every and step % tc.save_every == 0):
                state = {"train_config": dataclasses.asdict(tc), "data": data.state_dict(),
                         "guard": guard.state_dict(), "tokens_seen": tokens_seen, "world_size": world}
                if info is None:
                    save_checkpoint(tc.out, step, model, optimizer, state, tokenizer_dir, tc.keep)
                else:
                    _save_distributed(tc, step, model, optimizer, state, tokenizer_dir, cfg, lr, is_main)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return {"run_dir": tc.out, "steps": tc.steps, "final_loss": last.get("loss"), "val_loss": last.get("val_loss"),
            "skipped_steps": guard.skipped, "checkpoint": latest_checkpoint(tc.out), "tokens": tokens_seen}


def _plain_model(cfg: ModelConfig) -> Transformer:
    """An unsharded model without initialisation (meta tensors): a container for whole state."""
    with torch.device("meta"):
        return Transformer(cfg)


def _save_distributed(tc, step, model, optimizer, state, tokenizer_dir, cfg, lr, is_main) -> None:
    """Gather whole model and optimizer state (a collective on every rank); rank 0 writes the usual
    single-process checkpoint from them, so any number of processes can resume it."""
    from nanoseek import distributed
    model_state = distributed.full_state_dict(model)
    optim_state = distributed.full_optimizer_state_dict(model, optimizer)
    if is_main:
        plain = _plain_model(cfg)
        plain.load_state_dict(model_state, assign=True)
        plain_optimizer = make_optimizer(plain, lr, tc.weight_decay)
        plain_optimizer.load_state_dict(optim_state)
        save_checkpoint(tc.out, step, plain, plain_optimizer, state, tokenizer_dir, tc.keep)
    torch.distributed.barrier()  # nobody reads `latest` before rank 0 has moved it


def _load_distributed(path, model, optimizer, cfg, lr, tc) -> dict:
    """Every rank reads the whole checkpoint (shared filesystem) through the single-process loader into a plain
    model and optimizer, then keeps its own shard."""
    from nanoseek import distributed
    plain = Transformer(cfg)
    plain_optimizer = make_optimizer(plain, lr, tc.weight_decay)
    state = load_checkpoint(path, plain, plain_optimizer)  # also restores the torch RNG
    distributed.load_full_state(model, optimizer, plain.state_dict(), plain_optimizer.state_dict())
    return state


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--config", default=None, help="config.json overriding the preset's architecture")
    p.add_argument("--data", required=True, help="directory from `nanoseek data prepare`")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, plots)")
    for name in ("steps", "batch_size", "micro_batch_size", "seq_len", "warmup", "eval_every", "eval_batches",
                 "save_every", "keep", "seed", "max_bad_steps"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "mtp_lambda", "bias_gamma", "balance_alpha"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--schedule", choices=["cosine", "wsd"], default=d.schedule)
    p.add_argument("--ep", type=int, default=d.ep,
                   help="expert parallelism under torchrun: split routed experts over groups of EP ranks")
    p.add_argument("--fp8", action="store_true", help="FP8 GEMMs with 1x128 / 128x128 scaling (V3 section 3.3)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON summary object last")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_pretrain(args: argparse.Namespace) -> None:
    summary = train(config_from_args(args), progress=not args.json)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 plots and prints
        return
    if not args.no_plot:
        from nanoseek.plot import plot_run
        summary["plots"] = plot_run(args.out)
    print(json.dumps(summary) if args.json else
          f"done: {summary['steps']} steps, loss {summary['final_loss']:.3f}, val loss {summary['val_loss']}, "
          f"checkpoint {summary['checkpoint']}")


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="pretrain a DeepSeek-V3-style model on prepared token shards")
    add_arguments(p)
    p.set_defaults(func=cmd_pretrain)

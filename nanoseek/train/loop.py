"""The skeleton every training run shares (pretraining, SFT, GRPO, distillation): `Run` owns the run directory,
resume, metrics.jsonl, the progress bar, the save cadence with `latest` and keep-N, the non-finite guard and the
plots; the learning-rate schedule and the optimizer with fp32 master weights are here too. Each training command
keeps only what differs: its data, its loss and its metrics."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from nanoseek.io_utils import atomic_write_text
from nanoseek.train.state import latest_checkpoint, load_checkpoint, save_checkpoint


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str = "cosine", min_ratio: float = 0.1,
          decay_frac: float = 0.2) -> float:
    """Linear warmup to `peak`, then cosine down to min_ratio * peak at `total`, or warmup-stable-decay (WSD:
    constant, then a linear decay over the last decay_frac of the run). `step` counts from 1."""
    if step <= warmup:
        return peak * step / max(1, warmup)
    low = peak * min_ratio
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "wsd":
        decay_start = total - int(decay_frac * total)
        if step <= decay_start:
            return peak
        return peak - (peak - low) * (step - decay_start) / max(1, total - decay_start)
    raise ValueError(f"unknown schedule {schedule!r}: use 'cosine' or 'wsd'")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95)):
    """AdamW (V3's betas and weight decay) over the model's fp32 master weights; no decay on norms and biases;
    fused where torch offers it (https://pytorch.org/docs/stable/generated/torch.optim.AdamW.html)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (one pass over all tensors; ~6x the default step on CPU for `small`) where this torch has
    # it for these tensors (CPU since torch 2.4, CUDA), else the default implementation
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


class TrainingDiverged(RuntimeError):
    pass


class NonFiniteGuard:
    """Skip steps whose loss or gradient norm is NaN/Inf (the optimizer never sees them, so no bad step reaches a
    checkpoint); stop after `max_in_a_row` consecutive ones with a message that says what to change."""

    def __init__(self, max_in_a_row: int = 5):
        self.max_in_a_row, self.skipped, self.in_a_row = max_in_a_row, 0, 0

    def check(self, step: int, loss: float, grad_norm: float) -> bool:
        """True if the step may be applied."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(
                f"step {step}: the loss or gradient was non-finite (loss={loss}, grad_norm={grad_norm}) for "
                f"{self.in_a_row} steps in a row; lower --lr, raise --warmup, or check the data. The last good "
                "checkpoint is untouched.")
        return False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, d: dict) -> None:
        self.skipped, self.in_a_row = int(d["skipped"]), int(d["in_a_row"])


class MetricsLog:
    """RUN_DIR/metrics.jsonl, one JSON object a step. On resume, lines past the resumed step are dropped (the
    file is rewritten atomically) so the log reads as one uninterrupted run."""

    def __init__(self, run_dir: str, resume_step: int = 0):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: str) -> list[dict]:
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash: everything before it is still good
                    break
    return rows


class Run:
    """One training run in RUN_DIR: checkpoints/step_N with `latest`, metrics.jsonl, a progress bar, the
    non-finite guard. A loop written with it keeps only its own step:

        run = Run(out, steps, "sft", model, optimizer, save_every=..., keep=..., tokenizer_dir=...)
        state = run.start(resume)            # {} for a fresh run, else the resumed checkpoint's trainer state
        for step in run:                     # start + 1 .. steps, the bar advancing
            run.set_lr(...); ...; applied = run.update(step, loss, grad_norm)
            run.log(rec, loss=rec["loss"])   # metrics.jsonl and the bar's postfix
            run.save(step, tokens_seen=...)  # a checkpoint every save_every steps and at the end
        run.close()                          # also when the loop raised (the bar and the log are closed)

    The guard's counters and the number of steps travel in every checkpoint; resuming with another number of
    steps is refused, since the schedule would change. Pretraining replaces the `save_fn` / `load_fn` attributes
    (single-process checkpoint I/O) to write and read sharded checkpoints; `is_main` False makes a rank silent."""

    def __init__(self, out: str, steps: int, name: str, model, optimizer, *, save_every: int = 0,
                 keep: int | None = None, max_bad_steps: int = 5, tokenizer_dir: str | None = None,
                 progress: bool = True, is_main: bool = True, plot: Callable[[str], list] | None = None):
        self.out, self.steps, self.name, self.model, self.optimizer = out, steps, name, model, optimizer
        self.save_every, self.keep, self.tokenizer_dir = save_every, keep, tokenizer_dir
        self.progress, self.is_main, self.plot_fn = progress, is_main, plot
        self.save_fn: Callable[[int, dict], None] = self._save
        self.load_fn: Callable[[str], dict] = lambda path: load_checkpoint(path, model, optimizer)
        self.guard = NonFiniteGuard(max_bad_steps)
        self.start_step, self.last, self.log_file, self.bar = 0, {}, None, None

    def start(self, resume: bool) -> dict:
        state: dict = {}
        if resume:
            path = latest_checkpoint(self.out)
            if path is None:
                raise ValueError(f"--resume: {self.out} has no complete checkpoint to resume from")
            state = self.load_fn(path)
            if state["run_steps"] != self.steps:
                raise ValueError(f"--resume with {self.steps} steps, but the run was started with "
                                 f"{state['run_steps']}: the schedule would change")
            self.guard.load_state_dict(state["guard"])
            self.start_step = state["step"]
        if self.is_main:
            os.makedirs(self.out, exist_ok=True)
            self.log_file = MetricsLog(self.out, self.start_step)
        self.bar = tqdm(total=self.steps, initial=self.start_step, desc=self.name, dynamic_ncols=True,
                        disable=not (self.progress and self.is_main))
        return state

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start_step + 1, self.steps + 1):
            yield step
            self.bar.update(1)

    def log(self, record: dict, **postfix: float) -> None:
        if self.log_file is not None:
            self.log_file.write(record)
        self.last = record
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()})

    def set_lr(self, lr: float) -> float:
        """This step's learning rate into every parameter group; returns it."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def update(self, step: int, loss: float, grad_norm: float) -> bool:
        """The optimizer step unless the guard skips it (non-finite loss or gradient norm), then the gradients
        cleared either way; True if the step was applied."""
        applied = self.guard.check(step, loss, grad_norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def save(self, step: int, **state) -> None:
        """Checkpoint when `step` is due (every save_every steps, and the last); `state` joins trainer_state."""
        if step == self.steps or (self.save_every and step % self.save_every == 0):
            self.save_fn(step, {**state, "run_steps": self.steps, "guard": self.guard.state_dict()})

    def _save(self, step: int, state: dict) -> None:
        save_checkpoint(self.out, step, self.model, self.optimizer, state, self.tokenizer_dir, self.keep)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log_file is not None:
            self.log_file.close()

    def summary(self, plot: bool = False, **extra) -> dict:
        """What every command reports at the end, and the run's plots when asked for."""
        out = {"run_dir": self.out, "steps": self.steps, "skipped_steps": self.guard.skipped,
               "checkpoint": latest_checkpoint(self.out), **extra}
        if plot and self.is_main and self.plot_fn is not None:
            out["plots"] = self.plot_fn(self.out)
        return out

"""Pieces every training loop shares (pretraining now; SFT and GRPO reuse them): the learning-rate schedule,
the optimizer with fp32 master weights, the non-finite-step guard, and the metrics log."""

from __future__ import annotations

import json
import math
import os

import torch


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
    """AdamW (V3's betas and weight decay) over the model's fp32 master weights; no decay on norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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
        from nanoseek.io_utils import atomic_write_text
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

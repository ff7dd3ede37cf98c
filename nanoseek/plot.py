"""PNG plots of a run's metrics.jsonl (`nanoseek plot RUN_DIR`, and what training commands draw at the end):
loss, learning rate and expert load for pretraining and SFT; reward, length, KL and entropy for GRPO."""

from __future__ import annotations

import os

from nanoseek.io_utils import atomic_write
from nanoseek.train.loop import read_metrics


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a ValueError that says what to install."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'nanoseek[plot]'") from None
    return plt


def save_figure(fig, path: str) -> str:
    """Write a figure as PNG atomically and close it; returns the path."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    pyplot().close(fig)
    return path


def _rows(run_dir: str) -> list[dict]:
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir} has no metrics.jsonl to plot")
    return rows


def plot_series(run_dir: str, specs: dict[str, tuple[tuple[str, ...], str]]) -> list[str]:
    """One PNG per entry of specs {file name: (metric keys, y label)}, each key a line over the steps."""
    plt, rows, out = pyplot(), _rows(run_dir), []
    for name, (keys, ylabel) in specs.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), lw=1, label=key)
        ax.set_xlabel("step"), ax.set_ylabel(ylabel), ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        out.append(save_figure(fig, os.path.join(run_dir, name)))
    return out


GRPO_PLOTS = {
    "reward.png": (("reward", "accuracy", "format_rate"), "reward / rate"),
    "response_length.png": (("response_length",), "mean completion tokens"),
    "kl_entropy.png": (("kl", "entropy", "clip_frac"), "value"),
}


def plot_grpo(run_dir: str) -> list[str]:
    """reward.png (reward, accuracy, format rate), response_length.png, kl_entropy.png (KL, entropy, clip)."""
    return plot_series(run_dir, GRPO_PLOTS)


def plot_run(run_dir: str) -> list[str]:
    """Write loss.png, lr.png and expert_load.png into run_dir; returns the paths written."""
    plt, rows = pyplot(), _rows(run_dir)
    steps = [r["step"] for r in rows]
    out = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["loss"] for r in rows], label="train loss", lw=1)
    if any("mtp_loss" in r and r["mtp_loss"] for r in rows):
        ax.plot(steps, [r.get("mtp_loss") for r in rows], label="MTP loss (depth 1..D)", lw=1, alpha=0.7)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step"), ax.set_ylabel("cross-entropy (nats)"), ax.legend(), ax.grid(alpha=0.3)
    out.append(save_figure(fig, os.path.join(run_dir, "loss.png")))
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(steps, [r["lr"] for r in rows])
    ax.set_xlabel("step"), ax.set_ylabel("learning rate"), ax.grid(alpha=0.3)
    out.append(save_figure(fig, os.path.join(run_dir, "lr.png")))
    if any("moe_layers" in r for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        n_layers = len(next(r for r in rows if "moe_layers" in r)["moe_layers"])
        for i in range(n_layers):
            ax.plot(steps, [r["moe_layers"][i]["max_over_mean"] if "moe_layers" in r else None for r in rows],
                    lw=1, label=f"MoE layer {i}")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xlabel("step"), ax.set_ylabel("max / mean expert load"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
        out.append(save_figure(fig, os.path.join(run_dir, "expert_load.png")))
    return out

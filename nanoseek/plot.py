"""`nanoseek plot RUN_DIR`: PNG plots of a run's metrics.jsonl (loss, learning rate, expert load)."""

from __future__ import annotations

import os

from nanoseek.train.loop import read_metrics


def plot_run(run_dir: str) -> list[str]:
    """Write loss.png, lr.png and expert_load.png into run_dir; returns the paths written."""
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir} has no metrics.jsonl to plot")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'nanoseek[plot]'") from None
    from nanoseek.io_utils import atomic_write

    def save(fig, name):
        path = os.path.join(run_dir, name)
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        return path

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
    out.append(save(fig, "loss.png"))
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(steps, [r["lr"] for r in rows])
    ax.set_xlabel("step"), ax.set_ylabel("learning rate"), ax.grid(alpha=0.3)
    out.append(save(fig, "lr.png"))
    if any("moe_layers" in r for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        n_layers = len(next(r for r in rows if "moe_layers" in r)["moe_layers"])
        for i in range(n_layers):
            ax.plot(steps, [r["moe_layers"][i]["max_over_mean"] if "moe_layers" in r else None for r in rows],
                    lw=1, label=f"MoE layer {i}")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xlabel("step"), ax.set_ylabel("max / mean expert load"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
        out.append(save(fig, "expert_load.png"))
    return out

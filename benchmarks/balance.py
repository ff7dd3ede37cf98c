"""Expert load balancing, four ways, on the same data and seed (DeepSeek-V3 section 2.1.2):

  bias      auxiliary-loss-free balancing (b_i += gamma sign(mean - load_i), gamma 1e-3) plus V3's tiny
            sequence-wise loss (alpha 1e-4): V3's recipe
  bias-fast the same with gamma 1e-2: a miniature run has ~1e4x fewer steps than V3's to move the biases
  seq-loss  no bias updates; V3's sequence-wise balance loss alone, raised to alpha 1e-2 (a stand-in for an
            auxiliary-loss baseline: f_i P_i per sequence, not the batch-level loss of GShard / V2)
  neither   no bias updates, no balance loss

    python benchmarks/balance.py [--steps 300] [--batch 8] [--seq 128] [--json]

Prints max/mean expert load (averaged over MoE layers and the last 20% of steps), experts left without tokens,
and the final train and validation losses; plots max/mean load against steps (benchmarks/out/balance.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nanoseek.data import default_corpus_files, prepare_data  # noqa: E402
from nanoseek.tokenizer import train_tokenizer  # noqa: E402
from nanoseek.train.loop import read_metrics  # noqa: E402
from nanoseek.train.pretrain import TrainConfig, train  # noqa: E402

VARIANTS = {"bias": dict(bias_gamma=1e-3, balance_alpha=1e-4),
            "bias-fast": dict(bias_gamma=1e-2, balance_alpha=1e-4),
            "seq-loss": dict(bias_gamma=0.0, balance_alpha=1e-2),
            "neither": dict(bias_gamma=0.0, balance_alpha=0.0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="nanoseek-balance-")
    files = default_corpus_files(max_bytes=2_000_000)
    train_tokenizer(files, 2048, os.path.join(root, "tok"))
    prepare_data(files, os.path.join(root, "tok"), os.path.join(root, "data"), show_progress=False)
    results = {}
    curves = {}
    for name, kw in ((n, VARIANTS[n]) for n in args.variants):
        tc = TrainConfig(preset=args.preset, data=os.path.join(root, "data"), out=os.path.join(root, name),
                         steps=args.steps, batch_size=args.batch, seq_len=args.seq, eval_every=args.steps,
                         eval_batches=8, seed=0, **kw)
        train(tc, progress=not args.json)
        rows = read_metrics(tc.out)
        tail = rows[int(0.8 * len(rows)):]
        results[name] = {
            "max_over_mean": sum(r["moe_max_over_mean"] for r in tail) / len(tail),
            "worst_layer_max_over_mean": sum(r["moe_max_over_mean_worst"] for r in tail) / len(tail),
            "dead_experts": sum(r["moe_dead_experts"] for r in tail) / len(tail),
            "train_loss": sum(r["loss"] for r in tail) / len(tail),
            "val_loss": rows[-1]["val_loss"],
        }
        curves[name] = [(r["step"], r["moe_max_over_mean"]) for r in rows]
    os.makedirs(args.out, exist_ok=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, pts in curves.items():
            ax.plot(*zip(*pts), label=name, lw=1)
        ax.axhline(1.3, color="k", lw=0.5, ls="--")
        ax.set_xlabel("step"), ax.set_ylabel("max / mean expert load (mean over MoE layers)"), ax.legend()
        fig.savefig(os.path.join(args.out, "balance.png"), dpi=110, bbox_inches="tight")
    except ImportError:
        pass
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if args.json:
        print(json.dumps({"machine": machine, "steps": args.steps, **results}))
        return
    print(f"machine: {machine}; {args.preset}, {args.steps} steps of {args.batch} x {args.seq} tokens")
    print("| balancing | max/mean load | worst layer | dead experts | train loss | val loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['max_over_mean']:.2f} | {r['worst_layer_max_over_mean']:.2f} | {r['dead_experts']:.1f} | "
              f"{r['train_loss']:.3f} | {r['val_loss']:.3f} |")


if __name__ == "__main__":
    main()

"""FP8 training (DeepSeek-V3 section 3.3) against the high-precision baseline, on CPU by emulation.

    python benchmarks/fp8.py                 # tiny preset, 100 steps of 8 x 64 tokens, three runs
    python benchmarks/fp8.py --steps 400 --seq-len 128 --json

Three runs of `nanoseek pretrain`'s trainer on the same data, seed and batches (the built-in corpus, a 1024-token
BPE): fp32 (the baseline; no bf16 autocast on CPU), FP8 with V3's fine-grained scales (1 x 128 activation
tiles, 128 x 128 weight blocks), and FP8 with one scale per tensor (the coarse recipe V3 improves on). Prints the
loss gap to the baseline (mean training loss of the last 20% of steps, and the final validation loss), writes
the three loss curves to one PNG, and measures, for one training step, the bytes of weights and of the tensors
autograd saves for backward (torch.autograd.graph.saved_tensors_hooks, parameters excluded, each storage once).

What CPU emulation shows: the numerics. Every GEMM input is really rounded to e4m3 with the real scales, so loss
curves are what FP8 training produces. What it cannot show: speed. Emulation dequantises and multiplies in fp32,
so FP8 runs are slower here; the torch._scaled_mm path needs a Hopper GPU and is not exercised.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import nanoseek.fp8 as fp8  # noqa: E402
from nanoseek import Transformer  # noqa: E402
from nanoseek.data import default_corpus_files, prepare_data  # noqa: E402
from nanoseek.fp8 import FP8Recipe  # noqa: E402
from nanoseek.machine import describe  # noqa: E402
from nanoseek.fp8.modules import convert_to_fp8  # noqa: E402
from nanoseek.tokenizer import train_tokenizer  # noqa: E402
from nanoseek.train import pretrain  # noqa: E402
from nanoseek.train.loop import read_metrics  # noqa: E402

RUNS = (("fp32", None), ("fp8 block", "block"), ("fp8 tensor", "tensor"))


def prepare(root: str, corpus_bytes: int) -> str:
    files = default_corpus_files(max_bytes=corpus_bytes)
    train_tokenizer(files, 1024, os.path.join(root, "tok"))
    prepare_data(files, os.path.join(root, "tok"), os.path.join(root, "data"), show_progress=False)
    return os.path.join(root, "data")


def memory(data: str, args, mode: str | None) -> dict:
    """Weight bytes as stored for the GEMMs, and bytes autograd saves for backward in one training step."""
    tc = pretrain.TrainConfig(preset=args.preset, data=data, seq_len=args.seq_len, batch_size=args.batch_size)
    vocab = json.load(open(os.path.join(data, "manifest.json")))["vocab_size"]
    torch.manual_seed(0)
    model = Transformer(tc.model_config(vocab)).train()
    if mode:
        convert_to_fp8(model, FP8Recipe(mode, backend="emulate"))
    params = {p.data_ptr() for p in model.parameters()}
    fp8_params = set()
    for name in getattr(model, "fp8_modules", []):
        fp8_params |= {p.data_ptr() for p in model.get_submodule(name).parameters(recurse=False) if p.dim() >= 2}
    # weights: what a GEMM reads. FP8: 1 byte per element plus fp32 block scales; everything else bf16.
    weight = 0
    for p in model.parameters():
        if p.data_ptr() in fp8_params:
            n_scales = p.numel() / (fp8.BLOCK * fp8.BLOCK) if mode == "block" else p.shape[0] if p.dim() == 3 else 1
            weight += p.numel() + 4 * int(n_scales + 0.999)
        else:
            weight += 2 * p.numel()
    seen: dict[tuple, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            key = (t.untyped_storage().data_ptr(), t.dtype)
            seen[key] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, vocab, (args.batch_size, args.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = pretrain.compute_loss(model, x, x, tc)
    loss.backward()
    by_dtype: dict[str, int] = {}
    for (_, dtype), n in seen.items():
        by_dtype[str(dtype).replace("torch.", "")] = by_dtype.get(str(dtype).replace("torch.", ""), 0) + n
    return {"gemm_weight_bytes_bf16_rest": weight, "saved_activation_bytes": sum(seen.values()),
            "saved_by_dtype": by_dtype}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--corpus-bytes", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "fp8_loss.png"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    results: dict = {"machine": describe(), "preset": args.preset, "steps": args.steps,
                     "tokens_per_step": args.batch_size * args.seq_len, "runs": {}}
    with tempfile.TemporaryDirectory() as root:
        data = prepare(root, args.corpus_bytes)
        for name, mode in RUNS:
            tc = pretrain.TrainConfig(preset=args.preset, data=data, out=os.path.join(root, name.replace(" ", "_")),
                                      steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                      lr=args.lr, seed=args.seed, eval_every=args.steps, eval_batches=8,
                                      fp8=mode)
            t0 = time.perf_counter()
            pretrain.train(tc, progress=not args.json)
            rows = read_metrics(tc.out)
            tail = rows[-max(1, args.steps // 5):]
            results["runs"][name] = {
                "losses": [r["loss"] for r in rows],
                "tail_loss": sum(r["loss"] for r in tail) / len(tail),
                "val_loss": rows[-1]["val_loss"],
                "s_per_step": (time.perf_counter() - t0) / args.steps,
                **memory(data, args, mode)}
    base = results["runs"]["fp32"]
    for r in results["runs"].values():
        r["tail_gap"] = (r["tail_loss"] - base["tail_loss"]) / base["tail_loss"]
        r["val_gap"] = (r["val_loss"] - base["val_loss"]) / base["val_loss"]
        # per step, the same batches: the typical relative difference along the whole curve
        diffs = [abs(a - b) / b for a, b in zip(r["losses"], base["losses"])]
        r["mean_abs_step_gap"] = sum(diffs) / len(diffs)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, r in results["runs"].items():
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=name, lw=1)
        ax.set(xlabel="step", ylabel="training loss", yscale="log",
               title=f"{args.preset}: fp32 vs FP8 (emulated), {results['tokens_per_step']} tokens/step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        results["plot"] = args.plot
    except ImportError:
        results["plot"] = None

    if args.json:
        print(json.dumps(results))
        return
    print(f"machine: {results['machine']}")
    print(f"{args.preset}, {args.steps} steps x {results['tokens_per_step']} tokens, lr {args.lr}, seed {args.seed}")
    print(f"{'run':<12}{'tail loss':>10}{'gap':>9}{'val loss':>10}{'gap':>9}{'|step gap|':>11}{'s/step':>8}"
          f"{'weights MiB':>13}{'saved act MiB':>15}")
    for name, r in results["runs"].items():
        print(f"{name:<12}{r['tail_loss']:>10.4f}{100 * r['tail_gap']:>8.2f}%{r['val_loss']:>10.4f}"
              f"{100 * r['val_gap']:>8.2f}%{100 * r['mean_abs_step_gap']:>10.2f}%{r['s_per_step']:>8.2f}"
              f"{r['gemm_weight_bytes_bf16_rest'] / 2**20:>13.2f}{r['saved_activation_bytes'] / 2**20:>15.2f}")
    for name, r in results["runs"].items():
        print(f"saved for backward, {name}: " + ", ".join(f"{k} {v / 2**20:.2f} MiB"
                                                          for k, v in sorted(r["saved_by_dtype"].items())))
    if results["plot"]:
        print(f"plot: {results['plot']}")


if __name__ == "__main__":
    main()

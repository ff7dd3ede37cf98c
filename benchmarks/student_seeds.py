"""How reliably does the demo's small student learn from its teacher's traces? Pretrain `nano` students (a few
variants x seeds) on the demo's corpus, SFT each on the demo's verified traces, and score base and student on the
demo's held-out four-number sums. A student either learns to copy the question's numbers into its chain (and then
scores near the teacher) or never reads them (`8 + 1 = 9, 9 + 1 = 10, ...`); this script measures how often.

Needs a finished `make demo` run (its data, traces and R1-Zero teacher):

    python benchmarks/student_seeds.py --demo runs/demo [--variants tied untied] [--seeds 0 1 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from nanoseek.eval import EvalConfig, evaluate
from nanoseek.model import Transformer
from nanoseek.tasks.curriculum import hard_task
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train import pretrain, sft

VARIANTS = {"tied": "nano", "untied": "nano-untied"}  # the output head tied to the embedding, or its own


def pass1(model_dir: str, n: int) -> float:
    ec = EvalConfig(n=n, samples=4, max_new_tokens=48, batch_size=128, seed=0)  # the demo's protocol
    return evaluate(Transformer.from_pretrained(model_dir), load_tokenizer(model_dir), hard_task(4), ec)["pass@1"]


def run_one(args, variant: str, seed: int) -> dict:
    out = os.path.join(args.out, f"{variant}_s{seed}")
    tc = pretrain.TrainConfig(preset=VARIANTS[variant], data=os.path.join(args.demo, "data"), out=os.path.join(out, "base"),
                              steps=args.steps, batch_size=16, seq_len=128, lr=3e-3, eval_every=0, seed=seed)
    pretrain.train(tc, progress=False)
    sc = sft.SFTConfig(model=os.path.join(tc.out, "latest"), data=os.path.join(args.demo, "traces.jsonl"),
                       out=os.path.join(out, "student"), epochs=args.epochs, steps=args.sft_steps, batch_size=8,
                       seq_len=256, lr=1e-3, seed=0)
    sft.train(sc, progress=False)
    return {"variant": variant, "seed": seed, "base_pass@1": pass1(os.path.join(tc.out, "latest"), args.n),
            "student_pass@1": pass1(os.path.join(sc.out, "latest"), args.n)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", default="runs/demo", help="a finished `nanoseek demo` run directory")
    p.add_argument("--out", default="runs/student_seeds")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1000, help="student pretraining steps (the demo's)")
    p.add_argument("--epochs", type=float, default=8.0, help="SFT epochs on the traces (the demo's)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT updates instead of --epochs")
    p.add_argument("--n", type=int, default=200, help="held-out problems (x 4 samples)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.demo, "traces.jsonl")):
        raise SystemExit(f"student_seeds: error: no traces.jsonl in {args.demo!r}; run `make demo` first")
    torch.set_num_threads(args.threads)
    teacher = pass1(os.path.join(args.demo, "r1zero", "latest"), args.n)
    t0, rows = time.perf_counter(), []
    sft_len = f"{args.sft_steps} SFT updates" if args.sft_steps else f"{args.epochs:g} SFT epochs"
    print(f"teacher (R1-Zero) pass@1 {teacher:.3f}; nano students: {args.steps} pretraining steps, "
          f"{sft_len} on {args.demo}/traces.jsonl; held-out n={args.n} x 4")
    print(f"{'variant':8} {'seed':>4} {'base':>6} {'student':>8} {'of teacher':>10}")
    for variant in args.variants:
        for seed in args.seeds:
            r = run_one(args, variant, seed)
            rows.append(r)
            print(f"{variant:8} {seed:>4} {r['base_pass@1']:6.3f} {r['student_pass@1']:8.3f} "
                  f"{r['student_pass@1'] / teacher:10.0%}", flush=True)
    minutes = (time.perf_counter() - t0) / 60
    print(f"{minutes:.1f} minutes")
    if args.json:
        print(json.dumps({"teacher_pass@1": teacher, "rows": rows, "minutes": round(minutes, 2)}))


if __name__ == "__main__":
    main()

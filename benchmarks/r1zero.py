"""R1-Zero in miniature (DeepSeek-R1 section 2.2), on CPU (1 thread) in under 20 minutes.

1. Base model: pretrain the `tiny` preset (1200 steps) on chat-formatted examples: EASY problems, one addition
   "a + b" (a in 0..27, b in 0..9) with its worked step, "<think> 13 + 5 = 18 </think> <answer> 18 </answer>";
   plus HARD sums of four one-digit numbers (train split), half answered tersely in one step
   ("<think> 6 + 3 + 2 + 5 = 16 </think>", --direct-docs) and half worked as a chain of the easy steps
   ("<think> 6 + 3 = 9, 9 + 2 = 11, 11 + 5 = 16 </think>", --hard-docs). The base knows the format and the easy
   case; on held-out four-number sums it chains only ~27 % of the time (right ~75 %) and otherwise answers in
   one step (right ~15 %: a four-number sum in one step is beyond it).
2. R1-Zero: GRPO straight from the base on the HARD problems with rule rewards only (accuracy + format,
   nanoseek.tasks.rewards). Nothing tells the model to reason step by step or longer; the reward does (chained
   answers are right far more often, so chaining becomes habitual and responses grow).
3. R1: a small cold-start SFT set of worked HARD traces first, then the same GRPO. Compared side by side.

Reported: pass@1 (mean over K samples at temperature 0.6, top-p 0.95), maj@K and pass@K on the held-out test
split (a problem is in it iff its hash says so; pretraining, SFT and RL only ever draw the train split), mean
response length before and after, and the response-length / reward curves during RL (PNG).
--hard-operands 3 gives the earlier three-number variant (easy a in 0..18).

    python benchmarks/r1zero.py [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

from nanoseek import Transformer, load_tokenizer
from nanoseek.data import prepare_data
from nanoseek.eval import EvalConfig, evaluate
from nanoseek.tasks import SYSTEM_PROMPT, Example
from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.tokenizer import EOS, render_chat, train_tokenizer
from nanoseek.train import grpo, pretrain, sft
from nanoseek.train.loop import read_metrics

HARD = ArithmeticTask(digits=1, n_operands=4, ops="+")  # set from --hard-operands in main()
EASY_CHECK = ArithmeticTask(digits=1, n_operands=2, ops="+")  # did the base learn the easy case? (its test split)


def easy_examples(n: int, seed: int, a_max: int = 27) -> list[Example]:
    """EASY problems: one addition "a + b" with a in 0..a_max and b in 0..9, i.e. exactly the single steps a chained
    HARD sum needs (a one-digit sum, then a running total up to 9 * (operands - 1) plus one digit). A different
    problem family from HARD (two operands), so nothing here is a HARD test problem."""
    rng = random.Random(f"r1zero-easy|{seed}")
    out = []
    for _ in range(n):
        a, b = rng.randint(0, a_max), rng.randint(0, 9)
        expr = f"{a} + {b}"
        out.append(Example(prompt=f"What is {expr}?", answer=a + b, meta={"expression": expr}))
    return out


def worked_completion(expression: str) -> str:
    """The reasoning trace a careful solver writes: one running-sum step per '+', then the answer."""
    nums = [int(x) for x in expression.split(" + ")]
    steps, total = [], nums[0]
    for x in nums[1:]:
        steps.append(f"{total} + {x} = {total + x}")
        total += x
    return f"<think> {', '.join(steps)} </think> <answer> {total} </answer>"


def direct_completion(expression: str) -> str:
    """The terse answer most text shows: the whole sum in one step, no intermediate results."""
    total = sum(int(x) for x in expression.split(" + "))
    return f"<think> {expression} = {total} </think> <answer> {total} </answer>"


def conversation(ex, worked: bool = True) -> list[dict]:
    completion = (worked_completion if worked else direct_completion)(ex.meta["expression"])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": completion}]


def build_base(work: str, args) -> str:
    """Corpus -> tokenizer -> token shards -> pretrain; returns the base checkpoint directory."""
    os.makedirs(work, exist_ok=True)
    rng = random.Random(0)
    docs = [conversation(ex) for ex in easy_examples(args.easy_docs, seed=1, a_max=9 * (args.hard_operands - 1))]
    hard = HARD.sample(args.hard_docs + args.direct_docs, "train", seed=2)
    docs += [conversation(ex) for ex in hard[: args.hard_docs]]
    docs += [conversation(ex, worked=False) for ex in hard[args.hard_docs:]]
    rng.shuffle(docs)
    corpus = os.path.join(work, "corpus.jsonl")
    with open(corpus, "w") as f:
        for m in docs:  # data prepare appends EOS after each document, so drop the template's own
            f.write(json.dumps({"text": render_chat(m)[: -len(EOS)]}) + "\n")
    train_tokenizer([corpus], 512, os.path.join(work, "tok"))
    prepare_data([corpus], os.path.join(work, "tok"), os.path.join(work, "data"), show_progress=False)
    tc = pretrain.TrainConfig(preset="tiny", data=os.path.join(work, "data"), out=os.path.join(work, "base"),
                              steps=args.pretrain_steps, batch_size=16, seq_len=128, lr=args.pretrain_lr, eval_every=0,
                              seed=0)
    pretrain.train(tc, progress=not args.json)
    return os.path.join(work, "base", "latest")


def cold_start(base: str, work: str, args) -> str:
    """R1's cold start: SFT on a hundred worked traces of the hard problems (train split)."""
    path = os.path.join(work, "cold_start.jsonl")
    with open(path, "w") as f:
        for ex in HARD.sample(args.cold_start, "train", seed=3):
            f.write(json.dumps({"messages": conversation(ex)}) + "\n")
    tc = sft.SFTConfig(model=base, data=path, out=os.path.join(work, "sft"), epochs=2, batch_size=8, seq_len=256,
                       lr=1e-3, seed=0)
    sft.train(tc, progress=not args.json)
    return os.path.join(work, "sft", "latest")


def run_grpo(model_dir: str, out: str, args) -> list[dict]:
    tc = grpo.GRPOConfig(model=model_dir, task="arithmetic", out=out, steps=args.grpo_steps,
                         prompts_per_step=args.prompts, group_size=args.group, max_new_tokens=args.max_new_tokens,
                         lr=args.lr, eps_high=0.28, aggregation="dapo", drop_equal_groups=args.drop_equal,
                         seed=0)
    grpo.train(tc, progress=not args.json, task=HARD)
    grpo.plot_grpo(out)
    return read_metrics(out)


def score(model_dir: str, args, task=None) -> dict:
    task = HARD if task is None else task
    model = Transformer.from_pretrained(model_dir).eval()
    ec = EvalConfig(n=args.n, samples=args.samples, max_new_tokens=args.max_new_tokens, batch_size=128, seed=0)
    return evaluate(model, load_tokenizer(model_dir), task, ec)


def plot_curves(runs: dict[str, list[dict]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, rows in runs.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["response_length"] for r in rows], label=name)
        axes[1].plot(steps, [r["accuracy"] for r in rows], label=name)
    axes[0].set_ylabel("mean response length (tokens)"), axes[1].set_ylabel("train accuracy (rollouts)")
    for ax in axes:
        ax.set_xlabel("GRPO step"), ax.grid(alpha=0.3), ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The settings (benchmarks/distill.py builds its teacher with them when no R1-Zero checkpoint exists)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/r1zero")
    p.add_argument("--hard-operands", type=int, default=4, help="one-digit numbers summed in a HARD problem")
    p.add_argument("--easy-docs", type=int, default=8000)
    p.add_argument("--hard-docs", type=int, default=800, help="HARD sums worked as a chain of easy steps")
    p.add_argument("--direct-docs", type=int, default=800, help="HARD sums answered in one step")
    p.add_argument("--pretrain-steps", type=int, default=1200)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--cold-start", type=int, default=100)
    p.add_argument("--grpo-steps", type=int, default=90)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--drop-equal", action="store_true", help="DAPO dynamic sampling (drop all-equal groups, refill)")
    p.add_argument("--n", type=int, default=300, help="held-out problems")
    p.add_argument("--samples", type=int, default=4, help="K samples per problem (pass@1 averaged, maj@K)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    return p


def main() -> None:
    args = build_parser().parse_args()
    global HARD
    HARD = ArithmeticTask(digits=1, n_operands=args.hard_operands, ops="+")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    times = {}

    base = build_base(args.out, args)
    times["pretrain"] = time.perf_counter() - t0
    before = score(base, args)
    easy = score(base, args, EASY_CHECK)
    t1 = time.perf_counter()
    zero_rows = run_grpo(base, os.path.join(args.out, "grpo_zero"), args)
    times["grpo_zero"] = time.perf_counter() - t1
    after = score(os.path.join(args.out, "grpo_zero", "latest"), args)
    t2 = time.perf_counter()
    sft_dir = cold_start(base, args.out, args)
    times["sft"] = time.perf_counter() - t2
    cold = score(sft_dir, args)
    t3 = time.perf_counter()
    r1_rows = run_grpo(sft_dir, os.path.join(args.out, "grpo_r1"), args)
    times["grpo_r1"] = time.perf_counter() - t3
    r1 = score(os.path.join(args.out, "grpo_r1", "latest"), args)
    plot_curves({"R1-Zero (base -> GRPO)": zero_rows, "R1 (cold-start SFT -> GRPO)": r1_rows},
                os.path.join(args.out, "rl_curves.png"))
    total = time.perf_counter() - t0

    K = args.samples
    table = [("base, on EASY a + b (check)", easy), ("base (pretrained on easy sums)", before), ("R1-Zero: base -> GRPO", after),
             ("cold-start SFT", cold), ("R1: cold-start SFT -> GRPO", r1)]
    summary = {
        "pass@1_before": before["pass@1"], "pass@1_after": after["pass@1"],
        "mean_length_before": before["mean_length"], "mean_length_after": after["mean_length"],
        f"maj@{K}_before": before["maj@k"], f"maj@{K}_after": after["maj@k"],
        "pass@1_base_easy": easy["pass@1"], "pass@1_cold_start": cold["pass@1"], "pass@1_r1": r1["pass@1"], "mean_length_r1": r1["mean_length"],
        "rl_length_first5": sum(r["response_length"] for r in zero_rows[:5]) / 5,
        "rl_length_last5": sum(r["response_length"] for r in zero_rows[-5:]) / 5,
        "seconds": {k: round(v, 1) for k, v in {**times, "total": total}.items()},
        "plots": [os.path.join(args.out, "rl_curves.png")],
    }
    lines = [
        f"R1-Zero in miniature: tiny preset, held-out {args.hard_operands}-number sums (n={args.n}, K={K} samples, T=0.6, top-p 0.95)",
        f"{'model':<34}{'pass@1':>8}{'maj@' + str(K):>8}{'pass@' + str(K):>8}{'format':>8}{'length':>8}",
    ]
    for name, s in table:
        lines.append(f"{name:<34}{s['pass@1']:>8.3f}{s['maj@k']:>8.3f}{s['pass@k']:>8.3f}{s['format_rate']:>8.3f}"
                     f"{s['mean_length']:>8.1f}")
    lines.append(f"R1-Zero RL: response length {summary['rl_length_first5']:.1f} -> {summary['rl_length_last5']:.1f} "
                 f"tokens (mean of first / last 5 steps); curves in {summary['plots'][0]}")
    lines.append("time (s): " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    lines.append(f"sample after R1-Zero: {after['example']['prompt']!r} -> {after['example']['completion']!r}")
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""R1-Zero in miniature (DeepSeek-R1 section 2.2), on a 2-core CPU in under 20 minutes.

1. Base model: pretrain the `tiny` preset (1200 steps) on chat-formatted examples: EASY problems, one addition
   "a + b" (a in 0..27, b in 0..9) with its worked step, "<think> 13 + 5 = 18 </think> <answer> 18 </answer>";
   plus HARD sums of four one-digit numbers (train split), a third answered tersely in one step
   ("<think> 6 + 3 + 2 + 5 = 16 </think>", --direct-docs) and two thirds worked as a chain of the easy steps
   ("<think> 6 + 3 = 9, 9 + 2 = 11, 11 + 5 = 16 </think>", --hard-docs). The base knows the format and the easy
   case; on held-out four-number sums it sometimes answers in one step, which is seldom right (a four-number sum
   in one step is beyond it), and otherwise chains, which is mostly right (the script prints both rates).
2. R1-Zero: GRPO straight from the base on the HARD problems with rule rewards only (accuracy + format,
   nanoseek.tasks.rewards). Nothing tells the model to reason step by step or longer; the reward does (chained
   answers are right far more often, so chaining becomes habitual and responses grow).
3. R1: a small cold-start SFT set of worked HARD traces first, then the same GRPO. Compared side by side.

Reported: pass@1 (mean over K samples at temperature 0.6, top-p 0.95), maj@K and pass@K on --n problems drawn
with replacement from the held-out test split (a problem is in it iff its hash says so; pretraining, SFT and RL
only ever draw the train split), how many of them are distinct, the share of samples that chain and the accuracy
of chained and one-step samples, mean response length before and after, and the response-length / reward curves
during RL (PNG). The EASY check is drawn from the test split of a + b with one-digit a and b: a handful of
distinct problems, all also in the pretraining corpus (the script prints both counts), so it is no held-out result.
--hard-operands 3 gives the earlier three-number variant (easy a in 0..18).

    python benchmarks/r1zero.py [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from nanoseek import Transformer, load_tokenizer
from nanoseek.data import prepare_data
from nanoseek.eval import EvalConfig, evaluate
from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.tasks.curriculum import conversation, corpus_examples, hard_task, write_corpus
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train import grpo, pretrain, sft
from nanoseek.train.loop import read_metrics

HARD = hard_task(4)  # set from --hard-operands in main()
EASY_CHECK = ArithmeticTask(digits=1, n_operands=2, ops="+")  # did the base learn the easy case? (its test split)


def build_base(work: str, args) -> str:
    """Corpus -> tokenizer -> token shards -> pretrain; returns the base checkpoint directory."""
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    write_corpus(corpus, args.easy_docs, args.hard_docs, args.direct_docs, args.hard_operands)
    train_tokenizer([corpus], 512, os.path.join(work, "tok"))
    prepare_data([corpus], os.path.join(work, "tok"), os.path.join(work, "data"), show_progress=False)
    tc = pretrain.TrainConfig(preset="tiny", data=os.path.join(work, "data"), out=os.path.join(work, "base"),
                              steps=args.pretrain_steps, batch_size=16, seq_len=128, lr=args.pretrain_lr, eval_every=0,
                              seed=args.seed)
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


class _Graded:
    """The task, recording every graded completion (for the chain-rate diagnosis; no extra sampling)."""

    def __init__(self, task):
        self.task, self.graded = task, []

    def __getattr__(self, name):
        return getattr(self.task, name)

    def verify(self, completion, example):
        right = self.task.verify(completion, example)
        self.graded.append((completion, right))
        return right


def score(model_dir: str, args, task=None) -> dict:
    """evaluate() on --n problems drawn from the test split (with replacement: the split is a hash of the problem,
    so a small problem space repeats problems), plus how many are distinct and the chain-rate diagnosis: the share
    of samples whose <think> holds a ',' (a chain of steps) and the accuracy of chained and one-step samples."""
    task = _Graded(HARD if task is None else task)
    model = Transformer.from_pretrained(model_dir).eval()
    ec = EvalConfig(n=args.n, samples=args.samples, max_new_tokens=args.max_new_tokens, batch_size=128, seed=0)
    out = evaluate(model, load_tokenizer(model_dir), task, ec)
    out["distinct_problems"] = len({ex.prompt for ex in task.sample(ec.n, split=ec.split, seed=ec.seed)})
    chained = [("," in c.split("<think>", 1)[-1].split("</think>", 1)[0], r) for c, r in task.graded]
    n_chain = sum(ch for ch, _ in chained)
    out["chained"] = n_chain / max(1, len(chained))
    out["right_if_chained"] = sum(r for ch, r in chained if ch) / max(1, n_chain)
    out["right_if_one_step"] = sum(r for ch, r in chained if not ch) / max(1, len(chained) - n_chain)
    return out


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
    p.add_argument("--hard-docs", type=int, default=1600, help="HARD sums worked as a chain of easy steps")
    p.add_argument("--direct-docs", type=int, default=800, help="HARD sums answered in one step")
    p.add_argument("--pretrain-steps", type=int, default=1200)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    # The corpus mix and the seed are the demo's: the base's pass@1 and GRPO's lift depend on the initial draw, and
    # with 800 + 800 documents some draws never learn to copy the third operand, or answer in one step accurately
    # enough that GRPO reinforces that instead (on one machine: R1-Zero at 0.09, 18-token answers; BENCHMARKS.md,
    # "make demo", has the draws of each mix).
    p.add_argument("--seed", type=int, default=2, help="pretraining seed (the initial weights)")
    p.add_argument("--cold-start", type=int, default=100)
    p.add_argument("--grpo-steps", type=int, default=90)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--drop-equal", action="store_true", help="DAPO dynamic sampling (drop all-equal groups, refill)")
    p.add_argument("--n", type=int, default=300, help="held-out problems")
    p.add_argument("--samples", type=int, default=4, help="K samples per problem (pass@1 averaged, maj@K)")
    # Both cores. The thread count changes the draw too (matmuls sum in another order): on one 2-core Intel Xeon,
    # 1 thread pretrained a base that chains without reading the operands (0.09, RL cannot fix it), 2 threads one
    # at 0.62 (BENCHMARKS.md, "R1-Zero in miniature").
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    return p


def main() -> None:
    args = build_parser().parse_args()
    global HARD
    HARD = hard_task(args.hard_operands)
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
    easy_corpus = {ex.prompt for ex in corpus_examples(args.easy_docs, args.hard_docs, args.direct_docs,
                                                          args.hard_operands)[0]}
    easy_test = {ex.prompt for ex in EASY_CHECK.sample(args.n, "test", seed=0)}
    table = [("base, on EASY a + b (check)", easy), ("base (pretrained on easy sums)", before), ("R1-Zero: base -> GRPO", after),
             ("cold-start SFT", cold), ("R1: cold-start SFT -> GRPO", r1)]
    summary = {
        "pass@1_before": before["pass@1"], "pass@1_after": after["pass@1"],
        "mean_length_before": before["mean_length"], "mean_length_after": after["mean_length"],
        f"maj@{K}_before": before["maj@k"], f"maj@{K}_after": after["maj@k"],
        "distinct_problems": before["distinct_problems"], "easy_distinct_problems": len(easy_test),
        "easy_in_pretraining_corpus": len(easy_test & easy_corpus),
        "chained_before": before["chained"], "chained_after": after["chained"],
        "pass@1_base_easy": easy["pass@1"], "pass@1_cold_start": cold["pass@1"], "pass@1_r1": r1["pass@1"],
        "mean_length_r1": r1["mean_length"],
        "rl_length_first5": sum(r["response_length"] for r in zero_rows[:5]) / 5,
        "rl_length_last5": sum(r["response_length"] for r in zero_rows[-5:]) / 5,
        "seconds": {k: round(v, 1) for k, v in {**times, "total": total}.items()},
        "plots": [os.path.join(args.out, "rl_curves.png")],
    }
    lines = [
        f"R1-Zero in miniature: tiny preset, held-out {args.hard_operands}-number sums "
        f"(n={args.n}, K={K} samples, T=0.6, top-p 0.95)",
        f"{'model':<34}{'pass@1':>8}{'maj@' + str(K):>8}{'pass@' + str(K):>8}{'format':>8}{'length':>8}"
        f"{'distinct':>10}{'chained':>9}{'right|chain':>13}{'right|1-step':>14}",
    ]
    for name, s in table:
        lines.append(f"{name:<34}{s['pass@1']:>8.3f}{s['maj@k']:>8.3f}{s['pass@k']:>8.3f}{s['format_rate']:>8.3f}"
                     f"{s['mean_length']:>8.1f}{s['distinct_problems']:>10}{s['chained']:>9.2f}"
                     f"{s['right_if_chained']:>13.2f}{s['right_if_one_step']:>14.2f}")
    lines.append(f"distinct: of the n={args.n} problems drawn from the test split (with replacement). The EASY check's "
                 f"{len(easy_test)} distinct problems: {len(easy_test & easy_corpus)} also in the pretraining corpus "
                 "(a check that the base learned the easy case, not a held-out result)")
    lines.append(f"R1-Zero RL: response length {summary['rl_length_first5']:.1f} -> {summary['rl_length_last5']:.1f} "
                 f"tokens (mean of first / last 5 steps); curves in {summary['plots'][0]}")
    lines.append("time (s): " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    lines.append(f"sample after R1-Zero: {after['example']['prompt']!r} -> {after['example']['completion']!r}")
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

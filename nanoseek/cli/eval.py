"""`nanoseek eval`: pass@1 / pass@k / maj@k of a checkpoint on a task's held-out split."""

from __future__ import annotations

import os

import torch

from nanoseek import tasks
from nanoseek.cli.common import add_config_flags, config_from_args, parser, report
from nanoseek.eval import EvalConfig, evaluate, plot_curve
from nanoseek.model import Transformer
from nanoseek.tokenizer import load_tokenizer

HELP = {"n": "number of held-out problems", "samples": "samples per problem (k)", "temperature": "0 = greedy"}


def run(args) -> None:
    ec = config_from_args(EvalConfig, args)
    if ec.samples < 1 or ec.n < 1:
        raise ValueError(f"--n and --samples must be >= 1, got {ec.n}, {ec.samples}")
    torch.manual_seed(ec.seed)
    model = Transformer.from_pretrained(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    task = tasks.get(args.task, difficulty=args.difficulty)
    s = evaluate(model, tokenizer, task, ec, progress=not args.json)
    if args.plot:
        s["plot"] = plot_curve(s, args.plot, f"{args.task} ({os.path.basename(os.path.normpath(args.model))})")
    K = s["k"]
    report(args, s, f"{args.task}: {s['n']} held-out problems x {K} samples (T={ec.temperature}, top-p={ec.top_p})\n"
                    f"  pass@1 {s['pass@1']:.3f}   pass@{K} {s['pass@k']:.3f}   maj@{K} {s['maj@k']:.3f}   "
                    f"format {s['format_rate']:.3f}   mean length {s['mean_length']:.1f} tokens")


def register(sub) -> None:
    p = parser(sub, "eval", "pass@1 / pass@k / maj@k of a checkpoint on a task's held-out split")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--task", required=True, help="arithmetic | countdown | jsonl:PATH")
    p.add_argument("--difficulty", type=int, default=None, help="task difficulty (the task's default when unset)")
    add_config_flags(p, EvalConfig, help=HELP, choices={"split": ("train", "test")})
    p.add_argument("--plot", metavar="PATH", default=None, help="write accuracy vs k (pass@k, maj@k) as a PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)

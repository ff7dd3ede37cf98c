"""`nanoseek demo` (`make demo`): the pipeline end to end on built-in defaults, writing RUN_DIR/report.md."""

from __future__ import annotations

import json

from nanoseek.cli.common import parser
from nanoseek.demo import run as run_demo


def run(args) -> None:
    report = run_demo(args.out, args.steps, args.batch_size, args.seq_len, args.vocab_size, args.corpus_bytes)
    if args.json:
        print(json.dumps(report))


def register(sub) -> None:
    p = parser(sub, "demo", "tokenizer -> data -> pretrain tiny -> sample, on built-in defaults")
    p.add_argument("--out", default="runs/demo", help="run directory, replaced (default: runs/demo)")
    p.add_argument("--steps", type=int, default=250, help="pretraining steps (default: 250)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    p.add_argument("--seq-len", type=int, default=256, help="(default: 256)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary (default: 4096)")
    p.add_argument("--corpus-bytes", type=int, default=8_000_000, help="how much of the built-in corpus to use")
    p.add_argument("--json", action="store_true", help="print one JSON summary object last")
    p.set_defaults(func=run)

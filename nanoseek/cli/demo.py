"""`nanoseek demo` (`make demo`): pretrain an MoE, teach it to reason with RL, distill it, serve it, and write
RUN_DIR/report.md."""

from __future__ import annotations

import json
from dataclasses import replace

from nanoseek.cli.common import parser
from nanoseek.demo import DemoConfig, run as run_demo


def run(args) -> None:
    dc = DemoConfig.quick() if args.quick else DemoConfig()
    dc = replace(dc, out=args.out or dc.out, threads=args.threads, serve=not args.no_serve,
                 seed=dc.seed if args.seed is None else args.seed)
    report = run_demo(dc)
    if args.json:
        print(json.dumps(report))


def register(sub) -> None:
    p = parser(sub, "demo", "the R1 story in miniature: pretrain, GRPO, distill, serve, report card")
    p.add_argument("--quick", action="store_true", help="every stage at toy size (about a minute)")
    p.add_argument("--out", default=None, help="run directory, replaced (default: runs/demo, runs/demo-quick)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: 0 = all cores)")
    p.add_argument("--seed", type=int, default=None, help="pretraining seed (default: 2; the lift depends on the draw)")
    p.add_argument("--no-serve", action="store_true", help="skip the serving stage")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object last")
    p.set_defaults(func=run)

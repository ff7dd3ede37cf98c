"""`nanoseek plot RUN_DIR`: PNG plots of a run's metrics.jsonl."""

from __future__ import annotations

from nanoseek.cli.common import parser
from nanoseek.plot import plot_run


def run(args) -> None:
    print("\n".join(plot_run(args.run_dir)))


def register(sub) -> None:
    p = parser(sub, "plot", "PNG plots of a run's metrics.jsonl (loss, learning rate, expert load)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=run)

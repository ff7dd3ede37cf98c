"""The `nanoseek` command (also `python -m nanoseek`): one module per subcommand, listed in COMMANDS.

Each module defines `register(subparsers)`, which adds its parser and sets `func`. This package is the only place
that parses arguments, prints for a terminal and exits; the library raises exceptions. One error style:
`nanoseek CMD: error: ...` on stderr, exit status 2 for bad input (what to change is in the message), 1 for a
run that failed on its own (for example a diverged training run).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nanoseek.train.loop import TrainingDiverged

COMMANDS = ("info", "plan", "tokenizer", "data", "pretrain", "sft", "grpo", "distill", "eval", "generate", "chat",
            "serve", "convert", "plot", "demo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 / R1 in one small PyTorch codebase")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"nanoseek.cli.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # bad input: one line, not a traceback
        _fail(args.command, e, 2)
    except TrainingDiverged as e:
        _fail(args.command, e, 1)


def _fail(command: str, error: BaseException, status: int) -> None:
    print(f"nanoseek {command}: error: {error}", file=sys.stderr)
    raise SystemExit(status) from None

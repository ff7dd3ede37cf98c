"""What every command shares: flags made from a config dataclass, and how a summary is printed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing


# the help of fields several commands' configs share; a command's own `help` entry wins
COMMON_HELP = {
    "out": "run directory (checkpoints, metrics.jsonl, plots)",
    "resume": "continue from the newest complete checkpoint in --out",
    "task": "arithmetic | countdown | jsonl:PATH",
    "difficulty": "task difficulty (the task's default when unset)",
    "prefill_think": "end the prompt with <think> (R1's template)",
}


def _flag_type(hint):
    """int for `int`, `int | None` and `Optional[int]`; likewise float, str, bool."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_config_flags(p: argparse.ArgumentParser, cls, *, required=(), skip=(), help: dict | None = None,
                     choices: dict | None = None) -> None:
    """One --flag per field of the dataclass `cls` (`micro_batch_size` -> `--micro-batch-size`), typed and
    defaulted from the field. A bool field becomes a switch. `config_from_args` reads them back."""
    hints = typing.get_type_hints(cls)
    help, choices = {**COMMON_HELP, **(help or {})}, choices or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, typ = "--" + f.name.replace("_", "-"), _flag_type(hints[f.name])
        text = help.get(f.name, "")
        if f.default is not None and f.default is not False and f.default != "" and f.name not in required:
            text = f"{text} (default: {f.default})".strip()
        if typ is bool:
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(flag, action=action, default=f.default, help=text)
        elif f.name in required:
            p.add_argument(flag, type=typ, required=True, choices=choices.get(f.name), help=text)
        else:
            p.add_argument(flag, type=typ, default=f.default, choices=choices.get(f.name), help=text)


def config_from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def add_output_flags(p: argparse.ArgumentParser, plot: bool = True) -> None:
    if plot:
        p.add_argument("--no-plot", action="store_true", help="do not write PNG plots into the run directory")
    p.add_argument("--json", action="store_true", help="print one JSON summary object last")


def report(args: argparse.Namespace, summary: dict, text: str) -> None:
    """The command's last line: the summary as JSON with --json, else `text`."""
    print(json.dumps(summary) if args.json else text)


def parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help)

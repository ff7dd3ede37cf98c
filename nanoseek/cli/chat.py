"""`nanoseek chat`: an interactive chat with a checkpoint; the reasoning is shown dimmed, apart from the answer."""

from __future__ import annotations

import sys

from nanoseek.chat import chat_loop, load
from nanoseek.cli.common import parser
from nanoseek.cli.generate import sampling_flags, sampling_params


def run(args) -> None:
    engine, tok = load(args.model, args.max_seq_len, args.dtype)
    chat_loop(engine, tok, sampling_params(args, tok.eos_id), sys.stdin, sys.stdout, args.system, sys.stdout.isatty())


def register(sub) -> None:
    p = parser(sub, "chat", "interactive chat; reasoning shown apart from the answer")
    sampling_flags(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=run)

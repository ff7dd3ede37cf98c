"""`nanoseek generate`: stream a continuation of a prompt (or a chat answer) from a checkpoint."""

from __future__ import annotations

import sys

from nanoseek.chat import load, stream_text, terminal_writer
from nanoseek.cli.common import parser
from nanoseek.engine import SamplingParams


def sampling_flags(p, temperature: float = 0.6) -> None:
    """The flags generate and chat share: the checkpoint, sampling and the engine's size."""
    p.add_argument("--model", required=True, help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="(default: 256)")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature})")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off (default: 0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--max-seq-len", type=int, default=4096, help="prompt + generated tokens (default: 4096)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype (default: float32)")


def sampling_params(args, eos: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, stop_token_ids=(eos,), seed=args.seed)


def run(args) -> None:
    engine, tok = load(args.model, args.max_seq_len, args.dtype)
    if args.chat:
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tok.encode(args.prompt, add_bos=True)
    stream_text(engine, tok, ids, sampling_params(args, tok.eos_id), terminal_writer(sys.stdout, sys.stdout.isatty()),
                echo="" if args.chat else args.prompt)
    sys.stdout.write("\n")


def register(sub) -> None:
    p = parser(sub, "generate", "stream a continuation of --prompt")
    sampling_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    p.set_defaults(func=run)

"""`nanoseek tokenizer train`: a byte-level BPE tokenizer with the chat and reasoning tokens."""

from __future__ import annotations

from nanoseek.cli.common import add_output_flags, parser, report
from nanoseek.corpus import default_corpus_files
from nanoseek.tokenizer import MIN_VOCAB_SIZE, train_tokenizer

INPUT_HELP = ("text files (one document each) or .jsonl files with a 'text' field; default: the built-in corpus "
              "(the Python standard library's sources)")


def run(args) -> None:
    files = args.input or default_corpus_files()
    tok = train_tokenizer(files, args.vocab_size, args.out, min_frequency=args.min_frequency,
                          show_progress=not args.json)
    summary = {"out": args.out, "vocab_size": tok.vocab_size, "files": len(files),
               "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    report(args, summary, f"trained a {tok.vocab_size}-token byte-level BPE tokenizer on {len(files)} file(s) -> "
                          f"{args.out}")


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    t = parser(p.add_subparsers(dest="tokenizer_command", required=True), "train",
               "train a tokenizer on text / .jsonl files")
    t.add_argument("--input", nargs="+", metavar="FILE", help=INPUT_HELP)
    t.add_argument("--vocab-size", type=int, required=True, help=f"total vocabulary size (>= {MIN_VOCAB_SIZE})")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    add_output_flags(t, plot=False)
    t.set_defaults(func=run)

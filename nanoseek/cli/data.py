"""`nanoseek data prepare`: tokenize text into train/val token shards for pretraining."""

from __future__ import annotations

from nanoseek.cli.common import add_output_flags, parser, report
from nanoseek.cli.tokenizer import INPUT_HELP
from nanoseek.corpus import default_corpus_files
from nanoseek.data import prepare_data


def run(args) -> None:
    files = args.input or default_corpus_files()
    m = prepare_data(files, args.tokenizer, args.out, val_fraction=args.val_fraction,
                     shard_tokens=args.shard_tokens, seed=args.seed, show_progress=not args.json)
    summary = {"out": args.out, "train_tokens": m["train_tokens"], "val_tokens": m["val_tokens"],
               "dtype": m["dtype"], "vocab_size": m["vocab_size"],
               "documents": m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"]}
    report(args, summary, f"wrote {m['train_tokens']:,} train + {m['val_tokens']:,} val tokens ({m['dtype']}) -> "
                          f"{args.out}")


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare token shards for training")
    d = parser(p.add_subparsers(dest="data_command", required=True), "prepare",
               "tokenize text / .jsonl files into train/val token shards")
    d.add_argument("--input", nargs="+", metavar="FILE", help=INPUT_HELP)
    d.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory (tokenizer.json)")
    d.add_argument("--out", required=True, metavar="DIR", help="output data directory")
    d.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out for validation")
    d.add_argument("--shard-tokens", type=int, default=2**26, help="tokens per shard file")
    d.add_argument("--seed", type=int, default=0, help="seed for choosing the validation documents")
    add_output_flags(d, plot=False)
    d.set_defaults(func=run)

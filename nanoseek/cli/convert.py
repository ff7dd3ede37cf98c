"""`nanoseek convert`: rewrite a checkpoint in another dtype or in DeepSeek's released FP8 layout."""

from __future__ import annotations

from nanoseek.cli.common import add_output_flags, parser, report
from nanoseek.convert import convert


def run(args) -> None:
    s = convert(args.model, args.out, fp8=args.fp8, dtype=args.dtype)
    kind = f"FP8 ({s['fp8_tensors']} float8 weights with 128x128 scales)" if args.fp8 else s["dtype"]
    report(args, s, f"wrote {s['out']}: {kind}, {s['tensors']} tensors, {s['weight_bytes'] / 2**20:.1f} MiB of weights")


def register(sub) -> None:
    p = parser(sub, "convert", "rewrite a checkpoint (dtype, or DeepSeek's FP8 release layout)")
    p.add_argument("--model", required=True, help="source checkpoint directory")
    p.add_argument("--out", required=True, help="new checkpoint directory (replaced whole if it exists)")
    p.add_argument("--fp8", action="store_true",
                   help="float8_e4m3fn weights with 128x128 weight_scale_inv, as DeepSeek-V3/R1 were released")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="dtype of the tensors not stored in FP8 (default: the source's torch_dtype)")
    add_output_flags(p, plot=False)
    p.set_defaults(func=run)

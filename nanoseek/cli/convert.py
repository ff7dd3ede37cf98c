"""`nanoseek convert`: rewrite a checkpoint in another dtype or in DeepSeek's released FP8 layout, or turn a sharded
(torch.distributed.checkpoint) training checkpoint into the transformers layout."""

from __future__ import annotations

import tempfile

from nanoseek.cli.common import add_output_flags, parser, report
from nanoseek.convert import convert
from nanoseek.train.sharded import export_pretrained, is_sharded_checkpoint


def run(args) -> None:
    if is_sharded_checkpoint(args.model):  # saved by a distributed run: first the whole model, in this process
        with tempfile.TemporaryDirectory() as tmp:
            s = convert(export_pretrained(args.model, tmp), args.out, fp8=args.fp8, dtype=args.dtype)
    else:
        s = convert(args.model, args.out, fp8=args.fp8, dtype=args.dtype)
    kind = f"FP8 ({s['fp8_tensors']} float8 weights with 128x128 scales)" if args.fp8 else s["dtype"]
    report(args, s, f"wrote {s['out']}: {kind}, {s['tensors']} tensors, {s['weight_bytes'] / 2**20:.1f} MiB of weights")


def register(sub) -> None:
    p = parser(sub, "convert", "rewrite a checkpoint (dtype, or DeepSeek's FP8 release layout); a sharded training "
                               "checkpoint becomes a transformers-layout one")
    p.add_argument("--model", required=True, help="source checkpoint directory (transformers layout or sharded)")
    p.add_argument("--out", required=True, help="new checkpoint directory (replaced whole if it exists)")
    p.add_argument("--fp8", action="store_true",
                   help="float8_e4m3fn weights with 128x128 weight_scale_inv, as DeepSeek-V3/R1 were released")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="dtype of the tensors not stored in FP8 (default: the source's torch_dtype)")
    add_output_flags(p, plot=False)
    p.set_defaults(func=run)

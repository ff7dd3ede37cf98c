"""`nanoseek plan`: per-rank training memory of a layout, measured from the real sharded meta tensors under a fake
process group beside the analytical plan (see nanoseek/plan.py)."""

from __future__ import annotations

import json

from nanoseek.accounting import RECOMPUTE
from nanoseek.cli.common import parser
from nanoseek.config import ModelConfig
from nanoseek.plan import LAYOUTS, plan

GIB = 2**30


def plan_table(name: str, r: dict) -> str:
    rows = [f"nanoseek plan: {name} on {r['world_size']} ranks = pp {r['pp']} x dp {r['dp']} x ep {r['ep']} "
            f"(FSDP over each stage's {r['world_size'] // r['pp']} ranks), recompute {r['recompute']}, "
            f"{r['dtype']} weights, {r['tokens_per_rank']} tokens per micro-batch per rank",
            f"experts sharded on dim {r['expert_shard_dim']} over dp" if r["expert_shard_dim"] is not None else
            "no expert parallelism",
            f"largest rank: pipeline stage {r['stage']}" if r["pp"] > 1 else "", "",
            f"{'per rank':<14}{'measured':>12}{'planned':>12}"]
    for key in ("params", "grads", "optimizer"):
        rows.append(f"{key:<14}{r[key + '_bytes_per_rank'] / GIB:>10.2f} GiB"
                    f"{r['planned_' + key + '_bytes_per_rank'] / GIB:>8.2f} GiB")
    for key in ("gathered", "activation"):  # analytical in both columns: nothing to measure on the meta device
        rows.append(f"{key:<14}{r[key + '_bytes_per_rank'] / GIB:>10.2f} GiB{r[key + '_bytes_per_rank'] / GIB:>8.2f} GiB"
                    "  (analytical)")
    rows.append(f"{'total':<14}{r['total_bytes_per_rank'] / GIB:>10.2f} GiB"
                f"{r['planned_total_bytes_per_rank'] / GIB:>8.2f} GiB")
    rows.append(f"measured parameter shards vs plan: {100 * r['params_vs_plan']:+.3f}%")
    if r["bubble"]:
        rows.append(f"pipeline bubble with {r['microbatches']} micro-batches: " +
                    ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["bubble"].items()))
    rows.append(f"({r['seconds']:.1f} s)")
    return "\n".join(row for row in rows if row is not None)


def run(args) -> None:
    if args.layout:
        for k, v in LAYOUTS[args.layout].items():
            setattr(args, k, v)
    if not args.world_size:
        raise ValueError("--world-size is required (or a named --layout)")
    cfg = ModelConfig.load(args.preset)
    r = plan(cfg, args.world_size, args.ep, args.pp, args.recompute, args.tokens_per_rank, args.train_dtype,
             microbatches=args.microbatches)
    if args.json:
        print(json.dumps(r))
    else:
        print(plan_table(args.layout or args.preset, r))


def register(sub) -> None:
    s = parser(sub, "plan", "per-rank training memory at scale: the real sharding code on the meta device under a "
                            "fake process group, beside the analytical plan")
    s.add_argument("--preset", default="v3", help="preset or checkpoint directory (default: v3)")
    s.add_argument("--layout", choices=sorted(LAYOUTS),
                   help="a named layout: deepseek-v3 = DeepSeek-V3's own (2048 ranks, ep 64, pp 16, selective "
                        "recomputation)")
    s.add_argument("--world-size", type=int, default=0, help="number of ranks (processes, one per GPU)")
    s.add_argument("--ep", type=int, default=1, help="expert-parallel degree (default: 1)")
    s.add_argument("--pp", type=int, default=1, help="pipeline stages (default: 1)")
    s.add_argument("--recompute", choices=RECOMPUTE, default="none", help="activation recomputation (default: none)")
    s.add_argument("--tokens-per-rank", type=int, default=4096, help="tokens per micro-batch per rank (default: 4096)")
    s.add_argument("--microbatches", type=int, default=None, help="micro-batches per step (default: 4 x pp)")
    s.add_argument("--train-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="weights and gradients (default: bfloat16)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=run)

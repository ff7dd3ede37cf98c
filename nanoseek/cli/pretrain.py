"""`nanoseek pretrain`: next-token pretraining with MTP and auxiliary-loss-free balancing; under torchrun the same
command trains data parallel (FSDP2) and, with --ep, expert parallel."""

from __future__ import annotations

import os

from nanoseek.cli.common import add_config_flags, add_output_flags, config_from_args, parser, report
from nanoseek.model.block import RECOMPUTE
from nanoseek.pipeline import SCHEDULES
from nanoseek.train.pretrain import TrainConfig, train

HELP = {
    "preset": "architecture preset (see `nanoseek info`)",
    "config": "config.json overriding the preset's architecture",
    "data": "directory from `nanoseek data prepare`",
    "batch_size": "global batch in sequences",
    "micro_batch_size": "sequences per forward (gradient accumulation); default: the whole batch",
    "lr": "peak learning rate (default: per preset)",
    "warmup": "warmup steps (default: 10%% of the steps, at most 100)",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "keep": "keep only the newest N checkpoints",
    "mtp_lambda": "weight of the multi-token prediction loss (0: MTP not trained)",
    "bias_gamma": "speed of the auxiliary-loss-free bias update",
    "balance_alpha": "weight of the sequence-wise balance loss",
    "ep": "expert parallelism under torchrun: split routed experts over groups of EP ranks",
    "pp": "pipeline parallelism under torchrun: split the blocks over PP stages (nanoseek/pipeline.py)",
    "pp_schedule": "pipeline schedule: 1f1b, interleaved (2 stages per rank) or dualpipev (V-shaped, DeepSeek's)",
    "pp_microbatches": "pipeline micro-batches per step (default: 2 x pp)",
    "recompute": "activation recomputation per block in the backward: block (keep only block inputs) or selective "
                 "(keep matmul and attention outputs, recompute norms and elementwise ops)",
}


def run(args) -> None:
    s = train(config_from_args(TrainConfig, args), progress=not args.json, plot=not args.no_plot)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    report(args, s, f"done: {s['steps']} steps, loss {s['final_loss']:.3f}, val loss {s['val_loss']}, "
                    f"checkpoint {s['checkpoint']}")


def register(sub) -> None:
    p = parser(sub, "pretrain", "pretrain a DeepSeek-V3-style model on prepared token shards")
    add_config_flags(p, TrainConfig, required=("data", "out"), skip=("fp8",), help=HELP,
                     choices={"schedule": ("cosine", "wsd"), "recompute": RECOMPUTE,
                              "pp_schedule": SCHEDULES})
    p.add_argument("--fp8", nargs="?", const="block", choices=("block", "tensor"), default=None,
                   help="FP8 GEMMs: block = 1x128 / 128x128 scaling (DeepSeek-V3 section 3.3), tensor = one scale "
                        "per tensor (for comparison)")
    add_output_flags(p)
    p.set_defaults(func=run)

"""`nanoseek sft`: supervised fine-tuning on chat / reasoning traces, the loss on assistant tokens only."""

from __future__ import annotations

from nanoseek.cli.common import add_config_flags, add_output_flags, config_from_args, parser, report
from nanoseek.train.sft import SFTConfig, train

HELP = {
    "model": "starting checkpoint (with tokenizer.json)",
    "data": 'JSONL: {"messages": [...]} or {"prompt", "completion"} per line',
    "steps": "default: enough for --epochs passes over the packed rows",
    "batch_size": "packed rows per step",
    "warmup": "default: 5%% of the steps",
    "teacher": "logit distillation: a teacher checkpoint with the same tokenizer",
    "kd_weight": "loss = CE + W * divergence to the teacher on the same target tokens",
    "kd_beta": "the divergence: 0 forward KL(teacher || student), 1 reverse, between: JSD",
}


def run(args) -> None:
    s = train(config_from_args(SFTConfig, args), progress=not args.json, plot=not args.no_plot)
    report(args, s, f"done: {s['steps']} steps on {s['conversations']} conversations ({s['packed_rows']} packed "
                    f"rows), loss {s['final_loss']:.3f}, checkpoint {s['checkpoint']}")


def register(sub) -> None:
    p = parser(sub, "sft", "supervised fine-tuning on chat / reasoning traces (loss on assistant tokens)")
    add_config_flags(p, SFTConfig, required=("model", "data", "out"), help=HELP)
    add_output_flags(p)
    p.set_defaults(func=run)

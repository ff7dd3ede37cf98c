"""`nanoseek grpo`: GRPO reinforcement learning with rule-based rewards (R1-Zero style)."""

from __future__ import annotations

from nanoseek.cli.common import add_config_flags, add_output_flags, config_from_args, parser, report
from nanoseek.train.grpo import AGGREGATIONS, RATIOS, GRPOConfig, train

HELP = {
    "model": "starting checkpoint (with tokenizer.json); also the reference policy",
    "prompts_per_step": "P prompts per step",
    "group_size": "G samples per prompt",
    "ppo_epochs": "optimizer steps per rollout batch",
    "eps_high": "upper clip (DAPO clip-higher: 0.28)",
    "beta": "k3 KL weight (0: no reference model)",
    "ratio": "sequence = GSPO",
    "scale": "advantage scaling (none = Dr. GRPO)",
    "drop_equal_groups": "DAPO dynamic sampling with refill",
    "mask_truncated": "no loss on completions cut at max_new_tokens",
    "overlong_cache": "DAPO soft overlong penalty over the last N tokens",
}


def run(args) -> None:
    s = train(config_from_args(GRPOConfig, args), progress=not args.json, plot=not args.no_plot)
    report(args, s, f"done: {s['steps']} steps, reward {s['reward']:.3f}, accuracy {s['accuracy']:.3f}, "
                    f"checkpoint {s['checkpoint']}")


def register(sub) -> None:
    p = parser(sub, "grpo", "GRPO reinforcement learning with rule-based rewards (R1-Zero style)")
    add_config_flags(p, GRPOConfig, required=("model", "task", "out"), help=HELP,
                     choices={"aggregation": AGGREGATIONS, "ratio": RATIOS, "scale": ("std", "none")})
    add_output_flags(p)
    p.set_defaults(func=run)

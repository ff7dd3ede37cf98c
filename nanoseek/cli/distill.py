"""`nanoseek distill generate|onpolicy`: rejection-sampled reasoning traces from a teacher (for `nanoseek sft`),
and on-policy distillation into a smaller student."""

from __future__ import annotations

import sys

from nanoseek.cli.common import add_config_flags, add_output_flags, config_from_args, parser, report
from nanoseek.train.distill import (KL_MODES, GenerateConfig, OnPolicyConfig, format_yield, generate_traces,
                                    train_onpolicy)

GENERATE_HELP = {
    "teacher": "teacher checkpoint (with tokenizer.json), e.g. an RL model",
    "task": "arithmetic | countdown | jsonl:PATH (prompts come from its train split)",
    "out": "JSONL of kept traces ({\"messages\": ...}, what `nanoseek sft` reads); OUT.progress.json beside it",
    "num_prompts": "train prompts to sample (a rerun with more continues)",
    "num_generations": "K samples per prompt",
    "max_trace_tokens": "length cap in tokens (default: none beyond --max-new-tokens)",
    "max_per_prompt": "keep at most this many traces per prompt",
    "alphabet": "characters allowed outside the tags (default: the task's)",
    "general": "JSONL of non-reasoning conversations to mix in",
    "general_frac": "their share of the output (R1: 0.25)",
    "unfiltered": "keep every sample (ablation)",
    "all_out": "also write every sample, unfiltered, to this JSONL",
    "batch_prompts": "prompts per engine batch and per resume chunk",
}
ONPOLICY_HELP = {
    "model": "the student's starting checkpoint",
    "teacher": "the frozen teacher (same tokenizer as the student)",
    "samples_per_prompt": "student samples per prompt",
    "kl": "exact: over the vocabulary; sampled: reverse-KL estimate from the sampled tokens",
    "beta": "generalized JSD: 0 forward KL, 1 reverse KL, between: JSD (TRL convention)",
    "lmbda": "share of steps sampled by the student; the rest by the teacher (GKD)",
}


def run_generate(args) -> None:
    s = generate_traces(config_from_args(GenerateConfig, args), progress=not args.json)
    print(format_yield(s["yield"]), file=sys.stderr if args.json else sys.stdout)
    general = f" + {s['general']} general" if s["general"] else ""
    report(args, s, f"done: {s['kept']} of {s['sampled']} samples kept from {s['prompts']} prompts{general}, "
                    f"{s['lines']} lines in {s['out']}")


def run_onpolicy(args) -> None:
    s = train_onpolicy(config_from_args(OnPolicyConfig, args), progress=not args.json, plot=not args.no_plot)
    report(args, s, f"done: {s['steps']} steps, reverse KL {s['reverse_kl']:.4f}, accuracy {s['accuracy']:.3f}, "
                    f"checkpoint {s['checkpoint']}")


def register(sub) -> None:
    p = parser(sub, "distill", "distillation: rejection-sampled traces, on-policy distillation into a student")
    dsub = p.add_subparsers(dest="distill_command", required=True, metavar="{generate,onpolicy}")
    g = parser(dsub, "generate", "rejection-sample reasoning traces from a teacher into SFT JSONL")
    add_config_flags(g, GenerateConfig, required=("teacher", "task", "out"), help=GENERATE_HELP)
    add_output_flags(g, plot=False)
    g.set_defaults(func=run_generate)
    o = parser(dsub, "onpolicy", "on-policy distillation: the student samples, the teacher scores every token")
    add_config_flags(o, OnPolicyConfig, required=("model", "teacher", "task", "out"), help=ONPOLICY_HELP,
                     choices={"kl": KL_MODES})
    add_output_flags(o)
    o.set_defaults(func=run_onpolicy)

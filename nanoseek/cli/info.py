"""`nanoseek info PRESET_OR_DIR`: parameters, active parameters, KV-cache bytes and FLOPs, and with --world-size a
per-rank training memory plan."""

from __future__ import annotations

import json

from nanoseek.accounting import RECOMPUTE, memory_per_rank, summary
from nanoseek.cli.common import parser
from nanoseek.config import ModelConfig


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def info_table(name: str, c: ModelConfig, s: dict) -> str:
    kv, fl, by = s["kv_cache_bytes_per_token"], s["flops_per_token"], s["by_part"]
    rows = [
        f"nanoseek info: {name} ({c.model_type}, {c.num_hidden_layers} layers, d={c.hidden_size}, "
        f"{c.n_routed_experts} routed + {c.n_shared_experts} shared experts, top-{c.num_experts_per_tok})",
        "",
        f"{'parameters':<28}{'count':>12}",
        f"{'  main model (total)':<28}{_human(s['total_params']):>12}",
        f"{'  active per token':<28}{_human(s['active_params']):>12}   "
        f"({100 * s['active_params'] / s['total_params']:.1f}%)",
        f"{'  MTP modules (own)':<28}{_human(s['mtp_params']):>12}",
    ]
    for part in ("embedding", "output_head", "attention", "dense_ffn", "moe_ffn", "norms"):
        rows.append(f"{'    ' + part:<28}{_human(by[part]):>12}")
    rows += [
        "",
        f"{'KV cache per token (' + kv['dtype'] + ')':<28}{'bytes':>12}{'MLA is':>10}",
        f"{'  MLA latent (c_kv+k_rope)':<28}{kv['mla']:>12,}{'':>10}",
        f"{'  MHA, same heads':<28}{kv['mha']:>12,}{100 * kv['mla_over_mha']:>9.2f}%",
        f"{'  GQA, 8 KV heads':<28}{kv['gqa8']:>12,}{100 * kv['mla_over_gqa8']:>9.2f}%",
        "",
        f"FLOPs per token at {fl['context']} context: forward {_human(fl['forward'])}, "
        f"training {_human(fl['train'])}",
    ]
    return "\n".join(rows)


def run(args) -> None:
    c = ModelConfig.load(args.model)
    s = summary(c)
    if args.world_size:
        s["memory_per_rank"] = memory_per_rank(c, args.world_size, args.ep, args.tokens_per_rank, args.train_dtype,
                                              pp=args.pp, recompute=args.recompute)
    if args.json:
        print(json.dumps(s))
        return
    print(info_table(args.model, c, s))
    m = s.get("memory_per_rank")
    if m:
        gib = 2 ** 30
        print(f"\ntraining memory per rank: {m['world_size']} ranks, ep={m['ep']}, {m['dtype']} weights, "
              f"{m['batch_tokens_per_rank']} tokens per rank, pp={m['pp']}, recompute {m['recompute']} "
              "(FSDP2 + expert parallel; `nanoseek plan` measures the sharded tensors)")
        for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "gathered_bytes", "activation_bytes", "total_bytes"):
            print(f"  {key.replace('_bytes', ''):<12}{m[key] / gib:>10.1f} GiB")


def register(sub) -> None:
    s = parser(sub, "info", "parameters, active parameters, KV-cache bytes and FLOPs of a preset or checkpoint")
    s.add_argument("model", metavar="PRESET_OR_DIR")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--world-size", type=int, default=0, help="also plan training memory per rank on N ranks")
    s.add_argument("--ep", type=int, default=1, help="expert-parallel degree for --world-size")
    s.add_argument("--pp", type=int, default=1, help="pipeline stages for --world-size (the largest stage is shown)")
    s.add_argument("--recompute", choices=RECOMPUTE, default="none",
                   help="activation recomputation for --world-size: none, block or selective")
    s.add_argument("--tokens-per-rank", type=int, default=4096, help="micro-batch tokens per rank for --world-size")
    s.add_argument("--train-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="weights and gradients (default: bfloat16)")
    s.set_defaults(func=run)

"""Training-step speed: nanoseek against transformers' DeepseekV3ForCausalLM on the same weights and batch, the MoE
layer against a dense SwiGLU of equal active FLOPs, and achieved FLOP/s against this machine's own matmul rate.

    python benchmarks/train.py [--preset small] [--batch 4] [--seq 256] [--steps 5] [--threads N] [--json]

Both models train in fp32 with fused AdamW (nanoseek's make_optimizer; the transformers Trainer's default); the
step is forward + backward + optimizer step on next-token cross-entropy. nanoseek's MTP module is switched off so
both do the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nanoseek import ModelConfig, Transformer  # noqa: E402
from nanoseek.accounting import param_counts  # noqa: E402
from nanoseek.model.moe import MLP, MoE  # noqa: E402
from nanoseek.train.loop import make_optimizer  # noqa: E402


def timed(fn, steps: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `steps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step(model, opt, x, y, logits_of):
    logits = logits_of(model, x)
    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def matmul_rate(n: int = 1024, reps: int = 10) -> float:
    """fp32 FLOP/s of a square matmul: the ceiling this machine offers PyTorch."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / timed(lambda: a @ b, reps, warmup=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset).replace(num_nextn_predict_layers=0, torch_dtype="float32")
    ours = Transformer(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                   attn_implementation="sdpa").train()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    y = torch.roll(x, -1, 1)
    # each side's own optimizer: nanoseek's training loops' (fused AdamW), and the transformers Trainer's default
    # for torch >= 2.8 ("adamw_torch_fused")
    opt_a = make_optimizer(ours, lr=1e-4)
    opt_b = torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=True)
    with torch.no_grad():  # same weights, same function
        same = float((ours(x) - theirs(x).logits).abs().max())
    t_ours = timed(lambda: train_step(ours, opt_a, x, y, lambda m, i: m(i)), args.steps)
    t_theirs = timed(lambda: train_step(theirs, opt_b, x, y, lambda m, i: m(i).logits), args.steps)

    # MoE layer vs a dense SwiGLU whose width equals the active experts' (routed top-k + shared)
    tokens = args.batch * args.seq
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dense = MLP(cfg.hidden_size, (cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size)
    h = torch.randn(tokens, cfg.hidden_size, requires_grad=True)
    t_moe = timed(lambda: moe(h).square().mean().backward(), args.steps)
    t_dense = timed(lambda: dense(h).square().mean().backward(), args.steps)

    p = param_counts(cfg)
    matmul_params = p["active_params"] - p["by_part"]["embedding"] - p["by_part"]["norms"]
    attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * args.seq // 2
    step_flops = 3 * tokens * (2 * matmul_params + attn)
    peak = matmul_rate()
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "preset": args.preset, "params": ours.num_params(), "batch": args.batch, "seq": args.seq,
        "max_logit_diff": same,
        "step_s_nanoseek": t_ours, "step_s_transformers": t_theirs, "speedup": t_theirs / t_ours,
        "moe_fwd_bwd_s": t_moe, "dense_equal_active_fwd_bwd_s": t_dense, "moe_over_dense": t_moe / t_dense,
        "achieved_flops": step_flops / t_ours, "matmul_flops": peak, "fraction_of_matmul_rate": step_flops / t_ours / peak,
    }
    if args.json:
        print(json.dumps(res))
        return
    print(f"machine: {res['machine']}; {args.preset} ({ours.num_params() / 1e6:.1f}M params, MTP off), batch "
          f"{args.batch} x {args.seq} tokens; max |logit diff| {same:.1e}")
    print("| measurement | nanoseek | reference | ratio |\n|---|---:|---:|---:|")
    print(f"| training step (fwd+bwd+AdamW), s | {t_ours:.3f} | transformers {t_theirs:.3f} | {t_theirs / t_ours:.2f}x faster |")
    print(f"| MoE layer fwd+bwd ({tokens} tokens), s | {t_moe:.4f} | dense SwiGLU, equal active FLOPs {t_dense:.4f} | "
          f"{t_moe / t_dense:.2f}x the dense time |")
    print(f"| achieved training FLOP/s | {res['achieved_flops'] / 1e9:.1f} G | fp32 matmul {peak / 1e9:.1f} G | "
          f"{100 * res['fraction_of_matmul_rate']:.0f}% |")


if __name__ == "__main__":
    main()

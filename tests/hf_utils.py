"""Shared helpers for tests that use transformers' DeepseekV3/V2 as the independent reference."""

from __future__ import annotations

import torch

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=24, q_lora_rank=40, qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
            max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random, norms included (around 1), router biases non-zero: nothing hides behind an init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name or not p.is_floating_point():
                continue
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "e_score_correction_bias" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def hf_model(kind: str, seed: int = 0, **overrides):
    """A random transformers DeepseekV3ForCausalLM (kind "v3") or DeepseekV2ForCausalLM ("v2"), fp32, eager."""
    import transformers
    kw = {**BASE, **overrides}
    if kind == "v3":
        kw.setdefault("n_group", 4)
        kw.setdefault("topk_group", 2)
        cfg = transformers.DeepseekV3Config(**kw)
        model = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        kw.setdefault("topk_method", "group_limited_greedy")
        kw.setdefault("n_group", 4)
        kw.setdefault("topk_group", 2)
        cfg = transformers.DeepseekV2Config(**kw)
        model = transformers.DeepseekV2ForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    randomize_(model, seed)
    return model.float().eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())

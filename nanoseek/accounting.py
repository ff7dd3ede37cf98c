"""Parameter, KV-cache and FLOP accounting from a config alone (no weights), so `nanoseek info v3` is instant.

Checked against the papers in tests: V3 has 671B main-model parameters, ~37B active per token, and an MLA cache of
(kv_lora_rank + qk_rope_head_dim) * layers * 2 bytes = 70,272 bytes per token in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


@dataclass
class BlockParams:
    attention: int
    norms: int
    ffn_total: int
    ffn_active: int


def attention_params(c: ModelConfig) -> int:
    h, d, qk = c.num_attention_heads, c.hidden_size, c.qk_head_dim
    q = d * h * qk if c.q_lora_rank is None else d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * qk
    kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    bias = (c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim + d if c.attention_bias else 0
    return q + kv + h * c.v_head_dim * d + bias


def block_params(c: ModelConfig, layer: int) -> BlockParams:
    d = c.hidden_size
    if c.is_moe_layer(layer):
        expert = 3 * d * c.moe_intermediate_size
        shared = 3 * d * c.moe_intermediate_size * c.n_shared_experts
        gate = c.n_routed_experts * d
        total = c.n_routed_experts * expert + shared + gate
        active = c.num_experts_per_tok * expert + shared + gate
    else:
        total = active = 3 * d * c.intermediate_size
    return BlockParams(attention_params(c), 2 * d, total, active)


def param_counts(c: ModelConfig) -> dict:
    """total_params (main model), active_params (per token), mtp_params (the MTP modules' own), and by part."""
    d, v = c.hidden_size, c.vocab_size
    embed = v * d
    head = 0 if c.tie_word_embeddings else v * d
    blocks = [block_params(c, i) for i in range(c.num_hidden_layers)]
    attn = sum(b.attention for b in blocks)
    norms = sum(b.norms for b in blocks) + d
    dense = sum(b.ffn_total for i, b in enumerate(blocks) if not c.is_moe_layer(i))
    moe_total = sum(b.ffn_total for i, b in enumerate(blocks) if c.is_moe_layer(i))
    moe_active = sum(b.ffn_active for i, b in enumerate(blocks) if c.is_moe_layer(i))
    total = embed + head + attn + norms + dense + moe_total
    mtp = 0
    for k in range(c.num_nextn_predict_layers):
        b = block_params(c, c.num_hidden_layers + k)
        mtp += 2 * d + 2 * d * d + b.attention + b.norms + b.ffn_total + d  # enorm, hnorm, eh_proj, block, head norm
    return {
        "total_params": total,
        "active_params": total - moe_total + moe_active,
        "mtp_params": mtp,
        "by_part": {"embedding": embed, "output_head": head, "attention": attn, "dense_ffn": dense,
                    "moe_ffn": moe_total, "moe_ffn_active": moe_active, "norms": norms},
    }


def kv_cache_bytes_per_token(c: ModelConfig, dtype: str | None = None) -> dict:
    """Bytes per token of context over all layers for MLA's latent cache and the caches that multi-head
    attention (same heads, per-head K and V of the paper's head dim d_h = qk_nope_head_dim) and GQA with 8 KV
    heads would need. MLA caches c_kv and the shared k_rope: (kv_lora_rank + qk_rope_head_dim) per layer."""
    dtype = dtype or (c.torch_dtype if c.torch_dtype in DTYPE_BYTES else "bfloat16")
    nbytes, layers, d_h = DTYPE_BYTES[dtype], c.num_hidden_layers, c.qk_nope_head_dim
    mla = layers * (c.kv_lora_rank + c.qk_rope_head_dim) * nbytes
    mha = layers * 2 * c.num_attention_heads * d_h * nbytes
    gqa8 = layers * 2 * min(8, c.num_attention_heads) * d_h * nbytes
    return {"dtype": dtype, "mla": mla, "mha": mha, "gqa8": gqa8, "mla_over_mha": mla / mha, "mla_over_gqa8": mla / gqa8}


def flops_per_token(c: ModelConfig, context: int = 4096) -> dict:
    """Forward FLOPs per token: 2 per active matmul weight (embedding lookup excluded, head included) plus
    attention's score and value products at the given context length (half of it on average, causal).
    Training costs about 3x the forward."""
    p = param_counts(c)
    matmul = p["active_params"] - p["by_part"]["embedding"] - p["by_part"]["norms"]
    attn = 2 * c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * (context // 2)
    return {"context": context, "forward": 2 * matmul + attn, "train": 3 * (2 * matmul + attn)}


def summary(c: ModelConfig) -> dict:
    """Everything `nanoseek info` reports."""
    p = param_counts(c)
    return {**p, "kv_cache_bytes_per_token": kv_cache_bytes_per_token(c), "flops_per_token": flops_per_token(c)}

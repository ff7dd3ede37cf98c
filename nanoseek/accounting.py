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


# ---------------------------------------------------------------------------------------------- memory per rank
OPTIMIZER_BYTES = {"adamw": 8, "adamw_bf16": 4, "sgd": 0}  # per parameter: AdamW's two fp32 (or bf16) moments
RECOMPUTE = ("none", "block", "selective")


def _block_activation_elems(c: ModelConfig, layer: int, recompute: str = "none") -> tuple[int, int]:
    """(elements in the training dtype, fp32 bytes) one token saves for backward in one block; attention without
    a stored score matrix (flash / SDPA style). With recompute "none":
      attention 2d (block input, normed input) + 2 q_lora_rank + 2 kv_lora_rank + qk_rope_head_dim
                + heads * (2 qk_head_dim + 2 v_head_dim)   (q, k, v, attention output)
      dense FFN 2d + 3 intermediate_size                    (gate, up, their product)
      MoE FFN   2d + k (2d + 3 moe_intermediate_size)       (dispatched copy, expert SwiGLU, returned copy)
                + 3 n_shared moe_intermediate_size, plus n_routed_experts fp32 router scores
    "block": d (its input); "selective": the block input and every matmul / attention output (norms, RoPE,
    SwiGLU and other elementwise results are recomputed)."""
    d, h, i_moe = c.hidden_size, c.num_attention_heads, c.moe_intermediate_size
    if recompute == "block":  # only the block's input; the rest is recomputed one block at a time
        return d, 0
    if recompute == "selective":  # matmul and attention outputs (see nanoseek/model/block.py)
        q = c.q_lora_rank + h * c.qk_head_dim if c.q_lora_rank else h * c.qk_head_dim
        attn = d + q + c.kv_lora_rank + c.qk_rope_head_dim + h * (c.qk_nope_head_dim + c.v_head_dim) + h * c.v_head_dim + d
        if c.is_moe_layer(layer):
            ffn = c.num_experts_per_tok * (2 * i_moe + d) + (2 * i_moe + d) * c.n_shared_experts
            return attn + ffn, 4 * c.n_routed_experts
        return attn + 2 * c.intermediate_size + d, 0
    q = 2 * c.q_lora_rank if c.q_lora_rank else 0  # c_q before and after its norm
    attn = 2 * d + q + 2 * c.kv_lora_rank + c.qk_rope_head_dim + h * (2 * c.qk_head_dim + 2 * c.v_head_dim)
    if c.is_moe_layer(layer):
        routed = c.num_experts_per_tok * (2 * d + 3 * i_moe)
        ffn = 2 * d + routed + 3 * i_moe * c.n_shared_experts
        return attn + ffn, 4 * c.n_routed_experts  # router scores stay fp32
    return attn + 2 * d + 3 * c.intermediate_size, 0


def pipeline_stages(c: ModelConfig, pp: int) -> list[list[int]]:
    """Block indices per pipeline stage: the main layers then the MTP modules (index >= num_hidden_layers), split
    into pp contiguous runs as evenly as possible, earlier stages taking the remainder, so the last stage, which
    also holds the final norm, output head and MTP modules (beside the head they share, as DeepSeek-V3 places
    them, section 2.2), carries fewer blocks. Stage 0 also holds the embedding."""
    units = list(range(c.num_hidden_layers + c.num_nextn_predict_layers))
    if pp < 1 or pp > len(units):
        raise ValueError(f"--pp {pp} must be between 1 and the number of blocks ({len(units)}, MTP included)")
    base, extra = divmod(len(units), pp)
    out, i = [], 0
    for s in range(pp):
        n = base + (s < extra)
        out.append(units[i: i + n])
        i += n
    return out


def bubble_fraction(pp: int, microbatches: int, schedule: str = "1f1b") -> float:
    """Idle fraction of a pipeline step: (pp - 1) / (m + pp - 1) for GPipe / 1F1B (Narayanan et al. 2021,
    arXiv 2104.04473, section 2.2), (pp - 1) / (v m + pp - 1) for the interleaved schedule with v = 2 chunks per
    rank (same paper, section 2.2.1)."""
    v = {"1f1b": 1, "interleaved": 2}[schedule]
    return (pp - 1) / (v * microbatches + pp - 1)


def memory_per_rank(c: ModelConfig, world_size: int, ep: int = 1, batch_tokens_per_rank: int = 4096,
                    dtype: str = "bfloat16", optimizer: str = "adamw", pp: int = 1, recompute: str = "none",
                    microbatches: int | None = None) -> dict:
    """Bytes one rank needs to train `c` with nanoseek.distributed.parallelize on world_size ranks, ep-way expert
    parallel, pp pipeline stages, for micro-batches of batch_tokens_per_rank tokens per rank, MTP modules included.
    With pp > 1 the numbers are the largest stage's (pipeline_stages; each stage's world_size / pp ranks shard it
    as parallelize shards a whole model); `stages` lists every stage.

    params, grads: every parameter element lives on exactly one rank of its stage (nanoseek/distributed.py), so
        each is the stage's parameters / (world_size / pp) at `dtype`.
    optimizer: OPTIMIZER_BYTES[optimizer] per local parameter (AdamW: exp_avg and exp_avg_sq in fp32).
    gathered: the transient unsharded working set: the stage's root parts (embedding, head) plus its largest FSDP
        unit (a block or an MTP module) with 1/ep of its routed experts, parameters and gradients, at `dtype`.
    activations: an estimate per token and block (_block_activation_elems; an MTP module adds 4d: two norms, the
        concatenation); "block" recompute adds one block's full set while it is recomputed; the last stage adds
        fp32 logits for the head and each MTP depth. Under 1F1B, stage s keeps min(microbatches, pp - s)
        micro-batches in flight (microbatches defaults to 4 pp).
    """
    if world_size < 1 or ep < 1 or pp < 1 or world_size % (ep * pp) or c.n_routed_experts % ep:
        raise ValueError(f"ep ({ep}) x pp ({pp}) must divide world_size ({world_size}) and ep must divide "
                         f"n_routed_experts ({c.n_routed_experts})")
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_BYTES)}, got {optimizer!r}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    microbatches = microbatches or 4 * pp
    stages = [_stage_memory(c, s, units, world_size // pp, ep, pp, batch_tokens_per_rank, DTYPE_BYTES[dtype],
                            OPTIMIZER_BYTES[optimizer], recompute, microbatches)
              for s, units in enumerate(pipeline_stages(c, pp))]
    worst = max(stages, key=lambda st: st["total_bytes"])
    out = {"world_size": world_size, "ep": ep, "pp": pp, "recompute": recompute, "dtype": dtype,
           "optimizer": optimizer, "batch_tokens_per_rank": batch_tokens_per_rank,
           **{k: worst[k] for k in ("params_per_rank", "param_bytes", "grad_bytes", "optimizer_bytes",
                                    "gathered_bytes", "activation_bytes", "total_bytes")}}
    if pp > 1:
        out.update(stage=worst["stage"], microbatches=microbatches, stages=stages,
                   bubble={sch: bubble_fraction(pp, microbatches, sch) for sch in ("1f1b", "interleaved")})
    return out


def _stage_memory(c: ModelConfig, s: int, units: list[int], stage_ranks: int, ep: int, pp: int, batch_tokens: int,
                  nbytes: int, optimizer_bytes: int, recompute: str, microbatches: int) -> dict:
    """memory_per_rank's numbers for pipeline stage s (blocks `units`), one of its stage_ranks ranks."""
    d = c.hidden_size
    p = param_counts(c)
    routed = 3 * d * c.moe_intermediate_size * c.n_routed_experts

    def unit_params(i: int) -> int:  # a block, or an MTP module (its block, eh_proj, 3 norms)
        b = block_params(c, i)
        return b.attention + b.norms + b.ffn_total + (2 * d * d + 3 * d if i >= c.num_hidden_layers else 0)

    def unit_acts(i: int, mode: str) -> int:  # bytes per token
        e, f = _block_activation_elems(c, i, mode)
        mtp = (d if mode == "block" else 4 * d) if i >= c.num_hidden_layers else 0
        return (e + mtp) * nbytes + f

    first, last = s == 0, s == pp - 1
    root = (p["by_part"]["embedding"] if first else 0) + (p["by_part"]["output_head"] + d if last else 0)
    params = root + sum(unit_params(i) for i in units)
    local = -(-params // stage_ranks)  # ceil: FSDP pads the last shard
    biggest = max(unit_params(i) - (routed - routed // ep if c.is_moe_layer(i) else 0) for i in units)
    per_token = min(microbatches, pp - s) * sum(unit_acts(i, recompute) for i in units)  # in flight under 1F1B
    if recompute == "block":
        per_token += max(unit_acts(i, "none") for i in units)
    if last:
        per_token += 4 * c.vocab_size * (1 + c.num_nextn_predict_layers)
    st = {"stage": s, "blocks": units, "params": params, "params_per_rank": local, "param_bytes": local * nbytes,
          "grad_bytes": local * nbytes, "optimizer_bytes": local * optimizer_bytes,
          "gathered_bytes": 2 * (root - (d if last else 0) + biggest) * nbytes,
          "activation_bytes": batch_tokens * per_token}
    st["total_bytes"] = sum(st[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "gathered_bytes",
                                            "activation_bytes"))
    return st

"""Multi-head Latent Attention (DeepSeek-V2 section 2.1; docs/mla.md).

Keys and values are reconstructed from a small latent c_kv (kv_lora_rank) plus one RoPE'd key k_rope shared by
all heads, so a KV cache need only hold [c_kv ; k_rope] per token. Two equivalent ways to attend:

  expanded:  k_nope, v = W_UKV c_kv per head, then ordinary attention (fast for long prompts: SDPA).
  absorbed:  fold W_UK into the query and apply W_UV after the weighted sum over c_kv (fast for decoding:
             nothing per head is ever materialised for the cached tokens).

Dimension names in the einsums: b batch, t query position, s key position, h head, r kv_lora_rank,
n qk_nope_head_dim, p qk_rope_head_dim, v v_head_dim.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope


class LatentCache(Protocol):
    """What MLA needs from a KV cache (the engine owns the real one): append this step's latents, get all."""

    def update(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def causal_mask(t: int, s: int, device=None) -> torch.Tensor:
    """Bool [t, s]: query i (the last t of s positions) may see keys 0 .. s - t + i."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = cfg.softmax_scale
        self.interleave = cfg.rope_interleave
        self.dropout = cfg.attention_dropout
        d, h, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        bias = cfg.attention_bias
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * qk, bias=False)
        else:  # low-rank query: c_q = RMSNorm(W_DQ x), q = W_UQ c_q
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)
        # [c_kv ; k_rope] = W_DKV x in one matmul ("with_mqa": k_rope is a single multi-query key)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        # W_UKV: per head, k_nope rows then v rows
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=bias)

    # ------------------------------------------------------------------ projections
    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [b, t, d] -> q_nope [b, t, h, n], q_rope [b, t, h, p] (RoPE applied)."""
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.n_heads, self.qk_nope_head_dim + self.qk_rope_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos.unsqueeze(-2), sin.unsqueeze(-2), self.interleave)  # over heads

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [b, t, d] -> c_kv [b, t, r] (normalised), k_rope [b, t, p] (RoPE applied): all a cache holds."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_rope, cos, sin, self.interleave)

    def w_uk_uv(self):
        """W_UK [h, n, r] and W_UV [h, v, r], the per-head up-projections inside kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    # ------------------------------------------------------------------ attention
    def attend(self, q_nope, q_rope, c_kv, k_rope, mask=None) -> torch.Tensor:
        """Expanded path: rebuild per-head K, V from the latent and run SDPA. Returns [b, t, h * v]."""
        b, t, h, _ = q_nope.shape
        s = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(b, s, h, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [b, h, t, n+p]
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(b, s, h, self.qk_rope_head_dim)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        # CPU's fused (flash) SDPA kernel needs v's head size to equal q's; MLA's is smaller (V3: 128 against 192),
        # so torch would fall back to the unfused math path, which materialises every score. Zero columns in v
        # give zero columns in the output, cut off below: the same attention.
        pad = q.shape[-1] - v.shape[-1] if q.device.type == "cpu" else 0
        if pad > 0:
            v = F.pad(v, (0, pad))
        is_causal = mask is None and t == s
        if mask is None and t != s:
            mask = causal_mask(t, s, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.softmax_scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        if pad > 0:
            out = out[..., : self.v_head_dim]
        return out.transpose(1, 2).reshape(b, t, h * self.v_head_dim)

    def attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, mask=None) -> torch.Tensor:
        """Absorbed path (DeepSeek-V2 section 2.1.2, docs/mla.md):
        score = (q_nope W_UK) . c_kv + q_rope . k_rope, output = W_UV (p . c_kv).
        Returns [b, t, h * v]."""
        b, t, h, _ = q_nope.shape
        s = c_kv.shape[1]
        w_uk, w_uv = self.w_uk_uv()
        q_latent = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)
        scores = (torch.einsum("bthr,bsr->bhts", q_latent, c_kv)
                  + torch.einsum("bthp,bsp->bhts", q_rope, k_rope)).float() * self.softmax_scale
        if mask is None:
            mask = causal_mask(t, s, scores.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(c_kv.dtype)
        o_latent = torch.einsum("bhts,bsr->bthr", probs, c_kv)
        out = torch.einsum("bthr,hvr->bthv", o_latent, w_uv)
        return out.reshape(b, t, h * self.v_head_dim)

    def forward(self, x, cos, sin, mask=None, kv_cache: LatentCache | None = None, absorb: bool = False):
        """x [b, t, d] -> [b, t, d]. `mask` (bool, True = may attend) broadcasts to [b, h, t, s]; None is causal.
        With a cache, this step's latents are appended and attention runs over everything cached."""
        q_nope, q_rope = self.queries(x, cos, sin)
        c_kv, k_rope = self.latents(x, cos, sin)
        if kv_cache is not None:
            c_kv, k_rope = kv_cache.update(c_kv, k_rope)
        attend = self.attend_absorbed if absorb else self.attend
        return self.o_proj(attend(q_nope, q_rope, c_kv, k_rope, mask))

"""One transformer block: pre-norm MLA then pre-norm FFN (dense SwiGLU or DeepSeekMoE), both residual."""

from __future__ import annotations

from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MLP, MoE
from nanoseek.model.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cos, sin, mask=None, kv_cache=None, absorb=False):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, kv_cache, absorb)
        return h + self.mlp(self.post_attention_layernorm(h))

"""Multi-token prediction (DeepSeek-V3 section 2.2; docs/mtp.md).

Module k combines the previous depth's hidden state h^{k-1}_i with the embedding of token t_{i+k}:
    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])
then runs one transformer block; the shared output head, after the module's own norm, predicts t_{i+k+1}.
The concatenation order [embedding ; hidden] is the one the released V3 weights use (the paper writes the
hidden state first). h^0 is the main model's final (normalised) hidden state, as served for V3.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import Block
from nanoseek.model.norm import RMSNorm


class SharedHead(nn.Module):
    """The MTP module's final norm; the head itself is the main model's lm_head (shared, not stored here)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        self.depth = depth  # k, counting from 1
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, cfg.num_hidden_layers + depth - 1)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos, sin, mask=None, kv_cache=None,
                absorb=False) -> torch.Tensor:
        """h_prev [b, t, d] (h^{k-1}_i), emb_next [b, t, d] (Emb(t_{i+k})) -> h^k [b, t, d] (before shared_head.norm)."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(h, cos, sin, mask, kv_cache, absorb)

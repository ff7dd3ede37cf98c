"""Rotary position embedding (RoPE) with YaRN context extension (DeepSeek-V2 section 2.1.3; YaRN, Peng et al.
2023, arXiv 2309.00071).

MLA applies RoPE only to the decoupled parts q_rope and k_rope (V2 paper, section 2.1.3). DeepSeek's released
checkpoints rotate interleaved pairs (dims 2i, 2i+1); `rope_interleave=False` rotates the two halves instead.
"""

from __future__ import annotations

import math

import torch

from nanoseek.config import ModelConfig, yarn_mscale


def yarn_inv_freq(dim: int, base: float, factor: float, original_len: int, beta_fast: float, beta_slow: float):
    """YaRN frequencies: short wavelengths keep the base frequency, long ones are divided by `factor`, and a
    linear ramp blends the two between the dims that rotate beta_fast and beta_slow times in original_len."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    return freqs / factor * ramp + freqs * (1 - ramp)


class RotaryEmbedding:
    """Maps positions to (cos, sin) of shape positions.shape + [qk_rope_head_dim // 2], in fp32.

    A plain object rather than a module: nothing here is a weight, and tables are computed on the fly
    (cheap next to the matmuls), so models built on the meta device need no re-initialisation.
    """

    def __init__(self, cfg: ModelConfig):
        dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
        self.interleave = cfg.rope_interleave
        self.attention_factor = 1.0
        y = cfg.yarn
        if y is None:
            self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
        else:
            factor = float(y["factor"])
            self.inv_freq = yarn_inv_freq(dim, base, factor, int(y["original_max_position_embeddings"]),
                                          float(y.get("beta_fast") or 32), float(y.get("beta_slow") or 1))
            # cos/sin scaling; 1.0 for DeepSeek's configs (mscale == mscale_all_dim), kept for generality.
            if y.get("attention_factor") is not None:
                self.attention_factor = float(y["attention_factor"])
            elif y.get("mscale") and y.get("mscale_all_dim"):
                self.attention_factor = yarn_mscale(factor, y["mscale"]) / yarn_mscale(factor, y["mscale_all_dim"])
            else:
                self.attention_factor = yarn_mscale(factor)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate the last dim of x by (cos, sin), which broadcast against x[..., ::2]; computed in fp32."""
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)

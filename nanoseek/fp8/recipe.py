"""FP8Recipe: how FP8 GEMMs quantise their operands, chosen once (`--fp8 block|tensor`) and handed to the modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.fp8.numerics import (BLOCK, _cdiv, fp8_matmul, quantize_act, quantize_tensorwise, quantize_weight,
                                   resolve_backend)

GRANULARITIES = ("block", "tensor")
BACKENDS = ("auto", "emulate", "scaled_mm")


@dataclass(frozen=True)
class FP8Recipe:
    """granularity "block" is V3's fine-grained scaling (1 x 128 tiles for activations and gradients, 128 x 128
    blocks for weights; DeepSeek-V3 section 3.3.2); "tensor" keeps one scale per operand (per expert for stacked
    experts), the baseline V3 improves on. backend: "emulate" (exact in plain PyTorch, any device), "scaled_mm"
    (torch._scaled_mm on Hopper), "auto" (scaled_mm where supported)."""

    granularity: str = "block"
    block: int = BLOCK
    backend: str = "auto"

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown FP8 granularity {self.granularity!r}: use 'block' (V3's 1x128 / 128x128) "
                             "or 'tensor'")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown FP8 backend {self.backend!r}: use one of {', '.join(BACKENDS)}")

    @classmethod
    def parse(cls, value) -> FP8Recipe | None:
        """The training flag's value: None / False (no FP8), True or "block", "tensor", or a recipe."""
        if isinstance(value, FP8Recipe) or not value:
            return value or None
        return cls("block" if value is True else value)

    def quantize_operand(self, x: torch.Tensor):
        """A GEMM operand [..., rows, K] quantised along its K (last) dim: 1 x block tiles, or one scale per tensor
        laid out as tile scales [..., rows, ceil(K/block)], so that fp8_matmul takes either."""
        if self.granularity == "block":
            return quantize_act(x, self.block)
        q, scale = quantize_tensorwise(x, dims=(-2, -1))  # for [E, rows, K]: one scale per expert's slice
        return q, scale.expand(*x.shape[:-1], _cdiv(x.shape[-1], self.block))

    def quantize_weight(self, w: torch.Tensor):
        """A weight [out, in] (or [E, out, in]): block x block blocks, or one scale per matrix (per expert) laid
        out as block scales [..., ceil(out/block), ceil(in/block)]."""
        if self.granularity == "block":
            return quantize_weight(w, self.block)
        q, scale = quantize_tensorwise(w, dims=(-2, -1))
        return q, scale.expand(*w.shape[:-2], _cdiv(w.shape[-2], self.block), _cdiv(w.shape[-1], self.block))

    def matmul(self, a_q, a_s, b_q, b_s) -> torch.Tensor:
        """fp32 a @ b.T of two quantised operands (see fp8_matmul)."""
        return fp8_matmul(a_q, a_s, b_q, b_s, self.backend, torch.float32, self.block)

    def emulated(self, device: torch.device) -> bool:
        return resolve_backend(self.backend, device) == "emulate"

"""The latent KV cache (DeepSeek-V2 section 2.1): per layer and token exactly [c_kv ; k_rope], kv_lora_rank +
qk_rope_head_dim numbers and nothing per head, stored in fp32, bf16, or fp8 (e4m3) with one bf16 scale per token
and part. nanoseek/model/mla.py calls `view.update(c_kv, k_rope)` on one layer's view; the engine says beforehand
which rows and positions the step writes (`set_step`)."""

from __future__ import annotations

import torch

from nanoseek.fp8 import FP8_MAX  # largest finite e4m3fn value, defined once with the FP8 numerics

CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


class LatentCache:
    """Latent KV cache for `n_layers` MLA layers: c_kv [B, S, r] and k_rope [B, S, p] per layer, where B is
    max_batch_size and S max_seq_len. With fp8, each token's c_kv and k_rope carry one bf16 scale each
    (amax / 448), so a token costs r + p bytes plus 4 per layer instead of 2 (r + p) in bf16.

    `set_step(rows, positions, kv_len)` names the rows taking part (a slice, or an int64 tensor [b]), where this
    step's tokens go ([b, t] positions) and how many cached positions to return; layer i's `views[i].update`
    writes the step's latents and returns [c_kv ; k_rope] for positions 0 .. kv_len - 1 in the model's dtype."""

    def __init__(self, n_layers: int, max_batch: int, max_seq_len: int, kv_lora_rank: int, rope_dim: int,
                 kind: str, model_dtype: torch.dtype, device):
        self.kind, self.model_dtype = kind, model_dtype
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        store = CACHE_DTYPES[kind]
        shape = (max_batch, max_seq_len)
        self.c_kv = [torch.zeros(*shape, kv_lora_rank, dtype=store, device=device) for _ in range(n_layers)]
        self.k_rope = [torch.zeros(*shape, rope_dim, dtype=store, device=device) for _ in range(n_layers)]
        if kind == "fp8":
            self.c_scale = [torch.ones(*shape, 1, dtype=torch.bfloat16, device=device) for _ in range(n_layers)]
            self.k_scale = [torch.ones(*shape, 1, dtype=torch.bfloat16, device=device) for _ in range(n_layers)]
        self.views = [_LayerView(self, i) for i in range(n_layers)]
        self.rows, self.positions, self.kv_len = slice(0, 0), None, 0

    def tensors(self) -> list[torch.Tensor]:
        out = self.c_kv + self.k_rope
        if self.kind == "fp8":
            out += self.c_scale + self.k_scale
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def set_step(self, rows, positions: torch.Tensor, kv_len: int) -> None:
        self.rows, self.positions, self.kv_len = rows, positions, kv_len

    # -- storage with optional fp8 quantisation
    def _put(self, buf: list, scale: list | None, i: int, x: torch.Tensor) -> None:
        b, t = self.positions.shape
        if isinstance(self.rows, slice):
            target, idx = (lambda store: store[self.rows]), torch.arange(b, device=x.device)
        else:  # row indices: write into the full buffer (indexing with a tensor would copy)
            target, idx = (lambda store: store), self.rows
        idx = (idx[:, None].expand(b, t), self.positions)
        if scale is None:
            target(buf[i]).index_put_(idx, x.to(buf[i].dtype))
            return
        # per-token scale rounded to bf16 *before* dividing, so stored values and scale agree exactly
        s = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12).to(torch.bfloat16)
        q = (x.float() / s.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        target(buf[i]).index_put_(idx, q)
        target(scale[i]).index_put_(idx, s)

    def _get(self, buf: list, scale: list | None, i: int) -> torch.Tensor:
        x = buf[i][self.rows, : self.kv_len]
        if scale is None:
            return x if x.dtype == self.model_dtype else x.to(self.model_dtype)
        return (x.float() * scale[i][self.rows, : self.kv_len].float()).to(self.model_dtype)

    def update(self, i: int, c_kv: torch.Tensor, k_rope: torch.Tensor):
        fp8 = self.kind == "fp8"
        self._put(self.c_kv, self.c_scale if fp8 else None, i, c_kv)
        self._put(self.k_rope, self.k_scale if fp8 else None, i, k_rope)
        return (self._get(self.c_kv, self.c_scale if fp8 else None, i),
                self._get(self.k_rope, self.k_scale if fp8 else None, i))


class _LayerView:
    """What one MLA layer sees: `update` appends this step's latents and returns the cached prefix."""

    def __init__(self, cache: LatentCache, i: int):
        self.cache, self.i = cache, i

    def update(self, c_kv: torch.Tensor, k_rope: torch.Tensor):
        return self.cache.update(self.i, c_kv, k_rope)

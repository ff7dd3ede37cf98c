"""FP8 numerics (DeepSeek-V3 section 3.3): quantisation, dequantisation and the FP8 GEMM, on plain tensors.

Nothing here knows of modules: nanoseek/fp8/modules.py builds FP8Linear and the FP8 experts on top, as
DeepSeek-V3's inference/kernel.py sits apart from its model.py, and checkpoint loading needs only the dequantiser.

  - Block-wise quantisation to float8_e4m3fn (max 448) with scales from the current amax (online, no delayed
    scaling): activations get one scale per 1 x 128 tile (per token, per 128 channels), weights one scale per
    128 x 128 block. One outlier then only coarsens its own tile, not the whole tensor (V3 section 3.3.2).
  - Per-tensor scaling, the coarse recipe V3 improves on, for comparison.
  - An FP8 GEMM that promotes partial sums to FP32 every 128 elements of K and applies the two scales at that
    moment (V3 section 3.3.2, "increasing accumulation precision"). Backend "emulate" does exactly that in
    plain PyTorch on any device; backend "scaled_mm" calls torch._scaled_mm with block-wise scales on Hopper.

Scale convention everywhere: dequantised = fp8 * scale, scale = amax / 448. For weights this is exactly the
`weight_scale_inv` tensor of DeepSeek's released FP8 checkpoints ([ceil(out/128), ceil(in/128)], fp32).
All GEMMs are "NT": fp8_matmul(a, b) = a @ b.T with K the last dim of both operands, the layout FP8 tensor cores
want (row-major x column-major) and the one nn.Linear already uses.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = 128

# config.json's quantization_config of DeepSeek's FP8 release
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [BLOCK, BLOCK]}


# ---------------------------------------------------------------------------------------------- quantisation
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _scale_from_amax(amax: torch.Tensor, pow2_scale: bool) -> torch.Tensor:
    """scale = amax / 448 (fp32); all-zero tiles get scale 1 so x / scale never divides 0 by 0.
    pow2_scale rounds up to a power of two (DeepSeek-V3.1's UE8M0 scales): rounding up keeps |x / s| <= 448."""
    amax = amax.float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def _quantize_tiles(x: torch.Tensor, rows: int, cols: int, pow2_scale: bool):
    """Quantise the last two dims of x [..., R, C] in rows x cols tiles; returns (fp8 [..., R, C], fp32 scales
    [..., ceil(R/rows), ceil(C/cols)]). Ragged edges are zero-padded, which cannot change a tile's amax."""
    *lead, r, c = x.shape
    nr, nc = _cdiv(r, rows), _cdiv(c, cols)
    xp = x.float()
    if (nr * rows, nc * cols) != (r, c):
        xp = F.pad(xp, (0, nc * cols - c, 0, nr * rows - r))
    tiles = xp.view(*lead, nr, rows, nc, cols)
    scale = _scale_from_amax(tiles.abs().amax(dim=(-3, -1)), pow2_scale)
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(*lead, nr * rows, nc * cols)[..., :r, :c].contiguous(), scale


def _expand_scale(scale: torch.Tensor, rows: int, cols: int, shape) -> torch.Tensor:
    """Blow tile scales back up to one per element of a tensor of `shape`."""
    s = scale.repeat_interleave(rows, dim=-2).repeat_interleave(cols, dim=-1)
    return s[..., : shape[-2], : shape[-1]]


def quantize_act(x: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False):
    """Activation quantisation, one scale per 1 x block tile along the last dim (V3 section 3.3.2).

    x [..., K] -> (x_fp8 [..., K] float8_e4m3fn, scale [..., ceil(K/block)] fp32), x ~= x_fp8 * scale.
    """
    if x.dim() == 1:
        q, s = quantize_act(x[None], block, pow2_scale)
        return q[0], s[0]
    return _quantize_tiles(x, 1, block, pow2_scale)


def dequantize_act(x_fp8: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_act: x_fp8 * scale, tile by tile."""
    if x_fp8.dim() == 1:
        return dequantize_act(x_fp8[None], scale[None], block, dtype)[0]
    return (x_fp8.float() * _expand_scale(scale, 1, block, x_fp8.shape)).to(dtype)


def quantize_weight(w: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False):
    """Weight quantisation, one scale per block x block block (V3 section 3.3.2).

    w [out, in] (or [E, out, in] for stacked experts, blocks per expert) ->
    (w_fp8 same shape, scale [ceil(out/block), ceil(in/block)] (or [E, ...]) fp32), w ~= w_fp8 * scale.
    """
    if w.dim() not in (2, 3):
        raise ValueError(f"quantize_weight expects [out, in] or [experts, out, in], got shape {list(w.shape)}")
    return _quantize_tiles(w, block, block, pow2_scale)


def dequantize_weight(w_fp8: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_weight: w_fp8 * scale, block by block."""
    return (w_fp8.float() * _expand_scale(scale, block, block, w_fp8.shape)).to(dtype)


def quantize_tensorwise(x: torch.Tensor, dims=None):
    """One scale per tensor (or per slice, reducing over `dims`): (x_fp8, fp32 scale), x ~= x_fp8 * scale. The
    coarse recipe V3 section 3.3.2 improves on: one outlier squeezes every other value towards the subnormals."""
    amax = x.abs().amax() if dims is None else x.abs().amax(dim=dims, keepdim=True)
    scale = _scale_from_amax(amax, False)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


# ---------------------------------------------------------------------------------------------- checkpoints
# What DeepSeek's FP8 release leaves in BF16 (DeepSeek-V3 section 3.3 and its released config): embeddings,
# norms, the MoE gate, lm_head; the MTP module's eh_proj is stored unquantised there as well.
_CHECKPOINT_KEEP = ("embed_tokens", "lm_head", "norm", ".mlp.gate.", "eh_proj", "shared_head")


def is_fp8_checkpoint_weight(name: str, tensor: torch.Tensor) -> bool:
    """Does DeepSeek's FP8 checkpoint layout store this tensor as float8 with a `weight_scale_inv` beside it?"""
    return (name.endswith(".weight") and tensor.dim() == 2 and tensor.is_floating_point()
            and not any(k in name for k in _CHECKPOINT_KEEP))


def quantize_checkpoint_weight(w: torch.Tensor, block: int = BLOCK):
    """w [out, in] -> (weight float8_e4m3fn, weight_scale_inv [ceil(out/128), ceil(in/128)] fp32)."""
    return quantize_weight(w, block)


def dequantize_checkpoint_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                                 block: int | tuple[int, int] = BLOCK,
                                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """DeepSeek's released FP8 layout -> high precision: weight * weight_scale_inv per block (128 x 128, or
    config.json's weight_block_size). The one dequantiser of checkpoints: nanoseek.checkpoint calls it on load.
    Raises ValueError when the scale's shape does not tile the weight, which a wrong block size would cause."""
    rows, cols = (block, block) if isinstance(block, int) else tuple(block)
    out, inp = weight.shape
    expected = (_cdiv(out, rows), _cdiv(inp, cols))
    if tuple(weight_scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {list(weight_scale_inv.shape)}, expected {list(expected)} "
                         f"for a {list(weight.shape)} weight with {rows}x{cols} blocks")
    return (weight.float() * _expand_scale(weight_scale_inv.float(), rows, cols, weight.shape)).to(dtype)


# ---------------------------------------------------------------------------------------------- FP8 GEMM
def _row_scales(scale: torch.Tensor, rows: int, block: int) -> torch.Tensor:
    """Scales of an NT operand with `rows` rows, one per (row, K chunk): a 1 x 128 scale [rows, nk] is already
    that; a 128 x 128 scale [ceil(rows/128), nk] is repeated down its block. (With rows == 1 the two agree.)"""
    if scale.shape[0] == rows:
        return scale
    if scale.shape[0] == _cdiv(rows, block):
        return scale.repeat_interleave(block, dim=0)[:rows]
    raise ValueError(f"scale of shape {list(scale.shape)} fits neither 1x{block} nor {block}x{block} tiles "
                     f"of an operand with {rows} rows")


def _dequantize_rows(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """An NT operand back in fp32 from its per-(row, K chunk) scales (see _row_scales)."""
    s = _row_scales(scale, q.shape[0], block).float().repeat_interleave(block, dim=-1)[:, : q.shape[1]]
    return q.float() * s


def _matmul_emulate(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                    out_dtype: torch.dtype, block: int) -> torch.Tensor:
    """a [M, K] @ b [N, K].T as FP8 tensor cores do it with DeepSeek's promotion (V3 section 3.3.2, Fig. 7b).
    There each 128-wide K chunk is an FP8 x FP8 product summed in the tensor core, then multiplied by the chunk's
    two scales and added to an fp32 accumulator. Products of e4m3 values are exact in fp32, so that equals
    dequantising both operands and summing all of K in fp32, up to fp32 rounding order: what this does, in one
    matmul. (The H800's ~14-bit in-core accumulation over <= 128 products is not modelled: promotion exists to
    bound exactly that error, and it is small within one chunk.)"""
    out = _dequantize_rows(a, sa, block) @ _dequantize_rows(b, sb, block).t()
    return out.to(out_dtype)


_SCALED_MM_BROKEN: set = set()


def scaled_mm_supported(device: torch.device) -> bool:
    """Block-wise (1x128 / 128x128) torch._scaled_mm needs a CUDA Hopper GPU (SM90), cuBLAS >= 12.9 and a
    torch that knows the recipe (2.9+); older ones reject the scales, which fp8_matmul then notices once."""
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _pad_rows(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2D tensor (fp8 included, which F.pad does not take) to [rows, cols]."""
    if tuple(t.shape) == (rows, cols):
        return t.contiguous()
    out = torch.zeros(rows, cols, dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _matmul_scaled_mm(a, sa, b, sb, out_dtype, block):
    """torch._scaled_mm with DeepSeek-style scales (cuBLAS >= 12.9 on SM90). It computes a [M, K] @ mat2 [K, N]
    with mat2 column-major, so mat2 = b.t() for our row-major b [N, K]. Scale layouts it checks (aten
    ScaledBlas.cpp, torch 2.9+):
      1 x 128 on a:    [M, ceil(K/128)], "outer-dim-major" (strides (1, M));
      128 x 128 on a:  [ceil(M/128), ceil(K/128)], contiguous;
      mat2: the same tests run on scale_b.t() against b, so pass (b's scale laid out as above).t().
    Accepted pairs: (1x128, 128x128), (128x128, 1x128), (1x128, 1x128): the three GEMMs of FP8Linear.
    K is zero-padded to a multiple of 128 and M, N to multiples of 16 (cuBLAS' alignment); zero rows and
    columns add nothing, and 1 x 128 scales of padded rows are 1."""
    m, k = a.shape
    n = b.shape[0]
    mp, np_, kp = _cdiv(m, 16) * 16, _cdiv(n, 16) * 16, _cdiv(k, block) * block

    def scale_layout(s, rows, padded_rows, one_row_is_1x128):
        # A one-row operand's scale [1, nk] fits both tilings: read it as 1 x 128 on the left operand and as
        # 128 x 128 on the right one, so the pair stays one that cuBLAS accepts.
        s = s.float()
        if s.shape[0] == rows and (rows > 1 or one_row_is_1x128):  # 1 x 128: pad rows, column-major
            s = torch.cat([s, s.new_ones(padded_rows - rows, s.shape[1])])
            return s.t().contiguous().t()
        return s.contiguous()  # 128 x 128: padding to 16 stays inside the last block

    a_p, b_p = _pad_rows(a, mp, kp), _pad_rows(b, np_, kp)
    sa_p, sb_p = scale_layout(sa, m, mp, True), scale_layout(sb, n, np_, False)
    out = torch._scaled_mm(a_p, b_p.t(), scale_a=sa_p, scale_b=sb_p.t(), out_dtype=out_dtype,
                           use_fast_accum=False)
    return out[:m, :n]


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "emulate", "scaled_mm"):
        raise ValueError(f"unknown FP8 backend {backend!r}: use 'auto', 'emulate' or 'scaled_mm'")
    if backend == "emulate":
        return backend
    if scaled_mm_supported(device):
        return "scaled_mm"
    if backend == "scaled_mm":
        warnings.warn(f"FP8 backend 'scaled_mm' needs a CUDA SM90+ GPU; emulating on {device}", stacklevel=3)
    return "emulate"


def fp8_matmul(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor,
               backend: str = "auto", out_dtype: torch.dtype = torch.float32, block: int = BLOCK) -> torch.Tensor:
    """FP8 GEMM a @ b.T with fp32 accumulation promoted every `block` elements of K (V3 section 3.3.2).

    a_fp8 [M, K], b_fp8 [N, K] float8_e4m3fn; each scale is either 1 x block tiles ([rows, ceil(K/block)],
    as quantize_act makes) or block x block blocks ([ceil(rows/block), ceil(K/block)], as quantize_weight makes).
    backend: "emulate" (any device), "scaled_mm" (torch._scaled_mm on SM90+, else emulate with a warning), or
    "auto" (scaled_mm where supported). Returns [M, N] in out_dtype.
    """
    if a_fp8.shape[-1] != b_fp8.shape[-1]:
        raise ValueError(f"fp8_matmul computes a @ b.T: K differs, a {list(a_fp8.shape)} b {list(b_fp8.shape)}")
    if resolve_backend(backend, a_fp8.device) == "scaled_mm" and block == BLOCK and a_fp8.shape[0] > 0:
        key = (a_fp8.device.index, out_dtype)
        # Some cuBLAS builds only write bf16 from block-scaled FP8 GEMMs: then ask for bf16 and cast up.
        for mm_dtype in (out_dtype, torch.bfloat16):
            if (key, mm_dtype) in _SCALED_MM_BROKEN:
                continue
            try:
                return _matmul_scaled_mm(a_fp8, a_scale, b_fp8, b_scale, mm_dtype, block).to(out_dtype)
            except (RuntimeError, NotImplementedError, ValueError) as e:
                _SCALED_MM_BROKEN.add((key, mm_dtype))
                warnings.warn(f"block-wise torch._scaled_mm failed with {mm_dtype} output "
                              f"({str(e).splitlines()[0][:200]}); trying the next option, then emulation",
                              stacklevel=2)
    return _matmul_emulate(a_fp8, a_scale, b_fp8, b_scale, out_dtype, block)

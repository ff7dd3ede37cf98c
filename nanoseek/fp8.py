"""Fine-grained FP8 training (DeepSeek-V3 section 3.3; REFERENCE section 5).

The recipe, in the order this file builds it:

  1. Block-wise quantisation to float8_e4m3fn (max 448) with scales from the current amax (online, no delayed
     scaling): activations get one scale per 1 x 128 tile (per token, per 128 channels), weights one scale per
     128 x 128 block. One outlier then only coarsens its own tile, not the whole tensor (V3 section 3.3.2).
  2. An FP8 GEMM that promotes partial sums to FP32 every 128 elements of K and applies the two scales at that
     moment (V3 section 3.3.2, "increasing accumulation precision"). Backend "emulate" does exactly that in
     plain PyTorch on any device; backend "scaled_mm" calls torch._scaled_mm with block-wise scales on Hopper.
  3. FP8Linear: all three GEMMs of a Linear (forward, input gradient, weight gradient) take FP8 inputs; the
     master weight stays in high precision and is quantised on the fly every call.
  4. FP8 grouped experts: the same for the routed experts' grouped GEMMs.
  5. convert_to_fp8(model): swaps modules from outside the model, keeping embedding, output head, MoE gate,
     norms and the attention core in high precision as V3 does.

Scale convention everywhere: dequantised = fp8 * scale, scale = amax / 448. For weights this is exactly the
`weight_scale_inv` tensor of DeepSeek's released FP8 checkpoints ([ceil(out/128), ceil(in/128)], fp32).

All GEMMs here are "NT": fp8_matmul(a, b) = a @ b.T with K the last dim of both operands, the layout FP8
tensor cores want (row-major x column-major) and the one nn.Linear already uses.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import GroupedExperts, grouped_mm

log = logging.getLogger(__name__)

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
    (w_fp8 same shape, scale [ceil(out/block), ceil(in/block)] (or [E, ...]) fp32). The scale is what DeepSeek's
    checkpoints call `weight_scale_inv`: w ~= w_fp8 * scale.
    """
    if w.dim() not in (2, 3):
        raise ValueError(f"quantize_weight expects [out, in] or [experts, out, in], got shape {list(w.shape)}")
    return _quantize_tiles(w, block, block, pow2_scale)


def dequantize_weight(w_fp8: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_weight: w_fp8 * scale, block by block."""
    return (w_fp8.float() * _expand_scale(scale, block, block, w_fp8.shape)).to(dtype)


# Per-tensor scaling: the coarse recipe V3 section 3.3.2 improves on (one scale for a whole tensor, so one
# outlier squeezes every other value towards e4m3's subnormals). Kept for comparison (benchmarks/fp8.py).
GRANULARITIES = ("block", "tensor")


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown FP8 granularity {granularity!r}: use 'block' (V3's 1x128 / 128x128) or 'tensor'")


def quantize_tensorwise(x: torch.Tensor, dims=None):
    """One scale per tensor (or per slice, reducing over `dims`): (x_fp8, fp32 scale), x ~= x_fp8 * scale."""
    amax = x.abs().amax() if dims is None else x.abs().amax(dim=dims, keepdim=True)
    scale = _scale_from_amax(amax, False)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _quantize_a(x: torch.Tensor, block: int, granularity: str):
    """A GEMM operand [..., rows, K] quantised along its last (K) dim: 1 x block tiles, or per tensor with the one
    scale laid out as 1 x block tile scales [..., rows, ceil(K/block)] so that fp8_matmul takes either."""
    if granularity == "block":
        return quantize_act(x, block)
    q, scale = quantize_tensorwise(x, dims=(-2, -1))  # for [E, rows, K]: one scale per expert's slice
    return q, scale.expand(*x.shape[:-1], _cdiv(x.shape[-1], block))


def _quantize_w(w: torch.Tensor, block: int, granularity: str):
    """A weight [out, in] (or [E, out, in]): block x block blocks, or one scale per matrix (per expert) laid out
    as block scales [..., ceil(out/block), ceil(in/block)]."""
    if granularity == "block":
        return quantize_weight(w, block)
    q, scale = quantize_tensorwise(w, dims=(-2, -1))
    return q, scale.expand(*w.shape[:-2], _cdiv(w.shape[-2], block), _cdiv(w.shape[-1], block))


# ---------------------------------------------------------------------------------------------- checkpoints
# What DeepSeek's FP8 release leaves in BF16 (REFERENCE section 5): embeddings, norms, the MoE gate, lm_head;
# the MTP module's eh_proj is stored unquantised there as well.
_CHECKPOINT_KEEP = ("embed_tokens", "lm_head", "norm", ".mlp.gate.", "eh_proj", "shared_head")


def is_fp8_checkpoint_weight(name: str, tensor: torch.Tensor) -> bool:
    """Does DeepSeek's FP8 checkpoint layout store this tensor as float8 with a `weight_scale_inv` beside it?"""
    return (name.endswith(".weight") and tensor.dim() == 2 and tensor.is_floating_point()
            and not any(k in name for k in _CHECKPOINT_KEEP))


def quantize_checkpoint_weight(w: torch.Tensor, block: int = BLOCK):
    """w [out, in] -> (weight float8_e4m3fn, weight_scale_inv [ceil(out/128), ceil(in/128)] fp32)."""
    weight, weight_scale_inv = quantize_weight(w, block)
    return weight, weight_scale_inv


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


def _resolve_backend(backend: str, device: torch.device) -> str:
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
    if _resolve_backend(backend, a_fp8.device) == "scaled_mm" and block == BLOCK and a_fp8.shape[0] > 0:
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


# ---------------------------------------------------------------------------------------------- FP8 Linear
def _weight_grad(dy: torch.Tensor, x: torch.Tensor, backend: str, block: int, granularity: str) -> torch.Tensor:
    """dW = dY^T X [out, in] with both operands in FP8. Its K dim is the token dim, so both are quantised in
    tiles of 128 tokens x 1 channel (1 x 128 tiles of dY^T and X^T), as DeepSeek does for the Wgrad GEMM; the
    forward's per-token tiles of X run along the wrong dim for this GEMM, so X is re-quantised."""
    g_q, g_s = _quantize_a(dy.t(), block, granularity)
    x_q, x_s = _quantize_a(x.t(), block, granularity)
    return fp8_matmul(g_q, g_s, x_q, x_s, backend, torch.float32, block)


class _FP8LinearFn(torch.autograd.Function):
    """Y = X W^T (+ b) with all three GEMMs in FP8 (V3 section 3.3.1, Fig. 6):
      Fprop  Y  = X W^T:  X 1x128 tiles (per token), W 128x128 blocks.
      Dgrad  dX = dY W:   dY 1x128 tiles (per token, K = out), the same W blocks (square blocks transpose).
      Wgrad  dW = dY^T X: see _weight_grad (tiles along tokens).
    Outputs in the input dtype; dW in fp32 (cast to the master weight's dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, backend, block, granularity):
        x2 = x.reshape(-1, x.shape[-1])
        x_q, x_s = _quantize_a(x2, block, granularity)
        w_q, w_s = _quantize_w(weight.detach(), block, granularity)
        y = fp8_matmul(x_q, x_s, w_q, w_s, backend, torch.float32, block)
        if bias is not None:
            y = y + bias.float()
        # V3 caches the FP8 copy of X; we keep X itself because the Wgrad GEMM quantises it along tokens.
        ctx.save_for_backward(x2, w_q, w_s)
        ctx.meta = (backend, block, granularity, x.shape, weight.dtype, bias is not None)
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w_q, w_s = ctx.saved_tensors
        backend, block, granularity, x_shape, w_dtype, has_bias = ctx.meta
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            g_q, g_s = _quantize_a(dy2, block, granularity)
            dx = fp8_matmul(g_q, g_s, w_q.t(), w_s.t(), backend, torch.float32, block)
            dx = dx.to(x2.dtype).view(x_shape)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(dy2, x2, backend, block, granularity).to(w_dtype)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(w_dtype)
        return dx, dw, db, None, None, None


class FP8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8 (see _FP8LinearFn). The `weight` Parameter is the high-precision
    master (fp32 in training), quantised on the fly each call; state_dict and checkpoints are unchanged.
    A subclass of nn.Linear so code that inits or inspects Linears (in_features, weight) keeps working.
    granularity "block" is V3's fine-grained scaling; "tensor" (one scale per operand) is for comparison only."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, backend="auto",
                 block: int = BLOCK, granularity: str = "block"):
        super().__init__(in_features, out_features, bias, device, dtype)
        _check_granularity(granularity)
        self.backend, self.block, self.granularity = backend, block, granularity

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto", block: int = BLOCK,
                    granularity: str = "block") -> "FP8Linear":
        """Wrap an existing nn.Linear, sharing its weight and bias Parameters (no copy)."""
        _check_granularity(granularity)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.backend, new.block, new.granularity = backend, block, granularity
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FP8LinearFn.apply(x, self.weight, self.bias, self.backend, self.block, self.granularity)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 backend={self.backend}, granularity={self.granularity}"


# ---------------------------------------------------------------------------------------------- FP8 experts
def _grouped_weight_grad_emulate(dy: torch.Tensor, x: torch.Tensor, bounds: list[int], block: int,
                                 granularity: str) -> torch.Tensor:
    """dW[e] = dY_e^T X_e for every expert at once: each expert's rows are scattered into a zero-padded
    [E, rows, .] buffer, so the token tiles (see _weight_grad) stay inside one expert's rows (zero padding cannot
    change a tile's amax), then quantised, dequantised and multiplied in one bmm."""
    counts = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    num_experts, rows = len(counts), max(max(counts), 1)
    expert = torch.repeat_interleave(torch.arange(num_experts, device=x.device),
                                     torch.tensor(counts, device=x.device), output_size=x.shape[0])
    row = torch.arange(x.shape[0], device=x.device) - torch.tensor(bounds[:-1], device=x.device)[expert]

    def token_tiles(t):  # [M, D] -> [E, D, rows] quantised along tokens, back in fp32
        buf = t.new_zeros(num_experts, rows, t.shape[1], dtype=torch.float32)
        buf[expert, row] = t.float()
        q, scale = _quantize_a(buf.transpose(1, 2), block, granularity)
        return dequantize_act(q, scale, block)

    return torch.bmm(token_tiles(dy), token_tiles(x).transpose(1, 2))


class _FP8GroupedMMFn(torch.autograd.Function):
    """Routed experts' grouped GEMM in FP8: rows x[offsets[e-1]:offsets[e]] times w[e]^T for each expert e,
    w [E, out, in] as GroupedExperts stores it. Same tiling as FP8Linear, with 128x128 blocks per expert and,
    for dW[e], token tiles within expert e's rows only."""

    @staticmethod
    def forward(ctx, x, w, offsets, backend, block, granularity):
        x_q, x_s = _quantize_a(x, block, granularity)  # per-row tiles: independent of the grouping
        w_q, w_s = _quantize_w(w.detach(), block, granularity)
        bounds = [0] + offsets.tolist()
        if _resolve_backend(backend, x.device) == "emulate":
            # one grouped GEMM of the dequantised operands: the same numbers as per-expert fp8_matmul calls
            # (contiguous: CPU torch._grouped_mm is ~50x slower on a transposed view)
            w_t = dequantize_weight(w_q, w_s, block).transpose(1, 2).contiguous()
            y = grouped_mm(dequantize_act(x_q, x_s, block), w_t, offsets).float()
        else:
            y = x.new_zeros(x.shape[0], w.shape[1], dtype=torch.float32)
            for e in range(w.shape[0]):
                r0, r1 = bounds[e], bounds[e + 1]
                if r1 > r0:
                    y[r0:r1] = fp8_matmul(x_q[r0:r1], x_s[r0:r1], w_q[e], w_s[e], backend, torch.float32, block)
        ctx.save_for_backward(x, w_q, w_s)
        ctx.meta = (backend, block, granularity, bounds, w.dtype)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w_q, w_s = ctx.saved_tensors
        backend, block, granularity, bounds, w_dtype = ctx.meta
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(w_q.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[1] else None
        g_q, g_s = _quantize_a(dy, block, granularity)
        emulate = _resolve_backend(backend, x.device) == "emulate"
        if dx is not None and emulate:  # dX = dY W per expert, as one grouped GEMM (w [E, out, in] is [E, K, N])
            offsets = torch.tensor(bounds[1:], device=x.device)
            dx = grouped_mm(dequantize_act(g_q, g_s, block), dequantize_weight(w_q, w_s, block), offsets).float()
        if dw is not None and emulate:
            dw = _grouped_weight_grad_emulate(dy, x, bounds, block, granularity)
        for e in range(w_q.shape[0]):
            r0, r1 = bounds[e], bounds[e + 1]
            if r1 == r0 or emulate:
                continue
            if dx is not None:
                dx[r0:r1] = fp8_matmul(g_q[r0:r1], g_s[r0:r1], w_q[e].t(), w_s[e].t(), backend, torch.float32,
                                       block)
            if dw is not None:  # token tiles must stay inside one expert's rows, hence a loop
                dw[e] = _weight_grad(dy[r0:r1], x[r0:r1], backend, block, granularity)
        return (None if dx is None else dx.to(x.dtype), None if dw is None else dw.to(w_dtype), None, None, None,
                None)


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str = "auto",
                   block: int = BLOCK, granularity: str = "block") -> torch.Tensor:
    """FP8 grouped GEMM: x [M, in] sorted by expert, w [E, out, in], offsets [E] cumulative row counts -> [M, out].
    (Note w is [E, out, in], the parameter as stored, not the [E, in, out] view moe.grouped_mm takes.)"""
    _check_granularity(granularity)
    return _FP8GroupedMMFn.apply(x, w, offsets, backend, block, granularity)


class FP8GroupedExperts(GroupedExperts):
    """GroupedExperts whose three grouped GEMMs (gate, up, down; forward and backward) run in FP8.
    Shares the Parameters of the module it converts; routing arithmetic is GroupedExperts.forward's."""

    @classmethod
    def from_experts(cls, experts: GroupedExperts, backend: str = "auto", block: int = BLOCK,
                     granularity: str = "block"):
        _check_granularity(granularity)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.gate_proj, new.up_proj, new.down_proj = experts.gate_proj, experts.up_proj, experts.down_proj
        new.backend, new.block, new.granularity = backend, block, granularity
        return new

    def expert_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_mm(x, w, offsets, self.backend, self.block, self.granularity)

    def extra_repr(self) -> str:
        return f"fp8 backend={self.backend}, granularity={self.granularity}"


# ---------------------------------------------------------------------------------------------- converter
def convert_to_fp8(model: nn.Module, backend: str = "auto", skip: tuple[str, ...] = ("lm_head",),
                   block: int = BLOCK, granularity: str = "block") -> nn.Module:
    """Swap, in place, every nn.Linear for an FP8Linear and every GroupedExperts for FP8GroupedExperts, sharing
    their Parameters (so optimizers and checkpoints see the same tensors). Modules whose last name is in `skip`
    stay as they are: by default the output head, which V3 keeps in BF16 along with the embedding, MoE gate
    (Router, not a Linear), norms and attention core (no Linear there), none of which are touched.
    granularity "tensor" swaps V3's fine-grained scales for one scale per tensor (a baseline to compare with).
    Returns the model; the converted names are logged and stored in model.fp8_modules."""
    _check_granularity(granularity)
    converted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if child_name in skip or isinstance(child, (FP8Linear, FP8GroupedExperts)):
                continue
            if isinstance(child, nn.Linear):
                setattr(module, child_name, FP8Linear.from_linear(child, backend, block, granularity))
            elif isinstance(child, GroupedExperts):
                setattr(module, child_name, FP8GroupedExperts.from_experts(child, backend, block, granularity))
            else:
                continue
            converted.append(full)
    model.fp8_modules = converted
    log.info("FP8: converted %d modules (backend=%s, granularity=%s): %s", len(converted), backend, granularity,
             ", ".join(converted))
    return model

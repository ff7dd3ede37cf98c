"""FP8 modules (DeepSeek-V3 section 3.3.1, Fig. 6): FP8Linear and FP8GroupedExperts run all three GEMMs of a
layer (forward, input gradient, weight gradient) in FP8 under an FP8Recipe; `convert_to_fp8` swaps them into a
plain model from outside, keeping the embedding, output head, MoE gate, norms and the attention core in high
precision as V3 does. The numerics are nanoseek/fp8/numerics.py."""

from __future__ import annotations

import logging

import torch
from torch import nn

from nanoseek.fp8.numerics import dequantize_act, dequantize_weight
from nanoseek.fp8.recipe import FP8Recipe
from nanoseek.model.moe import GroupedExperts, grouped_mm

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- FP8 Linear
def _weight_grad(dy: torch.Tensor, x: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
    """dW = dY^T X [out, in] with both operands in FP8. Its K dim is the token dim, so both are quantised in
    tiles of 128 tokens x 1 channel (1 x 128 tiles of dY^T and X^T), as DeepSeek does for the Wgrad GEMM; the
    forward's per-token tiles of X run along the wrong dim for this GEMM, so X is re-quantised."""
    return recipe.matmul(*recipe.quantize_operand(dy.t()), *recipe.quantize_operand(x.t()))


class _FP8LinearFn(torch.autograd.Function):
    """Y = X W^T (+ b) with all three GEMMs in FP8 (V3 section 3.3.1, Fig. 6):
      Fprop  Y  = X W^T:  X 1x128 tiles (per token), W 128x128 blocks.
      Dgrad  dX = dY W:   dY 1x128 tiles (per token, K = out), the same W blocks (square blocks transpose).
      Wgrad  dW = dY^T X: see _weight_grad (tiles along tokens).
    Outputs in the input dtype; dW in fp32 (cast to the master weight's dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe: FP8Recipe):
        x2 = x.reshape(-1, x.shape[-1])
        w_q, w_s = recipe.quantize_weight(weight.detach())
        y = recipe.matmul(*recipe.quantize_operand(x2), w_q, w_s)
        if bias is not None:
            y = y + bias.float()
        # V3 caches the FP8 copy of X; we keep X itself because the Wgrad GEMM quantises it along tokens.
        ctx.save_for_backward(x2, w_q, w_s)
        ctx.meta = (recipe, x.shape, weight.dtype, bias is not None)
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w_q, w_s = ctx.saved_tensors
        recipe, x_shape, w_dtype, has_bias = ctx.meta
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = recipe.matmul(*recipe.quantize_operand(dy2), w_q.t(), w_s.t()).to(x2.dtype).view(x_shape)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(dy2, x2, recipe).to(w_dtype)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(w_dtype)
        return dx, dw, db, None


class FP8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8 (see _FP8LinearFn). The `weight` Parameter is the high-precision
    master (fp32 in training), quantised on the fly each call; state_dict and checkpoints are unchanged.
    A subclass of nn.Linear so code that inits or inspects Linears (in_features, weight) keeps working."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, recipe: FP8Recipe | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.recipe = recipe or FP8Recipe()

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP8Recipe | None = None) -> FP8Linear:
        """Wrap an existing nn.Linear, sharing its weight and bias Parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.recipe = recipe or FP8Recipe()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FP8LinearFn.apply(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.recipe}"


# ---------------------------------------------------------------------------------------------- FP8 experts
def _grouped_weight_grad_emulate(dy: torch.Tensor, x: torch.Tensor, bounds: list[int],
                                 recipe: FP8Recipe) -> torch.Tensor:
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
        return dequantize_act(*recipe.quantize_operand(buf.transpose(1, 2)), recipe.block)

    return torch.bmm(token_tiles(dy), token_tiles(x).transpose(1, 2))


class _FP8GroupedMMFn(torch.autograd.Function):
    """Routed experts' grouped GEMM in FP8: rows x[offsets[e-1]:offsets[e]] times w[e]^T for each expert e,
    w [E, out, in] as GroupedExperts stores it. Same tiling as FP8Linear, with 128x128 blocks per expert and,
    for dW[e], token tiles within expert e's rows only. The emulated path runs each GEMM as one grouped GEMM of
    the dequantised operands (the same numbers as per-expert fp8 GEMMs); scaled_mm loops over experts."""

    @staticmethod
    def forward(ctx, x, w, offsets, recipe: FP8Recipe):
        x_q, x_s = recipe.quantize_operand(x)  # per-row tiles: independent of the grouping
        w_q, w_s = recipe.quantize_weight(w.detach())
        bounds = [0] + offsets.tolist()
        if recipe.emulated(x.device):
            # contiguous: CPU torch._grouped_mm is ~50x slower on a transposed view
            w_t = dequantize_weight(w_q, w_s, recipe.block).transpose(1, 2).contiguous()
            y = grouped_mm(dequantize_act(x_q, x_s, recipe.block), w_t, offsets).float()
        else:
            y = x.new_zeros(x.shape[0], w.shape[1], dtype=torch.float32)
            for e, (r0, r1) in enumerate(zip(bounds[:-1], bounds[1:])):
                if r1 > r0:
                    y[r0:r1] = recipe.matmul(x_q[r0:r1], x_s[r0:r1], w_q[e], w_s[e])
        ctx.save_for_backward(x, w_q, w_s)
        ctx.meta = (recipe, bounds, w.dtype)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w_q, w_s = ctx.saved_tensors
        recipe, bounds, w_dtype = ctx.meta
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_q, g_s = recipe.quantize_operand(dy)
        dx = dw = None
        if recipe.emulated(x.device):  # dX = dY W per expert, as one grouped GEMM (w [E, out, in] is [E, K, N])
            if want_dx:
                offsets = torch.tensor(bounds[1:], device=x.device)
                dx = grouped_mm(dequantize_act(g_q, g_s, recipe.block), dequantize_weight(w_q, w_s, recipe.block),
                                offsets).float()
            if want_dw:
                dw = _grouped_weight_grad_emulate(dy, x, bounds, recipe)
        else:
            dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if want_dx else None
            dw = torch.zeros(w_q.shape, dtype=torch.float32, device=x.device) if want_dw else None
            for e, (r0, r1) in enumerate(zip(bounds[:-1], bounds[1:])):
                if r1 == r0:
                    continue
                if want_dx:
                    dx[r0:r1] = recipe.matmul(g_q[r0:r1], g_s[r0:r1], w_q[e].t(), w_s[e].t())
                if want_dw:  # token tiles must stay inside one expert's rows, hence a loop
                    dw[e] = _weight_grad(dy[r0:r1], x[r0:r1], recipe)
        return None if dx is None else dx.to(x.dtype), None if dw is None else dw.to(w_dtype), None, None


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   recipe: FP8Recipe | None = None) -> torch.Tensor:
    """FP8 grouped GEMM: x [M, in] sorted by expert, w [E, out, in], offsets [E] cumulative row counts -> [M, out].
    (Note w is [E, out, in], the parameter as stored, not the [E, in, out] view moe.grouped_mm takes.)"""
    return _FP8GroupedMMFn.apply(x, w, offsets, recipe or FP8Recipe())


class FP8GroupedExperts(GroupedExperts):
    """GroupedExperts whose three grouped GEMMs (gate, up, down; forward and backward) run in FP8.
    Shares the Parameters of the module it converts; routing arithmetic is GroupedExperts.forward's."""

    @classmethod
    def from_experts(cls, experts: GroupedExperts, recipe: FP8Recipe | None = None):
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.gate_proj, new.up_proj, new.down_proj = experts.gate_proj, experts.up_proj, experts.down_proj
        new.recipe = recipe or FP8Recipe()
        return new

    def expert_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_mm(x, w, offsets, self.recipe)

    def extra_repr(self) -> str:
        return str(self.recipe)


# ---------------------------------------------------------------------------------------------- converter
def convert_to_fp8(model: nn.Module, recipe: FP8Recipe | None = None, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Swap, in place, every nn.Linear for an FP8Linear and every GroupedExperts for FP8GroupedExperts, sharing
    their Parameters (so optimizers and checkpoints see the same tensors). Modules whose last name is in `skip`
    (by default the output head) stay as they are; nothing else V3 keeps in BF16 is a Linear or GroupedExperts.
    Returns the model; the converted names are logged and stored in model.fp8_modules."""
    recipe = recipe or FP8Recipe()
    converted = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in skip or isinstance(child, (FP8Linear, FP8GroupedExperts)):
                continue
            if isinstance(child, nn.Linear):
                setattr(module, child_name, FP8Linear.from_linear(child, recipe))
            elif isinstance(child, GroupedExperts):
                setattr(module, child_name, FP8GroupedExperts.from_experts(child, recipe))
            else:
                continue
            converted.append(f"{name}.{child_name}" if name else child_name)
    model.fp8_modules = converted
    log.info("FP8: converted %d modules (%s): %s", len(converted), recipe, ", ".join(converted))
    return model

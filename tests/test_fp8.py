"""Tests for nanoseek.fp8: block-wise FP8 quantisation, the FP8 GEMM, FP8Linear, FP8 experts, the converter
(DeepSeek-V3 section 3.3). All CPU, tiny shapes; the scaled_mm test runs only on a CUDA SM90 GPU."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanoseek
from nanoseek import fp8
from nanoseek.fp8 import FP8Recipe, dequantize_act, dequantize_weight, fp8_matmul, quantize_act, quantize_weight
from nanoseek.fp8 import modules as fp8_modules
from nanoseek.fp8 import numerics as fp8_numerics
from nanoseek.fp8.modules import FP8GroupedExperts, FP8Linear, convert_to_fp8, fp8_grouped_mm
from nanoseek.model.moe import GroupedExperts, Router, route_to_experts
from nanoseek.model.norm import RMSNorm

EMULATE = FP8Recipe(backend="emulate")

# e4m3 keeps 3 mantissa bits: round-to-nearest is off by at most 2^-4 of the value for normal numbers;
# below 2^-6 (subnormals) the spacing is 2^-9, so at most 2^-10 in fp8 units, i.e. 2^-10 * scale.
E4M3_REL = 2.0 ** -4
E4M3_SUBNORMAL_ABS = 2.0 ** -10




def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_within_e4m3(x, deq, scale_per_element):
    err = (deq - x).abs()
    bound = E4M3_REL * x.abs() + E4M3_SUBNORMAL_ABS * scale_per_element
    assert torch.all(err <= bound * (1 + 1e-6)), f"max excess {(err - bound).max().item()}"


# ---------------------------------------------------------------------------------------------- naive references
def naive_quantize(x2d, rows, cols, pow2=False):
    """Plain loops over tiles: amax, scale = amax/448 (1 for an all-zero tile), round to e4m3."""
    r, c = x2d.shape
    q = torch.empty(r, c, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(r / rows), math.ceil(c / cols))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            tile = x2d[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols].float()
            amax = tile.abs().max()
            scale = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            if pow2:
                scale = 2.0 ** torch.ceil(torch.log2(scale))
            s[i, j] = scale
            q[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = (tile / scale).clamp(-448, 448).to(q.dtype)
    return q, s


def naive_fp8_matmul(a_q, a_s_rows, b_q, b_s_rows):
    """a @ b.T chunk by chunk of 128 along K: dequantise the chunk, fp32 matmul, add into an fp32 sum.
    a_s_rows [M, nk] and b_s_rows [N, nk] hold one scale per (row, chunk)."""
    k = a_q.shape[1]
    out = torch.zeros(a_q.shape[0], b_q.shape[0])
    for c in range(math.ceil(k / 128)):
        sl = slice(c * 128, (c + 1) * 128)
        a = a_q[:, sl].float() * a_s_rows[:, c:c + 1]
        b = b_q[:, sl].float() * b_s_rows[:, c:c + 1]
        out += a @ b.t()
    return out


# ---------------------------------------------------------------------------------------------- exact references
# Each GEMM must equal the product of its operands quantised along *that GEMM's* K dim. A band around the exact
# fp32 product cannot tell the right axis from a wrong one (both give a few percent); this reference can: the
# library matches it to fp32 rounding, a tile on the wrong axis misses by 3-5%.
def qdq(t, rows, cols):
    """t [R, C] quantised to e4m3 in rows x cols tiles (scale amax / 448, 1 for an all-zero tile), dequantised."""
    r, c = t.shape
    nr, nc = math.ceil(r / rows), math.ceil(c / cols)
    padded = torch.zeros(nr * rows, nc * cols, dtype=torch.float64)
    padded[:r, :c] = t.double()
    tiles = padded.view(nr, rows, nc, cols)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True)
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax)).float().double()
    q = (tiles / scale).clamp(-448, 448).float().to(torch.float8_e4m3fn).double()
    return (q * scale).view(nr * rows, nc * cols)[:r, :c]


def along_k(t):
    """1 x 128 tiles along the last dim, which is K in the NT GEMM t @ other.T."""
    return qdq(t, 1, 128)


def blocks(w):
    return qdq(w, 128, 128)


def nt_ref(a, b):
    """a @ b.T in fp64, one 128-wide K chunk at a time, as DeepSeek's promotion accumulates."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for c in range(0, a.shape[1], 128):
        out += a[:, c:c + 128] @ b[:, c:c + 128].t()
    return out


def assert_exact(got, want, what):
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"{what}: max |error| / max |reference| = {err:.2e}"


# ---------------------------------------------------------------------------------------------- quantisation
@pytest.mark.parametrize("shape", [(5, 300), (2, 3, 128), (7, 1), (1, 129)])
def test_quantize_act_matches_naive_and_error_bound(shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-3, 2, shape[-1])  # many magnitudes inside a tile
    q, s = quantize_act(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], math.ceil(shape[-1] / 128))
    nq, ns = naive_quantize(x.reshape(-1, shape[-1]), 1, 128)
    assert torch.equal(q.reshape(-1, shape[-1]).float(), nq.float())
    assert torch.equal(s.reshape(ns.shape), ns)
    deq = dequantize_act(q, s)
    s_el = s.repeat_interleave(128, dim=-1)[..., :shape[-1]]
    assert_within_e4m3(x, deq, s_el)
    # against the tile's amax, the worst case is 2^-4
    amax_el = (s_el * 448)
    assert torch.all((deq - x).abs() <= E4M3_REL * amax_el)


@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (1, 1), (129, 257), (3, 130, 260)])
def test_quantize_weight_matches_naive_and_error_bound(shape):
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.02
    q, s = quantize_weight(w)
    assert s.shape == (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    w3, q3, s3 = w.reshape(-1, *shape[-2:]), q.reshape(-1, *shape[-2:]), s.reshape(-1, *s.shape[-2:])
    for e in range(w3.shape[0]):  # 3D: blocks per expert
        nq, ns = naive_quantize(w3[e], 128, 128)
        assert torch.equal(q3[e].float(), nq.float()) and torch.equal(s3[e], ns)
    deq = dequantize_weight(q, s)
    s_el = s.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :shape[-2], :shape[-1]]
    assert_within_e4m3(w, deq, s_el)


def test_pow2_scales_are_powers_of_two():
    torch.manual_seed(2)
    x = torch.randn(6, 300) * 3.7
    for q, s, nq_ns in [(*quantize_act(x, pow2_scale=True), naive_quantize(x, 1, 128, pow2=True)),
                        (*quantize_weight(x, pow2_scale=True), naive_quantize(x, 128, 128, pow2=True))]:
        mant, _ = torch.frexp(s)
        assert torch.all(mant == 0.5), "every scale must be an exact power of two"
        assert torch.equal(q.float(), nq_ns[0].float()) and torch.equal(s, nq_ns[1])
        # rounding the scale up never clips: the tile's amax still fits under 448
        assert q.float().abs().max() <= 448
    q, s = quantize_act(x, pow2_scale=True)
    assert_within_e4m3(x, dequantize_act(q, s), s.repeat_interleave(128, -1)[:, :300])


def test_zero_tiles_give_no_nan():
    x = torch.randn(4, 384)
    x[:, 128:256] = 0  # a whole zero tile in every row
    x[2] = 0  # and a zero row
    q, s = quantize_act(x)
    assert torch.isfinite(s).all() and torch.isfinite(q.float()).all()
    assert torch.equal(dequantize_act(q, s)[:, 128:256], torch.zeros(4, 128))
    assert torch.equal(dequantize_act(q, s)[2], torch.zeros(384))
    wq, ws = quantize_weight(torch.zeros(130, 130))
    assert torch.isfinite(ws).all() and torch.equal(dequantize_weight(wq, ws), torch.zeros(130, 130))


def test_outlier_only_affects_its_own_tile():
    """Fine-grained scaling's point (V3 section 3.3.2): an outlier coarsens one tile; per-tensor scaling loses
    every small value in the tensor."""
    torch.manual_seed(3)
    x = torch.randn(8, 512)
    x_out = x.clone()
    # e4m3's subnormals reach 2^-9, so per-tensor scaling shrugs off a 1e3 outlier; at 1e6 (the outliers FP8
    # training meets in activations and gradients) every ordinary value lands at or below the smallest step.
    x_out[0, 5] = 1e6
    err_clean = (dequantize_act(*quantize_act(x)) - x).abs()
    err_out = (dequantize_act(*quantize_act(x_out)) - x_out).abs()
    others = torch.ones_like(x, dtype=torch.bool)
    others[0, :128] = False
    assert torch.equal(err_out[others], err_clean[others])  # bit-identical outside the outlier's tile

    def per_tensor(t):
        s = t.abs().max() / 448
        return (t / s).to(torch.float8_e4m3fn).float() * s

    err_tensor = (per_tensor(x_out) - x_out).abs()
    assert err_tensor[others].mean() > 10 * err_clean[others].mean()


def test_checkpoint_names_follow_deepseek():
    w = torch.randn(300, 200)
    weight, weight_scale_inv = fp8.quantize_checkpoint_weight(w)
    assert weight.dtype == torch.float8_e4m3fn and weight_scale_inv.shape == (3, 2)
    assert rel_err(fp8.dequantize_checkpoint_weight(weight, weight_scale_inv, dtype=torch.float32), w) < 0.05
    assert fp8.is_fp8_checkpoint_weight("model.layers.3.mlp.experts.7.down_proj.weight", w)
    assert fp8.is_fp8_checkpoint_weight("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", w)
    for name in ["model.embed_tokens.weight", "lm_head.weight", "model.layers.3.mlp.gate.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"]:
        assert not fp8.is_fp8_checkpoint_weight(name, w), name


# ---------------------------------------------------------------------------------------------- FP8 GEMM
@pytest.mark.parametrize("m,n,k", [(33, 48, 256), (5, 130, 200), (1, 16, 64)])
def test_fp8_matmul_emulation_matches_naive_and_fp32(m, n, k):
    torch.manual_seed(4)
    x, w = torch.randn(m, k), torch.randn(n, k) * 0.05
    xq, xs = quantize_act(x)
    wq, ws = quantize_weight(w)
    y = fp8_matmul(xq, xs, wq, ws, backend="emulate")
    ws_rows = ws.repeat_interleave(128, dim=0)[:n]
    ref = naive_fp8_matmul(xq, xs, wq, ws_rows)
    # same products, scales applied before vs after the chunk's sum: equal up to fp32 rounding
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # vs the exact fp32 product: each operand carries ~2^-5 rms relative rounding, so ~3-4% normwise;
    # 0.08 is a safe bound, and a nonzero error proves the inputs really went through e4m3.
    assert 1e-3 < rel_err(y, x @ w.t()) < 0.08
    # 1x128 tiles on both sides (the weight-gradient GEMM's tiling)
    wq1, ws1 = quantize_act(w)
    y1 = fp8_matmul(xq, xs, wq1, ws1, backend="emulate")
    torch.testing.assert_close(y1, naive_fp8_matmul(xq, xs, wq1, ws1), rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_fp8_matmul_rejects_mismatched_k():
    xq, xs = quantize_act(torch.randn(4, 128))
    wq, ws = quantize_weight(torch.randn(8, 256))
    with pytest.raises(ValueError, match="K differs"):
        fp8_matmul(xq, xs, wq, ws, backend="emulate")


# ---------------------------------------------------------------------------------------------- FP8Linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_forward_and_grads_close_to_linear(dtype):
    torch.manual_seed(5)
    lin = nn.Linear(256, 192, bias=True)
    x = torch.randn(2, 37, 256).to(dtype).requires_grad_()
    g = torch.randn(2, 37, 192).to(dtype)

    def run(forward, module):
        x.grad = None
        module.zero_grad()
        y = forward(x)
        y.backward(g)
        return y.detach(), x.grad.clone(), module.weight.grad.clone(), module.bias.grad.clone()

    # reference: the exact product of the same (fp32 master) weight, output in the input dtype
    y, dx, dw, db = run(lambda t: F.linear(t.float(), lin.weight, lin.bias).to(dtype), lin)
    f = FP8Linear.from_linear(lin, EMULATE)
    assert f.weight is lin.weight and f.bias is lin.bias  # shared master weight, no copy
    y8, dx8, dw8, db8 = run(f, f)
    assert y8.dtype == dtype and dx8.dtype == dtype and dw8.dtype == torch.float32 and y8.shape == y.shape
    # e4m3 on both GEMM inputs: ~3.5% normwise; < 0.1 allows for it, > 0.005 catches a skipped quantisation
    # (bf16 rounding alone is ~0.3%).
    for got, want in [(y8, y), (dx8, dx), (dw8, dw)]:
        assert 0.005 < rel_err(got, want) < 0.1
    torch.testing.assert_close(db8, db, rtol=1e-2, atol=1e-2)  # the bias gradient is a plain sum


def test_fp8_linear_is_used_by_training_and_shares_parameters():
    lin = nn.Linear(64, 32, bias=False)
    f = FP8Linear.from_linear(lin, EMULATE)
    assert isinstance(f, nn.Linear) and [p for p in f.parameters()] == [lin.weight]
    f(torch.randn(3, 64)).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- FP8 experts
def test_fp8_grouped_mm_forward_backward():
    torch.manual_seed(6)
    e, d_in, d_out = 4, 192, 80
    counts = torch.tensor([5, 0, 9, 3])  # expert 1 gets no tokens
    offsets = counts.cumsum(0)
    x = torch.randn(int(counts.sum()), d_in, requires_grad=True)
    w = (torch.randn(e, d_out, d_in) * 0.05).requires_grad_()
    g = torch.randn(x.shape[0], d_out)

    y8 = fp8_grouped_mm(x, w, offsets, EMULATE)
    y8.backward(g)
    dx8, dw8 = x.grad.clone(), w.grad.clone()
    x.grad, w.grad = None, None
    bounds = [0] + offsets.tolist()
    y = torch.cat([x[bounds[i]:bounds[i + 1]] @ w[i].t() for i in range(e)])
    y.backward(g)
    for got, want in [(y8, y), (dx8, x.grad), (dw8[[0, 2, 3]], w.grad[[0, 2, 3]])]:
        assert 0.005 < rel_err(got, want) < 0.1
    assert torch.equal(dw8[1], torch.zeros(d_out, d_in))  # no tokens, no gradient

    # the batched emulation of dW equals quantising each expert's tokens separately (tiles never straddle experts)
    for granularity in ("block", "tensor"):
        got = fp8_modules._grouped_weight_grad_emulate(g, x.detach(), bounds, FP8Recipe(granularity, backend="emulate"))
        for i in (0, 2, 3):
            want = fp8_modules._weight_grad(g[bounds[i]:bounds[i + 1]], x.detach()[bounds[i]:bounds[i + 1]],
                                            FP8Recipe(granularity, backend="emulate"))
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
    # the forward of one expert is exactly fp8_matmul on its rows
    xq, xs = quantize_act(x.detach())
    wq, ws = quantize_weight(w.detach())
    torch.testing.assert_close(y8[5:14], fp8_matmul(xq[5:14], xs[5:14], wq[2], ws[2], backend="emulate"))


def test_fp8_grouped_experts_close_to_grouped_experts():
    torch.manual_seed(7)
    cfg = nanoseek.ModelConfig.from_preset("tiny")
    experts = GroupedExperts(cfg)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.05)
    x = torch.randn(24, cfg.hidden_size)
    indices = torch.stack([torch.randperm(cfg.n_routed_experts)[:cfg.num_experts_per_tok] for _ in range(24)])
    weights = torch.rand(24, cfg.num_experts_per_tok)
    ref = route_to_experts(experts, x, indices, weights)
    fexp = FP8GroupedExperts.from_experts(experts, EMULATE)
    assert fexp.gate_proj is experts.gate_proj
    assert 0.005 < rel_err(route_to_experts(fexp, x, indices, weights), ref) < 0.1


# ---------------------------------------------------------------------------------------------- converter
def test_convert_to_fp8_keeps_deepseek_high_precision_parts():
    torch.manual_seed(8)
    cfg = nanoseek.ModelConfig.from_preset("tiny")
    model = nanoseek.Transformer(cfg)
    before = {name: id(p) for name, p in model.named_parameters()}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    experts = [n for n, m in model.named_modules() if isinstance(m, GroupedExperts)]
    assert convert_to_fp8(model, EMULATE) is model
    mods = dict(model.named_modules())
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    assert all(type(m) is Router for n, m in mods.items() if n.endswith(".gate"))
    assert all(type(m) is RMSNorm for n, m in mods.items() if "norm" in n.split(".")[-1])
    assert all(isinstance(mods[n], FP8Linear) for n in linears)
    assert all(isinstance(mods[n], FP8GroupedExperts) for n in experts)
    assert sorted(model.fp8_modules) == sorted(linears + experts)
    assert any("eh_proj" in n for n in model.fp8_modules) and any("q_a_proj" in n for n in model.fp8_modules)
    # the very same Parameters: optimizer state and checkpoints are unaffected
    assert {name: id(p) for name, p in model.named_parameters()} == before
    assert set(model.state_dict()) == set(nanoseek.Transformer(cfg).state_dict())
    # converting twice changes nothing
    convert_to_fp8(model, EMULATE)
    assert model.fp8_modules == []


@contextlib.contextmanager
def reference_fp8_forward():
    """Run converted modules through the per-K-tile reference (forward only) instead of the library's GEMMs."""
    def linear(self, x):
        y = nt_ref(along_k(x.reshape(-1, x.shape[-1])), blocks(self.weight.detach()))
        if self.bias is not None:
            y = y + self.bias.double()
        return y.float().view(*x.shape[:-1], -1)

    def expert_mm(self, x, w, offsets):
        bounds = [0] + offsets.tolist()
        return torch.cat([nt_ref(along_k(x[a:b]), blocks(w[e])) for e, (a, b) in
                          enumerate(zip(bounds[:-1], bounds[1:]))]).float()

    saved = FP8Linear.forward, FP8GroupedExperts.expert_mm
    FP8Linear.forward, FP8GroupedExperts.expert_mm = linear, expert_mm
    try:
        yield
    finally:
        FP8Linear.forward, FP8GroupedExperts.expert_mm = saved


def test_converted_tiny_model_trains():
    torch.manual_seed(9)
    cfg = nanoseek.ModelConfig.from_preset("tiny")
    model = nanoseek.Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    inputs, targets = ids[:, :-1], ids[:, 1:].reshape(-1)
    convert_to_fp8(model, EMULATE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(4):
        logits = model(inputs)
        if step == 0:  # every converted GEMM is the per-K-tile reference, through the whole model
            with torch.no_grad(), reference_fp8_forward():
                ref = model(inputs)
            assert_exact(logits.detach(), ref.double(), "converted model logits")
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.layers[1].mlp.experts.gate_proj.grad.abs().sum() > 0  # FP8 experts get gradients
        opt.step()
    assert losses[-1] < losses[0] - 0.5, losses


# ---------------------------------------------------------------------------------------------- per-tensor scaling
def test_tensorwise_quantisation_matches_naive():
    torch.manual_seed(11)
    x = torch.randn(6, 300) * 3
    q, s = fp8.quantize_tensorwise(x)
    assert s.shape == () and s == x.abs().max() / 448
    assert torch.equal(q.float(), (x / s).to(torch.float8_e4m3fn).float())
    w = torch.randn(3, 130, 70)
    q, s = fp8.quantize_tensorwise(w, dims=(-2, -1))  # one scale per expert
    assert s.shape == (3, 1, 1) and torch.equal(s.flatten(), w.abs().amax(dim=(1, 2)) / 448)


def test_block_scaling_beats_tensor_scaling_with_an_outlier():
    """What fine-grained scaling buys (V3 section 3.3.2): with one large activation channel value, per-tensor
    scaling pushes every other token's inputs into e4m3's subnormals; 1 x 128 tiles confine the damage."""
    torch.manual_seed(12)
    lin = nn.Linear(256, 64, bias=False)
    x = torch.randn(32, 256)
    x[0, 7] = 1e6  # as in test_outlier_only_affects_its_own_tile
    ref = F.linear(x, lin.weight)[1:]
    errs = {}
    for granularity in ("block", "tensor"):
        f = FP8Linear.from_linear(lin, FP8Recipe(granularity, backend="emulate"))
        assert f.recipe.granularity == granularity and granularity in repr(f)
        errs[granularity] = rel_err(f(x).detach()[1:], ref)
    assert errs["block"] < 0.1 and errs["tensor"] > 3 * errs["block"], errs


def test_tensor_granularity_converts_every_module_and_rejects_unknown_names():
    """Its arithmetic is checked in test_tensor_granularity_gemms_equal_one_scale_reference."""
    cfg = nanoseek.ModelConfig.from_preset("tiny")
    model = convert_to_fp8(nanoseek.Transformer(cfg), FP8Recipe("tensor", backend="emulate"))
    mods = dict(model.named_modules())
    assert model.fp8_modules and all(mods[n].recipe.granularity == "tensor" for n in model.fp8_modules)
    with pytest.raises(ValueError, match="unknown FP8 granularity"):
        convert_to_fp8(nanoseek.Transformer(cfg), FP8Recipe("channel"))


# ---------------------------------------------------------------------------------------------- CUDA
def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not _hopper(), reason="block-wise torch._scaled_mm needs a CUDA SM90 (Hopper) GPU")
def test_scaled_mm_backend_matches_emulation():
    torch.manual_seed(10)
    fp8_numerics._SCALED_MM_BROKEN.clear()
    dev = "cuda"
    x, w = torch.randn(200, 384, device=dev), torch.randn(272, 384, device=dev) * 0.05
    xq, xs = quantize_act(x)
    wq, ws = quantize_weight(w)
    cases = [(xq, xs, wq, ws),  # fprop: 1x128 x 128x128
             (*quantize_act(torch.randn(200, 272, device=dev)), wq.t(), ws.t()),  # dgrad: K = out
             (*quantize_act(torch.randn(272, 200, device=dev)), *quantize_act(x.t())),  # wgrad: 1x128 x 1x128
             (xq[:1], xs[:1], wq, ws)]  # a single token
    for a, sa, b, sb in cases:
        emu = fp8_matmul(a, sa, b, sb, backend="emulate")
        got = fp8_matmul(a, sa, b, sb, backend="scaled_mm")
        # fp32 output may be refused (then bf16 is used); refusing bf16 too means we silently emulated
        assert not any(mm == torch.bfloat16 for _, mm in fp8_numerics._SCALED_MM_BROKEN), \
            "torch._scaled_mm rejected block-wise scales on this GPU/torch"
        # same FP8 products and scales: only the tensor cores' fp32 accumulation order differs, unless cuBLAS
        # refused fp32 output and bf16 (8 mantissa bits) was used instead
        bf16_out = any(mm == torch.float32 for _, mm in fp8_numerics._SCALED_MM_BROKEN)
        assert rel_err(got, emu) < (1e-2 if bf16_out else 1e-5)
    lin = nn.Linear(384, 272, bias=False, device=dev)
    xin = torch.randn(4, 50, 384, device=dev, dtype=torch.bfloat16, requires_grad=True)
    outs = []
    for backend in ("emulate", "scaled_mm"):
        xin.grad, lin.weight.grad = None, None
        y = FP8Linear.from_linear(lin, FP8Recipe(backend=backend))(xin)
        y.float().square().sum().backward()
        outs.append((y.detach(), xin.grad.clone(), lin.weight.grad.clone()))
    for got, want in zip(outs[1], outs[0]):
        assert rel_err(got, want) < 2e-2


# ---------------------------------------------------------------------------------------------- exactness
def test_fp8_linear_gemms_equal_per_k_tile_reference():
    """Fprop Y = X W^T: X per token along in, W in 128x128 blocks. Dgrad dX = dY W: dY per token along out (its K),
    W's blocks. Wgrad dW = dY^T X: K is the token dim, so dY^T and X^T in 1 x 128 tiles along tokens."""
    torch.manual_seed(20)
    lin = nn.Linear(200, 192, bias=True)  # ragged K (200) and a ragged 128-row block (192)
    x = (torch.randn(150, 200) * torch.rand(150, 1) * 4).requires_grad_()  # 150 tokens: two token tiles
    g = torch.randn(150, 192) * torch.rand(1, 192) * 3
    f = FP8Linear.from_linear(lin, EMULATE)
    y = f(x)
    y.backward(g)
    w = lin.weight.detach()
    assert_exact(y.detach(), nt_ref(along_k(x.detach()), blocks(w)) + lin.bias.detach().double(), "forward")
    assert_exact(x.grad, nt_ref(along_k(g), blocks(w).t()), "input grad")
    assert_exact(lin.weight.grad, nt_ref(along_k(g.t()), along_k(x.detach().t())), "weight grad")


def test_fp8_grouped_mm_gemms_equal_per_k_tile_reference():
    """The same three GEMMs per expert; dW[e]'s token tiles hold expert e's rows only."""
    torch.manual_seed(21)
    counts = [5, 0, 140, 3]  # an empty expert and one with two token tiles
    offsets = torch.tensor(counts).cumsum(0)
    x = (torch.randn(sum(counts), 192) * torch.rand(sum(counts), 1) * 4).requires_grad_()
    w = (torch.randn(4, 80, 192) * 0.05).requires_grad_()
    g = torch.randn(sum(counts), 80) * torch.rand(1, 80) * 3
    y = fp8_grouped_mm(x, w, offsets, EMULATE)
    y.backward(g)
    bounds = [0] + offsets.tolist()
    for e in range(4):
        r = slice(bounds[e], bounds[e + 1])
        xe, ge, we = x.detach()[r], g[r], w.detach()[e]
        if counts[e] == 0:
            assert torch.equal(w.grad[e], torch.zeros_like(we))
            continue
        assert_exact(y.detach()[r], nt_ref(along_k(xe), blocks(we)), f"expert {e} forward")
        assert_exact(x.grad[r], nt_ref(along_k(ge), blocks(we).t()), f"expert {e} input grad")
        assert_exact(w.grad[e], nt_ref(along_k(ge.t()), along_k(xe.t())), f"expert {e} weight grad")


def test_tensor_granularity_gemms_equal_one_scale_reference():
    """granularity="tensor": one scale per operand, for all three GEMMs of FP8Linear."""
    torch.manual_seed(22)
    lin = nn.Linear(200, 96, bias=False)
    x = torch.randn(40, 200, requires_grad=True)
    g = torch.randn(40, 96)
    f = FP8Linear.from_linear(lin, FP8Recipe("tensor", backend="emulate"))
    y = f(x)
    y.backward(g)

    def whole(t):  # one tile covering the tensor
        return qdq(t, t.shape[0], t.shape[1])

    w = lin.weight.detach()
    assert_exact(y.detach(), nt_ref(whole(x.detach()), whole(w)), "forward")
    assert_exact(x.grad, nt_ref(whole(g), whole(w).t()), "input grad")
    assert_exact(lin.weight.grad, nt_ref(whole(g.t()), whole(x.detach().t())), "weight grad")

"""DeepSeekMoE parts against naive references: the router against a per-token loop written straight from the
papers' equations, grouped experts against a per-expert loop (both the grouped-mm and the fallback path)."""

import math

import pytest
import torch

import nanoseek.model.moe as moe
from nanoseek import ModelConfig
from nanoseek.model.moe import GroupedExperts, MoE, Router, select_experts


def naive_route(s, b, cfg):
    """One token at a time, as V3 section 2.1.2 / V2 section 2.2 state it."""
    E, k = len(s), cfg.num_experts_per_tok
    choice = [s[i] + (b[i] if b is not None else 0.0) for i in range(E)]
    allowed = set(range(E))
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        size = E // cfg.n_group
        group_score = []
        for g in range(cfg.n_group):
            members = sorted(choice[g * size:(g + 1) * size], reverse=True)
            group_score.append(sum(members[:2]) if cfg.topk_method == "noaux_tc" else members[0])
        kept = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
        allowed = {i for g in kept for i in range(g * size, (g + 1) * size)}
    chosen = sorted(allowed, key=lambda i: -choice[i])[:k]
    w = [s[i] for i in chosen]
    if cfg.norm_topk_prob and k > 1:
        w = [x / sum(w) for x in w]
    return {i: x * cfg.routed_scaling_factor for i, x in zip(chosen, w)}


def cfg_for(kind, **kw):
    base = ModelConfig.from_preset("tiny")
    if kind == "v2":
        base = base.replace(model_type="deepseek_v2", topk_method="group_limited_greedy", scoring_func="softmax",
                            norm_topk_prob=False, routed_scaling_factor=16.0)
    return base.replace(**kw)


@pytest.mark.parametrize("kind,kw", [
    ("v3", {}), ("v3", dict(n_group=1, topk_group=1)), ("v3", dict(n_group=8, topk_group=3, num_experts_per_tok=5)),
    ("v2", {}), ("v2", dict(topk_method="greedy", n_group=1, topk_group=1)), ("v2", dict(norm_topk_prob=True)),
])
def test_router_matches_naive_per_token(kind, kw):
    cfg = cfg_for(kind, **kw)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, cfg.n_routed_experts, generator=g)
    s = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
    # Negative biases: masking groups with 0.0 instead of -inf would let masked experts win here.
    bias = -0.5 - torch.rand(cfg.n_routed_experts, generator=g) if cfg.topk_method == "noaux_tc" else None
    w, idx = select_experts(s, bias, cfg)
    for t in range(s.shape[0]):
        want = naive_route(s[t].tolist(), None if bias is None else bias.tolist(), cfg)
        got = dict(zip(idx[t].tolist(), w[t].tolist()))
        assert set(got) == set(want)
        for i in want:
            assert math.isclose(got[i], want[i], rel_tol=1e-5)


def test_bias_steers_selection_but_not_weights():
    cfg = cfg_for("v3", n_group=1, topk_group=1, num_experts_per_tok=1, norm_topk_prob=False, routed_scaling_factor=1.0)
    s = torch.full((1, cfg.n_routed_experts), 0.5)
    s[0, 3] = 0.9
    bias = torch.zeros(cfg.n_routed_experts)
    bias[7] = 1.0  # expert 7 is chosen because of b, but its weight is its own s (0.5), not s + b
    w, idx = select_experts(s, bias, cfg)
    assert idx.item() == 7 and w.item() == pytest.approx(0.5)


def test_router_exposes_counts_and_scores():
    cfg = cfg_for("v3")
    r = Router(cfg)
    torch.nn.init.normal_(r.weight)
    x = torch.randn(50, cfg.hidden_size)
    out = r(x)
    assert out.scores.shape == (50, cfg.n_routed_experts) and out.scores.dtype == torch.float32
    assert torch.equal(out.counts, torch.bincount(out.indices.flatten(), minlength=cfg.n_routed_experts))
    assert int(out.counts.sum()) == 50 * cfg.num_experts_per_tok
    assert out.weights.sum(-1).allclose(torch.full((50,), cfg.routed_scaling_factor))


def test_router_stays_fp32_when_model_is_cast():
    r = Router(cfg_for("v3")).to(torch.bfloat16)
    assert r.weight.dtype == torch.float32 and r.e_score_correction_bias.dtype == torch.float32


def loop_experts(ex, x, idx, w):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            h = torch.nn.functional.silu(x[t] @ ex.gate_proj[e].T) * (x[t] @ ex.up_proj[e].T)
            out[t] += w[t, j] * (h @ ex.down_proj[e].T)
    return out


@pytest.mark.parametrize("path", ["grouped_mm", "padded_bmm"])
def test_grouped_experts_match_loop_forward_and_backward(path, monkeypatch):
    if path == "padded_bmm":
        monkeypatch.setattr(moe, "_grouped_mm_supported", lambda x: False)
    elif not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm; the fallback is tested by the other case")
    cfg = cfg_for("v3")
    torch.manual_seed(0)
    ex = GroupedExperts(cfg)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(37, cfg.hidden_size, requires_grad=True)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts)[: cfg.num_experts_per_tok] for _ in range(37)])
    idx[:, 0] = 2  # a crowded expert; several others get nothing
    w = torch.rand(37, cfg.num_experts_per_tok, requires_grad=True)
    got = moe.route_to_experts(ex, x, idx, w)  # permute, experts(rows sorted by expert, counts), unpermute
    want = loop_experts(ex, x, idx, w)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(got)
    wrt = [x, w, ex.gate_proj, ex.up_proj, ex.down_proj]
    for name, a, b in zip(["x", "weights", "gate_proj", "up_proj", "down_proj"], torch.autograd.grad(got, wrt, g),
                          torch.autograd.grad(want, wrt, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


def test_moe_adds_shared_experts_and_keeps_routing():
    cfg = cfg_for("v3")
    torch.manual_seed(0)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    layer.gate.e_score_correction_bias.uniform_(-0.3, 0.3)  # a trained router's bias steers the choice
    x = torch.randn(2, 5, cfg.hidden_size)
    y = layer(x)
    r = layer.last_routing
    flat = x.reshape(-1, cfg.hidden_size)
    s = torch.sigmoid(flat @ layer.gate.weight.T)
    torch.testing.assert_close(r.scores, s)
    bias = layer.gate.e_score_correction_bias.tolist()
    for t in range(10):
        want_route = naive_route(s[t].tolist(), bias, cfg)
        got_route = dict(zip(r.indices[t].tolist(), r.weights[t].tolist()))
        assert got_route.keys() == want_route.keys()
        assert all(got_route[e] == pytest.approx(want_route[e], rel=1e-5) for e in want_route)
    assert any(set(naive_route(s[t].tolist(), None, cfg)) != set(r.indices[t].tolist()) for t in range(10))
    want = loop_experts(layer.experts, flat, r.indices, r.weights) + layer.shared_experts(flat)
    assert torch.allclose(y.reshape(-1, cfg.hidden_size), want, atol=1e-5)
    assert r.indices.shape == (10, cfg.num_experts_per_tok)

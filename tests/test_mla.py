"""MLA: the absorbed form (DeepSeek-V2 section 2.1.2) equals the expanded one; RoPE and YaRN against their formulas."""

import math

import pytest
import torch

from nanoseek import ModelConfig
from nanoseek.model.mla import MLA, causal_mask
from nanoseek.model.rope import RotaryEmbedding, apply_rope


def make(**kw):
    cfg = ModelConfig.from_preset("tiny").replace(**kw)
    torch.manual_seed(0)
    attn = MLA(cfg)
    for name, p in attn.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if "norm" in name else 0.0, std=0.1)
    return cfg, attn


@pytest.mark.parametrize("q_lora_rank", [64, None])
def test_absorbed_equals_expanded(q_lora_rank):
    cfg, attn = make(q_lora_rank=q_lora_rank)
    x = torch.randn(2, 20, cfg.hidden_size)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(20))
    with torch.no_grad():
        expanded = attn(x, cos, sin)
        absorbed = attn(x, cos, sin, absorb=True)
    assert (expanded - absorbed).abs().max() < 1e-5 * expanded.abs().max()


def test_absorbed_decode_over_a_latent_cache_equals_full_attention():
    """Feed tokens one at a time through a list-backed cache: each output equals the full causal pass."""
    cfg, attn = make()

    class ListCache:
        def __init__(self):
            self.c, self.k = [], []

        def update(self, c_kv, k_rope):
            self.c.append(c_kv)
            self.k.append(k_rope)
            return torch.cat(self.c, 1), torch.cat(self.k, 1)

    x = torch.randn(1, 12, cfg.hidden_size)
    rope = RotaryEmbedding(cfg)
    with torch.no_grad():
        full = attn(x, *rope(torch.arange(12)))
        cache = ListCache()
        prefill = attn(x[:, :5], *rope(torch.arange(5)), kv_cache=cache)
        steps = [attn(x[:, t:t + 1], *rope(torch.arange(t, t + 1)), kv_cache=cache, absorb=True) for t in range(5, 12)]
    got = torch.cat([prefill] + steps, 1)
    assert (got - full).abs().max() < 1e-5 * full.abs().max()
    assert all(c.shape[-1] == cfg.kv_lora_rank for c in cache.c)  # only the latent is ever cached


def test_causal_mask_aligns_queries_to_the_end():
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]


def test_rope_rotates_interleaved_pairs():
    cfg = ModelConfig.from_preset("tiny")
    rope = RotaryEmbedding(cfg)
    pos = 7
    x = torch.randn(cfg.qk_rope_head_dim)
    cos, sin = rope(torch.tensor([pos]))
    got = apply_rope(x[None], cos, sin, interleave=True)[0]
    # complex-number form: (x_{2i} + i x_{2i+1}) * e^{i pos theta_i}, theta_i = base^(-2i/d)
    d = cfg.qk_rope_head_dim
    theta = torch.tensor([cfg.rope_theta ** (-2 * i / d) for i in range(d // 2)])
    z = torch.complex(x[0::2], x[1::2]) * torch.polar(torch.ones(d // 2), pos * theta)
    want = torch.view_as_real(z).flatten()
    assert torch.allclose(got, want, atol=1e-5)
    # relative position property: <R(m) q, R(n) k> depends only on m - n
    q, k = torch.randn(d), torch.randn(d)
    def dot(m, n):
        cm, sm = rope(torch.tensor([m]))
        cn, sn = rope(torch.tensor([n]))
        return float(apply_rope(q[None], cm, sm)[0] @ apply_rope(k[None], cn, sn)[0])
    assert dot(10, 3) == pytest.approx(dot(27, 20), rel=1e-4)


def test_yarn_frequencies_and_softmax_scale_follow_the_formulas():
    yarn = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    cfg = ModelConfig.from_preset("v3")
    assert cfg.rope_scaling == yarn
    inv = RotaryEmbedding(cfg).inv_freq
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    plain = base ** (-torch.arange(0, d, 2).double() / d)
    wavelength = 2 * math.pi / plain
    for i in range(d // 2):
        if wavelength[i] < 4096 / 32:  # rotates more than beta_fast times in the original context: untouched
            assert inv[i] == pytest.approx(float(plain[i]), rel=1e-6)
        elif wavelength[i] > 4096 / 1:  # less than once: fully interpolated
            assert inv[i] == pytest.approx(float(plain[i]) / 40, rel=1e-6)
        else:
            assert float(plain[i]) / 40 * (1 - 1e-6) <= inv[i] <= float(plain[i]) * (1 + 1e-6)
    mscale = 0.1 * 1.0 * math.log(40) + 1
    assert mscale == pytest.approx(1.3689, abs=1e-4)  # V3 (YaRN factor 40): softmax scale x mscale^2 = x 1.874
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * mscale ** 2)

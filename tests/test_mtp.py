"""Multi-token prediction (V3 section 2.2): alignment, causality, the combination formula, and zero cost when
not asked for."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer


def model_with(depth=2, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny").replace(num_nextn_predict_layers=depth)).eval()


def test_depth2_chains_on_depth1_hidden_state():
    """Depth 2 at position i combines depth 1's hidden state h^1_i (before its shared_head norm) with
    Emb(t_{i+2}), over positions 0..t-3, and predicts t_{i+3}."""
    m = model_with(depth=2)
    with torch.no_grad():  # norm weights away from 1, so a norm applied twice would show
        for p in m.mtp.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    x = torch.randint(0, m.config.vocab_size, (3, 10))
    with torch.no_grad():
        logits, mtp = m(x, return_mtp=True)
        h = m.hidden_states(x)
        for k, mod in enumerate(m.mtp, start=1):
            emb = m.embed_tokens.weight[x[:, k:]]
            joined = torch.cat([mod.enorm(emb), mod.hnorm(h[:, :-1])], dim=-1)
            cos, sin = m.rope(torch.arange(10 - k))
            h = mod.block(joined @ mod.eh_proj.weight.T, cos, sin)
            torch.testing.assert_close(mtp[k - 1], m.lm_head(mod.shared_head.norm(h)), atol=1e-5, rtol=1e-5)
    assert logits.shape == (3, 10, m.config.vocab_size) and [t.shape[1] for t in mtp] == [9, 8]


def test_depth1_formula_and_alignment():
    """mtp[0][:, i] = head(shared_head.norm(block(eh_proj([enorm(Emb(t_{i+1})) ; hnorm(h_i)])))), over positions 0..i."""
    m = model_with(depth=1)
    x = torch.randint(0, m.config.vocab_size, (2, 9))
    with torch.no_grad():
        h0 = m.hidden_states(x)
        _, (mtp,) = m(x, return_mtp=True)
        mod = m.mtp[0]
        emb = m.embed_tokens.weight[x[:, 1:]]
        joined = torch.cat([mod.enorm(emb), mod.hnorm(h0[:, :-1])], dim=-1)
        h1 = joined @ mod.eh_proj.weight.T
        cos, sin = m.rope(torch.arange(8))
        want = m.lm_head(mod.shared_head.norm(mod.block(h1, cos, sin)))
    assert torch.allclose(mtp, want, atol=1e-5)


def test_causal_prefix_consistency_and_dependence_on_next_token():
    m = model_with(depth=2)
    x = torch.randint(0, m.config.vocab_size, (1, 12))
    with torch.no_grad():
        _, full = m(x, return_mtp=True)
        for i in (0, 4, 8):  # depth-1 position i sees tokens up to i+1 only
            _, part = m(x[:, : i + 2], return_mtp=True)
            assert torch.allclose(part[0][:, -1], full[0][:, i], atol=1e-5)
        y = x.clone()
        y[0, 6] = (y[0, 6] + 1) % m.config.vocab_size
        main_x, mtp_x = m(x, return_mtp=True)
        main_y, mtp_y = m(y, return_mtp=True)
    assert torch.allclose(main_x[:, 5], main_y[:, 5], atol=1e-5)  # main head at 5 cannot see t_6
    assert not torch.allclose(mtp_x[0][:, 5], mtp_y[0][:, 5], atol=1e-3)  # MTP depth 1 at 5 embeds t_6
    assert torch.allclose(mtp_x[0][:, 4], mtp_y[0][:, 4], atol=1e-5)


def test_mtp_costs_nothing_unless_asked_and_trains_when_asked():
    m = model_with(depth=1).train()
    calls = []
    m.mtp[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randint(0, m.config.vocab_size, (2, 8))
    m(x)
    assert calls == []
    _, mtp = m(x, return_mtp=True)
    assert calls == [1]
    F.cross_entropy(mtp[0][:, :-1].flatten(0, 1), x[:, 2:].flatten()).backward()
    assert m.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert m.embed_tokens.weight.grad.abs().sum() > 0  # the embedding is shared with the main model


def test_forward_names_an_unknown_token_id():
    m = model_with(depth=1)
    with pytest.raises(ValueError, match=r"token id 4096 is outside the model's vocabulary \[0, 4096\)"):
        m(torch.tensor([[1, 4096]]))
    with pytest.raises(ValueError, match="token id -1"):
        m(torch.tensor([[-1, 2]]))

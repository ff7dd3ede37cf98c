"""GRPO objective math checked against numbers worked out by hand (see the comments)."""

import math

import pytest
import torch

from nanoseek.train.grpo_loss import drop_equal_reward_groups, group_advantages, kl_k3, policy_loss


def close(a, b, tol=1e-5):
    a, b = (x.detach() if isinstance(x, torch.Tensor) else x for x in (a, b))
    return abs(float(a) - float(b)) < tol


# ---------------------------------------------------------------------------------------------- advantages

def test_group_advantages_std_and_none():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 2.0, 1.0]])
    # group 0: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735 -> A = +-0.5 / 0.57735 = +-0.866025
    # group 1: mean 1.0, unbiased var = (1 + 0 + 1 + 0) / 3 = 2/3, std = 0.816497 -> A = [-1.224745, 0, 1.224745, 0]
    a = group_advantages(r)
    expected = torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025], [-1.224745, 0.0, 1.224745, 0.0]])
    assert torch.allclose(a, expected, atol=1e-5)
    # Dr. GRPO: mean-centring only
    assert torch.allclose(group_advantages(r, scale="none"), torch.tensor([[0.5, -0.5, -0.5, 0.5], [-1.0, 0.0, 1.0, 0.0]]))


def test_zero_std_group_gives_zero_advantage():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.1, 1.1, 0.1]])
    a = group_advantages(r)
    assert torch.equal(a[:2], torch.zeros(2, 3))  # exactly zero, not nan
    assert a[2, 1] > 0 > a[2, 0]


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2, 2), scale="max")


def test_drop_equal_reward_groups():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.1, 0.1, 1.1]])
    assert drop_equal_reward_groups(r).tolist() == [False, True, False, True]
    assert drop_equal_reward_groups(torch.tensor([[0.0, 1e-9]]), atol=1e-6).tolist() == [False]


# ---------------------------------------------------------------------------------------------- KL

def test_kl_k3_values():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.3]))
    ref = torch.log(torch.tensor([0.25, 1.0, 0.3]))
    # d = ref - logp: log(0.5) -> 0.5 + 0.693147 - 1 = 0.193147; log(2) -> 2 - 0.693147 - 1 = 0.306853; 0 -> 0
    assert torch.allclose(kl_k3(logp, ref), torch.tensor([0.193147, 0.306853, 0.0]), atol=1e-5)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


# ---------------------------------------------------------------------------------------------- clipping

def _single_token_batch(rhos, advs):
    logp = torch.log(torch.tensor(rhos))[:, None].clone().requires_grad_(True)
    old = torch.zeros_like(logp)
    return logp, old, torch.tensor(advs), torch.ones_like(logp)


def test_clipping_both_sides_both_signs():
    # rho 1.5, A +1: min(1.5, 1.2) = 1.2   clipped high, no gradient
    # rho 1.5, A -1: min(-1.5, -1.2) = -1.5 not clipped (a bad action became likelier: always corrected)
    # rho 0.5, A +1: min(0.5, 0.8) = 0.5    not clipped
    # rho 0.5, A -1: min(-0.5, -0.8) = -0.8 clipped low, no gradient
    # J = (1.2 - 1.5 + 0.5 - 0.8) / 4 = -0.15, loss = 0.15
    logp, old, adv, mask = _single_token_batch([1.5, 1.5, 0.5, 0.5], [1.0, -1.0, 1.0, -1.0])
    loss, stats = policy_loss(logp, old, adv, mask)
    assert close(loss, 0.15)
    assert close(stats["clip_frac"], 0.5) and close(stats["clip_high_frac"], 0.25) and close(stats["clip_low_frac"], 0.25)
    assert close(stats["ratio_mean"], 1.0)
    loss.backward()
    # d loss / d logp_i = -(1/4) A_i rho_i where unclipped: [0, 0.375, -0.125, 0]
    assert torch.allclose(logp.grad[:, 0], torch.tensor([0.0, 0.375, -0.125, 0.0]), atol=1e-6)


def test_clip_higher_dapo():
    # rho 1.25 with A +1: clipped at 1.2 with eps_high 0.2 (J=1.2, no grad); free with eps_high 0.28 (J=1.25)
    logp, old, adv, mask = _single_token_batch([1.25], [1.0])
    loss, stats = policy_loss(logp, old, adv, mask)
    assert close(loss, -1.2) and close(stats["clip_frac"], 1.0)
    loss, stats = policy_loss(logp, old, adv, mask, eps_high=0.28)
    assert close(loss, -1.25) and close(stats["clip_frac"], 0.0)
    # the low side keeps eps_low: rho 0.75 with A -1 is clipped to 0.8 -> J = -0.8
    logp, old, adv, mask = _single_token_batch([0.75], [-1.0])
    loss, _ = policy_loss(logp, old, adv, mask, eps_high=0.28)
    assert close(loss, 0.8)


# ---------------------------------------------------------------------------------------------- aggregation

def _two_sequences():
    # rho = 1 everywhere, so the per-token loss is -A_i: seq 0 has A=3 on 2 tokens, seq 1 has A=-1 on 4 tokens.
    logp = torch.full((2, 4), -1.0, requires_grad=True)
    old = torch.full((2, 4), -1.0)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    return logp, old, torch.tensor([3.0, -1.0]), mask


@pytest.mark.parametrize("aggregation, kwargs, expected, grad00", [
    # grpo: per-sequence means (-3, +1), then mean over sequences -> -1; d/dlogp_00 = -3 / (2 seqs * 2 tokens)
    ("grpo", {}, -1.0, -0.75),
    # dr_grpo: token sum (-6 + 4 = -2) / (B * T = 8) = -0.25; d/dlogp_00 = -3 / 8
    ("dr_grpo", {}, -0.25, -0.375),
    # dr_grpo with the generation budget as the constant: -2 / (2 * 16) = -0.0625
    ("dr_grpo", {"max_len": 16}, -0.0625, -3 / 32),
    # dapo: token sum / number of tokens = -2 / 6; d/dlogp_00 = -3 / 6
    ("dapo", {}, -1 / 3, -0.5),
])
def test_aggregation_normalisers(aggregation, kwargs, expected, grad00):
    logp, old, adv, mask = _two_sequences()
    loss, _ = policy_loss(logp, old, adv, mask, aggregation=aggregation, **kwargs)
    assert close(loss, expected)
    loss.backward()
    assert close(logp.grad[0, 0], grad00)
    assert logp.grad[0, 2] == 0 and logp.grad[0, 3] == 0  # padding gets no gradient


def test_masked_tokens_contribute_nothing_even_if_nonfinite():
    logp, old, adv, mask = _two_sequences()
    clean, _ = policy_loss(logp, old, adv, mask, aggregation="dapo")
    dirty_logp = logp.detach().clone()
    dirty_logp[0, 2], dirty_logp[0, 3] = float("-inf"), float("nan")
    dirty_logp.requires_grad_(True)
    dirty_old = old.clone()
    dirty_old[0, 2:] = 50.0
    ref = torch.full((2, 4), -1.0)
    ref[0, 3] = float("nan")
    for agg in ("grpo", "dr_grpo", "dapo"):
        for ratio in ("token", "sequence"):
            kw = dict(aggregation=agg, ratio=ratio, beta=0.1)
            loss, stats = policy_loss(dirty_logp, dirty_old, adv, mask, ref_logp=ref, **kw)
            ref_loss, _ = policy_loss(logp, old, adv, mask, ref_logp=torch.full((2, 4), -1.0), **kw)
            assert close(loss, ref_loss)
            dirty_logp.grad = None
            loss.backward()
            assert torch.isfinite(dirty_logp.grad).all()
            assert dirty_logp.grad[0, 2:].abs().sum() == 0
            assert torch.isfinite(stats["kl"]) and torch.isfinite(stats["ratio_mean"])
    assert close(clean, -1 / 3)


def test_zero_advantage_gives_zero_gradient():
    # a zero-std group: all advantages 0 -> no policy gradient at all (beta 0), whatever the ratios
    adv = group_advantages(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))[0]
    logp = torch.randn(4, 5, requires_grad=True)
    loss, _ = policy_loss(logp, torch.randn(4, 5), adv, torch.ones(4, 5))
    loss.backward()
    assert loss.item() == 0 and logp.grad.abs().sum() == 0


# ---------------------------------------------------------------------------------------------- GSPO

def test_gspo_sequence_ratio():
    # log rho = [0.2, -0.4] (third token padding): s = exp(mean) = exp(-0.1) = 0.904837, inside [0.8, 1.2]
    # J = s * A = 0.904837 with A = 1, loss -0.904837; d loss / d logp_t = -s / |o| = -0.452419 per token
    logp = torch.tensor([[0.2, -0.4, 5.0]], requires_grad=True)
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), mask, ratio="sequence")
    assert close(loss, -math.exp(-0.1))
    assert close(stats["ratio_mean"], math.exp(-0.1)) and close(stats["clip_frac"], 0.0)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.452419, -0.452419, 0.0]]), atol=1e-5)
    # token-level on the same numbers differs: (min(e^0.2=1.2214, 1.2) + e^-0.4) / 2 = (1.2 + 0.670320) / 2
    loss_tok, _ = policy_loss(logp, old, torch.tensor([1.0]), mask, ratio="token")
    assert close(loss_tok, -(1.2 + math.exp(-0.4)) / 2)


def test_gspo_clips_whole_sequence():
    # log rho = [0.5, 0.5]: s = e^0.5 = 1.6487 > 1.2, A = +1 -> J = 1.2, no gradient, the sequence counts as clipped
    logp = torch.tensor([[0.5, 0.5]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), ratio="sequence")
    assert close(loss, -1.2) and close(stats["clip_frac"], 1.0)
    loss.backward()
    assert logp.grad.abs().sum() == 0


# ---------------------------------------------------------------------------------------------- KL penalty

def test_kl_penalty_in_loss():
    # rho = 1 and A = 0, so J = -beta * KL; ref = logp + log(0.5) on every token: KL = 0.193147 per token
    logp = torch.full((2, 3), -2.0, requires_grad=True)
    ref = torch.full((2, 3), -2.0 + math.log(0.5))
    loss, stats = policy_loss(logp, logp.detach(), torch.zeros(2), torch.ones(2, 3), beta=0.1, ref_logp=ref)
    assert close(loss, 0.1 * 0.193147) and close(stats["kl"], 0.193147)
    loss.backward()
    # d(exp(d) - d - 1)/dlogp = 1 - exp(d) = 0.5 with d = ref - logp; the grpo normaliser is |o| * B = 3 * 2,
    # so d loss / d logp_t = beta * 0.5 / 6 = 0.008333
    assert torch.allclose(logp.grad, torch.full((2, 3), 0.1 * 0.5 / 6), atol=1e-6)


def test_bad_arguments_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3), beta=0.04)
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3), aggregation="mean")
    with pytest.raises(ValueError, match="ratio"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3), ratio="seq")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.zeros(3), torch.ones(2, 3))

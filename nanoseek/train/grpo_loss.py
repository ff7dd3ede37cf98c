"""The GRPO objective as pure tensor functions (DeepSeekMath section 4.1; DeepSeek-R1 section 2.2.1).

For each prompt, sample a group of G completions o_1..o_G from the old policy and score them with rewards
r_1..r_G. Group Relative Policy Optimisation needs no value network: the baseline is the group itself,

    A_i = (r_i - mean(r)) / std(r)                                  (every token of o_i gets A_i)

and the policy maximises the clipped surrogate minus a KL penalty to a frozen reference policy,

    J = mean_i  mean_t  [ min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta KL_it ]
    rho_it = pi(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)
    KL_it  = pi_ref/pi - log(pi_ref/pi) - 1                         (the k3 estimator: unbiased, >= 0)

Later work changes a few pieces, all selectable here (docs/grpo.md):

- Dr. GRPO: no division by std ("scale='none'"), and no per-sequence 1/|o_i| ("aggregation='dr_grpo'": the
  token sum is divided by a constant B * max_len), which removes the bias towards long wrong answers.
- DAPO: clip-higher (eps_high 0.28 > eps_low 0.2) against entropy collapse; token-level averaging over the
  whole batch ("aggregation='dapo'"); dynamic sampling drops groups whose rewards are all equal
  (`drop_equal_reward_groups`); the soft overlong penalty lives in nanoseek.tasks.rewards.
- GSPO: one ratio per sequence, s_i = exp(mean_t log rho_it), clipped per sequence ("ratio='sequence'"). GSPO
  uses much smaller clip ranges than token-level GRPO (the paper uses 3e-4 / 4e-4); pass them explicitly.

Functions here take log-probabilities of the sampled tokens ([B, T]) and return a loss to MINIMISE (-J).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("grpo", "dr_grpo", "dapo")
RATIOS = ("token", "sequence")


def group_advantages(rewards: torch.Tensor, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages A = (r - mean_group(r)) / (std_group(r) + eps), shape [n_groups, G].

    scale="std" is GRPO's outcome supervision (std is the unbiased sample std, as torch.std, TRL and OpenRLHF
    compute it); scale="none" is Dr. GRPO's mean-centring only. A group whose rewards are all equal gets
    advantage exactly 0: it carries no signal about which completion is better.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [n_groups, G], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"a group needs at least 2 completions to compare, got G={rewards.shape[1]}")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred
    if scale == "std":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")


def drop_equal_reward_groups(rewards: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """DAPO dynamic sampling: bool mask [n_groups] of the groups to KEEP (rewards not all equal).

    All-equal groups (all right or all wrong) have zero advantage, so they only dilute the batch; DAPO drops
    them and samples more prompts until the batch is full.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [n_groups, G], got shape {tuple(rewards.shape)}")
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    return spread > atol


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref_logp - logp (Schulman's k3).

    Non-negative for every d, zero iff pi = pi_ref at that token, and unbiased under samples from pi.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def _masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    x = torch.where(mask, x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim=dim)


def _check_inputs(logp, old_logp, advantages, mask, eps_low, eps_high, beta, ref_logp, aggregation, ratio) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if ratio not in RATIOS:
        raise ValueError(f"ratio must be one of {RATIOS}, got {ratio!r}")
    if logp.ndim != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp and mask must share shape [B, T]; got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B]={logp.shape[0]}, got {tuple(advantages.shape)}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (log-probabilities under the reference policy)")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must be [B, T]={tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ranges must be non-negative, got eps_low={eps_low}, eps_high={eps_high}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, max_len: int | None = None):
    """Reduce per-token losses [B, T] over the batch (m = mask, |o_i| = sum_t m_it):
        "grpo":    (1/B) sum_i (1/|o_i|) sum_t m_it l_it      (mean over tokens, then over sequences)
        "dr_grpo": sum_it m_it l_it / (B * max_len)            (constant normaliser; max_len defaults to T)
        "dapo":    sum_it m_it l_it / sum_it m_it              (token-level mean over the whole batch)"""
    B, T = per_token.shape
    if aggregation == "grpo":
        return (_masked_sum(per_token, mask, dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if aggregation == "dr_grpo":
        return _masked_sum(per_token, mask) / (B * (T if max_len is None else max_len))
    return _masked_sum(per_token, mask) / mask.sum().clamp(min=1)


@torch.no_grad()
def _clip_stats(rho, adv, mask, eps_low: float, eps_high: float, ratio: str) -> dict[str, torch.Tensor]:
    """Share of tokens (sequences for GSPO) on the clipped branch, high and low, and the mean ratio."""
    high = (rho > 1.0 + eps_high) & (adv > 0)
    low = (rho < 1.0 - eps_low) & (adv < 0)
    if ratio == "token":
        total = mask.sum().clamp(min=1)
        frac = lambda x: _masked_sum(x.float(), mask) / total  # noqa: E731
        ratio_mean = frac(rho)
    else:
        frac = lambda x: x[:, 0].float().mean()  # noqa: E731
        ratio_mean = rho[:, 0].mean()
    return {"clip_frac": frac(high | low), "clip_high_frac": frac(high), "clip_low_frac": frac(low),
            "ratio_mean": ratio_mean}


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    aggregation: str = "grpo",
    ratio: str = "token",
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO surrogate, returned as a loss to minimise: (-J, stats).

    Shapes: logp, old_logp, ref_logp, mask [B, T] (log-probabilities of the sampled tokens, mask 1 on
    completion tokens and 0 on prompt/padding); advantages [B]. old_logp and ref_logp are treated as constants.
    Masked positions contribute nothing, even if their log-probabilities are inf or nan.

    Per token l_it = -(min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta KL_it), with
    rho_it = exp(logp_it - old_logp_it) for ratio="token" (GRPO, DAPO), or for ratio="sequence" s_i =
    exp(sum_t m_it (logp_it - old_logp_it) / |o_i|) on every token of o_i (GSPO; under aggregation="grpo"
    exactly GSPO's per-sequence objective and gradient); l_it is reduced over the batch by `aggregate`.

    Stats (detached 0-dim tensors): loss, clip_frac (share of tokens, or sequences for GSPO, on the clipped
    branch: rho > 1 + eps_high with A > 0 or rho < 1 - eps_low with A < 0), clip_high_frac, clip_low_frac,
    ratio_mean, kl (mean k3 over tokens, 0 if beta is 0 and no ref_logp is given).
    """
    _check_inputs(logp, old_logp, advantages, mask, eps_low, eps_high, beta, ref_logp, aggregation, ratio)
    B, T = logp.shape
    mask = mask.bool()
    zeros = torch.zeros_like(logp)
    # Zero the log-ratio on masked positions first, so padding (even -inf there) cannot leak nan into the grad.
    log_ratio = torch.where(mask, logp - old_logp.detach(), zeros)
    n_tok = mask.sum(dim=1)  # |o_i|
    adv = advantages.detach().to(logp.dtype)[:, None]  # [B, 1]

    if ratio == "token":
        rho = torch.exp(log_ratio)  # [B, T]
    else:
        seq_log_ratio = log_ratio.sum(dim=1) / n_tok.clamp(min=1)  # mean_t log rho_it, [B]
        rho = torch.exp(seq_log_ratio)[:, None].expand(B, T)
    clipped = rho.clamp(1.0 - eps_low, 1.0 + eps_high)
    objective = torch.minimum(rho * adv, clipped * adv)

    kl = zeros
    if ref_logp is not None:
        # Select before subtracting (as for log_ratio): masked positions give d = 0, hence KL = 0 and no nan.
        kl = kl_k3(torch.where(mask, logp, zeros), torch.where(mask, ref_logp.detach(), zeros))
        objective = objective - beta * kl

    loss = aggregate(-objective, mask, aggregation, max_len)
    stats = {"loss": loss.detach(), **_clip_stats(rho, adv, mask, eps_low, eps_high, ratio),
             "kl": (_masked_sum(kl, mask) / mask.sum().clamp(min=1)).detach()}
    return loss, stats

"""Token-level distillation losses, as pure functions (the loops are nanoseek.train.distill and .sft).

Convention (TRL's GKDTrainer, after GKD, Agarwal et al. 2023, arXiv 2306.13649, section 3): the generalized
Jensen-Shannon divergence with interpolation beta in [0, 1], per position, over the whole vocabulary:

    M       = (1 - beta) * p_S + beta * p_T                        (a mixture of student and teacher)
    JSD_b   = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)
    beta 0  : forward KL  KL(p_T || p_S)   (mode covering; classic logit distillation, Hinton et al. 2015)
    beta 1  : reverse KL  KL(p_S || p_T)   (mode seeking; on-policy distillation, GKD / Qwen3 report section 4.5)

(At beta = 0 and 1 the mixture form degenerates to 0, so those two ends are the plain KLs, as in TRL.)

Shapes: logits [B, T, V] (float; cast to fp32 here), mask [B, T] bool (True on positions that count). The
per-token divergence is [B, T]; the loss is its mean over masked positions (every token weighs the same).

The sampled estimator (reverse KL only): for tokens x_t drawn from the student itself,
log p_S(x_t) - log p_T(x_t) is an unbiased one-sample estimate of KL(p_S || p_T) at that position. Its gradient
comes from the score function, E[(log p_S - log p_T) grad log p_S] (E[grad log p_S] = 0), so the surrogate
loss is the per-token "advantage" -(log p_S - log p_T), held constant and centred on its batch mean (a
baseline, for variance), times log p_S: the on-policy distillation recipe with the teacher's per-token log-prob
as a dense reward. It needs only the sampled tokens' log-probs, not the vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KL_MODES = ("exact", "sampled")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T] over mask [B, T]; 0 when the mask is empty."""
    mask = mask.to(x.device)
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position over the last dim, from log-probs [..., V] -> [...]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Generalized JSD_beta(student, teacher) per position, exact over the vocabulary: [B, T, V] x2 -> [B, T].
    beta 0 = KL(p_T || p_S), beta 1 = KL(p_S || p_T) (see the module docstring). The teacher gets no gradient."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 forward KL, 1 reverse KL, between: JSD), got {beta}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: teacher and student need the same vocabulary")
    s = F.log_softmax(student_logits.float(), -1)
    t = F.log_softmax(teacher_logits.detach().float(), -1)
    if beta == 0.0:
        return _kl(t, s)
    if beta == 1.0:
        return _kl(s, t)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    return beta * _kl(t, m) + (1 - beta) * _kl(s, m)


def exact_loss(student_logits, teacher_logits, mask, beta: float = 1.0) -> torch.Tensor:
    """Mean generalized JSD over masked positions: a scalar to minimise."""
    return masked_mean(token_divergence(student_logits, teacher_logits, beta), mask)


def sampled_reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor):
    """(surrogate loss, KL estimate) from the sampled tokens' log-probs [B, T] under student and teacher.

    The estimate log p_S(x) - log p_T(x) averages to KL(p_S || p_T) when x ~ p_S; the surrogate's gradient is
    the score-function gradient of that KL (see the module docstring). Only valid on the student's own samples."""
    diff = (student_logp - teacher_logp.detach()).detach()
    estimate = masked_mean(diff, mask)
    # The batch mean as a baseline: E[grad log p_S] = 0, so subtracting a constant keeps the gradient's
    # expectation (up to the O(1/n) of estimating it) and removes most of its variance.
    surrogate = masked_mean((diff - estimate) * student_logp, mask)
    return surrogate, estimate

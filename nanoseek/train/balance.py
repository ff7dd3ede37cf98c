"""Expert load balancing for DeepSeekMoE training (DeepSeek-V3 section 2.1.2; docs/moe.md).

Two mechanisms, both driven by what the router exposes (`MoE.last_routing`), never by the model itself:
  - auxiliary-loss-free balancing: after each step, b_i += gamma * sign(mean_load - load_i), from the selection
    counts of the whole (global) batch; b only steers selection and is never touched by gradients.
  - the complementary sequence-wise balance loss, alpha * sum_i f_i P_i per sequence, kept tiny (alpha = 1e-4).
"""

from __future__ import annotations

import torch

from nanoseek.model.moe import MoE, Routing

GAMMA = 0.001  # bias update speed for most of V3's training
ALPHA = 0.0001  # sequence-wise balance loss weight in V3


def sequence_balance_loss(routing: Routing, batch_size: int, num_experts_per_tok: int) -> torch.Tensor:
    """V3 eq. 17-20 for one MoE layer, averaged over the batch's sequences (without alpha):
        f_i = N_r / (K_r T) * #{t : i in TopK(t)},  s'_{i,t} = s_{i,t} / sum_j s_{j,t},  P_i = mean_t s'_{i,t},
        L = sum_i f_i P_i.
    f counts selections (no gradient); P carries the gradient into the router."""
    scores = routing.scores
    n_tokens, n_experts = scores.shape
    t = n_tokens // batch_size
    picks = torch.zeros(batch_size, n_experts, device=scores.device)
    picks.scatter_add_(1, routing.indices.view(batch_size, t * num_experts_per_tok),
                       torch.ones(batch_size, t * num_experts_per_tok, device=scores.device))
    f = picks * n_experts / (num_experts_per_tok * t)
    s = scores.view(batch_size, t, n_experts)
    p = (s / s.sum(-1, keepdim=True)).mean(1)
    return (f * p).sum(-1).mean()


def balance_loss(moe_layers: list[MoE], batch_size: int, alpha: float = ALPHA) -> torch.Tensor:
    """alpha * the sequence-wise loss summed over every MoE layer of the last forward pass."""
    total = sum(sequence_balance_loss(m.last_routing, batch_size, m.gate.cfg.num_experts_per_tok)
                for m in moe_layers)
    return alpha * total


@torch.no_grad()
def update_bias(moe_layers: list[MoE], counts: list[torch.Tensor], gamma: float = GAMMA) -> None:
    """Auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i), per layer, from the counts of
    the whole batch (summed over micro-batches, and over ranks when distributed)."""
    for layer, load in zip(moe_layers, counts):
        load = load.float()
        bias = layer.gate.e_score_correction_bias
        if bias is not None:
            bias += gamma * torch.sign(load.mean() - load)


def load_stats(counts: list[torch.Tensor]) -> dict:
    """Per-layer max/mean load and experts that got no token; the means over layers, for metrics."""
    per_layer = []
    for load in counts:
        load = load.float()
        per_layer.append({"max_over_mean": float(load.max() / load.mean().clamp(min=1e-9)),
                          "dead": int((load == 0).sum())})
    if not per_layer:
        return {}
    return {
        "moe_max_over_mean": sum(p["max_over_mean"] for p in per_layer) / len(per_layer),
        "moe_max_over_mean_worst": max(p["max_over_mean"] for p in per_layer),
        "moe_dead_experts": sum(p["dead"] for p in per_layer),
        "moe_layers": per_layer,
    }

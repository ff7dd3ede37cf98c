"""DeepSeekMoE (DeepSeek-V2 section 2.2, DeepSeek-V3 section 2.1.2; docs/moe.md), in three parts as torchtitan splits them:

  Router          scores every expert, picks top-k (group-limited), returns weights and what training needs.
  GroupedExperts  all routed experts' SwiGLU weights as [experts, out, in] tensors, run as one grouped matmul
                  over tokens sorted by expert: no Python loop over experts.
  MoE             shared experts + routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------------- routing
@dataclass
class Routing:
    """One router call over N tokens. `scores` (s_i, before any bias) feed V3's sequence-wise balance loss;
    `counts` (tokens per expert) feed auxiliary-loss-free balancing. The model never uses either itself."""

    weights: torch.Tensor  # [N, k] gating values g, fp32
    indices: torch.Tensor  # [N, k] chosen experts
    scores: torch.Tensor  # [N, E] sigmoid or softmax affinities, fp32
    counts: torch.Tensor  # [E] how many tokens chose each expert


def select_experts(scores: torch.Tensor, bias: torch.Tensor | None, cfg: ModelConfig):
    """Top-k expert choice from affinities `scores` [N, E]; returns (weights [N, k], indices [N, k]).

    V3 (noaux_tc): choose by s + b, weigh by s; group score = sum of the group's top-2 (s + b).
    V2 (group_limited_greedy): group score = max s. Masked experts get -inf so they can never be chosen,
    even when biases are negative. Weights are normalised over the chosen k when norm_topk_prob, then scaled.
    """
    n, num_experts = scores.shape
    choice = scores if bias is None else scores + bias
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        grouped = choice.view(n, cfg.n_group, num_experts // cfg.n_group)
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(cfg.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(n, num_experts)
    indices = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, indices)
    if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, indices


class Router(nn.Module):
    """The gate: u . e_i in fp32, sigmoid (V3) or softmax (V2), then select_experts.

    `e_score_correction_bias` (V3's b) steers selection only; it is a buffer, moved by the trainer's balancing
    rule, never by gradients. Router math stays fp32 even when the model is cast to bf16 (V3 section 3.3).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.weight.data = self.weight.data.float()
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        weights, indices = select_experts(scores, self.e_score_correction_bias, self.cfg)
        counts = torch.bincount(indices.flatten(), minlength=self.cfg.n_routed_experts)
        return Routing(weights, indices, scores, counts)


# ---------------------------------------------------------------------------------------------- experts
_GROUPED_MM_BROKEN: set = set()


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows x[offsets[e-1]:offsets[e]] times w[e] for every expert e: x [M, K], w [E, K, N] -> [M, N].

    torch._grouped_mm where this torch and device run it; otherwise an equivalent padded batched matmul.
    """
    key = (x.device.type, x.dtype)
    if hasattr(torch, "_grouped_mm") and key not in _GROUPED_MM_BROKEN and _grouped_mm_supported(x):
        try:
            out = torch._grouped_mm(x, w, offs=offsets.to(torch.int32))
            if out.requires_grad:  # its CPU backward rejects the zero-stride gradients that .sum() produces
                out.register_hook(lambda g: g.contiguous())
            return out
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_BROKEN.add(key)
    return _padded_bmm(x, w, offsets)


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":  # the CUDA kernel is bf16-only, on Hopper and newer
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def _padded_bmm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Scatter each expert's rows into an [E, max_rows, K] buffer, one bmm, gather back."""
    num_experts, m = w.shape[0], x.shape[0]
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    expert = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts, output_size=m)
    row = torch.arange(m, device=x.device) - (offsets - counts)[expert]
    buf = x.new_zeros(num_experts, int(counts.max()) if m else 0, x.shape[1])
    buf = buf.index_put((expert, row), x)
    return torch.bmm(buf, w)[expert, row]


class GroupedExperts(nn.Module):
    """n_routed_experts SwiGLU experts, weights stacked [E, out, in] under the checkpoint's projection names.

    The interface is torchtitan's (pytorch/torchtitan, models/moe): forward(x, num_tokens_per_expert) takes rows
    already sorted by expert and returns each row through its expert, unweighted, in the same order. MoE permutes
    and unpermutes (route_to_experts); expert parallelism wraps the same forward in token dispatch and combine
    (nanoseek/distributed.py), and FP8 overrides expert_mm, so the expert math exists once.
    """

    first_expert = 0  # global index of row 0 (expert-parallel shares hold a later range; see model/init.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, d))
        self.up_proj = nn.Parameter(torch.empty(e, i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))

    def expert_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows of x (sorted by expert) times their expert's w [E, out, in] -> [M, out]. FP8 overrides this."""
        return grouped_mm(x, w.transpose(1, 2), offsets)

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x [M, d] sorted by expert, num_tokens_per_expert [E] (summing to M) -> [M, d], row r through its
        expert's SwiGLU."""
        if x.shape[0] == 0:  # nothing for these experts: an empty result still wired to the input and to every
            # weight (zero gradients), so every rank takes part in the backward collectives
            return x.new_zeros(0, self.down_proj.shape[1]) + 0 * (
                x.sum() + self.gate_proj.sum() + self.up_proj.sum() + self.down_proj.sum())
        offsets = num_tokens_per_expert.cumsum(0)
        h = F.silu(self.expert_mm(x, self.gate_proj, offsets)) * self.expert_mm(x, self.up_proj, offsets)
        return self.expert_mm(h, self.down_proj, offsets)


def route_to_experts(experts: nn.Module, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                     counts: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j weights[:, j] * expert_{indices[:, j]}(x) for x [N, d], indices/weights [N, k]: the token copies
    sorted by expert (permute), run by `experts`, weighted and summed back per token (unpermute). `counts`
    (tokens per expert, as Routing has them) default to a bincount over the experts of `experts`."""
    k = indices.shape[1]
    flat = indices.flatten()
    order = flat.argsort(stable=True)  # token slots sorted by expert
    token = order // k
    if counts is None:
        counts = torch.bincount(flat, minlength=experts.gate_proj.shape[0])
    xs = x.index_select(0, token)  # not x[token]: its CPU backward accumulates in a nondeterministic order
    y = experts(xs, counts) * weights.flatten()[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, y)


class MoE(nn.Module):
    """FFN(h) = shared(h) + sum over chosen i of g_i expert_i(h). Keeps the last Routing for the trainer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts > 0 else None)
        self.last_routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.gate(x)
        self.last_routing = routing
        y = route_to_experts(self.experts, x, routing.indices, routing.weights, routing.counts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

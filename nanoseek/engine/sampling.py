"""How the next token is picked: SamplingParams (per request) and `sample` (greedy, temperature, top-k, top-p)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off.
    A sequence stops after max_new_tokens or right after emitting any of stop_token_ids (which is kept).
    Each request samples with its own generator seeded from `seed` (Engine.generate gives prompt i the seed
    request_seed(seed, i)), so its tokens do not depend on what else is in the batch."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenEvent(NamedTuple):
    """One generated token: `seq` indexes the prompt list. `logits` (fp32 [vocab], before temperature and
    filtering) is the distribution the token was chosen from, set only when stream(..., return_logits=True)."""

    seq: int
    token: int
    logits: torch.Tensor | None = None


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """logits [b, vocab] (fp32) -> token ids [b]: argmax when temperature is 0, else temperature, top-k, top-p."""
    if p.greedy:
        return logits.argmax(dim=-1)
    # a floor on the temperature: dividing by a tiny one overflows to inf and the softmax to NaN (greedy anyway)
    logits = logits / max(p.temperature, 1e-4)
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        # nucleus: keep the smallest prefix of the sorted distribution whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= p.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[tuple[float, list]]:
    """logits [n, vocab] and the n tokens chosen -> per token (its log-probability, [(id, logprob)] of the k most
    likely; empty for k = 0)."""
    lp = logits.float().log_softmax(-1)
    chosen = lp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    if k <= 0:
        return [(c, []) for c in chosen]
    v, i = lp.topk(k, dim=-1)
    return [(c, list(zip(ii, vv))) for c, ii, vv in zip(chosen, i.tolist(), v.tolist())]

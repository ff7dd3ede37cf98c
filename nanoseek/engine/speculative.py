"""Self-speculative decoding with the first MTP module (DeepSeek-V3 section 2.2): the module drafts one token per
step and the main model verifies [pending, draft] in one forward; greedy only, so the output equals plain greedy
decoding. The MTP module keeps its own one-layer latent cache, rows parallel to the main cache's."""

from __future__ import annotations

import torch


def mtp_logits(engine, h_prev, next_tokens, pos, mask, absorb):
    """First MTP module: h^0 [b, t, d] (main model's final hidden) + Emb(next tokens) -> draft logits [b, t, vocab]."""
    model = engine.model
    module = model.mtp[0]
    cos, sin = model.rope(pos)
    h1 = module(h_prev, model.embed_tokens(next_tokens), cos, sin, mask, engine.mtp_cache.views[0], absorb)
    return model.mtp_head(module, h1).float()


@torch.inference_mode()
def mtp_prefill(engine, rows: list[int], prompts: list[list[int]], hidden: list[torch.Tensor],
                first_tokens: list[int]) -> torch.Tensor:
    """Fill MTP cache rows for prompt positions 0..L-1 (position i sees h_i [L, d] and Emb(x_{i+1}), x_L being the
    first generated token) and return each row's first draft (the guess for x_{L+1}) [len(rows)]."""
    drafts = []
    for row, p, h, first in zip(rows, prompts, hidden, first_tokens):  # one prompt at a time: causal, no mask
        L = len(p)
        nxt = torch.tensor(p[1:] + [first], device=engine.device)[None]
        pos = torch.arange(L, device=engine.device)[None]
        engine.mtp_cache.set_step(slice(row, row + 1), pos, L)
        drafts.append(mtp_logits(engine, h[None], nxt, pos, None, absorb=False)[0, -1].argmax())
    return torch.stack(drafts)


@torch.inference_mode()
def spec_step(engine, rows, n: torch.Tensor, pending: torch.Tensor, drafts: torch.Tensor, mask_fn):
    """Verify [pending, draft] at positions n, n+1 ([b] each) in one absorbed forward over cache `rows`. The draft
    is accepted when it is the main model's greedy choice after `pending`. Returns verify logits [b, 2, vocab],
    accepted [b] (0/1), the bonus token (main model's choice after the last accepted token) [b] and next
    drafts [b].

    Cache bookkeeping: both caches get positions n and n+1 written; the valid length becomes n + 1 + a, so a
    rejected draft's latent is simply left beyond the valid length (rewound) and overwritten later. The MTP
    module reads, at position n + j, h_{n+j} and Emb(main model's greedy token after position n + j), which for
    j <= a is the committed token x_{n+j+1}; its output at j = a drafts x_{n+a+2}.

    One row goes through the engine's compiled step where it has one (nanoseek/engine/decode.py): once decoding is
    bound by reading the weights, verifying two tokens costs about what one does."""
    fast = engine.compiled
    if fast is not None and fast.usable(rows, speculative=True):
        out = fast.speculate(rows, int(n[0]), pending, drafts, engine.mtp_cache)
        if out is not None:
            return out
    b = n.shape[0]
    pos = n[:, None] + torch.arange(2, device=n.device)
    kv_len = int(n.max()) + 2
    mask = mask_fn(n, 2, kv_len)
    ids = torch.stack([pending, drafts], dim=1)
    engine.cache.set_step(rows, pos, kv_len)
    h = engine.model.hidden_states(ids, pos, mask, engine.cache.views, absorb=True)
    logits = engine.model.lm_head(h).float()
    greedy = logits.argmax(dim=-1)  # [b, 2]
    accepted = (greedy[:, 0] == drafts).long()
    ar = torch.arange(b, device=n.device)
    bonus = greedy[ar, accepted]
    engine.mtp_cache.set_step(rows, pos, kv_len)
    next_drafts = mtp_logits(engine, h, greedy, pos, mask, absorb=True)[ar, accepted].argmax(dim=-1)
    return logits, accepted, bonus, next_drafts

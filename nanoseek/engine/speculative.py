"""Self-speculative decoding with the first MTP module (DeepSeek-V3 section 2.2): the module drafts K tokens per
step and the main model verifies [pending, d_1 .. d_K] in one forward; greedy only, so the output equals plain
greedy decoding. The MTP module keeps its own one-layer latent cache, rows parallel to the main cache's.

K > 1 chains the module as vLLM does for V3's single MTP layer: draft k runs the module again, one position further,
on its own previous output hidden state (block output, before the shared head's norm; it stands in for the main
model's hidden state there) and Emb(draft k-1). The module was trained for depth 1 only, so later drafts are
accepted less often (benchmarks/decode.py --speculative CKPT --draft-tokens K prints acceptance per position)."""

from __future__ import annotations

import torch

from nanoseek.engine.decode import accepted_count

MAX_DRAFT_TOKENS = 8  # a depth-1 module's chained drafts are rarely right this far out; each K compiles a graph


def draft_tokens(speculative) -> int:
    """K, the drafts per step that `speculative` asks for: False / 0 none, True 1, an int K itself."""
    if not isinstance(speculative, int):
        raise TypeError(f"speculative must be a bool or an int (drafts per step), got {type(speculative).__name__}")
    if not 0 <= speculative <= MAX_DRAFT_TOKENS:
        raise ValueError(f"speculative={speculative!r}: the number of MTP drafts per step must be between 0 (off) and "
                         f"{MAX_DRAFT_TOKENS}; chained drafts of a depth-1 module are rarely accepted beyond a few")
    return int(speculative)


def mtp_hidden(engine, h_prev, next_tokens, pos, mask, absorb):
    """First MTP module: h_prev [b, t, d] (the main model's final hidden, or the module's own previous output) +
    Emb(next tokens) [b, t] -> the block output h^1 [b, t, d] (before the shared head's norm)."""
    model = engine.model
    cos, sin = model.rope(pos)
    return model.mtp[0](h_prev, model.embed_tokens(next_tokens), cos, sin, mask, engine.mtp_cache.views[0], absorb)


def mtp_logits(engine, h1):
    """Draft logits [..., vocab] of the MTP module's output h1 [..., d]."""
    model = engine.model
    return model.mtp_head(model.mtp[0], h1).float()


def mtp_chain(engine, rows, h1: torch.Tensor, first: torch.Tensor, pos: torch.Tensor, k: int, mask_fn):
    """Drafts 2 .. k by chaining the MTP module, one position at a time: pass j (j = 2 .. k) runs at position
    pos + j - 2 ([b]) on (its previous output hidden h1 [b, d], Emb(draft j-1)). `first` [b] is draft 1;
    returns all drafts [b, k]. The passes write MTP-cache positions at and past the next step's valid length,
    which that step's first pass overwrites before reading them."""
    drafts = [first]
    for j in range(k - 1):
        p = (pos + j)[:, None]  # [b, 1]
        kv_len = int(p.max()) + 1
        engine.mtp_cache.set_step(rows, p, kv_len)
        h1 = mtp_hidden(engine, h1[:, None], drafts[-1][:, None], p, mask_fn(p[:, 0], 1, kv_len), absorb=True)[:, 0]
        drafts.append(mtp_logits(engine, h1).argmax(dim=-1))
    return torch.stack(drafts, dim=1)


@torch.inference_mode()
def mtp_prefill(engine, rows: list[int], prompts: list[list[int]], hidden: list[torch.Tensor],
                first_tokens: list[int], k: int = 1) -> torch.Tensor:
    """Fill MTP cache rows for prompt positions 0..L-1 (position i sees h_i [L, d] and Emb(x_{i+1}), x_L being the
    first generated token) and return each row's first k drafts (the guesses for x_{L+1} .. x_{L+k})
    [len(rows), k]; drafts 2 .. k come from chaining the module at positions L .. L+k-2 (mtp_chain)."""
    drafts = []
    for row, p, h, first in zip(rows, prompts, hidden, first_tokens):  # one prompt at a time: causal, no mask
        L = len(p)
        nxt = torch.tensor(p[1:] + [first], device=engine.device)[None]
        pos = torch.arange(L, device=engine.device)[None]
        rows_i = slice(row, row + 1)
        engine.mtp_cache.set_step(rows_i, pos, L)
        h1 = mtp_hidden(engine, h[None], nxt, pos, None, absorb=False)
        d1 = mtp_logits(engine, h1)[0, -1].argmax()
        fast, chained = engine.compiled, None
        if k > 1 and fast is not None and fast.usable(rows_i, speculative=True):  # one compiled graph per K
            chained = fast.chain(rows_i, L, h1[:, -1], d1[None], k, engine.mtp_cache)
        if chained is None:
            chained = mtp_chain(engine, rows_i, h1[:, -1], d1[None], pos[:, -1] + 1, k, engine.step_mask)
        drafts.append(chained[0])
    return torch.stack(drafts)


@torch.inference_mode()
def spec_step(engine, rows, n: torch.Tensor, pending: torch.Tensor, drafts: torch.Tensor, mask_fn):
    """Verify [pending, d_1 .. d_K] (pending [b], drafts [b, K]) at positions n .. n+K (n [b]) in one absorbed
    forward over cache `rows`. g_j is the main model's greedy choice after position n+j; a row accepts a, the
    number of leading j in 0 .. K-1 with d_{j+1} = g_j, and commits d_1 .. d_a and the bonus g_a. Returns verify
    logits [b, K+1, vocab], accepted [b] (a, 0 .. K), the bonus token [b] and the next drafts [b, K].

    Cache bookkeeping: both caches get positions n .. n+K written; the valid length becomes n + 1 + a, so rejected
    drafts' latents are simply left beyond the valid length (rewound) and overwritten later. The MTP module reads,
    at position n + j, h_{n+j} and Emb(g_j), which for j <= a is the committed token x_{n+j+1}; its output at
    j = a drafts x_{n+a+2}, and chaining it (mtp_chain) at positions n+a+1 .. n+a+K-1 drafts the rest.

    One row goes through the engine's compiled step where it has one (nanoseek/engine/decode.py): once decoding is
    bound by reading the weights, verifying K+1 tokens costs about what one does."""
    fast = engine.compiled
    if fast is not None and fast.usable(rows, speculative=True):
        out = fast.speculate(rows, int(n[0]), pending, drafts, engine.mtp_cache)
        if out is not None:
            return out
    b, k = drafts.shape
    pos = n[:, None] + torch.arange(k + 1, device=n.device)
    kv_len = int(n.max()) + k + 1
    mask = mask_fn(n, k + 1, kv_len)
    ids = torch.cat([pending[:, None], drafts], dim=1)
    engine.cache.set_step(rows, pos, kv_len)
    h = engine.model.hidden_states(ids, pos, mask, engine.cache.views, absorb=True)
    logits = engine.model.lm_head(h).float()
    greedy = logits.argmax(dim=-1)  # [b, K+1]
    accepted = accepted_count(greedy[:, :k], drafts)
    ar = torch.arange(b, device=n.device)
    bonus = greedy[ar, accepted]
    engine.mtp_cache.set_step(rows, pos, kv_len)
    h1 = mtp_hidden(engine, h, greedy, pos, mask, absorb=True)
    first = mtp_logits(engine, h1)[ar, accepted].argmax(dim=-1)
    return logits, accepted, bonus, mtp_chain(engine, rows, h1[ar, accepted], first, n + accepted + 1, k, mask_fn)

"""Inference engine: latent KV cache, absorbed decode, sampling, ragged batching, MTP speculative decoding.

The model stays plain (DESIGN principle 2); everything about serving lives here. The engine owns

  LatentCache   per layer and token exactly [c_kv ; k_rope] (REFERENCE section 2): kv_lora_rank + qk_rope_head_dim
                numbers, nothing per head, in fp32, bf16, or fp8 (e4m3) with one bf16 scale per token and part.
  Engine        prefill -> decode loop over a batch of ragged prompts, sampling, stop tokens, and
                self-speculative decoding that drafts with the model's first MTP module (V3 section 2.2).

Batching: prompts are right-padded. Row b of the cache holds sequence b at positions 0 .. n_b - 1; every step
passes per-sequence RoPE positions [b, t] and, when the lengths differ, a mask that lets row b see keys
0 .. n_b + j. Padding written past n_b is never visible and is overwritten as the sequence grows. When a
sequence finishes its row is dropped and the live rows are compacted to the front, so finished sequences
cost nothing afterwards.

Attention path: prefill runs the expanded path (absorb=False: k_nope, v per head, then SDPA), decode the
absorbed one (absorb=True: attention over the latent itself). Both write only the latent to the cache.
benchmarks/decode.py times both paths on the same prompt (`--compare-prefill`). Measured on CPU (BENCHMARKS.md,
"Decode"): 2048 tokens expanded 4.7 s vs absorbed 7.5 s; at 256 tokens the two are within noise (0.3 s). The
absorbed path materialises fp32 scores [b, h, t, s] and its per-head work grows with kv_lora_rank rather than
the head dims, while SDPA streams the scores; so prefill stays expanded (`Engine.prefill_absorb = False`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


# ---------------------------------------------------------------------------------------------- parameters
@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off.
    A sequence stops after max_new_tokens or right after emitting any of stop_token_ids (which is kept).
    The same seed with the same prompts and batch gives the same tokens."""

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


@dataclass
class SpecStats:
    """Speculative decoding counters of the last generate/stream call (one MTP draft per sequence and step)."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


# ---------------------------------------------------------------------------------------------- cache
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


class LatentCache:
    """Latent KV cache for `n_layers` MLA layers: c_kv [B, S, r] and k_rope [B, S, p] per layer, where B is
    max_batch_size and S max_seq_len. With fp8, each token's c_kv and k_rope carry one bf16 scale each
    (amax / 448), so a token costs r + p bytes plus 4 per layer instead of 2 (r + p) in bf16.

    Before each forward the engine calls `set_step(rows, positions, kv_len)`: the rows taking part (a slice of
    the batch), where this step's tokens go ([b, t] positions) and how many cached positions to return.
    `layer(i)` is the object MLA calls `update(c_kv, k_rope)` on: it writes the step's latents and returns
    [c_kv ; k_rope] for positions 0 .. kv_len - 1 in the model's dtype."""

    def __init__(self, n_layers: int, max_batch: int, max_seq_len: int, kv_lora_rank: int, rope_dim: int,
                 kind: str, model_dtype: torch.dtype, device):
        self.kind, self.model_dtype = kind, model_dtype
        store = CACHE_DTYPES[kind]
        shape = (max_batch, max_seq_len)
        self.c_kv = [torch.zeros(*shape, kv_lora_rank, dtype=store, device=device) for _ in range(n_layers)]
        self.k_rope = [torch.zeros(*shape, rope_dim, dtype=store, device=device) for _ in range(n_layers)]
        if kind == "fp8":
            self.c_scale = [torch.ones(*shape, 1, dtype=torch.bfloat16, device=device) for _ in range(n_layers)]
            self.k_scale = [torch.ones(*shape, 1, dtype=torch.bfloat16, device=device) for _ in range(n_layers)]
        self.views = [_LayerView(self, i) for i in range(n_layers)]
        self.rows, self.positions, self.kv_len = slice(0, 0), None, 0

    def tensors(self) -> list[torch.Tensor]:
        out = self.c_kv + self.k_rope
        if self.kind == "fp8":
            out += self.c_scale + self.k_scale
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def set_step(self, rows: slice, positions: torch.Tensor, kv_len: int) -> None:
        self.rows, self.positions, self.kv_len = rows, positions, kv_len

    # -- storage with optional fp8 quantisation
    def _put(self, buf: list, scale: list | None, i: int, x: torch.Tensor) -> None:
        b, t = self.positions.shape
        idx = (torch.arange(b, device=x.device)[:, None].expand(b, t), self.positions)
        if scale is None:
            buf[i][self.rows].index_put_(idx, x.to(buf[i].dtype))
            return
        # per-token scale rounded to bf16 *before* dividing, so stored values and scale agree exactly
        s = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12).to(torch.bfloat16)
        q = (x.float() / s.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        buf[i][self.rows].index_put_(idx, q)
        scale[i][self.rows].index_put_(idx, s)

    def _get(self, buf: list, scale: list | None, i: int) -> torch.Tensor:
        x = buf[i][self.rows, : self.kv_len]
        if scale is None:
            return x if x.dtype == self.model_dtype else x.to(self.model_dtype)
        return (x.float() * scale[i][self.rows, : self.kv_len].float()).to(self.model_dtype)

    def update(self, i: int, c_kv: torch.Tensor, k_rope: torch.Tensor):
        fp8 = self.kind == "fp8"
        self._put(self.c_kv, self.c_scale if fp8 else None, i, c_kv)
        self._put(self.k_rope, self.k_scale if fp8 else None, i, k_rope)
        return (self._get(self.c_kv, self.c_scale if fp8 else None, i),
                self._get(self.k_rope, self.k_scale if fp8 else None, i))

    def keep_rows(self, keep: list[int], upto: int) -> None:
        """Compact: row j <- row keep[j] for positions < upto (dropping finished sequences)."""
        if keep == list(range(len(keep))):
            return
        idx = torch.tensor(keep, device=self.c_kv[0].device)
        for buf in self.tensors():
            buf[: len(keep), :upto] = buf[idx, :upto]


class _LayerView:
    """What one MLA layer sees: `update` appends this step's latents and returns the cached prefix."""

    def __init__(self, cache: LatentCache, i: int):
        self.cache, self.i = cache, i

    def update(self, c_kv: torch.Tensor, k_rope: torch.Tensor):
        return self.cache.update(self.i, c_kv, k_rope)


# ---------------------------------------------------------------------------------------------- sampling
def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """logits [b, vocab] (fp32) -> token ids [b]: argmax when temperature is 0, else temperature, top-k, top-p."""
    if p.greedy:
        return logits.argmax(dim=-1)
    logits = logits / p.temperature
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


# ---------------------------------------------------------------------------------------------- engine
@dataclass
class _Batch:
    """Live sequences: row j of the caches holds prompt `seq[j]`, with n[j] tokens cached and pending[j] the
    newest token (emitted, not yet in the cache)."""

    seq: list[int]
    n: torch.Tensor  # [rows] int64
    pending: torch.Tensor  # [rows] int64
    emitted: list[int] = field(default_factory=list)


class Engine:
    """Batched generation for a nanoseek Transformer with a latent KV cache.

    Engine(model, max_batch_size=8, max_seq_len=4096, kv_cache_dtype=None): the cache is allocated once here
    for max_batch_size sequences of max_seq_len tokens (prompt + generated). kv_cache_dtype is "fp32", "bf16"
    or "fp8"; None means the model's dtype ("fp32" for fp32 weights, "bf16" otherwise).

    A request must satisfy len(prompt) + max_new_tokens <= max_seq_len; otherwise generate raises ValueError
    before computing anything (no silent truncation). One request runs at a time: the cache belongs to the
    engine, so a second generate/stream must not start while a stream is still being consumed.
    """

    def __init__(self, model, max_batch_size: int = 8, max_seq_len: int = 4096, kv_cache_dtype: str | None = None):
        cfg = model.config
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(f"max_batch_size must be >= 1 and max_seq_len >= 2, got {max_batch_size}, {max_seq_len}")
        w = model.embed_tokens.weight
        self.model, self.cfg, self.device, self.dtype = model, cfg, w.device, w.dtype
        if kv_cache_dtype is None:
            kv_cache_dtype = "fp32" if w.dtype == torch.float32 else "bf16"
        if kv_cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        self.kv_cache_dtype = kv_cache_dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.cache = self._new_cache(cfg.num_hidden_layers)
        self.mtp_cache: LatentCache | None = None  # allocated on the first speculative call
        self.stats = SpecStats()
        # ragged prompts prefill as one padded batch while its dense [B, T, T] mask has at most this many entries
        self.prefill_mask_limit = 2**22
        # prefill attention path: expanded SDPA measured faster on CPU (benchmarks/decode.py --compare-prefill)
        self.prefill_absorb = False
        model.eval()

    def _new_cache(self, n_layers: int) -> LatentCache:
        c = self.cfg
        return LatentCache(n_layers, self.max_batch_size, self.max_seq_len, c.kv_lora_rank, c.qk_rope_head_dim,
                           self.kv_cache_dtype, self.dtype, self.device)

    def kv_cache_bytes_per_token(self) -> int:
        """Bytes of the main model's allocated latent cache per token slot (all layers, scales included)."""
        return self.cache.nbytes() // (self.max_batch_size * self.max_seq_len)

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: list[list[int]], params: SamplingParams, speculative: bool = False) -> list[list[int]]:
        """New tokens for each prompt (stop token included when one ended the sequence)."""
        out: list[list[int]] = [[] for _ in prompts]
        for ev in self.stream(prompts, params, speculative):
            out[ev.seq].append(ev.token)
        return out

    def stream(self, prompts: list[list[int]], params: SamplingParams, speculative: bool = False,
               return_logits: bool = False) -> Iterator[TokenEvent]:
        """Yield TokenEvent(seq, token[, logits]) as tokens are produced, in order within each sequence. Each
        step yields at most one token per live sequence (speculative steps up to two: draft, then bonus).

        speculative=True drafts one token per step with the first MTP module and verifies it together with the
        pending token in one forward of the main model; greedy only (temperature 0 or top_k 1), and the output
        is the same as plain greedy decoding. Counters go to `engine.stats` (acceptance_rate).

        Bad requests raise ValueError here, before the first token is asked for."""
        self._validate(prompts, params, speculative)
        return self._stream(prompts, params, speculative, return_logits)

    def _stream(self, prompts, params: SamplingParams, speculative: bool, return_logits: bool):
        if params.max_new_tokens == 0:
            return
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=self.device)
            if params.seed is None:
                gen.seed()
            else:
                gen.manual_seed(params.seed)
        self.stats = SpecStats()
        stop = set(params.stop_token_ids)
        counts = [0] * len(prompts)

        def emit(seq: int, tok: int) -> bool:
            """Count a token; True when its sequence is now finished."""
            counts[seq] += 1
            return tok in stop or counts[seq] >= params.max_new_tokens

        if not speculative:
            batch, logits = self._prefill(prompts, want_hidden=False)[:2]
            while True:
                toks = self._sample(logits, params, gen)
                done = []
                for j, s in enumerate(batch.seq):
                    yield TokenEvent(s, toks[j], logits[j].clone() if return_logits else None)
                    done.append(emit(s, toks[j]))
                if not self._retire(batch, done, toks):
                    return
                logits = self._decode(batch)

        # speculative (greedy)
        batch, logits, h = self._prefill(prompts, want_hidden=True)
        toks = self._sample(logits, params, gen)
        done = []
        for j, s in enumerate(batch.seq):
            yield TokenEvent(s, toks[j], logits[j].clone() if return_logits else None)
            done.append(emit(s, toks[j]))
        drafts = self._mtp_prefill(prompts, h, toks)
        keep = [j for j, d in enumerate(done) if not d]
        if not self._retire(batch, done, toks, speculative=True):
            return
        drafts = drafts[keep]
        while True:
            verify_logits, accepted, bonus, drafts = self._spec_step(batch, drafts)
            done = []
            for j, s in enumerate(batch.seq):
                self.stats.drafted += 1
                a = int(accepted[j])
                self.stats.accepted += a
                finished = False
                for k in range(a + 1):  # accepted drafts are the main model's own greedy choices
                    tok = int(verify_logits[j, k].argmax())
                    yield TokenEvent(s, tok, verify_logits[j, k].clone() if return_logits else None)
                    if emit(s, tok):
                        finished = True
                        break
                done.append(finished)
            self.stats.steps += 1
            keep = [j for j, d in enumerate(done) if not d]
            if not self._retire(batch, done, bonus.tolist(), speculative=True):
                return
            drafts = drafts[keep]

    # ------------------------------------------------------------------ checks
    def _validate(self, prompts, params: SamplingParams, speculative: bool) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        if len(prompts) > self.max_batch_size:
            raise ValueError(f"{len(prompts)} prompts exceed max_batch_size={self.max_batch_size}: split the batch "
                             "or build the Engine with a larger max_batch_size")
        vocab = self.cfg.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS)")
            bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]!r} outside the vocabulary [0, {vocab})")
            if len(p) + params.max_new_tokens > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} that "
                                 f"exceeds max_seq_len={self.max_seq_len}: shorten the prompt, lower "
                                 "max_new_tokens or build the Engine with a larger max_seq_len")
        if speculative:
            if len(self.model.mtp) == 0:
                raise ValueError("speculative=True needs a model with MTP modules (num_nextn_predict_layers >= 1)")
            if not (params.greedy or params.top_k == 1):
                raise ValueError("speculative decoding is greedy only here: use temperature=0 (or top_k=1)")

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def _sample(self, logits, params, gen) -> list[int]:
        return sample(logits, params, gen).tolist()

    def _retire(self, batch: _Batch, done: list[bool], newest: list[int], speculative: bool = False) -> bool:
        """Record each live row's newest token as pending, drop finished rows; False when none is left."""
        keep = [j for j, d in enumerate(done) if not d]
        if not keep:
            return False
        upto = int(batch.n.max()) + 2
        with torch.inference_mode():
            batch.pending = torch.tensor(newest, device=self.device)[keep]
            batch.n = batch.n[keep]
            for cache in (self.cache, self.mtp_cache if speculative else None):
                if cache is not None:
                    cache.keep_rows(keep, min(upto, self.max_seq_len))
        batch.seq = [batch.seq[j] for j in keep]
        return True

    def _step_mask(self, n: torch.Tensor, t: int, kv_len: int):
        """Bool [b, 1, t, kv_len]: query j of row b sees keys 0 .. n_b + j; None when all rows agree (causal)."""
        if bool((n == n[0]).all()):
            return None
        keys = torch.arange(kv_len, device=self.device)
        return (keys <= (n[:, None] + torch.arange(t, device=self.device))[..., None]).unsqueeze(1)

    @torch.inference_mode()
    def _prefill(self, prompts, want_hidden: bool):
        """Run the prompts through the model (expanded attention), filling cache rows 0..B-1. Returns the batch,
        next-token logits [B, vocab] fp32, and the per-prompt hidden states [L_b, d] when asked (for MTP).

        Equal-length prompts run as one causal batch; ragged ones as one right-padded batch with a
        [B, 1, T, T] mask while that mask is small, else one prompt at a time (a dense mask for long ragged
        prompts costs B*T^2 bytes and loses SDPA's causal fast path)."""
        lens = [len(p) for p in prompts]
        B, T = len(prompts), max(lens)
        hidden = [None] * B
        last = torch.empty(B, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        groups = [list(range(B))] if (len(set(lens)) == 1 or B * T * T <= self.prefill_mask_limit) else [[i] for i in range(B)]
        for rows in groups:
            r0, b = rows[0], len(rows)
            t = max(lens[i] for i in rows)
            ids = torch.zeros(b, t, dtype=torch.long, device=self.device)
            for j, i in enumerate(rows):
                ids[j, : lens[i]] = torch.tensor(prompts[i], device=self.device)
            pos = torch.arange(t, device=self.device).expand(b, t)
            n = torch.tensor([lens[i] for i in rows], device=self.device)
            mask = None
            if bool((n != t).any()):  # right padding: row b sees keys < L_b, causally
                keys = torch.arange(t, device=self.device)
                mask = ((keys[None, :] <= keys[:, None])[None] & (keys < n[:, None])[:, None, :]).unsqueeze(1)
            self.cache.set_step(slice(r0, r0 + b), pos, t)
            h = self.model.hidden_states(ids, pos, mask, self.cache.views, absorb=self.prefill_absorb)
            for j, i in enumerate(rows):
                last[i] = h[j, lens[i] - 1]
                if want_hidden:
                    hidden[i] = h[j, : lens[i]]
        logits = self.model.lm_head(last).float()
        batch = _Batch(seq=list(range(B)), n=torch.tensor(lens, device=self.device), pending=None)
        return batch, logits, hidden

    @torch.inference_mode()
    def _decode(self, batch: _Batch) -> torch.Tensor:
        """One absorbed decode step for every live row: feed pending tokens, return next logits [b, vocab]."""
        b = len(batch.seq)
        pos = batch.n[:, None]
        kv_len = int(batch.n.max()) + 1
        self.cache.set_step(slice(0, b), pos, kv_len)
        h = self.model.hidden_states(batch.pending[:, None], pos, self._step_mask(batch.n, 1, kv_len),
                                     self.cache.views, absorb=True)
        batch.n = batch.n + 1
        return self.model.lm_head(h[:, -1]).float()

    # ------------------------------------------------------------------ speculative decoding with MTP
    def _mtp(self, h_prev, next_tokens, pos, mask, absorb):
        """First MTP module: h^0 [b, t, d] (main model's final hidden) + Emb(next tokens) -> draft logits."""
        module = self.model.mtp[0]
        cos, sin = self.model.rope(pos)
        h1 = module(h_prev, self.model.embed_tokens(next_tokens), cos, sin, mask, self.mtp_cache.views[0], absorb)
        return self.model.lm_head(module.shared_head.norm(h1)).float()

    @torch.inference_mode()
    def _mtp_prefill(self, prompts, hidden, first_tokens) -> torch.Tensor:
        """Fill the MTP cache for prompt positions 0..L-1 (position i sees h_i and Emb(x_{i+1}), x_L being the
        first generated token) and return each row's first draft (the guess for x_{L+1}) [B]."""
        if self.mtp_cache is None:
            self.mtp_cache = self._new_cache(1)
        drafts = []
        for i, p in enumerate(prompts):  # one prompt at a time: causal, no mask (cost ~ one layer of prefill)
            L = len(p)
            nxt = torch.tensor(p[1:] + [first_tokens[i]], device=self.device)[None]
            pos = torch.arange(L, device=self.device)[None]
            self.mtp_cache.set_step(slice(i, i + 1), pos, L)
            drafts.append(self._mtp(hidden[i][None], nxt, pos, None, absorb=False)[0, -1].argmax())
        return torch.stack(drafts)

    @torch.inference_mode()
    def _spec_step(self, batch: _Batch, drafts: torch.Tensor):
        """Verify [pending, draft] at positions n, n+1 in one absorbed forward. The draft is accepted when it is
        the main model's greedy choice after `pending`. Returns verify logits [b, 2, vocab], accepted [b]
        (0/1), the bonus token (main model's choice after the last accepted token) [b] and next drafts [b].

        Cache bookkeeping: both caches get positions n and n+1 written; the valid length becomes n + 1 + a, so a
        rejected draft's latent is simply left beyond the valid length (rewound) and overwritten later. The MTP
        module reads, at position n + j, h_{n+j} and Emb(main model's greedy token after position n + j), which
        for j <= a is the committed token x_{n+j+1}; its output at j = a drafts x_{n+a+2}."""
        b = len(batch.seq)
        ar = torch.arange(2, device=self.device)
        pos = batch.n[:, None] + ar
        kv_len = int(batch.n.max()) + 2
        mask = self._step_mask(batch.n, 2, kv_len)
        ids = torch.stack([batch.pending, drafts], dim=1)
        self.cache.set_step(slice(0, b), pos, kv_len)
        h = self.model.hidden_states(ids, pos, mask, self.cache.views, absorb=True)
        logits = self.model.lm_head(h).float()
        greedy = logits.argmax(dim=-1)  # [b, 2]
        accepted = (greedy[:, 0] == drafts).long()
        rows = torch.arange(b, device=self.device)
        bonus = greedy[rows, accepted]
        self.mtp_cache.set_step(slice(0, b), pos, kv_len)
        next_drafts = self._mtp(h, greedy, pos, mask, absorb=True)[rows, accepted].argmax(dim=-1)
        batch.n = batch.n + 1 + accepted
        return logits, accepted, bonus, next_drafts

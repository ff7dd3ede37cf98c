"""Engine: the public face of inference. It owns the latent cache (nanoseek/engine/cache.py), the prefix cache,
and the forwards over cache rows that the scheduler (nanoseek/engine/scheduler.py) asks for; `generate` and
`stream` run through that same scheduler, one code path with the server.

Rows: request i owns cache row r_i, holding its sequence at positions 0 .. n_i - 1. Every forward passes
per-row RoPE positions [b, t] and, when rows are at different lengths, a mask that lets row i see keys
0 .. n_i + j; padding written past n_i is never visible and is overwritten as the sequence grows.

Attention path: prefill chunks run the expanded path (absorb=False: k_nope, v per head, then SDPA), decode the
absorbed one (absorb=True: attention over the latent itself, DeepSeek-V2 section 2.1). Both write only the latent.
The absorbed path materialises fp32 scores [b, h, t, s] while SDPA streams them, so prefill stays expanded
(`Engine.prefill_absorb = False`; benchmarks/decode.py --compare-prefill times both, see BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from nanoseek.engine.cache import CACHE_DTYPES, LatentCache
from nanoseek.engine.decode import CompiledDecode, compile_default
from nanoseek.engine.prefix_cache import PrefixCache
from nanoseek.engine.sampling import SamplingParams, TokenEvent
from nanoseek.engine.scheduler import Request, Scheduler
from nanoseek.engine.speculative import draft_tokens


@dataclass
class SpecStats:
    """Speculative decoding counters of the last generate/stream call: `drafted` counts every MTP draft (K per
    sequence and step), `accepted` every accepted one, `steps` the verify forwards. Per draft position j (0-based),
    `drafted_at[j]` and `accepted_at[j]` count the same; draft j + 1 is accepted only if draft j was."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    def record(self, k: int, a: int) -> None:
        """One sequence's step: k drafts, the first a of them accepted."""
        grow = k - len(self.drafted_at)
        if grow > 0:
            self.drafted_at += [0] * grow
            self.accepted_at += [0] * grow
        for j in range(k):
            self.drafted_at[j] += 1
            self.accepted_at[j] += int(j < a)
        self.drafted += k
        self.accepted += a

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        """Fraction of draft j's (0-based) that were accepted, for j = 0 .. K-1: never rises with j, as draft j + 1
        needs draft j accepted and is the chained module's guess one position further out."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]


def request_seed(seed: int | None, i: int) -> int | None:
    """Seed of prompt i of a batch sampled with `seed`: distinct per prompt, so identical prompts (a GRPO group)
    still draw different samples, and fixed by (seed, i)."""
    return None if seed is None else (seed * 1_000_003 + i) % 2**63


class Engine:
    """Batched generation for a nanoseek Transformer with a latent KV cache.

    The cache is allocated once, for max_batch_size sequences of max_seq_len tokens (prompt + generated).
    kv_cache_dtype is "fp32", "bf16" or "fp8"; None means the model's dtype ("fp32" for fp32 weights, "bf16"
    otherwise). prefix_cache_tokens bounds the prefix cache: off (0) by default, so repeated offline calls
    (benchmarks) compute every prompt; `nanoseek serve` turns it on (identical prompts in one call are prefilled
    once either way). prefill_chunk is the most prompt tokens one request prefills per step (default: whole
    prompts), prefill_budget the most over all requests (default: no limit): a server chunks long prompts so that
    rows already decoding keep getting tokens.

    compile: batch-1 decode steps run compiled (nanoseek/engine/decode.py) where torch.compile works; None reads
    NANOSEEK_COMPILE (0 off, 1 or unset on). If compilation fails: one warning, then the eager path.

    A request must satisfy len(prompt) + max_new_tokens <= max_seq_len (no silent truncation). The engine is
    single-threaded: one generate/stream (or the server's loop) drives it at a time.
    """

    def __init__(self, model, max_batch_size: int = 8, max_seq_len: int = 4096, kv_cache_dtype: str | None = None,
                 prefix_cache_tokens: int = 0, prefill_chunk: int | None = None, prefill_budget: int | None = None,
                 compile: bool | None = None):
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
        self.mtp_cache: LatentCache | None = None  # allocated on the first speculative request
        self.prefix_cache = PrefixCache(self.cache, prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.stats = SpecStats()
        self.prefill_mask_limit = 2**22  # see prefill
        self.prefill_absorb = False  # see the module docstring
        self.scheduler = Scheduler(self, prefill_chunk or max_seq_len, prefill_budget)
        self.compiled = CompiledDecode(model, self.cache) if (compile_default() if compile is None else compile) else None
        model.eval()

    def _new_cache(self, n_layers: int) -> LatentCache:
        c = self.cfg
        return LatentCache(n_layers, self.max_batch_size, self.max_seq_len, c.kv_lora_rank, c.qk_rope_head_dim,
                           self.kv_cache_dtype, self.dtype, self.device)

    @property
    def compile_seconds(self) -> float | None:
        """Seconds the compiled decode steps spent compiling (each kind's first step, plain and speculative, and the
        first past 4,096 cached tokens; once per engine); None while nothing compiled: before the first step, with
        compilation off, or when an earlier engine in this process compiled the same step."""
        return None if self.compiled is None else self.compiled.compile_seconds

    def kv_cache_bytes_per_token(self) -> int:
        """Bytes of the main model's allocated latent cache per token slot (all layers, scales included)."""
        return self.cache.nbytes() // (self.max_batch_size * self.max_seq_len)

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 speculative: bool | int = False) -> list[list[int]]:
        """New tokens for each prompt (stop token included when one ended the sequence); `speculative` as in
        `stream`."""
        out: list[list[int]] = [[] for _ in prompts]
        for ev in self.stream(prompts, params, speculative):
            out[ev.seq].append(ev.token)
        return out

    def stream(self, prompts: list[list[int]], params: SamplingParams, speculative: bool | int = False,
               return_logits: bool = False) -> Iterator[TokenEvent]:
        """Yield TokenEvent(seq, token[, logits]) as tokens are produced, in order within each sequence. Each
        step yields at most one token per live sequence (speculative steps up to K + 1: accepted drafts, then
        the bonus).

        speculative=K (an int, 1 .. 8; True means 1, False or 0 off) drafts K tokens per step with the first MTP
        module, chained for K > 1 (nanoseek/engine/speculative.py), and verifies them together with the pending
        token in one forward of the main model; greedy only (temperature 0 or top_k 1), and the output is the same
        as plain greedy decoding. Each sequence needs 2 (K - 1) cache positions of room beyond its tokens
        (check_request). Counters go to `engine.stats` (acceptance_rate, acceptance_by_position).

        Bad requests raise ValueError here, before the first token is asked for."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        if len(prompts) > self.max_batch_size:
            raise ValueError(f"{len(prompts)} prompts exceed max_batch_size={self.max_batch_size}: split the batch "
                             "or build the Engine with a larger max_batch_size")
        for i, p in enumerate(prompts):
            self.check_request(p, params, speculative, what=f"prompt {i}")
        k = draft_tokens(speculative)
        return self._stream([Request(list(p), dataclasses.replace(params, seed=request_seed(params.seed, i)),
                                     speculative=k, return_logits=return_logits)
                             for i, p in enumerate(prompts)])

    def _stream(self, reqs: list[Request]) -> Iterator[TokenEvent]:
        if reqs[0].params.max_new_tokens == 0:
            return
        self.stats = SpecStats()
        seq = {r.id: i for i, r in enumerate(reqs)}
        for r in reqs:
            self.scheduler.add(r)
        try:
            while not all(r.finished for r in reqs):
                events, _ = self.scheduler.step()
                for ev in events:
                    yield TokenEvent(seq[ev.request.id], ev.token, ev.logits)
        finally:  # a consumer that stops early frees the rows
            for r in reqs:
                self.scheduler.abort(r)

    def check_request(self, prompt, params: SamplingParams, speculative: bool | int = False,
                      what: str = "the prompt"):
        """Raise ValueError (TypeError for wrong types) saying what to change when a request cannot run."""
        k = draft_tokens(speculative)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if len(prompt) == 0:
            raise ValueError(f"{what} is empty: every prompt needs at least one token (e.g. BOS)")
        vocab = self.cfg.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} has token id {bad[0]!r} outside the vocabulary [0, {vocab})")
        if len(prompt) + max(params.max_new_tokens, 1) > self.max_seq_len:
            raise ValueError(f"{what} has {len(prompt)} tokens; with max_new_tokens={params.max_new_tokens} that "
                             f"exceeds max_seq_len={self.max_seq_len}: shorten the prompt, lower "
                             "max_new_tokens or build the Engine with a larger max_seq_len")
        if k:
            if len(self.model.mtp) == 0:
                raise ValueError("speculative=True needs a model with MTP modules (num_nextn_predict_layers >= 1)")
            if not (params.greedy or params.top_k == 1):
                raise ValueError("speculative decoding is greedy only here: use temperature=0 (or top_k=1)")
            # the last step verifies K drafts past the last token (main cache) and chains the MTP module up to
            # K - 1 positions past those (its cache): 2 (K - 1) positions beyond what plain decoding needs
            room = 2 * (k - 1)
            if len(prompt) + max(params.max_new_tokens, 1) + room > self.max_seq_len:
                raise ValueError(f"{what} has {len(prompt)} tokens; with max_new_tokens={params.max_new_tokens} and "
                                 f"speculative={k} ({room} positions of room for the drafts) that exceeds "
                                 f"max_seq_len={self.max_seq_len}: draft fewer tokens per step, shorten the prompt, "
                                 "lower max_new_tokens or build the Engine with a larger max_seq_len")
            if self.mtp_cache is None:
                self.mtp_cache = self._new_cache(1)

    # ------------------------------------------------------------------ forwards over cache rows
    def rows_index(self, rows: list[int]):
        """Cache rows as a slice when contiguous (a view, no copy), else an index tensor [b]."""
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return torch.tensor(rows, device=self.device)

    def step_mask(self, n: torch.Tensor, t: int, kv_len: int):
        """Bool [b, 1, t, kv_len]: query j of row i sees keys 0 .. n_i + j; None when all rows agree (causal)."""
        if bool((n == n[0]).all()):
            return None
        keys = torch.arange(kv_len, device=self.device)
        return (keys <= (n[:, None] + torch.arange(t, device=self.device))[..., None]).unsqueeze(1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.lm_head(h).float()

    @torch.inference_mode()
    def prefill(self, rows: list[int], starts: list[int], chunks: list[list[int]], want_all: list[bool]):
        """Run prompt chunks through the model (expanded attention): chunk i goes to cache row rows[i] at positions
        starts[i] .. starts[i] + len - 1 and sees that row's cached keys before it. Returns the hidden state at
        each chunk's last token [k, d] and, where want_all[i], the chunk's hidden states [len_i, d] (else None).

        Chunks run as one right-padded batch while its dense [B, T, S] mask has at most prefill_mask_limit entries,
        else one at a time (a dense mask for long ragged chunks costs B*T*S bytes and loses SDPA's causal fast path)."""
        k = len(rows)
        lens = [len(c) for c in chunks]
        T, S = max(lens), max(s + n for s, n in zip(starts, lens))
        same = len(set(zip(starts, lens))) == 1
        groups = [list(range(k))] if same or k * T * S <= self.prefill_mask_limit else [[i] for i in range(k)]
        last = torch.empty(k, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        every: list[torch.Tensor | None] = [None] * k
        for g in groups:
            b, t = len(g), max(lens[i] for i in g)
            ids = torch.zeros(b, t, dtype=torch.long, device=self.device)
            for j, i in enumerate(g):
                ids[j, : lens[i]] = torch.tensor(chunks[i], device=self.device)
            start = torch.tensor([starts[i] for i in g], device=self.device)
            # padding positions are clamped inside the row; they lie past its valid length and are never read
            pos = (start[:, None] + torch.arange(t, device=self.device)).clamp(max=self.max_seq_len - 1)
            kv_len = max(starts[i] + lens[i] for i in g)
            mask = None
            if len({(starts[i], lens[i]) for i in g}) > 1:
                mask = (torch.arange(kv_len, device=self.device) <= pos[..., None]).unsqueeze(1)
            self.cache.set_step(self.rows_index([rows[i] for i in g]), pos, kv_len)
            h = self.model.hidden_states(ids, pos, mask, self.cache.views, absorb=self.prefill_absorb)
            for j, i in enumerate(g):
                last[i] = h[j, lens[i] - 1]
                if want_all[i]:
                    every[i] = h[j, : lens[i]]
        return last, every

    @torch.inference_mode()
    def decode(self, rows: list[int], n: list[int], pending: list[int]) -> torch.Tensor:
        """One absorbed decode step: feed each row's pending token at position n_i; next logits [b, vocab] fp32."""
        idx = self.rows_index(rows)
        if self.compiled is not None and self.compiled.usable(idx):
            logits = self.compiled(idx, n[0], torch.tensor([pending], device=self.device))
            if logits is not None:
                return logits
        n_t = torch.tensor(n, device=self.device)
        pos = n_t[:, None]
        kv_len = max(n) + 1
        self.cache.set_step(idx, pos, kv_len)
        h = self.model.hidden_states(torch.tensor(pending, device=self.device)[:, None], pos,
                                     self.step_mask(n_t, 1, kv_len), self.cache.views, absorb=True)
        return self.model.lm_head(h[:, -1]).float()

    @torch.inference_mode()
    def copy_row(self, src: int, dst: int, upto: int, mtp: bool = False) -> None:
        """Cache row dst <- row src for positions < upto (a group member taking its leader's prompt, a request
        moving to a lower row); with mtp, the MTP module's cache row too."""
        caches = [self.cache] + ([self.mtp_cache] if mtp and self.mtp_cache is not None else [])
        for cache in caches:
            for buf in cache.tensors():
                buf[dst, :upto] = buf[src, :upto]

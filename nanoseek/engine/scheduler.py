"""Continuous batching: the request loop. Every `step()` admits waiting requests into free cache rows, prefills
them in chunks alongside the rows that decode, samples one token per decoding row (1 + a for a speculative row whose
first a drafts were accepted), and retires finished requests at once so their rows are free for the next step.

A request owns one row of the latent cache from admission to retirement; when a request retires, the one in the
highest row moves into its place, so live rows stay 0 .. b-1 and every forward reads a slice. Requests with an
identical prompt admitted while one of them is still prefilling (a GRPO group) follow that leader: when its
prefill ends they copy its row and sample from its logits, so the group's prompt is computed once. Otherwise the
prefix cache (nanoseek/engine/prefix_cache.py) supplies the longest cached prefix of the prompt.

Greedy output equals generating each prompt alone (tests/test_scheduler.py): a request's chunk boundaries depend only
on the request, and batch composition changes its logits only at float-rounding level (padded shapes reorder
reductions; about 1e-6 on the tiny test models), so only an exact near-tie could flip a token.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from nanoseek.engine.sampling import SamplingParams, sample, token_logprobs

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One prompt being served. `logprobs` asks for the log-probability of each generated token and of its
    `logprobs` most likely alternatives; `prompt_logprobs` for those of every prompt token after the first
    (echo with logprobs); `return_logits` for each generated token's fp32 logits."""

    prompt: list[int]
    params: SamplingParams
    speculative: int = 0  # MTP drafts per step (K); 0: plain decoding
    return_logits: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    # state, owned by the scheduler
    row: int | None = None
    n: int = 0  # positions of the row holding valid latents
    pending: int | None = None  # newest token: emitted, not in the cache yet
    output: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens reused (prefix cache or group leader) instead of computed
    finish_reason: str | None = None  # "stop", "length" or "abort"
    prompt_logprob_values: list = field(default_factory=list)  # (logprob, top [(id, logprob)]) per prompt token >= 1
    gen: torch.Generator | None = None
    leader: Request | None = None
    followers: list = field(default_factory=list)
    hidden: list = field(default_factory=list)  # speculative: prefill hidden states, for the MTP cache
    drafts: list[int] = field(default_factory=list)  # speculative: the next step's K drafts

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Event(NamedTuple):
    """One generated token of `request`; logits / logprob / top filled only when the request asked for them."""

    request: Request
    token: int
    logits: torch.Tensor | None = None
    logprob: float | None = None
    top: list | None = None


class Scheduler:
    def __init__(self, engine, prefill_chunk: int, prefill_budget: int | None = None):
        """prefill_chunk: the most prompt tokens one request prefills in a step; prefill_budget: the most prompt
        tokens a step prefills over all requests (None: no limit), though the first request always gets its chunk."""
        if prefill_chunk < 1 or (prefill_budget is not None and prefill_budget < 1):
            raise ValueError(f"prefill_chunk and prefill_budget must be >= 1, got {prefill_chunk}, {prefill_budget}")
        self.engine, self.prefill_chunk, self.prefill_budget = engine, prefill_chunk, prefill_budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_rows = list(range(engine.max_batch_size))
        self.prefilling: dict[tuple, Request] = {}  # prompt -> the leader prefilling it now

    # ------------------------------------------------------------------ requests in and out
    def add(self, req: Request) -> None:
        if not req.params.greedy:
            req.gen = torch.Generator(device=self.engine.device)
            req.gen.manual_seed(req.params.seed) if req.params.seed is not None else req.gen.seed()
        self.waiting.append(req)

    def abort(self, req: Request) -> None:
        """Drop a request now (client gone): its row is free for the next step."""
        if req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, "abort")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def usage(self) -> float:
        """Fraction of the latent cache's token slots holding live latents."""
        e = self.engine
        return sum(r.n for r in self.running) / (e.max_batch_size * e.max_seq_len)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if req.row is not None:
            self.running.remove(req)
            hole, req.row = req.row, None
            # keep live rows contiguous (0 .. b-1), so forwards read the cache through a slice instead of gathering
            # rows every layer and step: the request in the highest row moves into the hole (one row copy)
            last = max(self.running, key=lambda r: r.row, default=None)
            if last is not None and last.row > hole:
                self.engine.copy_row(last.row, hole, last.n, mtp=last.speculative)
                hole, last.row = last.row, hole
            self.free_rows.append(hole)
        if self.prefilling.get(tuple(req.prompt)) is req:
            del self.prefilling[tuple(req.prompt)]
        if req.leader is not None:  # a follower gone: its leader must not copy into a row that is no longer its
            req.leader.followers.remove(req)
            req.leader = None
        for f in req.followers:  # a leader gone before its prefill ended: followers prefill themselves
            f.leader = None
        req.followers, req.hidden = [], []

    # ------------------------------------------------------------------ one step
    def step(self) -> tuple[list[Event], list[Request]]:
        """Run one step; returns the tokens produced and the requests that finished in it."""
        events: list[Event] = []
        self._admit()
        decoding = [r for r in self.running if r.pending is not None]
        prefill = [r for r in self.running if r.pending is None and r.leader is None]
        finished: list[Request] = []
        if prefill:
            events += self._prefill(prefill, finished)
        plain = sorted((r for r in decoding if not r.speculative), key=lambda r: r.row)
        spec = sorted((r for r in decoding if r.speculative), key=lambda r: r.row)
        if plain:
            logits = self.engine.decode([r.row for r in plain], [r.n for r in plain], [r.pending for r in plain])
            for r in plain:
                r.n += 1
            events += self._emit(plain, logits, finished)
        for k in sorted({r.speculative for r in spec}):  # one verify forward per draft count
            events += self._spec([r for r in spec if r.speculative == k], finished)
        return events, finished

    def _admit(self) -> None:
        while self.waiting and self.free_rows:
            req = self.waiting.popleft()
            self.free_rows.sort()
            req.row = self.free_rows.pop(0)  # lowest free row: live rows stay mostly contiguous
            self.running.append(req)
            key = tuple(req.prompt)
            share = not (req.speculative or req.prompt_logprobs)  # these need the whole prompt computed
            leader = self.prefilling.get(key) if share else None
            if leader is not None:
                req.leader = leader
                leader.followers.append(req)
                continue
            pc = self.engine.prefix_cache
            if share and pc is not None:
                req.n = req.cached_tokens = pc.load(req.row, pc.match(req.prompt))
            if share:
                self.prefilling[key] = req

    def _prefill(self, reqs: list[Request], finished: list[Request]) -> list[Event]:
        """One prefill chunk for each request the step's budget admits; those whose prompt is then complete (and
        their followers) sample their first token."""
        chunks = self._chunks(reqs)
        want_all = [r.prompt_logprobs or r.speculative for r, _ in chunks]
        h_last, h_all = self.engine.prefill([r.row for r, _ in chunks], [r.n for r, _ in chunks],
                                            [r.prompt[r.n: r.n + c] for r, c in chunks], want_all)
        done, last = [], []
        for j, (r, c) in enumerate(chunks):
            if r.prompt_logprobs:
                self._prompt_logprobs(r, h_all[j], c)
            if r.speculative:
                r.hidden.append(h_all[j])
            r.n += c
            if r.n == len(r.prompt):
                done.append(r)
                last.append(h_last[j])
        if not done:
            return []
        rows, logits = self._prefilled(done, self.engine.logits(torch.stack(last)))
        for r in [r for r in rows if r.params.max_new_tokens == 0]:  # prompt logprobs only
            self._finish(r, "length")
            finished.append(r)
        keep = [j for j, r in enumerate(rows) if r.params.max_new_tokens > 0]
        if not keep:
            return []
        rows = [rows[j] for j in keep]
        events = self._emit(rows, torch.stack([logits[j] for j in keep]), finished)
        spec = [r for r in rows if r.speculative and not r.finished]
        if spec:
            from nanoseek.engine.speculative import mtp_prefill
            for k in sorted({r.speculative for r in spec}):
                group = [r for r in spec if r.speculative == k]
                drafts = mtp_prefill(self.engine, [r.row for r in group], [r.prompt for r in group],
                                     [torch.cat(r.hidden) for r in group], [r.pending for r in group], k)
                for r, d in zip(group, drafts.tolist()):
                    r.drafts, r.hidden = d, []
        return events

    def _chunks(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        """(request, tokens) chunks of at most prefill_chunk tokens each, in arrival order, while the step's budget
        lasts; the first always gets its chunk. Chunk boundaries depend only on the request itself (and the
        engine's prefill_chunk), so its latents do not depend on what else runs."""
        chunks = []
        budget = self.prefill_budget if self.prefill_budget is not None else float("inf")
        for r in reqs:
            c = min(len(r.prompt) - r.n, self.prefill_chunk)
            if chunks and c > budget:
                break
            chunks.append((r, c))
            budget -= c
        return sorted(chunks, key=lambda rc: rc[0].row)  # ascending rows: a slice of the cache when contiguous

    def _prefilled(self, done: list[Request], logits: torch.Tensor) -> tuple[list[Request], list[torch.Tensor]]:
        """Requests whose prompt is now in the cache: stored in the prefix cache, no longer leaders, and their
        followers given the leader's latents. Returns every such request with the logits it samples from."""
        pc = self.engine.prefix_cache
        rows, expanded = [], []
        for j, r in enumerate(done):
            if pc is not None and not r.speculative:
                pc.store(r.row, r.prompt)
            if self.prefilling.get(tuple(r.prompt)) is r:
                del self.prefilling[tuple(r.prompt)]
            rows.append(r)
            expanded.append(logits[j])
            for f in r.followers:
                self.engine.copy_row(r.row, f.row, r.n)
                f.n = f.cached_tokens = r.n
                f.leader = None
                rows.append(f)
                expanded.append(logits[j])
            r.followers = []
        return rows, expanded

    def _prompt_logprobs(self, r: Request, h: torch.Tensor, c: int) -> None:
        """Log-probabilities of prompt tokens n+1 .. n+c (those this chunk's positions predict), with the top ones."""
        nxt = r.prompt[r.n + 1: r.n + c + 1]
        r.prompt_logprob_values += token_logprobs(self.engine.logits(h[: len(nxt)]), nxt, max(r.logprobs or 1, 1))

    def _emit(self, reqs: list[Request], logits: torch.Tensor, finished: list[Request]) -> list[Event]:
        """Sample one token per request from logits [b, vocab], record it, retire finished requests."""
        greedy = logits.argmax(dim=-1).tolist()
        events = []
        for j, r in enumerate(reqs):
            tok = greedy[j] if r.params.greedy else int(sample(logits[j: j + 1], r.params, r.gen)[0])
            events.append(self._token(r, tok, logits[j], finished))
        return events

    def _token(self, r: Request, tok: int, logits: torch.Tensor, finished: list[Request]) -> Event:
        r.output.append(tok)
        r.pending = tok
        lp = top = None
        if r.logprobs is not None:
            (lp, top), = token_logprobs(logits[None], [tok], r.logprobs)
        ev = Event(r, tok, logits.clone() if r.return_logits else None, lp, top)
        if tok in r.params.stop_token_ids or len(r.output) >= r.params.max_new_tokens:
            self._finish(r, "stop" if tok in r.params.stop_token_ids else "length")
            finished.append(r)
        return ev

    def _spec(self, reqs: list[Request], finished: list[Request]) -> list[Event]:
        from nanoseek.engine.speculative import spec_step
        e = self.engine
        n = torch.tensor([r.n for r in reqs], device=e.device)
        verify, accepted, bonus, drafts = spec_step(
            e, e.rows_index([r.row for r in reqs]), n, torch.tensor([r.pending for r in reqs], device=e.device),
            torch.tensor([r.drafts for r in reqs], device=e.device), e.step_mask)
        e.stats.steps += 1
        acc, bonus, drafts = accepted.tolist(), bonus.tolist(), drafts.tolist()
        for r, a in zip(reqs, acc):  # every row's length first: a retirement below may move a row (copying < n)
            r.n += 1 + a
        events = []
        for j, r in enumerate(reqs):
            a = acc[j]
            e.stats.record(len(r.drafts), a)
            # the accepted drafts are the main model's own greedy choices, then its choice after them
            for k, tok in enumerate(r.drafts[:a] + [bonus[j]]):
                events.append(self._token(r, tok, verify[j, k], finished))
                if r.finished:
                    break
            r.pending, r.drafts = bonus[j], drafts[j]
        return events

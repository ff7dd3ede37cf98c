"""POST /v1/completions: a string, token ids, or a list of either; `echo` and `logprobs` (with echo, the prompt
tokens' log-probabilities too), as lm-evaluation-harness's `local-completions` model uses them to score."""

from __future__ import annotations

import json
import time
import uuid
from itertools import accumulate

from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from nanoseek.engine import Request
from nanoseek.serve.handler import Handler
from nanoseek.serve.protocol import APIError, CompletionRequest, TextState, usage


def add_completions_route(app, h: Handler) -> None:
    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        c = _Completion(h, await h.read(request, CompletionRequest), request)
        if c.req.stream:
            return StreamingResponse(c.sse(), media_type="text/event-stream")
        return await c.response()


def _engine_requests(h: Handler, req: CompletionRequest, encoded: list[list[int]]) -> tuple[list[Request], dict]:
    """n engine requests per prompt, and each one's (choice index, prompt index)."""
    reqs, origin = [], {}
    for pi, ids in enumerate(encoded):
        for j in range(req.n):
            r = Request(list(ids), h.params(req, list(ids), pi * req.n + j, "prompt"), logprobs=req.logprobs,
                        prompt_logprobs=req.echo and req.logprobs is not None)
            origin[r.id] = (len(reqs), pi)
            reqs.append(r)
    return reqs, origin


class _Completion:
    """One /v1/completions request: its engine requests, the text and logprobs they produced, and the replies."""

    def __init__(self, h: Handler, req: CompletionRequest, request: HTTPRequest):
        prompts = req.prompts()
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
        if req.stream and req.echo:
            raise APIError(400, "echo is not supported with stream: ask without stream (lm-evaluation-harness does)",
                           "echo", "invalid_value")
        self.h, self.req = h, req
        self.encoded = [h.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        self.reqs, self.origin = _engine_requests(h, req, self.encoded)
        self.job = h.job(self.reqs, request)
        self.states = {r.id: TextState(h.tokenizer, False, req.stop_strings()) for r in self.reqs}
        self.lps: dict[int, list] = {r.id: [] for r in self.reqs}
        self.sent = {r.id: (0, 0) for r in self.reqs}  # streamed so far: logprob entries, characters of their tokens
        self.cid, self.now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def finish_reason(self, r: Request) -> str:
        """Why the choice ended: a stop string or stop token, else the token limit."""
        return "stop" if self.states[r.id].stopped or r.finish_reason == "stop" else "length"

    def logprobs_of(self, r: Request, start: int = 0, offset: int = 0):
        """OpenAI's legacy logprobs object for the generated tokens from `start` on (text offsets from `offset`);
        with echo the prompt tokens come first (the first has no logprob)."""
        if self.req.logprobs is None:
            return None
        decode = self.h.tokenizer.decode
        toks, vals, tops = [], [], []
        if self.req.echo:
            toks += r.prompt
            vals.append(None)
            tops.append(None)
            for lp, top in r.prompt_logprob_values:
                vals.append(lp)
                tops.append({decode([t]): v for t, v in top[: max(self.req.logprobs, 1)]})
        for tok, lp, top in self.lps[r.id][start:]:
            toks.append(tok)
            vals.append(lp)
            tops.append({decode([t]): v for t, v in (top or [])} or {decode([tok]): lp})
        strs = [decode([t]) for t in toks]
        return {"tokens": strs, "token_logprobs": vals, "top_logprobs": tops,
                "text_offset": list(accumulate(map(len, strs), initial=offset))[:-1]}  # where each token starts

    def text_of(self, r: Request) -> str:
        """The choice's text, after the decoded prompt when echo is set."""
        prefix = self.h.tokenizer.decode(self.encoded[self.origin[r.id][1]]) if self.req.echo else ""
        return prefix + self.states[r.id].content

    def total_usage(self) -> dict:
        """Usage summed over every choice of every prompt."""
        reqs = self.reqs
        return usage(sum(len(r.prompt) for r in reqs), sum(len(r.output) for r in reqs),
                     sum(r.cached_tokens for r in reqs))

    def on_token(self, ev) -> str:
        """Feed one token to its text (and logprobs); returns the text it releases, stopping at a stop string."""
        st = self.states[ev.request.id]
        piece = st.push(ev.token)[1]
        if self.req.logprobs is not None:
            self.lps[ev.request.id].append((ev.token, ev.logprob, ev.top))
        if st.stopped:
            self.job.stop(ev.request)
        return piece

    async def response(self):
        """The whole reply once every choice is done; 499 when the client left."""
        if not await self.job.collect(self.on_token, self.states.values()):
            return Response(status_code=499)
        choices = [{"index": self.origin[r.id][0], "text": self.text_of(r), "logprobs": self.logprobs_of(r),
                    "finish_reason": self.finish_reason(r)} for r in self.reqs]
        return {"id": self.cid, "object": "text_completion", "created": self.now, "model": self.h.model_name,
                "choices": choices, "usage": self.total_usage()}

    def chunk(self, choices, **extra) -> str:
        """One SSE event."""
        return "data: " + json.dumps({"id": self.cid, "object": "text_completion", "created": self.now,
                                      "model": self.h.model_name, "choices": choices, **extra}) + "\n\n"

    def choice_chunk(self, r: Request, text: str, finish_reason: str | None) -> str:
        """One SSE event carrying one choice's text, and the logprobs of its tokens not sent yet."""
        start, offset = self.sent[r.id]
        lps = self.logprobs_of(r, start, offset) if start < len(self.lps[r.id]) else None
        if lps:
            self.sent[r.id] = (len(self.lps[r.id]), offset + sum(map(len, lps["tokens"])))
        return self.chunk([{"index": self.origin[r.id][0], "text": text, "logprobs": lps,
                            "finish_reason": finish_reason}])

    async def sse(self):
        """The SSE stream: text as it is released, a last chunk per choice with its finish_reason, then [DONE]."""
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        try:
            async for kind, x in self.job:
                r = x.request if kind == "token" else x
                if kind == "token":
                    piece = self.on_token(x)
                    if piece:
                        yield self.choice_chunk(r, piece, None)
                    if not self.states[r.id].stopped:
                        continue
                yield self.choice_chunk(r, self.states[r.id].flush()[1], self.finish_reason(r))
            if include_usage:
                yield self.chunk([], usage=self.total_usage())
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"

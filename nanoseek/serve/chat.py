"""POST /v1/chat/completions: messages through the chat template; the reply split into reasoning_content (and
`reasoning`) and content by token id (nanoseek/serve/protocol.py), streamed as SSE deltas or returned whole.
With `logprobs` (and `top_logprobs`) every generated token up to the one that ended the choice has an entry in
`logprobs.content`, reasoning and `</think>` included, as vLLM reports them; a stream sends each entry with the next
chunk of its choice, so the entries a stream sends add up to the non-streaming list."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from nanoseek.engine import Request
from nanoseek.serve.handler import Handler
from nanoseek.serve.protocol import APIError, ChatRequest, TextState, chat_messages, usage


def add_chat_route(app, h: Handler) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        c = _Chat(h, await h.read(request, ChatRequest), request)
        if c.req.stream:
            return StreamingResponse(c.sse(), media_type="text/event-stream")
        return await c.response()


def _delta(think: str, text: str) -> dict:
    """A stream delta: the reasoning under both names DeepSeek and others read, content only when there is some."""
    delta = {"reasoning_content": think, "reasoning": think} if think else {}
    if text:
        delta["content"] = text
    return delta


class _Chat:
    """One /v1/chat/completions request: its n engine requests, the text they produced, and the replies."""

    def __init__(self, h: Handler, req: ChatRequest, request: HTTPRequest):
        if not req.messages:
            raise APIError(400, "messages must be a non-empty list", "messages", "invalid_value")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        self.h, self.req = h, req
        self.ids = h.tokenizer.encode_chat(chat_messages(req), add_generation_prompt=True)
        k = (req.top_logprobs or 0) if req.logprobs else None  # the engine's logprobs: how many top ones, or None
        self.reqs = [Request(self.ids, h.params(req, self.ids, i, "messages"), logprobs=k) for i in range(req.n)]
        self.job = h.job(self.reqs, request)
        self.states = {r.id: TextState(h.tokenizer, True, req.stop_strings()) for r in self.reqs}
        self.index = {r.id: i for i, r in enumerate(self.reqs)}
        self.lps: dict[int, list] = {r.id: [] for r in self.reqs}  # logprobs.content entries per choice
        self.lps_sent = {r.id: 0 for r in self.reqs}  # how many of them a stream has sent
        self.cid, self.now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def finish_reason(self, r: Request) -> str:
        """Why the choice ended: a stop string or stop token, else the token limit."""
        return "stop" if self.states[r.id].stopped or r.finish_reason == "stop" else "length"

    def total_usage(self) -> dict:
        """Usage summed over the n choices, with their reasoning tokens."""
        reqs = self.reqs
        return usage(len(self.ids) * len(reqs), sum(len(r.output) for r in reqs), sum(r.cached_tokens for r in reqs),
                     sum(s.reasoning_tokens for s in self.states.values()))

    def on_token(self, ev) -> tuple[str, str]:
        """Feed one token to its choice's text (and logprobs); returns the (reasoning, content) it releases, stopping
        the choice at a stop string."""
        st = self.states[ev.request.id]
        if st.stopped:
            return "", ""
        if self.req.logprobs:
            self.lps[ev.request.id].append(self.h.logprobs.entry(ev.token, ev.logprob, ev.top))
        pieces = st.push(ev.token)
        if st.stopped:
            self.job.stop(ev.request)
        return pieces

    def logprobs_of(self, r: Request, start: int = 0) -> dict | None:
        """OpenAI's chat logprobs object for the choice's entries from `start` on (None when not asked for)."""
        return {"content": self.lps[r.id][start:], "refusal": None} if self.req.logprobs else None

    async def response(self):
        """The whole reply once every choice is done; 499 when the client left."""
        if not await self.job.collect(self.on_token, self.states.values()):
            return Response(status_code=499)
        choices = [{"index": self.index[r.id], "finish_reason": self.finish_reason(r), "logprobs": self.logprobs_of(r),
                    "message": {"role": "assistant", "content": self.states[r.id].content,
                                "reasoning_content": self.states[r.id].reasoning,
                                "reasoning": self.states[r.id].reasoning}} for r in self.reqs]
        return {"id": self.cid, "object": "chat.completion", "created": self.now, "model": self.h.model_name,
                "choices": choices, "usage": self.total_usage()}

    def chunk(self, choices, **extra) -> str:
        """One SSE event; with include_usage every chunk has a usage key (null until the last)."""
        body = {"id": self.cid, "object": "chat.completion.chunk", "created": self.now, "model": self.h.model_name,
                "choices": choices, **extra}
        if self.include_usage() and "usage" not in extra:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def delta_chunk(self, r: Request, delta: dict, finish_reason: str | None) -> str:
        """One SSE event carrying one choice's delta, and the logprobs of its tokens not sent yet."""
        start, self.lps_sent[r.id] = self.lps_sent[r.id], len(self.lps[r.id])
        lps = self.logprobs_of(r, start) if start < len(self.lps[r.id]) else None
        return self.chunk([{"index": self.index[r.id], "delta": delta, "logprobs": lps, "finish_reason": finish_reason}])

    def include_usage(self) -> bool:
        """Whether the stream ends with a usage chunk (stream_options.include_usage)."""
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    async def sse(self):
        """The SSE stream: a role chunk per choice, deltas as text is released, a last delta with the finish_reason
        per choice, then [DONE]."""
        for r in self.reqs:
            yield self.delta_chunk(r, {"role": "assistant", "content": ""}, None)
        try:
            async for kind, x in self.job:
                r = x.request if kind == "token" else x
                st = self.states[r.id]
                if kind == "token":
                    delta = _delta(*self.on_token(x))
                    if delta:
                        yield self.delta_chunk(r, delta, None)
                    if not st.stopped:
                        continue
                yield self.delta_chunk(r, _delta(*st.flush()), self.finish_reason(r))
            if self.include_usage():
                yield self.chunk([], usage=self.total_usage())
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"

"""POST /v1/chat/completions: messages through the chat template; the reply split into reasoning_content (and
`reasoning`) and content by token id (nanoseek/serve/protocol.py), streamed as SSE deltas or returned whole."""

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
        req = await h.read(request, ChatRequest)
        if not req.messages:
            raise APIError(400, "messages must be a non-empty list", "messages", "invalid_value")
        ids = h.tokenizer.encode_chat(chat_messages(req), add_generation_prompt=True)
        reqs = [Request(ids, h.params(req, ids, i, "messages")) for i in range(req.n)]
        job = h.job(reqs, request)
        states = {r.id: TextState(h.tokenizer, True, req.stop_strings()) for r in reqs}
        index = {r.id: i for i, r in enumerate(reqs)}
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def finish_reason(r: Request) -> str:
            return "stop" if states[r.id].stopped or r.finish_reason == "stop" else "length"

        def total_usage() -> dict:
            return usage(len(ids) * len(reqs), sum(len(r.output) for r in reqs), sum(r.cached_tokens for r in reqs),
                         sum(s.reasoning_tokens for s in states.values()))

        if not req.stream:
            async for kind, x in job:
                if kind == "token":
                    states[x.request.id].push(x.token)
                    if states[x.request.id].stopped:
                        job.stop(x.request)
            for st in states.values():
                st.flush()
            if job.disconnected:  # nobody to answer
                return Response(status_code=499)
            choices = [{"index": index[r.id], "finish_reason": finish_reason(r), "logprobs": None,
                        "message": {"role": "assistant", "content": states[r.id].content,
                                    "reasoning_content": states[r.id].reasoning,
                                    "reasoning": states[r.id].reasoning}} for r in reqs]
            return {"id": cid, "object": "chat.completion", "created": now, "model": h.model_name,
                    "choices": choices, "usage": total_usage()}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, **extra) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": h.model_name,
                    "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        async def sse():
            for r in reqs:
                yield chunk([{"index": index[r.id], "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            try:
                async for kind, x in job:
                    r = x.request if kind == "token" else x
                    st = states[r.id]
                    if kind == "token":
                        think, text = st.push(x.token)
                        delta = {"reasoning_content": think, "reasoning": think} if think else {}
                        if text:
                            delta["content"] = text
                        if delta:
                            yield chunk([{"index": index[r.id], "delta": delta, "logprobs": None,
                                          "finish_reason": None}])
                        if not st.stopped:
                            continue
                        job.stop(r)
                    think, text = st.flush()
                    delta = {"reasoning_content": think, "reasoning": think} if think else {}
                    if text:
                        delta["content"] = text
                    yield chunk([{"index": index[r.id], "delta": delta, "logprobs": None,
                                  "finish_reason": finish_reason(r)}])
                if include_usage:
                    yield chunk([], usage=total_usage())
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

"""POST /v1/completions: a string, token ids, or a list of either; `echo` and `logprobs` (with echo, the prompt
tokens' log-probabilities too), as lm-evaluation-harness's `local-completions` model uses them to score."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from nanoseek.engine import Request
from nanoseek.serve.handler import Handler
from nanoseek.serve.protocol import APIError, CompletionRequest, TextState, usage


def add_completions_route(app, h: Handler) -> None:
    def token_strs(ids: list[int]) -> list[str]:
        return [h.tokenizer.decode([t]) for t in ids]

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        req = await h.read(request, CompletionRequest)
        prompts = req.prompts()
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
        encoded = [h.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        reqs, origin = [], {}
        for pi, ids in enumerate(encoded):
            for j in range(req.n):
                r = Request(list(ids), h.params(req, list(ids), pi * req.n + j, "prompt"), logprobs=req.logprobs,
                            prompt_logprobs=req.echo and req.logprobs is not None)
                origin[r.id] = (len(reqs), pi)
                reqs.append(r)
        job = h.job(reqs, request)
        states = {r.id: TextState(h.tokenizer, False, req.stop_strings()) for r in reqs}
        lps: dict[int, list] = {r.id: [] for r in reqs}
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def finish_reason(r: Request) -> str:
            return "stop" if states[r.id].stopped or r.finish_reason == "stop" else "length"

        def logprobs_of(r: Request):
            if req.logprobs is None:
                return None
            toks, vals, tops = [], [], []
            if req.echo:
                toks += r.prompt
                vals.append(None)
                tops.append(None)
                for lp, top in r.prompt_logprob_values:
                    vals.append(lp)
                    tops.append({h.tokenizer.decode([t]): v for t, v in top[: max(req.logprobs, 1)]})
            for tok, lp, top in lps[r.id]:
                toks.append(tok)
                vals.append(lp)
                tops.append({h.tokenizer.decode([t]): v for t, v in (top or [])} or {h.tokenizer.decode([tok]): lp})
            strs = token_strs(toks)
            offsets, o = [], 0
            for s in strs:
                offsets.append(o)
                o += len(s)
            return {"tokens": strs, "token_logprobs": vals, "top_logprobs": tops, "text_offset": offsets}

        def text_of(r: Request) -> str:
            prefix = h.tokenizer.decode(encoded[origin[r.id][1]]) if req.echo else ""
            return prefix + states[r.id].content

        def total_usage() -> dict:
            return usage(sum(len(r.prompt) for r in reqs), sum(len(r.output) for r in reqs),
                         sum(r.cached_tokens for r in reqs))

        def on_token(ev) -> str:
            st = states[ev.request.id]
            piece = st.push(ev.token)[1]
            if req.logprobs is not None:
                lps[ev.request.id].append((ev.token, ev.logprob, ev.top))
            if st.stopped:
                job.stop(ev.request)
            return piece

        if not req.stream:
            async for kind, x in job:
                if kind == "token":
                    on_token(x)
            for st in states.values():
                st.flush()
            if job.disconnected:
                return Response(status_code=499)
            choices = [{"index": origin[r.id][0], "text": text_of(r), "logprobs": logprobs_of(r),
                        "finish_reason": finish_reason(r)} for r in reqs]
            return {"id": cid, "object": "text_completion", "created": now, "model": h.model_name,
                    "choices": choices, "usage": total_usage()}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, **extra) -> str:
            return "data: " + json.dumps({"id": cid, "object": "text_completion", "created": now,
                                          "model": h.model_name, "choices": choices, **extra}) + "\n\n"

        async def sse():
            try:
                async for kind, x in job:
                    r = x.request if kind == "token" else x
                    if kind == "token":
                        piece = on_token(x)
                        if piece:
                            yield chunk([{"index": origin[r.id][0], "text": piece, "logprobs": None,
                                          "finish_reason": None}])
                        if not states[r.id].stopped:
                            continue
                    yield chunk([{"index": origin[r.id][0], "text": states[r.id].flush()[1], "logprobs": None,
                                  "finish_reason": finish_reason(r)}])
                if include_usage:
                    yield chunk([], usage=total_usage())
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

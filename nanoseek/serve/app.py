"""The HTTP layer: an OpenAI-compatible FastAPI app over one EngineLoop (nanoseek/serve/worker.py).

    POST /v1/chat/completions   messages -> reasoning_content + content (streaming or not), n, stop, seed, usage
    POST /v1/completions        string or token-id prompt(s), echo, logprobs (lm-evaluation-harness scoring)
    GET  /v1/models, /health (503 once the engine loop has died), /metrics (Prometheus text), / (chat page)

With an api_key every route but /health and the static chat page (which asks for the key and sends it) answers
401 without `Authorization: Bearer <key>`. Every error has OpenAI's body {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.engine import Engine, Request, SamplingParams, request_seed
from nanoseek.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    TextState,
    chat_messages,
    usage,
    validation_error,
)
from nanoseek.serve.worker import EngineLoop, QueueFull

STATIC = Path(__file__).parent / "static"


class Job:
    """The engine requests of one HTTP request and the queue their tokens arrive on. Iterating yields
    ("token", Event) and ("done", Request); leaving early (client gone, stop string) aborts what is still open."""

    def __init__(self, loop: EngineLoop, reqs: list[Request], http: HTTPRequest | None):
        self.loop, self.reqs, self.http = loop, reqs, http
        self.q: asyncio.Queue = asyncio.Queue()
        self.open = {r.id for r in reqs}
        self.disconnected = False

    def submit(self) -> None:
        if self.loop.queued + len(self.reqs) > self.loop.max_queue:
            raise APIError(429, f"the request queue is full ({self.loop.max_queue} requests): retry later",
                           code="queue_full")
        try:
            for r in self.reqs:
                self.loop.submit(r, self.q)
        except QueueFull as e:
            self.close()
            raise APIError(429, str(e), code="queue_full") from None

    def stop(self, r: Request) -> None:
        if r.id in self.open:
            self.open.discard(r.id)
            self.loop.abort(r)

    def close(self) -> None:
        for r in self.reqs:
            self.stop(r)

    async def __aiter__(self):
        try:
            while self.open:
                try:
                    kind, x = await asyncio.wait_for(self.q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if self.http is not None and await self.http.is_disconnected():
                        self.disconnected = True
                        return  # the client left: finally frees the rows
                    continue
                if kind == "error":
                    raise APIError(503, x, code="engine_error")
                if kind == "token" and x.request.id not in self.open:
                    continue  # a request stopped here (stop string) may still have tokens in flight
                if kind == "done":
                    if x.id not in self.open:
                        continue
                    self.open.discard(x.id)
                yield kind, x
        finally:
            self.close()


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None, max_queue: int = 256,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    loop = EngineLoop(engine, model_name, max_queue)
    created = int(time.time())
    eos = tokenizer.eos_id

    @asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan)
    app.state.loop = loop

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return JSONResponse(APIError(500, f"internal error: {e!r}").body(), status_code=500)

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if (api_key and request.url.path not in ("/health", "/")
                and request.headers.get("authorization", "") != f"Bearer {api_key}"):
            e = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            return JSONResponse(e.body(), status_code=401)
        return await call_next(request)

    async def read(request: HTTPRequest, schema):
        """The JSON body validated against `schema`; 413 past max_body_bytes, 400 for bad JSON or fields."""
        if int(request.headers.get("content-length") or 0) > max_body_bytes:
            raise APIError(413, f"request body exceeds {max_body_bytes} bytes", code="body_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise APIError(413, f"request body exceeds {max_body_bytes} bytes", code="body_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist: this server serves {model_name!r}",
                           "model", "model_not_found")
        return req

    def params(req, prompt: list[int], i: int, param: str) -> SamplingParams:
        limit = req.limit()
        room = engine.max_seq_len - len(prompt)
        if limit is None:
            limit = room
        if room < 1 or limit > room:
            raise APIError(400, f"This model's maximum context length is {engine.max_seq_len} tokens. However, you "
                           f"requested {len(prompt) + max(limit, 1)} tokens ({len(prompt)} in the {param}, "
                           f"{limit} in the completion). Reduce the length of the {param} or max_tokens.",
                           param, "context_length_exceeded")
        try:
            sp = SamplingParams(limit, req.temperature, req.top_p, req.top_k,
                                (*(() if req.ignore_eos else (eos,)), *(req.stop_token_ids or ())),
                                request_seed(req.seed, i))
            engine.check_request(prompt, sp, what=f"the {param}")
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param, "invalid_value") from None
        return sp

    # ------------------------------------------------------------------ chat
    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        req = await read(request, ChatRequest)
        if not req.messages:
            raise APIError(400, "messages must be a non-empty list", "messages", "invalid_value")
        ids = tokenizer.encode_chat(chat_messages(req), add_generation_prompt=True)
        reqs = [Request(ids, params(req, ids, i, "messages")) for i in range(req.n)]
        job = Job(loop, reqs, request)
        job.submit()
        states = {r.id: TextState(tokenizer, True, req.stop_strings()) for r in reqs}
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
            return {"id": cid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": choices, "usage": total_usage()}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, **extra) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
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

    # ------------------------------------------------------------------ completions
    def token_strs(ids: list[int]) -> list[str]:
        return [tokenizer.decode([t]) for t in ids]

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        req = await read(request, CompletionRequest)
        prompts = req.prompts()
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
        encoded = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        reqs, origin = [], {}
        for pi, ids in enumerate(encoded):
            for j in range(req.n):
                r = Request(list(ids), params(req, list(ids), pi * req.n + j, "prompt"), logprobs=req.logprobs,
                            prompt_logprobs=req.echo and req.logprobs is not None)
                origin[r.id] = (len(reqs), pi)
                reqs.append(r)
        job = Job(loop, reqs, request)
        job.submit()
        states = {r.id: TextState(tokenizer, False, req.stop_strings()) for r in reqs}
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
                    tops.append({tokenizer.decode([t]): v for t, v in top[: max(req.logprobs, 1)]})
            for tok, lp, top in lps[r.id]:
                toks.append(tok)
                vals.append(lp)
                tops.append({tokenizer.decode([t]): v for t, v in (top or [])} or {tokenizer.decode([tok]): lp})
            strs = token_strs(toks)
            offsets, o = [], 0
            for s in strs:
                offsets.append(o)
                o += len(s)
            return {"tokens": strs, "token_logprobs": vals, "top_logprobs": tops, "text_offset": offsets}

        def text_of(r: Request) -> str:
            prefix = tokenizer.decode(encoded[origin[r.id][1]]) if req.echo else ""
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
            return {"id": cid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": choices, "usage": total_usage()}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, **extra) -> str:
            return "data: " + json.dumps({"id": cid, "object": "text_completion", "created": now,
                                          "model": model_name, "choices": choices, **extra}) + "\n\n"

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

    # ------------------------------------------------------------------ the rest
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "nanoseek", "max_model_len": engine.max_seq_len}]}

    @app.get("/health")
    async def health():
        if not loop.alive():
            return JSONResponse({"status": "error", "error": repr(loop.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(loop.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page():
        return HTMLResponse((STATIC / "chat.html").read_text())

    return app

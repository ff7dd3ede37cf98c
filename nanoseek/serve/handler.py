"""What every OpenAI route shares: reading and validating a request (`Handler.read`), turning it into engine
SamplingParams with the context-length check (`Handler.params`), and a `Job`, the engine requests of one HTTP
request with the queue their tokens arrive on."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request as HTTPRequest
from pydantic import ValidationError

from nanoseek.engine import Engine, Request, SamplingParams, request_seed
from nanoseek.serve.protocol import APIError, TokenLogprobs, validation_error
from nanoseek.serve.worker import EngineLoop, QueueFull


class Job:
    """The engine requests of one HTTP request and the queue their tokens arrive on. Iterating yields
    ("token", Event) and ("done", Request), and raises the APIError of a request the engine failed; leaving early
    (client gone, stop string) aborts what is still open."""

    def __init__(self, loop: EngineLoop, reqs: list[Request], http: HTTPRequest | None):
        self.loop, self.reqs, self.http = loop, reqs, http
        self.q: asyncio.Queue = asyncio.Queue()
        self.open = {r.id for r in reqs}
        self.disconnected = False

    def submit(self) -> None:
        if not self.loop.alive():
            raise APIError(503, f"the engine loop is not running ({self.loop.error!r}): restart the server",
                           code="engine_error")
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

    async def collect(self, on_token, states) -> bool:
        """Run a non-streamed reply to its end: every token through `on_token`, then the text states flushed.
        False when the client left (nobody to answer)."""
        async for kind, x in self:
            if kind == "token":
                on_token(x)
        for st in states:
            st.flush()
        return not self.disconnected

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
                if kind == "error":  # the engine failed on this request (500) or died (503)
                    req, err = x
                    if req.id in self.open:  # not one this job already stopped (stop string)
                        raise err
                    continue
                if kind == "token" and x.request.id not in self.open:
                    continue  # a request stopped here (stop string) may still have tokens in flight
                if kind == "done":
                    if x.id not in self.open:
                        continue
                    self.open.discard(x.id)
                yield kind, x
        finally:
            self.close()


class Handler:
    """The engine, tokenizer and engine loop, and the request checks every route runs."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, loop: EngineLoop, max_body_bytes: int):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.loop, self.max_body_bytes = loop, max_body_bytes
        self.logprobs = TokenLogprobs(tokenizer)

    def job(self, reqs: list[Request], http: HTTPRequest) -> Job:
        job = Job(self.loop, reqs, http)
        job.submit()
        return job

    async def read(self, request: HTTPRequest, schema):
        """The JSON body validated against `schema`; 413 past max_body_bytes, 400 for bad JSON or fields, 404 for
        another model."""
        if int(request.headers.get("content-length") or 0) > self.max_body_bytes:
            raise APIError(413, f"request body exceeds {self.max_body_bytes} bytes", code="body_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise APIError(413, f"request body exceeds {self.max_body_bytes} bytes", code="body_too_large")
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
        if req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist: this server serves {self.model_name!r}",
                           "model", "model_not_found")
        return req

    def params(self, req, prompt: list[int], i: int, param: str) -> SamplingParams:
        """SamplingParams of choice i; 400 when prompt + max_tokens exceed the context (both numbers said)."""
        limit = req.limit()
        room = self.engine.max_seq_len - len(prompt)
        if limit is None:
            limit = room
        if room < 1 or limit > room:
            raise APIError(400, f"This model's maximum context length is {self.engine.max_seq_len} tokens. "
                           f"However, you requested {len(prompt) + max(limit, 1)} tokens ({len(prompt)} in the {param}, "
                           f"{limit} in the completion). Reduce the length of the {param} or max_tokens.",
                           param, "context_length_exceeded")
        try:
            sp = SamplingParams(limit, req.temperature, req.top_p, req.top_k,
                                (*(() if req.ignore_eos else (self.tokenizer.eos_id,)), *(req.stop_token_ids or ())),
                                request_seed(req.seed, i))
            self.engine.check_request(prompt, sp, what=f"the {param}")
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param, "invalid_value") from None
        return sp

"""The HTTP layer: an OpenAI-compatible FastAPI app over one EngineLoop (nanoseek/serve/worker.py).

    POST /v1/chat/completions   messages -> reasoning_content + content (streaming or not), n, stop, seed, usage
    POST /v1/completions        string or token-id prompt(s), echo, logprobs (lm-evaluation-harness scoring)
    GET  /v1/models, /health (503 once the engine loop has died), /metrics (Prometheus text), / (chat page)

With an api_key every route but /health answers 401 without `Authorization: Bearer <key>`. The chat page at / also
takes the key as `/?key=<key>`, because a browser's address bar cannot send a header; the page then keeps the key
and sends it as the header on its API calls. Every error has OpenAI's body {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.engine import Engine
from nanoseek.serve.chat import add_chat_route
from nanoseek.serve.completions import add_completions_route
from nanoseek.serve.handler import Handler
from nanoseek.serve.protocol import APIError
from nanoseek.serve.worker import EngineLoop

STATIC = Path(__file__).parent / "static"


class _HideKey(logging.Filter):
    """uvicorn's access log writes each request's path with its query: keep the page's /?key=<key> out of it."""

    def filter(self, record):
        if isinstance(record.args, tuple):
            record.args = tuple(re.sub(r"([?&]key=)[^&\s]*", r"\1<hidden>", a) if isinstance(a, str) else a
                                for a in record.args)
        return True


_HIDE_KEY = _HideKey()


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None, max_queue: int = 256,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    loop = EngineLoop(engine, model_name, max_queue)
    if api_key:
        logging.getLogger("uvicorn.access").addFilter(_HIDE_KEY)  # once: the same filter is not added twice
    created = int(time.time())

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

    h = Handler(engine, tokenizer, model_name, loop, max_body_bytes)
    add_chat_route(app, h)
    add_completions_route(app, h)

    def authorized(request: HTTPRequest) -> bool:
        if not api_key or request.url.path == "/health":
            return True
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if request.url.path == "/" and hmac.compare_digest(request.query_params.get("key", "").encode(),
                                                            api_key.encode()):
            return True
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {api_key}".encode())

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if not authorized(request):
            e = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the page: /?key=<key>)",
                         code="invalid_api_key")
            return JSONResponse(e.body(), status_code=401)
        return await call_next(request)

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

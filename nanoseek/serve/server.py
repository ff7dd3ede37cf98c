"""Building and running a server: `load_app` from a checkpoint directory, and `ServerThread`, uvicorn in a
background thread on a local port (what tests and benchmarks/serve.py use; `nanoseek serve` runs uvicorn in the
foreground instead)."""

from __future__ import annotations

import os
import socket
import threading
import time


def load_app(model_dir: str, max_batch_size: int = 8, max_seq_len: int = 4096, kv_cache_dtype: str | None = None,
             max_queue: int = 256, api_key: str | None = None, dtype: str = "float32",
             served_model_name: str | None = None, prefix_cache_tokens: int | None = None,
             prefill_chunk: int = 512, prefill_budget: int = 2048):
    """(FastAPI app, engine) for a checkpoint directory that holds a tokenizer."""
    from nanoseek.chat import load_model
    from nanoseek.engine import Engine
    from nanoseek.serve.app import create_app

    model, tok, max_seq_len = load_model(model_dir, max_seq_len, dtype, "serve")
    if prefix_cache_tokens is None:  # the server caches prefixes by default: 4 full-length requests' worth
        prefix_cache_tokens = 4 * max_seq_len
    engine = Engine(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len, kv_cache_dtype=kv_cache_dtype,
                    prefix_cache_tokens=prefix_cache_tokens, prefill_chunk=prefill_chunk,
                    prefill_budget=prefill_budget)
    name = served_model_name or os.path.basename(os.path.normpath(model_dir))
    return create_app(engine, tok, name, api_key=api_key, max_queue=max_queue), engine


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """`with ServerThread(app) as url:` serves `app` on a free local port until the block ends; the port and the
    engine thread are closed on exit."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

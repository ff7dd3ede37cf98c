"""`nanoseek serve`: an OpenAI-compatible server (nanoseek/serve/) for a checkpoint, on FastAPI + uvicorn."""

from __future__ import annotations

import os

from nanoseek.cli.common import parser


def register(sub) -> None:
    p = parser(sub, "serve", "OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /metrics, "
                             "a chat page at /")
    p.add_argument("--model", required=True, help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1; 0.0.0.0 listens on every interface)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument("--max-batch-size", type=int, default=8, help="cache rows: requests decoding at once (default: 8)")
    p.add_argument("--max-seq-len", type=int, default=4096, help="prompt + generated tokens per request (default: 4096)")
    p.add_argument("--kv-cache-dtype", choices=["fp32", "bf16", "fp8"], default=None,
                   help="latent cache dtype (default: the weights' dtype)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a row before 429 (default: 256)")
    p.add_argument("--prefix-cache-tokens", type=int, default=None,
                   help="prefix cache budget in tokens, 0 = off (default: 4 x max-seq-len)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="most prompt tokens one request prefills per step (default: 512)")
    p.add_argument("--prefill-budget", type=int, default=2048,
                   help="most prompt tokens prefilled per step over all requests (default: 2048)")
    p.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' everywhere but /health; the chat page opens at "
                        "/?key=KEY (default: $NANOSEEK_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the directory name)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype (default: float32)")
    p.set_defaults(func=run)


def check(args) -> None:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    for flag in ("max_batch_size", "max_seq_len", "max_queue", "prefill_chunk", "prefill_budget"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")


def run(args) -> None:
    import uvicorn

    from nanoseek.serve.server import load_app

    check(args)
    app, engine = load_app(args.model, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                           kv_cache_dtype=args.kv_cache_dtype, max_queue=args.max_queue, api_key=args.api_key,
                           dtype=args.dtype, served_model_name=args.served_model_name,
                           prefix_cache_tokens=args.prefix_cache_tokens, prefill_chunk=args.prefill_chunk,
                           prefill_budget=args.prefill_budget)
    print(f"nanoseek serve: http://{args.host}:{args.port} (model {args.model}, {engine.max_batch_size} rows x "
          f"{engine.max_seq_len} tokens, {engine.kv_cache_dtype} cache)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")

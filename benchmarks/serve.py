"""Serving load test: nanoseek's server (continuous batching + prefix cache) against the same engine with static
batching and against transformers, on the same checkpoint. Reports what `vllm bench serve` reports: TTFT, TPOT,
ITL (p50 / p99, ms), request and output-token throughput, failures.

Backends (--backends):
  nanoseek      `nanoseek serve` in this process (uvicorn thread), driven over HTTP by an asyncio client
  static        the same Engine, static batching: requests in waves of `concurrency`, each wave run to completion
                (no HTTP; a wave's requests all start when the wave does)
  transformers  `transformers serve CKPT --continuous-batching` as a subprocess, over HTTP; when it does not come
                up (DeepseekV3 on CPU), transformers' `generate_batch` on the same requests in process, which gives
                throughput and end-to-end latency only (no TTFT / ITL), and the report says so

Workloads: fixed concurrency (--concurrency 1 4 16 32) and Poisson arrivals (--request-rate) over prompts of
--input-len LO HI tokens and --output-len LO HI new tokens (EOS ignored); --shared-prefix N: N requests sharing a
--prefix-len system prompt, one at a time, TTFT on the cache miss vs the hits; --soak N: N small requests at
concurrency 16, RSS before and after. Numbers belong in BENCHMARKS.md ("Serve"), measured on a quiet machine:

    python benchmarks/serve.py --model CKPT [--backends nanoseek static transformers] [--json out.json]
    python benchmarks/serve.py --tiny --num-prompts 8 --concurrency 4 --input-len 16 32 --output-len 4 8  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch

from nanoseek.serve.server import ServerThread, free_port, load_app


# ---------------------------------------------------------------------------------------------- requests
def make_requests(tok, n, input_len, output_len, seed=0, prefix: list[int] | None = None):
    """n (prompt text, max_tokens) pairs: random token ids decoded to text (re-encoding gives about as many)."""
    rng = random.Random(seed)
    lo = 300 if tok.vocab_size > 600 else 10  # past the special and reasoning tokens
    out = []
    for _ in range(n):
        ids = (prefix or []) + [rng.randrange(lo, tok.vocab_size - 4) for _ in range(rng.randint(*input_len))]
        out.append((tok.decode(ids, skip_special=True), rng.randint(*output_len)))
    return out


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def summarize(name, results, seconds):
    ok = [r for r in results if r.get("ok")]
    ttft = [r["ttft"] for r in ok if "ttft" in r]
    itl = [x for r in ok for x in r.get("itl", [])]
    tpot = [(r["e2e"] - r["ttft"]) / (r["out"] - 1) for r in ok if "ttft" in r and r["out"] > 1]
    out_tokens = sum(r["out"] for r in ok)
    ms = lambda xs, q: round(1000 * pct(xs, q), 2)
    return {"name": name, "requests": len(results), "failed": len(results) - len(ok), "seconds": round(seconds, 3),
            "request_throughput": round(len(ok) / seconds, 3), "output_throughput": round(out_tokens / seconds, 2),
            "ttft_ms_p50": ms(ttft, 50), "ttft_ms_p99": ms(ttft, 99), "tpot_ms_p50": ms(tpot, 50),
            "tpot_ms_p99": ms(tpot, 99), "itl_ms_p50": ms(itl, 50), "itl_ms_p99": ms(itl, 99),
            "first_error": next((r.get("error") for r in results if not r.get("ok")), None)}


# ---------------------------------------------------------------------------------------------- HTTP client
async def one_request(client, url, model, prompt, max_tokens, extra):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, **extra}
    t0 = time.perf_counter()
    res, last, chunks, usage = {"ok": False}, None, 0, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            itl = []
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:  # an error inside a 200 stream
                    res["error"] = str(ev["error"])[:300]
                    return res
                if ev.get("usage"):
                    usage = ev["usage"]
                if not any(c.get("text") for c in ev.get("choices", [])):
                    continue
                now = time.perf_counter()
                if last is None:
                    res["ttft"] = now - t0
                else:
                    itl.append(now - last)
                last, chunks = now, chunks + 1
        res.update(ok=True, e2e=time.perf_counter() - t0, itl=itl,
                   out=usage["completion_tokens"] if usage else chunks)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res["error"] = repr(e)
    return res


# nanoseek (and vLLM) take ignore_eos, so every request generates exactly max_tokens; transformers serve rejects
# unknown fields, so there a request may end early at EOS (counted tokens are what it really generated)
NANOSEEK_EXTRA = {"ignore_eos": True, "stream_options": {"include_usage": True}}


async def run_http(url, model, reqs, concurrency=None, rate=None, seed=0, extra=NANOSEEK_EXTRA):
    """Closed loop at `concurrency`, or open loop with Poisson arrivals at `rate` requests/s."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=max(concurrency or 0, 64))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        if rate:
            tasks = []
            for p, m in reqs:
                tasks.append(asyncio.create_task(one_request(client, url, model, p, m, extra)))
                await asyncio.sleep(rng.expovariate(rate))
            results = await asyncio.gather(*tasks)
        else:
            sem = asyncio.Semaphore(concurrency)

            async def limited(p, m):
                async with sem:
                    return await one_request(client, url, model, p, m, extra)
            results = await asyncio.gather(*[limited(p, m) for p, m in reqs])
        return list(results), time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- static batching
def run_static(engine, tok, reqs, concurrency):
    """Waves of `concurrency` requests through Engine.stream; a wave's requests start together and the next wave
    starts when the longest one ends (static batching)."""
    from nanoseek.engine import SamplingParams

    results, t_start = [], time.perf_counter()
    for i in range(0, len(reqs), concurrency):
        wave = reqs[i: i + concurrency]
        prompts = [tok.encode(p) for p, _ in wave]
        n = max(m for _, m in wave)  # one SamplingParams per call: the wave runs to its longest output
        t0 = time.perf_counter()
        times = [[] for _ in wave]
        for ev in engine.stream(prompts, SamplingParams(n, temperature=0)):
            times[ev.seq].append(time.perf_counter())
        for (_, m), ts in zip(wave, times):
            ts = ts[:m]
            results.append({"ok": True, "ttft": ts[0] - t0, "e2e": ts[-1] - t0, "out": len(ts),
                            "itl": [b - a for a, b in itertools.pairwise(ts)]})
    return results, time.perf_counter() - t_start


# ---------------------------------------------------------------------------------------------- transformers
def start_transformers(ckpt, port, timeout=300):
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    proc = subprocess.Popen([exe, "serve", ckpt, "--continuous-batching", "--device", "cpu", "--port", str(port),
                             "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    err = proc.stderr.read().decode(errors="replace")[-500:] if proc.stderr else ""
    raise RuntimeError(f"transformers serve did not come up: {err}")


def run_transformers_offline(ckpt, tok, reqs, concurrency):
    """transformers in process on the same requests: `generate_batch` (its continuous batching), else `generate`
    in left-padded waves of `concurrency` (static batching). Throughput and end-to-end time only."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    inputs = [tok.encode(p) for p, _ in reqs]
    n = max(m for _, m in reqs)
    gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_id,
                          eos_token_id=tok.eos_id)
    t0 = time.perf_counter()
    try:
        outs = model.generate_batch(inputs=inputs, generation_config=gc, progress_bar=False)
        how, counts = "generate_batch", [len(o.generated_tokens) for o in outs.values()]
        if sum(counts) < sum(m for _, m in reqs):  # it logs failed requests rather than raising
            raise RuntimeError(f"generate_batch returned {sum(counts)} of {sum(m for _, m in reqs)} tokens")
    except Exception as e:  # noqa: BLE001 - say why, then fall back to plain generate
        print(f"transformers generate_batch failed ({str(e)[:200]}); generate in padded waves instead",
              file=sys.stderr)
        how, counts = f"generate (waves of {concurrency}, left-padded)", []
        t0 = time.perf_counter()
        for i in range(0, len(inputs), concurrency):
            wave = inputs[i: i + concurrency]
            T = max(map(len, wave))
            ids = torch.tensor([[tok.pad_id] * (T - len(x)) + x for x in wave])
            mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in wave])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
            counts += [min(out.shape[1] - T, m) for (_, m) in reqs[i: i + concurrency]]  # useful tokens only
    seconds = time.perf_counter() - t0
    return [{"ok": True, "out": c, "e2e": seconds} for c in counts], seconds, how


# ---------------------------------------------------------------------------------------------- main
def tiny_checkpoint(root):
    from nanoseek import ModelConfig, Transformer
    from nanoseek.data import default_corpus_files
    from nanoseek.tokenizer import load_tokenizer, train_tokenizer

    train_tokenizer(default_corpus_files(max_bytes=100_000), 384, root)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny").replace(vocab_size=load_tokenizer(root).vocab_size)
    Transformer(cfg).save_pretrained(root)
    return root


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (with tokenizer.json)")
    ap.add_argument("--tiny", action="store_true", help="a random tiny checkpoint in a temp dir (smoke runs)")
    ap.add_argument("--backends", nargs="+", default=["nanoseek", "static", "transformers"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--request-rate", type=float, nargs="*", default=[], help="Poisson arrivals, requests/s")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, nargs=2, default=[128, 1024])
    ap.add_argument("--output-len", type=int, nargs=2, default=[64, 256])
    ap.add_argument("--shared-prefix", type=int, default=0, help="requests in the shared-system-prompt workload")
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--soak", type=int, default=0, help="requests in the soak run (2000 in the issue)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--transformers-timeout", type=float, default=300, help="seconds for `transformers serve` to start")
    ap.add_argument("--json", help="write all results to this file")
    args = ap.parse_args(argv)
    if not args.model and not args.tiny:
        ap.error("give --model CKPT or --tiny")
    ckpt = args.model or tiny_checkpoint(tempfile.mkdtemp(prefix="nanoseek-bench-"))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the rest for the HTTP client and server loop
    from nanoseek.tokenizer import load_tokenizer
    tok = load_tokenizer(ckpt)
    name = os.path.basename(os.path.normpath(ckpt))
    # fresh prompts per concurrency level (seed = level), the same for every backend: no level is served from
    # another level's prefix cache
    reqs = {c: make_requests(tok, args.num_prompts, args.input_len, args.output_len, seed=c) for c in args.concurrency}
    report = {"checkpoint": ckpt, "args": vars(args), "runs": []}

    def show(row):
        report["runs"].append(row)
        print(json.dumps(row), flush=True)

    app, engine = load_app(ckpt, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                           max_queue=100_000)
    if "nanoseek" in args.backends:
        with ServerThread(app) as url:
            for c in args.concurrency:
                res, s = asyncio.run(run_http(url, name, reqs[c], concurrency=c))
                show({**summarize(f"nanoseek c={c}", res, s), "backend": "nanoseek", "concurrency": c})
            for i, rate in enumerate(args.request_rate):
                res, s = asyncio.run(run_http(url, name, make_requests(tok, args.num_prompts, args.input_len,
                                                                       args.output_len, seed=1000 + i), rate=rate))
                show({**summarize(f"nanoseek poisson {rate}/s", res, s), "backend": "nanoseek", "rate": rate})
            if args.shared_prefix:
                prefix = [random.Random(1).randrange(10, tok.vocab_size - 4) for _ in range(args.prefix_len)]
                shared = make_requests(tok, args.shared_prefix, (16, 32), (8, 8), seed=2, prefix=prefix)
                res, _ = asyncio.run(run_http(url, name, shared, concurrency=1))
                cold = make_requests(tok, args.shared_prefix, (args.prefix_len, args.prefix_len), (8, 8), seed=3)
                miss, _ = asyncio.run(run_http(url, name, cold, concurrency=1))
                hit_ttft = statistics.median(r["ttft"] for r in res[1:] if r.get("ok"))
                miss_ttft = statistics.median(r["ttft"] for r in miss if r.get("ok"))
                show({"name": "shared prefix", "backend": "nanoseek", "ttft_ms_miss": round(1000 * miss_ttft, 2),
                      "ttft_ms_hit": round(1000 * hit_ttft, 2), "miss_over_hit": round(miss_ttft / hit_ttft, 2)})
            if args.soak:
                small = make_requests(tok, args.soak, (32, 128), (8, 16), seed=4)
                before = rss_bytes()
                res, s = asyncio.run(run_http(url, name, small, concurrency=16))
                after = rss_bytes()
                show({**summarize(f"soak {args.soak}", res, s), "backend": "nanoseek", "rss_before": before,
                      "rss_after": after, "rss_growth_pct": round(100 * (after - before) / before, 2)})
    if "static" in args.backends:
        from nanoseek.engine import Engine
        static = Engine(engine.model, max_batch_size=args.max_batch_size, max_seq_len=engine.max_seq_len,
                        prefix_cache_tokens=0)  # its own cache, nothing reused from the nanoseek runs
        for c in args.concurrency:
            res, s = run_static(static, tok, reqs[c], min(c, args.max_batch_size))
            show({**summarize(f"static c={c}", res, s), "backend": "static", "concurrency": c})
    if "transformers" in args.backends:
        port, served = free_port(), False
        try:
            proc = start_transformers(ckpt, port, args.transformers_timeout)
        except (RuntimeError, FileNotFoundError) as e:
            print(f"{e}", file=sys.stderr)
        else:
            try:
                for c in args.concurrency:
                    res, s = asyncio.run(run_http(f"http://127.0.0.1:{port}", ckpt, reqs[c], concurrency=c,
                                                  extra={}))
                    row = summarize(f"transformers serve c={c}", res, s)
                    if row["failed"] == row["requests"]:
                        print(f"transformers serve failed every request: {row['first_error']}", file=sys.stderr)
                        break
                    served = True
                    show({**row, "backend": "transformers", "concurrency": c})
            finally:
                proc.kill()
                proc.wait()
        if not served:
            print("timing transformers in process instead", file=sys.stderr)
            for c in args.concurrency:
                res, s, how = run_transformers_offline(ckpt, tok, reqs[c], c)
                show({**summarize(f"transformers {how}", res, s), "backend": "transformers", "concurrency": c,
                      "note": "transformers serve could not serve this checkpoint: throughput only, no TTFT/ITL"})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

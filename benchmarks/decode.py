"""Decode speed against the memory roofline, and KV-cache size: nanoseek's Engine (latent cache, absorbed decode)
beside transformers' DeepseekV3ForCausalLM (model.generate, DynamicCache, sdpa attention) on the same random weights.
nanoseek runs twice: its plain eager path (compile=False) and the compiled batch-1 decode step
(nanoseek/engine/decode.py; batch > 1 takes the plain path either way).

    python benchmarks/decode.py                 # contexts 256, 2048, 8192 at batch 1 and 8
    python benchmarks/decode.py --quick         # 256 and 2048, batch 1
    python benchmarks/decode.py --contexts 8192 --batches 1 --json
    python benchmarks/decode.py --quick --device cuda   # on a GPU (make gpu-check): the roofline of its memory
    python benchmarks/decode.py --compare-prefill   # also time nanoseek prefill: expanded vs absorbed attention
    python benchmarks/decode.py --speculative runs/demo/run/latest --repeats 11   # MTP self-speculative decoding
    python benchmarks/decode.py --speculative runs/demo/run/latest --draft-tokens 3   # 3 chained MTP drafts a step

Roofline: at batch 1 a decode step is bound by reading the weights. The same run measures this machine's
weight-read rate (GB/s of a large matrix-vector product, 16384 x 8192, at the benchmark's dtype and thread count)
and counts the bytes a decode step must read from the config: every active parameter less the embedding (one row
of it is read) at the weight dtype, the experts that a batch of b tokens chooses (b tokens of uniform routing pick
E (1 - (1 - k/E)^b) distinct experts of E), plus the latent cache read at the mean context of the decode. Achieved
GB/s = bytes per token x tok/s; the roofline fraction is that over the rate measured beside the same row (on a
shared host the rate drifts by tens of percent over minutes).

Both run greedy with no stop token for --new-tokens tokens. Prefill time is the time to the first new token;
decode tokens/s counts the remaining batch * (new_tokens - 1) tokens over the time after it (transformers is
timed through a streamer, nanoseek through Engine.stream). Cache bytes per token: nanoseek's allocated cache
divided by its token slots; transformers' DynamicCache tensors after a prefill divided by batch * length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanoseek import ModelConfig, Transformer  # noqa: E402
from nanoseek.config import PRESETS  # noqa: E402
from nanoseek.engine import Engine, SamplingParams  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def machine(device="cpu") -> dict:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def weight_read_rate(dtype: torch.dtype, repeats: int = 9, device="cpu") -> float:
    """GB/s of a large matrix-vector product (16384 x 8192, 537 MB in fp32) at the current thread count (on CPU):
    the rate at which this machine streams weights from memory (on a GPU, from its memory). Median of `repeats`
    after two warm-ups."""
    w = torch.randn(16384, 8192, device=device).to(dtype)
    x = torch.randn(8192, device=device).to(dtype)
    for _ in range(2):
        torch.mv(w, x)
    ts = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        torch.mv(w, x)
        sync(device)
        ts.append(time.perf_counter() - t0)
    return w.numel() * w.element_size() / statistics.median(ts) / 1e9


def head_layout_rates(vocab: int, d: int, copies: int = 8, repeats: int = 5) -> dict:
    """GB/s of the output head's product with one row at the current thread count, three ways: BLAS over the
    weight as stored ([vocab, d], rows of d numbers), the compiled step's streaming reduction over the same rows,
    and BLAS over a [d, vocab] copy (rows of vocab numbers; what the compiled step uses on CPU). `copies` heads in
    turn, so each is read from memory, not cache (8 x 32000 x 512 fp32 is 524 MB)."""
    buf = torch.randn(copies, vocab * d)
    rows, cols = buf.view(copies, vocab, d), buf.view(copies, d, vocab)  # the same bytes, two layouts
    x, xt = torch.randn(1, d), torch.randn(d)
    reduce = torch.compile(lambda x_, w: (x_ * w).sum(-1))
    ways = {"blas_rows_of_d": lambda i: torch.mv(rows[i], xt), "compiled_rows_of_d": lambda i: reduce(x, rows[i]),
            "blas_rows_of_vocab": lambda i: torch.mv(cols[i].t(), xt)}
    out = {}
    for name, f in ways.items():
        f(0)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(copies):
                f(i)
            ts.append(time.perf_counter() - t0)
        out[name] = buf.numel() * 4 / statistics.median(ts) / 1e9
    return out


def step_bytes(cfg, model, batch: int, context: float, weight_bytes: int, cache_bytes_per_token: int) -> float:
    """Bytes one decode step of `batch` rows must read: the main model's parameters less the embedding and the
    MTP modules, with only the routed experts the batch chooses, plus each row's latent cache up to `context`."""
    embed = model.embed_tokens.weight
    mtp = {id(p) for p in model.mtp.parameters()}
    experts = {id(p) for m in model.moe_layers(include_mtp=False) for p in m.experts.parameters()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in mtp and id(p) not in experts and p is not embed)
    routed = sum(p.numel() for m in model.moe_layers(include_mtp=False) for p in m.experts.parameters())
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    chosen = e * (1 - (1 - k / e) ** batch) if e else 0
    if cfg.tie_word_embeddings:  # the output head is the embedding, read whole
        dense += embed.numel()
    params = dense + (routed * chosen / e if e else 0) + cfg.hidden_size * batch  # one embedding row per token
    return params * weight_bytes + batch * context * cache_bytes_per_token


def build_models(preset: str, dtype: torch.dtype, seed: int, device="cpu"):
    import transformers
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset(preset)
    ours = Transformer(cfg).to(dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(os.path.join(tmp, "ckpt"))
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "ckpt"), dtype=dtype,
                                                               attn_implementation="sdpa").eval()
    return cfg, ours.to(device), hf.to(device)


class _Clock:
    """A transformers streamer that timestamps each put(): the first is the prompt, then one per new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        sync(value.device)  # on a GPU the token is only known once its step has run
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_hf(hf, prompts: torch.Tensor, new_tokens: int):
    prompts = prompts.to(hf.device)
    clock = _Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0)
    t_end = time.perf_counter()
    first = clock.times[1]
    return out[:, prompts.shape[1]:].tolist(), first - t0, t_end - first


def run_ours(engine: Engine, prompts: list[list[int]], new_tokens: int):
    out = [[] for _ in prompts]
    t0 = time.perf_counter()
    first = None
    for ev in engine.stream(prompts, SamplingParams(new_tokens, temperature=0)):
        if first is None:
            first = time.perf_counter()  # the whole batch is prefilled before the first event
        out[ev.seq].append(ev.token)
    t_end = time.perf_counter()
    return out, first - t0, t_end - first


@torch.inference_mode()
def hf_cache_bytes_per_token(hf, length: int) -> int:
    ids = torch.randint(0, hf.config.vocab_size, (1, length), device=hf.device)
    cache = hf(ids, use_cache=True).past_key_values
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    return total // length


@torch.inference_mode()
def time_prefill_paths(ours, ctx: int, max_seq_len: int) -> dict:
    eng = Engine(ours, max_batch_size=1, max_seq_len=max_seq_len)
    prompt = [torch.randint(0, ours.config.vocab_size, (ctx,)).tolist()]
    res = {}
    for absorb in (False, True):
        eng.prefill_absorb = absorb
        _, t_prefill, _ = run_ours(eng, prompt, 1)
        res["absorbed" if absorb else "expanded"] = t_prefill
    return res


def _spread(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = lambda f: xs[min(len(xs) - 1, round(f * (len(xs) - 1)))]  # noqa: E731
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q(0.25), "q3": q(0.75)}


def step_costs(engine: Engine, n: int, k: int = 1, repeats: int = 30) -> dict:
    """Median seconds of one compiled batch-1 step at `n` cached tokens: a plain decoding step and a speculative
    one with k drafts (verify k + 1 tokens, run the MTP block over them, then k - 1 more times to chain the
    drafts). Writes cache positions n .. n + 2k - 1 of row 0 (scratch; the drafts are rejected, a = 0)."""
    c, rows, dev = engine.compiled, slice(0, 1), engine.device
    one, pend, drafts = torch.tensor([[5]], device=dev), torch.tensor([5], device=dev), torch.full((1, k), 6, device=dev)
    steps = {"plain": lambda: c(rows, n, one),
             "speculative": lambda: c.speculate(rows, n, pend, drafts, engine.mtp_cache)}
    out = {}
    with torch.inference_mode():
        for name, f in steps.items():
            ts = []
            for _ in range(repeats + 3):
                t0 = time.perf_counter()
                f()
                sync(dev)
                ts.append(time.perf_counter() - t0)
            out[name] = statistics.median(ts[3:])
    return out


def time_speculative(ckpt: str, prompt: str, new_tokens: int, repeats: int, k: int = 1, device="cpu") -> dict:
    """Greedy decoding of one prompt from a trained checkpoint with an MTP module, plain and self-speculative with
    k drafts a step. One untimed call of each first (cache allocation, kernel choice), then `repeats` timed pairs,
    alternating so that a change in machine load hits both; reports the median and spread of each and of the
    per-pair ratio, and the acceptance overall and per draft position. `ckpt` may also name a preset (random
    weights, a random 256-token prompt): then the step costs are what matters, since a random MTP module's drafts
    are almost never accepted."""
    if ckpt in PRESETS:
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset(ckpt)).to(device).eval()
        prompts = [torch.randint(2, model.config.vocab_size, (256,)).tolist()]
    else:
        from nanoseek.tokenizer import load_tokenizer
        model = Transformer.from_pretrained(ckpt).to(device).eval()
        prompts = [load_tokenizer(ckpt).encode(prompt, add_bos=True)]
    engine = Engine(model, max_batch_size=1, max_seq_len=len(prompts[0]) + new_tokens + 2 * (k - 1) + 16)
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    plain = engine.generate(prompts, greedy)
    spec = engine.generate(prompts, greedy, speculative=k)
    stats = engine.stats
    t_plain, t_spec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.generate(prompts, greedy)
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.generate(prompts, greedy, speculative=k)
        t_spec.append(time.perf_counter() - t0)
    costs = step_costs(engine, len(prompts[0]), k) if "speculate" in getattr(engine.compiled, "kinds", ()) else None
    return {"identical": plain == spec, "draft_tokens": k, "acceptance_rate": stats.acceptance_rate,
            "acceptance_by_position": stats.acceptance_by_position, "steps": stats.steps,
            "tokens_per_step": (stats.drafted_at[0] + stats.accepted) / max(stats.drafted_at[0], 1),
            "repeats": repeats, "step_costs_s": costs,
            "compiled": engine.compiled is not None and "speculate" in engine.compiled.kinds and not engine.compiled.failed,
            "compile_s": engine.compile_seconds,
            "plain_s": _spread(t_plain), "speculative_s": _spread(t_spec),
            "speedup": _spread([p / s for p, s in zip(t_plain, t_spec)])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and caches of both models")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 2048, 8192])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="contexts 256 and 2048, batch 1")
    ap.add_argument("--compare-prefill", action="store_true", help="time nanoseek prefill, expanded vs absorbed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: both models, and the roofline's matrix (make "
                    "gpu-check passes cuda)")
    ap.add_argument("--skip-transformers", action="store_true",
                    help="time nanoseek only (transformers' columns print nan): for rows too large for its prefill")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both models (1 avoids OpenMP spin-waiting on a busy shared machine)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--speculative", metavar="CKPT", default=None,
                    help="instead: time MTP self-speculative against plain greedy decoding on a trained checkpoint "
                         "(or a preset name, random weights: for the cost of one step)")
    ap.add_argument("--prompt", default="def ", help="with --speculative: the prompt")
    ap.add_argument("--repeats", type=int, default=11, help="with --speculative: timed pairs after a warm-up")
    ap.add_argument("--draft-tokens", type=int, default=1, metavar="K",
                    help="with --speculative: MTP drafts per step (the module chained K times)")
    args = ap.parse_args(argv)
    if args.quick:
        args.contexts, args.batches = [256, 2048], [1]
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.speculative:
        new_tokens = args.new_tokens if "--new-tokens" in (argv or sys.argv) else 64
        k = args.draft_tokens
        res = time_speculative(args.speculative, args.prompt, new_tokens, args.repeats, k, args.device)
        info = machine(args.device)
        sp = res["speedup"]
        print(f"self-speculative decoding (K = {k} MTP draft{'s' if k > 1 else ''} per step), {args.speculative}, "
              f"prompt {args.prompt!r}, {new_tokens} greedy tokens, batch 1")
        print(f"machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, "
              + (f"GPU {info['gpu']}, " if "gpu" in info else "") + f"torch {info['torch']}")
        by_pos = res["acceptance_by_position"]
        # draft j + 1 is only accepted after draft j: the conditional rate is the chained module's own accuracy
        cond = [a / b if b else 0.0 for a, b in zip(by_pos, [1.0] + by_pos[:-1])]
        print(f"same tokens as plain greedy: {res['identical']}; draft acceptance {res['acceptance_rate']:.0%} "
              f"({res['tokens_per_step']:.2f} tokens per step, {res['steps']} steps)")
        print("acceptance by draft position: " + ", ".join(f"{a:.0%}" for a in by_pos)
              + "; given the previous draft accepted: " + ", ".join(f"{c:.0%}" for c in cond))
        print("decode steps: " + (f"compiled (both plain and speculative; {res['compile_s']:.1f} s to compile, in the "
                                  "untimed warm-up)" if res["compiled"] else "plain eager path (NANOSEEK_COMPILE=0)"))
        for name in ("plain_s", "speculative_s"):
            r = res[name]
            print(f"{name[:-2]:>12}: median {r['median']:.3f} s (min {r['min']:.3f}, max {r['max']:.3f})")
        print(f"speed-up, speculative / plain, over {res['repeats']} timed pairs after a warm-up: median "
              f"{sp['median']:.2f}x, interquartile {sp['q1']:.2f}-{sp['q3']:.2f}x, "
              f"range {sp['min']:.2f}-{sp['max']:.2f}x")
        if res["step_costs_s"]:
            c = res["step_costs_s"]
            print(f"one compiled step (median of 30): plain {c['plain'] * 1e3:.2f} ms, speculative (K = {k}) "
                  f"{c['speculative'] * 1e3:.2f} ms = {c['speculative'] / c['plain']:.2f} plain steps (speculation "
                  f"pays when that is under the tokens per step, {res['tokens_per_step']:.2f})")
        if args.json:
            print(json.dumps({"machine": info, "speculative": res}))
        return

    cfg, ours, hf = build_models(args.preset, dtype, args.seed, args.device)
    max_seq_len = max(args.contexts) + args.new_tokens
    engines = {(b, comp): Engine(ours, max_batch_size=b, max_seq_len=max_seq_len, kv_cache_dtype=args.dtype,
                                 compile=comp) for b in args.batches for comp in (False, True)}
    bytes_ours = {d: Engine(ours, max_batch_size=1, max_seq_len=16, kv_cache_dtype=d).kv_cache_bytes_per_token()
                  for d in ("fp32", "bf16", "fp8")}
    bytes_hf = hf_cache_bytes_per_token(hf, 64)
    hf_elem = torch.finfo(dtype).bits // 8

    # warm up all (first calls allocate and pick kernels; the compiled engines compile their batch-1 step here)
    for (b, comp), eng in engines.items():
        run_ours(eng, [[1, 2, 3, 4]] * b, 4)
        if comp and b == 1:
            run_ours(eng, [[1, 2, 3, 4]], 4)  # a second request: compiled once per engine, not per request
            with torch.inference_mode():  # one step at the longest context: past 4,096 cached tokens the
                # compiler specialises once more (nanoseek/engine/decode.py, CompiledDecode._run)
                eng.compiled(slice(0, 1), max(args.contexts), torch.tensor([[1]], device=eng.device))
    compile_s = next((e.compile_seconds for (b, c), e in engines.items() if c and e.compile_seconds), None)
    compile_failed = any(e.compiled is not None and e.compiled.failed for e in engines.values())
    run_hf(hf, torch.tensor([[1, 2, 3, 4]]), 4)
    # memory streams bytes whatever their type, but CPU bf16 gemv is far slower than fp32's: the roofline is the
    # faster of the two rates
    rates = {name: weight_read_rate(dt, device=args.device) for name, dt in DTYPES.items()}
    on_cpu = torch.device(args.device).type == "cpu"  # the compiled step's head layout is a CPU choice
    head_rates = head_layout_rates(cfg.vocab_size, cfg.hidden_size) if args.dtype == "fp32" and on_cpu else None
    rate = max(rates[args.dtype], rates["fp32"])
    wbytes = torch.finfo(dtype).bits // 8

    rows = []
    g = torch.Generator().manual_seed(args.seed)
    for ctx in args.contexts:
        for b in args.batches:
            prompts = torch.randint(2, cfg.vocab_size, (b, ctx), generator=g)
            p_tok, p_pre, p_dec = run_ours(engines[b, False], prompts.tolist(), args.new_tokens)
            # the machine's rate drifts by tens of percent over minutes (a shared host): measure it again
            # beside each row's timings and take that row's fraction against it
            row_rate = max(weight_read_rate(d, 5, args.device) for d in {DTYPES[args.dtype], torch.float32})
            o_tok, o_pre, o_dec = run_ours(engines[b, True], prompts.tolist(), args.new_tokens)
            if args.skip_transformers:  # its dense prefill of 8 x 8,192 tokens runs out of 24 GB
                h_tok, h_pre, h_dec = None, float("nan"), float("nan")
            else:
                h_tok, h_pre, h_dec = run_hf(hf, prompts, args.new_tokens)
            n = b * (args.new_tokens - 1)
            per_token = step_bytes(cfg, ours, b, ctx + args.new_tokens / 2, wbytes, bytes_ours[args.dtype]) / b
            row = dict(context=ctx, batch=b, mb_per_token=per_token / 1e6, weight_read_gb_s=row_rate,
                       plain_decode_tok_s=n / p_dec, nanoseek_decode_tok_s=n / o_dec, hf_decode_tok_s=n / h_dec,
                       plain_prefill_s=p_pre, nanoseek_prefill_s=o_pre, hf_prefill_s=h_pre,
                       same_tokens=None if h_tok is None else sum(x == y for x, y in zip(o_tok, h_tok)) / b,
                       same_as_plain=sum(x == y for x, y in zip(o_tok, p_tok)) / b)
            for key in ("plain", "nanoseek"):
                row[f"{key}_gb_s"] = per_token * row[f"{key}_decode_tok_s"] / 1e9
                row[f"{key}_roofline"] = row[f"{key}_gb_s"] / row_rate
            row["decode_speedup"] = row["nanoseek_decode_tok_s"] / row["hf_decode_tok_s"]
            rows.append(row)
            print(f"  ctx {ctx:5d} batch {b}: nanoseek {row['nanoseek_decode_tok_s']:.1f} tok/s "
                  f"({row['nanoseek_roofline']:.0%} of roofline; plain {row['plain_decode_tok_s']:.1f}), "
                  f"transformers {row['hf_decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)

    prefill_paths = {}
    if args.compare_prefill:
        for ctx in [c for c in args.contexts if c <= 2048]:
            prefill_paths[ctx] = time_prefill_paths(ours, ctx, max_seq_len)

    info = machine(args.device)
    print(f"\nDecode: preset {args.preset} ({sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M params), "
          f"{args.dtype} weights and caches, greedy, {args.new_tokens} new tokens")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, "
          + (f"GPU {info['gpu']}, " if "gpu" in info else "") +
          f"torch {info['torch']}\n")
    print(f"weight-read roofline: torch.mv of a 16384 x 8192 matrix, {info['torch_threads']} threads, the faster of "
          f"fp32 and bf16 (at the start: fp32 {rates['fp32']:.1f} GB/s, bf16 {rates['bf16']:.1f} GB/s), measured "
          "again beside each row (column 'roofline GB/s')")
    if head_rates:
        print(f"output head ({cfg.vocab_size} x {cfg.hidden_size}) times one row, read from memory: BLAS over rows of "
              f"{cfg.hidden_size} {head_rates['blas_rows_of_d']:.1f} GB/s, compiled reduction over them "
              f"{head_rates['compiled_rows_of_d']:.1f} GB/s, BLAS over a transposed copy (rows of {cfg.vocab_size}; "
              f"the compiled step's choice on CPU) {head_rates['blas_rows_of_vocab']:.1f} GB/s")
    if compile_failed:
        print("compiled decode step: compilation FAILED, the 'compiled' columns ran the plain eager path")
    else:
        print(f"compiled decode step: compiled in {compile_s:.1f} s, once per engine (first batch-1 step)"
              if compile_s else "compiled decode step: not run (no batch-1 engine)")
    print("plain = nanoseek's eager path (compile=False), before; compiled = the default, after. MB/token: weights and "
          "latent cache one decode token must read; roofline % = MB/token x tok/s over the measured rate.\n")
    print("| context | batch | MB/token | roofline GB/s | plain tok/s | plain % roofline | compiled tok/s "
          "| compiled GB/s | compiled % roofline | transformers tok/s | speedup vs transformers | nanoseek prefill s "
          "| transformers prefill s | same tokens as transformers | same as plain |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context']} | {r['batch']} | {r['mb_per_token']:.1f} | {r['weight_read_gb_s']:.1f} | "
              f"{r['plain_decode_tok_s']:.1f} | "
              f"{r['plain_roofline']:.0%} | {r['nanoseek_decode_tok_s']:.1f} | {r['nanoseek_gb_s']:.1f} | "
              f"{r['nanoseek_roofline']:.0%} | {r['hf_decode_tok_s']:.1f} | {r['decode_speedup']:.2f}x | "
              f"{r['nanoseek_prefill_s']:.2f} | {r['hf_prefill_s']:.2f} | "
              f"{'-' if r['same_tokens'] is None else format(r['same_tokens'], '.0%')} | "
              f"{r['same_as_plain']:.0%} |")
    print(f"\nKV cache bytes per token ({cfg.num_hidden_layers} layers): transformers DynamicCache {args.dtype} "
          f"{bytes_hf:,}; nanoseek latent fp32 {bytes_ours['fp32']:,}, bf16 {bytes_ours['bf16']:,}, "
          f"fp8 {bytes_ours['fp8']:,}")
    print(f"nanoseek {args.dtype} / transformers {args.dtype}: {bytes_ours[args.dtype] / bytes_hf:.3f}; "
          f"nanoseek fp8 / bf16: {bytes_ours['fp8'] / bytes_ours['bf16']:.3f}; "
          f"transformers bf16 would be {bytes_hf * 2 // hf_elem:,}")
    if prefill_paths:
        print("\nnanoseek prefill attention path (batch 1): " + "; ".join(
            f"{c} tokens: expanded {v['expanded']:.2f} s, absorbed {v['absorbed']:.2f} s"
            for c, v in prefill_paths.items()))
    if args.json:
        print(json.dumps({"machine": info, "preset": args.preset, "dtype": args.dtype, "new_tokens": args.new_tokens,
                          "weight_read_gb_s": rate, "weight_read_gb_s_by_dtype": rates,
                          "head_layout_gb_s": head_rates, "compile_s": compile_s,
                          "compile_failed": compile_failed,
                          "rows": rows, "kv_cache_bytes_per_token": {"transformers": bytes_hf, "nanoseek": bytes_ours},
                          "prefill_paths": prefill_paths}))


if __name__ == "__main__":
    main()

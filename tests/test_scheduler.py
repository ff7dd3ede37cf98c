"""Continuous batching: requests arriving mid-run, per-request sampling, chunked prefill, aborts, prefix caching and
GRPO groups prefilled once. Greedy output must equal generating each prompt alone. Tiny fp32 models."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.engine import Engine, PrefixCache, Request, SamplingParams

_MODEL = {}


def tiny_model():
    if "m" not in _MODEL:
        torch.manual_seed(0)
        _MODEL["m"] = Transformer(ModelConfig.from_preset("tiny")).float().eval()
    return _MODEL["m"]


def prompts(n, seed=1, lo=3, hi=40):
    g = torch.Generator().manual_seed(seed)
    vocab = tiny_model().config.vocab_size
    return [torch.randint(10, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def solo(prompt, params, **kw):
    """Generate one prompt alone on a fresh engine: the reference every batched result must equal."""
    engine = Engine(tiny_model(), max_batch_size=1, max_seq_len=96, kv_cache_dtype="fp32", prefix_cache_tokens=0, **kw)
    return engine.generate([prompt], params)[0]


def drain(engine, reqs_by_step: dict[int, list[Request]], max_steps=500):
    """Step the scheduler, adding reqs_by_step[s] before step s; returns {request id: tokens} and the steps run."""
    out, step = {}, 0
    sched = engine.scheduler
    while step < max_steps and (sched.has_work() or any(s >= step for s in reqs_by_step)):
        for r in reqs_by_step.get(step, []):
            engine.check_request(r.prompt, r.params)
            sched.add(r)
        for ev in sched.step()[0]:
            out.setdefault(ev.request.id, []).append(ev.token)
        # live rows stay 0 .. b-1 (a retirement moves the highest row into the hole)
        assert sorted(r.row for r in sched.running) == list(range(len(sched.running)))
        step += 1
    assert not sched.has_work()
    return out, step


def greedy(n=8, **kw):
    return SamplingParams(n, temperature=0, **kw)


def test_staggered_arrivals_equal_solo_generation():
    """More requests than rows, arriving at different steps, different lengths and max tokens: every greedy
    output equals the prompt generated alone, token for token."""
    ps = prompts(7)
    params = [greedy(4 + i % 5) for i in range(7)]
    reqs = [Request(p, sp) for p, sp in zip(ps, params)]
    engine = Engine(tiny_model(), max_batch_size=3, max_seq_len=96, kv_cache_dtype="fp32", prefix_cache_tokens=0)
    out, _ = drain(engine, {0: reqs[:4], 2: reqs[4:6], 9: reqs[6:]})
    for r, p, sp in zip(reqs, ps, params):
        assert out[r.id] == solo(p, sp), r.id
        assert r.finish_reason == "length"
    assert sorted(engine.scheduler.free_rows) == [0, 1, 2]


def test_chunked_prefill_beside_decode_equals_solo():
    """Long prompts prefill in chunks of 8, two chunks a step, while other rows decode; same tokens as an
    unchunked solo run."""
    ps = prompts(4, seed=2, lo=20, hi=60)
    engine = Engine(tiny_model(), max_batch_size=4, max_seq_len=96, kv_cache_dtype="fp32", prefix_cache_tokens=0,
                    prefill_chunk=8, prefill_budget=16)
    reqs = [Request(p, greedy(6)) for p in ps]
    out, _ = drain(engine, {0: reqs[:1], 1: reqs[1:3], 4: reqs[3:]})
    for r, p in zip(reqs, ps):
        assert out[r.id] == solo(p, greedy(6)) == solo(p, greedy(6), prefill_chunk=8)


def test_per_request_sampling_params_and_seeds():
    """Each request samples with its own params and generator: a seeded request draws the same tokens alone or
    beside others; stop tokens end only their own request."""
    p0, p1, p2 = prompts(3, seed=3)
    hot = SamplingParams(10, temperature=1.0, top_p=0.9, top_k=40, seed=7)
    alone = Engine(tiny_model(), max_batch_size=1, max_seq_len=96).generate([p0], hot)[0]
    # Engine.generate seeds prompt 0 with request_seed(7, 0); a Request carries its seed as given
    from nanoseek.engine import request_seed
    hot0 = SamplingParams(10, temperature=1.0, top_p=0.9, top_k=40, seed=request_seed(7, 0))
    ref = greedy(10)
    stop = solo(p2, ref)[2]
    reqs = [Request(p0, hot0), Request(p1, ref), Request(p2, greedy(10, stop_token_ids=(stop,)))]
    engine = Engine(tiny_model(), max_batch_size=3, max_seq_len=96)
    out, _ = drain(engine, {0: reqs[:2], 3: reqs[2:]})
    assert out[reqs[0].id] == alone
    assert out[reqs[1].id] == solo(p1, ref)
    full = solo(p2, ref)
    assert out[reqs[2].id] == full[: full.index(stop) + 1] and reqs[2].finish_reason == "stop"


def test_abort_frees_the_row_at_once():
    engine = Engine(tiny_model(), max_batch_size=2, max_seq_len=96)
    a, b, c = (Request(p, greedy(50)) for p in prompts(3, seed=4))
    sched = engine.scheduler
    for r in (a, b, c):
        sched.add(r)
    sched.step()
    assert len(sched.running) == 2 and list(sched.waiting) == [c]
    sched.abort(a)
    assert a.finish_reason == "abort" and a.row is None and len(sched.running) == 1
    sched.step()  # the freed row goes to the waiting request in the very next step
    assert c.row is not None and not sched.waiting
    sched.abort(c)
    sched.abort(b)
    assert not sched.has_work() and sorted(sched.free_rows) == [0, 1]


def count_prefill_tokens(model):
    seen = []
    hook = model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    return seen, hook


def test_grpo_group_prefills_its_prompt_once():
    """G copies of a prompt in one generate call: one row is prefilled, the others copy it; samples differ."""
    model = tiny_model()
    p = prompts(1, seed=5, lo=30, hi=31)[0]
    engine = Engine(model, max_batch_size=8, max_seq_len=96)
    seen, hook = count_prefill_tokens(model)
    try:
        outs = engine.generate([p] * 8, SamplingParams(6, temperature=1.0, seed=0))
    finally:
        hook.remove()
    assert seen[0] == (1, 30)  # the prompt once
    assert seen[1:] == [(8, 1)] * 5  # then all eight rows decode together
    assert len({tuple(o) for o in outs}) > 1  # distinct seeds per row
    g = engine.generate([p] * 3, greedy(6))
    assert g == [solo(p, greedy(6))] * 3


def test_prefix_cache_hit_reuses_latents():
    """A second prompt sharing a 48-token prefix computes only its suffix, reports cached tokens, and generates
    the same greedy tokens as without a cache (fp32: the reused latents are the same numbers)."""
    model = tiny_model()
    system = prompts(1, seed=6, lo=48, hi=49)[0]
    q1, q2 = system + [11, 12, 13], system + [21, 22]
    engine = Engine(model, max_batch_size=2, max_seq_len=96, kv_cache_dtype="fp32", prefix_cache_tokens=256)
    first = engine.generate([q1], greedy(5))[0]
    r = Request(q2, greedy(5))
    seen, hook = count_prefill_tokens(model)
    try:
        out, _ = drain(engine, {0: [r]})
    finally:
        hook.remove()
    assert r.cached_tokens == 48 and seen[0] == (1, 2)  # 3 blocks of 16 reused, 2 tokens computed
    assert first == solo(q1, greedy(5)) and out[r.id] == solo(q2, greedy(5))
    pc = engine.prefix_cache
    assert pc.hits == 48 and pc.queries == len(q1) + len(q2)


def test_prefix_cache_lru_is_bounded():
    model = tiny_model()
    engine = Engine(model, max_batch_size=1, max_seq_len=96, kv_cache_dtype="fp32", prefix_cache_tokens=64)
    pc = engine.prefix_cache
    a, b = prompts(2, seed=8, lo=50, hi=51)
    engine.generate([a], greedy(1))
    assert len(pc.table) == 3
    engine.generate([b], greedy(1))  # 3 more blocks, only 4 fit: a's oldest go
    assert len(pc.table) == 4 and len(pc.free) == 0
    assert len(pc.match(b)) == 3 and len(pc.match(a)) == 0  # a's first block was evicted: no prefix of a is left
    with pytest.raises(ValueError, match="block_size"):
        PrefixCache(engine.cache, 64, block_size=0)


def test_prompt_logprobs_equal_full_forward():
    model = tiny_model()
    p = prompts(1, seed=9, lo=20, hi=21)[0]
    engine = Engine(model, max_batch_size=2, max_seq_len=96, kv_cache_dtype="fp32", prefill_chunk=8)
    r = Request(p, SamplingParams(0), prompt_logprobs=True, logprobs=2)
    drain(engine, {0: [r]})
    with torch.no_grad():
        ref = model(torch.tensor([p]))[0].float().log_softmax(-1)
    want = [float(ref[i, p[i + 1]]) for i in range(len(p) - 1)]
    got = [lp for lp, _ in r.prompt_logprob_values]
    assert len(got) == len(p) - 1 and max(abs(x - y) for x, y in zip(got, want)) < 1e-4
    assert r.output == [] and r.finish_reason == "length"


def test_generate_batched_prefills_each_grpo_group_once():
    """eval.generate_batched (GRPO and eval rollouts): P prompts x G samples prefill P rows, not P * G."""
    from nanoseek.eval import generate_batched

    model = tiny_model()
    p, q = prompts(2, seed=10, lo=20, hi=21)
    seen, hook = count_prefill_tokens(model)
    try:
        out = generate_batched(model, [p] * 4 + [q] * 4, SamplingParams(3, temperature=1.0, seed=0))
    finally:
        hook.remove()
    assert seen[0] == (2, 20) and seen[1:] == [(8, 1)] * 2
    assert len(out) == 8 and all(len(o) == 3 for o in out)


def test_stream_left_early_frees_its_rows():
    engine = Engine(tiny_model(), max_batch_size=2, max_seq_len=96)
    ps = prompts(2, seed=11)
    it = engine.stream(ps, greedy(20))
    next(it)
    it.close()  # the consumer stops: the requests are aborted, the rows free
    assert not engine.scheduler.has_work() and sorted(engine.scheduler.free_rows) == [0, 1]
    assert engine.generate(ps, greedy(5)) == [solo(p, greedy(5)) for p in ps]


def test_speculative_with_chunked_prefill_equals_plain():
    """MTP drafting after a prompt prefilled in chunks (its hidden states gathered across chunks)."""
    ps = prompts(3, seed=12, lo=20, hi=50)
    engine = Engine(tiny_model(), max_batch_size=3, max_seq_len=96, kv_cache_dtype="fp32", prefill_chunk=8)
    assert engine.generate(ps, greedy(8), speculative=True) == [solo(p, greedy(8)) for p in ps]
    assert engine.stats.drafted > 0


def test_aborted_group_member_does_not_receive_its_leaders_copy():
    """A follower aborted while its leader still prefills: the row it held goes to another request, which must not
    be overwritten when the leader's prefill ends."""
    p = prompts(1, seed=13, lo=40, hi=41)[0]
    q = prompts(1, seed=14, lo=5, hi=6)[0]
    engine = Engine(tiny_model(), max_batch_size=2, max_seq_len=96, kv_cache_dtype="fp32", prefix_cache_tokens=0,
                    prefill_chunk=8)
    sched = engine.scheduler
    leader, follower, other = Request(p, greedy(4)), Request(p, greedy(4)), Request(q, greedy(6))
    sched.add(leader)
    sched.add(follower)
    sched.step()  # leader prefills its first chunk; the follower waits on it
    assert follower.leader is leader
    sched.abort(follower)
    out, _ = drain(engine, {0: [other]})
    assert out[other.id] == solo(q, greedy(6)) and leader.output == solo(p, greedy(4))


def test_tiny_temperature_samples_like_greedy():
    """A temperature of 1e-40 must not overflow the logits into NaN (it would stop a server's engine loop)."""
    p = prompts(1, seed=15)[0]
    engine = Engine(tiny_model(), max_batch_size=1, max_seq_len=96)
    assert engine.generate([p], SamplingParams(5, temperature=1e-40, seed=0)) == engine.generate([p], greedy(5))

"""The compiled batch-1 decode step (nanoseek/engine/decode.py): greedy tokens equal the plain eager path's, batch 1
and a ragged batch that shrinks to one row mid-stream; a compiler failure falls back to the plain path with one
warning; NANOSEEK_COMPILE=0 turns it off. The step's math runs uncompiled here (fast); the real compile, ~30 s on
2 CPU cores, runs when NANOSEEK_TEST_COMPILE=1."""

import os
import warnings

import pytest

from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.decode import decode_forward, mtp_chain_forward, speculate_forward
from tests.test_engine import PROMPTS, rel_err, stream_tokens_and_logits, tiny_model

GREEDY = SamplingParams(12, temperature=0)


def run_steps_eagerly(compiled):
    """The compiled engine's step functions, run uncompiled (the same math, no ~30 s compile)."""
    compiled._decode, compiled._spec, compiled._chain = decode_forward, speculate_forward, mtp_chain_forward


def fast_engine(kind="v3", compiled=False, **kw):
    engine = Engine(tiny_model(kind), max_batch_size=4, max_seq_len=48, kv_cache_dtype="fp32", compile=True, **kw)
    if not compiled:  # the same step functions, run eagerly
        run_steps_eagerly(engine.compiled)
    return engine


def plain_engine(kind="v3"):
    return Engine(tiny_model(kind), max_batch_size=4, max_seq_len=48, kv_cache_dtype="fp32", compile=False)


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_fast_step_same_tokens_as_plain_batch1(kind):
    fast, plain = fast_engine(kind), plain_engine(kind)
    assert fast.compiled.supported
    for prompt in PROMPTS:
        t_fast, l_fast = stream_tokens_and_logits(fast, [prompt], GREEDY)
        t_plain, l_plain = stream_tokens_and_logits(plain, [prompt], GREEDY)
        assert t_fast == t_plain
        assert rel_err(l_fast[0], l_plain[0]) < 1e-5
    assert "step" in fast.compiled.kinds  # the fast step did run


def test_fast_step_follows_weight_updates():
    """The fast step reads a transposed copy of the output head on CPU; an in-place update of the weights (an
    optimizer step between GRPO rollouts) must reach it, as it reaches the plain path."""
    import copy

    import torch

    model = copy.deepcopy(tiny_model())  # not the shared one: this test changes it
    fast = Engine(model, max_batch_size=1, max_seq_len=48, kv_cache_dtype="fp32", compile=True)
    fast.compiled._decode = decode_forward
    plain = Engine(model, max_batch_size=1, max_seq_len=48, kv_cache_dtype="fp32", compile=False)
    fast.generate(PROMPTS[:1], GREEDY)  # the fast step has made its copy
    with torch.no_grad():
        torch.manual_seed(1)
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    t_fast, l_fast = stream_tokens_and_logits(fast, PROMPTS[:1], GREEDY)
    t_plain, l_plain = stream_tokens_and_logits(plain, PROMPTS[:1], GREEDY)
    assert t_fast == t_plain
    assert rel_err(l_fast[0], l_plain[0]) < 1e-5
    assert "step" in fast.compiled.kinds


def test_ragged_batch_shrinking_to_one_row():
    """Rows at different lengths decode on the plain path; once the others stop, the last row continues on the fast
    step from row 0. Same tokens as the plain engine throughout."""
    p = SamplingParams(12, temperature=0)
    plain_out = plain_engine().generate(PROMPTS, p)
    stops = (plain_out[0][2], plain_out[1][2])  # the first two sequences end early, the third goes on alone
    assert not set(stops) & set(plain_out[2])
    p = SamplingParams(12, temperature=0, stop_token_ids=stops)
    fast = fast_engine()
    assert fast.generate(PROMPTS, p) == plain_engine().generate(PROMPTS, p)
    assert "step" in fast.compiled.kinds


def test_compiler_failure_warns_once_and_decodes_eagerly():
    fast = fast_engine()

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    fast.compiled._decode = broken
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        out = fast.generate([PROMPTS[0]], GREEDY)
    assert fast.compiled.failed
    assert out == plain_engine().generate([PROMPTS[0]], GREEDY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert fast.generate([PROMPTS[0]], GREEDY) == out


def test_compile_flag_and_env(monkeypatch):
    monkeypatch.setenv("NANOSEEK_COMPILE", "0")
    assert Engine(tiny_model(), max_batch_size=1, max_seq_len=16).compiled is None
    monkeypatch.setenv("NANOSEEK_COMPILE", "1")
    assert Engine(tiny_model(), max_batch_size=1, max_seq_len=16).compiled is not None
    assert Engine(tiny_model(), max_batch_size=1, max_seq_len=16, compile=False).compiled is None


def test_unsupported_cache_uses_plain_path():
    engine = Engine(tiny_model(), max_batch_size=1, max_seq_len=48, kv_cache_dtype="fp8", compile=True)
    assert not engine.compiled.supported
    engine.generate([PROMPTS[0]], GREEDY)
    assert engine.compiled.compile_seconds is None


@pytest.mark.skipif(os.environ.get("NANOSEEK_TEST_COMPILE") != "1",
                    reason="torch.compile of the decode step takes ~30 s on 2 CPU cores; NANOSEEK_TEST_COMPILE=1 runs it")
def test_compiled_step_same_tokens_as_plain():
    fast, plain = fast_engine(compiled=True), plain_engine()
    for prompt in PROMPTS:
        t_fast, l_fast = stream_tokens_and_logits(fast, [prompt], GREEDY)
        t_plain, l_plain = stream_tokens_and_logits(plain, [prompt], GREEDY)
        assert t_fast == t_plain
        assert rel_err(l_fast[0], l_plain[0]) < 1e-4
    assert not fast.compiled.failed and "step" in fast.compiled.kinds
    assert fast.generate(PROMPTS, GREEDY) == plain.generate(PROMPTS, GREEDY)  # ragged: plain path, then fast


def fast_and_plain(model, compiled: bool):
    """A compiled-step engine (its steps run eagerly unless `compiled`) and a plain one over the same model."""
    fast = Engine(model, max_batch_size=1, max_seq_len=48, kv_cache_dtype="fp32", compile=True)
    if not compiled:
        run_steps_eagerly(fast.compiled)
    return fast, Engine(model, max_batch_size=1, max_seq_len=48, kv_cache_dtype="fp32", compile=False)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    os.environ.get("NANOSEEK_TEST_COMPILE") != "1", reason="compiles for ~30 s; NANOSEEK_TEST_COMPILE=1 runs it"))])
def test_fast_speculative_same_tokens_as_plain(compiled):
    """Batch-1 self-speculative decoding through the fast step, drafts accepted and rejected: plain greedy tokens."""
    from tests.test_engine import near_bigram_model
    fast, plain = fast_and_plain(near_bigram_model(0.3), compiled)
    p = SamplingParams(16, temperature=0)
    for prompt in PROMPTS:
        expect = plain.generate([prompt], p)
        assert fast.generate([prompt], p, speculative=True) == expect
        assert 0 < fast.stats.accepted < fast.stats.drafted
    assert "speculate" in fast.compiled.kinds and not fast.compiled.failed


@pytest.mark.parametrize("k,compiled", [(2, False), (3, False), pytest.param(3, True, marks=pytest.mark.skipif(
    os.environ.get("NANOSEEK_TEST_COMPILE") != "1", reason="compiles for ~30 s; NANOSEEK_TEST_COMPILE=1 runs it"))])
def test_fast_speculative_k_drafts_same_tokens_as_plain(k, compiled):
    """K drafts a step through the fast step (one graph per K), every number of accepted drafts from 0 to K
    occurring: plain greedy tokens, and the same acceptance per draft position as the eager path."""
    from tests.test_engine import near_bigram_model
    fast, plain = fast_and_plain(near_bigram_model(0.2), compiled)
    p = SamplingParams(16, temperature=0)
    stats = []
    for prompt in PROMPTS:
        expect = plain.generate([prompt], p)
        assert fast.generate([prompt], p, speculative=k) == expect
        assert plain.generate([prompt], p, speculative=k) == expect
        assert fast.stats == plain.stats
        stats.append(fast.stats)
    assert any(s.accepted_at[-1] > 0 for s in stats) and any(s.accepted_at[0] < s.drafted_at[0] for s in stats)
    assert "speculate" in fast.compiled.kinds and not fast.compiled.failed


def test_fast_speculative_k_drafts_are_the_chained_mtp_module(monkeypatch):
    """Every draft of the fast step equals the chained MTP module's, recomputed without a cache (drafts accepted
    and rejected), with the longest prompt using the engine's last cache position."""
    from tests.test_engine import chained_mtp_drafts, near_bigram_model, record_drafts
    model, k, p = near_bigram_model(0.2, hidden=1.0), 3, SamplingParams(8, temperature=0)
    fast = Engine(model, max_batch_size=1, max_seq_len=len(PROMPTS[0]) + 8 + 2 * (k - 1), kv_cache_dtype="fp32",
                  compile=True)
    run_steps_eagerly(fast.compiled)
    plain = Engine(model, max_batch_size=1, max_seq_len=48, kv_cache_dtype="fp32", compile=False)
    seen, accepted = record_drafts(monkeypatch), 0
    for prompt in PROMPTS:
        assert fast.generate([prompt], p, speculative=k) == plain.generate([prompt], p)
        accepted += fast.stats.accepted
    assert "speculate" in fast.compiled.kinds and len(seen) > 9 and accepted > 0
    for tokens, drafts in seen:
        assert drafts == chained_mtp_drafts(model, tokens, k)


def test_fast_speculative_drafts_equal_the_eager_paths(monkeypatch):
    """Every draft the fast path makes (after the prompt: CompiledDecode.chain; each step: speculate_forward)
    equals the eager path's, on a random model whose MTP block's attention is scaled up so that its drafts depend
    on every position and rotation (the near-bigram models above, and a plain random one, barely attend)."""
    import copy

    import torch

    from tests.test_engine import record_drafts
    model = copy.deepcopy(tiny_model())
    with torch.no_grad():
        model.mtp[0].block.self_attn.o_proj.weight.mul_(50.0)
    fast, plain = fast_and_plain(model, compiled=False)
    p, k = SamplingParams(10, temperature=0), 3
    for prompt in PROMPTS:
        seen = record_drafts(monkeypatch)
        fast_tokens = fast.generate([prompt], p, speculative=k)
        fast_drafts, seen[:] = list(seen), []
        assert fast_tokens == plain.generate([prompt], p, speculative=k) == plain.generate([prompt], p)
        assert fast_drafts == seen and len(seen) >= 3
        monkeypatch.undo()
    assert {"speculate", "chain"} <= fast.compiled.kinds

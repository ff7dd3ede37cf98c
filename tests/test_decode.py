"""The compiled batch-1 decode step (nanoseek/engine/decode.py): greedy tokens equal the plain eager path's, batch 1
and a ragged batch that shrinks to one row mid-stream; a compiler failure falls back to the plain path with one
warning; NANOSEEK_COMPILE=0 turns it off. The step's math runs uncompiled here (fast); the real compile, ~30 s on
2 CPU cores, runs when NANOSEEK_TEST_COMPILE=1."""

import os
import warnings

import pytest

from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.decode import decode_forward, speculate_forward
from tests.test_engine import PROMPTS, rel_err, stream_tokens_and_logits, tiny_model

GREEDY = SamplingParams(12, temperature=0)


def fast_engine(kind="v3", compiled=False, **kw):
    engine = Engine(tiny_model(kind), max_batch_size=4, max_seq_len=48, kv_cache_dtype="fp32", compile=True, **kw)
    if not compiled:  # the same step functions, run eagerly
        engine.compiled._decode, engine.compiled._spec = decode_forward, speculate_forward
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


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    os.environ.get("NANOSEEK_TEST_COMPILE") != "1", reason="compiles for ~30 s; NANOSEEK_TEST_COMPILE=1 runs it"))])
def test_fast_speculative_same_tokens_as_plain(compiled):
    """Batch-1 self-speculative decoding through the fast step, drafts accepted and rejected: plain greedy tokens."""
    from tests.test_engine import near_bigram_model
    model = near_bigram_model(0.3)
    fast = Engine(model, max_batch_size=4, max_seq_len=48, kv_cache_dtype="fp32", compile=True)
    if not compiled:
        fast.compiled._decode, fast.compiled._spec = decode_forward, speculate_forward
    plain = Engine(model, max_batch_size=4, max_seq_len=48, kv_cache_dtype="fp32", compile=False)
    p = SamplingParams(16, temperature=0)
    for prompt in PROMPTS:
        expect = plain.generate([prompt], p)
        assert fast.generate([prompt], p, speculative=True) == expect
        assert 0 < fast.stats.accepted < fast.stats.drafted
    assert "speculate" in fast.compiled.kinds and not fast.compiled.failed

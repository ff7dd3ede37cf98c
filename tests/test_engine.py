"""Engine: cached greedy decoding equals recomputing everything, cache sizes, fp8 cache, sampling, stops, errors,
and MTP speculative decoding. Tiny fp32 models; references are full forward passes without a cache."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.engine import Engine, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [3], [100, 200, 300, 400, 500]]  # ragged: 13, 1, 5


def v3_config():
    return ModelConfig.from_preset("tiny")


def v2_config():
    return ModelConfig.from_preset("tiny").replace(model_type="deepseek_v2", topk_method="greedy",
                                                   scoring_func="softmax", q_lora_rank=None, norm_topk_prob=False,
                                                   routed_scaling_factor=1.0)


CONFIGS = {"v3": v3_config, "v2": v2_config}


_MODELS = {}


def tiny_model(kind="v3"):
    if kind not in _MODELS:
        torch.manual_seed(0)
        model = Transformer(CONFIGS[kind]()).float().eval()
        for m in model.moe_layers():  # as after training: the bias changes which experts are chosen
            if m.gate.e_score_correction_bias is not None:
                m.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
        _MODELS[kind] = model
    return _MODELS[kind]


@torch.no_grad()
def reference_logits(model, prompt, tokens):
    """Full-forward logits (no cache) predicting each of `tokens` after `prompt`: [len(tokens), vocab]."""
    ids = torch.tensor([prompt + tokens[:-1]])
    return model(ids)[0, len(prompt) - 1:].float()


@torch.no_grad()
def reference_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def stream_tokens_and_logits(engine, prompts, params, **kw):
    toks = [[] for _ in prompts]
    logits = [[] for _ in prompts]
    for ev in engine.stream(prompts, params, return_logits=True, **kw):
        toks[ev.seq].append(ev.token)
        logits[ev.seq].append(ev.logits)
    return toks, [torch.stack(x) for x in logits]


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind,batched_prefill", [("v3", True), ("v3", False), ("v2", True), ("v2", False)])
def test_greedy_equals_full_forward(kind, batched_prefill):
    """Greedy tokens and every step's logits (prefill: expanded path, decode: absorbed) equal full forwards."""
    model = tiny_model(kind)
    engine = Engine(model, max_batch_size=4, max_seq_len=32, kv_cache_dtype="fp32")
    if not batched_prefill:
        engine.prefill_mask_limit = 0  # ragged prompts prefill one at a time
    n = 6
    toks, logits = stream_tokens_and_logits(engine, PROMPTS, SamplingParams(n, temperature=0))
    for p, t, lg in zip(PROMPTS, toks, logits):
        assert len(t) == n
        assert t == reference_greedy(model, p, n)
        assert rel_err(lg, reference_logits(model, p, t)) < 1e-4
    # batch of one gives the same as inside the ragged batch
    assert engine.generate([PROMPTS[2]], SamplingParams(n, temperature=0)) == [toks[2]]


def test_no_step_recomputes_the_prompt():
    """Decode steps feed the model one token per sequence: count tokens through the embedding."""
    model = tiny_model()
    engine = Engine(model, max_batch_size=4, max_seq_len=32, kv_cache_dtype="fp32")
    seen = []
    hook = model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        engine.generate(PROMPTS, SamplingParams(4, temperature=0))
    finally:
        hook.remove()
    assert seen[0] == (3, 13)  # one padded prefill
    assert seen[1:] == [(3, 1)] * 3


# ---------------------------------------------------------------------------------------------- cache
def test_cache_bytes_formula_and_fp8_ratio():
    model = tiny_model()
    cfg = model.config
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    L = cfg.num_hidden_layers
    sizes = {d: Engine(model, max_batch_size=2, max_seq_len=16, kv_cache_dtype=d).kv_cache_bytes_per_token()
             for d in ("fp32", "bf16", "fp8")}
    assert sizes["fp32"] == L * per_layer * 4
    assert sizes["bf16"] == L * per_layer * 2
    assert sizes["fp8"] == L * (per_layer * 1 + 2 * 2)  # e4m3 values + a bf16 scale for c_kv and for k_rope
    assert sizes["fp8"] <= 0.55 * sizes["bf16"]
    # nothing per head: the MHA cache of the same model would hold 2 * heads * head_dim per layer
    assert sizes["bf16"] < L * 2 * cfg.num_attention_heads * cfg.v_head_dim * 2


class RoundedLatents:
    """A stand-in cache for one full forward: returns the step's latents rounded as the engine stores them.
    bf16: a cast. fp8: per token and part, scale = amax / 448 rounded to bf16, values rounded to e4m3."""

    def __init__(self, kind):
        self.kind = kind

    def round(self, x):
        if self.kind == "bf16":
            return x.to(torch.bfloat16).to(x.dtype)
        s = (x.abs().amax(dim=-1, keepdim=True) / 448).clamp(min=1e-12).to(torch.bfloat16).float()
        return ((x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).to(x.dtype)

    def update(self, c_kv, k_rope):
        return self.round(c_kv), self.round(k_rope)


@torch.no_grad()
def rounded_latent_logits(model, prompt, tokens, kind):
    """reference_logits with every layer's c_kv and k_rope rounded per token as a `kind` cache stores them."""
    ids = torch.tensor([prompt + tokens[:-1]])
    caches = [RoundedLatents(kind) for _ in model.layers]
    h = model.hidden_states(ids, kv_caches=caches)
    return model.lm_head(h)[0, len(prompt) - 1:].float()


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_low_precision_cache_equals_forward_with_rounded_latents(dtype):
    """Teacher-forced on the engine's own tokens, the logits with a bf16 / fp8 latent cache equal one full forward
    whose latents are rounded per token as the cache stores them: the cache loses nothing else (a position or
    scale error would show here, while the gap to the exact forward depends on the model and hides such bugs)."""
    model = tiny_model()
    engine = Engine(model, max_batch_size=4, max_seq_len=32, kv_cache_dtype=dtype)
    toks, logits = stream_tokens_and_logits(engine, PROMPTS, SamplingParams(8, temperature=0))
    for p, t, lg in zip(PROMPTS, toks, logits):
        assert rel_err(lg, rounded_latent_logits(model, p, t, dtype)) < 1e-5
        assert rel_err(lg, reference_logits(model, p, t)) > 1e-5  # the cache really is stored at low precision


# ---------------------------------------------------------------------------------------------- sampling
def test_seeded_sampling_reproducible():
    engine = Engine(tiny_model(), max_batch_size=4, max_seq_len=32)
    p = SamplingParams(8, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    a = engine.generate(PROMPTS, p)
    assert engine.generate(PROMPTS, p) == a
    assert engine.generate(PROMPTS, SamplingParams(8, temperature=1.0, top_p=0.9, top_k=50, seed=99)) != a
    assert all(len(x) == 8 for x in a)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    engine = Engine(tiny_model(), max_batch_size=4, max_seq_len=32)
    greedy = engine.generate(PROMPTS, SamplingParams(4, temperature=0))
    assert engine.generate(PROMPTS, SamplingParams(4, temperature=1.5, top_k=1, seed=0)) == greedy
    assert engine.generate(PROMPTS, SamplingParams(4, temperature=1.5, top_p=1e-6, seed=0)) == greedy
    # hot sampling over the whole vocabulary does differ from greedy
    assert engine.generate(PROMPTS, SamplingParams(4, temperature=5.0, seed=0)) != greedy


def test_stop_tokens_per_sequence():
    """A stop token ends only its own sequence (kept as its last token); the others continue unchanged."""
    model = tiny_model()
    engine = Engine(model, max_batch_size=4, max_seq_len=32, kv_cache_dtype="fp32")
    full = engine.generate(PROMPTS, SamplingParams(8, temperature=0))
    stop = full[2][1]  # the middle row's second token: row 2 stops early, rows are compacted mid-generation
    out = engine.generate(PROMPTS, SamplingParams(8, temperature=0, stop_token_ids=(stop,)))
    for f, o in zip(full, out):
        expect = f[: f.index(stop) + 1] if stop in f else f
        assert o == expect
    assert len(out[2]) == 2 and out[2][-1] == stop


# ---------------------------------------------------------------------------------------------- errors
def test_clear_errors():
    engine = Engine(tiny_model(), max_batch_size=2, max_seq_len=16)
    vocab = tiny_model().config.vocab_size
    p = SamplingParams(4, temperature=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate([list(range(20))], p)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([list(range(14))], p)  # 14 + 4 > 16
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([[1, vocab]], p)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([[-1, 2]], p)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[1], []], p)
    with pytest.raises(ValueError, match="empty"):
        engine.stream([[]], p)  # raised on the call, before iterating
    with pytest.raises(ValueError, match="max_batch_size"):
        engine.generate([[1], [2], [3]], p)
    with pytest.raises(ValueError, match="greedy"):
        engine.generate([[1]], SamplingParams(4, temperature=1.0), speculative=True)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        Engine(tiny_model(), kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(4, top_p=0.0)
    assert engine.generate([[1]], SamplingParams(0)) == [[]]


# ---------------------------------------------------------------------------------------------- speculative
def near_bigram_model(eps: float, hidden: float = 0.0):
    """A tiny model whose MTP draft is often right: attention/FFN outputs scaled by eps (the main model is
    nearly a bigram model) and the MTP module reads Emb(next token) and, scaled by `hidden` (default 0: not at
    all), its random hidden-state input, so it predicts the token after next almost as the main model will.
    eps > 0 keeps attention (and so every cache) relevant."""
    torch.manual_seed(0)
    model = Transformer(v3_config()).float().eval()
    d = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.mul_(eps)
        w = model.mtp[0].eh_proj.weight
        w[:, d:] *= hidden
        w[:, :d] = torch.eye(d)
    return model


def test_speculative_greedy_identical_random_model():
    engine = Engine(tiny_model(), max_batch_size=4, max_seq_len=32, kv_cache_dtype="fp32")
    p = SamplingParams(10, temperature=0)
    assert engine.generate([PROMPTS[0]], p, speculative=True) == engine.generate([PROMPTS[0]], p)
    assert engine.stats.drafted == 0  # stats belong to the last call (non-speculative here)


def speculative_like_plain(model, k):
    """Greedy decoding of the ragged PROMPTS with speculative=k: the tokens plain decoding gives and the logits of
    full forwards over them. Returns (engine, plain tokens, speculative tokens); engine.stats are the k run's."""
    engine = Engine(model, max_batch_size=4, max_seq_len=40, kv_cache_dtype="fp32")
    p = SamplingParams(16, temperature=0)
    plain = engine.generate(PROMPTS, p)
    spec, spec_logits = stream_tokens_and_logits(engine, PROMPTS, p, speculative=k)
    assert spec == plain
    for prompt, t, lg in zip(PROMPTS, spec, spec_logits):
        assert rel_err(lg, reference_logits(model, prompt, t)) < 1e-4
    return engine, plain, spec


def test_speculative_greedy_identical_with_acceptances():
    """Ragged batch, some drafts accepted and some rejected (caches rewound), per-row stops: same tokens and
    logits as plain greedy decoding."""
    engine, plain, _ = speculative_like_plain(near_bigram_model(0.3), True)
    assert 0.1 < engine.stats.acceptance_rate < 0.9, engine.stats
    stop = plain[1][3]
    p_stop = SamplingParams(16, temperature=0, stop_token_ids=(stop,))
    assert engine.generate(PROMPTS, p_stop, speculative=True) == engine.generate(PROMPTS, p_stop)


@torch.no_grad()
def chained_mtp_drafts(model, tokens: list[int], k: int) -> list[int]:
    """The k drafts after committed tokens x_0 .. x_N (x_N not yet fed), from full forwards without a cache:
    module 1 over positions 0 .. N-1 on (h^0_i, Emb(x_{i+1})) drafts x_{N+1}; each further draft runs it one
    position further on its own previous output (before the shared head's norm) and Emb(the previous draft)."""
    module, ids = model.mtp[0], torch.tensor([tokens])
    h_prev, nxt = model.hidden_states(ids[:, :-1]), ids[:, 1:]
    drafts = []
    for _ in range(k):
        cos, sin = model.rope(torch.arange(nxt.shape[1]))
        h1 = module(h_prev, model.embed_tokens(nxt), cos, sin)[:, -1:]
        drafts.append(int(model.mtp_head(module, h1).argmax()))
        h_prev, nxt = torch.cat([h_prev, h1], dim=1), torch.cat([nxt, torch.tensor([[drafts[-1]]])], dim=1)
    return drafts


def record_drafts(monkeypatch) -> list:
    """(committed tokens, drafts) of every speculative row at the start of each step, appended as it runs."""
    from nanoseek.engine.scheduler import Scheduler
    seen, real = [], Scheduler._spec

    def spy(self, reqs, finished):
        seen.extend((r.prompt + r.output, list(r.drafts)) for r in reqs)
        return real(self, reqs, finished)

    monkeypatch.setattr(Scheduler, "_spec", spy)
    return seen


@pytest.mark.parametrize("k", [2, 3])
def test_speculative_k_drafts_identical_with_acceptances(k):
    """K drafts a step, ragged batch (eager path, each row its own number accepted), every number of accepted
    drafts from 0 to K occurring: same tokens and logits as plain greedy decoding, and the counters add up."""
    engine, plain, spec = speculative_like_plain(near_bigram_model(0.2), k)
    s = engine.stats
    assert len(s.drafted_at) == k and len(set(s.drafted_at)) == 1 and s.drafted == k * s.drafted_at[0]
    assert s.accepted == sum(s.accepted_at) and s.acceptance_rate == s.accepted / s.drafted
    assert s.accepted_at == sorted(s.accepted_at, reverse=True)  # draft j+1 only counts when draft j did
    assert 0 < s.accepted_at[-1] and s.accepted_at[0] < s.drafted_at[0]  # all K accepted, and rejections
    # a row's step yields 1 + a tokens (the last may accept drafts past max_new_tokens): fewer steps than tokens
    assert sum(len(t) - 1 for t in spec) <= s.drafted_at[0] + s.accepted and s.steps < max(map(len, spec)) - 1
    stop = plain[1][3]
    p_stop = SamplingParams(16, temperature=0, stop_token_ids=(stop,))
    assert engine.generate(PROMPTS, p_stop, speculative=k) == engine.generate(PROMPTS, p_stop)


def test_speculative_k_drafts_are_the_chained_mtp_module(monkeypatch):
    """Every draft of a ragged batch (eager path) equals the chained MTP module's, recomputed without a cache: the
    chain reads the module's own output hidden state at the accepted position, at the right positions. The module
    reads its hidden-state input here (near_bigram_model's hidden=1), and drafts are accepted and rejected."""
    model, k = near_bigram_model(0.2, hidden=1.0), 3
    engine = Engine(model, max_batch_size=2, max_seq_len=40, kv_cache_dtype="fp32")
    seen = record_drafts(monkeypatch)
    prompts = PROMPTS[:2]  # 13 and 1 tokens
    p = SamplingParams(12, temperature=0)
    spec, stats = engine.generate(prompts, p, speculative=k), engine.stats
    assert spec == engine.generate(prompts, p)
    assert len(seen) > 12 and 0 < stats.accepted_at[-1] and stats.accepted_at[0] < len(seen)
    for tokens, drafts in seen:
        assert drafts == chained_mtp_drafts(model, tokens, k)


def test_speculative_draft_count_and_room_errors():
    engine = Engine(tiny_model(), max_batch_size=1, max_seq_len=16, kv_cache_dtype="fp32")
    p = SamplingParams(4, temperature=0)
    for bad in (-1, 9):
        with pytest.raises(ValueError, match="drafts per step"):
            engine.generate([[1]], p, speculative=bad)
    with pytest.raises(TypeError, match="speculative"):
        engine.generate([[1]], p, speculative=2.0)
    prompt = list(range(1, 11))  # 10 + 4 new tokens: room for 2 drafts a step (2 (K - 1) = 2 more), not 3
    with pytest.raises(ValueError, match="speculative=3.*max_seq_len=16"):
        engine.generate([prompt], p, speculative=3)
    assert engine.generate([prompt], p, speculative=2) == engine.generate([prompt], p)  # exactly full: no overrun
    assert engine.generate([prompt], p, speculative=True) == engine.generate([prompt], p)

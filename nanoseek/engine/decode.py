"""The batch-1 decode step, compiled (the gpt-fast recipe, https://github.com/pytorch-labs/gpt-fast: a small free
function per step, `torch.compile`d, touching only the active experts).

At batch 1 a decode step should cost one read of every active weight. The plain path (`Engine.decode`, the model's
own modules) spends most of its time elsewhere: hundreds of small ops per layer, each dispatched from Python, and
BLAS matrix-vector products that stream rows of 512 numbers at half the machine's bandwidth. Here one block step is
a free function of plain tensors, `decode_layer`, the final norm and output head another, `decode_head`, and a
whole step `decode_forward` (`speculate_forward` for MTP self-speculation) is compiled once per engine into one
graph of a few fused kernels per layer, with its wrapper (buffers, kernel calls) generated as C++ on CPU:

  - a product with one row of activations is written `(x * w).sum(-1)`, which the compiler turns into one
    streaming reduction over w (two rows, as speculative verification has, fuse into the same pass);
  - the output head, the largest weight, is the exception on CPU: a BLAS product over a transposed copy, which
    streams rows of `vocab` numbers (BENCHMARKS.md: 16.4 GB/s against 13.0-13.2 for rows of 512 on one core);
  - routed experts are gathered by index inside that reduction, `(w[idx] * x).sum(-1)` (gpt-fast's MoE): only
    the top-k experts' rows are read, with no sort, no per-expert loop and no host sync;
  - RoPE, RMSNorm, the latent-cache write, the absorbed attention (DeepSeek-V2 section 2.1.2) and its mask fuse
    around them; the mask comes from positions (key s visible to row i while s <= n_i), and the cached length is a
    dynamic dimension (one compile, not one per length).

The functions take any batch; the engine runs them at batch 1, where decoding is bound by weight reads, and keeps
its plain path for larger batches (not measured faster here) and prefill.

The math is the model's (nanoseek/model/mla.py `attend_absorbed`, moe.py, norm.py, rope.py); the tests check the
greedy tokens equal the plain path's. Where the compiler is missing or fails, the engine warns once and decodes
with the plain path (`NANOSEEK_COMPILE=0` or `Engine(compile=False)` asks for that outright).
"""

from __future__ import annotations

import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import MLP, GroupedExperts, MoE, Router, select_experts
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope


def compile_default() -> bool:
    """NANOSEEK_COMPILE=0 turns compilation off, 1 (or unset) on."""
    return os.environ.get("NANOSEEK_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


# ---------------------------------------------------------------------------------------------- the step
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()  # as nanoseek/model/norm.py: normalise in fp32, scale after casting back
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _mv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, in] times w [out, in] transposed. One or two rows (decoding, speculative verification): a product and
    row sum per row, which the compiler turns into one streaming reduction over w that serves both rows (w read
    once; accumulated in fp32). More rows: a matmul, which also reads w once for all of them."""
    if x.shape[0] <= 2:
        wf = w.float()
        return torch.stack([(row.float() * wf).sum(-1) for row in x.unbind(0)]).to(x.dtype)
    return F.linear(x, w)


def _experts(x, idx, wts, gate, up, down):
    """sum_j wts[:, j] * expert_{idx[:, j]}(x) for x [N, d], idx/wts [N, k], weights [E, out, in]: the chosen
    experts' rows are gathered inside the reductions (nothing [N, k, out, in] is stored once compiled)."""
    xf = x.float()[:, None, None, :]
    g = (gate[idx].float() * xf).sum(-1)  # [N, k, inter]
    u = (up[idx].float() * xf).sum(-1)
    h = (F.silu(g.to(x.dtype)) * u.to(x.dtype)).float()
    y = (down[idx].float() * h[:, :, None, :]).sum(-1).to(x.dtype)  # [N, k, d]
    return (y * wts[..., None].to(x.dtype)).sum(1)


def decode_layer(h, cos, sin, c_cache, k_cache, pos, w: dict, cfg):
    """One block (pre-norm absorbed MLA, then dense SwiGLU or DeepSeekMoE) for the new tokens h [b, t, d] at
    positions pos [b, t]. c_cache [b, S, r] and k_cache [b, S, p] are the step's rows of one layer's latent cache
    up to the longest row's new length S; this step's latents are written at pos and row i attends to keys
    0 .. pos[i, j]. `w` holds the layer's weights (layer_weights)."""
    b, t, d = h.shape
    H, n, p, r, v = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank,
                     cfg.v_head_dim)
    eps = cfg.rms_norm_eps
    x = _rms(h, w["input_norm"], eps).view(b * t, d)
    q = _mv(x, w["q_proj"]) if "q_proj" in w else _mv(_rms(_mv(x, w["q_a_proj"]), w["q_a_norm"], eps), w["q_b_proj"])
    q_nope, q_rope = q.view(b, t, H, n + p).split([n, p], dim=-1)
    q_rope = apply_rope(q_rope, cos.unsqueeze(-2), sin.unsqueeze(-2), cfg.rope_interleave)
    c_kv, k_rope = _mv(x, w["kv_a_proj"]).view(b, t, r + p).split([r, p], dim=-1)
    c_kv, k_rope = _rms(c_kv, w["kv_a_norm"], eps), apply_rope(k_rope, cos, sin, cfg.rope_interleave)
    rows = torch.arange(b, device=h.device)[:, None].expand(b, t)
    c_cache.index_put_((rows, pos), c_kv.to(c_cache.dtype))
    k_cache.index_put_((rows, pos), k_rope.to(k_cache.dtype))
    # absorbed attention over the latent (mla.py attend_absorbed)
    w_ukv = w["kv_b_proj"].view(H, n + v, r)
    w_uk, w_uv = w_ukv[:, :n], w_ukv[:, n:]
    q_latent = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)
    scores = (torch.einsum("bthr,bsr->bhts", q_latent, c_cache)
              + torch.einsum("bthp,bsp->bhts", q_rope, k_cache)).float() * cfg.softmax_scale
    visible = torch.arange(c_cache.shape[1], device=h.device) <= pos[:, None, :, None]  # [b, 1, t, S]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).to(c_cache.dtype)
    o = torch.einsum("bthr,hvr->bthv", torch.einsum("bhts,bsr->bthr", probs, c_cache), w_uv)
    h = h + _mv(o.reshape(b * t, H * v), w["o_proj"]).view(b, t, d)
    # feed-forward
    x = _rms(h, w["post_norm"], eps).view(b * t, d)
    if "router" not in w:  # dense SwiGLU
        y = _mv(F.silu(_mv(x, w["gate_proj"])) * _mv(x, w["up_proj"]), w["down_proj"])
    else:
        logits = F.linear(x.float(), w["router"])
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        wts, idx = select_experts(scores, w.get("router_bias"), cfg)
        y = _experts(x, idx, wts, w["experts_gate"], w["experts_up"], w["experts_down"])
        if "shared_gate" in w:
            y = y + _mv(F.silu(_mv(x, w["shared_gate"])) * _mv(x, w["shared_up"]), w["shared_down"])
    return h + y.view(b, t, d)


def decode_head(h, norm_w, head_w, eps: float):
    """Final norm and output head for h [N, d] -> (normalised h [N, d], fp32 logits [N, vocab]). head_w is
    [vocab, d], either the weight itself or the transpose of a [d, vocab] copy (CompiledDecode on CPU): then one
    BLAS product that streams rows of `vocab` numbers, faster there than any pass over rows of d."""
    h = _rms(h, norm_w, eps)
    if head_w.stride(-1) != 1:  # static at trace time: the graph holds one branch
        return h, F.linear(h, head_w).float()
    return h, _mv(h, head_w).float()


def mtp_input(emb, h_prev, enorm_w, hnorm_w, eh_w, eps: float):
    """An MTP module's block input (nanoseek/model/mtp.py): eh_proj([enorm(Emb(next)) ; hnorm(h_prev)]), [b, t, d]."""
    b, t, d = emb.shape
    x = torch.cat([_rms(emb, enorm_w, eps), _rms(h_prev, hnorm_w, eps)], dim=-1).view(b * t, 2 * d)
    return _mv(x, eh_w).view(b, t, d)


def decode_forward(tokens, cos, sin, pos, c_caches, k_caches, weights, norm_w, head_w, embed_w, cfg):
    """A whole decode step, one graph once compiled (one guard check and one call per step, not one per layer):
    tokens [b, t] at positions pos [b, t] through every layer (lists: each layer's cache rows and weights), then the
    final norm and head. Returns (normalised hidden states [b * t, d], fp32 logits [b * t, vocab])."""
    h = F.embedding(tokens, embed_w)
    for c, k, w in zip(c_caches, k_caches, weights):
        h = decode_layer(h, cos, sin, c, k, pos, w, cfg)
    return decode_head(h.view(-1, h.shape[-1]), norm_w, head_w, cfg.rms_norm_eps)


def accepted_count(greedy: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """How many leading drafts [..., K] equal the main model's greedy choice before them (greedy [..., K]), up to
    the first mismatch: [...] in 0 .. K."""
    return (greedy == drafts).long().cumprod(dim=-1).sum(dim=-1)


def speculate_forward(tokens, cos, sin, pos, c_caches, k_caches, weights, norm_w, head_w, embed_w, mtp_c, mtp_k,
                      mtp_w, chain_cos, chain_sin, cfg):
    """nanoseek/engine/speculative.py spec_step for one row, as one graph; K = tokens.shape[1] - 1 is static (one
    graph per K). Verify tokens [1, K+1] = [pending, d_1 .. d_K] at positions pos [1, K+1] = n .. n+K with the
    main model; run the first MTP module at all K+1 positions on (h_j, the main model's greedy token after j) and
    draft from the accepted position n+a only; then chain the module (mtp_chain) at n+a+1 .. n+a+K-1 on its own
    output and Emb(its previous draft). chain_cos / chain_sin are the rotations of positions n+1 .. n+2K-1
    [1, 2K-1, rope/2]: the chain's positions depend on a, so they are picked inside the graph. Returns logits
    [1, K+1, vocab], accepted [1] (a), bonus [1], next drafts [1, K]."""
    k, eps = tokens.shape[1] - 1, cfg.rms_norm_eps
    h, logits = decode_forward(tokens, cos, sin, pos, c_caches, k_caches, weights, norm_w, head_w, embed_w, cfg)
    greedy = logits.argmax(dim=-1)  # [K+1]
    accepted = accepted_count(greedy[None, :k], tokens[:, 1:])
    bonus = greedy[accepted]
    x = mtp_input(F.embedding(greedy[None], embed_w), h[None], mtp_w["enorm"], mtp_w["hnorm"], mtp_w["eh_proj"], eps)
    h1 = decode_layer(x, cos, sin, mtp_c, mtp_k, pos, mtp_w, cfg)[0].index_select(0, accepted)  # [1, d]
    first = decode_head(h1, mtp_w["head_norm"], head_w, eps)[1].argmax(dim=-1)
    drafts = mtp_chain_forward(h1, first, pos[:, :1] + 1 + accepted, accepted, chain_cos, chain_sin, mtp_c, mtp_k,
                               mtp_w, head_w, embed_w, k, cfg)
    return logits[None], accepted, bonus, drafts


def mtp_chain_forward(h1, first, start, offset, cos_t, sin_t, mtp_c, mtp_k, mtp_w, head_w, embed_w, k: int, cfg):
    """speculative.mtp_chain for one row: from the MTP module's output h1 [1, d] and its draft `first` [1] (made at
    position start - 1), pass j = 0 .. k-2 runs the module at position start + j (start [1, 1]) on (its previous
    output, Emb(the previous draft)) and drafts again: that position stands where the main model's h would be.
    cos_t / sin_t [1, P, rope/2] rotate a range of positions that holds start at index `offset` [1]. Returns the
    drafts [1, k]."""
    eps, drafts = cfg.rms_norm_eps, [first]
    for j in range(k - 1):
        x = mtp_input(F.embedding(drafts[-1][None], embed_w), h1[None], mtp_w["enorm"], mtp_w["hnorm"],
                      mtp_w["eh_proj"], eps)
        at = offset + j
        h1 = decode_layer(x, cos_t.index_select(1, at), sin_t.index_select(1, at), mtp_c, mtp_k, start + j, mtp_w,
                          cfg)[0]
        drafts.append(decode_head(h1, mtp_w["head_norm"], head_w, eps)[1].argmax(dim=-1))
    return torch.stack(drafts, dim=1)


# ---------------------------------------------------------------------------------------------- weights
def layer_weights(layer) -> dict | None:
    """The tensors decode_layer reads for one Block (the parameters themselves, so training updates show), or None
    when the block holds something it does not know (FP8 linears or experts, biases, other modules)."""
    attn, ffn = layer.self_attn, layer.mlp
    w = {"input_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight}
    linears = {"kv_a_proj": attn.kv_a_proj_with_mqa, "kv_b_proj": attn.kv_b_proj, "o_proj": attn.o_proj}
    if attn.q_lora_rank is None:
        linears["q_proj"] = attn.q_proj
    else:
        linears.update(q_a_proj=attn.q_a_proj, q_b_proj=attn.q_b_proj)
        w["q_a_norm"] = attn.q_a_layernorm.weight
    w["kv_a_norm"] = attn.kv_a_layernorm.weight
    if type(ffn) is MLP:
        linears.update(gate_proj=ffn.gate_proj, up_proj=ffn.up_proj, down_proj=ffn.down_proj)
    elif type(ffn) is MoE and type(ffn.experts) is GroupedExperts and type(ffn.gate) is Router:
        ex = ffn.experts
        w.update(router=ffn.gate.weight, experts_gate=ex.gate_proj, experts_up=ex.up_proj, experts_down=ex.down_proj)
        if ffn.gate.e_score_correction_bias is not None:
            w["router_bias"] = ffn.gate.e_score_correction_bias
        if ffn.shared_experts is not None:
            sh = ffn.shared_experts
            if type(sh) is not MLP:
                return None
            linears.update(shared_gate=sh.gate_proj, shared_up=sh.up_proj, shared_down=sh.down_proj)
    else:
        return None
    for name, m in linears.items():
        if type(m) is not nn.Linear or m.bias is not None:
            return None
        w[name] = m.weight
    norms = [layer.input_layernorm, layer.post_attention_layernorm, attn.kv_a_layernorm]
    if any(type(m) is not RMSNorm for m in norms):
        return None
    return {k: v.detach() for k, v in w.items()}


# ---------------------------------------------------------------------------------------------- per engine
class CompiledDecode:
    """The engine's compiled decode steps at batch 1: plain decoding (one new token, decode_forward),
    self-speculative verification (K + 1 tokens, then the MTP module's K drafts: speculate_forward, one graph per
    K) and the drafts after a prompt (the MTP module chained: mtp_chain_forward).

    `compile_seconds` sums the steps that compiled (each kind's first, when the compiler traces and builds its
    kernels, and one more past 4,096 cached tokens: _run), paid once per engine; later steps only run them. If
    compilation or a compiled step fails, one warning says so and the engine decodes with its plain path from then
    on (`failed` set). `kinds` names the steps that have run compiled ("step", "speculate", "chain")."""

    def __init__(self, model, cache):
        self.model, self.cache, self.cfg = model, cache, model.config
        self.weights = [layer_weights(layer) for layer in model.layers]
        head = model.lm_head
        self.supported = (all(w is not None for w in self.weights) and type(head) is nn.Linear
                          and head.bias is None and type(model.norm) is RMSNorm
                          # the cache is read as stored: fp32 or bf16 caches of the model's dtype, not fp8
                          and cache.c_kv[0].dtype == cache.model_dtype)
        self.head = (model.norm.weight.detach(), head.weight.detach(), model.embed_tokens.weight.detach())
        mtp = model.mtp[0] if len(model.mtp) else None
        self.mtp_weights = layer_weights(mtp.block) if mtp is not None else None
        self.mtp_supported = (self.supported and self.mtp_weights is not None and type(mtp.eh_proj) is nn.Linear
                              and mtp.eh_proj.bias is None
                              and all(type(m) is RMSNorm for m in (mtp.enorm, mtp.hnorm, mtp.shared_head.norm)))
        if self.mtp_supported:
            self.mtp_weights.update(enorm=mtp.enorm.weight.detach(), hnorm=mtp.hnorm.weight.detach(),
                                    eh_proj=mtp.eh_proj.weight.detach(),
                                    head_norm=mtp.shared_head.norm.weight.detach())
        self._head_t, self._head_key = None, None
        self.failed = False
        self.compile_seconds: float | None = None
        self.kinds: set[str] = set()
        # static shapes except the cached length, marked dynamic per call (_caches)
        # on CPU the graph's wrapper (buffer allocation, ~100 kernel calls) runs as C++, not Python: ~5% of a step
        options = {"cpp_wrapper": True} if self.head[1].device.type == "cpu" else None
        self._decode = torch.compile(decode_forward, options=options)
        self._spec = torch.compile(speculate_forward, options=options)
        self._chain = torch.compile(mtp_chain_forward, options=options)

    def usable(self, rows, speculative: bool = False) -> bool:
        return (self.supported and not self.failed and (self.mtp_supported or not speculative)
                and isinstance(rows, slice) and rows.stop - rows.start == 1)

    def _run(self, kind: str, fn, *args):
        """fn(*args), timing every call that compiled as compile time; None after a failure (the caller then runs
        its plain path, which rewrites the same cache positions). Besides each kind's first call, the compiler
        specialises once more when the cached length first passes 4,096 (inductor sums longer fp32 reductions, the
        softmax's, in chunks, a different kernel), so a long context pays a second compile, once."""
        from torch._dynamo.utils import counters  # compiled frames so far: did this call compile?

        compiles, t0 = counters["frames"]["ok"], time.perf_counter()
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: decode eagerly
            self.failed = True
            warnings.warn(f"nanoseek: compiling the decode step failed ({type(e).__name__}: {str(e)[:200]}); "
                          "decoding eagerly (NANOSEEK_COMPILE=0 skips the attempt)", RuntimeWarning, stacklevel=4)
            return None
        if counters["frames"]["ok"] > compiles:
            self.compile_seconds = (self.compile_seconds or 0.0) + time.perf_counter() - t0
        self.kinds.add(kind)
        return out

    @staticmethod
    def _caches(cache, rows: slice, length: int):
        """Each layer's cache rows up to `length`, that dimension marked dynamic: one compiled graph serves every
        context length."""
        cs, ks = [c[rows, :length] for c in cache.c_kv], [k[rows, :length] for k in cache.k_rope]
        for x in cs + ks:
            torch._dynamo.maybe_mark_dynamic(x, 1)
        return cs, ks

    def _head_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The output head as decode_head reads it. On CPU a [d, vocab] copy, passed transposed: a BLAS product
        over it streams the head (the largest weight a step reads, 42% of `small`'s bytes) ~25% faster than
        rows of d numbers do (BENCHMARKS.md). The copy costs the head's memory once more and is made again when
        the weight changes (an optimizer step between rollouts bumps its version counter)."""
        if w.device.type != "cpu":
            return w
        key = (w.data_ptr(), w._version if not w.is_inference() else 0)
        if self._head_t is None or self._head_key != key:
            self._head_t, self._head_key = w.t().contiguous(), key
        return self._head_t.t()

    def _inputs(self, rows: slice, n: int, tokens: torch.Tensor, rope=None):
        """The step's arguments up to the head; `rope` (cos, sin) [1, >= t, rope/2] from position n when the caller
        has the rotations already."""
        t = tokens.shape[1]
        pos = torch.arange(n, n + t, device=tokens.device)[None]
        cos, sin = self.model.rope(pos) if rope is None else (rope[0][:, :t], rope[1][:, :t])
        norm_w, head_w, embed_w = self.head
        return (tokens, cos, sin, pos, *self._caches(self.cache, rows, n + t), self.weights, norm_w,
                self._head_weight(head_w), embed_w)

    def __call__(self, rows: slice, n: int, tokens: torch.Tensor) -> torch.Tensor | None:
        """Feed tokens [1, t] at positions n .. n+t-1 of cache row `rows`; fp32 logits [t, vocab] (None: failed)."""
        out = self._run("step", self._decode, *self._inputs(rows, n, tokens), self.cfg)
        return None if out is None else out[1]

    def speculate(self, rows: slice, n: int, pending: torch.Tensor, drafts: torch.Tensor, mtp_cache):
        """speculative.spec_step for one row: verify [pending, d_1 .. d_K] (pending [1], drafts [1, K]) at
        n .. n+K, then the MTP module's next K drafts (its latents go to `mtp_cache`, positions up to n+2K-1).
        Returns what spec_step returns, or None after a failure."""
        k = drafts.shape[1]
        tokens = torch.cat([pending[:, None], drafts], dim=1)
        cos, sin = self.model.rope(torch.arange(n, n + 2 * k, device=tokens.device)[None])  # verify, then chain
        inputs = self._inputs(rows, n, tokens, (cos, sin))
        (mtp_c,), (mtp_k,) = self._caches(mtp_cache, rows, n + 2 * k)
        chain_cos, chain_sin = cos[:, 1:], sin[:, 1:]
        # K is a shape, not a dynamic dimension: each K traces its own graph (a recompile would otherwise make the
        # token dimension symbolic)
        for x in (*inputs[:4], chain_cos, chain_sin):  # tokens, cos, sin, pos: [1, K+1, ...]
            torch._dynamo.mark_static(x, 1)
        return self._run("speculate", self._spec, *inputs, mtp_c, mtp_k, self.mtp_weights, chain_cos, chain_sin,
                         self.cfg)

    def chain(self, rows: slice, start: int, h1: torch.Tensor, first: torch.Tensor, k: int, mtp_cache):
        """speculative.mtp_chain for one row, compiled: drafts 2 .. k from the MTP module's output h1 [1, d] and
        draft `first` [1] at position start - 1 (after a prompt's MTP pass). Returns the drafts [1, k], or None
        after a failure."""
        cos_t, sin_t = self.model.rope(torch.arange(start, start + k - 1, device=h1.device)[None])
        torch._dynamo.mark_static(cos_t, 1)
        torch._dynamo.mark_static(sin_t, 1)
        (mtp_c,), (mtp_k,) = self._caches(mtp_cache, rows, start + k - 1)
        head_w = self._head_weight(self.head[1])
        zero = torch.zeros(1, dtype=torch.long, device=h1.device)
        return self._run("chain", self._chain, h1, first, torch.tensor([[start]], device=h1.device), zero, cos_t,
                         sin_t, mtp_c, mtp_k, self.mtp_weights, head_w, self.head[2], k, self.cfg)

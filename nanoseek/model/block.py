"""One transformer block: pre-norm MLA then pre-norm FFN (dense SwiGLU or DeepSeekMoE), both residual.

Activation recomputation (`recompute`, set for a whole model by Transformer.set_recompute) trades compute for
memory in training, with torch.utils.checkpoint (non-reentrant; https://pytorch.org/docs/stable/checkpoint.html):
  "block"      keep only the block's input; the whole block runs again in the backward.
  "selective"  selective activation checkpointing: keep the outputs of matmuls and attention (what is expensive to
               redo), recompute everything else (RMSNorms, RoPE, SwiGLU, casts and other elementwise ops). DeepSeek-V3
               (section 3.2.3) recomputes RMSNorm and the MLA up-projections; this policy keeps the up-projections'
               outputs but recomputes the norms and the other cheap ops, a choice made by op, not by module.
Nothing changes in eval mode, without grad, or when decoding with a KV cache.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils import checkpoint

from nanoseek.config import ModelConfig
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MLP, MoE
from nanoseek.model.norm import RMSNorm

RECOMPUTE = ("none", "block", "selective")
# ops whose outputs "selective" keeps (aten names); everything else in a block is recomputed
_SAVED_OPS = {"mm", "addmm", "bmm", "_grouped_mm", "_scaled_mm", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention"}


def _selective_policy(ctx, func, *args, **kwargs):
    name = func._schema.name.split("::")[-1]
    return checkpoint.CheckpointPolicy.MUST_SAVE if name in _SAVED_OPS else checkpoint.CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    if not hasattr(checkpoint, "create_selective_checkpoint_contexts"):
        raise ValueError(f"--recompute selective needs torch >= 2.5 (this is {torch.__version__}): use block")
    # Profiler markers are not computation, but SAC matches every op of the forward with the recompute by count,
    # and an FSDP unit nested in a block (expert-parallel experts) emits its markers a different number of times
    # in the forward and in the recompute: let them through unmatched, as SAC does for detach.
    # (Torch versions without SAC_IGNORED_OPS may refuse selective recomputation around expert parallelism.)
    ignored = getattr(checkpoint, "SAC_IGNORED_OPS", None)
    if isinstance(ignored, set):
        for op in ("_record_function_enter_new", "_record_function_exit"):
            packet = getattr(torch.ops.profiler, op, None)
            if packet is not None:
                ignored.update(getattr(packet, name) for name in packet.overloads())
    return checkpoint.create_selective_checkpoint_contexts(_selective_policy)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.recompute = "none"

    def forward(self, h, cos, sin, mask=None, kv_cache=None, absorb=False):
        if self.recompute == "none" or not self.training or kv_cache is not None or not torch.is_grad_enabled():
            return self._forward(h, cos, sin, mask, kv_cache, absorb)
        kw = {"context_fn": _selective_contexts} if self.recompute == "selective" else {}
        return checkpoint.checkpoint(functools.partial(self._forward, absorb=absorb), h, cos, sin, mask,
                                     use_reentrant=False, **kw)

    def _forward(self, h, cos, sin, mask=None, kv_cache=None, absorb=False):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, kv_cache, absorb)
        return h + self.mlp(self.post_attention_layernorm(h))

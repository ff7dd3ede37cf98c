"""The DeepSeek-V2/V3 decoder: embedding, blocks (MLA + dense or MoE FFN), final norm, output head, and
optional multi-token prediction modules. Plain PyTorch: no cache, FP8 or parallelism logic lives here."""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.checkpoint import DTYPES, read_config, read_state, save_pretrained
from nanoseek.config import ModelConfig
from nanoseek.model.block import RECOMPUTE, Block
from nanoseek.model.init import init_parameters_
from nanoseek.model.moe import GroupedExperts, MoE, Router
from nanoseek.model.mtp import MTPModule
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(config, k) for k in range(1, config.num_nextn_predict_layers + 1))
        self.rope = RotaryEmbedding(config)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """N(0, initializer_range) for every matrix, ones for norms, zero biases and router biases.

        With a `seed` (the training path, nanoseek.distributed.build_model): shard-invariant values, on plain tensors
        or DTensor shards (nanoseek/model/init.py). Without one (a plainly constructed model): torch's global
        generator, module by module, as nn.init does, so torch.manual_seed decides the weights."""
        std = self.config.initializer_range
        if seed is not None:
            init_parameters_(self, seed, std)
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, Router)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None and isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
            elif isinstance(m, GroupedExperts):
                for p in m.parameters():
                    nn.init.normal_(p, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            if isinstance(m, Router) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.zero_()

    # ------------------------------------------------------------------ forward
    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} "
                             f"{list(input_ids.shape)}")
        if input_ids.numel() and not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {self.config.vocab_size}): "
                                 "check that the tokenizer matches the checkpoint")

    def hidden_states(self, input_ids, positions=None, mask=None, kv_caches=None, absorb=False) -> torch.Tensor:
        """Final normalised hidden states [b, t, d]. `positions` ([t] or [b, t]) default to 0..t-1; `mask`
        (bool, True = may attend, broadcast to [b, h, t, s]) defaults to causal; `kv_caches` holds one
        LatentCache per layer when an engine drives decoding. Token ids are not checked here (forward does; the
        engine validates prompts once, not every decode step)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rope(positions)
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, None if kv_caches is None else kv_caches[i], absorb)
        return self.norm(h)

    def mtp_logits(self, input_ids: torch.Tensor, h: torch.Tensor, positions=None) -> list[torch.Tensor]:
        """Logits of every MTP depth over a full sequence. Entry k-1 has shape [b, t-k, vocab]; its position i
        predicts token t_{i+k+1} from h^{k-1}_i and Emb(t_{i+k})."""
        t = input_ids.shape[1]
        if positions is None:
            positions = torch.arange(t, device=input_ids.device)
        out = []
        for k, module in enumerate(self.mtp, start=1):
            if t - k < 1:
                break
            cos, sin = self.rope(positions[..., : t - k])
            h = module(h[:, :-1], self.embed_tokens(input_ids[:, k:]), cos, sin)
            out.append(self.mtp_head(module, h))
        return out

    def mtp_head(self, module: MTPModule, h: torch.Tensor) -> torch.Tensor:
        """Logits of an MTP module's output h^k: its own norm, then the shared output head."""
        return self.lm_head(module.shared_head.norm(h))

    def forward(self, input_ids, positions=None, mask=None, kv_caches=None, absorb=False, return_mtp=False):
        """logits [b, t, vocab]; with return_mtp=True, (logits, mtp_logits) where mtp_logits is as in
        `mtp_logits` (an empty list for a model without MTP modules). Token ids are checked except in training
        on an accelerator, where reading them back would stall every step (training data is checked when prepared)."""
        if not self.training or input_ids.device.type == "cpu":
            self.check_input_ids(input_ids)
        h = self.hidden_states(input_ids, positions, mask, kv_caches, absorb)
        logits = self.lm_head(h)
        if not return_mtp:
            return logits
        return logits, self.mtp_logits(input_ids, h, positions)

    # ------------------------------------------------------------------ helpers
    def moe_layers(self, include_mtp: bool = True) -> list[MoE]:
        """Every MoE layer in order, the MTP blocks' last unless left out (they run only when MTP is trained):
        what balancing and load statistics iterate over."""
        parts = [self.layers, self.mtp] if include_mtp else [self.layers]
        return [m for part in parts for m in part.modules() if isinstance(m, MoE)]

    def set_recompute(self, mode: str) -> None:
        """Activation recomputation in training for every block, the MTP modules' too: "none", "block" or
        "selective" (see nanoseek/model/block.py)."""
        if mode not in RECOMPUTE:
            raise ValueError(f"--recompute must be one of {', '.join(RECOMPUTE)}, got {mode!r}")
        for m in self.modules():
            if isinstance(m, Block):
                m.recompute = mode

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> Transformer:
        """Load a transformers-layout checkpoint directory (DeepseekV3/V2, bf16/fp32 or DeepSeek's FP8). `dtype`
        None keeps the config's torch_dtype (FP8 checkpoints are dequantised to bf16 then); the router gate and
        its bias always load in fp32. Returned in eval mode."""
        cfg = read_config(path)
        dtype = dtype or DTYPES[cfg.torch_dtype]
        with torch.device("meta"):
            model = cls(cfg)
        state = read_state(path, cfg, model.state_dict(), dtype, device)
        model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.config = cfg.replace(quantization_config=None,
                                   torch_dtype={v: k for k, v in DTYPES.items()}.get(dtype, "float32"))
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write config.json + model.safetensors (or shards with an index) that transformers loads."""
        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

"""ModelConfig: the DeepSeek-V2/V3 architecture as one dataclass.

Field names are those of transformers' DeepseekV3Config (and DeepSeek's own config.json), so a config.json
written by nanoseek loads in transformers, vLLM and SGLang, and theirs load here. Fields that nanoseek does
not model (auto_map, architectures, ...) are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from nanoseek.io_utils import atomic_write_text


class ConfigError(ValueError):
    """A config field has a value nanoseek cannot build a model from; the message names the field."""


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


ROPE_KEYS = ("type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "attention_factor", "truncate")


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # MLA has no KV heads; always num_attention_heads (transformers needs it)
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"  # "greedy" | "group_limited_greedy" (V2, softmax) | "noaux_tc" (V3, sigmoid)
    scoring_func: str = "sigmoid"  # "sigmoid" | "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # ---------------------------------------------------------------- derived quantities
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        """Layer i uses DeepSeekMoE (else a dense SwiGLU of intermediate_size)."""
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters when rope_scaling asks for YaRN, else None."""
        rs = self.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type", "default"))
        return rs if kind == "yarn" else None

    @property
    def softmax_scale(self) -> float:
        """(d_nope + d_rope)^-0.5, times mscale^2 under YaRN (DeepSeek-V2 section 2.1.3; docs/mla.md)."""
        scale = self.qk_head_dim ** -0.5
        y = self.yarn
        if y and y.get("mscale_all_dim"):
            m = yarn_mscale(y["factor"], y["mscale_all_dim"])
            scale *= m * m
        return scale

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "v_head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            _need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                  f"{name} must be a positive integer, got {v!r}")
        _need(self.model_type in ("deepseek_v3", "deepseek_v2"),
              f"model_type must be 'deepseek_v3' or 'deepseek_v2', got {self.model_type!r}")
        _need(isinstance(self.qk_rope_head_dim, int) and self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
              f"qk_rope_head_dim must be a positive even number (RoPE rotates pairs), got {self.qk_rope_head_dim!r}")
        _need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
              f"q_lora_rank must be null or a positive integer, got {self.q_lora_rank!r}")
        _need(self.hidden_act == "silu", f"hidden_act must be 'silu' (SwiGLU experts), got {self.hidden_act!r}")
        _need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
              f"first_k_dense_replace ({self.first_k_dense_replace}) must be between 0 and num_hidden_layers "
              f"({self.num_hidden_layers})")
        _need(self.moe_layer_freq >= 1, f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        _need(self.num_nextn_predict_layers >= 0,
              f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        _need(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        _need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        _need(self.torch_dtype in ("float32", "bfloat16", "float16"),
              f"torch_dtype must be float32, bfloat16 or float16, got {self.torch_dtype!r}")
        _need(self.n_routed_experts >= 0, f"n_routed_experts must be >= 0, got {self.n_routed_experts}")
        if self.n_routed_experts > 0:
            self._validate_routing()
        if self.intermediate_size is not None:
            _need(self.intermediate_size > 0 or self.first_k_dense_replace == 0,
                  "intermediate_size must be > 0 when first_k_dense_replace > 0")
        if self.rope_scaling is not None:
            self._validate_rope_scaling()

    def _validate_routing(self) -> None:
        E, k = self.n_routed_experts, self.num_experts_per_tok
        _need(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0 when n_routed_experts > 0")
        _need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        _need(1 <= k <= E, f"num_experts_per_tok (k={k}) must be between 1 and n_routed_experts ({E})")
        _need(self.topk_method in ("greedy", "group_limited_greedy", "noaux_tc"),
              f"topk_method must be greedy, group_limited_greedy or noaux_tc, got {self.topk_method!r}")
        _need(self.scoring_func in ("sigmoid", "softmax"),
              f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        _need(self.n_group >= 1, f"n_group must be >= 1, got {self.n_group}")
        _need(E % self.n_group == 0, f"n_routed_experts ({E}) must be divisible by n_group ({self.n_group})")
        _need(1 <= self.topk_group <= self.n_group,
              f"topk_group ({self.topk_group}) must be between 1 and n_group ({self.n_group})")
        if self.topk_method != "greedy":
            per_group = E // self.n_group
            _need(self.topk_group * per_group >= k,
                  f"topk_group ({self.topk_group}) groups of {per_group} experts hold fewer than "
                  f"num_experts_per_tok ({k}) experts: raise topk_group or lower num_experts_per_tok")
            if self.topk_method == "noaux_tc" and self.n_group > 1:
                _need(per_group >= 2, f"noaux_tc scores a group by its top-2 experts: n_routed_experts/n_group "
                                      f"must be >= 2, got {per_group}")

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        _need(isinstance(rs, dict), f"rope_scaling must be an object, got {rs!r}")
        kind = rs.get("rope_type", rs.get("type", "default"))
        _need(kind in ("default", "yarn"), f"rope_scaling type must be 'yarn' (or 'default'), got {kind!r}")
        if kind == "yarn":
            _need(float(rs.get("factor", 0)) >= 1.0, f"rope_scaling.factor must be >= 1 for YaRN, got {rs.get('factor')!r}")
            _need(int(rs.get("original_max_position_embeddings", 0)) > 0,
                  "rope_scaling.original_max_position_embeddings must be a positive integer for YaRN")

    # ---------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "deepseek_v2"):
            raise ConfigError(f"model_type must be 'deepseek_v3' or 'deepseek_v2', got {model_type!r}")
        if model_type == "deepseek_v2":  # V2 defaults differ: softmax router, greedy top-k, no bias
            d.setdefault("topk_method", "greedy")
            d.setdefault("scoring_func", "softmax")
            d.setdefault("norm_topk_prob", False)
            d.setdefault("routed_scaling_factor", 1.0)
            d.setdefault("first_k_dense_replace", 0)
            for key in ("n_group", "topk_group"):
                if d.get(key) is None:
                    d[key] = 1
        # transformers 5 spells RoPE settings as `rope_parameters` (rope_theta inside); older code as
        # rope_theta + rope_scaling. Accept both; keep one internal form.
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict):
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = {k: v for k, v in rp.items() if k in ROPE_KEYS}
        if isinstance(d.get("rope_scaling"), dict):
            rs = dict(d["rope_scaling"])
            if rs.get("rope_type", rs.get("type")) == "default":
                rs = None
            d["rope_scaling"] = rs
        dtype = d.pop("dtype", None)
        d["torch_dtype"] = d.get("torch_dtype", dtype)
        if d["torch_dtype"] is None:
            d["torch_dtype"] = "bfloat16"
        if d.get("q_lora_rank") == 0:
            d["q_lora_rank"] = None
        if d.get("num_mtp_layers") is not None and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        d.pop("num_mtp_layers", None)
        d.pop("architectures", None)  # derived from model_type when written
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        extra.update(d.get("extra") or {})
        extra.pop("extra", None)
        for k in ("n_group", "topk_group", "num_experts_per_tok", "first_k_dense_replace"):
            if k in known and known[k] is None:
                known.pop(k)
        try:
            return cls(**known, extra=extra)
        except TypeError as e:  # a field with the wrong type
            raise ConfigError(f"malformed config: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if self.quantization_config is None:
            d.pop("quantization_config")
        arch = "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        out = {"architectures": [arch], **self.extra, **d}
        out["architectures"] = [arch]
        out["dtype"] = self.torch_dtype  # transformers 5 spelling, beside torch_dtype for older readers
        return out

    def to_json(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict(PRESETS[name])

    @classmethod
    def load(cls, preset_or_path: str | os.PathLike) -> ModelConfig:
        """A preset name, a checkpoint directory or a config.json path."""
        name = os.fspath(preset_or_path)
        if os.path.isdir(name) or name.endswith(".json"):
            return cls.from_json(name)
        if name in PRESETS:
            return cls.from_preset(name)
        raise ConfigError(f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory with a "
                          "config.json")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


_V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
_V2_YARN = {**_V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}

PRESETS: dict[str, dict] = {
    # ~3M parameters: every V3 idea at a size that trains in well under a second a step on 2 CPU cores.
    "tiny": dict(model_type="deepseek_v3", vocab_size=4096, hidden_size=128, intermediate_size=384,
                 moe_intermediate_size=64, num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4,
                 q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                 topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                 routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=2048,
                 torch_dtype="float32"),
    # The distillation student (DeepSeek-R1 section 2.4 distilled into dense models): dense (no routed experts,
    # no MTP), tied embeddings as in the small Qwen2.5 students, <= 1/3 of tiny's active parameters at any
    # vocabulary of 512..4096 tokens (0.30x at 512, 0.28x at 4096).
    "nano": dict(model_type="deepseek_v3", vocab_size=4096, hidden_size=64, intermediate_size=256,
                 moe_intermediate_size=0, num_hidden_layers=4, first_k_dense_replace=4, num_attention_heads=2,
                 q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=1, n_group=1, topk_group=1,
                 num_nextn_predict_layers=0, tie_word_embeddings=True, max_position_embeddings=2048,
                 torch_dtype="float32"),
    # ~90M total, ~30M active: the benchmark size for decode and training-step comparisons.
    "small": dict(model_type="deepseek_v3", vocab_size=32000, hidden_size=512, intermediate_size=1536,
                  moe_intermediate_size=256, num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8,
                  q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                  n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                  topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                  routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=8192,
                  torch_dtype="bfloat16"),
    "v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                    moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
                    num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
                    num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
                    norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=163840,
                    rope_scaling=_V2_YARN, bos_token_id=100000, eos_token_id=100001),
    "v2": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
               moe_intermediate_size=1536, num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128,
               q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
               topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
               routed_scaling_factor=16.0, max_position_embeddings=163840, rope_scaling=_V2_YARN,
               bos_token_id=100000, eos_token_id=100001),
    "v3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
               moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
               q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
               topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
               num_nextn_predict_layers=1, max_position_embeddings=163840, rope_scaling=_V3_YARN),
}
# nano with an output head of its own (0.34x tiny's active parameters at 512 tokens, 0.42x at 4096), for comparing
# the two heads (benchmarks/student_seeds.py, benchmarks/distill.py --student-head untied)
PRESETS["nano-untied"] = {**PRESETS["nano"], "tie_word_embeddings": False}

"""Checkpoints in the transformers hub layout: config.json + model.safetensors, or shards with
model.safetensors.index.json. What nanoseek writes, transformers' DeepseekV3ForCausalLM loads; what DeepSeek
published (V3/R1 in FP8 with 128x128 `weight_scale_inv`, V2 / V2-Lite in bf16) nanoseek loads. No pickle.

In memory, nanoseek stacks routed experts into [E, out, in] tensors; on disk they are one tensor per expert
(`mlp.experts.{j}.gate_proj.weight`), as every published checkpoint has them. MTP module k lives at layer index
num_hidden_layers + k - 1, with DeepSeek's copies of the shared embedding and head beside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.fp8.numerics import dequantize_checkpoint_weight
from nanoseek.io_utils import atomic_directory, atomic_write_text, fsync_dir

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory does not match its config; the message names the tensor and what differs."""


# ------------------------------------------------------------------------------------------ key mapping
def _hf_prefix(name: str, num_layers: int) -> str:
    """Map a nanoseek parameter name (without the expert split) to its transformers name."""
    m = re.match(r"mtp\.(\d+)\.(.*)", name)
    if m:
        layer = num_layers + int(m.group(1))
        rest = m.group(2)
        rest = rest[len("block."):] if rest.startswith("block.") else rest
        return f"model.layers.{layer}.{rest}"
    if name.startswith("lm_head."):
        return name
    return "model." + name


def hf_keys(name: str, cfg: ModelConfig) -> list[str]:
    """The transformers tensor names that together make nanoseek's tensor `name` (one per expert for
    stacked expert weights, else exactly one)."""
    m = re.match(r"(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)
    if m:
        base = _hf_prefix(m.group(1), cfg.num_hidden_layers)
        return [f"{base}.{j}.{m.group(2)}.weight" for j in range(cfg.n_routed_experts)]
    return [_hf_prefix(name, cfg.num_hidden_layers)]


def to_hf_state_dict(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (transformers name, tensor) for every tensor of a checkpoint of `model`, experts split."""
    cfg = model.config
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        keys = hf_keys(name, cfg)
        if len(keys) == 1:
            yield keys[0], t
        else:
            yield from zip(keys, t.unbind(0))
    for k in range(cfg.num_nextn_predict_layers):  # DeepSeek's layout repeats the shared tensors per MTP layer
        layer = cfg.num_hidden_layers + k
        yield f"model.layers.{layer}.embed_tokens.weight", model.embed_tokens.weight.detach()
        yield f"model.layers.{layer}.shared_head.head.weight", model.lm_head.weight.detach()


def _is_shared_copy(key: str, cfg: ModelConfig) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight$", key)
    return bool(m) and int(m.group(1)) >= cfg.num_hidden_layers


# ------------------------------------------------------------------------------------------ saving
def save_pretrained(model, path: str, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` as config.json + safetensors. A new directory appears whole (built aside, then renamed);
    in an existing directory (which may hold a tokenizer) each file is replaced atomically, weights before
    config, and weight files of an earlier save that are no longer used are removed."""
    path = os.fspath(path)
    dtype = next(model.parameters()).dtype
    cfg = model.config.replace(torch_dtype={v: k for k, v in DTYPES.items()}.get(dtype, "float32"),
                               quantization_config=None)
    if not os.path.exists(path):
        with atomic_directory(path) as tmp:
            write_tensors(to_hf_state_dict(model), tmp, max_shard_bytes)
            cfg.to_json(os.path.join(tmp, "config.json"))
        return
    tmp = tempfile.mkdtemp(prefix=".save.", dir=path)
    try:
        written = write_tensors(to_hf_state_dict(model), tmp, max_shard_bytes)
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        fsync_dir(path)
        for name in os.listdir(path):  # stale shards or index from an earlier save would shadow the new weights
            if name not in written and (name == INDEX_FILE or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", name)):
                os.remove(os.path.join(path, name))
        cfg.to_json(os.path.join(path, "config.json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_tensors(tensors: Iterable[tuple[str, torch.Tensor]], folder: str, max_shard_bytes: int) -> list[str]:
    """Write (name, tensor) pairs as model.safetensors, or as shards of at most max_shard_bytes with the index
    transformers reads; returns the file names written."""
    tensors = {key: t.detach().to("cpu").clone() for key, t in tensors}  # clone: safetensors refuses shared storage
    files = plan_shards([(key, t.numel() * t.element_size()) for key, t in tensors.items()], max_shard_bytes)
    for name, keys in files.items():
        save_file({key: tensors[key] for key in keys}, os.path.join(folder, name), metadata={"format": "pt"})
    if len(files) == 1:
        return list(files)
    write_index(folder, files, sum(t.numel() * t.element_size() for t in tensors.values()))
    return [*files, INDEX_FILE]


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> dict[str, list[str]]:
    """File name -> tensor keys: (key, bytes) pairs in order, cut into shards of at most max_shard_bytes (a larger
    tensor alone), named as transformers names them."""
    shards, size = [[]], 0
    for key, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": keys for i, keys in enumerate(shards)}


def write_index(folder: str, files: dict[str, list[str]], total_bytes: int) -> None:
    """The shards' model.safetensors.index.json (plan_shards' files)."""
    weight_map = {key: name for name, keys in files.items() for key in keys}
    atomic_write_text(os.path.join(folder, INDEX_FILE), json.dumps(
        {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ loading
def _weight_map(path: str) -> dict[str, str]:
    """Tensor key -> file of a checkpoint directory's safetensors (an index of shards, or one file)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            return json.load(f)["weight_map"]
    if os.path.exists(os.path.join(path, SINGLE_FILE)):
        with safe_open(os.path.join(path, SINGLE_FILE), framework="pt") as f:
            return {k: SINGLE_FILE for k in f.keys()}
    raise CheckpointError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


class TensorSource:
    """Lazy reader over a checkpoint's safetensors files (one file or an index of shards, or the given key ->
    file map); `get` can read just a part of a tensor (safetensors' get_slice reads only those bytes)."""

    def __init__(self, path: str, weight_map: dict[str, str] | None = None):
        self.path, self._open = path, {}
        self.weight_map = weight_map if weight_map is not None else _weight_map(path)

    def keys(self):
        return self.weight_map.keys()

    def get(self, key: str, index: tuple | None = None) -> torch.Tensor:
        """The tensor `key`, or only its part `index` (a tuple of slices, one per dim)."""
        file = self.weight_map[key]
        if file not in self._open:
            full = os.path.join(self.path, file)
            if not os.path.exists(full):
                raise CheckpointError(f"{INDEX_FILE} names {file} for {key}, but {full} does not exist")
            self._open[file] = safe_open(full, framework="pt")
        f = self._open[file]
        return f.get_tensor(key) if index is None or all(s == slice(None) for s in index) else f.get_slice(key)[index]


def read_config(path: str) -> ModelConfig:
    """The config.json of a checkpoint directory, without MTP modules when it announces some but holds none."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint directory")
    cfg = ModelConfig.from_json(os.path.join(path, "config.json"))
    first_mtp = f"model.layers.{cfg.num_hidden_layers}."
    if cfg.num_nextn_predict_layers > 0 and not any(k.startswith(first_mtp) for k in TensorSource(path).keys()):
        warnings.warn(f"config.json announces {cfg.num_nextn_predict_layers} MTP module(s) but {path} holds no "
                      f"{first_mtp}* weights: loading without multi-token prediction", stacklevel=3)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    return cfg


def read_state(path: str, cfg: ModelConfig, expected: dict[str, torch.Tensor], dtype: torch.dtype,
               device="cpu") -> dict[str, torch.Tensor]:
    """nanoseek's state dict from a checkpoint directory, for a model whose state_dict() is `expected` (meta
    tensors do: only names and shapes are read). FP8 weights are dequantised with their weight_scale_inv; the
    router gate and its bias stay fp32, everything else becomes `dtype`. Every tensor must be there with its
    shape, and nothing the config does not describe may be left over."""
    src = TensorSource(path)
    keys = set(src.keys())
    qc = cfg.quantization_config
    block = tuple(qc.get("weight_block_size", (128, 128))) if qc and qc.get("quant_method") == "fp8" else (128, 128)
    used: set[str] = set()
    state = {}
    for name, want_full in expected.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        parts = []
        for key in hf_keys(name, cfg):
            if key not in keys:
                raise CheckpointError(f"tensor {key} (shape {list(_expected_part(want_full, name))}) is missing "
                                      f"from {path}")
            t = src.get(key)
            if key + "_scale_inv" in keys:  # FP8 weight with its per-block scale
                used.add(key + "_scale_inv")
                try:
                    t = dequantize_checkpoint_weight(t, src.get(key + "_scale_inv"), block, torch.float32)
                except ValueError as e:
                    raise CheckpointError(f"tensor {key}: {e}") from None
            elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise CheckpointError(f"tensor {key} is float8 but {key}_scale_inv is missing")
            want = _expected_part(want_full, name)
            if tuple(t.shape) != tuple(want):
                raise CheckpointError(f"tensor {key} has shape {list(t.shape)} in the checkpoint but the config "
                                      f"needs {list(want)}: check config.json against the weights")
            parts.append(t)
            used.add(key)
        t = parts[0] if len(parts) == 1 else torch.stack(parts)
        keep_fp32 = name.endswith("gate.weight") or name.endswith("e_score_correction_bias")
        state[name] = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)

    unexpected = sorted(k for k in keys - used if not _is_shared_copy(k, cfg) and not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"unexpected tensor(s) in {path}: {', '.join(unexpected[:5])}{more}; "
                              "the config does not describe them")
    return state


def _expected_part(expected: torch.Tensor, name: str):
    """The shape one checkpoint tensor must have: a stacked expert tensor's per-expert slice, else the whole."""
    return expected.shape[1:] if re.search(r"\.mlp\.experts\.(gate|up|down)_proj$", name) else expected.shape

"""`nanoseek convert`: rewrite a checkpoint directory, optionally in DeepSeek's released FP8 layout.

Without --fp8 the rewrite is exact: every tensor is cast to --dtype (default: the source's torch_dtype), and the
router's gate and bias stay fp32 as nanoseek keeps them, so fp32 -> fp32 reproduces every bit.

With --fp8 the result is what DeepSeek published for V3/R1 (DeepSeek-V3 section 3.3; docs/fp8.md): every 2D
projection weight becomes float8_e4m3fn with `<name>.weight_scale_inv`, fp32 [ceil(out/128), ceil(in/128)], one
scale per 128 x 128 block (dequantised = fp8 * scale), and config.json gains quantization_config. Embeddings,
norms, the MoE gate, lm_head and the MTP layer's copies of embedding and head (and its eh_proj) stay in --dtype.
That export is lossy by design (e4m3 keeps 3 mantissa bits); nanoseek and transformers dequantise it on load.

The source may be any checkpoint nanoseek loads (its own, transformers', DeepSeek's FP8 or bf16). It is loaded
whole, in fp32, so the converter needs about 4 bytes of memory per parameter. The output directory appears
whole or not at all (written aside, then renamed), with the source's tokenizer files copied in.
"""

from __future__ import annotations

import json
import os

import torch

from nanoseek.checkpoint import DTYPES, to_hf_state_dict, write_tensors
from nanoseek.fp8 import BLOCK, QUANTIZATION_CONFIG, is_fp8_checkpoint_weight, quantize_checkpoint_weight
from nanoseek.io_utils import atomic_directory
from nanoseek.model import Transformer
from nanoseek.tokenizer import copy_tokenizer

DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
               "fp16": "float16", "float16": "float16"}


def _keep_fp32(key: str) -> bool:
    """The router's gate and its bias-correction term: fp32 in nanoseek (and the bias in DeepSeek's release too),
    since top-k choices flip on small changes of the scores."""
    return key.endswith(".mlp.gate.weight") or key.endswith(".mlp.gate.e_score_correction_bias")


def converted_tensors(model, dtype: torch.dtype, fp8: bool):
    """Yield (transformers name, tensor) of the checkpoint to write: cast to `dtype`, or for fp8 the projection
    weights as (float8 weight, fp32 weight_scale_inv) pairs quantised from the fp32 values."""
    for key, t in to_hf_state_dict(model):
        t = t.detach()
        if fp8 and is_fp8_checkpoint_weight(key, t):
            weight, scale_inv = quantize_checkpoint_weight(t.float(), BLOCK)
            yield key, weight
            yield key + "_scale_inv", scale_inv
        else:
            yield key, t.float() if _keep_fp32(key) else t.to(dtype)


def convert(model_dir: str, out_dir: str, fp8: bool = False, dtype: str | None = None,
            max_shard_bytes: int = 5 * 2**30) -> dict:
    """Rewrite checkpoint `model_dir` into `out_dir` (see the module docstring); returns a summary dict."""
    model_dir, out_dir = os.fspath(model_dir), os.fspath(out_dir)
    if os.path.abspath(model_dir) == os.path.abspath(out_dir):
        raise ValueError("--out must differ from --model: the source is read while the output is written")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
    model = Transformer.from_pretrained(model_dir, dtype=torch.float32)  # fp32 holds every source dtype exactly
    with open(os.path.join(model_dir, "config.json")) as f:
        src_cfg = json.load(f)
    dtype_name = DTYPE_NAMES[dtype] if dtype else src_cfg.get("torch_dtype") or src_cfg.get("dtype") or "bfloat16"
    cfg = model.config.replace(torch_dtype=dtype_name, quantization_config=dict(QUANTIZATION_CONFIG) if fp8 else None)
    n_fp8 = n_tensors = 0
    with atomic_directory(out_dir) as tmp:
        def counted():
            nonlocal n_fp8, n_tensors
            for key, t in converted_tensors(model, DTYPES[dtype_name], fp8):
                n_tensors += 1
                n_fp8 += t.dtype == torch.float8_e4m3fn
                yield key, t
        write_tensors(counted(), tmp, max_shard_bytes)  # a weight and its scale may land in different shards
        cfg.to_json(os.path.join(tmp, "config.json"))
        if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
            copy_tokenizer(model_dir, tmp)
    files = sorted(os.listdir(out_dir))
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files if f.endswith(".safetensors"))
    return {"out": out_dir, "fp8": fp8, "dtype": dtype_name, "tensors": n_tensors, "fp8_tensors": n_fp8,
            "weight_bytes": size, "files": files}

"""Fine-grained FP8 training (DeepSeek-V3 section 3.3), in three layers:

  numerics.py  quantise / dequantise (1 x 128 tiles, 128 x 128 blocks, per tensor) and the FP8 GEMM with
               promotion to FP32 every 128 elements of K; plain tensors, no modules.
  recipe.py    FP8Recipe (granularity, block size, backend): how the modules quantise their operands.
  modules.py   FP8Linear, FP8GroupedExperts and convert_to_fp8, which swaps them into a plain model from outside.

This package exports the numerics and the recipe; the modules come from nanoseek.fp8.modules, so that loading a
checkpoint (which needs only the dequantiser) does not pull in the model or the training stack. docs/fp8.md
explains the recipe.
"""

from nanoseek.fp8.numerics import (BLOCK, FP8_DTYPE, FP8_MAX, QUANTIZATION_CONFIG, dequantize_act,
                                   dequantize_checkpoint_weight, dequantize_weight, fp8_matmul,
                                   is_fp8_checkpoint_weight, quantize_act, quantize_checkpoint_weight,
                                   quantize_tensorwise, quantize_weight, scaled_mm_supported)
from nanoseek.fp8.recipe import FP8Recipe

__all__ = ["BLOCK", "FP8_DTYPE", "FP8_MAX", "QUANTIZATION_CONFIG", "FP8Recipe", "dequantize_act",
           "dequantize_checkpoint_weight", "dequantize_weight", "fp8_matmul", "is_fp8_checkpoint_weight",
           "quantize_act", "quantize_checkpoint_weight", "quantize_tensorwise", "quantize_weight",
           "scaled_mm_supported"]

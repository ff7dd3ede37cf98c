"""`nanoseek plan`: per-rank training memory at any scale, measured from the real sharded tensors.

The model is built on the meta device (no memory), one pipeline stage at a time, and sharded by the training
path's own nanoseek.distributed.parallelize under torch's fake process group (a backend whose collectives do
nothing, torch.testing._internal.distributed.fake_pg, the dry-run mode torchtitan uses), so a laptop can ask
what rank 0 of a 2,048-rank job stores. Parameter, gradient and optimizer bytes are read from the local shards
(FSDP's padded storage included); the unsharded working set and activations come from the analytical plan
(nanoseek.accounting.memory_per_rank), printed beside it.

Pipeline parallelism: the blocks are split into contiguous stages (accounting.pipeline_stages) as training splits
them (nanoseek/pipeline.py, one stage per rank as in 1F1B); each stage's world_size / pp ranks form its own
(dp, ep) mesh, so each stage is measured on a fake group of that size. The schedule's activations in flight and
its bubble are analytical.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.accounting import OPTIMIZER_BYTES, memory_per_rank, pipeline_stages
from nanoseek.config import ModelConfig
from nanoseek.model.init import DTensor

# DeepSeek-V3's own training layout (technical report, section 3.2): 2,048 H800 GPUs, 16-way pipeline parallelism,
# 64-way expert parallelism over 8 nodes, no tensor parallelism; recomputation of RMSNorm and MLA up-projections.
LAYOUTS = {"deepseek-v3": dict(preset="v3", world_size=2048, ep=64, pp=16, recompute="selective")}

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def measure(module: nn.Module) -> dict:
    """Bytes this rank stores for `module`'s parameters: each local shard's storage (FSDP pads a dim to equal
    chunks, so rank 0's shard is the largest), and the local element count (what AdamW's state is shaped like)."""
    nbytes, numel = 0, 0
    for p in module.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        nbytes += local.untyped_storage().nbytes()
        numel += local.numel()
    return {"bytes": nbytes, "numel": numel}


def _fake_group(world_size: int):
    """Join a fake process group of world_size ranks as rank 0 (registers the "fake" backend on import)."""
    if dist.is_initialized():
        raise ValueError("nanoseek plan runs in its own (fake) process group: do not launch it under torchrun")
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())


def plan(cfg: ModelConfig, world_size: int, ep: int = 1, pp: int = 1, recompute: str = "none",
         tokens_per_rank: int = 4096, dtype: str = "bfloat16", optimizer: str = "adamw",
         microbatches: int | None = None) -> dict:
    """Measured and planned bytes per rank (the largest stage's), as `nanoseek plan --json` prints them."""
    from nanoseek import distributed
    from nanoseek.model.transformer import Transformer
    from nanoseek.pipeline import RankModel  # what a 1F1B rank of that stage holds in training

    t0 = time.perf_counter()
    planned = memory_per_rank(cfg, world_size, ep, tokens_per_rank, dtype, optimizer, pp, recompute, microbatches)
    stage_ranks = world_size // pp
    if ep > stage_ranks:
        raise ValueError(f"--ep {ep} needs at least that many ranks per pipeline stage ({stage_ranks})")
    stage_planned = planned.get("stages") or [planned]
    _fake_group(stage_ranks)
    try:
        info = distributed.DistInfo(0, stage_ranks, 0, torch.device("cpu"), owns_group=False)
        stages = []
        for s, blocks in enumerate(pipeline_stages(cfg, pp)):
            with torch.device("meta"):
                model = Transformer(cfg) if pp == 1 else RankModel(cfg, blocks, s == 0, s == pp - 1)
            model.to(TORCH_DTYPES[dtype])  # the routers stay fp32 (Router._apply), as in training
            distributed.parallelize(model, distributed.make_mesh(info, ep), ep=ep)
            m = measure(model)
            sp = stage_planned[s]
            got = {"stage": s, "blocks": blocks, "params_bytes": m["bytes"], "grads_bytes": m["bytes"],
                   "optimizer_bytes": m["numel"] * OPTIMIZER_BYTES[optimizer],
                   "gathered_bytes": sp["gathered_bytes"], "activation_bytes": sp["activation_bytes"],
                   "planned_params_bytes": sp["param_bytes"], "planned_total_bytes": sp["total_bytes"]}
            got["total_bytes"] = sum(got[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes",
                                                      "gathered_bytes", "activation_bytes"))
            stages.append(got)
            del model
    finally:
        dist.destroy_process_group()
    worst = max(stages, key=lambda st: st["total_bytes"])
    experts_dim = distributed.expert_shard_dim(stage_ranks // ep, cfg.n_routed_experts // ep) if ep > 1 else None
    return {
        "world_size": world_size, "ep": ep, "pp": pp, "dp": stage_ranks // ep, "recompute": recompute,
        "dtype": dtype, "optimizer": optimizer, "tokens_per_rank": tokens_per_rank,
        "expert_shard_dim": experts_dim, "stage": worst["stage"],
        "params_bytes_per_rank": worst["params_bytes"], "grads_bytes_per_rank": worst["grads_bytes"],
        "optimizer_bytes_per_rank": worst["optimizer_bytes"], "gathered_bytes_per_rank": worst["gathered_bytes"],
        "activation_bytes_per_rank": worst["activation_bytes"], "total_bytes_per_rank": worst["total_bytes"],
        "planned_params_bytes_per_rank": worst["planned_params_bytes"],
        "planned_grads_bytes_per_rank": stage_planned[worst["stage"]]["grad_bytes"],
        "planned_optimizer_bytes_per_rank": stage_planned[worst["stage"]]["optimizer_bytes"],
        "planned_total_bytes_per_rank": worst["planned_total_bytes"],
        "params_vs_plan": worst["params_bytes"] / worst["planned_params_bytes"] - 1,
        "microbatches": planned.get("microbatches", 1), "bubble": planned.get("bubble", {}),
        "stages": stages, "seconds": time.perf_counter() - t0,
    }

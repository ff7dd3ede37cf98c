"""Scale-out on torch.distributed, applied from outside the model (the model code has no distributed branches).

Launch with torchrun; every process runs the same program:

    torchrun --nproc_per_node N -m nanoseek pretrain ... [--ep E]

Pieces, in the order a trainer uses them:
  init_distributed()        process group from torchrun's env vars (gloo on CPU, NCCL on GPU); None if single-process
  make_mesh(info, ep)       a 2-D device mesh ("dp", "ep"): world = dp x ep ranks, expert-parallel groups of ep
                            consecutive ranks (on GPUs: within one node, where all-to-all is fastest)
  parallelize(model, mesh)  expert parallelism for every MoE layer (ep > 1), then FSDP2 per block and the root
  build_model(cfg, seed, ...) the model built on the meta device, parallelized, only local shards materialised
  clip_grad_norm_()         the global gradient norm over sharded and expert-parallel parameters
  full_state_dict()         the whole (unsharded) model state on every rank (checkpoints: nanoseek/train/sharded.py)

Expert parallelism (DeepSeek-V3 section 3.2): rank r of an ep group keeps routed experts [r E/ep, (r+1) E/ep).
Experts take rows already sorted by expert plus the tokens per expert (GroupedExperts.forward, torchtitan's
interface); MoE permutes and unpermutes. Expert parallelism wraps that same forward (make_expert_parallel): send
every row to the rank that owns its expert (all-to-all, counts first so every rank knows how many rows it will
receive), regroup by local expert, run the unchanged expert module (plain or FP8), and send the results back in
the order they came (the reverse all-to-all). No token is dropped. The backward of an all-to-all is the all-to-all
with the splits swapped (`AllToAll`).

Sharding: every parameter outside the routed experts is FSDP-sharded over all ranks. Routed expert weights are
first split over the ep dimension and then FSDP-sharded over the remaining dp dimension (world / ep ranks), on
dim 0 or, with more dp ranks than local experts, dim 1 (expert_shard_dim), so every element of every parameter
lives on exactly one rank. Their gradients arrive summed over the ep group (through the all-to-all backward), so
they are divided by ep in the backward and FSDP's mean over dp completes the mean over all ranks.

The model may be built on the meta device and materialised after sharding (build_model): each rank allocates
and initialises only its own shards, with values that do not depend on the layout (nanoseek/model/init.py).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.model.init import DTensor, Shard  # imported there for every torch version
from nanoseek.model.moe import GroupedExperts, MoE

try:  # torch >= 2.6
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch 2.4 / 2.5 kept FSDP2 under _composable
    from torch.distributed._composable.fsdp import fully_shard
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


# ------------------------------------------------------------------------------------------ process group
@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # init_distributed created the process group (and so should destroy it)


def init_distributed() -> DistInfo | None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    Returns None when WORLD_SIZE is unset or 1: the caller then runs its plain single-process path.
    NCCL and one GPU per process (cuda:LOCAL_RANK) when CUDA is available, else gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend)
    return DistInfo(rank, world, local, device, owns)


def shutdown(info: DistInfo | None, clean: bool = True) -> None:
    """Leave the process group if init_distributed created it. After a clean run, a barrier first: a rank that
    tears gloo down while a peer still finishes its last exchange can abort that peer. After an error, no
    barrier (the other ranks may never reach it)."""
    if info is not None and info.owns_group:
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def make_mesh(info: DistInfo, ep: int = 1) -> DeviceMesh:
    """A ("dp", "ep") device mesh of world_size / ep by ep ranks."""
    if ep < 1 or info.world_size % ep:
        raise ValueError(f"--ep {ep} must divide the number of processes ({info.world_size})")
    return init_device_mesh(info.device.type, (info.world_size // ep, ep), mesh_dim_names=("dp", "ep"))


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """A summed copy of `t` over the group (all ranks by default)."""
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


# ------------------------------------------------------------------------------------------ token dispatch
class AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: rows x[sum(in_splits[:j]) : ...] go to rank j of `group`; rank j's
    rows for this rank arrive in rank order, out_splits[j] of them. The gradient takes the reverse route."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward divides the gradient by `divisor`."""

    @staticmethod
    def forward(ctx, x, divisor: float):
        ctx.divisor = divisor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.divisor, None


class ExpertParallelExperts(GroupedExperts):
    """GroupedExperts (or a subclass) holding experts [first, first + E/ep), made so by make_expert_parallel; its
    forward takes and returns what GroupedExperts' does (see the module docstring)."""

    group = None
    ep = num_local = first = 1
    grad_divisor = 1.0  # parallelize sets ep: see there

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        ep, local = self.ep, self.num_local
        # 1. counts first: recv_counts[src, e] = rows rank src sends for my local expert e
        send_counts = num_tokens_per_expert
        recv_counts = _all_to_all(send_counts, [local] * ep, [local] * ep, self.group).view(ep, local)
        send_splits = send_counts.view(ep, local).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        # 2. dispatch: rows arrive grouped by source rank, then by expert: regroup by local expert
        xr = AllToAll.apply(x, recv_splits, send_splits, self.group)
        expert_of_row = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(ep),
                                                recv_counts.flatten(), output_size=xr.shape[0])
        perm = expert_of_row.argsort(stable=True)
        y = super().forward(xr.index_select(0, perm), recv_counts.sum(0))
        # 3. combine: back to arrival order, back to the sending ranks (in the order they were sent)
        return AllToAll.apply(y.index_select(0, perm.argsort()), send_splits, recv_splits, self.group)

    def expert_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.grad_divisor != 1.0:
            w = _ScaleGrad.apply(w, self.grad_divisor)
        return super().expert_mm(x, w, offsets)


_EP_CLASSES: dict[type, type] = {GroupedExperts: ExpertParallelExperts}


def make_expert_parallel(experts: GroupedExperts, group) -> GroupedExperts:
    """Turn `experts` (any GroupedExperts subclass) into this rank's expert-parallel share, in place: its class
    gains ExpertParallelExperts' dispatch / combine, its weights keep only rows [first, first + E/ep)."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    num_experts = experts.gate_proj.shape[0]
    if num_experts % ep:
        raise ValueError(f"--ep {ep} must divide n_routed_experts ({num_experts})")
    cls = type(experts)
    if cls not in _EP_CLASSES:
        _EP_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (ExpertParallelExperts, cls), {})
    experts.__class__ = _EP_CLASSES[cls]
    experts.group, experts.ep, experts.num_local = group, ep, num_experts // ep
    experts.first = experts.first_expert = rank * experts.num_local
    for name in ("gate_proj", "up_proj", "down_proj"):
        full = getattr(experts, name).detach()
        setattr(experts, name, nn.Parameter(full[experts.first: experts.first + experts.num_local].clone()))
    return experts


def apply_expert_parallel(module: nn.Module, ep_group) -> None:
    """Make every MoE layer's experts (module itself included) this rank's expert-parallel share."""
    for m in list(module.modules()):
        if isinstance(m, MoE) and not isinstance(m.experts, ExpertParallelExperts):
            make_expert_parallel(m.experts, ep_group)


def expert_parallel_names(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """Parameter name -> its ExpertParallelExperts, for every expert-parallel parameter."""
    out = {}
    for prefix, m in model.named_modules():
        if isinstance(m, ExpertParallelExperts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[f"{prefix}.{name}"] = m
    return out


# ------------------------------------------------------------------------------------------ parallelize
def expert_shard_dim(dp: int, local_experts: int) -> int:
    """Which dim of a [local experts, out, in] weight FSDP shards over `dp` ranks. Dim 0 while every dp rank
    gets at least one whole expert; dim 1 (the experts' rows) once dp exceeds the local experts, since FSDP pads
    a dim-0 shard to ceil(E/dp) whole experts and dp > E would store a whole expert on every rank (torchtitan's
    rule, pytorch/torchtitan distributed/parallel_dims and models/deepseek_v3/infra/parallelize.py)."""
    return 1 if dp > local_experts else 0


def _shard_placement_kw(dim: int) -> dict:
    if dim == 0:
        return {}
    if "shard_placement_fn" not in inspect.signature(fully_shard).parameters:
        raise ValueError(f"sharding experts on dim {dim} needs fully_shard(shard_placement_fn=...), in torch >= 2.6 "
                         f"(this is {torch.__version__}): use fewer data-parallel ranks per expert group (a larger "
                         "--ep) or a newer torch")
    return {"shard_placement_fn": lambda p: Shard(dim)}


def parallelize(model: nn.Module, mesh: DeviceMesh, ep: int = 1, mp_policy=None) -> nn.Module:
    """Make a model data + expert parallel, in place (sharding: see the module docstring). The model may be on
    the meta device (materialised afterwards, as build_model does) or initialised identically on every rank.
    fully_shard wraps every block (layers and MTP modules) and the root (embedding, head, final norm): each block
    is all-gathered just before it runs and freed after. `mp_policy` (an FSDP MixedPrecisionPolicy) is passed on.
    """
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    _parallelize_experts(model, mesh, ep, kw)
    world_mesh = DeviceMesh.from_group(dist.group.WORLD, mesh.device_type) if mesh.ndim > 1 else mesh
    _shard_blocks(model, world_mesh, kw)
    fully_shard(model, mesh=world_mesh, **kw)
    return model


def _parallelize_experts(model: nn.Module, mesh: DeviceMesh, ep: int, kw: dict) -> None:
    if ep == 1:
        return
    if mesh["ep"].size() != ep:
        raise ValueError(f"the mesh has an ep dimension of {mesh['ep'].size()}, not {ep}")
    apply_expert_parallel(model, mesh["ep"].get_group())
    dp = mesh["dp"].size()
    for m in model.modules():
        if isinstance(m, ExpertParallelExperts):
            fully_shard(m, mesh=mesh["dp"], **kw, **_shard_placement_kw(expert_shard_dim(dp, m.num_local)))
            # Expert grads arrive summed over the ep group (all-to-all backward); /ep here and FSDP's default
            # mean over dp give the mean over all ranks. Not set_gradient_divide_factor(world): FSDP makes that
            # a ReduceOp.PREMUL_SUM reduce-scatter over dp, which gloo does not support.
            m.grad_divisor = float(ep)


def _shard_blocks(model: nn.Module, mesh: DeviceMesh, kw: dict) -> None:
    layers = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    for mtp in model.mtp:  # Transformer.mtp_head calls shared_head.norm itself, outside MTPModule.forward
        fully_shard(mtp.shared_head.norm, mesh=mesh, **kw)
    for block in [*layers, *model.mtp]:
        fully_shard(block, mesh=mesh, **kw)


def make_pipeline_mesh(info: DistInfo, pp: int, ep: int = 1) -> tuple[DeviceMesh, DeviceMesh]:
    """A ("pp", "dp", "ep") mesh (pipeline stages outermost, so a stage's ranks are consecutive) and the flat
    mesh of this rank's stage (the ranks FSDP shards the stage's parameters over)."""
    if pp < 1 or info.world_size % (pp * ep):
        raise ValueError(f"--pp {pp} x --ep {ep} must divide the number of processes ({info.world_size})")
    size = info.world_size // pp
    mesh = init_device_mesh(info.device.type, (pp, size // ep, ep), mesh_dim_names=("pp", "dp", "ep"))
    groups = [dist.new_group(list(range(p * size, (p + 1) * size))) for p in range(pp)]  # collective: all of them
    return mesh, DeviceMesh.from_group(groups[info.rank // size], info.device.type)


def parallelize_pipeline(rank_model: nn.Module, stages: list[nn.Module], mesh: DeviceMesh, stage_mesh: DeviceMesh,
                         ep: int = 1) -> None:
    """parallelize for one rank's pipeline stages: experts as there, FSDP per block over the stage's ranks, and
    each stage module as an FSDP root (it holds the embedding or the final norm and head): the pipeline calls
    the stages, never the rank's whole model."""
    _parallelize_experts(rank_model, mesh, ep, {})
    _shard_blocks(rank_model, stage_mesh, {})
    for stage in stages:
        fully_shard(stage, mesh=stage_mesh)


def build_model(cfg, seed: int, device: torch.device, info: DistInfo | None = None, ep: int = 1,
                convert=None) -> nn.Module:
    """The training model with no rank ever holding all of it: built on the meta device, `convert(model)` (for
    example FP8 modules) applied there, parallelized when `info` is given (a process group exists), then only
    this rank's shards allocated on `device` and initialised shard-invariantly from `seed`
    (Transformer.init_weights), so the weights equal the single-process model's whatever the layout."""
    from nanoseek.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    if convert is not None:
        convert(model)
    if info is not None:
        parallelize(model, make_mesh(info, ep), ep=ep)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives every module a tensor of its own, which unties the head
        model.lm_head.weight = model.embed_tokens.weight
    model.init_weights(seed)
    return model.train()


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip gradients to a global L2 norm of max_norm; returns the norm before clipping. Every parameter element
    lives on exactly one rank, so the global squared norm is the sum over ranks of the local ones."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    device = local[0].device if local else torch.device("cpu")
    sq = sum((g.float().pow(2).sum() for g in local), torch.zeros((), device=device))
    dist.all_reduce(sq)
    norm = sq.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in local:
        g.mul_(scale.to(g.dtype))
    return norm


# ------------------------------------------------------------------------------------------ full state
def _gather(t: torch.Tensor, ep_module: ExpertParallelExperts | None) -> torch.Tensor:
    """The whole tensor on CPU: FSDP shards all-gathered, expert-parallel slices concatenated (collective)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    if ep_module is not None:
        parts = [torch.empty_like(t) for _ in range(ep_module.ep)]
        dist.all_gather(parts, t.contiguous(), group=ep_module.group)
        t = torch.cat(parts)
    return t.detach().cpu()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict (nanoseek names, CPU tensors) on every rank. Collective: all ranks call it."""
    ep_names = expert_parallel_names(model)
    return {name: _gather(t, ep_names.get(name)) for name, t in model.state_dict().items()}

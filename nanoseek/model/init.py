"""Shard-invariant initialisation: every parameter (every routed expert separately) is drawn from its own
generator, seeded by (seed, parameter name, expert index), so the weights are bit-identical whatever the world
size, expert-parallel degree or sharding, and a rank can draw just the part it stores.

Parameters may be plain tensors or DTensors (FSDP2 shards, torch.distributed.tensor): a DTensor is filled with
its local slice of the value the unsharded parameter would have. Routed experts are drawn one expert at a time, so
no rank ever holds more than one unsharded non-expert parameter or one expert's matrix beside its own shards; an
expert module's `first_expert` says which global expert its first row is.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor, Replicate, Shard


def param_seed(seed: int, name: str, expert: int | None = None) -> int:
    """A 63-bit generator seed for (seed, name, expert): stable across runs, processes and Python versions
    (hashlib, not hash(), which is salted per process)."""
    key = f"{seed}/{name}" + ("" if expert is None else f"/expert{expert}")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def draw(seed: int, name: str, shape, kind: str, std: float, expert: int | None = None) -> torch.Tensor:
    """The unsharded value (fp32, CPU) of parameter `name` (one expert of it when `expert` is given)."""
    if kind == "ones":
        return torch.ones(shape)
    if kind == "zeros":
        return torch.zeros(shape)
    g = torch.Generator(device="cpu").manual_seed(param_seed(seed, name, expert))
    return torch.empty(shape).normal_(0.0, std, generator=g)


def local_box(t: torch.Tensor) -> list[tuple[int, int, int]]:
    """(dim, start, length) for every sharded dim of the part of `t`'s global tensor this rank stores, in the
    chunking DTensor's Shard uses (torch.chunk: ceil-sized pieces, the last ones short or empty). A plain
    tensor stores all of itself: []."""
    if not isinstance(t, DTensor):
        return []
    shape = list(t.shape)
    starts = [0] * len(shape)
    box = {}
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, Shard):
            raise ValueError(f"cannot initialise a parameter placed as {placement}: only Shard and Replicate")
        d, n = placement.dim, t.device_mesh.size(mesh_dim)
        coord = t.device_mesh.get_local_rank(mesh_dim)
        chunk = -(-shape[d] // n)
        start = min(shape[d], coord * chunk)
        length = max(0, min(shape[d], start + chunk) - start)
        starts[d] += start
        shape[d] = length
        box[d] = (starts[d], length)
    return [(d, s, n) for d, (s, n) in sorted(box.items())]


def _narrow(x: torch.Tensor, box, offset: int = 0) -> torch.Tensor:
    for d, start, length in box:
        if d - offset >= 0:
            x = x.narrow(d - offset, start, length)
    return x


def init_kind(owner: nn.Module, pname: str) -> str:
    """'ones' for norm weights, 'zeros' for biases, else 'normal' (N(0, initializer_range))."""
    from nanoseek.model.norm import RMSNorm

    if isinstance(owner, RMSNorm):
        return "ones"
    return "zeros" if pname == "bias" else "normal"


@torch.no_grad()
def init_parameters_(model: nn.Module, seed: int, std: float) -> None:
    """Fill every parameter of `model` (plain or DTensor shards, already materialised) in place, and zero the
    routers' bias buffers. Expert parameters ([experts, out, in], owner has `first_expert`) are drawn per expert."""
    for mname, owner in model.named_modules():
        for pname, p in owner.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            local = p.to_local() if isinstance(p, DTensor) else p
            box = local_box(p)
            kind = init_kind(owner, pname)
            first = getattr(owner, "first_expert", None)
            if first is None or kind != "normal":
                local.copy_(_narrow(draw(seed, name, p.shape, kind, std), box))
                continue
            # per expert: this rank's experts along dim 0, each one's slice along the other dims
            (e0, n) = next(((s, n) for d, s, n in box if d == 0), (0, p.shape[0]))
            for j in range(n):
                one = draw(seed, name, p.shape[1:], kind, std, expert=first + e0 + j)
                local[j].copy_(_narrow(one, box, offset=1))
        for bname, b in owner.named_buffers(recurse=False):
            if bname == "e_score_correction_bias" and b is not None:
                b.zero_()

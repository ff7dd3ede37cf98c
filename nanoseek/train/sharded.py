"""Sharded training checkpoints with torch.distributed.checkpoint (DCP, https://pytorch.org/docs/stable/distributed.checkpoint.html):
every rank writes only its own shards of the model and optimizer, in parallel, and a checkpoint resumes on any
other layout (number of processes, --ep), or in one process, because DCP reshards on load.

Keys are layout-free: a parameter under its name (DCP stores FSDP's DTensor shards with their global offsets), a
routed expert weight as one tensor per global expert (`<name>.<e>`), since expert-parallel slices are not
DTensors of the global [E, out, in] tensor. AdamW's moments follow their parameter's keys (`optim.<key>.exp_avg`).

On disk RUN_DIR/checkpoints/step_N holds DCP's files (.metadata, one __R_0.distcp per rank), config.json,
trainer_state.json and rng.safetensors. Saves go to a temporary directory renamed into place once complete, so a
kill mid-save leaves the previous checkpoint whole. The transformers layout stays the exchange format:
export_pretrained (and `nanoseek convert`) streams a sharded checkpoint into it, and load_pretrained_slices resumes
a sharded run from one, each rank reading only its own slices.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanoseek.checkpoint import TensorSource, hf_keys, plan_shards, write_index
from nanoseek.config import ModelConfig
from nanoseek.io_utils import atomic_directory, atomic_write_text, fsync_dir
from nanoseek.model.init import DTensor, Shard, local_box
from nanoseek.tokenizer import copy_tokenizer
from nanoseek.train import state as state_module
from nanoseek.train.state import OPTIMIZER_FILE, TRAINER_STATE, list_checkpoints, point_latest

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:
    from torch.distributed._composable.fsdp import FSDPModule

RNG_FILE = "rng.safetensors"


def is_sharded_checkpoint(path) -> bool:
    return os.path.exists(os.path.join(path, ".metadata"))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _expert_views(name: str, t: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
    """`<name>.<e>` -> this rank's part of global expert e, for a stacked expert tensor `t` ([local experts,
    out, in]: plain, or FSDP-sharded on dim 0 or 1 over a 1-D mesh) whose row 0 is global expert `first`."""
    if not isinstance(t, DTensor):
        return {f"{name}.{first + j}": t[j] for j in range(t.shape[0])}
    local, (placement,), mesh = t.to_local(), t.placements, t.device_mesh
    n, coord = mesh.size(), mesh.get_local_rank()
    if not isinstance(placement, Shard) or placement.dim not in (0, 1):
        raise ValueError(f"{name}: cannot checkpoint experts placed as {t.placements}")
    if placement.dim == 0:  # whole experts: a contiguous chunk of the local ones
        start = min(t.shape[0], coord * -(-t.shape[0] // n))
        return {f"{name}.{first + start + j}": local[j] for j in range(local.shape[0])}
    shape = tuple(t.shape[1:])  # rows of every expert: a DTensor per expert over the same mesh
    stride = (shape[1], 1)
    return {f"{name}.{first + j}": DTensor.from_local(local[j], mesh, [Shard(0)], run_check=False, shape=shape,
                                                      stride=stride)
            for j in range(t.shape[0])}


def _tensor_entries(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, int | None]]:
    """(name, parameter, first expert or None) for every parameter, then (name, buffer, None) for buffers."""
    out = []
    for mname, owner in model.named_modules():
        first = getattr(owner, "first_expert", None)
        for pname, p in owner.named_parameters(recurse=False):
            out.append((f"{mname}.{pname}" if mname else pname, p, first))
        for bname, b in owner.named_buffers(recurse=False):
            if b is not None:
                out.append((f"{mname}.{bname}" if mname else bname, b, None))
    return out


def _reshard(model: torch.nn.Module) -> None:
    """Put every FSDP module's sharded parameters back in place. FSDP2 leaves the root unsharded after a forward
    (it is needed again at once in training), so after an evaluation the root's registered parameters would be
    whole tensors, not the shards the optimizer holds."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _named_parameters(model: torch.nn.Module):
    return [(name, t) for name, t, _ in _tensor_entries(model) if isinstance(t, torch.nn.Parameter)]


def _optim_keys(state: dict, name: str) -> list[str]:
    return [k for k in state if k.startswith(f"optim.{name}.")]


def sharded_state(model: torch.nn.Module, optimizer=None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as views of this rank's model (and optimizer) storage: loading into them
    restores the state in place."""
    _reshard(model)
    state: dict[str, torch.Tensor] = {}
    seen = set()
    for name, t, first in _tensor_entries(model):
        if id(t) in seen:  # tied weights: one key
            continue
        seen.add(id(t))
        views = _expert_views(name, t, first) if first is not None else {name: t}
        state.update({f"model.{k}": v for k, v in views.items()})
        opt = optimizer.state.get(t) if optimizer is not None and isinstance(t, torch.nn.Parameter) else None
        if opt:
            for k, v in opt.items():
                if k == "step" or not torch.is_tensor(v) or v.dim() == 0:
                    state[f"optim.{name}.{k}"] = v if torch.is_tensor(v) else torch.tensor(float(v))
                else:
                    sub = _expert_views(name, v, first) if first is not None else {name: v}
                    state.update({f"optim.{kk}.{k}": vv for kk, vv in sub.items()})
    return state


@torch.no_grad()
def init_optimizer_state(optimizer) -> None:
    """Create AdamW's state (zero moments) so a checkpoint can be loaded into it: one step at lr 0 on zero
    gradients, which leaves the parameters exactly as they are (decoupled weight decay is scaled by lr too)."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    grads = {}
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            grads[p] = p.grad
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    for p, grad in grads.items():
        p.grad = grad


def save_sharded(run_dir: str, step: int, model, optimizer, trainer_state: dict, config_json: str,
                 tokenizer_dir: str | None = None, keep: int | None = None) -> str:
    """Write RUN_DIR/checkpoints/step_N with DCP (collective: every rank calls it) and point `latest` at it."""
    final = os.path.join(run_dir, "checkpoints", f"step_{step}")
    tmp = os.path.join(run_dir, "checkpoints", f".step_{step}.tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
        os.makedirs(tmp)
    _barrier()
    dcp.save(sharded_state(model, optimizer), checkpoint_id=tmp)
    _barrier()
    if _rank() == 0:
        save_file({"rng.torch": torch.get_rng_state()}, os.path.join(tmp, RNG_FILE))
        atomic_write_text(os.path.join(tmp, "config.json"), config_json)
        if tokenizer_dir:
            copy_tokenizer(tokenizer_dir, tmp)
        # trainer_state.json last: list_checkpoints counts a directory only once it is there
        atomic_write_text(os.path.join(tmp, TRAINER_STATE), json.dumps({**trainer_state, "step": step,
                                                                        "format": "dcp"}, indent=1) + "\n")
        for f in os.listdir(tmp):
            with open(os.path.join(tmp, f), "rb") as fh:
                os.fsync(fh.fileno())
        state_module._before_rename()
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(os.path.dirname(final))
        point_latest(run_dir, final)
        if keep:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(os.path.join(run_dir, "checkpoints", f"step_{old}"), ignore_errors=True)
    _barrier()  # nobody reads `latest` before rank 0 has moved it
    return final


def load_sharded(path: str, model, optimizer=None) -> dict:
    """Restore model, optimizer and the torch RNG from a sharded checkpoint, in place, on any layout (or one
    process, without a process group); returns the trainer state."""
    if optimizer is not None:
        init_optimizer_state(optimizer)
    state = sharded_state(model, optimizer)
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    if optimizer is not None:  # parameters that never had a gradient (e.g. MTP with --mtp-lambda 0) had no state
        for name, p in _named_parameters(model):
            if p in optimizer.state and not any(k in saved for k in _optim_keys(state, name)):
                del optimizer.state[p]
        state = {k: v for k, v in state.items() if k.startswith("model.") or k in saved}
    dcp.load(state, checkpoint_id=path)
    torch.set_rng_state(load_file(os.path.join(path, RNG_FILE))["rng.torch"])
    with open(os.path.join(path, TRAINER_STATE)) as f:
        return json.load(f)


def export_pretrained(path: str, out: str, max_shard_bytes: int = 5 * 2**30) -> str:
    """A sharded checkpoint as a transformers-layout directory (config.json, safetensors, tokenizer), streamed:
    the tensors are planned into safetensors shards from DCP's metadata, then each shard is read from the
    checkpoint, written and freed, so at most one shard (max_shard_bytes) is in memory, never the whole model.
    Runs in one process without a process group."""
    cfg = ModelConfig.from_json(os.path.join(path, "config.json"))
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    entries = []  # (transformers key, DCP key)
    for key in meta:
        if not key.startswith("model."):
            continue
        name = key[len("model."):]
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = re.fullmatch(r"(.*\.mlp\.experts\.(?:gate|up|down)_proj)\.(\d+)", name)
        entries.append((hf_keys(m.group(1), cfg)[int(m.group(2))] if m else hf_keys(name, cfg)[0], key))
    for k in range(cfg.num_nextn_predict_layers):  # DeepSeek's layout repeats the shared tensors per MTP layer
        layer = cfg.num_hidden_layers + k
        entries += [(f"model.layers.{layer}.embed_tokens.weight", "model.embed_tokens.weight"),
                    (f"model.layers.{layer}.shared_head.head.weight", "model.lm_head.weight")]
    dcp_key = dict(entries)
    files = plan_shards([(hf, meta[key].size.numel() * meta[key].properties.dtype.itemsize) for hf, key in entries],
                        max_shard_bytes)
    total = 0
    with atomic_directory(out) as tmp:
        for name, hfs in files.items():
            want = {dcp_key[hf]: torch.empty(tuple(meta[dcp_key[hf]].size), dtype=meta[dcp_key[hf]].properties.dtype)
                    for hf in hfs}
            dcp.load(want, checkpoint_id=path)
            tensors = {hf: want[dcp_key[hf]].clone() for hf in hfs}  # clone: a shared tensor's copies differ
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del want, tensors
        if len(files) > 1:
            write_index(tmp, files, total)
        cfg.to_json(os.path.join(tmp, "config.json"))
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            copy_tokenizer(path, tmp)
    return out


# ------------------------------------------------------------------------------------------ transformers layout
def _box_index(t: torch.Tensor, skip_dim0: bool = False) -> tuple:
    """Slices of the global tensor this rank stores (init.local_box), optionally without dim 0."""
    index = [slice(None)] * t.dim()
    for d, start, n in local_box(t):
        index[d] = slice(start, start + n)
    return tuple(index[1:]) if skip_dim0 else tuple(index)


def _expert_range(t: torch.Tensor) -> tuple[int, int]:
    """(first local row, rows) of a stacked expert tensor's dim 0 on this rank."""
    return next(((s, n) for d, s, n in local_box(t) if d == 0), (0, t.shape[0]))


def _single_process_indices(cfg) -> dict[str, int]:
    """Parameter name -> its index in a single-process optimizer state (make_optimizer over the whole model),
    the indexing of a transformers-layout training checkpoint's optimizer.safetensors."""
    from nanoseek.model.transformer import Transformer
    from nanoseek.train.loop import make_optimizer

    with torch.device("meta"):
        plain = Transformer(cfg)
    names = {id(p): n for n, p in plain.named_parameters()}
    optimizer = make_optimizer(plain, 1.0)
    return {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}


def _optimizer_indices(model, optimizer) -> dict:
    """Parameter -> its index in a transformers-layout checkpoint's optimizer file, matched by name (`model` may
    hold only some parameters: a pipeline stage); creates the optimizer's state to load into."""
    init_optimizer_state(optimizer)
    single = _single_process_indices(model.config)
    trainable = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {t: single[name] for name, t in _named_parameters(model) if id(t) in trainable}


def _copy_slice(dst: torch.Tensor, t: torch.Tensor, first: int | None, keys: list[str], okey: str | None,
                weights: TensorSource, moments: TensorSource) -> None:
    """Copy this rank's part of the weight `keys` (okey None) or of the AdamW moment `okey` into dst, the local
    storage of t (first: t's first global expert, or None)."""
    if okey is not None and dst.dim() == 0:
        dst.copy_(moments.get(okey))
    elif first is None:
        dst.copy_(weights.get(keys[0], _box_index(t)) if okey is None else moments.get(okey, _box_index(t)))
    else:
        e0, n = _expert_range(t)
        rows = _box_index(t, skip_dim0=True)
        if okey is None:
            for j in range(n):
                dst[j].copy_(weights.get(keys[first + e0 + j], rows))
        else:
            dst.copy_(moments.get(okey, (slice(first + e0, first + e0 + n), *rows)))


@torch.no_grad()
def load_pretrained_slices(path: str, model, optimizer=None) -> dict:
    """Resume a sharded run from a transformers-layout training checkpoint (one written by a single process),
    every rank reading only its own slices of the weights and of the AdamW moments; returns the trainer state.
    `model` may be a whole (sharded) model or one rank's pipeline stages; the optimizer file's indices are the
    single-process optimizer's (make_optimizer's parameter order), matched by parameter name."""
    cfg = model.config
    weights = TensorSource(path)
    if any(k.endswith("_scale_inv") for k in weights.keys()):
        raise ValueError(f"{path} is an FP8 release checkpoint, not a training checkpoint: resume from fp32/bf16 "
                         "weights (nanoseek convert --dtype fp32)")
    with safe_open(os.path.join(path, OPTIMIZER_FILE), framework="pt") as f:
        moments = TensorSource(path, {k: OPTIMIZER_FILE for k in f.keys()})
    index_of = _optimizer_indices(model, optimizer) if optimizer is not None else {}
    _reshard(model)
    for name, t, first in _tensor_entries(model):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        targets = [(t.to_local() if isinstance(t, DTensor) else t, None)]
        if t in index_of and f"state.{index_of[t]}.exp_avg" not in moments.weight_map:
            optimizer.state.pop(t, None)  # never had a gradient (e.g. MTP with --mtp-lambda 0): no state, as saved
        elif t in index_of:
            targets += [((v.to_local() if isinstance(v, DTensor) else v), f"state.{index_of[t]}.{k}")
                        for k, v in optimizer.state[t].items() if torch.is_tensor(v)]
        for dst, okey in targets:
            _copy_slice(dst, t, first, hf_keys(name, cfg), okey, weights, moments)
    if "rng.torch" in moments.weight_map:
        torch.set_rng_state(moments.get("rng.torch"))
    with open(os.path.join(path, TRAINER_STATE)) as f:
        state = json.load(f)
    state.pop("optimizer_param_groups", None)
    return state

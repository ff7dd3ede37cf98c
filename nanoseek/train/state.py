"""Training checkpoints: RUN_DIR/checkpoints/step_N holds the model in the transformers layout (so any step loads
in transformers or `nanoseek generate`), the tokenizer, and what resuming needs: optimizer moments and RNG states in
safetensors (no pickle anywhere), step, schedule and data position in trainer_state.json.

Each checkpoint is built in a temporary directory, fsynced and renamed into place; RUN_DIR/latest (a symlink)
then moves to it. A process killed mid-save leaves the previous checkpoint and `latest` untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from nanoseek.io_utils import atomic_directory, atomic_write_text, fsync_dir
from nanoseek.tokenizer import copy_tokenizer

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def _before_rename() -> None:
    """Called after every file of a checkpoint is written and before it is renamed into place (a seam for
    tests that kill the process exactly here)."""


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Flatten an optimizer state into safetensors-ready tensors plus JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = t.detach().cpu().contiguous().clone()
    return tensors, sd["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"state\.(\d+)\.(.+)", key)
        if m:
            state.setdefault(int(m.group(1)), {})[m.group(2)] = t
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: str, step: int, model, optimizer, trainer_state: dict, tokenizer_dir: str | None = None,
                    keep: int | None = None) -> str:
    """Write RUN_DIR/checkpoints/step_N atomically and point RUN_DIR/latest at it. Returns its path."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # the NaN guard should make this impossible; never persist a broken model
        raise RuntimeError(f"refusing to save step {step}: non-finite values in {', '.join(bad[:3])}")
    final = os.path.join(run_dir, "checkpoints", f"step_{step}")
    with atomic_directory(final) as tmp:
        model.save_pretrained(tmp)
        if tokenizer_dir:
            copy_tokenizer(tokenizer_dir, tmp)
        tensors, groups = optimizer_tensors(optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, os.path.join(tmp, OPTIMIZER_FILE))
        state = {**trainer_state, "step": step, "optimizer_param_groups": groups}
        atomic_write_text(os.path.join(tmp, TRAINER_STATE), json.dumps(state, indent=1) + "\n")
        _before_rename()
    point_latest(run_dir, final)
    if keep:
        for old in sorted(list_checkpoints(run_dir))[:-keep]:
            shutil.rmtree(os.path.join(run_dir, "checkpoints", f"step_{old}"), ignore_errors=True)
    return final


def point_latest(run_dir: str, target: str) -> None:
    """Atomically repoint RUN_DIR/latest (a relative symlink) at `target`."""
    link = os.path.join(run_dir, "latest")
    tmp = link + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.relpath(target, run_dir), tmp)
    os.replace(tmp, link)
    fsync_dir(run_dir)


def list_checkpoints(run_dir: str) -> list[int]:
    """Steps of the complete checkpoints in a run (temporary or half-written directories are not listed)."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    steps = []
    for name in os.listdir(folder):
        m = re.fullmatch(r"step_(\d+)", name)
        if m and os.path.exists(os.path.join(folder, name, TRAINER_STATE)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint directory of a run, or None."""
    steps = list_checkpoints(run_dir)
    return os.path.join(run_dir, "checkpoints", f"step_{steps[-1]}") if steps else None


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Restore model weights (and router biases), optimizer moments and RNG in place; return trainer_state."""
    loaded = type(model).from_pretrained(path, dtype=next(model.parameters()).dtype)
    missing = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing.missing_keys[:3]}, "
                           f"unexpected {missing.unexpected_keys[:3]}")
    with open(os.path.join(path, TRAINER_STATE)) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(path, OPTIMIZER_FILE))
    torch.set_rng_state(tensors.pop("rng.torch"))
    cuda_rng = tensors.pop("rng.cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    load_optimizer(optimizer, tensors, state.pop("optimizer_param_groups"))
    return state

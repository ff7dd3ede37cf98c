"""Sharded (torch.distributed.checkpoint) training checkpoints in one process, where DCP runs without a process
group: round trip of model and AdamW state, atomicity of a save killed before its rename, the streamed
transformers export, and reading a transformers-layout checkpoint by slices. The multi-process cases (4 -> 2 -> 1
processes, other --ep) are in test_distributed.py."""

import json
import os

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.train import sharded, state
from nanoseek.train.loop import make_optimizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP: "assuming the intent is to load in a single process"
CFG = ModelConfig.from_preset("tiny").replace(vocab_size=300)


def trained(seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(CFG).train()
    opt = make_optimizer(model, 1e-2)
    for _ in range(2):
        model(torch.randint(0, 300, (2, 16)), return_mtp=True)[0].square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_and_a_save_killed_before_its_rename(tmp_path, monkeypatch):
    model, opt = trained()  # the MTP module gets no gradient: no AdamW state, which must round-trip too
    rng = torch.get_rng_state()
    path = sharded.save_sharded(str(tmp_path), 2, model, opt, {"run_steps": 9}, json.dumps(CFG.to_dict()))
    assert sharded.is_sharded_checkpoint(path) and state.latest_checkpoint(str(tmp_path)) == path
    fresh, fresh_opt = trained(seed=1)
    torch.manual_seed(123)
    got = sharded.load_sharded(path, fresh, fresh_opt)
    assert got["step"] == 2 and got["run_steps"] == 9 and torch.equal(torch.get_rng_state(), rng)
    assert same_state(model, fresh)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert (p in opt.state) == (q in fresh_opt.state)
        for k in opt.state.get(p, {}):
            assert torch.equal(opt.state[p][k], fresh_opt.state[q][k]), k

    def killed():
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(state, "_before_rename", killed)
    with pytest.raises(KeyboardInterrupt):
        sharded.save_sharded(str(tmp_path), 3, fresh, fresh_opt, {"run_steps": 9}, "{}")
    assert state.list_checkpoints(str(tmp_path)) == [2] and state.latest_checkpoint(str(tmp_path)) == path
    monkeypatch.undo()
    sharded.save_sharded(str(tmp_path), 3, fresh, fresh_opt, {"run_steps": 9}, "{}")  # the leftover is replaced
    assert state.list_checkpoints(str(tmp_path)) == [2, 3]


def test_streamed_export_is_the_model_in_the_transformers_layout(tmp_path):
    model, opt = trained()
    path = sharded.save_sharded(str(tmp_path / "run"), 2, model, opt, {}, json.dumps(CFG.to_dict()))
    out = sharded.export_pretrained(path, str(tmp_path / "hf"), max_shard_bytes=2**20)  # many small shards
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 3
    assert same_state(model, Transformer.from_pretrained(out))


def test_a_transformers_layout_checkpoint_read_by_slices_equals_the_plain_load(tmp_path):
    model, opt = trained()
    path = state.save_checkpoint(str(tmp_path), 2, model, opt, {"run_steps": 9})
    a, a_opt = trained(seed=1)
    b, b_opt = trained(seed=2)
    state.load_checkpoint(path, a, a_opt)
    got = sharded.load_pretrained_slices(path, b, b_opt)
    assert got["step"] == 2 and same_state(a, b) and same_state(model, b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p in a_opt.state) == (q in b_opt.state)
        for k in ("exp_avg", "exp_avg_sq"):
            if p in a_opt.state:
                assert torch.equal(a_opt.state[p][k], b_opt.state[q][k]), k

"""Activation recomputation (--recompute block|selective): the same loss and bit-identical gradients as none,
with fewer tensors kept for the backward; a pretraining run with it follows the run without."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.train import pretrain
from nanoseek.train.loop import read_metrics

CFG = ModelConfig.from_preset("tiny").replace(vocab_size=500)


def _step(mode: str):
    torch.manual_seed(0)
    model = Transformer(CFG).train()
    model.set_recompute(mode)
    x, y = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(1)).unbind(0)
    x, y = x[None].repeat(2, 1), y[None].repeat(2, 1)
    saved = []  # tensors kept for the backward outside checkpointed regions (checkpoint packs its own)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss, _ = pretrain.compute_loss(model, x, y, pretrain.TrainConfig())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("mode", ["block", "selective"])
def test_recompute_gives_identical_gradients(mode):
    loss0, grads0, saved0 = _step("none")
    loss, grads, saved = _step(mode)
    assert torch.equal(loss, loss0)
    assert grads.keys() == grads0.keys()
    for name, g in grads0.items():
        assert g is not None and torch.equal(grads[name], g), name
    assert saved < saved0 / 2  # the blocks' activations are no longer held (in SAC's cache at most)


def test_recompute_is_checked_and_off_outside_training():
    model = Transformer(CFG)
    with pytest.raises(ValueError, match="--recompute"):
        model.set_recompute("all")
    model.set_recompute("block")
    model.eval()
    with torch.no_grad():  # eval / no-grad forwards never go through checkpoint
        assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 500)


def test_pretraining_with_block_recompute_follows_the_run_without(data_dir, tmp_path):
    base = dict(preset="tiny", data=data_dir, steps=3, batch_size=2, seq_len=32, eval_every=0, warmup=1, lr=1e-2)
    pretrain.train(pretrain.TrainConfig(out=str(tmp_path / "a"), **base), progress=False)
    pretrain.train(pretrain.TrainConfig(out=str(tmp_path / "b"), recompute="block", **base), progress=False)
    a, b = read_metrics(str(tmp_path / "a")), read_metrics(str(tmp_path / "b"))
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 3

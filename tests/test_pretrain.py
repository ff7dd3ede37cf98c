"""Pretraining: schedule, balancing rules against the paper's formulas, the non-finite guard, exact resume, and a
process killed in the middle of a save."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data import TokenDataset
from nanoseek.model.moe import Routing
from nanoseek.train import balance, pretrain
from nanoseek.train.loop import TrainingDiverged, lr_at, read_metrics
from nanoseek.train.state import latest_checkpoint, list_checkpoints




def tc(data_dir, out, **kw):
    base = dict(preset="tiny", data=data_dir, out=str(out), steps=6, batch_size=4, seq_len=32, eval_every=3,
                eval_batches=1, save_every=3, warmup=2)
    return pretrain.TrainConfig(**{**base, **kw})


def losses(run_dir):
    return [(r["step"], r["loss"], r["mtp_loss"]) for r in read_metrics(str(run_dir))]


def test_schedule_shapes():
    assert lr_at(1, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.55)  # cosine midpoint between 1.0 and 0.1
    assert lr_at(80, 100, 1.0, 10, "wsd") == 1.0 and lr_at(90, 100, 1.0, 10, "wsd") == pytest.approx(0.55)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(50, 100, 1.0, 10, "linear")


def test_sequence_balance_loss_matches_the_formula_per_sequence():
    b, t, e, k = 3, 5, 8, 2
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(b * t, e, generator=g)
    indices = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b * t)])
    r = Routing(weights=torch.ones(b * t, k), indices=indices, scores=scores, counts=torch.zeros(e))
    want = 0.0
    for s in range(b):  # eq. 17-20, written out for each sequence
        rows = range(s * t, (s + 1) * t)
        for i in range(e):
            f = e / (k * t) * sum(int(i in indices[row].tolist()) for row in rows)
            p = sum(float(scores[row, i] / scores[row].sum()) for row in rows) / t
            want += f * p
    assert balance.sequence_balance_loss(r, b, k).item() == pytest.approx(want / b, rel=1e-5)


def test_bias_update_is_gamma_times_sign():
    model = Transformer(ModelConfig.from_preset("tiny"))
    layers = model.moe_layers()
    load = torch.tensor([5, 1, 3, 3, 0, 9, 3, 0, 3, 3, 3, 3, 3, 3, 3, 3])  # mean exactly 3
    balance.update_bias(layers, [load] * len(layers), gamma=0.01)
    want = 0.01 * torch.sign(3.0 - load.float())
    for layer in layers:
        assert torch.equal(layer.gate.e_score_correction_bias, want)
    stats = balance.load_stats([load])
    assert stats["moe_max_over_mean"] == pytest.approx(3.0) and stats["moe_dead_experts"] == 2


def hand_balance(routing, batch_size, k):
    """V3 eq. 17-20 for one layer, averaged over sequences: f_i = E / (K T) * #{t : i chosen at t},
    P_i = mean_t s_{i,t} / sum_j s_{j,t}, L = sum_i f_i P_i."""
    n, e = routing.scores.shape
    t = n // batch_size
    total = 0.0
    for s in range(batch_size):
        rows = slice(s * t, (s + 1) * t)
        chosen = torch.zeros(e).index_add_(0, routing.indices[rows].flatten(), torch.ones(t * k))
        f = e / (k * t) * chosen
        p = (routing.scores[rows] / routing.scores[rows].sum(-1, keepdim=True)).mean(0)
        total = total + (f * p).sum()
    return total / batch_size


@pytest.mark.parametrize("lam,alpha,depth", [(0.3, 1e-4, 1), (0.5, 0.02, 2), (0.0, 0.02, 1), (0.0, 0.0, 1)])
def test_compute_loss_is_ce_plus_lambda_mtp_plus_alpha_balance(lam, alpha, depth):
    """loss = CE + lambda * mean_k CE(MTP depth k) + alpha * sum over MoE layers of the sequence-wise balance
    loss, rebuilt here from the logits and the routers' scores. With lambda 0 the MTP block does not run, so its
    MoE layer has no routing and must not enter the balance loss."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny").replace(num_nextn_predict_layers=depth))
    for m in model.moe_layers():  # a non-zero router bias, so selection differs from plain top-k of s
        m.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    x, y = ids[:, :-1], ids[:, 1:]
    loss, parts = pretrain.compute_loss(model, x, y, pretrain.TrainConfig(mtp_lambda=lam, balance_alpha=alpha))
    with torch.no_grad():
        logits, mtp = model(x, return_mtp=True)
    ce = torch.nn.functional.cross_entropy
    main = ce(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    # depth k at position i predicts token i + k + 1 of ids
    mtp_ce = sum(ce(m.reshape(-1, m.shape[-1]), ids[:, k + 1:].reshape(-1)) for k, m in enumerate(mtp, 1)) / depth
    main_moe = [m for layer in model.layers for m in layer.modules() if m in model.moe_layers()]
    layers = model.moe_layers() if lam > 0 else main_moe
    assert len(main_moe) == 3 and len(model.moe_layers()) == 3 + depth
    bal = sum(hand_balance(m.last_routing, 3, model.config.num_experts_per_tok) for m in layers)
    want = main + lam * mtp_ce + alpha * bal
    assert loss.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)
    assert parts["loss"].item() == pytest.approx(main.item(), rel=1e-6)
    assert parts["mtp_loss"].item() == pytest.approx(mtp_ce.item() if lam > 0 else 0.0, rel=1e-6)
    assert parts["balance_loss"].item() == pytest.approx((alpha * bal).item(), rel=1e-5, abs=1e-12)
    if lam > 0 and alpha > 0:  # both terms are large enough here to show up at this tolerance
        assert (lam * mtp_ce).item() > 1e-3 and (alpha * bal).item() > 1e-6 * want.item()


def test_mtp_lambda_zero_trains_without_the_mtp_block(data_dir, tmp_path):
    """--mtp-lambda 0 (with and without the balance loss): the MTP block never runs, so it takes no part in
    the loss, the bias update or the load statistics."""
    for alpha in (0.0, 1e-4):  # alpha 0 crashed collecting counts, alpha > 0 in the balance loss
        run = tmp_path / f"alpha{alpha}"
        pretrain.train(tc(data_dir, run, steps=2, save_every=0, eval_every=0, mtp_lambda=0.0,
                          balance_alpha=alpha), progress=False)
        rows = read_metrics(run)
        assert [r["mtp_loss"] for r in rows] == [0.0, 0.0]
        assert len(rows[-1]["moe_layers"]) == 3  # the main model's MoE layers only
        model = Transformer.from_pretrained(run / "latest")
        assert all(layer.mlp.gate.e_score_correction_bias.abs().sum() > 0 for layer in model.layers[1:])
        mtp_moe = model.mtp[0].block.mlp
        assert torch.equal(mtp_moe.gate.e_score_correction_bias, torch.zeros(model.config.n_routed_experts))


def test_training_lowers_loss_moves_biases_and_writes_a_loadable_checkpoint(data_dir, tmp_path):
    summary = pretrain.train(tc(data_dir, tmp_path / "run", steps=12, save_every=0, lr=1e-2), progress=False)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert {"lr", "tokens_per_s", "moe_max_over_mean", "moe_dead_experts", "mtp_loss"} <= set(rows[-1])
    assert "val_loss" in rows[2] and "val_loss" not in rows[0]
    assert os.path.realpath(tmp_path / "run" / "latest") == os.path.realpath(summary["checkpoint"])
    model = Transformer.from_pretrained(tmp_path / "run" / "latest")
    assert model.config.vocab_size == json.load(open(os.path.join(data_dir, "manifest.json")))["vocab_size"]
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in model.moe_layers())
    assert os.path.exists(tmp_path / "run" / "latest" / "tokenizer.json")
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "latest", dtype=torch.float32)
    x = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["tiny", "nano"])  # nano ties lm_head to the embedding
def test_the_saved_checkpoint_is_the_model_that_trained(data_dir, tmp_path, preset):
    """The reloaded checkpoint scores the validation loss the training process logged at its last step, to float
    rounding: what was trained is what was saved (a tied head once trained as a second matrix and was dropped on
    save, so the reloaded model was near-random)."""
    run = tmp_path / preset
    pretrain.train(tc(data_dir, run, preset=preset, steps=4, eval_every=4, eval_batches=2, save_every=0, lr=1e-2),
                   progress=False)
    logged = read_metrics(run)[-1]["val_loss"]
    model = Transformer.from_pretrained(run / "latest", dtype=torch.float32)
    assert model.num_params() == Transformer(model.config).num_params()
    val = TokenDataset(data_dir, "val", 32)
    assert pretrain.evaluate(model, val, tc(data_dir, run, eval_batches=2)) == pytest.approx(logged, rel=1e-5)


def test_non_finite_steps_are_skipped_then_stop_the_run(data_dir, tmp_path, monkeypatch):
    real = pretrain.compute_loss
    calls = {"n": 0}

    def sometimes_nan(model, x, y, cfg):
        calls["n"] += 1
        loss, parts = real(model, x, y, cfg)
        if calls["n"] in bad_calls:
            nan = torch.tensor(float("nan"))
            return loss * nan, {**parts, "loss": nan}
        return loss, parts

    monkeypatch.setattr(pretrain, "compute_loss", sometimes_nan)
    bad_calls = {2}
    summary = pretrain.train(tc(data_dir, tmp_path / "a", steps=4, save_every=0), progress=False)
    rows = read_metrics(tmp_path / "a")
    assert summary["skipped_steps"] == 1 and rows[1].get("skipped") and not rows[2].get("skipped")
    model = Transformer.from_pretrained(summary["checkpoint"])
    assert all(torch.isfinite(p).all() for p in model.parameters())

    calls["n"] = 0
    bad_calls = set(range(3, 100))
    with pytest.raises(TrainingDiverged, match="non-finite .* 3 steps in a row"):
        pretrain.train(tc(data_dir, tmp_path / "b", steps=20, save_every=1, max_bad_steps=3), progress=False)
    assert list_checkpoints(str(tmp_path / "b")) == [1, 2, 3, 4]  # skipped steps save the unchanged model


def test_resume_reproduces_the_uninterrupted_run_exactly(data_dir, tmp_path):
    pretrain.train(tc(data_dir, tmp_path / "full"), progress=False)
    # a run that stopped right after its step-3 checkpoint
    os.makedirs(tmp_path / "cut" / "checkpoints")
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_3", tmp_path / "cut" / "checkpoints" / "step_3")
    with open(tmp_path / "cut" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in read_metrics(tmp_path / "full")[:3])
    pretrain.train(tc(data_dir, tmp_path / "cut", resume=True), progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    a = Transformer.from_pretrained(tmp_path / "full" / "latest").state_dict()
    b = Transformer.from_pretrained(tmp_path / "cut" / "latest").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="the schedule would change"):
        pretrain.train(tc(data_dir, tmp_path / "cut", resume=True, steps=9), progress=False)


KILLER = """
import os, sys
import torch
torch.set_num_threads(1)  # as the in-process runs it is compared with (thread count changes float sums)
import nanoseek.train.state as state
from nanoseek.train import pretrain
saves = []
def die_on_second_save():
    saves.append(1)
    if len(saves) == 2:
        os._exit(3)  # killed: no cleanup, no finally blocks
state._before_rename = die_on_second_save
pretrain.train(pretrain.TrainConfig(**{cfg}), progress=False)
"""


def test_a_process_killed_during_a_save_leaves_the_previous_checkpoint(data_dir, tmp_path):
    cfg = dict(preset="tiny", data=data_dir, out=str(tmp_path / "killed"), steps=6, batch_size=4, seq_len=32,
               eval_every=3, eval_batches=1, save_every=3, warmup=2)
    proc = subprocess.run([sys.executable, "-c", KILLER.replace("{cfg}", repr(cfg))], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    run = tmp_path / "killed"
    folder = run / "checkpoints"
    assert list_checkpoints(str(run)) == [3]
    step_3 = os.path.realpath(folder / "step_3")
    assert os.path.realpath(run / "latest") == os.path.realpath(latest_checkpoint(str(run))) == step_3
    # The kill came after every file of step 6 was written, before the rename: what is left is a complete but
    # hidden temporary directory, which neither list_checkpoints nor `latest` may take for a checkpoint.
    (leftover,) = [n for n in os.listdir(folder) if n != "step_3"]
    assert re.fullmatch(r"\.step_6\..+\.tmp", leftover), leftover
    assert os.path.isfile(folder / leftover / "trainer_state.json")
    assert os.path.isfile(folder / leftover / "model.safetensors")
    assert sorted(os.listdir(run)) == ["checkpoints", "latest", "metrics.jsonl"]  # no half-moved `latest`
    Transformer.from_pretrained(run / "latest")  # intact and loadable
    pretrain.train(pretrain.TrainConfig(**{**cfg, "resume": True}), progress=False)
    pretrain.train(tc(data_dir, tmp_path / "clean"), progress=False)
    assert losses(run) == losses(tmp_path / "clean")
    assert list_checkpoints(str(run)) == [3, 6]
    assert os.path.realpath(run / "latest") == os.path.realpath(folder / "step_6")

"""Checkpoint I/O in the transformers layout: round trips, shards, DeepSeek's FP8 release format, clear errors
for mismatched files, and atomic writes."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek.checkpoint as ckpt
from nanoseek import ModelConfig, Transformer
from nanoseek.checkpoint import CheckpointError
from nanoseek.fp8 import dequantize_checkpoint_weight


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny")).eval()
    for layer in m.moe_layers():
        layer.gate.e_score_correction_bias.normal_(std=0.01)  # so the test sees it saved
    return m


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_round_trip_keeps_every_tensor_and_writes_no_pickle(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    keys = load_file(tmp_path / "m" / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in keys  # per-expert layout on disk
    assert "model.layers.4.eh_proj.weight" in keys and "model.layers.4.shared_head.head.weight" in keys  # MTP at L
    again = Transformer.from_pretrained(tmp_path / "m")
    assert same_state(model, again)
    x = torch.randint(0, 4096, (1, 16))
    with torch.no_grad():
        a, am = model(x, return_mtp=True)
        b, bm = again(x, return_mtp=True)
    assert torch.equal(a, b) and torch.equal(am[0], bm[0])


def test_dtype_argument_casts_but_router_stays_fp32(model, tmp_path):
    model.save_pretrained(tmp_path)
    m = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert m.embed_tokens.weight.dtype == torch.bfloat16
    gate = m.moe_layers()[0].gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert m.config.torch_dtype == "bfloat16"


def test_sharded_save_loads_and_a_later_single_file_save_removes_stale_shards(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_bytes=2_000_000)
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert same_state(model, Transformer.from_pretrained(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")  # a tokenizer beside the weights must survive a re-save
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer.json"]


def naive_fp8_block_quant(w, block=128):
    """Per 128x128 block: scale = amax / 448, q = fp8(w / scale); written plainly as the reference."""
    out, inp = w.shape
    nb_o, nb_i = -(-out // block), -(-inp // block)
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    s = torch.empty(nb_o, nb_i)
    for i in range(nb_o):
        for j in range(nb_i):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            scale = tile.abs().max().clamp(min=1e-12) / 448.0
            s[i, j] = scale
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale).to(torch.float8_e4m3fn)
    return q, s


def test_deepseek_fp8_checkpoint_is_dequantised_on_load(model, tmp_path):
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    expected = {}
    for key in list(tensors):
        t = tensors[key]
        skip = any(s in key for s in ("embed_tokens", "lm_head", "shared_head.head", "norm", "mlp.gate."))
        if t.dim() == 2 and not skip:
            q, s = naive_fp8_block_quant(t)
            tensors[key], tensors[key + "_scale_inv"] = q, s
            expected[key] = q.float() * s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    assert m.config.quantization_config is None
    assert torch.equal(m.layers[0].self_attn.kv_b_proj.weight, expected["model.layers.0.self_attn.kv_b_proj.weight"])
    assert torch.equal(m.layers[1].mlp.experts.up_proj[3], expected["model.layers.1.mlp.experts.3.up_proj.weight"])
    assert m.config.torch_dtype == "float32"
    x = torch.randint(0, 4096, (1, 24))
    with torch.no_grad():
        ref, got = model(x), m(x)
    # FP8 error is present but small (it can flip a few near-tied expert choices, so no tight bound per logit)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert not torch.equal(got, ref) and cos > 0.98
    assert Transformer.from_pretrained(tmp_path).embed_tokens.weight.dtype == torch.bfloat16


def test_dequantize_handles_ragged_blocks(model, tmp_path):
    w = torch.randn(200, 130)
    q, s = naive_fp8_block_quant(w)
    assert s.shape == (2, 2)
    back = dequantize_checkpoint_weight(q, s, dtype=torch.float32)
    assert back.shape == w.shape and (back - w).abs().max() <= w.abs().max() / 8
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \[1, 2\], expected \[2, 2\]"):
        dequantize_checkpoint_weight(q, s[:1])
    # in a checkpoint directory the same mistake is a CheckpointError naming the tensor
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    q, s = naive_fp8_block_quant(tensors[key])
    tensors[key], tensors[key + "_scale_inv"] = q, s[:1]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{key}: weight_scale_inv has shape \[1, 1\], expected \[2, 1\]"):
        Transformer.from_pretrained(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_are_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    good = load_file(tmp_path / "model.safetensors")
    bad = dict(good)
    del bad["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.kv_b_proj\.weight .*missing"):
        Transformer.from_pretrained(tmp_path)
    bad = dict(good, **{"model.layers.0.extra.weight": torch.zeros(2)})
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected .*model\.layers\.0\.extra\.weight"):
        Transformer.from_pretrained(tmp_path)
    save_file(good, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["kv_lora_rank"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"kv_a_proj_with_mqa\.weight has shape \[48, 128\] .*needs \[64, 128\]"):
        Transformer.from_pretrained(tmp_path)


def test_a_crash_during_save_leaves_nothing_half_written(model, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "new")
    assert os.listdir(tmp_path) == []  # neither the directory nor a temporary one
    monkeypatch.undo()
    model.save_pretrained(tmp_path / "old")
    before = (tmp_path / "old" / "model.safetensors").read_bytes()
    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "old")
    assert (tmp_path / "old" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "old")) == ["config.json", "model.safetensors"]

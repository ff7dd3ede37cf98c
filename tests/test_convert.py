"""`nanoseek convert`: exact dtype rewrites, DeepSeek's FP8 release layout (V3 section 3.3) written to the letter,
loading it back in nanoseek and transformers, and `pretrain --fp8` -> convert --fp8 -> load end to end."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import nanoseek.checkpoint as ckpt
from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main
from nanoseek.convert import convert
from nanoseek.fp8 import QUANTIZATION_CONFIG, dequantize_checkpoint_weight

# Tensors DeepSeek's FP8 release keeps unquantised (its released config), by name pattern.
KEPT = ("embed_tokens", "lm_head", "shared_head.head", "eh_proj", "norm", "mlp.gate.weight",
        "e_score_correction_bias")




@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny fp32 checkpoint with a (stand-in) tokenizer beside it."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    for layer in model.moe_layers():
        layer.gate.e_score_correction_bias.normal_(std=0.01)
    path = tmp_path_factory.mktemp("src") / "model"
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text('{"stand-in": true}')
    (path / "tokenizer_config.json").write_text('{"model_max_length": 2048}')
    return model, path


def logits_of(model, x):
    with torch.no_grad():
        return model.float()(x).float()


def test_plain_convert_is_bit_exact_for_fp32(source, tmp_path):
    model, src = source
    summary = convert(src, tmp_path / "out")
    assert summary["dtype"] == "float32" and summary["fp8_tensors"] == 0
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((src / "config.json").read_text()) == json.loads((tmp_path / "out" / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()
    # --dtype fp32 explicitly: the same bytes
    convert(src, tmp_path / "again", dtype="fp32")
    again = (tmp_path / "again" / "model.safetensors").read_bytes()
    assert again == (tmp_path / "out" / "model.safetensors").read_bytes()


def test_bf16_convert_casts_all_but_the_router(source, tmp_path):
    model, src = source
    convert(src, tmp_path / "bf16", dtype="bf16")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "bf16" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        router = k.endswith("mlp.gate.weight") or k.endswith("e_score_correction_bias")
        assert b[k].dtype == (torch.float32 if router else torch.bfloat16), k
        assert torch.equal(b[k], a[k].to(b[k].dtype)), k
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # bf16 -> fp32 is exact, so converting back to fp32 gives the bf16 values, not the original ones
    convert(tmp_path / "bf16", tmp_path / "fp32", dtype="fp32")
    c = load_file(tmp_path / "fp32" / "model.safetensors")
    assert all(torch.equal(c[k], b[k].float()) for k in a)


def test_fp8_export_has_deepseeks_layout_and_loads_back(source, tmp_path):
    model, src = source
    summary = convert(src, tmp_path / "fp8", fp8=True, dtype="bf16")
    out = tmp_path / "fp8"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]} == QUANTIZATION_CONFIG
    assert cfg["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    quantised = [k for k, t in before.items() if t.dim() == 2 and not any(p in k for p in KEPT)]
    assert set(after) == set(before) | {k + "_scale_inv" for k in quantised}
    assert summary["fp8_tensors"] == len(quantised)
    # every projection of attention, dense MLP, shared and routed experts, and the MTP block is quantised
    for k in ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.2.mlp.experts.15.gate_proj.weight",
              "model.layers.4.self_attn.kv_b_proj.weight", "model.layers.4.mlp.experts.0.down_proj.weight"]:
        assert k in quantised, k
    for k, t in after.items():
        if k.endswith("_scale_inv"):
            w = after[k[: -len("_scale_inv")]]
            assert t.dtype == torch.float32
            assert t.shape == (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)), k
        elif k in quantised:
            assert t.dtype == torch.float8_e4m3fn and t.shape == before[k].shape, k
        else:  # embeddings, heads, norms, eh_proj in bf16; the router in fp32
            router = k.endswith("mlp.gate.weight") or k.endswith("e_score_correction_bias")
            assert t.dtype == (torch.float32 if router else torch.bfloat16), k
    # the stored blocks dequantise to within e4m3's rounding (2^-4 of each block's amax) of the original
    k = "model.layers.2.mlp.experts.3.up_proj.weight"
    deq = dequantize_checkpoint_weight(after[k], after[k + "_scale_inv"], dtype=torch.float32)
    err = (deq - before[k]).abs()
    assert err.max() <= before[k].abs().max() / 16 and err.max() > 0

    loaded = Transformer.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(loaded.layers[2].mlp.experts.up_proj[3], deq)
    assert loaded.config.quantization_config is None
    x = torch.randint(0, 4096, (2, 24))
    ref, got = logits_of(model, x), logits_of(loaded, x)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1, rel  # lossy by design, but close (routing may flip a few near-tied experts)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.995

    # requantising the dequantised FP8 weights reproduces them: --fp8 on an FP8 checkpoint is a fixed point
    convert(out, tmp_path / "fp8_again", fp8=True, dtype="bf16")
    again = load_file(tmp_path / "fp8_again" / "model.safetensors")
    assert again.keys() == after.keys()
    assert all(torch.equal(again[k].float(), after[k].float()) for k in after)


def test_cli_and_a_failed_write_leaves_nothing(source, tmp_path, monkeypatch):
    _, src = source
    main(["convert", "--model", str(src), "--out", str(tmp_path / "cli"), "--fp8", "--json"])
    assert "quantization_config" in json.loads((tmp_path / "cli" / "config.json").read_text())
    with pytest.raises(SystemExit) as e:
        main(["convert", "--model", str(src), "--out", "x", "--dtype", "fp64"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="must differ"):
        convert(src, src)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        convert(src, tmp_path / "broken", fp8=True)
    assert sorted(os.listdir(tmp_path)) == ["cli"]  # no half-written output, no temporary directory
    before = (tmp_path / "cli" / "model.safetensors").read_bytes()
    with pytest.raises(OSError):
        convert(src, tmp_path / "cli")  # an existing output survives a failed overwrite
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == before


def test_transformers_loads_the_fp8_export_on_cpu_by_dequantising(source, tmp_path):
    """Without a GPU transformers' finegrained-fp8 integration dequantises to bf16 on load; it must then agree
    with nanoseek's own load of the same files."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    if torch.cuda.is_available():
        pytest.skip("with a GPU transformers keeps FP8 weights; see the CUDA test")
    _, src = source
    convert(src, tmp_path / "fp8", fp8=True, dtype="bf16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8")
    ours = Transformer.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)
    x = torch.randint(0, 4096, (1, 16))
    with torch.no_grad():
        a, b = hf(x).logits.float(), ours(x).float()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="transformers keeps FP8 weights (finegrained-fp8 FP8Linear) only on a CUDA GPU")
def test_transformers_loads_the_fp8_export_on_cuda(source, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model, src = source
    convert(src, tmp_path / "fp8", fp8=True, dtype="bf16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", device_map="cuda")
    fp8_params = [n for n, p in hf.named_parameters() if p.dtype == torch.float8_e4m3fn]
    assert any("q_a_proj" in n for n in fp8_params) and any("experts" in n for n in fp8_params)
    ours = Transformer.from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    x = torch.randint(0, 4096, (1, 16))
    with torch.no_grad():
        a, b = hf(x.cuda()).logits.float().cpu(), ours(x)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_pretrain_fp8_checkpoint_exports_to_fp8_and_loads_back(tmp_path):
    """`nanoseek pretrain --fp8` keeps high-precision master weights, so its checkpoint is an ordinary fp32 one;
    convert --fp8 then makes the release layout, which loads back close to the trained model."""
    from nanoseek.data import default_corpus_files, prepare_data
    from nanoseek.tokenizer import train_tokenizer
    from nanoseek.train import pretrain
    from nanoseek.train.loop import read_metrics

    files = default_corpus_files(max_bytes=100_000)
    train_tokenizer(files, 384, str(tmp_path / "tok"))
    prepare_data(files, str(tmp_path / "tok"), str(tmp_path / "data"), show_progress=False)
    tc = pretrain.TrainConfig(preset="tiny", data=str(tmp_path / "data"), out=str(tmp_path / "run"), steps=8,
                              batch_size=4, seq_len=32, eval_every=0, warmup=2, lr=1e-2, fp8=True)
    summary = pretrain.train(tc, progress=False)
    rows = read_metrics(str(tmp_path / "run"))
    assert len(rows) == 8 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3  # FP8 training learns
    ckpt_dir = summary["checkpoint"]
    stored = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float32}  # master weights, not FP8
    assert "quantization_config" not in json.loads(open(os.path.join(ckpt_dir, "config.json")).read())

    trained = Transformer.from_pretrained(ckpt_dir, dtype=torch.float32)
    convert(ckpt_dir, tmp_path / "release", fp8=True, dtype="bf16")
    exported = load_file(tmp_path / "release" / "model.safetensors")
    assert exported["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert (tmp_path / "release" / "tokenizer.json").read_bytes() == open(
        os.path.join(ckpt_dir, "tokenizer.json"), "rb").read()
    loaded = Transformer.from_pretrained(tmp_path / "release", dtype=torch.float32)
    x = torch.randint(0, trained.config.vocab_size, (2, 32))
    ref, got = logits_of(trained, x), logits_of(loaded, x)
    assert not torch.equal(got, ref)
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.99
    # the trained model's next-token choices survive the export almost everywhere
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9

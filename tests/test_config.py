"""ModelConfig: round trips, both RoPE spellings, validation messages, presets and the papers' accounting."""

import json
import subprocess
import sys

import pytest

from nanoseek import ConfigError, ModelConfig, Transformer
from nanoseek.accounting import kv_cache_bytes_per_token, param_counts
from nanoseek.config import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name, tmp_path):
    cfg = ModelConfig.from_preset(name)
    cfg.to_json(tmp_path / "config.json")
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["architectures"] == ["DeepseekV3ForCausalLM" if name not in ("v2", "v2-lite") else "DeepseekV2ForCausalLM"]
    assert ModelConfig.from_json(tmp_path) == cfg


def test_unknown_fields_survive_and_transformers_reads_what_we_write(tmp_path):
    import transformers
    d = ModelConfig.from_preset("v3").to_dict()
    d["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}
    cfg = ModelConfig.from_dict(d)
    assert cfg.to_dict()["auto_map"] == d["auto_map"]
    cfg.to_json(tmp_path / "config.json")
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    for field in ("hidden_size", "n_routed_experts", "n_group", "topk_group", "kv_lora_rank", "q_lora_rank",
                  "routed_scaling_factor", "first_k_dense_replace", "num_experts_per_tok"):
        assert getattr(hf, field) == getattr(cfg, field)
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 40


def test_transformers5_rope_parameters_spelling_equals_rope_scaling():
    old = ModelConfig.from_preset("v3")
    new = old.to_dict()
    rs = new.pop("rope_scaling")
    new.pop("rope_theta")
    new["rope_parameters"] = {**rs, "rope_type": "yarn", "rope_theta": 10000.0}
    got = ModelConfig.from_dict(new)
    assert got.yarn["factor"] == 40 and got.rope_theta == 10000.0 and got.softmax_scale == old.softmax_scale


def test_transformers_default_config_loads():
    import transformers
    d = transformers.DeepseekV3Config().to_dict()
    cfg = ModelConfig.from_dict(d)
    assert cfg.n_routed_experts == 256 and cfg.topk_method == "noaux_tc" and cfg.yarn is None
    v2 = ModelConfig.from_dict(transformers.DeepseekV2Config(n_routed_experts=64, num_experts_per_tok=6).to_dict())
    assert v2.scoring_func == "softmax" and v2.topk_method == "greedy" and v2.n_group == 1


@pytest.mark.parametrize("change,message", [
    (dict(n_routed_experts=10, n_group=4), r"n_routed_experts \(10\) must be divisible by n_group \(4\)"),
    (dict(topk_group=5, n_group=4), r"topk_group \(5\) must be between 1 and n_group \(4\)"),
    (dict(num_experts_per_tok=17), r"num_experts_per_tok \(k=17\) must be between 1 and n_routed_experts \(16\)"),
    (dict(qk_rope_head_dim=15), r"qk_rope_head_dim must be a positive even number"),
    (dict(num_experts_per_tok=9, topk_group=2), r"topk_group \(2\) groups of 4 experts hold fewer than"),
    (dict(scoring_func="relu"), r"scoring_func must be 'sigmoid' or 'softmax'"),
    (dict(first_k_dense_replace=9), r"first_k_dense_replace \(9\) must be between 0 and num_hidden_layers \(4\)"),
    (dict(hidden_size=0), r"hidden_size must be a positive integer"),
    (dict(rope_scaling={"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 10}), r"factor must be >= 1"),
])
def test_validation_names_the_field(change, message):
    d = {**PRESETS["tiny"], **change}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(d)


def test_bad_files_and_names(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset 'v9'"):
        ModelConfig.from_preset("v9")
    with pytest.raises(ConfigError, match="model_type must be"):
        ModelConfig.from_dict({"model_type": "llama"})


def test_tiny_preset_has_every_v3_idea_in_5m_parameters():
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg)
    assert model.num_params() <= 5_000_000
    assert cfg.kv_lora_rank < cfg.num_attention_heads * cfg.qk_nope_head_dim  # MLA compresses
    assert cfg.n_routed_experts >= 8 and cfg.n_group > 1 and cfg.n_shared_experts >= 1
    assert cfg.first_k_dense_replace >= 1 and cfg.num_nextn_predict_layers == 1
    assert type(model.layers[0].mlp).__name__ == "MLP" and type(model.layers[1].mlp).__name__ == "MoE"


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_accounting_equals_the_instantiated_model(name):
    cfg = ModelConfig.from_preset(name)
    model = Transformer(cfg)
    p = param_counts(cfg)
    mtp = sum(t.numel() for t in model.mtp.parameters())
    assert p["total_params"] == model.num_params() - mtp and p["mtp_params"] == mtp
    if name == "small":
        assert 50e6 <= p["total_params"] <= 100e6


def test_v3_accounting_agrees_with_the_paper():
    cfg = ModelConfig.from_preset("v3")
    p = param_counts(cfg)
    assert abs(p["total_params"] - 671.03e9) < 0.01e9  # DeepSeek-V3 report: 671B total parameters
    assert 36.5e9 < p["active_params"] < 38.5e9  # "37B activated"
    assert 11.0e9 < p["mtp_params"] < 12.0e9  # "11.5B of its own"
    kv = kv_cache_bytes_per_token(cfg)
    assert kv["mla"] == 70_272 and round(100 * kv["mla_over_mha"], 2) == 1.76
    v2 = param_counts(ModelConfig.from_preset("v2"))
    assert abs(v2["total_params"] - 236e9) < 1e9 and abs(v2["active_params"] - 21e9) < 1e9


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True, timeout=120)


def test_info_cli_json_and_table(tmp_path, capsys):
    from nanoseek.cli import main
    out = run_cli("info", "v3", "--json")  # the real command line once; the other cases in-process
    assert out.returncode == 0
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d["total_params"] == param_counts(ModelConfig.from_preset("v3"))["total_params"]
    assert set(d["kv_cache_bytes_per_token"]) >= {"mla", "mha", "gqa8"} and d["kv_cache_bytes_per_token"]["mla"] == 70272
    assert {"active_params", "mtp_params"} <= set(d)
    ModelConfig.from_preset("tiny").to_json(tmp_path / "config.json")
    main(["info", str(tmp_path)])
    table = capsys.readouterr().out
    assert "MLA latent" in table and "active per token" in table
    with pytest.raises(SystemExit) as bad:
        main(["info", "nope"])
    assert bad.value.code != 0 and "neither a preset" in capsys.readouterr().err


def test_info_plans_memory_per_rank(capsys):
    from nanoseek.accounting import memory_per_rank
    from nanoseek.cli import main
    main(["info", "v3", "--world-size", "256", "--ep", "8", "--json"])
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = d["memory_per_rank"]
    assert m == memory_per_rank(ModelConfig.from_preset("v3"), 256, 8)
    # every parameter lives on one rank: V3 + MTP over 256 ranks, at 2 bytes
    assert m["param_bytes"] == 2 * -(-(param_counts(ModelConfig.from_preset("v3"))["total_params"] + 11_610_067_968) // 256)
    with pytest.raises(ValueError, match="must divide"):
        memory_per_rank(ModelConfig.from_preset("v3"), 256, 3)

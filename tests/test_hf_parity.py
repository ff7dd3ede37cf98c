"""Logits parity with transformers' DeepseekV3/V2 implementations, both directions, through checkpoints on disk.

transformers is the independent reference: a random model built there, saved, loaded into nanoseek must give
the same logits within 1e-4 relative in fp32, and a nanoseek model saved and loaded by transformers likewise.
"""

import warnings

import pytest
import torch

from hf_utils import hf_model, randomize_, rel_err
from nanoseek import ModelConfig, Transformer

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.9, "mscale_all_dim": 0.8}

CASES = {
    "v3-qlora-grouped": ("v3", dict()),
    "v3-no-qlora-yarn": ("v3", dict(q_lora_rank=None, rope_scaling=YARN, rope_theta=5000.0)),
    "v3-halves-rope": ("v3", dict(rope_interleave=False, n_group=2, topk_group=1, num_experts_per_tok=3)),
    "v3-ungrouped-unnormalised": ("v3", dict(n_group=1, topk_group=1, norm_topk_prob=False,
                                             routed_scaling_factor=1.5, first_k_dense_replace=0)),
    "v2-group-limited-yarn": ("v2", dict(rope_scaling=YARN, routed_scaling_factor=2.0)),
    "v2-lite-greedy": ("v2", dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                                  n_shared_experts=2)),
}


def tokens(vocab, b=2, t=48, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_checkpoint_loads_with_equal_logits(case, tmp_path):
    kind, kw = CASES[case]
    ref = hf_model(kind, **kw)
    ref.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # V3 configs announce an MTP layer that transformers does not save
        model = Transformer.from_pretrained(tmp_path)
    assert next(model.parameters()).dtype == torch.float32
    x = tokens(ref.config.vocab_size)
    with torch.no_grad():
        expected = ref(x).logits
        got = model(x)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4


@pytest.mark.parametrize("case", ["v3-qlora-grouped", "v3-no-qlora-yarn", "v2-group-limited-yarn", "v2-lite-greedy"])
def test_nanoseek_checkpoint_loads_in_transformers_with_equal_logits(case, tmp_path):
    import transformers
    kind, kw = CASES[case]
    ref_cfg = hf_model(kind, **kw).config.to_dict()
    cfg = ModelConfig.from_dict({**ref_cfg, "num_nextn_predict_layers": 1 if kind == "v3" else 0,
                                 "torch_dtype": "float32"})
    model = Transformer(cfg)
    randomize_(model, seed=3)
    model.save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                            attn_implementation="eager")
    assert type(ref).__name__ == ("DeepseekV3ForCausalLM" if kind == "v3" else "DeepseekV2ForCausalLM")
    x = tokens(cfg.vocab_size, seed=2)
    with torch.no_grad():
        assert rel_err(model(x), ref(x).logits) < 1e-4


def test_v3_mtp_announced_but_absent_loads_without_mtp_and_warns(tmp_path):
    ref = hf_model("v3", num_mtp_layers=1)
    ref.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="MTP"):
        model = Transformer.from_pretrained(tmp_path)
    assert len(model.mtp) == 0 and model.config.num_nextn_predict_layers == 0

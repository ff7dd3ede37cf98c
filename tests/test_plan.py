"""`nanoseek plan`: the real parallelize code on the meta device under a fake process group, in this process.
The measured per-rank parameter shards must match the analytical plan (accounting.memory_per_rank) within 1%."""

import json

import pytest
import torch.distributed as dist

from nanoseek import ModelConfig
from nanoseek.accounting import bubble_fraction, memory_per_rank, pipeline_stages
from nanoseek.cli import main
from nanoseek.plan import plan

GIB = 2**30
V3 = ModelConfig.from_preset("v3")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")


@pytest.mark.parametrize("world, ep, dim", [(256, 8, 0), (1024, 32, 1)])
def test_measured_shards_match_the_plan_for_v3(world, ep, dim):
    r = plan(V3, world, ep)
    assert r["expert_shard_dim"] == dim  # dp (world / ep) > local experts (256 / ep): rows of each expert
    assert abs(r["params_vs_plan"]) < 0.01
    assert abs(r["optimizer_bytes_per_rank"] / r["planned_optimizer_bytes_per_rank"] - 1) < 0.01
    assert abs(r["total_bytes_per_rank"] / r["planned_total_bytes_per_rank"] - 1) < 0.01
    # dim 0 with one expert per rank (256 / EP 8 over 32 dp ranks); dim 1 instead of a padded whole expert
    assert r["params_bytes_per_rank"] < 1.01 * memory_per_rank(V3, world, ep)["param_bytes"]


def test_v3_at_2048_ranks_ep64_pp16_block_recompute_fits_40_gib(capsys):
    main(["plan", "--preset", "v3", "--world-size", "2048", "--ep", "64", "--pp", "16", "--recompute", "block",
          "--json"])
    r = json.loads(capsys.readouterr().out)
    for key in ("params_bytes_per_rank", "grads_bytes_per_rank", "optimizer_bytes_per_rank",
                "activation_bytes_per_rank", "total_bytes_per_rank", "planned_total_bytes_per_rank"):
        assert r[key] > 0, key
    assert r["planned_total_bytes_per_rank"] <= 40 * GIB and r["total_bytes_per_rank"] <= 40 * GIB
    assert abs(r["params_vs_plan"]) < 0.01 and len(r["stages"]) == 16
    assert r["seconds"] < 60
    assert not dist.is_initialized()  # the fake group is gone again
    # block recomputation keeps much less than none
    none = memory_per_rank(V3, 2048, 64, pp=16)
    assert r["activation_bytes_per_rank"] < none["activation_bytes"] / 4


def test_tiny_plan_measures_every_stage_and_prints_a_table(capsys):
    tiny = ModelConfig.from_preset("tiny").replace(vocab_size=1000)
    r = plan(tiny, world_size=8, ep=2, pp=2)
    assert [s["blocks"] for s in r["stages"]] == [[0, 1, 2], [3, 4]]  # 4 layers + 1 MTP module
    for s in r["stages"]:
        assert abs(s["params_bytes"] / s["planned_params_bytes"] - 1) < 0.05, s
    main(["plan", "--preset", "tiny", "--world-size", "4", "--ep", "2", "--recompute", "selective"])
    out = capsys.readouterr().out
    assert "measured" in out and "total" in out and "recompute selective" in out
    main(["plan", "--layout", "deepseek-v3", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert (r["world_size"], r["ep"], r["pp"], r["recompute"]) == (2048, 64, 16, "selective")


def test_pipeline_split_and_bubble():
    stages = pipeline_stages(V3, 16)
    assert [len(s) for s in stages] == [4] * 14 + [3] * 2 and stages[-1][-1] == 61  # MTP module last
    assert sum(stages, []) == list(range(62))
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, "interleaved") == pytest.approx(3 / 19)
    with pytest.raises(ValueError, match="--pp"):
        pipeline_stages(V3, 63)
    with pytest.raises(ValueError, match="must divide"):
        memory_per_rank(V3, 2048, 64, pp=3)

"""torch.distributed on CPU with gloo, 2 processes: the expert-parallel MoE layer against the single-process
layer, 2-process pretraining (FSDP, FSDP + expert parallelism) against the 1-process run, checkpoints saved on 2
processes resumed on 1, a 4-process dp 2 x ep 2 run resumed from the 1-process run, and the per-rank memory planner.

Workers are plain `python -c` processes given torchrun's environment variables (RANK, WORLD_SIZE, ...), the
same entry as under torchrun; one test launches the real `torchrun -m nanoseek pretrain` command."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.distributed as dist

from nanoseek import ModelConfig, Transformer
from nanoseek.accounting import memory_per_rank, param_counts
from nanoseek.train import pretrain
from nanoseek.train.loop import read_metrics
from nanoseek.train.sharded import export_pretrained, is_sharded_checkpoint

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed gloo backend")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, nproc: int = 2, timeout: int = 240) -> list[str]:
    """Run `script` in nproc processes wired together as torchrun would; returns each rank's stdout.

    A rank killed by a signal (a native crash inside gloo, seen once in CI with no Python error on any rank) is
    retried once with a fresh port, with a warning carrying faulthandler's stack; a Python error fails at once.
    Training scripts resume from their last checkpoint on the retry, which the resume tests show is exact."""
    for attempt in (0, 1):
        procs, results = _spawn(script, nproc, timeout)
        crashed = [r for r, p in enumerate(procs) if p.returncode < 0]
        failed = [f"rank {r} exited with {p.returncode}:\n{err[-2500:]}"
                  for r, (p, (_, err)) in enumerate(zip(procs, results)) if p.returncode != 0]
        if crashed and attempt == 0:
            warnings.warn("a rank died by a signal; retrying once:\n" + "\n".join(failed), stacklevel=2)
            continue
        assert not failed, "\n".join(failed)
        return [out for out, _ in results]


def _spawn(script: str, nproc: int, timeout: int):
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        procs.append(subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(script)],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs, results


def base_config(data_dir, out, **kw) -> dict:
    return {**dict(preset="tiny", data=data_dir, out=str(out), steps=10, batch_size=4, seq_len=32, eval_every=5,
                   eval_batches=2, save_every=5, warmup=2, lr=1e-2), **kw}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The 1-process run every distributed run must follow (checkpoints at steps 5 and 10)."""
    out = tmp_path_factory.mktemp("ref") / "one"
    run_pretrain(base_config(data_dir, out), 1)
    return out


def cut_at(run_dir, step: int, new_dir) -> None:
    """A copy of a run as if it had stopped right after its step-`step` checkpoint."""
    os.makedirs(os.path.join(new_dir, "checkpoints"))
    shutil.copytree(os.path.join(run_dir, "checkpoints", f"step_{step}"),
                    os.path.join(new_dir, "checkpoints", f"step_{step}"))
    with open(os.path.join(new_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in read_metrics(str(run_dir))[:step])


def run_pretrain(cfg: dict, nproc: int) -> None:
    if nproc == 1:
        pretrain.train(pretrain.TrainConfig(**cfg), progress=False)
    else:
        launch(f"from nanoseek.train import pretrain; pretrain.train(pretrain.TrainConfig(**{cfg!r}), progress=False)",
               nproc)


def assert_same_run(a, b, rel=1e-4):
    ra, rb = read_metrics(str(a)), read_metrics(str(b))
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and len(ra) >= 10
    for x, y in zip(ra, rb):
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "val_loss"):
            if key in x or key in y:
                assert y[key] == pytest.approx(x[key], rel=rel), (x["step"], key, x[key], y[key])
        assert y["moe_max_over_mean"] == pytest.approx(x["moe_max_over_mean"], rel=rel)  # counts reduced globally


def trainer_state(run_dir) -> dict:
    with open(os.path.join(run_dir, "latest", "trainer_state.json")) as f:
        return json.load(f)


def as_pretrained(path):
    """A transformers-layout directory for a checkpoint: itself, or its export when it is sharded."""
    if not is_sharded_checkpoint(path):
        return path
    out = str(path).rstrip("/") + "_hf"
    if not os.path.exists(out):
        export_pretrained(path, out)
    return out


def assert_close_models(a_dir, b_dir, rel=1e-3, flips=4):
    """Each tensor within `rel` in relative norm, after leaving out its `flips` largest element differences. Adam
    divides by the gradient's running RMS, so an element whose gradient is near zero (a token seen once) moves by up
    to the learning rate in one run and the other way in the other when the last bits of that gradient differ: on an
    Intel Xeon, one embedding element of 49,152 differed by 5.5e-3 after 10 steps at lr 1e-2, the next by 8e-4. A
    wrong shard, axis or reduction moves far more than a handful of elements."""
    a = Transformer.from_pretrained(as_pretrained(a_dir)).state_dict()
    b = Transformer.from_pretrained(as_pretrained(b_dir)).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        d = (a[k] - b[k]).flatten().abs().sort().values[: max(1, a[k].numel() - flips)]
        assert float(d.norm()) <= rel * float(a[k].norm()) + 1e-6, k


# ------------------------------------------------------------------------------------------ (0) initialisation
INIT = """
import sys, torch
from nanoseek import ModelConfig
from nanoseek.distributed import init_distributed, build_model, full_state_dict, shutdown, expert_shard_dim
info = init_distributed()
out = {}
for name, overrides, ep in LAYOUTS:
    cfg = ModelConfig.from_preset("tiny").replace(vocab_size=500, **overrides)
    model = build_model(cfg, 7, info.device, info, ep)
    local = sum(p.to_local().numel() for p in model.parameters())  # what this rank materialised
    experts = model.layers[1].mlp.experts.gate_proj
    out[name] = (full_state_dict(model), local, experts.placements)
if info.rank == 0:
    torch.save(out, sys.argv[1] if len(sys.argv) > 1 else OUT)
shutdown(info)
"""


def _init_layouts(nproc: int, tmp_path) -> dict:
    layouts = {2: [("fsdp", {}, 1), ("ep2", {}, 2)],
               4: [("dp2xep2", {}, 2), ("ep4", {}, 4),  # dp 2 > 1 local expert: experts sharded on dim 1
                   ("dp2xep2_shard1", dict(n_routed_experts=2, n_group=1, topk_group=1, num_experts_per_tok=2), 2)]}
    out = tmp_path / f"init{nproc}.pt"
    launch(f"LAYOUTS = {layouts[nproc]!r}; OUT = {str(out)!r}\n" + textwrap.dedent(INIT), nproc)
    return torch.load(out, weights_only=False), layouts[nproc]


@pytest.mark.parametrize("nproc", [2, 4])
def test_initialisation_is_identical_whatever_the_layout(nproc, tmp_path):
    """Built on the meta device, sharded, materialised shard by shard: the gathered weights equal the
    1-process model's bit for bit, and no rank allocated more than about its share."""
    from nanoseek.distributed import build_model

    got, layouts = _init_layouts(nproc, tmp_path)
    for name, overrides, ep in layouts:
        cfg = ModelConfig.from_preset("tiny").replace(vocab_size=500, **overrides)
        want = build_model(cfg, 7, torch.device("cpu")).state_dict()
        full, local, placements = got[name]
        numel = sum(t.numel() for t in want.values())
        assert full.keys() == want.keys()
        for k in want:
            assert torch.equal(full[k], want[k]), (name, k)
        assert local <= 1.02 * numel / nproc + 5000, (name, local, numel)  # its shards only (+ padding)
        if name == "dp2xep2_shard1":
            assert placements[0].dim == 1
        elif ep < nproc:
            assert placements[0].dim == 0
    # another seed, other weights
    cfg = ModelConfig.from_preset("tiny").replace(vocab_size=500)
    assert not torch.equal(build_model(cfg, 8, torch.device("cpu")).embed_tokens.weight,
                           build_model(cfg, 7, torch.device("cpu")).embed_tokens.weight)


# ------------------------------------------------------------------------------------------ (a) EP layer
EP_LAYER = """
import torch, torch.distributed as dist
from nanoseek import ModelConfig
from nanoseek.model.moe import MoE
from nanoseek.distributed import init_distributed, apply_expert_parallel, shutdown, ExpertParallelExperts

info = init_distributed()
rank, world = info.rank, info.world_size
cfg = ModelConfig.from_preset("tiny")
torch.manual_seed(0)
ref = MoE(cfg)
for p in ref.parameters():
    torch.nn.init.normal_(p, std=0.1)
ref.gate.e_score_correction_bias.normal_(std=0.01)
x_full = torch.randn(2 * world, 16, cfg.hidden_size)  # every rank knows the whole batch, trains on its slice
r_full = torch.randn_like(x_full)

ep = MoE(cfg)
ep.load_state_dict(ref.state_dict())
if FP8:  # the same FP8 expert module under expert parallelism (the CPU emulation of FP8 GEMMs is exact)
    from nanoseek.fp8 import FP8Recipe
    from nanoseek.fp8.modules import FP8GroupedExperts
    for m in (ref, ep):  # the routed experts only: the replicated shared experts' FP8 weight gradients would
        # tile other tokens together on a half batch (see the training test below)
        m.experts = FP8GroupedExperts.from_experts(m.experts, FP8Recipe("block", backend="emulate"))
x_ref = x_full.clone().requires_grad_()
(ref(x_ref) * r_full).sum().backward()
apply_expert_parallel(ep, dist.group.WORLD)
assert isinstance(ep.experts, ExpertParallelExperts) and ep.experts.gate_proj.shape[0] == cfg.n_routed_experts // world
assert not FP8 or isinstance(ep.experts, FP8GroupedExperts)
sl = slice(2 * rank, 2 * rank + 2)
x = x_full[sl].clone().requires_grad_()
out = ep(x)
(out * r_full[sl]).sum().backward()

def close(a, b):  # max error relative to the largest entry (sums in another order differ in the last bits)
    err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
    return bool(err < 1e-5 and b.abs().max() > 0), err

with torch.no_grad():
    want = ref(x_full)[sl]
checks = {"out": close(out.detach(), want), "x_grad": close(x.grad, x_ref.grad[sl])}
lo, n = ep.experts.first, ep.experts.num_local
for name in ("gate_proj", "up_proj", "down_proj"):  # each rank's experts get the gradient of the whole batch
    checks[name] = close(getattr(ep.experts, name).grad, getattr(ref.experts, name).grad[lo: lo + n])
for name, p in ep.named_parameters():  # replicated weights: per-rank parts sum to the whole-batch gradient
    if not name.startswith("experts."):
        g = p.grad.clone(); dist.all_reduce(g)
        checks[name] = close(g, dict(ref.named_parameters())[name].grad)
# a rank that receives no token at all still takes part and gets zero expert gradients
ep.zero_grad()
x.grad = None
bias = ep.gate.e_score_correction_bias
bias.copy_(torch.where(torch.arange(cfg.n_routed_experts) >= n, 100.0, -100.0))  # every token to rank 1's experts
ep(x).sum().backward()
checks["idle_rank_zero_grad"] = (bool((ep.experts.gate_proj.grad == 0).all()) == (rank == 0), 0.0)
checks["idle_rank_x_grad"] = (bool(x.grad.abs().sum() > 0), 0.0)
print(repr(checks))
shutdown(info)
"""


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_expert_parallel_layer_matches_single_process_output_and_gradients(fp8):
    """Dispatch and combine around the unchanged expert module: plain or FP8 (DeepSeek-V3 section 3.3's
    block-scaled GEMMs, emulated exactly on CPU), the expert-parallel layer equals the single-process one."""
    for out in launch(f"FP8 = {fp8}\n" + textwrap.dedent(EP_LAYER)):
        checks = eval(out.strip().splitlines()[-1])
        bad = {k: v for k, v in checks.items() if not v[0]}
        assert not bad and len(checks) >= 8, bad


# ------------------------------------------------------------------------------------------ (b) training
@pytest.mark.parametrize("ep, recompute", [(1, "none"), (2, "none"), (2, "selective")],
                         ids=["fsdp", "fsdp+ep", "fsdp+ep+selective-recompute"])
def test_two_process_run_follows_the_one_process_run(data_dir, reference, tmp_path, ep, recompute):
    """Recomputation (all-to-all outputs kept, the rest of each block recomputed) changes nothing either."""
    run_pretrain(base_config(data_dir, tmp_path / "two", ep=ep, recompute=recompute), 2)
    assert_same_run(reference, tmp_path / "two")
    assert trainer_state(tmp_path / "two")["world_size"] == 2
    # rank 0 alone wrote the run; its final checkpoint is whole and close to the 1-process one (Adam amplifies
    # last-bit differences in near-zero gradients, so compare each tensor by its relative norm error)
    assert_close_models(reference / "latest", tmp_path / "two" / "latest")


def test_fp8_with_expert_parallelism_trains_like_the_one_process_fp8_run(data_dir, tmp_path):
    """`--fp8 --ep 2` on 2 processes (refused before experts took sorted rows): the first step's losses equal the
    1-process FP8 run's (the forward is exact), and the run stays close. Not within 1e-4 over steps: the FP8
    weight-gradient GEMMs scale 128-token tiles (DeepSeek-V3 section 3.3), and which tokens share a tile depends on
    how the batch is split over data-parallel ranks, so any FP8 run with dp > 1 differs from 1 process in the last
    bits of the weight gradients (the layer test above is exact: there every expert sees the same rows)."""
    cfg = dict(steps=4, eval_every=0, save_every=0, fp8="block")
    run_pretrain(base_config(data_dir, tmp_path / "one", **cfg), 1)
    run_pretrain(base_config(data_dir, tmp_path / "two", ep=2, **cfg), 2)
    ra, rb = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "two"))
    assert len(ra) == len(rb) == 4
    assert rb[0]["loss"] == pytest.approx(ra[0]["loss"], rel=1e-6)
    assert rb[0]["mtp_loss"] == pytest.approx(ra[0]["mtp_loss"], rel=1e-6)
    assert rb[0]["grad_norm"] == pytest.approx(ra[0]["grad_norm"], rel=1e-3)
    for x, y in zip(ra, rb):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-2), x["step"]


# ------------------------------------------------------------------------------------------ (c) checkpoints
def test_saved_on_two_processes_with_torchrun_resumes_on_one(data_dir, reference, tmp_path):
    """The real command: `torchrun --nproc_per_node 2 -m nanoseek pretrain --ep 2`, cut after step 5, resumed in
    a single process: the result is the uninterrupted 1-process run."""
    two = tmp_path / "two"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in base_config(data_dir, two, ep=2).items()]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "nanoseek", "pretrain", *args, "--no-plot", "--json"], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # only rank 0 prints
    assert summary["steps"] == 10 and len([ln for ln in proc.stdout.splitlines() if ln.startswith("{")]) == 1
    state = trainer_state(two)
    assert state["world_size"] == 2 and state["train_config"]["ep"] == 2 and state["format"] == "dcp"
    assert sorted(f for f in os.listdir(two / "checkpoints" / "step_5") if f.endswith(".distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shards
    # `nanoseek convert` makes it a transformers-layout checkpoint: whole, every expert, full shapes
    proc = subprocess.run([sys.executable, "-m", "nanoseek", "convert", "--model", str(two / "checkpoints" / "step_5"),
                           "--out", str(tmp_path / "hf")], cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = Transformer.from_pretrained(tmp_path / "hf")
    assert model.layers[1].mlp.experts.gate_proj.shape[0] == model.config.n_routed_experts
    transformers = pytest.importorskip("transformers")  # and transformers computes the same logits from it
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    x = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-4)

    cut_at(two, 5, tmp_path / "resumed")
    run_pretrain(base_config(data_dir, tmp_path / "resumed", resume=True), 1)
    assert_same_run(reference, tmp_path / "resumed")
    assert_close_models(reference / "latest", tmp_path / "resumed" / "latest")


@pytest.mark.parametrize("layout", [dict(ep=2), dict(pp=2, pp_microbatches=2)], ids=["ep2", "pp2"])
def test_saved_on_one_process_resumes_on_two_with_expert_or_pipeline_parallelism(data_dir, reference, tmp_path,
                                                                                  layout):
    """A transformers-layout checkpoint into a sharded run: each rank reads only its slices (its experts, its
    pipeline stage's parameters) of the weights and AdamW moments."""
    cut_at(reference, 5, tmp_path / "resumed")
    run_pretrain(base_config(data_dir, tmp_path / "resumed", resume=True, **layout), 2)
    assert_same_run(reference, tmp_path / "resumed")
    assert trainer_state(tmp_path / "resumed")["world_size"] == 2


def test_sharded_checkpoints_from_four_processes_resume_on_two_and_on_one(data_dir, reference, tmp_path):
    """dp 2 x ep 2 on 4 processes (expert weights split over ep and FSDP-sharded over dp) follows the 1-process
    run and saves sharded checkpoints, every rank its own shards (torch.distributed.checkpoint). Cut after
    step 5, it resumes on 2 processes without expert parallelism and in 1 process (DCP reshards on load), and
    both reproduce the uninterrupted run."""
    four = tmp_path / "four"
    run_pretrain(base_config(data_dir, four, ep=2), 4)
    assert_same_run(reference, four)
    assert trainer_state(four)["world_size"] == 4
    assert len([f for f in os.listdir(four / "checkpoints" / "step_5") if f.endswith(".distcp")]) == 4
    # weights to 1e-3 like the other layouts: a token seen once or twice has an embedding-row gradient near
    # reduction noise, and Adam's normalised step moves that row by about lr whichever way the noise falls
    assert_close_models(reference / "latest", four / "latest")
    for nproc in (2, 1):
        resumed = tmp_path / f"resumed_on_{nproc}"
        cut_at(four, 5, resumed)
        run_pretrain(base_config(data_dir, resumed, resume=True), nproc)
        assert_same_run(reference, resumed)
        assert trainer_state(resumed)["world_size"] == nproc


# ------------------------------------------------------------------------------------------ (d) pipeline
@pytest.mark.parametrize("ep, schedule", [(1, "1f1b"), (2, "interleaved")], ids=["pp2xdp2-1f1b", "pp2xep2-interleaved"])
def test_four_process_pipeline_follows_the_one_process_run(data_dir, reference, tmp_path, ep, schedule):
    """4 processes as 2 pipeline stages x (2 data-parallel or 2 expert-parallel ranks): the embedding on the
    first stage, the head and MTP module on the last (the next tokens' embedding travels down the pipeline), the
    balance loss and expert counts of every stage's layers, evaluation through the pipeline; the run follows the
    1-process one within 1e-4, and its sharded checkpoint resumes in one process (another layout: no pipeline)
    reproducing it too."""
    pp = tmp_path / "pp"
    run_pretrain(base_config(data_dir, pp, pp=2, ep=ep, pp_schedule=schedule, pp_microbatches=2), 4)
    assert_same_run(reference, pp)
    cut_at(pp, 5, tmp_path / "resumed")
    run_pretrain(base_config(data_dir, tmp_path / "resumed", resume=True), 1)
    assert_same_run(reference, tmp_path / "resumed")


def test_dualpipev_follows_the_one_process_run(data_dir, reference, tmp_path):
    """DeepSeek's V-shaped schedule (torch's ScheduleDualPipeV) on 2 processes: each rank holds two stages, rank 0
    the first (embedding) and the last (head and MTP module, which gets the next tokens' embedding down the V).
    Training with MTP and the balance loss, and evaluation (a forward-only pass through the V), follow the
    1-process run within 1e-4."""
    v = tmp_path / "v"
    run_pretrain(base_config(data_dir, v, pp=2, pp_schedule="dualpipev", pp_microbatches=4, save_every=0), 2)
    assert_same_run(reference, v)
    assert sum("val_loss" in r for r in read_metrics(str(v))) == 2 and read_metrics(str(v))[0]["mtp_loss"] > 0


# ------------------------------------------------------------------------------------------ memory planner
def test_memory_per_rank_on_a_hand_checked_case():
    c = ModelConfig.from_preset("tiny").replace(vocab_size=1000)
    # by hand: attention 20544 (q) + 14368 (kv) + 16384 (o) = 51296 per block; norms 256 per block + 128 final;
    # dense FFN 3*128*384 = 147456; MoE FFN 16 experts * 24576 + shared 24576 + gate 2048 = 419840;
    # embedding = head = 128000. Main: 256000 + 4*51296 + 1152 + 147456 + 3*419840 = 1,869,312;
    # MTP: 256 + 2*128*128 + 51296 + 256 + 419840 + 128 = 504,544. Together 2,373,856, 1,186,928 per rank.
    assert param_counts(c)["total_params"] + param_counts(c)["mtp_params"] == 2_373_856
    m = memory_per_rank(c, world_size=2, ep=2, batch_tokens_per_rank=64, dtype="float32")
    assert m["params_per_rank"] == 1_186_928
    assert m["param_bytes"] == m["grad_bytes"] == 4 * 1_186_928 and m["optimizer_bytes"] == 8 * 1_186_928
    # largest FSDP unit: the MTP module, 51296 + 256 + (419840 - 8 of 16 experts * 24576) + 32768 + 384 = 307,936;
    # with the root (256,000), parameters and gradients in fp32
    assert m["gathered_bytes"] == 2 * (256_000 + 307_936) * 4
    # per token: attention 2*128 + 2*64 + 2*32 + 16 + 4*(2*48 + 2*32) = 1104; dense block 1104 + 256 + 1152 = 2512;
    # MoE block 1104 + 256 + 4*(256 + 192) + 192 = 3344 (+ 64 fp32 bytes of router scores); MTP adds 512.
    # 2512 + 4*3344 + 512 = 16400 elements * 4 bytes + 4*64 + fp32 logits 2*4*1000 = 73,856 bytes; 64 tokens.
    assert m["activation_bytes"] == 64 * 73_856
    assert m["total_bytes"] == 16 * 1_186_928 + 2 * 563_936 * 4 + 64 * 73_856
    # without expert parallelism every rank gathers all 16 experts of a layer
    assert memory_per_rank(c, 2, 1, 64, "float32")["gathered_bytes"] == 2 * (256_000 + 504_544) * 4
    with pytest.raises(ValueError, match="must divide"):
        memory_per_rank(c, world_size=4, ep=3)

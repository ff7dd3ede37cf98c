"""GRPO loop: a short run raises the reward on a trivial task, log-prob gathering vs a naive per-token loop,
exact micro-batch accumulation, the reference model only when beta > 0, dynamic sampling with refill, and exact
resume. Tiny randomly initialised models over a bytes-only tokenizer (no merges), one thread."""

import dataclasses
import json
import os
import shutil

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.tasks import Example, Task
from nanoseek.tokenizer import MIN_VOCAB_SIZE, train_tokenizer
from nanoseek.train import grpo
from nanoseek.train.loop import NonFiniteGuard, read_metrics




def tiny_checkpoint(root, seed=0) -> str:
    """A checkpoint dir: a 2-layer (1 dense + 1 MoE) random model and a bytes-only tokenizer (266 tokens)."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "corpus.txt"), "w") as f:
        f.write("the 12 answers <think> a </think> <answer> 7 </answer>\n" * 10)
    out = os.path.join(root, "model")
    tok = train_tokenizer([os.path.join(root, "corpus.txt")], MIN_VOCAB_SIZE, out)
    cfg = ModelConfig.from_preset("tiny").replace(
        vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, num_nextn_predict_layers=0, max_position_embeddings=1024)
    torch.manual_seed(seed)
    Transformer(cfg).save_pretrained(out)
    return out


class DigitsTask(Task):
    """Trivial RL task: reward = share of the completion's characters that are digits (easy to increase)."""

    name = "digits"

    def generate(self, rng):
        a = rng.randint(0, 10**6)
        return Example(prompt=f"Say digits {a}", answer=a)

    def check(self, answer, example):
        return answer.strip() == str(example.answer)

    def reward(self, completion, example, **kwargs):
        return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


class HalfConstantTask(DigitsTask):
    """Problems with an even number always score 0 (an all-equal group); odd ones score like DigitsTask."""

    def reward(self, completion, example, **kwargs):
        return 0.0 if example.answer % 2 == 0 else super().reward(completion, example)


class ConstantTask(DigitsTask):
    def reward(self, completion, example, **kwargs):
        return 1.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("grpo"))


def cfg(ckpt, out, **kw):
    base = dict(model=ckpt, out=str(out), steps=4, prompts_per_step=2, group_size=4, max_new_tokens=6, lr=1e-2)
    return grpo.GRPOConfig(**{**base, **kw})


TIMING = ("rollout_s", "update_s", "rollout_tokens_per_s", "update_tokens_per_s", "tokens_per_s")


def metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(str(run_dir))]


# ---------------------------------------------------------------------------------------------- learning
def test_short_grpo_run_raises_the_reward(ckpt, tmp_path):
    tc = cfg(ckpt, tmp_path / "run", steps=16, prompts_per_step=4, group_size=8, max_new_tokens=8, seed=0)
    summary = grpo.train(tc, progress=False, task=DigitsTask())
    rows = read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == list(range(1, 17))
    first = sum(r["reward"] for r in rows[:3]) / 3
    last = sum(r["reward"] for r in rows[-3:]) / 3
    assert last > first + 0.3, (first, last)
    assert rows[-1]["entropy"] < rows[0]["entropy"]  # the policy sharpens onto digits
    for key in ("reward", "accuracy", "format_rate", "response_length", "kl", "clip_frac", "entropy",
                "rollout_tokens_per_s", "update_tokens_per_s", "loss", "lr"):
        assert key in rows[-1], key
    assert rows[-1]["kl"] == 0.0  # beta 0: no reference model, no KL
    assert os.path.realpath(tmp_path / "run" / "latest") == os.path.realpath(summary["checkpoint"])
    assert os.path.isfile(tmp_path / "run" / "latest" / "tokenizer.json")
    plots = grpo.plot_grpo(str(tmp_path / "run"))
    assert all(os.path.getsize(p) > 0 for p in plots)


# ---------------------------------------------------------------------------------------------- plumbing
PROMPTS = [[0, 3, 40, 41, 42, 4, 50, 51, 5], [0, 4, 60, 5], [0, 3, 70, 71, 4, 72, 73, 74, 75, 5]]
COMPLETIONS = [[100, 101, 1], [102, 103, 104, 105, 106], [107]]


def test_completion_logprobs_equal_a_naive_per_token_loop(ckpt):
    model = Transformer.from_pretrained(ckpt).eval()
    with torch.no_grad():
        logp, mask, ent = grpo.completion_logprobs(model, PROMPTS, COMPLETIONS, with_entropy=True)
        assert logp.shape == mask.shape == ent.shape == (3, 5)
        assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] + [False] * 4]
        for b, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
            for t, tok in enumerate(c):  # one forward per token, no batching, no padding
                logits = model(torch.tensor([p + c[:t]]))[0, -1].float()
                lp = torch.log_softmax(logits, -1)
                assert torch.allclose(logp[b, t], lp[tok], atol=1e-5), (b, t)
                assert torch.allclose(ent[b, t], -(lp.exp() * lp).sum(), atol=1e-5)


def test_shared_prompts_give_the_log_probs_and_gradients_of_one_forward_per_row(ckpt):
    """completion_logprobs runs each distinct prompt once and lets its rows attend to the prompt's latents; the
    log-probs and every parameter's gradient equal those of one plain forward over each prompt + completion."""
    model = Transformer.from_pretrained(ckpt).train()
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[2]] * 2 + [PROMPTS[1]]  # groups of 3, 2 and 1, unequal lengths
    completions = COMPLETIONS + [[108, 109, 110, 111], [112, 1], [113, 114, 115, 116, 117, 118]]
    weights = torch.linspace(0.5, 2.0, 6)
    logp, mask, _ = grpo.completion_logprobs(model, prompts, completions)
    (logp * mask * weights[:, None]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for b, (p, c) in enumerate(zip(prompts, completions)):
        logits = model(torch.tensor([p + c]))[0, len(p) - 1: len(p) + len(c) - 1].float()
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(logp[b, : len(c)], ref, atol=1e-5, rtol=0)
        (ref.sum() * weights[b]).backward()
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def _one_update(ckpt, tc, ro):
    torch.manual_seed(0)
    model = Transformer.from_pretrained(ckpt).train()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = grpo.update(model, grpo.reference_policy(model, tc.beta), opt, ro, tc, NonFiniteGuard(), 1)
    return model, stats


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_accumulate_the_full_batch_gradient(ckpt, tmp_path, aggregation):
    """Splitting the update into micro-batches changes nothing: each micro-batch's loss is weighted by its
    share of the batch-level aggregate. Two PPO epochs and a KL term make the ratio and KL paths run too."""
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.9, 0.9]])
    prompts = PROMPTS + PROMPTS[::-1]
    completions = COMPLETIONS + [[108, 109], [110, 111, 112, 1], [113, 114, 115, 116, 117, 118]]
    ro = grpo.Rollouts(prompts, completions, rewards, torch.zeros(6, dtype=torch.bool), {})
    tc = cfg(ckpt, tmp_path, group_size=3, aggregation=aggregation, ppo_epochs=2, beta=0.1)
    full, s_full = _one_update(ckpt, tc, ro)
    split, s_split = _one_update(ckpt, dataclasses.replace(tc, micro_batch_size=2), ro)
    before = Transformer.from_pretrained(ckpt).state_dict()
    after_full, after_split = full.state_dict(), split.state_dict()
    assert any(not torch.equal(after_full[k], before[k]) for k in before)  # the update did something
    for k in before:
        assert torch.allclose(after_full[k], after_split[k], atol=1e-5), k
    assert s_full["kl"] > 0 and s_full["loss"] == pytest.approx(s_split["loss"], abs=1e-5)


def test_masked_truncated_completions_get_no_gradient(ckpt, tmp_path):
    """With mask_truncated, a truncated completion's tokens carry no loss: the update equals one where that
    completion's advantage had no effect (its tokens replaced by another row's)."""
    rewards = torch.tensor([[1.0, 0.0, 0.5]])
    trunc = torch.tensor([False, True, False])
    ro = grpo.Rollouts(PROMPTS, COMPLETIONS, rewards, trunc, {})
    tc = cfg(ckpt, tmp_path, group_size=3, mask_truncated=True, aggregation="dapo")
    a, _ = _one_update(ckpt, tc, ro)
    ro_changed = grpo.Rollouts(PROMPTS, [COMPLETIONS[0], [120, 121, 122, 123, 124], COMPLETIONS[2]], rewards, trunc, {})
    b, _ = _one_update(ckpt, tc, ro_changed)
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k
    c, _ = _one_update(ckpt, dataclasses.replace(tc, mask_truncated=False), ro_changed)
    assert any(not torch.allclose(v, c.state_dict()[k], atol=1e-6) for k, v in a.state_dict().items())


def test_reference_model_exists_only_when_beta_is_positive(ckpt, tmp_path):
    model = Transformer.from_pretrained(ckpt)
    assert grpo.reference_policy(model, 0.0) is None
    ref = grpo.reference_policy(model, 0.04)
    assert ref is not model and not any(p.requires_grad for p in ref.parameters())
    grpo.train(cfg(ckpt, tmp_path / "kl", steps=3, beta=0.04), progress=False, task=DigitsTask())
    kl = [r["kl"] for r in read_metrics(str(tmp_path / "kl"))]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
    assert kl[-1] > 0  # after updates the policy has moved away from the frozen reference


def test_drop_equal_reward_groups_refills_with_new_prompts(ckpt, tmp_path):
    model = Transformer.from_pretrained(ckpt)
    from nanoseek.tokenizer import load_tokenizer
    tok = load_tokenizer(ckpt)
    tc = cfg(ckpt, tmp_path, prompts_per_step=4, drop_equal_groups=True, max_refill=6)
    ro = grpo.rollout(model, tok, HalfConstantTask(), tc, step=1)
    G = tc.group_size
    assert ro.rewards.shape == (4, G)
    assert bool(((ro.rewards.max(1).values - ro.rewards.min(1).values) > 0).all())
    assert ro.stats["groups_kept"] == 4 and ro.stats["groups_sampled"] > 4  # some were dropped and refilled
    assert len(ro.completions) == len(ro.prompts) == 4 * G
    # without dynamic sampling the constant groups stay
    ro_all = grpo.rollout(model, tok, HalfConstantTask(), dataclasses.replace(tc, drop_equal_groups=False), step=1)
    assert ro_all.stats["groups_sampled"] == 4 and bool((ro_all.rewards.std(1) == 0).any())
    # nothing ever differs: every round is dropped, the step learns nothing and says so
    ro_none = grpo.rollout(model, tok, ConstantTask(), dataclasses.replace(tc, max_refill=2), step=1)
    assert ro_none.stats["groups_kept"] == 0 and ro_none.stats["groups_sampled"] == 12
    grpo.train(dataclasses.replace(tc, steps=1, max_refill=1, out=str(tmp_path / "c")), progress=False,
               task=ConstantTask())
    assert read_metrics(str(tmp_path / "c"))[0]["skipped_updates"] == 1


def test_resume_reproduces_the_uninterrupted_run(ckpt, tmp_path):
    kw = dict(steps=4, save_every=2, beta=0.02, ppo_epochs=2, seed=3)
    grpo.train(cfg(ckpt, tmp_path / "full", **kw), progress=False, task=DigitsTask())
    os.makedirs(tmp_path / "cut" / "checkpoints")
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_2", tmp_path / "cut" / "checkpoints" / "step_2")
    with open(tmp_path / "cut" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in read_metrics(str(tmp_path / "full"))[:2])
    grpo.train(cfg(ckpt, tmp_path / "cut", resume=True, **kw), progress=False, task=DigitsTask())
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    a = Transformer.from_pretrained(tmp_path / "full" / "latest").state_dict()
    b = Transformer.from_pretrained(tmp_path / "cut" / "latest").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="the schedule would change"):
        grpo.train(cfg(ckpt, tmp_path / "cut", resume=True, **{**kw, "steps": 9}), progress=False, task=DigitsTask())


def test_bad_settings_are_refused(ckpt, tmp_path):
    with pytest.raises(ValueError, match="group-size"):
        grpo.train(cfg(ckpt, tmp_path, group_size=1), progress=False, task=DigitsTask())
    with pytest.raises(ValueError, match="aggregation"):
        grpo.train(cfg(ckpt, tmp_path, aggregation="mean"), progress=False, task=DigitsTask())

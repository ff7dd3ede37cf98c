"""Distillation: every rejection filter (no wrong or malformed trace is ever kept), the yield table adds up, resume
of `distill generate` without duplicates, an empty yield is an error naming the filter, the divergences against a
naive per-position loop, zero loss and gradient when teacher == student, the sampled estimator's mean, tokenizer
mismatches, logit KD in SFT, and a short on-policy run that lowers the KL. Tiny random models, one thread."""

import json
import os
import shutil

import pytest
import torch
from test_grpo import DigitsTask, tiny_checkpoint

from nanoseek import ModelConfig, Transformer
from nanoseek.accounting import param_counts
from nanoseek.cli import main
from nanoseek.tasks import rewards
from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.tokenizer import MIN_VOCAB_SIZE, load_tokenizer, train_tokenizer
from nanoseek.train import distill, distill_loss, grpo, sft
from nanoseek.train.loop import read_metrics

TASK = ArithmeticTask(digits=1, n_operands=2, ops="+")


def text(path) -> str:
    with open(path) as f:
        return f.read()


def jsonl(path) -> list[dict]:
    return [json.loads(x) for x in text(path).splitlines()]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("teacher"), seed=0)


@pytest.fixture(scope="module")
def sharp(tmp_path_factory, student):
    """A teacher the student can reach: the student with a 5x output head (peaked where the student is flat)."""
    ckpt = student
    root = tmp_path_factory.mktemp("sharp")
    model = Transformer.from_pretrained(ckpt)
    with torch.no_grad():
        model.lm_head.weight.mul_(5)
    model.save_pretrained(str(root))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(ckpt, name)):
            shutil.copy(os.path.join(ckpt, name), root / name)
    return str(root)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("student"), seed=1)


# ---------------------------------------------------------------------------------------------- filters
def scripted(a: int, b: int) -> list[tuple[str, bool, str | None]]:
    """(completion text, EOS reached, the filter that must drop it) for the problem a + b."""
    c = a + b
    good = f"<think> {a} + {b} = {c} </think> <answer> {c} </answer>"
    return [
        (good, True, None),
        (good, True, "duplicate"),
        (f"<think> {a} + {b} = {c + 1} </think> <answer> {c + 1} </answer>", True, "correct"),
        (f"<answer> {c} </answer>", True, "format"),
        (good, False, "eos"),
        (f"<think> {a} + {b} = {c} ok </think> <answer> {c} </answer>", True, "language"),
        (f"<think> {a} + {b} = {c}\n{a} + {b} = {c} </think> <answer> {c} </answer>", True, "repetition"),
        (f"<think> {a} + {b} = {c}{' ' * 80}</think> <answer> {c} </answer>", True, "length"),
        (f"<think> {b} + {a} = {c} </think> <answer> {c} </answer>", True, "per_prompt"),
    ]


K = len(scripted(1, 2))


class FakeEngine:
    """Stands in for generate_batched: decodes each prompt's question and answers with the scripted samples,
    the i-th copy of a prompt getting script entry i. `fail_on` raises on that call (a killed run)."""

    def __init__(self, tok, fail_on=None, wrong=False):
        self.tok, self.fail_on, self.wrong, self.calls = tok, fail_on, wrong, 0

    def __call__(self, model, prompts, params, batch_size=64, **kw):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("killed")
        out = []
        for i, p in enumerate(prompts):
            q = self.tok.decode(p, skip_special=True)
            expr = q[q.index("What is ") + 8: q.index("?")]
            a, b = (int(x) for x in expr.split(" + "))
            text, eos, _ = scripted(a, b)[i % K]
            if self.wrong:
                text = text.replace(f"<answer> {a + b} </answer>", "<answer> -1 </answer>")
            out.append(self.tok.encode(text) + ([self.tok.eos_id] if eos else []))
        return out


def gen_cfg(ckpt, out, **kw):
    base = dict(teacher=ckpt, out=str(out), num_prompts=6, num_generations=K, max_trace_tokens=60,
                max_per_prompt=1, batch_prompts=2)
    return distill.GenerateConfig(**{**base, **kw})


def test_each_filter_drops_its_samples_and_only_right_well_formed_traces_are_kept(ckpt, tmp_path, monkeypatch):
    tok = load_tokenizer(ckpt)
    monkeypatch.setattr(distill, "generate_batched", FakeEngine(tok))
    s = distill.generate_traces(gen_cfg(ckpt, tmp_path / "t.jsonl"), task=TASK, progress=False)
    table = {r["filter"]: r for r in s["yield"]}
    n = s["prompts"]
    assert n == 6 and s["sampled"] == n * K
    for f in distill.FILTERS:  # each scripted bad sample is dropped by exactly its filter, once per prompt
        assert table[f]["dropped"] == n, f
    assert s["kept"] == n == table["per_prompt"]["remaining"]
    assert s["sampled"] == s["kept"] + sum(r["dropped"] for r in s["yield"])  # the table adds up
    rows = jsonl(tmp_path / "t.jsonl")
    assert len(rows) == s["lines"] == n
    ex_by_prompt = {ex.prompt: ex for ex in TASK.sample(6, "train", seed=0)}
    for r in rows:
        text = r["messages"][-1]["content"]
        assert rewards.format_ok(text) and TASK.verify(text, ex_by_prompt[r["messages"][1]["content"]])
        assert r["task"] == "arithmetic" and r["teacher"] == ckpt and r["answer"] == str(ex_by_prompt[
            r["messages"][1]["content"]].answer)
    assert [r["messages"][-1]["role"] for r in rows] == ["assistant"] * n
    assert len(sft.load_conversations(str(tmp_path / "t.jsonl"))) == n  # what `nanoseek sft` reads
    assert "per_prompt" in distill.format_yield(s["yield"])


def test_reject_reason_unit_cases():
    ex = TASK.sample(1, "train", seed=0)[0]
    a, b = (int(x) for x in ex.meta["expression"].split(" + "))
    for text, eos, why in scripted(a, b):
        if why in ("duplicate", "per_prompt"):
            continue
        got = distill.reject_reason(text, len(text), eos, ex, TASK, max_tokens=60,
                                    alphabet=distill.task_alphabet(TASK))
        assert got == why, (text, got, why)
    assert not distill.language_ok("<think> 1 + 1 = 2 é </think>", None)  # non-ASCII without an alphabet
    assert distill.repetition_ok("<think> 1 + 0 = 1, 1 + 0 = 1, 1 + 0 = 1 </think>")
    assert not distill.repetition_ok("<think> " + "1 + 0 = 1, " * 4 + "</think>")


def test_resume_after_a_kill_continues_without_duplicates(ckpt, tmp_path, monkeypatch):
    tok = load_tokenizer(ckpt)
    monkeypatch.setattr(distill, "generate_batched", FakeEngine(tok))
    full = distill.generate_traces(gen_cfg(ckpt, tmp_path / "full.jsonl", max_per_prompt=2), task=TASK,
                                   progress=False)
    cut = tmp_path / "cut.jsonl"
    monkeypatch.setattr(distill, "generate_batched", FakeEngine(tok, fail_on=2))
    with pytest.raises(KeyboardInterrupt):
        distill.generate_traces(gen_cfg(ckpt, cut, max_per_prompt=2), task=TASK, progress=False)
    first = text(cut)
    assert first and len(first.splitlines()) == 4  # the finished chunk (2 prompts x 2 traces) is kept
    with open(cut, "a") as f:  # a chunk appended but never committed, cut mid-line by the kill
        f.write(first.splitlines()[0] + "\n" + '{"messages": [{"ro')
    monkeypatch.setattr(distill, "generate_batched", FakeEngine(tok))
    resumed = distill.generate_traces(gen_cfg(ckpt, cut, max_per_prompt=2), task=TASK, progress=False)
    assert text(cut) == text(tmp_path / "full.jsonl")
    assert resumed["yield"] == full["yield"] and resumed["lines"] == full["lines"] == 12
    again = distill.generate_traces(gen_cfg(ckpt, cut, max_per_prompt=2), task=TASK, progress=False)
    assert text(cut) == text(tmp_path / "full.jsonl") and again["lines"] == 12
    more = distill.generate_traces(gen_cfg(ckpt, cut, max_per_prompt=2, num_prompts=8), task=TASK, progress=False)
    rows = jsonl(cut)
    assert more["lines"] == len(rows) == 16
    assert len({(r["prompt_index"], r["sample_index"]) for r in rows}) == 16  # never a duplicate line
    with pytest.raises(ValueError, match="temperature"):
        distill.generate_traces(gen_cfg(ckpt, cut, max_per_prompt=2, temperature=0.9), task=TASK, progress=False)


def test_empty_yield_is_an_error_naming_the_filter(ckpt, tmp_path, monkeypatch):
    tok = load_tokenizer(ckpt)
    monkeypatch.setattr(distill, "generate_batched", FakeEngine(tok, wrong=True))
    out = tmp_path / "none.jsonl"
    with pytest.raises(ValueError, match="'correct' filter dropped every remaining sample"):
        distill.generate_traces(gen_cfg(ckpt, out), task=TASK, progress=False)
    assert not out.exists() and not os.path.exists(str(out) + ".progress.json")


def test_general_samples_are_mixed_in(ckpt, tmp_path, monkeypatch):
    tok = load_tokenizer(ckpt)
    monkeypatch.setattr(distill, "generate_batched", FakeEngine(tok))
    general = tmp_path / "general.jsonl"
    with open(general, "w") as f:
        for i in range(10):
            f.write(json.dumps({"prompt": f"hello {i}", "completion": "hi"}) + "\n")
    s = distill.generate_traces(gen_cfg(ckpt, tmp_path / "g.jsonl", general=str(general), general_frac=0.25),
                                task=TASK, progress=False)
    rows = jsonl(tmp_path / "g.jsonl")
    assert s["general"] == 2 == sum(r["task"] == "general" for r in rows)  # 6 traces : 2 general = 3 : 1
    assert len(rows) == 8


def test_generate_on_the_engine_through_the_cli(ckpt, tmp_path, capsys):
    """The real engine path: a random teacher, every sample kept with --unfiltered; then the filtered run fails
    with the empty-yield error (exit 2), since a random model never writes a well-formed trace."""
    out = tmp_path / "u.jsonl"
    main(["distill", "generate", "--teacher", ckpt, "--task", "arithmetic", "--out", str(out), "--num-prompts",
          "3", "--num-generations", "2", "--max-new-tokens", "6", "--unfiltered", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kept"] == summary["sampled"] == 6 and len(jsonl(out)) == 6
    with pytest.raises(SystemExit) as e:
        main(["distill", "generate", "--teacher", ckpt, "--task", "arithmetic", "--out", str(tmp_path / "f.jsonl"),
              "--num-prompts", "2", "--num-generations", "2", "--max-new-tokens", "4"])
    assert e.value.code == 2 and "no trace survived" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- losses
def naive_divergence(s_logits, t_logits, beta):
    """Per position, in plain Python over the vocabulary."""
    B, T, _ = s_logits.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            ps = torch.softmax(s_logits[b, t].double(), -1).tolist()
            pt = torch.softmax(t_logits[b, t].double(), -1).tolist()
            kl = lambda p, q: sum(pi * (torch.tensor(pi).log() - torch.tensor(qi).log()).item()
                                  for pi, qi in zip(p, q))
            if beta == 0:
                out[b, t] = kl(pt, ps)
            elif beta == 1:
                out[b, t] = kl(ps, pt)
            else:
                m = [(1 - beta) * a + beta * c for a, c in zip(ps, pt)]
                out[b, t] = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    return out


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_exact_divergence_equals_a_per_position_loop(beta):
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 11) * 2, torch.randn(2, 3, 11) * 2
    mask = torch.tensor([[True, True, False], [True, False, False]])
    d = distill_loss.token_divergence(s, t, beta)
    ref = naive_divergence(s, t, beta)
    assert torch.allclose(d.double(), ref, atol=1e-5)
    loss = distill_loss.exact_loss(s, t, mask, beta)
    assert loss.item() == pytest.approx(float(ref[mask].mean()), abs=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_zero_loss_and_zero_gradient_when_teacher_is_student(beta):
    torch.manual_seed(1)
    s = torch.randn(2, 4, 13, requires_grad=True)
    loss = distill_loss.exact_loss(s, s.detach().clone(), torch.ones(2, 4, dtype=torch.bool), beta)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and s.grad.abs().max() < 1e-6


def test_sampled_estimator_matches_the_exact_reverse_kl_in_mean():
    torch.manual_seed(2)
    s = torch.randn(13, requires_grad=True)
    t = torch.randn(13)
    exact = distill_loss.token_divergence(s[None, None], t[None, None], 1.0)[0, 0]
    g_exact, = torch.autograd.grad(exact, s)
    n = 200_000
    x = torch.multinomial(torch.softmax(s.detach(), -1), n, replacement=True)
    s_logp = torch.log_softmax(s, -1)[x][None]
    t_logp = torch.log_softmax(t, -1)[x][None]
    surrogate, estimate = distill_loss.sampled_reverse_kl(s_logp, t_logp, torch.ones(1, n, dtype=torch.bool))
    assert estimate.item() == pytest.approx(exact.item(), abs=0.02)
    g_sampled, = torch.autograd.grad(surrogate, s)
    assert torch.allclose(g_sampled, g_exact, atol=0.02)  # the score-function gradient is the KL's gradient


# ---------------------------------------------------------------------------------------------- tokenizers
def test_tokenizer_mismatch_is_refused_before_any_work(ckpt, tmp_path):
    other = tmp_path / "other"
    os.makedirs(other)
    with open(other / "c.txt", "w") as f:
        f.write("completely different words here, again and again\n" * 50)
    tok = train_tokenizer([str(other / "c.txt")], MIN_VOCAB_SIZE + 20, str(other / "model"))
    cfg = ModelConfig.from_json(ckpt).replace(vocab_size=tok.vocab_size)
    Transformer(cfg).save_pretrained(str(other / "model"))
    with pytest.raises(ValueError, match="vocabulary size 266 .teacher. vs 286 .student."):
        distill.check_same_tokenizer(ckpt, str(other / "model"))
    oc = distill.OnPolicyConfig(model=str(other / "model"), teacher=ckpt, out=str(tmp_path / "run"), steps=1)
    with pytest.raises(ValueError, match="do not share a tokenizer"):
        distill.train_onpolicy(oc, progress=False, task=DigitsTask())
    assert not (tmp_path / "run").exists()
    # same tokenizer, other model vocabulary
    wide = tmp_path / "wide"
    shutil.copytree(ckpt, wide)
    ModelConfig.from_json(ckpt).replace(vocab_size=300).to_json(str(wide))
    with pytest.raises(ValueError, match="model vocab_size 266 .teacher. vs 300"):
        distill.check_same_tokenizer(ckpt, str(wide))
    # same vocabulary, another EOS token
    eos = tmp_path / "eos"
    shutil.copytree(ckpt, eos)
    tc = json.loads(text(eos / "tokenizer_config.json"))
    tc["eos_token"] = "<|pad|>"
    (eos / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ValueError, match="EOS token '<.end_of_sentence.>' .teacher. vs '<.pad.>' .student."):
        distill.check_same_tokenizer(ckpt, str(eos))
    distill.check_same_tokenizer(ckpt, ckpt)  # and a match passes


def test_nano_is_a_dense_student_under_a_third_of_tiny():
    for vocab in (512, 4096):
        tiny = param_counts(ModelConfig.from_preset("tiny").replace(vocab_size=vocab))["active_params"]
        nano_cfg = ModelConfig.from_preset("nano").replace(vocab_size=vocab)
        nano = param_counts(nano_cfg)
        assert nano["active_params"] * 3 <= tiny
        assert nano["active_params"] == nano["total_params"]  # dense: every parameter is active
    assert not any(nano_cfg.is_moe_layer(i) for i in range(nano_cfg.num_hidden_layers))
    assert Transformer(nano_cfg).num_params() == nano["total_params"]


# ---------------------------------------------------------------------------------------------- training
def test_sft_with_logit_distillation(ckpt, student, tmp_path, monkeypatch):
    tok = load_tokenizer(ckpt)
    monkeypatch.setattr(distill, "generate_batched", FakeEngine(tok))
    data = tmp_path / "t.jsonl"
    distill.generate_traces(gen_cfg(ckpt, data), task=TASK, progress=False)
    kw = dict(data=str(data), steps=2, batch_size=2, seq_len=512, kd_weight=0.5)
    sft.train(sft.SFTConfig(model=ckpt, teacher=ckpt, out=str(tmp_path / "same"), **kw), progress=False)
    same = read_metrics(str(tmp_path / "same"))[0]
    assert same["target_tokens"] > 0 and same["kd"] == pytest.approx(0.0, abs=1e-6)
    sft.train(sft.SFTConfig(model=student, teacher=ckpt, out=str(tmp_path / "kd"), **kw), progress=False)
    r = read_metrics(str(tmp_path / "kd"))[0]
    assert r["kd"] > 0 and r["loss"] == pytest.approx(r["ce"] + 0.5 * r["kd"], rel=1e-5)
    with pytest.raises(ValueError, match="--kd-weight needs --teacher"):
        sft.train(sft.SFTConfig(model=student, out=str(tmp_path / "x"), **kw), progress=False)


def test_short_onpolicy_run_lowers_the_kl(sharp, student, tmp_path):
    """Exact reverse KL. (The sampled estimator is unbiased, tested above, but its one-token gradient is noisy:
    cosine ~0.3 with the exact one at 512 tokens a batch here, too noisy for 8 small steps.)"""
    oc = distill.OnPolicyConfig(model=student, teacher=sharp, out=str(tmp_path / "run"), steps=8,
                                prompts_per_step=2, samples_per_prompt=4, max_new_tokens=8, lr=3e-3)
    tok = load_tokenizer(student)
    fixed = grpo.rollout(Transformer.from_pretrained(student).eval(), tok, DigitsTask(), distill.rollout_config(oc), 1)
    teacher = Transformer.from_pretrained(sharp).eval()

    def kl(path):
        with torch.no_grad():
            return distill.onpolicy_loss(Transformer.from_pretrained(path).eval(), teacher, fixed.prompts,
                                         fixed.completions, oc)[1]["reverse_kl"]

    before = kl(student)
    summary = distill.train_onpolicy(oc, progress=False, task=DigitsTask(), plot=True)
    after = kl(summary["checkpoint"])
    assert after < 0.8 * before, (before, after)
    rows = read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[0]["reverse_kl"] == pytest.approx(before, rel=1e-4)  # step 1 samples the same batch
    assert rows[-1]["reverse_kl"] < 0.8 * rows[0]["reverse_kl"]
    for key in ("loss", "reverse_kl", "accuracy", "response_length", "generated_tokens", "scored_tokens"):
        assert key in rows[-1]
    assert all(os.path.getsize(p) > 0 for p in summary["plots"])


def test_onpolicy_teacher_equal_to_student_and_gkd_mix(ckpt, tmp_path):
    oc = distill.OnPolicyConfig(model=ckpt, teacher=ckpt, out=str(tmp_path / "same"), steps=2, prompts_per_step=2,
                                samples_per_prompt=2, max_new_tokens=6, lr=1e-2, lmbda=0.5, beta=0.5)
    distill.train_onpolicy(oc, progress=False, task=DigitsTask())
    rows = read_metrics(str(tmp_path / "same"))
    assert rows[0]["loss"] == pytest.approx(0.0, abs=1e-6) and rows[0]["grad_norm"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="--kl sampled"):
        distill.OnPolicyConfig(model=ckpt, teacher=ckpt, kl="sampled", beta=0.5).validate()


def test_onpolicy_resume_reproduces_the_uninterrupted_run(ckpt, student, tmp_path):
    kw = dict(model=student, teacher=ckpt, steps=4, save_every=2, prompts_per_step=2, samples_per_prompt=2,
              max_new_tokens=6, lr=1e-2, seed=3, kl="sampled")
    distill.train_onpolicy(distill.OnPolicyConfig(out=str(tmp_path / "full"), **kw), progress=False,
                           task=DigitsTask())
    os.makedirs(tmp_path / "cut" / "checkpoints")
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_2", tmp_path / "cut" / "checkpoints" / "step_2")
    with open(tmp_path / "cut" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in read_metrics(str(tmp_path / "full"))[:2])
    distill.train_onpolicy(distill.OnPolicyConfig(out=str(tmp_path / "cut"), resume=True, **kw), progress=False,
                           task=DigitsTask())
    drop = ("rollout_s", "update_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert strip(read_metrics(str(tmp_path / "cut"))) == strip(read_metrics(str(tmp_path / "full")))

"""Evaluation: pass@k (unbiased estimator) and maj@k (ties: first seen wins) on hand-made results, the R1 prompt,
and `nanoseek eval` end to end on a tiny model (sampled, with a stand-in verifier)."""

import json
import math
from itertools import combinations

import pytest

from nanoseek import ModelConfig, SamplingParams, Transformer, tasks
from nanoseek import eval as eval_module
from nanoseek.cli import main
from nanoseek.eval import (EvalConfig, ProblemResult, completion_text, evaluate, majority_correct,
                           pass_at_k, plot_curve, prompt_ids, summarize)
from nanoseek.tokenizer import load_tokenizer
from test_grpo import tiny_checkpoint




def test_pass_at_k_is_the_unbiased_estimator():
    # brute force: the share of k-subsets of the n samples holding at least one right sample
    for n, c in [(5, 0), (5, 1), (5, 2), (6, 3), (4, 4)]:
        right = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(range(n), k))
            want = sum(any(right[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(want), (n, c, k)
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote_ties_and_missing_answers():
    assert majority_correct(["5", "6", "5"], [True, False, True])
    assert not majority_correct(["6", "5", "6", "5"], [False, True, False, True])  # tie: "6" seen first
    assert majority_correct(["5", "6", "6", "5"], [True, False, False, True])  # tie: "5" seen first
    assert majority_correct([None, None, "5"], [False, False, True])  # no answer: no vote
    assert not majority_correct([None, None], [False, False])


def test_summarize_on_hand_made_results():
    r = [
        ProblemResult(answers=["5", "5", "4", "5"], correct=[True, True, False, True], lengths=[10, 12, 8, 10],
                      formats=[True] * 4),
        ProblemResult(answers=["1", "2", "2", None], correct=[True, False, False, False], lengths=[4, 4, 4, 4],
                      formats=[True, True, True, False]),
        ProblemResult(answers=[None] * 4, correct=[False] * 4, lengths=[20] * 4, formats=[False] * 4),
    ]
    s = summarize(r)
    assert s["k"] == 4 and s["n"] == 3
    assert s["pass@1"] == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)
    assert s["pass@k"] == pytest.approx(2 / 3)  # problems 1 and 2 have a right sample
    assert s["maj@k"] == pytest.approx(1 / 3)  # problem 1: "5" wins; problem 2: "2" (wrong) wins
    assert s["curve"]["2"]["pass@k"] == pytest.approx((1 - math.comb(1, 2) / math.comb(4, 2) + 1 - 3 / 6) / 3)
    assert s["curve"]["1"]["maj@k"] == pytest.approx(2 / 3)  # first sample only: right on problems 1 and 2
    assert s["mean_length"] == pytest.approx((40 + 16 + 80) / 12)
    assert s["format_rate"] == pytest.approx(7 / 12) and s["answered_rate"] == pytest.approx(7 / 12)


def test_prompt_is_the_chat_template_with_the_system_prompt(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    tok = load_tokenizer(ckpt)
    ids = prompt_ids(tok, "What is 1 + 1?")
    text = tok.decode(ids)
    assert text.startswith("<|begin_of_sentence|><|system|>" + tasks.SYSTEM_PROMPT + "<|user|>What is 1 + 1?")
    assert text.endswith("<|assistant|>")
    assert prompt_ids(tok, "q", prefill_think=True)[-1] == tok.token_id("<think>")


def test_eval_end_to_end_sampled_and_cli(tmp_path, capsys, monkeypatch):
    """Sampled completions, scored by a stand-in verifier (a random tiny model answers nothing right): the
    summary equals pass@1 / pass@k recomputed from what each problem's own samples got."""
    ckpt = tiny_checkpoint(tmp_path)
    model, tok = Transformer.from_pretrained(ckpt).eval(), load_tokenizer(ckpt)
    task = tasks.get("arithmetic", difficulty=1)
    graded = []

    def verify(completion, example):  # right iff the completion has an even number of characters
        graded.append((example.prompt, completion, len(completion) % 2 == 0))
        return graded[-1][2]

    monkeypatch.setattr(task, "verify", verify)
    generated = []  # (prompt ids, completion text) as sampled
    real_generate = eval_module.generate_batched

    def generate_batched(model, prompts, *args, **kw):
        out = real_generate(model, prompts, *args, **kw)
        generated.extend((tuple(p), completion_text(tok, c)) for p, c in zip(prompts, out))
        return out

    monkeypatch.setattr(eval_module, "generate_batched", generate_batched)
    s = evaluate(model, tok, task, EvalConfig(n=3, samples=4, temperature=1.0, max_new_tokens=5, batch_size=5))
    assert s["n"] == 3 and s["k"] == 4 and 1 <= s["mean_length"] <= 5
    per_problem = {}
    for prompt, completion, right in graded:
        per_problem.setdefault(prompt, []).append((completion, right))
    assert len(per_problem) == 3 and all(len(v) == 4 for v in per_problem.values())
    for prompt, v in per_problem.items():  # each problem is graded on the samples of its own prompt
        ids = tuple(prompt_ids(tok, prompt))
        assert sorted(c for c, _ in v) == sorted(c for p, c in generated if p == ids)
    assert all(len({c for c, _ in v}) > 1 for v in per_problem.values())  # sampled: the samples differ
    c = [sum(r for _, r in v) for v in per_problem.values()]
    assert s["pass@1"] == pytest.approx(sum(x / 4 for x in c) / 3)
    assert s["pass@k"] == pytest.approx(sum(x > 0 for x in c) / 3)
    assert s["pass@1"] < s["pass@k"]  # this seed's samples disagree within a problem
    main(["eval", "--model", ckpt, "--task", "arithmetic", "--n", "2", "--samples", "4",
          "--max-new-tokens", "4", "--json", "--plot", str(tmp_path / "k.png")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("pass@1", "maj@k", "mean_length", "pass@k"):
        assert key in out
    assert set(out["curve"]) == {"1", "2", "4"} and (tmp_path / "k.png").stat().st_size > 0
    assert plot_curve(out, str(tmp_path / "again.png")).endswith("again.png")


def test_batched_generation_does_not_compile(monkeypatch):
    """generate_batched (evaluation, GRPO and distillation rollouts) builds its engine without the compiled batch-1
    step even where compiling is on: only a batch's last row decodes alone, and a GRPO run paid seconds of compile
    for it. One prompt at a time keeps the default."""
    monkeypatch.setenv("NANOSEEK_COMPILE", "1")
    built = []

    class Recording(eval_module.Engine):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self.compiled is not None)

    monkeypatch.setattr(eval_module, "Engine", Recording)
    model = Transformer(ModelConfig.from_preset("tiny").replace(num_hidden_layers=1, vocab_size=64)).eval()
    params = SamplingParams(max_new_tokens=1, temperature=0.0)  # prefill only: nothing actually compiles here
    eval_module.generate_batched(model, [[1, 2], [3, 4, 5]], params, batch_size=2)
    eval_module.generate_batched(model, [[1, 2]], params, batch_size=2)
    assert built == [False, True]

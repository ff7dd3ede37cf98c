"""Rule-based rewards: answer extraction, format, DAPO overlong penalty, combination; robust to hostile text."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek import tasks
from nanoseek.tasks import Example, rewards
from nanoseek.tasks.rewards import (RewardWeights, combine, extract_answer, format_ok, format_reward,
                                    length_bonus, overlong_penalty, score)

FUZZ = settings(max_examples=200, deadline=None)


def test_extract_answer_last_complete_block_wins():
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert extract_answer("<think>I'll write <answer>x</answer> later</think><answer>42</answer>") == "42"
    assert extract_answer("<answer>7</answer> and an unclosed <answer>8") == "7"
    assert extract_answer("<answer>\n  3/4\n</answer>") == "3/4"
    assert extract_answer("<answer></answer>") == ""
    for none in ["no tags", "<answer>5", "5</answer>", "</answer><answer>", "", "<Answer>5</Answer>"]:
        assert extract_answer(none) is None, none
    assert extract_answer("<answer>" + "9" * (rewards.MAX_ANSWER_CHARS + 1) + "</answer>") is None
    assert extract_answer(None) is None


@pytest.mark.parametrize("text, ok", [
    ("<think>a</think><answer>b</answer>", True),
    ("  <think>\nstep 1\nstep 2\n</think>\n\n<answer> 42 </answer>\n", True),
    ("<think></think><answer>42</answer>", False),  # empty reasoning
    ("<think>a</think><answer> </answer>", False),  # empty answer
    ("<think>a</think> so <answer>b</answer>", False),  # text between the blocks
    ("<think>a</think><answer>b</answer> trailing", False),
    ("preamble <think>a</think><answer>b</answer>", False),
    ("<answer>b</answer><think>a</think>", False),  # wrong order
    ("<think>a</think><answer>b</answer><answer>c</answer>", False),  # two answers
    ("<think>a<think>b</think><answer>c</answer>", False),  # nested think
    ("<think>a</think>", False),
    ("<answer>b</answer>", False),
    ("", False),
])
def test_format(text, ok):
    assert format_ok(text) is ok
    assert format_reward(text) == (1.0 if ok else 0.0)


def test_format_with_prefilled_think():
    # the chat template ended the prompt with "<think>", so the completion starts inside the reasoning
    assert format_ok("step 1</think><answer>4</answer>", think_prefilled=True)
    assert not format_ok("step 1</think><answer>4</answer>")
    assert not format_ok("<think>step 1</think><answer>4</answer>", think_prefilled=True)  # tag twice


def test_overlong_penalty_dapo():
    # L_max = 100, L_cache = 20: 0 up to 80, then (80 - L) / 20, -1 beyond 100
    assert overlong_penalty(10, 100, 20) == 0.0
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(95, 100, 20) == pytest.approx(-0.75)
    assert overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(10_000, 100, 20) == -1.0
    assert overlong_penalty(100, 100, 0) == 0.0 and overlong_penalty(101, 100, 0) == -1.0  # hard cut-off
    with pytest.raises(ValueError):
        overlong_penalty(5, 100, 200)


def test_length_bonus():
    assert length_bonus(50, 200) == 0.25 and length_bonus(400, 200) == 1.0 and length_bonus(-3, 10) == 0.0
    with pytest.raises(ValueError):
        length_bonus(5, 0)


def test_combine_default_weights():
    # defaults: accuracy 1.0, format 0.1, overlong 1.0 (when computed), length 0.0
    assert combine(1.0, 1.0) == pytest.approx(1.1)
    assert combine(0.0, 1.0) == pytest.approx(0.1)
    assert combine(1.0, 0.0, overlong=-0.5, length=1.0) == pytest.approx(0.5)
    w = RewardWeights(accuracy=2.0, format=0.5, overlong=0.5, length=0.2)
    assert combine(1.0, 1.0, -1.0, 0.5, weights=w) == pytest.approx(2.0 + 0.5 - 0.5 + 0.1)


def _arith():
    return tasks.get("arithmetic"), Example(prompt="What is 6 * 7?", answer=42, meta={"expression": "6 * 7"})


def test_task_reward_grid():
    task, ex = _arith()
    assert task.reward("<think>6*7</think><answer>42</answer>", ex) == pytest.approx(1.1)
    assert task.reward("<answer>42</answer>", ex) == pytest.approx(1.0)  # right but no reasoning block
    assert task.reward("<think>hmm</think><answer>41</answer>", ex) == pytest.approx(0.1)
    assert task.reward("42", ex) == 0.0  # no tag: the verifier does not guess
    # custom weights on the task
    t2 = tasks.get("arithmetic", weights=RewardWeights(format=0.0))
    assert t2.reward("<think>hmm</think><answer>41</answer>", ex) == 0.0


def test_score_components_and_lengths():
    task, ex = _arith()
    text = "<think>6*7</think><answer>42</answer>"
    parts = score(text, ex, task.verify, length=90, max_len=100, cache_len=20)
    assert parts["accuracy"] == 1.0 and parts["format"] == 1.0 and parts["overlong"] == pytest.approx(-0.5)
    assert parts["total"] == pytest.approx(1.0 + 0.1 - 0.5)
    # without an explicit length the character count is used
    assert score(text, ex, task.verify, max_len=len(text))["overlong"] == 0.0
    assert score(text, ex, task.verify, max_len=len(text) - 1)["overlong"] == -1.0
    with_bonus = score(text, ex, task.verify, target_len=2 * len(text), weights=RewardWeights(length=1.0))
    assert with_bonus["length"] == 0.5 and with_bonus["total"] == pytest.approx(1.6)
    assert task.reward(text, ex, length=200, max_len=100) == pytest.approx(0.1)


def test_raising_verifier_counts_as_wrong():
    def broken(text, example):
        raise RuntimeError("bug")
    assert rewards.accuracy_reward("<answer>1</answer>", None, broken) == 0.0


HOSTILE = ["<answer>" * 200_000, "</answer>" * 200_000, "<think>" * 100_000 + "</think>" * 100_000,
           "<answer>" + "(" * 100_000 + "</answer>", "\x00\ud800\U0001f600\u202e", "x" * 1_000_000,
           "<think>a</think><answer>9**9**9**9</answer>", "<think>a</think><answer>__import__('os')</answer>"]


def test_hostile_text_is_linear_and_safe():
    task, ex = _arith()
    for text in HOSTILE:
        a = extract_answer(text)
        assert a is None or len(a) <= rewards.MAX_ANSWER_CHARS
        assert format_ok(text) in (True, False)
        assert task.reward(text, ex) in (0.0, 0.1)
    assert format_ok(HOSTILE[-1]) and task.reward(HOSTILE[-1], ex) == pytest.approx(0.1)


@FUZZ
@given(st.text(max_size=400), st.text(max_size=50), st.text(max_size=50))
def test_fuzz_rewards_never_raise(prefix, inner, suffix):
    task, ex = _arith()
    for text in (prefix, f"{prefix}<think>{inner}</think><answer>{suffix}</answer>", f"<answer>{inner}</answer>{suffix}"):
        a = extract_answer(text)
        assert a is None or isinstance(a, str)
        assert format_reward(text) in (0.0, 1.0)
        r = task.reward(text, ex)
        assert any(abs(r - v) < 1e-9 for v in (0.0, 0.1, 1.0, 1.1))
        assert (r >= 1.0) == task.verify(text, ex) and (abs(r - round(r)) > 0.05) == format_ok(text)


@FUZZ
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
       .filter(lambda s: "<" not in s and s.strip()))
def test_fuzz_extract_roundtrip(inner):
    # whatever non-tag text is put in the last answer block comes back stripped
    assert extract_answer(f"<think>x</think><answer>{inner}</answer>") == inner.strip()

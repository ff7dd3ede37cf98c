"""Verifiable tasks: deterministic generators, disjoint splits, solvable Countdown, safe verifiers."""

import builtins
import itertools
import json
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek import tasks
from nanoseek.tasks import Example, safe_math
from nanoseek.tasks.countdown import CountdownTask

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def wrap(answer: str) -> str:
    return f"<think>working</think>\n<answer>{answer}</answer>"


# ---------------------------------------------------------------------------------------------- registry

def test_registry_and_difficulty():
    a1, a4 = tasks.get("arithmetic"), tasks.get("arithmetic", difficulty=4)
    assert (a1.digits, a1.n_operands) == (1, 2) and (a4.digits, a4.n_operands) == (3, 3)
    assert tasks.get("countdown", difficulty=3).n_numbers == 5
    assert "<think>" in tasks.SYSTEM_PROMPT and "<answer>" in tasks.SYSTEM_PROMPT
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get("chess")
    with pytest.raises(ValueError, match="difficulty"):
        tasks.get("arithmetic", difficulty=0)


@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_sampling_is_deterministic_and_seeded(name):
    task = tasks.get(name, difficulty=2)
    a, b = task.sample(20, seed=7), task.sample(20, seed=7)
    assert [e.prompt for e in a] == [e.prompt for e in b] and [e.answer for e in a] == [e.answer for e in b]
    assert [e.prompt for e in task.sample(20, seed=8)] != [e.prompt for e in a]
    assert [e.prompt for e in task.sample(20, split="test", seed=7)] != [e.prompt for e in a]
    assert all(isinstance(e.prompt, str) and e.prompt for e in a)


@pytest.mark.parametrize("name, difficulty", [("arithmetic", 1), ("arithmetic", 2), ("countdown", 1)])
def test_train_and_test_are_disjoint(name, difficulty):
    task = tasks.get(name, difficulty=difficulty)
    train = {task.key(e) for seed in range(3) for e in task.sample(300, "train", seed)}
    test = {task.key(e) for seed in range(3) for e in task.sample(100, "test", seed)}
    assert train and test and not (train & test)
    # the split is a property of the problem, so a harder setting agrees with an easier one on shared problems
    assert all(tasks.split_of(f"{task.name}|{k}") == "test" for k in test)


# ---------------------------------------------------------------------------------------------- arithmetic

@pytest.mark.parametrize("difficulty", [1, 2, 3, 5])
def test_arithmetic_answers_are_right_and_verified(difficulty):
    task = tasks.get("arithmetic", difficulty=difficulty)
    for ex in task.sample(50, seed=difficulty):
        # an independent evaluator (the safe parser, precedence by grammar) agrees with the generator
        assert safe_math.evaluate(ex.meta["expression"]) == ex.answer
        assert ex.meta["expression"] in ex.prompt
        assert task.verify(wrap(str(ex.answer)), ex)
        assert not task.verify(wrap(str(ex.answer + 1)), ex)
        assert not task.verify(str(ex.answer), ex)  # no <answer> tag, no credit


def test_arithmetic_accepts_formatting_variants():
    task = tasks.get("arithmetic")
    ex = Example(prompt="What is 25 * 40 * 2?", answer=2000, meta={"expression": "25 * 40 * 2"})
    for spelling in ["2000", "2,000", " 2000 ", "2000.0", "2e3", "\\boxed{2000}", "+2000"]:
        assert task.verify(wrap(spelling), ex), spelling
    for spelling in ["200", "20,00", "2000 apples", "25*40*2", "", "-2000"]:
        assert not task.verify(wrap(spelling), ex), spelling


# ---------------------------------------------------------------------------------------------- countdown

def _solvable(numbers, target):
    """Brute force, independent of the generator: can the numbers (each exactly once) reach target?"""
    def values(nums):
        if len(nums) == 1:
            return {Fraction(nums[0])}
        out = set()
        for r in range(1, len(nums)):
            for left in itertools.combinations(range(len(nums)), r):
                a = [nums[i] for i in left]
                b = [nums[i] for i in range(len(nums)) if i not in left]
                for x in values(a):
                    for y in values(b):
                        out |= {x + y, x - y, x * y}
                        if y != 0:
                            out.add(x / y)
        return out
    return Fraction(target) in values(list(numbers))


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_countdown_instances_solvable_and_reference_verifies(difficulty):
    task = tasks.get("countdown", difficulty=difficulty)
    for ex in task.sample(100, split="train", seed=difficulty) + task.sample(20, split="test", seed=difficulty):
        nums, target = ex.meta["numbers"], ex.meta["target"]
        assert len(nums) == difficulty + 2 and all(1 <= x <= 99 for x in nums)
        assert 1 <= target <= 100 and ex.answer == target
        assert str(target) in ex.prompt and str(nums) in ex.prompt
        assert task.verify(wrap(ex.meta["solution"]), ex)
        assert task.verify(wrap(ex.meta["solution"] + f" = {target}"), ex)
        assert not task.verify(wrap(ex.meta["solution"] + f" = {target + 1}"), ex)
    for ex in tasks.get("countdown", difficulty=1).sample(30, seed=11):
        assert _solvable(ex.meta["numbers"], ex.meta["target"])


def _cd(numbers, target, **kw):
    meta = {"numbers": numbers, "target": target, "solution": ""}
    return CountdownTask(**kw), Example(prompt="", answer=target, meta=meta)


def test_countdown_verifier_rules():
    task, ex = _cd([3, 5, 7], 22)
    assert task.verify(wrap("3*5+7"), ex)
    assert task.verify(wrap("(7 + 3 * 5)"), ex)
    assert task.verify(wrap("3 × 5 + 7 = 22"), ex)  # common unicode times sign
    assert not task.verify(wrap("3*5+7 = 23"), ex)  # claimed value must be the target
    assert not task.verify(wrap("3*5+7*1"), ex)  # 1 was not given
    assert not task.verify(wrap("3*7+5-5+1"), ex)  # 5 twice and 1 not given
    assert not task.verify(wrap("3*5+7+0"), ex)
    assert not task.verify(wrap("22"), ex)  # the target alone
    assert not task.verify(wrap("3*5"), ex)  # wrong value (and 7 unused)
    assert not task.verify(wrap("3**5+7"), ex)
    assert not task.verify(wrap("3*5+7 = 22 = 22"), ex)
    assert not task.verify(wrap("3*5+7 ="), ex) and not task.verify(wrap("22 = 3*5+7"), ex)
    # exactly once (default) vs at most once
    strict, ex4 = _cd([3, 5, 7, 100], 22)
    lenient, _ = _cd([3, 5, 7, 100], 22, use_all=False)
    assert not strict.verify(wrap("3*5+7"), ex4) and lenient.verify(wrap("3*5+7"), ex4)
    assert not lenient.verify(wrap("3*5+7+7-7"), ex4)  # still at most once
    # repeated numbers count separately
    task, ex = _cd([2, 2, 5], 9)
    assert task.verify(wrap("2+2+5"), ex) and not task.verify(wrap("2+5+2+2-2"), ex)


def test_countdown_exact_division():
    task, ex = _cd([1, 3, 4, 6], 24)
    assert task.verify(wrap("6 / (1 - 3/4)"), ex)  # 6 / (1/4): needs exact rationals
    assert not task.verify(wrap("6 / (1 - 3/4) + 0.0001"), ex)
    task, ex = _cd([5, 5, 1], 1)
    assert not task.verify(wrap("1 / (5 - 5)"), ex)  # division by zero is wrong, never an error
    assert task.verify(wrap("(5 / 5) * 1"), ex)


# ---------------------------------------------------------------------------------------------- jsonl

def _write(tmp_path, rows):
    p = tmp_path / "problems.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return p


def test_jsonl_task_numeric_comparison(tmp_path):
    p = _write(tmp_path, [
        {"prompt": "thousand?", "answer": 1000, "split": "test"},
        {"prompt": "three quarters?", "answer": "3/4", "split": "test"},
        {"prompt": "a tenth?", "answer": 0.1, "split": "test"},
        "",
        {"prompt": "big?", "answer": "1,000,000", "split": "train"},
    ])
    task = tasks.get(f"jsonl:{p}")
    thousand, quarters, tenth = task.problems("test")
    for s in ["1000", "1,000", "1e3", "1000.0", "$1,000", "\\boxed{1000}"]:
        assert task.verify(wrap(s), thousand), s
    for s in ["3/4", "0.75", ".75", "\\frac{3}{4}", "6/8", "75e-2"]:
        assert task.verify(wrap(s), quarters), s
    for s in ["0.1", "1/10", "1e-1"]:
        assert task.verify(wrap(s), tenth), s
    for s in ["1001", "0.7", "3/5", "1,00", "one thousand", "0.1000001"]:
        assert not task.verify(wrap(s), thousand) and not task.verify(wrap(s), quarters), s
    assert [e.meta["line"] for e in task.problems("train")] == [5]
    assert task.sample(5, "train") == [task.problems("train")[0]] * 5
    assert task.sample(3, "test", seed=1) == task.sample(3, "test", seed=1)
    assert sorted(e.prompt for e in task.sample(3, "test", seed=2)) == sorted(e.prompt for e in task.problems("test"))


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a", 1]', "JSON object"),
    ('{"answer": 3}', "prompt"),
    ('{"prompt": "x"}', "missing 'answer'"),
    ('{"prompt": "x", "answer": "three"}', "numeric"),
    ('{"prompt": "x", "answer": true}', "numeric"),
    ('{"prompt": "x", "answer": [1]}', "numeric"),
    ('{"prompt": "x", "answer": 1, "split": "dev"}', "split"),
])
def test_jsonl_bad_lines_name_the_line(tmp_path, line, message):
    p = _write(tmp_path, [{"prompt": "ok", "answer": 1}, line])
    with pytest.raises(ValueError, match=message) as err:
        tasks.load_jsonl(p)
    assert f"{p}:2:" in str(err.value)


def test_jsonl_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError):
        tasks.get(f"jsonl:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(ValueError, match="no problems"):
        tasks.load_jsonl(_write(tmp_path, ["", "  "]))
    only_train = tasks.load_jsonl(_write(tmp_path, [{"prompt": "x", "answer": 1, "split": "train"}]))
    with pytest.raises(ValueError, match="split is empty"):
        only_train.sample(1, "test")


# ---------------------------------------------------------------------------------------------- safety

def _all_tasks(tmp_path):
    p = _write(tmp_path, [{"prompt": "x", "answer": "3/4", "split": "test"}])
    jt = tasks.load_jsonl(p)
    generated = (tasks.get("arithmetic", difficulty=3), tasks.get("countdown", difficulty=2))
    out = [(t, t.sample(1, "test", seed=0)[0]) for t in generated]
    return out + [(jt, jt.problems("test")[0])]


HOSTILE = [
    "9**9**9**9", "9^9^9^9", "2**10000000", "__import__('os').system('x')", "().__class__.__bases__[0]",
    "exec('1')", "eval('1+1')", "lambda: 1", "(" * 100_000 + "1" + ")" * 100_000, "-" * 100_000 + "1",
    "1" * 100_000, "9" * 300 + "*" + "9" * 300, "1e999999", "1e-999999", "10**10**10", "1/0", "0/0", "1 // 2",
    "\x00", "\u202e3+4", "\u0663+\u0663", "\u00b2", "\ud800", "\U0001f600", "NaN", "inf", "-inf",
    "1" + "*9" * 99, "1" + "/7" * 99, "((((((((((((((((((((((((((((((((((((1))))))))))))))))))))))))))))))))))))",
    "<answer>" * 100_000, "</answer>" * 100_000, "x" * 1_000_000, "\\frac{1}{0}", "1,000,00", "1/-0",
]


@pytest.fixture(scope="module")
def triples(tmp_path_factory):
    return _all_tasks(tmp_path_factory.mktemp("tasks"))


def test_hostile_completions_never_raise_never_execute(triples, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("verifier tried to execute text")
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(builtins, "compile", forbidden)
    for task, ex in triples:
        for text in HOSTILE:
            both = "<think>" + text + "</think><answer>" + text + "</answer>"
            for completion in (text, wrap(text), f"<answer>{text}", both):
                assert task.verify(completion, ex) is False
                assert task.reward(completion, ex) in (0.0, 0.1)
    # with eval & co. forbidden, right answers still verify: the verifiers never needed them
    for task, ex in triples:
        right = ex.meta.get("solution") or str(ex.answer)
        assert task.verify(wrap(right), ex)


@FUZZ
@given(text=st.text(max_size=300))
def test_fuzz_verifiers_arbitrary_text(triples, text):
    for task, ex in triples:
        for completion in (text, wrap(text)):
            assert task.verify(completion, ex) in (True, False)
            assert isinstance(task.reward(completion, ex), float)


EXPR_ALPHABET = "0123456789+-*/(). =e^x"


@FUZZ
@given(text=st.text(alphabet=EXPR_ALPHABET, max_size=250))
def test_fuzz_countdown_on_expression_like_text(text):
    task, ex = _cd([3, 5, 7], 22)
    ok = task.verify(wrap(text), ex)
    assert ok in (True, False)
    if ok:  # anything accepted really evaluates to the target using each number once
        value, lits = safe_math.evaluate_with_literals(text.partition("=")[0])
        assert value == 22 and sorted(lits) == [3, 5, 7]


# ---------------------------------------------------------------------------------------------- safe parser

def test_safe_math_values_and_rejections():
    ev = safe_math.evaluate
    assert ev("1 + 2 * 3") == 7 and ev("(1 + 2) * 3") == 9 and ev("8 / 4 / 2") == 1 and ev("8 - 4 - 2") == 2
    assert ev("-3 * -(2 + 1)") == 9 and ev("7 / 2") == Fraction(7, 2) and ev("0.5 + .5") is None
    assert ev("2.5 * 2") == 5
    for bad in ["2 ** 3", "2 ^ 3", "1e3", "7 // 2", "1 +", "(1 + 2", "1 + 2)", "", "abc", "1 2", "1/0", "5/(2-2)",
                "1" * 13, "(" * 40 + "1" + ")" * 40, "9" * 10 + "*" + "9" * 10, "1" + " " * 200]:
        assert ev(bad) is None, bad
    # bounds are configurable, and the step budget really stops work
    assert ev("1+1+1+1+1+1", max_steps=5) is None and ev("1+1+1+1+1+1") == 6


def _too_big(x):
    return abs(x.numerator) >= safe_math.MAX_ABS or x.denominator >= safe_math.MAX_ABS


@st.composite
def expr_trees(draw, depth=0):
    """Random expressions with their value by plain Fraction arithmetic (None where the parser must refuse)."""
    if depth >= 4 or draw(st.booleans()):
        n = draw(st.integers(0, 999))
        return str(n), Fraction(n)
    op = draw(st.sampled_from("+-*/"))
    (ls, lv), (rs, rv) = draw(expr_trees(depth + 1)), draw(expr_trees(depth + 1))
    if op == "/" and rv == 0:
        op = "+"
    if lv is None or rv is None:
        return f"({ls} {op} {rs})", None
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else None}[op]
    return f"({ls} {op} {rs})", None if _too_big(value) else value


@FUZZ
@given(tree=expr_trees(), big=st.integers(1, 10**6))
def test_fuzz_safe_math_matches_reference(tree, big):
    text, value = tree
    assert safe_math.evaluate(text) == value
    # the magnitude bound bites exactly where it should: multiplying by integers >= 1 only grows the
    # numerator, so the last product decides
    huge = f"{text} * {big} * 999999999999 * 999999999999"
    final = None if value is None else value * big * 999999999999**2
    assert safe_math.evaluate(huge) == (None if final is None or _too_big(final) else final)

"""Verifiable tasks for R1-style reinforcement learning.

A task generates problems whose final answer a program can check (DeepSeek-R1, section 2.2.2: "rule-based
rewards"). Each one offers:

    task.sample(n, split="train" | "test", seed=0) -> list[Example]
    task.verify(completion, example) -> bool        is the final answer (in <answer>...</answer>) right
    task.reward(completion, example) -> float       accuracy + format reward, see nanoseek.tasks.rewards

`Example.prompt` is the user's question only; the instruction about the output format is SYSTEM_PROMPT, and
the chat template that puts the two together belongs to the tokenizer.

Train and test splits are disjoint by construction: a problem belongs to the test split iff a hash of its
canonical key falls in the test bucket, so no seed can ever draw a test problem into training.

    >>> from nanoseek import tasks
    >>> task = tasks.get("countdown", difficulty=1)
    >>> ex = task.sample(1, split="test", seed=0)[0]
    >>> task.verify("<think>...</think> <answer>" + ex.meta["solution"] + "</answer>", ex)
    True
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from . import rewards

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the assistant solves it. "
    "The assistant first thinks about the reasoning process step by step inside <think> </think> tags, then "
    "gives the final answer inside <answer> </answer> tags, i.e. <think> reasoning here </think> "
    "<answer> final answer here </answer>."
)

TEST_PERCENT = 10  # share of the problem space reserved for the test split


@dataclass(frozen=True)
class Example:
    """One problem: the user's question, its reference answer, and task-specific extras (numbers, solution)."""

    prompt: str
    answer: object
    meta: dict = field(default_factory=dict)


def split_of(key: str, test_percent: int = TEST_PERCENT) -> str:
    """'test' or 'train' for a problem's canonical key, from a stable hash (independent of PYTHONHASHSEED)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h % 100 < test_percent else "train"


class Task:
    """Base class of the task families. Subclasses implement `generate(rng)`, `key(example)` and `check`;
    `sample` keeps the generator's problems of the requested split (deterministic in task settings, split, seed)."""

    name = "task"

    def __init__(self, difficulty: int = 1, test_percent: int = TEST_PERCENT,
                 weights: rewards.RewardWeights = rewards.DEFAULT_WEIGHTS):
        if not isinstance(difficulty, int) or difficulty < 1:
            raise ValueError(f"difficulty must be an integer >= 1, got {difficulty!r}")
        if not 0 < test_percent < 100:
            raise ValueError(f"test_percent must be in 1..99, got {test_percent}")
        self.difficulty = difficulty
        self.test_percent = test_percent
        self.weights = weights

    # -- to implement ----------------------------------------------------------------------------------
    def generate(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def key(self, example: Example) -> str:
        """Canonical identity of a problem, used for the split hash. Default: the prompt text."""
        return example.prompt

    def check(self, answer: str, example: Example) -> bool:
        """Is the extracted answer text right? Must never raise on any string."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------------
    def sample(self, n: int, split: str = "train", seed: int = 0) -> list[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        # A string seed is hashed with SHA-512 by random.Random, so this is stable across processes.
        rng = random.Random(f"{self.name}|{self.difficulty}|{split}|{seed}")
        out: list[Example] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 1000 + 1000 * n:
                raise RuntimeError(f"{self.name}: could not draw {n} {split} problems; the problem space is too small")
            ex = self.generate(rng)
            if split_of(f"{self.name}|{self.key(ex)}", self.test_percent) == split:
                out.append(ex)
        return out

    def verify(self, completion: str, example: Example) -> bool:
        """True iff the last <answer>...</answer> block of the completion holds a right answer."""
        answer = rewards.extract_answer(completion)
        if answer is None:
            return False
        try:
            return bool(self.check(answer, example))
        except Exception:  # a checker bug must never crash training nor reward the policy
            return False

    def reward(self, completion: str, example: Example, **kwargs) -> float:
        """Combined rule-based reward (accuracy 1.0 + format 0.1 by default); kwargs go to rewards.score."""
        kwargs.setdefault("weights", self.weights)
        return rewards.score(completion, example, self.verify, **kwargs)["total"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(difficulty={self.difficulty})"


def load_jsonl(path, **kwargs) -> Task:
    """A task over user problems, one JSON object a line: {"prompt": ..., "answer": <number>}."""
    from .jsonl import JsonlTask

    return JsonlTask(path, **kwargs)


def get(name: str, difficulty: int | None = None, **kwargs) -> Task:
    """Look up a task: "arithmetic", "countdown" or "jsonl:PATH". kwargs go to the task's constructor."""
    from .arithmetic import ArithmeticTask
    from .countdown import CountdownTask

    if difficulty is not None:
        kwargs["difficulty"] = difficulty
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, got {type(name).__name__}")
    if name.startswith("jsonl:"):
        path = name[len("jsonl:"):]
        if not path:
            raise ValueError("jsonl task needs a path: 'jsonl:/path/to/problems.jsonl'")
        return load_jsonl(path, **kwargs)
    registry = {"arithmetic": ArithmeticTask, "countdown": CountdownTask}
    if name not in registry:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(registry)} or 'jsonl:PATH'")
    return registry[name](**kwargs)


__all__ = ["SYSTEM_PROMPT", "Example", "Task", "get", "load_jsonl", "split_of", "rewards"]

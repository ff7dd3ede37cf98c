"""User problems from a JSONL file, one JSON object a line:

    {"prompt": "How many legs do 3 spiders have?", "answer": 24}
    {"prompt": "Write 3/4 as a decimal.", "answer": "0.75", "split": "test"}

`answer` is a number or a numeric string; the model's final answer is compared as a number, so spellings of
the same value match: "1,000" = "1000" = "1e3", "3/4" = "0.75" = "\\frac{3}{4}" (see safe_math.parse_number).
An optional "split" ("train" or "test") pins a line to a split; other lines are split by a hash of the prompt.
Blank lines are skipped. Bad lines raise ValueError naming the file and line number.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import Example, Task, split_of
from .safe_math import parse_number


class JsonlTask(Task):
    """Numeric-answer problems loaded from a file. `difficulty` is accepted for a uniform API and ignored."""

    name = "jsonl"

    def __init__(self, path, difficulty: int = 1, **kwargs):
        super().__init__(difficulty=difficulty, **kwargs)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"jsonl task: no such file {str(self.path)!r}")
        self.splits: dict[str, list[Example]] = {"train": [], "test": []}
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    ex, split = self._parse_line(line, lineno)
                    self.splits[split].append(ex)
        if not self.splits["train"] and not self.splits["test"]:
            raise ValueError(f"{self.path}: no problems found (expected one JSON object a line)")

    def _parse_line(self, line: str, lineno: int) -> tuple[Example, str]:
        where = f"{self.path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg}); "
                             f"expected {{\"prompt\": ..., \"answer\": ...}}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        prompt, answer = obj.get("prompt"), obj.get("answer")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string")
        if answer is None:
            raise ValueError(f"{where}: missing 'answer'")
        value = parse_number(answer) if isinstance(answer, (int, float, str)) else None
        if value is None:
            raise ValueError(f"{where}: 'answer' must be a number or numeric string such as 42, '1,000', '3/4', "
                             f"'0.75' or '1e3'; got {answer!r}")
        split = obj.get("split")
        if split is None:
            split = split_of(f"{self.name}|{prompt}", self.test_percent)
        elif split not in ("train", "test"):
            raise ValueError(f"{where}: 'split' must be 'train' or 'test', got {split!r}")
        return Example(prompt=prompt, answer=answer, meta={"value": value, "line": lineno}), split

    def problems(self, split: str = "test") -> list[Example]:
        """Every problem of a split in file order (for evaluation over the whole set)."""
        if split not in self.splits:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return list(self.splits[split])

    def sample(self, n: int, split: str = "train", seed: int = 0) -> list[Example]:
        """n problems of the split: a seeded shuffle, without replacement until the split runs out, then again."""
        pool = self.problems(split)
        if not pool:
            raise ValueError(f"{self.path}: the {split!r} split is empty; add '\"split\": \"{split}\"' to some lines")
        rng = random.Random(f"{self.name}|{self.path.name}|{split}|{seed}")
        out: list[Example] = []
        while len(out) < n:
            order = pool[:]
            rng.shuffle(order)
            out.extend(order[: n - len(out)])
        return out

    def check(self, answer: str, example: Example) -> bool:
        value = parse_number(answer)
        return value is not None and value == example.meta["value"]

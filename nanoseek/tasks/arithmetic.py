"""Multi-digit integer arithmetic: "What is 47 + 8 * 13?" -> 151.

The simplest verifiable task: the answer is one integer, checked exactly. Difficulty grows the operands and
their count, one step at a time:

    difficulty  1  2  3  4  5  6 ...
    digits      1  2  2  3  3  4      (1 + difficulty // 2)
    operands    2  2  3  3  4  4      (2 + (difficulty - 1) // 2)

Operators are drawn from + - * and follow the usual precedence (* before + and -), left to right.
"""

from __future__ import annotations

import random

from . import Example, Task
from .safe_math import parse_number


def _value(operands: list[int], ops: list[str]) -> int:
    """Evaluate with precedence: fold '*' runs into terms, then add/subtract the terms left to right."""
    terms, signs = [operands[0]], [1]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= x
        else:
            terms.append(x)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


class ArithmeticTask(Task):
    """Integer expressions with + - *; the answer is the exact value (negative answers happen)."""

    name = "arithmetic"

    def __init__(self, difficulty: int = 1, digits: int | None = None, n_operands: int | None = None,
                 ops: str = "+-*", **kwargs):
        super().__init__(difficulty=difficulty, **kwargs)
        self.digits = 1 + difficulty // 2 if digits is None else digits
        self.n_operands = 2 + (difficulty - 1) // 2 if n_operands is None else n_operands
        if not 1 <= self.digits <= 18:
            raise ValueError(f"digits must be in 1..18, got {self.digits}")
        if not 2 <= self.n_operands <= 16:
            raise ValueError(f"n_operands must be in 2..16, got {self.n_operands}")
        if not ops or any(o not in "+-*" for o in ops):
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")
        self.ops = ops

    def generate(self, rng: random.Random) -> Example:
        lo = 0 if self.digits == 1 else 10 ** (self.digits - 1)  # exactly `digits` digits
        hi = 10**self.digits - 1
        operands = [rng.randint(lo, hi) for _ in range(self.n_operands)]
        ops = [rng.choice(self.ops) for _ in range(self.n_operands - 1)]
        expr = str(operands[0]) + "".join(f" {o} {x}" for o, x in zip(ops, operands[1:]))
        return Example(prompt=f"What is {expr}?", answer=_value(operands, ops), meta={"expression": expr})

    def key(self, example: Example) -> str:
        return example.meta["expression"]

    def check(self, answer: str, example: Example) -> bool:
        value = parse_number(answer)
        return value is not None and value == example.answer

"""Countdown: combine the given numbers with + - * / to reach a target (the TinyZero R1-Zero task).

Rule (TinyZero's): every given number is used EXACTLY once, each occurrence counting separately when a number
repeats; parentheses are free. `use_all=False` relaxes this to "at most once" (a subset may be used). Division
is exact rational division (fractions.Fraction), so answers may pass through fractions such as 3/4 on the
way; dividing by zero makes the answer wrong.

The generator guarantees solvable instances: it draws the numbers, combines all of them in a random order
with random operators (keeping every intermediate result a positive integer) and takes the result as the
target, keeping that expression as the reference solution (`example.meta["solution"]`).

    difficulty  1  2  3  4
    numbers     3  4  5  6      (2 + difficulty), each in 1..max_number (99), target in 1..max_target (100)

An answer may be written as the bare expression or as "expression = target".
"""

from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction

from . import Example, Task
from .safe_math import evaluate_with_literals, parse_number


class CountdownTask(Task):
    name = "countdown"

    def __init__(self, difficulty: int = 1, n_numbers: int | None = None, max_number: int = 99,
                 max_target: int = 100, use_all: bool = True, **kwargs):
        super().__init__(difficulty=difficulty, **kwargs)
        self.n_numbers = 2 + difficulty if n_numbers is None else n_numbers
        if not 2 <= self.n_numbers <= 8:
            raise ValueError(f"n_numbers must be in 2..8, got {self.n_numbers}")
        if not 1 <= max_number <= 10_000 or not 1 <= max_target <= 1_000_000:
            raise ValueError(f"need 1 <= max_number <= 10000 and 1 <= max_target <= 1e6, "
                             f"got {max_number}, {max_target}")
        self.max_number, self.max_target, self.use_all = max_number, max_target, use_all

    def _combine(self, rng: random.Random, numbers: list[int]) -> tuple[int, str] | None:
        """Fold all numbers into one expression with random ops; None if an op had no valid integer result."""
        items = [(x, str(x)) for x in numbers]
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            (a, ea), (b, eb) = items[i], items[j]
            items = [it for k, it in enumerate(items) if k not in (i, j)]
            for op in rng.sample("+-*/", 4):  # first op (in random order) that keeps a positive integer
                if op == "-" and a < b:
                    (a, ea), (b, eb) = (b, eb), (a, ea)
                if op == "/" and a % b != 0:
                    (a, ea), (b, eb) = (b, eb), (a, ea)
                value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if a % b == 0 else 0}[op]
                if value > 0:
                    items.append((value, f"({ea} {op} {eb})"))
                    break
            else:
                return None
        value, expr = items[0]
        return value, expr[1:-1] if expr.startswith("(") else expr

    def generate(self, rng: random.Random) -> Example:
        while True:  # acceptance is high (tens of percent); the loop ends quickly
            numbers = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            out = self._combine(rng, numbers)
            if out is not None and 1 <= out[0] <= self.max_target:
                break
        target, solution = out
        shown = sorted(numbers, key=lambda _: rng.random())  # shuffled, so the order gives nothing away
        rule = "each number must be used exactly once" if self.use_all else "each number can be used at most once"
        prompt = (f"Using the numbers {shown}, create an equation that equals {target}. "
                  f"You can use basic arithmetic operations (+, -, *, /) and {rule}.")
        return Example(prompt=prompt, answer=target, meta={"numbers": shown, "target": target, "solution": solution})

    def key(self, example: Example) -> str:
        return f"{sorted(example.meta['numbers'])}->{example.meta['target']}"

    def check(self, answer: str, example: Example) -> bool:
        if answer.count("=") > 1:
            return False
        expr, sep, rhs = answer.partition("=")
        if sep and parse_number(rhs) != example.meta["target"]:
            return False
        out = evaluate_with_literals(expr)
        if out is None:
            return False
        value, literals = out
        if value != Fraction(example.meta["target"]):
            return False
        used, given = Counter(literals), Counter(Fraction(x) for x in example.meta["numbers"])
        if self.use_all:
            return used == given
        return all(used[x] <= given[x] for x in used)

"""The R1-Zero miniature's curriculum (benchmarks/r1zero.py, `nanoseek demo`): what the base model is pretrained on.

HARD problems are sums of one-digit numbers ("What is 6 + 3 + 2 + 5?", the `arithmetic` task with + only). The
pretraining corpus holds EASY single additions "a + b" worked in one step, and HARD sums from the train split,
half worked as a chain of easy steps ("6 + 3 = 9, 9 + 2 = 11, 11 + 5 = 16") and half answered in one step. The
base model then knows the format and the easy case but chains on held-out HARD sums only part of the time; a
chained answer is right far more often than a one-step guess, so rule rewards alone can teach it to reason
(DeepSeek-R1 section 2.2). docs/reasoning.md tells the story.
"""

from __future__ import annotations

import json
import random

from nanoseek.io_utils import atomic_write_text
from nanoseek.tokenizer import EOS, render_chat

from . import SYSTEM_PROMPT, Example
from .arithmetic import ArithmeticTask


def hard_task(n_operands: int = 4) -> ArithmeticTask:
    """Sums of `n_operands` one-digit numbers."""
    return ArithmeticTask(digits=1, n_operands=n_operands, ops="+")


def easy_examples(n: int, seed: int, a_max: int = 27) -> list[Example]:
    """EASY problems: one addition "a + b" with a in 0..a_max and b in 0..9, exactly the single steps a chained
    HARD sum needs (a one-digit sum, then a running total plus one digit). Two operands, so never a HARD problem."""
    rng = random.Random(f"r1zero-easy|{seed}")
    out = []
    for _ in range(n):
        a, b = rng.randint(0, a_max), rng.randint(0, 9)
        expr = f"{a} + {b}"
        out.append(Example(prompt=f"What is {expr}?", answer=a + b, meta={"expression": expr}))
    return out


def worked_completion(expression: str) -> str:
    """The trace a careful solver writes: one running-sum step per '+', then the answer."""
    nums = [int(x) for x in expression.split(" + ")]
    steps, total = [], nums[0]
    for x in nums[1:]:
        steps.append(f"{total} + {x} = {total + x}")
        total += x
    return f"<think> {', '.join(steps)} </think> <answer> {total} </answer>"


def direct_completion(expression: str) -> str:
    """The terse answer most text shows: the whole sum in one step, no intermediate results."""
    total = sum(int(x) for x in expression.split(" + "))
    return f"<think> {expression} = {total} </think> <answer> {total} </answer>"


def conversation(ex: Example, worked: bool = True) -> list[dict]:
    """The R1 chat (system prompt, question, answer) of one example, worked or answered in one step."""
    completion = (worked_completion if worked else direct_completion)(ex.meta["expression"])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": completion}]


def corpus_examples(easy_docs: int, hard_docs: int, direct_docs: int,
                    n_operands: int = 4) -> tuple[list[Example], list[Example]]:
    """The pretraining corpus' EASY problems and its HARD ones (train split; worked first, then one-step)."""
    easy = easy_examples(easy_docs, seed=1, a_max=9 * (n_operands - 1))
    return easy, hard_task(n_operands).sample(hard_docs + direct_docs, "train", seed=2)


def write_corpus(path: str, easy_docs: int, hard_docs: int, direct_docs: int, n_operands: int = 4) -> None:
    """The pretraining corpus as JSONL ({"text"} per line, chat-formatted): easy sums, HARD train-split sums
    worked (hard_docs) and answered in one step (direct_docs), shuffled."""
    easy, hard = corpus_examples(easy_docs, hard_docs, direct_docs, n_operands)
    docs = [conversation(ex) for ex in easy]
    docs += [conversation(ex) for ex in hard[:hard_docs]]
    docs += [conversation(ex, worked=False) for ex in hard[hard_docs:]]
    random.Random(0).shuffle(docs)
    # `data prepare` appends EOS after each document, so drop the template's own
    atomic_write_text(path, "".join(json.dumps({"text": render_chat(m)[: -len(EOS)]}) + "\n" for m in docs))

"""Rule-based rewards for R1-style RL (DeepSeek-R1, section 2.2.2; DAPO section 3.4).

R1-Zero uses only rewards a program can check, never a neural reward model (which the policy learns to hack):

- accuracy: is the final answer right? The task's verifier decides (`Task.verify`).
- format: is the reasoning inside <think> ... </think>, followed by the answer inside <answer> ... </answer>?

Optional shaping, off by default:

- overlong penalty (DAPO "soft overlong punishment"): 0 up to L_max - L_cache, then linear down to -1 at L_max,
  -1 beyond. Lengths are whatever unit the caller counts (tokens in training, characters in a pinch).
- length bonus: a small reward growing with length up to a target; it is easy to hack (pad the reasoning), so
  its default weight is 0 and it exists for ablations only.

Default weights: accuracy 1.0, format 0.1. Why 0.1: a well-formatted wrong answer (0.1) must be worth far less
than a right one (1.0 or 1.1), so the policy cannot settle for format alone; yet early in RL from a base model
nearly every answer is wrong, all-zero accuracy groups give zero advantage and no gradient (docs/grpo.md), and
the small format term is what still separates completions in those groups and teaches the tags first.

Everything here is linear in the length of the completion (str.find, no backtracking regex), never raises on a
str, and never executes the text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
MAX_ANSWER_CHARS = 1_000  # an answer longer than this is not a final answer; the verifier never sees it


def extract_answer(text: str) -> str | None:
    """The content of the LAST complete <answer>...</answer> block, stripped; None if there is none.

    Last wins because a model that reasons aloud may quote the tag ("I will put it in <answer>...") before
    committing to its final answer, and the final commitment comes last. Contents longer than
    MAX_ANSWER_CHARS give None.
    """
    if not isinstance(text, str):
        return None
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    content = text[start + len(ANSWER_OPEN):end]
    if len(content) > MAX_ANSWER_CHARS:
        return None
    return content.strip()


def format_ok(text: str, think_prefilled: bool = False) -> bool:
    """True iff the completion is exactly `<think> R </think> <answer> A </answer>` (whitespace allowed around).

    Each tag appears once, in that order, only whitespace between </think> and <answer>, nothing after
    </answer>, and both R and A non-empty. With think_prefilled=True the chat template already ended the prompt
    with "<think>" (as R1's template does), so the completion starts with the reasoning itself.
    """
    if not isinstance(text, str):
        return False
    s = text.strip()
    if think_prefilled:
        s = THINK_OPEN + s
    tags = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
    if any(s.count(t) != 1 for t in tags):
        return False
    if not (s.startswith(THINK_OPEN) and s.endswith(ANSWER_CLOSE)):
        return False
    t_close, a_open = s.find(THINK_CLOSE), s.find(ANSWER_OPEN)
    if not (len(THINK_OPEN) <= t_close < a_open):
        return False
    reasoning = s[len(THINK_OPEN):t_close]
    between = s[t_close + len(THINK_CLOSE):a_open]
    answer = s[a_open + len(ANSWER_OPEN):-len(ANSWER_CLOSE)]
    return bool(reasoning.strip()) and between.strip() == "" and bool(answer.strip())


def format_reward(text: str, think_prefilled: bool = False) -> float:
    """1.0 if `format_ok`, else 0.0 (binary, as in R1-Zero: partial credit invites tag spamming)."""
    return 1.0 if format_ok(text, think_prefilled) else 0.0


def accuracy_reward(text: str, example, verify: Callable[[str, object], bool]) -> float:
    """1.0 if the task's verifier accepts the completion, else 0.0. A verifier that raises counts as wrong."""
    try:
        return 1.0 if verify(text, example) else 0.0
    except Exception:  # verifiers should never raise; if one does, the policy must not profit from it
        return 0.0


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO soft overlong punishment (DAPO eq. 13), in [-1, 0].

        R(y) = 0                                     if |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
             = -1                                    if |y| > L_max
    """
    if cache_len < 0 or max_len <= 0 or cache_len > max_len:
        raise ValueError(f"need 0 <= cache_len <= max_len and max_len > 0, "
                         f"got max_len={max_len}, cache_len={cache_len}")
    start = max_len - cache_len
    if length <= start:
        return 0.0
    if length > max_len:
        return -1.0
    return (start - length) / cache_len


def length_bonus(length: int, target_len: int) -> float:
    """min(length / target_len, 1): a reward for thinking longer, capped. Hackable; for ablations only."""
    if target_len <= 0:
        raise ValueError(f"target_len must be positive, got {target_len}")
    return min(max(length, 0) / target_len, 1.0)


@dataclass(frozen=True)
class RewardWeights:
    """Weights of `combine`. Defaults: accuracy 1.0, format 0.1 (see module docstring), shaping off."""

    accuracy: float = 1.0
    format: float = 0.1
    overlong: float = 1.0  # only matters when an overlong value is computed (max_len given)
    length: float = 0.0


DEFAULT_WEIGHTS = RewardWeights()


def combine(accuracy: float, format: float, overlong: float = 0.0, length: float = 0.0,
            weights: RewardWeights = DEFAULT_WEIGHTS) -> float:
    """Weighted sum of the reward components: w_acc*acc + w_fmt*fmt + w_over*over + w_len*len."""
    return (weights.accuracy * accuracy + weights.format * format
            + weights.overlong * overlong + weights.length * length)


def score(text: str, example, verify: Callable[[str, object], bool], *, length: int | None = None,
          max_len: int | None = None, cache_len: int = 0, target_len: int | None = None,
          think_prefilled: bool = False, weights: RewardWeights = DEFAULT_WEIGHTS) -> dict[str, float]:
    """All reward components of one completion plus their weighted `total`, for training and logging.

    `length` (tokens, or characters if the caller has no tokenizer) defaults to len(text); the overlong penalty
    is computed only when max_len is given, the length bonus only when target_len is given.
    """
    n = (len(text) if isinstance(text, str) else 0) if length is None else length
    parts = {
        "accuracy": accuracy_reward(text, example, verify),
        "format": format_reward(text, think_prefilled),
        "overlong": overlong_penalty(n, max_len, cache_len) if max_len is not None else 0.0,
        "length": length_bonus(n, target_len) if target_len is not None else 0.0,
    }
    parts["total"] = combine(parts["accuracy"], parts["format"], parts["overlong"], parts["length"], weights)
    return parts

"""`nanoseek eval`: pass@1, pass@k and maj@k of a checkpoint on a task's held-out split (DeepSeek-R1, section 3).

R1 evaluates with sampling, not greedy decoding: temperature 0.6, top-p 0.95, k samples per question, and reports
pass@1 averaged over the k samples (greedy decoding is repetitive and its score has high variance). It also reports
majority voting ("cons@64" in R1; maj@k here): the answer given most often among the k samples.

Metric definitions (for one problem with k samples, c of them right):
    pass@1  = c / k                                     (averaged over problems)
    pass@j  = 1 - C(k - c, j) / C(k, j) for j <= k      (the unbiased estimator of Chen et al. 2021, "Codex":
              the chance that at least one of j samples drawn without replacement from the k is right; for
              j = k it is the plain "any sample right")
    maj@j   = is the majority answer of the FIRST j samples right? Only samples with an extracted
              <answer> vote; among tied answers the one seen first wins (Counter order); no answer at all
              counts as wrong. Answers vote as their stripped text, so "12" and "12.0" are different votes.
    mean_length = mean completion length in tokens (EOS included when the model stopped), over all samples.

This module also owns the pieces GRPO shares with evaluation: the R1 prompt (chat template with SYSTEM_PROMPT
and the generation prompt, optionally prefilled with "<think>") and batched sampling through the Engine.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

from nanoseek.engine import Engine, SamplingParams
from nanoseek.plot import pyplot, save_figure
from nanoseek.tasks import SYSTEM_PROMPT, rewards


# ---------------------------------------------------------------------------------------------- prompts + sampling
def prompt_ids(tokenizer, question: str, prefill_think: bool = False, system: str | None = SYSTEM_PROMPT) -> list[int]:
    """Token ids of the R1 prompt: [system,] user question, then the assistant generation prompt. R1's own
    template ends the prompt with "<think>" (prefill_think) so the model starts reasoning at once."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    return ids + [tokenizer.token_id(rewards.THINK_OPEN)] if prefill_think else ids


def generate_batched(model, prompts: list[list[int]], params: SamplingParams, batch_size: int = 64,
                     kv_cache_dtype: str | None = None, progress=None) -> list[list[int]]:
    """Engine.generate over any number of prompts, `batch_size` rows at a time (one KV cache for all chunks).
    Chunk i samples with seed params.seed + i, so the result depends only on (prompts, params, batch_size)."""
    if not prompts:
        return []
    batch_size = min(batch_size, len(prompts))
    # no compiled step for batches: it serves batch-1 decoding, and here only a chunk's last row ever decodes
    # alone; compiling it (seconds, once per engine) costs more than it saves
    engine = Engine(model, max_batch_size=batch_size, max_seq_len=max(map(len, prompts)) + params.max_new_tokens,
                    kv_cache_dtype=kv_cache_dtype, compile=None if batch_size == 1 else False)
    out: list[list[int]] = []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        chunk_params = dataclasses.replace(params, seed=None if params.seed is None else params.seed + i)
        out += engine.generate(prompts[start: start + batch_size], chunk_params)
        if progress is not None:
            progress.update(min(batch_size, len(prompts) - start))
    return out


def completion_text(tokenizer, tokens: list[int]) -> str:
    """What the verifier sees: the completion's text without EOS / role tokens (reasoning tags stay)."""
    return tokenizer.decode(tokens, skip_special=True)


# ---------------------------------------------------------------------------------------------- metrics
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c right (Chen et al. 2021): 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """maj@k for one problem (see the module docstring): `answers[i]` is sample i's extracted answer or None,
    `correct[i]` whether sample i was verified right."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    winner = votes.most_common(1)[0][0]  # most_common keeps first-insertion order among equal counts
    return correct[answers.index(winner)]


@dataclass
class ProblemResult:
    answers: list  # extracted answer per sample (None: no <answer> block)
    correct: list  # bool per sample
    lengths: list  # completion tokens per sample
    formats: list  # bool per sample (rewards.format_ok)


def summarize(results: list[ProblemResult], ks: list[int] | None = None) -> dict:
    """Aggregate per-problem results into pass@1, pass@K, maj@K (K = samples per problem) and the curve over ks."""
    if not results:
        raise ValueError("no problems to summarize")
    K = len(results[0].correct)
    if any(len(r.correct) != K for r in results):
        raise ValueError("every problem needs the same number of samples")
    ks = sorted({k for k in (ks or _powers_of_two(K)) if 1 <= k <= K} | {1, K})
    curve = {}
    for k in ks:
        curve[str(k)] = {
            "pass@k": sum(pass_at_k(K, sum(r.correct), k) for r in results) / len(results),
            "maj@k": sum(majority_correct(r.answers[:k], r.correct[:k]) for r in results) / len(results),
        }
    lengths = [x for r in results for x in r.lengths]
    return {
        "pass@1": curve["1"]["pass@k"],
        "pass@k": curve[str(K)]["pass@k"],
        "maj@k": curve[str(K)]["maj@k"],
        "k": K,
        "n": len(results),
        "mean_length": sum(lengths) / len(lengths),
        "format_rate": sum(x for r in results for x in r.formats) / len(lengths),
        "answered_rate": sum(a is not None for r in results for a in r.answers) / len(lengths),
        "curve": curve,
    }


def _powers_of_two(k: int) -> list[int]:
    return [2**i for i in range(int(math.log2(k)) + 1)] if k >= 1 else [1]


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalConfig:
    n: int = 100  # held-out problems
    samples: int = 1  # k samples per problem
    temperature: float = 0.6  # R1's evaluation setting
    top_p: float = 0.95
    max_new_tokens: int = 256
    prefill_think: bool = False
    batch_size: int = 64
    seed: int = 0
    split: str = "test"


def evaluate(model, tokenizer, task, ec: EvalConfig | None = None, progress: bool = False) -> dict:
    """Sample ec.samples completions for each of ec.n problems of the split and score them (see module docstring)."""
    ec = ec or EvalConfig()
    examples = task.sample(ec.n, split=ec.split, seed=ec.seed)
    prompts = [prompt_ids(tokenizer, ex.prompt, ec.prefill_think) for ex in examples for _ in range(ec.samples)]
    params = SamplingParams(ec.max_new_tokens, temperature=ec.temperature, top_p=ec.top_p,
                            stop_token_ids=(tokenizer.eos_id,), seed=ec.seed)
    t0 = time.perf_counter()
    with tqdm(total=len(prompts), disable=not progress, desc="eval", dynamic_ncols=True) as bar:
        completions = generate_batched(model, prompts, params, ec.batch_size, progress=bar)
    seconds = time.perf_counter() - t0
    results = []
    for i, ex in enumerate(examples):
        toks = completions[i * ec.samples: (i + 1) * ec.samples]
        texts = [completion_text(tokenizer, t) for t in toks]
        results.append(ProblemResult(
            answers=[rewards.extract_answer(t) for t in texts],
            correct=[task.verify(t, ex) for t in texts],
            lengths=[len(t) for t in toks],
            formats=[rewards.format_ok(t, ec.prefill_think) for t in texts],
        ))
    out = summarize(results)
    out["seconds"] = seconds
    out["example"] = {"prompt": examples[0].prompt, "completion": completion_text(tokenizer, completions[0])}
    return out


def plot_curve(summary: dict, path: str, title: str = "") -> str:
    """Accuracy vs number of samples k (test-time compute): pass@k and maj@k."""
    plt = pyplot()
    ks = sorted(int(k) for k in summary["curve"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, [summary["curve"][str(k)]["pass@k"] for k in ks], "o-", label="pass@k")
    ax.plot(ks, [summary["curve"][str(k)]["maj@k"] for k in ks], "s-", label="maj@k")
    ax.set_xscale("log", base=2), ax.set_xlabel("samples k"), ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1), ax.grid(alpha=0.3), ax.legend()
    if title:
        ax.set_title(title)
    return save_figure(fig, path)

"""Distillation: reasoning traces by rejection sampling, and on-policy distillation into a smaller student.

DeepSeek-R1 (arXiv 2501.12948) sections 2.3.3 and 2.4: ~600k reasoning samples by rejection sampling from the RL
checkpoint (several samples per prompt, only correct ones kept, chains of thought with mixed languages, long
paragraphs or code blocks dropped) plus ~200k non-reasoning samples, then plain SFT of small dense students on
those 800k; section 4.1 / Table 6: distilling beats large-scale RL on the same small base. Later work trains the
student on its own samples with the teacher scoring every token (on-policy distillation: GKD, arXiv 2306.13649;
Qwen3 technical report, arXiv 2505.09388, section 4.5).

`generate_traces` (`nanoseek distill generate`):
    sample K completions per train prompt from the teacher through the Engine (batched), then filter, in order:
        eos         an EOS was reached (not cut at max_new_tokens)
        format      exactly `<think> R </think> <answer> A </answer>` (nanoseek.tasks.rewards.format_ok)
        length      at most --max-trace-tokens tokens
        language    no character outside the task's alphabet (R1's mixed-language filter, in miniature)
        repetition  no repeated line and no clause repeated more than 3 times (R1's readability filter)
        correct     the task's verifier accepts the answer (R1's rule checks)
        duplicate   the same completion for the same prompt is kept once
        per_prompt  at most --max-per-prompt traces per prompt
    Every sample is counted in a yield table (sampled -> remaining after each filter). Output: the JSONL
    `nanoseek sft` reads; --general-frac mixes in non-reasoning conversations from --general (R1's 600k:200k is
    a general fraction of 0.25). Resume: lines are appended and fsynced chunk by chunk, and OUT.progress.json
    (written atomically after each chunk) records how many are final; a rerun with the same arguments drops any
    line past that count (a chunk cut by a crash) and continues with the next prompt.

`train_onpolicy` (`nanoseek distill onpolicy`): each step the student samples (GRPO's rollout, the same code),
    the frozen teacher scores every sampled token in one forward, and the loss is the per-token divergence
    (nanoseek.train.distill_loss): exact over the vocabulary, or the sampled reverse-KL estimator. With
    --lmbda < 1 a step's batch is sampled from the teacher instead with probability 1 - lmbda (GKD's mix of
    on-policy and teacher data; TRL's convention: lmbda is the student-data fraction). Run, resume, metrics and
    plots as every nanoseek training command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import string
import time
from dataclasses import dataclass

import torch

from nanoseek import tasks
from nanoseek.engine import SamplingParams
from nanoseek.eval import completion_text, generate_batched, prompt_ids
from nanoseek.io_utils import atomic_write_text
from nanoseek.model import Transformer
from nanoseek.plot import plot_series
from nanoseek.tasks import SYSTEM_PROMPT, rewards
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train import grpo
from nanoseek.train.distill_loss import KL_MODES, exact_loss, masked_mean, sampled_reverse_kl, token_divergence
from nanoseek.train.loop import Run, lr_at, make_optimizer
from nanoseek.train.sft import load_conversations
from nanoseek.train.teacher import check_same_tokenizer

FILTERS = ("eos", "format", "length", "language", "repetition", "correct", "duplicate", "per_prompt")
# Characters a worked answer of the number tasks may use outside the tags: digits, operators, punctuation, space.
NUMERIC_ALPHABET = string.digits + " \n+-*/=(),.:"
TASK_ALPHABETS = {"arithmetic": NUMERIC_ALPHABET, "countdown": NUMERIC_ALPHABET}
MAX_CLAUSE_REPEATS = 3


# ---------------------------------------------------------------------------------------------- filters
def task_alphabet(task, override: str | None = None) -> str | None:
    """The characters a trace may use outside its tags: --alphabet, the task's own `alphabet`, a default for
    the number tasks, else None (printable ASCII)."""
    if override:
        return override
    return getattr(task, "alphabet", None) or TASK_ALPHABETS.get(task.name)


def strip_tags(text: str) -> str:
    for tag in (rewards.THINK_OPEN, rewards.THINK_CLOSE, rewards.ANSWER_OPEN, rewards.ANSWER_CLOSE):
        text = text.replace(tag, " ")
    return text


def language_ok(text: str, alphabet: str | None) -> bool:
    """No character outside the alphabet (tags excepted); without one, printable ASCII only."""
    allowed = set(alphabet) if alphabet else set(string.printable)
    return all(ch in allowed for ch in strip_tags(text))


def repetition_ok(text: str, max_clause_repeats: int = MAX_CLAUSE_REPEATS) -> bool:
    """False if a non-empty line occurs twice, or a clause (split on , ; . and newlines) more than
    max_clause_repeats times in the reasoning (inside <think> </think> when present): the loops a sampled chain
    of thought falls into."""
    start, end = text.find(rewards.THINK_OPEN), text.find(rewards.THINK_CLOSE)
    if 0 <= start < end:
        text = text[start + len(rewards.THINK_OPEN): end]
    text = strip_tags(text)
    lines = [x.strip() for x in text.split("\n") if x.strip()]
    if len(lines) != len(set(lines)):
        return False
    clauses = [c.strip() for c in text.replace(";", ",").replace(".", ",").replace("\n", ",").split(",")]
    counts: dict[str, int] = {}
    for c in clauses:
        if c:
            counts[c] = counts.get(c, 0) + 1
    return all(n <= max_clause_repeats for n in counts.values())


def reject_reason(text: str, n_tokens: int, reached_eos: bool, example, task, *, prefill_think: bool = False,
                  max_tokens: int | None = None, alphabet: str | None = None) -> str | None:
    """The first per-sample filter (FILTERS order) that rejects the trace, or None if it passes them all."""
    if not reached_eos:
        return "eos"
    if not rewards.format_ok(text, prefill_think):
        return "format"
    if max_tokens is not None and n_tokens > max_tokens:
        return "length"
    if not language_ok(text, alphabet):
        return "language"
    if not repetition_ok(text):
        return "repetition"
    if not task.verify(text, example):
        return "correct"
    return None


def yield_table(counts: dict) -> list[dict]:
    """[{"filter", "dropped", "remaining"}], starting with "sampled": the samples that reach each filter minus
    those it drops, so the last `remaining` is the number kept and sampled = kept + sum(dropped)."""
    remaining = counts.get("sampled", 0)
    rows = [{"filter": "sampled", "dropped": 0, "remaining": remaining}]
    for f in FILTERS:
        remaining -= counts.get(f, 0)
        rows.append({"filter": f, "dropped": counts.get(f, 0), "remaining": remaining})
    return rows


def format_yield(rows: list[dict]) -> str:
    lines = [f"{'filter':<12}{'dropped':>9}{'remaining':>11}"]
    for r in rows:
        lines.append(f"{r['filter']:<12}{r['dropped'] if r['filter'] != 'sampled' else '':>9}{r['remaining']:>11}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- generate
@dataclass
class GenerateConfig:
    teacher: str = ""  # checkpoint directory with tokenizer.json
    task: str = "arithmetic"
    difficulty: int | None = None
    out: str = "traces.jsonl"
    num_prompts: int = 256  # train-split prompts
    num_generations: int = 4  # K samples per prompt
    temperature: float = 0.6  # R1's sampling setting
    top_p: float = 0.95
    max_new_tokens: int = 128
    max_trace_tokens: int | None = None  # the length cap (tokens); None: only the EOS filter bounds length
    max_per_prompt: int | None = None
    alphabet: str | None = None  # allowed characters outside the tags; default from the task
    general: str = ""  # JSONL of non-reasoning conversations to mix in
    general_frac: float = 0.0  # their share of the output (R1: 200k of 800k = 0.25)
    prefill_think: bool = False
    unfiltered: bool = False  # keep every sample (the ablation that shows what the filters buy)
    all_out: str = ""  # also write every sample, unfiltered, here
    batch_prompts: int = 32  # prompts per engine batch (and per resume chunk)
    seed: int = 0

    def validate(self) -> None:
        if not self.teacher:
            raise ValueError("--teacher is required: a checkpoint directory with config.json and tokenizer.json")
        if self.num_prompts < 1 or self.num_generations < 1 or self.max_new_tokens < 1 or self.batch_prompts < 1:
            raise ValueError("--num-prompts, --num-generations, --max-new-tokens and --batch-prompts must be >= 1")
        if self.max_per_prompt is not None and self.max_per_prompt < 1:
            raise ValueError(f"--max-per-prompt must be >= 1, got {self.max_per_prompt}")
        if not 0.0 <= self.general_frac < 1.0:
            raise ValueError(f"--general-frac must be in [0, 1), got {self.general_frac}")
        if self.general_frac > 0 and not self.general:
            raise ValueError("--general-frac needs --general FILE: a JSONL of non-reasoning conversations")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("--temperature must be > 0 and --top-p in (0, 1]")


def _fingerprint(gc: GenerateConfig, task) -> dict:
    """Everything that decides which lines are written, except num_prompts (a rerun may extend the run)."""
    d = dataclasses.asdict(gc)
    for k in ("out", "num_prompts", "all_out"):
        d.pop(k)
    d["teacher"] = os.path.abspath(gc.teacher)
    d["task"] = f"{task.name}:{json.dumps(dict(sorted(vars(task).items())), default=repr)}"  # and its settings
    return d


def _keep_lines(path: str, n: int) -> list[str]:
    """The first n complete lines of path; anything past them (a chunk a crash cut) is dropped from the file."""
    lines = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.endswith("\n")]
    if len(lines) < n:
        raise ValueError(f"{path} has {len(lines)} lines but its progress file records {n}: it was edited or "
                         "truncated; delete it and its .progress.json to start over")
    if len(lines) > n or (os.path.exists(path) and os.path.getsize(path) != sum(len(x.encode()) for x in lines)):
        atomic_write_text(path, "".join(lines[:n]))
    return lines[:n]


def _append(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def _general_rows(path: str, n: int, seed: int) -> list[dict]:
    convs = load_conversations(path)
    order = random.Random(f"general|{seed}").sample(range(len(convs)), len(convs))
    return [{"messages": convs[i], "task": "general", "general_index": i} for i in order[:n]]


def _resume_state(gc: GenerateConfig, task, progress_path: str) -> dict:
    """The progress of an earlier run with the same arguments (to continue), or a fresh one."""
    fp = _fingerprint(gc, task)
    if not os.path.exists(progress_path):
        if os.path.exists(gc.out):
            raise ValueError(f"{gc.out} exists but has no {os.path.basename(progress_path)}: it was not written by "
                             "`nanoseek distill generate`; pick another --out or delete it")
        return {"fingerprint": fp, "prompts_done": 0, "lines": 0, "all_lines": 0, "general_done": False,
                "counts": {"sampled": 0, **{f: 0 for f in FILTERS}}, "generated_tokens": 0, "kept_tokens": 0}
    with open(progress_path) as f:
        state = json.load(f)
    if state["fingerprint"] != fp:
        changed = sorted(k for k in fp if state["fingerprint"].get(k) != fp[k])
        raise ValueError(f"{gc.out} was generated with other arguments ({', '.join(changed)} differ); rerun "
                         "with the same ones to continue, or pick another --out")
    if state["general_done"] and gc.num_prompts > state["prompts_done"]:
        raise ValueError(f"{gc.out} is complete (general samples already appended after "
                         f"{state['prompts_done']} prompts); write more prompts to another --out")
    return state


def _sample_chunk(teacher, tokenizer, task, gc: GenerateConfig, chunk: list, start: int, seen: set,
                  state: dict) -> tuple[list[dict], list[dict]]:
    """K samples for each prompt of one chunk (one engine batch), judged in FILTERS order: (kept rows, every
    row). The yield counts and token totals accumulate in `state`, kept (prompt, completion) pairs in `seen`."""
    K, eos, counts = gc.num_generations, tokenizer.eos_id, state["counts"]
    prompts = [prompt_ids(tokenizer, ex.prompt, gc.prefill_think) for ex in chunk for _ in range(K)]
    params = SamplingParams(gc.max_new_tokens, temperature=gc.temperature, top_p=gc.top_p, stop_token_ids=(eos,),
                            seed=(gc.seed * 1_000_003 + start) % 2**62)
    completions = generate_batched(teacher, prompts, params, batch_size=len(prompts))
    alphabet = task_alphabet(task, gc.alphabet)
    kept, everything = [], []
    for p, ex in enumerate(chunk):
        n_kept = 0
        for j, toks in enumerate(completions[p * K: (p + 1) * K]):
            text = completion_text(tokenizer, toks)
            content = (rewards.THINK_OPEN + text if gc.prefill_think else text).strip()
            counts["sampled"] += 1
            state["generated_tokens"] += len(toks)
            row = {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                {"role": "user", "content": ex.prompt},
                                {"role": "assistant", "content": content}],
                   "task": task.name, "answer": str(ex.answer), "teacher": gc.teacher,
                   "prompt_index": start + p, "sample_index": j}
            everything.append(row)
            reason = None
            if not gc.unfiltered:
                reason = reject_reason(text, len(toks), bool(toks) and toks[-1] == eos, ex, task,
                                       prefill_think=gc.prefill_think, max_tokens=gc.max_trace_tokens,
                                       alphabet=alphabet)
                if reason is None and (ex.prompt, content) in seen:
                    reason = "duplicate"
                if reason is None and gc.max_per_prompt is not None and n_kept >= gc.max_per_prompt:
                    reason = "per_prompt"
            if reason is not None:
                counts[reason] += 1
                continue
            seen.add((ex.prompt, content))
            n_kept += 1
            kept.append(row)
            state["kept_tokens"] += len(toks)
    return kept, everything


def _nothing_survived(gc: GenerateConfig, progress_path: str, table: list[dict]) -> ValueError:
    """Remove the (empty) output and its progress file; the error that says which filter emptied the run."""
    for path in (gc.out, progress_path):
        if os.path.exists(path):
            os.remove(path)
    last = next((r["filter"] for r in table[1:] if r["remaining"] == 0), "?")
    steps = ", ".join(f"{r['filter']} {r['remaining']}" for r in table)
    return ValueError(f"no trace survived the filters: the {last!r} filter dropped every remaining sample "
                      f"(yield: {steps}). Use a stronger --teacher, more --num-generations or --max-new-tokens, "
                      "or loosen that filter; nothing was written")


def generate_traces(gc: GenerateConfig, task=None, progress: bool = True) -> dict:
    """Rejection-sample reasoning traces from gc.teacher into gc.out (see the module docstring); resumable.
    Returns a summary with the yield table. Raises ValueError if no trace survives the filters."""
    from tqdm import tqdm

    gc.validate()
    task = task if task is not None else tasks.get(gc.task, difficulty=gc.difficulty)
    tokenizer = load_tokenizer(gc.teacher)
    progress_path = gc.out + ".progress.json"
    state = _resume_state(gc, task, progress_path)
    lines = _keep_lines(gc.out, state["lines"])
    if gc.all_out:
        _keep_lines(gc.all_out, state["all_lines"])
    seen = set()
    for line in lines:  # the duplicate filter spans the whole run, resumes included
        row = json.loads(line)
        if row.get("task") != "general":
            seen.add((row["messages"][-2]["content"], row["messages"][-1]["content"]))

    teacher = Transformer.from_pretrained(gc.teacher, dtype=torch.float32).eval()
    examples = task.sample(gc.num_prompts, split="train", seed=gc.seed)
    bar = tqdm(total=gc.num_prompts, initial=state["prompts_done"], desc="distill generate", dynamic_ncols=True,
               disable=not progress)
    t0 = time.perf_counter()
    try:
        for start in range(state["prompts_done"], gc.num_prompts, gc.batch_prompts):
            chunk = examples[start: start + gc.batch_prompts]
            kept, everything = _sample_chunk(teacher, tokenizer, task, gc, chunk, start, seen, state)
            _append(gc.out, kept)
            if gc.all_out:
                _append(gc.all_out, everything)
            state["lines"] += len(kept)
            state["all_lines"] += len(everything)
            state["prompts_done"] = min(start + gc.batch_prompts, gc.num_prompts)
            atomic_write_text(progress_path, json.dumps(state) + "\n")  # the commit point of this chunk
            bar.update(len(chunk))
    finally:
        bar.close()
    table = yield_table(state["counts"])
    reasoning = table[-1]["remaining"]
    if reasoning == 0:
        raise _nothing_survived(gc, progress_path, table)
    if gc.general_frac > 0 and not state["general_done"]:
        rows = _general_rows(gc.general, round(reasoning * gc.general_frac / (1 - gc.general_frac)), gc.seed)
        _append(gc.out, rows)
        state["lines"] += len(rows)
        state["general_done"], state["general"] = True, len(rows)
        atomic_write_text(progress_path, json.dumps(state) + "\n")
    return {"out": gc.out, "prompts": state["prompts_done"], "sampled": state["counts"]["sampled"],
            "kept": reasoning, "general": state.get("general", 0), "lines": state["lines"], "yield": table,
            "generated_tokens": state["generated_tokens"], "kept_tokens": state["kept_tokens"],
            "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- on-policy
@dataclass
class OnPolicyConfig:
    model: str = ""  # the student's starting checkpoint
    teacher: str = ""  # frozen teacher; must share the student's tokenizer
    task: str = "arithmetic"
    difficulty: int | None = None
    out: str = "runs/onpolicy"
    steps: int = 100
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 128
    temperature: float = 1.0  # the student's own distribution (the sampled estimator assumes it)
    prefill_think: bool = False
    kl: str = "exact"  # exact (over the vocabulary) | sampled (reverse KL from the sampled tokens)
    beta: float = 1.0  # generalized JSD: 0 forward KL, 1 reverse KL (TRL / GKD convention)
    lmbda: float = 1.0  # share of steps sampled by the student; the rest by the teacher (GKD)
    lr: float = 1e-4
    warmup: int = 0
    min_lr_ratio: float = 1.0  # constant after warmup, as GRPO
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int | None = None  # sequences per forward; None: the whole batch
    seed: int = 0
    save_every: int = 0
    keep: int | None = None
    resume: bool = False
    max_bad_steps: int = 5

    def validate(self) -> None:
        if not self.model or not self.teacher:
            raise ValueError("--model (the student) and --teacher are required: checkpoint directories")
        if self.steps < 1 or self.prompts_per_step < 1 or self.samples_per_prompt < 1 or self.max_new_tokens < 1:
            raise ValueError("--steps, --prompts-per-step, --samples-per-prompt and --max-new-tokens must be >= 1")
        if self.kl not in KL_MODES:
            raise ValueError(f"--kl must be one of {KL_MODES}, got {self.kl!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"--beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {self.beta}")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"--lmbda must be in [0, 1] (the share of student-sampled steps), got {self.lmbda}")
        if self.kl == "sampled" and (self.beta != 1.0 or self.lmbda != 1.0):
            raise ValueError("--kl sampled estimates the reverse KL on the student's own samples only: use it "
                             "with --beta 1 --lmbda 1, or use --kl exact")


def rollout_config(oc: OnPolicyConfig) -> grpo.GRPOConfig:
    """The GRPO settings that make grpo.rollout draw this step's prompts and samples."""
    return grpo.GRPOConfig(model=oc.model, prompts_per_step=oc.prompts_per_step, group_size=oc.samples_per_prompt,
                           max_new_tokens=oc.max_new_tokens, temperature=oc.temperature,
                           prefill_think=oc.prefill_think, seed=oc.seed)


def onpolicy_loss(student, teacher, prompts, completions, oc: OnPolicyConfig):
    """(loss, stats) of one micro-batch: the teacher scores every completion token in one forward (no grad),
    the student in another; the divergence per token, averaged over completion tokens."""
    with torch.no_grad():
        t_logits, _, _ = grpo.completion_logits(teacher, prompts, completions)
    s_logits, targets, mask = grpo.completion_logits(student, prompts, completions)
    with torch.no_grad():
        reverse = masked_mean(token_divergence(s_logits.detach(), t_logits, 1.0), mask)
    if oc.kl == "exact":
        loss = exact_loss(s_logits, t_logits, mask, oc.beta)
        stats = {"reverse_kl": float(reverse)}
    else:
        s_logp = torch.log_softmax(s_logits, -1).gather(-1, targets[..., None]).squeeze(-1)
        t_logp = torch.log_softmax(t_logits, -1).gather(-1, targets[..., None]).squeeze(-1)
        loss, estimate = sampled_reverse_kl(s_logp, t_logp, mask)
        stats = {"reverse_kl": float(reverse), "kl_estimate": float(estimate)}
    return loss, stats, int(mask.sum())


def train_onpolicy(oc: OnPolicyConfig, progress: bool = True, task=None, plot: bool = False) -> dict:
    """Run (or resume) on-policy distillation of oc.teacher into oc.model; returns a summary."""
    oc.validate()
    check_same_tokenizer(oc.teacher, oc.model)
    task = task if task is not None else tasks.get(oc.task, difficulty=oc.difficulty)
    torch.manual_seed(oc.seed)
    tokenizer = load_tokenizer(oc.model)
    model = Transformer.from_pretrained(oc.model, dtype=torch.float32)
    teacher = Transformer.from_pretrained(oc.teacher, dtype=torch.float32).eval().requires_grad_(False)
    optimizer = make_optimizer(model, oc.lr, oc.weight_decay)
    rc = rollout_config(oc)
    run = Run(oc.out, oc.steps, "distill", model, optimizer, save_every=oc.save_every, keep=oc.keep,
              max_bad_steps=oc.max_bad_steps, tokenizer_dir=oc.model, progress=progress, plot=plot_onpolicy)
    try:
        run.start(oc.resume)
        for step in run:
            step_lr = run.set_lr(lr_at(step, oc.steps, oc.lr, oc.warmup, "cosine", oc.min_lr_ratio))
            on_policy = oc.lmbda >= 1.0 or random.Random(f"gkd|{oc.seed}|{step}").random() < oc.lmbda
            t0 = time.perf_counter()
            ro = grpo.rollout((model if on_policy else teacher).eval(), tokenizer, task, rc, step)
            t1 = time.perf_counter()
            model.train()
            B = len(ro.completions)
            micro = oc.micro_batch_size or B
            n_tok = max(1, sum(len(c) for c in ro.completions))
            loss_sum, sums = 0.0, {}
            for i in range(0, B, micro):
                loss, st, n = onpolicy_loss(model, teacher, ro.prompts[i: i + micro], ro.completions[i: i + micro], oc)
                (loss * (n / n_tok)).backward()  # token-weighted: the batch loss is the mean over all its tokens
                loss_sum += float(loss.detach()) * n / n_tok
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + v * n / n_tok
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip))
            applied = run.update(step, loss_sum, grad_norm)
            tokens = sum(len(p) + len(c) for p, c in zip(ro.prompts, ro.completions))
            rec = {"step": step, "lr": step_lr, "loss": loss_sum, **sums, "grad_norm": grad_norm,
                   "on_policy": int(on_policy), "accuracy": ro.stats["accuracy"],
                   "format_rate": ro.stats["format_rate"], "response_length": ro.stats["response_length"],
                   "generated_tokens": ro.stats["completion_tokens"], "sampler": "student" if on_policy else "teacher",
                   "scored_tokens": tokens, "trained_tokens": tokens, "rollout_s": t1 - t0,
                   "update_s": time.perf_counter() - t1, "skipped_steps": run.guard.skipped}
            if not applied:
                rec["skipped"] = True
            run.log(rec, kl=rec["reverse_kl"], acc=rec["accuracy"])
            run.save(step, train_config=dataclasses.asdict(oc))
    finally:
        run.close()
    return run.summary(plot, reverse_kl=run.last.get("reverse_kl"), accuracy=run.last.get("accuracy"))


PLOTS = {
    "kl.png": (("reverse_kl", "kl_estimate", "loss"), "nats per token"),
    "accuracy.png": (("accuracy", "format_rate"), "rate (training samples)"),
    "response_length.png": (("response_length",), "mean completion tokens"),
}


def plot_onpolicy(run_dir: str) -> list[str]:
    """kl.png (reverse KL to the teacher, the loss), accuracy.png, response_length.png."""
    return plot_series(run_dir, PLOTS)

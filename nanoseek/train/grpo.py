"""`nanoseek grpo`: reinforcement learning with verifiable rewards, GRPO as in DeepSeekMath section 4 / DeepSeek-R1
section 2.2 (the loss math is nanoseek.train.grpo_loss; this file is the loop around it).

One step:
  1. rollout   P prompts from the task's train split, G samples each, from the current policy through the Engine
               (batched, latent KV cache, temperature 1). The prompt is the chat template with SYSTEM_PROMPT, the
               question and the generation prompt, optionally prefilled with "<think>" (R1's template).
  2. reward    rule-based only (task.reward: accuracy + format, optional DAPO overlong penalty), then
               group-normalised advantages A_i = (r_i - mean) / std (or mean-centred only, Dr. GRPO).
               With --drop-equal-groups (DAPO dynamic sampling) groups whose rewards are all equal are dropped
               and new prompts are sampled (up to --max-refill extra rounds) to fill the batch.
  3. update    --ppo-epochs optimizer steps on the batch. pi_old is the policy that sampled (its log-probs are
               kept), pi_ref the frozen starting model (only built when beta > 0). Loss: clipped ratio with
               eps_low / eps_high, token or sequence (GSPO) ratio, k3 KL, grpo | dr_grpo | dapo aggregation.

Log-probs are recomputed by the training forward (completion_logits); the sampling engine runs the same weights,
so pi_old equals the training forward up to float error.

The MoE router's bias (aux-loss-free balancing) is frozen during RL: the update only changes gradients' weights.
Checkpoints, `latest`, metrics.jsonl and --resume work as in pretraining; prompts and sampling seeds are
functions of (seed, step), so a resumed run draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek import tasks
from nanoseek.engine import SamplingParams
from nanoseek.eval import completion_text, generate_batched, prompt_ids
from nanoseek.model import Transformer
from nanoseek.plot import plot_grpo
from nanoseek.tasks import rewards
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.grpo_loss import AGGREGATIONS, RATIOS, drop_equal_reward_groups, group_advantages, policy_loss
from nanoseek.train.loop import NonFiniteGuard, Run, lr_at, make_optimizer

MAX_REFILL = 63  # refill rounds are folded into the prompt seed (64 per step)


@dataclass
class GRPOConfig:
    model: str = ""  # starting checkpoint (also the reference policy and the tokenizer source)
    task: str = "arithmetic"
    difficulty: int | None = None
    out: str = "runs/grpo"
    steps: int = 100
    prompts_per_step: int = 8  # P
    group_size: int = 8  # G
    max_new_tokens: int = 128
    temperature: float = 1.0  # rollouts sample the policy itself
    prefill_think: bool = False
    lr: float = 1e-5
    warmup: int = 0
    min_lr_ratio: float = 1.0  # 1.0: constant after warmup (R1 uses a constant RL learning rate)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ppo_epochs: int = 1  # optimizer steps per rollout batch (>1: the ratio moves away from 1 and clipping acts)
    micro_batch_size: int | None = None  # sequences per forward in the update; None: the whole batch
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO clip-higher: 0.28
    beta: float = 0.0  # k3 KL weight; 0 builds no reference model (DeepSeekMath used 0.04)
    aggregation: str = "grpo"  # grpo | dr_grpo | dapo
    ratio: str = "token"  # token | sequence (GSPO)
    scale: str = "std"  # advantage scaling: std (GRPO) | none (Dr. GRPO)
    drop_equal_groups: bool = False  # DAPO dynamic sampling
    max_refill: int = 4
    mask_truncated: bool = False  # DAPO overlong filtering: completions cut at max_new_tokens get no loss
    overlong_cache: int = 0  # >0: DAPO soft overlong penalty over the last N tokens before max_new_tokens
    seed: int = 0
    save_every: int = 0
    keep: int | None = None
    resume: bool = False
    max_bad_steps: int = 5

    def validate(self) -> None:
        if not self.model:
            raise ValueError("--model is required: a checkpoint directory with config.json and tokenizer.json")
        if self.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 (advantages compare samples of a group), "
                             f"got {self.group_size}")
        if self.prompts_per_step < 1 or self.steps < 1 or self.ppo_epochs < 1 or self.max_new_tokens < 1:
            raise ValueError("--prompts-per-step, --steps, --ppo-epochs and --max-new-tokens must be >= 1")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"--aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.ratio not in RATIOS:
            raise ValueError(f"--ratio must be one of {RATIOS}, got {self.ratio!r}")
        if self.beta < 0:
            raise ValueError(f"--beta must be >= 0, got {self.beta}")
        if not 0 <= self.max_refill <= MAX_REFILL:
            raise ValueError(f"--max-refill must be in 0..{MAX_REFILL}, got {self.max_refill}")
        if not 0 <= self.overlong_cache <= self.max_new_tokens:
            raise ValueError(f"--overlong-cache must be in 0..max_new_tokens, got {self.overlong_cache}")


# ---------------------------------------------------------------------------------------------- log-probs
class _PromptLatents:
    """LatentCache of the prompt pass: attends as usual and keeps the layer's latents for the completions."""

    def __init__(self):
        self.latents: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, c_kv, k_rope):
        self.latents = (c_kv, k_rope)
        return c_kv, k_rope


class _AfterPrompt:
    """LatentCache of the completion pass: row b's keys are its prompt's latents (padded), then its own."""

    def __init__(self, prompt: _PromptLatents, row: torch.Tensor):
        self.prompt, self.row = prompt, row

    def update(self, c_kv, k_rope):
        p_kv, p_rope = (t.index_select(0, self.row) for t in self.prompt.latents)
        return torch.cat([p_kv, c_kv], 1), torch.cat([p_rope, k_rope], 1)


def _padded(seqs: list[list[int]], length: int) -> torch.Tensor:
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids


def completion_logits(model, prompts: list[list[int]], completions: list[list[int]]):
    """The logits that predict every completion token, with each distinct prompt run through the model once.

    A GRPO group's G samples share one prompt, and prompts (system prompt, question) are most of the tokens, so
    the model first runs the U distinct prompts, keeping every layer's latents, then all B completions, each
    attending to its prompt's latents and causally to itself. Gradients reach the prompt tokens through the
    shared latents. This is the same attention as one forward over each prompt + completion, for about U/B of
    the prompt's compute. Returns (logits [B, T, V] fp32, targets [B, T], mask [B, T] bool) with T the longest
    completion; mask is True on real completion tokens. (Distillation scores the same positions with the
    teacher: nanoseek.train.distill.)
    """
    distinct: dict[tuple, int] = {}
    row = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts])
    uniq = [list(p) for p in distinct]
    device = model.embed_tokens.weight.device
    lp = torch.tensor([len(p) for p in uniq])[row].to(device)  # [B] prompt length of each row
    lc = torch.tensor([len(c) for c in completions], device=device)
    P, T = max(len(p) for p in uniq), max(int(lc.max()), 1)
    caches = [_PromptLatents() for _ in model.layers]
    h_prompt = model.hidden_states(_padded(uniq, P).to(device), kv_caches=caches)  # [U, P, d]
    row = row.to(device)
    # completion token t of row b sits at position lp[b] + t and sees keys j < lp[b] (its prompt, padded to P)
    # and P <= j <= P + t (itself, causally)
    t, j = torch.arange(T, device=device), torch.arange(P + T, device=device)
    see = (j[None, None] < lp[:, None, None]) | ((j[None, None] >= P) & (j[None, None] - P <= t[None, :, None]))
    tokens = _padded(completions, T).to(device)  # the completion pass's input, and the targets
    h = model.hidden_states(tokens, lp[:, None] + t[None], see[:, None],
                            [_AfterPrompt(c, row) for c in caches])  # [B, T, d]
    # the prompt's last token predicts completion token 0, completion token t - 1 predicts token t
    first = h_prompt.flatten(0, 1).index_select(0, row * P + lp - 1)  # [B, d] (index_select: its CPU backward
    # sums in a fixed order)
    logits = model.lm_head(torch.cat([first[:, None], h[:, : T - 1]], dim=1)).float()  # [B, T, V]
    return logits, tokens, t[None] < lc[:, None]


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], with_entropy: bool = False):
    """log pi(o_t | q, o_<t) of every completion token (see completion_logits).

    Returns (logp [B, T], mask [B, T] bool, entropy [B, T] or None) with T the longest completion."""
    logits, targets, mask = completion_logits(model, prompts, completions)
    log_probs = F.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return logp, mask, entropy


# ---------------------------------------------------------------------------------------------- rollouts
@dataclass
class Rollouts:
    """The kept groups of one step, flattened group-major: row g * G + i is sample i of group g."""

    prompts: list  # token ids per row
    completions: list  # token ids per row
    rewards: torch.Tensor  # [n_groups, G]
    truncated: torch.Tensor  # [rows] bool: hit max_new_tokens without EOS
    stats: dict  # metrics over every sample drawn this step (kept or not)


def rollout(model, tokenizer, task, tc: GRPOConfig, step: int) -> Rollouts:
    """Sample P groups of G completions and score them; with drop_equal_groups, refill up to max_refill times."""
    P, G = tc.prompts_per_step, tc.group_size
    eos = tokenizer.eos_id
    keep_p, keep_c, keep_r, keep_t = [], [], [], []
    all_r, all_acc, all_fmt, all_len, all_trunc = [], [], [], [], []
    sampled = 0
    rounds = 1 + (tc.max_refill if tc.drop_equal_groups else 0)
    for rnd in range(rounds):
        seed = ((tc.seed * 1_000_003 + step) * (MAX_REFILL + 1) + rnd) % 2**62
        examples = task.sample(P, split="train", seed=seed)
        prompts = [prompt_ids(tokenizer, ex.prompt, tc.prefill_think) for ex in examples for _ in range(G)]
        params = SamplingParams(tc.max_new_tokens, temperature=tc.temperature, stop_token_ids=(eos,), seed=seed)
        completions = generate_batched(model, prompts, params, batch_size=len(prompts))
        sampled += P
        r = torch.zeros(P, G)
        trunc = torch.zeros(P * G, dtype=torch.bool)
        for j, toks in enumerate(completions):
            ex = examples[j // G]
            text = completion_text(tokenizer, toks)
            trunc[j] = len(toks) >= tc.max_new_tokens and toks[-1] != eos
            kw = {"think_prefilled": tc.prefill_think, "length": len(toks)}
            if tc.overlong_cache:
                kw.update(max_len=tc.max_new_tokens, cache_len=tc.overlong_cache)
            r[j // G, j % G] = task.reward(text, ex, **kw)
            all_acc.append(task.verify(text, ex)), all_len.append(len(toks))
            all_fmt.append(rewards.format_ok(text, tc.prefill_think))
        all_r.append(r.flatten()), all_trunc.append(trunc)
        keep = drop_equal_reward_groups(r) if tc.drop_equal_groups else torch.ones(P, dtype=torch.bool)
        for g in keep.nonzero().flatten().tolist():
            if len(keep_r) < P:
                rows = range(g * G, (g + 1) * G)
                keep_p += [prompts[i] for i in rows]
                keep_c += [completions[i] for i in rows]
                keep_r.append(r[g])
                keep_t.append(trunc[g * G: (g + 1) * G])
        if len(keep_r) >= P:
            break
    rewards_all = torch.cat(all_r)
    stats = {"reward": rewards_all.mean().item(), "reward_std": rewards_all.std().item(),
             "accuracy": sum(all_acc) / len(all_acc), "format_rate": sum(all_fmt) / len(all_fmt),
             "response_length": sum(all_len) / len(all_len),
             "truncated_frac": torch.cat(all_trunc).float().mean().item(),
             "groups_sampled": sampled, "groups_kept": len(keep_r), "completion_tokens": sum(all_len)}
    return Rollouts(keep_p, keep_c, torch.stack(keep_r) if keep_r else torch.zeros(0, G),
                    torch.cat(keep_t) if keep_t else torch.zeros(0, dtype=torch.bool), stats)


# ---------------------------------------------------------------------------------------------- update
def update(model, ref_model, optimizer, ro: Rollouts, tc: GRPOConfig, guard: NonFiniteGuard, step: int) -> dict:
    """--ppo-epochs optimizer steps of the clipped GRPO objective on one rollout batch; returns averaged stats."""
    B = len(ro.completions)
    adv = group_advantages(ro.rewards, scale=tc.scale).flatten()  # [B], A_i for every token of o_i
    micro = tc.micro_batch_size or B
    chunks = [slice(i, min(i + micro, B)) for i in range(0, B, micro)]
    n_tok = sum(len(c) for c in ro.completions)
    if tc.mask_truncated:
        n_tok = sum(len(c) for c, t in zip(ro.completions, ro.truncated.tolist()) if not t)
    n_tok = max(n_tok, 1)

    # pi_old and pi_ref log-probs, once per batch. With one epoch the first (and only) update happens at
    # pi_theta == pi_old, so old_logp is the update forward's own detached value and a forward is saved.
    old, ref = [], []
    with torch.no_grad():
        for sl in chunks:
            if tc.ppo_epochs > 1:
                old.append(completion_logprobs(model, ro.prompts[sl], ro.completions[sl])[0])
            if ref_model is not None:
                ref.append(completion_logprobs(ref_model, ro.prompts[sl], ro.completions[sl])[0])

    sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "clip_high_frac": 0.0, "clip_low_frac": 0.0, "ratio_mean": 0.0}
    entropy_sum, grad_norms, skipped = 0.0, [], 0
    for epoch in range(tc.ppo_epochs):
        epoch_loss = 0.0
        for k, sl in enumerate(chunks):
            logp, mask, ent = completion_logprobs(model, ro.prompts[sl], ro.completions[sl], with_entropy=epoch == 0)
            if tc.mask_truncated:
                mask = mask & ~ro.truncated[sl].to(mask.device)[:, None]
            old_logp = old[k] if old else logp.detach()
            b = logp.shape[0]
            loss, st = policy_loss(logp, old_logp, adv[sl].to(logp.device), mask, tc.eps_low, tc.eps_high, tc.beta,
                                   ref[k] if ref else None, tc.aggregation, tc.ratio, max_len=tc.max_new_tokens)
            # weight of this micro-batch in the batch-level aggregate (exact gradient accumulation)
            w = int(mask.sum()) / n_tok if tc.aggregation == "dapo" else b / B
            (loss * w).backward()
            epoch_loss += float(st["loss"]) * w
            for key in sums:
                sums[key] += float(st[key]) * w / tc.ppo_epochs
            if ent is not None:
                entropy_sum += float(torch.where(mask, ent.detach(), torch.zeros_like(ent)).sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        if guard.check(step, epoch_loss, grad_norm):
            optimizer.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        grad_norms.append(grad_norm)
    return {**sums, "entropy": entropy_sum / n_tok, "grad_norm": sum(grad_norms) / len(grad_norms),
            "advantage_abs": adv.abs().mean().item(), "skipped_updates": skipped,
            "update_tokens": tc.ppo_epochs * sum(len(p) + len(c) for p, c in zip(ro.prompts, ro.completions))}


# ---------------------------------------------------------------------------------------------- loop
def reference_policy(model, beta: float):
    """The frozen reference pi_ref of the KL term: a copy of the starting policy, or None when beta is 0 (no
    KL term, so no second model in memory and no reference forward)."""
    if beta == 0:
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def train(tc: GRPOConfig, progress: bool = True, task=None, plot: bool = False) -> dict:
    """Run (or resume) GRPO from tc.model on tc.task (or the given Task object); returns a summary."""
    tc.validate()
    task = task if task is not None else tasks.get(tc.task, difficulty=tc.difficulty)
    torch.manual_seed(tc.seed)
    tokenizer = load_tokenizer(tc.model)
    model = Transformer.from_pretrained(tc.model, dtype=torch.float32)  # fp32 master weights
    ref_model = reference_policy(model, tc.beta)
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay)
    run = Run(tc.out, tc.steps, "grpo", model, optimizer, save_every=tc.save_every, keep=tc.keep,
              max_bad_steps=tc.max_bad_steps, tokenizer_dir=tc.model, progress=progress, plot=plot_grpo)
    try:
        run.start(tc.resume)
        for step in run:
            step_lr = run.set_lr(lr_at(step, tc.steps, tc.lr, tc.warmup, "cosine", tc.min_lr_ratio))
            t0 = time.perf_counter()
            ro = rollout(model.eval(), tokenizer, task, tc, step)
            t1 = time.perf_counter()
            rec = {"step": step, "lr": step_lr, **ro.stats}
            model.train()
            if len(ro.completions):
                rec.update(update(model, ref_model, optimizer, ro, tc, run.guard, step))
            else:  # every group had equal rewards even after refilling: nothing to learn from this step
                rec.update({"loss": 0.0, "skipped_updates": tc.ppo_epochs, "update_tokens": 0})
            t2 = time.perf_counter()
            rec.update({"rollout_s": t1 - t0, "update_s": t2 - t1,
                        "rollout_tokens_per_s": ro.stats["completion_tokens"] / (t1 - t0),
                        "update_tokens_per_s": rec["update_tokens"] / max(t2 - t1, 1e-9),
                        "tokens_per_s": ro.stats["completion_tokens"] / (t2 - t0),
                        "skipped_steps": run.guard.skipped})
            run.log(rec, reward=rec["reward"], acc=rec["accuracy"], len=rec["response_length"])
            run.save(step, train_config=dataclasses.asdict(tc))
    finally:
        run.close()
    last = run.last
    return run.summary(plot, reward=last.get("reward"), accuracy=last.get("accuracy"),
                       response_length=last.get("response_length"))

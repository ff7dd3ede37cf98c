"""GRPO step time and reward: nanoseek vs TRL's GRPOTrainer on the same checkpoint, task and settings.

Both start from the same exported transformers-layout checkpoint (TRL loads it as DeepseekV3ForCausalLM), sample
the same number of prompts x group size with the same completion length at temperature 1, use the same loss
(DAPO token-level aggregation, eps 0.2 / 0.28, beta 0, one update per batch), learning rate and AdamW, and the
same rule reward (nanoseek.tasks: accuracy + format). Printed: seconds per step (mean over steps after the first)
and the mean reward of the first and last steps, side by side. TRL is a benchmark-only dependency
(pip install trl); when it is missing or fails on this torch / transformers, the script says so and still
reports nanoseek's side.

    python benchmarks/grpo_vs_trl.py --model CKPT_DIR [--task sum4] [--steps 8] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback

import torch

from nanoseek import tasks
from nanoseek.tasks import SYSTEM_PROMPT
from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.train import grpo
from nanoseek.train.loop import read_metrics


def get_task(name: str):
    """'sumN' is benchmarks/r1zero.py's RL task (N one-digit numbers, N = 4 by default there); anything else goes
    to tasks.get."""
    if name.startswith("sum") and name[3:].isdigit():
        return ArithmeticTask(digits=1, n_operands=int(name[3:]), ops="+")
    return tasks.get(name)


def run_nanoseek(args, task, out: str) -> dict:
    tc = grpo.GRPOConfig(model=args.model, out=out, steps=args.steps, prompts_per_step=args.prompts,
                         group_size=args.group, max_new_tokens=args.max_new_tokens, lr=args.lr, eps_high=0.28,
                         aggregation="dapo", beta=0.0, seed=0)
    grpo.train(tc, progress=False, task=task)
    rows = read_metrics(out)
    times = [r["rollout_s"] + r["update_s"] for r in rows]
    return {"s_per_step": sum(times[1:]) / max(1, len(times) - 1), "rewards": [r["reward"] for r in rows]}


def run_trl(args, task) -> dict:
    import datasets
    import transformers
    import trl

    examples = task.sample(args.prompts * args.steps, "train", seed=0)
    data = datasets.Dataset.from_list([
        {"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": ex.prompt}], "idx": i}
        for i, ex in enumerate(examples)])
    rewards_seen: list[float] = []

    def reward(completions, idx, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        r = [task.reward(t, examples[i]) for t, i in zip(texts, idx)]
        rewards_seen.extend(r)
        return r

    step_times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        cfg = trl.GRPOConfig(
            output_dir=d, max_steps=args.steps, per_device_train_batch_size=args.prompts * args.group,
            num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, beta=0.0, loss_type="dapo", epsilon=0.2,
            epsilon_high=0.28, num_iterations=1, use_cpu=True, bf16=False, gradient_checkpointing=False,
            logging_steps=1, report_to="none", save_strategy="no", seed=0, shuffle_dataset=False,
            disable_tqdm=True)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data,
                                  processing_class=tokenizer, callbacks=[Timer()])
        with contextlib.redirect_stdout(sys.stderr):  # TRL prints its logs; keep stdout for our table / JSON
            trainer.train()
    per_step = args.prompts * args.group
    rewards = [sum(rewards_seen[i:i + per_step]) / per_step for i in range(0, len(rewards_seen), per_step)]
    return {"s_per_step": sum(step_times[1:]) / max(1, len(step_times) - 1), "rewards": rewards,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (e.g. runs/r1zero/base/latest)")
    p.add_argument("--task", default="sum4")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    out = {"settings": {k: v for k, v in vars(args).items() if k != "json"}}
    with tempfile.TemporaryDirectory() as d:
        out["nanoseek"] = run_nanoseek(args, task, os.path.join(d, "run"))
    try:
        out["trl"] = run_trl(args, task)
    except Exception as e:  # missing or incompatible: say so, keep nanoseek's numbers
        out["trl"] = {"error": f"{type(e).__name__}: {e}"}
        traceback.print_exc(file=sys.stderr)

    k = min(3, args.steps)
    lines = [f"GRPO, {args.prompts} prompts x {args.group} samples, {args.max_new_tokens} new tokens, "
             f"{args.steps} steps, task {args.task}, CPU threads {args.threads}",
             f"{'':<10}{'s/step':>10}{'reward first ' + str(k):>18}{'reward last ' + str(k):>18}"]
    for name in ("nanoseek", "trl"):
        r = out[name]
        if "error" in r:
            lines.append(f"{name:<10}TRL did not run here: {r['error']}")
            continue
        first, last = sum(r["rewards"][:k]) / k, sum(r["rewards"][-k:]) / k
        lines.append(f"{name:<10}{r['s_per_step']:>10.2f}{first:>18.3f}{last:>18.3f}")
    if "error" not in out["trl"]:
        lines.append(f"speed-up (TRL s/step / nanoseek s/step): "
                     f"{out['trl']['s_per_step'] / out['nanoseek']['s_per_step']:.2f}x; "
                     f"versions {out['trl']['versions']}")
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()

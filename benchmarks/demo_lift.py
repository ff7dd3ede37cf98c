"""How much can GRPO lift the demo's base? One GRPO run of the demo's shape (16 prompts x 8 samples, 48 new
tokens, DAPO loss and clip-higher, rule rewards only) from a base model, scored like the demo's report (held-out
four-number sums, n=200 x 4 samples, T 0.6, top-p 0.95) at every saved checkpoint.

    python benchmarks/demo_lift.py --base runs/demo/base/latest --lr 3e-4 --steps 60 [--drop-equal-groups]
    python benchmarks/demo_lift.py --pretrain-steps 800 --data runs/demo/data --lr 3e-4 --steps 60

`--base` reuses a pretrained model (the demo's own); `--pretrain-steps` pretrains one first as the demo does, on
the demo's data directory (a weaker or stronger base).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from nanoseek import demo
from nanoseek.train import grpo, pretrain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=None, help="a pretrained checkpoint (e.g. runs/demo/base/latest)")
    p.add_argument("--pretrain-steps", type=int, default=0, help="instead of --base: pretrain this many steps")
    p.add_argument("--data", default="runs/demo/data", help="with --pretrain-steps: the demo's token shards")
    p.add_argument("--out", default="runs/demo_lift")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--drop-equal-groups", action="store_true", help="DAPO dynamic sampling")
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if bool(args.base) == bool(args.pretrain_steps):
        raise SystemExit("demo_lift: error: give exactly one of --base CKPT and --pretrain-steps N")
    if args.threads:
        torch.set_num_threads(args.threads)
    dc, task, t0 = demo.DemoConfig(), demo.hard_task(4), time.perf_counter()
    base = args.base
    if args.pretrain_steps:
        tc = pretrain.TrainConfig(preset="tiny", data=args.data, out=os.path.join(args.out, "base"),
                                  steps=args.pretrain_steps, batch_size=dc.pretrain_batch, seq_len=128, lr=3e-3,
                                  eval_every=0, seed=dc.seed)  # the demo's pretraining, another length
        pretrain.train(tc, progress=True)
        base = os.path.join(tc.out, "latest")
    res = {"base": base, "base_pass@1": demo._score(base, dc, task)["pass@1"]}
    gc = grpo.GRPOConfig(model=base, task="arithmetic", out=os.path.join(args.out, "r1zero"), steps=args.steps,
                         prompts_per_step=dc.grpo_prompts, group_size=dc.grpo_group, max_new_tokens=dc.max_new_tokens,
                         lr=args.lr, eps_high=0.28, aggregation="dapo", seed=0, save_every=args.save_every,
                         drop_equal_groups=args.drop_equal_groups)
    grpo.train(gc, progress=True, task=task)
    ckpts = os.path.join(gc.out, "checkpoints")
    for d in sorted(os.listdir(ckpts), key=lambda d: int(d.split("_")[1])):
        res[f"{d}_pass@1"] = demo._score(os.path.join(ckpts, d), dc, task)["pass@1"]
    res["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    print(f"base pass@1 {res['base_pass@1']:.3f}; after GRPO (lr {args.lr:g}"
          f"{', dynamic sampling' if args.drop_equal_groups else ''}): " +
          ", ".join(f"{k[:-7].replace('step_', 'step ')} {v:.3f}" for k, v in res.items() if k.startswith("step_")))
    print(json.dumps(res))


if __name__ == "__main__":
    main()

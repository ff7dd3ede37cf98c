"""DeepSeek-R1's Table 6 in miniature (arXiv 2501.12948, section 4.1): distilling a strong reasoner into a small
dense student against RL on that student alone, at equal compute; and on-policy distillation (GKD, arXiv
2306.13649; Qwen3 report, arXiv 2505.09388, section 4.5) against trace SFT.

Teacher: the R1-Zero model of benchmarks/r1zero.py (`tiny`, MoE, GRPO on four-number sums); its checkpoint is
reused when present (--r1zero DIR), else built with r1zero's settings. Student base: the dense `nano` preset
(<= 1/3 of tiny's active parameters) pretrained on the same corpus and tokenizer for as many steps.

Rows (all evaluated on the held-out test split as r1zero does: --n problems x --samples samples, T 0.6, top-p
0.95; pass@1, maj@K, pass@K, mean length; plus transfer to held-out 3- and 5-number sums):
    teacher; student base;
    student + GRPO alone at the distillation's FLOPs (1x) and at 3x;
    student + trace SFT (distilled: rejection-sampled teacher traces, `nanoseek distill generate` + `nanoseek sft`);
    student + on-policy distillation at the same FLOPs (`nanoseek distill onpolicy`, exact reverse KL);
    student + trace SFT for half the FLOPs, then on-policy distillation for the other half (the Qwen3 order);
    distilled, then GRPO (1x more GRPO);
    SFT on the teacher's unfiltered samples (the same samples, same steps: what the filters buy).
FLOPs count what is spent after the teacher exists (pipeline_flops): 2 x active params per
generated token (rejected samples included), 6 x params per trained token, 2 x teacher params per scored token.
GRPO and on-policy step counts are set from an estimate of their per-step FLOPs so that they spend the
distillation's budget; the FLOPs actually spent are counted from their metrics and printed.
Standard errors: sqrt(p (1 - p) / n) over the n problems, an upper bound for a mean of K samples per problem;
a difference is called real only above 2 standard errors of the difference.

    python benchmarks/distill.py [--json] [--out DIR] [--r1zero DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time

import torch

from nanoseek import ModelConfig, load_tokenizer
from nanoseek.accounting import param_counts
from nanoseek.eval import prompt_ids
from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.train import distill, grpo, pretrain, sft
from nanoseek.train.loop import read_metrics
from nanoseek.train.state import latest_checkpoint, list_checkpoints

HERE = os.path.dirname(os.path.abspath(__file__))


def pipeline_flops(generated=(), trained=(), scored=()) -> float:
    """Compute a post-training pipeline spends, by the usual rule of thumb (Kaplan et al. 2020, arXiv 2001.08361):
    2 N per generated token (one forward), 6 N per trained token (forward + backward), 2 N per scored token
    (a frozen model's forward, e.g. a teacher's). Each argument: (N active parameters, tokens) pairs."""
    return float(sum(2 * n * t for n, t in generated) + sum(6 * n * t for n, t in trained)
                 + sum(2 * n * t for n, t in scored))


def load_r1zero():
    spec = importlib.util.spec_from_file_location("r1zero", os.path.join(HERE, "r1zero.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def teacher_checkpoint(args, r1z) -> tuple[str, bool]:
    """(the R1-Zero checkpoint, whether it was built now)."""
    path = os.path.join(args.r1zero, "grpo_zero", "latest")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, False
    r_args = r1z.build_parser().parse_args(["--out", args.r1zero, "--pretrain-steps", str(args.teacher_pretrain_steps),
                                            "--grpo-steps", str(args.teacher_grpo_steps)] + (["--json"] if args.json else []))
    if not os.path.isfile(os.path.join(args.r1zero, "base", "latest", "config.json")):
        r1z.build_base(args.r1zero, r_args)
    r1z.run_grpo(os.path.join(args.r1zero, "base", "latest"), os.path.join(args.r1zero, "grpo_zero"), r_args)
    return path, True


def student_base(args) -> str:
    out = os.path.join(args.out, "nano_base")
    if latest_checkpoint(out) is None:
        preset = "nano" if args.student_head == "tied" else "nano-untied"
        overrides = None
        if args.student_mlp:  # the preset with another MLP width, as the config.json pretraining builds from
            os.makedirs(args.out, exist_ok=True)
            overrides = os.path.join(args.out, "student_config.json")
            ModelConfig.from_preset(preset).replace(intermediate_size=args.student_mlp).to_json(overrides)
        tc = pretrain.TrainConfig(preset=preset, data=os.path.join(args.r1zero, "data"), out=out,
                                  steps=args.student_pretrain_steps, batch_size=16, seq_len=128, lr=3e-3, eval_every=0,
                                  seed=0, config=overrides)
        pretrain.train(tc, progress=not args.json)
    return os.path.join(out, "latest")


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def grpo_flops(run_dir: str, n_active: int, upto: int | None = None) -> float:
    rows = [r for r in read_metrics(run_dir) if upto is None or r["step"] <= upto]
    return pipeline_flops(generated=[(n_active, sum(r["completion_tokens"] for r in rows))],
                          trained=[(n_active, sum(r["update_tokens"] for r in rows))])


def opd_flops(run_dir: str, n_student: int, n_teacher: int, upto: int | None = None) -> float:
    rows = [r for r in read_metrics(run_dir) if upto is None or r["step"] <= upto]
    gen = [(n_student if r["on_policy"] else n_teacher, r["generated_tokens"]) for r in rows]
    return pipeline_flops(generated=gen, trained=[(n_student, sum(r["trained_tokens"] for r in rows))],
                          scored=[(n_teacher, sum(r["scored_tokens"] for r in rows))])


def sft_flops(run_dir: str, n_active: int) -> float:
    return pipeline_flops(trained=[(n_active, read_metrics(run_dir)[-1]["tokens"])])


def plot_flops(curves: dict, points: dict, path: str, teacher: float | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=[2 * e for e in es], fmt="o-", capsize=3, label=name)
    for name, (x, y, e) in points.items():
        ax.errorbar([x], [y], yerr=[2 * e], fmt="s", capsize=3, label=name)
    if teacher is not None:  # what the student is measured against: the teacher, and the 90 % goal under it
        ax.axhline(teacher, color="0.3", linestyle="--", linewidth=1, label=f"teacher ({teacher:.2f})")
        ax.axhline(0.9 * teacher, color="0.6", linestyle=":", linewidth=1, label="90 % of the teacher")
    ax.set_xlabel("FLOPs spent after the teacher exists"), ax.set_ylabel("held-out pass@1 (+-2 SE)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/distill")
    p.add_argument("--r1zero", default="runs/r1zero", help="benchmarks/r1zero.py's output (teacher reused if there)")
    p.add_argument("--teacher-pretrain-steps", type=int, default=1200, help="only when the teacher is built here")
    p.add_argument("--teacher-grpo-steps", type=int, default=90, help="only when the teacher is built here")
    p.add_argument("--student-pretrain-steps", type=int, default=1200)
    p.add_argument("--student-head", choices=["tied", "untied"], default="tied",
                   help="nano's output head: tied (the preset, 0.31x the teacher's active parameters) or its own "
                        "(0.34x; see benchmarks/student_seeds.py)")
    p.add_argument("--student-mlp", type=int, default=0,
                   help="the student's MLP width (0: the preset's, 256); 240 puts the untied student at 0.33x")
    # One sample from each of 3200 prompts rather than K=2 over 800 or K=4 over 400 (about the same teacher cost per
    # kept trace): at T 0.6 the teacher writes nearly the same chain for a problem every time, so the duplicate filter
    # keeps ~1 trace a prompt whatever K is, and the number of distinct problems is what teaches a small student to
    # copy the question's numbers into its chain. Pilot (the demo's teacher at 0.92, nano students, 1200 SFT steps
    # unless said): 800 x 2 (757 traces, 600 steps) 0.45 / 0.52 over two seeds; 3200 x 1 (2533 traces, 600 steps)
    # 0.73 / 0.71; 3200 x 1 at 1200 steps 0.96 / 0.91 (untied head, MLP 240: 0.33x), 0.96 / 0.93 / 0.96 (tied: the
    # `nano` preset, 0.31x).
    p.add_argument("--num-prompts", type=int, default=3200, help="train prompts for rejection sampling")
    p.add_argument("--num-generations", type=int, default=1)
    # R1 trained its students 2-3 epochs on 800k samples; ~2500 traces need more passes: the students above copy the
    # operands only after ~400 updates of 8 packed rows (their SFT loss falls from 0.3 to 0.05 there). 8 epochs over
    # ~2500 traces (two to a 256-token row) is ~1270 updates.
    p.add_argument("--sft-epochs", type=float, default=8.0)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--prompts", type=int, default=16, help="GRPO / on-policy prompts per step")
    p.add_argument("--group", type=int, default=8, help="GRPO samples per prompt")
    p.add_argument("--opd-samples", type=int, default=4, help="on-policy samples per prompt")
    # From one pilot (9 steps each): GRPO at r1zero's 3e-4 took the distilled nano student from 0.36 to 0.12
    # (1e-4: 0.27); on-policy distillation at 1e-3 raised the KL (grad norms 10-20), at 3e-4 it falls steadily.
    p.add_argument("--grpo-lr", type=float, default=1e-4)
    p.add_argument("--opd-lr", type=float, default=3e-4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--n", type=int, default=300, help="held-out problems")
    p.add_argument("--transfer-n", type=int, default=100, help="held-out 3- and 5-number problems")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    r1z = load_r1zero()
    hard = r1z.HARD  # four one-digit numbers, as r1zero's default
    transfer = {"3": ArithmeticTask(digits=1, n_operands=3, ops="+"), "5": ArithmeticTask(digits=1, n_operands=5, ops="+")}
    times = {}

    def score(model_dir, transfer_too=True):
        s = r1z.score(model_dir, args, hard)
        out = {k: s[k] for k in ("pass@1", "maj@k", "pass@k", "mean_length", "format_rate")}
        out["se"] = se(s["pass@1"], args.n)
        if transfer_too:
            t_args = argparse.Namespace(**{**vars(args), "n": args.transfer_n})
            for name, task in transfer.items():
                out[f"transfer{name}_pass@1"] = r1z.score(model_dir, t_args, task)["pass@1"]
        return out

    teacher, built = teacher_checkpoint(args, r1z)
    times["teacher"] = time.perf_counter() - t0
    t_cfg, tok = ModelConfig.from_json(teacher), load_tokenizer(teacher)
    base = student_base(args)
    s_cfg = ModelConfig.from_json(base)
    n_t, n_s = param_counts(t_cfg), param_counts(s_cfg)
    Nt, Ns = n_t["active_params"], n_s["active_params"]
    times["student_pretrain"] = time.perf_counter() - t0 - times["teacher"]
    log(f"teacher {teacher} ({Nt} active), student {base} ({Ns} active)")
    rows = {}
    rows["teacher"] = {**score(teacher), "flops": 0.0}
    rows["student base"] = {**score(base), "flops": 0.0}

    # --- distillation: rejection sampling + SFT
    t1 = time.perf_counter()
    traces = os.path.join(args.out, "traces.jsonl")
    everything = os.path.join(args.out, "samples_unfiltered.jsonl")
    gc = distill.GenerateConfig(teacher=teacher, out=traces, num_prompts=args.num_prompts,
                                num_generations=args.num_generations, max_new_tokens=args.max_new_tokens,
                                all_out=everything, batch_prompts=64, seed=0)
    gen = distill.generate_traces(gc, task=hard, progress=not args.json)
    log(distill.format_yield(gen["yield"]))
    gen_flops = pipeline_flops(generated=[(Nt, gen["generated_tokens"])])
    sft_dir = os.path.join(args.out, "sft")
    sc = sft.SFTConfig(model=base, data=traces, out=sft_dir, epochs=args.sft_epochs, batch_size=8, seq_len=256,
                       lr=args.sft_lr, seed=0)
    if latest_checkpoint(sft_dir) is None:
        sft.train(sc, progress=not args.json)
    sft_steps = read_metrics(sft_dir)[-1]["step"]
    budget = gen_flops + sft_flops(sft_dir, Ns)
    times["distill"] = time.perf_counter() - t1
    rows["distilled (trace SFT)"] = {**score(os.path.join(sft_dir, "latest")), "flops": budget}

    # --- per-step FLOPs estimates, to spend the same budget
    lp = sum(len(prompt_ids(tok, ex.prompt)) for ex in hard.sample(64, "train", seed=0)) / 64
    lc = rows["student base"]["mean_length"]
    grpo_step = args.prompts * args.group * (2 * Ns * lc + 6 * Ns * (lp + lc))
    s1 = max(1, round(budget / grpo_step))
    opd_step = args.prompts * args.opd_samples * (2 * Ns * lc + (2 * Nt + 6 * Ns) * (lp + lc))
    s_opd = max(3, round(budget / opd_step))
    log(f"budget {budget:.3g} FLOPs: GRPO {s1} steps a budget, on-policy {s_opd} steps")

    def grpo_cfg(model, out, steps, save_every):
        return grpo.GRPOConfig(model=model, out=out, steps=steps, prompts_per_step=args.prompts, group_size=args.group,
                               max_new_tokens=args.max_new_tokens, lr=args.grpo_lr, eps_high=0.28, aggregation="dapo",
                               save_every=save_every, seed=0)

    # --- GRPO alone on the student, to 3x the budget (constant LR: the 1x checkpoint is a 1x run)
    t2 = time.perf_counter()
    g_dir = os.path.join(args.out, "grpo")
    if latest_checkpoint(g_dir) is None:
        grpo.train(grpo_cfg(base, g_dir, 3 * s1, s1), progress=not args.json, task=hard)
    times["grpo"] = time.perf_counter() - t2
    grpo_curve = [(0.0, rows["student base"]["pass@1"], rows["student base"]["se"])]
    for k in (1, 2, 3):
        ck = os.path.join(g_dir, "checkpoints", f"step_{k * s1}")
        s = score(ck, transfer_too=k in (1, 3))
        f = grpo_flops(g_dir, Ns, k * s1)
        grpo_curve.append((f, s["pass@1"], s["se"]))
        if k in (1, 3):
            rows[f"GRPO alone, {k}x FLOPs"] = {**s, "flops": f}

    # --- on-policy distillation at the same budget
    t3 = time.perf_counter()
    o_dir = os.path.join(args.out, "onpolicy")
    oc = distill.OnPolicyConfig(model=base, teacher=teacher, out=o_dir, steps=s_opd, prompts_per_step=args.prompts,
                                samples_per_prompt=args.opd_samples, max_new_tokens=args.max_new_tokens,
                                lr=args.opd_lr, kl="exact", beta=1.0, save_every=math.ceil(s_opd / 3), seed=0)
    if latest_checkpoint(o_dir) is None:
        distill.train_onpolicy(oc, progress=not args.json, task=hard, plot=True)
    times["onpolicy"] = time.perf_counter() - t3
    opd_curve = [(0.0, rows["student base"]["pass@1"], rows["student base"]["se"])]
    for step in list_checkpoints(o_dir):
        ck = os.path.join(o_dir, "checkpoints", f"step_{step}")
        last = step == s_opd
        s = score(ck, transfer_too=last)
        f = opd_flops(o_dir, Ns, Nt, step)
        opd_curve.append((f, s["pass@1"], s["se"]))
        if last:
            rows["on-policy distillation"] = {**s, "flops": f}

    # --- half the budget as trace SFT, the other half as on-policy distillation from there: the order of the Qwen3
    # report (off-policy distillation first, then on-policy), since a student that never samples a right chain
    # learns slowly from its own samples (the row above)
    t_half = time.perf_counter()
    h_dir, ho_dir = os.path.join(args.out, "sft_half"), os.path.join(args.out, "sft_half_onpolicy")
    if latest_checkpoint(h_dir) is None:
        sft.train(dataclasses.replace(sc, out=h_dir, steps=max(1, sft_steps // 2)), progress=not args.json)
    spent = gen_flops + sft_flops(h_dir, Ns)
    s_half = max(3, round((budget - spent) / opd_step))
    if latest_checkpoint(ho_dir) is None:
        distill.train_onpolicy(dataclasses.replace(oc, model=os.path.join(h_dir, "latest"), out=ho_dir, steps=s_half,
                                                   save_every=0), progress=not args.json, task=hard)
    rows["trace SFT 1/2 -> on-policy 1/2"] = {**score(os.path.join(ho_dir, "latest")),
                                              "flops": spent + opd_flops(ho_dir, Ns, Nt)}
    times["sft_then_onpolicy"] = time.perf_counter() - t_half

    # --- distilled, then GRPO (1x budget of GRPO more)
    t4 = time.perf_counter()
    dg_dir = os.path.join(args.out, "distill_grpo")
    if latest_checkpoint(dg_dir) is None:
        grpo.train(grpo_cfg(os.path.join(sft_dir, "latest"), dg_dir, s1, 0), progress=not args.json, task=hard)
    rows["distilled -> GRPO"] = {**score(os.path.join(dg_dir, "latest")), "flops": budget + grpo_flops(dg_dir, Ns)}

    # --- SFT on the unfiltered samples, same number of steps
    u_dir = os.path.join(args.out, "sft_unfiltered")
    if latest_checkpoint(u_dir) is None:
        sft.train(sft.SFTConfig(model=base, data=everything, out=u_dir, steps=sft_steps, batch_size=8, seq_len=256,
                                lr=args.sft_lr, seed=0), progress=not args.json)
    rows["SFT on unfiltered samples"] = {**score(os.path.join(u_dir, "latest")),
                                         "flops": gen_flops + sft_flops(u_dir, Ns)}
    times["rest"] = time.perf_counter() - t4
    plot = os.path.join(args.out, "distill_flops.png")
    plot_flops({"GRPO alone": grpo_curve, "on-policy distillation": opd_curve},
               {name: (rows[name]["flops"], rows[name]["pass@1"], rows[name]["se"])
                for name in ("distilled (trace SFT)", "trace SFT 1/2 -> on-policy 1/2")}, plot,
               teacher=rows["teacher"]["pass@1"])
    minutes = (time.perf_counter() - t0) / 60

    T, D = rows["teacher"], rows["distilled (trace SFT)"]
    G, P = rows["GRPO alone, 1x FLOPs"], rows["on-policy distillation"]
    diff_se = lambda a, b: math.sqrt(a["se"] ** 2 + b["se"] ** 2)
    goals = {
        "distill_keeps_90pct_of_teacher": D["pass@1"] >= 0.9 * T["pass@1"] and 3 * Ns <= Nt,
        "distill_beats_grpo_by_2se": D["pass@1"] - G["pass@1"] > 2 * diff_se(D, G),
        "opd_at_least_trace_sft": P["pass@1"] >= D["pass@1"],
        "opd_vs_sft_within_noise": abs(P["pass@1"] - D["pass@1"]) <= 2 * diff_se(P, D),
        "sft_then_opd_at_least_trace_sft": rows["trace SFT 1/2 -> on-policy 1/2"]["pass@1"] >= D["pass@1"],
        "under_20_min_teacher_cached": (not built) and minutes < 20,
        "under_35_min": minutes < 35,
    }
    K = args.samples
    lines = [f"Distillation in miniature: teacher = R1-Zero tiny ({n_t['total_params']:,} params, {Nt:,} active), "
             f"student = nano, dense ({n_s['total_params']:,} params, {Ns:,} active = {Ns / Nt:.2f}x); held-out "
             f"4-number sums n={args.n}, K={K}, T 0.6, top-p 0.95; transfer: 3- and 5-number sums n={args.transfer_n}",
             f"{'model':<30}{'pass@1':>8}{'+-SE':>7}{'maj@' + str(K):>7}{'pass@' + str(K):>8}{'length':>8}"
             f"{'3-num':>7}{'5-num':>7}{'GFLOPs':>9}"]
    for name, s in rows.items():
        lines.append(f"{name:<30}{s['pass@1']:>8.3f}{s['se']:>7.3f}{s['maj@k']:>7.3f}{s['pass@k']:>8.3f}"
                     f"{s['mean_length']:>8.1f}{s['transfer3_pass@1']:>7.3f}{s['transfer5_pass@1']:>7.3f}"
                     f"{s['flops'] / 1e9:>9.1f}")
    lines.append("yield: " + ", ".join(f"{r['filter']} {r['remaining']}" for r in gen["yield"]))
    lines.append(f"GRPO {s1} steps a budget ({3 * s1} run), on-policy {s_opd} steps, SFT {sft_steps} steps "
                 f"(half: {sft_steps // 2} SFT + {s_half} on-policy); "
                 f"pass@1 vs FLOPs in {plot}")
    lines.append("goals: " + ", ".join(f"{k} {v}" for k, v in goals.items()))
    lines.append("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + f", total {minutes * 60:.0f}")
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        key = {"teacher": "teacher", "student base": "student_base", "distilled (trace SFT)": "distill",
               "GRPO alone, 1x FLOPs": "grpo", "GRPO alone, 3x FLOPs": "grpo3x", "on-policy distillation": "opd",
               "distilled -> GRPO": "distill_grpo", "SFT on unfiltered samples": "unfiltered_sft",
               "trace SFT 1/2 -> on-policy 1/2": "sft_opd"}
        summary = {f"{key[name]}_{m}": s[m] for name, s in rows.items() for m in
                   ("pass@1", "se", "maj@k", "pass@k", "mean_length", "transfer3_pass@1", "transfer5_pass@1", "flops")}
        summary.update({"teacher_active_params": Nt, "teacher_total_params": n_t["total_params"],
                        "student_active_params": Ns, "student_total_params": n_s["total_params"],
                        "yield": {r["filter"]: r["remaining"] for r in gen["yield"]}, "grpo_steps_1x": s1,
                        "opd_steps": s_opd, "sft_steps": sft_steps, "goals": goals, "teacher_built": built,
                        "curves": {"grpo": grpo_curve, "opd": opd_curve}, "plot": plot,
                        "seconds": {k: round(v, 1) for k, v in times.items()}, "minutes": round(minutes, 2)})
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""`make demo` / `nanoseek demo`: DeepSeek's story in miniature on a CPU, from a fresh clone, with a report card.

Stages (each prints one progress line):
  1. data       the R1-Zero curriculum (nanoseek/tasks/curriculum.py): tokenizer and token shards
  2. pretrain   the `tiny` MoE with MLA, multi-token prediction and auxiliary-loss-free balancing
  3. eval base  held-out four-number sums: pass@1 (T 0.6, top-p 0.95), maj@4, response length
  4. R1-Zero    GRPO from rule rewards only (DeepSeek-R1 section 2.2), then the same evaluation
  5. distill    rejection-sampled traces from the R1-Zero model, SFT of the smaller `nano` student (R1 section
                2.4), evaluated beside its teacher
  6. serve      `nanoseek serve` on the R1-Zero model, one question through the `openai` client, reasoning and
                answer printed apart, server stopped
  7. transformers  the final checkpoint loaded by transformers, logits compared
  8. report     RUN_DIR/report.md: machine, versions, time per stage, the table, PNG plots

`--quick` runs the same stages at toy size (a smoke test of the whole path; its numbers mean nothing).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from nanoseek.accounting import param_counts
from nanoseek.data import prepare_data
from nanoseek.eval import EvalConfig, evaluate
from nanoseek.io_utils import atomic_write_text
from nanoseek.machine import describe
from nanoseek.model import Transformer
from nanoseek.plot import pyplot, save_figure
from nanoseek.serve.server import free_port
from nanoseek.tasks.curriculum import hard_task, write_corpus
from nanoseek.tasks.rewards import extract_answer
from nanoseek.tokenizer import load_tokenizer, train_tokenizer
from nanoseek.train import distill, grpo, pretrain, sft


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    threads: int = 0  # torch threads; 0 keeps torch's default (all cores)
    seed: int = 2  # pretraining draw; the R1-Zero lift depends on it (BENCHMARKS.md, "make demo")
    easy_docs: int = 8000
    # four-number sums worked as a chain of easy steps, and answered in one step. Twice as many worked as
    # one-step: with 800 + 800 some pretraining draws never learned to copy the third operand into the chain,
    # and with many one-step answers those become accurate enough that GRPO reinforces them instead of the
    # chains (BENCHMARKS.md, "make demo")
    hard_docs: int = 1600
    direct_docs: int = 800
    pretrain_steps: int = 1200
    pretrain_batch: int = 16
    grpo_steps: int = 90
    grpo_prompts: int = 16
    grpo_group: int = 8
    max_new_tokens: int = 48
    eval_n: int = 200  # held-out problems
    eval_samples: int = 4
    # At T 0.6 the teacher writes nearly the same chain for a problem every time, so distinct problems, not more
    # samples of each, are what teach the small student to copy the question's numbers (BENCHMARKS.md, distillation)
    distill_prompts: int = 3200
    distill_generations: int = 1
    student_pretrain_steps: int = 1000
    student_epochs: float = 8.0  # ~2500 traces, ~1270 updates: the student copies the operands after ~400
    serve: bool = True

    @classmethod
    def quick(cls, out: str = "runs/demo-quick") -> DemoConfig:
        """Every stage at toy size: the whole path in about a minute."""
        return cls(out=out, easy_docs=400, hard_docs=60, direct_docs=60, pretrain_steps=8, pretrain_batch=8,
                   grpo_steps=2, grpo_prompts=4, grpo_group=4, max_new_tokens=24, eval_n=8, eval_samples=2,
                   distill_prompts=16, distill_generations=1, student_pretrain_steps=4, student_epochs=1.0)


class Stages:
    """Times the stages and prints one line each: `[k/8] name ... done in s`."""

    names = ("data", "pretrain", "eval base", "R1-Zero (GRPO)", "distill", "serve", "transformers", "report")

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name: str, detail: str = ""):
        k = self.names.index(name) + 1
        print(f"[{k}/{len(self.names)}] {name}{': ' + detail if detail else ''}", flush=True)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - t
        print(f"      done in {self.seconds[name]:.0f} s", flush=True)


def _score(model_dir: str, dc: DemoConfig, task) -> dict:
    model = Transformer.from_pretrained(model_dir).eval()
    ec = EvalConfig(n=dc.eval_n, samples=dc.eval_samples, max_new_tokens=dc.max_new_tokens, batch_size=128, seed=0)
    s = evaluate(model, load_tokenizer(model_dir), task, ec)
    counts = param_counts(model.config)
    return {**s, "total_params": counts["total_params"], "active_params": counts["active_params"]}


def _row(s: dict) -> str:
    return (f"pass@1 {s['pass@1']:.3f}, maj@{s['k']} {s['maj@k']:.3f}, mean length {s['mean_length']:.1f} tokens")


def run(dc: DemoConfig) -> dict:
    """Run every stage; returns the report as a dict (also written to RUN_DIR/report.md)."""
    if dc.threads:
        torch.set_num_threads(dc.threads)
    if os.path.isdir(dc.out):
        shutil.rmtree(dc.out)
    os.makedirs(dc.out)
    stage, task, models, plots = Stages(), hard_task(4), {}, {}

    with stage("data", f"R1-Zero curriculum ({dc.easy_docs} easy sums, {dc.hard_docs} worked and {dc.direct_docs} "
                       "one-step four-number sums)"):
        corpus = os.path.join(dc.out, "corpus.jsonl")
        write_corpus(corpus, dc.easy_docs, dc.hard_docs, dc.direct_docs)
        train_tokenizer([corpus], 512, os.path.join(dc.out, "tokenizer"))
        data = os.path.join(dc.out, "data")
        prepare_data([corpus], os.path.join(dc.out, "tokenizer"), data, show_progress=False)

    with stage("pretrain", f"tiny MoE, {dc.pretrain_steps} steps of {dc.pretrain_batch} x 128 tokens"):
        tc = pretrain.TrainConfig(preset="tiny", data=data, out=os.path.join(dc.out, "base"), steps=dc.pretrain_steps,
                                  batch_size=dc.pretrain_batch, seq_len=128, lr=3e-3, eval_every=0, seed=dc.seed)
        result = pretrain.train(tc, progress=True, plot=True)
        base = os.path.join(tc.out, "latest")
        plots["loss"], plots["expert_load"] = (os.path.join(tc.out, n) for n in ("loss.png", "expert_load.png"))
        print(f"      final loss {result['final_loss']:.3f}")

    with stage("eval base", f"{dc.eval_n} held-out four-number sums x {dc.eval_samples} samples"):
        models["base"] = _score(base, dc, task)
        print("      " + _row(models["base"]))

    with stage("R1-Zero (GRPO)", f"{dc.grpo_steps} steps, rule rewards only (accuracy + format)"):
        gc = grpo.GRPOConfig(model=base, task="arithmetic", out=os.path.join(dc.out, "r1zero"), steps=dc.grpo_steps,
                             prompts_per_step=dc.grpo_prompts, group_size=dc.grpo_group,
                             max_new_tokens=dc.max_new_tokens, lr=3e-4, eps_high=0.28, aggregation="dapo", seed=0)
        grpo.train(gc, progress=True, task=task, plot=True)
        teacher = os.path.join(gc.out, "latest")
        plots["reward"], plots["response_length"] = (os.path.join(gc.out, n) for n in ("reward.png",
                                                                                         "response_length.png"))
        models["R1-Zero"] = _score(teacher, dc, task)
        print("      " + _row(models["R1-Zero"]))

    student = _distill_stage(stage, dc, data, teacher, task)
    models["student (distilled)"] = student["scores"]
    served = _serve_stage(stage, dc, teacher, task)
    check = _transformers_stage(stage, student["model"])

    with stage("report", os.path.join(dc.out, "report.md")):
        plots["pass@1"] = _plot_pass1(models, os.path.join(dc.out, "pass1.png"))
        report = {"config": asdict(dc), "models": models, "seconds": stage.seconds, "transformers": check,
                  "served": served,
                  "plots": {k: os.path.relpath(v, dc.out) for k, v in plots.items() if os.path.exists(v)}}
        atomic_write_text(os.path.join(dc.out, "report.md"), report_markdown(report))
    print(f"report: {os.path.join(dc.out, 'report.md')}")
    return report


def _distill_stage(stage: Stages, dc: DemoConfig, data: str, teacher: str, task) -> dict:
    """R1's distillation (section 2.4): pretrain the dense `nano` student on the same corpus, sample the R1-Zero
    teacher on many train prompts and keep only verified, well-formed, distinct traces, then SFT the student on
    them and evaluate it beside the teacher."""
    k = dc.distill_generations
    with stage("distill", f"`nano` student; {k} sample{'s' if k > 1 else ''} on each of {dc.distill_prompts} prompts "
                          "from the R1-Zero model, verified, then SFT"):
        tc = pretrain.TrainConfig(preset="nano", data=data, out=os.path.join(dc.out, "student_base"),
                                  steps=dc.student_pretrain_steps, batch_size=dc.pretrain_batch, seq_len=128, lr=3e-3,
                                  eval_every=0, seed=0)
        pretrain.train(tc, progress=True)
        traces = os.path.join(dc.out, "traces.jsonl")
        gc = distill.GenerateConfig(teacher=teacher, out=traces, num_prompts=dc.distill_prompts,
                                    num_generations=dc.distill_generations, max_new_tokens=dc.max_new_tokens,
                                    batch_prompts=64, seed=0)
        try:
            gen = distill.generate_traces(gc, task=task, progress=True)
        except ValueError as e:  # a teacher with no right answer at all (a --quick toy model)
            print(f"      {e}\n      training the student on the unfiltered samples instead")
            gen = distill.generate_traces(replace(gc, out=traces + ".unfiltered", unfiltered=True), task=task)
            traces = gen["out"]
        print("      " + distill.format_yield(gen["yield"]).replace("\n", "\n      "))
        sc = sft.SFTConfig(model=os.path.join(tc.out, "latest"), data=traces, out=os.path.join(dc.out, "student"),
                           epochs=dc.student_epochs, batch_size=8, seq_len=256, lr=1e-3, seed=0)
        sft.train(sc, progress=True)
        scores = _score(os.path.join(sc.out, "latest"), dc, task)
        print("      " + _row(scores))
        return {"model": os.path.join(sc.out, "latest"), "scores": scores, "traces_kept": gen.get("kept")}


def _serve_stage(stage: Stages, dc: DemoConfig, model_dir: str, task) -> dict:
    """`nanoseek serve` in a child process, one question through the openai client, then the server stopped."""
    if not dc.serve:
        return {}
    try:
        import openai
    except ImportError:
        print("[6/8] serve: skipped (the serve and test extras are not installed)")
        return {}
    example = task.sample(1, "test", seed=7)[0]
    question = example.prompt
    with stage("serve", f"nanoseek serve on the R1-Zero model; asking {question!r} through the openai client"):
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", model_dir, "--port", str(port),
                                   "--max-seq-len", "512"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  env={**os.environ, "NANOSEEK_COMPILE": "0"})  # one question: not worth a compile
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            _wait_for(server, lambda: client.models.list())
            reply = client.chat.completions.create(
                model=client.models.list().data[0].id, messages=[{"role": "user", "content": question}],
                max_tokens=dc.max_new_tokens, temperature=0.6, top_p=0.95, seed=0)
        finally:
            server.terminate()
            server.wait(timeout=30)
        message = reply.choices[0].message
        reasoning = getattr(message, "reasoning_content", None) or (message.model_extra or {}).get("reasoning_content")
        print(f"      reasoning: {reasoning!r}\n      answer:    {message.content!r}")
        given = extract_answer(message.content or "")
        return {"question": question, "reasoning": reasoning, "answer": message.content, "expected": example.answer,
                "correct": given is not None and task.check(given, example),
                "completion_tokens": reply.usage.completion_tokens}


def _wait_for(server: subprocess.Popen, ready, timeout: float = 120) -> None:
    """Poll `ready()` until it stops raising; fail with the server's own words if it exits first."""
    deadline = time.time() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"nanoseek serve exited: {server.stderr.read().decode()[-2000:]}")
        try:
            ready()
            return
        except Exception:  # not listening yet
            if time.time() > deadline:
                raise
            time.sleep(0.3)


def _transformers_stage(stage: Stages, model_dir: str) -> dict:
    with stage("transformers", f"transformers loads {model_dir}"):
        try:
            import transformers
        except ImportError:
            print("      transformers is not installed: skipped")
            return {}
        transformers.logging.set_verbosity_error()  # it lists the MTP layer's tensors, which it does not model
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ours = Transformer.from_pretrained(model_dir, dtype=torch.float32)
        tok = load_tokenizer(model_dir)
        x = torch.tensor([tok.encode("What is 6 + 3 + 2 + 5?", add_bos=True)])
        with torch.no_grad():
            diff = float((hf(x).logits - ours(x)).abs().max())
        print(f"      {type(hf).__name__}: max |logit difference| {diff:.1e}")
        return {"class": type(hf).__name__, "max_abs_logit_diff": diff, "version": transformers.__version__}


def _plot_pass1(models: dict, path: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    names = list(models)
    ax.bar(names, [models[n]["pass@1"] for n in names], color=["#9aa", "#c63", "#369", "#693"][: len(names)])
    for i, n in enumerate(names):
        ax.text(i, models[n]["pass@1"] + 0.02, f"{models[n]['pass@1']:.2f}", ha="center")
    ax.set_ylim(0, 1.05), ax.set_ylabel("held-out pass@1"), ax.grid(alpha=0.3, axis="y")
    ax.set_title("four-number sums, T 0.6, top-p 0.95")
    return save_figure(fig, path)


def report_markdown(r: dict) -> str:
    """The report card: what ran, on what, how long each stage took, the models side by side, the plots."""
    total = sum(r["seconds"].values())
    lines = ["# nanoseek demo report", "",
             "DeepSeek's recipe in miniature: an MoE with MLA and multi-token prediction pretrained on sums, taught "
             "to reason by reinforcement learning from rule rewards alone (R1-Zero), and its reasoning distilled "
             "into a smaller student.", "",
             f"- machine: {describe()}",
             f"- versions: Python {platform.python_version()}, torch {torch.__version__}",
             f"- total time: {total / 60:.1f} minutes", "",
             "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in r["seconds"].items()]
    k = r["config"]["eval_samples"]
    lines += ["", f"Held-out four-number sums: {r['config']['eval_n']} problems x {k} samples at temperature 0.6, "
              "top-p 0.95.", "",
              f"| model | parameters (active) | pass@1 | maj@{k} | mean length (tokens) |", "|---|---:|---:|---:|---:|"]
    for name, s in r["models"].items():
        lines.append(f"| {name} | {s['total_params'] / 1e6:.2f}M ({s['active_params'] / 1e6:.2f}M) | "
                     f"{s['pass@1']:.3f} | {s['maj@k']:.3f} | {s['mean_length']:.1f} |")
    m = r["models"]
    if "base" in m and "R1-Zero" in m:
        lines += ["", f"GRPO moved pass@1 by {100 * (m['R1-Zero']['pass@1'] - m['base']['pass@1']):+.1f} points "
                  f"and the mean response length from {m['base']['mean_length']:.1f} to "
                  f"{m['R1-Zero']['mean_length']:.1f} tokens."]
        ex = m["R1-Zero"]["example"]
        lines += ["", "A held-out answer after GRPO:", "", f"> {ex['prompt']}", ">",
                  f"> `{ex['completion'].strip()}`"]
    if "student (distilled)" in m and "R1-Zero" in m and m["R1-Zero"]["pass@1"] > 0:
        st, te = m["student (distilled)"], m["R1-Zero"]
        lines += ["", f"With {100 * st['active_params'] / te['active_params']:.0f}% of its teacher's active parameters, "
                      f"the distilled student scores {100 * st['pass@1'] / te['pass@1']:.0f}% of its pass@1."]
    if r.get("served"):
        sv = r["served"]
        lines += ["", "Served by `nanoseek serve` and asked through the `openai` client:", "",
                  f"> **user:** {sv['question']}", ">", f"> **reasoning_content:** {sv['reasoning']}", ">",
                  f"> **content:** {sv['answer']}", "",
                  "(a single sample at T 0.6: " + ("right" if sv.get("correct") else f"wrong; the sum is "
                                                   f"{sv.get('expected')}") + ")"]
    if r["transformers"]:
        t = r["transformers"]
        lines += ["", f"transformers {t['version']} loads the final checkpoint as {t['class']}: max |logit "
                  f"difference| {t['max_abs_logit_diff']:.1e}."]
    titles = {"loss": "Pretraining loss", "expert_load": "Expert load (max / mean per MoE layer)",
              "reward": "Reward and accuracy during GRPO", "response_length": "Response length during GRPO",
              "pass@1": "pass@1 per model"}
    for key, rel in r["plots"].items():
        lines += ["", f"## {titles.get(key, key)}", "", f"![{titles.get(key, key)}]({rel})"]
    return "\n".join(lines) + "\n"

"""`make demo` / `nanoseek demo`: the pipeline end to end on built-in defaults, on a CPU, in minutes.

tokenizer (byte-level BPE on the Python standard library's sources) -> token shards -> pretraining of the `tiny`
DeepSeek-V3 (MLA, 16 routed + 1 shared experts, aux-loss-free balancing, MTP) -> plots -> sampling with the
engine, plain and self-speculative with the MTP module -> a check that transformers loads the checkpoint ->
a short report (nanochat-style) written to RUN_DIR/report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

PROMPTS = ["def ", "import os\n", "class Config:\n    def __init__(self"]


def run(out: str, steps: int, batch_size: int, seq_len: int, vocab_size: int, corpus_bytes: int) -> dict:
    from nanoseek.accounting import summary
    from nanoseek.cli import info_table
    from nanoseek.config import ModelConfig
    from nanoseek.data import default_corpus_files, prepare_data
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.model.transformer import Transformer
    from nanoseek.plot import plot_run
    from nanoseek.tokenizer import load_tokenizer, train_tokenizer
    from nanoseek.train.pretrain import TrainConfig, train

    t_start = time.time()
    report: dict = {}
    for name in ("tiny", "v3"):
        print(info_table(name, ModelConfig.from_preset(name), summary(ModelConfig.from_preset(name))), "\n")
    if os.path.isdir(out):
        shutil.rmtree(out)
    files = default_corpus_files(max_bytes=corpus_bytes)
    print(f"[1/5] tokenizer: byte-level BPE, {vocab_size} tokens, on {len(files)} standard-library files")
    train_tokenizer(files, vocab_size, os.path.join(out, "tokenizer"))
    print("[2/5] data: token shards with a held-out split")
    manifest = prepare_data(files, os.path.join(out, "tokenizer"), os.path.join(out, "data"))
    report["train_tokens"] = manifest["splits"]["train"]["tokens"] if "splits" in manifest else None
    print(f"[3/5] pretraining tiny for {steps} steps of {batch_size} x {seq_len} tokens")
    tc = TrainConfig(preset="tiny", data=os.path.join(out, "data"), out=os.path.join(out, "run"), steps=steps,
                     batch_size=batch_size, seq_len=seq_len, eval_every=max(1, steps // 5))
    result = train(tc)
    report.update(final_loss=result["final_loss"], val_loss=result["val_loss"])
    plots = plot_run(tc.out)
    print("       plots:", ", ".join(os.path.relpath(p) for p in plots))

    print("[4/5] sampling from the trained model")
    ckpt = os.path.join(tc.out, "latest")
    tok = load_tokenizer(ckpt)
    model = Transformer.from_pretrained(ckpt)
    engine = Engine(model, max_batch_size=len(PROMPTS), max_seq_len=512)
    prompts = [tok.encode(p, add_bos=True) for p in PROMPTS]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=48, temperature=0.8, top_p=0.95, seed=0,
                                                   stop_token_ids=(tok.eos_id,)))
    for p, o in zip(PROMPTS, outs):
        print("  ---\n  " + (p + tok.decode(o, skip_special=True)).replace("\n", "\n  "))
    greedy = SamplingParams(max_new_tokens=64, temperature=0.0)
    plain = engine.generate(prompts[:1], greedy)
    spec = engine.generate(prompts[:1], greedy, speculative=True)  # untimed: the first call allocates
    acceptance = engine.stats.acceptance_rate
    ratios = []
    for _ in range(5):  # one timing is noise at this size: median of 5 alternating pairs
        t0 = time.perf_counter()
        engine.generate(prompts[:1], greedy)
        t1 = time.perf_counter()
        engine.generate(prompts[:1], greedy, speculative=True)
        ratios.append((t1 - t0) / (time.perf_counter() - t1))
    ratios.sort()
    report.update(spec_identical=plain == spec, acceptance_rate=acceptance, spec_speedup=ratios[2],
                  spec_speedup_range=[ratios[0], ratios[-1]])
    print(f"  self-speculative decoding with the MTP module: same tokens as greedy = {plain == spec}, "
          f"acceptance {acceptance:.0%}, {ratios[2]:.2f}x the plain decode speed (median of 5, range "
          f"{ratios[0]:.2f}-{ratios[-1]:.2f}x; benchmarks/decode.py --speculative times it with more repeats)")

    print("[5/5] transformers loads the checkpoint")
    try:
        import transformers
        transformers.logging.set_verbosity_error()  # it lists the MTP layer's tensors, which it does not model
        hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        x = torch.tensor([prompts[2]])
        with torch.no_grad():
            diff = float((hf(x).logits - model(x)).abs().max())
        report["transformers_max_logit_diff"] = diff
        print(f"  {type(hf).__name__}: max |logit difference| = {diff:.2e}")
    except ImportError:
        print("  (transformers is not installed: skipped)")
    report["minutes"] = (time.time() - t_start) / 60
    lines = ["# nanoseek demo report", ""] + [f"- {k}: {v}" for k, v in report.items()]
    from nanoseek.io_utils import atomic_write_text
    atomic_write_text(os.path.join(out, "report.md"), "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return report


def cmd_demo(args: argparse.Namespace) -> None:
    report = run(args.out, args.steps, args.batch_size, args.seq_len, args.vocab_size, args.corpus_bytes)
    if args.json:
        print(json.dumps(report))


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="tokenizer -> data -> pretrain tiny -> sample, on built-in defaults")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--corpus-bytes", type=int, default=8_000_000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

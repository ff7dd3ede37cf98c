"""The `nanoseek` command (also `python -m nanoseek`). Each subcommand is a thin shell over a module."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

# Modules that register their own subcommands with `add_cli(subparsers)`, imported only if present.
PLUGIN_MODULES = ("nanoseek.tokenizer", "nanoseek.data", "nanoseek.train.pretrain", "nanoseek.plot")


def _load_config(preset_or_dir: str):
    from nanoseek.config import PRESETS, ModelConfig
    if os.path.isdir(preset_or_dir) or preset_or_dir.endswith(".json"):
        return ModelConfig.from_json(preset_or_dir)
    if preset_or_dir in PRESETS:
        return ModelConfig.from_preset(preset_or_dir)
    raise SystemExit(f"nanoseek: {preset_or_dir!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint "
                     "directory with a config.json")


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def info_table(name: str, c, s: dict) -> str:
    kv, fl, by = s["kv_cache_bytes_per_token"], s["flops_per_token"], s["by_part"]
    rows = [
        f"nanoseek info: {name} ({c.model_type}, {c.num_hidden_layers} layers, d={c.hidden_size}, "
        f"{c.n_routed_experts} routed + {c.n_shared_experts} shared experts, top-{c.num_experts_per_tok})",
        "",
        f"{'parameters':<28}{'count':>12}",
        f"{'  main model (total)':<28}{_human(s['total_params']):>12}",
        f"{'  active per token':<28}{_human(s['active_params']):>12}   "
        f"({100 * s['active_params'] / s['total_params']:.1f}%)",
        f"{'  MTP modules (own)':<28}{_human(s['mtp_params']):>12}",
    ]
    for part in ("embedding", "output_head", "attention", "dense_ffn", "moe_ffn", "norms"):
        rows.append(f"{'    ' + part:<28}{_human(by[part]):>12}")
    rows += [
        "",
        f"{'KV cache per token (' + kv['dtype'] + ')':<28}{'bytes':>12}{'MLA is':>10}",
        f"{'  MLA latent (c_kv+k_rope)':<28}{kv['mla']:>12,}{'':>10}",
        f"{'  MHA, same heads':<28}{kv['mha']:>12,}{100 * kv['mla_over_mha']:>9.2f}%",
        f"{'  GQA, 8 KV heads':<28}{kv['gqa8']:>12,}{100 * kv['mla_over_gqa8']:>9.2f}%",
        "",
        f"FLOPs per token at {fl['context']} context: forward {_human(fl['forward'])}, "
        f"training {_human(fl['train'])}",
    ]
    return "\n".join(rows)


def cmd_info(args) -> None:
    from nanoseek.accounting import summary
    c = _load_config(args.model)
    s = summary(c)
    if args.json:
        print(json.dumps(s))
    else:
        print(info_table(args.model, c, s))


def cmd_demo(args) -> None:
    """What exists so far, end to end on built-in defaults: accounting for every preset, then a tiny model's
    forward pass, a checkpoint round trip in the transformers layout, and a few training steps."""
    import torch

    from nanoseek import ModelConfig, Transformer
    from nanoseek.accounting import summary
    from nanoseek.config import PRESETS

    for name in PRESETS:
        print(info_table(name, ModelConfig.from_preset(name), summary(ModelConfig.from_preset(name))), "\n")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (4, 64))
    with torch.no_grad():
        logits, mtp = model(x, return_mtp=True)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    print(f"tiny forward: logits {list(logits.shape)}, MTP logits {[list(t.shape) for t in mtp]}, "
          f"loss at init {loss:.3f} (ln vocab = {torch.log(torch.tensor(float(cfg.vocab_size))):.3f})")
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        again = Transformer.from_pretrained(d)
        with torch.no_grad():
            same = torch.equal(again(x), logits)
        print(f"checkpoint round trip ({', '.join(sorted(os.listdir(d)))}): logits identical = {same}")
    # Memorise one batch for a few steps: the loss must fall, MTP and all.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        logits, mtp = model(x, return_mtp=True)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        mtp_loss = torch.nn.functional.cross_entropy(mtp[0][:, :-1].flatten(0, 1), x[:, 2:].flatten())
        (loss + 0.3 * mtp_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == 1:
            print(f"step {step:3d}  loss {loss.item():.3f}  mtp loss {mtp_loss.item():.3f}  "
                  f"{(time.time() - t0) / step:.2f} s/step")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 / R1 in one small PyTorch codebase")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameters, active parameters, KV-cache bytes and FLOPs of a preset or checkpoint")
    s.add_argument("model", metavar="PRESET_OR_DIR")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("demo", help="run what nanoseek can do on built-in defaults")
    s.add_argument("--steps", type=int, default=20)
    s.set_defaults(func=cmd_demo)

    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            if e.name != name:  # the module exists but is broken: say so
                raise
            continue
        module.add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, not a traceback
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

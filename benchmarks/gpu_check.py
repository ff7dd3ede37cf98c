"""What only a CUDA machine can check, in one command (`make gpu-check`), in under 8 minutes:

  1. the CUDA-only tests: block-scaled FP8 torch._scaled_mm against the exact emulation (Hopper), transformers
     loading the FP8 export on CUDA;
  2. with 2 or more GPUs, NCCL: `torchrun --nproc_per_node 2 -m nanoseek pretrain --ep 2` on a tiny corpus (FSDP2 +
     expert parallelism, one process per GPU), against the same run on 1 GPU;
  3. the decode, train and FP8 benchmarks, short settings.

Every step has its own time limit; every number goes into one JSON file (default benchmarks/out/gpu_check.json),
with each step's exit status and the tail of its output. On a machine without CUDA it says so and exits 0.

    python benchmarks/gpu_check.py [--out FILE] [--budget 460]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(name: str, cmd: list[str], limit: float, results: dict, env: dict | None = None) -> str:
    """Run `cmd` from the repository root with a time limit; record status, seconds and the output's tail."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, limit),
                              env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
        status, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    results[name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "tail": out[-3000:]}
    print(f"{name}: {status} in {results[name]['seconds']} s", flush=True)
    return out


def last_json(out: str):
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "gpu_check.json"))
    ap.add_argument("--budget", type=float, default=460, help="seconds for everything (default: 460)")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing to check. Run it on a "
              "machine with an NVIDIA GPU; the CPU test suite is `make test`.")
        return 0
    deadline = time.perf_counter() + args.budget
    left = lambda share: max(5.0, min(share, deadline - time.perf_counter()))  # noqa: E731
    py = sys.executable
    gpus = torch.cuda.device_count()
    results: dict = {"machine": {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus,
                                 "gpu": torch.cuda.get_device_name(0),
                                 "capability": list(torch.cuda.get_device_capability(0)),
                                 "python": platform.python_version()}}

    run("cuda_tests", [py, "-m", "pytest", "-q", "-x", "tests/test_fp8.py::test_scaled_mm_backend_matches_emulation",
                       "tests/test_convert.py::test_transformers_loads_the_fp8_export_on_cuda"], left(120), results)

    if gpus >= 2:
        with tempfile.TemporaryDirectory() as tmp:
            prep = ("from nanoseek.data import default_corpus_files, prepare_data; "
                    "from nanoseek.tokenizer import train_tokenizer; import sys; "
                    "f = default_corpus_files(max_bytes=200_000); train_tokenizer(f, 384, sys.argv[1] + '/tok'); "
                    "prepare_data(f, sys.argv[1] + '/tok', sys.argv[1] + '/data', show_progress=False)")
            run("nccl_data", [py, "-c", prep, tmp], left(60), results)
            flags = ["--preset", "tiny", "--data", f"{tmp}/data", "--steps", "10", "--batch-size", "4",
                     "--seq-len", "32", "--eval-every", "5", "--warmup", "2", "--lr", "1e-2", "--no-plot", "--json"]
            one = run("nccl_one_gpu", [py, "-m", "nanoseek", "pretrain", "--out", f"{tmp}/one", *flags], left(90),
                      results, env={"CUDA_VISIBLE_DEVICES": "0"})
            two = run("nccl_two_gpus_ep2", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                            "-m", "nanoseek", "pretrain", "--out", f"{tmp}/two", "--ep", "2", *flags],
                      left(120), results)
            a, b = last_json(one), last_json(two)
            if a and b:
                results["nccl_compare"] = {"final_loss_one_gpu": a.get("final_loss"),
                                           "final_loss_two_gpus_ep2": b.get("final_loss")}
    else:
        results["nccl"] = f"skipped: {gpus} GPU (NCCL needs 2)"

    for name, cmd, share in (("bench_decode", ["benchmarks/decode.py", "--quick", "--device", "cuda", "--json"], 90),
                             ("bench_train", ["benchmarks/train.py", "--steps", "3", "--json"], 60),
                             ("bench_fp8", ["benchmarks/fp8.py", "--steps", "20", "--json"], 90)):
        out = run(name, [py, *cmd], left(share), results)
        results[name]["numbers"] = last_json(out)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"gpu-check: wrote {args.out}")
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("status") not in (None, 0)]
    if failed:
        print(f"gpu-check: failed or timed out: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

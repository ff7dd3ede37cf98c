"""One line that says what a measurement ran on, for benchmarks and the demo's report."""

from __future__ import annotations

import os
import platform

import torch


def describe() -> str:
    """CPU model (or GPU when CUDA is up), cores, torch threads and the torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{gpu}, "
            f"torch {torch.__version__}")

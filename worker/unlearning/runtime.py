"""What a measurement ran on: recorded beside every benchmark and reliability result, because the
CPU kernel path (AVX2, AVX-512, the portable default) changes the last bits of training."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def runtime_environment() -> dict[str, Any]:
    """torch version, the CPU kernel path torch dispatches to, thread count, machine."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }

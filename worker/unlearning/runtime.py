"""What a measurement ran on: recorded beside every benchmark and reliability result, because the
CPU kernel path (AVX2, AVX-512, the portable default) changes the last bits of training."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import torch

#: the packages besides torch whose versions can move a trained model's draw (data generation,
#: the ViT, the adapter): a rebuilt venv with the same torch gave another digits v1 (3 Dec 2026)
PACKAGES = ("numpy", "scikit-learn", "transformers", "peft", "safetensors")


def package_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`PACKAGES` (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def settle(device: str) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously): a wall time read after
    this covers the kernels, not only their launch. A no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def runtime_environment() -> dict[str, Any]:
    """torch version, the CPU kernel path torch dispatches to, thread count, machine, and the
    other packages' versions (:func:`package_versions`)."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "packages": package_versions(),
    }

"""Where a measurement ran: repository commit, CPU model, GPU name, llama.cpp backend."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_GPU_BACKENDS = ("CUDA", "ROCm", "HIP", "Metal", "Vulkan", "SYCL", "OpenCL")


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of this repository (suffixed "-dirty" with uncommitted changes); in a copy
    without .git (a benchmark machine), ``$ALLOCMOE_COMMIT`` as set by whoever copied it."""
    head = _run(["git", "rev-parse", "HEAD"], REPO)
    if head and _run(["git", "status", "--porcelain", "--untracked-files=no"], REPO):
        head += "-dirty"
    return head or os.environ.get("ALLOCMOE_COMMIT")


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def gpu_names() -> list[str]:
    """GPU names reported by nvidia-smi (empty without one)."""
    out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return [line.strip() for line in out.splitlines() if line.strip()] if out else []


def gpu_devices(report: dict[str, Any]) -> list[dict[str, str]]:
    """The devices of `runtime.doctor()`'s library that layers can be offloaded to (every backend but the CPU's)."""
    return [d for d in report.get("devices") or [] if d.get("backend") != "CPU"]


def backend(report: dict[str, Any]) -> str:
    """"CPU", or the GPU backend ("CUDA", "Vulkan", ...) that `runtime.doctor()`'s library offloads to."""
    if not report.get("gpu_offload"):
        return "CPU"
    gpus = gpu_devices(report)
    if gpus:
        return gpus[0]["backend"]
    info = report.get("system_info", "")
    return next((b for b in _GPU_BACKENDS if b in info), "GPU")


def device(report: dict[str, Any], n_gpu_layers: int) -> str | None:
    """What ran the offloaded layers (the first GPU device's description, e.g. "NVIDIA H200" or lavapipe's
    "llvmpipe (LLVM 15.0.6, 256 bits)"), or the CPU model when nothing is offloaded."""
    gpus = gpu_devices(report)
    if n_gpu_layers != 0 and gpus:
        return gpus[0].get("description") or gpus[0].get("name")
    return cpu_model()

"""What this machine can do: which device to train on and which precision it does fast."""

from __future__ import annotations

import os

import torch


def detect_device() -> str:
    """The best device present: cuda, xpu (Intel GPUs), mps (Apple), else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    """The precision to train in.

    `auto` picks bf16 where the device does it fast (CUDA with compute capability 8.0 or
    newer, Intel XPU), fp16 on older CUDA cards and MPS, and fp32 on a CPU: most CPUs
    have no fast bf16 matmul, so bf16 there is slower and less accurate.
    """
    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "xpu":
        return torch.bfloat16
    if device == "mps":
        return torch.float16
    return torch.float32


def cpu_threads() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1

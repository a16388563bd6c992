"""`tunesmith doctor`: what this machine can train with, and in which precision, in one report.

doctor_report() gathers it as a JSON-ready dict; format_doctor() turns that into aligned lines.
Neither raises: a piece that cannot be read is "unknown" (text) or None (a number).
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

from tunesmith.hardware import (
    cpu_features,
    cpu_model_name,
    cpu_threads,
    cuda_native_bf16,
    detect_device,
    explain_dtype,
    four_bit_status,
    memory_info,
)

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "gguf", "tunesmith")
GIB = 2**30


def _safe(read, default):
    """read(), or default where reading this machine failed; the doctor must answer even then."""
    try:
        return read()
    except Exception:
        return default


def package_version(name: str) -> str:
    """The installed version of a distribution, "not installed", or "unknown" where metadata is broken."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
    except Exception:
        return "unknown"


def _devices() -> list[dict]:
    """Every accelerator torch sees, then the CPU."""
    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            devices.append({
                "kind": "cuda", "index": index, "name": torch.cuda.get_device_name(index),
                "compute_capability": f"{major}.{minor}",
                "bf16": cuda_native_bf16(index),
            })
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        for index in range(torch.xpu.device_count()):
            devices.append({"kind": "xpu", "index": index, "name": torch.xpu.get_device_name(index)})
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append({"kind": "mps", "index": 0, "name": "Apple GPU (Metal)"})
    devices.append({"kind": "cpu", "index": 0, "name": _safe(cpu_model_name, "unknown")})
    return devices


def _cpu() -> dict:
    return {
        "model": _safe(cpu_model_name, "unknown"),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": _safe(cpu_threads, None),
        "torch_threads": torch.get_num_threads(),
        "features": sorted(_safe(cpu_features, set())),
        # the widest vector ISA torch's own CPU kernels dispatch to (DEFAULT, AVX2, AVX512, ...)
        "torch_kernels": _safe(lambda: torch.backends.cpu.get_cpu_capability(), "unknown"),
    }


def _suggestions(report: dict) -> list[str]:
    """Short sentences about what this machine means for training; empty when nothing stands out."""
    out = []
    device, dtype = report["device"], report["precision"]["dtype"]
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    if device == "cpu":
        out.append(f"no GPU found: training runs on the CPU in {short}; LoRA on models up to ~1B parameters is practical.")
        if report["cpu"]["torch_kernels"] == "DEFAULT":
            out.append("torch's CPU kernels use no AVX2 here, so expect training to be slow.")
    for gpu in report["devices"]:
        if gpu["kind"] == "cuda" and not gpu["bf16"]:
            out.append(f"GPU {gpu['index']} ({gpu['name']}, compute capability {gpu['compute_capability']}) has no "
                       "fast bf16: auto uses fp16.")
    if not report["four_bit"]["available"]:
        if report["versions"]["bitsandbytes"] == "not installed":
            out.append("QLoRA (method: qlora) needs bitsandbytes: pip install bitsandbytes; use method: lora until then.")
        else:
            out.append("QLoRA (method: qlora) cannot run here (see 4-bit above); use method: lora.")
    usable, logical = report["cpu"]["usable_cpus"], report["cpu"]["logical_cpus"]
    if usable and logical and usable < logical:
        out.append(f"this process may use {usable} of the {logical} CPUs (affinity or a container limit); "
                   "data loading and CPU training get only those.")
    memory = report["memory"]
    free = [v for v in (memory["ram_available_bytes"], memory["ram_limit_bytes"]) if v is not None]
    if free and min(free) < 4 * GIB:
        out.append(f"only {min(free) / GIB:.1f} GiB of RAM is free for this process: pick a model under ~500M "
                   "parameters or close other programs.")
    return out


def doctor_report() -> dict:
    """Devices, CPU, the precision `auto` picks and why, 4-bit status, memory, library versions, suggestions."""
    device = _safe(detect_device, "cpu")
    dtype, reason = _safe(lambda: explain_dtype(device), (torch.float32, "unknown"))
    available, detail = _safe(four_bit_status, (False, "unknown"))
    report = {
        "device": device,
        "devices": _safe(_devices, [{"kind": "cpu", "index": 0, "name": "unknown"}]),
        "cpu": _safe(_cpu, {"model": "unknown", "logical_cpus": None, "usable_cpus": None, "torch_threads": None,
                            "features": [], "torch_kernels": "unknown"}),
        "precision": {"dtype": str(dtype).replace("torch.", ""), "reason": reason},
        "four_bit": {"available": available, "detail": detail},
        "memory": _safe(memory_info, {"ram_total_bytes": None, "ram_available_bytes": None,
                                      "ram_limit_bytes": None, "gpus": []}),
        "versions": {"python": platform.python_version(), **{name: package_version(name) for name in PACKAGES},
                     "cuda (torch build)": torch.version.cuda or "none"},
    }
    report["suggestions"] = _safe(lambda: _suggestions(report), [])
    return report


def _gib(value: int | None) -> str:
    return "unknown" if value is None else f"{value / GIB:.1f} GiB"


def format_doctor(report: dict) -> str:
    """The report as aligned `label  value` lines in sections: devices, precision, 4-bit, memory, versions."""
    lines = []

    def row(label: str, value: object) -> None:
        lines.append(f"  {label:<20} {value}")

    lines.append("devices")
    for dev in report["devices"]:
        label = f"{dev['kind']}:{dev['index']}" + (" (used)" if dev["kind"] == report["device"] and dev["index"] == 0 else "")
        extra = f", compute capability {dev['compute_capability']}, bf16 {'yes' if dev['bf16'] else 'no'}" \
            if dev["kind"] == "cuda" else ""
        row(label, dev["name"] + extra)
    cpu = report["cpu"]
    row("cpu threads", f"{cpu['usable_cpus'] or 'unknown'} usable of {cpu['logical_cpus'] or 'unknown'}, "
                       f"torch uses {cpu['torch_threads'] or 'unknown'}")
    row("cpu features", " ".join(cpu["features"]) or "unknown")
    row("torch cpu kernels", cpu["torch_kernels"])

    lines.append("precision (precision: auto)")
    row("dtype", report["precision"]["dtype"])
    row("why", report["precision"]["reason"])

    lines.append("4-bit (QLoRA)")
    row("available", "yes" if report["four_bit"]["available"] else "no")
    row("detail", report["four_bit"]["detail"])

    memory = report["memory"]
    lines.append("memory")
    row("RAM", f"{_gib(memory['ram_total_bytes'])} total, {_gib(memory['ram_available_bytes'])} available")
    if memory["ram_limit_bytes"] is not None:
        row("container limit", _gib(memory["ram_limit_bytes"]))
    for gpu in memory["gpus"]:
        row(f"{gpu['kind']}:{gpu['index']}", f"{_gib(gpu['total_bytes'])} total, {_gib(gpu['free_bytes'])} free")

    lines.append("versions")
    for name, value in report["versions"].items():
        row(name, value)

    if report["suggestions"]:
        lines.append("suggestions")
        lines.extend(f"  - {text}" for text in report["suggestions"])
    return "\n".join(lines)

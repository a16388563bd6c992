"""What this machine can do: which device to train on, which precision it does fast, whether
4-bit quantisation works, and how much memory there is.

Everything here reads the machine and never raises for an unreadable piece: a missing
/proc file gives an empty set, None or "unknown", so `tunesmith doctor` can always answer.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import torch

# CPU extensions that matter for training speed, as /proc/cpuinfo spells them (x86 `flags`,
# ARM `Features`). amx_* and avx512_bf16 are named when auto explains its precision; the rest are reported.
ML_CPU_FEATURES = (
    "avx", "avx2", "fma", "f16c", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    "neon", "asimd", "asimdhp", "asimddp", "sve", "sve2", "bf16", "i8mm",
)
# bf16 matmuls run natively on Xeons with AVX512_BF16 (3rd gen, Cooper Lake) and AMX (4th gen,
# Sapphire Rapids) and on AMD Zen 4+ (AVX512_BF16); elsewhere bf16 is converted to fp32 and back,
# slower than fp32 itself. Source: Hugging Face Accelerate's IPEX guide
# (https://huggingface.co/docs/accelerate/v0.19.0/usage_guides/ipex) and Intel Neural Compressor's
# mixed-precision notes (https://intel.github.io/neural-compressor/latest/docs/source/mixed_precision.html).
CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16")
FEATURE_NAMES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _read_text(path: str) -> str | None:
    """The file's text, or None where it does not exist or cannot be read (macOS, Windows, sandboxes)."""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def detect_device() -> str:
    """The best device present: cuda, xpu (Intel GPUs), mps (Apple), else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_features_from_cpuinfo(text: str) -> set[str]:
    """The ML_CPU_FEATURES that every processor listed in a /proc/cpuinfo text has."""
    common: set[str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags = set(value.split())
            common = flags if common is None else common & flags
    return (common or set()) & set(ML_CPU_FEATURES)


def cpu_features() -> set[str]:
    """This CPU's training-relevant extensions (avx2, avx512_bf16, amx_bf16, asimd, ...); empty where unreadable."""
    text = _read_text("/proc/cpuinfo")
    return cpu_features_from_cpuinfo(text) if text else set()


def cpu_model_from_cpuinfo(text: str) -> str | None:
    """The first `model name` in a /proc/cpuinfo text (x86 and some ARM kernels), else None."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name" and value.strip():
            return value.strip()
    return None


def cpu_model_name() -> str:
    """The CPU's marketing name, e.g. "Intel(R) Xeon(R) Platinum 8480+"; "unknown" where no source says."""
    text = _read_text("/proc/cpuinfo")
    name = cpu_model_from_cpuinfo(text) if text else None
    if name is None and platform.system() == "Darwin":
        try:
            result = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                    capture_output=True, text=True, timeout=2)
            name = result.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            name = None
    return name or platform.processor() or platform.machine() or "unknown"


def cuda_native_bf16(index: int) -> bool:
    """Whether CUDA device `index` has native bf16 matmuls: compute capability 8.0+ (Ampere), or any ROCm GPU.

    Not torch.cuda.is_bf16_supported(): by default it also answers True where bf16 is only emulated
    (e.g. a T4, 7.5), which is slower than fp16. It answers True for every ROCm device; we follow that.
    """
    return bool(torch.version.hip) or torch.cuda.get_device_capability(index)[0] >= 8


def explain_dtype(device: str) -> tuple[torch.dtype, str]:
    """The dtype `precision: auto` trains in on `device`, and one sentence saying why.

    The one rule for `auto`: bf16 where the device has native bf16 matmuls (CUDA compute
    capability 8.0+, ROCm, Intel XPU), fp16 on older CUDA cards and Apple MPS, fp32 on every CPU
    (on those with AMX-BF16 or AVX512-BF16 too: see below).
    """
    if device == "cuda":
        if torch.version.hip:
            return torch.bfloat16, "AMD GPUs under ROCm run bf16 natively, so auto trains in bf16."
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        if cuda_native_bf16(index):
            return torch.bfloat16, (f"{name} has compute capability {major}.{minor} (8.0 or newer has bf16 "
                                    "tensor cores), so auto trains in bf16.")
        return torch.float16, (f"{name} has compute capability {major}.{minor}, below the 8.0 that bf16 "
                               "tensor cores need, so auto trains in fp16.")
    if device == "xpu":
        return torch.bfloat16, "Intel GPUs (XPU) run bf16 matmuls natively, so auto trains in bf16."
    if device == "mps":
        return torch.float16, "Apple GPUs (MPS) run fp16 natively and bf16 only partly, so auto trains in fp16."
    if device == "cpu":
        found = [f for f in CPU_BF16_FEATURES if f in cpu_features()]
        if found:
            names = " and ".join(FEATURE_NAMES[f] for f in found)
            # Measured on a 2-core AMX Xeon (bench/RESULTS.md, "Precision on a CPU with AMX"): bf16 matmuls run
            # 4-7x faster than fp32 there, yet the quickstart trained at 44.2 tok/s (peak 3.24 GiB) in bf16 against
            # 60.9 tok/s (peak 1.97 GiB) in fp32, because tunesmith's fused CPU paths (LoRA, SwiGLU, RMSNorm, RoPE)
            # are fp32 and bf16 falls back to PEFT's and transformers' own, with their casts.
            return torch.float32, (f"this CPU has {names} (native bf16 matmuls), but tunesmith's fused CPU training "
                                   "paths are fp32, which trained faster and in less memory than bf16 on such a CPU; "
                                   "auto trains in fp32 (model.dtype: bfloat16 asks for bf16).")
        return torch.float32, ("this CPU has neither AMX-BF16 nor AVX512-BF16, so bf16 would be emulated and "
                               "slower than fp32; auto trains in fp32.")
    return torch.float32, f"device {device!r} is not one tunesmith knows the fast precision of, so auto trains in fp32."


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    """The precision to train in: an explicit float32/bfloat16/float16 as asked, `auto` as explain_dtype says."""
    if requested != "auto":
        return DTYPES[requested]
    return explain_dtype(device)[0]


def cpu_threads() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def four_bit_status() -> tuple[bool, str]:
    """Whether bitsandbytes can NF4-quantise on the detected device (what QLoRA needs), and a sentence why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bitsandbytes warns on import where it finds no GPU
            import bitsandbytes
            import bitsandbytes.functional as bnb_functional
    except ImportError:
        return False, "bitsandbytes is not installed; QLoRA needs it: pip install bitsandbytes"
    except Exception as exc:  # a broken install raises all sorts (missing CUDA libraries, RuntimeError)
        return False, f"bitsandbytes is installed but failed to import ({type(exc).__name__}: {exc})."
    version = getattr(bitsandbytes, "__version__", "unknown")
    device = detect_device()
    try:
        # (64, 64): one tiny matrix, 64 blocks of 64; its own generator leaves the global RNG (and runs' seeds) alone
        weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(device)
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        restored = bnb_functional.dequantize_4bit(packed, state).float()  # (64, 64)
        error = ((restored - weight).abs().mean() / weight.abs().mean()).item()
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else ""
        return False, f"bitsandbytes {version} cannot NF4-quantise on {device}: {type(exc).__name__}: {message}"
    # NF4 round-trips a Gaussian with about 10% mean relative error; far more means broken kernels.
    if restored.shape != weight.shape or not math.isfinite(error) or error > 0.3:
        return False, f"bitsandbytes {version} NF4 round trip on {device} is wrong (mean relative error {error:.3g})."
    return True, f"bitsandbytes {version} NF4-quantises on {device} (round-trip mean relative error {error:.3f})."


def ram_from_meminfo(text: str) -> dict[str, int | None]:
    """Total and available RAM in bytes from a /proc/meminfo text; None for a line that is missing."""
    kib: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        parts = value.split()
        if sep and parts and parts[0].isdigit():
            kib[key.strip()] = int(parts[0])  # the kernel writes "kB" and means KiB
    # MemAvailable (kernel 3.14+) counts reclaimable cache; MemFree alone undercounts.
    available = kib.get("MemAvailable", kib.get("MemFree"))
    return {
        "total_bytes": kib["MemTotal"] * 1024 if "MemTotal" in kib else None,
        "available_bytes": available * 1024 if available is not None else None,
    }


def _cgroup_memory_limit() -> int | None:
    """A container's memory limit in bytes (cgroup v2, then v1), or None where there is none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        text = _read_text(path)
        if text is not None and text.strip().isdigit():
            limit = int(text.strip())
            return limit if limit < 2**60 else None  # v1 writes "no limit" as ~2**63
    return None


def memory_info() -> dict:
    """System RAM (total, available, container limit) and each GPU's total and free memory, in bytes.

    {"ram_total_bytes", "ram_available_bytes", "ram_limit_bytes", "gpus": [{"kind", "index", "name",
    "total_bytes", "free_bytes"}]}; a number that cannot be read is None.
    """
    text = _read_text("/proc/meminfo")
    ram = ram_from_meminfo(text) if text else {"total_bytes": None, "available_bytes": None}
    if ram["total_bytes"] is None:
        try:  # macOS has no /proc but answers sysconf
            ram["total_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            pass
    gpus = []
    for kind in ("cuda", "xpu"):
        backend = getattr(torch, kind, None)
        try:
            count = backend.device_count() if backend is not None and backend.is_available() else 0
        except Exception:
            count = 0
        for index in range(count):
            gpu = {"kind": kind, "index": index, "name": "unknown", "total_bytes": None, "free_bytes": None}
            try:
                gpu["name"] = backend.get_device_name(index)
                gpu["free_bytes"], gpu["total_bytes"] = backend.mem_get_info(index)
            except Exception:
                pass
            gpus.append(gpu)
    return {
        "ram_total_bytes": ram["total_bytes"],
        "ram_available_bytes": ram["available_bytes"],
        "ram_limit_bytes": _cgroup_memory_limit(),
        "gpus": gpus,
    }


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def release_free_memory() -> int:
    """Hand the C heap's free pages back to the operating system; returns the bytes released (0 where not glibc).

    glibc keeps freed memory in its heap for reuse.  After quantising a model (every weight read in
    fp32, packed into 4 bits, the fp32 copy freed) that is hundreds of MiB the process keeps
    resident for nothing; `malloc_trim(0)` returns the free pages inside the heap as well as at its
    top (glibc >= 2.8, malloc/malloc.c: mtrim).  Cheap (a walk over the free lists), so safe to call
    between phases, not in hot loops (pages given back are faulted in again when reused).
    """
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl or another C library: nothing to do
        return 0
    before = rss_bytes()
    trim(0)
    return max(before - rss_bytes(), 0)


def peak_rss_bytes() -> int:
    """The most resident memory this process has held (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_snapshot(device: str) -> dict[str, int]:
    snap = {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
    if device == "cuda":
        snap["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        snap["reserved_bytes"] = int(torch.cuda.memory_reserved())
    elif device == "xpu":
        snap["peak_allocated_bytes"] = int(torch.xpu.max_memory_allocated())
        snap["reserved_bytes"] = int(torch.xpu.memory_reserved())
    return snap

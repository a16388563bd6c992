"""Per-step numbers: memory readings and the metrics.jsonl writer."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch


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
        import ctypes

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


class MetricsLog:
    """Appends one JSON object a line to metrics.jsonl, flushed at once so a crash loses nothing.
    With no path (a process other than the first of several) it only keeps the records."""

    def __init__(self, path: Path | None):
        self.path = path
        self.records: list[dict] = []
        self._handle = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]

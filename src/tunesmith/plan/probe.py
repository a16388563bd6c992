"""`tunesmith estimate --probe`: time a run by starting it and stopping it after a few steps.

The run starts as itself (`tunesmith train` in a child process, into a temporary folder that is removed
after), so everything that takes time is measured, not modelled: starting up and reading the data, loading
the model, the base model's evaluation, and the optimiser steps.  The phases are told apart by when the
child's log lines appear ("data: ...", "model loaded ...", "packing: ...") and by each step's own `step_s`
in metrics.jsonl.  After `steps` steps the child is killed (SIGKILL: nothing of it is kept).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.train.child import last_sentence, spawn
from tunesmith.train.metrics_log import read_metrics

PROBE_STEPS = 4  # the first step carries one-off costs (allocations, kernel selection): 3 more give the rate
PROBE_TIMEOUT_S = 1800


def probe(config_path: str | Path, overrides: Sequence[str] = (), steps: int = PROBE_STEPS,
          nproc: int = 1) -> dict:
    """Seconds for each phase of the run's start and for its steps, measured on a few real steps:
    {"startup_s", "load_s", "before_eval_s", "first_step_s", "step_s" (the median after the first), "steps_s"
    (each step's), "steps"}."""
    folder = Path(tempfile.mkdtemp(prefix="tunesmith-probe-"))
    run_dir = folder / "run"
    argv = [sys.executable, "-m", "tunesmith.cli", "train", str(config_path), "--output", str(run_dir),
            "--nproc", str(nproc), "--no-fit-check"]
    argv += [x for item in overrides for x in ("--set", item)]
    argv += ["--set", f"training.max_steps={steps + 1}", "--set", "training.save_steps=null",
             "--set", "training.eval_steps=null"]
    started = time.monotonic()
    seen: dict[str, float] = {}
    run = spawn(argv, run_dir, folder / "probe.log", detach=True)
    try:
        records = _watch(run, folder / "probe.log", run_dir, steps, started, seen)
    finally:
        if run.process.poll() is None:
            os.killpg(run.process.pid, signal.SIGKILL)  # the child and any processes it started
            run.process.wait()
        shutil.rmtree(folder, ignore_errors=True)
    times = [r["step_s"] for r in records]
    rest = times[1:] or times
    data_at = seen.get("data", started)
    loaded_at = seen.get("loaded", data_at)
    levers_at = seen.get("levers", loaded_at)
    return {
        "startup_s": data_at - started,
        "load_s": loaded_at - data_at,
        "before_eval_s": max(levers_at - loaded_at, 0.0),
        "first_step_s": times[0],
        "step_s": statistics.median(rest),
        "steps_s": times,
        "steps": len(records),
    }


_MARKERS = {"data": "data: ", "loaded": "model loaded", "levers": "packing: "}


def _watch(run, log_file: Path, run_dir: Path, steps: int, started: float, seen: dict) -> list[dict]:
    """Wait for `steps` training steps, noting when each phase's log line first appears."""
    while True:
        now = time.monotonic()
        if log_file.is_file():
            text = log_file.read_text(errors="replace")
            for name, marker in _MARKERS.items():
                if name not in seen and marker in text:
                    seen[name] = now
        records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("type") == "train"] \
            if (run_dir / "metrics.jsonl").is_file() else []
        if len(records) >= steps:
            return records[:steps]
        if run.process.poll() is not None:
            if records:
                return records
            said = last_sentence(log_file) or f"it ended with exit code {run.process.returncode}"
            raise UserError(f"--probe: the run stopped before its first step: {said}")
        if now - started > PROBE_TIMEOUT_S:
            raise UserError(f"--probe: no {steps} steps within {PROBE_TIMEOUT_S} s; estimate without --probe.")
        time.sleep(0.1)

"""A training run in a child process, followed from its run folder: what `api.start_run` returns, and what a
sweep (tunesmith.plan.sweep) runs its trials with.  The child is `python -m tunesmith.cli train ...`; its
events are the lines of the folder's metrics.jsonl, then its status.json (tunesmith.train.status)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.train.status import FINAL_STATES, read_status


@dataclass
class RunEvent:
    """One thing that happened in a run: `kind` is "train" or "validation" (a metrics.jsonl line, in `data`),
    or, last, "finished", "failed" or "interrupted" with the run's own sentence in `message`."""

    kind: str
    data: dict = field(default_factory=dict)
    message: str | None = None

    @property
    def final(self) -> bool:
        return self.kind in FINAL_STATES


@dataclass
class RunProcess:
    """A training run in a child process (`start_run`): follow it with `events()`, stop it with `stop()`."""

    run_dir: Path
    process: subprocess.Popen
    log_file: Path  # the child's output (progress bars, and its last sentence if it failed before the run folder)
    started: float = field(default_factory=time.time)

    def events(self, poll_s: float = 0.2) -> Iterator[RunEvent]:
        return follow(self.run_dir, process=self.process, log_file=self.log_file, since=self.started, poll_s=poll_s)

    def stop(self) -> None:
        """Ask the run to save a checkpoint and stop at the end of its step (SIGINT, as Ctrl-C does)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)


def die_with_parent() -> None:
    """In a child, before exec: ask Linux to SIGKILL it when the process that started it dies, however that
    dies, so no child outlives its starter.  Elsewhere there is no such call and nothing happens."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG (prctl(2))
    except (OSError, AttributeError):
        pass


def spawn(argv: list[str], run_dir: Path, log_file: str | Path | None = None, detach: bool = False,
          die_with_starter: bool = False) -> RunProcess:
    """Start `argv` (a `tunesmith train` command line) with its output appended to `log_file` (default a new
    temporary file); with `detach` in a session of its own (a Ctrl-C at the terminal does not reach it), so it
    outlives its starter however that ends, unless `die_with_starter` (Linux) kills it when the starter dies."""
    started = time.time()
    if log_file is None:
        handle, log_name = tempfile.mkstemp(prefix="tunesmith-run-", suffix=".log")
        log = os.fdopen(handle, "wb")
    else:
        log_name = str(log_file)
        log = open(log_name, "ab")  # noqa: SIM115 - closed below, once the child holds its own copy
    with log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=detach, preexec_fn=die_with_parent if die_with_starter else None)
    return RunProcess(Path(run_dir), process, Path(log_name), started)


def last_sentence(log_file: Path | None) -> str:
    """The last line a training process said (`tunesmith ...`), else its last line, from its output file."""
    if log_file is None or not log_file.is_file():
        return ""
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("tunesmith")]
    return (said or lines or [""])[-1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _new_records(metrics: Path, seen: int) -> tuple[list[dict], int]:
    """The complete metrics.jsonl lines after the first `seen`, and the new count."""
    lines = metrics.read_text().splitlines(keepends=True) if metrics.is_file() else []
    if len(lines) < seen:  # a resumed run rewrote the file with the steps it kept
        seen = 0
    complete = [line for line in lines[seen:] if line.endswith("\n")]  # the last may still be being written
    return [json.loads(line) for line in complete], seen + len(complete)


def follow(run_dir: str | Path, process: subprocess.Popen | None = None, log_file: Path | None = None,
           since: float = 0.0, poll_s: float = 0.2, timeout_s: float | None = None) -> Iterator[RunEvent]:
    """The run's events as they happen: each metrics.jsonl line, then one final event from status.json (one
    written at or after `since`, a time.time()).  With `process` (the child running it), a child that ends
    without a status (it failed before the run folder was made, or was killed) ends the events with "failed"
    and its last line; without one, `timeout_s` seconds with no new line and no status end them too."""
    metrics = Path(run_dir) / "metrics.jsonl"
    seen, quiet_since = 0, time.monotonic()
    while True:
        ended = process is not None and process.poll() is not None  # before reading: its last lines are in
        records, seen = _new_records(metrics, seen)
        for record in records:
            quiet_since = time.monotonic()
            yield RunEvent(record.get("type", "train"), record)
        status = read_status(run_dir)
        if status and status.get("state") in FINAL_STATES and status.get("time", 0.0) >= since:
            if process is None or ended:
                yield RunEvent(status["state"], status, status.get("message"))
                return
        elif ended:
            why = last_sentence(log_file) or f"the training process ended with exit code {process.returncode}"
            yield RunEvent("failed", {"exit_code": process.returncode}, why)
            return
        elif timeout_s is not None and time.monotonic() - quiet_since > timeout_s:
            yield RunEvent("failed", {}, f"{run_dir}: no new step for {timeout_s:g} s and no status.json; "
                                         "the run's process may have been killed")
            return
        time.sleep(poll_s)


def stop(run: RunProcess | str | Path, pid: int | None = None) -> bool:
    """Ask a running training to checkpoint and stop (SIGINT, as Ctrl-C does): a `RunProcess`, or a process id
    of a run started elsewhere.  False when there was nothing running to stop."""
    if isinstance(run, RunProcess):
        alive = run.process.poll() is None
        run.stop()
        return alive
    if pid is None or not _alive(pid):
        return False
    os.kill(pid, signal.SIGINT)
    return True

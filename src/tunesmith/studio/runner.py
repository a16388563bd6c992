"""Training runs for the studio: a queue (one run at a time on this machine's device unless told otherwise),
each run a child process started by tunesmith.api.start_run in a session of its own, so it keeps training
when the browser closes or the studio stops, however it stops.

The run folder is the source of truth (metrics.jsonl, status.json, checkpoints); the `runs` table remembers the
queue and the process.  A studio that starts again re-attaches to runs still alive (same process id and the same
process start time, so a reused id is not mistaken for the run) and marks the others from their status.json:
finished, failed with their sentence, or interrupted (resumable when a checkpoint is there).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import uuid
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from tunesmith import api
from tunesmith.errors import UserError
from tunesmith.studio.db import NAME, Run, now
from tunesmith.train.checkpoint import list_checkpoints

log = logging.getLogger(__name__)
ACTIVE = ("running", "stopping")
RUN_STATES = ("queued", "running", "stopping", "finished", "failed", "interrupted")


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, field 22 of /proc/PID/stat), or None when there is
    no such process or no /proc to read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":  # a zombie has ended; only its parent has not collected it yet
        return None
    return fields[19]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "run"


def resumable(run: Run) -> bool:
    return run.state == "interrupted" and bool(list_checkpoints(Path(run.run_dir)))


class RunManager:
    def __init__(self, sessions: sessionmaker, home: Path, poll_s: float = 1.0, slots: int = 1):
        self.sessions = sessions
        self.home = home
        self.poll_s = poll_s
        self.slots = slots  # runs trained at once on this machine
        self.children: dict[int, subprocess.Popen] = {}  # runs this studio started, to collect their exit
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        (home / "configs").mkdir(parents=True, exist_ok=True)
        (home / "runs").mkdir(exist_ok=True)
        (home / "logs").mkdir(exist_ok=True)

    # --- what the pages call

    def submit(self, name: str, config_text: str, project_id: int | None = None, parent_id: int | None = None) -> Run:
        """Queue a new run of the YAML config `config_text` (checked now: a bad key is a sentence, not a
        failed run later)."""
        name = (name or "").strip()[:NAME] or "run"
        config_file = self.home / "configs" / f"{uuid.uuid4().hex}.yaml"
        config_file.write_text(config_text)
        try:
            api.load_config(config_file)
        except UserError as exc:
            config_file.unlink(missing_ok=True)
            raise UserError(str(exc).replace(str(config_file), "the config")) from None
        with self.sessions.begin() as s:
            run = Run(name=name, project_id=project_id, parent_id=parent_id, config_file=str(config_file),
                      run_dir="", state="queued")
            s.add(run)
            s.flush()
            run.run_dir = str(self.home / "runs" / f"{run.id}-{slug(name)}")
            run.log_file = str(self.home / "logs" / f"run-{run.id}.log")
        self._wake.set()
        return run

    def stop(self, run_id: int) -> Run:
        """Ask the run to save a checkpoint and stop (SIGINT, as Ctrl-C); a queued run is taken off the queue."""
        with self._lock, self.sessions.begin() as s:
            run = self._get(s, run_id)
            if run.state == "queued":
                run.state, run.message, run.ended_at = "interrupted", "taken off the queue before it started.", now()
            elif run.state == "running" and run.pid:
                child = self.children.get(run.id)
                if child is not None:
                    api.stop(api.RunProcess(Path(run.run_dir), child, Path(run.log_file or os.devnull)))
                else:
                    api.stop(run.run_dir, pid=run.pid)
                run.state = "stopping"
            else:
                raise UserError(f"run {run.id} is {run.state}; only a queued or running run can be stopped.")
            return run

    def resume(self, run_id: int) -> Run:
        """Queue the run to continue from its newest checkpoint."""
        with self._lock, self.sessions.begin() as s:
            run = self._get(s, run_id)
            if not resumable(run):
                raise UserError(f"run {run.id} is {run.state} and has no checkpoint to continue from; "
                                "only an interrupted run with a saved checkpoint can be resumed.")
            run.state, run.resume, run.message, run.ended_at = "queued", True, None, None
        self._wake.set()
        return run

    def add_folder(self, folder: str | Path, project_id: int | None = None) -> Run:
        """Index a run folder made elsewhere (`tunesmith train`): its config, metrics and status are read from
        it; a run still training there is followed."""
        path = Path(folder).expanduser()
        if not (path / "config.yaml").is_file():
            raise UserError(f"{folder} is not a tunesmith run folder (it has no config.yaml); give the folder "
                            "`tunesmith train` printed.")
        path = path.resolve()
        with self.sessions.begin() as s:
            if s.scalars(select(Run).where(Run.run_dir == str(path))).first() is not None:
                raise UserError(f"{path} is in the studio already.")
            run = Run(name=path.name[:NAME], project_id=project_id, run_dir=str(path),
                      config_file=str(path / "config.yaml"), state="running", imported=True)
            status = api.read_status(path) or {}
            run.pid = status.get("pid") if status.get("state") == "running" else None
            run.pid_started = process_start(run.pid) if run.pid else None
            s.add(run)
            s.flush()
            self._settle(run)
            return run

    # --- the loop

    def start(self) -> None:
        with self._lock, self.sessions.begin() as s:  # re-attach to what the last studio left
            for run in s.scalars(select(Run).where(Run.state.in_(ACTIVE))):
                if not (run.pid and run.pid_started and process_start(run.pid) == run.pid_started):
                    self._settle(run)
        self._thread = threading.Thread(target=self._loop, name="tunesmith-studio-runs", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def tick(self) -> None:
        """Settle runs whose process ended; start queued runs while a slot is free."""
        with self._lock, self.sessions.begin() as s:
            for run in s.scalars(select(Run).where(Run.state.in_(ACTIVE))):
                child = self.children.get(run.id)
                ended = child.poll() is not None if child is not None else (
                    not run.pid or process_start(run.pid) != run.pid_started)
                if ended:
                    self.children.pop(run.id, None)
                    self._settle(run)
            busy = len(s.scalars(select(Run.id).where(Run.state.in_(ACTIVE))).all())
            queue = s.scalars(select(Run).where(Run.state == "queued").order_by(Run.id)).all()
            for run in queue[:max(0, self.slots - busy)]:
                self._launch(run)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must outlive one bad row or a busy database
                log.exception("tunesmith studio: the run manager's check failed; trying again")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _launch(self, run: Run) -> None:
        try:
            if run.resume:
                process = api.start_run(Path(run.run_dir) / "config.yaml", output=run.run_dir, resume=True,
                                        log_file=run.log_file, detach=True)
            else:
                process = api.start_run(run.config_file, output=run.run_dir, log_file=run.log_file, detach=True)
        except UserError as exc:
            run.state, run.message, run.ended_at = "failed", str(exc), now()
            return
        self.children[run.id] = process.process
        run.pid = process.process.pid
        run.pid_started = process_start(run.pid)
        run.state, run.started_at, run.ended_at, run.message, run.resume = "running", now(), None, None, False

    def _settle(self, run: Run) -> None:
        """The run's process has ended (or is not ours to follow): take its state from its folder."""
        status = api.read_status(run.run_dir) or {}
        state = status.get("state")
        if state in ("finished", "failed", "interrupted"):
            run.state, run.message = state, status.get("message")
        elif list_checkpoints(Path(run.run_dir)):
            run.state = "interrupted"
            run.message = "the training process ended without saying why (it was killed); resume continues from " \
                          "the newest checkpoint."
        else:
            run.state = "failed"
            said = api.last_sentence(Path(run.log_file)) if run.log_file else ""
            run.message = said or "the training process ended before its first checkpoint, without a sentence."
        run.pid, run.pid_started, run.ended_at = None, None, now()

    @staticmethod
    def _get(s, run_id: int) -> Run:
        run = s.get(Run, run_id)
        if run is None:
            raise UserError(f"there is no run {run_id}.")
        return run

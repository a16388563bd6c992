"""Work the studio does in its own process, one job at a time, on tunesmith.api's functions: question/answer
generation from documents, evaluation, merge, export.  A job's state, progress and result are rows in the
`jobs` table, so a page shows them after a refresh; a job can be cancelled between its steps.

Training is not a job: runs are processes of their own (tunesmith.studio.runner), so they outlive the studio.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from tunesmith.errors import UserError
from tunesmith.studio.db import Job, now

log = logging.getLogger(__name__)
JOB_STATES = ("queued", "running", "finished", "failed", "cancelled")


class JobContext:
    """What a job's function gets: its parameters, a way to report progress and to learn it was cancelled."""

    def __init__(self, runner: JobRunner, job: Job):
        self.runner = runner
        self.id = job.id
        self.kind = job.kind
        self.params = dict(job.params or {})
        self.project_id = job.project_id
        self.run_id = job.run_id
        self.document_id = job.document_id
        self.sessions = runner.sessions
        self.home = runner.home

    def progress(self, done: int, total: int, message: str | None = None) -> None:
        with self.sessions.begin() as s:
            job = s.get(Job, self.id)
            job.done, job.total, job.updated_at = done, total, now()
            if message is not None:
                job.message = message

    def cancelled(self) -> bool:
        return self.id in self.runner.cancel_requests


class JobRunner:
    """Runs queued jobs one after another in a thread; `register(kind, function)` says what a kind does.  The
    function returns the job's result (JSON-able) or raises UserError with the sentence to show."""

    def __init__(self, sessions: sessionmaker, home: Path, poll_s: float = 0.3):
        self.sessions = sessions
        self.home = home
        self.poll_s = poll_s
        self.kinds: dict[str, Callable[[JobContext], dict | None]] = {}
        self.cancel_requests: set[int] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, kind: str, function: Callable[[JobContext], dict | None]) -> None:
        self.kinds[kind] = function

    def submit(self, kind: str, params: dict | None = None, project_id: int | None = None,
               run_id: int | None = None, document_id: int | None = None) -> Job:
        if kind not in self.kinds:
            raise UserError(f"the studio has no job of kind {kind!r}.")
        with self.sessions.begin() as s:
            job = Job(kind=kind, params=params or {}, project_id=project_id, run_id=run_id, document_id=document_id)
            s.add(job)
            s.flush()
        self._wake.set()
        return job

    def cancel(self, job_id: int) -> bool:
        with self.sessions.begin() as s:
            job = s.get(Job, job_id)
            if job is None or job.state not in ("queued", "running"):
                return False
            if job.state == "queued":
                job.state, job.message, job.updated_at = "cancelled", "cancelled before it started.", now()
            else:
                self.cancel_requests.add(job_id)
        return True

    def start(self) -> None:
        with self.sessions.begin() as s:  # a job the last studio was running died with it
            for job in s.scalars(select(Job).where(Job.state == "running")):
                job.state, job.updated_at = "failed", now()
                job.message = "the studio stopped while this job ran; start it again."
        self._thread = threading.Thread(target=self._work, name="tunesmith-studio-jobs", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self.cancel_requests.update(self._running_ids())
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _running_ids(self) -> set[int]:
        with self.sessions() as s:
            return set(s.scalars(select(Job.id).where(Job.state == "running")))

    def _next(self) -> Job | None:
        with self.sessions.begin() as s:
            job = s.scalars(select(Job).where(Job.state == "queued").order_by(Job.id).limit(1)).first()
            if job is not None:
                job.state, job.updated_at = "running", now()
            return job

    def _work(self) -> None:
        while not self._stop.is_set():
            job = self._next()
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        context = JobContext(self, job)
        state, message, result = "finished", None, None
        try:
            result = self.kinds[job.kind](context)
            if context.cancelled():
                state, message = "cancelled", "cancelled; what was done before is kept."
        except UserError as exc:
            state, message = "failed", str(exc)
        except Exception as exc:  # a job's failure is shown on its page, never lost in a console
            log.exception("tunesmith studio: job %s (%s) failed", job.id, job.kind)
            state, message = "failed", f"{job.kind} failed: {type(exc).__name__}: {str(exc)[:300]}"
        finally:
            self.cancel_requests.discard(job.id)
        with self.sessions.begin() as s:
            row = s.get(Job, job.id)
            row.state, row.message, row.result, row.updated_at = state, message, result, now()

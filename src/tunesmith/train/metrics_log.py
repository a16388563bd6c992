"""metrics.jsonl: one JSON object a line, written as the run goes and read back for the report."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.train.trackers import log_to_trackers


class MetricsLog:
    """Appends one JSON object a line to metrics.jsonl, flushed at once so a crash loses nothing, and hands each
    record to the experiment trackers (`trackers`: train/trackers.py's, which drops one that fails).
    With no path (a process other than the first of several) it only keeps the records."""

    def __init__(self, path: Path | None, trackers: list | None = None):
        self.path = path
        self.trackers = trackers or []
        self.records: list[dict] = []
        self._handle = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()
        log_to_trackers(self.trackers, record)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]

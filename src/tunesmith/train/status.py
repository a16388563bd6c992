"""`RUN_DIR/status.json`: where a run stands, for whoever follows it from its folder (`tunesmith.api.follow`,
the studio).  {"state": "running" | "finished" | "failed" | "interrupted", "message": the sentence or None,
"pid": the training process (the first, with several), "time": when it was written}; written then renamed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tunesmith.fileio import atomic_write_json

STATUS_FILE = "status.json"
FINAL_STATES = ("finished", "failed", "interrupted")


def write_status(run_dir: Path, state: str, message: str | None = None, **extra) -> None:
    """Record `state` in the run folder (nothing when the folder was never made: the run failed before it)."""
    if run_dir.is_dir():
        atomic_write_json(run_dir / STATUS_FILE, {"state": state, "message": message, "pid": os.getpid(),
                                                  "time": time.time(), **extra})


def read_status(run_dir: str | Path) -> dict | None:
    """The run's status.json, or None when it has none (yet) or it cannot be read."""
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None

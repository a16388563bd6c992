"""Where tunesmith's progress lines and notices go: the `tunesmith` logger, printed as plain lines.

Every module logs through `logging.getLogger(__name__)` (a child of `tunesmith`); nothing threads a
`report=print` callback through its call sites.  The handler installed here writes each record's message,
and nothing else, to the `sys.stdout` of the moment (so the CLI's output, pytest's capture and a notebook
all see it), and only in the first process of a job (RANK unset or 0): with several processes, the others'
lines would repeat it (a line logged with `extra={"every_process": True}` is printed by every process).  A front end that wants the lines elsewhere (the studio, a file) adds its own handler
to `logging.getLogger("tunesmith")` or removes this one.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "tunesmith"


class _CurrentStdout(logging.StreamHandler):
    """A StreamHandler bound to whatever `sys.stdout` is when a record is written, not when it was made."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property above always wins
        pass


def _first_process(record: logging.LogRecord) -> bool:
    """Lines of the first process, and those logged with `extra={"every_process": True}` (what each machine
    does on its own, e.g. converting a built-in model into its cache)."""
    return os.environ.get("RANK", "0") == "0" or getattr(record, "every_process", False)


def install() -> logging.Logger:
    """The `tunesmith` logger with its one plain-lines handler (installed once; calling again changes nothing)."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _CurrentStdout) for h in logger.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_first_process)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger

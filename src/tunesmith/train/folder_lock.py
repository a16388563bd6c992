"""One writer per run folder: training, resuming, distilling and evaluating hold the folder's lock while they write.

The lock is an exclusive `flock` on `RUN_DIR/.tunesmith.lock`, which holds who took it (process id, what it does,
since when) for the sentence a second writer gets.  The kernel releases it when the process ends, however it
ends (kill -9 included), so a crashed run never leaves its folder locked.  Within one process the lock is
re-entrant for the thread that holds it (`tunesmith.api.resume` calls `train`, which takes it again); another
thread is refused as another process is.  The processes of a job that
`tunesmith train --nproc N` starts run under their launcher's lock: it names the folder in TUNESMITH_LOCKED_RUN.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tunesmith.errors import UserError

LOCK_FILE = ".tunesmith.lock"
HELD_BY_LAUNCHER = "TUNESMITH_LOCKED_RUN"  # the run folder a launching process holds for its children

_held: dict[Path, list[int]] = {}  # run folders this process holds -> [the holding thread, how many nested holds]


def _key(run_dir: Path) -> Path:
    return run_dir.resolve()


def make_folder(run_dir: Path) -> None:
    """Create `run_dir` (and its parents), or say in a sentence why it cannot be made."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        in_the_way = _first_non_folder(run_dir)
        why = f"{in_the_way} is a file, not a folder" if in_the_way else (exc.strerror or str(exc))
        raise UserError(f"{run_dir}: the run folder cannot be made ({why}); give a folder you can write to with "
                        "--output DIR.") from None


def _first_non_folder(path: Path) -> Path | None:
    for part in [*reversed(path.parents), path]:
        try:
            if part.exists() and not part.is_dir():
                return part
        except OSError:
            return None
    return None


def refuse_if_in_use(run_dir: Path) -> None:
    """A UserError naming the process that holds `run_dir`'s lock, if another one does (checked before a run
    starts, so the sentence names the holder rather than the files it made)."""
    holder = _other_holder(run_dir) if run_dir.is_dir() else None
    if holder:
        raise UserError(in_use_sentence(run_dir, holder))


def _other_holder(run_dir: Path) -> str | None:
    """Who holds `run_dir`'s lock ("process 123 (training, since ...)"), or None when nobody else does."""
    lock_path = run_dir / LOCK_FILE
    if _key(run_dir) in _held or os.environ.get(HELD_BY_LAUNCHER) == str(_key(run_dir)) or not lock_path.is_file():
        return None  # this process holds it, or the launcher that started it does
    try:
        import fcntl
    except ImportError:
        return None
    try:
        with open(lock_path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return _holder(lock_path)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def _holder(lock_path: Path) -> str:
    """Who holds the lock, from what it wrote into the lock file (which it does just after taking the lock:
    a holder that has only just taken it is given a second to write)."""
    for _ in range(20):
        try:
            info = json.loads(lock_path.read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
            return f"process {info['pid']} ({info['doing']}, since {since})"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "another process"


@contextlib.contextmanager
def hold_run_folder(run_dir: str | Path, doing: str) -> Iterator[Path]:
    """Hold `run_dir`'s lock while the block writes into it (the folder is made if missing); a second writer
    gets a UserError naming the process that holds it.  `doing` says what this process does there."""
    run_dir = Path(run_dir)
    make_folder(run_dir)
    key, thread = _key(run_dir), threading.get_ident()
    if key in _held and _held[key][0] != thread:  # another thread of this process (two runs in one studio)
        raise UserError(in_use_sentence(run_dir, _holder(run_dir / LOCK_FILE)))
    if key in _held or os.environ.get(HELD_BY_LAUNCHER) == str(key):
        _held.setdefault(key, [thread, 0])[1] += 1
        try:
            yield run_dir
        finally:
            _held[key][1] -= 1
            if not _held[key][1]:
                del _held[key]
        return
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the folder is not guarded there
        yield run_dir
        return
    lock_path = run_dir / LOCK_FILE
    try:
        handle = open(lock_path, "a+")
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot write into the run folder ({exc.strerror or exc}); give a folder "
                        "you can write to with --output DIR.") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise UserError(in_use_sentence(run_dir, _holder(lock_path))) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "doing": doing, "since": time.time()}))
        handle.flush()
        _held[key] = [thread, 1]
        try:
            yield run_dir
        finally:
            del _held[key]
    finally:
        handle.close()  # closing the file releases the flock


def in_use_sentence(run_dir: Path, holder: str) -> str:
    return (f"{run_dir} is in use by {holder}; a run folder takes one writer at a time. Wait for it to end (or "
            "stop it: kill -INT with that process id saves a checkpoint first), or use another folder with --output DIR.")


def refuse_if_used(run_dir: Path) -> None:
    """A UserError unless `run_dir` is missing or holds nothing but (at most) its lock file: a new run may start
    there, and never over an earlier one."""
    if run_dir.exists() and (not run_dir.is_dir() or any(entry.name != LOCK_FILE for entry in run_dir.iterdir())):
        raise UserError(
            f"{run_dir} already exists and is not empty; tunesmith never writes over an earlier run. "
            "Pick another folder with --output DIR (or leave it out for a fresh runs/<name>-<time> folder)."
        )


def remove_unstarted_run(run_dir: Path, made_folder: bool) -> None:
    """A new run that failed before it trained a step leaves nothing behind: the folder it made is removed (or,
    when the folder was there before, empty, what it put in it), so the same command can run again."""
    if made_folder:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for entry in run_dir.iterdir():
        if entry.name == LOCK_FILE:
            continue  # a launching process may hold it still
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def disk_full_sentence(run_dir: Path, what: str, saved: list[Path]) -> str:
    """The sentence for a write the disk had no room for: `what` failed (and why); how to go on from `saved`,
    the run's complete checkpoints."""
    return (f"the disk that holds {run_dir} is full: {what}. "
            + (f"The previous checkpoint, {saved[-1]}, is intact: free some space and continue with: "
               f"tunesmith train {run_dir / 'config.yaml'} --resume" if saved else
               "No checkpoint was saved before it; free some space and start the run again."))


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` is the file system saying it is full (or the user's quota is).  safetensors' writer (Rust)
    raises its own SafetensorError for it, with the OS error number only in the text: "... (os error 28)"."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return any(f"(os error {code})" in text for code in (errno.ENOSPC, errno.EDQUOT))

"""Writing files so that nothing good is half-overwritten: write to a temporary name, then rename."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes its file readable by its owner alone (0600); a finished file gets the mode an ordinary
# open() would have given it (0666 less the umask), so other users and tools (an Ollama server) can read it.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()  # likewise for mkdtemp's 0700 folders


# Byte-order marks and the codec each declares; UTF-32's come first, as its little-endian mark starts like UTF-16's.
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"), (codecs.BOM_UTF8, "utf-8-sig"),
)


def declared_codec(data: bytes) -> str | None:
    """The codec a file's bytes declare with a byte-order mark ("utf-8-sig" for UTF-8's), or None (no mark)."""
    return next((codec for bom, codec in BYTE_ORDER_MARKS if data.startswith(bom)), None)


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read a MiB at a time (checkpoints and the teacher cache keep these)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive(lock_path: str | Path):
    """Hold an exclusive lock on `lock_path` (created if missing) while the block runs, so processes that would
    each build the same cached folder (the processes of one job, two runs started together) take turns; the
    one that waited then finds the folder built.  Where the OS has no `fcntl` (Windows) it does not lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_dir(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Let `fill` write a folder's contents into a temporary folder, then move it to `path`.

    An existing folder at `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        os.chmod(tmp, DIR_MODE)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_file(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Let `fill` write a file at a temporary name beside `path`, then rename it to `path`.

    For files written by a library that wants a path (a GGUF writer, say) rather than text.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        fill(Path(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

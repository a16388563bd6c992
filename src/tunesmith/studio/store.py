"""Files users upload: stored under generated names in the studio's files/ folder, so no name or path a user
sends reaches the file system; the name they gave is kept only to be shown.  Size and type are checked while the
upload is read."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from fastapi import UploadFile

from tunesmith.errors import UserError

CHUNK = 1 << 20
DATA_LIMIT = 200 * 2**20  # a data file
DOCUMENT_LIMIT = 50 * 2**20  # a PDF, text or Markdown document


class TooLarge(UserError):
    """An upload over its limit (answered with 413)."""


def shown_name(name: str | None) -> str:
    """The last part of the name a browser sent, without control characters, at most 200 characters: only ever
    shown, never used as a path."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).strip()
    return base[:200] or "upload"


def suffix_of(name: str, allowed: tuple[str, ...], what: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix not in allowed:
        raise UserError(f"{name}: a {what} must be one of {', '.join(allowed)} (this one is "
                        f"{suffix or 'without a suffix'}); save it as one of those and upload it again.")
    return suffix


async def save_upload(upload: UploadFile, folder: Path, allowed: tuple[str, ...], limit: int, what: str
                      ) -> tuple[Path, str]:
    """Read `upload` into folder/<random>.<suffix>; (the stored path, the name to show).  A wrong type, an empty
    file or one over `limit` bytes is refused with a sentence, and nothing is kept."""
    name = shown_name(upload.filename)
    suffix = suffix_of(name, allowed, what)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}{suffix}"
    size = 0
    try:
        with path.open("xb") as out:
            while block := await upload.read(CHUNK):
                size += len(block)
                if size > limit:
                    raise TooLarge(f"{name} is over {limit // 2**20} MiB, the most the studio takes for a {what}; "
                                   "split it or use `tunesmith` on the command line for files this large.")
                out.write(block)
        if size == 0:
            raise UserError(f"{name} is empty; upload a file with something in it.")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, name

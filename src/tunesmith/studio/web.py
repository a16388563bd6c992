"""What the studio's page modules share: the database session, rendering, looking rows up, and the studio's
folders.  Page modules take everything from `request.app.state` (set by tunesmith.studio.app.create_app)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from tunesmith.errors import UserError
from tunesmith.studio.db import Base

T = TypeVar("T", bound=Base)
MAX_ID = 2**31 - 1  # the largest id an id column holds (INTEGER: 4 bytes in PostgreSQL); a larger one names no row


class NotFound(UserError):
    """A row a URL names is not there (shown as 404 with its sentence)."""


def session(request: Request) -> Iterator[Session]:
    """A FastAPI dependency: one database session per request, committed when the handler returns."""
    with request.app.state.sessions.begin() as s:
        yield s


DB = Annotated[Session, Depends(session)]  # a handler's parameter `s: DB` is its database session


def get_or_404(s: Session, model: type[T], row_id: int, what: str | None = None) -> T:
    row = s.get(model, row_id) if -MAX_ID - 1 <= row_id <= MAX_ID else None  # the driver cannot send a larger one
    if row is None:
        raise NotFound(f"there is no {what or model.__tablename__.rstrip('s')} {row_id}.")
    return row


def read_json_object(path: Path) -> dict | None:
    """A JSON file's object (summary.json, eval/metrics.json), or None when it is missing, unreadable or not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def render(request: Request, template: str, **context) -> HTMLResponse:
    return request.app.state.templates.TemplateResponse(request, template, context)


def home(request: Request) -> Path:
    return request.app.state.settings.home


def files_dir(request: Request) -> Path:
    return home(request) / "files"

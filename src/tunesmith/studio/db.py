"""The studio's state: SQLAlchemy 2 models, the engine (SQLite in WAL mode by default, PostgreSQL by URL) and the
Alembic migrations that make the schema.

Run folders stay the source of truth for a run's files (metrics.jsonl, status.json, checkpoints, reports); the
`runs` table indexes them and remembers what only the studio knows (its queue, the process it started).  Dataset
rows live in JSONL working copies under the studio's home; the `datasets` table names them.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, Text, create_engine, event, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from tunesmith.errors import UserError

MIGRATIONS = Path(__file__).parent / "migrations"
NAME = 200  # the longest name a user may give a project, dataset or run


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)  # stored naive, in UTC, on every backend


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME), unique=True)
    base_model: Mapped[str] = mapped_column(String(1000))  # what model.name accepts: built-in, folder, .gguf
    system_prompt: Mapped[str | None] = mapped_column(Text)
    settings: Mapped[str] = mapped_column(Text, default="")  # YAML: the project's default config keys
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(NAME))
    file: Mapped[str] = mapped_column(String(100))  # the JSONL working copy, a generated name under files/
    source_name: Mapped[str | None] = mapped_column(String(NAME))  # the uploaded file's name, shown only
    rows: Mapped[int] = mapped_column(Integer, default=0)
    generated: Mapped[bool] = mapped_column(Boolean, default=False)  # written by a model from documents
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Document(Base):
    __tablename__ = "documents"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(NAME))  # the uploaded file's name, shown only
    file: Mapped[str] = mapped_column(String(100))
    chars: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Chunk(Base):
    __tablename__ = "chunks"
    id: Mapped[int] = mapped_column(primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    n_tokens: Mapped[int] = mapped_column(Integer)


class QAPair(Base):
    __tablename__ = "qa_pairs"
    id: Mapped[int] = mapped_column(primary_key=True)
    chunk_id: Mapped[int] = mapped_column(ForeignKey("chunks.id", ondelete="CASCADE"), index=True)
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    generated: Mapped[bool] = mapped_column(Boolean, default=True)
    edited: Mapped[bool] = mapped_column(Boolean, default=False)


class Run(Base):
    """A training run the studio started (or was pointed at).  `state`: queued, running, stopping, finished,
    failed, interrupted; `message` is the run's own sentence when it failed or stopped."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="SET NULL"), index=True)
    name: Mapped[str] = mapped_column(String(NAME))
    run_dir: Mapped[str] = mapped_column(String(1000), unique=True)
    config_file: Mapped[str] = mapped_column(String(1000))  # what the training process is started with
    state: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    message: Mapped[str | None] = mapped_column(Text)
    resume: Mapped[bool] = mapped_column(Boolean, default=False)  # the queued start continues the run
    pid: Mapped[int | None] = mapped_column(Integer)
    pid_started: Mapped[str | None] = mapped_column(String(40))  # the process's start time, to tell a reused pid
    log_file: Mapped[str | None] = mapped_column(String(1000))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    imported: Mapped[bool] = mapped_column(Boolean, default=False)  # started elsewhere (the CLI), added by folder
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Job(Base):
    """Work the studio does in its own process on the library's functions: question/answer generation,
    evaluation, merge and export.  `state`: queued, running, finished, failed, cancelled."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    document_id: Mapped[int | None] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(20), default="queued")
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class ChatSession(Base):
    __tablename__ = "chat_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    system_prompt: Mapped[str | None] = mapped_column(Text)
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class ChatMessage(Base):
    __tablename__ = "chat_messages"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("chat_sessions.id", ondelete="CASCADE"), index=True)
    side: Mapped[str] = mapped_column(String(10))  # "user", or the model that answered: "base" / "tuned"
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Sweep(Base):
    """A hyperparameter search (the plan issue's `tunesmith sweep`); indexed here once that lands."""

    __tablename__ = "sweeps"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(NAME))
    folder: Mapped[str] = mapped_column(String(1000))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


# --- the engine

def database_url(db: str | None, home: Path) -> str:
    """The SQLAlchemy URL for `--db`: None is SQLite at HOME/studio.db; postgresql:// takes the psycopg 3 driver."""
    if not db:
        return f"sqlite:///{home / 'studio.db'}"
    if db.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    return db


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (page loads, SSE) never wait for the writer
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for `url`, with the schema migrated to the newest version; a URL that cannot be used is a
    sentence naming --db."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"--db {url!r} is not a database URL; give e.g. sqlite:///studio.db or "
                        "postgresql://user@host:5432/name.") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise UserError(f"--db: the studio keeps its state in SQLite or PostgreSQL, not {parsed.get_backend_name()}.")
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True)
        migrate(engine)
    except (OperationalError, NoSuchModuleError) as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise UserError(f"--db: cannot open {parsed.render_as_string(hide_password=True)}: {reason}") from None
    return engine


def alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the database's schema to the newest migration (nothing when it is there already)."""
    command.upgrade(alembic_config(engine), "head")


def session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def table_names(engine: Engine) -> list[str]:
    return sorted(inspect(engine).get_table_names())

"""Datasets: upload (JSON / JSONL / CSV / Parquet, read by tunesmith's own reader into a JSONL working copy), the
checks of `tunesmith data inspect` with each bad row listed by number and field, browsing with paging and search,
editing, adding and deleting rows, token length statistics, a row seen through the chat template with the masked
part shaded, a seeded train/validation split, and downloads.  The work is tunesmith.studio.datasets; this module
is its pages and JSON API.

Token counts and the template view use the tokenizer of the project's base model, loaded once per model and
kept in app.state; a base model whose tokenizer cannot be loaded is a sentence on the page, never an error page.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from tunesmith import api
from tunesmith.config import SEED_MAX, DataConfig, ModelConfig
from tunesmith.data.formats import detect_format
from tunesmith.data.read import JSONLineError, parse_jsonl_line
from tunesmith.errors import UserError, visible
from tunesmith.models import load_tokenizer, resolve_model_source
from tunesmith.studio import datasets, store
from tunesmith.studio.db import NAME, Dataset, Project, Run
from tunesmith.studio.web import DB, NotFound, files_dir, get_or_404, render

log = logging.getLogger(__name__)
PAGE_ROWS = 50  # rows per page on the dataset page
MAX_LIMIT = 500  # the most rows one API page holds
SHOWN_PROBLEMS = 1000  # problems listed on the page (the API lists every one)
FAILED_RETRY_S = 30.0  # a tokenizer that failed to load is tried again after this long
CHECKS_KEPT = 16  # check reports remembered (per working copy version, model and data settings)
SYNC_ROWS = 2000  # a page waits for the token checks of a dataset this large; larger ones are made in the background
ACTIVE = ("queued", "running", "stopping")
MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}
MAX_ID = 2**63 - 1  # the largest id a database column holds; larger ones are refused before they reach it
DatasetId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
ProjectId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
RowNumber = Annotated[int, PathParam(ge=-MAX_ID, le=MAX_ID, description="the row's number, from 1")]
RowBody = Annotated[dict[str, Any], Body(description='the row, an object of column names and values; {"_raw": text} '
                                                     "is its text, which must read as one JSON object")]


class AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: a row may hold half of a surrogate pair (a "\\ud800" escape in
    its file), which UTF-8 cannot encode but a JSON escape can."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


# --- API models --------------------------------------------------------------------------------------------------


class ErrorOut(BaseModel):
    error: str = Field(description="a sentence: what is wrong and what to do")


ERRORS = {status: {"model": ErrorOut, "description": text} for status, text in (
    (400, "the request cannot be done (the sentence says why)"), (401, "the studio's token is missing"),
    (403, "the change came without the token or from another site"), (404, "no such project, dataset or row"),
    (422, "the request does not match its schema"))}


class DatasetOut(BaseModel):
    id: int
    project_id: int
    name: str
    source_name: str | None
    file: str = Field(description="the JSONL working copy, a generated name under the studio's files/ folder")
    rows: int
    generated: bool


class Problem(BaseModel):
    row: int | None = Field(description="the row's number, from 1 (None: the whole dataset)")
    field: str | None = Field(description="the column the problem is in, when it is in one")
    message: str


class TokenStats(BaseModel):
    count: int
    min: int | None
    mean: float | None
    p50: int | None
    p95: int | None
    max: int | None
    over_max_length: int


class CheckOut(BaseModel):
    format: str | None
    rows: int
    valid_rows: int
    problems: list[Problem]
    token_stats: TokenStats | None
    columns: list[str]
    tokenizer_error: str | None = Field(None, description="why there are no token counts, when they are missing")
    tokens_pending: bool = Field(False, description="the token checks of this large dataset are being made in the "
                                 "background: token_stats and the problems they find come when they are done")


class DatasetReport(BaseModel):
    dataset: DatasetOut
    check: CheckOut


class NumberedRow(BaseModel):
    number: int
    row: dict[str, Any]
    raw: str | None = Field(None, description="the line as uploaded, for a row that is not a JSON object yet")


class RowsOut(BaseModel):
    total: int = Field(description="rows that match the search (all rows without one)")
    offset: int
    limit: int
    rows: list[NumberedRow]


class RowChanged(BaseModel):
    number: int
    row: dict[str, Any]
    rows: int = Field(description="rows in the dataset now")


class RowDeleted(BaseModel):
    deleted: int
    rows: int


class Segment(BaseModel):
    text: str
    masked: bool = Field(description="the loss ignores it (system and user turns, template markup)")
    cut: bool = Field(description="past data.max_length: training never sees it")


class TemplateOut(BaseModel):
    number: int
    format: str | None
    segments: list[Segment]


class SplitIn(BaseModel):
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of rows held out for validation")
    seed: int = Field(0, ge=0, le=SEED_MAX)


class SplitOut(BaseModel):
    train: DatasetOut
    validation: DatasetOut


class Deleted(BaseModel):
    deleted: int


# --- helpers -----------------------------------------------------------------------------------------------------


def dataset_blockers(path: Path) -> str | None:
    """A sentence when the working copy at `path` still holds lines that are not JSON objects (a run on it would
    stop at the first), naming the rows; None when every row is an object."""
    broken = [n for n, row in enumerate(datasets.read_rows(path), start=1) if datasets.is_raw(row)]
    if not broken:
        return None
    rows = ", ".join(str(n) for n in broken[:10]) + (f" and {len(broken) - 10} more" if len(broken) > 10 else "")
    return (f"the dataset still has {len(broken)} row(s) that are not JSON objects (row {rows}); fix or delete them "
            "on the dataset's page first.")


def dataset_out(d: Dataset) -> DatasetOut:
    return DatasetOut(id=d.id, project_id=d.project_id, name=d.name, source_name=d.source_name, file=d.file,
                      rows=d.rows, generated=bool(d.generated))


def working_copy(request: Request, d: Dataset) -> Path:
    path = files_dir(request) / d.file
    if not path.is_file():
        raise NotFound(f"dataset {d.name!r} has lost its file ({d.file} is not in the studio's files/ folder); "
                       "delete it and upload the data again.")
    return path


def clean_name(text: str) -> str:
    """A name to show: control characters removed, blank space trimmed, at most NAME characters."""
    return re.sub(r"[\x00-\x1f\x7f]", "", text).strip()[:NAME]


def download_name(name: str, fmt: str) -> str:
    """A file name safe in a Content-Disposition header and on any file system, from the dataset's name."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")[:100] or "dataset"
    return f"{base}.{fmt}"


def count_rows(path: Path) -> int:
    """Rows in the working copy, counted as datasets.read_rows counts them (lines that are not blank)."""
    return sum(1 for line in path.read_text(encoding="utf-8").split("\n") if line.strip())


def existing(path: Path, number: int) -> int:
    """`number` when the working copy has that row; NotFound (404) with a sentence otherwise."""
    count = count_rows(path)
    if not 1 <= number <= count:
        have = f"rows 1 to {count}" if count else "no rows"
        raise NotFound(f"there is no row {number}: the dataset has {have}.")
    return number


def settled(row: dict, number: int) -> dict:
    """The row to store: a {"_raw": text} body is the corrected line as text and must now read as a JSON object
    (an edit never stores a new broken line)."""
    if datasets.is_raw(row):
        try:
            return parse_jsonl_line(row[datasets.RAW_KEY])
        except JSONLineError as exc:
            raise UserError(f"row {number}: {exc} The row is unchanged.") from None
    return row


def shown_json(row: dict) -> str:
    """A row as the text its editor shows: the uploaded line for a row still to fix, else indented JSON with its
    characters as they are (escaped only where text is not valid Unicode, which a page cannot carry)."""
    if datasets.is_raw(row):
        return ascii_safe(row[datasets.RAW_KEY])
    text = json.dumps(row, ensure_ascii=False, indent=2, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # half a surrogate pair
        text = json.dumps(row, ensure_ascii=True, indent=2, default=str)
    return text


def ascii_safe(text: str) -> str:
    """`text` with any half surrogate pair written as its \\ud800 escape, so the page can be sent as UTF-8."""
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def project_settings(project: Project) -> tuple[ModelConfig, DataConfig]:
    """The model and data settings the project's runs start from (its default settings, its base model and system
    prompt): the same data settings check and template view as training would use."""
    try:
        cfg = api.load_config_text(project.settings or "", [], source=f"project {project.name!r} settings")
    except UserError:
        cfg = api.load_config(None)
    model = cfg.model.model_copy(update={"name": project.base_model})
    data = cfg.data
    if project.system_prompt:
        data = data.model_copy(update={"system_prompt": project.system_prompt})
    return model, data


class Tokenizers:
    """The tokenizer of each base model, loaded once (a failure is kept FAILED_RETRY_S seconds, so a page that
    cannot have token counts does not wait for the load to fail on every view)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.loaded: dict[tuple, Any] = {}
        self.failed: dict[tuple, tuple[float, str]] = {}

    def get(self, model: ModelConfig) -> tuple[Any, str | None]:
        """(tokenizer, None), or (None, the sentence why it cannot be loaded)."""
        key = (model.name, bool(model.trust_remote_code))
        with self.lock:
            if key in self.loaded:
                return self.loaded[key], None
            failed = self.failed.get(key)
            if failed and time.monotonic() - failed[0] < FAILED_RETRY_S:
                return None, failed[1]
            try:
                tokenizer = load_tokenizer(resolve_model_source(model.name), model)
            except UserError as exc:
                sentence = str(exc)
            except Exception as exc:  # noqa: BLE001  (a page shows why; it never fails for want of a tokenizer)
                sentence = (f"the tokenizer of {visible(model.name)} could not be loaded ({type(exc).__name__}: "
                            f"{visible(str(exc), 300)}).")
            else:
                self.loaded[key] = tokenizer
                self.failed.pop(key, None)
                return tokenizer, None
            self.failed[key] = (time.monotonic(), sentence)
            return None, sentence


class Checks:
    """check() reports, remembered per version of a working copy (its inode, size and time), model and data
    settings, so a page view after no edit does not tokenise every row again; and the token checks of a large
    dataset, made in the background one at a time (a version edited meanwhile is skipped)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.turn = threading.Lock()  # one background check at a time: they share the CPUs with training
        self.kept: OrderedDict[tuple, dict] = OrderedDict()
        self.pending: set[tuple] = set()

    def get(self, key: tuple) -> dict | None:
        with self.lock:
            if key in self.kept:
                self.kept.move_to_end(key)
                return self.kept[key]
        return None

    def put(self, key: tuple, report: dict) -> None:
        with self.lock:
            self.kept[key] = report
            while len(self.kept) > CHECKS_KEPT:
                self.kept.popitem(last=False)

    def is_pending(self, key: tuple) -> bool:
        with self.lock:
            return key in self.pending

    def start(self, key: tuple, work, current) -> None:
        """Make `work()` (a report) for `key` in a background thread, unless it is made or being made; skipped
        when `current()` says the working copy has changed by the time its turn comes."""
        with self.lock:
            if key in self.kept or key in self.pending:
                return
            self.pending.add(key)

        def run() -> None:
            try:
                with self.turn:
                    if current():
                        self.put(key, work())
            except Exception:  # noqa: BLE001  (a thread of its own: log it; the page keeps its quick check)
                log.exception("tunesmith studio: the token check of %s failed", key[0])
            finally:
                with self.lock:
                    self.pending.discard(key)

        threading.Thread(target=run, name="tunesmith-dataset-check", daemon=True).start()


def version(path: Path) -> tuple:
    stat = path.stat()
    return str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns


def made_check(path: Path, model: ModelConfig, data_cfg: DataConfig, tokenizers: Tokenizers, name: str) -> dict:
    """check() with the model's tokenizer, plus "tokenizer_error" (why there are no token counts) and
    "tokens_pending" (False)."""
    tokenizer, why = tokenizers.get(model)
    why = f"No token counts (the base model's tokenizer did not load): {why}" if why else None
    report = None
    if tokenizer is not None:
        try:
            report = datasets.check(path, data_cfg, tokenizer, shown_name=name)
        except UserError as exc:
            why = f"No token counts: {exc}"
        except Exception as exc:  # noqa: BLE001  (a tokenizer's own failure: the checks without it still run)
            log.exception("tunesmith studio: the token check of %s failed", path)
            why = (f"No token counts: the tokenizer of {visible(model.name)} failed on this dataset "
                   f"({type(exc).__name__}: {visible(str(exc), 300)}).")
    if report is None:
        report = datasets.check(path, data_cfg, None, shown_name=name)
    return {**report, "tokenizer_error": why, "tokens_pending": False}


def full_check(request: Request, project: Project, d: Dataset, path: Path, wait: bool = True) -> dict:
    """check() of the working copy with the project's tokenizer and data settings, plus "tokenizer_error" and
    "tokens_pending".  Without `wait`, a dataset over SYNC_ROWS rows whose token checks are not made yet gets
    the checks that need no tokenizer now (tokens_pending True) and its token checks in the background."""
    model, data_cfg = project_settings(project)
    key = version(path) + (model.name, model.trust_remote_code, data_cfg.model_dump_json(), d.name)
    checks: Checks = request.app.state.dataset_checks
    tokenizers: Tokenizers = request.app.state.dataset_tokenizers
    report = checks.get(key)
    if report is not None:
        return report
    if wait or d.rows <= SYNC_ROWS:
        report = made_check(path, model, data_cfg, tokenizers, d.name)
        checks.put(key, report)
        return report
    checks.start(key, lambda: made_check(path, model, data_cfg, tokenizers, d.name),
                 lambda: path.is_file() and version(path) == key[:4])
    quick_key = key + ("without tokens",)
    report = checks.get(quick_key)
    if report is None:
        report = {**datasets.check(path, data_cfg, None, shown_name=d.name), "tokenizer_error": None,
                  "tokens_pending": True}
        checks.put(quick_key, report)
    return report


def dataset_format(rows: list[dict], data_cfg: DataConfig) -> str | None:
    """The format the dataset's rows are in (data.format when set), None when it cannot be told."""
    if data_cfg.format != "auto":
        return data_cfg.format
    try:
        return detect_format([row for row in rows if not datasets.is_raw(row)], data_cfg.columns)
    except UserError:
        return None


def remove_file(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(f".{path.name}.lock").unlink(missing_ok=True)


def runs_using(s: Session, file_name: str) -> list[Run]:
    """Runs not yet ended whose config names the working copy `file_name` (a generated name, so a plain text
    search is exact)."""
    found = []
    for run in s.scalars(select(Run).where(Run.state.in_(ACTIVE))):
        try:
            if file_name in Path(run.config_file).read_text(errors="replace"):
                found.append(run)
        except OSError:
            continue
    return found


def page_numbers(offset: int, total: int) -> dict:
    """Paging links: the offsets of the previous and next pages (None at either end)."""
    return {"prev": max(0, offset - PAGE_ROWS) if 0 < offset < total else None,
            "next": offset + PAGE_ROWS if offset + PAGE_ROWS < total else None,
            "first": offset + 1 if total else 0, "last": min(total, offset + PAGE_ROWS)}


# --- routes ------------------------------------------------------------------------------------------------------


def register(app: FastAPI) -> None:
    app.state.dataset_tokenizers = Tokenizers()
    app.state.dataset_checks = Checks()
    router = APIRouter(default_response_class=AsciiJSON, tags=["datasets"], responses=ERRORS)

    def project_of(s: Session, d: Dataset) -> Project:
        return get_or_404(s, Project, d.project_id, "project")

    @router.get("/datasets/{dataset_id}", include_in_schema=False)
    def dataset_page(s: DB, request: Request, dataset_id: DatasetId,
                     offset: int = Query(0, ge=0, le=10**9), search: str = Query("", max_length=200)):
        d = get_or_404(s, Dataset, dataset_id, "dataset")
        project = project_of(s, d)
        path = working_copy(request, d)
        report = full_check(request, project, d, path, wait=False)
        shown = datasets.page(path, offset, PAGE_ROWS, search or None)
        by_row: dict[int, list[dict]] = {}
        for problem in report["problems"]:
            if problem["row"] is not None:
                by_row.setdefault(problem["row"], []).append(problem)
        rows = [{"number": item["number"], "raw": datasets.is_raw(item["row"]), "text": shown_json(item["row"]),
                 "problems": by_row.get(item["number"], [])} for item in shown["rows"]]
        return render(request, "dataset.html", project=project, dataset=d, report=report,
                      problems=report["problems"][:SHOWN_PROBLEMS], more_problems=max(
                          0, len(report["problems"]) - SHOWN_PROBLEMS),
                      rows=rows, total=shown["total"], offset=offset, search=search, page_rows=PAGE_ROWS,
                      paging=page_numbers(offset, shown["total"]), formats=datasets.EXPORT_FORMATS,
                      ascii_safe=ascii_safe, blockers=dataset_blockers(path))

    @router.get("/api/projects/{project_id}/datasets", response_model=list[DatasetOut])
    def list_datasets(s: DB, project_id: ProjectId):
        get_or_404(s, Project, project_id, "project")
        found = s.scalars(select(Dataset).where(Dataset.project_id == project_id).order_by(Dataset.id))
        return [dataset_out(d) for d in found]

    @router.post("/api/projects/{project_id}/datasets", response_model=DatasetReport, status_code=201,
                 responses={413: {"model": ErrorOut, "description": "the file is over the studio's limit"}})
    async def upload_dataset(s: DB, request: Request,
                             file: Annotated[UploadFile, File(description="a .json, .jsonl, .csv or .parquet file")],
                             project_id: ProjectId, name: Annotated[str | None, Form(max_length=NAME)] = None):
        """Upload a data file: it is read with tunesmith's reader into a JSONL working copy and checked as
        `tunesmith data inspect` checks it; a line that is not JSON is kept as a row to fix."""
        project = get_or_404(s, Project, project_id, "project")
        folder = files_dir(request)
        raw, shown = await store.save_upload(file, folder, datasets.UPLOAD_SUFFIXES, store.DATA_LIMIT, "data file")
        work = folder / f"{uuid.uuid4().hex}.jsonl"
        try:
            try:
                rows = await run_in_threadpool(datasets.import_file, raw, work, shown)
            finally:
                raw.unlink(missing_ok=True)
            given = clean_name(name or "")
            d = Dataset(project_id=project_id, name=given or clean_name(Path(shown).stem) or shown[:NAME],
                        file=work.name, source_name=shown[:NAME], rows=rows)
            s.add(d)
            s.flush()
            report = await run_in_threadpool(full_check, request, project, d, work, False)
        except BaseException:
            remove_file(work)
            raise
        return DatasetReport(dataset=dataset_out(d), check=CheckOut(**report))

    @router.get("/api/datasets/{dataset_id}", response_model=DatasetReport)
    def get_dataset(s: DB, request: Request, dataset_id: DatasetId,
                    wait: Annotated[bool, Query(description="wait for the token checks of a large dataset (false: "
                                                            "answer at once, tokens_pending says they are coming)")]
                    = True):
        """The dataset and its check: every problem by row and field, token length statistics."""
        d = get_or_404(s, Dataset, dataset_id, "dataset")
        report = full_check(request, project_of(s, d), d, working_copy(request, d), wait)
        return DatasetReport(dataset=dataset_out(d), check=CheckOut(**report))

    @router.get("/api/datasets/{dataset_id}/rows", response_model=RowsOut)
    def get_rows(s: DB, request: Request, dataset_id: DatasetId,
                 offset: int = Query(0, ge=0, le=10**9), limit: int = Query(PAGE_ROWS, ge=1, le=MAX_LIMIT),
                 search: str | None = Query(None, max_length=200)):
        """`limit` rows from the `offset`-th of those that hold `search` (any value, ignoring case)."""
        d = get_or_404(s, Dataset, dataset_id, "dataset")
        found = datasets.page(working_copy(request, d), offset, limit, search or None)
        rows = [NumberedRow(number=item["number"], row=item["row"],
                            raw=item["row"][datasets.RAW_KEY] if datasets.is_raw(item["row"]) else None)
                for item in found["rows"]]
        return RowsOut(total=found["total"], offset=offset, limit=limit, rows=rows)

    @router.put("/api/datasets/{dataset_id}/rows/{number}", response_model=RowChanged)
    def update_row(s: DB, request: Request, dataset_id: DatasetId, number: RowNumber, row: RowBody):
        """Replace row `number` (from 1)."""
        d = get_or_404(s, Dataset, dataset_id, "dataset")
        path = working_copy(request, d)
        stored = settled(row, existing(path, number))
        datasets.update_row(path, number, stored)
        d.rows = count_rows(path)
        return RowChanged(number=number, row=stored, rows=d.rows)

    @router.post("/api/datasets/{dataset_id}/rows", response_model=RowChanged, status_code=201)
    def add_row(s: DB, request: Request, dataset_id: DatasetId, row: RowBody):
        """Add a row at the end."""
        d = get_or_404(s, Dataset, dataset_id, "dataset")
        path = working_copy(request, d)
        stored = settled(row, d.rows + 1)
        number = datasets.add_row(path, stored)
        d.rows = number
        return RowChanged(number=number, row=stored, rows=number)

    @router.delete("/api/datasets/{dataset_id}/rows/{number}", response_model=RowDeleted)
    def delete_row(s: DB, request: Request, dataset_id: DatasetId, number: RowNumber):
        """Delete row `number`; the rows after it move up one number."""
        d = get_or_404(s, Dataset, dataset_id, "dataset")
        path = working_copy(request, d)
        datasets.delete_row(path, existing(path, number))
        d.rows = count_rows(path)
        return RowDeleted(deleted=number, rows=d.rows)

    @router.get("/api/datasets/{dataset_id}/rows/{number}/template", response_model=TemplateOut)
    def row_template(s: DB, request: Request, dataset_id: DatasetId, number: RowNumber):
        """Row `number` through the base model's chat template, as training tokenises it: masked segments are
        what the loss ignores, cut ones lie past data.max_length."""
        d = get_or_404(s, Dataset, dataset_id, "dataset")
        project = project_of(s, d)
        path = working_copy(request, d)
        existing(path, number)
        rows = datasets.read_rows(path)
        model, data_cfg = project_settings(project)
        tokenizer, why = request.app.state.dataset_tokenizers.get(model)
        if tokenizer is None:
            raise UserError(f"No template view (the base model's tokenizer did not load): {why}")
        fmt = dataset_format(rows, data_cfg)
        if fmt is not None:
            data_cfg = data_cfg.model_copy(update={"format": fmt})
        try:
            segments = datasets.template_view(rows[number - 1], tokenizer, data_cfg)
        except UserError as exc:
            raise UserError(f"row {number}: {exc}") from None
        except Exception as exc:  # noqa: BLE001  (a tokenizer's own failure is a sentence, not an error page)
            log.exception("tunesmith studio: the template view of row %s failed", number)
            raise UserError(f"row {number}: the tokenizer of {visible(model.name)} failed on this row "
                            f"({type(exc).__name__}: {visible(str(exc), 300)}).") from None
        return TemplateOut(number=number, format=fmt, segments=[Segment(**seg) for seg in segments])

    @router.post("/api/datasets/{dataset_id}/split", response_model=SplitOut, status_code=201)
    def split_dataset(s: DB, request: Request, body: SplitIn, dataset_id: DatasetId):
        """Split into a training and a validation dataset (two new datasets; this one stays as it is).  The same
        seed gives the same split; each side keeps the rows' order."""
        d = get_or_404(s, Dataset, dataset_id, "dataset")
        path = working_copy(request, d)
        folder = files_dir(request)
        train_path = folder / f"{uuid.uuid4().hex}.jsonl"
        val_path = folder / f"{uuid.uuid4().hex}.jsonl"
        try:
            n_train, n_val = datasets.split(path, train_path, val_path, body.val_fraction, body.seed)
            base = d.name[: NAME - len(" (validation)")]
            train = Dataset(project_id=d.project_id, name=f"{base} (train)", file=train_path.name,
                            source_name=d.source_name, rows=n_train, generated=d.generated)
            val = Dataset(project_id=d.project_id, name=f"{base} (validation)", file=val_path.name,
                          source_name=d.source_name, rows=n_val, generated=d.generated)
            s.add_all([train, val])
            s.flush()
        except BaseException:
            remove_file(train_path)
            remove_file(val_path)
            raise
        return SplitOut(train=dataset_out(train), validation=dataset_out(val))

    @router.get("/api/datasets/{dataset_id}/download", response_class=Response, responses={
        200: {"description": "the dataset as a file", "content": {media: {} for media in MEDIA.values()}}})
    def download(s: DB, request: Request, dataset_id: DatasetId,
                 format: Literal["jsonl", "csv", "parquet"] = "jsonl"):  # noqa: A002
        """The dataset as a JSONL, CSV or Parquet file."""
        d = get_or_404(s, Dataset, dataset_id, "dataset")
        content = datasets.export(working_copy(request, d), format)
        return Response(content, media_type=MEDIA[format], headers={
            "Content-Disposition": f'attachment; filename="{download_name(d.name, format)}"'})

    @router.delete("/api/datasets/{dataset_id}", response_model=Deleted)
    def delete_dataset(s: DB, request: Request, dataset_id: DatasetId):
        """Delete the dataset and its working copy (refused while a run that reads it is queued or running)."""
        d = get_or_404(s, Dataset, dataset_id, "dataset")
        busy = runs_using(s, d.file)
        if busy:
            names = ", ".join(f"{r.name!r} ({r.state})" for r in busy[:5])
            raise UserError(f"dataset {d.name!r} is in use by run {names}; stop the run or wait for it to end, "
                            "then delete the dataset.")
        s.delete(d)
        s.flush()
        remove_file(files_dir(request) / d.file)
        return Deleted(deleted=dataset_id)

    app.include_router(router)

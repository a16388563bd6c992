"""Documents -> question/answer data (issue 23, item 5): upload a PDF, text or Markdown document; its text is
extracted and cut into token windows that overlap (with the tokenizer of the project's base model); a local
model (the project's base model by default, any model model.name takes) writes question/answer pairs per chunk,
as JSON validated against a schema with retries, in a job that shows its progress and can be cancelled; the pairs
are shown beside their chunk, marked generated, editable, and saved as a dataset that trains as it is.

The work is tunesmith.studio.documents; this module is its pages, its JSON API and its job ("qa").
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from tunesmith.errors import UserError, visible
from tunesmith.studio import datasets, documents, store
from tunesmith.studio.db import NAME, Chunk, Dataset, Document, Job, Project, QAPair
from tunesmith.studio.jobs import JobContext
from tunesmith.studio.pages.datasets import Tokenizers, project_settings
from tunesmith.studio.pages.evaluate import JobOut, job_out
from tunesmith.studio.web import DB, files_dir, get_or_404, render

log = logging.getLogger(__name__)
QA = "qa"  # the job kind
ACTIVE_JOBS = ("queued", "running")
PAGE_CHUNKS = 50  # chunks per page on the document page
MAX_LIMIT = 500  # the most chunks one API page holds
GENERATORS_KEPT = 2  # loaded generation models kept (the least recently used one is let go)
WATCH_S = 0.2  # how often a running generation looks for a cancel request (to cut a reply short)
MAX_QUESTION = 2000  # a pair written or edited by hand: the longest question and answer kept
MAX_ANSWER = 20000


# --- API models --------------------------------------------------------------------------------------------------


def _clean(value: str, what: str) -> str:
    """`value` stripped, without NUL characters (no database keeps them); a blank one, or one holding half of a
    surrogate pair (which UTF-8 cannot store), is refused with a sentence."""
    value = value.replace("\x00", "").strip()
    if not value:
        raise ValueError(f"the {what} is empty; write something")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"the {what} holds half of a surrogate pair, which cannot be stored; remove it") from None
    return value


class PairIn(BaseModel):
    question: str = Field(min_length=1, max_length=MAX_QUESTION)
    answer: str = Field(min_length=1, max_length=MAX_ANSWER)

    @field_validator("question")
    @classmethod
    def _question(cls, value: str) -> str:
        return _clean(value, "question")

    @field_validator("answer")
    @classmethod
    def _answer(cls, value: str) -> str:
        return _clean(value, "answer")


class PairOut(BaseModel):
    id: int
    chunk_id: int
    question: str
    answer: str
    generated: bool = Field(description="written by a model (it stays true after an edit, to show where it came from)")
    edited: bool = Field(description="changed by hand since it was written")


class ChunkOut(BaseModel):
    id: int
    index: int = Field(description="the chunk's place in the document, from 0")
    text: str
    n_tokens: int
    pairs: list[PairOut]


class ChunksOut(BaseModel):
    total: int
    offset: int
    limit: int
    chunks: list[ChunkOut]


class DocumentOut(BaseModel):
    id: int
    project_id: int
    name: str = Field(description="the uploaded file's name (shown only)")
    chars: int = Field(description="characters of extracted text")
    chunks: int
    pairs: int
    created_at: str


class GenerateIn(BaseModel):
    model: str | None = Field(None, max_length=1000, description="what model.name accepts (a built-in name, a folder, "
                              "a .gguf file, a hub id); none: the project's base model")
    pairs_per_chunk: int = Field(1, ge=1, le=5)
    max_retries: int = Field(3, ge=0, le=5, description="replies asked for again per chunk after a refused one")
    max_new_tokens: int = Field(200, ge=32, le=1024, description="the longest reply (question and answer together)")
    only_missing: bool = Field(False, description="only the chunks without any pair (to go on after a cancel); "
                               "otherwise each chunk's generated pairs that nobody edited are replaced")

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else _clean(value, "model name")


class DatasetIn(BaseModel):
    name: str | None = Field(None, max_length=NAME, description="the dataset's name; none: the document's name + ' Q&A'")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else _clean(value, "dataset name")


class DatasetSaved(BaseModel):
    id: int
    name: str
    rows: int
    file: str = Field(description="the JSONL working copy, a generated name under the studio's files/ folder")
    generated: bool
    url: str = Field(description="the dataset's page")
    train_url: str = Field(description="the train form with this dataset chosen")


class Deleted(BaseModel):
    deleted: int


# --- helpers -----------------------------------------------------------------------------------------------------


def pair_out(p: QAPair) -> PairOut:
    return PairOut(id=p.id, chunk_id=p.chunk_id, question=p.question, answer=p.answer, generated=bool(p.generated),
                   edited=bool(p.edited))


def counts(s: Session, document_ids: list[int]) -> dict[int, dict[str, int]]:
    """{document id: {"chunks": n, "pairs": n}}."""
    out = {i: {"chunks": 0, "pairs": 0} for i in document_ids}
    if not document_ids:
        return out
    for doc_id, n in s.execute(select(Chunk.document_id, func.count(Chunk.id))
                               .where(Chunk.document_id.in_(document_ids)).group_by(Chunk.document_id)):
        out[doc_id]["chunks"] = n
    for doc_id, n in s.execute(select(Chunk.document_id, func.count(QAPair.id)).join(QAPair, QAPair.chunk_id == Chunk.id)
                               .where(Chunk.document_id.in_(document_ids)).group_by(Chunk.document_id)):
        out[doc_id]["pairs"] = n
    return out


def document_out(s: Session, d: Document) -> DocumentOut:
    n = counts(s, [d.id])[d.id]
    return DocumentOut(id=d.id, project_id=d.project_id, name=d.name, chars=d.chars or 0, chunks=n["chunks"],
                       pairs=n["pairs"], created_at=d.created_at.isoformat(timespec="seconds"))


def chunk_page(s: Session, document_id: int, offset: int, limit: int) -> ChunksOut:
    total = s.scalar(select(func.count(Chunk.id)).where(Chunk.document_id == document_id)) or 0
    rows = s.scalars(select(Chunk).where(Chunk.document_id == document_id).order_by(Chunk.index)
                     .offset(offset).limit(limit)).all()
    by_chunk: dict[int, list[PairOut]] = {c.id: [] for c in rows}
    if rows:
        for p in s.scalars(select(QAPair).where(QAPair.chunk_id.in_(list(by_chunk))).order_by(QAPair.id)):
            by_chunk[p.chunk_id].append(pair_out(p))
    chunks = [ChunkOut(id=c.id, index=c.index, text=c.text, n_tokens=c.n_tokens, pairs=by_chunk[c.id]) for c in rows]
    return ChunksOut(total=total, offset=offset, limit=limit, chunks=chunks)


def latest_job(s: Session, document_id: int) -> Job | None:
    return s.scalars(select(Job).where(Job.document_id == document_id, Job.kind == QA)
                     .order_by(Job.id.desc()).limit(1)).first()


def active_job(s: Session, document_id: int) -> Job | None:
    job = latest_job(s, document_id)
    return job if job is not None and job.state in ACTIVE_JOBS else None


def storable(text: str) -> str:
    """Extracted text as a database stores it on any backend: no NUL character, no half surrogate pair."""
    return text.replace("\x00", "").encode("utf-8", errors="replace").decode("utf-8")


def tokenizer_for(app: FastAPI, project: Project):
    """The tokenizer of the project's base model, loaded once per model (the dataset pages' cache, which
    create_app always registers)."""
    tokenizers: Tokenizers = app.state.dataset_tokenizers
    model, _data = project_settings(project)
    tokenizer, why = tokenizers.get(model)
    if tokenizer is None:
        raise UserError(f"the document cannot be cut into chunks: {why} Change the project's base model, or fix it, "
                        "and upload the document again.")
    return tokenizer


def read_document(path, shown: str, tokenizer, chunk_tokens: int, overlap: int) -> tuple[str, list]:
    text = storable(documents.extract_text(path, shown))
    return text, documents.chunk_text(text, tokenizer, chunk_tokens=chunk_tokens, overlap=overlap)


class Generators:
    """The `generate` callable of each model, loaded once (documents.model_generator) and kept for the studio's
    life: loading even the built-in model takes seconds.  Each has its own threading.Event, set to cut a reply
    short when its job is cancelled (jobs run one at a time, so one event per model is enough).  The reply length
    is fixed when a model is loaded, so another max_new_tokens loads it again; at most GENERATORS_KEPT models
    are kept."""

    def __init__(self):
        self.lock = threading.Lock()
        self.kept: OrderedDict[str, tuple[int, Any, threading.Event]] = OrderedDict()

    def get(self, model_name: str, max_new_tokens: int) -> tuple[Any, threading.Event]:
        with self.lock:
            entry = self.kept.get(model_name)
            if entry is not None and entry[0] == max_new_tokens:
                self.kept.move_to_end(model_name)
                return entry[1], entry[2]
            self.kept.pop(model_name, None)  # a different reply length: let the old one go before loading
            cancelled = threading.Event()
            generate = documents.model_generator(model_name, max_new_tokens=max_new_tokens, cancelled=cancelled)
            self.kept[model_name] = (max_new_tokens, generate, cancelled)
            while len(self.kept) > GENERATORS_KEPT:
                self.kept.popitem(last=False)
            return generate, cancelled


def qa_job(ctx: JobContext, generators: Generators) -> dict:
    """Pairs for each chunk of the document (only those without pairs with `only_missing`), written to the
    database as soon as each chunk is done, so a cancelled job keeps what it made.  A chunk's generated pairs
    that nobody edited are replaced by its new ones; edited and hand-written pairs stay."""
    p = ctx.params
    n_pairs, max_retries = int(p["pairs_per_chunk"]), int(p["max_retries"])
    with ctx.sessions() as s:
        if s.get(Document, ctx.document_id) is None:
            raise UserError(f"document {ctx.document_id} was deleted before its generation started.")
        query = select(Chunk).where(Chunk.document_id == ctx.document_id).order_by(Chunk.index)
        if p.get("only_missing"):
            query = query.where(~select(QAPair.id).where(QAPair.chunk_id == Chunk.id).exists())
        chunks = [(c.id, documents.Chunk(index=c.index, text=c.text, start_token=0, n_tokens=c.n_tokens))
                  for c in s.scalars(query)]
    total = len(chunks)
    made = {"pairs": 0, "retries": 0, "failed_chunks": [], "chunks_done": 0, "chunks": total, "model": p["model"]}
    if not total or ctx.cancelled():
        ctx.progress(0, total, "no chunk without pairs" if not total else None)
        return made
    ctx.progress(0, total, f"loading {visible(p['model'], 200)}")
    generate, cut_short = generators.get(p["model"], int(p["max_new_tokens"]))
    cut_short.clear()  # a cancel of an earlier job set it
    finished = threading.Event()

    def watch() -> None:  # a cancel request cuts the reply being written short, not only the next one
        while not finished.wait(WATCH_S):
            if ctx.cancelled():
                cut_short.set()
                return

    watcher = threading.Thread(target=watch, name=f"tunesmith-qa-{ctx.id}", daemon=True)
    watcher.start()
    try:
        ctx.progress(0, total, "writing pairs")
        for done, (chunk_id, chunk) in enumerate(chunks, start=1):
            # one chunk at a time, so each chunk's pairs are stored when it is done; a chunk stopped half-way
            # comes back empty (generate_for_chunks leaves it out) and the job ends
            results = documents.generate_for_chunks(generate, [chunk], n_pairs=n_pairs, max_retries=max_retries,
                                                    should_stop=ctx.cancelled)
            if not results:
                break
            result = results[0]
            with ctx.sessions.begin() as s:
                if s.get(Chunk, chunk_id) is None:
                    raise UserError(f"document {ctx.document_id} was deleted while its pairs were being written.")
                s.execute(delete(QAPair).where(QAPair.chunk_id == chunk_id, QAPair.generated.is_(True),
                                               QAPair.edited.is_(False)))
                s.add_all([QAPair(chunk_id=chunk_id, question=storable(pair.question), answer=storable(pair.answer),
                                  generated=True, edited=False) for pair in result.pairs])
            made["pairs"] += len(result.pairs)
            made["retries"] += result.retries
            made["chunks_done"] = done
            if result.error:
                made["failed_chunks"].append({"chunk": chunk.index, "error": visible(result.error, 500)})
            ctx.progress(done, total, f"{made['pairs']} pairs, {made['retries']} retries"
                                      + (f", {len(made['failed_chunks'])} chunks without enough pairs"
                                         if made["failed_chunks"] else ""))
    finally:
        finished.set()
        watcher.join(timeout=5)
    return made


def job_view(job: Job | None) -> dict | None:
    """What the document page shows of its newest generation job."""
    if job is None:
        return None
    return {"id": job.id, "state": job.state, "done": job.done or 0, "total": job.total or 0, "message": job.message,
            "result": job.result or {}, "active": job.state in ACTIVE_JOBS}


# --- routes ------------------------------------------------------------------------------------------------------


def register(app: FastAPI) -> None:
    generators = Generators()
    app.state.qa_generators = generators
    app.state.jobs.register(QA, lambda ctx: qa_job(ctx, generators))

    def document_counts(docs) -> dict[int, dict[str, int]]:
        with app.state.sessions() as s:
            return counts(s, [d.id for d in docs])

    app.state.templates.env.globals["document_counts"] = document_counts

    @app.get("/documents/{document_id}", include_in_schema=False)
    def document_page(s: DB, request: Request, document_id: int, offset: int = Query(0, ge=0, le=10**9)):
        d = get_or_404(s, Document, document_id, "document")
        project = get_or_404(s, Project, d.project_id, "project")
        page = chunk_page(s, d.id, offset, PAGE_CHUNKS)
        paging = {"prev": max(0, offset - PAGE_CHUNKS) if 0 < offset else None,
                  "next": offset + PAGE_CHUNKS if offset + PAGE_CHUNKS < page.total else None,
                  "first": offset + 1 if page.chunks else 0, "last": offset + len(page.chunks)}
        return render(request, "document.html", project=project, document=d, info=document_out(s, d), page=page,
                      paging=paging, job=job_view(latest_job(s, d.id)), page_chunks=PAGE_CHUNKS)

    @app.get("/api/projects/{project_id}/documents", response_model=list[DocumentOut])
    def list_documents(s: DB, project_id: int):
        get_or_404(s, Project, project_id, "project")
        found = s.scalars(select(Document).where(Document.project_id == project_id).order_by(Document.id)).all()
        n = counts(s, [d.id for d in found])
        return [DocumentOut(id=d.id, project_id=d.project_id, name=d.name, chars=d.chars or 0,
                            chunks=n[d.id]["chunks"], pairs=n[d.id]["pairs"],
                            created_at=d.created_at.isoformat(timespec="seconds")) for d in found]

    @app.post("/api/projects/{project_id}/documents", response_model=DocumentOut, status_code=201)
    async def upload_document(
            s: DB, request: Request, project_id: int,
            file: Annotated[UploadFile, File(description="a PDF, text (.txt) or Markdown (.md) document")],
            chunk_tokens: Annotated[int, Form(ge=32, le=2048, description="tokens per chunk")] = 256,
            overlap: Annotated[int, Form(ge=0, le=2047, description="tokens shared by neighbouring chunks")] = 32):
        """Upload a document: its text is extracted and cut into chunks of `chunk_tokens` tokens (the project's
        base model's tokenizer), each starting `overlap` tokens before the previous one ended."""
        project = get_or_404(s, Project, project_id, "project")
        if overlap >= chunk_tokens:
            raise UserError(f"the overlap is {overlap} tokens with chunks of {chunk_tokens}; the overlap must be "
                            "smaller than the chunk size.")
        path, shown = await store.save_upload(file, files_dir(request), documents.DOCUMENT_SUFFIXES,
                                              store.DOCUMENT_LIMIT, "document")
        try:
            tokenizer = await run_in_threadpool(tokenizer_for, request.app, project)
            text, chunks = await run_in_threadpool(read_document, path, shown, tokenizer, chunk_tokens, overlap)
            d = Document(project_id=project_id, name=shown[:NAME], file=path.name, chars=len(text))
            s.add(d)
            s.flush()
            s.add_all([Chunk(document_id=d.id, index=c.index, text=c.text, n_tokens=c.n_tokens) for c in chunks])
            s.flush()  # a row the database refuses is refused here, while the file can still be let go
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return DocumentOut(id=d.id, project_id=project_id, name=d.name, chars=d.chars, chunks=len(chunks), pairs=0,
                           created_at=d.created_at.isoformat(timespec="seconds"))

    @app.get("/api/documents/{document_id}", response_model=DocumentOut)
    def get_document(s: DB, document_id: int):
        return document_out(s, get_or_404(s, Document, document_id, "document"))

    @app.get("/api/documents/{document_id}/chunks", response_model=ChunksOut)
    def get_chunks(s: DB, document_id: int, offset: int = Query(0, ge=0, le=10**9),
                   limit: int = Query(PAGE_CHUNKS, ge=1, le=MAX_LIMIT)):
        """`limit` chunks from the `offset`-th, each with its question/answer pairs."""
        get_or_404(s, Document, document_id, "document")
        return chunk_page(s, document_id, offset, limit)

    @app.delete("/api/documents/{document_id}", response_model=Deleted)
    def delete_document(s: DB, request: Request, document_id: int):
        """Delete a document, its chunks and pairs (datasets saved from it stay)."""
        d = get_or_404(s, Document, document_id, "document")
        job = active_job(s, d.id)
        if job is not None:
            raise UserError(f"pairs are being written for {d.name!r} (job {job.id}, {job.state}); cancel it or let "
                            "it finish, then delete the document.")
        (files_dir(request) / d.file).unlink(missing_ok=True)
        s.delete(d)
        s.flush()
        return Deleted(deleted=document_id)

    @app.get("/api/documents/{document_id}/jobs", response_model=list[JobOut])
    def list_document_jobs(s: DB, document_id: int):
        """The document's generation jobs, newest first."""
        get_or_404(s, Document, document_id, "document")
        found = s.scalars(select(Job).where(Job.document_id == document_id).order_by(Job.id.desc()).limit(100))
        return [job_out(j) for j in found]

    @app.post("/api/documents/{document_id}/generate", response_model=JobOut, status_code=202)
    def start_generation(s: DB, request: Request, document_id: int, body: GenerateIn):
        """Have a model write question/answer pairs for each chunk, as a job: follow it with GET /api/jobs/{id}
        (done of total chunks; the result has pairs, retries and the chunks that got fewer pairs than asked),
        cancel it with POST /api/jobs/{id}/cancel (the pairs of the chunks done so far are kept)."""
        d = get_or_404(s, Document, document_id, "document")
        project = get_or_404(s, Project, d.project_id, "project")
        job = active_job(s, d.id)
        if job is not None:
            raise UserError(f"pairs are being written for {d.name!r} already (job {job.id}, {job.state}); wait for "
                            "it or cancel it.")
        params = {"model": body.model or project.base_model, "pairs_per_chunk": body.pairs_per_chunk,
                  "max_retries": body.max_retries, "max_new_tokens": body.max_new_tokens,
                  "only_missing": body.only_missing}
        return job_out(request.app.state.jobs.submit(QA, params, project_id=project.id, document_id=d.id))

    @app.post("/api/chunks/{chunk_id}/qa", response_model=PairOut, status_code=201)
    def add_pair(s: DB, chunk_id: int, body: PairIn):
        """Add a pair written by hand (generated false) to a chunk."""
        chunk = get_or_404(s, Chunk, chunk_id, "chunk")
        pair = QAPair(chunk_id=chunk.id, question=body.question, answer=body.answer, generated=False, edited=False)
        s.add(pair)
        s.flush()
        return pair_out(pair)

    @app.put("/api/qa/{pair_id}", response_model=PairOut)
    def update_pair(s: DB, pair_id: int, body: PairIn):
        """Change a pair's question and answer; it is marked edited (and stays marked generated when a model wrote
        it, to show where it came from)."""
        pair = get_or_404(s, QAPair, pair_id, "question/answer pair")
        if (pair.question, pair.answer) != (body.question, body.answer):
            pair.question, pair.answer, pair.edited = body.question, body.answer, True
            s.flush()
        return pair_out(pair)

    @app.delete("/api/qa/{pair_id}", response_model=Deleted)
    def delete_pair(s: DB, pair_id: int):
        pair = get_or_404(s, QAPair, pair_id, "question/answer pair")
        s.delete(pair)
        s.flush()
        return Deleted(deleted=pair_id)

    @app.post("/api/documents/{document_id}/dataset", response_model=DatasetSaved, status_code=201)
    def save_dataset(s: DB, request: Request, document_id: int, body: DatasetIn):
        """Save every pair of the document as a dataset of the project: rows {"question", "answer",
        "source_chunk" (the chunk's index), "generated"}, which train as they are (question/answer is read as
        prompt/completion)."""
        d = get_or_404(s, Document, document_id, "document")
        found = s.execute(select(QAPair, Chunk.index).join(Chunk, QAPair.chunk_id == Chunk.id)
                          .where(Chunk.document_id == d.id).order_by(Chunk.index, QAPair.id)).all()
        if not found:
            raise UserError(f"{d.name!r} has no question/answer pairs yet; generate some (or add them by hand), "
                            "then save them as a dataset.")
        rows = [{"question": p.question, "answer": p.answer, "source_chunk": index, "generated": bool(p.generated)}
                for p, index in found]
        name = (body.name or f"{d.name} Q&A")[:NAME]
        path = files_dir(request) / f"{uuid.uuid4().hex}.jsonl"
        try:
            datasets.write_rows(path, rows)
            saved = Dataset(project_id=d.project_id, name=name, file=path.name, source_name=d.name, rows=len(rows),
                            generated=True)
            s.add(saved)
            s.flush()
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return DatasetSaved(id=saved.id, name=saved.name, rows=saved.rows, file=saved.file, generated=True,
                            url=f"/datasets/{saved.id}", train_url=f"/projects/{d.project_id}/train?dataset={saved.id}")

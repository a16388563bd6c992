"""Evaluate a run: the base-vs-tuned table its training wrote (summary.json) and any later evaluation's
(RUN_DIR/eval/metrics.json), a browser of the predictions (prompt, reference, base, tuned) with a filter for
the rows where the tuned model did worse, and `tunesmith eval` on a dataset of the project as a job
(api.evaluate: the studio scores nothing by itself).  Also the job endpoints every kind of job shares:
GET /api/jobs/{id}, POST /api/jobs/{id}/cancel, GET /api/runs/{id}/jobs."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from tunesmith import api
from tunesmith.errors import UserError, visible
from tunesmith.evaluate import metrics
from tunesmith.evaluate.suite import LOWER_IS_BETTER, NOT_SCORES
from tunesmith.studio.db import Dataset, Job, Run
from tunesmith.studio.jobs import JobContext
from tunesmith.studio.pages.runs import read_summary
from tunesmith.studio.web import DB, NotFound, files_dir, get_or_404, read_json_object, render

log = logging.getLogger(__name__)
EVAL = "eval"
ACTIVE_JOBS = ("queued", "running")
PAGE = 20  # predictions per page
MAX_ROWS = 100_000  # the most rows an eval job may be asked for (its `limit`)
ROW_METRIC = "chrF"  # the per-row score of the predictions browser (see row_scores)


# --- jobs, shared by every page that starts one

class JobOut(BaseModel):
    id: int
    kind: str
    state: str
    done: int
    total: int
    message: str | None
    result: dict | None
    run_id: int | None
    project_id: int | None
    created_at: str
    updated_at: str


def job_out(job: Job) -> JobOut:
    return JobOut(id=job.id, kind=job.kind, state=job.state, done=job.done or 0, total=job.total or 0,
                  message=job.message, result=job.result, run_id=job.run_id, project_id=job.project_id,
                  created_at=job.created_at.isoformat(timespec="seconds"),
                  updated_at=job.updated_at.isoformat(timespec="seconds"))


def finite(value):
    """`value` with every NaN or infinity made None: JSON has no such numbers (a perplexity can overflow)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class _LogProgress(logging.Handler):
    """The library's log lines said on the job's own thread become the job's message; a line that starts with
    one of `stages` moves its progress to that stage's number."""

    def __init__(self, ctx: JobContext, stages: dict[str, int], total: int):
        super().__init__(logging.INFO)
        self.ctx, self.stages, self.total, self.done = ctx, stages, total, 0
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        try:
            text = record.getMessage().strip()
            for prefix, stage in self.stages.items():
                if text.startswith(prefix):
                    self.done = max(self.done, stage)
            self.ctx.progress(self.done, self.total, visible(text.splitlines()[0], 300) if text else None)
        except Exception:  # a progress note must never fail the job
            pass


@contextlib.contextmanager
def progress_from_log(ctx: JobContext, stages: dict[str, int], total: int):
    handler = _LogProgress(ctx, stages, total)
    logger = logging.getLogger("tunesmith")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def run_jobs(s, run_id: int, kind: str, limit: int = 10) -> list[Job]:
    return list(s.scalars(select(Job).where(Job.run_id == run_id, Job.kind == kind).order_by(Job.id.desc())
                          .limit(limit)))


def finished_run(run: Run, doing: str) -> Path:
    """The run's folder, when the run has finished (its weights are there to use)."""
    if run.state != "finished":
        raise UserError(f"run {run.id} is {run.state}; {doing} needs a finished run (its trained weights).")
    return Path(run.run_dir)


def run_config(run: Run) -> api.Config:
    """The run's config: the one the run folder keeps (every default written out), else the one it started with."""
    saved = Path(run.run_dir) / "config.yaml"
    return api.load_config(saved if saved.is_file() else run.config_file)


# --- score tables

def number(value) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def score_table(base: dict | None, tuned: dict | None) -> list[dict]:
    """[{metric, base, tuned, better}] as tunesmith's own report.md words it (evaluate/suite.py): loss and
    perplexity are better lower, every other score higher."""
    base, tuned = base or {}, tuned or {}
    rows = []
    for name in [k for k in {**base, **tuned} if k not in NOT_SCORES]:
        b, t = base.get(name), tuned.get(name)
        better = ""
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (b, t))
        if numbers and b != t:
            better = "tuned" if (t < b) == (name in LOWER_IS_BETTER) else "base"
        rows.append({"metric": name, "base": number(b), "tuned": number(t), "better": better})
    return rows


def evaluation_tables(run: Run, summary: dict | None) -> dict:
    """The training's before/after table (summary.json) and, when a later `tunesmith eval` or studio job
    changed it, the newest table in RUN_DIR/eval/."""
    section = (summary or {}).get("eval") or {}
    training = score_table(section.get("base"), section.get("tuned")) if section else []
    newest = read_json_object(Path(run.run_dir) / "eval" / "metrics.json")
    later = []
    if newest and finite(newest) != finite({"base": section.get("base"), "tuned": section.get("tuned")}):
        later = score_table(newest.get("base"), newest.get("tuned"))
    rows = (section.get("base") or {}).get("rows") or (section.get("base") or {}).get("loss_tokens")
    return {"training": training, "training_rows": rows, "later": later,
            "has_predictions": (Path(run.run_dir) / "eval" / "predictions.jsonl").is_file()}


# --- predictions

_scored: OrderedDict[tuple, list[dict]] = OrderedDict()  # (file, mtime, size) -> its rows with scores
_scored_lock = threading.Lock()


def _row_score(answer, reference) -> tuple[float | None, bool | None]:
    """(chrF, exact match) of one answer: tunesmith's own metric functions (evaluate/metrics.py) on one row.
    chrF works in any script, where ROUGE's tokenizer keeps ASCII only."""
    if not isinstance(answer, str) or reference in (None, "", []):
        return None, None
    refs = metrics.as_references(reference)
    return metrics.bleu_chrf([answer], [refs])["chrf"], metrics.exact_match(answer, refs)


def row_scores(path: Path) -> list[dict]:
    """Every prediction in `path` (predictions.jsonl, as evaluate/suite.py writes it) with its per-row score.
    The eval files hold only corpus scores, so each row is scored here with the library's chrF and exact match
    (cached per file version)."""
    try:
        info = path.stat()
    except OSError:
        raise NotFound("this evaluation has no predictions file (predictions.jsonl) any more.") from None
    key = (str(path), info.st_mtime_ns, info.st_size)
    with _scored_lock:
        if key in _scored:
            _scored.move_to_end(key)
            return _scored[key]
    rows = []
    for number_, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        base_chrf, base_em = _row_score(row.get("base"), row.get("reference"))
        tuned_chrf, tuned_em = _row_score(row.get("tuned"), row.get("reference"))
        worse = (base_chrf is not None and tuned_chrf is not None and tuned_chrf < base_chrf) or (
            base_em is True and tuned_em is False)
        rows.append({"row": number_, "prompt": row.get("prompt"), "reference": row.get("reference"),
                     "base": row.get("base"), "tuned": row.get("tuned"), "base_chrf": base_chrf,
                     "tuned_chrf": tuned_chrf, "base_exact": base_em, "tuned_exact": tuned_em, "worse": worse})
    with _scored_lock:
        _scored[key] = rows
        while len(_scored) > 8:
            _scored.popitem(last=False)
    return rows


def predictions_file(s, run: Run, job_id: int | None) -> tuple[Path, str]:
    """(predictions.jsonl, what it evaluated): an eval job's copy, else the run folder's eval/."""
    if job_id is None:
        return Path(run.run_dir) / "eval" / "predictions.jsonl", "the newest evaluation in the run folder (eval/)"
    job = get_or_404(s, Job, job_id, "job")
    if job.kind != EVAL or job.run_id != run.id or not job.result or not job.result.get("folder"):
        raise NotFound(f"job {job_id} is no finished evaluation of run {run.id}.")
    return Path(job.result["folder"]) / "predictions.jsonl", f"evaluation job {job.id} on {job.result.get('data')}"


def predictions_page(s, run: Run, job_id: int | None, worse: bool, offset: int) -> dict:
    path, what = predictions_file(s, run, job_id)
    rows = row_scores(path)
    chosen = [r for r in rows if r["worse"]] if worse else rows
    return {"rows": chosen[offset:offset + PAGE], "total": len(rows), "matching": len(chosen), "offset": offset,
            "page": PAGE, "source": what, "metric": ROW_METRIC, "job": job_id, "worse": worse}


# --- the eval job

def eval_job(ctx: JobContext) -> dict:
    """api.evaluate on the run (its held-out rows, or a dataset's file); its eval/ files are copied to
    HOME/evals/job-N/ so every job's predictions stay browsable after the next evaluation."""
    p = ctx.params
    if ctx.cancelled():
        return {}
    overrides = [f"eval.max_new_tokens={int(p['max_new_tokens'])}"] if p.get("max_new_tokens") else []
    ctx.progress(0, 3, "loading the run's models")
    with progress_from_log(ctx, {"base:": 1, "tuned:": 2}, 3):
        result = api.evaluate(p["run_dir"], data=p.get("data"), limit=p.get("limit"), overrides=overrides)
    folder = ctx.home / "evals" / f"job-{ctx.id}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", "predictions.jsonl", "report.md"):
        source = Path(result["eval_dir"]) / name
        if source.is_file():
            shutil.copyfile(source, folder / name)
    ctx.progress(3, 3, "done")
    base, tuned = finite(result["base"]), finite(result["tuned"])
    return {"base": base, "tuned": tuned, "notes": result.get("notes") or {}, "data": p.get("label"),
            "rows": max(base.get("rows") or 0, tuned.get("rows") or 0), "folder": str(folder)}


class EvalIn(BaseModel):
    dataset_id: int | None = Field(None, description="a dataset of the run's project; none: the run's held-out rows")
    limit: int | None = Field(None, ge=1, le=MAX_ROWS, description="at most this many rows (default: eval.limit)")
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="the longest answer (default: the run's)")


def eval_panel(request_app: FastAPI, run: Run, summary: dict | None) -> dict:
    """What templates/run_eval.html shows (called from the template, which runs.py renders)."""
    with request_app.state.sessions() as s:
        datasets = []
        if run.project_id is not None:
            datasets = [{"id": d.id, "name": d.name, "rows": d.rows} for d in s.scalars(
                select(Dataset).where(Dataset.project_id == run.project_id).order_by(Dataset.id))]
        jobs = [eval_job_view(j) for j in run_jobs(s, run.id, EVAL)]
    return {"tables": evaluation_tables(run, summary), "datasets": datasets, "jobs": jobs,
            "can_eval": run.state == "finished", "active": any(j["state"] in ACTIVE_JOBS for j in jobs)}


def eval_job_view(job: Job) -> dict:
    result = job.result or {}
    return {"id": job.id, "state": job.state, "done": job.done or 0, "total": job.total or 0, "message": job.message,
            "data": result.get("data") or (job.params or {}).get("label"), "rows": result.get("rows"),
            "table": score_table(result.get("base"), result.get("tuned")) if result else [],
            "notes": result.get("notes") or {}, "has_predictions": bool(result.get("folder"))}


def register(app: FastAPI) -> None:
    app.state.jobs.register(EVAL, eval_job)
    app.state.templates.env.globals["eval_panel"] = lambda run, summary: eval_panel(app, run, summary)

    @app.get("/api/jobs/{job_id}", response_model=JobOut)
    def get_job(s: DB, job_id: int):
        """A job's state (queued, running, finished, failed, cancelled), progress (done of total), its message
        and, once finished, its result."""
        return job_out(get_or_404(s, Job, job_id, "job"))

    @app.post("/api/jobs/{job_id}/cancel", response_model=JobOut)
    def cancel_job(job_id: int, request: Request):
        """Cancel a queued job, or ask a running one to stop after its current step."""
        with request.app.state.sessions() as s:
            job = get_or_404(s, Job, job_id, "job")
            state = job.state
        if not request.app.state.jobs.cancel(job_id):
            raise UserError(f"job {job_id} is {state}; only a queued or running job can be cancelled.")
        with request.app.state.sessions() as s:
            return job_out(s.get(Job, job_id))

    @app.get("/api/runs/{run_id}/jobs", response_model=list[JobOut])
    def list_run_jobs(s: DB, run_id: int, kind: str | None = Query(None, max_length=20)):
        get_or_404(s, Run, run_id, "run")
        query = select(Job).where(Job.run_id == run_id).order_by(Job.id.desc()).limit(100)
        if kind:
            query = query.where(Job.kind == kind)
        return [job_out(j) for j in s.scalars(query)]

    @app.post("/api/runs/{run_id}/eval", response_model=JobOut, status_code=202)
    def start_eval(s: DB, run_id: int, body: EvalIn, request: Request):
        """Evaluate base vs tuned (api.evaluate) on a dataset of the run's project, or on the run's held-out
        rows, as a job; follow it with GET /api/jobs/{id}."""
        run = get_or_404(s, Run, run_id, "run")
        run_dir = finished_run(run, "evaluating")
        data, label = None, "the run's held-out rows"
        if body.dataset_id is not None:
            dataset = get_or_404(s, Dataset, body.dataset_id, "dataset")
            if dataset.project_id != run.project_id:
                raise UserError(f"dataset {dataset.id} ({dataset.name!r}) belongs to another project than run "
                                f"{run.id}; evaluate on a dataset of the run's own project.")
            path = files_dir(request) / dataset.file
            if not path.is_file():
                raise UserError(f"dataset {dataset.name!r} has lost its file; upload it again.")
            data, label = str(path), f"dataset {dataset.name!r}"
        params = {"run_dir": str(run_dir), "data": data, "label": label, "limit": body.limit,
                  "max_new_tokens": body.max_new_tokens, "dataset_id": body.dataset_id}
        return job_out(request.app.state.jobs.submit(EVAL, params, project_id=run.project_id, run_id=run.id))

    @app.get("/api/runs/{run_id}/evaluation")
    def evaluation(s: DB, run_id: int):
        """The run's base-vs-tuned tables: after training (summary.json) and the newest later one (eval/)."""
        run = get_or_404(s, Run, run_id, "run")
        summary = read_summary(run.run_dir)
        return {"tables": evaluation_tables(run, summary),
                "jobs": [eval_job_view(j) for j in run_jobs(s, run.id, EVAL)]}

    @app.get("/api/runs/{run_id}/predictions")
    def predictions(s: DB, run_id: int, job: int | None = None, worse: bool = False,
                    offset: int = Query(0, ge=0, le=10**9)):
        """A page of predictions (prompt, reference, base, tuned, each answer's chrF and exact match) from the
        run folder's newest evaluation, or from eval job `job`; `worse` keeps the rows where the tuned answer
        scored lower than the base one."""
        return predictions_page(s, get_or_404(s, Run, run_id, "run"), job, worse, offset)

    @app.get("/runs/{run_id}/predictions", include_in_schema=False)
    def predictions_html(s: DB, run_id: int, request: Request, job: str = Query("", max_length=20),
                         worse: bool = False, offset: int = Query(0, ge=0, le=10**9)):
        run = get_or_404(s, Run, run_id, "run")
        chosen = int(job) if job.strip().isdigit() else None  # the form's first choice sends job= (the run folder)
        sources = [{"id": j.id, "data": (j.result or {}).get("data")} for j in run_jobs(s, run.id, EVAL, 50)
                   if j.state in ("finished", "cancelled") and (j.result or {}).get("folder")]
        return render(request, "predictions.html", run=run, sources=sources,
                      **predictions_page(s, run, chosen, worse, offset))

    @app.get("/runs/{run_id}/eval/jobs", include_in_schema=False)
    def eval_jobs_fragment(s: DB, run_id: int, request: Request):
        """The run page's list of eval jobs (the page reloads it while one runs)."""
        run = get_or_404(s, Run, run_id, "run")
        jobs = [eval_job_view(j) for j in run_jobs(s, run.id, EVAL)]
        return render(request, "eval_jobs.html", run=run, jobs=jobs,
                      active=any(j["state"] in ACTIVE_JOBS for j in jobs))

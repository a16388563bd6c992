"""Train, watch and compare: the train form (from the config schema, with its YAML view), launching, stopping
and resuming runs, live charts over server-sent events that pick up where they left off, the log tail, and
several runs' curves and differing config keys side by side."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from tunesmith import api
from tunesmith.config import set_line
from tunesmith.errors import UserError
from tunesmith.studio import configs, datasets
from tunesmith.studio.db import NAME, Dataset, Project, Run
from tunesmith.studio.runner import resumable
from tunesmith.studio.web import DB, files_dir, get_or_404, read_json_object, render

FINAL = ("finished", "failed", "interrupted")
LOG_LINES = 200


class FormIn(BaseModel):
    values: dict[str, str] = Field(description="form field -> its text, read as `--set KEY=VALUE` reads it")


class YamlIn(BaseModel):
    yaml: str = Field(max_length=256 * 1024)


class RunIn(BaseModel):
    name: str = Field("run", max_length=NAME)
    config_yaml: str = Field(max_length=256 * 1024)
    parent_id: int | None = None


class FolderIn(BaseModel):
    folder: str = Field(min_length=1, max_length=1000)
    project_id: int | None = None


class RunOut(BaseModel):
    id: int
    name: str
    state: str
    message: str | None
    resumable: bool
    run_dir: str
    project_id: int | None
    steps: int
    summary: dict | None = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The complete lines of the run's metrics.jsonl (the last may still be being written)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines(keepends=True):
        if line.endswith("\n"):
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"type": "unreadable"})
    return out


def read_summary(run_dir: str | Path) -> dict | None:
    return read_json_object(Path(run_dir) / "summary.json")


def run_out(run: Run) -> RunOut:
    records = read_metrics(run.run_dir)
    return RunOut(id=run.id, name=run.name, state=run.state, message=run.message, resumable=resumable(run),
                  run_dir=run.run_dir, project_id=run.project_id,
                  steps=sum(1 for r in records if r.get("type") == "train"), summary=read_summary(run.run_dir))


def start_values(project: Project | None, base: Run | None, dataset: Dataset | None, home: Path,
                 changes: list[str] | None = None) -> dict[str, str]:
    """The form's first values: a run to re-run with changes (`changes`: `KEY=VALUE` as `--set` takes them, e.g.
    from the run page's advice), else the project's defaults."""
    if base is not None:
        cfg = api.load_config(base.config_file, changes)
    elif project is not None:
        overrides = [f"model.name={project.base_model}"]
        overrides += [f"data.system_prompt={project.system_prompt}"] if project.system_prompt else []
        cfg = api.load_config_text(project.settings or "", overrides + (changes or []),
                                   source=f"project {project.name!r} settings")
    else:
        cfg = api.load_config(None, changes)
    if dataset is not None:
        cfg.data = cfg.data.model_copy(update={"path": str(home / "files" / dataset.file), "sources": []})
    cfg.output.dir = None
    return configs.form_values(cfg)


def advice_links(run: Run, summary: dict | None) -> list[dict] | None:
    """The summary's `advice` (what to try next, with its command), each item with `rerun`: the train form filled
    with this run's config and the item's changes (None when the run has no project to train in); None when the
    summary has no advice (not finished, or written before advice existed)."""
    advice = (summary or {}).get("advice")
    if not isinstance(advice, list):
        return None
    out = []
    for item in advice:
        query = [("from_run", run.id)] + [("set", set_line(k, v)) for k, v in item.get("set", {}).items()]
        out.append({**item, "rerun": f"/projects/{run.project_id}/train?{urlencode(query)}" if run.project_id else None})
    return out


def log_tail(run: Run, lines: int = LOG_LINES) -> str:
    if not run.log_file or not Path(run.log_file).is_file():
        return ""
    with open(run.log_file, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - 64 * 1024))
        text = handle.read().decode(errors="replace")
    text = text.replace("\r", "\n")  # progress bars redraw their line
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def config_diff(runs: list[Run]) -> tuple[list[str], dict[int, dict]]:
    """The dotted keys whose values differ between `runs`, and each run's values for them."""
    flat = {}
    for run in runs:
        try:
            flat[run.id] = configs.flat_changes(api.load_config(run.config_file))
        except UserError:
            flat[run.id] = {}
    keys = sorted({k for values in flat.values() for k in values})
    differing = [k for k in keys if len({json.dumps(v.get(k), sort_keys=True) for v in flat.values()}) > 1
                 and k != "output.dir"]
    return differing, flat


def refuse_broken_dataset(s, config_yaml: str, files: Path) -> None:
    """A run on one of the studio's datasets that still holds lines that are not JSON would stop at its first
    row: say so now, with the rows to fix."""
    cfg = api.load_config_text(config_yaml, source="the run's config")
    if cfg.data.path is None:  # data.sources: files of the user's own, not studio datasets
        return
    path = Path(cfg.data.path)
    if path.parent != files or not path.is_file():
        return
    broken = [n for n, row in enumerate(datasets.read_rows(path), start=1) if datasets.is_raw(row)]
    if broken:
        dataset = s.scalars(select(Dataset).where(Dataset.file == path.name)).first()
        name = dataset.name if dataset else path.name
        rows = ", ".join(str(n) for n in broken[:10]) + (" …" if len(broken) > 10 else "")
        raise UserError(f"dataset {name!r} still has {len(broken)} line(s) that are not JSON (row {rows}); fix or "
                        "delete them on the dataset's page, then launch again.")


def register(app: FastAPI) -> None:
    @app.get("/projects/{project_id}/train", include_in_schema=False)
    def train_page(s: DB, project_id: int, request: Request, from_run: int | None = None, dataset: int | None = None,
                   changes: Annotated[list[str] | None, Query(alias="set", max_length=20)] = None):
        project = get_or_404(s, Project, project_id, "project")
        base = get_or_404(s, Run, from_run, "run") if from_run else None
        chosen = get_or_404(s, Dataset, dataset, "dataset") if dataset else None
        datasets = s.scalars(select(Dataset).where(Dataset.project_id == project_id).order_by(Dataset.id)).all()
        values = start_values(project, base, chosen, request.app.state.settings.home, changes)
        return render(request, "train.html", project=project, sections=configs.form_sections(), values=values,
                      datasets=datasets, files=str(files_dir(request)), base=base,
                      yaml_text=configs.short_yaml(configs.config_from_form(values)))

    @app.post("/api/config/yaml")
    def form_to_yaml(body: FormIn):
        """The YAML view of the form's values (only keys that differ from the defaults)."""
        return {"yaml": configs.short_yaml(configs.config_from_form(body.values))}

    @app.post("/api/config/form")
    def yaml_to_form(body: YamlIn):
        """The form's values for a YAML config (checked: a bad key is a sentence)."""
        return {"values": configs.form_values(api.load_config_text(body.yaml, source="the YAML view"))}

    @app.post("/api/config/estimate")
    def estimate(body: YamlIn):
        """Will the run fit on this machine, and how long will it take (`tunesmith estimate` without --probe):
        the estimate as JSON, with its sentence."""
        est = api.estimate(cfg=api.load_config_text(body.yaml, source="the YAML view"))
        return {**est.to_json(), "sentence": est.sentence()}

    @app.get("/api/config/schema")
    def schema():
        return {"sections": configs.form_sections()}

    @app.post("/api/projects/{project_id}/runs", response_model=RunOut, status_code=201)
    def launch(s: DB, project_id: int, body: RunIn, request: Request):
        get_or_404(s, Project, project_id, "project")
        if body.parent_id is not None:
            get_or_404(s, Run, body.parent_id, "run")
        refuse_broken_dataset(s, body.config_yaml, files_dir(request))
        run = request.app.state.runs.submit(body.name, body.config_yaml, project_id, body.parent_id)
        return run_out(run)

    @app.post("/api/runs/folder", response_model=RunOut, status_code=201)
    def add_folder(s: DB, body: FolderIn, request: Request):
        if body.project_id is not None:
            get_or_404(s, Project, body.project_id, "project")
        return run_out(request.app.state.runs.add_folder(body.folder, body.project_id))

    @app.get("/api/runs", response_model=list[RunOut])
    def list_runs(s: DB):
        return [run_out(r) for r in s.scalars(select(Run).order_by(Run.id))]

    @app.get("/api/runs/{run_id}", response_model=RunOut)
    def get_run(s: DB, run_id: int):
        return run_out(get_or_404(s, Run, run_id, "run"))

    @app.post("/api/runs/{run_id}/stop", response_model=RunOut)
    def stop_run(s: DB, run_id: int, request: Request):
        get_or_404(s, Run, run_id, "run")
        return run_out(request.app.state.runs.stop(run_id))

    @app.post("/api/runs/{run_id}/resume", response_model=RunOut)
    def resume_run(s: DB, run_id: int, request: Request):
        get_or_404(s, Run, run_id, "run")
        return run_out(request.app.state.runs.resume(run_id))

    @app.get("/api/runs/{run_id}/log", response_class=PlainTextResponse)
    def run_log(s: DB, run_id: int, lines: int = Query(LOG_LINES, ge=1, le=5000)):
        return log_tail(get_or_404(s, Run, run_id, "run"), lines)

    @app.get("/api/runs/{run_id}/metrics")
    def run_metrics(s: DB, run_id: int):
        return {"records": read_metrics(get_or_404(s, Run, run_id, "run").run_dir)}

    @app.get("/api/runs/{run_id}/events")
    async def run_events(run_id: int, request: Request, last_event_id: str | None = Header(None),
                         after: int = Query(0, ge=0, le=10**9)):
        """Server-sent events: `metric` (a metrics.jsonl line; its id is its line number, so a browser that
        reconnects with Last-Event-ID gets only what it missed), `status` when the run's state changes, `reset`
        when a resumed run rewrote its metrics.  The stream ends after the run's final state."""
        with request.app.state.sessions() as s:
            get_or_404(s, Run, run_id, "run")
        start = int(last_event_id) if last_event_id and last_event_id.isdigit() else after
        return StreamingResponse(_events(request, run_id, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(request: Request, run_id: int, seen: int):
        last_state = None
        yield "retry: 1000\n\n"
        while True:
            with request.app.state.sessions() as s:
                run = s.get(Run, run_id)
                state, message, run_dir = run.state, run.message, run.run_dir
                can_resume = resumable(run)
            records = read_metrics(run_dir)
            if len(records) < seen:
                seen = 0
                yield "event: reset\ndata: {}\n\n"
            for number, record in enumerate(records[seen:], start=seen + 1):
                yield f"id: {number}\nevent: metric\ndata: {json.dumps(record)}\n\n"
            seen = len(records)
            if state != last_state:
                last_state = state
                status = {"state": state, "message": message, "resumable": can_resume}
                yield f"event: status\ndata: {json.dumps(status)}\n\n"
            if state in FINAL or await request.is_disconnected():
                return
            await asyncio.sleep(0.5)

    @app.get("/runs/{run_id}", include_in_schema=False)
    def run_page(s: DB, run_id: int, request: Request):
        run = get_or_404(s, Run, run_id, "run")
        project = s.get(Project, run.project_id) if run.project_id else None
        others = s.scalars(select(Run).where(Run.id != run_id).order_by(Run.id.desc()).limit(20)).all()
        report = Path(run.run_dir) / "report.md"
        summary = read_summary(run.run_dir)
        return render(request, "run.html", run=run, project=project, summary=summary,
                      advice=advice_links(run, summary), resumable=resumable(run), log=log_tail(run), others=others,
                      report=report.read_text(errors="replace") if report.is_file() else None)

    @app.get("/runs/{run_id}/training.png", include_in_schema=False)
    def run_plot(s: DB, run_id: int):
        path = Path(get_or_404(s, Run, run_id, "run").run_dir) / "training.png"
        if not path.is_file():
            raise UserError("this run has no training.png yet (it is drawn when the run ends).")
        return FileResponse(path, media_type="image/png")

    @app.get("/compare", include_in_schema=False)
    def compare_page(s: DB, request: Request, ids: str = ""):
        wanted = [int(x) for x in ids.split(",") if x.strip().isdigit()][:10]
        runs = [get_or_404(s, Run, i, "run") for i in wanted]
        keys, flat = config_diff(runs)
        everything = s.scalars(select(Run).order_by(Run.id.desc()).limit(50)).all()
        return render(request, "compare.html", runs=runs, keys=keys, flat=flat, everything=everything,
                      wanted=wanted)

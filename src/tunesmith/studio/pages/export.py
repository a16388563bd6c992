"""Ship a run: merge its adapter into the base (api.merge), write a GGUF file with an Ollama Modelfile
(api.export), or pack the adapter as a zip; each is a job writing under HOME/exports/run-N/, then offered for
download.  A download names a job and the number of one of its files: the path comes from the job's result
and must lie inside the exports folder, never from the request.  The page also shows the commands to serve
the run (`tunesmith serve`) and to make an Ollama model of the GGUF file."""

from __future__ import annotations

import shlex
import zipfile
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from tunesmith import api
from tunesmith.errors import UserError
from tunesmith.fileio import atomic_write_file
from tunesmith.studio.db import Job, Run
from tunesmith.studio.jobs import JobContext
from tunesmith.studio.pages.evaluate import ACTIVE_JOBS, JobOut, finished_run, finite, job_out, progress_from_log
from tunesmith.studio.runner import slug
from tunesmith.studio.web import DB, NotFound, get_or_404, home, render

EXPORT = "export"
WHAT = {"merge": "merged model folder", "gguf": "GGUF file", "adapter": "adapter zip"}


class ExportIn(BaseModel):
    what: Literal["merge", "gguf", "adapter"] = Field(description="merge: a Hugging Face folder with the adapter "
                                                      "folded in; gguf: one GGUF file; adapter: the adapter as a zip")
    quant: Literal["f16", "q8_0"] = Field("f16", description="the GGUF file's precision")
    ollama: bool = Field(True, description="with the GGUF file, an Ollama Modelfile beside it")


def exports_dir(root: Path) -> Path:
    return root / "exports"


def _files(folder: Path) -> list[dict]:
    return [{"name": str(p.relative_to(folder)), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]


def _zip_folder(source: Path, target: Path) -> None:
    def fill(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(source.rglob("*")):
                if path.is_file():
                    archive.write(path, Path(source.name) / path.relative_to(source))
    atomic_write_file(target, fill)


def export_job(ctx: JobContext) -> dict:
    """One export of the run (ctx.params: run_dir, what, quant, ollama) into HOME/exports/run-N/<what>-<job>/."""
    p = ctx.params
    run_dir = Path(p["run_dir"])
    folder = exports_dir(ctx.home) / f"run-{ctx.run_id}" / f"{p['what']}-{ctx.id}"
    folder.mkdir(parents=True, exist_ok=True)
    quoted = shlex.quote(str(run_dir))
    commands = [f"tunesmith serve {quoted}   # an OpenAI-compatible API on 127.0.0.1:8000"]
    info: dict = {}
    ctx.progress(0, 1, f"writing the {WHAT[p['what']]}")
    with progress_from_log(ctx, {}, 1):
        if p["what"] == "merge":
            out = folder / "merged"
            info = api.merge(run_dir, out)
            commands = [f"tunesmith serve {shlex.quote(str(out))}   # the merged folder, no adapter to apply",
                        f"tunesmith chat {shlex.quote(str(out))}"]
        elif p["what"] == "gguf":
            out = folder / f"{slug(p.get('name') or run_dir.name)}-{p['quant']}.gguf"
            info = api.export(run_dir, out, quant=p["quant"], ollama=bool(p.get("ollama")))
            if info.get("modelfile"):
                name = slug(p.get("name") or run_dir.name)
                commands.append(f"cd {shlex.quote(str(folder))} && ollama create {name} -f Modelfile")
        else:
            adapter = run_dir / "adapter"
            if not (adapter / "adapter_config.json").is_file():
                raise UserError(f"run {ctx.run_id} has no adapter/ (a full fine-tune trains every weight); export it "
                                "as a merged folder or a GGUF file instead.")
            out = folder / "adapter.zip"
            _zip_folder(adapter, out)
            info = {"adapter": str(adapter)}
    ctx.progress(1, 1, "done")
    return {"what": p["what"], "folder": str(folder), "files": _files(folder), "commands": commands,
            "info": finite(info)}


def download_path(job: Job, index: int, root: Path) -> Path:
    """The job's file number `index`, from the job's own result, and only inside HOME/exports."""
    result = job.result or {}
    files = result.get("files") or []
    if job.kind != EXPORT or job.state != "finished" or not 0 <= index < len(files):
        raise NotFound(f"job {job.id} has no file {index} to download.")
    allowed = exports_dir(root).resolve()
    path = (Path(result.get("folder", "")) / str(files[index].get("name", ""))).resolve()
    if not path.is_relative_to(allowed) or path == allowed:
        raise NotFound(f"job {job.id}'s file {index} is not in the studio's exports folder; nothing is sent.")
    if not path.is_file():
        raise NotFound(f"{path.name} is gone from the exports folder (deleted since the job wrote it); export again.")
    return path


def size_text(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def export_job_view(job: Job) -> dict:
    result = job.result or {}
    params = job.params or {}
    return {"id": job.id, "state": job.state, "done": job.done or 0, "total": job.total or 0, "message": job.message,
            "what": params.get("what"), "label": WHAT.get(params.get("what"), params.get("what")),
            "quant": params.get("quant") if params.get("what") == "gguf" else None,
            "files": [{**f, "size": size_text(int(f.get("bytes") or 0))} for f in result.get("files") or []],
            "commands": result.get("commands") or [],
            "folder": result.get("folder"), "note": (result.get("info") or {}).get("note")}


def export_panel(app: FastAPI, run: Run) -> dict:
    """What templates/run_export.html shows (called from the template)."""
    with app.state.sessions() as s:
        jobs = [export_job_view(j) for j in s.scalars(
            select(Job).where(Job.run_id == run.id, Job.kind == EXPORT).order_by(Job.id.desc()).limit(20))]
    return {"jobs": jobs, "active": any(j["state"] in ACTIVE_JOBS for j in jobs), "ready": run.state == "finished",
            "serve": f"tunesmith serve {shlex.quote(run.run_dir)}",
            "adapter": (Path(run.run_dir) / "adapter" / "adapter_config.json").is_file()}


def register(app: FastAPI) -> None:
    app.state.jobs.register(EXPORT, export_job)
    app.state.templates.env.globals["export_panel"] = lambda run: export_panel(app, run)

    @app.post("/api/runs/{run_id}/export", response_model=JobOut, status_code=202)
    def start_export(s: DB, run_id: int, body: ExportIn, request: Request):
        """Merge, GGUF or the adapter as a zip, as a job; its result lists the files to download."""
        run = get_or_404(s, Run, run_id, "run")
        run_dir = finished_run(run, "exporting")
        params = {"run_dir": str(run_dir), "what": body.what, "quant": body.quant, "ollama": body.ollama,
                  "name": run.name}
        return job_out(request.app.state.jobs.submit(EXPORT, params, project_id=run.project_id, run_id=run.id))

    @app.get("/api/jobs/{job_id}/files/{index}")
    def download(s: DB, job_id: int, index: int, request: Request):
        """File number `index` of a finished export job's result."""
        path = download_path(get_or_404(s, Job, job_id, "job"), index, home(request))
        return FileResponse(path, filename=path.name, media_type="application/octet-stream")

    @app.get("/runs/{run_id}/export/jobs", include_in_schema=False)
    def export_jobs_fragment(s: DB, run_id: int, request: Request):
        run = get_or_404(s, Run, run_id, "run")
        panel = export_panel(request.app, run)
        return render(request, "export_jobs.html", run=run, jobs=panel["jobs"], active=panel["active"])

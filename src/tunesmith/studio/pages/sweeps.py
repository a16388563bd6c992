"""Sweeps (`tunesmith sweep`), read-only: a sweep folder made on the command line is added by its path to a
project; its page shows the ranked trials (each linked to its run page when the studio knows the run, or with a
button that adds it), the history and importance plots, and best.yaml.  Everything shown is read from the
folder each time (`api.read_sweep`), so a sweep still running is shown as it stands.  The studio starts no
sweeps: one runs in a terminal, as long as its trials take."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from tunesmith import api
from tunesmith.errors import UserError, visible
from tunesmith.studio.db import NAME, Project, Run, Sweep
from tunesmith.studio.web import DB, NotFound, get_or_404, render

PLOTS = ("history.png", "importance.png")  # the only files of a sweep folder the studio serves


class SweepFolderIn(BaseModel):
    folder: str = Field(min_length=1, max_length=1000)
    project_id: int


class TrialOut(BaseModel):
    trial: int
    rank: int | None
    state: str
    value: float | None = Field(description="validation loss (a pruned trial: its last reported one)")
    params: dict
    note: str
    run_dir: str
    run_id: int | None = Field(description="the studio's run for the trial's folder, when it has one")
    addable: bool = Field(False, description="the trial has a run folder the studio does not know yet")


class SweepOut(BaseModel):
    id: int
    name: str
    folder: str
    project_id: int
    config: str | None = None
    running: bool = False
    trials: list[TrialOut] = []
    best_config: str | None = None
    plots: list[str] = []


def _runs_by_folder(s, folders: list[str]) -> dict[str, int]:
    if not folders:
        return {}
    return {run.run_dir: run.id for run in s.scalars(select(Run).where(Run.run_dir.in_(folders)))}


def sweep_out(s, sweep: Sweep, with_trials: bool = True) -> SweepOut:
    """The sweep row with what its folder holds now (a folder gone or unreadable: a sentence)."""
    out = SweepOut(id=sweep.id, name=sweep.name, folder=sweep.folder, project_id=sweep.project_id)
    if not with_trials:
        return out
    held = api.read_sweep(sweep.folder)
    known = _runs_by_folder(s, [row["run_dir"] for row in held["trials"] if row["run_dir"]])
    out.config, out.running = held["record"].get("config"), held["running"]
    out.trials = [TrialOut(**row, run_id=known.get(row["run_dir"]),
                           addable=bool(row["run_dir"]) and row["run_dir"] not in known
                           and (Path(row["run_dir"]) / "config.yaml").is_file())
                  for row in held["trials"]]
    out.best_config, out.plots = held["best_config"], held["plots"]
    return out


def register(app: FastAPI) -> None:
    @app.post("/api/sweeps/folder", response_model=SweepOut, status_code=201)
    def add_sweep(s: DB, body: SweepFolderIn):
        """Add a folder `tunesmith sweep` wrote to a project (its files stay where they are)."""
        get_or_404(s, Project, body.project_id, "project")
        try:
            path = Path(body.folder).expanduser()
        except RuntimeError:  # ~name of a user this machine does not have
            raise UserError(f"{visible(body.folder, 200)}: there is no such home folder; give the sweep folder's "
                            "full path.") from None
        api.read_sweep(path)  # a sentence when it is not a sweep folder
        path = path.resolve()
        if s.scalars(select(Sweep).where(Sweep.folder == str(path))).first() is not None:
            raise UserError(f"{path} is in the studio already.")
        sweep = Sweep(name=path.name[:NAME], folder=str(path), project_id=body.project_id)
        s.add(sweep)
        s.flush()
        return sweep_out(s, sweep)

    @app.get("/api/sweeps", response_model=list[SweepOut])
    def list_sweeps(s: DB):
        return [sweep_out(s, sweep, with_trials=False) for sweep in s.scalars(select(Sweep).order_by(Sweep.id))]

    @app.get("/api/sweeps/{sweep_id}", response_model=SweepOut)
    def get_sweep(s: DB, sweep_id: int):
        return sweep_out(s, get_or_404(s, Sweep, sweep_id, "sweep"))

    @app.get("/sweeps", include_in_schema=False)
    def sweeps_page(s: DB, request: Request):
        sweeps = s.scalars(select(Sweep).order_by(Sweep.id.desc())).all()
        projects = s.scalars(select(Project).order_by(Project.id)).all()
        names = {p.id: p.name for p in projects}
        return render(request, "sweeps.html", sweeps=sweeps, projects=projects, names=names)

    @app.get("/sweeps/{sweep_id}", include_in_schema=False)
    def sweep_page(s: DB, sweep_id: int, request: Request):
        sweep = get_or_404(s, Sweep, sweep_id, "sweep")
        shown = sweep_out(s, sweep)
        keys = list(dict.fromkeys(key for trial in shown.trials for key in trial.params))
        return render(request, "sweep.html", sweep=shown, keys=keys, project=s.get(Project, sweep.project_id))

    @app.get("/sweeps/{sweep_id}/{name}", include_in_schema=False)
    def sweep_plot(s: DB, sweep_id: int, name: str):
        folder = Path(get_or_404(s, Sweep, sweep_id, "sweep").folder)
        if name not in PLOTS:
            raise NotFound(f"a sweep has {' and '.join(PLOTS)} to show, nothing else.")
        if not (folder / name).is_file():
            raise NotFound(f"this sweep has no {name} (it is drawn when the sweep ends; importance.png needs three "
                           "complete trials).")
        return FileResponse(folder / name, media_type="image/png")

"""Projects: a name, a base model (built-in, local folder, .gguf), a system prompt and default settings (YAML of
config keys) that every run of the project starts from."""

from __future__ import annotations

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from tunesmith import api
from tunesmith.errors import UserError
from tunesmith.models import BUILTIN_MODELS
from tunesmith.studio.db import NAME, Dataset, Document, Project, Run
from tunesmith.studio.runner import resumable
from tunesmith.studio.web import DB, get_or_404, render

DEFAULT_MODEL = next(iter(BUILTIN_MODELS))


class ProjectIn(BaseModel):
    name: str = Field(min_length=1, max_length=NAME)
    base_model: str = Field(DEFAULT_MODEL, min_length=1, max_length=1000)
    system_prompt: str | None = Field(None, max_length=20000)
    settings: str = Field("", max_length=256 * 1024, description="YAML: config keys every run starts from")


class ProjectOut(BaseModel):
    id: int
    name: str
    base_model: str
    system_prompt: str | None
    settings: str


def _check(body: ProjectIn) -> None:
    name = body.name.strip()
    if not name:
        raise UserError("a project needs a name.")
    try:
        api.load_config_text(body.settings or "", [], source="the project's default settings")
    except UserError as exc:
        raise UserError(str(exc)) from None


def _out(p: Project) -> ProjectOut:
    return ProjectOut(id=p.id, name=p.name, base_model=p.base_model, system_prompt=p.system_prompt,
                      settings=p.settings or "")


def register(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index(s: DB, request: Request):
        projects = s.scalars(select(Project).order_by(Project.id)).all()
        recent = s.scalars(select(Run).order_by(Run.id.desc()).limit(10)).all()
        return render(request, "index.html", projects=projects, runs=recent, default_model=DEFAULT_MODEL,
                      builtin=list(BUILTIN_MODELS))

    @app.get("/projects/{project_id}", include_in_schema=False)
    def project_page(s: DB, project_id: int, request: Request):
        project = get_or_404(s, Project, project_id, "project")
        datasets = s.scalars(select(Dataset).where(Dataset.project_id == project_id).order_by(Dataset.id)).all()
        documents = s.scalars(select(Document).where(Document.project_id == project_id).order_by(Document.id)).all()
        runs = s.scalars(select(Run).where(Run.project_id == project_id).order_by(Run.id.desc())).all()
        return render(request, "project.html", project=project, datasets=datasets, documents=documents, runs=runs,
                      resumable=resumable)

    @app.get("/api/projects", response_model=list[ProjectOut])
    def list_projects(s: DB):
        return [_out(p) for p in s.scalars(select(Project).order_by(Project.id))]

    @app.post("/api/projects", response_model=ProjectOut, status_code=201)
    def create_project(s: DB, body: ProjectIn):
        _check(body)
        name = body.name.strip()
        if s.scalars(select(Project).where(Project.name == name)).first() is not None:
            raise UserError(f"there is a project named {name!r} already; choose another name.")
        project = Project(name=name, base_model=body.base_model.strip(), system_prompt=body.system_prompt or None,
                          settings=body.settings or "")
        s.add(project)
        s.flush()
        return _out(project)

    @app.get("/api/projects/{project_id}", response_model=ProjectOut)
    def get_project(s: DB, project_id: int):
        return _out(get_or_404(s, Project, project_id, "project"))

    @app.put("/api/projects/{project_id}", response_model=ProjectOut)
    def update_project(s: DB, project_id: int, body: ProjectIn):
        project = get_or_404(s, Project, project_id, "project")
        _check(body)
        name = body.name.strip()
        other = s.scalars(select(Project).where(Project.name == name, Project.id != project_id)).first()
        if other is not None:
            raise UserError(f"there is a project named {name!r} already; choose another name.")
        project.name, project.base_model = name, body.base_model.strip()
        project.system_prompt, project.settings = body.system_prompt or None, body.settings or ""
        return _out(project)

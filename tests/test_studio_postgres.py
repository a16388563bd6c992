"""The studio's flows against a real PostgreSQL server: a throwaway cluster (Debian's initdb/pg_ctl on a free port,
tests/studio_fixtures.py), a fresh database per test.  The migration makes exactly the models' schema there too;
projects, a run trained and followed over server-sent events, stop/resume and a second studio that re-attaches, a
CLI run folder, a dataset upload and its check, and a `tunesmith studio --db postgresql://...` process.

Skipped without Debian's postgresql, failed under CI (see studio_fixtures.skip_or_fail)."""

from __future__ import annotations

import json
import time

import httpx
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import REPEAT_ROWS, save_tiny_run_config
from studio_fixtures import StudioProcess
from test_studio_app import run_over_sse, studio, tiny_project, wait_for

from tunesmith import api
from tunesmith.studio import db


def test_the_migration_makes_exactly_the_models_schema_on_postgres(postgres_url, tmp_path):  # noqa: F811
    engine = db.make_engine(db.database_url(postgres_url, tmp_path))
    try:
        assert engine.dialect.name == "postgresql"
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), db.Base.metadata) == []
        db.migrate(engine)  # a second start finds the schema up to date
        assert {"projects", "datasets", "runs", "jobs", "alembic_version"} <= set(db.table_names(engine))
    finally:
        engine.dispose()


def test_projects_on_postgres(postgres_url, tmp_path):  # noqa: F811
    with studio(tmp_path / "home", db=postgres_url) as client:
        made = client.post("/api/projects", json={"name": "dates", "settings": "training:\n  max_steps: 7\n",
                                                  "system_prompt": "Be brief."})
        assert made.status_code == 201, made.text
        pid = made.json()["id"]
        again = client.post("/api/projects", json={"name": " dates "})
        assert again.status_code == 400 and "already" in again.json()["error"]
        other = client.post("/api/projects", json={"name": "other"}).json()
        renamed = client.put(f"/api/projects/{pid}", json={"name": "dates 2", "system_prompt": None,
                                                           "settings": "training:\n  max_steps: 7\n"})
        assert renamed.status_code == 200 and renamed.json()["system_prompt"] is None
        clash = client.put(f"/api/projects/{other['id']}", json={"name": "dates 2"})
        assert clash.status_code == 400 and "already" in clash.json()["error"]
        assert [p["name"] for p in client.get("/api/projects").json()] == ["dates 2", "other"]
        assert client.get(f"/api/projects/{pid}").json()["settings"] == "training:\n  max_steps: 7\n"
        assert client.get("/api/projects/999").status_code == 404
        assert client.get("/api/projects/99999999999").status_code == 404  # past int4, still a sentence
        nul = client.post("/api/projects", json={"name": "a\x00b"})  # SQLite stores it; PostgreSQL cannot
        assert nul.status_code == 400 and "NUL" in nul.json()["error"]
        assert len(client.get("/api/projects").json()) == 2
        page = client.get(f"/projects/{pid}/train")
        assert page.status_code == 200 and 'name="training.max_steps" value="7"' in page.text


def test_a_run_trains_over_sse_and_a_cli_folder_is_added_on_postgres(postgres_url, tmp_path):  # noqa: F811
    with studio(tmp_path / "home", db=postgres_url) as client:
        project, text = tiny_project(client, tmp_path, steps=6)
        run, _events = run_over_sse(client, project, text, steps=6)
        assert client.get(f"/api/runs/{run['id']}").json()["summary"]["train"]["steps"] == 6

        cli_dir = tmp_path / "cli-run"
        api.train(api.load_config(save_tiny_run_config(tmp_path / "cli"), ["training.max_steps=2"]), cli_dir)
        added = client.post("/api/runs/folder", json={"folder": str(cli_dir), "project_id": project})
        assert added.status_code == 201, added.text
        assert added.json()["state"] == "finished" and added.json()["steps"] == 2
        again = client.post("/api/runs/folder", json={"folder": str(cli_dir)})
        assert again.status_code == 400 and "already" in again.json()["error"]
        assert [r["id"] for r in client.get("/api/runs").json()] == [run["id"], added.json()["id"]]


def test_stop_resume_and_a_second_studio_reattaches_on_postgres(postgres_url, tmp_path):  # noqa: F811
    home = tmp_path / "home"
    with studio(home, db=postgres_url) as client:
        project, text = tiny_project(client, tmp_path, steps=5000)
        run = client.post(f"/api/projects/{project}/runs", json={"name": "long", "config_yaml": text}).json()
        deadline = time.monotonic() + 120
        while client.get(f"/api/runs/{run['id']}").json()["steps"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    # the first studio has stopped; its run has not: a second one on the same database finds it alive
    with studio(home, db=postgres_url) as client:
        assert client.get(f"/api/runs/{run['id']}").json()["state"] == "running"
        assert client.post(f"/api/runs/{run['id']}/stop").json()["state"] == "stopping"
        ended = wait_for(client, run["id"], ("interrupted", "failed", "finished"))
        assert ended["state"] == "interrupted" and ended["resumable"], ended
        steps_then = ended["steps"]
        resumed = client.post(f"/api/runs/{run['id']}/resume").json()
        assert resumed["state"] in ("queued", "running")
        deadline = time.monotonic() + 120  # it trains on from its checkpoint
        while (now := client.get(f"/api/runs/{run['id']}").json())["steps"] <= steps_then:
            assert now["state"] in ("queued", "running"), now
            assert time.monotonic() < deadline
            time.sleep(0.2)
        client.post(f"/api/runs/{run['id']}/stop")
        ended = wait_for(client, run["id"], ("interrupted", "failed", "finished"))
        assert ended["state"] in ("interrupted", "finished") and ended["steps"] > steps_then


def test_a_dataset_upload_and_its_check_on_postgres(postgres_url, tmp_path):  # noqa: F811
    with studio(tmp_path / "home", db=postgres_url) as client:
        project, _ = tiny_project(client, tmp_path, steps=2)
        rows = "".join(json.dumps(r) + "\n" for r in REPEAT_ROWS) + '{"instruction": "broken\n{"output": "x"}\n'
        made = client.post(f"/api/projects/{project}/datasets", files={"file": ("../repeat.jsonl", rows)})
        assert made.status_code == 201, made.text
        dataset, check = made.json()["dataset"], made.json()["check"]
        assert dataset["source_name"] == "repeat.jsonl" and dataset["rows"] == len(REPEAT_ROWS) + 2
        problems = {p["row"]: p["message"] for p in check["problems"]}
        assert "not valid JSON" in problems[len(REPEAT_ROWS) + 1] and check["token_stats"]["count"] > 0
        again = client.get(f"/api/datasets/{dataset['id']}").json()["check"]
        assert again["problems"] == check["problems"]
        assert [d["id"] for d in client.get(f"/api/projects/{project}/datasets").json()] == [dataset["id"]]


def test_tunesmith_studio_serves_from_postgres(postgres_url, tmp_path):  # noqa: F811
    with StudioProcess(tmp_path / "studio", db=postgres_url) as served:
        with httpx.Client(base_url=served.url, headers=served.headers(), trust_env=False, timeout=30) as client:
            assert client.get("/healthz").json() == {"ok": True}
            made = client.post("/api/projects", json={"name": "served"})
            assert made.status_code == 201, made.text
            assert [p["name"] for p in client.get("/api/projects").json()] == ["served"]
        served.stop()
        served.start()  # the state is in the server's database, not in the studio's home
        with httpx.Client(base_url=served.url, trust_env=False, timeout=30) as client:
            assert [p["name"] for p in client.get("/api/projects").json()] == ["served"]
    assert not (served.home / "studio.db").exists() and not (served.tmp_dir / "studio.db").exists()
    assert "Traceback" not in served.log_text()

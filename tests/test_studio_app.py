"""The studio's spine through its HTTP API (FastAPI's TestClient, no browser): the database and its migration,
the safety guard, projects, the train form's YAML round trip, and runs: queued, trained by a child process,
followed over server-sent events, stopped with a checkpoint, resumed, re-attached by a studio started again, and
added from a folder the CLI made."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import save_tiny_run_config
from fastapi.testclient import TestClient

from tunesmith import api
from tunesmith.errors import UserError
from tunesmith.studio import db
from tunesmith.studio.app import StudioSettings, create_app
from tunesmith.studio.server import check_exposure


def studio(home: Path, **kw) -> TestClient:
    app = create_app(StudioSettings(home=home, poll_s=0.2, **kw))
    client = TestClient(app, base_url="http://127.0.0.1:7860")
    client.headers["X-Tunesmith-Token"] = app.state.token
    return client


def wait_for(client: TestClient, run_id: int, states: tuple, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/api/runs/{run_id}").json()
        if run["state"] in states:
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} stayed {run['state']}; log:\n{client.get(f'/api/runs/{run_id}/log').text}")


def sse(client: TestClient, url: str, headers: dict | None = None) -> list[tuple[str | None, str, dict]]:
    """(id, event, data) of every event until the stream ends."""
    events, current = [], {}
    with client.stream("GET", url, headers=headers or {}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                if "event" in current:
                    events.append((current.get("id"), current["event"], json.loads(current["data"])))
                current = {}
                continue
            key, _, value = line.partition(": ")
            current[key] = value
    return events


def test_migration_makes_exactly_the_models_schema(tmp_path):
    engine = db.make_engine(db.database_url(None, tmp_path))
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), db.Base.metadata) == []
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    db.migrate(engine)  # a second start finds the schema up to date
    assert "runs" in db.table_names(engine)


def test_bad_database_url_is_a_sentence(tmp_path):
    with pytest.raises(UserError, match="--db"):
        db.make_engine("mysql://nobody@localhost/x")
    with pytest.raises(UserError, match="not a database URL"):
        db.make_engine("::not a url::")


def test_guard_needs_token_same_origin_and_own_host(tmp_path):
    with studio(tmp_path) as client:
        token = client.headers.pop("X-Tunesmith-Token")
        body = {"name": "p"}
        assert client.post("/api/projects", json=body).status_code == 403
        refused = client.post("/api/projects", json=body, headers={"X-Tunesmith-Token": "wrong"})
        assert refused.status_code == 403 and "token" in refused.json()["error"]
        other_site = client.post("/api/projects", json=body, headers={"X-Tunesmith-Token": token,
                                                                      "Origin": "http://evil.example"})
        assert other_site.status_code == 403 and "another site" in other_site.json()["error"]
        rebound = client.get("/api/projects", headers={"Host": "evil.example:7860"})
        assert rebound.status_code == 403
        ok = client.post("/api/projects", json=body, headers={"X-Tunesmith-Token": token,
                                                              "Origin": "http://127.0.0.1:7860"})
        assert ok.status_code == 201
        assert client.get("/").status_code == 200  # reading needs no token on this machine alone
    # the token is kept, so pages opened before a restart keep working after it
    with studio(tmp_path) as again:
        assert again.headers["X-Tunesmith-Token"] == token


def test_a_given_token_is_needed_to_read_too(tmp_path):
    with studio(tmp_path, token="s3cret") as client:
        client.headers.pop("X-Tunesmith-Token")
        assert client.get("/api/projects").status_code == 401
        assert client.get("/api/projects", headers={"X-Tunesmith-Token": "s3cret"}).status_code == 200
        opened = client.get("/?token=s3cret", follow_redirects=False)
        assert opened.status_code == 303 and "tunesmith_token=s3cret" in opened.headers["set-cookie"]
        client.cookies.set("tunesmith_token", "s3cret")
        assert client.get("/").status_code == 200


def test_binding_beyond_this_machine_needs_a_token():
    with pytest.raises(UserError, match="--token"):
        check_exposure("0.0.0.0", None)
    check_exposure("0.0.0.0", "t")
    check_exposure("127.0.0.1", None)


def test_projects_and_the_form_yaml_round_trip(tmp_path):
    with studio(tmp_path) as client:
        made = client.post("/api/projects", json={"name": "dates", "settings": "training:\n  max_steps: 7\n"})
        assert made.status_code == 201
        again = client.post("/api/projects", json={"name": "dates"})
        assert again.status_code == 400 and "already" in again.json()["error"]
        bad = client.post("/api/projects", json={"name": "x", "settings": "training: {max_stepz: 3}"})
        assert bad.status_code == 400 and "max_steps" in bad.json()["error"]
        page = client.get(f"/projects/{made.json()['id']}/train")
        assert page.status_code == 200 and 'name="training.max_steps" value="7"' in page.text
        view = client.post("/api/config/yaml", json={"values": {"method": "dora", "training.max_steps": "5",
                                                                "lora.target_modules": "[q_proj, v_proj]"}}).json()
        assert yaml.safe_load(view["yaml"]) == {"method": "dora", "lora": {"target_modules": ["q_proj", "v_proj"]},
                                                "training": {"max_steps": 5}}
        back = client.post("/api/config/form", json={"yaml": view["yaml"]}).json()["values"]
        assert back["method"] == "dora" and back["training.max_steps"] == "5"
        assert back["lora.target_modules"] == "[q_proj, v_proj]"
        wrong = client.post("/api/config/form", json={"yaml": "training:\n  learning_rate: fast\n"})
        assert wrong.status_code == 400 and "training.learning_rate" in wrong.json()["error"]
        assert client.get("/projects/999").status_code == 404
        wrong_method = client.delete("/api/projects")
        assert wrong_method.status_code == 405 and "DELETE is not allowed" in wrong_method.json()["error"]
        assert {"GET", "POST"} <= set(wrong_method.headers["allow"].replace(" ", "").split(","))


def tiny_project(client: TestClient, tmp_path: Path, steps: int, extra: str = "") -> tuple[int, str]:
    config = save_tiny_run_config(tmp_path, extra)
    project = client.post("/api/projects", json={"name": f"tiny-{time.time_ns()}",
                                                 "base_model": str(tmp_path / "tiny-llama")}).json()
    text = config.read_text().replace("epochs: 100", f"epochs: 100, max_steps: {steps}, num_threads: 1")
    return project["id"], text


def run_over_sse(client: TestClient, project: int, text: str, steps: int) -> tuple[dict, list]:
    """Launch a run of `text` and follow its events to the end: every step once, the loss falling, finished."""
    run = client.post(f"/api/projects/{project}/runs", json={"name": "first", "config_yaml": text}).json()
    assert run["state"] in ("queued", "running")
    events = sse(client, f"/api/runs/{run['id']}/events")
    metrics = [data for _, kind, data in events if kind == "metric" and data["type"] == "train"]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert [data["state"] for _, kind, data in events if kind == "status"][-1] == "finished"
    return run, events


def test_a_run_trains_streams_its_points_and_continues_after_a_reconnect(tmp_path):
    with studio(tmp_path / "home") as client:
        project, text = tiny_project(client, tmp_path, steps=6)
        bad = client.post(f"/api/projects/{project}/runs", json={"name": "x", "config_yaml": "training: {epochs: -1}"})
        assert bad.status_code == 400 and "training.epochs" in bad.json()["error"]
        run, events = run_over_sse(client, project, text, steps=6)
        # a browser that reconnects sends the last id it saw and gets only the rest
        ids = [int(i) for i, kind, _ in events if kind == "metric"]
        rest = sse(client, f"/api/runs/{run['id']}/events", headers={"Last-Event-ID": str(ids[2])})
        assert [int(i) for i, kind, _ in rest if kind == "metric"] == ids[3:]
        page = client.get(f"/runs/{run['id']}")
        assert page.status_code == 200 and "finished" in page.text and "Health" in page.text
        assert client.get(f"/api/runs/{run['id']}").json()["summary"]["train"]["steps"] == 6
        assert "tunesmith" in client.get(f"/api/runs/{run['id']}/log").text


def test_stop_saves_a_checkpoint_resume_finishes_and_a_second_studio_reattaches(tmp_path):
    home = tmp_path / "home"
    with studio(home) as client:
        project, text = tiny_project(client, tmp_path, steps=5000)
        run = client.post(f"/api/projects/{project}/runs", json={"name": "long", "config_yaml": text}).json()
        deadline = time.monotonic() + 120
        while client.get(f"/api/runs/{run['id']}").json()["steps"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    # the first studio has stopped; its run has not: a second studio finds it alive and follows it
    with studio(home) as client:
        alive = client.get(f"/api/runs/{run['id']}").json()
        assert alive["state"] == "running"
        stopped = client.post(f"/api/runs/{run['id']}/stop").json()
        assert stopped["state"] == "stopping"
        ended = wait_for(client, run["id"], ("interrupted", "failed", "finished"))
        assert ended["state"] == "interrupted" and ended["resumable"], ended
        steps_then = ended["steps"]
        assert client.post(f"/api/runs/{run['id']}/stop").status_code == 400
        resumed = client.post(f"/api/runs/{run['id']}/resume").json()
        assert resumed["state"] in ("queued", "running")
        client.post(f"/api/runs/{run['id']}/stop")  # and once more, then let the test end quickly
        ended = wait_for(client, run["id"], ("interrupted", "failed", "finished"))
        # it went on from the checkpoint (on a fast machine it may even finish before the second stop lands)
        assert ended["state"] in ("interrupted", "finished") and ended["steps"] >= steps_then


def test_a_run_whose_process_is_gone_is_marked_from_its_folder(tmp_path):
    home = tmp_path / "home"
    with studio(home) as client:
        project, text = tiny_project(client, tmp_path, steps=3)
        run = client.post(f"/api/projects/{project}/runs", json={"name": "r", "config_yaml": text}).json()
        wait_for(client, run["id"], ("finished",))
    engine = db.make_engine(db.database_url(None, home))
    with db.session_factory(engine).begin() as s:  # as if the studio died while the run was alive
        row = s.get(db.Run, run["id"])
        row.state, row.pid, row.pid_started = "running", 999999, "1"
    engine.dispose()
    with studio(home) as client:
        assert client.get(f"/api/runs/{run['id']}").json()["state"] == "finished"


def test_a_cli_run_folder_is_added_by_pointing_at_it(tmp_path):
    config = save_tiny_run_config(tmp_path)
    cfg = api.load_config(config, ["training.max_steps=3"])
    run_dir = tmp_path / "cli-run"
    api.train(cfg, run_dir)
    with studio(tmp_path / "home") as client:
        added = client.post("/api/runs/folder", json={"folder": str(run_dir)})
        assert added.status_code == 201, added.text
        assert added.json()["state"] == "finished" and added.json()["steps"] == 3
        assert client.post("/api/runs/folder", json={"folder": str(run_dir)}).status_code == 400
        nowhere = client.post("/api/runs/folder", json={"folder": str(tmp_path / "nope")})
        assert nowhere.status_code == 400 and "config.yaml" in nowhere.json()["error"]
        compare = client.get(f"/compare?ids={added.json()['id']}")
        assert compare.status_code == 200

"""The studio's evaluate, chat and export pages through their HTTP API (FastAPI's TestClient, no browser), on a
tiny Llama run trained once for the module with the before/after evaluation on: the base-vs-tuned table on the
run page, the predictions browser and its "tuned is worse" filter, an eval job on a dataset of the project, base
and tuned answers streamed side by side and kept in the database, merge / GGUF / adapter exports downloaded
from the exports folder only; and the train form's description of every config key."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import pytest
from conftest import REPEAT_ROWS, save_tiny_run_config
from fastapi.testclient import TestClient
from markupsafe import escape

from tunesmith import api
from tunesmith.studio import configs
from tunesmith.studio.app import StudioSettings, create_app
from tunesmith.studio.db import Dataset, Job, Project, Run

# the built-in evaluation kept small: two held-out rows, short answers, metrics that need no other model
EVAL_SETTINGS = ["training.max_steps=4", "eval.enabled=true", "eval.limit=2", "eval.max_new_tokens=6",
                 "eval.metrics=[perplexity,chrf,exact_match]", "training.num_threads=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run (adapter/, summary.json with the before/after table, eval/predictions.jsonl)."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = api.load_config(save_tiny_run_config(root), EVAL_SETTINGS)
    api.train(cfg, root / "run")
    return root / "run"


def studio(home: Path) -> TestClient:
    app = create_app(StudioSettings(home=home, poll_s=0.2))
    client = TestClient(app, base_url="http://127.0.0.1:7860")
    client.headers["X-Tunesmith-Token"] = app.state.token
    return client


def add_run(client: TestClient, run_dir: Path, project_id: int | None = None) -> int:
    response = client.post("/api/runs/folder", json={"folder": str(run_dir), "project_id": project_id})
    assert response.status_code == 201, response.text
    run = response.json()
    assert run["state"] == "finished"
    return run["id"]


def wait_job(client: TestClient, job_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} is still {job['state']}: {job['message']}")


def sse_events(client: TestClient, url: str, body: dict) -> list[tuple[str, dict]]:
    events, current = [], {}
    with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line:
                if current:
                    events.append((current.get("event", "message"), json.loads(current["data"])))
                current = {}
                continue
            key, _, value = line.partition(": ")
            current[key] = value
    return events


def test_every_key_of_the_train_form_has_a_description():
    keys = [entry for section in configs.form_sections() for entry in section["keys"]]
    assert len(keys) > 50
    missing = [entry["key"] for entry in keys if not entry["description"].strip()]
    assert not missing, f"config keys without a description: {missing}"


def test_the_run_page_shows_the_before_after_table_and_the_predictions(tmp_path, trained):
    summary = json.loads((trained / "summary.json").read_text())
    with studio(tmp_path / "home") as client:
        run_id = add_run(client, trained)
        page = client.get(f"/runs/{run_id}")
        assert page.status_code == 200
        assert "Before and after training" in page.text
        assert "Newest evaluation in the run folder" not in page.text  # eval/ holds the same table as summary.json
        section = page.text.split('id="evaluate"')[1]
        for metric in ("perplexity", "chrf", "exact_match"):
            assert f"<td>{metric}</td>" in section
        assert f"{summary['eval']['base']['perplexity']:.4g}" in section
        assert f"{summary['eval']['tuned']['perplexity']:.4g}" in section
        assert f'href="/runs/{run_id}/chat"' in page.text and 'id="export"' in page.text

        listed = client.get(f"/api/runs/{run_id}/predictions").json()
        written = [json.loads(line) for line in (trained / "eval" / "predictions.jsonl").read_text().splitlines()]
        assert listed["total"] == len(written) == 2
        assert [r["prompt"] for r in listed["rows"]] == [w["prompt"] for w in written]
        assert [r["tuned"] for r in listed["rows"]] == [w["tuned"] for w in written]
        for row in listed["rows"]:
            assert 0 <= row["base_chrf"] <= 100 and 0 <= row["tuned_chrf"] <= 100
            assert row["worse"] == (row["tuned_chrf"] < row["base_chrf"] or (row["base_exact"] and not row["tuned_exact"]))
        worse = client.get(f"/api/runs/{run_id}/predictions", params={"worse": True}).json()
        assert [r["row"] for r in worse["rows"]] == [r["row"] for r in listed["rows"] if r["worse"]]
        html = client.get(f"/runs/{run_id}/predictions", params={"job": "", "worse": "true"})
        assert html.status_code == 200 and "only where tuned is worse" in html.text
        assert html.text.count('<tr class="worse">') == worse["matching"]
        assert client.get(f"/api/runs/{run_id}/predictions", params={"job": 999}).status_code == 404


def test_an_eval_job_on_a_dataset_of_the_project(tmp_path, trained):
    home = tmp_path / "home"
    with studio(home) as client:
        project = client.post("/api/projects", json={"name": "tiny", "base_model": "x"}).json()["id"]
        other = client.post("/api/projects", json={"name": "other", "base_model": "x"}).json()["id"]
        run_id = add_run(client, trained, project)
        (home / "files" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REPEAT_ROWS[:3]))
        with client.app.state.sessions.begin() as s:
            mine = Dataset(project_id=project, name="three rows", file="rows.jsonl", rows=3)
            theirs = Dataset(project_id=other, name="elsewhere", file="rows.jsonl", rows=3)
            s.add_all([mine, theirs])
            s.flush()
            mine_id, theirs_id = mine.id, theirs.id
        refused = client.post(f"/api/runs/{run_id}/eval", json={"dataset_id": theirs_id})
        assert refused.status_code == 400 and "another project" in refused.json()["error"]
        assert client.post(f"/api/runs/{run_id}/eval", json={"dataset_id": 999}).status_code == 404
        assert client.post(f"/api/runs/{run_id}/eval", json={"limit": 0}).status_code == 422
        page = client.get(f"/runs/{run_id}")
        assert f'<option value="{mine_id}">three rows (3 rows)</option>' in page.text

        started = client.post(f"/api/runs/{run_id}/eval", json={"dataset_id": mine_id, "limit": 2, "max_new_tokens": 4})
        assert started.status_code == 202, started.text
        job = wait_job(client, started.json()["id"])
        assert job["state"] == "finished", job["message"]
        assert job["done"] == job["total"] == 3
        result = job["result"]
        assert result["rows"] == 2 and result["data"] == "dataset 'three rows'"
        assert set(result["base"]) >= {"perplexity", "chrf", "exact_match"}
        kept = [json.loads(line) for line in (Path(result["folder"]) / "predictions.jsonl").read_text().splitlines()]
        assert [row["prompt"] for row in kept] == ["Repeat the word river.", "Repeat the word stone."]
        browsed = client.get(f"/api/runs/{run_id}/predictions", params={"job": job["id"]}).json()
        assert [r["prompt"] for r in browsed["rows"]] == [row["prompt"] for row in kept]
        fragment = client.get(f"/runs/{run_id}/eval/jobs").text
        assert f"Evaluation {job['id']}" in fragment and "<td>chrf</td>" in fragment and "data-active" not in fragment
        assert f"{result['tuned']['perplexity']:.4g}" in fragment
        later = client.get(f"/runs/{run_id}").text.split("Newest evaluation in the run folder")[1].split("</table>")[0]
        assert f"{result['base']['perplexity']:.4g}" in later  # the job's numbers, written into RUN_DIR/eval/
        assert [j["id"] for j in client.get(f"/api/runs/{run_id}/jobs", params={"kind": "eval"}).json()] == [job["id"]]
        again = client.post(f"/api/jobs/{job['id']}/cancel")
        assert again.status_code == 400 and "finished" in again.json()["error"]
        assert client.get("/api/jobs/999").status_code == 404


def test_base_and_tuned_answer_side_by_side_and_the_conversation_is_kept(tmp_path, trained):
    home = tmp_path / "home"
    with studio(home) as client:
        run_id = add_run(client, trained)
        settings = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 6}
        chat = client.post(f"/api/runs/{run_id}/chat/sessions",
                           json={"system_prompt": "Answer briefly.", "settings": settings}).json()
        url = f"/api/chat/sessions/{chat['id']}"
        early = client.post(f"{url}/reply", json={"side": "base"})
        assert early.status_code == 400 and "no message" in early.json()["error"]
        assert client.post(f"{url}/messages", json={"content": "Repeat the word river."}).status_code == 201

        answers = {}
        for side in ("base", "tuned"):
            events = sse_events(client, f"{url}/reply", {"side": side})
            pieces = "".join(data["text"] for kind, data in events if kind == "piece")
            assert events[-1][0] == "done", events
            assert pieces.strip() and events[-1][1]["content"] == pieces.strip()
            answers[side] = pieces.strip()
        twice = client.post(f"{url}/reply", json={"side": "tuned"})
        assert twice.status_code == 400 and "answered the newest message already" in twice.json()["error"]
        assert client.post(f"{url}/reply", json={"side": "both"}).status_code == 422
        assert len(client.app.state.chat_models.models) == 2  # each model loaded once, kept for the next message

        kept = client.get(url).json()
        assert [(m["side"], m["content"]) for m in kept["messages"]] == [
            ("user", "Repeat the word river."), ("base", answers["base"]), ("tuned", answers["tuned"])]
        assert kept["system_prompt"] == "Answer briefly." and kept["settings"] == settings
        changed = client.put(url, json={"system_prompt": None, "settings": {**settings, "temperature": 0.7}}).json()
        assert changed["settings"]["temperature"] == 0.7 and changed["system_prompt"] is None
        assert client.put(url, json={"settings": {"temperature": 5}}).status_code == 422
    with studio(home) as client:  # a studio started again shows the conversation
        page = client.get(f"/runs/{run_id}/chat")
        assert page.status_code == 200
        assert page.text.count("Repeat the word river.") == 2  # the user's message in both columns
        for answer in answers.values():
            assert str(escape(answer)) in page.text
        fresh = client.get(f"/runs/{run_id}/chat", params={"session": "new"})
        assert fresh.status_code == 200 and "Repeat the word river." not in fresh.text.split('class="columns"')[1]
        assert client.delete(url).status_code == 204
        assert client.get(url).status_code == 404


def test_exports_are_jobs_whose_files_download_from_the_exports_folder_only(tmp_path, trained):
    home = tmp_path / "home"
    with studio(home) as client:
        run_id = add_run(client, trained)
        assert client.post(f"/api/runs/{run_id}/export", json={"what": "gguf", "quant": "q4"}).status_code == 422
        jobs = {what: client.post(f"/api/runs/{run_id}/export", json={"what": what}).json()["id"]
                for what in ("gguf", "merge", "adapter")}
        queued = client.post(f"/api/runs/{run_id}/export", json={"what": "merge"}).json()["id"]
        assert client.post(f"/api/jobs/{queued}/cancel").status_code == 200  # queued behind the others: never runs
        done = {what: wait_job(client, job_id) for what, job_id in jobs.items()}
        cancelled = wait_job(client, queued)
        assert cancelled["state"] == "cancelled"
        assert client.get(f"/api/jobs/{queued}/files/0").status_code == 404
        for what, job in done.items():
            assert job["state"] == "finished", (what, job["message"])

        gguf = done["gguf"]["result"]
        names = [f["name"] for f in gguf["files"]]
        assert names == ["Modelfile", "run-f16.gguf"]
        download = client.get(f"/api/jobs/{jobs['gguf']}/files/{names.index('run-f16.gguf')}")
        assert download.status_code == 200 and download.content[:4] == b"GGUF"
        assert len(download.content) == gguf["files"][1]["bytes"]
        modelfile = client.get(f"/api/jobs/{jobs['gguf']}/files/0").text
        assert "FROM ./run-f16.gguf" in modelfile
        assert any("ollama create run -f Modelfile" in c for c in gguf["commands"])
        assert any(c.startswith(f"tunesmith serve {trained}") for c in gguf["commands"])
        assert Path(gguf["folder"]).is_relative_to(home / "exports")

        merged = [f["name"] for f in done["merge"]["result"]["files"]]
        assert {"merged/config.json", "merged/model.safetensors", "merged/tunesmith_merge.json"} <= set(merged)
        zipped = client.get(f"/api/jobs/{jobs['adapter']}/files/0")
        with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
            assert "adapter/adapter_model.safetensors" in archive.namelist()

        page = client.get(f"/runs/{run_id}").text
        assert f'href="/api/jobs/{jobs["gguf"]}/files/1"' in page and f"tunesmith serve {trained}" in page

        # a download names a job and a file number; the path is the job's, and outside exports/ nothing is sent
        assert client.get(f"/api/jobs/{jobs['gguf']}/files/5").status_code == 404
        assert client.get(f"/api/jobs/{jobs['gguf']}/files/-1").status_code == 404
        secret = tmp_path / "secret.txt"
        secret.write_text("not for download")
        with client.app.state.sessions.begin() as s:
            job = s.get(Job, jobs["merge"])
            job.result = {**job.result, "folder": str(tmp_path), "files": [{"name": "secret.txt", "bytes": 16}]}
            climbing = Job(kind="export", state="finished", run_id=run_id, params={}, result={
                "folder": str(home / "exports"), "files": [{"name": "../secret.txt", "bytes": 16}]})
            not_export = Job(kind="eval", state="finished", run_id=run_id, params={}, result={
                "folder": str(home / "exports" / "x"), "files": [{"name": "a", "bytes": 1}]})
            s.add_all([climbing, not_export])
            s.flush()
            tampered = [jobs["merge"], climbing.id, not_export.id]
        for job_id in tampered:
            refused = client.get(f"/api/jobs/{job_id}/files/0")
            assert refused.status_code == 404 and "not for download" not in refused.text


def test_the_tuned_side_and_exports_wait_for_a_finished_run(tmp_path):
    with studio(tmp_path / "home") as client:
        with client.app.state.sessions.begin() as s:
            project = Project(name="p", base_model="x")
            s.add(project)
            s.flush()
            run = Run(name="r", run_dir=str(tmp_path / "none"), config_file=str(tmp_path / "none.yaml"),
                      state="failed", project_id=project.id)
            s.add(run)
            s.flush()
            run_id = run.id
        for url, body in ((f"/api/runs/{run_id}/export", {"what": "merge"}), (f"/api/runs/{run_id}/eval", {})):
            refused = client.post(url, json=body)
            assert refused.status_code == 400 and "needs a finished run" in refused.json()["error"]
        chat = client.post(f"/api/runs/{run_id}/chat/sessions", json={}).json()
        client.post(f"/api/chat/sessions/{chat['id']}/messages", json={"content": "hi"})
        tuned = client.post(f"/api/chat/sessions/{chat['id']}/reply", json={"side": "tuned"})
        assert tuned.status_code == 400 and "needs a finished run" in tuned.json()["error"]
        assert client.post(f"/api/chat/sessions/{chat['id']}/messages", json={"content": "  "}).status_code == 400

"""The studio dies (kill -9) while a run trains, and is started again on the same home, database and port.

A run is a process of its own (tunesmith.studio.runner starts it detached), so killing the studio leaves it
training: the studio started again finds it by its process id and start time, shows its whole curve from the run
folder, and sees it finish.  When the training process dies too, the run is `interrupted` and resumable from its
newest checkpoint, and resuming it through the API ends at the same final loss as a run never interrupted
(tests/test_resume.py shows that for `tunesmith train --resume`; here it goes through the studio)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from studio_fixtures import StudioProcess
from test_studio_app import sse, tiny_project, wait_for

from tunesmith import api
from tunesmith.studio.pages.runs import read_metrics
from tunesmith.studio.runner import process_start
from tunesmith.train.checkpoint import list_checkpoints

# One torch thread: a tiny model's step then takes milliseconds and barely slows when other processes want the
# cores (two threads on two busy cores are ten times slower, and vary as much).
STEPS = 300  # long enough to outlive the studio's kill (and, mostly, its restart), short enough to finish
RESUMED_STEPS = 60  # the run that is killed too, with a checkpoint every 2 steps


def client_for(studio: StudioProcess) -> httpx.Client:
    """An HTTP client for the started `studio`, carrying its token; no proxy from the environment."""
    return httpx.Client(base_url=studio.url, headers=studio.headers(), trust_env=False, timeout=60)


def wait_until(condition, what: str, timeout: float = 120, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}")
        time.sleep(every)
    return value


def train_steps(run_dir: Path) -> list[int]:
    """The steps of the run's metrics.jsonl training records, in order."""
    return [r["step"] for r in read_metrics(run_dir) if r.get("type") == "train"]


def alive(pid: int) -> bool:
    return process_start(pid) is not None  # None: no such process, or a zombie (it has ended)


def test_a_run_keeps_training_through_a_studio_kill9_and_the_restarted_studio_follows_it(tmp_path):
    with StudioProcess(tmp_path / "studio") as studio:
        with client_for(studio) as client:
            project, text = tiny_project(client, tmp_path, steps=STEPS)
            launched = client.post(f"/api/projects/{project}/runs", json={"name": "through a crash",
                                                                          "config_yaml": text})
            assert launched.status_code == 201, launched.text
            run = launched.json()
            run_dir = Path(run["run_dir"])
            wait_until(lambda: client.get(f"/api/runs/{run['id']}").json()["steps"] > 0, "the first step")
            pid = api.read_status(run_dir)["pid"]
        studio.kill9()
        steps_at_kill = len(train_steps(run_dir))
        assert 0 < steps_at_kill < STEPS, "the run must be mid-training when the studio is killed"
        assert alive(pid), "the training process died with the studio"

        studio.start()  # same home, database, port and token
        with client_for(studio) as client:
            listed = {r["id"]: r for r in client.get("/api/runs").json()}
            assert listed[run["id"]]["state"] in ("running", "finished"), listed[run["id"]]
            # the whole curve so far and then the rest, from the first point, until the run ends
            events = sse(client, f"/api/runs/{run['id']}/events")
            metrics = [(int(i), data) for i, kind, data in events if kind == "metric"]
            assert [i for i, _ in metrics] == list(range(1, len(metrics) + 1))
            losses = [data["loss"] for _, data in metrics if data["type"] == "train"]
            assert [data["step"] for _, data in metrics if data["type"] == "train"] == list(range(1, STEPS + 1))
            assert [data["state"] for _, kind, data in events if kind == "status"][-1] == "finished"
            ended = client.get(f"/api/runs/{run['id']}").json()
            assert ended["state"] == "finished" and ended["steps"] == STEPS
            assert ended["summary"]["train"]["steps"] == STEPS
            assert ended["summary"]["train"]["final_loss"] == pytest.approx(losses[-1])
            assert losses[-1] < losses[0]
            assert api.read_status(run_dir)["pid"] == pid  # the same process trained it to the end: not restarted
            page = client.get(f"/runs/{run['id']}")
            assert page.status_code == 200 and "finished" in page.text
        assert "Traceback" not in studio.log_text()


def test_a_run_killed_with_the_studio_is_interrupted_and_resumes_to_the_uninterrupted_loss(tmp_path):
    with StudioProcess(tmp_path / "studio") as studio:
        with client_for(studio) as client:
            project, text = tiny_project(client, tmp_path, steps=RESUMED_STEPS)
            text = text.replace(f"max_steps: {RESUMED_STEPS}",
                                f"max_steps: {RESUMED_STEPS}, save_steps: 2")
            run = client.post(f"/api/projects/{project}/runs", json={"name": "both die",
                                                                     "config_yaml": text}).json()
            run_dir = Path(run["run_dir"])
            wait_until(lambda: list_checkpoints(run_dir), "the first checkpoint")
        studio.kill9()
        pid = api.read_status(run_dir)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), "the training process to die", timeout=30)
        killed_at = len(train_steps(run_dir))
        assert killed_at < RESUMED_STEPS, "the run must be killed before it ends"

        studio.start()
        with client_for(studio) as client:
            stopped = client.get(f"/api/runs/{run['id']}").json()
            assert stopped["state"] == "interrupted" and stopped["resumable"], stopped
            assert "killed" in stopped["message"]
            resumed = client.post(f"/api/runs/{run['id']}/resume")
            assert resumed.status_code == 200 and resumed.json()["state"] in ("queued", "running"), resumed.text
            ended = wait_for(client, run["id"], ("finished", "failed", "interrupted"))
            assert ended["state"] == "finished", client.get(f"/api/runs/{run['id']}/log").text
            # the steps after the checkpoint were redone, and each is in the curve once
            assert train_steps(run_dir) == list(range(1, RESUMED_STEPS + 1))
            resumed_summary = ended["summary"]["train"]
        assert "Traceback" not in studio.log_text()

    config = tmp_path / "straight.yaml"
    config.write_text(text)
    straight = api.train(api.load_config(config), tmp_path / "straight")["train"]
    assert resumed_summary["steps"] == straight["steps"] == RESUMED_STEPS
    # the tolerance tests/test_resume.py allows a resumed run
    assert resumed_summary["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-3)

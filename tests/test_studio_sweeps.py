"""The studio's sweep pages (FastAPI's TestClient, no browser): a folder `tunesmith sweep` wrote, added to a
project by its path, shows its trials ranked as trials.csv ranks them, its plots and best.yaml; a trial links to
its run page once the run is added (the page offers to add it); a sweep process working in the folder shows as
running, and a trial it was running when it died as stopped; what is not a sweep folder is a sentence.

The sweep is made once for the module by the real `run_sweep`, with a stand-in for `tunesmith train` (it writes a
run folder's config.yaml, validation losses and status.json) so that it takes seconds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_run_config
from fastapi.testclient import TestClient
from markupsafe import escape
from test_studio_app import studio

from tunesmith import api
from tunesmith.plan import sweep as sweep_module

# A stand-in for `tunesmith train`: a run folder with config.yaml (the config it was given), validation losses
# that fall more slowly for a smaller lora.r, and how it ended.
FAKE_TRAIN = r'''
import json, shutil, sys, time
from pathlib import Path

config, run_dir = Path(sys.argv[1]), Path(sys.argv[sys.argv.index("--output") + 1])
rank = int(sys.argv[sys.argv.index("--rank") + 1])
run_dir.mkdir(parents=True)
shutil.copy(config, run_dir / "config.yaml")
with open(run_dir / "metrics.jsonl", "w") as metrics:
    for step in (1, 2):
        metrics.write(json.dumps({"type": "validation", "step": step, "val_loss": 2.0 - step * rank / 100}) + "\n")
(run_dir / "status.json").write_text(json.dumps({"state": "finished", "message": "finished", "time": time.time()}))
'''


class _Fits:
    def __init__(self, fits: bool):
        self.fits = fits

    def sentence(self) -> str:
        return "fits" if self.fits else "rank 64 will not fit in the memory given"


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """A finished sweep folder: lora.r from [2, 8, 64] over 4 trials, rank 64 skipped by the estimate."""
    root = tmp_path_factory.mktemp("studio-sweep")
    config = save_tiny_run_config(root)
    script = root / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    space = root / "space.yaml"
    space.write_text("lora.r: [2, 8, 64]\n")

    def command(config_path, run_dir, overrides, nproc, memory_limit=None):
        rank = next(line.split("=")[1] for line in overrides if line.startswith("lora.r="))
        return [sys.executable, str(script), str(config_path), "--output", str(run_dir), "--rank", rank]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep_module, "trial_command", command)
        patch.setattr(sweep_module, "estimate_if_possible", lambda cfg, *args, **kw: _Fits(cfg.lora.r != 64))
        result = api.sweep(config, space, 4, output=root / "sweep-run")
    assert {row["state"] for row in result["trials"]} >= {"complete"}
    return root / "sweep-run"


def new_project(client: TestClient) -> int:
    response = client.post("/api/projects", json={"name": "sweeps"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def add_sweep(client: TestClient, folder: Path, project_id: int) -> dict:
    response = client.post("/api/sweeps/folder", json={"folder": str(folder), "project_id": project_id})
    assert response.status_code == 201, response.text
    return response.json()


def test_a_sweep_folder_shows_its_trials_ranked_its_plots_and_its_best_config(tmp_path, swept):
    with studio(tmp_path / "home") as client:
        sweep = add_sweep(client, swept, new_project(client))
        held = api.read_sweep(swept)
        assert [t["trial"] for t in sweep["trials"]] == [row["trial"] for row in held["trials"]]
        complete = [t for t in sweep["trials"] if t["state"] == "complete"]
        assert [t["value"] for t in complete] == sorted(t["value"] for t in complete) and len(complete) >= 2
        assert [t["rank"] for t in complete] == list(range(1, len(complete) + 1))
        skipped = [t for t in sweep["trials"] if t["state"] == "skipped"]
        assert all(t["params"] == {"lora.r": 64} and "rank 64 will not fit" in t["note"] for t in skipped)
        # a trial with a run folder can be added to the studio; a skipped one has none
        assert [t["addable"] for t in sweep["trials"]] == [t["state"] == "complete" for t in sweep["trials"]]
        assert sweep["best_config"] == (swept / "best.yaml").read_text() and not sweep["running"]

        page = client.get(f"/sweeps/{sweep['id']}", headers={"Accept": "text/html"})
        assert page.status_code == 200
        rows = [int(part.split('"')[0]) for part in page.text.split('data-trial="')[1:]]
        assert rows == [t["trial"] for t in sweep["trials"]]  # the page's table is the ranked one
        assert str(escape(sweep["best_config"])) in page.text
        assert f'<img src="/sweeps/{sweep["id"]}/history.png"' in page.text
        plot = client.get(f"/sweeps/{sweep['id']}/history.png")
        assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
        assert plot.content == (swept / "history.png").read_bytes()

        listed = client.get("/sweeps", headers={"Accept": "text/html"}).text
        assert f'href="/sweeps/{sweep["id"]}"' in listed and str(swept) in listed
        assert [w["id"] for w in client.get("/api/sweeps").json()] == [sweep["id"]]


def test_a_trial_links_to_its_run_page_once_the_studio_knows_the_run(tmp_path, swept):
    with studio(tmp_path / "home") as client:
        project_id = new_project(client)
        sweep = add_sweep(client, swept, project_id)
        best = sweep["trials"][0]
        assert best["run_id"] is None
        page = client.get(f"/sweeps/{sweep['id']}", headers={"Accept": "text/html"}).text
        offered = f'<input type="hidden" name="folder" value="{best["run_dir"]}">'
        assert offered in page  # the form that adds the trial's run folder

        run = client.post("/api/runs/folder", json={"folder": best["run_dir"], "project_id": project_id})
        assert run.status_code == 201, run.text
        run_id = run.json()["id"]
        shown = client.get(f"/api/sweeps/{sweep['id']}").json()
        assert shown["trials"][0]["run_id"] == run_id
        assert all(t["run_id"] is None for t in shown["trials"][1:])
        page = client.get(f"/sweeps/{sweep['id']}", headers={"Accept": "text/html"}).text
        assert f'<a href="/runs/{run_id}">run page</a>' in page and offered not in page
        assert client.get(f"/runs/{run_id}", headers={"Accept": "text/html"}).status_code == 200


def test_a_sweep_process_in_the_folder_shows_as_running_and_its_trial_as_stopped_once_it_died(tmp_path, swept):
    folder = tmp_path / "copy"
    shutil.copytree(swept, folder)
    with open(folder / "trials.csv", "a") as table:  # what trials.csv says while trial 9 runs
        table.write(f",9,running,,8,{folder / 'trial-0009'},\n")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from tunesmith.train.folder_lock import hold_run_folder\n"
                               f"with hold_run_folder({str(folder)!r}, 'sweeping'):\n"
                               "    print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with studio(tmp_path / "home") as client:
            sweep = add_sweep(client, folder, new_project(client))
            assert sweep["running"] and sweep["trials"][-1]["state"] == "running"
            holder.kill()
            holder.wait(30)
            shown = client.get(f"/api/sweeps/{sweep['id']}").json()
            assert not shown["running"]
            assert shown["trials"][-1]["state"] == "stopped" and "runs its values again" in shown["trials"][-1]["note"]
    finally:
        if holder.poll() is None:
            holder.kill()


def test_what_is_not_a_sweep_folder_is_a_sentence(tmp_path, swept):
    folder = tmp_path / "copy"
    shutil.copytree(swept, folder)
    (folder / "importance.png").unlink(missing_ok=True)  # as in a sweep with fewer than three complete trials
    with studio(tmp_path / "home") as client:
        project_id = new_project(client)
        not_sweep = tmp_path / "plain"
        not_sweep.mkdir()
        refused = client.post("/api/sweeps/folder", json={"folder": str(not_sweep), "project_id": project_id})
        assert refused.status_code == 400 and "is not a tunesmith sweep folder" in refused.json()["error"]
        assert str(not_sweep) in refused.json()["error"]
        missing = client.post("/api/sweeps/folder", json={"folder": str(folder), "project_id": 999})
        assert missing.status_code == 404 and missing.json()["error"] == "there is no project 999."
        sweep = add_sweep(client, folder, project_id)
        twice = client.post("/api/sweeps/folder", json={"folder": str(folder), "project_id": project_id})
        assert twice.status_code == 400 and "in the studio already" in twice.json()["error"]
        for name in ("sweep.json", "study.db", "best.yaml"):  # the folder's other files are not served
            response = client.get(f"/sweeps/{sweep['id']}/{name}")
            assert response.status_code == 404 and "history.png and importance.png" in response.json()["error"]
        undrawn = client.get(f"/sweeps/{sweep['id']}/importance.png")
        assert undrawn.status_code == 404 and "no importance.png" in undrawn.json()["error"]
        page = client.get(f"/sweeps/{sweep['id']}", headers={"Accept": "text/html"}).text
        assert "importance.png" not in page and "history.png" in page
        assert client.get("/api/sweeps/12345").status_code == 404
        tokenless = client.post("/api/sweeps/folder", json={"folder": str(swept), "project_id": project_id},
                                headers={"X-Tunesmith-Token": ""})
        assert tokenless.status_code == 403
        assert [w["id"] for w in client.get("/api/sweeps").json()] == [sweep["id"]]

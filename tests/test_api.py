"""The library API the front ends share: a run started as a child process, followed from its folder to the
end, stopped with a checkpoint and resumed; a failure that reaches the follower as the run's own sentence."""

from __future__ import annotations

import re

import pytest
from conftest import save_tiny_run_config

from tunesmith import api
from tunesmith.train.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return root, save_tiny_run_config(root)


def test_a_child_run_is_followed_from_its_folder_to_the_end(tiny):
    root, config = tiny
    run = api.start_run(config, ["training.max_steps=4"], output=root / "followed")
    events = list(run.events())
    assert run.wait(timeout=60) == 0
    steps = [e.data["step"] for e in events if e.kind == "train"]
    assert steps == [1, 2, 3, 4]
    assert all(e.data["loss"] > 0 for e in events if e.kind == "train")
    assert events[-1].kind == "finished" and events[-1].final and "4 steps" in events[-1].message
    assert api.read_status(run.run_dir)["state"] == "finished"
    assert sum(e.final for e in events) == 1


def test_stop_saves_a_checkpoint_and_resume_finishes_the_run(tiny):
    root, config = tiny
    run = api.start_run(config, ["training.max_steps=500", "training.save_steps=1000"], output=root / "stopped")
    stop_sent = False
    events = []
    for event in run.events():
        events.append(event)
        if event.kind == "train" and event.data["step"] >= 2 and not stop_sent:
            stop_sent = api.stop(run)
    assert stop_sent
    last = events[-1]
    assert last.kind == "interrupted", last
    stopped_at = int(re.search(r"stopped after step (\d+)", last.message)[1])
    assert f"tunesmith train {run.run_dir / 'config.yaml'} --resume" in last.message
    assert run.wait(timeout=60) == 130
    assert list_checkpoints(run.run_dir)[-1].name == f"step-{stopped_at:08d}"
    assert stopped_at < 500

    summary = api.resume(run.run_dir, [f"training.max_steps={stopped_at + 2}"])
    assert summary["train"]["steps"] == stopped_at + 2
    assert api.read_status(run.run_dir)["state"] == "finished"
    followed = list(api.follow(run.run_dir))  # a finished run's folder replays its steps, then the end
    assert [e.data["step"] for e in followed if e.kind == "train"] == list(range(1, stopped_at + 3))
    assert followed[-1].kind == "finished"


def test_a_run_that_fails_before_its_folder_exists_ends_with_its_sentence(tiny):
    root, config = tiny
    missing = root / "missing.jsonl"
    run = api.start_run(config, [f"data.path={missing}"], output=root / "failed")
    events = list(run.events())
    assert [e.kind for e in events] == ["failed"]
    assert f"data.path: {missing} does not exist" in events[0].message
    assert "Traceback" not in events[0].message
    assert not (root / "failed").exists()


def test_a_new_run_never_goes_into_a_used_folder(tiny, tmp_path):
    _, config = tiny
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(api.UserError, match="already exists and is not empty"):
        api.start_run(config, output=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]

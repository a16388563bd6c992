"""Faults a run folder must survive: two writers at once, a full disk during a checkpoint, a resume with a changed
config or of a finished run, a folder that cannot be made, a run refused before it trained a step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time

import pytest
from conftest import save_tiny_run_config
from safetensors import SafetensorError
from safetensors.torch import load_file

from tunesmith import api
from tunesmith.cli import main
from tunesmith.train import checkpoint as checkpoint_module
from tunesmith.train import loop as loop_module
from tunesmith.train.checkpoint import checkpoint_problem, list_checkpoints

# 8 training rows in micro-batches of 2: 4 steps an epoch; a checkpoint every 3 steps
SHORT = ["training.max_steps=9", "training.save_steps=3", "training.save_total_limit=5"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    config = save_tiny_run_config(root, "lora: {dropout: 0.1}\n")  # dropout: the resume must restore the RNG too
    straight = root / "straight"
    api.train(api.load_config(config, SHORT), straight)
    return root, config, straight


def _adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _assert_same_adapter(a_dir, b_dir):
    a, b = _adapter(a_dir), _adapter(b_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-6, name


def _steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "train"]


# --- two writers


def test_a_second_run_on_a_busy_folder_is_refused_with_the_pid_and_the_first_is_untouched(tiny, tmp_path, capsys):
    root, config, _ = tiny
    run_dir = tmp_path / "busy"
    first = api.start_run(config, ["training.max_steps=2000", "training.save_steps=1000", "training.num_threads=1"],
                          output=run_dir)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").is_file() or len(_steps(run_dir)) < 2:
            assert first.process.poll() is None, first.log_file.read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        holder = f"in use by process {first.process.pid} (training, since "
        assert main(["train", str(config), "--output", str(run_dir)]) == 2
        assert main(["train", str(config), "--output", str(run_dir), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.count(holder) == 2 and "Traceback" not in err
        with pytest.raises(api.UserError, match=re.escape(holder)):
            api.evaluate(run_dir)
    finally:
        api.stop(first)
        first.wait(120)
    events = list(api.follow(run_dir))
    assert events[-1].kind == "interrupted"
    steps = _steps(run_dir)
    assert steps == list(range(1, len(steps) + 1))  # every step once: nobody else wrote into the folder
    assert not (run_dir / "eval").exists()


def test_two_runs_started_together_into_one_folder_train_once(tiny, tmp_path, capsys):
    """Both pass the check that the folder is free before either holds it (the race the lock closes)."""
    root, config, _ = tiny
    run_dir = tmp_path / "together"
    argv = ["train", str(config), "--output", str(run_dir), "--set", "training.max_steps=3"]
    codes: list[int] = []
    started = threading.Barrier(2)
    real_train = api.train

    def train_after_both_checked(*args, **kwargs):
        started.wait(30)
        return real_train(*args, **kwargs)

    api.train = train_after_both_checked
    try:
        both = [threading.Thread(target=lambda: codes.append(main(argv))) for _ in range(2)]
        for thread in both:
            thread.start()
        for thread in both:
            thread.join(300)
    finally:
        api.train = real_train
    assert sorted(codes) == [0, 2]
    err = capsys.readouterr().err
    assert f"{run_dir} is in use by process {os.getpid()} (training, since " in err and "Traceback" not in err
    assert _steps(run_dir) == [1, 2, 3]


# --- a full disk


def _fail_second_checkpoint(monkeypatch):
    """safetensors' writer fails as it does on a full disk (after writing part of a file) from the second
    checkpoint on: its own error type, the OS error number only in the text."""
    real = checkpoint_module.save_file
    calls = {"checkpoints": 0}

    def save_file(tensors, path, *args, **kwargs):
        if path.name == "trainable.safetensors":
            calls["checkpoints"] += 1
        if calls["checkpoints"] >= 2:
            path.write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)


def _assert_stopped_at_the_first_checkpoint(run_dir, message):
    assert "is full" in message and "needs about" in message and "MiB is free" in message
    assert f"tunesmith train {run_dir / 'config.yaml'} --resume" in message
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000003"]
    assert checkpoint_problem(run_dir / "checkpoints" / "step-00000003") is None
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000003"]  # no partial folder left
    assert api.read_status(run_dir)["state"] == "failed"


def test_a_full_disk_during_a_checkpoint_is_a_sentence_and_the_resume_ends_at_the_same_weights(
        tiny, tmp_path, monkeypatch):
    root, config, straight = tiny
    run_dir = tmp_path / "full"
    _fail_second_checkpoint(monkeypatch)
    with pytest.raises(api.UserError) as failure:
        api.train(api.load_config(config, SHORT), run_dir)
    _assert_stopped_at_the_first_checkpoint(run_dir, str(failure.value))
    monkeypatch.undo()  # the space is freed

    # A resume that changes what shapes the checkpoint is refused, and changes nothing.
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    with pytest.raises(api.UserError) as refused:
        api.resume(run_dir, ["lora.r=8", "training.learning_rate=0.01"])
    assert "lora.r: 16 in the run, 8 now" in str(refused.value)
    assert "training.learning_rate: 0.003 in the run, 0.01 now" in str(refused.value)
    assert sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before

    summary = api.resume(run_dir, ["training.save_steps=4"])  # how often it saves may change
    assert summary["train"]["steps"] == 9
    _assert_same_adapter(run_dir, straight)


def _mount_tmpfs(where, size):
    where.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}); "
                    "the simulated full disk above covers the same path")


def test_a_real_full_tmpfs_during_a_checkpoint_resumes_to_the_same_weights(tiny, tmp_path, monkeypatch):
    root, config, straight = tiny
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "4m")
    try:
        run_dir = disk / "run"
        filler = disk / "filler"
        real_prune = loop_module.prune_checkpoints

        def prune_then_fill(*args, **kwargs):  # after the first checkpoint, the disk fills up (64 KiB stay free)
            real_prune(*args, **kwargs)
            if not filler.exists():
                with open(filler, "wb") as handle:
                    while os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > 64 * 1024:
                        handle.write(b"\0" * 4096)
                        handle.flush()

        monkeypatch.setattr(loop_module, "prune_checkpoints", prune_then_fill)
        with pytest.raises(api.UserError) as failure:
            api.train(api.load_config(config, SHORT), run_dir)
        _assert_stopped_at_the_first_checkpoint(run_dir, str(failure.value))
        monkeypatch.undo()
        filler.unlink()
        summary = api.resume(run_dir)
        assert summary["train"]["steps"] == 9
        _assert_same_adapter(run_dir, straight)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# --- resume


def test_resuming_a_finished_run_says_so_and_changes_nothing(tiny, capsys):
    _, _, straight = tiny
    before = {p: p.read_bytes() for p in straight.rglob("*") if p.is_file() and p.name != ".tunesmith.lock"}
    assert main(["train", str(straight / "config.yaml"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: {straight} is a finished run (finished: 9 steps); nothing was changed." in err
    after = {p: p.read_bytes() for p in straight.rglob("*") if p.is_file() and p.name != ".tunesmith.lock"}
    assert after == before


# --- run folders that cannot be made, and runs refused before their first step


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_output_folder_that_cannot_be_made_is_a_sentence(tiny, tmp_path, capsys, where):
    _, config, _ = tiny
    if where == "under-a-file":
        (tmp_path / "a-file").write_text("mine")
        output, expected = tmp_path / "a-file" / "run", f"({tmp_path / 'a-file'} is a file, not a folder)"
    else:
        output, expected = "/proc/tunesmith-run", "cannot be made"
    assert main(["train", str(config), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tunesmith: {output}: the run folder cannot be made") and expected in err
    if where == "under-a-file":
        assert (tmp_path / "a-file").read_text() == "mine"


def test_a_run_refused_before_its_first_step_leaves_no_folder_and_the_rerun_trains(tiny, tmp_path, capsys):
    _, config, _ = tiny
    run_dir = tmp_path / "refused"
    assert main(["train", str(config), "--output", str(run_dir), "--set", "lora.target_modules=no_such_proj"]) == 2
    assert "no_such_proj" in capsys.readouterr().err
    assert not run_dir.exists()
    assert main(["train", str(config), "--output", str(run_dir), "--set", "training.max_steps=1"]) == 0
    assert _steps(run_dir) == [1]


def test_a_batch_bigger_than_the_data_is_refused_at_once(tiny, tmp_path, capsys):
    _, config, _ = tiny
    assert main(["train", str(config), "--output", str(tmp_path / "big"), "--set", "training.batch_size=1000"]) == 2
    err = capsys.readouterr().err
    assert "training.batch_size: 1000 rows per micro-batch" in err and "gives 8 training rows" in err
    assert not (tmp_path / "big").exists()

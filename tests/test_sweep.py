"""`tunesmith sweep`: Optuna trials as run folders of a tiny model, ranked by validation loss; a sweep killed with
SIGKILL continues without running its finished trials again; the median pruner stops a bad trial; a bad space
file is a sentence before any trial; a trial that will not fit is skipped with the estimate's reason.

The pruning and skipping tests run a stand-in for `tunesmith train` (FAKE_TRAIN: it writes the validation
losses it is given, as metrics.jsonl lines, and stops on SIGINT as training does), so what they check does not
depend on how a tiny model happens to train."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import save_tiny_run_config

from tunesmith import api, cli
from tunesmith.plan import sweep as sweep_module

# Every trial: a few steps on one thread; the sweep picks eval_steps = max_steps / 4.
TRIAL_SETS = ["--set", "training.max_steps=8", "--set", "training.num_threads=1"]
SPACE = "training.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\nlora.r: [2, 4, 8]\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    config = save_tiny_run_config(root)
    space = root / "space.yaml"
    space.write_text(SPACE)
    return root, config, space


def _study(sweep_dir: Path) -> optuna.Study:
    record = json.loads((sweep_dir / "sweep.json").read_text())
    return optuna.load_study(study_name=record["study"], storage=f"sqlite:///{sweep_dir / 'study.db'}")


def _table(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "trials.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _printed_table(out: str) -> list[list[str]]:
    """The rows of the table `tunesmith sweep` prints (cells split on runs of two or more spaces)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rank  trial  state"))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int, marker: str) -> bool:
    """Whether process `pid` still runs a command line that contains `marker` (not a zombie, not a reused id)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what} after {timeout_s:g} s")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; trials die with the sweep on Linux")
def test_a_sweep_killed_during_trial_3_continues_without_running_trials_1_and_2_again(tiny):
    root, config, space = tiny
    sweep_dir = root / "killed"
    command = [sys.executable, "-m", "tunesmith.cli", "sweep", str(config), "--space", str(space), "--trials", "4",
               "--output", str(sweep_dir), *TRIAL_SETS]
    log = open(root / "killed.log", "wb")  # noqa: SIM115 - closed at the end
    sweep = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        marker = str(sweep_dir / "trial-0002")
        trial_3 = _wait_for(lambda: (sweep_dir / "trial-0002").is_dir() and
                            [pid for pid in _children(sweep.pid) if _running(pid, marker)], 240,
                            "the sweep to start trial 3 (its folder and process)")
        sweep.send_signal(signal.SIGKILL)
        sweep.wait(30)
    finally:
        if sweep.poll() is None:
            sweep.kill()
        log.close()
    # the trial's process died with the sweep (killed, so its status.json never said how it ended), and none is
    # left training into the sweep's folder; one that outlived the sweep would train to its end, "finished"
    _wait_for(lambda: not any(_running(pid, marker) for pid in trial_3), 120, "trial 3's process to end")
    assert not any(_running(pid, str(sweep_dir)) for pid in map(int, filter(str.isdigit, os.listdir("/proc"))))
    assert (api.read_status(sweep_dir / "trial-0002") or {}).get("state", "running") == "running"

    kept = {name: _snapshot(sweep_dir / name) for name in ("trial-0000", "trial-0001", "trial-0002")}
    assert all(json.loads((sweep_dir / n / "status.json").read_text())["state"] == "finished"
               for n in ("trial-0000", "trial-0001"))
    before = {p.name for p in sweep_dir.glob("trial-*")}

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Traceback" not in again.stderr

    started = {p.name for p in sweep_dir.glob("trial-*")} - before
    assert started == {"trial-0003", "trial-0004"}  # two trials ran in the second invocation, and only two
    assert {name: _snapshot(sweep_dir / name) for name in kept} == kept  # 1 and 2 untouched, 3 left as it was
    rows = {int(row["trial"]): row for row in _table(sweep_dir)}
    assert sum(row["state"] in ("complete", "pruned", "skipped", "failed") for row in rows.values()) == 4
    assert rows[2]["state"] == "lost"
    study_trials = {t.number: t for t in _study(sweep_dir).get_trials()}
    assert study_trials[3].params == study_trials[2].params  # the lost trial's values ran again
    assert study_trials[3].user_attrs["retry_of"] == 2

    # What the finished sweep leaves.  Each complete trial's value is its last validation loss, from its own
    # metrics.jsonl and summary.json; best.yaml is the best trial's config; the printed table, trials.csv and
    # "best: trial N" rank the complete trials by value, lowest first.
    complete = [t for t in study_trials.values() if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    for t in complete:
        folder = sweep_dir / f"trial-{t.number:04d}"
        losses = [json.loads(line)["val_loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["type"] == "validation"]
        assert len(losses) >= 2 and t.value == losses[-1]
        assert json.loads((folder / "summary.json").read_text())["validation"]["loss"] == t.value
    best = min(complete, key=lambda t: t.value)
    cfg = api.load_config(sweep_dir / "best.yaml")
    assert cfg.training.learning_rate == best.params["training.learning_rate"]
    assert cfg.lora.r == best.params["lora.r"]
    assert cfg.training.max_steps == 8 and cfg.output.dir is None  # the --set lines are in it, no folder
    assert (sweep_dir / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = _printed_table(again.stdout)
    ranked = sorted(complete, key=lambda t: t.value)
    assert [row[1] for row in printed[:len(complete)]] == [str(t.number) for t in ranked]
    values = [float(row[3]) for row in printed if row[2] == "complete"]
    assert values == sorted(values) and len(printed) == 5  # four trials and the lost one
    assert f"best: trial {best.number}" in again.stdout
    assert [row["trial"] for row in _table(sweep_dir)] == [row[1] for row in printed]


# A stand-in for `tunesmith train`: writes the validation losses FAKE_LOSSES gives its folder (or "default"), one
# metrics.jsonl line every 0.3 s, then status.json; SIGINT stops it (status "interrupted", exit 130), as training.
FAKE_TRAIN = r'''
import json, os, signal, sys, time
from pathlib import Path

run_dir = Path(sys.argv[sys.argv.index("--output") + 1])
table = json.loads(os.environ["FAKE_LOSSES"])
losses = table.get(run_dir.name, table["default"])
stop = []
signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
run_dir.mkdir(parents=True)

def end(state, code):
    (run_dir / "s.tmp").write_text(json.dumps({"state": state, "message": state, "time": time.time()}))
    (run_dir / "s.tmp").replace(run_dir / "status.json")
    sys.exit(code)

with open(run_dir / "metrics.jsonl", "a") as metrics:
    for step, loss in enumerate(losses, 1):
        if stop:
            end("interrupted", 130)
        metrics.write(json.dumps({"type": "validation", "step": step, "val_loss": loss}) + "\n")
        metrics.flush()
        time.sleep(0.3)
end("finished", 0)
'''


class _Fits:
    def __init__(self, fits: bool, why: str = "fits"):
        self.fits, self.why = fits, why

    def sentence(self) -> str:
        return self.why


@pytest.fixture
def fake_training(tiny, monkeypatch):
    """Trials run FAKE_TRAIN with the losses `set_losses(...)` gives, and the estimate says every trial fits."""
    root, _, _ = tiny
    script = root / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    started: list[tuple[Path, int | None]] = []  # each trial's folder and the --memory-limit it was given

    def command(config_path, run_dir, overrides, nproc, memory_limit=None):
        started.append((run_dir, memory_limit))
        return [sys.executable, str(script), "--output", str(run_dir)]

    monkeypatch.setattr(sweep_module, "trial_command", command)
    monkeypatch.setattr(sweep_module, "estimate_if_possible", lambda cfg, *args, **kw: _Fits(True))

    def set_losses(table: dict) -> list[Path]:
        monkeypatch.setenv("FAKE_LOSSES", json.dumps(table))
        return started

    return set_losses


def test_the_median_pruner_stops_a_trial_worse_than_the_earlier_ones(tiny, fake_training, tmp_path):
    root, config, space = tiny
    fake_training({"trial-0000": [1.0, 0.9, 0.8, 0.7, 0.75], "trial-0001": [1.0, 0.9, 0.8, 0.7, 0.6],
                   "trial-0002": [5.0] * 5, "default": [0.5, 0.45, 0.4, 0.35, 0.3]})
    result = api.sweep(config, space, 4, output=tmp_path / "pruned", overrides=["training.max_steps=8"])
    rows = {row["trial"]: row for row in result["trials"]}
    # trials 0 and 1 finish (the pruner waits for two); their value is the last validation loss, not the least
    assert (rows[0]["state"], rows[0]["value"]) == ("complete", 0.75)
    assert (rows[1]["state"], rows[1]["value"]) == ("complete", 0.6)
    # trial 2 reports 5.0 at step 1, above the median of 0 and 1 there (1.0): pruned, and its training stopped
    assert rows[2]["state"] == "pruned" and rows[2]["note"] == "pruned at step 1"
    stopped = tmp_path / "pruned" / "trial-0002"
    assert json.loads((stopped / "status.json").read_text())["state"] == "interrupted"
    assert len((stopped / "metrics.jsonl").read_text().splitlines()) < 5
    # trial 3 reports less than the median at every step: it runs to the end
    assert (rows[3]["state"], rows[3]["value"]) == ("complete", 0.3)
    assert [row["trial"] for row in result["trials"]] == [3, 1, 0, 2]
    assert result["best"]["trial"] == 3


def test_a_sweep_kept_in_postgresql_continues_from_there(tiny, fake_training, tmp_path, postgres_url):
    root, config, space = tiny
    fake_training({"default": [1.0, 0.9]})
    sweep_dir = tmp_path / "in-postgres"
    first = api.sweep(config, space, 2, output=sweep_dir, storage=postgres_url)
    assert first["finished"] == 2 and not (sweep_dir / "study.db").exists()
    assert json.loads((sweep_dir / "sweep.json").read_text())["storage"] == postgres_url  # no password to hide
    again = api.sweep(config, space, 3, output=sweep_dir)  # the same folder: the study it names, one trial more
    assert again["finished"] == 3 and sorted(p.name for p in sweep_dir.glob("trial-*")) == [
        "trial-0000", "trial-0001", "trial-0002"]
    record = json.loads((sweep_dir / "sweep.json").read_text())
    stored = optuna.load_study(study_name=record["study"], storage=postgres_url.replace("://", "+psycopg://", 1))
    assert len(stored.get_trials()) == 3
    with pytest.raises(api.UserError, match="this sweep's study is kept in postgresql://"):
        api.sweep(config, space, 3, output=sweep_dir, storage=f"sqlite:///{tmp_path / 'other.db'}")


BAD_SPACES = [
    ("lora.rank: [4, 8]\n", "lora.rank", "unknown config key"),
    ("lora.r: []\n", "lora.r", "the list of choices is empty"),
    ("training.learning_rate: {low: 1.0e-3, high: 1.0e-5}\n", "training.learning_rate", "must be below high"),
    ("lora.dropout: {low: 0.0, high: 1.5}\n", "lora.dropout", "allowed: less than 1"),
    ("lora.r: {low: 4, high: 16, step: 5}\n", "lora.r", "not a multiple of step"),
    ("training.learning_rate: 3.0e-4\n", "training.learning_rate", "give a range"),
    ("lora.r: [4, 8\n", "line 2", "not valid YAML"),
]


@pytest.mark.parametrize("text, key, problem", BAD_SPACES, ids=[case[2] for case in BAD_SPACES])
def test_a_bad_space_is_a_sentence_naming_the_file_and_key_before_any_trial(tiny, tmp_path, capsys, monkeypatch,
                                                                            text, key, problem):
    root, config, _ = tiny
    started = []
    monkeypatch.setattr(sweep_module, "_start", lambda *args: started.append(args))
    space = tmp_path / "bad-space.yaml"
    space.write_text(text)
    code = cli.main(["sweep", str(config), "--space", str(space), "--trials", "2", "--output", str(tmp_path / "sw")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"tunesmith: {space}") and key in err and problem in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "sw").exists() and not started


def test_a_trial_that_will_not_fit_is_skipped_with_the_estimates_reason(tiny, fake_training, tmp_path, capsys,
                                                                        monkeypatch):
    root, config, _ = tiny
    started = fake_training({"default": [1.0, 0.9]})
    asked = []

    def estimate(cfg, memory_limit=None, nproc=1, **kw):
        asked.append(memory_limit)
        return _Fits(cfg.lora.r == 2, f"rank {cfg.lora.r} needs more than the {memory_limit} bytes given")

    monkeypatch.setattr(sweep_module, "estimate_if_possible", estimate)
    space = tmp_path / "ranks.yaml"
    space.write_text("lora.r: [2, 64]\n")
    sweep_dir = tmp_path / "skips"
    command = ["sweep", str(config), "--space", str(space), "--trials", "4", "--output", str(sweep_dir),
               "--memory-limit", "2GiB"]
    assert cli.main(command) == 0
    out = capsys.readouterr().out
    assert asked == [2 * 2**30] * 4
    rows = _table(sweep_dir)
    assert {row["state"] for row in rows} == {"complete", "skipped"} and len(rows) == 4
    for row in rows:
        folder = sweep_dir / f"trial-{int(row['trial']):04d}"
        if row["lora.r"] == "64":
            assert row["state"] == "skipped"
            assert row["note"] == f"skipped: rank 64 needs more than the {2 * 2**30} bytes given"
            assert not folder.exists()
        else:
            assert row["state"] == "complete" and (folder / "status.json").is_file()
    assert sorted(started) == sorted((sweep_dir / f"trial-{int(row['trial']):04d}", 2 * 2**30)
                                     for row in rows if row["state"] == "complete")
    assert "skipped: rank 64 needs more" in out

    # the same command again: the sweep has its 4 trials, and none runs
    assert cli.main(command) == 0
    assert len(_table(sweep_dir)) == 4 and len(started) == sum(row["state"] == "complete" for row in rows)
    # another space into the same folder: refused, nothing mixed
    space.write_text("lora.r: [2, 4]\n")
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert f"{sweep_dir} holds another sweep" in err and "the space" in err

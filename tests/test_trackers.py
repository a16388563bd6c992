"""logging.report_to: every metrics.jsonl number reaches TensorBoard, MLflow and W&B, read back with each library's
own reader; a missing package is a sentence before anything loads; a resumed run continues the same tracker runs."""

import builtins
import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import REPEAT_ROWS, save_tiny_model_folder

from tunesmith import api
from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.train.metrics_log import read_metrics
from tunesmith.train.trackers import scalars

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

ALL = "logging.report_to=[tensorboard, mlflow, wandb]"


def _config(root: Path, *extra: str):
    model_dir, data = save_tiny_model_folder(root, REPEAT_ROWS)
    return load_config(None, [
        f"model.name={model_dir}", f"data.path={data}", "data.validation_split=0.2",
        "training.max_steps=6", "training.eval_steps=3", "training.learning_rate=3e-3",
        "eval.max_new_tokens=4", "logging.run_name=tiny", *extra,
    ])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 6-step run of a tiny Llama reporting to all three trackers, with the before/after evaluation."""
    root = tmp_path_factory.mktemp("trackers")
    run_dir = root / "run"
    summary = api.train(_config(root, ALL), run_dir)
    return run_dir, summary, read_metrics(run_dir / "metrics.jsonl")


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_has_every_step_of_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, summary, records = run
    found = _tensorboard_scalars(run_dir / "tensorboard")
    losses = _losses(records)
    assert sorted(losses) == list(range(1, 7))
    assert dict(found["train/loss"]) == pytest.approx(losses, rel=1e-6)  # float32 in the event file
    assert dict(found["train/lr"]) == pytest.approx({r["step"]: r["lr"] for r in records if r["type"] == "train"})
    validation = {r["step"]: r["val_loss"] for r in records if r["type"] == "validation"}
    assert validation and dict(found["validation/loss"]) == pytest.approx(validation, rel=1e-6)
    # the summary's numbers (the tuned model's held-out loss among them), at the last step
    assert found["summary/eval.tuned.loss"] == [(6, pytest.approx(summary["eval"]["tuned"]["loss"], rel=1e-6))]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert "training" in events.Tags()["images"]
    texts = {tag: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]
             if tag.endswith("/text_summary")}
    assert "Did training look healthy" in texts["report.md/text_summary"]
    assert "learning_rate: 0.003" in texts["config/text_summary"]


def test_mlflow_run_reads_back_from_the_store(run):
    from mlflow.tracking import MlflowClient

    run_dir, summary, records = run
    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert state["tracking_uri"] == f"sqlite:///{(run_dir / 'mlruns' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    found = client.get_run(state["run_id"])
    assert found.info.status == "FINISHED" and found.info.run_name == "tiny"
    params = found.data.params
    assert params["training.learning_rate"] == "0.003" and params["training.max_steps"] == "6"
    assert params["logging.report_to"] == '["tensorboard", "mlflow", "wandb"]'
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "train/loss")}
    assert history == pytest.approx(_losses(records))
    assert found.data.metrics["summary/eval.tuned.loss"] == pytest.approx(summary["eval"]["tuned"]["loss"])
    assert found.data.metrics["summary/train.final_loss"] == pytest.approx(summary["train"]["final_loss"])
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"training.png", "report.md", "summary.json", "config.yaml"} <= artifacts
    local = Path(client.download_artifacts(found.info.run_id, "report.md", str(run_dir.parent)))
    assert local.read_text() == (run_dir / "report.md").read_text()


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (wandb 0.31 has no Python reader of its own).  The framing is
    LevelDB's log format behind a 7-byte header (":W&B", magic 0xBEE1, version): 32 KiB blocks of chunks, each
    crc32 (4 bytes), length (2), type (1: whole, 2/3/4: first/middle/last piece); see wandb's core/pkg/leveldb
    and LevelDB's doc/log_format.md.  The records are wandb's own `Record` messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pieces = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def _wandb_history(path: Path) -> tuple[dict[int, float], list]:
    history, records = {}, list(wandb_records(path))
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "train/loss" in row:
                history[row["_step"]] = row["train/loss"]
    return history, records


def test_wandb_writes_an_offline_run_with_every_step(run):
    run_dir, summary, records = run
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    (folder,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    history, written = _wandb_history(folder / f"run-{run_id}.wandb")
    assert history == pytest.approx(_losses(records))
    (started,) = [r.run for r in written if r.WhichOneof("record_type") == "run"]
    assert started.display_name == "tiny" and started.project == "tunesmith"
    config = {item.key: json.loads(item.value_json) for item in started.config.update}
    assert config["training.learning_rate"] == 0.003
    summaries = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                 for r in written if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
    assert summaries["summary/eval.tuned.loss"] == pytest.approx(summary["eval"]["tuned"]["loss"])
    saved = {f.path for r in written if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert {"training.png", "report.md", "summary.json"} <= saved
    assert (folder / "files" / "report.md").read_text() == (run_dir / "report.md").read_text()
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in written)


def test_scalars_keep_numbers_and_name_validation_apart():
    step, values = scalars({"type": "validation", "step": 4, "epoch": 1, "val_loss": 2.5, "val_perplexity": None,
                            "note": "x", "stopped": True})
    assert step == 4 and values == {"validation/epoch": 1.0, "validation/loss": 2.5}


@pytest.mark.parametrize("tracker, module, package", [
    ("tensorboard", "torch.utils.tensorboard", "pip install tensorboard"),
    ("mlflow", "mlflow", "pip install mlflow-skinny"),
    ("wandb", "wandb", "pip install wandb"),
])
def test_a_missing_package_is_one_sentence_before_the_model_loads(tmp_path, monkeypatch, tracker, module, package):
    cfg = _config(tmp_path, f"logging.report_to={tracker}")
    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing package was reported")

    monkeypatch.setattr(builtins, "__import__", without)
    monkeypatch.setattr("tunesmith.train.loop.load_model", no_model)
    with pytest.raises(UserError) as caught:
        api.train(cfg, tmp_path / "run")
    sentence = str(caught.value)
    assert "logging.report_to" in sentence and tracker in sentence
    assert "pip install 'tunesmith[trackers]'" in sentence and package in sentence
    assert not (tmp_path / "run").exists()  # nothing was started, so nothing is left behind


def test_a_tracker_that_fails_mid_run_is_dropped_and_training_goes_on(tmp_path, monkeypatch, log_lines):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tunesmith.train.trackers import TensorBoardTracker

    original = TensorBoardTracker.log

    def disk_gone_at_step_3(self, record):
        if record["step"] == 3:
            raise OSError("no space left on device")
        original(self, record)

    monkeypatch.setattr(TensorBoardTracker, "log", disk_gone_at_step_3)
    run_dir = tmp_path / "run"
    summary = api.train(_config(tmp_path, "logging.report_to=[tensorboard, wandb]", "eval.enabled=false"), run_dir)
    assert summary["train"]["steps"] == 6
    assert any("tensorboard failed at step 3 (no space left on device)" in line for line in log_lines)
    assert [step for step, _ in _tensorboard_scalars(run_dir / "tensorboard")["train/loss"]] == [1, 2]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert events.Tensors("status/text_summary")[-1].tensor_proto.string_val[0] == b"failed"  # closed as failed
    # the other tracker got every step
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    (folder,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    history, _ = _wandb_history(folder / f"run-{run_id}.wandb")
    assert sorted(history) == list(range(1, 7))


def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path):
    """Stopped after step 4 with its last checkpoint at step 2, resumed to step 6: TensorBoard holds each step
    once (the redone steps 3 and 4 replace the first ones), MLflow's run and W&B's id are the same ones."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    api.train(_config(tmp_path, ALL, "training.max_steps=4", "training.save_steps=2", "eval.enabled=false"), run_dir)
    first = json.loads((run_dir / "trackers.json").read_text())
    # as if it had been killed after step 4, before checkpointing it: no summary, no final status
    (run_dir / "summary.json").unlink()
    (run_dir / "status.json").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
    cfg = load_config(run_dir / "config.yaml", ["training.max_steps=6"])
    api.train(cfg, run_dir, resume=True)
    again = json.loads((run_dir / "trackers.json").read_text())
    assert again["mlflow"]["run_id"] == first["mlflow"]["run_id"] and again["wandb"]["id"] == first["wandb"]["id"]

    losses = _losses(read_metrics(run_dir / "metrics.jsonl"))
    assert sorted(losses) == list(range(1, 7))
    found = _tensorboard_scalars(run_dir / "tensorboard")
    assert [step for step, _ in found["train/loss"]] == list(range(1, 7))
    assert dict(found["train/loss"]) == pytest.approx(losses, rel=1e-6)

    client = MlflowClient(tracking_uri=again["mlflow"]["tracking_uri"])
    assert client.get_run(again["mlflow"]["run_id"]).info.status == "FINISHED"
    history = client.get_metric_history(again["mlflow"]["run_id"], "train/loss")
    # MLflow keeps every value logged: the redone steps 3 and 4 are there twice, with the same numbers
    assert sorted(m.step for m in history) == [1, 2, 3, 3, 4, 4, 5, 6]
    assert all(m.value == pytest.approx(losses[m.step], rel=1e-5) for m in history)
    assert len(client.search_runs([client.get_experiment_by_name("tunesmith").experiment_id])) == 1

    folders = sorted((run_dir / "wandb").glob(f"offline-run-*-{first['wandb']['id']}"))
    assert len(folders) == 2  # offline, the resumed part is a second folder of the same run (wandb sync joins them)
    resumed, _ = _wandb_history(folders[1] / f"run-{first['wandb']['id']}.wandb")
    assert resumed == pytest.approx({step: losses[step] for step in (3, 4, 5, 6)})


def test_a_preference_run_reports_its_own_numbers_too(tmp_path):
    """DPO (a recipe of the loop) reaches TensorBoard like any run: every step's loss, and its reward margin."""
    words = ["river", "stone", "cloud", "apple", "green", "music", "paper", "light", "house", "water"]
    pairs = [{"prompt": f"Repeat the word {w}.", "chosen": f"{w} {w} {w}", "rejected": "I will not."} for w in words]
    model_dir, data = save_tiny_model_folder(tmp_path, pairs)
    api.train(load_config(None, [f"model.name={model_dir}", f"data.path={data}", "data.validation_split=0.2",
                                 "objective=dpo", "training.max_steps=3", "training.learning_rate=3e-3",
                                 "eval.enabled=false", "logging.report_to=tensorboard"]), tmp_path / "dpo")
    records = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    found = _tensorboard_scalars(tmp_path / "dpo" / "tensorboard")
    assert dict(found["train/loss"]) == pytest.approx(_losses(records), rel=1e-6)
    margins = {r["step"]: r["reward_margin"] for r in records if r["type"] == "train"}
    assert dict(found["train/reward_margin"]) == pytest.approx(margins, abs=1e-6)
    assert "validation/reward_accuracy" in found


def test_a_distillation_run_reports_too(tmp_path):
    """Distillation (a distiller inside the same loop) reaches W&B like any run, its own settings in the config."""
    from test_distill import _cfg as distill_config
    from test_distill import _tiny_teacher_folder

    teacher = _tiny_teacher_folder(tmp_path)
    run_dir = tmp_path / "run"
    api.distill(distill_config(tmp_path, teacher, "student.prune.keep_layers=2", "eval.max_new_tokens=4",
                               "logging.report_to=wandb"), run_dir)
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    (folder,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    history, written = _wandb_history(folder / f"run-{run_id}.wandb")
    assert history == pytest.approx(_losses(read_metrics(run_dir / "metrics.jsonl")))
    (started,) = [r.run for r in written if r.WhichOneof("record_type") == "run"]
    assert {item.key: json.loads(item.value_json) for item in started.config.update}["distill.alpha"] == 0.5

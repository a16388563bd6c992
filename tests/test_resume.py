"""Checkpoints, exact resume after SIGKILL, clean stop on SIGTERM, corrupt checkpoints, early stopping."""

import json

import pytest
import torch
from conftest import train_child_signalled
from safetensors.torch import load_file

from tunesmith import api
from tunesmith.config import load_config
from tunesmith.train.checkpoint import list_checkpoints

ROWS = [
    {"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"}
    for w in ["river", "stone", "cloud", "apple", "green", "music", "paper", "light", "house", "water"]
]


@pytest.fixture
def setup(tmp_path, tiny_llama, tiny_tokenizer):
    model_dir = tmp_path / "tiny"
    tiny_llama.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    overrides = [
        f"model.name={model_dir}", f"data.path={data}", "data.validation_split=0.2",
        "training.max_steps=14", "training.epochs=100", "training.save_steps=3", "training.learning_rate=3e-3",
        "lora.dropout=0.1",  # dropout draws random numbers: the RNG state must be restored too
        "eval.enabled=false",
    ]
    return tmp_path, overrides


def test_a_sigkilled_run_resumes_to_the_same_loss_and_weights(setup):
    tmp_path, overrides = setup
    straight = api.train(load_config(None, overrides), tmp_path / "straight")

    run_dir = tmp_path / "killed"
    result = train_child_signalled(tmp_path, overrides, run_dir, kill_at_step=8, sig="SIGKILL")
    assert result.returncode == -9, result.stderr[-2000:]
    assert not (run_dir / "summary.json").exists()
    # 8 train rows in batches of 2 are 4 steps an epoch: the kill lands mid-epoch, and the newest
    # checkpoint (every 3 steps) is step 6, also mid-epoch
    assert [p.name for p in list_checkpoints(run_dir)][-1] == "step-00000006"
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 7  # step 7 ran and was logged after the checkpoint: resume redoes it

    cfg = load_config(run_dir / "config.yaml")
    resumed = api.train(cfg, run_dir, resume=True)

    assert resumed["train"]["steps"] == straight["train"]["steps"] == 14
    assert resumed["train"]["final_loss"] == pytest.approx(straight["train"]["final_loss"], rel=1e-3)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["type"] == "train"] == list(range(1, 15))  # no step twice


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(setup):
    tmp_path, overrides = setup
    run_dir = tmp_path / "term"
    result = train_child_signalled(tmp_path, overrides, run_dir, kill_at_step=5, sig="SIGTERM")
    assert result.returncode == 130, result.stderr[-2000:]
    assert "SIGTERM" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr
    assert list_checkpoints(run_dir)[-1].name == "step-00000005"


def test_a_corrupt_checkpoint_is_reported_and_skipped(setup, capsys):
    tmp_path, overrides = setup
    run_dir = tmp_path / "run"
    api.train(load_config(None, overrides + ["training.save_total_limit=3"]), run_dir)
    newest = list_checkpoints(run_dir)[-1]
    assert len(list_checkpoints(run_dir)) == 3  # save_total_limit keeps the newest three
    data = bytearray((newest / "trainable.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (newest / "trainable.safetensors").write_bytes(bytes(data))
    # a half-written temporary folder is never taken for a checkpoint either
    (run_dir / "checkpoints" / ".step-00000099.tmp").mkdir()
    (run_dir / "summary.json").unlink()  # as if it had stopped before the end
    (run_dir / "status.json").unlink()
    api.train(load_config(run_dir / "config.yaml"), run_dir, resume=True)
    out = capsys.readouterr().out
    assert f"skipping checkpoint {newest}" in out and "checksum" in out
    assert "resuming from" in out and newest.name not in out.split("resuming from")[1].splitlines()[0]


def test_early_stopping_and_load_best_at_end(setup):
    tmp_path, overrides = setup
    # With a threshold this large no validation after the first counts as an improvement.
    cfg = load_config(None, overrides + ["training.max_steps=40", "training.eval_steps=2",
                                         "training.early_stopping_patience=2", "training.early_stopping_threshold=10",
                                         "training.load_best_at_end=true"])
    summary = api.train(cfg, tmp_path / "early")
    assert summary["train"]["stopped_early"] is True
    assert summary["train"]["steps"] == 6  # validations at steps 2 (best), 4 and 6 (no improvement): stop
    assert summary["train"]["best_step"] == 2
    best = load_file(tmp_path / "early" / "checkpoints" / "step-00000002" / "trainable.safetensors")
    final = load_file(tmp_path / "early" / "adapter" / "adapter_model.safetensors")
    for name, value in final.items():
        match = [k for k in best if k.endswith(name.replace(".weight", ".default.weight")) or k == name]
        assert match, name
        torch.testing.assert_close(best[match[0]], value)


def test_a_nan_loss_stops_with_a_sentence_and_keeps_the_last_good_checkpoint(setup, monkeypatch):
    import tunesmith.train.loss as loss
    from tunesmith.errors import UserError

    tmp_path, overrides = setup
    calls = {"n": 0}

    def poison(real):
        def poisoned(model, *args, **kwargs):  # the 5th training micro-batch's loss is NaN
            nll, n = real(model, *args, **kwargs)
            if model.training:
                calls["n"] += 1
                if calls["n"] == 5:
                    nll = nll * float("nan")
            return nll, n
        return poisoned

    # both are looked up at each call: token_nll_sum by Objective.nll_sum (padded), packed_nll_sum by the loop
    monkeypatch.setattr(loss, "token_nll_sum", poison(loss.token_nll_sum))
    monkeypatch.setattr(loss, "packed_nll_sum", poison(loss.packed_nll_sum))
    cfg = load_config(None, overrides + ["training.save_steps=2", "training.max_steps=30"])
    with pytest.raises(UserError, match="step 5: the loss became nan.*last good checkpoint") as err:
        api.train(cfg, tmp_path / "nan")
    good = list_checkpoints(tmp_path / "nan")
    assert good[-1].name == "step-00000004" and str(good[-1]) in str(err.value)
    assert "Traceback" not in str(err.value)

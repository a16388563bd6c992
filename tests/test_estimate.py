"""`tunesmith estimate` and the fit check `tunesmith train` runs first (tunesmith.plan).

How close the numbers come to measured runs is bench/estimate_accuracy.py's job (bench/RESULTS.md); here:
counts that must be exact, directions that must hold, and what a user sees."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_llama_config, build_tiny_tokenizer, save_tiny_run_config

from tunesmith import api
from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.models.adapters import count_parameters, prepare_trainable
from tunesmith.plan.estimate import parse_size
from tunesmith.plan.memory import NF4_BYTES_PER_WEIGHT, Workload, memory_parts
from tunesmith.plan.shapes import lora_trainable, shape_from_config, targeted_names


def _tiny_config(tie: bool):
    config = build_tiny_llama_config(build_tiny_tokenizer())
    config.tie_word_embeddings = tie
    return config


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_counts_from_the_meta_device_equal_the_real_model(tie):
    from transformers import LlamaForCausalLM

    config = _tiny_config(tie)
    shape = shape_from_config(config)
    real = LlamaForCausalLM(config)
    assert shape.total_params == sum(p.numel() for p in real.parameters())  # tied weights counted once
    assert shape.tied_embeddings is tie
    assert shape.layers == 2 and shape.hidden == 64 and shape.kv_heads == 2 and shape.intermediate == 128


@pytest.mark.parametrize("method,extra", [("lora", []), ("dora", []), ("lora", ["lora.target_modules=q_proj,v_proj"]),
                                          ("lora", ["lora.target_modules=all-linear", "lora.r=4"])])
def test_trainable_parameters_equal_what_peft_trains(tmp_path, method, extra):
    from transformers import LlamaForCausalLM

    config = _tiny_config(True)
    cfg = api.load_config(None, [f"method={method}", *extra])
    torch.manual_seed(0)
    model = prepare_trainable(LlamaForCausalLM(config), cfg, total_steps=10)
    trainable, _ = count_parameters(model)
    shape = shape_from_config(config)
    assert lora_trainable(shape, cfg) == trainable
    assert len(targeted_names(shape, cfg)) == sum(
        1 for n, m in model.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict))


def _work(**changes) -> Workload:
    base = dict(method="lora", device="cpu", weight_bytes=4, activation_bytes=4, trainable=1000, adapter_targets=14,
                rank=8, pass_tokens=512, longest_row=128)
    base.update(changes)
    return Workload(**base)


def test_the_memory_model_moves_the_way_each_lever_does():
    config = _tiny_config(True)
    config.num_hidden_layers = 8  # checkpointing pays once layers outnumber the one it recomputes (x2)
    shape = shape_from_config(config)
    lora = memory_parts(shape, _work())
    assert memory_parts(shape, _work(checkpointing=True))["activations"] < lora["activations"]
    assert memory_parts(shape, _work(pass_tokens=1024))["activations"] == pytest.approx(2 * lora["activations"], rel=0.01)
    qlora = memory_parts(shape, _work(method="qlora"))
    expected = shape.linear_params * NF4_BYTES_PER_WEIGHT + (shape.total_params - shape.linear_params) * 4
    assert qlora["weights"] == int(expected) and qlora["weights"] < lora["weights"]
    full = memory_parts(shape, _work(method="full", trainable=shape.total_params, adapter_targets=0))
    assert full["optimizer"] == 2 * shape.total_params * 4 and full["gradients"] == shape.total_params * 4
    eight_bit = memory_parts(shape, _work(method="full", trainable=shape.total_params, optimizer="adamw_8bit"))
    assert eight_bit["optimizer"] == 2 * shape.total_params
    stock = memory_parts(shape, _work(chunked_loss=False, fused=False))
    assert stock["loss"] > lora["loss"] and stock["activations"] > lora["activations"]
    sharded = memory_parts(shape, _work(method="full", trainable=shape.total_params, processes=2, sharded=True))
    assert sharded["optimizer"] == full["optimizer"] // 2


def test_sizes_read_as_people_write_them():
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size("1.5G") == int(1.5 * 2**30)
    assert parse_size("1048576") == 2**20
    for bad in ("", "lots", "-1G", "3 parsecs", "nanG"):
        with pytest.raises(UserError, match="--memory-limit: .* is not a size"):
            parse_size(bad)


@pytest.fixture
def tiny_run(tmp_path):
    config = save_tiny_run_config(tmp_path)
    text = config.read_text().replace("training: {epochs: 100,", "training: {epochs: 1, max_steps: 3, num_threads: 1,")
    config.write_text(text)
    return config


def test_the_estimate_reads_the_real_rows_and_counts_the_run(tiny_run):
    est = api.estimate(tiny_run)
    assert est.fits and est.available_bytes > est.peak_bytes > est.parts["weights"] > 0
    assert est.settings["data_rows"] == 8  # REPEAT_ROWS less the 2 held out
    assert 0 < est.settings["pass_tokens"] <= 2 * est.settings["longest_row"]  # micro-batch of 2, packed
    assert est.steps == 3 and est.time_s > 0
    doc = est.to_json()
    assert doc["memory"]["fits"] is True and doc["trainable_parameters"] == est.trainable_params
    tight = api.estimate(tiny_run, memory_limit=est.peak_bytes // 2)
    assert not tight.fits and "does NOT fit" in tight.sentence()


def test_a_run_that_cannot_fit_stops_before_loading_with_the_sentence_and_what_to_change(tmp_path, tiny_run, capsys,
                                                                                          monkeypatch):
    import tunesmith.train.loop as loop

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loop, "load_model", never)
    out = tmp_path / "never"
    code = main(["train", str(tiny_run), "--output", str(out), "--set", "method=full", "--memory-limit", "1MiB"])
    said = capsys.readouterr().err
    assert code == 2, said
    assert "Traceback" not in said and "the model was loaded" not in said
    assert "does NOT fit" in said and "(--memory-limit)" in said
    assert "What to change" in said and "(--set method=lora): about" in said and "--no-fit-check" in said
    assert not out.exists()  # stopped before anything was made


def test_estimate_cli_prints_the_parts_and_json_and_exits_1_when_it_will_not_fit(tiny_run, capsys):
    assert main(["estimate", str(tiny_run)]) == 0
    words = capsys.readouterr().out
    assert "fits" in words and "activations" in words and "trainable" in words
    assert main(["estimate", str(tiny_run), "--json", "--memory-limit", "1MiB", "--set", "method=full"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["memory"]["fits"] is False and doc["advice"] and doc["method"] == "full"
    assert main(["train", str(tiny_run), "--memory-limit", "big"]) == 2
    said = capsys.readouterr().err
    assert "--memory-limit: 'big' is not a size" in said and "Traceback" not in said


def test_every_run_puts_its_estimate_beside_what_it_measured(tmp_path, tiny_run):
    job = api.train_job(tiny_run, output=tmp_path / "run")
    summary = json.loads((job.run_dir / "summary.json").read_text())
    est = summary["estimate"]
    assert est["measured_peak_bytes"] == summary["memory"]["peak_rss_bytes"]
    assert est["peak_ratio"] == pytest.approx(est["measured_peak_bytes"] / est["peak_bytes"], rel=1e-2)
    assert est["time_ratio"] > 0 and est["fits"] is True
    assert "## Estimate vs measured" in (job.run_dir / "report.md").read_text()


def test_the_probe_times_real_steps_and_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None
    try:
        est = api.estimate(tiny_run, probe=True)
    finally:
        tempfile.tempdir = None
    assert est.time_source == "probe" and est.step_s > 0
    assert est.time_parts["loading"] > 0 and est.time_parts["training"] >= 3 * est.step_s * 0.99
    assert not list(tmp_path.glob("tunesmith-probe-*"))  # the probe's run folder is gone


def test_the_studio_train_form_asks_the_same_estimate(tmp_path, tiny_run):
    from fastapi.testclient import TestClient

    from tunesmith.studio.app import StudioSettings, create_app

    app = create_app(StudioSettings(home=tmp_path / "home", poll_s=0.2))
    with TestClient(app, base_url="http://127.0.0.1:7860") as client:
        client.headers["X-Tunesmith-Token"] = app.state.token
        project = client.post("/api/projects", json={"name": "tiny"}).json()
        assert 'id="estimate-button"' in client.get(f"/projects/{project['id']}/train").text
        answer = client.post("/api/config/estimate", json={"yaml": tiny_run.read_text()})
        assert answer.status_code == 200, answer.text
        est = answer.json()
        same = api.estimate(tiny_run)
        assert est["memory"]["peak_bytes"] == same.peak_bytes and est["memory"]["fits"] is True
        assert "so it fits" in est["sentence"]
        wrong = client.post("/api/config/estimate", json={"yaml": "training: {batch_size: many}\n"})
        assert wrong.status_code == 400 and "training.batch_size" in wrong.json()["error"]

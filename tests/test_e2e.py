"""End-to-end on the real built-in model (SmolLM2-135M-Instruct from PyPI): a short quickstart
run must lower the loss and beat the base model on held-out rows; the DialogSum config must
read the shared data with nothing but its column mapping."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIALOGSUM = ROOT.parent / "shared" / "data" / "dialogsum-dev.jsonl"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def builtin_folder():
    from tunesmith.models import builtin_path

    try:
        return builtin_path("smollm2-135m-instruct")
    except Exception as exc:  # the weights package is not installed
        pytest.skip(f"built-in model unavailable: {exc}")


def test_builtin_model_is_a_cached_safetensors_folder_that_chats(builtin_folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (builtin_folder / "model.safetensors").is_file()
    assert not list(builtin_folder.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(builtin_folder)
    model = AutoModelForCausalLM.from_pretrained(builtin_folder, dtype=torch.float32)
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer  # a real pretrained model, not random weights


def test_short_quickstart_run_learns_the_task(tmp_path, builtin_folder):
    run_dir = tmp_path / "quickstart"
    cmd = [
        sys.executable, "-m", "tunesmith.cli", "train", str(ROOT / "examples" / "quickstart.yaml"),
        "--output", str(run_dir),
        "--set", f"data.path={ROOT / 'examples' / 'data' / 'dates-train.jsonl'}",
        "--set", f"data.test_path={ROOT / 'examples' / 'data' / 'dates-test.jsonl'}",
        "--set", "training.max_steps=15",
        "--set", "eval.limit=20",
        "--set", "eval.max_new_tokens=12",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    train = summary["train"]
    assert train["steps"] == 15
    assert train["final_loss"] <= 0.5 * train["first_loss"], train
    base, tuned = summary["eval"]["base"], summary["eval"]["tuned"]
    assert tuned["loss"] < base["loss"]
    assert tuned["exact_match"] >= base["exact_match"] + 0.3, (base, tuned)
    report = (run_dir / "report.md").read_text()
    assert "base:" in report and "tuned:" in report
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "sample prompt" in result.stdout
    assert json.loads((run_dir / "eval" / "metrics.json").read_text()) == summary["eval"]

    # `tunesmith eval` afterwards, on the first 8 held-out rows: base and tuned from the run folder alone
    result = subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", "eval", str(run_dir), "--limit", "8"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert saved["tuned"]["rows"] == 8
    for key in ("perplexity", "rougeL", "bleu", "chrf", "exact_match", "similarity", "similarity_accuracy"):
        assert key in saved["base"] and key in saved["tuned"], key
    assert saved["tuned"]["rougeL"] > saved["base"]["rougeL"]
    assert saved["tuned"]["perplexity"] < saved["base"]["perplexity"]
    assert len((run_dir / "eval" / "predictions.jsonl").read_text().splitlines()) == 8
    assert "rougeL" in result.stdout


@pytest.mark.skipif(not DIALOGSUM.is_file(), reason="../shared/data/dialogsum-dev.jsonl is not here")
def test_dialogsum_config_reads_the_shared_data_with_only_a_column_mapping(builtin_folder, monkeypatch):
    from transformers import AutoTokenizer

    from tunesmith.config import load_config
    from tunesmith.data import build_datasets

    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "examples" / "dialogsum.yaml")
    tokenizer = AutoTokenizer.from_pretrained(builtin_folder)
    bundle = build_datasets(cfg.data, tokenizer)
    assert bundle.format == "prompt_completion"
    assert (len(bundle.train), len(bundle.validation)) == (450, 50)
    assert bundle.stats["dropped"] == 0
    prompt, reference = bundle.test_samples[0]["messages"][:-1], bundle.test_samples[0]["messages"][-1]["content"]
    assert prompt[-1]["role"] == "user" and prompt[-1]["content"].startswith("#Person")
    source = [json.loads(line) for line in DIALOGSUM.read_text().splitlines()]
    assert reference in {row["summary"] for row in source}

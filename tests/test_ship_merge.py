"""`tunesmith merge` on tiny random Llama runs: the merged model computes what base + adapter computed
(a QLoRA run: what the de-quantised base + adapter computed), the folder is a plain safetensors Hugging
Face folder with the chat template, and bad input gets a sentence."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_train import ROWS, _config

from tunesmith.cli import main as cli_main
from tunesmith.hardware import four_bit_status
from tunesmith.models.run_folder import load_for_inference, open_run
from tunesmith.ship.merge import MERGE_INFO, merge_run

FOUR_BIT, FOUR_BIT_DETAIL = four_bit_status()
needs_four_bit = pytest.mark.skipif(not FOUR_BIT, reason=f"4-bit not available here: {FOUR_BIT_DETAIL}")
SYSTEM = "Answer briefly."


def make_tiny_run(root, *overrides):
    """A tiny random Llama trained 30 steps on one batch of ROWS at a high learning rate, in root/run:
    enough for it to answer the training prompts (e.g. "The sky is blue.") and for its adapter to move
    the logits a lot.  Evaluation off.  Returns the run folder."""
    from conftest import save_tiny_model_folder

    from tunesmith import api

    model_dir, data = save_tiny_model_folder(root, ROWS)
    # float32 said outright (auto is fp32 on CPUs, bf16 on most GPUs): the merge is checked to float32
    # precision, and the merge follows the run's precision.
    cfg = _config(model_dir, data, "model.dtype=float32", "training.max_steps=30", "training.batch_size=6", "training.learning_rate=1e-2",
                  "lora.dropout=0.0", "training.lr_scheduler=constant", "eval.enabled=false",
                  f"data.system_prompt={SYSTEM}", *overrides)
    api.train(cfg, root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def merged(lora_run):
    """The LoRA run merged into a folder inside the run folder (allowed)."""
    out = lora_run / "merged"
    merge_run(lora_run, out)
    return out


def random_ids(vocab: int, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))  # [2, 24]


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits.float()  # [2, 24, vocab]


def test_merged_logits_equal_base_plus_adapter(lora_run, merged):
    from transformers import AutoModelForCausalLM

    peft_model, _, _ = load_for_inference(open_run(lora_run), dtype=torch.float32, device="cpu")
    ids = random_ids(peft_model.config.vocab_size)
    with peft_model.disable_adapter():
        base = _logits(peft_model, ids)
    adapted = _logits(peft_model, ids)
    assert (adapted - base).abs().max() > 0.1  # the adapter is far from a no-op
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert (_logits(merged_model, ids) - adapted).abs().max() < 1e-4


def test_merged_folder_is_a_plain_safetensors_folder_with_the_chat_template(lora_run, merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data import encode_prompt
    from tunesmith.models.generate import generate_answers

    names = {p.name for p in merged.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", MERGE_INFO} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert not [n for n in names if n.startswith("adapter")]  # a plain model, no PEFT files
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config

    tokenizer = AutoTokenizer.from_pretrained(merged)
    run_tokenizer = AutoTokenizer.from_pretrained(lora_run / "adapter")
    assert tokenizer.chat_template and tokenizer.chat_template == run_tokenizer.chat_template
    assert open_run(merged).kind == "folder"
    info = json.loads((merged / MERGE_INFO).read_text())
    assert info["method"] == "lora" and info["dtype"] == "float32" and info["dequantized_from_nf4"] is False
    assert info["source_run"] == str(lora_run) and info["system_prompt"] == SYSTEM

    peft_model, _, _ = load_for_inference(open_run(lora_run), dtype=torch.float32, device="cpu")
    merged_model = AutoModelForCausalLM.from_pretrained(merged).eval()
    prompts = [encode_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["instruction"]}],
                             tokenizer) for r in ROWS[:4]]
    from_merged = generate_answers(merged_model, tokenizer, prompts, 12, 4, "cpu")
    from_run = generate_answers(peft_model, run_tokenizer, prompts, 12, 4, "cpu")
    assert from_merged == from_run and all(from_run)  # real answers, e.g. "The sky is blue."
    with peft_model.disable_adapter():
        from_base = generate_answers(peft_model, run_tokenizer, prompts, 12, 4, "cpu")
    assert from_base != from_run  # the comparison above compared tuned answers, not the base's


def test_merge_in_bfloat16_saves_bfloat16_weights(lora_run, tmp_path):
    from safetensors import safe_open

    info = merge_run(lora_run, tmp_path / "bf16", dtype="bfloat16")
    assert info["dtype"] == "bfloat16"
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}


@needs_four_bit
def test_qlora_run_merges_into_the_dequantised_base(tmp_path_factory, log_lines):
    from transformers import AutoModelForCausalLM

    # 4-bit steps are slow on a CPU: 20 small batches are enough to move the logits well past the tolerances below.
    run = make_tiny_run(tmp_path_factory.mktemp("qlora"), "method=qlora", "training.batch_size=2",
                        "training.max_steps=20")
    lines = log_lines
    info = merge_run(run, run / "merged")
    assert info["dequantized_from_nf4"] is True and "NF4" in info["note"]
    assert "de-quantised" in " ".join(lines) and "float32" in " ".join(lines)
    assert json.loads((run / "merged" / MERGE_INFO).read_text()) == info

    handle = open_run(run)
    trained, _, _ = load_for_inference(handle, dtype=torch.float32, device="cpu", dequantize=True)
    ids = random_ids(trained.config.vocab_size)
    with trained.disable_adapter():
        dequantised_base = _logits(trained, ids)
    target = _logits(trained, ids)  # de-quantised NF4 base + adapter
    assert (target - dequantised_base).abs().max() > 0.1  # the adapter matters
    merged_model = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    merged_logits = _logits(merged_model, ids)
    assert (merged_logits - target).abs().max() < 1e-4
    # ... and that is not the original (unquantised) base + adapter: the NF4 rounding is in the merged weights.
    from peft import PeftModel

    original = AutoModelForCausalLM.from_pretrained(handle.source, dtype=torch.float32)
    original_plus_adapter = PeftModel.from_pretrained(original, str(handle.weights)).eval()
    assert (merged_logits - _logits(original_plus_adapter, ids)).abs().max() > 1e-3


def test_full_finetune_is_resaved_unchanged(tmp_path_factory):
    from safetensors.torch import load_file

    run = make_tiny_run(tmp_path_factory.mktemp("full"), "method=full", "training.max_steps=3",
                        "training.learning_rate=1e-3")
    info = merge_run(run, run / "merged")
    assert "re-saved" in info["merge"]
    trained = load_file(run / "model" / "model.safetensors")
    saved = load_file(run / "merged" / "model.safetensors")
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in trained)


def run_cli(argv: list[str], register=None) -> int:
    """`tunesmith ARGV` in this process: a UserError becomes a sentence on stderr and exit status 2."""
    return cli_main(argv)


def test_merge_refusals_are_sentences(lora_run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert run_cli(["merge", str(lora_run), "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and "Traceback" not in err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"] and (taken / "keep.txt").read_text() == "mine"

    model_folder = lora_run.parent / "tiny-llama"
    assert run_cli(["merge", str(model_folder), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "model folder, not a training run" in err and "Traceback" not in err

    assert run_cli(["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 2
    assert "not a folder" in capsys.readouterr().err

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(lora_run / "config.yaml", unfinished / "config.yaml")
    assert run_cli(["merge", str(unfinished), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "has not finished" in err and "--resume" in err and "Traceback" not in err
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c"))  # nothing written for a refusal


def test_merge_command_writes_the_folder(lora_run, tmp_path, capsys):
    assert run_cli(["merge", str(lora_run), "--out", str(tmp_path / "out"), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "merge:" in out and str(tmp_path / "out") in out
    assert (tmp_path / "out" / "model.safetensors").is_file()


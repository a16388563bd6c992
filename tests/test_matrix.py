"""The validated matrix: every training method on a tiny random model of every supported family.

Each (family, method) pair trains 20 steps through `run_training` and must lower the loss
(final <= 0.9 x first).  The pairs that pass are written to
`src/tunesmith/models/validated.json`, which `tunesmith models` prints: the matrix is what
this test run showed, never a hand-written list.
"""

from __future__ import annotations

import datetime as dt
import json
import typing
from pathlib import Path

import pytest
import torch

from tunesmith.config import Config, load_config
from tunesmith.models.validated import MATRIX_FILE
from tunesmith.train.loop import run_training

ROWS = [
    {"instruction": "Say the colour of the sky.", "input": "", "output": "The sky is blue."},
    {"instruction": "Name a fruit.", "input": "yellow", "output": "A banana is yellow."},
    {"instruction": "Count to three.", "input": "", "output": "one two three"},
    {"instruction": "Greet the user.", "input": "Ana", "output": "Hello Ana, good to see you."},
    {"instruction": "Answer yes or no.", "input": "Is fire hot?", "output": "yes"},
    {"instruction": "Repeat the word.", "input": "river", "output": "river river"},
]

METHODS = list(typing.get_args(Config.model_fields["method"].annotation))
# settings that move a tiny random model visibly in 20 steps; AdaLoRA's update is a product of three small
# factors (P, the singular values E starting at zero, Q), so it gets a higher rate, a larger alpha and 30 steps
METHOD_SETTINGS = {
    "full": ["training.learning_rate=1e-3"],
    "adalora": ["training.learning_rate=2e-2", "lora.alpha=64", "training.max_steps=30"],
}
DEFAULT_SETTINGS = ["training.learning_rate=5e-3"]


def tiny_config(family: str, vocab: int):
    import transformers as T

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    builders = {
        "llama": lambda: T.LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": lambda: T.Qwen2Config(num_key_value_heads=2, **common),
        "qwen3": lambda: T.Qwen3Config(num_key_value_heads=2, head_dim=16, **common),
        "mistral": lambda: T.MistralConfig(num_key_value_heads=2, **common),
        "gemma": lambda: T.GemmaConfig(num_key_value_heads=2, head_dim=16, **common),
        "phi3": lambda: T.Phi3Config(num_key_value_heads=2, pad_token_id=0, **common),
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),
    }
    return builders[family]()


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2"]
_results: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def write_matrix():
    yield
    if not _results:
        return
    import transformers

    existing = json.loads(MATRIX_FILE.read_text()) if MATRIX_FILE.is_file() else {"results": {}}
    existing["results"].update(_results)
    existing["generated_by"] = "tests/test_matrix.py"
    existing["generated_at"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    existing["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    tmp = MATRIX_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")
    tmp.replace(MATRIX_FILE)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_method_trains_family(tmp_path, tiny_tokenizer, family, method):
    from transformers import AutoModelForCausalLM

    if method == "qlora":
        from tunesmith.hardware import four_bit_status

        available, detail = four_bit_status()
        if not available:
            pytest.skip(f"4-bit not available here: {detail}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tiny_tokenizer)))
    folder = tmp_path / family
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = load_config(None, [
        f"model.name={folder}", f"data.path={data}", "data.validation_split=0", "method=" + method,
        "training.lr_scheduler=constant",
        "training.max_steps=20", "training.epochs=100", "training.batch_size=6",  # one batch: every step sees the same rows
        "lora.dropout=0.0", "eval.enabled=false", *METHOD_SETTINGS.get(method, DEFAULT_SETTINGS),
    ])
    summary = run_training(cfg, tmp_path / "run")
    first, final = summary["train"]["first_loss"], summary["train"]["final_loss"]
    passed = final <= 0.9 * first
    # recorded before the assertion, so a pair that stops working shows as failed, not as stale "ok"
    _results[f"{family}/{method}"] = {"ok": passed, "first_loss": round(first, 4), "final_loss": round(final, 4)}
    assert passed, (family, method, first, final)

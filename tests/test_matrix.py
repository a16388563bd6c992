"""The validated matrix: every training method on a tiny random model of every supported family.

Each (family, method) pair trains 20 steps through `run_training` and must lower the loss
(final <= 0.9 x first).  The masked-LM family (BERT) hides different tokens at every step, so
its per-step loss is noisy; there the comparison is the held-out loss of the same rows with the
same hidden tokens, before and after training, which must fall by at least 0.1 nats.  The pairs that pass are written to
`src/tunesmith/models/validated.json` by `python -m tunesmith.models.validated --write` (this test records
them in the file TUNESMITH_MATRIX_OUT names; a plain pytest run writes no tracked file), and `tunesmith models`
prints it: the matrix is what a test run showed, never a hand-written list.
"""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path

import pytest
import torch
from test_train import ROWS as TRAIN_ROWS

from tunesmith import api
from tunesmith.config import Config, load_config
from tunesmith.models.validated import RESULTS_ENV

# test_train's rows without the two near-repeats (grass, animal): six rows, one batch
ROWS = TRAIN_ROWS[:4] + TRAIN_ROWS[6:]

METHODS = list(typing.get_args(Config.model_fields["method"].annotation))
# settings that move a tiny random model visibly in 20 steps; AdaLoRA's update is a product of three small
# factors (P, the singular values E starting at zero, Q), so it gets a higher rate, a larger alpha and 30 steps
METHOD_SETTINGS = {
    "full": ["training.learning_rate=1e-3"],
    "adalora": ["training.learning_rate=2e-2", "lora.alpha=64", "training.max_steps=30"],
}
DEFAULT_SETTINGS = ["training.learning_rate=5e-3"]
# a masked LM trains on ~15% of the tokens a step (about 9 here), so it gets more steps
FAMILY_SETTINGS = {"bert": ["training.max_steps=40"]}
# DoRA on the tiny Gemma reaches 0.92 x in 20 steps at 5e-3 (its update is renormalised per output row)
PAIR_SETTINGS = {("gemma", "dora"): ["training.learning_rate=1e-2"]}


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
        # the models' own dropout is off, as the LoRA dropout is in test_method_trains_family: a final loss that
        # depends on one dropout draw made the check pass or fail with the RNG stream (gpt2/rslora did)
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        # the tiny tokenizer's pad and eos are both <|im_end|>; T5 starts decoding from the pad token
        "t5": lambda: T.T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                 pad_token_id=PAD, eos_token_id=PAD, decoder_start_token_id=PAD, dropout_rate=0.0),
        "bert": lambda: T.BertConfig(pad_token_id=PAD, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     **common),
    }
    return builders[family]()


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2", "t5", "bert"]
PAD = 2  # <|im_end|> in the tiny tokenizer (conftest.build_tiny_tokenizer)
_results: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def record_results():
    """Where `python -m tunesmith.models.validated --write` asked for the results, they go (merged with any
    that module's earlier tests recorded); otherwise nowhere."""
    yield
    out = os.environ.get(RESULTS_ENV)
    if out and _results:
        path = Path(out)
        earlier = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**earlier, **_results}, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_method_trains_family(tmp_path, family, method):
    from conftest import build_tiny_tokenizer

    from tunesmith.models.tasks import auto_model_class, detect_task

    if method == "qlora":
        from tunesmith.hardware import four_bit_status

        available, detail = four_bit_status()
        if not available:
            pytest.skip(f"4-bit not available here: {detail}")
    tokenizer = build_tiny_tokenizer()
    assert tokenizer.pad_token_id == PAD
    if family == "bert":
        tokenizer.add_special_tokens({"mask_token": "<mask>"})
    config = tiny_config(family, len(tokenizer))
    task = detect_task(config)
    assert task == {"t5": "seq2seq", "bert": "masked_lm"}.get(family, "causal_lm")
    torch.manual_seed(0)
    model = auto_model_class(task).from_config(config)
    folder = tmp_path / family
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    # masked LM: judged on the held-out loss of the training rows (fixed hidden tokens), before and after
    judge = [f"data.test_path={data}", "eval.enabled=true"] if task == "masked_lm" else ["eval.enabled=false"]
    cfg = load_config(None, [
        f"model.name={folder}", f"data.path={data}", "data.validation_split=0", "method=" + method,
        "training.lr_scheduler=constant",
        "training.max_steps=20", "training.epochs=100", "training.batch_size=6",  # one batch: every step sees the same rows
        "lora.dropout=0.0", *judge, *METHOD_SETTINGS.get(method, DEFAULT_SETTINGS), *FAMILY_SETTINGS.get(family, []),
        *PAIR_SETTINGS.get((family, method), []),
    ])
    summary = api.train(cfg, tmp_path / "run")
    if task == "masked_lm":
        first, final = summary["eval"]["base"]["loss"], summary["eval"]["tuned"]["loss"]
        # the same hidden tokens before and after, so any fall is real; adapters on a random 2-layer encoder
        # whose output layer stays frozen learn the token distribution slowly (about 0.2 nats in 40 steps)
        passed = final <= first - 0.1
    else:
        first, final = summary["train"]["first_loss"], summary["train"]["final_loss"]
        passed = final <= 0.9 * first
    # recorded before the assertion, so a pair that stops working shows as failed, not as stale "ok"
    _results[f"{family}/{method}"] = {"ok": passed, "first_loss": round(first, 4), "final_loss": round(final, 4)}
    assert passed, (family, method, first, final)

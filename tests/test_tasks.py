"""Seq2seq (T5) and masked-LM (BERT) paths: the task each model gets, what the loss counts, BERT's masking,
and a whole run of each with LoRA and full fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_tokenizer
from test_train import ROWS as TRAIN_ROWS

from tunesmith import api
from tunesmith.config import load_config
from tunesmith.data.batching import mask_tokens
from tunesmith.data.tokens import IGNORE_INDEX, TokenizedRow, masked_lm_ids, plain_prompt, tokenize_sample
from tunesmith.errors import UserError
from tunesmith.models.tasks import CAUSAL_LM, MASKED_LM, SEQ2SEQ, detect_task
from tunesmith.train.objective import Objective

PAD = 2  # <|im_end|>: the tiny tokenizer's pad and eos


def _t5(vocab: int):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                               num_heads=4, pad_token_id=PAD, eos_token_id=PAD,
                                               decoder_start_token_id=PAD))


def _bert(vocab: int):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, pad_token_id=PAD))


def _bert_tokenizer():
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    return tokenizer


def test_each_model_gets_its_task():
    from transformers import GPT2Config, LlamaConfig

    assert detect_task(_t5(50).config) == SEQ2SEQ
    assert detect_task(_bert(50).config) == MASKED_LM
    assert detect_task(LlamaConfig()) == CAUSAL_LM
    assert detect_task(GPT2Config()) == CAUSAL_LM
    assert detect_task(None) == CAUSAL_LM
    assert detect_task(LlamaConfig(), requested=SEQ2SEQ) == SEQ2SEQ  # model.task set by hand wins


def test_seq2seq_rows_put_the_prompt_in_the_encoder_and_only_the_answer_in_the_labels(tiny_tokenizer):
    cfg = load_config(None, ["data.max_length=64"]).data
    sample = {"messages": [{"role": "system", "content": "Answer briefly."},
                           {"role": "user", "content": "Name a fruit."},
                           {"role": "assistant", "content": "A banana."}]}
    row = tokenize_sample(sample, tiny_tokenizer, cfg, task=SEQ2SEQ)
    assert row.input_ids == tiny_tokenizer("Answer briefly.\n\nName a fruit.")["input_ids"]
    assert row.labels == tiny_tokenizer("A banana.")["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert not row.truncated
    # earlier turns stay in the prompt as "Role: text" lines
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Good bye"}]
    assert plain_prompt(turns) == "User: Hi\nAssistant: Hello\nUser: Bye"
    long = {"messages": [{"role": "user", "content": "Write a short poem about the sea, the waves and the tide."},
                         {"role": "assistant", "content": "The sea is blue and wide, the waves roll in with the tide."}]}
    short = tokenize_sample(long, tiny_tokenizer, load_config(None, ["data.max_length=8"]).data, task=SEQ2SEQ)
    assert len(short.input_ids) == 8 and len(short.labels) == 8 and short.truncated
    with pytest.raises(UserError) as err:
        tokenize_sample({"text": "just prose"}, tiny_tokenizer, cfg, task=SEQ2SEQ)
    assert "prompt/completion" in str(err.value)


def test_seq2seq_loss_is_the_models_own_loss(tiny_tokenizer):
    """Our decoder inputs (labels shifted right behind the start token) give Hugging Face's loss."""
    model = _t5(len(tiny_tokenizer)).eval()  # no dropout: both losses see the same network
    objective = Objective(SEQ2SEQ, tiny_tokenizer)
    rows = [TokenizedRow([5, 6, 7, 8, 9], [10, 11, PAD]), TokenizedRow([12, 13], [14, 15, 16, 17, PAD])]
    batch = objective.collate(rows)
    assert batch["input_ids"].shape == (2, 5) and batch["labels"].shape == (2, 5)
    assert batch["labels"][0].tolist() == [10, 11, PAD, IGNORE_INDEX, IGNORE_INDEX]
    nll, n = objective.nll_sum(model, batch)
    assert n == 8 == objective.trained_tokens(batch)  # every answer token counts, none shifted away
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert float(nll) / n == pytest.approx(float(reference), rel=1e-5)


def test_masking_follows_bert_and_is_reproducible():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 700, (64, 128), generator=generator)  # [64, 128]
    ids[:, 0], ids[:, -1] = 1, 3  # a special token at each end, never hidden
    maskable = ids.masked_fill((ids == 1) | (ids == 3), IGNORE_INDEX)
    masked, labels = mask_tokens(ids, maskable, mask_id=4, vocab_size=700, special_ids=[1, 2, 3, 4],
                                 generator=torch.Generator().manual_seed(7))
    chosen = labels != IGNORE_INDEX
    assert 0.13 < float(chosen.float().mean()) < 0.17  # 15% of the tokens
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    as_mask = float((masked[chosen] == 4).float().mean())
    unchanged = float((masked[chosen] == ids[chosen]).float().mean())
    assert 0.77 < as_mask < 0.83 and 0.08 < unchanged < 0.13  # 80% mask token; 10% kept (+ random hits)

    tokenizer = _bert_tokenizer()
    objective = Objective(MASKED_LM, tokenizer)
    rows = [TokenizedRow(*masked_lm_ids({"text": "The sky is blue and the sea is wide."}, tokenizer, 64)[:2])] * 4
    first = objective.collate(rows, key=(42, 0, 0, 0))
    again = objective.collate(rows, key=(42, 0, 0, 0))
    other = objective.collate(rows, key=(42, 0, 1, 0))
    assert torch.equal(first["labels"], again["labels"]) and torch.equal(first["input_ids"], again["input_ids"])
    assert not torch.equal(first["labels"], other["labels"])  # the next batch hides other tokens
    assert all(bool((row != IGNORE_INDEX).any()) for row in first["labels"])  # every row trains on something


def test_masked_lm_loss_is_the_models_own_loss():
    tokenizer = _bert_tokenizer()
    model = _bert(len(tokenizer)).eval()
    objective = Objective(MASKED_LM, tokenizer)
    texts = ["The sky is blue.", "Name three colours: red, green and blue."]
    rows = [TokenizedRow(*masked_lm_ids({"text": t}, tokenizer, 64)[:2]) for t in texts]
    batch = objective.collate(rows, key="x")
    nll, n = objective.nll_sum(model, batch)
    assert n == objective.trained_tokens(batch) > 0
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert float(nll) / n == pytest.approx(float(reference), rel=1e-5)


ROWS = TRAIN_ROWS[:4] * 2


@pytest.mark.parametrize("family", ["t5", "bert"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_trains_and_evaluates_each_task(tmp_path, family, method):
    tokenizer = _bert_tokenizer() if family == "bert" else build_tiny_tokenizer()
    model = _bert(len(tokenizer)) if family == "bert" else _t5(len(tokenizer))
    folder = tmp_path / family
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = load_config(None, [
        f"model.name={folder}", f"data.path={data}", f"data.test_path={data}", "data.validation_split=0",
        "training.max_steps=30", "training.epochs=100", "training.batch_size=8", "training.lr_scheduler=constant",
        f"training.learning_rate={'1e-3' if method == 'full' else '5e-3'}", "lora.dropout=0.0", f"method={method}",
        "eval.max_new_tokens=8",
    ])
    summary = api.train(cfg, tmp_path / "run")
    base, tuned = summary["eval"]["base"], summary["eval"]["tuned"]
    assert tuned["loss"] < base["loss"] - 0.1  # the same rows (and, for BERT, the same hidden tokens)
    saved = tmp_path / "run" / ("model" if method == "full" else "adapter")
    assert saved.is_dir()
    if family == "t5":
        assert "exact_match" in tuned and len(summary["eval_samples"]) > 0  # it generated answers
        assert summary["train"]["final_loss"] <= 0.9 * summary["train"]["first_loss"]
        if method == "lora":
            assert json.loads((saved / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    else:
        assert "exact_match" not in tuned  # a masked LM does not generate


def test_a_masked_lm_without_a_mask_token_is_a_sentence(tmp_path):
    tokenizer = build_tiny_tokenizer()  # no mask token
    folder = tmp_path / "bert"
    _bert(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(UserError) as err:
        api.train(load_config(None, [f"model.name={folder}", f"data.path={data}"]), tmp_path / "run")
    assert "mask token" in str(err.value) and "model.name" in str(err.value)

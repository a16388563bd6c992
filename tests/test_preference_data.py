"""Preference data (data/preference.py): the three formats, what is refused or left out, tokens, truncation, splits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import TINY_SYSTEM, write_rows

from tunesmith.config import DataConfig
from tunesmith.data.preference import (
    PairRow,
    UnpairedRow,
    build_preference_data,
    detect_preference_format,
    pair_samples,
)
from tunesmith.data.read import read_records
from tunesmith.data.tokens import chat_ids
from tunesmith.errors import UserError

HH_RLHF = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf-harmless.jsonl"

PAIRS = [
    {"prompt": f"What is {i} + {i}?", "chosen": f"The answer is {2 * i}.", "rejected": f"It is {2 * i + 1}."}
    for i in range(20)
]


def cfg_for(path, **update) -> DataConfig:
    return DataConfig(**{"path": str(path), "validation_split": 0.0, **update})


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


# --- the three formats ---------------------------------------------------------------------------


def test_preference_rows_tokenise_to_prompt_and_replies_through_their_end_token(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome."},
        {
            "prompt": [{"role": "user", "content": "Tell me a joke."}],
            "chosen": [{"role": "assistant", "content": "Why did the chicken cross the road?"}],
            "rejected": "No.",
        },
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    bundle = build_preference_data(cfg_for(path), tiny_tokenizer, "paired")
    assert bundle.format == "preference"
    assert [type(r) for r in bundle.train] == [PairRow, PairRow] and [r.index for r in bundle.train] == [0, 1]
    first, second = bundle.train
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    assert first.prompt_ids == chat_ids(tiny_tokenizer, prompt, add_generation_prompt=True)
    assert decode(tiny_tokenizer, first.prompt_ids).startswith(f"<|im_start|>system\n{TINY_SYSTEM}")  # template's own
    assert decode(tiny_tokenizer, first.prompt_ids).endswith("<|im_start|>assistant\n")
    # the reply and its end-of-turn token; ChatML's newline after it belongs to the next turn
    assert decode(tiny_tokenizer, first.chosen_ids) == "Paris.<|im_end|>"
    assert decode(tiny_tokenizer, first.rejected_ids) == "Rome.<|im_end|>"
    full = chat_ids(tiny_tokenizer, prompt + [{"role": "assistant", "content": "Paris."}])
    assert full[: len(first.prompt_ids) + len(first.chosen_ids)] == first.prompt_ids + first.chosen_ids
    assert decode(tiny_tokenizer, second.chosen_ids) == "Why did the chicken cross the road?<|im_end|>"
    assert not first.truncated and bundle.stats["truncated"] == 0
    assert bundle.stats["train_token_lengths"]["max"] == max(
        len(r.prompt_ids) + len(r.chosen_ids) for r in bundle.train
    )


def test_conversation_pairs_share_a_prompt_from_message_lists_and_hh_text(tmp_path):
    turns = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."},
             {"role": "user", "content": "Name three colours."}]
    rows = [
        {"chosen": turns + [{"role": "assistant", "content": "Red, green and blue."}],
         "rejected": turns + [{"role": "assistant", "content": "No."}]},
        {"chosen": "\n\nHuman: Hello!\n\nAssistant: Hi.\n\nHuman: Name three colours.\n\nAssistant: Red, green and blue.",
         "rejected": "\n\nHuman: Hello!\n\nAssistant: Hi.\n\nHuman: Name three colours.\n\nAssistant:  No."},
        # two paragraphs of the same speaker in a row are one turn
        {"chosen": "\n\nHuman: Hello!\n\nHuman: Name three colours.\n\nAssistant: Red.\n\nAssistant: Green.",
         "rejected": "\n\nHuman: Hello!\n\nHuman: Name three colours.\n\nAssistant: Blue."},
    ]
    records = read_records(write_jsonl(tmp_path / "conv.jsonl", rows))
    fmt, samples, kept = pair_samples(records, cfg_for(tmp_path / "conv.jsonl"))
    assert fmt == "preference_conversation" and kept == [0, 1, 2]
    assert samples[0] == samples[1] == {"prompt": turns, "chosen": "Red, green and blue.", "rejected": "No."}
    assert samples[2] == {
        "prompt": [{"role": "user", "content": "Hello!\n\nName three colours."}],
        "chosen": "Red.\n\nGreen.",
        "rejected": "Blue.",
    }


def test_conversation_pairs_that_differ_before_the_last_reply_are_left_out_with_one_warning(
    tiny_tokenizer, tmp_path, caplog
):
    same = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    other_question = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Bye\n\nAssistant: Go."}
    more_turns = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: And?\n\nAssistant: Fine.",
                  "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    path = write_jsonl(tmp_path / "hh.jsonl", [same] * 8 + [other_question, same, more_turns])
    with caplog.at_level(logging.WARNING, logger="tunesmith.data.preference"):
        bundle = build_preference_data(cfg_for(path), tiny_tokenizer, "paired")
    assert bundle.stats["rows_read"] == 11 and bundle.stats["rows_used"] == 9 and bundle.stats["left_out"] == 2
    assert "differ before the last reply" in bundle.stats["left_out_reason"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 rows" in warnings[0] and "hh.jsonl, line 9" in warnings[0] and "hh.jsonl, line 11" in warnings[0]
    assert "prompt, chosen and rejected" in warnings[0]  # what to do


def test_unpaired_rows_carry_their_label(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": "What is the capital of Italy?", "completion": "Rome.", "label": True},
        {"prompt": "What is the capital of Italy?", "completion": "Paris.", "label": False},
    ]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    bundle = build_preference_data(cfg_for(path), tiny_tokenizer, "unpaired")
    assert bundle.format == "unpaired"
    assert all(isinstance(r, UnpairedRow) for r in bundle.train)
    assert [r.label for r in bundle.train] == [True, False]
    assert decode(tiny_tokenizer, bundle.train[1].completion_ids) == "Paris.<|im_end|>"
    assert bundle.test_samples == []  # no validation split asked for


def test_columns_rename_the_files_fields(tmp_path):
    rows = [{"question": "Hi?", "better": "Hello.", "worse": "Go."}]
    records = read_records(write_jsonl(tmp_path / "renamed.jsonl", rows))
    columns = {"prompt": "question", "chosen": "better", "rejected": "worse"}
    assert detect_preference_format(records, columns) == "preference"
    _, samples, _ = pair_samples(records, cfg_for(tmp_path / "renamed.jsonl", columns=columns))
    assert samples == [{"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Hello.", "rejected": "Go."}]
    with pytest.raises(UserError, match="'instruction' is not a field of preference data"):
        detect_preference_format(records, {"instruction": "question"})


# --- the wrong data for the objective --------------------------------------------------------------


def test_a_file_of_the_other_kind_or_of_neither_is_refused_with_the_columns_each_needs(tiny_tokenizer, tmp_path):
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Hi", "completion": "Hello.", "label": True}])
    with pytest.raises(UserError) as caught:
        build_preference_data(cfg_for(kto), tiny_tokenizer, "paired")
    text = str(caught.value)
    assert "kto.jsonl" in text and "dpo" in text and "prompt, chosen and rejected" in text
    assert "found columns: prompt, completion, label" in text and "objective.type: kto" in text

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2])
    with pytest.raises(UserError) as caught:
        build_preference_data(cfg_for(pairs), tiny_tokenizer, "unpaired")
    text = str(caught.value)
    assert "pairs.jsonl" in text and "kto needs rows with prompt, completion and label" in text
    assert "found columns: prompt, chosen, rejected" in text

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Hi", "output": "Hello."}])
    with pytest.raises(UserError) as caught:
        build_preference_data(cfg_for(sft), tiny_tokenizer, "paired")
    text = str(caught.value)
    assert "sft.jsonl" in text and "found columns: instruction, output" in text
    assert "prompt, chosen and rejected" in text and "prompt, completion and label" in text


# --- bad rows ------------------------------------------------------------------------------------------

GOOD_PAIR = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}
GOOD_KTO = {"prompt": "Hi?", "completion": "Hello.", "label": True}
GOOD_CONVERSATION = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}

BAD_ROWS = [
    # (the good rows it stands among, the bad row, the field the sentence names, words it must hold)
    (GOOD_PAIR, {"prompt": "Hi?", "chosen": "Hello."}, "rejected", "is missing"),
    (GOOD_PAIR, {"prompt": "Hi?", "chosen": None, "rejected": "Go."}, "chosen", "is null"),
    (GOOD_PAIR, {"prompt": None, "chosen": "Hello.", "rejected": "Go."}, "prompt", "is null"),
    (GOOD_PAIR, {"prompt": "Hi?", "chosen": 42, "rejected": "Go."}, "chosen", "is a number"),
    (GOOD_PAIR, {"prompt": {"text": "Hi?"}, "chosen": "Hello.", "rejected": "Go."}, "prompt", "is an object"),
    (GOOD_PAIR, {"prompt": "Hi?", "chosen": " Hello. ", "rejected": "Hello."}, "chosen", "the same answer"),
    (GOOD_PAIR, {"prompt": "   ", "chosen": "Hello.", "rejected": "Go."}, "prompt", "is empty"),
    (GOOD_PAIR, {"prompt": [], "chosen": "Hello.", "rejected": "Go."}, "prompt", "is empty"),
    (GOOD_PAIR, {"prompt": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hm."}],
                 "chosen": "Hello.", "rejected": "Go."}, "prompt", "ends with an assistant message"),
    (GOOD_PAIR, {"prompt": [{"content": "Hi?"}], "chosen": "Hello.", "rejected": "Go."}, "prompt", '"role" is missing'),
    (GOOD_PAIR, {"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"},
                                              {"role": "assistant", "content": "Hello."}], "rejected": "Go."},
     "chosen", "exactly one"),
    (GOOD_KTO, {"prompt": "Hi?", "completion": "Hello."}, "label", "is missing"),
    (GOOD_KTO, {"prompt": "Hi?", "completion": "Hello.", "label": None}, "label", "is null"),
    (GOOD_KTO, {"prompt": "Hi?", "completion": "Hello.", "label": 1}, "label", "true/false"),
    (GOOD_KTO, {"prompt": "Hi?", "completion": "Hello.", "label": "true"}, "label", "is text"),
    (GOOD_KTO, {"prompt": "Hi?", "completion": ["Hello."], "label": True}, "completion", "message 1 is text"),
    (GOOD_CONVERSATION, {"chosen": "Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}, "chosen",
     'no "Human:" and "Assistant:" turns'),
    (GOOD_CONVERSATION, {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}, "chosen",
     "ends with a user message"),
    (GOOD_CONVERSATION, {"chosen": "\n\nAssistant: Hello.", "rejected": "\n\nAssistant: Go."}, "chosen",
     "no prompt"),
    (GOOD_CONVERSATION, {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.",
                         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello. "}, "rejected", "the same answer"),
    (GOOD_CONVERSATION, {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A."}],
                         "rejected": 7}, "rejected", "is a number"),
]


@pytest.mark.parametrize("good, bad, field_name, words", BAD_ROWS)
def test_a_bad_row_stops_with_a_sentence_naming_file_line_and_field(tiny_tokenizer, tmp_path, good, bad, field_name,
                                                                    words):
    kind = "unpaired" if "label" in good else "paired"
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, good, bad, good])
    with pytest.raises(UserError) as caught:
        build_preference_data(cfg_for(path), tiny_tokenizer, kind)
    text = str(caught.value)
    assert "prefs.jsonl, line 3" in text and f'field "{field_name}"' in text and words in text, text


def test_rows_with_an_empty_answer_or_a_control_token_are_left_out_and_counted(tiny_tokenizer, tmp_path, caplog):
    rows = PAIRS[:6] + [
        {"prompt": "Hi?", "chosen": "  ", "rejected": "Go."},  # line 7
        {"prompt": "Hi?<|im_end|>\n<|im_start|>assistant\nSure", "chosen": "Hello.", "rejected": "Go."},  # line 8
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        bundle = build_preference_data(cfg_for(path), tiny_tokenizer, "paired")
    assert bundle.stats["rows_used"] == 6 and len(bundle.train) == 6 and bundle.stats["left_out"] == 2
    assert bundle.stats["left_out_reason"] == (
        "1 row with an empty answer; 1 row with the tokenizer's control tokens in their text"
    )
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "prefs.jsonl, line 7" in warnings and "empty answer" in warnings
    assert "prefs.jsonl, line 8 holds <|im_start|>" in warnings


# --- system prompt, truncation, splits ------------------------------------------------------------------


def test_the_system_prompt_goes_before_prompts_without_one(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."},
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go.", "system": "Answer briefly."},
        {"prompt": [{"role": "system", "content": "Be polite."}, {"role": "user", "content": "Hi?"}],
         "chosen": "Hello.", "rejected": "Go."},
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    cfg = cfg_for(path, system_prompt="You are a helpful assistant.")
    _, samples, _ = pair_samples(read_records(path), cfg)
    assert [s["prompt"][0]["content"] for s in samples] == ["You are a helpful assistant.", "Answer briefly.",
                                                             "Be polite."]
    bundle = build_preference_data(cfg, tiny_tokenizer, "paired")
    prompts = [decode(tiny_tokenizer, r.prompt_ids) for r in bundle.train]
    assert prompts[0].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert TINY_SYSTEM not in "".join(prompts)  # the template's default gave way


def test_truncation_keeps_the_prompts_end_and_the_answers_start(tiny_tokenizer, tmp_path):
    long_prompt = " ".join(f"Name three fruits number {i}." for i in range(30))
    long_answer = " ".join(f"apple banana cherry {i}" for i in range(30))
    rows = [
        {"prompt": long_prompt, "chosen": long_answer, "rejected": "No."},  # both too long: each kept in part
        {"prompt": "Hi?", "chosen": long_answer, "rejected": long_answer + " more"},  # only the answers are long
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    max_length = 64
    whole = build_preference_data(cfg_for(path, max_length=4096), tiny_tokenizer, "paired").train
    cut = build_preference_data(cfg_for(path, max_length=max_length), tiny_tokenizer, "paired").train
    for full, short in zip(whole, cut):
        assert short.truncated and not full.truncated
        assert len(short.prompt_ids) + max(len(short.chosen_ids), len(short.rejected_ids)) <= max_length
        assert short.prompt_ids == full.prompt_ids[-len(short.prompt_ids):]  # the end of the prompt
        assert short.chosen_ids == full.chosen_ids[: len(short.chosen_ids)]  # the start of each answer
        assert short.rejected_ids == full.rejected_ids[: len(short.rejected_ids)]
    # a long prompt: answers get max_length // 2, the prompt the rest
    assert len(cut[0].chosen_ids) == max_length // 2 and len(cut[0].prompt_ids) == max_length // 2
    assert cut[0].rejected_ids == whole[0].rejected_ids  # short enough already
    # a short prompt is kept whole; the answers get what it leaves
    assert cut[1].prompt_ids == whole[1].prompt_ids
    assert len(cut[1].rejected_ids) == max_length - len(whole[1].prompt_ids)


def test_splits_limit_and_separate_files(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    bundle = build_preference_data(cfg_for(path, validation_split=0.25), tiny_tokenizer, "paired")
    assert (len(bundle.train), len(bundle.validation), len(bundle.test)) == (15, 5, 5)
    assert bundle.test is bundle.validation and len(bundle.test_samples) == 5
    assert [r.index for r in bundle.train] == list(range(15)) and [r.index for r in bundle.validation] == list(range(5))
    assert {s["chosen"] for s in bundle.test_samples} <= {r["chosen"] for r in PAIRS}
    assert (bundle.stats["train"], bundle.stats["validation"], bundle.stats["test"]) == (15, 5, 5)

    limited = build_preference_data(cfg_for(path, validation_split=0.25, limit=8), tiny_tokenizer, "paired")
    assert (len(limited.train), len(limited.validation)) == (6, 2) and limited.stats["rows_read"] == 20

    validation = write_jsonl(tmp_path / "validation.jsonl", PAIRS[:3])
    test = write_rows(tmp_path / "test.json", [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.",
                                                "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}])
    files = build_preference_data(
        cfg_for(path, validation_path=str(validation), test_path=str(test)), tiny_tokenizer, "paired"
    )
    assert (len(files.train), len(files.validation), len(files.test)) == (20, 3, 1)
    assert files.test_samples == [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": "Go."}]
    assert files.test[0].index == 0


# --- the real data ------------------------------------------------------------------------------------


@pytest.mark.skipif(not HH_RLHF.is_file(), reason="../shared/data/hh-rlhf-harmless.jsonl is not here")
def test_hh_rlhf_conversations_split_into_prompt_and_two_replies(builtin_tokenizer, caplog):
    records = read_records(HH_RLHF)
    with caplog.at_level(logging.WARNING):
        fmt, samples, kept = pair_samples(records, cfg_for(HH_RLHF))
    assert fmt == "preference_conversation" and len(records) == 2000
    # No pair differs before its last reply once same-speaker paragraphs are joined; four chosen replies are empty.
    assert sorted(set(range(2000)) - set(kept)) == [86, 516, 925, 1103]  # lines 87, 517, 926 and 1104
    assert "4 rows with an empty answer" in caplog.text and "differ" not in caplog.text

    def words(text: str) -> list[str]:  # the text without turn markers and spacing
        return [w for w in text.split() if w not in ("Human:", "Assistant:")]

    for sample, i in zip(samples, kept):
        assert sample["prompt"][0]["role"] == "user" and sample["prompt"][-1]["role"] == "user"
        assert sample["chosen"].strip() != sample["rejected"].strip()
        for side in ("chosen", "rejected"):
            rebuilt = " ".join(m["content"] for m in sample["prompt"]) + " " + sample[side]
            assert words(rebuilt) == words(records[i][side])
    row = samples[kept.index(1952)]  # line 1953: the chosen reply is two "Assistant:" paragraphs
    assert row["chosen"].startswith("Alrighty, I’ll do my best, here’s the key:\n\nO.k. let’s go ahead")

    bundle = build_preference_data(cfg_for(HH_RLHF, limit=100, max_length=1024), builtin_tokenizer, "paired")
    assert bundle.stats["rows_used"] == 99 and bundle.stats["left_out"] == 1  # line 87
    first = bundle.train[0]
    assert decode(builtin_tokenizer, first.chosen_ids) == samples[0]["chosen"] + "<|im_end|>"
    assert decode(builtin_tokenizer, first.prompt_ids).endswith(
        samples[0]["prompt"][-1]["content"] + "<|im_end|>\n<|im_start|>assistant\n"
    )

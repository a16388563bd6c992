"""The studio's datasets (tunesmith.studio.datasets): upload with tunesmith's reader, bad rows listed by number and
field and fixed in place, paging and search, edits, split, the chat-template view, download."""

from __future__ import annotations

import json
import re

import pytest

from tunesmith.config import DataConfig
from tunesmith.data import build_datasets, inspect_file
from tunesmith.errors import UserError
from tunesmith.studio import datasets

QA = [
    {"instruction": "What is the capital of France?", "output": "The capital of France is Paris."},
    {"instruction": "What is the capital of Italy?", "output": "The capital of Italy is Rome."},
    {"instruction": "Tell me a joke.", "output": "Why did the chicken cross the road? To get to the other side."},
    {"instruction": "Name three colours, please.", "output": "red, green and blue", "input": "Keep it short"},
    {"instruction": "Write a short poem about the sea.", "output": "The sea is blue and wide,\nthe waves roll in."},
]


def _imported(tmp_path, rows, name="upload.jsonl"):
    """(working copy, rows) for `rows` uploaded as `name` (format by extension)."""
    from conftest import write_rows

    src = write_rows(tmp_path / f"src-{name}", rows)
    dest = tmp_path / "work" / f"{name}.working.jsonl"
    count = datasets.import_file(src, dest, name)
    return dest, count


def _upload_text(tmp_path, text: str, name="upload.jsonl"):
    src = tmp_path / ("3f2a" + name[name.rindex("."):])  # stored under a made-up name, as the studio does
    src.write_text(text, encoding="utf-8")
    dest = tmp_path / "work.jsonl"
    return dest, datasets.import_file(src, dest, name)


def _lines(rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


# --- upload, check, fix ---------------------------------------------------------------------------------------


def test_a_broken_line_and_a_missing_field_are_named_by_row_and_field_and_fixed_in_place(tmp_path, tiny_tokenizer):
    broken = '{"instruction": "What is the capital of Italy?", "output": "Rome."'  # no closing brace
    text = _lines(QA[:1]) + broken + "\n" + _lines([{"instruction": "Tell me a joke."}]) + _lines(QA[3:])
    work, count = _upload_text(tmp_path, text, "my data.jsonl")
    assert count == 5  # the broken line is kept as a row to fix, not dropped

    report = datasets.check(work)
    assert report["rows"] == 5 and report["valid_rows"] == 3 and report["format"] == "alpaca"
    assert [(p["row"], p["field"]) for p in report["problems"]] == [(2, None), (3, "output")]
    assert report["problems"][0]["message"].startswith("row 2: not valid JSON (Expecting ',' delimiter")
    assert report["problems"][1]["message"].startswith('row 3: field "output" is missing')
    assert datasets.page(work)["rows"][1]["row"] == {datasets.RAW_KEY: broken}  # the page shows the line as it was

    datasets.update_row(work, 2, {datasets.RAW_KEY: broken + "}"})  # the corrected line, sent as text
    datasets.update_row(work, 3, {"instruction": "Tell me a joke.", "output": "To get to the other side."})
    fixed = datasets.check(work)
    assert fixed["problems"] == [] and fixed["rows"] == 5 and fixed["valid_rows"] == 5
    assert datasets.read_rows(work)[1] == {"instruction": "What is the capital of Italy?", "output": "Rome."}
    bundle = build_datasets(DataConfig(path=str(work), validation_split=0.2), tiny_tokenizer)  # what training reads
    assert (len(bundle.train), len(bundle.validation), bundle.format) == (4, 1, "alpaca")


def test_the_field_is_the_files_column_when_data_columns_renames_it(tmp_path):
    rows = [{"q": "What is 2 + 3?", "a": "5"}, {"q": "What is 4 * 6?"}, {"q": "Name a fruit.", "a": "   "},
            {"q": 42, "a": "a number"}]
    work, _ = _imported(tmp_path, rows)
    cfg = DataConfig(columns={"prompt": "q", "completion": "a"})
    problems = datasets.check(work, cfg)["problems"]
    assert [(p["row"], p["field"]) for p in problems] == [(2, "a"), (3, "a"), (4, "q")]
    assert "empty answer" in problems[1]["message"] and "is a number" in problems[2]["message"]


def test_a_conversation_problem_names_the_conversation_column(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]},
            {"messages": [{"role": "user", "content": "Hello!"}]},
            {"messages": [{"role": "pirate", "content": "Arr"}, {"role": "assistant", "content": "Hi."}]}]
    work, _ = _imported(tmp_path, rows)
    problems = datasets.check(work)["problems"]
    assert [(p["row"], p["field"]) for p in problems] == [(2, "messages"), (3, "messages")]
    assert "ends with a user message" in problems[0]["message"]


def test_check_flags_the_same_rows_as_data_inspect(tmp_path, tiny_tokenizer):
    """The studio and `tunesmith data inspect` run the same checks: they name the same rows."""
    rows = [QA[0], {"instruction": "Tell me a joke."}, QA[1], QA[0], {"instruction": "Name a fruit.", "output": ""},
            {"instruction": "Say <|im_end|> twice.", "output": "ok"}, QA[2]]
    work, _ = _imported(tmp_path, rows)
    source = tmp_path / "src-upload.jsonl"
    inspected = inspect_file(source, tiny_tokenizer)
    flagged = [re.sub(r"repeats line \d+", "", p) for p in inspected["problems"]]  # 'line 4 repeats line 1' flags 4
    named_by_cli = {int(n) for p in flagged for n in re.findall(r"line (\d+)", p)}
    report = datasets.check(work, tokenizer=tiny_tokenizer)
    assert {p["row"] for p in report["problems"]} == named_by_cli == {2, 4, 5, 6}
    assert report["valid_rows"] == inspected["valid_rows"]
    assert next(p for p in report["problems"] if p["row"] == 6)["field"] == "instruction"  # the control token's
    assert "duplicate of row 1" in next(p["message"] for p in report["problems"] if p["row"] == 4)


def test_token_stats_count_the_rows_through_the_template(tmp_path, tiny_tokenizer):
    work, _ = _imported(tmp_path, QA)
    assert datasets.check(work)["token_stats"] is None  # no tokenizer, no counts
    stats = datasets.check(work, DataConfig(max_length=40), tiny_tokenizer)["token_stats"]
    lengths = sorted(len(tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if "input" in r else "")},
         {"role": "assistant", "content": r["output"]}], tokenize=True, return_dict=False)) for r in QA)
    assert stats["count"] == 5 and stats["min"] == lengths[0] and stats["max"] == lengths[-1]
    assert stats["p50"] == lengths[2] and stats["mean"] == round(sum(lengths) / 5, 1)
    assert stats["over_max_length"] == sum(1 for n in lengths if n > 40) > 0


def test_a_dataset_without_a_known_format_is_one_problem_that_names_it(tmp_path):
    work, _ = _imported(tmp_path, [{"foo": "a", "bar": "b"}])
    report = datasets.check(work, shown_name="notes.csv")
    assert report["format"] is None and report["valid_rows"] == 0
    assert [(p["row"], p["field"]) for p in report["problems"]] == [(None, None)]
    assert report["problems"][0]["message"].startswith("notes.csv: cannot tell the data format")


# --- formats in and out -----------------------------------------------------------------------------------------


FLAT = [
    {"prompt": "Translate to French: good morning.", "completion": "Bonjour, ça va ?"},
    {"prompt": 'Quote "this", then a comma, please', "completion": "line one\nline two"},
    {"prompt": "Tell me a joke.", "completion": "Why did the chicken cross the road?"},
]


@pytest.mark.parametrize("name", ["upload.csv", "upload.parquet", "upload.json"])
def test_every_upload_format_gives_the_rows_jsonl_gives(tmp_path, name):
    jsonl, _ = _imported(tmp_path, FLAT, "upload.jsonl")
    other, count = _imported(tmp_path, FLAT, name)
    assert count == 3
    assert datasets.read_rows(other) == datasets.read_rows(jsonl) == FLAT


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_download_reads_back_as_the_same_rows(tmp_path, fmt):
    work, _ = _imported(tmp_path, FLAT)
    downloaded = tmp_path / f"download.{fmt}"
    downloaded.write_bytes(datasets.export(work, fmt))
    again = tmp_path / "again.jsonl"
    assert datasets.import_file(downloaded, again, downloaded.name) == 3
    assert datasets.read_rows(again) == FLAT


def test_a_conversation_downloaded_as_csv_is_json_text_that_reads_back(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hello, you!"}, {"role": "assistant", "content": "Hi."}]}]
    work, _ = _imported(tmp_path, rows)
    downloaded = tmp_path / "download.csv"
    downloaded.write_bytes(datasets.export(work, "csv"))
    again = tmp_path / "again.jsonl"
    datasets.import_file(downloaded, again, "download.csv")
    report = datasets.check(again)
    assert report["format"] == "messages" and report["valid_rows"] == 1 and report["problems"] == []


def test_a_parquet_download_keeps_columns_the_first_row_lacks(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d", "input": "e"}]
    work, _ = _imported(tmp_path, rows)
    downloaded = tmp_path / "d.parquet"
    downloaded.write_bytes(datasets.export(work, "parquet"))
    again = tmp_path / "again.jsonl"
    datasets.import_file(downloaded, again, "d.parquet")
    assert datasets.read_rows(again) == [{"instruction": "a", "output": "b", "input": None}, rows[1]]


def test_a_kept_broken_line_downloads_as_jsonl_unchanged_and_blocks_csv(tmp_path):
    text = _lines(QA[:1]) + "{not json\n"
    work, _ = _upload_text(tmp_path, text)
    assert datasets.export(work, "jsonl").decode() == text
    with pytest.raises(UserError, match="row 2 is still the text uploaded.*download as JSONL"):
        datasets.export(work, "csv")
    with pytest.raises(UserError, match="downloads as jsonl, csv, parquet, not xlsx"):
        datasets.export(work, "xlsx")


def test_a_parquet_download_of_mixed_kinds_names_the_column(tmp_path):
    work, _ = _imported(tmp_path, [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": 5}])
    with pytest.raises(UserError, match="the column completion holds values of different kinds"):
        datasets.export(work, "parquet")


@pytest.mark.parametrize(
    "name, content, said",
    [
        ("sheet.csv", b"\x00\x01\x02\xffbinary", "NUL"),
        ("empty.jsonl", b"", "is empty"),
        ("table.parquet", b"this is not parquet at all", "not a readable Parquet file"),
        ("rows.json", b'{"a": 1}', "no list of rows"),
        ("notes.txt", b"hello", "the studio takes .json, .jsonl, .csv and .parquet"),
    ],
)
def test_a_file_the_reader_refuses_is_a_sentence_naming_the_shown_name(tmp_path, name, content, said):
    src = tmp_path / ("5e1c0ffee" + name[name.rindex("."):])
    src.write_bytes(content)
    dest = tmp_path / "work.jsonl"
    with pytest.raises(UserError) as caught:
        datasets.import_file(src, dest, name)
    message = str(caught.value)
    assert message.startswith(name) and said in message
    assert "5e1c0ffee" not in message  # the stored file's own name never reaches the user
    assert not dest.exists()


# --- browsing and editing ---------------------------------------------------------------------------------------


def test_pages_search_and_edits_keep_row_numbers_straight(tmp_path):
    work, _ = _imported(tmp_path, QA)
    first = datasets.page(work, offset=1, limit=2)
    assert first["total"] == 5 and [r["number"] for r in first["rows"]] == [2, 3]
    assert first["rows"][0]["row"] == QA[1]

    found = datasets.page(work, search="CAPITAL")  # any value, any case
    assert found["total"] == 2 and [r["number"] for r in found["rows"]] == [1, 2]
    assert datasets.page(work, search="keep it SHORT")["rows"][0]["number"] == 4  # the input column counts
    assert datasets.page(work, search="instruction")["total"] == 0  # column names are not values
    assert datasets.page(work, search="capital", offset=1)["rows"][0]["number"] == 2

    new = {"instruction": "Say hello.", "output": "Hello!"}
    assert datasets.add_row(work, new) == 6
    datasets.delete_row(work, 2)
    rows = datasets.read_rows(work)
    assert len(rows) == 5 and rows[1] == QA[2] and rows[4] == new  # the rows after a deleted one move up
    datasets.update_row(work, 5, {"instruction": "Say bye.", "output": "Bye!"})
    assert datasets.page(work, search="bye")["rows"] == [{"number": 5, "row": {"instruction": "Say bye.",
                                                                                "output": "Bye!"}}]


def test_a_conversation_is_found_by_its_message_text(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "General!"}]},
            QA[0]]
    work, _ = _imported(tmp_path, rows)
    assert [r["number"] for r in datasets.page(work, search="general")["rows"]] == [1]


@pytest.mark.parametrize("number", [0, 6, -1, True])
def test_a_row_number_out_of_range_is_refused_and_nothing_changes(tmp_path, number):
    work, _ = _imported(tmp_path, QA)
    before = work.read_bytes()
    with pytest.raises(UserError, match="the dataset has rows 1 to 5"):
        datasets.update_row(work, number, {"text": "x"})
    with pytest.raises(UserError, match="the dataset has rows 1 to 5"):
        datasets.delete_row(work, number)
    assert work.read_bytes() == before


def test_a_row_that_is_not_an_object_is_refused_and_nothing_changes(tmp_path):
    work, _ = _imported(tmp_path, QA)
    before = work.read_bytes()
    with pytest.raises(UserError, match="row 2 is a list; a row must be an object"):
        datasets.update_row(work, 2, ["instruction", "output"])
    with pytest.raises(UserError, match="row 6 is text"):
        datasets.add_row(work, "a row")
    with pytest.raises(UserError, match="a page starts at a row offset of 0"):
        datasets.page(work, offset=-1)
    assert work.read_bytes() == before


# --- split ------------------------------------------------------------------------------------------------------


def test_a_split_is_reproducible_disjoint_and_complete(tmp_path):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(20)]
    work, _ = _imported(tmp_path, rows)

    def split(seed, tag):
        counts = datasets.split(work, tmp_path / f"t{tag}.jsonl", tmp_path / f"v{tag}.jsonl", 0.2, seed)
        return counts, datasets.read_rows(tmp_path / f"t{tag}.jsonl"), datasets.read_rows(tmp_path / f"v{tag}.jsonl")

    counts, train, val = split(7, "a")
    assert counts == (16, 4) and (len(train), len(val)) == counts
    keys = lambda part: {row["prompt"] for row in part}  # noqa: E731
    assert not keys(train) & keys(val) and keys(train) | keys(val) == keys(rows)
    assert split(7, "b") == (counts, train, val)  # the same seed, the same split
    assert keys(split(8, "c")[2]) != keys(val)  # another seed, another split
    assert train == [row for row in rows if row["prompt"] in keys(train)]  # each side keeps the rows' order


@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.5, -0.1, float("nan")])
def test_a_split_that_would_leave_a_side_empty_is_refused(tmp_path, fraction):
    work, _ = _imported(tmp_path, QA)
    with pytest.raises(UserError, match="a fraction between 0 and 1"):
        datasets.split(work, tmp_path / "t.jsonl", tmp_path / "v.jsonl", fraction)
    assert not (tmp_path / "t.jsonl").exists()


def test_a_split_of_one_row_is_refused(tmp_path):
    work, _ = _imported(tmp_path, QA[:1])
    with pytest.raises(UserError, match="at least 2 rows.*has 1"):
        datasets.split(work, tmp_path / "t.jsonl", tmp_path / "v.jsonl", 0.5)


# --- through the chat template ----------------------------------------------------------------------------------


def _parts(segments):
    masked = "".join(s["text"] for s in segments if s["masked"])
    trained = "".join(s["text"] for s in segments if not s["masked"])
    return masked, trained


def test_the_template_view_masks_the_question_and_trains_the_answer(tiny_tokenizer):
    row = {"instruction": "What is the capital of France?", "output": "The capital of France is Paris."}
    segments = datasets.template_view(row, tiny_tokenizer)
    masked, trained = _parts(segments)
    assert "What is the capital of France?" in masked and "You are a tiny helpful assistant." in masked
    assert "The capital of France is Paris." in trained and "What is" not in trained
    messages = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
    assert "".join(s["text"] for s in segments) == tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert not any(s["cut"] for s in segments)


def test_the_template_view_marks_what_max_length_cuts(tiny_tokenizer):
    row = {"instruction": "What is the capital of France?", "output": "The capital of France is Paris."}
    segments = datasets.template_view(row, tiny_tokenizer, DataConfig(max_length=8))
    kept = [s for s in segments if not s["cut"]]
    assert kept and len(tiny_tokenizer(("".join(s["text"] for s in kept)), add_special_tokens=False)["input_ids"]) == 8
    assert "Paris" in "".join(s["text"] for s in segments if s["cut"])


def test_the_template_view_with_train_on_prompt_masks_nothing(tiny_tokenizer):
    row = {"prompt": "Tell me a joke.", "completion": "To get to the other side."}
    segments = datasets.template_view(row, tiny_tokenizer, DataConfig(train_on_prompt=True))
    assert [s["masked"] for s in segments] == [False]


def test_the_template_view_of_a_bad_row_is_a_sentence(tiny_tokenizer):
    alpaca = DataConfig(format="alpaca")  # the dataset's format, as check found it
    with pytest.raises(UserError, match='this row cannot be trained on: field "output" is missing'):
        datasets.template_view({"instruction": "Tell me a joke."}, tiny_tokenizer, alpaca)
    with pytest.raises(UserError, match="this row: cannot tell the data format"):  # one row alone does not say
        datasets.template_view({"instruction": "Tell me a joke."}, tiny_tokenizer)
    with pytest.raises(UserError, match="not a JSON object yet"):
        datasets.template_view({datasets.RAW_KEY: "{broken"}, tiny_tokenizer)


def test_the_template_view_with_the_real_chatml_tokenizer(builtin_tokenizer):
    row = {"messages": [{"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": "Name three fruits."},
                        {"role": "assistant", "content": "apple, banana and cherry"}]}
    masked, trained = _parts(datasets.template_view(row, builtin_tokenizer))
    assert "Name three fruits." in masked and "Answer briefly." in masked and "<|im_start|>assistant" in masked
    assert trained.startswith("apple, banana and cherry") and "Name three fruits." not in trained
    assert "<|im_end|>" in trained  # the model learns to stop

"""Fuzzing the data layer: whatever a data file holds, it reads or it says what is wrong.

The property, for generated files of every format and for a corpus of hand-made hostile ones
(other encodings, binary data, named pipes, folders, link loops, JSON nested thousands deep):
reading the file, inspecting it (`tunesmith data inspect`) and building datasets from it each
either succeed or raise a `UserError` whose sentence names the file; never another exception,
never a hang (a timer stops a step after HANG_SECONDS); and nothing shown to a person (the
inspect report, the sentences, the log) holds a raw control character such as ESC or a lone
surrogate that a terminal would act on or could not print.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import random
import re
import socket
from pathlib import Path

import pytest
from conftest import time_limit
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tunesmith.config import DataConfig
from tunesmith.data import build_datasets, format_inspection, inspect_file, read_records
from tunesmith.errors import UserError

MAX_LENGTH = 48  # small, so truncation and rows with nothing left to train on happen often
HANG_SECONDS = 10
MAX_SENTENCE = 4000  # characters: a sentence quotes bits of the data, never all of it


def shown_name(path: Path) -> str:
    """The file name as a sentence shows it: characters a terminal would act on as escapes (\\x1b)."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in path.name)


def assert_printable(text: str, what: str) -> None:
    """Nothing a terminal acts on (ESC, other control characters, bidi overrides) and nothing it cannot
    print (lone surrogates): only printable characters and line breaks."""
    bad = sorted({ch for ch in text if ch != "\n" and not ch.isprintable()})
    assert not bad, f"{what} shows raw {bad!r}: {text[:300]!r}"
    text.encode("utf-8")


def data_layer(path: Path, tokenizer, cache_dir: Path, validation_split: float = 0.25, max_length: int = MAX_LENGTH):
    """Read, inspect and build from `path`, each step under the time limit; what each step showed.

    Returns {"read", "inspect", "build": each step's sentence, or None when it succeeded; "report": the inspect
    report's text; "bundle": the DataBundle}; fails the test on any other exception or a hang."""
    out: dict = {"read": None, "inspect": None, "build": None, "report": None, "bundle": None}
    cfg = DataConfig(path=str(path), max_length=max_length, validation_split=validation_split)

    def attempt(step: str, action) -> None:
        try:
            with time_limit(HANG_SECONDS):
                result = action()
        except UserError as exc:
            message = str(exc)
            assert shown_name(path) in message, f"{step}: the sentence does not name the file: {message[:300]}"
            assert len(message) < MAX_SENTENCE, f"{step}: a sentence of {len(message)} characters"
            assert_printable(message, f"{step}'s sentence")
            out[step] = message
            return
        if step == "inspect":
            out["report"] = format_inspection(result)
            assert_printable(out["report"], "the inspect report")
        elif step == "build":
            out["bundle"] = result

    attempt("read", lambda: read_records(path))
    attempt("inspect", lambda: inspect_file(path, tokenizer, cfg))
    attempt("build", lambda: build_datasets(cfg, tokenizer, cache_dir=cache_dir))
    bundle = out["bundle"]
    if bundle is not None:
        for row in bundle.train + bundle.validation + bundle.test:
            assert len(row.input_ids) <= max_length and len(row.labels) == len(row.input_ids)
    return out


# --- generated files ------------------------------------------------------------------------------

HOSTILE_TEXT = [
    "", " ", " \n\t ", "\x1b[31mred\x1b[0m", "\x1b]0;title\x07", "\x1b[2J\x1b[H", "\u202eevil", "\u2028\u2029",
    "\x00", "\x7f\x85\x9b", "\ud800", "a\udfffb", "<|im_end|>", "<|im_start|>assistant\n", "\r\n", "\\", '"', ",",
    "\t", "café", "😀", "x" * 3000, "1" * 30,
]
any_char = st.characters(exclude_categories=())  # every code point, control characters and surrogates included
plain_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)
texts = st.one_of(plain_text, st.text(any_char, max_size=30), st.sampled_from(HOSTILE_TEXT))
any_value = st.one_of(
    texts,
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**25), max_value=10**25),
    st.floats(),
    st.lists(texts, max_size=3),
    st.dictionaries(texts, texts, max_size=2),
)
# Text a row may well hold: any character, control characters, special tokens and (where JSON escapes
# write them) lone surrogates included.
clean_text = st.one_of(plain_text, plain_text, st.sampled_from(HOSTILE_TEXT), st.text(any_char, max_size=30))
field_value = st.one_of(clean_text, texts, any_value)

ROW_SHAPES = {
    "alpaca": ("instruction", "output", "input"),
    "prompt_completion": ("prompt", "completion", "system"),
    "question_answer": ("question", "answer", "system"),
    "text": ("text",),
}
CONVERSATIONS = {  # format: (list key, role key, content key, user role, assistant role, other roles)
    "messages": ("messages", "role", "content", "user", "assistant", ["system", "bot", "", "USER "]),
    "sharegpt": ("conversations", "from", "value", "human", "gpt", ["system", "model", "user", "bing"]),
}


@st.composite
def conversation(draw, clean: bool, role_key: str, content_key: str, user: str, assistant: str, others: list[str]):
    if clean or draw(st.booleans()):  # user/assistant turns ending with the assistant's
        text = clean_text if clean else field_value
        turns = draw(st.lists(st.tuples(text, text), min_size=1, max_size=3))
        return [m for u, a in turns for m in ({role_key: user, content_key: u}, {role_key: assistant, content_key: a})]
    role = st.one_of(st.sampled_from([user, assistant, *others]), any_value)
    message = st.fixed_dictionaries({}, optional={role_key: role, content_key: any_value})
    return draw(st.one_of(st.lists(st.one_of(message, any_value), max_size=4), any_value))


@st.composite
def data_row(draw, shape: str, clean: bool) -> dict:
    """One row of `shape`: a clean row has every field as text (any text); another may have fields of the
    wrong type, a missing key, extra keys that clash, a conversation that is not one."""
    if shape in CONVERSATIONS:
        key, *conversation_keys = CONVERSATIONS[shape]
        row = {key: draw(conversation(clean, *conversation_keys))}
    else:
        row = {name: draw(clean_text if clean else field_value) for name in ROW_SHAPES[shape]}
    if clean:
        row.update(draw(st.dictionaries(st.sampled_from(["id", "source", "meta\x1b[1m"]), clean_text, max_size=2)))
        return row
    for name in draw(st.sets(st.sampled_from(sorted(row)), max_size=1)):
        del row[name]  # a missing key
    row.update(draw(st.dictionaries(texts, any_value, max_size=2)))  # extra keys (which may also clash)
    return row


def _jsonl(rows: list, ascii_only: bool) -> bytes:
    # "surrogatepass": a lone surrogate written raw is what a careless writer leaves, and it is not UTF-8
    return "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows).encode("utf-8", "surrogatepass")


def _cell(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _csv(rows: list[dict], delimiter: str) -> bytes:
    names = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter)
    writer.writerow(names)
    for row in rows:
        writer.writerow([_cell(row[name]) if name in row else "" for name in names])
    return buffer.getvalue().encode("utf-8", "surrogatepass")


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def no_surrogates(value):  # (Parquet text is UTF-8, which cannot hold a lone surrogate)
        if isinstance(value, str):
            return value.encode("utf-8", "replace").decode("utf-8")
        if isinstance(value, list):
            return [no_surrogates(item) for item in value]
        if isinstance(value, dict):
            return {no_surrogates(key): no_surrogates(item) for key, item in value.items()}
        return value

    def as_json_text(values: list) -> pa.Array:
        return pa.array([None if v is None else json.dumps(v) for v in values])

    names = list(dict.fromkeys(key for row in rows for key in row))
    columns = {}
    for name in names:
        values = [no_surrogates(row.get(name)) for row in rows]
        try:  # the column as it is when pyarrow can type (and Parquet store) it, else as JSON text
            column = pa.array(values)
            pq.write_table(pa.table({"probe": column}), io.BytesIO())
        except (pa.ArrowException, OverflowError, ValueError, TypeError):
            column = as_json_text(values)
        columns[no_surrogates(name)] = column
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue()


@st.composite
def data_file(draw) -> tuple[str, bytes]:
    """(file suffix, bytes): rows of one format written as JSONL, JSON, CSV, TSV or Parquet, sometimes spoiled
    afterwards (cut short, re-encoded, a byte-order mark put in front, random bytes spliced in)."""
    shape = draw(st.sampled_from(sorted(ROW_SHAPES) + sorted(CONVERSATIONS)))
    clean = draw(st.sampled_from([True, True, False]))
    rows = draw(st.lists(data_row(shape, clean), min_size=1, max_size=6))
    if draw(st.integers(0, 9)) == 0:
        rows = rows + draw(st.lists(any_value, min_size=1, max_size=2))  # rows that are not objects
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet"]))
    dict_rows = [r for r in rows if isinstance(r, dict)] or [{}]
    if suffix == ".jsonl":
        data = _jsonl(rows, draw(st.booleans()))
    elif suffix == ".json":
        body = rows if draw(st.booleans()) else {"version": 1, "data": rows}
        data = json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    elif suffix in (".csv", ".tsv"):
        data = _csv(dict_rows, "\t" if suffix == ".tsv" else ",")
    else:
        data = _parquet(dict_rows)
    spoil = draw(st.sampled_from(["none"] * 6 + ["cut", "utf-16", "latin-1", "bom", "splice"]))
    if spoil == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif spoil == "utf-16":
        data = codecs.BOM_UTF16_LE + data.decode("utf-8", "replace").encode("utf-16-le")
    elif spoil == "latin-1":
        data = data.decode("utf-8", "replace").encode("latin-1", "replace")
    elif spoil == "bom":
        data = codecs.BOM_UTF8 + data
    elif spoil == "splice":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    return suffix, data


@settings(max_examples=400)
@given(case=data_file())
def test_any_data_file_reads_or_says_what_is_wrong(case, tmp_path, tiny_tokenizer, log_lines):
    suffix, data = case
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    log_lines.clear()
    out = data_layer(path, tiny_tokenizer, tmp_path / "cache")
    event(f"{suffix}: " + ("read fails" if out["read"] else "build fails" if out["build"] else "builds"))
    if out["bundle"] is not None:
        event("rows trained" if out["bundle"].train else "no row left to train")
    for line in log_lines:
        assert_printable(line, "a log line")


# --- hand-made hostile files -------------------------------------------------------------------------


def _text(name: str, text: str, encoding: str = "utf-8"):
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(text.encode(encoding))
        return path

    return make


def _bytes(name: str, data: bytes):
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    return make


def _lines(name: str, *rows):
    return _text(name, "".join(json.dumps(r) + "\n" for r in rows))


def _folder(folder: Path) -> Path:
    (folder / "rows.jsonl").mkdir()
    return folder / "rows.jsonl"


def _fifo(folder: Path) -> Path:
    os.mkfifo(folder / "pipe.jsonl")
    return folder / "pipe.jsonl"


def _socket(folder: Path) -> Path:
    path = folder / "sock.jsonl"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))  # the socket file stays after the socket object is gone
    server.close()
    return path


def _link(name: str, target: str):
    def make(folder: Path) -> Path:
        (folder / name).symlink_to(target if target.startswith("/") else folder / target)
        return folder / name

    return make


def _link_loop(folder: Path) -> Path:
    (folder / "a.jsonl").symlink_to(folder / "b.jsonl")
    (folder / "b.jsonl").symlink_to(folder / "a.jsonl")
    return folder / "a.jsonl"


def _parquet_file(name: str, rows: list[dict]):
    def make(folder: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), folder / name)
        return folder / name

    return make


GOOD = {"prompt": "What is the capital of France?", "completion": "Paris."}
PAIR = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

# (id, how to make the file, what must happen): "ok" reads, inspects and builds; ("file", pattern) fails at
# reading with a sentence matching pattern; ("row", pattern) reads, and both the inspect report and the
# build sentence say pattern.
HOSTILE = [
    ("folder", _folder, ("file", r"rows\.jsonl is a folder")),
    ("fifo", _fifo, ("file", r"is a named pipe \(FIFO\)")),
    ("socket", _socket, ("file", r"is a socket, not a data file")),
    ("device", _link("null.jsonl", "/dev/null"), ("file", r"is a device, not a data file")),
    ("endless-device", _link("zero.jsonl", "/dev/zero"), ("file", r"is a device, not a data file")),
    ("link-loop", _link_loop, ("file", r"link loop")),
    ("dangling-link", _link("gone.jsonl", "nowhere.jsonl"), ("file", r"is a link to .*nowhere\.jsonl, which does")),
    ("missing", lambda folder: folder / "missing.jsonl", ("file", r"missing\.jsonl does not exist")),
    ("wrong-suffix", _text("rows.txt", json.dumps(GOOD)), ("file", r"reads \.json, \.jsonl")),
    ("empty", _text("empty.jsonl", ""), ("file", r"is empty")),
    ("blank", _text("blank.csv", " \n\r\n\t"), ("file", r"holds only blank space")),
    ("utf8-bom-jsonl", _bytes("bom.jsonl", codecs.BOM_UTF8 + _jsonl([GOOD], False)), "ok"),
    ("utf8-bom-csv", _bytes("bom.csv", codecs.BOM_UTF8 + _csv([GOOD], ",")), "ok"),
    ("utf16-bom", _bytes("utf16.jsonl", codecs.BOM_UTF16_LE + json.dumps(GOOD).encode("utf-16-le")), "ok"),
    ("utf32-bom", _bytes("utf32.json", codecs.BOM_UTF32_BE + json.dumps([GOOD]).encode("utf-32-be")), "ok"),
    ("utf16-no-bom", _text("utf16.csv", "prompt,completion\nhi,there\n", "utf-16-le"), ("file", r"NUL \(zero\) byte")),
    (
        "latin-1",
        _text("latin.jsonl", json.dumps(GOOD) + '\n{"prompt": "café", "completion": "oui"}\n', "latin-1"),
        ("file", r"latin\.jsonl, line 2: byte \d+ \(0xe9\) is not UTF-8"),
    ),
    ("random-bytes", _bytes("noise.jsonl", random.Random(0).randbytes(4096)), ("file", r"NUL \(zero\) byte|not UTF-8")),
    ("gzip", _bytes("rows.jsonl", gzip.compress(_jsonl([GOOD], True))), ("file", r"gzip-compressed")),
    ("parquet-named-jsonl", _parquet_file("rows.jsonl", [GOOD]), ("file", r"it is a Parquet file; name it \.parquet")),
    ("text-named-parquet", _text("rows.parquet", json.dumps(GOOD)), ("file", r"not a readable Parquet file")),
    ("nul-in-json", _text("nul.jsonl", json.dumps(GOOD) + '\n{"prompt": "a\x00b"}\n'), ("file", r"line 2: byte")),
    ("huge-line-garbage", _text("garbage.jsonl", "x" * 2_000_000), ("file", r"line 1: not valid JSON")),
    ("huge-value", _lines("huge.jsonl", {"prompt": "Write on.", "completion": "word " * 200_000}), "ok"),
    ("huge-csv-cell", _bytes("cell.csv", _csv([{"prompt": "Go on.", "completion": "a " * 100_000}], ",")), "ok"),
    ("deep-jsonl", _text("deep.jsonl", "[" * 100_000), ("file", r"line 1: nested too deeply")),
    ("deep-json", _text("deep.json", '{"data": ' + "[" * 50_000 + "]" * 50_000 + "}"), ("file", r"nested too deeply")),
    (
        "deep-csv-cell",
        _bytes("deep.csv", _csv([{"messages": "[" * 50_000 + "]" * 50_000}], ",")),
        ("row", r'row 1: field "messages" is text that is not a JSON list \(nested too deeply'),
    ),
    ("long-number", _text("number.jsonl", '{"text": ' + "9" * 5000 + "}\n"), ("file", r"longer than \d+ digits")),
    ("json-number", _text("scalar.json", "42"), ("file", r"holds a number; a \.json data file must hold a list")),
    ("json-text", _text("scalar.json", '"rows"'), ("file", r"holds text; a \.json data file")),
    ("json-null", _text("scalar.json", "null"), ("file", r"holds null")),
    ("json-empty-object", _text("obj.json", "{}"), ("file", r"holds an empty object")),
    ("json-not-objects", _text("list.json", "[1, 2]"), ("file", r"row 1: holds a number, not an object")),
    ("jsonl-not-object", _text("list.jsonl", "[1]\n"), ("file", r"line 1: holds a list, not a JSON object")),
    ("csv-extra-cells", _text("wide.csv", "prompt,completion\na,b,c\n"), ("file", r"row 1: has 3 cells but the")),
    ("csv-same-column-twice", _text("twice.csv", "prompt,prompt,completion\na,b,c\n"), ("file", r"more than once")),
    ("csv-header-only", _text("header.csv", "prompt,completion\n"), ("file", r"holds no rows")),
    ("csv-short-row", _text("short.csv", "prompt,completion\nq,a\nb\n"), ("row", r'row 2: field "completion" is')),
    ("nul-in-csv", _text("nul.csv", "prompt,completion\na\x00,b\n"), ("file", r"line 2: byte 19 is a NUL")),
    (
        "number-field",
        _lines("n.jsonl", GOOD, {"prompt": 42, "completion": "x"}),
        ("row", r'line 2: field "prompt" is a number'),
    ),
    ("list-field", _lines("l.jsonl", {"prompt": ["a"], "completion": "x"}), ("row", r'field "prompt" is a list')),
    ("null-field", _lines("z.jsonl", {"prompt": None, "completion": "x"}), ("row", r'field "prompt" is null')),
    ("object-field", _lines("o.jsonl", {"text": {"a": 1}}), ("row", r'field "text" is an object')),
    (
        "bad-role",
        _lines("r.jsonl", {"messages": [PAIR[0], {"role": "bot", "content": "x"}]}),
        ("row", r"\"role\" is 'bot'"),
    ),
    ("no-content", _lines("c.jsonl", {"messages": [PAIR[0], {"role": "assistant"}]}), ("row", r'"content" is missing')),
    (
        "messages-number",
        _lines("m.jsonl", {"messages": 7}),
        ("row", r'field "messages" is a number; it must be a list'),
    ),
    ("sharegpt-speaker", _lines("s.jsonl", {"conversations": [{"from": "bing", "value": "x"}]}), ("row", r"'bing'")),
    (
        "surrogate",
        _text("sur.jsonl", '{"prompt": "a\\ud800", "completion": "b"}\n'),
        ("row", r"half of a surrogate pair"),
    ),
    (
        "escapes-in-a-bad-row",
        _lines("esc.jsonl", GOOD, {"prompt": "\x1b[2J", "\x1b]0;owned\x07": "x"}),
        ("row", r'line 2: field "completion" is missing.*this row has: prompt, \\x1b\]0;owned\\x07'),
    ),
    (
        "escapes-in-good-rows",
        _lines("ansi.jsonl", {"prompt": "\x1b[31mred\u202e", "completion": "\x1b[0m\x07ok"}),
        "ok",
    ),
    ("escape-in-the-file-name", _text("evil\x1b[31m.jsonl", "{not json\n"), ("file", r"evil\\x1b\[31m\.jsonl, line 1")),
    (
        "parquet-binary-column",
        _parquet_file("bin.parquet", [{"text": b"\x00\x1b"}]),
        ("row", r'field "text" is binary'),
    ),
]


@pytest.mark.parametrize("make, expected", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_hostile_file_gives_its_sentence(make, expected, tmp_path, tiny_tokenizer):
    path = make(tmp_path)
    out = data_layer(path, tiny_tokenizer, tmp_path / "cache", validation_split=0.0, max_length=64)
    if expected == "ok":
        assert (out["read"], out["inspect"], out["build"]) == (None, None, None), out
        assert out["bundle"].train and "problems:" not in out["report"], out["report"]
        return
    kind, pattern = expected
    # (inspect lists a bad JSONL line among its problems, where reading stops at it)
    shown = [out["inspect"] or out["report"], out["build"]] + ([out["read"]] if kind == "file" else [])
    if kind == "row":
        assert out["read"] is None, out["read"]
    for text in shown:
        assert text is not None and re.search(pattern, text), f"expected {pattern!r} in: {text}"


def test_a_file_without_read_permission_says_so(tmp_path, tiny_tokenizer):
    if os.geteuid() == 0:
        pytest.skip("root reads every file, whatever its permissions")
    path = _lines("secret.jsonl", GOOD)(tmp_path)
    path.chmod(0)
    out = data_layer(path, tiny_tokenizer, tmp_path / "cache")
    for step in ("read", "inspect", "build"):
        assert "secret.jsonl cannot be read (permission denied)" in out[step]


@pytest.mark.parametrize("name", ["fifo", "folder", "escapes-in-good-rows", "escapes-in-a-bad-row", "deep-jsonl"])
def test_cli_inspect_on_hostile_files_prints_sentences(name, tmp_path, capsys):
    from tunesmith import cli  # (here: the CLI imports every layer, the rest of this file only data/)

    make = next(case[1] for case in HOSTILE if case[0] == name)
    path = make(tmp_path)
    with time_limit(HANG_SECONDS):
        code = cli.main(["data", "inspect", str(path), "--no-tokens"])
    out, err = capsys.readouterr()
    assert code in (0, 2)
    assert "Traceback" not in err and "\x1b" not in out and "\x1b" not in err
    assert path.name in (out if code == 0 else err)

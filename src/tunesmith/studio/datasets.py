"""The studio's datasets: upload, check, browse, edit, split, view through the chat template, download.

The studio keeps every dataset as a JSONL working copy, one JSON object per line, written by
`import_file` from the uploaded JSON / JSONL / CSV / Parquet file with tunesmith's own reader
(tunesmith.data.read), and rewritten whole (temporary file, then rename) by every edit.  Rows are
numbered from 1 in the order of that file, and those numbers are what every function here takes
and what every problem names.

A JSONL line that is not a JSON object is not dropped on upload: it becomes the row
{"_raw": "<the line as it was>"} (RAW_KEY), which `check` reports with the reader's own sentence
("row 4: not valid JSON (...)") and which the user fixes in the page.  Storing {"_raw": text} whose text
now reads as a JSON object stores that object, so a page can send the corrected line as it is.

`check` runs the same checks as `tunesmith data inspect` (tunesmith.data.inspection.row_problems shares
inspect_file's rules), one problem per row and field.  `template_view` shows a row through the model's chat
template with the tokens the loss ignores marked, using training's own tokenisation and masking
(tunesmith.data.tokens.tokenize_sample).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from tunesmith.config import DataConfig
from tunesmith.data.build import percentiles, split_indices
from tunesmith.data.formats import column_names, normalise_rows
from tunesmith.data.inspection import row_problems
from tunesmith.data.read import (
    JSONLineError,
    Records,
    _kind,
    parse_jsonl_line,
    read_records_keeping_bad_lines,
)
from tunesmith.data.tokens import IGNORE_INDEX, tokenize_sample
from tunesmith.errors import UserError, visible, visible_names
from tunesmith.fileio import atomic_write_text, exclusive

UPLOAD_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
EXPORT_FORMATS = ("jsonl", "csv", "parquet")
RAW_KEY = "_raw"  # {"_raw": text}: an uploaded JSONL line that is not a JSON object, kept for the user to fix
_DATASET = "the dataset"  # how a whole-file sentence names the dataset when no name is given


# --- the working copy ---------------------------------------------------------------------------------------


def import_file(src: Path, dest: Path, shown_name: str) -> int:
    """Read the uploaded file `src` with tunesmith's reader and write its rows to the working copy `dest`;
    the number of rows.  `shown_name` (the name the user gave the file) names it in every sentence, never
    `src`'s own name.  A file the reader refuses is a UserError; a bad JSONL line is kept as a RAW_KEY row."""
    src = Path(src)
    name = visible(shown_name, 200)
    if src.suffix.lower() not in UPLOAD_SUFFIXES:
        raise UserError(
            f"{name}: the studio takes .json, .jsonl, .csv and .parquet files, not "
            f"{visible(src.suffix, 40) or 'files without an extension'}; convert it to one of these."
        )
    try:
        records, bad_lines = read_records_keeping_bad_lines(src)
    except UserError as exc:  # the reader names the file by its path: name it as the user knows it
        raise UserError(str(exc).replace(visible(src, None), name)) from None
    # Put the bad lines back where they stood among the good ones (both are numbered by line).
    numbered = [(number, row) for number, row in zip(records.row_numbers, records)]
    numbered += [(number, {RAW_KEY: line}) for number, line, _reason in bad_lines]
    numbered.sort(key=lambda pair: pair[0])
    rows = [row for _number, row in numbered]
    write_rows(dest, rows)
    return len(rows)


def read_rows(path: Path) -> list[dict]:
    """The working copy's rows, in order (a line that is not a JSON object reads as a RAW_KEY row)."""
    text = Path(path).read_text(encoding="utf-8")
    rows = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            rows.append(parse_jsonl_line(line))
        except JSONLineError:  # only if something else wrote the file
            rows.append({RAW_KEY: line})
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write `rows` as the working copy at `path` (temporary file, then rename)."""
    lines = [_json_line(_settled(row, number), number) for number, row in enumerate(rows, start=1)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _json_line(row: dict, number: int) -> str:
    # ASCII escapes keep every row writable, even text holding half a surrogate pair (the checks name that);
    # default=str: a Parquet date or decimal is kept as its text.
    try:
        return json.dumps(row, ensure_ascii=True, default=str)
    except RecursionError:
        raise UserError(
            f"row {number} is nested too deeply to store (lists or objects hundreds of levels inside each other); "
            "flatten it."
        ) from None


def _settled(row, number: int) -> dict:
    """`row` as stored: it must be an object; a RAW_KEY row whose text now reads as an object becomes that object."""
    if not isinstance(row, dict):
        raise UserError(f"row {number} is {_kind(row)}; a row must be an object of column names and values.")
    if _raw_text(row) is not None:
        try:
            return parse_jsonl_line(row[RAW_KEY])
        except JSONLineError:
            return row
    return row


def is_raw(row: dict) -> bool:
    """Whether `row` is a kept line that is not a JSON object (still to be fixed)."""
    return _raw_text(row) is not None


def _raw_text(row: dict) -> str | None:
    """The kept line of a RAW_KEY row, or None for an ordinary row."""
    if len(row) == 1 and isinstance(row.get(RAW_KEY), str):
        return row[RAW_KEY]
    return None


# --- checks -------------------------------------------------------------------------------------------------


def check(path: Path, data_cfg: DataConfig | None = None, tokenizer=None, shown_name: str | None = None) -> dict:
    """What is wrong with the working copy, row by row, with the checks of `tunesmith data inspect`.

    Returns {"format": detected format or None, "rows": n, "valid_rows": rows that read as training samples,
    "problems": [{"row": 1-based number or None (the whole dataset), "field": column or None, "message": str}],
    "token_stats": {"count", "min", "mean", "p50", "p95", "max", "over_max_length"} (None without a tokenizer),
    "columns": [column names in first-seen order]}.  `shown_name` names the dataset in whole-file sentences.
    """
    cfg = data_cfg or DataConfig()
    rows = read_rows(path)
    problems: list[dict] = []
    kept, numbers = [], []
    for number, row in enumerate(rows, start=1):
        raw = _raw_text(row)
        if raw is None:
            kept.append(row)
            numbers.append(number)
            continue
        try:
            kept.append(parse_jsonl_line(raw))  # stored by an older write; reads now
            numbers.append(number)
        except JSONLineError as exc:
            problems.append({"row": number, "field": None, "message": f"row {number}: {exc}"})
    records = Records(kept, shown_name or _DATASET, numbers, unit="row")
    report = {"format": None, "rows": len(rows), "valid_rows": 0, "problems": problems, "token_stats": None,
              "columns": column_names(kept)}
    if not rows:
        problems.append({"row": None, "field": None, "message": f"{visible(shown_name or _DATASET, 200)} has no "
                         "rows; add at least one."})
        return report
    if kept:
        found = row_problems(records, tokenizer, cfg)
        problems.extend(found["problems"])
        problems.sort(key=lambda p: -1 if p["row"] is None else p["row"])  # whole-dataset sentences first
        report.update(format=found["format"], valid_rows=found["valid_rows"])
        if tokenizer is not None:
            report["token_stats"] = _token_stats(found["token_lengths"], cfg.max_length)
    elif tokenizer is not None:
        report["token_stats"] = _token_stats([], cfg.max_length)
    return report


def _token_stats(lengths: list[int], max_length: int) -> dict:
    """count, min, mean, p50, p95 (nearest rank, as tunesmith data inspect), max, and rows over max_length."""
    if not lengths:
        return {"count": 0, "min": None, "mean": None, "p50": None, "p95": None, "max": None, "over_max_length": 0}
    ranks = percentiles(lengths, points=(50, 95))
    return {"count": len(lengths), "min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1),
            "p50": ranks["p50"], "p95": ranks["p95"], "max": ranks["max"],
            "over_max_length": sum(1 for n in lengths if n > max_length)}


# --- browsing and editing -----------------------------------------------------------------------------------


def page(path: Path, offset: int = 0, limit: int = 50, search: str | None = None) -> dict:
    """{"total": rows that match, "rows": [{"number": the row's 1-based number in the dataset, "row": dict}]}:
    `limit` matching rows from the `offset`-th; `search` keeps rows where any value (nested text included)
    holds it, ignoring case."""
    if offset < 0 or limit < 1:
        raise UserError(f"a page starts at a row offset of 0 or more and holds at least 1 row, not offset {offset} "
                        f"and limit {limit}.")
    numbered = list(enumerate(read_rows(path), start=1))
    if search:
        wanted = search.casefold()
        numbered = [(number, row) for number, row in numbered if any(wanted in text for text in _texts(row))]
    return {"total": len(numbered),
            "rows": [{"number": number, "row": row} for number, row in numbered[offset: offset + limit]]}


def _texts(value):
    """Every value inside `value` as casefolded text (keys left out), depth first."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif item is not None:
            yield str(item).casefold()


def update_row(path: Path, number: int, row: dict) -> None:
    """Replace row `number` (1-based) with `row`."""
    with _editing(path) as rows:
        rows[_index(number, rows)] = _settled(row, number)


def add_row(path: Path, row: dict) -> int:
    """Append `row`; its number."""
    with _editing(path) as rows:
        rows.append(_settled(row, len(rows) + 1))
        return len(rows)


def delete_row(path: Path, number: int) -> None:
    """Remove row `number` (1-based); the rows after it move up one number."""
    with _editing(path) as rows:
        del rows[_index(number, rows)]


def _index(number: int, rows: list) -> int:
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= len(rows):
        have = f"rows 1 to {len(rows)}" if rows else "no rows"
        raise UserError(f"there is no row {visible(number, 40)}: the dataset has {have}.")
    return number - 1


class _editing:
    """`with _editing(path) as rows:` the working copy's rows, written back when the block ends without an error;
    a lock beside the file makes two edits at once (two tabs, two workers) take turns instead of losing one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = exclusive(self.path.with_name(f".{self.path.name}.lock"))

    def __enter__(self) -> list[dict]:
        self.lock.__enter__()
        try:
            self.rows = read_rows(self.path)
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self.rows

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                write_rows(self.path, self.rows)
        finally:
            self.lock.__exit__(None, None, None)


# --- split, template view, export ---------------------------------------------------------------------------


def split(path: Path, train_dest: Path, val_dest: Path, val_fraction: float = 0.1, seed: int = 0) -> tuple[int, int]:
    """Write a seeded split of the dataset as two working copies; (train rows, validation rows).

    The same seed gives the same split (data.build.split_indices, the split training makes from
    data.validation_split); each side keeps the rows' order.  round(val_fraction × rows) rows are held out,
    at least one and never all."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not math.isfinite(val_fraction) \
            or not 0 < val_fraction < 1:
        raise UserError(
            f"the validation share must be a fraction between 0 and 1 (such as 0.1), not {visible(val_fraction, 40)}: "
            "0 leaves the validation set empty and 1 the training set."
        )
    rows = read_rows(path)
    if len(rows) < 2:
        raise UserError(f"splitting needs at least 2 rows, one for each side; the dataset has {len(rows)}.")
    train, held = split_indices(len(rows), float(val_fraction), seed)
    write_rows(train_dest, [rows[i] for i in train])
    write_rows(val_dest, [rows[i] for i in held])
    return len(train), len(held)


def template_view(row: dict, tokenizer, data_cfg: DataConfig | None = None) -> list[dict]:
    """How one row reads through the model's chat template: [{"text": str, "masked": bool, "cut": bool}, ...] in
    order, where masked text is what the loss ignores (system and user turns, template markup) and cut text lies
    past data.max_length, which training never sees.  Tokenised and masked by training's own code.

    Give `data_cfg` the dataset's format (check's "format") so that the row reads as its dataset does: one row
    alone may not show its format (an alpaca row without its output looks like no format at all)."""
    cfg = data_cfg or DataConfig()
    if _raw_text(row) is not None:
        raise UserError("this row is not a JSON object yet; fix its text first.")
    failures: list = []
    try:
        _fmt, samples, _kept = normalise_rows(Records([row], "this row"), cfg, failures=failures)
    except UserError as exc:
        raise UserError(str(exc)) from None
    if failures:
        raise UserError(f"this row cannot be trained on: {failures[0][1]}")
    tokenized = tokenize_sample(samples[0], tokenizer, cfg.model_copy(update={"max_length": 10**9}))
    ids, labels = tokenized.input_ids, tokenized.labels
    segments: list[dict] = []
    start = 0
    for end in range(1, len(ids) + 1):
        # a segment ends where masking changes or at max_length
        if end == len(ids) or (labels[end] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX) \
                or end == cfg.max_length:
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            segments.append({"text": text, "masked": labels[start] == IGNORE_INDEX, "cut": start >= cfg.max_length})
            start = end
    return segments


def export(path: Path, fmt: str) -> bytes:
    """The dataset as a file to download: `fmt` jsonl (a kept bad line as it was uploaded), csv (nested values
    as JSON text, which tunesmith's reader takes back) or parquet."""
    rows = read_rows(path)
    if fmt == "jsonl":
        lines = [_raw_text(row) if _raw_text(row) is not None else _readable_line(row) for row in rows]
        return "".join(line + "\n" for line in lines).encode("utf-8")
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"a dataset downloads as {', '.join(EXPORT_FORMATS)}, not {visible(fmt, 40)}.")
    raw = [number for number, row in enumerate(rows, start=1) if _raw_text(row) is not None]
    if raw:
        listed = ", ".join(str(n) for n in raw[:5]) + (f" and {len(raw) - 5} more" if len(raw) > 5 else "")
        many = len(raw) > 1
        raise UserError(
            f"row{'s' if many else ''} {listed} {'are' if many else 'is'} still the text uploaded, not "
            f"{'JSON objects' if many else 'a JSON object'}, which a {fmt.upper()} file cannot hold; fix or delete "
            f"{'them' if many else 'it'}, or download as JSONL."
        )
    names = column_names(rows)
    return _csv_bytes(rows, names) if fmt == "csv" else _parquet_bytes(rows, names)


def _readable_line(row: dict) -> str:
    """A row as a JSONL line with its characters as they are (escaped only when text is not valid Unicode)."""
    line = json.dumps(row, ensure_ascii=False, default=str)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # half a surrogate pair
        line = json.dumps(row, ensure_ascii=True, default=str)
    return line


def _csv_bytes(rows: list[dict], names: list[str]) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(names)
    for row in rows:
        writer.writerow([_csv_cell(row.get(name)) for name in names])
    # UTF-8, with lone surrogates (which the checks name) escaped rather than failing the download
    return out.getvalue().encode("utf-8", errors="backslashreplace")


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _parquet_bytes(rows: list[dict], names: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Every column by name: from_pylist would take the columns of the first row only.
    try:
        table = pa.table({name: [row.get(name) for row in rows] for name in names})
    except UnicodeEncodeError:
        raise UserError(
            "a row holds half of a surrogate pair (a \\ud800-style escape), which a Parquet file cannot hold; "
            "fix the rows the checks name, or download as JSONL."
        ) from None
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        mixed = next((name for name in names if len({_kind(row[name]) for row in rows if row.get(name) is not None})
                      > 1), None)
        where = f"the column {visible_names([mixed])} holds" if mixed else "a column holds"
        raise UserError(
            f"{where} values of different kinds (such as text in one row and a number in another), and a Parquet "
            "column holds one kind; make them the same, or download as JSONL."
        ) from None
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


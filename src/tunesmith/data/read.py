"""Reading data files (JSON, JSONL, CSV, Parquet) into rows that remember where they came from.

Every reader returns `Records`: a list of dicts that also knows its file and each
row's 1-based number (the line number for JSONL, the data row number for the
others), so that later steps can say "data.jsonl, line 7: ..." about a bad row.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from tunesmith.errors import UserError

READABLE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".pq")


class Records(list):
    """Rows read from one file, with `path`, `row_numbers` (1-based) and `unit` ("line" or "row").

    Slicing keeps the row numbers, so `records[:100]` still points at the right lines.
    """

    def __init__(
        self, rows=(), path: str | Path | None = None, row_numbers: list[int] | None = None, unit: str = "row"
    ):
        super().__init__(rows)
        self.path = str(path) if path is not None else "data"
        self.row_numbers = list(row_numbers) if row_numbers is not None else list(range(1, len(self) + 1))
        self.unit = unit

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Records(list.__getitem__(self, index), self.path, self.row_numbers[index], self.unit)
        return list.__getitem__(self, index)

    def label(self, i: int) -> str:
        """Row `i` (0-based index) in words, without the file: 'line 7'."""
        return f"{self.unit} {self.row_numbers[i]}"

    def where(self, i: int) -> str:
        """Where row `i` (0-based index) is, in words: 'data.jsonl, line 7'."""
        return f"{self.path}, {self.label(i)}"


def where(records, i: int, path: str | Path | None = None) -> str:
    """'file, line N' for row `i` of any list of rows (plain lists count rows from 1)."""
    if isinstance(records, Records):
        return records.where(i)
    return f"{path if path is not None else 'data'}, row {i + 1}"


def read_records(path: str | Path) -> Records:
    """Read a JSON, JSONL, CSV or Parquet file into a list of row dicts (see `Records`)."""
    return _read(Path(path), problems=None)


def _read(path: Path, problems: list[str] | None) -> Records:
    """Read `path`; with a `problems` list, bad JSONL lines are noted there and skipped instead of raised."""
    if not path.exists():
        raise UserError(f"{path}: no such file; check the path (relative paths start from {Path.cwd()}).")
    if path.is_dir():
        raise UserError(f"{path} is a folder; give the path of a JSON, JSONL, CSV or Parquet file inside it.")
    suffix = path.suffix.lower()
    if suffix not in READABLE_SUFFIXES:
        raise UserError(
            f"{path}: tunesmith reads .json, .jsonl, .csv and .parquet files, not "
            f"{suffix or 'files without an extension'}; convert the file to one of these, "
            "or rename it if it already is one."
        )
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; put your rows in it (one JSON object per line for .jsonl).")
    if suffix in (".parquet", ".pq"):
        records = _read_parquet(path)
    else:
        text = _read_text(path)
        if not text.strip():
            raise UserError(
                f"{path} holds only blank space; put your rows in it (one JSON object per line for .jsonl)."
            )
        if suffix in (".jsonl", ".ndjson"):
            records = _parse_jsonl(text, path, problems)
        elif suffix == ".json":
            records = _parse_json(text, path, problems)
        else:
            records = _parse_csv(text, path, delimiter="\t" if suffix == ".tsv" else ",")
    if not records and not problems:
        raise UserError(f"{path} holds no rows; add at least one row of data.")
    return records


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet programs put at the start of CSV files.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: byte {exc.start} is not UTF-8 text; save the file as UTF-8 "
            "(most editors offer it under 'Save as')."
        ) from None


def _kind(value) -> str:
    """A JSON value's kind in words, for error messages."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return "an object"


def _parse_jsonl(text: str, path: Path, problems: list[str] | None) -> Records:
    rows, numbers = [], []
    # split("\n"), not splitlines(): JSON text may hold raw U+2028 and similar characters inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            message = (
                f"{path}, line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "fix or remove that line (each line must be one complete JSON object)."
            )
            if problems is None:
                raise UserError(message) from None
            problems.append(message)
            continue
        if not isinstance(row, dict):
            message = (
                f"{path}, line {number}: holds {_kind(row)}, not a JSON object; each line must be one object "
                'such as {"prompt": "...", "completion": "..."}.'
            )
            if problems is None:
                raise UserError(message)
            problems.append(message)
            continue
        rows.append(row)
        numbers.append(number)
    return Records(rows, path, numbers, unit="line")


def _parse_json(text: str, path: Path, problems: list[str] | None) -> Records:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # Many tools (e.g. datasets' to_json) write one object per line into a .json file.
            try:
                return _parse_jsonl(text, path, problems=None)
            except UserError:
                pass
        raise UserError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); fix the file there."
        ) from None
    if isinstance(data, dict):
        data = _rows_inside_object(data, path)
    if not isinstance(data, list):
        raise UserError(
            f"{path}: holds {_kind(data)}; a .json data file must hold a list of row objects [{{...}}, ...]."
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(
                f"{path}, row {i + 1}: holds {_kind(row)}, not an object; every item of the list must be an object "
                'such as {"instruction": "...", "output": "..."}.'
            )
    return Records(data, path, unit="row")


def _rows_inside_object(data: dict, path: Path) -> list:
    """The one list of rows inside an object such as {"data": [...]} (a common export shape)."""
    lists = [key for key, value in data.items() if isinstance(value, list)]
    if len(lists) == 1:
        return data[lists[0]]
    if not lists:
        raise UserError(
            f"{path}: holds one object with the keys {', '.join(map(repr, data))} and no list of rows; "
            'put the rows in a top-level list [{...}, {...}] or under one key such as {"data": [...]}.'
        )
    raise UserError(
        f"{path}: holds several lists ({', '.join(map(repr, lists))}), so it is unclear which holds the rows; "
        "keep only the list of rows, or make the file a top-level list [{...}, {...}]."
    )


def _parse_csv(text: str, path: Path, delimiter: str) -> Records:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path} holds no rows; add a header line and at least one row.") from None
    header = [name.strip() for name in header]
    if any(not name for name in header):
        raise UserError(f"{path}: the header line has an empty column name; give every column a name.")
    rows, numbers = [], []
    try:
        for number, cells in enumerate(reader, start=1):
            if not any(cell.strip() for cell in cells):
                continue  # blank line
            if len(cells) > len(header):
                raise UserError(
                    f"{path}, row {number}: has {len(cells)} cells but the header names {len(header)} columns; "
                    "put double quotes around cells that contain the separator."
                )
            # A short row leaves its last fields out (missing), rather than turning them into "".
            rows.append(dict(zip(header, cells)))
            numbers.append(number)
    except csv.Error as exc:
        raise UserError(f"{path}: not valid CSV near row {reader.line_num} ({exc}); check its quotes.") from None
    return Records(rows, path, numbers, unit="row")


def _read_parquet(path: Path) -> Records:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
        raise UserError(
            f"{path}: not a readable Parquet file ({exc}); write it again with pandas or pyarrow."
        ) from None
    return Records(table.to_pylist(), path, unit="row")

"""Reading data files (JSON, JSONL, CSV, Parquet) into rows that remember where they came from.

Every reader returns `Records`: a list of dicts that also knows its file and each
row's 1-based number (the line number for JSONL, the data row number for the
others), so that later steps can say "data.jsonl, line 7: ..." about a bad row.

Whatever the file turns out to be (a folder, a named pipe, a device, binary data,
another encoding, JSON nested ten thousand deep), reading it ends in rows or in a
`UserError` that names the file, the line and what to do; it never blocks: the
path is looked at with `os.stat` before anything opens it.  Data text quoted in
those sentences goes through `visible`, so a row cannot drive the terminal.
"""

from __future__ import annotations

import codecs
import csv
import errno
import io
import json
import numbers
import os
import stat
import sys
from pathlib import Path

from tunesmith.errors import UserError, visible, visible_names
from tunesmith.fileio import declared_codec

READABLE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".pq")
_FILE_KINDS = "a JSON, JSONL, CSV or Parquet file"


class Records(list):
    """Rows read from one file, with `path`, `row_numbers` (1-based) and `unit` ("line" or "row").

    Rows read from a folder of several files (data/sources.py: shards) also know each row's own file
    (`row_paths`), and their numbers count within that file.  Slicing keeps the row numbers (and files),
    so `records[:100]` still points at the right lines.
    """

    def __init__(
        self, rows=(), path: str | Path | None = None, row_numbers: list[int] | None = None, unit: str = "row",
        row_paths: list[str] | None = None,
    ):
        super().__init__(rows)
        self.path = str(path) if path is not None else "data"
        self.row_numbers = list(row_numbers) if row_numbers is not None else list(range(1, len(self) + 1))
        self.unit = unit
        self.row_paths = list(row_paths) if row_paths is not None else None

    def __getitem__(self, index):
        if isinstance(index, slice):
            paths = self.row_paths[index] if self.row_paths is not None else None
            return Records(list.__getitem__(self, index), self.path, self.row_numbers[index], self.unit, paths)
        return list.__getitem__(self, index)

    def label(self, i: int) -> str:
        """Row `i` (0-based index) in words, without the file: 'line 7'."""
        return f"{self.unit} {self.row_numbers[i]}"

    def where(self, i: int) -> str:
        """Where row `i` (0-based index) is, in words: 'data.jsonl, line 7'."""
        path = self.row_paths[i] if self.row_paths is not None else self.path
        return f"{visible(path, None)}, {self.label(i)}"


def where(records, i: int, path: str | Path | None = None) -> str:
    """'file, line N' for row `i` of any list of rows (plain lists count rows from 1)."""
    if isinstance(records, Records):
        return records.where(i)
    return f"{visible(path if path is not None else 'data', None)}, row {i + 1}"


def read_records(path: str | Path) -> Records:
    """Read a JSON, JSONL, CSV or Parquet file into a list of row dicts (see `Records`)."""
    return _read(Path(path), problems=None)


def read_records_keeping_bad_lines(path: str | Path) -> tuple[Records, list[tuple[int, str, str]]]:
    """Like `read_records`, but a JSONL line that is not a JSON object does not stop the reading: it comes back
    as (line number, the line's text, what is wrong with it and what to do), for an editor that lets the user
    fix it (the studio's dataset page).  Every other problem with the file is a UserError, as for read_records."""
    bad_lines: list[tuple[int, str, str]] = []
    records = _read(Path(path), problems=[], bad_lines=bad_lines)
    return records, bad_lines


def check_data_file(path: str | Path) -> None:
    """Raise a UserError that says what `path` is unless it is a regular file (symbolic links followed).

    Only `os.stat` looks at it, so a named pipe or a device is refused without being opened (opening a
    pipe waits for a writer, reading a device may never end)."""
    name = visible(path, None)
    try:
        info = os.stat(path)
    except ValueError:  # a NUL character in the path
        raise UserError(f"{name}: a path cannot hold a NUL character; check how the path was written.") from None
    except OSError as exc:
        raise UserError(_unreachable(Path(path), name, exc)) from None
    mode = info.st_mode
    if stat.S_ISREG(mode):
        return
    instead = f"give the path of {_FILE_KINDS}"
    if stat.S_ISDIR(mode):
        raise UserError(f"{name} is a folder; {instead} inside it.")
    if stat.S_ISFIFO(mode):
        what = "a named pipe (FIFO), whose data can be read only once and only while something writes to it"
    elif stat.S_ISSOCK(mode):
        what = "a socket"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        what = "a device"
    else:
        what = "not a regular file"
    raise UserError(f"{name} is {what}, not a data file; save the data to a file first and {instead}.")


def _unreachable(path: Path, name: str, exc: OSError) -> str:
    """The sentence for a path that `os.stat` could not follow to a file."""
    fix = f"give the path of {_FILE_KINDS}"
    if exc.errno == errno.ENOENT:
        if path.is_symlink():
            target = visible(os.readlink(path), None)
            return f"{name} is a link to {target}, which does not exist; point the link at the data file or {fix}."
        looked = "" if path.is_absolute() else f" (looked for {visible(path.absolute(), None)})"
        return (
            f"{name} does not exist{looked}; check the path: relative paths start from the folder you run "
            "tunesmith from."
        )
    if exc.errno == errno.ELOOP:
        return f"{name} is a symbolic link that leads back to itself (a link loop); {fix} itself."
    if exc.errno == errno.ENOTDIR:
        return f"{name} does not exist: a part of the path before the file name is a file, not a folder; {fix}."
    if exc.errno == errno.ENAMETOOLONG:
        return f"{visible(path, 120)}: the path is too long for this system; move or rename the file."
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{name} cannot be reached: a folder on the way to it does not let you in; check its permissions."
    return f"{name} cannot be read ({exc.strerror or exc}); check the path, or copy the file somewhere readable."


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        reason = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) else exc.strerror or str(exc)
        raise UserError(
            f"{visible(path, None)} cannot be read ({reason}); check that you may read it (ls -l shows who may), "
            "or copy it somewhere you can."
        ) from None


def _read(path: Path, problems: list[str] | None, bad_lines: list[tuple[int, str, str]] | None = None) -> Records:
    """Read `path`; with a `problems` list, bad JSONL lines are noted there and skipped instead of raised
    (and, with `bad_lines` too, kept there as (line number, text, what is wrong))."""
    check_data_file(path)
    name = visible(path, None)
    suffix = path.suffix.lower()
    if suffix not in READABLE_SUFFIXES:
        raise UserError(
            f"{name}: tunesmith reads .json, .jsonl, .csv and .parquet files, not "
            f"{visible(suffix, 40) or 'files without an extension'}; convert the file to one of these, "
            "or rename it if it already is one."
        )
    data = _read_bytes(path)
    if not data:
        raise UserError(f"{name} is empty; put your rows in it (one JSON object per line for .jsonl).")
    if suffix in (".parquet", ".pq"):
        records = _read_parquet(data, path)
    else:
        text = _decode(data, path)
        if not text.strip():
            raise UserError(
                f"{name} holds only blank space; put your rows in it (one JSON object per line for .jsonl)."
            )
        if suffix in (".jsonl", ".ndjson"):
            records = _parse_jsonl(text, path, problems, bad_lines)
        elif suffix == ".json":
            records = _parse_json(text, path, problems)
        else:
            records = _parse_csv(text, path, delimiter="\t" if suffix == ".tsv" else ",")
    if not records and not problems:
        raise UserError(f"{name} holds no rows; add at least one row of data.")
    return records


# What the first bytes of a file say it is, for a binary file given a text name.
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed; decompress it (gunzip) first"),
    (b"PK\x03\x04", "a ZIP archive (or an Excel workbook); unpack it, or export the sheet as CSV"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed; decompress it (unzstd) first"),
    (b"\xfd7zXZ\x00", "xz-compressed; decompress it (unxz) first"),
)


def _decode(data: bytes, path: Path) -> str:
    """The file's text: UTF-8 (a leading byte-order mark dropped), or UTF-16/32 when a byte-order mark says so."""
    name = visible(path, None)
    encoding = declared_codec(data)
    if encoding in ("utf-16", "utf-32"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{name}: starts with a {encoding.upper()} byte-order mark, but byte {exc.start} is not "
                f"{encoding.upper()} text; save the file as UTF-8."
            ) from None
    if data.startswith(b"PAR1") and data.endswith(b"PAR1"):
        raise UserError(f"{name} is not text: it is a Parquet file; name it .parquet.")
    for magic, what in _MAGIC:
        if data.startswith(magic):
            raise UserError(f"{name} is not text: it is {what}.")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise UserError(
            f"{name}, line {_line_of(data, nul)}: byte {nul} is a NUL (zero) byte, which text never "
            "holds; the file is binary, or UTF-16 text without a byte-order mark; save it as UTF-8 text "
            "(or give a binary Parquet file the .parquet extension)."
        )
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet programs put at the start of CSV files.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if data.startswith(codecs.BOM_UTF8) else 0)
        raise UserError(
            f"{name}, line {_line_of(data, start)}: byte {start} (0x{data[start]:02x}) is not UTF-8 "
            "text; the file is probably in another encoding (such as Latin-1 or Windows-1252) or binary; "
            "save it as UTF-8 (most editors offer it under 'Save as')."
        ) from None


def _line_of(data: bytes, offset: int) -> int:
    """The 1-based line that byte `offset` of `data` is on."""
    return data.count(b"\n", 0, offset) + 1


class JSONTextError(ValueError):
    """Text that `json.loads` could not read: `reason` is a phrase for a sentence; for a syntax error, `syntax`
    is the parser's own words and `line`/`column` where it stopped."""

    def __init__(self, reason: str, syntax: str | None = None, line: int | None = None, column: int | None = None):
        super().__init__(reason)
        self.reason, self.syntax, self.line, self.column = reason, syntax, line, column


def loads_json(text: str):
    """`json.loads`, with each way it fails (bad syntax, nesting deeper than Python recurses, a number too
    long to convert) turned into one `JSONTextError`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JSONTextError(f"not valid JSON ({exc.msg})", exc.msg, exc.lineno, exc.colno) from None
    except RecursionError:
        deep = "nested too deeply to read (lists or objects hundreds of levels inside each other)"
        raise JSONTextError(deep) from None
    except ValueError:  # int() refuses numbers longer than sys.get_int_max_str_digits()
        raise JSONTextError(
            f"holds a number longer than {sys.get_int_max_str_digits()} digits, too long to read "
            "(put it in quotes to keep it as text)"
        ) from None


def _kind(value) -> str:
    """A JSON (or Parquet) value's kind in words, for error messages."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, numbers.Number):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    return f"a {type(value).__name__} value"


class JSONLineError(ValueError):
    """A JSONL line that is not one JSON object; its text says what is wrong and what to do, without the place."""


def parse_jsonl_line(line: str) -> dict:
    """The JSON object on one line of a JSONL file; a `JSONLineError` otherwise."""
    try:
        row = loads_json(line)
    except JSONTextError as exc:
        reason = exc.reason if exc.syntax is None else f"not valid JSON ({exc.syntax} at column {exc.column})"
        raise JSONLineError(
            f"{reason}; fix or remove that line (each line must be one complete JSON object)."
        ) from None
    if not isinstance(row, dict):
        raise JSONLineError(
            f"holds {_kind(row)}, not a JSON object; each line must be one object "
            'such as {"prompt": "...", "completion": "..."}.'
        )
    return row


def _parse_jsonl(
    text: str, path: Path, problems: list[str] | None, bad_lines: list[tuple[int, str, str]] | None = None
) -> Records:
    name = visible(path, None)
    rows, line_numbers = [], []
    # split("\n"), not splitlines(): JSON text may hold raw U+2028 and similar characters inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = parse_jsonl_line(line)
        except JSONLineError as exc:
            message = f"{name}, line {number}: {exc}"
            if problems is None:
                raise UserError(message) from None
            problems.append(message)
            if bad_lines is not None:
                bad_lines.append((number, line, str(exc)))
            continue
        rows.append(row)
        line_numbers.append(number)
    return Records(rows, path, line_numbers, unit="line")


def _parse_json(text: str, path: Path, problems: list[str] | None) -> Records:
    name = visible(path, None)
    try:
        data = loads_json(text)
    except JSONTextError as exc:
        if exc.syntax == "Extra data":
            # Many tools (e.g. datasets' to_json) write one object per line into a .json file.
            try:
                return _parse_jsonl(text, path, problems=None)
            except UserError:
                pass
        if exc.syntax is not None:
            reason = f"not valid JSON at line {exc.line}, column {exc.column} ({exc.syntax})"
        else:
            reason = exc.reason
        raise UserError(f"{name}: {reason}; fix the file there.") from None
    if isinstance(data, dict):
        data = _rows_inside_object(data, path)
    if not isinstance(data, list):
        raise UserError(
            f"{name}: holds {_kind(data)}; a .json data file must hold a list of row objects [{{...}}, ...]."
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(
                f"{name}, row {i + 1}: holds {_kind(row)}, not an object; every item of the list must be an object "
                'such as {"instruction": "...", "output": "..."}.'
            )
    return Records(data, path, unit="row")


def _rows_inside_object(data: dict, path: Path) -> list:
    """The one list of rows inside an object such as {"data": [...]} (a common export shape)."""
    name = visible(path, None)
    lists = [key for key, value in data.items() if isinstance(value, list)]
    if len(lists) == 1:
        return data[lists[0]]
    shape = 'put the rows in a top-level list [{...}, {...}] or under one key such as {"data": [...]}'
    if not data:
        raise UserError(f"{name}: holds an empty object {{}}; {shape}.")
    if not lists:
        raise UserError(f"{name}: holds one object with the keys {visible_names(data)} and no list of rows; {shape}.")
    raise UserError(
        f"{name}: holds several lists ({visible_names(lists)}), so it is unclear which holds the rows; "
        "keep only the list of rows, or make the file a top-level list [{...}, {...}]."
    )


def _parse_csv(text: str, path: Path, delimiter: str) -> Records:
    name = visible(path, None)
    limit = csv.field_size_limit()
    # The csv module refuses cells over 128 KiB by default; a long document in one cell is still data.
    csv.field_size_limit(2**31 - 1)
    try:
        return _csv_rows(text, path, name, delimiter)
    finally:
        csv.field_size_limit(limit)


def _csv_rows(text: str, path: Path, name: str, delimiter: str) -> Records:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{name} holds no rows; add a header line and at least one row.") from None
    except csv.Error as exc:
        raise UserError(f"{name}: the header line is not valid CSV ({visible(exc)}); check its quotes.") from None
    header = [column.strip() for column in header]
    if any(not column for column in header):
        raise UserError(f"{name}: the header line has an empty column name; give every column a name.")
    twice = sorted({column for column in header if header.count(column) > 1})
    if twice:
        raise UserError(
            f"{name}: the header line names the column {visible_names(twice)} more than once; "
            "give every column its own name."
        )
    rows, line_numbers = [], []
    try:
        for number, cells in enumerate(reader, start=1):
            if not any(cell.strip() for cell in cells):
                continue  # blank line
            if len(cells) > len(header):
                raise UserError(
                    f"{name}, row {number}: has {len(cells)} cells but the header names {len(header)} columns; "
                    "put double quotes around cells that contain the separator."
                )
            # A short row leaves its last fields out (missing), rather than turning them into "".
            rows.append(dict(zip(header, cells)))
            line_numbers.append(number)
    except csv.Error as exc:
        raise UserError(
            f"{name}: not valid CSV near line {reader.line_num} ({visible(exc)}); check its quotes."
        ) from None
    return Records(rows, path, line_numbers, unit="row")


def _read_parquet(data: bytes, path: Path) -> Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
        raise UserError(
            f"{visible(path, None)}: not a readable Parquet file ({visible(exc)}); write it again with pandas "
            "or pyarrow, or give a text file its real extension (.jsonl, .json, .csv)."
        ) from None
    return Records(rows, path, unit="row")

"""`tunesmith data inspect FILE`: what a data file holds and what is wrong with it, before training on it.

Unlike training, which stops at the first bad row, inspection collects the problems
(up to MAX_PROBLEMS sentences, then a count) so one look shows them all.  The file's own
text reaches the terminal only through `visible` (control characters as escapes, long
values cut), and the problem sentences are built the same way.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from tunesmith.config import DataConfig
from tunesmith.data.build import has_trained_tokens, percentiles
from tunesmith.data.formats import (
    answer_column,
    column_names,
    control_token_in,
    control_tokens,
    has_blank_answer,
    normalise_rows,
)
from tunesmith.data.preference import detect_preference_format, pair_samples
from tunesmith.data.read import Records, _read, visible, visible_names
from tunesmith.data.sources import about_source, named_source, needs_source_reader, read_path, source_config, source_key
from tunesmith.data.tokens import tokenize_sample
from tunesmith.errors import UserError

MAX_PROBLEMS = 20
_SHOWN_MESSAGES = 8  # messages of the example conversation printed
_SHOWN_PLACES = 5  # rows named in a summary sentence such as "3 rows have an empty answer (...)"


def _places(places: list[str]) -> str:
    shown = ", ".join(places[:_SHOWN_PLACES])
    return shown + (f" and {len(places) - _SHOWN_PLACES} more" if len(places) > _SHOWN_PLACES else "")


def _rows(n: int) -> str:
    return f"{n} row" + ("" if n == 1 else "s")


def inspect_file(path: str | Path, tokenizer=None, cfg: DataConfig | None = None) -> dict:
    """A report on one data file: format, rows, columns, token lengths (with a tokenizer) and problems.

    `path` may also be anything a data source reads (a save_to_disk or shards folder, an .arrow file, a hub id);
    when it is one of cfg.sources, that source's format, columns, system prompt and split apply."""
    cfg = cfg or DataConfig()
    named = named_source(str(path), cfg)
    if named is not None:
        cfg = source_config(cfg, named[1])
    row_problems: list[str] = []
    if needs_source_reader(str(path)):
        with about_source(source_key(named[0])) if named is not None else contextlib.nullcontext():
            records = read_path(str(path), named[1].split if named is not None else "train")
    else:
        records = _read(Path(path), problems=row_problems)  # bad JSONL lines are noted, not raised
    path = Path(path)
    bad_lines = len(row_problems)
    report: dict = {
        "path": str(path),
        "format": None,
        "rows": len(records) + bad_lines,
        "valid_rows": 0,
        "malformed_rows": bad_lines,
        "columns": column_names(records),
        "duplicates": 0,
        "empty_answers": 0,
        "token_lengths": None,
        "max_length": cfg.max_length,
        "truncated": None,
        "untrainable": None,
        "example": None,
        "problems": [],
    }
    if named is not None:
        report["source"] = source_key(named[0])  # read with that source's settings
    if _preference_format(records, cfg) is not None:  # pairs or KTO rows (objective dpo, kto, ...)
        return _inspect_preferences(report, records, cfg, path, row_problems)
    try:
        fmt, samples, kept = normalise_rows(records, cfg, path, problems=row_problems)
    except UserError as exc:  # no recognisable format, or data.columns names a missing column
        report["problems"] = _capped(row_problems) + [str(exc)]
        return report
    report.update(
        format=fmt, valid_rows=len(samples), malformed_rows=len(row_problems), example=samples[0] if samples else None
    )
    problems = _capped(row_problems)
    places = [records.label(i) for i in kept]  # 'line 7': the file is named at the top of the report

    empty = [places[j] for j, s in enumerate(samples) if has_blank_answer(s)]
    report["empty_answers"] = len(empty)
    if empty:
        what = "an empty text" if fmt == "text" else "an empty answer"
        verb = "has" if len(empty) == 1 else "have"
        problems.append(
            f"{_rows(len(empty))} {verb} {what} or only blank space ({_places(empty)}); training leaves "
            f"{'it' if len(empty) == 1 else 'them'} out; fill or remove {'it' if len(empty) == 1 else 'them'}."
        )

    repeats = _duplicates(records)
    report["duplicates"] = len(repeats)
    if repeats:
        examples = [f"{records.label(i)} repeats {records.label(first)}" for i, first in repeats]
        problems.append(
            f"{_rows(len(repeats))} {'is an exact duplicate' if len(repeats) == 1 else 'are exact duplicates'} of "
            f"earlier rows ({_places(examples)}); duplicates weigh those rows more in training."
        )

    if tokenizer is not None and samples:
        tokens = control_tokens(tokenizer)
        holding = [f"{places[j]}: {visible(token, 40)}" for j, s in enumerate(samples)
                   if (token := control_token_in(s, tokens))]
        report["control_token_rows"] = len(holding)
        if holding:
            problems.append(
                f"{_rows(len(holding))} {'holds' if len(holding) == 1 else 'hold'} the tokenizer's control tokens "
                f"({_places(holding)}), which the model would read as turn boundaries; training leaves "
                f"{'it' if len(holding) == 1 else 'them'} out; remove those tokens."
            )
        _measure_tokens(report, problems, samples, places, tokenizer, cfg)
    report["problems"] = problems
    return report


def _preference_format(records, cfg: DataConfig) -> str | None:
    """The preference format the rows are in (prompt/chosen/rejected, chosen/rejected conversations, or KTO's
    prompt/completion/label), or None for everything else."""
    try:
        return detect_preference_format(records, cfg.columns)
    except UserError:
        return None


def _inspect_preferences(report: dict, records, cfg: DataConfig, path: Path, problems: list[str]) -> dict:
    """The report for preference data: what training with a preference objective reads, and the first bad row."""
    report["preference"] = True
    try:
        fmt, samples, kept = pair_samples(records, cfg, path)
    except UserError as exc:  # the first malformed row stops `tunesmith train`; say which
        report.update(format=detect_preference_format(records, cfg.columns),
                      problems=_capped(problems) + [str(exc)])
        return report
    report.update(format=fmt, valid_rows=len(samples), malformed_rows=len(problems),
                  example=samples[0] if samples else None)
    left = len(records) - len(samples)
    notes = _capped(problems)
    if left:
        notes.append(f"{_rows(left)} would be left out (answers that are empty, or conversations that differ before "
                     "their last reply); `tunesmith train` names them in a warning.")
    report["problems"] = notes
    return report


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS:
        return list(problems)
    return problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more malformed rows like these."]


def _duplicates(records) -> list[tuple[int, int]]:
    """(row index, index of the earlier identical row) for every row that repeats an earlier one."""
    first_seen: dict[str, int] = {}
    repeats = []
    for i, record in enumerate(records):
        try:
            key = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
        except (RecursionError, ValueError):  # nested deeper than json.dumps goes; such a row counts as unique
            continue
        if key in first_seen:
            repeats.append((i, first_seen[key]))
        else:
            first_seen[key] = i
    return repeats


def _measure_tokens(report: dict, problems: list[str], samples, places, tokenizer, cfg: DataConfig) -> None:
    """Token lengths before truncation, and how many rows max_length would cut or leave with nothing to train on."""
    uncut = cfg.model_copy(update={"max_length": 10**9})
    lengths, truncated, untrainable, refused = [], [], [], []
    for sample, place in zip(samples, places):
        try:
            length, trainable = _measure(sample, tokenizer, uncut, cfg.max_length)
        except UserError as exc:  # e.g. the chat template refuses the conversation
            refused.append(f"{visible(report['path'], None)}, {place}: {exc}")
            continue
        lengths.append(length)
        if length > cfg.max_length:
            truncated.append(place)
            if not trainable:
                untrainable.append(place)
    problems.extend(_capped(refused))
    report["token_lengths"] = percentiles(lengths)
    report["truncated"] = len(truncated)
    report["untrainable"] = len(untrainable)
    if untrainable:
        problems.append(
            f"{_rows(len(untrainable))} would have no answer tokens left at data.max_length={cfg.max_length} "
            f"({_places(untrainable)}) and would be dropped; raise data.max_length or shorten those prompts."
        )


def _measure(sample: dict, tokenizer, uncut: DataConfig, max_length: int) -> tuple[int, bool]:
    """(tokens in the sample before truncation, whether any answer token is left at `max_length`); `uncut` is the
    data config with a max_length nothing reaches.  A UserError when the chat template refuses the sample."""
    row = tokenize_sample(sample, tokenizer, uncut)
    length = len(row.input_ids)
    row.labels = row.labels[:max_length]
    return length, has_trained_tokens(row)


def row_problems(records: Records, tokenizer=None, cfg: DataConfig | None = None) -> dict:
    """The checks of `inspect_file`, each finding tied to one row and the column it is in, for an editor that
    lists every bad row (the studio's dataset page).

    Returns {"format": the detected format or None, "valid_rows": rows that read as a sample,
    "problems": [{"row": the row's number (None: the whole file), "field": the column or None,
    "message": "row 3: ..."}] in row order, "token_lengths": [tokens of each row the template took, uncut]}.
    The rules are inspect_file's own; only the wording is per row where inspect_file sums up, and every
    problem is listed (inspect_file lists MAX_PROBLEMS malformed rows).
    """
    cfg = cfg or DataConfig()
    found: list[dict] = []

    def note(i: int, field: str | None, text: str) -> None:
        found.append({"row": records.row_numbers[i], "field": field, "message": f"{records.label(i)}: {text}"})

    failures: list = []
    try:
        fmt, samples, kept = normalise_rows(records, cfg, failures=failures)
    except UserError as exc:  # no recognisable format, or data.columns names a missing column
        whole = {"row": None, "field": None, "message": str(exc)}
        return {"format": None, "valid_rows": 0, "problems": [whole], "token_lengths": []}
    for i, exc in failures:
        note(i, exc.field, str(exc))

    answer = answer_column(fmt, records, cfg)
    what = "an empty text" if fmt == "text" else "an empty answer"
    for sample, i in zip(samples, kept):
        if has_blank_answer(sample):
            note(i, answer, f"has {what} or only blank space; training leaves it out; fill or remove it.")
    for i, first in _duplicates(records):
        note(i, None, f"is an exact duplicate of {records.label(first)}; duplicates weigh that row more in training.")

    lengths: list[int] = []
    if tokenizer is not None:
        tokens = control_tokens(tokenizer)
        uncut = cfg.model_copy(update={"max_length": 10**9})
        for sample, i in zip(samples, kept):
            if token := control_token_in(sample, tokens):
                note(i, _column_holding(records[i], token),
                     f"holds the tokenizer's control token {visible(token, 40)}, which the model would read as a "
                     "turn boundary; training leaves it out; remove that token.")
            try:
                length, trainable = _measure(sample, tokenizer, uncut, cfg.max_length)
            except UserError as exc:  # e.g. the chat template refuses the conversation
                note(i, None, str(exc))
                continue
            lengths.append(length)
            if not trainable:
                note(i, None, f"would have no answer tokens left at data.max_length={cfg.max_length} and would be "
                              "dropped; raise data.max_length or shorten its prompt.")
    found.sort(key=lambda problem: problem["row"])  # stable: one row's findings keep the order above
    return {"format": fmt, "valid_rows": len(samples), "problems": found, "token_lengths": lengths}


def _column_holding(record: dict, text: str) -> str | None:
    """The first column whose value (or any text nested in it) holds `text`; None when none does (the system
    prompt from the config, say)."""

    def holds(value) -> bool:
        if isinstance(value, str):
            return text in value
        if isinstance(value, dict):
            return any(holds(v) for v in value.values())
        if isinstance(value, list):
            return any(holds(v) for v in value)
        return False

    try:
        return next((key for key, value in record.items() if holds(value)), None)
    except RecursionError:  # a column nested deeper than Python recurses
        return None


def format_inspection(report: dict) -> str:
    """The report as text for the terminal."""
    lines = [visible(report["path"], None) + (f" (read as {report['source']})" if report.get("source") else "")]
    lines.append(f"  format:   {report['format'] or 'not recognised'}")
    rows = f"  rows:     {report['rows']}"
    if report["malformed_rows"]:
        rows += f" ({report['valid_rows']} usable, {report['malformed_rows']} malformed)"
    lines.append(rows)
    lines.append(f"  columns:  {visible_names(report['columns']) or 'none'}")
    lengths = report.get("token_lengths")
    if lengths:
        lines.append(
            f"  tokens:   p50 {lengths['p50']}, p90 {lengths['p90']}, p99 {lengths['p99']}, max {lengths['max']} "
            "(per row, as the model sees it)"
        )
        lines.append(
            f"  max_length {report['max_length']}: {_rows(report['truncated'])} would be truncated, "
            f"{report['untrainable']} would have nothing left to train on"
        )
    elif report.get("preference"):
        lines.append("  tokens:   not counted for preference data (`tunesmith train` logs the lengths and truncation)")
    else:
        lines.append("  tokens:   not counted (give a model to count tokens)")
    if report.get("example"):
        lines.append("  first row as tunesmith reads it:")
        for line in _describe_sample(report["example"]):
            lines.append("    " + line)
    if report["problems"]:
        lines.append("problems:")
        lines.extend(f"  - {p}" for p in report["problems"])
    else:
        lines.append("no problems found.")
    return "\n".join(lines)


def _describe_sample(sample: dict, width: int = 100) -> list[str]:
    if "prompt" in sample:  # preference data: the prompt's messages, then each answer
        lines = [f"{m['role']}: {visible(m['content'], width)}" for m in sample["prompt"][-_SHOWN_MESSAGES:]]
        lines += [f"{key}: {visible(str(sample[key]), width)}" for key in ("chosen", "rejected", "completion", "label")
                  if key in sample]
        return lines
    if "text" in sample:
        return [f"text: {visible(sample['text'], width)}"]
    messages = sample["messages"]
    lines = [f"{m['role']}: {visible(m['content'], width)}" for m in messages[:_SHOWN_MESSAGES]]
    if len(messages) > _SHOWN_MESSAGES:
        lines.append(f"... and {len(messages) - _SHOWN_MESSAGES} more messages")
    return lines

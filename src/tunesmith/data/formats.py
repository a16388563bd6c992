"""Data formats → one row shape.

Every row becomes either a conversation or a plain text:

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}   # chat-like formats
    {"text": str}                                                                    # continued pre-training

Formats and the fields they need (after `data.columns` renames the file's columns):

    alpaca             instruction, output, optional input  (user = instruction + "\\n\\n" + input)
    messages           messages: [{role, content}, ...]      (OpenAI style)
    sharegpt           conversations: [{from, value}, ...]   (from: human/user, gpt/assistant/model, system)
    prompt_completion  prompt, completion  (or question, answer)
    text               text

Chat-like rows may also carry a `system` field; `data.system_prompt` is used when a
row has no system message of its own.  Detection looks at every column in the file
and takes the first format in the order above (messages first) whose fields are there.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import DataConfig
from tunesmith.data.read import JSONTextError, _kind, loads_json, visible, visible_names, where
from tunesmith.errors import UserError

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")

# The field names `data.columns` may map to (our names, not the file's).
MAPPABLE_FIELDS = (
    "instruction",
    "input",
    "output",
    "prompt",
    "completion",
    "messages",
    "conversations",
    "text",
    "system",
)

CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}

_EXPECTED = (
    "alpaca (instruction, output, optional input), messages (a `messages` list of {role, content}), "
    "sharegpt (a `conversations` list of {from, value}), prompt_completion (prompt and completion, or question "
    "and answer), text (text)"
)


class RowError(Exception):
    """What is wrong with one row; the caller puts the file and row number in front.  `field` is the file's
    column the problem is in (the column data.columns maps, when it renames one), or None."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def column_names(records) -> list[str]:
    """Every column seen in any row, in first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            seen.setdefault(key, None)
    return list(seen)


def _check_columns(columns: dict[str, str], found: list[str], path, fields: tuple = MAPPABLE_FIELDS,
                   what: str = "a field tunesmith reads", example: str = "{prompt: dialogue, completion: summary}") -> None:
    """data.columns maps only our `fields`, and only to columns the file has (preference data passes its own)."""
    unknown = [ours for ours in columns if ours not in fields]
    if unknown:
        quoted = ", ".join(f"'{visible(u, 60)}'" for u in unknown)
        raise UserError(
            f"data.columns: {quoted} is not {what}; the keys of data.columns are our field names "
            f"({', '.join(fields)}) and the values are your file's column names, e.g. {example}."
        )
    for ours, theirs in columns.items():
        if theirs not in found:
            raise UserError(
                f"data.columns maps {visible(ours, 60)} to the column '{visible(theirs, 60)}', but "
                f"{visible(path or 'the data', None)} has no such column; its columns are: {visible_names(found)}."
            )


def _mapped_names(found: list[str], columns: dict[str, str]) -> list[str]:
    """The column names as the rest of the code sees them once `columns` has renamed them."""
    renamed = set(columns.values())
    return [name for name in found if name not in renamed] + list(columns)


def _rename(record: dict, columns: dict[str, str]) -> dict:
    """A row with the file's columns renamed to our field names (a mapped column missing here stays missing)."""
    if not columns:
        return record
    row = {key: value for key, value in record.items() if key not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in record:
            row[ours] = record[theirs]
    return row


def _format_from_names(names) -> str | None:
    names = set(names)
    if "messages" in names:
        return "messages"
    if "conversations" in names:
        return "sharegpt"
    if {"instruction", "output"} <= names:
        return "alpaca"
    if {"prompt", "completion"} <= names or {"question", "answer"} <= names:
        return "prompt_completion"
    if "text" in names:
        return "text"
    return None


def detect_format(records, columns: dict[str, str] | None = None, path: str | Path | None = None) -> str:
    """Which format the rows are in, after `columns` (our field → file column) renames the columns."""
    columns = columns or {}
    path = path if path is not None else getattr(records, "path", None)
    found = column_names(records)
    _check_columns(columns, found, path)
    fmt = _format_from_names(_mapped_names(found, columns))
    if fmt is not None:
        return fmt
    hint = ""
    if {"input", "output"} <= set(found):
        hint = (
            " Your columns input and output read as prompt/completion with "
            "data.columns: {prompt: input, completion: output}."
        )
    raise UserError(
        f"{visible(path or 'the data', None)}: cannot tell the data format from its columns "
        f"({visible_names(found) or 'none'}). "
        f"tunesmith reads: {_EXPECTED}. Set data.format to one of these and map your column names to its fields "
        f"with data.columns, e.g. data.columns: {{prompt: <question column>, completion: <answer column>}}.{hint}"
    )


def _label(name: str, columns: dict[str, str]) -> str:
    """How to name a field in an error: 'field "prompt" (column "dialogue")'."""
    if name in columns and columns[name] != name:
        return f'field "{name}" (column "{visible(columns[name], 60)}")'
    return f'field "{name}"'


def _column(name: str, columns: dict[str, str]) -> str:
    """The file's column that holds our field `name`."""
    return columns.get(name, name)


def _missing(row: dict, name: str, columns: dict[str, str], fix: str) -> RowError | None:
    """The error for our field `name` when the row lacks it or holds null (`fix` says what to add), else None."""
    if row.get(name) is not None:
        return None
    state = "is null" if name in row else "is missing"
    return RowError(
        f"{_label(name, columns)} {state}; {fix}, or map the column that holds it with data.columns "
        f"(this row has: {visible_names(row) or 'no fields'}).",
        _column(name, columns),
    )


def _text_field(row: dict, name: str, columns: dict[str, str], required: bool = True) -> str | None:
    value = row.get(name)
    if value is None:
        if not required:
            return None
        raise _missing(row, name, columns, f'add "{name}" (text) to this row')
    if not isinstance(value, str):
        if _kind(value) in ("a number", "true/false"):
            fix = f'write it as text, e.g. "{visible(value, 40)}"'
        else:
            fix = "it must be text"
        raise RowError(f"{_label(name, columns)} is {_kind(value)}; {fix}.", _column(name, columns))
    _check_text(value, _label(name, columns), _column(name, columns))
    return value


def _check_text(value: str, label: str, field: str | None = None) -> None:
    """Refuse text that is not Unicode text: a lone UTF-16 surrogate, which a JSON escape such as \\ud800 can
    write but no tokenizer (and no UTF-8 file) can hold."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(
            f"{label} holds {visible(value[exc.start], None)} at character {exc.start + 1}: half of a surrogate "
            "pair, written as a \\u escape, which is not a character; write the character itself, or both "
            "halves of the pair (e.g. \\ud83d\\ude00), or remove the escape.",
            field,
        ) from None


def _answer_field(row: dict, name: str, columns: dict[str, str]) -> tuple[str, list[str] | None]:
    """(the answer to train on, every reference when the field is a list of them, else None).

    A list holds several acceptable answers (e.g. three human summaries): training uses the first,
    evaluation scores against all of them."""
    value = row.get(name)
    if isinstance(value, list):
        if not value or not all(isinstance(item, str) and item.strip() for item in value):
            raise RowError(
                f"{_label(name, columns)} is a list, which means several reference answers; each must be non-empty "
                "text, and there must be at least one.",
                _column(name, columns),
            )
        for item in value:
            _check_text(item, _label(name, columns), _column(name, columns))
        return value[0], list(value)
    return _text_field(row, name, columns), None


def _conversation(row: dict, fmt: str, columns: dict[str, str]) -> list[dict]:
    """A messages/sharegpt row's conversation as [{role, content}, ...], checked message by message."""
    name, role_key, content_key = (
        ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
    )
    allowed = CHAT_ROLES if fmt == "messages" else tuple(SHAREGPT_ROLES)
    label, column = _label(name, columns), _column(name, columns)
    shape = f'a list of {{"{role_key}": ..., "{content_key}": ...}} objects'
    value = row.get(name)
    if value is None:
        raise RowError(f"{label} is {'null' if name in row else 'missing'}; give this row {shape}.", column)
    if isinstance(value, str):
        # CSV and some Parquet files hold the conversation as JSON text in one cell.
        try:
            value = loads_json(value)
        except JSONTextError as exc:
            raise RowError(
                f"{label} is text that is not a JSON list ({exc.reason}); it must be {shape}.", column
            ) from None
    if not isinstance(value, list):
        raise RowError(f"{label} is {_kind(value)}; it must be {shape}.", column)
    if not value:
        raise RowError(
            f"{label} is an empty conversation; give it at least a user message and the assistant's reply.", column
        )
    messages = []
    for number, message in enumerate(value, start=1):
        where_here = f"{label}, message {number}"
        if not isinstance(message, dict):
            raise RowError(
                f"{where_here} is {_kind(message)}; every message must be an object with {role_key} and {content_key}.",
                column,
            )
        role = message.get(role_key)
        if not isinstance(role, str):
            state = "missing" if role_key not in message else _kind(role)
            raise RowError(f'{where_here}: "{role_key}" is {state}; use one of {", ".join(allowed)}.', column)
        role = role.strip().lower()
        if role not in allowed:
            raise RowError(
                f"{where_here}: \"{role_key}\" is '{visible(message[role_key], 60)}'; use one of {', '.join(allowed)}.",
                column,
            )
        content = message.get(content_key)
        if not isinstance(content, str):
            state = "missing" if content_key not in message else _kind(content)
            raise RowError(f'{where_here}: "{content_key}" is {state}; it must be the message text.', column)
        _check_text(content, f"{where_here}: \"{content_key}\"", column)
        messages.append({"role": role if fmt == "messages" else SHAREGPT_ROLES[role], "content": content})
    if messages[0]["role"] == "assistant":
        raise RowError(
            f"{label} starts with the assistant; a conversation must start with a system or user message.", column
        )
    if messages[-1]["role"] != "assistant":
        raise RowError(
            f"{label} ends with a {messages[-1]['role']} message; a training conversation must end with the "
            "assistant's reply, so add the reply or remove the last message.",
            column,
        )
    return messages


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    """Put `system` first unless the conversation already has a system message."""
    if not system or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system}] + messages


def _row_to_sample(row: dict, fmt: str, cfg: DataConfig, pair: tuple[str, str]) -> dict:
    """One renamed row → {"messages": [...]} or {"text": ...}; raises RowError when it is malformed."""
    columns = cfg.columns
    if fmt == "text":
        return {"text": _text_field(row, "text", columns)}
    if fmt == "alpaca":
        instruction = _text_field(row, "instruction", columns)
        extra = _text_field(row, "input", columns, required=False) or ""
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        answer, references = _answer_field(row, "output", columns)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    elif fmt == "prompt_completion":
        prompt_name, answer_name = pair
        prompt = _text_field(row, prompt_name, columns)
        answer, references = _answer_field(row, answer_name, columns)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    else:
        messages, references = _conversation(row, fmt, columns), None
    system = _text_field(row, "system", columns, required=False) or cfg.system_prompt
    sample = {"messages": _with_system(messages, system)}
    if references is not None:
        sample["references"] = references
    return sample


def normalise_rows(
    records,
    cfg: DataConfig,
    path=None,
    problems: list[str] | None = None,
    failures: list[tuple[int, RowError]] | None = None,
) -> tuple[str, list[dict], list[int]]:
    """(format, samples, indices of the rows they came from).

    Without `problems` or `failures`, the first malformed row raises a UserError naming file, row and field;
    with `problems`, each malformed row's sentence is appended there and the row is left out; with `failures`,
    (its index, its RowError, whose `field` names the column) likewise.
    """
    path = path if path is not None else getattr(records, "path", None)
    found = column_names(records)
    _check_columns(cfg.columns, found, path)
    fmt = cfg.format if cfg.format != "auto" else detect_format(records, cfg.columns, path)
    pair = _prompt_answer_pair(set(_mapped_names(found, cfg.columns)))
    samples, kept = [], []
    for i, record in enumerate(records):
        try:
            samples.append(_row_to_sample(_rename(record, cfg.columns), fmt, cfg, pair))
            kept.append(i)
        except RowError as exc:
            message = f"{where(records, i, path)}: {exc}"
            if problems is None and failures is None:
                raise UserError(message) from None
            if problems is not None:
                problems.append(message)
            if failures is not None:
                failures.append((i, exc))
    return fmt, samples, kept


def _prompt_answer_pair(names: set[str]) -> tuple[str, str]:
    """prompt/completion, or question/answer when the file uses those names (after data.columns renames)."""
    if "prompt" not in names and {"question", "answer"} <= names:
        return ("question", "answer")
    return ("prompt", "completion")


def answer_column(fmt: str, records, cfg: DataConfig) -> str:
    """The file's column that holds what a row of format `fmt` trains on: the answer, the conversation or the text."""
    ours = {"alpaca": "output", "messages": "messages", "sharegpt": "conversations", "text": "text"}.get(fmt)
    if ours is None:  # prompt_completion
        ours = _prompt_answer_pair(set(_mapped_names(column_names(records), cfg.columns)))[1]
    return _column(ours, cfg.columns)


def to_samples(records, cfg: DataConfig, path: str | Path | None = None) -> list[dict]:
    """Every row in one shape ({"messages": [...]} or {"text": ...}); a malformed row raises a UserError."""
    return normalise_rows(records, cfg, path)[1]


def has_blank_answer(sample: dict) -> bool:
    """Whether the part of a sample that trains is empty or only blank space: a text row's text, or any
    assistant reply of a conversation (training on it teaches the model to answer with nothing)."""
    if "text" in sample:
        return not sample["text"].strip()
    return any(m["role"] == "assistant" and not m["content"].strip() for m in sample["messages"])


def control_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens as text (`<|im_end|>`, `</s>`, ...), longest first.  The chat template and
    the tokenizer turn such text into the control token itself, wherever it stands, so a row holding one
    writes its own turn boundaries (an answer smuggled into the prompt, say) instead of being read as text."""
    names = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            names.add(str(added))
    return sorted((name for name in names if name.strip()), key=len, reverse=True)


def control_token_in(sample: dict, tokens: list[str]) -> str | None:
    """The first of `tokens` that a sample's text holds, or None."""
    texts = [sample["text"]] if "text" in sample else [m["content"] for m in sample["messages"]]
    return next((token for text in texts for token in tokens if token in text), None)


def prompt_and_references(sample: dict) -> tuple[list[dict], list[str]]:
    """(the conversation before the last assistant reply, every reference answer: that reply, or the
    row's list of references when it gave several)."""
    prompt, reply = prompt_and_reference(sample)
    return prompt, list(sample.get("references") or [reply])


def prompt_and_reference(sample: dict) -> tuple[list[dict], str]:
    """(the conversation before the last assistant reply, that reply) for generation and scoring."""
    if "messages" not in sample:
        raise UserError(
            "before/after generation needs prompt/answer rows, but these rows are plain text (format text); "
            "give data.test_path a file of prompt/answer rows, or set eval.enabled: false."
        )
    messages = sample["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise UserError("before/after generation needs each held-out conversation to end with the assistant's reply.")
    return messages[:-1], messages[-1]["content"]

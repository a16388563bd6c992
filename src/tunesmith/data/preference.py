"""Preference data → tokenised pairs (DPO, IPO, ORPO, SimPO) or labelled answers (KTO).

Three formats, told apart by their columns (after `data.columns` renames the file's columns to our
field names: prompt, chosen, rejected, completion, label, system); `data.format` is the SFT setting
and plays no part here:

    preference               prompt, chosen, rejected
    preference_conversation  chosen, rejected: each a whole conversation
    unpaired                 prompt, completion, label   (KTO)

- `prompt` is text (one user message) or a list of {role, content} messages (roles system, user,
  assistant) that does not end with the assistant: the answers come after it.
- `chosen`, `rejected` and `completion` are text (the assistant's reply) or a list holding exactly one
  {"role": "assistant", "content": ...} message.
- In `preference_conversation`, chosen and rejected are each a list of messages or Anthropic HH-RLHF
  text ("\\n\\nHuman: ...\\n\\nAssistant: ..."; a paragraph that starts with "Human:" or "Assistant:"
  starts a turn, and two turns of the same role in a row are one turn).  The messages the two share
  are the prompt; what follows must be one assistant reply on each side.
- `label` is JSON true (a good answer) or false (a bad one); 1/0 or "yes"/"no" are refused, because a
  misread label trains the opposite of what was meant (so KTO rows come in JSONL, JSON or Parquet: a CSV
  cell is always text).
- An optional `system` field, else `data.system_prompt`, becomes the system message of a prompt that
  has none.

Training stops at the first row that is malformed (a missing or null field, a value of the wrong
kind, a blank prompt, chosen and rejected the same answer), with a sentence naming the file, the row
and the field.  Some rows are left out instead, counted in the stats and named in one warning per
reason: a conversation pair whose two sides differ before the last reply (it is not a comparison of
two answers to one prompt), a row with an empty answer (as for SFT, see data/build.py), and a row
whose text holds one of the tokenizer's control tokens (it would write its own turn boundaries).

Tokenising uses the model's chat template (data/tokens.py): the prompt's ids are the template's
rendering of the prompt with the generation prompt, and an answer's ids are the rest of the
rendering of prompt + reply, through the reply's end-of-turn token.

Truncation to `data.max_length` (prompt + answer tokens): when the prompt and the longer answer do not
fit, each answer is cut to at most max(max_length // 2, max_length - prompt length) tokens, keeping its
start, and then the prompt keeps its last tokens, as many as fit beside the longer answer.  The end of
the prompt is the question being answered, so it is what is kept (TRL's `truncation_mode="keep_end"`
is the precedent); the system message and early turns go first.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from tunesmith.config import DataConfig
from tunesmith.data.build import (
    _leave_out_control_tokens,
    percentiles,
    resolve_data_path,
    split_indices,
)
from tunesmith.data.formats import (
    CHAT_ROLES,
    RowError,
    _check_columns,
    _check_text,
    _column,
    _label,
    _mapped_names,
    _missing,
    _rename,
    _text_field,
    _with_system,
    column_names,
    control_tokens,
)
from tunesmith.data.read import _kind, read_records, visible, visible_names, where
from tunesmith.data.sources import about_source, describe_mix, mix, read_source, source_config, source_key
from tunesmith.data.tokens import _end_of_turn_ids, chat_ids, ensure_chat_template
from tunesmith.errors import UserError

log = logging.getLogger(__name__)

PREFERENCE_FORMATS = ("preference", "preference_conversation", "unpaired")

# The field names `data.columns` may map to for preference data (our names, not the file's).
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "completion", "label", "system")

KINDS = ("paired", "unpaired")
_NEEDS = {
    "paired": "objectives dpo, ipo, orpo and simpo need rows with prompt, chosen and rejected "
    "(or whole conversations in chosen and rejected)",
    "unpaired": "objective kto needs rows with prompt, completion and label (true for a good answer, false for a "
    "bad one)",
}
_SHOWN_PLACES = 5  # rows named in a warning about several rows

# A turn of HH-RLHF text: "Human:" or "Assistant:" at the start of the text or of a paragraph.
_HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PairRow:
    prompt_ids: list[int]  # the prompt through the chat template's generation prompt
    chosen_ids: list[int]  # the chosen reply's tokens through its end-of-turn token
    rejected_ids: list[int]
    index: int  # position in its split's list: the key of cached reference log-probs
    truncated: bool = False


@dataclass
class UnpairedRow:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool  # True: a good answer; False: a bad one
    index: int
    truncated: bool = False


@dataclass
class PreferenceBundle:
    train: list  # PairRow or UnpairedRow
    validation: list
    test: list  # held-out rows: data.test_path, else the validation rows
    test_samples: list[dict]  # the test rows untokenised: {"prompt", "chosen", "rejected"} or {"prompt", "completion", "label"}
    format: str
    stats: dict = field(default_factory=dict)


# --- columns and formats ----------------------------------------------------------------------


def _format_from_names(names) -> str | None:
    names = set(names)
    if {"prompt", "chosen", "rejected"} <= names:
        return "preference"
    if {"chosen", "rejected"} <= names:
        return "preference_conversation"
    if {"prompt", "completion", "label"} <= names:
        return "unpaired"
    return None


def detect_preference_format(records, columns: dict[str, str] | None = None, path=None) -> str:
    """Which preference format the rows are in, after `columns` (our field → file column) renames them."""
    columns = columns or {}
    path = path if path is not None else getattr(records, "path", None)
    found = column_names(records)
    _check_columns(columns, found, path, PREFERENCE_FIELDS, "a field of preference data",
                   "{chosen: better, rejected: worse}")
    fmt = _format_from_names(_mapped_names(found, columns))
    if fmt is not None:
        return fmt
    raise UserError(
        f"{visible(path or 'the data', None)} is not preference data: {_NEEDS['paired']}, and {_NEEDS['unpaired']}; "
        f"found columns: {visible_names(found) or 'none'}. Map your column names to these fields with data.columns, "
        "e.g. data.columns: {chosen: better, rejected: worse}."
    )


def _check_kind(fmt: str, kind: str, records, key: str) -> None:
    """Refuse pairs for KTO and labelled answers for a paired objective (the rows of config key `key`)."""
    if (kind == "paired") == (fmt != "unpaired"):
        return
    found = visible_names(column_names(records)) or "none"
    these = "labelled answers (prompt, completion, label)" if fmt == "unpaired" else "preference pairs"
    other = "objective.type: kto" if fmt == "unpaired" else "objective.type dpo, ipo, orpo or simpo"
    raise UserError(
        f"{key}: {visible(records.path, None)} holds {these}, but the {_NEEDS[kind]}; found columns: {found}. "
        f"Train these rows with {other}, or give {key} a file of the rows this objective needs."
    )


# --- one row ------------------------------------------------------------------------------------


def _messages(value, label: str, column: str) -> list[dict]:
    """A list of {role, content} messages, checked message by message (empty lists are the caller's to refuse)."""
    messages = []
    for number, message in enumerate(value, start=1):
        here = f"{label}, message {number}"
        if not isinstance(message, dict):
            raise RowError(f"{here} is {_kind(message)}; every message must be an object with role and content.", column)
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role.strip().lower() not in CHAT_ROLES:
            state = "missing" if "role" not in message else (
                f"'{visible(role, 60)}'" if isinstance(role, str) else _kind(role)
            )
            raise RowError(f'{here}: "role" is {state}; use one of {", ".join(CHAT_ROLES)}.', column)
        if not isinstance(content, str):
            state = "missing" if "content" not in message else _kind(content)
            raise RowError(f'{here}: "content" is {state}; it must be the message text.', column)
        _check_text(content, f'{here}: "content"', column)
        messages.append({"role": role.strip().lower(), "content": content})
    return messages


def _has_user_text(messages: list[dict]) -> bool:
    return any(m["role"] == "user" and m["content"].strip() for m in messages)


def _prompt(row: dict, columns: dict[str, str]) -> list[dict]:
    """The `prompt` field as messages: text is one user message; a list must not end with the assistant."""
    label, column = _label("prompt", columns), _column("prompt", columns)
    error = _missing(row, "prompt", columns, "give this row the prompt (text, or a list of {role, content} messages)")
    if error:
        raise error
    value = row["prompt"]
    if isinstance(value, str):
        _check_text(value, label, column)
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        messages = _messages(value, label, column)
        if messages and messages[-1]["role"] == "assistant":
            raise RowError(
                f"{label} ends with an assistant message; the prompt is what comes before the answers, so move "
                "that reply into chosen/rejected (or completion) or remove it.",
                column,
            )
    else:
        raise RowError(
            f"{label} is {_kind(value)}; it must be text (the user's message) or a list of {{role, content}} messages.",
            column,
        )
    if not _has_user_text(messages):
        raise RowError(
            f"{label} is empty (no user message with text); write the question the answers reply to, or remove "
            "the row.",
            column,
        )
    return messages


def _answer(row: dict, name: str, columns: dict[str, str]) -> str:
    """An answer field (chosen, rejected, completion): text, or a list of one assistant message."""
    label, column = _label(name, columns), _column(name, columns)
    error = _missing(row, name, columns, "give this row the assistant's answer as text")
    if error:
        raise error
    value = row[name]
    if isinstance(value, list):
        messages = _messages(value, label, column)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            held = f"a {messages[0]['role']} message" if len(messages) == 1 else f"{len(messages)} messages"
            raise RowError(
                f"{label} is a list of {held}; give the answer as text or as a list of exactly one "
                '{"role": "assistant", "content": ...} message (the conversation before it goes in "prompt").',
                column,
            )
        return messages[0]["content"]
    if not isinstance(value, str):
        raise RowError(f"{label} is {_kind(value)}; it must be the assistant's answer as text.", column)
    _check_text(value, label, column)
    return value


def _hh_messages(text: str, label: str, column: str) -> list[dict]:
    """HH-RLHF text ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages; same-role turns in a row are joined."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        raise RowError(
            f'{label} is text with no "Human:" and "Assistant:" turns; without a prompt column, chosen and rejected '
            "must each be a whole conversation (a list of {role, content} messages, or HH-RLHF text "
            '"\\n\\nHuman: ...\\n\\nAssistant: ..."); otherwise add a "prompt" column (or map one with data.columns).',
            column,
        )
    if parts[0].strip():
        raise RowError(
            f'{label} has text before its first "Human:" turn ("{visible(parts[0].strip(), 60)}"); every paragraph '
            'of the conversation must belong to a "Human:" or "Assistant:" turn.',
            column,
        )
    messages: list[dict] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLES[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            # Two paragraphs of the same speaker are one turn (HH-RLHF writes some replies as two "Assistant:"
            # paragraphs), and chat templates want the roles to alternate.
            messages[-1]["content"] = "\n\n".join(t for t in (messages[-1]["content"], content) if t)
        else:
            messages.append({"role": role, "content": content})
    return messages


def _whole_conversation(row: dict, name: str, columns: dict[str, str]) -> list[dict]:
    """A preference_conversation side (chosen or rejected) as messages ending with the assistant's reply."""
    label, column = _label(name, columns), _column(name, columns)
    error = _missing(row, name, columns, "give this row the whole conversation (a list of {role, content} messages or HH-RLHF text)")
    if error:
        raise error
    value = row[name]
    if isinstance(value, str):
        _check_text(value, label, column)
        messages = _hh_messages(value, label, column)
    elif isinstance(value, list):
        messages = _messages(value, label, column)
    else:
        raise RowError(
            f"{label} is {_kind(value)}; it must be a whole conversation: a list of {{role, content}} messages, or "
            'HH-RLHF text "\\n\\nHuman: ...\\n\\nAssistant: ...".',
            column,
        )
    if not messages or messages[-1]["role"] != "assistant":
        ending = f"ends with a {messages[-1]['role']} message" if messages else "is an empty conversation"
        raise RowError(
            f"{label} {ending}; each side of a pair must end with the assistant's reply being compared.", column
        )
    return messages


class _Diverges(Exception):
    """A conversation pair whose sides differ before the last reply: left out, not an error."""


def _row_to_sample(row: dict, fmt: str, cfg: DataConfig) -> dict:
    """One renamed row → {"prompt", "chosen", "rejected"} or {"prompt", "completion", "label"}."""
    columns = cfg.columns
    if fmt == "preference_conversation":
        chosen_messages = _whole_conversation(row, "chosen", columns)
        rejected_messages = _whole_conversation(row, "rejected", columns)
        prompt = chosen_messages[:-1]
        if rejected_messages[:-1] != prompt:
            raise _Diverges
        if not _has_user_text(prompt):
            raise RowError(
                f"{_label('chosen', columns)} and {_label('rejected', columns)} share no user message before their "
                "replies, so the pair has no prompt; start both conversations with the user's question.",
                _column("chosen", columns),
            )
        sample = {"prompt": prompt, "chosen": chosen_messages[-1]["content"],
                  "rejected": rejected_messages[-1]["content"]}
    else:
        prompt = _prompt(row, columns)
        if fmt == "preference":
            sample = {"prompt": prompt, "chosen": _answer(row, "chosen", columns),
                      "rejected": _answer(row, "rejected", columns)}
        else:
            completion = _answer(row, "completion", columns)
            error = _missing(row, "label", columns, "give this row a label: true for a good answer, false for a bad one")
            if error:
                raise error
            label = row["label"]
            if not isinstance(label, bool):
                csv = "; a CSV cell is always text, so keep labelled rows in JSONL, JSON or Parquet" if isinstance(
                    label, str) else ""
                raise RowError(
                    f"{_label('label', columns)} is {_kind(label)}; write true for a good answer or false for a bad "
                    f"one (JSON true/false: 1/0 and text are not read as labels{csv}).",
                    _column("label", columns),
                )
            sample = {"prompt": prompt, "completion": completion, "label": row["label"]}
    if "chosen" in sample and sample["chosen"].strip() and sample["chosen"].strip() == sample["rejected"].strip():
        raise RowError(
            f"{_label('chosen', columns)} and {_label('rejected', columns)} are the same answer, so the pair says "
            "nothing about which is better; fix or remove the row.",
            _column("rejected", columns),
        )
    system = _text_field(row, "system", columns, required=False) or cfg.system_prompt
    sample["prompt"] = _with_system(sample["prompt"], system)
    return sample


def _answers(sample: dict) -> list[str]:
    return [sample["completion"]] if "completion" in sample else [sample["chosen"], sample["rejected"]]


# --- many rows ----------------------------------------------------------------------------------


def _warn_left_out(places: list[str], what: str, why: str) -> None:
    shown = "; ".join(places[:_SHOWN_PLACES])
    more = f" and {len(places) - _SHOWN_PLACES} more" if len(places) > _SHOWN_PLACES else ""
    log.warning(f"{len(places)} row{'s' if len(places) != 1 else ''} {what} left out ({shown}{more}): {why}")


_DIVERGES_WHY = (
    "a pair compares two replies to the same conversation, and these differ earlier. Make chosen and rejected the "
    "same conversation up to their last assistant reply, or give the rows as prompt, chosen and rejected."
)
_BLANK_WHY = (
    "an empty reply is no answer to compare or to learn from. Fill or remove them; `tunesmith data inspect` lists them."
)


def _read_samples(
    records, cfg: DataConfig, path=None, fmt: str | None = None
) -> tuple[str, list[dict], list[int], dict[str, int]]:
    """(format, samples, indices of the rows they came from, rows left out by reason); warns about those."""
    path = path if path is not None else getattr(records, "path", None)
    fmt = fmt or detect_preference_format(records, cfg.columns, path)
    samples, kept, diverging, blank = [], [], [], []
    for i, record in enumerate(records):
        try:
            sample = _row_to_sample(_rename(record, cfg.columns), fmt, cfg)
        except _Diverges:
            diverging.append(i)
            continue
        except RowError as exc:
            raise UserError(f"{where(records, i, path)}: {exc}") from None
        if not all(answer.strip() for answer in _answers(sample)):
            blank.append(i)
            continue
        samples.append(sample)
        kept.append(i)
    if diverging:
        places = [where(records, i, path) for i in diverging]
        _warn_left_out(places, "whose chosen and rejected conversations differ before the last reply", _DIVERGES_WHY)
    if blank:
        _warn_left_out([where(records, i, path) for i in blank], "with an empty answer (or only blank space)", _BLANK_WHY)
    return fmt, samples, kept, {"diverging": len(diverging), "blank": len(blank)}


def pair_samples(records, cfg: DataConfig, path=None) -> tuple[str, list[dict], list[int]]:
    """(format, samples, indices of the rows they came from), untokenised; rows left out are warned about,
    and the first malformed row raises a UserError naming file, row and field."""
    fmt, samples, kept, _ = _read_samples(records, cfg, path)
    return fmt, samples, kept


def _load(value: str, key: str, cfg: DataConfig, kind: str, tokens: list[str], limit: int | None = None):
    """(format, samples, 'file, line N' of each, rows read, rows left out by reason) of the file at config key `key`."""
    return _load_records(read_records(resolve_data_path(value, key)), key, cfg, kind, tokens, limit)


def _load_records(records, key: str, cfg: DataConfig, kind: str, tokens: list[str], limit: int | None = None):
    """`_load` for rows already read (a file, or one of data.sources)."""
    rows_read = len(records)
    if limit is not None:
        records = records[:limit]
    fmt = detect_preference_format(records, cfg.columns)
    _check_kind(fmt, kind, records, key)
    fmt, samples, kept, left_out = _read_samples(records, cfg, fmt=fmt)
    places = [where(records, i) for i in kept]
    # Reuse the SFT rule and its warning: view each sample as one conversation holding every text it has.
    views = [
        {"messages": s["prompt"] + [{"role": "assistant", "content": a} for a in _answers(s)], "at": j}
        for j, s in enumerate(samples)
    ]
    views, places, left_out["control_tokens"] = _leave_out_control_tokens(views, places, key, tokens)
    samples = [samples[v["at"]] for v in views]
    return fmt, samples, places, rows_read, left_out


# --- tokens -------------------------------------------------------------------------------------


def _answer_ids(prompt: list[dict], prompt_ids: list[int], answer: str, tokenizer) -> list[int]:
    """The reply's ids: the template's rendering of prompt + reply after the prompt's ids, through the reply's
    end-of-turn token (what the template writes after it, such as ChatML's newline, belongs to the next turn)."""
    full = chat_ids(tokenizer, prompt + [{"role": "assistant", "content": answer}])
    if full[: len(prompt_ids)] != prompt_ids:
        raise UserError(
            "this model's chat template (or its tokenizer) writes the prompt differently once the reply follows, so "
            "tunesmith cannot tell which tokens are the reply; check that the answers do not start with blank space "
            "the template's generation prompt runs into, or use a model whose template keeps the prompt as it is."
        )
    reply = full[len(prompt_ids):]
    end_ids = _end_of_turn_ids(tokenizer)
    last_special = max((t for t, token in enumerate(reply) if token in end_ids), default=None)
    return reply if last_special is None else reply[: last_special + 1]


def _fit(prompt_ids: list[int], answers: list[list[int]], max_length: int):
    """(prompt ids, answers, truncated) cut to `max_length` by the rule in the module docstring."""
    if len(prompt_ids) + max(len(a) for a in answers) <= max_length:
        return prompt_ids, answers, False
    answer_cap = max(max_length // 2, max_length - len(prompt_ids))
    answers = [a[:answer_cap] for a in answers]
    prompt_cap = max_length - max(len(a) for a in answers)  # at least max_length - max_length // 2
    return prompt_ids[-prompt_cap:], answers, True


def _tokenize(sample: dict, index: int, tokenizer, cfg: DataConfig) -> PairRow | UnpairedRow:
    prompt_ids = chat_ids(tokenizer, sample["prompt"], add_generation_prompt=True)
    answers = [_answer_ids(sample["prompt"], prompt_ids, a, tokenizer) for a in _answers(sample)]
    prompt_ids, answers, truncated = _fit(prompt_ids, answers, cfg.max_length)
    if "completion" in sample:
        return UnpairedRow(prompt_ids, answers[0], sample["label"], index, truncated)
    return PairRow(prompt_ids, answers[0], answers[1], index, truncated)


def _tokenize_all(samples: list[dict], places: list[str], tokenizer, cfg: DataConfig) -> list:
    rows = []
    for index, (sample, place) in enumerate(zip(samples, places)):
        try:
            rows.append(_tokenize(sample, index, tokenizer, cfg))
        except UserError as exc:
            raise UserError(f"{place}: {exc}") from None
    return rows


def _answer_length(row: PairRow | UnpairedRow) -> int:
    return len(row.chosen_ids) if isinstance(row, PairRow) else len(row.completion_ids)


@dataclass
class _MixedSamples:
    format: str
    rows_read: int
    left_out: dict[str, int]
    stats: list[dict]  # one per source
    train_samples: list[dict]
    train_places: list[str]
    val_samples: list[dict]
    val_places: list[str]


def _mixed_sources(cfg: DataConfig, kind: str, tokens: list[str]) -> _MixedSamples:
    """data.sources as preference data: each source read with its own columns and system prompt, checked and
    cleaned as one file is, then mixed and split by data/sources.py's rule."""
    parts = []  # (format, samples, places, rows read, rows left out by reason) of each source
    for i, source in enumerate(cfg.sources):
        key = source_key(i)
        records = read_source(source, key)
        with about_source(key):
            part = _load_records(records, f"{key}.path", source_config(cfg, source), kind, tokens, cfg.limit)
        if not part[1]:
            raise UserError(f"{key}.path: {visible(source.path, None)} has no rows left to train on ({part[3]} "
                            "read, every one left out; the warnings above say why).")
        parts.append(part)
    mixed = mix([len(p[1]) for p in parts], cfg.sources, cfg.seed, 0.0 if cfg.validation_path else
                cfg.validation_split)
    log.info(describe_mix(mixed, cfg.sources))
    formats = sorted({p[0] for p in parts})
    stats = [
        {"path": source.path, "format": fmt, "rows_read": rows_read, "rows_available": len(samples),
         "rows_used": mixed.drawn[i], "weight": None if source.rows is not None else (source.weight or 1.0),
         "rows": source.rows, "repeated": mixed.repeated(i),
         "train": sum(1 for pair in mixed.train if pair[0] == i),
         "validation": sum(1 for pair in mixed.validation if pair[0] == i)}
        for i, (source, (fmt, samples, _, rows_read, _)) in enumerate(zip(cfg.sources, parts))
    ]
    return _MixedSamples(
        format=formats[0] if len(formats) == 1 else "mixed",
        rows_read=sum(p[3] for p in parts),
        left_out={reason: sum(p[4][reason] for p in parts) for reason in parts[0][4]},
        stats=stats,
        train_samples=[parts[i][1][j] for i, j in mixed.train],
        train_places=[parts[i][2][j] for i, j in mixed.train],
        val_samples=[parts[i][1][j] for i, j in mixed.validation],
        val_places=[parts[i][2][j] for i, j in mixed.validation],
    )


def build_preference_data(cfg: DataConfig, tokenizer, kind: str) -> PreferenceBundle:
    """Read, check, split and tokenise the preference data the config names (see the module docstring), for a
    paired objective (`kind` "paired": DPO, IPO, ORPO, SimPO) or an unpaired one ("unpaired": KTO)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    ensure_chat_template(tokenizer)
    tokens = control_tokens(tokenizer)
    source_stats = None
    if cfg.sources:
        mixed = _mixed_sources(cfg, kind, tokens)
        fmt, rows_read, left_out, source_stats = mixed.format, mixed.rows_read, mixed.left_out, mixed.stats
        train_samples, train_places = mixed.train_samples, mixed.train_places
        val_samples, val_places = mixed.val_samples, mixed.val_places
        rows_used = len(train_samples) + len(val_samples)
    else:
        fmt, samples, places, rows_read, left_out = _load(cfg.path, "data.path", cfg, kind, tokens, cfg.limit)
        if not samples:
            raise UserError(
                f"data.path: {visible(cfg.path, None)} has no rows left to train on ({rows_read} read, every one left "
                "out; the warnings above say why)."
            )
        rows_used = len(samples)
        if cfg.validation_path:
            train_samples, train_places = samples, places
        else:
            train_idx, val_idx = split_indices(len(samples), cfg.validation_split, cfg.seed)
            train_samples, train_places = [samples[i] for i in train_idx], [places[i] for i in train_idx]
            val_samples, val_places = [samples[i] for i in val_idx], [places[i] for i in val_idx]
    if cfg.validation_path:
        _, val_samples, val_places, _, more = _load(cfg.validation_path, "data.validation_path", cfg, kind, tokens)
        left_out = {reason: n + more[reason] for reason, n in left_out.items()}

    train = _tokenize_all(train_samples, train_places, tokenizer, cfg)
    validation = _tokenize_all(val_samples, val_places, tokenizer, cfg)
    if cfg.test_path:
        _, test_samples, test_places, _, more = _load(cfg.test_path, "data.test_path", cfg, kind, tokens)
        left_out = {reason: n + more[reason] for reason, n in left_out.items()}
        test = _tokenize_all(test_samples, test_places, tokenizer, cfg)
    else:
        test_samples, test = val_samples, validation

    reasons = {
        "diverging": "chosen and rejected conversations that differ before the last reply",
        "blank": "an empty answer",
        "control_tokens": "the tokenizer's control tokens in their text",
    }
    left_out_reason = "; ".join(
        f"{n} row{'s' if n != 1 else ''} with {reasons[reason]}" for reason, n in left_out.items() if n
    )
    stats = {
        "path": str(cfg.path) if cfg.path is not None else None,
        "format": fmt,
        "rows_read": rows_read,
        "rows_used": rows_used,
        "train": len(train),
        "validation": len(validation),
        "test": len(test),
        "max_length": cfg.max_length,
        "truncated": sum(r.truncated for r in train + validation + (test if cfg.test_path else [])),
        "left_out": sum(left_out.values()),
        "left_out_reason": left_out_reason or None,
        "train_token_lengths": percentiles([len(r.prompt_ids) + _answer_length(r) for r in train]),
    }
    if source_stats is not None:
        stats["sources"] = source_stats
    return PreferenceBundle(
        train=train, validation=validation, test=test, test_samples=test_samples, format=fmt, stats=stats
    )

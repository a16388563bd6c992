"""From the data config to tokenised train / validation / test rows.

    read the training file → first `limit` rows → one row shape → leave out rows whose
    answer is blank or whose text holds a tokenizer control token (counted, logged) → seeded split (or data.validation_path) → test rows
    (data.test_path, else the validation rows) → tokenise with prompt masking → drop rows
    with nothing left to train on (counted)

A row whose answer (or, for plain text, whose text) is empty or only blank space is left
out of every split rather than trained on: it would teach the model to answer with nothing
(`tunesmith data inspect` flags the same rows).  So is a row whose text holds one of the tokenizer's
control tokens (`<|im_end|>`, `</s>`): the template and the tokenizer would read it as a turn boundary, so
the row would write its own turns.  The log says how many and which.

With a `cache_dir`, the tokenised rows are stored there keyed by a hash of the
normalised samples (which covers the files, format, columns, system prompt, limit,
split and seed), the tokenizer, max_length and train_on_prompt, so a second run on
the same data skips tokenising.  The cache holds plain integer arrays (.npz, no pickle)
and is written to a temporary name, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.config import DataConfig
from tunesmith.data.formats import control_token_in, control_tokens, has_blank_answer, normalise_rows
from tunesmith.data.read import check_data_file, read_records, visible, where
from tunesmith.data.tokens import IGNORE_INDEX, TokenizedRow, ensure_chat_template, tokenize_sample
from tunesmith.errors import UserError

log = logging.getLogger(__name__)

_CACHE_VERSION = 1
_SHOWN_PLACES = 5  # rows named in a log line about several rows


@dataclass
class DataBundle:
    train: list[TokenizedRow]
    validation: list[TokenizedRow]
    test_samples: list[dict]  # untokenised held-out samples, for generating answers before/after
    test: list[TokenizedRow]  # the same rows tokenised (rows with nothing to train on left out), for perplexity
    format: str
    stats: dict = field(default_factory=dict)
    # the train and validation splits untokenised, in split order (GRPO samples answers to their prompts)
    train_samples: list[dict] = field(default_factory=list)
    validation_samples: list[dict] = field(default_factory=list)


def resolve_data_path(value: str, key: str) -> Path:
    """A data file named by config key `key`; relative paths start from the current folder.  Anything but a
    regular file (missing, a folder, a named pipe, a device, a link loop) is a UserError that starts with `key`."""
    path = Path(value).expanduser()
    try:
        check_data_file(path)
    except UserError as exc:
        raise UserError(f"{key}: {exc}") from None
    return path


def split_indices(n: int, validation_split: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): a seeded shuffle holds out round(split × n) rows, at least 1 when n ≥ 2."""
    if validation_split <= 0 or n < 2:
        return list(range(n)), []
    held = min(max(round(validation_split * n), 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[held:]), sorted(order[:held])


def percentiles(values: list[int], points: tuple[int, ...] = (50, 90, 99)) -> dict[str, int]:
    """p50/p90/p99 (or the `points` asked for) and max, by nearest rank ({} for no values)."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(p: float) -> int:
        return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]

    return {**{f"p{p}": rank(p) for p in points}, "max": ordered[-1]}


def has_trained_tokens(row: TokenizedRow, task: str = "causal_lm") -> bool:
    """Whether any label counts: a causal loss predicts token t from tokens < t, so there label 0 never does."""
    labels = row.labels[1:] if task == "causal_lm" else row.labels
    return any(label != IGNORE_INDEX for label in labels)


def _load_samples(value: str, key: str, cfg: DataConfig, limit: int | None = None):
    """(format, samples, 'file, line N' of each sample, rows read) for the file named by config key `key`."""
    records = read_records(resolve_data_path(value, key))
    rows_read = len(records)
    if limit is not None:
        records = records[:limit]
    fmt, samples, kept = normalise_rows(records, cfg)
    return fmt, samples, [where(records, i) for i in kept], rows_read


def _leave_out_blank_answers(samples: list[dict], places: list[str], key: str) -> tuple[list, list, int]:
    """(samples, places, how many were left out): rows whose answer is blank are left out, with a warning."""
    blank = [j for j, sample in enumerate(samples) if has_blank_answer(sample)]
    if not blank:
        return samples, places, 0
    shown = "; ".join(places[j] for j in blank[:_SHOWN_PLACES])
    more = f" and {len(blank) - _SHOWN_PLACES} more" if len(blank) > _SHOWN_PLACES else ""
    what = "an empty text" if "text" in samples[blank[0]] else "an empty answer"
    log.warning(
        f"{key}: {len(blank)} row{'s' if len(blank) != 1 else ''} with {what} (or only blank space) left out "
        f"({shown}{more}); training on them would teach the model to answer with nothing. Fill or remove them; "
        "`tunesmith data inspect` lists them."
    )
    keep = sorted(set(range(len(samples))) - set(blank))
    return [samples[j] for j in keep], [places[j] for j in keep], len(blank)


def _leave_out_control_tokens(samples: list[dict], places: list[str], key: str, tokens: list[str]) -> tuple[list, list, int]:
    """(samples, places, how many were left out): rows whose text holds one of the tokenizer's control tokens
    (see formats.control_tokens) are left out, with a warning that names them."""
    found = [(j, token) for j, sample in enumerate(samples) if (token := control_token_in(sample, tokens))]
    if not found:
        return samples, places, 0
    shown = "; ".join(f"{places[j]} holds {visible(token, 40)}" for j, token in found[:_SHOWN_PLACES])
    more = f" and {len(found) - _SHOWN_PLACES} more" if len(found) > _SHOWN_PLACES else ""
    log.warning(
        f"{key}: {len(found)} row{'s' if len(found) != 1 else ''} holding the tokenizer's control tokens left out "
        f"({shown}{more}): the model would read them as turn boundaries, not as text. Remove those tokens from "
        "the rows; `tunesmith data inspect` lists them."
    )
    leave = {j for j, _ in found}
    keep = [j for j in range(len(samples)) if j not in leave]
    return [samples[j] for j in keep], [places[j] for j in keep], len(found)


def _tokenize_all(
    samples: list[dict], places: list[str], tokenizer, cfg: DataConfig, task: str = "causal_lm"
) -> tuple[list[TokenizedRow], int, int]:
    """(rows that have something to train on, truncated count, dropped count)."""
    rows, truncated, dropped = [], 0, 0
    for sample, place in zip(samples, places):
        try:
            row = tokenize_sample(sample, tokenizer, cfg, task)
        except UserError as exc:
            raise UserError(f"{place}: {exc}") from None
        truncated += row.truncated
        if has_trained_tokens(row, task):
            rows.append(row)
        else:
            dropped += 1
    return rows, truncated, dropped


def load_eval_rows(path: str, key: str, cfg: DataConfig, tokenizer, task: str = "causal_lm"):
    """(format, samples, tokenised rows) of every row of a file read with the run's data settings, for
    evaluating on data other than the run's own held-out split (`tunesmith eval --data FILE`)."""
    fmt, samples, places, _ = _load_samples(path, key, cfg)
    if not samples:
        raise UserError(f"{key}: {visible(path, None)} has no rows to evaluate on.")
    if task == "causal_lm":
        ensure_chat_template(tokenizer)
    rows, _, _ = _tokenize_all(samples, places, tokenizer, cfg, task)
    return fmt, samples, rows


def build_datasets(
    cfg: DataConfig, tokenizer, cache_dir: str | Path | None = None, task: str = "causal_lm"
) -> DataBundle:
    """Read, normalise, split and tokenise the data the config names (see the module docstring), for a
    model of kind `task` (causal_lm, seq2seq or masked_lm; see tunesmith.models.tasks)."""
    fmt, samples, places, rows_read = _load_samples(cfg.path, "data.path", cfg, cfg.limit)
    tokens = control_tokens(tokenizer)
    samples, places, blank = _leave_out_blank_answers(samples, places, "data.path")
    samples, places, controlled = _leave_out_control_tokens(samples, places, "data.path", tokens)
    if cfg.validation_path:
        train_samples, train_places = samples, places
        _, val_samples, val_places, _ = _load_samples(cfg.validation_path, "data.validation_path", cfg)
        val_samples, val_places, val_blank = _leave_out_blank_answers(val_samples, val_places, "data.validation_path")
        blank += val_blank
        val_samples, val_places, left_out = _leave_out_control_tokens(val_samples, val_places, "data.validation_path", tokens)
        controlled += left_out
    else:
        train_idx, val_idx = split_indices(len(samples), cfg.validation_split, cfg.seed)
        train_samples, train_places = [samples[i] for i in train_idx], [places[i] for i in train_idx]
        val_samples, val_places = [samples[i] for i in val_idx], [places[i] for i in val_idx]
    if cfg.test_path:
        _, test_samples, test_places, _ = _load_samples(cfg.test_path, "data.test_path", cfg)
        test_samples, test_places, test_blank = _leave_out_blank_answers(test_samples, test_places, "data.test_path")
        blank += test_blank
        test_samples, test_places, left_out = _leave_out_control_tokens(test_samples, test_places, "data.test_path", tokens)
        controlled += left_out
    else:
        test_samples, test_places = val_samples, val_places

    if task == "causal_lm":
        ensure_chat_template(tokenizer)  # before hashing: the template is part of the cache key
    splits = {"train": (train_samples, train_places), "validation": (val_samples, val_places)}
    if cfg.test_path:
        splits["test"] = (test_samples, test_places)

    cache_file = Path(cache_dir) / f"{_cache_key(splits, tokenizer, cfg, task)}.npz" if cache_dir is not None else None
    tokenized = _read_cache(cache_file) if cache_file is not None else None
    cache_state = "off" if cache_file is None else ("hit" if tokenized is not None else "miss")
    if tokenized is None:
        tokenized = {name: _tokenize_all(s, p, tokenizer, cfg, task) for name, (s, p) in splits.items()}
        if cache_file is not None:
            _write_cache(cache_file, tokenized)
    if "test" not in tokenized:
        tokenized["test"] = (tokenized["validation"][0], 0, 0)  # same rows; counted once

    train, validation, test = tokenized["train"][0], tokenized["validation"][0], tokenized["test"][0]
    truncated = sum(t for _, t, _ in tokenized.values())
    dropped = sum(d for _, _, d in tokenized.values())
    stats = {
        "path": str(cfg.path),
        "format": fmt,
        "rows_read": rows_read,
        "rows_used": len(samples),
        "blank_answers": blank,  # rows left out of every split because their answer is empty
        "control_token_rows": controlled,  # rows left out because their text holds a tokenizer control token
        "train": len(train),
        "validation": len(validation),
        "test": len(test),
        "max_length": cfg.max_length,
        "train_on_prompt": cfg.train_on_prompt,
        "truncated": truncated,
        "dropped": dropped,
        "dropped_reason": (
            f"nothing left to train on once cut to data.max_length={cfg.max_length} tokens; raise data.max_length "
            "or shorten the prompts"
            if dropped
            else None
        ),
        "train_token_lengths": percentiles([len(r.input_ids) for r in train]),
        "trained_tokens": sum(sum(1 for label in r.labels if label != IGNORE_INDEX) for r in train),
        "cache": cache_state,
    }
    return DataBundle(train=train, validation=validation, test_samples=test_samples, test=test, format=fmt, stats=stats,
                      train_samples=train_samples, validation_samples=val_samples)


# --- the tokenised-data cache ---------------------------------------------------------------


def _tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in a tokenizer that changes ids: its vocabulary and rules, special tokens, template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [type(tokenizer).__name__, str(tokenizer.chat_template), tokenizer.special_tokens_map],
        default=str,
        sort_keys=True,
    )
    return hashlib.sha256((body + extra).encode("utf-8")).hexdigest()


def _cache_key(splits: dict, tokenizer, cfg: DataConfig, task: str = "causal_lm") -> str:
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    header = [_CACHE_VERSION, transformers.__version__, tokenizers.__version__, cfg.max_length, cfg.train_on_prompt]
    if task != "causal_lm":  # (causal keys stay as they were, so existing caches still hit)
        header.append(task)
    digest.update(json.dumps(header).encode())
    digest.update(_tokenizer_fingerprint(tokenizer).encode())
    for name, (samples, _) in splits.items():
        digest.update(name.encode())
        digest.update(json.dumps(samples, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()[:32]


def _write_cache(path: Path, tokenized: dict) -> None:
    import numpy as np

    arrays = {}
    for name, (rows, truncated, dropped) in tokenized.items():
        arrays[f"{name}_lengths"] = np.array([len(r.input_ids) for r in rows], dtype=np.int64)
        # labels are as long as the ids except for seq2seq, where they are the decoder's side
        arrays[f"{name}_labellengths"] = np.array([len(r.labels) for r in rows], dtype=np.int64)
        arrays[f"{name}_ids"] = np.array([t for r in rows for t in r.input_ids], dtype=np.int64)
        arrays[f"{name}_labels"] = np.array([t for r in rows for t in r.labels], dtype=np.int64)
        arrays[f"{name}_truncated"] = np.array([r.truncated for r in rows], dtype=bool)
        arrays[f"{name}_counts"] = np.array([truncated, dropped], dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path) -> dict | None:
    """The cached splits, or None when there is no (readable) cache file."""
    import numpy as np

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            names = sorted({key.rsplit("_", 1)[0] for key in data.files})
            out = {}
            for name in names:
                lengths = data[f"{name}_lengths"].tolist()
                ids, labels = data[f"{name}_ids"].tolist(), data[f"{name}_labels"].tolist()
                label_lengths = data[f"{name}_labellengths"].tolist()
                flags = data[f"{name}_truncated"].tolist()
                rows, start, label_start = [], 0, 0
                for length, label_length, flag in zip(lengths, label_lengths, flags):
                    row_labels = labels[label_start : label_start + label_length]
                    rows.append(TokenizedRow(ids[start : start + length], row_labels, bool(flag)))
                    start += length
                    label_start += label_length
                truncated, dropped = data[f"{name}_counts"].tolist()
                out[name] = (rows, truncated, dropped)
            return out
    except (OSError, ValueError, KeyError):
        return None  # damaged or from an older layout: tokenise again

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

With `data.sources` (several data sets mixed, data/sources.py), each source is read, normalised and
cleaned on its own, tokenised whole and cached on its own (keyed by that source's normalised samples, the
tokenizer, max_length and train_on_prompt), and only then are its rows picked and mixed: a new weight or one
more source re-tokenises nothing that was tokenised before.  A large data set is tokenised by a pool of
processes (data/tokenizing.py).
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

from tunesmith.config import DataConfig, DataSourceConfig
from tunesmith.data.formats import control_token_in, control_tokens, has_blank_answer, normalise_rows
from tunesmith.data.read import check_data_file, read_records, visible, where
from tunesmith.data.sources import Mix, about_source, describe_mix, mix, read_source, source_config, source_key
from tunesmith.data.tokenizing import tokenize_rows
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
    samples: list[dict], places: list[str], tokenizer, cfg: DataConfig, task: str = "causal_lm",
    desc: str = "tokenising",
) -> tuple[list[TokenizedRow], int, int]:
    """(rows that have something to train on, truncated count, dropped count)."""
    return _keep_trainable(tokenize_rows(samples, places, tokenizer, cfg, task, desc, tokenize_sample), task)


def _keep_trainable(rows: list[TokenizedRow], task: str) -> tuple[list[TokenizedRow], int, int]:
    """(the rows that have something to train on, how many of all were truncated, how many were dropped)."""
    trainable = [row for row in rows if has_trained_tokens(row, task)]
    return trainable, sum(row.truncated for row in rows), len(rows) - len(trainable)


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
    if cfg.sources:
        return _build_from_sources(cfg, tokenizer, cache_dir, task)
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
        tokenized = {name: _tokenize_all(s, p, tokenizer, cfg, task, f"tokenising {name}")
                     for name, (s, p) in splits.items()}
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
        **_split_stats(cfg, train, validation, test, truncated, dropped),
        "cache": cache_state,
    }
    return DataBundle(train=train, validation=validation, test_samples=test_samples, test=test, format=fmt, stats=stats,
                      train_samples=train_samples, validation_samples=val_samples)


def _split_stats(cfg: DataConfig, train: list, validation: list, test: list, truncated: int, dropped: int) -> dict:
    """The stats of the tokenised splits that a run logs and summary.json keeps."""
    return {
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
    }


# --- several sources (data.sources) ---------------------------------------------------------------------


@dataclass
class SourceRows:
    """One source read, normalised and cleaned: its samples, where each came from, and (once tokenised) its rows."""

    key: str  # data.sources[1]
    source: DataSourceConfig
    cfg: DataConfig  # the run's data settings with this source's format, columns and system prompt
    format: str
    samples: list[dict]
    places: list[str]
    rows_read: int
    blank: int
    controlled: int
    rows: list[TokenizedRow] = field(default_factory=list)  # one per sample, untrainable ones included
    cache: str = "off"


def load_source(index: int, source: DataSourceConfig, cfg: DataConfig, tokens: list[str] | None) -> SourceRows:
    """Source `index`'s usable samples: its first data.limit rows in the row shape, less blank answers (and, with
    the tokenizer's control `tokens`, rows holding them); a source with none left is a UserError."""
    key = source_key(index)
    own = source_config(cfg, source)
    records = read_source(source, key)
    rows_read = len(records)
    if not records:
        raise UserError(f"{key}.path: {visible(source.path, None)} holds no rows; point it at data with rows.")
    if cfg.limit is not None:
        records = records[: cfg.limit]
    with about_source(key):
        fmt, samples, kept = normalise_rows(records, own)
    places = [where(records, i) for i in kept]
    samples, places, blank = _leave_out_blank_answers(samples, places, f"{key}.path")
    controlled = 0
    if tokens is not None:
        samples, places, controlled = _leave_out_control_tokens(samples, places, f"{key}.path", tokens)
    if not samples:
        raise UserError(f"{key}.path: {visible(source.path, None)} has no rows left to train on ({rows_read} read, "
                        "every one left out; the warnings above say why).")
    return SourceRows(key, source, own, fmt, samples, places, rows_read, blank, controlled)


def _load_and_mix(cfg: DataConfig, tokens: list[str] | None) -> tuple[list[SourceRows], Mix]:
    """Every source read and cleaned, then the seeded mix of their rows and its split (none with
    data.validation_path, which holds the validation rows), logged."""
    parts = [load_source(i, source, cfg, tokens) for i, source in enumerate(cfg.sources)]
    mixed = mix([len(p.samples) for p in parts], cfg.sources, cfg.seed, 0.0 if cfg.validation_path else
                cfg.validation_split)
    log.info(describe_mix(mixed, cfg.sources))
    return parts, mixed


def mixed_samples(cfg: DataConfig, tokens: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(training samples, validation samples) of data.sources, mixed and split as build_datasets does, untokenised
    (with the control `tokens` of no tokenizer unless given): what sequence-level distillation has the teacher
    answer."""
    parts, mixed = _load_and_mix(cfg, tokens)
    train = [parts[i].samples[j] for i, j in mixed.train]
    if cfg.validation_path:
        return train, _load_samples(cfg.validation_path, "data.validation_path", cfg)[1]
    return train, [parts[i].samples[j] for i, j in mixed.validation]


def _tokenize_cached(samples: list[dict], places: list[str], tokenizer, cfg: DataConfig, task: str,
                     cache_dir: str | Path | None, desc: str) -> tuple[list[TokenizedRow], str]:
    """(every sample's row, untrainable ones included, in order; the cache's state: off, hit or miss), cached under
    a key of these samples alone, so that other sources and the mix play no part in it."""
    if cache_dir is None:
        return tokenize_rows(samples, places, tokenizer, cfg, task, desc, tokenize_sample), "off"
    cache_file = Path(cache_dir) / f"{_cache_key({'source': (samples, places)}, tokenizer, cfg, task)}.npz"
    cached = _read_cache(cache_file)
    if cached is not None and len(cached.get("source", ((),))[0]) == len(samples):
        return cached["source"][0], "hit"
    rows = tokenize_rows(samples, places, tokenizer, cfg, task, desc, tokenize_sample)
    _, truncated, untrainable = _keep_trainable(rows, task)
    _write_cache(cache_file, {"source": (rows, truncated, untrainable)})
    return rows, "miss"


def _picked(parts: list[SourceRows], pairs: list[tuple[int, int]], task: str):
    """(trainable rows, samples, places, truncated, dropped, trainable rows per source) of the (source, row) pairs."""
    rows, samples, places, truncated, dropped = [], [], [], 0, 0
    per_source = [0] * len(parts)
    for i, j in pairs:
        row = parts[i].rows[j]
        samples.append(parts[i].samples[j])
        places.append(parts[i].places[j])
        truncated += row.truncated
        if has_trained_tokens(row, task):
            rows.append(row)
            per_source[i] += 1
        else:
            dropped += 1
    return rows, samples, places, truncated, dropped, per_source


def _held_out_file(value: str, key: str, cfg: DataConfig, tokenizer, tokens: list[str], task: str,
                   cache_dir: str | Path | None):
    """(samples, trainable rows, truncated, dropped, blank, controlled, cache state) of data.validation_path or
    data.test_path beside sources: read with the run's own format, columns and system prompt."""
    _, samples, places, _ = _load_samples(value, key, cfg)
    samples, places, blank = _leave_out_blank_answers(samples, places, key)
    samples, places, controlled = _leave_out_control_tokens(samples, places, key, tokens)
    rows, state = _tokenize_cached(samples, places, tokenizer, cfg, task, cache_dir, f"tokenising {key}")
    trainable, truncated, dropped = _keep_trainable(rows, task)
    return samples, trainable, truncated, dropped, blank, controlled, state


def _build_from_sources(cfg: DataConfig, tokenizer, cache_dir: str | Path | None, task: str) -> DataBundle:
    """build_datasets for data.sources: read and clean each source, tokenise each (cached on its own), mix, split."""
    if task == "causal_lm":
        ensure_chat_template(tokenizer)  # before hashing: the template is part of each cache key
    tokens = control_tokens(tokenizer)
    parts, mixed = _load_and_mix(cfg, tokens)
    for part in parts:
        with about_source(part.key):
            part.rows, part.cache = _tokenize_cached(part.samples, part.places, tokenizer, part.cfg, task, cache_dir,
                                                     f"tokenising {part.key}")
    train, train_samples, _, truncated, dropped, train_per_source = _picked(parts, mixed.train, task)
    validation, val_samples, _, val_truncated, val_dropped, val_per_source = _picked(parts, mixed.validation, task)
    truncated, dropped = truncated + val_truncated, dropped + val_dropped
    blank = sum(p.blank for p in parts)
    controlled = sum(p.controlled for p in parts)
    states = [p.cache for p in parts]
    if cfg.validation_path:
        val_samples, validation, *counts, state = _held_out_file(
            cfg.validation_path, "data.validation_path", cfg, tokenizer, tokens, task, cache_dir)
        truncated, dropped, blank, controlled = (a + b for a, b in zip((truncated, dropped, blank, controlled), counts))
        states.append(state)
    formats = sorted({p.format for p in parts})
    fmt = formats[0] if len(formats) == 1 else "mixed"
    if cfg.test_path:
        test_samples, test, *counts, state = _held_out_file(
            cfg.test_path, "data.test_path", cfg, tokenizer, tokens, task, cache_dir)
        truncated, dropped, blank, controlled = (a + b for a, b in zip((truncated, dropped, blank, controlled), counts))
        states.append(state)
    else:
        # plain text has no answer to generate: with text and conversation sources mixed, generation uses the
        # conversations (every held-out row still counts in the loss)
        test = validation
        test_samples = [s for s in val_samples if "messages" in s] if fmt == "mixed" else val_samples
    if not train:
        raise UserError(f"data.sources: the mix of {len(parts)} sources gave no rows to train on ({dropped} cut to "
                        f"nothing by data.max_length={cfg.max_length}); raise data.max_length, or run `tunesmith data "
                        "inspect PATH --config CONFIG` on each source to see why.")
    stats = {
        "path": None,
        "format": fmt,
        "rows_read": sum(p.rows_read for p in parts),
        "rows_used": len(mixed.train) + len(mixed.validation),
        "blank_answers": blank,
        "control_token_rows": controlled,
        **_split_stats(cfg, train, validation, test, truncated, dropped),
        "cache": "off" if cache_dir is None else ("hit" if all(s == "hit" for s in states) else "miss"),
        "sources": [
            {
                "path": p.source.path,
                "format": p.format,
                "rows_read": p.rows_read,
                "rows_available": len(p.samples),  # after data.limit and the rows left out
                "rows_used": mixed.drawn[i],  # copies included
                "weight": None if p.source.rows is not None else (p.source.weight or 1.0),
                "rows": p.source.rows,
                "repeated": mixed.repeated(i),
                "train": train_per_source[i],  # trainable rows in each split
                "validation": val_per_source[i],
                "cache": p.cache,
            }
            for i, p in enumerate(parts)
        ],
    }
    return DataBundle(train=train, validation=validation, test_samples=test_samples, test=test, format=fmt,
                      stats=stats, train_samples=train_samples, validation_samples=val_samples)


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

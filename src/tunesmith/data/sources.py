"""Several data sets in one run (`data.sources`): read each, then mix them by weight or row count with a seed.

Reading.  A source's `path` is, in this order:

    a file                  .jsonl / .json / .csv / .tsv / .parquet (data/read.py), or .arrow (Arrow IPC, file or
                            stream layout, read with pyarrow)
    a folder saved by       Hugging Face datasets' `save_to_disk` (a Dataset, or a DatasetDict whose `split` is
                            taken), read with `datasets.load_from_disk`: the format is that library's own, so
                            its reader is the one that knows it (whoever has such a folder has the library)
    a folder of shards      files of one kind (.parquet, .arrow, .jsonl, ...) anywhere under it, read in name
                            order as one data set; a bad row is named by its own file and row
    a hub data set id       owner/name that is no local path: `datasets.load_dataset(id, split=split)`, tried
                            only where the hub answers (asked once, HUB_PROBE_S seconds at most) or from the
                            local cache when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set; otherwise one sentence

and each source's rows become the common row shape (data/formats.py) with its own format, columns and system
prompt (each falls back to data.format, data.columns, data.system_prompt).  Every sentence about a source starts
with its config key, `data.sources[1].path` (counted from 0, as the list is in YAML).

Mixing (`mix`).  Each source offers its usable rows (after `data.limit`, which takes the first N rows of each
source, and after the rows left out for a blank answer or control tokens).  A source with `rows: N` gives
exactly N rows: a seeded choice of N when it has more, every row (repeated, in seeded passes) when it has fewer.
With no weight and no `rows` anywhere, every source gives each of its rows once (the sources are joined, as
axolotl's `datasets:` list and LLaMA-Factory's `dataset: a,b` do).  Once any source has a weight, the sources
without `rows` (weight 1 unless given) share out as many rows as they can without repeating any: the source that
runs out first sets the total T, and source i gives round(T * w_i / sum w).  The validation split
takes round(validation_split * n) of the n distinct rows, each source's share in proportion to its rows, and
the rows of all sources are shuffled together with `data.seed` (training rows and validation rows), so validation
holds rows of every source in proportion (shared out by largest remainder).  A repeated row is never split
across training and validation: the split is drawn over distinct rows, and a repeated source's extra copies are
drawn from its training rows.  The same seed gives the same mix; another seed another choice and order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from tunesmith.config import DataConfig, DataSourceConfig
from tunesmith.data.read import READABLE_SUFFIXES, Records, check_data_file, read_records, visible
from tunesmith.errors import UserError
from tunesmith.models import HUB_PROBE_S, ask_hub

log = logging.getLogger(__name__)

ARROW_SUFFIXES = (".arrow",)
SHARD_SUFFIXES = READABLE_SUFFIXES + ARROW_SUFFIXES
_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub reads as a true environment variable


def source_key(index: int) -> str:
    return f"data.sources[{index}]"


def data_origin(cfg: DataConfig) -> str:
    """The config key and files a run's rows come from, for a sentence: `data.path: FILE`, or
    `data.sources (a.jsonl, b.jsonl)`."""
    if cfg.sources:
        return "data.sources (" + ", ".join(source.path for source in cfg.sources) + ")"
    return f"data.path: {cfg.path}"


def source_config(cfg: DataConfig, source: DataSourceConfig) -> DataConfig:
    """The run's data settings with this source's format, columns and system prompt (falling back to the run's)."""
    return cfg.model_copy(update={
        "path": source.path,
        "sources": [],
        "format": source.format if source.format != "auto" else cfg.format,
        "columns": source.columns or cfg.columns,
        "system_prompt": source.system_prompt if source.system_prompt is not None else cfg.system_prompt,
    })


@contextlib.contextmanager
def about_source(key: str):
    """Sentences raised inside start with the source's key, and name its own keys (data.sources[1].columns, not
    data.columns)."""
    try:
        yield
    except UserError as exc:
        text = str(exc)
        for name in ("columns", "format", "system_prompt"):
            text = text.replace(f"data.{name}", f"{key}.{name}")
        raise UserError(text if text.startswith(key) else f"{key}.path: {text}") from None


# --- reading ------------------------------------------------------------------------------------------------


def read_source(source: DataSourceConfig, key: str) -> Records:
    """The rows of one source (see the module docstring); a UserError names `key`.path and says what to do."""
    with about_source(key):
        return read_path(source.path, source.split)


def needs_source_reader(value: str) -> bool:
    """Whether `value` is something only a source can name (a folder, an .arrow file, a hub id), not a data file
    that data/read.py reads."""
    path = Path(value).expanduser()
    if path.suffix.lower() in ARROW_SUFFIXES:
        return True
    return path.is_dir() if _exists(path) else _is_hub_id(value)


def named_source(value: str, cfg: DataConfig) -> tuple[int, DataSourceConfig] | None:
    """(index, source) of the first of cfg.sources whose path is `value` (the same file or folder), or None."""
    def same(a: str, b: str) -> bool:
        try:
            return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
        except (OSError, ValueError, RuntimeError):
            return False

    return next(((i, s) for i, s in enumerate(cfg.sources) if same(s.path, value)), None)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for a path, a NUL character
        return False


def read_path(value: str, split: str = "train") -> Records:
    """The rows at a source's path: a data file, an .arrow file, a save_to_disk or shards folder, a hub id."""
    path = Path(value).expanduser()
    exists = _exists(path)
    if not exists and _is_hub_id(value):
        return _read_hub(value, split)
    if exists and path.is_dir():
        return _read_folder(path, split)
    check_data_file(path)  # missing, a pipe, a device: its sentence
    if path.suffix.lower() in ARROW_SUFFIXES:
        return Records(_arrow_rows(path), path)
    return read_records(path)


def _is_hub_id(value: str) -> bool:
    """owner/name as the hub writes ids (no file extension we read, no leading ./ or /)."""
    if value.count("/") != 1 or value.startswith((".", "/", "~")) or Path(value).suffix.lower() in SHARD_SUFFIXES:
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _arrow_rows(path: Path) -> list[dict]:
    """Rows of an Arrow IPC file: the random-access file layout, or the stream layout (what datasets writes)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_stream(source).read_all()
        return table.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{visible(path, None)}: not a readable Arrow file ({visible(exc)}); write it again with "
                        "pyarrow or datasets, or give a .parquet or .jsonl file.") from None


def _read_folder(path: Path, split: str) -> Records:
    name = visible(path, None)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_saved(path, split)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SHARD_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UserError(
            f"{name} is a folder, but not one saved with Hugging Face datasets' save_to_disk (it has no "
            f"dataset_dict.json or state.json) nor a folder of data shards (no {', '.join(SHARD_SUFFIXES)} files in "
            "it); point path at a data file, a save_to_disk folder or a folder of shards."
        )
    kinds = sorted({p.suffix.lower() for p in files})
    if len(kinds) > 1:
        raise UserError(f"{name} holds data files of several kinds ({', '.join(kinds)}), and a folder of shards holds "
                        "one kind; point path at one of the files, or move the others out.")
    rows, numbers, paths = [], [], []
    for file in files:
        part = Records(_arrow_rows(file), file) if kinds[0] in ARROW_SUFFIXES else read_records(file)
        rows.extend(part)
        numbers.extend(part.row_numbers)
        paths.extend([str(file)] * len(part))
    unit = "line" if kinds[0] in (".jsonl", ".ndjson") else "row"
    return Records(rows, path, numbers, unit, row_paths=paths)


def _datasets_library(what: str):
    try:
        import datasets
    except ImportError:
        raise UserError(f"reading {what} needs Hugging Face's datasets package: pip install 'tunesmith[datasets]' "
                        "(or pip install datasets).") from None
    return datasets


def _read_saved(path: Path, split: str) -> Records:
    name = visible(path, None)
    datasets = _datasets_library(f"{name}, a folder saved with save_to_disk,")
    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, OSError, ValueError, KeyError) as exc:
        raise UserError(f"{name}: looks saved with datasets' save_to_disk but cannot be read ({visible(exc)}); save "
                        "it again with save_to_disk, or export it to .parquet or .jsonl.") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UserError(f"{name} holds the splits {', '.join(visible(s, 60) for s in data)}, not "
                            f"'{visible(split, 60)}'; set split to one of them.")
        return Records(data[split].to_list(), f"{path} (split {split})")
    return Records(data.to_list(), path)


def _offline_by_environment() -> bool:
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _read_hub(repo_id: str, split: str) -> Records:
    """A hub data set's split, where the hub answers (or from the local cache in offline mode)."""
    name = visible(repo_id, 200)
    here = f"{name} is no file or folder here (looked for {visible(Path(repo_id).absolute(), None)}), so it was read " \
           "as a Hugging Face hub data set id"
    elsewhere = (f"download it where the hub is reachable (datasets.load_dataset('{name}', split='{visible(split, 60)}')"
                 ".save_to_disk(DIR)) and point path at DIR")
    datasets = _datasets_library(f"the hub data set {name}")
    if not datasets.config.HF_HUB_OFFLINE:  # (read when datasets was imported; the environment may say so since)
        if _offline_by_environment():
            raise UserError(f"{here}, but the hub is switched off (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set); "
                            f"{elsewhere}.")
        _ask_hub(repo_id, here, elsewhere)
    try:
        data = datasets.load_dataset(repo_id, split=split)
    except ConnectionError as exc:  # offline and not in the local cache, or the hub went away
        raise UserError(f"{here}, and it could not be fetched ({visible(exc)}); {elsewhere}.") from None
    except (FileNotFoundError, ValueError) as exc:  # no such data set; no such split
        raise UserError(f"{here}, and datasets could not load it ({visible(exc)}); check the id and split, or "
                        f"{elsewhere}.") from None
    return Records(data.to_list(), f"{repo_id} (split {split})")


def _ask_hub(repo_id: str, here: str, elsewhere: str) -> None:
    """Ask the hub once whether the data set is there, so that an unreachable hub is a sentence within HUB_PROBE_S
    seconds rather than after datasets' retries (about 25 s)."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    answered, exc = ask_hub(lambda: huggingface_hub.HfApi().dataset_info(repo_id, timeout=HUB_PROBE_S))
    if answered and exc is None:
        return
    if isinstance(exc, RepositoryNotFoundError):
        raise UserError(f"{here}, and the hub has no such data set (or it is private: log in with `hf auth login`); "
                        "check the path.")
    reason = f"no answer within {HUB_PROBE_S:g} s" if not answered else \
        f"{type(exc).__name__}: {visible((str(exc).strip().splitlines() or [''])[0], 200)}"
    raise UserError(f"{here}, and the hub could not be reached ({reason}); {elsewhere}.")


# --- mixing -------------------------------------------------------------------------------------------------


@dataclass
class Mix:
    """Which rows of which sources a run uses: (source index, row index) pairs, copies included."""

    train: list[tuple[int, int]]
    validation: list[tuple[int, int]]
    drawn: list[int]  # rows each source gives, copies included
    available: list[int]

    def repeated(self, index: int) -> bool:
        return self.drawn[index] > self.available[index]


def source_counts(available: list[int], sources: list[DataSourceConfig]) -> list[int]:
    """Rows each source gives (the rule in the module docstring); exact arithmetic, so 3:1 stays 3:1."""
    if all(source.weight is None and source.rows is None for source in sources):
        return list(available)  # no ratio asked for: every row of every source once
    counts = [source.rows or 0 for source in sources]
    weighted = [i for i, source in enumerate(sources) if source.rows is None]
    if weighted:
        weights = {i: Fraction(sources[i].weight if sources[i].weight is not None else 1) for i in weighted}
        total_weight = sum(weights.values())
        total = min(available[i] * total_weight / weights[i] for i in weighted)  # the first to run out sets it
        for i in weighted:
            counts[i] = min(available[i], round(total * weights[i] / total_weight))
    return counts


def mix(available: list[int], sources: list[DataSourceConfig], seed: int, validation_split: float) -> Mix:
    """The seeded mix of the sources' rows and its split (validation_split 0: every row trains)."""
    counts = source_counts(available, sources)
    chosen = []  # each source's distinct rows, in a seeded order
    for i, (count, n) in enumerate(zip(counts, available)):
        order = list(range(n))
        random.Random(f"{seed}-source-{i}").shuffle(order)
        chosen.append(order[: min(count, n)])
    quotas = held_out_quotas([len(rows) for rows in chosen], validation_split)
    train, validation = [], []
    for i, (rows, quota) in enumerate(zip(chosen, quotas)):
        validation.extend((i, j) for j in rows[:quota])
        train.extend((i, j) for j in rows[quota:])
        if counts[i] > len(rows) and len(rows) > quota:  # rows: N beyond what the source has: whole seeded passes
            trained = rows[quota:]  # over its training rows (never a validation row), then part of one
            rng = random.Random(f"{seed}-repeat-{i}")
            missing = counts[i] - len(rows)
            while missing:
                rng.shuffle(trained)
                train.extend((i, j) for j in trained[:missing])
                missing -= min(missing, len(trained))
    random.Random(seed).shuffle(train)
    random.Random(seed).shuffle(validation)
    drawn = [sum(1 for pair in train + validation if pair[0] == i) for i in range(len(sources))]
    return Mix(train=train, validation=validation, drawn=drawn, available=list(available))


def held_out_quotas(distinct: list[int], validation_split: float) -> list[int]:
    """Validation rows per source: round(validation_split * n) of all n rows (at least 1 when n >= 2, as with one
    file), shared out in proportion to each source's rows by largest remainder, each source keeping a row to
    train on."""
    n = sum(distinct)
    if validation_split <= 0 or n < 2:
        return [0] * len(distinct)
    held = min(max(round(validation_split * n), 1), n - 1)
    quotas = [min(held * d // n, max(d - 1, 0)) for d in distinct]
    by_remainder = sorted(range(len(distinct)), key=lambda i: (-(held * distinct[i] % n), i))
    while sum(quotas) < held:
        room = [i for i in by_remainder if quotas[i] < distinct[i] - 1]
        if not room:
            break
        for i in room[: held - sum(quotas)]:
            quotas[i] += 1
    return quotas


def describe_mix(mixed: Mix, sources: list[DataSourceConfig]) -> str:
    """The log line: 'data: 750 rows from a.jsonl (weight 3), 250 from b.jsonl (weight 1)'."""
    parts = []
    for i, source in enumerate(sources):
        how = f"rows: {source.rows}" if source.rows is not None else f"weight {_number(source.weight or 1)}"
        if mixed.repeated(i):
            how += f", its {mixed.available[i]} rows repeated"
        elif mixed.drawn[i] < mixed.available[i]:
            how += f", of {mixed.available[i]}"
        rows = f" row{'s' if mixed.drawn[i] != 1 else ''}" if i == 0 else ""
        parts.append(f"{mixed.drawn[i]}{rows} from {visible(source.path, 120)} ({how})")
    return "data: " + ", ".join(parts)


def _number(value: float) -> str:
    return f"{value:g}"

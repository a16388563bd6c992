"""Data: read files, bring every format to one row shape, tokenise with the model's chat template, split.

read_records(path)                     JSON / JSONL / CSV / Parquet → rows that know their line numbers
detect_format(records, columns)        alpaca | messages | sharegpt | prompt_completion | text
to_samples(records, cfg, path)         rows → {"messages": [...]} or {"text": ...}
tokenize_sample(sample, tokenizer, cfg) → TokenizedRow (prompt tokens masked with -100)
build_datasets(cfg, tokenizer)         → DataBundle (train / validation / test, stats); with data.sources,
                                         several data sets read, tokenised and cached one by one, then mixed
                                         (data/sources.py; tokenising in a pool of processes: data/tokenizing.py)
inspect_file(path, tokenizer, cfg)     → a report for `tunesmith data inspect`
"""

from tunesmith.data.build import DataBundle, build_datasets, percentiles, resolve_data_path, split_indices
from tunesmith.data.formats import FORMATS, detect_format, prompt_and_reference, prompt_and_references, to_samples
from tunesmith.data.inspection import format_inspection, inspect_file
from tunesmith.data.read import Records, read_records
from tunesmith.data.sources import data_origin
from tunesmith.data.tokens import (
    IGNORE_INDEX,
    TokenizedRow,
    encode_prompt,
    ensure_chat_template,
    mask_prompt_tokens,
    tokenize_sample,
)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "DataBundle",
    "Records",
    "TokenizedRow",
    "build_datasets",
    "data_origin",
    "detect_format",
    "encode_prompt",
    "ensure_chat_template",
    "format_inspection",
    "inspect_file",
    "mask_prompt_tokens",
    "percentiles",
    "prompt_and_reference",
    "prompt_and_references",
    "read_records",
    "resolve_data_path",
    "split_indices",
    "to_samples",
    "tokenize_sample",
]

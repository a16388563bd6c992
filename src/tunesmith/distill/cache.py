"""Offline distillation: the teacher's top-k log-probs per trained token, computed once and kept on disk.

Layout of a cache folder:
- `shard-00000.safetensors`, ...: for each training row, `<key>.indices` [n, k] int32 and `<key>.logprobs`
  [n, k] float32 (log p_T, temperature applied), n = the row's trained tokens in order; `<key>` is a hash of
  the row's token ids, so a row is found wherever the batching puts it;
- `manifest.json`: teacher, temperature, top_k, vocabulary size, tokenizer fingerprint, and every shard's
  rows and SHA-256.  It is written last (temporary name, then renamed): a folder without it is unfinished.
Shards are checked against their checksums when the cache is opened; a cache made with another teacher,
temperature or top_k is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from tunesmith.data.tokens import IGNORE_INDEX
from tunesmith.distill.loss import SparseTeacher
from tunesmith.distill.teacher import teacher_trained_hidden
from tunesmith.errors import UserError
from tunesmith.fileio import atomic_write_json, sha256_file
from tunesmith.train.loss import LOSS_CHUNK_TOKENS

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ROWS_PER_SHARD = 512
FORMAT_VERSION = 1


def row_key(ids) -> str:
    """The cache key of a row: a hash of its token ids."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:32]


def describe(teacher_label: str, temperature: float, top_k: int, vocab: int, tokenizer_fingerprint: str) -> dict:
    """What a cache must have been made with to be reused."""
    return {"format": FORMAT_VERSION, "teacher": teacher_label, "temperature": temperature, "top_k": top_k,
            "vocab_size": vocab, "tokenizer": tokenizer_fingerprint}


@torch.no_grad()
def build_cache(folder: Path, teacher, units, about: dict) -> None:
    """Run the teacher over `units` ((unit, rows) pairs: a padded batch or a packed pass and the row objects in
    it, in order) and write the cache described by `about` into `folder` (which must be new or empty)."""
    from safetensors.torch import save_file


    folder.mkdir(parents=True, exist_ok=True)
    temperature, k = about["temperature"], about["top_k"]
    shards, pending, seen = [], {}, set()

    def flush() -> None:
        name = f"shard-{len(shards):05d}.safetensors"
        partial = folder / (name + ".partial")
        save_file(pending, str(partial), metadata={"teacher": about["teacher"]})
        os.replace(partial, folder / name)
        shards.append({"file": name, "rows": len(pending) // 2, "sha256": sha256_file(folder / name)})
        pending.clear()

    done = 0
    for unit, rows in units:
        hidden, head = teacher_trained_hidden(teacher, unit)  # [N, H]
        parts_idx, parts_logp = [], []
        for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
            logp = torch.log_softmax(head(hidden[start : start + LOSS_CHUNK_TOKENS]).float() / temperature, dim=-1)
            values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)  # [n, k], largest first
            parts_idx.append(indices.to(torch.int32).cpu())
            parts_logp.append(values.cpu())
        indices, logprobs = torch.cat(parts_idx), torch.cat(parts_logp)
        at = 0
        for row in rows:
            n = sum(1 for label in row.labels[1:] if label != IGNORE_INDEX)
            key = row_key(row.input_ids)
            if key not in seen:  # a duplicated row is stored once
                seen.add(key)
                pending[f"{key}.indices"] = indices[at : at + n].contiguous()
                pending[f"{key}.logprobs"] = logprobs[at : at + n].contiguous()
            at += n
        if at != indices.shape[0]:
            raise RuntimeError(f"teacher cache: {indices.shape[0]} trained positions in a unit, {at} in its rows")
        done += len(rows)
        if len(pending) // 2 >= ROWS_PER_SHARD:
            flush()
            log.info(f"teacher cache: {done} rows")
    if pending:
        flush()
    atomic_write_json(folder / MANIFEST, {**about, "rows": len(seen), "shards": shards})


class TeacherCache:
    """An opened, checked cache: `lookup(rows)` gives a SparseTeacher for the trained tokens of those rows."""

    def __init__(self, folder: Path, about: dict):
        from safetensors import safe_open

        manifest_file = folder / MANIFEST
        if not manifest_file.is_file():
            raise UserError(f"distill.cache_dir: {folder} has no {MANIFEST}, so it is not a finished teacher cache; "
                            "give an empty or new folder to build one there.")
        manifest = json.loads(manifest_file.read_text())
        differs = [f"{key} {manifest.get(key)!r} (this run: {value!r})" for key, value in about.items()
                   if manifest.get(key) != value]
        if differs:
            raise UserError(f"distill.cache_dir: the teacher cache in {folder} was made with another "
                            f"{'; '.join(differs)}; point distill.cache_dir at a new folder to build a fresh one.")
        self.folder, self.files, self.where = folder, [], {}
        for shard in manifest["shards"]:
            path = folder / shard["file"]
            if not path.is_file() or sha256_file(path) != shard["sha256"]:
                raise UserError(f"{path}: missing or not what the cache's {MANIFEST} recorded (checksum differs); "
                                f"delete {folder} and run with --cache-teacher again to rebuild it.")
            handle = safe_open(str(path), framework="pt")
            self.files.append(handle)
            for name in handle.keys():
                if name.endswith(".indices"):
                    self.where[name.removesuffix(".indices")] = handle
        self.rows = manifest["rows"]

    def lookup(self, rows_ids: list, counts: list[int]):
        """The SparseTeacher for rows with these token ids, each with this many trained tokens."""

        indices, logprobs = [], []
        for ids, n in zip(rows_ids, counts):
            key = row_key(ids)
            handle = self.where.get(key)
            if handle is None:
                raise UserError(f"the teacher cache in {self.folder} has no entry for a training row (its data or "
                                "tokenisation changed since it was made); give distill.cache_dir a new folder.")
            idx = handle.get_tensor(f"{key}.indices")
            if idx.shape[0] != n:
                raise UserError(f"the teacher cache in {self.folder} holds {idx.shape[0]} tokens for a row that "
                                f"trains {n} now (the label masking changed); give distill.cache_dir a new folder.")
            indices.append(idx.long())
            logprobs.append(handle.get_tensor(f"{key}.logprobs"))
        return SparseTeacher(torch.cat(indices), torch.cat(logprobs))

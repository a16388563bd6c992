"""Tokenise many rows: in this process, or side by side in a pool of worker processes when that pays off.

Tokenising a row renders the chat template a few times (data/tokens.py masks the prompt by rendering it prefix
by prefix): about 0.3 ms for a short row and a few ms for a long conversation on one core, all of it Python and
the tokenizer's own Rust code.  A pool costs a couple of seconds to start (its server process imports torch and
transformers once; measured on 2 CPU cores), so it is used only when it pays off: with PARALLEL_MIN_ROWS rows or
more, the first CHUNK_ROWS are tokenised here and timed, and the rest go to the pool when they would take this
process more than POOL_PAYS_OFF_S seconds.  Small data never starts one, so tests stay fast.

The pool starts its workers from a clean `forkserver` process where the platform has one (else `spawn`), never
by forking the training process itself: that process may already hold threads (torch's, tqdm's, a logging
handler's lock) that a forked child would inherit stopped.  Each worker turns the tokenizers library's own
thread pool off (TOKENIZERS_PARALLELISM=false, as its fork warning asks): the parallelism here is one row per
process.  Rows come back in their order, the same rows one process gives.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from tqdm.auto import tqdm

from tunesmith.config import DataConfig
from tunesmith.data.tokens import TokenizedRow, tokenize_sample
from tunesmith.errors import UserError
from tunesmith.hardware import cpu_threads

log = logging.getLogger(__name__)

PARALLEL_MIN_ROWS = 2000  # fewer rows than this are tokenised in this process whatever data.num_workers says
POOL_PAYS_OFF_S = 5.0  # a pool for the rest of the rows when they would take this process longer than this
PROGRESS_MIN_ROWS = 2000  # a progress bar from this many rows (about a second's work or more)
CHUNK_ROWS = 500  # rows a worker tokenises per task: few enough tasks to keep the bar moving, few enough messages


def worker_count(setting: int | str, rows: int) -> int:
    """How many processes tokenise `rows` rows under data.num_workers `setting` (auto: one per core)."""
    if rows < PARALLEL_MIN_ROWS:
        return 1
    wanted = cpu_threads() if setting == "auto" else int(setting)
    return max(1, min(wanted, -(-rows // CHUNK_ROWS) - 1))  # no more workers than chunks after the timed one


def tokenize_rows(samples: list[dict], places: list[str], tokenizer, cfg: DataConfig, task: str = "causal_lm",
                  desc: str = "tokenising", tokenize=tokenize_sample) -> list[TokenizedRow]:
    """Every sample's ids and labels, in order (rows with nothing to train on included: the caller decides);
    a row the tokenizer or its template refuses is a UserError that starts with the row's place.  `tokenize`
    turns one sample into a row (data/tokens.py's tokenize_sample; the caller names it, so that a test can
    count what is tokenised)."""
    workers = worker_count(cfg.num_workers, len(samples))
    bar = tqdm(total=len(samples), desc=desc, unit="row", leave=False, disable=len(samples) < PROGRESS_MIN_ROWS)
    try:
        if workers == 1:
            return _tokenize_here(samples, places, tokenizer, cfg, task, tokenize, bar)
        started = time.perf_counter()
        rows = _tokenize_here(samples[:CHUNK_ROWS], places[:CHUNK_ROWS], tokenizer, cfg, task, tokenize, bar)
        rest = len(samples) - CHUNK_ROWS
        if (time.perf_counter() - started) / CHUNK_ROWS * rest > POOL_PAYS_OFF_S:
            try:
                return rows + _tokenize_in_pool(samples[CHUNK_ROWS:], places[CHUNK_ROWS:], tokenizer, cfg, task,
                                                tokenize, workers, bar)
            except (OSError, BrokenProcessPool) as exc:  # no processes to be had here, or one was killed (memory)
                log.warning(f"data: tokenising in {workers} processes failed ({exc}); tokenising in this one instead")
                bar.n = CHUNK_ROWS
        return rows + _tokenize_here(samples[CHUNK_ROWS:], places[CHUNK_ROWS:], tokenizer, cfg, task, tokenize, bar)
    finally:
        bar.close()


def _tokenize_here(samples, places, tokenizer, cfg: DataConfig, task: str, tokenize, bar=None) -> list[TokenizedRow]:
    rows = []
    for sample, place in zip(samples, places):
        try:
            rows.append(tokenize(sample, tokenizer, cfg, task))
        except UserError as exc:
            raise UserError(f"{place}: {exc}") from None
        if bar is not None:
            bar.update(1)
    return rows


def _tokenize_in_pool(samples, places, tokenizer, cfg: DataConfig, task: str, tokenize, workers: int,
                      bar) -> list[TokenizedRow]:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # The server imports this module (and transformers, torch) once; each worker forks from it ready to go.
        # (Only the first pool of a process starts the server, so this holds from then on.)
        context.set_forkserver_preload([__name__])
    else:
        context = multiprocessing.get_context("spawn")
    starts = range(0, len(samples), CHUNK_ROWS)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(tokenizer, cfg, task, tokenize)) as pool:
        futures = [pool.submit(_tokenize_chunk, samples[s:s + CHUNK_ROWS], places[s:s + CHUNK_ROWS]) for s in starts]
        rows: list[TokenizedRow] = []
        for future in futures:  # in order; the bar moves as each chunk comes back
            try:
                chunk = future.result()
            except UserError as exc:  # raised in a worker: the same sentence, without the pool's traceback
                for waiting in futures:
                    waiting.cancel()
                raise UserError(str(exc)) from None
            rows.extend(chunk)
            bar.update(len(chunk))
    return rows


_worker: dict = {}  # what a worker process tokenises with, set once by _start_worker


def _start_worker(tokenizer, cfg: DataConfig, task: str, tokenize) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=tokenizer, cfg=cfg, task=task, tokenize=tokenize)


def _tokenize_chunk(samples: list[dict], places: list[str]) -> list[TokenizedRow]:
    w = _worker
    return _tokenize_here(samples, places, w["tokenizer"], w["cfg"], w["task"], w["tokenize"])

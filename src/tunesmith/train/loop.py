"""The training run, visible in one place.

`run_training` goes config -> model -> data -> (before) -> train -> (after) -> run folder, each setup step a
`_setup_*` function.  The loop is `_train_steps` with `_train_step` for one optimiser step; in outline:

    while progress.step < total_steps:                     # epochs, micro-batches shuffled by (seed, epoch)
        for each window of `window` micro-batches:         # one optimiser step, over all processes
            units = the window's passes (packed or padded), micro-batch j owned by process j % processes
            window_tokens = the trained tokens of the whole window (every process counts them all)
            for unit, weight in parallel.passes(units):     # this process's share of the passes
                nll = parallel.forward(loss_sum, unit)      # summed NLL, inside the mode's weight gathering
                parallel.backward(nll * weight * parallel.loss_scale / window_tokens)
            step_nll, stop = parallel.reduce(step_nll, stop)  # summed over the processes
            loss = step_nll / window_tokens;  grad_norm = parallel.step(optimizer)   # clip + step
            after_optimizer_step(model); scheduler.step(); parallel.zero_grad(optimizer)
            log loss, grad norm, lr, tokens/s and memory to metrics.jsonl
            every eval_steps: validate (early stopping);  every save_steps: checkpoint
            SIGINT/SIGTERM: checkpoint and stop;  at each epoch's end: validate, checkpoint

With `objective` other than sft a recipe (tunesmith/prefer/) makes the units (a micro-batch's chosen and rejected
answers in one pass; GRPO: its sampled groups) and their summed loss, and the step divides by its examples (pairs,
answers) instead of tokens; see `run_training`.

Each step divides each pass's summed NLL by the step's count of trained (unmasked) tokens before `backward`,
so every token weighs the same however the tokens fall across micro-batches, passes and processes
(torchtune's recipes do the same; averaging per micro-batch would over-weight short ones).  What differs
between one process, DDP, FSDP and DeepSpeed ZeRO is the `parallel` object (train/parallel/): which passes
this process runs, how gradients are reduced, clipped and stepped, and how checkpoints gather the weights.
Where the loop stands is a `Progress` (train/progress.py), saved whole in every checkpoint.

Memory levers, and what they cost:
- LoRA (`method: lora`) trains small adapters; the base weights need no gradients
  or optimiser state.  `method: full` trains everything and needs ~4x the weights
  in memory for AdamW.
- The loss never builds the full [tokens x vocab] logits (see `train/loss.py`).
- `data.max_length` bounds activation memory per row; `training.batch_size` scales it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunesmith.config import Config, resolved_yaml
from tunesmith.data import build_datasets, data_origin
from tunesmith.data.batching import epoch_order, iter_batches
from tunesmith.errors import UserError
from tunesmith.fileio import atomic_write_dir, atomic_write_json, atomic_write_text
from tunesmith.hardware import (
    cpu_threads,
    detect_device,
    memory_snapshot,
    peak_rss_bytes,
    release_free_memory,
    resolve_dtype,
)
from tunesmith.models import check_max_length, load_model, load_tokenizer, resolve_model_source, tunesmith_home
from tunesmith.models.adapters import after_optimizer_step, count_parameters, extra_loss, prepare_trainable
from tunesmith.models.fast import dropout_rows, fast_kernels, forget_shared_mask, kernel_mode, new_mask_seed
from tunesmith.models.loader import model_task
from tunesmith.models.tasks import MASKED_LM, SEQ2SEQ
from tunesmith.train import distributed
from tunesmith.train import loss as loss_fns
from tunesmith.train.advice import advise
from tunesmith.train.checkpoint import (
    STATE_FILE,
    list_checkpoints,
    load_checkpoint,
    load_trainable,
    newest_valid_checkpoint,
    prune_checkpoints,
    set_trainable,
)
from tunesmith.train.compute import autocast_dtype, enable_gradient_checkpointing, want_gradient_checkpointing
from tunesmith.train.metrics_log import MetricsLog, read_metrics
from tunesmith.train.objective import Objective
from tunesmith.train.optim import make_optimizer
from tunesmith.train.packing import make_pass, packed_attention, plan_passes, resolve_pass_tokens, want_packing
from tunesmith.train.parallel import Parallel, choose_parallel
from tunesmith.train.progress import Progress
from tunesmith.train.report import health_check, plot_training, render_report
from tunesmith.train.status import write_status
from tunesmith.train.trackers import finish_trackers, open_trackers, start_trackers
from tunesmith.train.validation import heldout_loss

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """What the setup steps found and decided, filled in as they run; the loop and the summary read it."""

    device: str  # "cpu", "cuda", ...
    dtype: torch.dtype  # the weights'
    half: torch.dtype | None  # autocast's, or None
    source: str = ""  # the model's folder
    task: str = ""
    tokenizer: object = None
    bundle: object = None  # the tokenised train / validation / test rows (tunesmith.data)
    objective: Objective | None = None
    evaluator: object = None  # the caller's before/after evaluation, on the first process
    base_eval: dict | None = None  # the base model's scores
    window: int = 1  # micro-batches per optimiser step, over all processes
    packing: bool = False
    pass_tokens: int | None = None  # with packing: the most tokens in one pass
    checkpointing: bool = False  # gradient checkpointing
    kernels: str = "off"  # training.fast_kernels as it applies on this device (models.fast.kernel_mode)
    per_epoch: int = 1  # optimiser steps
    total_steps: int = 1
    trainable: int = 0  # parameters
    total_params: int = 0
    estimate: dict | None = None  # what tunesmith.plan.estimate said before the run (put beside what it measured)
    recipe: object = None  # a preference/reward objective's hooks (tunesmith.prefer), or None for SFT
    trackers: list = field(default_factory=list)  # logging.report_to's (train/trackers.py), on the first process


@dataclass
class Training:
    """What the loop trains with and writes to; where it stands is the `Progress` beside it."""

    cfg: Config
    run_dir: Path
    setup: Setup
    parallel: Parallel
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_sum: Callable  # (model, unit) -> the unit's summed NLL
    autocast: contextlib.AbstractContextManager  # torch.autocast to the 16-bit type, or nothing
    metrics_log: MetricsLog
    last_saved: int  # the step of the newest checkpoint
    stop_requested: dict | None = None  # {"signal": name or None}, set by SIGINT/SIGTERM
    bar: tqdm | None = None


@dataclass
class Step:
    """What one optimiser step gives the log."""

    loss: float
    grad_norm: float
    lr: float
    trained_tokens: int
    stop: bool  # a stop requested of any process, as `reduce` agreed it (see Parallel.stop_now)
    extra: dict | None = None  # the recipe's own numbers for the log (rewards, accuracy, ...), this process's share


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def _make_scheduler(optimizer, cfg: Config, total_steps: int):
    from transformers import get_scheduler

    t = cfg.training
    warmup = t.warmup_steps or int(round(t.warmup_ratio * total_steps))
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def plan_steps(n_train_rows: int, cfg: Config, window: int | None = None) -> tuple[int, int]:
    """(optimiser steps per epoch, total optimiser steps) for this data and config; `window` is the micro-batches
    per optimiser step over all processes (default: training.gradient_accumulation, one process)."""
    t = cfg.training
    micro_batches = math.ceil(n_train_rows / t.batch_size)
    per_epoch = max(1, math.ceil(micro_batches / (window or t.gradient_accumulation)))
    total = max(1, math.ceil(per_epoch * t.epochs))
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    return per_epoch, total


def run_training(cfg: Config, run_dir: Path, resume: bool = False, distiller=None, evaluation=None,
                 estimate: dict | None = None, recipe=None) -> dict:
    """Train as the config says and fill `run_dir`; returns the summary written to summary.json.

    `evaluation` (e.g. `tunesmith.evaluate.suite.BeforeAfter`), when given and `eval.enabled`, is called as
    `evaluation(cfg, bundle, tokenizer, task, device, objective)`; the object it makes scores the base
    model (`.before(model)`, before training) and the tuned one (`.after(model, base, run_dir)`, at the end).

    With `resume`, continue from the newest valid checkpoint in `run_dir/checkpoints`.  With `distiller`
    (a `tunesmith.distill.run.Distiller`, causal LMs only), each unit's loss is its distillation loss
    instead of the cross-entropy; validation stays cross-entropy.  `estimate` (tunesmith.plan's, as JSON) goes
    into summary.json and report.md beside the peak memory and time the run measured.

    `recipe` (tunesmith.prefer's, for `objective` dpo, ipo, orpo, simpo, kto, grpo) changes what the data is, what a
    micro-batch runs as and what its loss is, through the hooks `build_data`, `start`, `units`, `counts`,
    `begin_step`, `loss_sum`, `step_metrics`, `heldout` and `summary` (see tunesmith/prefer/recipe.py); the step
    then averages the loss over the recipe's examples (pairs, answers, groups) instead of over tokens.

    `cfg.logging.report_to` names experiment trackers (train/trackers.py): the first process starts their runs once
    the run folder exists, hands them every metrics.jsonl record, and at the end the summary and the run's files;
    a run that fails or is stopped ends their runs as failed or killed.
    """
    started = time.time()
    seed_everything(cfg.training.seed)
    cfg, setup, parallel = _setup_processes(cfg)
    setup.estimate = estimate
    setup.recipe = recipe
    # logging.report_to: the first process reports; a missing package is a sentence before anything loads
    setup.trackers = open_trackers(cfg.logging, run_dir) if parallel.world.main else []
    checkpoint, saved = _setup_resume(run_dir, resume)
    setup.window = _setup_window(cfg, parallel.world, saved)
    try:
        _setup_data(cfg, run_dir, setup, parallel, distiller)
        start_trackers(setup.trackers, cfg, run_dir, saved.step if saved is not None else None)
        model = _setup_model(cfg, setup, parallel.device)
        _setup_evaluation(evaluation, cfg, setup, parallel, model, saved)
        _setup_levers(cfg, setup, model)
        model = _setup_trainable(cfg, setup, parallel, model)
        training, progress = _setup_training(cfg, run_dir, setup, parallel, model, checkpoint, distiller)
        if recipe is not None:
            recipe.start(parallel.unwrap(training.model), run_dir, parallel.world.main, setup.packing,
                         parallel.device, cfg.training.eval_batch_size, setup.bundle)
        del model  # the loop's (in `training`) from here: a sharded run drops it before loading the base again

        _train(training, progress)

        model = _whole_model(training)
        if not parallel.world.main:  # what follows (best weights, saving, evaluating, the report) is the first's
            return {"run_dir": str(run_dir), "rank": parallel.world.rank,
                    "train": progress.train_stats(setup.per_epoch)}
        return _finish(cfg, run_dir, setup, parallel, model, progress, started)
    except BaseException as exc:  # the trackers' runs end too, marked as stopped or failed
        _abandon_trackers(setup.trackers, exc)
        raise


def _abandon_trackers(trackers: list, exc: BaseException) -> None:
    """Close the trackers' runs of a run that stopped (a signal: killed) or failed (a tracker's own failure to
    close is a warning, so the run's error is the one raised)."""
    finish_trackers(trackers, None, [], "killed" if isinstance(exc, (TrainingInterrupted, KeyboardInterrupt)) else "failed")


# --- setup, in the order run_training calls it


def _setup_processes(cfg: Config) -> tuple[Config, Setup, Parallel]:
    """This process: its device and threads, its place among the processes (and the strategy a launcher chose),
    the precision, and the parallel mode."""
    from accelerate import Accelerator

    t = cfg.training
    device = detect_device()
    world = distributed.start(device, cfg.distributed.timeout_s)  # one process of several, or alone
    if world.size > 1:
        cfg = distributed.strategy_from_launcher(cfg)
    if device == "cpu":  # several processes on one machine share its cores out
        torch.set_num_threads(t.num_threads or max(1, cpu_threads() // world.local_size))
    dtype = resolve_dtype(cfg.model.dtype, device)
    half = autocast_dtype(t.autocast, device, dtype)
    # Autocast is ours (torch.autocast in the loop), not accelerate's mixed_precision: accelerate keeps that
    # setting in a process-wide singleton that refuses to change, and one process may train twice.
    accelerator = Accelerator(cpu=device == "cpu")
    return cfg, Setup(device=device, dtype=dtype, half=half), choose_parallel(cfg, world, accelerator, half)


def _setup_resume(run_dir: Path, resume: bool) -> tuple[Path | None, Progress | None]:
    """With `resume`: the newest valid checkpoint, and the progress saved in it."""
    if not resume:
        return None, None
    checkpoint = newest_valid_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(
            f"--resume: {run_dir / 'checkpoints'} holds no complete checkpoint to continue from; "
            "run again without --resume (into a new --output folder)."
        )
    log.info(f"resuming from {checkpoint}")
    return checkpoint, Progress.from_dict(json.loads((checkpoint / STATE_FILE).read_text())["progress"])


def _setup_window(cfg: Config, world: distributed.World, saved: Progress | None) -> int:
    """The micro-batches per optimiser step over all processes: a resumed run keeps its checkpoint's, whatever
    the number of processes now, so it takes the same steps as the run that was stopped."""
    t = cfg.training
    if saved is None:
        return t.gradient_accumulation * world.size
    window = saved.window if saved.window is not None else t.gradient_accumulation
    if window != t.gradient_accumulation * world.size:
        log.info(f"the checkpoint's steps take {window} micro-batches of {t.batch_size} rows; kept, so on {world.size} "
                 f"process(es) each runs {window / world.size:g} of them per step")
    return window


def _setup_data(cfg: Config, run_dir: Path, setup: Setup, parallel: Parallel, distiller) -> None:
    """The model's source, tokenizer and task, then the data (tokenising needs the tokenizer's chat template);
    the run folder appears only once both are known to be readable."""
    setup.source = resolve_model_source(cfg.model.name)
    setup.tokenizer = load_tokenizer(setup.source, cfg.model)
    setup.task = model_task(setup.source, cfg)
    check_max_length(cfg, setup.source)
    parallel.refuse_unsupported(setup.task, distiller is not None)
    if distiller is not None and setup.task != "causal_lm":
        raise UserError(f"model.name: {cfg.model.name} is a {setup.task} model; distillation here is for causal "
                        "language models (the student and the teacher).")
    if setup.task == MASKED_LM and setup.tokenizer.mask_token_id is None:
        raise UserError(
            f"model.name: {cfg.model.name} is a masked-language model, but its tokenizer has no mask token to hide "
            "words with; use the tokenizer the model was trained with, or set model.task to what the model is."
        )
    # Tokenised rows are cached by a hash of the data and every setting that changes tokens.
    if setup.recipe is not None and parallel.world.size > 1 and cfg.distributed.strategy != "ddp":
        raise UserError(f"objective.type: {cfg.objective.type} runs on several processes with distributed.strategy: "
                        f"ddp only (not {cfg.distributed.strategy}: its reference and sampling passes need the whole "
                        "model in each process); set distributed.strategy: ddp, or run one process.")
    with distributed.first_on_each_machine(parallel.world, "waiting for the first process to tokenise the data"):
        if setup.recipe is not None:
            bundle = setup.recipe.build_data(cfg, setup.tokenizer, setup.task)
        else:
            bundle = build_datasets(cfg.data, setup.tokenizer, cache_dir=tunesmith_home() / "tokenized", task=setup.task)
    if not bundle.train:
        raise UserError(f"{data_origin(cfg.data)} gave no trainable rows; `tunesmith data inspect` shows why.")
    if cfg.training.batch_size > len(bundle.train):
        raise UserError(f"training.batch_size: {cfg.training.batch_size} rows per micro-batch, but {data_origin(cfg.data)} "
                        f"gives {len(bundle.train)} training rows; set training.batch_size to {len(bundle.train)} "
                        "or less (training.gradient_accumulation makes bigger steps without bigger micro-batches).")
    stats = bundle.stats
    if parallel.world.main:  # the first process alone writes the run folder
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", resolved_yaml(cfg))
        write_status(run_dir, "running")  # for whoever follows the run from its folder (tunesmith.api.follow)
    log.info(
        f"data: {stats.get('format', bundle.format)} format, {len(bundle.train)} train / "
        f"{len(bundle.validation)} validation / {len(bundle.test)} held-out rows"
        + (f"; {stats['truncated']} truncated to {cfg.data.max_length} tokens" if stats.get("truncated") else "")
        + (f"; {stats['dropped']} dropped ({stats.get('dropped_reason', 'nothing left to train on')})" if stats.get("dropped") else "")
    )
    setup.bundle = bundle


def _setup_model(cfg: Config, setup: Setup, device: torch.device) -> torch.nn.Module:
    started = time.perf_counter()
    model = load_model(setup.source, cfg, setup.dtype, setup.task)
    log.info(f"model loaded in {time.perf_counter() - started:.1f} s")
    release_free_memory()  # what loading (quantising above all) freed but the C heap still holds
    model.to(device)
    model.config.use_cache = False
    setup.objective = Objective(setup.task, setup.tokenizer)
    return model


def _setup_evaluation(evaluation, cfg: Config, setup: Setup, parallel: Parallel, model, saved: Progress | None) -> None:
    """Before: the base model on the held-out rows (the evaluation is the caller's: see `run_training`), once
    per run (a resumed run keeps its checkpoint's scores)."""
    bundle = setup.bundle
    if evaluation is not None and cfg.eval.enabled and bool(bundle.test_samples or bundle.test) and parallel.world.main:
        setup.evaluator = evaluation(cfg, bundle, setup.tokenizer, setup.task, parallel.device, setup.objective)
    setup.base_eval = saved.base_eval if saved is not None else {}
    if setup.evaluator is not None and not setup.base_eval:
        setup.base_eval = setup.evaluator.before(model)


def _setup_levers(cfg: Config, setup: Setup, model) -> None:
    """How batches run: padding-free passes (packing) and gradient checkpointing, each with a sentence why."""
    t = cfg.training
    setup.packing, why = want_packing(t.packing, model, setup.task, cfg.data.max_length, setup.device)
    if setup.packing:
        setup.pass_tokens = resolve_pass_tokens(t.pass_tokens, setup.device, t.batch_size, cfg.data.max_length)
    log.info(why + (f"; up to {setup.pass_tokens} tokens per pass" if setup.packing else ""))
    setup.kernels = kernel_mode(t.fast_kernels, setup.device)
    if setup.kernels != t.fast_kernels:
        log.info(f"fast kernels: off (auto: tunesmith's fused paths are for CPUs; on {setup.device} the stock "
                 "PEFT/transformers modules measured faster)")
    setup.checkpointing, why = want_gradient_checkpointing(cfg, model, setup.device, setup.dtype, setup.pass_tokens)
    log.info(why)
    if setup.checkpointing:
        enable_gradient_checkpointing(model)


def _setup_trainable(cfg: Config, setup: Setup, parallel: Parallel, model) -> torch.nn.Module:
    """What trains (the adapter, or everything), over how many steps; then the model placed for the parallel mode."""
    setup.per_epoch, setup.total_steps = plan_steps(len(setup.bundle.train), cfg, setup.window)
    model = prepare_trainable(model, cfg, setup.total_steps)  # AdaLoRA's rank schedule spans the planned steps
    setup.trainable, setup.total_params = count_parameters(model)
    log.info(f"model: {cfg.model.name}, {cfg.method}, {setup.trainable:,} of {setup.total_params:,} parameters "
             f"trainable; {setup.device}, {setup.dtype}"
             + (f", autocast {str(setup.half).replace('torch.', '')}" if setup.half is not None else ""))
    parallel.place(model, setup.window)  # several processes: the same start everywhere (FSDP: sharded here)
    return model


def _setup_training(cfg: Config, run_dir: Path, setup: Setup, parallel: Parallel, model, checkpoint: Path | None,
                    distiller) -> tuple[Training, Progress]:
    """The optimiser and the schedule, wrapped for the parallel mode, with the checkpoint's state loaded (or a fresh
    start); the metrics log."""
    optimizer = make_optimizer(model, cfg)
    scheduler = _make_scheduler(optimizer, cfg, setup.total_steps)

    def restore(unwrapped, optimizer, scheduler) -> Progress:
        if checkpoint is None:
            return Progress(base_eval=setup.base_eval)
        progress = Progress.from_dict(load_checkpoint(checkpoint, unwrapped, optimizer, scheduler))
        if parallel.world.main:  # the killed run may have logged steps past its last checkpoint: those are redone
            kept = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] <= progress.step]
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        return progress

    model, optimizer, scheduler, progress = parallel.wrap(model, optimizer, scheduler, restore)
    progress.window = setup.window
    loss_sum = (setup.recipe.loss_sum if setup.recipe is not None
                else functools.partial(_loss_sum, objective=setup.objective, distiller=distiller))
    half = setup.half
    autocast = torch.autocast(parallel.device.type, dtype=half) if half is not None else contextlib.nullcontext()
    metrics_log = MetricsLog(run_dir / "metrics.jsonl" if parallel.world.main else None, setup.trackers)
    training = Training(cfg, run_dir, setup, parallel, model, optimizer, scheduler, loss_sum, autocast, metrics_log,
                        last_saved=progress.step)
    return training, progress


def _loss_sum(model, unit, *, objective: Objective, distiller) -> torch.Tensor:
    """One pass's summed loss: distillation's, or the NLL of a padded batch (by task) or of a packed pass."""
    if distiller is not None:
        return distiller.loss_sum(model, unit)[0]
    if isinstance(unit, dict):
        return objective.nll_sum(model, unit)[0]
    return loss_fns.packed_nll_sum(model, unit)[0]


# --- training


def _train(training: Training, progress: Progress) -> None:
    """The loop, inside what it runs in: stop signals caught, the fast kernels and packed attention on."""
    model = training.model
    try:
        with stop_on_signals() as stop_requested, fast_kernels(model, training.setup.kernels), \
                (packed_attention(model) if training.setup.packing else contextlib.nullcontext()):
            training.stop_requested = stop_requested
            try:
                _train_steps(training, progress)
            except RuntimeError as exc:
                if not training.parallel.lost_peers(exc):
                    raise
                raise distributed.lost(f"training step {progress.step + 1}", exc) from None
    finally:
        training.metrics_log.close()


def _train_steps(run: Training, progress: Progress) -> None:
    """The loop (outlined at the top of this file): optimiser steps until `total_steps`, epoch by epoch;
    validate, checkpoint and stop when the config says.  Position and totals live in `progress`."""
    t, total_steps = run.cfg.training, run.setup.total_steps
    train_rows = run.setup.bundle.train
    run.model.train()
    run.bar = tqdm(total=total_steps, initial=progress.step, desc="training", unit="step",
                   disable=not run.parallel.world.main)
    try:
        while progress.step < total_steps:
            epoch = progress.epoch
            batches = list(iter_batches(train_rows, t.batch_size, epoch_order(len(train_rows), t.seed, epoch)))
            for window_start in range(progress.window_start, len(batches), progress.window):
                if progress.step >= total_steps:
                    break
                tick = time.perf_counter()
                units = _step_units(run, batches, epoch, window_start, progress.window)
                progress.window_start = window_start + progress.window
                step = _train_step(run, progress, units)
                if step is None:  # the window holds no trained token
                    continue
                _log_step(run, progress, step, time.perf_counter() - tick, epoch, len(batches))
                if _after_step(run, progress, step.stop):
                    return
            # An epoch ended, or max_steps cut it short: validate, then checkpoint.
            progress.epoch += 1
            progress.window_start = 0
            stop = _validate(run, progress) if t.eval_each_epoch else False
            _checkpoint(run, progress)
            if stop:
                return
    finally:
        run.bar.close()


def _train_step(run: Training, progress: Progress, units: list[tuple[int, tuple]]) -> Step | None:
    """One optimiser step over the window's `units` ([(owning process, (unit, layout))]): token-weighted loss
    (example-weighted with a recipe: pairs, answers), backward, the loss and stop flag summed over the processes, clip, step.  None when nothing in the window
    trains (every label masked)."""
    parallel, recipe = run.parallel, run.setup.recipe
    if recipe is not None:  # the loss is a mean over the recipe's examples (pairs, answers, groups)
        counts = [recipe.counts(unit) for _, (unit, _) in units]
        window_examples = sum(examples for examples, _, _ in counts)
        window_tokens = sum(trained for _, trained, _ in counts)
        recipe.begin_step(units)
    else:
        counts = [(trained, trained, every) for trained, every in
                  (_unit_counts(run.setup.objective, unit) for _, (unit, _) in units)]
        window_examples = window_tokens = sum(trained for trained, _, _ in counts)
    if window_examples == 0:
        return None
    progress.all_tokens += sum(every for _, _, every in counts)
    passes = parallel.passes(units)
    step_nll = 0.0
    step_seed = new_mask_seed()  # with each row's key, fixes its LoRA dropout masks (dropout_rows)
    # Process 0's: the others' generators may have drifted (DoRA's dropout draws).
    step_seed = parallel.shared(step_seed, "sharing the step's dropout seed")
    for i, (unit, layout, weight) in enumerate(passes):
        parallel.sync_gradients(i == len(passes) - 1)
        with dropout_rows(step_seed, layout):
            with run.autocast:
                nll = parallel.forward(run.loss_sum, _on_device(unit, parallel.device))
            forget_shared_mask()
            parallel.backward(nll * (weight * parallel.loss_scale) / window_examples)
            forget_shared_mask()
        step_nll += weight * float(nll.detach())
    penalty = extra_loss(run.model)  # AdaLoRA's orthogonality term, once per optimiser step
    if penalty is not None:  # every process adds it; the sum over processes must count it once
        parallel.backward(penalty / parallel.world.size)
    # One stop decision for all processes, or the rest would wait for the stopped one.
    step_nll, stop = parallel.reduce(step_nll, bool(run.stop_requested["signal"]))
    loss = step_nll / window_examples
    if not math.isfinite(loss):
        raise _diverged(run, progress, loss)
    lr = run.scheduler.get_last_lr()[0]
    grad_norm = parallel.step(run.optimizer)
    progress.grad_scaler = parallel.scaler_state()
    after_optimizer_step(run.model, progress.step + 1)
    run.scheduler.step()
    parallel.zero_grad(run.optimizer)
    return Step(loss, grad_norm, lr, window_tokens, stop, recipe.step_metrics() if recipe is not None else {})


def _step_units(run: Training, batches: list, epoch: int, window_start: int, window: int) -> list[tuple[int, tuple]]:
    """The window's micro-batches as passes, each with the process that runs it.  Every process lays out the
    whole step (so all divide by the same token count) and runs micro-batches rank, rank + W, ... of it."""
    t, size = run.cfg.training, run.parallel.world.size
    make = run.setup.recipe.units if run.setup.recipe is not None else functools.partial(_micro_units, run.setup.objective)
    return [
        (j % size, unit)
        for j, b in enumerate(batches[window_start : window_start + window])
        for unit in make(b, run.setup.pass_tokens, key=(t.seed, epoch, window_start, j))
    ]


def _micro_units(objective, rows, pass_tokens, key) -> list[tuple]:
    """What one micro-batch runs as: padding-free passes (`pass_tokens` set) or one padded batch, each with
    its row layout for `dropout_rows` (None for seq2seq batches, whose decoder has other positions).  A row's
    key is (micro-batch index in the step, index in the micro-batch), wherever the row lands."""
    j = key[-1]
    if pass_tokens is not None:
        index = {id(row): i for i, row in enumerate(rows)}
        units = []
        for group in plan_passes(rows, pass_tokens):
            unit = make_pass(group)
            starts = unit.cu_seq_lens.tolist()
            layout = (unit.n_tokens, tuple(((j, index[id(r)]), s, len(r.input_ids)) for r, s in zip(group, starts)))
            units.append((unit, layout))
        return units
    batch = objective.collate(rows, key=key)  # the key seeds masked-LM masking
    width = batch["input_ids"].shape[1]  # right-padded rows: row i starts at i * width
    layout = None if objective.task == SEQ2SEQ else (
        len(rows) * width, tuple(((j, i), i * width, len(r.input_ids)) for i, r in enumerate(rows)))
    return [(batch, layout)]


def _unit_counts(objective, unit) -> tuple[int, int]:
    """(trained tokens, all tokens) in one pass or padded batch."""
    if isinstance(unit, dict):
        return objective.trained_tokens(unit), int(unit["attention_mask"].sum())
    return unit.n_trained, unit.n_tokens


def _on_device(unit, device: torch.device):
    return {k: v.to(device) for k, v in unit.items()} if isinstance(unit, dict) else unit.to(device)


def _log_step(run: Training, progress: Progress, step: Step, elapsed: float, epoch: int, n_batches: int) -> None:
    """The step into the totals, metrics.jsonl and the progress bar."""
    progress.step += 1
    progress.train_time += elapsed
    progress.trained_tokens += step.trained_tokens
    if progress.first_loss is None:
        progress.first_loss = step.loss
    progress.final_loss = step.loss
    record = {
        "type": "train",
        "step": progress.step,
        "epoch": round(epoch + min(progress.window_start, n_batches) / n_batches, 4),
        "loss": step.loss,
        "grad_norm": step.grad_norm if math.isfinite(step.grad_norm) else None,
        "lr": step.lr,
        "trained_tokens": step.trained_tokens,
        "tokens_per_s": step.trained_tokens / elapsed,
        "step_s": elapsed,
        **(step.extra or {}),
        **memory_snapshot(run.setup.device),
    }
    run.metrics_log.write(record)
    run.bar.set_postfix(loss=f"{step.loss:.4f}", lr=f"{step.lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                        rss=f"{record['rss_bytes'] / 2**30:.2f}G")
    run.bar.update(1)


def _after_step(run: Training, progress: Progress, stop_requested: bool) -> bool:
    """Validate and checkpoint when the config says; True when early stopping ends the loop.  A requested stop
    (`stop_requested`: as the processes agreed in this step) saves a checkpoint and raises TrainingInterrupted."""
    t = run.cfg.training
    stop = False
    if t.eval_steps and progress.step % t.eval_steps == 0 and progress.step < run.setup.total_steps:
        stop = _validate(run, progress)
    if t.save_steps and progress.step % t.save_steps == 0:
        _checkpoint(run, progress)
    if stop:
        return True
    if run.parallel.stop_now(stop_requested, run.stop_requested["signal"]):
        _checkpoint(run, progress)
        raise _interrupted(run, progress)
    return False


def _validate(run: Training, progress: Progress) -> bool:
    """Validation loss now, unless there is nothing to validate on or this step has its validation already;
    updates the best-so-far record.  True when early stopping says stop.  With several processes all take the
    same numbers (see `Parallel.heldout`), so all stop together."""
    t, bundle, parallel = run.cfg.training, run.setup.bundle, run.parallel
    done = progress.val_records
    if not bundle.validation or (done and done[-1]["step"] == progress.step):
        return False
    recipe = run.setup.recipe
    if recipe is not None:
        held = parallel.heldout(lambda m: recipe.heldout(m, bundle.validation, t.eval_batch_size, parallel.device))
    else:
        held = parallel.heldout(lambda m: heldout_loss(m, bundle.validation, t.eval_batch_size, parallel.device,
                                                   run.setup.objective))
    val = {"type": "validation", "step": progress.step, "epoch": progress.epoch,
           "val_loss": held["loss"], "val_perplexity": held["perplexity"],
           **{k: v for k, v in held.items() if k.startswith("val_")}}
    run.metrics_log.write(val)
    best = progress.best_val
    stop = progress.add_validation(val, t.early_stopping_threshold, t.early_stopping_patience)
    _log_beside_bar(f"step {progress.step}: validation loss {held['loss']:.4f}"
                    + (f", perplexity {held['perplexity']:.2f}" if held["perplexity"] is not None else "")
                    + "".join(f", {k[4:].replace('_', ' ')} {v:.4g}" for k, v in held.items()
                              if k.startswith("val_") and isinstance(v, float)))
    if stop:
        _log_beside_bar(f"early stopping: {progress.bad_validations} validations without improvement on the best "
                        f"validation loss {best:.4f} (step {progress.best_step}).")
    if t.load_best_at_end and progress.best_step == progress.step:
        _checkpoint(run, progress)  # the best weights must stay on disk to be loaded at the end
    return stop


def _log_beside_bar(text: str) -> None:
    """A log line while the progress bar is drawn: the bar steps aside for it, as for tqdm.write."""
    with tqdm.external_write_mode():
        log.info(text)


def _checkpoint(run: Training, progress: Progress) -> None:
    """A checkpoint of this step (once); the oldest beyond training.save_total_limit are deleted, never the best
    one when it is to be loaded at the end."""
    if run.last_saved == progress.step:
        return
    folder = run.parallel.save_checkpoint(run.run_dir, run.model, run.optimizer, run.scheduler, progress.to_dict())
    if folder is not None:  # this process wrote it (the first)
        t = run.cfg.training
        best = run.run_dir / "checkpoints" / f"step-{progress.best_step:08d}" if progress.best_step else None
        prune_checkpoints(run.run_dir, t.save_total_limit, protect=best if t.load_best_at_end else None)
    run.last_saved = progress.step


def _diverged(run: Training, progress: Progress, loss: float) -> UserError:
    saved = list_checkpoints(run.run_dir)
    return UserError(
        f"training stopped at step {progress.step + 1}: the loss became {loss}; "
        + (f"the last good checkpoint is {saved[-1]}. " if saved else "")
        + "Lower training.learning_rate (or set training.max_grad_norm) and run again."
    )


def _interrupted(run: Training, progress: Progress) -> TrainingInterrupted:
    world = run.parallel.world
    saved = list_checkpoints(run.run_dir)[-1] if world.main else "a checkpoint"
    return TrainingInterrupted(
        f"{run.stop_requested['signal'] or 'a stop signal (to another process)'} received: stopped "
        f"after step {progress.step} and saved {saved}. Continue with: "
        f"tunesmith train {run.run_dir / 'config.yaml'} --resume"
        + (f" --nproc {world.size}" if world.size > 1 else "")
    )


class TrainingInterrupted(UserError):
    """SIGINT/SIGTERM arrived: a checkpoint was saved and the run stopped cleanly."""


@contextlib.contextmanager
def stop_on_signals():
    """While training, SIGINT and SIGTERM only raise a flag; the loop saves a checkpoint and stops at the
    end of the step.  A second Ctrl-C interrupts at once."""
    requested = {"signal": None}
    previous = {}

    def handler(signum, frame):
        if requested["signal"] is not None:
            raise KeyboardInterrupt
        requested["signal"] = signal.Signals(signum).name

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --- after training


def _whole_model(run: Training) -> torch.nn.Module | None:
    """The trained model, whole, for what follows training (None on processes other than the first).

    A sharded model's trained weights are gathered by every process; the first then drops the shards, the
    engine and the optimiser state and goes on with the base model loaded again, those weights put in."""
    parallel, setup, cfg = run.parallel, run.setup, run.cfg
    trained = parallel.gather_trainables(run.model)
    if trained is None:  # every process holds the whole model
        return run.model
    parallel.release()
    run.model = run.optimizer = run.scheduler = None
    if not parallel.world.main:
        return None
    release_free_memory()
    model = prepare_trainable(load_model(setup.source, cfg, setup.dtype, setup.task), cfg, setup.total_steps)
    model = model.to(parallel.device)
    model.config.use_cache = False
    set_trainable(model, trained)
    return model


def _finish(cfg: Config, run_dir: Path, setup: Setup, parallel: Parallel, model, progress: Progress,
            started: float) -> dict:
    """The first process, after training: the best weights (if asked), the trained weights saved, the tuned model
    evaluated; summary.json, training.png and report.md written, then handed to the trackers with the summary's
    numbers.  Returns the summary."""
    t = cfg.training
    train_stats = progress.train_stats(setup.per_epoch)
    if t.load_best_at_end and progress.best_step is not None and progress.best_step != progress.step:
        load_trainable(run_dir / "checkpoints" / f"step-{progress.best_step:08d}", parallel.unwrap(model))
        log.info(f"loaded the best weights (step {progress.best_step}, validation loss {progress.best_val:.4f})")
        train_stats["best_step"] = progress.best_step
    train_records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]

    # --- save what was trained (safetensors only, written then renamed)
    unwrapped = parallel.unwrap(model)

    def _save(folder: Path) -> None:
        unwrapped.save_pretrained(folder, safe_serialization=True)
        setup.tokenizer.save_pretrained(folder)

    atomic_write_dir(run_dir / ("model" if cfg.method == "full" else "adapter"), _save)

    # --- after: the tuned model on the same rows with the same decoding
    evaluator = setup.evaluator
    eval_section, samples = evaluator.after(unwrapped, setup.base_eval, run_dir) if evaluator is not None else (None, [])
    summary = _summary(cfg, run_dir, setup, parallel, train_stats, progress.val_records, train_records, started)
    if eval_section:
        summary["eval"] = eval_section
        summary["eval_samples"] = samples
    plot_training(train_records, progress.val_records, run_dir / "training.png")
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "report.md", render_report(summary, samples))
    finish_trackers(setup.trackers, summary, [run_dir / name for name in ("training.png", "report.md", "summary.json")],
                    "finished")
    return summary


def estimate_vs_measured(estimate: dict, peak_bytes: int, wall_s: float) -> dict:
    """The estimate's peak memory and time beside what the run measured (measured / estimated as `*_ratio`).
    On a CPU the peak is the process's resident high-water mark, loading included, as the estimate's is."""
    memory, timing = estimate.get("memory", {}), estimate.get("time", {})
    peak, total = memory.get("peak_bytes"), timing.get("total_s")
    return {
        "peak_bytes": peak, "measured_peak_bytes": peak_bytes,
        "peak_ratio": round(peak_bytes / peak, 3) if peak else None,
        "time_s": total, "measured_s": round(wall_s, 1),
        "time_ratio": round(wall_s / total, 3) if total else None, "time_source": timing.get("source"),
        "fits": memory.get("fits"), "available_bytes": memory.get("available_bytes"),
    }


def _summary(cfg: Config, run_dir: Path, setup: Setup, parallel: Parallel, train_stats: dict, val_records: list,
             train_records: list, started: float) -> dict:
    """summary.json's content: what ran where, how training went, what to try next (`advice`, train/advice.py)
    and what to run next."""
    t, world, half = cfg.training, parallel.world, setup.half
    val_final = val_records[-1] if val_records else None
    return {
        "run_dir": str(run_dir),
        "method": cfg.method,
        "model": {"name": cfg.model.name, "source": setup.source, "parameters": setup.total_params,
                  "trainable_parameters": setup.trainable},
        "hardware": {"device": setup.device, "dtype": str(setup.dtype).replace("torch.", ""),
                     "threads": torch.get_num_threads(),
                     "autocast": str(half).replace("torch.", "") if half is not None else None,
                     "gradient_checkpointing": setup.checkpointing, "packing": setup.packing,
                     "pass_tokens": setup.pass_tokens},
        "data": setup.bundle.stats,
        "train": train_stats,
        "validation": ({"loss": val_final["val_loss"], "perplexity": val_final["val_perplexity"],
                        **{k[4:]: v for k, v in val_final.items() if k.startswith("val_") and k not in ("val_loss", "val_perplexity")}}
                       if val_final else None),
        **({"objective": setup.recipe.summary()} if setup.recipe is not None else {}),
        "memory": {"peak_rss_bytes": peak_rss_bytes(),
                   **{k: v for k, v in memory_snapshot(setup.device).items() if k != "rss_bytes"}},
        "health": health_check(train_records),
        "advice": advise(train_records + val_records, cfg, run_dir),
        "wall_s": time.time() - started,
        **({"estimate": estimate_vs_measured(setup.estimate, peak_rss_bytes(), time.time() - started)}
           if setup.estimate else {}),
        **({"distributed": {"processes": world.size, "strategy": cfg.distributed.strategy,
                            **({"zero_stage": cfg.distributed.zero_stage} if cfg.distributed.strategy == "deepspeed" else {}),
                            "global_batch_rows": t.batch_size * setup.window, "micro_batches_per_step": setup.window}}
           if world.size > 1 else {}),
        "next_commands": [
            f"tunesmith eval {run_dir}   # base vs tuned: loss, ROUGE, BLEU, chrF, exact match, similarity",
            f"tunesmith chat {run_dir}   # talk to the tuned model",
            f"tunesmith merge {run_dir} --out {run_dir}/merged   # adapter folded into the base, a plain HF folder",
            f"tunesmith export {run_dir} --format gguf --quant q8_0 --out {run_dir}/model-q8_0.gguf --ollama",
            f"tunesmith serve {run_dir}   # OpenAI-compatible API on 127.0.0.1:8000",
            f"tunesmith train {run_dir / 'config.yaml'} --output {run_dir}-again   # the same run again",
            f"tunesmith train {run_dir / 'config.yaml'} --output {run_dir}-longer --set training.epochs=2 --set training.max_steps=null",
        ],
    }

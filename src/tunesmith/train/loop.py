"""The training run, visible in one place.

`run_training` goes config -> model -> data -> (before) -> train -> (after) -> run folder.
The loop itself is `_train_steps`: for each optimiser step it takes
`gradient_accumulation` micro-batches, counts their trained (unmasked) tokens, and
divides each micro-batch's summed NLL by that count before `backward`, so every
token weighs the same however the tokens fall across micro-batches (torchtune's
recipes do the same; averaging per micro-batch would over-weight short ones).

Memory levers, and what they cost:
- LoRA (`method: lora`) trains small adapters; the base weights need no gradients
  or optimiser state.  `method: full` trains everything and needs ~4x the weights
  in memory for AdamW.
- The loss never builds the full [tokens x vocab] logits (see `train/loss.py`).
- `data.max_length` bounds activation memory per row; `training.batch_size` scales it.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunesmith.config import Config, resolved_yaml
from tunesmith.data import build_datasets
from tunesmith.errors import UserError
from tunesmith.train.validation import heldout_loss
from tunesmith.data.heldout import build_inputs
from tunesmith.fileio import atomic_write_dir, atomic_write_json, atomic_write_text
from tunesmith.hardware import cpu_threads, detect_device, resolve_dtype
from tunesmith.models import load_model, load_tokenizer, resolve_model_source, tunesmith_home
from tunesmith.models.loader import model_task
from tunesmith.models.adapters import after_optimizer_step, count_parameters, extra_loss, prepare_trainable
from tunesmith.data.batching import epoch_order, iter_batches
from tunesmith.train.checkpoint import (
    STATE_FILE,
    list_checkpoints,
    load_checkpoint,
    load_trainable,
    newest_valid_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_trainable,
)
from tunesmith.train.compute import (
    autocast_dtype,
    enable_gradient_checkpointing,
    want_gradient_checkpointing,
)
from tunesmith.train import distributed, zero
from tunesmith.train.optim import make_optimizer
from tunesmith.train.packing import make_pass, packed_attention, plan_passes, resolve_pass_tokens, want_packing
from tunesmith.train import loss as loss_fns
from tunesmith.models.lora_fast import dropout_rows, fast_lora, fast_norm_rope, forget_shared_mask, new_mask_seed
from tunesmith.train.metrics_log import MetricsLog, read_metrics
from tunesmith.hardware import memory_snapshot, peak_rss_bytes, release_free_memory
from tunesmith.train.report import health_check, plot_training, render_report
from tunesmith.models.tasks import MASKED_LM, SEQ2SEQ
from tunesmith.train.objective import Objective

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


def run_training(cfg: Config, run_dir: Path, resume: bool = False, distiller=None, evaluation=None) -> dict:
    """Train as the config says and fill `run_dir`; returns the summary written to summary.json.

    `evaluation` (e.g. `tunesmith.evaluate.suite.BeforeAfter`), when given and `eval.enabled`, is called as
    `evaluation(cfg, bundle, tokenizer, task, device, objective)`; the object it makes scores the base
    model (`.before(model)`, before training) and the tuned one (`.after(model, base, run_dir)`, at the end).

    With `resume`, continue from the newest valid checkpoint in `run_dir/checkpoints`.  With `distiller`
    (a `tunesmith.distill.run.Distiller`, causal LMs only), each unit's loss is its distillation loss
    instead of the cross-entropy; validation stays cross-entropy.
    """
    from accelerate import Accelerator

    started = time.time()
    t = cfg.training
    seed_everything(t.seed)
    device = detect_device()
    world = distributed.start(device, cfg.distributed.timeout_s)  # one process of several, or alone
    if world.size > 1:
        cfg = distributed.strategy_from_launcher(cfg, report=print if world.main else (lambda *a, **k: None))
    if device == "cpu":  # several processes on one machine share its cores out
        torch.set_num_threads(t.num_threads or max(1, cpu_threads() // world.local_size))
    dtype = resolve_dtype(cfg.model.dtype, device)
    half = autocast_dtype(t.autocast, device, dtype)
    # Autocast is ours (torch.autocast in the loop), not accelerate's mixed_precision: accelerate keeps that
    # setting in a process-wide singleton that refuses to change, and one process may train twice.
    accelerator = Accelerator(cpu=device == "cpu")
    log = print if accelerator.is_main_process else (lambda *a, **k: None)

    checkpoint = None
    if resume:
        checkpoint = newest_valid_checkpoint(run_dir, report=log)
        if checkpoint is None:
            raise UserError(
                f"--resume: {run_dir / 'checkpoints'} holds no complete checkpoint to continue from; "
                "run again without --resume (into a new --output folder)."
            )
        log(f"resuming from {checkpoint}")
        progress = json.loads((checkpoint / STATE_FILE).read_text())["progress"]
    # The micro-batches per optimiser step over all processes: a resumed run keeps its checkpoint's, whatever
    # the number of processes now, so it takes the same steps as the run that was stopped.
    window = progress.get("window", t.gradient_accumulation) if checkpoint else t.gradient_accumulation * world.size
    if checkpoint and window != t.gradient_accumulation * world.size:
        log(f"the checkpoint's steps take {window} micro-batches of {t.batch_size} rows; kept, so on {world.size} "
            f"process(es) each runs {window / world.size:g} of them per step")

    # --- model source and tokenizer, then data (tokenising needs the tokenizer's chat template)
    source = resolve_model_source(cfg.model.name)
    tokenizer = load_tokenizer(source, cfg.model)
    task = model_task(source, cfg)
    sharding = world.size > 1 and cfg.distributed.strategy != "ddp"  # fsdp or deepspeed
    fsdp = sharding and cfg.distributed.strategy == "fsdp"
    if sharding:
        distributed.refuse_unshardable(cfg, task, distiller is not None)
    if distiller is not None and task != "causal_lm":
        raise UserError(f"model.name: {cfg.model.name} is a {task} model; distillation here is for causal language "
                        "models (the student and the teacher).")
    if task == MASKED_LM and tokenizer.mask_token_id is None:
        raise UserError(
            f"model.name: {cfg.model.name} is a masked-language model, but its tokenizer has no mask token to hide "
            "words with; use the tokenizer the model was trained with, or set model.task to what the model is."
        )
    # Tokenised rows are cached by a hash of the data and every setting that changes tokens.
    with distributed.first_on_each_machine(world, "waiting for the first process to tokenise the data"):
        bundle = build_datasets(cfg.data, tokenizer, cache_dir=tunesmith_home() / "tokenized", task=task)
    if not bundle.train:
        raise UserError(f"data.path: {cfg.data.path} gave no trainable rows; `tunesmith data inspect` shows why.")
    stats = bundle.stats
    # The run folder appears only once the model and data are known to be readable.
    if world.main:  # the first process alone writes the run folder
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", resolved_yaml(cfg))
    log(
        f"data: {stats.get('format', bundle.format)} format, {len(bundle.train)} train / "
        f"{len(bundle.validation)} validation / {len(bundle.test)} held-out rows"
        + (f"; {stats['truncated']} truncated to {cfg.data.max_length} tokens" if stats.get("truncated") else "")
        + (f"; {stats['dropped']} dropped ({stats.get('dropped_reason', 'nothing left to train on')})" if stats.get("dropped") else "")
    )

    # --- model
    model = load_model(source, cfg, dtype, task)
    release_free_memory()  # what loading (quantising above all) freed but the C heap still holds
    model.to(accelerator.device)
    model.config.use_cache = False
    objective = Objective(task, tokenizer)

    # --- before: the base model on the held-out rows (the evaluation is the caller's: see `evaluation` above)
    evaluator = None
    if evaluation is not None and cfg.eval.enabled and bool(bundle.test_samples or bundle.test) and world.main:
        evaluator = evaluation(cfg, bundle, tokenizer, task, accelerator.device, objective)
    base_eval: dict = progress.get("base_eval", {}) if checkpoint else {}
    if evaluator is not None and not base_eval:
        base_eval = evaluator.before(model)

    # --- how batches run, what trains, the optimiser and the schedule
    packing, why = want_packing(t.packing, model, task, cfg.data.max_length)
    pass_tokens = resolve_pass_tokens(t.pass_tokens, device, t.batch_size, cfg.data.max_length) if packing else None
    log(why + (f"; up to {pass_tokens} tokens per pass" if packing else ""))
    checkpointing, why = want_gradient_checkpointing(cfg, model, device, dtype, pass_tokens)
    log(why)
    if checkpointing:
        enable_gradient_checkpointing(model)
    per_epoch, total_steps = plan_steps(len(bundle.train), cfg, window)
    model = prepare_trainable(model, cfg, total_steps)  # AdaLoRA's rank schedule spans the planned steps
    trainable, total_params = count_parameters(model)
    log(f"model: {cfg.model.name}, {cfg.method}, {trainable:,} of {total_params:,} parameters trainable; {device}, {dtype}"
        + (f", autocast {str(half).replace('torch.', '')}" if half is not None else ""))
    if world.size > 1:
        # Not accelerator.prepare: it would wrap the model in DDP (see train/distributed.py for why not) and step
        # the schedule once per process.
        log(f"{world.size} processes, data parallel: global batch = micro-batch {t.batch_size} x accumulation "
            f"{window / world.size:g} x {world.size} processes = {t.batch_size * window} rows per optimiser step"
            + ("; weights, gradients and optimiser state sharded over the processes (FSDP)" if fsdp else "")
            + (f"; DeepSpeed ZeRO stage {cfg.distributed.zero_stage} shards the optimiser state and gradients"
               + (" and the weights" if cfg.distributed.zero_stage == 3 else "") if sharding and not fsdp else ""))
        distributed.align([p for p in model.parameters() if p.requires_grad], world)
        if fsdp:
            distributed.shard(model, world, accelerator.device)  # before the optimiser: it keeps the shards
            release_free_memory()  # the whole weights the shards were cut from
    optimizer = make_optimizer(model, cfg, report=log)
    scheduler = _make_scheduler(optimizer, cfg, total_steps)
    if world.size == 1:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    if checkpoint is not None:
        progress = load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, scheduler)
        # The killed run may have logged steps past its last checkpoint: those are redone.
        if world.main:
            kept = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] <= progress["step"]]
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    else:
        progress = new_progress(base_eval)
    progress["window"] = window
    if sharding and not fsdp:  # after loading: the checkpoint's whole tensors go into ZeRO's partitions
        if half is torch.float16 and all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad):
            raise UserError("distributed.strategy: deepspeed does not take tunesmith's fp16 loss scaling; set "
                            "training.autocast: false, or use distributed.strategy: ddp or fsdp.")
        zero.wrap(model, optimizer, cfg, world, accelerator.device)

    metrics_log = MetricsLog(run_dir / "metrics.jsonl" if world.main else None)
    try:
        with stop_on_signals() as stop_requested, fast_lora(model), fast_norm_rope(model), \
                (packed_attention(model) if packing else contextlib.nullcontext()):
            try:
                _train_steps(model, optimizer, scheduler, accelerator, bundle, cfg, device, per_epoch,
                             total_steps, metrics_log, progress, run_dir, stop_requested, half, objective, pass_tokens,
                             distiller, world)
            except RuntimeError as exc:
                if world.size == 1 or not distributed.lost_peers(exc):
                    raise
                raise distributed.lost(f"training step {progress['step'] + 1}", exc) from None
    finally:
        metrics_log.close()
    if sharding:  # every process takes part in gathering the trained weights
        trained = distributed.whole_trainables(model)
    if not world.main:  # what follows (best weights, saving, evaluating, the report) is the first process's
        return {"run_dir": str(run_dir), "rank": world.rank, "train": _train_stats(progress, per_epoch)}
    if sharding:  # process 0 goes on with an unsharded model: the base again, with the gathered trained weights
        model.__dict__.pop("tunesmith_engine", None)  # the DeepSpeed engine, which holds the model
        del model, optimizer
        release_free_memory()
        model = prepare_trainable(load_model(source, cfg, dtype, task), cfg, total_steps).to(accelerator.device)
        model.config.use_cache = False
        set_trainable(model, trained)
        del trained
    metrics_log.records = read_metrics(run_dir / "metrics.jsonl")
    val_records = progress["val_records"]
    train_stats = _train_stats(progress, per_epoch)
    if t.load_best_at_end and progress["best_step"] is not None and progress["best_step"] != progress["step"]:
        best = run_dir / "checkpoints" / f"step-{progress['best_step']:08d}"
        load_trainable(best, accelerator.unwrap_model(model))
        log(f"loaded the best weights (step {progress['best_step']}, validation loss {progress['best_val']:.4f})")
        train_stats["best_step"] = progress["best_step"]
    train_records = [r for r in metrics_log.records if r["type"] == "train"]

    # --- save what was trained (safetensors only, written then renamed)
    unwrapped = accelerator.unwrap_model(model)
    out_name = "model" if cfg.method == "full" else "adapter"

    def _save(folder: Path) -> None:
        unwrapped.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    atomic_write_dir(run_dir / out_name, _save)

    # --- after: the tuned model on the same rows with the same decoding
    eval_section, samples = evaluator.after(unwrapped, base_eval, run_dir) if evaluator is not None else (None, [])

    health = health_check(train_records)
    val_final = val_records[-1] if val_records else None
    summary = {
        "run_dir": str(run_dir),
        "method": cfg.method,
        "model": {"name": cfg.model.name, "source": source, "parameters": total_params, "trainable_parameters": trainable},
        "hardware": {"device": device, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                     "autocast": str(half).replace("torch.", "") if half is not None else None,
                     "gradient_checkpointing": checkpointing, "packing": packing, "pass_tokens": pass_tokens},
        "data": stats,
        "train": train_stats,
        "validation": {"loss": val_final["val_loss"], "perplexity": val_final["val_perplexity"]} if val_final else None,
        "memory": {"peak_rss_bytes": peak_rss_bytes(), **{k: v for k, v in memory_snapshot(device).items() if k != "rss_bytes"}},
        "health": health,
        "wall_s": time.time() - started,
        **({"distributed": {"processes": world.size, "strategy": cfg.distributed.strategy,
                            **({"zero_stage": cfg.distributed.zero_stage} if cfg.distributed.strategy == "deepspeed" else {}),
                            "global_batch_rows": t.batch_size * window, "micro_batches_per_step": window}}
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
    if eval_section:
        summary["eval"] = eval_section
        summary["eval_samples"] = samples
    if accelerator.is_main_process:
        plot_training(train_records, val_records, run_dir / "training.png")
        atomic_write_json(run_dir / "summary.json", summary)
        atomic_write_text(run_dir / "report.md", render_report(summary, samples))
    return summary


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


def new_progress(base_eval: dict) -> dict:
    """The loop's position and running totals: all of it goes into every checkpoint."""
    return {
        "step": 0, "epoch": 0, "window_start": 0,
        "first_loss": None, "final_loss": None,
        "trained_tokens": 0, "all_tokens": 0, "train_time": 0.0,
        "val_records": [], "best_val": None, "best_step": None, "bad_validations": 0, "stopped_early": False,
        "base_eval": base_eval,
    }


def _train_stats(progress: dict, per_epoch: int) -> dict:
    p = progress
    return {
        "first_loss": p["first_loss"],
        "final_loss": p["final_loss"],
        "steps": p["step"],
        "epochs": round(p["step"] / per_epoch, 4),
        "trained_tokens": p["trained_tokens"],
        "trained_tokens_per_s": p["trained_tokens"] / p["train_time"] if p["train_time"] else 0.0,
        "all_tokens_per_s": p["all_tokens"] / p["train_time"] if p["train_time"] else 0.0,
        "wall_s": p["train_time"],
        "stopped_early": p["stopped_early"],
    }


def _validate(model, bundle, cfg, accelerator, progress, metrics_log, bar, objective,
              world: distributed.World = distributed.World()) -> bool:
    """Validation loss now; updates the best-so-far record.  True when early stopping says stop.
    With several processes the first computes it and the others take its numbers, so all stop together."""
    t = cfg.training
    if distributed.is_sharded(model):  # every process takes part in each forward pass
        held = distributed.run(model, lambda m: heldout_loss(m, bundle.validation, t.eval_batch_size,
                                                             accelerator.device, objective))
    else:
        held = heldout_loss(model, bundle.validation, t.eval_batch_size, accelerator.device, objective) if world.main else None
    held = distributed.broadcast_object(held, world, "sharing the validation loss")  # one number, one decision
    val = {"type": "validation", "step": progress["step"], "epoch": progress["epoch"],
           "val_loss": held["loss"], "val_perplexity": held["perplexity"]}
    metrics_log.write(val)
    progress["val_records"].append(val)
    if world.main:
        bar.write(f"step {progress['step']}: validation loss {held['loss']:.4f}, perplexity {held['perplexity']:.2f}")
    best = progress["best_val"]
    if best is None or held["loss"] < best - t.early_stopping_threshold:
        progress["best_val"], progress["best_step"], progress["bad_validations"] = held["loss"], progress["step"], 0
        return False
    progress["bad_validations"] += 1
    if t.early_stopping_patience is not None and progress["bad_validations"] >= t.early_stopping_patience:
        if world.main:
            bar.write(
                f"early stopping: {progress['bad_validations']} validations without improvement on the best "
                f"validation loss {best:.4f} (step {progress['best_step']})."
            )
        progress["stopped_early"] = True
        return True
    return False


def allocate_early(params: list, optimizer) -> None:
    """Gradient buffers and AdamW's moments, allocated before the first forward pass and kept for the run.

    Left to themselves, both are allocated in the middle of the first step (gradients during the
    backward pass, moments in the first optimizer step), between activations that are freed a moment
    later.  The C heap cannot give back or reuse the space around such long-lived blocks well, and on a
    CPU that fragmentation showed up as about a gigabyte of resident memory that no tensor was using
    (bench/RESULTS.md, "Training throughput and memory", the levers table).  Allocated first, they sit together below everything else.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimiser
    if type(optimizer) is not torch.optim.AdamW:
        return  # other optimisers (bitsandbytes' 8-bit ones) allocate their own state
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("fused") or group.get("capturable"):
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:  # the values torch's Adam._init_group would give them on the first step
                state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


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


def _train_steps(model, optimizer, scheduler, accelerator, bundle, cfg, device, per_epoch, total_steps,
                 metrics_log, progress, run_dir, stop_requested, half, objective, pass_tokens=None, distiller=None,
                 world: distributed.World = distributed.World()):
    """The loop: micro-batches -> token-weighted loss -> backward -> clip -> step; log every step;
    validate, checkpoint and stop when the config says.  Position and totals live in `progress`.
    With `pass_tokens`, each micro-batch runs padding-free (see train/packing.py).  With several processes
    (`world`), each runs its share of a step's micro-batches and the gradients are summed (train/distributed.py)."""
    t = cfg.training
    window = progress.get("window", t.gradient_accumulation)  # micro-batches per optimiser step, all processes
    sharded = distributed.is_sharded(model)  # FSDP or DeepSpeed ZeRO
    engine = zero.engine_of(model)  # DeepSpeed's, which then reduces, clips and steps
    # FSDP and ZeRO reduce the mean of the processes' gradients; the loop wants their sum.
    loss_scale = world.size if sharded else 1

    def unit_loss(m, unit):
        if distiller is not None:
            return distiller.loss_sum(m, unit)[0]
        if isinstance(unit, dict):
            return objective.nll_sum(m, unit)[0]
        return loss_fns.packed_nll_sum(m, unit)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    unwrapped = accelerator.unwrap_model(model)
    last_saved = {"step": progress["step"]}
    autocast = torch.autocast(accelerator.device.type, dtype=half) if half is not None else contextlib.nullcontext()
    # fp16 has too few exponent bits for small gradients: scale the loss up, and the gradients back down before
    # clipping (Micikevicius et al., "Mixed Precision Training", 2018).  It needs fp32 trained weights.
    use_scaler = half is torch.float16 and all(p.dtype == torch.float32 for p in params)
    scaler = torch.amp.GradScaler(accelerator.device.type, enabled=use_scaler)
    if use_scaler and progress.get("grad_scaler"):
        scaler.load_state_dict(progress["grad_scaler"])

    def checkpoint() -> None:
        if last_saved["step"] == progress["step"] or not (world.main or sharded):
            return
        # A sharded model's processes all gather the tensors; the first one writes.
        save_checkpoint(run_dir, unwrapped, optimizer, scheduler, progress, write=world.main)
        if world.main:
            best = run_dir / "checkpoints" / f"step-{progress['best_step']:08d}" if progress["best_step"] else None
            prune_checkpoints(run_dir, t.save_total_limit, protect=best if t.load_best_at_end else None)
        last_saved["step"] = progress["step"]

    def validate_and_maybe_stop() -> bool:
        done = progress["val_records"]
        if not bundle.validation or (done and done[-1]["step"] == progress["step"]):
            return False  # nothing to validate on, or eval_steps already did it at this step
        stop = _validate(model, bundle, cfg, accelerator, progress, metrics_log, bar, objective, world)
        if t.load_best_at_end and progress["best_step"] == progress["step"]:
            checkpoint()  # the best weights must stay on disk to be loaded at the end
        return stop

    if engine is None:  # ZeRO keeps gradients and optimiser state in its own flat buffers
        allocate_early(params, optimizer)
    model.train()
    bar = tqdm(total=total_steps, initial=progress["step"], desc="training", unit="step",
               disable=not accelerator.is_main_process)
    try:
        while progress["step"] < total_steps:
            epoch = progress["epoch"]
            batches = list(iter_batches(bundle.train, t.batch_size, epoch_order(len(bundle.train), t.seed, epoch)))
            for window_start in range(progress["window_start"], len(batches), window):
                if progress["step"] >= total_steps:
                    break
                tick = time.perf_counter()
                # Every process lays out the whole step (so all divide by the same token count) and runs
                # micro-batches rank, rank + W, ... of it.
                units = [
                    (j % world.size, unit)
                    for j, b in enumerate(batches[window_start : window_start + window])
                    for unit in _micro_units(objective, b, pass_tokens, key=(t.seed, epoch, window_start, j))
                ]
                counts = [_unit_counts(objective, unit) for _, (unit, _) in units]
                window_tokens = sum(trained for trained, _ in counts)
                progress["window_start"] = window_start + window
                if window_tokens == 0:
                    continue
                progress["all_tokens"] += sum(all_tokens for _, all_tokens in counts)
                runs = [(unit, layout, 1.0) for owner, (unit, layout) in units if owner == world.rank]
                if sharded:  # as many passes as the busiest process (each pass gathers weights with the others)
                    busiest = max(sum(owner == r for owner, _ in units) for r in range(world.size))
                    runs += [(*units[0][1], 0.0)] * (busiest - len(runs))
                step_nll = 0.0
                step_seed = new_mask_seed()  # with each row's key, fixes its LoRA dropout masks (dropout_rows)
                if world.size > 1:  # process 0's: the others' generators may have drifted (DoRA's dropout draws)
                    step_seed = distributed.broadcast_object(step_seed, world, "sharing the step's dropout seed")
                for i, (unit, layout, weight) in enumerate(runs):
                    if engine is not None:  # ZeRO: the step's last pass is where gradients are final
                        engine.set_gradient_accumulation_boundary(i == len(runs) - 1)
                    elif sharded:  # FSDP: reduce-scatter once, after the step's last pass
                        model.set_requires_gradient_sync(i == len(runs) - 1)
                    with dropout_rows(step_seed, layout):
                        with autocast:
                            on_device = ({k: v.to(accelerator.device) for k, v in unit.items()} if isinstance(unit, dict)
                                         else unit.to(accelerator.device))
                            nll = distributed.run(model, unit_loss, on_device)
                        forget_shared_mask()
                        scaled = nll * (weight * loss_scale) / window_tokens
                        if engine is not None:
                            engine.backward(scaled, scale_wrt_gas=False)
                        else:
                            accelerator.backward(scaler.scale(scaled))
                        forget_shared_mask()
                    step_nll += weight * float(nll.detach())
                penalty = extra_loss(model)  # AdaLoRA's orthogonality term, once per optimiser step
                if penalty is not None:  # every process adds it; the sum over processes must count it once
                    accelerator.backward(scaler.scale(penalty / world.size))
                stop_all = False  # several processes: one decision for all, or the rest would wait for the stopped one
                if sharded:  # the gradients were reduced in the backward passes
                    step_nll, stop_all = distributed.sum_scalars(world, step_nll, bool(stop_requested["signal"]),
                                                                 accelerator.device)
                elif world.size > 1:
                    step_nll, stop_all = distributed.sum_gradients(params, world, step_nll, bool(stop_requested["signal"]))
                loss = step_nll / window_tokens
                if not math.isfinite(loss):
                    saved = list_checkpoints(run_dir)
                    raise UserError(
                        f"training stopped at step {progress['step'] + 1}: the loss became {loss}; "
                        + (f"the last good checkpoint is {saved[-1]}. " if saved else "")
                        + "Lower training.learning_rate (or set training.max_grad_norm) and run again."
                    )
                lr = scheduler.get_last_lr()[0]
                if engine is not None:  # clips to training.max_grad_norm, steps, zeroes the gradients
                    engine.step()
                    norm = engine.get_global_grad_norm()
                    grad_norm = float(norm) if norm is not None else float("nan")
                else:
                    max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
                    scaler.unscale_(optimizer)
                    grad_norm = float(accelerator.clip_grad_norm_(params, max_norm) if world.size == 1
                                      else distributed.full(torch.nn.utils.clip_grad_norm_(params, max_norm)))
                    scaler.step(optimizer)  # a plain optimizer.step() when the scaler is off
                    scaler.update()
                if use_scaler:
                    progress["grad_scaler"] = scaler.state_dict()
                after_optimizer_step(model, progress["step"] + 1)
                scheduler.step()
                if engine is None:
                    optimizer.zero_grad(set_to_none=False)  # the gradient buffers stay where allocate_early put them
                elapsed = time.perf_counter() - tick
                progress["step"] += 1
                progress["train_time"] += elapsed
                progress["trained_tokens"] += window_tokens
                if progress["first_loss"] is None:
                    progress["first_loss"] = loss
                progress["final_loss"] = loss
                record = {
                    "type": "train",
                    "step": progress["step"],
                    "epoch": round(epoch + min(progress["window_start"], len(batches)) / len(batches), 4),
                    "loss": loss,
                    "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                    "lr": lr,
                    "trained_tokens": window_tokens,
                    "tokens_per_s": window_tokens / elapsed,
                    "step_s": elapsed,
                    **memory_snapshot(device),
                }
                metrics_log.write(record)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                rss=f"{record['rss_bytes'] / 2**30:.2f}G")
                bar.update(1)
                stop = False
                if t.eval_steps and progress["step"] % t.eval_steps == 0 and progress["step"] < total_steps:
                    stop = validate_and_maybe_stop()
                if t.save_steps and progress["step"] % t.save_steps == 0:
                    checkpoint()
                if stop:
                    return
                if stop_all if world.size > 1 else stop_requested["signal"]:
                    checkpoint()
                    saved = list_checkpoints(run_dir)[-1] if world.main else "a checkpoint"
                    raise TrainingInterrupted(
                        f"{stop_requested['signal'] or 'a stop signal (to another process)'} received: stopped "
                        f"after step {progress['step']} and saved {saved}. Continue with: "
                        f"tunesmith train {run_dir / 'config.yaml'} --resume"
                        + (f" --nproc {world.size}" if world.size > 1 else "")
                    )
            # An epoch ended, or max_steps cut it short: validate, then checkpoint.
            progress["epoch"] += 1
            progress["window_start"] = 0
            stop = validate_and_maybe_stop() if t.eval_each_epoch else False
            checkpoint()
            if stop:
                return
    finally:
        bar.close()

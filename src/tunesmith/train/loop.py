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

import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunesmith.config import Config, resolved_yaml
from tunesmith.data import build_datasets, encode_prompt, prompt_and_reference
from tunesmith.errors import UserError
from tunesmith.evaluate.quick import generate_answers, heldout_loss, score_answers
from tunesmith.fileio import atomic_write_dir, atomic_write_json, atomic_write_text
from tunesmith.hardware import cpu_threads, detect_device, resolve_dtype
from tunesmith.models import load_model, load_tokenizer, resolve_model_source, tunesmith_home
from tunesmith.models.adapters import after_optimizer_step, count_parameters, prepare_trainable
from tunesmith.train.batching import collate, epoch_order, iter_batches
from tunesmith.train.loss import IGNORE_INDEX, token_nll_sum
from tunesmith.train.optim import make_optimizer
from tunesmith.train.metrics import MetricsLog, memory_snapshot, peak_rss_bytes
from tunesmith.train.report import health_check, plot_training, render_report

SAMPLES_IN_REPORT = 1


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


def plan_steps(n_train_rows: int, cfg: Config) -> tuple[int, int]:
    """(optimiser steps per epoch, total optimiser steps) for this data and config."""
    t = cfg.training
    micro_batches = math.ceil(n_train_rows / t.batch_size)
    per_epoch = max(1, math.ceil(micro_batches / t.gradient_accumulation))
    total = max(1, math.ceil(per_epoch * t.epochs))
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    return per_epoch, total


def _before_after_inputs(bundle, tokenizer, cfg: Config):
    """Prompts (token ids), references and readable prompts of the held-out rows used before and after."""
    samples = bundle.test_samples[: cfg.eval.limit] if cfg.eval.limit else bundle.test_samples
    prompts, references, texts = [], [], []
    if bundle.format == "text":  # plain text has no answers to generate; held-out loss still compares
        return prompts, references, texts
    for sample in samples:
        messages, reference = prompt_and_reference(sample)
        prompts.append(encode_prompt(messages, tokenizer))
        references.append(reference)
        texts.append(messages[-1]["content"])
    return prompts, references, texts


def evaluate_model(model, tokenizer, bundle, inputs, cfg: Config, device: str, label: str) -> tuple[dict, list[str]]:
    """Held-out loss/perplexity and exact match of greedy answers, for one model state."""
    prompts, references, _ = inputs
    rows = bundle.test[: cfg.eval.limit] if cfg.eval.limit else bundle.test
    metrics: dict = {}
    if rows:
        held = heldout_loss(model, rows, cfg.training.eval_batch_size, tokenizer.pad_token_id, device)
        metrics.update({"loss": held["loss"], "perplexity": held["perplexity"]})
    answers: list[str] = []
    if prompts:
        answers = generate_answers(
            model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size, device, desc=f"eval {label}"
        )
        metrics.update(score_answers(answers, references, cfg.eval.answer_regex))
    return metrics, answers


def run_training(cfg: Config, run_dir: Path) -> dict:
    """Train as the config says and fill `run_dir`; returns the summary written to summary.json."""
    from accelerate import Accelerator

    started = time.time()
    t = cfg.training
    seed_everything(t.seed)
    device = detect_device()
    if device == "cpu":
        torch.set_num_threads(t.num_threads or cpu_threads())
    dtype = resolve_dtype(cfg.model.dtype, device)
    accelerator = Accelerator(cpu=device == "cpu")
    log = print if accelerator.is_main_process else (lambda *a, **k: None)

    # --- model source and tokenizer, then data (tokenising needs the tokenizer's chat template)
    source = resolve_model_source(cfg.model.name)
    tokenizer = load_tokenizer(source, cfg.model)
    # Tokenised rows are cached by a hash of the data and every setting that changes tokens.
    bundle = build_datasets(cfg.data, tokenizer, cache_dir=tunesmith_home() / "tokenized")
    if not bundle.train:
        raise UserError(f"data.path: {cfg.data.path} gave no trainable rows; `tunesmith data inspect` shows why.")
    stats = bundle.stats
    # The run folder appears only once the model and data are known to be readable.
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", resolved_yaml(cfg))
    log(
        f"data: {stats.get('format', bundle.format)} format, {len(bundle.train)} train / "
        f"{len(bundle.validation)} validation / {len(bundle.test)} held-out rows"
        + (f"; {stats['truncated']} truncated to {cfg.data.max_length} tokens" if stats.get("truncated") else "")
        + (f"; {stats['dropped']} dropped ({stats.get('dropped_reason', 'nothing left to train on')})" if stats.get("dropped") else "")
    )

    # --- model
    model = load_model(source, cfg.model, dtype)
    model.to(accelerator.device)
    model.config.use_cache = False

    # --- before: the base model on the held-out rows
    do_eval = cfg.eval.enabled and bool(bundle.test_samples or bundle.test)
    eval_inputs = _before_after_inputs(bundle, tokenizer, cfg) if do_eval else None
    base_metrics: dict = {}
    base_answers: list[str] = []
    if do_eval:
        log(f"before: evaluating the base model on {len(eval_inputs[0])} held-out rows")
        base_metrics, base_answers = evaluate_model(model, tokenizer, bundle, eval_inputs, cfg, accelerator.device, "base")
        log("before: " + ", ".join(f"{k}={v:.4g}" for k, v in base_metrics.items() if k != "rows"))

    # --- what trains, the optimiser and the schedule
    model = prepare_trainable(model, cfg)
    trainable, total_params = count_parameters(model)
    log(f"model: {cfg.model.name}, {cfg.method}, {trainable:,} of {total_params:,} parameters trainable; {device}, {dtype}")
    optimizer = make_optimizer(model, cfg)
    per_epoch, total_steps = plan_steps(len(bundle.train), cfg)
    scheduler = _make_scheduler(optimizer, cfg, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    try:
        train_stats, val_records = _train_steps(
            model, optimizer, scheduler, accelerator, bundle, tokenizer, cfg, device, per_epoch, total_steps, metrics_log
        )
    finally:
        metrics_log.close()
    train_records = [r for r in metrics_log.records if r["type"] == "train"]

    # --- save what was trained (safetensors only, written then renamed)
    unwrapped = accelerator.unwrap_model(model)
    out_name = "adapter" if cfg.method == "lora" else "model"

    def _save(folder: Path) -> None:
        unwrapped.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    atomic_write_dir(run_dir / out_name, _save)

    # --- after: the tuned model on the same rows with the same decoding
    samples: list[dict] = []
    eval_section = None
    if do_eval:
        log("after: evaluating the tuned model on the same rows")
        tuned_metrics, tuned_answers = evaluate_model(
            unwrapped, tokenizer, bundle, eval_inputs, cfg, accelerator.device, "tuned"
        )
        eval_section = {"base": base_metrics, "tuned": tuned_metrics}
        _, references, prompt_texts = eval_inputs
        for i in range(min(SAMPLES_IN_REPORT, len(references))):
            samples.append(
                {"prompt": prompt_texts[i], "reference": references[i], "base": base_answers[i], "tuned": tuned_answers[i]}
            )

    health = health_check(train_records)
    val_final = val_records[-1] if val_records else None
    summary = {
        "run_dir": str(run_dir),
        "method": cfg.method,
        "model": {"name": cfg.model.name, "source": source, "parameters": total_params, "trainable_parameters": trainable},
        "hardware": {"device": device, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()},
        "data": stats,
        "train": train_stats,
        "validation": {"loss": val_final["val_loss"], "perplexity": val_final["val_perplexity"]} if val_final else None,
        "memory": {"peak_rss_bytes": peak_rss_bytes(), **{k: v for k, v in memory_snapshot(device).items() if k != "rss_bytes"}},
        "health": health,
        "wall_s": time.time() - started,
        # Only commands that exist today; eval, chat, merge and export join this list as they land.
        "next_commands": [
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


def _train_steps(model, optimizer, scheduler, accelerator, bundle, tokenizer, cfg, device, per_epoch, total_steps, metrics_log):
    """The loop: micro-batches -> token-weighted loss -> backward -> clip -> step; log every step."""
    t = cfg.training
    pad_id = tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    step = 0
    epoch = 0
    first_loss = final_loss = None
    trained_tokens = all_tokens = 0
    train_time = 0.0
    val_records: list[dict] = []
    bar = tqdm(total=total_steps, desc="training", unit="step", disable=not accelerator.is_main_process)
    while step < total_steps:
        batches = list(iter_batches(bundle.train, t.batch_size, epoch_order(len(bundle.train), t.seed, epoch)))
        for window_start in range(0, len(batches), t.gradient_accumulation):
            if step >= total_steps:
                break
            tick = time.perf_counter()
            window = [collate(b, pad_id) for b in batches[window_start : window_start + t.gradient_accumulation]]
            window_tokens = sum(int((w["labels"][:, 1:] != IGNORE_INDEX).sum()) for w in window)
            if window_tokens == 0:
                continue
            step_nll = 0.0
            for micro in window:
                micro = {k: v.to(accelerator.device) for k, v in micro.items()}
                nll, _ = token_nll_sum(model, micro["input_ids"], micro["attention_mask"], micro["labels"])
                accelerator.backward(nll / window_tokens)
                step_nll += float(nll.detach())
                all_tokens += int(micro["attention_mask"].sum())
            max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
            grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            after_optimizer_step(model, step + 1)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - tick
            train_time += elapsed
            step += 1
            trained_tokens += window_tokens
            loss = step_nll / window_tokens
            if not math.isfinite(loss):
                bar.close()
                raise UserError(
                    f"training stopped at step {step}: the loss became {loss}; lower training.learning_rate "
                    "(or set training.max_grad_norm) and run again."
                )
            first_loss = loss if first_loss is None else first_loss
            final_loss = loss
            record = {
                "type": "train",
                "step": step,
                "epoch": round(epoch + (window_start + len(window)) / len(batches), 4),
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
        epoch += 1  # an epoch ended, or max_steps cut it short: either way, validate
        if bundle.validation and t.eval_each_epoch:
            held = heldout_loss(model, bundle.validation, t.eval_batch_size, pad_id, accelerator.device)
            val = {"type": "validation", "step": step, "epoch": epoch, "val_loss": held["loss"], "val_perplexity": held["perplexity"]}
            metrics_log.write(val)
            val_records.append(val)
            bar.write(f"epoch {epoch}: validation loss {held['loss']:.4f}, perplexity {held['perplexity']:.2f}")
    bar.close()
    stats = {
        "first_loss": first_loss,
        "final_loss": final_loss,
        "steps": step,
        "epochs": round(step / per_epoch, 4),
        "trained_tokens": trained_tokens,
        "trained_tokens_per_s": trained_tokens / train_time if train_time else 0.0,
        "all_tokens_per_s": all_tokens / train_time if train_time else 0.0,
        "wall_s": train_time,
    }
    return stats, val_records

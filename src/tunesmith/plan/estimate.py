"""Will this run fit on this machine, and how long will it take?  Answered before anything is loaded.

    est = estimate(cfg)                     # the model's shape from its config.json, the data's real lengths
    est.fits, est.peak_bytes, est.time_s    # peak memory of the run against what the device has free
    print(est.sentence()); est.to_json()    # in words (the biggest parts, what to change to fit) / as JSON

Memory is `plan/memory.py`'s part-by-part model on the model's shape (`plan/shapes.py`, built on the meta
device: no weights read) and the run's settings, resolved the way the training loop resolves them (precision,
packing, pass size, checkpointing, what trains).  The biggest pass comes from the real batches: the data is
read and tokenised as the run would (the tokenised rows are cached for it), each epoch's micro-batches
grouped into passes by `train/packing.plan_passes`.

Time is the run's optimiser steps times seconds per step, plus loading and the before/after evaluation.  With
`probe`, seconds per step and the rest are measured: the run itself starts in a child process (`plan/probe.py`)
and is stopped after a few steps.  Without it, seconds per step come from the arithmetic of a step (2 FLOPs
per weight and token forward, 2 more backward for the input gradients, 2 more for full fine-tuning's weight
gradients, the forward again with checkpointing) over this device's measured matmul speed times an efficiency
measured on the built-in model (bench/estimate_accuracy.py): a rough answer, said to be one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tunesmith.config import PREFERENCE_OBJECTIVES, Config
from tunesmith.data import build_datasets
from tunesmith.data.batching import epoch_order, iter_batches
from tunesmith.data.preference import build_preference_data
from tunesmith.data.tokens import IGNORE_INDEX, TokenizedRow
from tunesmith.errors import UserError
from tunesmith.hardware import detect_device, four_bit_status, memory_info, resolve_dtype
from tunesmith.models import resolve_model_source, tunesmith_home
from tunesmith.models.fast import kernel_mode
from tunesmith.models.loader import load_tokenizer, model_task
from tunesmith.plan.memory import GIB, Workload, memory_parts
from tunesmith.plan.probe import probe
from tunesmith.plan.shapes import ModelShape, lora_trainable, shape_from_folder, targeted_names
from tunesmith.train.compute import autocast_dtype, want_gradient_checkpointing
from tunesmith.train.loop import plan_steps
from tunesmith.train.packing import plan_passes, resolve_pass_tokens, want_packing

log = logging.getLogger(__name__)

# Without --probe only (rough): the share of the measured matmul speed a training step reaches, a CPU pass's
# fixed cost (every pass reads all frozen weights twice: train/packing.py), starting up, loading and decoding
# speeds; from runs of the built-in model on this project's CPUs (bench/estimate_accuracy.py).
CPU_STEP_EFFICIENCY = 0.6
GPU_STEP_EFFICIENCY = 0.35
CPU_PASS_OVERHEAD_S = 0.3
CPU_STARTUP_S = 8.0
LOAD_BYTES_PER_S = 400e6
DECODE_BYTES_PER_S = 8e9
READABLE_PARTS = {
    "framework": "Python, torch and the data", "weights": "the model's weights", "adapter": "the adapter",
    "gradients": "gradients", "optimizer": "AdamW's state", "activations": "activations kept for the backward pass",
    "loss": "the output layer and loss", "dequantized": "4-bit weights dequantised for their matmuls",
}


@dataclass
class Estimate:
    """The estimate of one run: memory by part (bytes), the peak against what is free, and time (seconds)."""

    model: str
    method: str
    device: str
    dtype: str
    total_params: int
    trainable_params: int
    parts: dict[str, int]
    peak_bytes: int
    available_bytes: int | None
    available_source: str  # where available_bytes comes from (free RAM, a container limit, --memory-limit, a GPU)
    processes: int = 1
    strategy: str = "single"
    settings: dict = field(default_factory=dict)  # what the estimate assumed: pass tokens, checkpointing, ...
    steps: int = 0
    trained_tokens: int = 0
    step_s: float | None = None
    time_s: float | None = None
    time_parts: dict[str, float] = field(default_factory=dict)
    time_source: str = "model"  # "probe" (measured) or "model" (arithmetic over the matmul speed)
    advice: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.total_peak_bytes <= self.available_bytes

    @property
    def total_peak_bytes(self) -> int:
        """Every process of the run on this machine together (DDP and FSDP start one per process)."""
        return self.peak_bytes * (self.processes if self.device == "cpu" else 1)

    def sentence(self) -> str:
        gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        biggest = sorted(((v, k) for k, v in self.parts.items() if k in READABLE_PARTS and v > 0), reverse=True)[:3]
        parts = ", ".join(f"{READABLE_PARTS[k]} {gib(v)}" for v, k in biggest)
        who = f"{self.processes} processes together" if self.processes > 1 and self.device == "cpu" else "the run"
        where = f"{gib(self.available_bytes)} {self.available_source}" if self.available_bytes is not None else \
            "an unknown amount of free memory"
        verdict = "fits" if self.fits else "does NOT fit"
        text = (f"{self.model}, {self.method} on {self.device} ({self.dtype}): {who} should peak at about "
                f"{gib(self.total_peak_bytes)} against {where}, so it {verdict} (biggest parts: {parts}).")
        if self.time_s is not None:
            how = "measured by --probe" if self.time_source == "probe" else "a rough figure from this device's matmul speed; --probe measures it"
            text += f" Time: about {_duration(self.time_s)} for {self.steps} steps ({how})."
        if not self.fits and self.advice:
            text += " What to change, with the peak each change alone gives: " + "; ".join(self.advice) + "."
        return text

    def to_json(self) -> dict:
        return {
            "model": self.model, "method": self.method, "device": self.device, "dtype": self.dtype,
            "parameters": self.total_params, "trainable_parameters": self.trainable_params,
            "memory": {"parts_bytes": self.parts, "peak_bytes": self.peak_bytes,
                       "total_peak_bytes": self.total_peak_bytes, "available_bytes": self.available_bytes,
                       "available_source": self.available_source, "fits": self.fits},
            "processes": self.processes, "strategy": self.strategy, "settings": self.settings,
            "time": {"steps": self.steps, "trained_tokens": self.trained_tokens, "step_s": self.step_s,
                     "total_s": self.time_s, "parts_s": self.time_parts, "source": self.time_source},
            "advice": self.advice,
        }


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def parse_size(text: str, key: str = "--memory-limit") -> int:
    """'2GiB', '500MB', '1.5G', '1073741824' -> bytes (binary units for G/M/K with or without the i)."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
             "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not math.isfinite(value) or value <= 0:
        raise UserError(f"{key}: {text!r} is not a size; write it like 16GiB, 500MB or 2G.")
    return int(value * units[unit])


def estimate(cfg: Config, memory_limit: int | None = None, run_probe: bool = False, nproc: int = 1,
             config_path=None, overrides=(), device: str | None = None) -> Estimate:
    """The run's memory and time on this machine (with `memory_limit` bytes: as if it had only that).
    `run_probe` measures time with a few real steps (needs `config_path`, the config file, and its `overrides`)."""
    if run_probe and config_path is None:
        raise ValueError("estimate(run_probe=True) starts the run from its config file: pass config_path")
    device = device or detect_device()
    source = resolve_model_source(cfg.model.name)
    task = model_task(source, cfg)
    shape = shape_from_folder(source, task, cfg.model.trust_remote_code)
    meta = shape.meta_model
    dtype = resolve_dtype(cfg.model.dtype, device)
    half = autocast_dtype(cfg.training.autocast, device, dtype)
    four_bit = four_bit_status()[0] if cfg.method == "qlora" else False
    method = cfg.method if (cfg.method != "qlora" or four_bit or cfg.qlora.fallback == "error") else "lora"
    t = cfg.training
    full = method == "full"
    trainable = shape.total_params if full else lora_trainable(shape, cfg)
    targets = 0 if full else len(targeted_names(shape, cfg))

    rows = _token_rows(cfg, source, task)
    packing = want_packing(t.packing, meta, task, cfg.data.max_length, device)[0]
    pass_tokens = resolve_pass_tokens(t.pass_tokens, device, t.batch_size, cfg.data.max_length) if packing else None
    # a preference or reward objective's micro-batch is one pass whatever pass_tokens says (see _token_rows)
    biggest_pass, longest = _biggest_pass(rows, cfg, pass_tokens if cfg.objective.type == "sft" else None)
    checkpointing = want_gradient_checkpointing(cfg, meta, device, half or dtype, pass_tokens)[0]
    weight_bytes = torch.empty((), dtype=dtype).element_size()
    processes, strategy = max(1, nproc), ("single" if nproc <= 1 else cfg.distributed.strategy)
    sharded = processes > 1 and (strategy == "fsdp" or (strategy == "deepspeed" and cfg.distributed.zero_stage == 3))
    work = Workload(
        method=method, device=device, weight_bytes=weight_bytes,
        activation_bytes=torch.empty((), dtype=half).element_size() if half is not None else weight_bytes,
        trainable=trainable, adapter_targets=targets, rank=cfg.lora.r, optimizer=t.optimizer,
        pass_tokens=biggest_pass, longest_row=longest, checkpointing=checkpointing,
        fused=kernel_mode(t.fast_kernels, device) == "auto" and half is None and dtype == torch.float32,
        chunked_loss=task == "causal_lm", four_bit=four_bit, processes=processes, sharded=sharded,
        checkpoint_bytes=sum(f.stat().st_size for f in Path(source).glob("*.safetensors")) or None,
    )
    parts = memory_parts(shape, work)
    available, where = _available(device, memory_limit)
    result = Estimate(
        model=cfg.model.name, method=method, device=device, dtype=str(dtype).replace("torch.", ""),
        total_params=shape.total_params, trainable_params=trainable, parts=parts, peak_bytes=parts["peak"],
        available_bytes=available, available_source=where, processes=processes, strategy=strategy,
        settings={"pass_tokens": biggest_pass, "longest_row": longest, "packing": packing,
                  "gradient_checkpointing": checkpointing, "autocast": str(half).replace("torch.", "") if half else None,
                  "micro_batch": t.batch_size, "data_rows": len(rows)},
    )
    measured = probe(config_path, overrides, nproc=nproc) if run_probe else None
    _estimate_time(result, cfg, shape, work, rows, device, measured)
    result.advice = advice(result, cfg, shape, work)
    return result


def estimate_if_possible(cfg: Config, memory_limit: int | None = None, nproc: int = 1, who: str = "this run") -> Estimate | None:
    """The estimate, or None (with a notice) when it cannot be made for a reason that is not the user's: the
    estimate must never stop a run that would have trained; the run itself says what is wrong, if anything.
    A UserError (the config's or the data's fault) is raised as the run would raise it."""
    try:
        return estimate(cfg, memory_limit=memory_limit, nproc=nproc)
    except UserError:
        raise
    except Exception as exc:
        log.info(f"tunesmith: no estimate for {who} ({type(exc).__name__}: {exc}); training without one")
        return None


def _token_rows(cfg: Config, source: str, task: str) -> list:
    """The training rows tokenised as the run will (cached), or stand-ins of max_length where the file is missing.

    With a preference or reward objective a micro-batch runs all its answers in one pass (prefer/recipe.py), so a
    row here is a stand-in as long as everything one example adds to that pass: a pair's prompt twice with both
    answers; KTO's prompt twice with the answer and its KL answer (taken as long as its own); GRPO's prompt with
    `max_new_tokens` answer tokens, group_size times."""
    try:
        tokenizer = load_tokenizer(source, cfg.model)
        kind = cfg.objective.type
        if kind in PREFERENCE_OBJECTIVES or kind == "kto":
            bundle = build_preference_data(cfg.data, tokenizer, "unpaired" if kind == "kto" else "paired")
            return [_stand_in(2 * len(r.prompt_ids) + (len(r.chosen_ids) + len(r.rejected_ids) if kind != "kto"
                                                        else 2 * len(r.completion_ids))) for r in bundle.train]
        bundle = build_datasets(cfg.data, tokenizer, cache_dir=tunesmith_home() / "tokenized", task=task)
        if kind == "grpo":
            group = cfg.objective.group_size
            return [_stand_in(group * (len(r.input_ids) + cfg.objective.max_new_tokens)) for r in bundle.train]
        return bundle.train
    except UserError:
        raise
    except Exception:  # the run will say what is wrong with the data; here assume full-length rows
        return []


def _stand_in(length: int) -> TokenizedRow:
    return TokenizedRow(input_ids=[0] * length, labels=[0] * length)


def _biggest_pass(rows: list, cfg: Config, pass_tokens: int | None) -> tuple[int, int]:
    """(tokens in the biggest forward/backward pass of the run's batches, tokens in the longest row)."""
    t = cfg.training
    if not rows:
        length = cfg.data.max_length
        return (min(pass_tokens, t.batch_size * length) if pass_tokens else t.batch_size * length), length
    longest = max(len(r.input_ids) for r in rows)
    biggest = 0
    for epoch in range(max(1, min(2, math.ceil(t.epochs)))):  # the biggest batch of the first epochs
        for batch in iter_batches(rows, t.batch_size, epoch_order(len(rows), t.seed, epoch)):
            if pass_tokens:
                size = max(sum(len(r.input_ids) for r in p) for p in plan_passes(batch, pass_tokens))
            else:
                size = len(batch) * max(len(r.input_ids) for r in batch)  # padded to the batch's longest row
            biggest = max(biggest, size)
    return biggest, longest


def _available(device: str, memory_limit: int | None) -> tuple[int | None, str]:
    if memory_limit is not None:
        return memory_limit, "(--memory-limit)"
    info = memory_info()
    if device in ("cuda", "xpu"):
        gpus = [g for g in info["gpus"] if g["kind"] == device and g["total_bytes"]]
        if gpus:
            return min(g["free_bytes"] or g["total_bytes"] for g in gpus), f"free on {gpus[0]['name']}"
        return None, ""
    available, limit = info["ram_available_bytes"], info["ram_limit_bytes"]
    if limit is not None and (available is None or limit < available):
        return limit, "(the container's memory limit)"
    return available, "of RAM available"


def _estimate_time(result: Estimate, cfg: Config, shape: ModelShape, work: Workload, rows: list, device: str,
                   measured: dict | None) -> None:
    """Steps, trained tokens and seconds per phase: measured by a probe, or from the arithmetic of a step (see
    the module docstring)."""
    t = cfg.training
    window = t.gradient_accumulation * max(1, result.processes)
    n_rows = len(rows) or 1000
    per_epoch, total = plan_steps(n_rows, cfg, window)
    result.steps = total
    if rows:
        trained_per_row = sum(sum(1 for x in r.labels if x != IGNORE_INDEX) for r in rows) / len(rows)
        tokens_per_row = sum(len(r.input_ids) for r in rows) / len(rows)
    else:
        trained_per_row = tokens_per_row = cfg.data.max_length / 2
    rows_per_step = min(t.batch_size * window, n_rows)
    result.trained_tokens = int(total * rows_per_step * trained_per_row)
    step_tokens = rows_per_step * tokens_per_row  # processed (prompt and answer) per optimiser step
    if measured is not None:
        # seconds per processed token from the probe's steps after the first, times the tokens of every step of
        # the run (the batches are the run's own: same seed, same order); the first step's one-off costs on top
        per_step = _step_tokens(rows, cfg, window, total) if rows else []
        timed = measured["steps_s"][1:]
        if len(per_step) > len(timed) and timed and sum(per_step[1:len(timed) + 1]) > 0:
            rate = sum(timed) / sum(per_step[1:len(timed) + 1])
            step_s = rate * sum(per_step) / total
        else:
            step_s = measured["step_s"]
        first_extra = max(measured["first_step_s"] - measured["step_s"], 0.0)
        parts = {"startup": measured["startup_s"], "loading": measured["load_s"],
                 "evaluation before": measured["before_eval_s"]}
        result.time_source = "probe"
    else:
        # matmul FLOPs per processed token: forward 2 per linear weight, backward 2 for the input gradient (4 in
        # full fine-tuning: the weight gradient too), the forward again with checkpointing; the output layer runs
        # only on trained tokens (train/loss.py), the same 2 + 2 (+2) per weight.
        per_weight = 6 if work.method == "full" else 4
        if work.checkpointing:
            per_weight += 2
        head = shape.hidden * shape.vocab
        step_flops = per_weight * (shape.linear_params * step_tokens + head * rows_per_step * trained_per_row)
        efficiency = CPU_STEP_EFFICIENCY if device == "cpu" else GPU_STEP_EFFICIENCY
        speed = matmul_flops(device, work.activation_bytes) * efficiency * (result.processes if device != "cpu" else 1)
        passes = max(1, math.ceil(step_tokens / max(work.pass_tokens, 1)))
        step_s = step_flops / speed + passes * CPU_PASS_OVERHEAD_S * (device == "cpu")
        first_extra = 0.0
        parts = {"startup": CPU_STARTUP_S, "loading": result.parts["weights"] / LOAD_BYTES_PER_S,
                 "evaluation before": _generation_s(cfg, shape, work, device) if cfg.eval.enabled else 0.0}
    validations = (math.ceil(total / per_epoch) if t.eval_each_epoch else 0) + (total // t.eval_steps if t.eval_steps else 0)
    val_rows = max(1, int(n_rows * cfg.data.validation_split)) if cfg.data.validation_split or cfg.data.validation_path else 0
    val_s = validations * val_rows * tokens_per_row / max(step_tokens, 1) * step_s / 3  # forward only: ~1/3 of a step
    parts.update({"training": first_extra + total * step_s, "validation": val_s,
                  "evaluation after": parts["evaluation before"]})
    result.step_s = step_s
    result.time_parts = {k: round(v, 2) for k, v in parts.items()}
    result.time_s = sum(parts.values())


def _step_tokens(rows: list, cfg: Config, window: int, total: int) -> list[int]:
    """Tokens (prompt and answer) each optimiser step of the run processes, in the run's own batch order."""
    t = cfg.training
    tokens: list[int] = []
    epoch = 0
    while len(tokens) < total and epoch < 1000:
        sizes = [sum(len(r.input_ids) for r in batch)
                 for batch in iter_batches(rows, t.batch_size, epoch_order(len(rows), t.seed, epoch))]
        tokens += [sum(sizes[i:i + window]) for i in range(0, len(sizes), window)]
        epoch += 1
    return tokens[:total]


def _generation_s(cfg: Config, shape: ModelShape, work: Workload, device: str) -> float:
    """The before (or after) evaluation without a probe: greedy answers to the held-out prompts, each new
    token a pass over the weights (memory-bound: the weights read once per batch step)."""
    prompts = cfg.eval.limit or 50
    batches = math.ceil(prompts / cfg.eval.batch_size)
    per_token = max(shape.total_params * work.weight_bytes / DECODE_BYTES_PER_S,
                    2 * shape.total_params * cfg.eval.batch_size / matmul_flops(device, work.activation_bytes))
    return batches * cfg.eval.max_new_tokens * per_token


_MATMUL_SPEED: dict[tuple[str, int], float] = {}


def matmul_flops(device: str, element_bytes: int = 4) -> float:
    """This device's measured matmul speed (FLOP/s) on a 1024 x 1024 product in the training precision."""
    key = (device, element_bytes)
    if key in _MATMUL_SPEED:
        return _MATMUL_SPEED[key]
    dtype = {4: torch.float32, 2: torch.bfloat16}.get(element_bytes, torch.float32)
    n = 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3 or runs < 3:
        a @ b
        runs += 1
    if device == "cuda":
        torch.cuda.synchronize()
    speed = 2 * n**3 * runs / (time.perf_counter() - start)
    _MATMUL_SPEED[key] = speed
    return speed


def advice(result: Estimate, cfg: Config, shape: ModelShape, work: Workload) -> list[str]:
    """What would make a run that does not fit fit: each change with its --set line and the peak it would give
    (the same memory model, that one setting changed), lowest peak first; if no single change is enough, all of
    them together as well."""
    if result.fits:
        return []
    t = cfg.training
    options: list[tuple[str, str, Workload]] = []
    if not work.checkpointing:
        options.append(("gradient checkpointing", "--set training.gradient_checkpointing=true",
                        replace(work, checkpointing=True)))
    if t.batch_size > 1 and work.pass_tokens > work.longest_row:
        options.append(("half the micro-batch, twice the accumulation (the same step)",
                        f"--set training.batch_size={t.batch_size // 2} "
                        f"--set training.gradient_accumulation={t.gradient_accumulation * 2}",
                        replace(work, pass_tokens=max(work.longest_row, work.pass_tokens // 2))))
    fewest = max(work.longest_row, 8)  # training.pass_tokens is at least 8
    if result.settings.get("packing") and work.pass_tokens > fewest:
        options.append(("fewer tokens per pass (the same step, in more passes)",
                        f"--set training.pass_tokens={fewest}", replace(work, pass_tokens=fewest)))
    if work.method in ("lora", "dora", "rslora", "adalora") and four_bit_status()[0]:
        options.append(("a 4-bit base (QLoRA)", "--set method=qlora", replace(work, method="qlora", four_bit=True)))
    if work.method == "full":
        lora_cfg = cfg.model_copy(update={"method": "lora"})
        adapter = replace(work, method="lora", trainable=lora_trainable(shape, lora_cfg),
                          adapter_targets=len(targeted_names(shape, lora_cfg)))
        options.append(("an adapter instead of every weight", "--set method=lora", adapter))
        if four_bit_status()[0]:
            options.append(("an adapter on a 4-bit base (QLoRA)", "--set method=qlora",
                            replace(adapter, method="qlora", four_bit=True)))
        if t.optimizer == "adamw":
            options.append(("8-bit AdamW state", "--set training.optimizer=adamw_8bit",
                            replace(work, optimizer="adamw_8bit")))
    if cfg.data.max_length > 256 and work.longest_row > cfg.data.max_length // 2:
        shorter = cfg.data.max_length // 2
        options.append(("shorter rows (longer ones are cut)", f"--set data.max_length={shorter}",
                        replace(work, longest_row=shorter, pass_tokens=max(shorter, work.pass_tokens // 2))))
    available = result.available_bytes or 0
    scale = result.processes if result.device == "cpu" else 1
    scored = sorted(((memory_parts(shape, w)["peak"] * scale, what, line) for what, line, w in options))
    tips = [f"{what} ({line}): about {peak / GIB:.2f} GiB{', fits' if peak <= available else ''}"
            for peak, what, line in scored]
    if scored and scored[0][0] > available and len(options) > 1:
        together = work
        for _, _, changed in options:  # every change at once
            together = replace(together, **{k: v for k, v in vars(changed).items() if v != getattr(work, k)})
        peak = memory_parts(shape, together)["peak"] * scale
        tips.append(f"all of these together: about {peak / GIB:.2f} GiB"
                    + (", fits" if peak <= available else f", still more than the {available / GIB:.2f} GiB free"))
    return tips

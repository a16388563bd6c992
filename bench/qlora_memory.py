"""Peak memory of QLoRA vs LoRA (fp32) vs Hugging Face Trainer + PEFT, on the built-in model, on this CPU.

What is measured, and why this way:
- Each method trains in its own child process, so each peak is that method's alone: the peak
  resident set size (RSS) is the child's `ru_maxrss`, read by the parent from `os.wait4` when the
  child exits (the kernel's high-water mark of the whole process, loading and saving included).
  The child also reports RSS right after the model is loaded, and the peak as of the last
  training step, so a peak from loading can be told apart from one from training.
- Same data, model, settings and batch order for every row: `examples/quickstart.yaml` with
  `training.max_steps=N`, `eval.enabled=false` (no before/after generation),
  `training.eval_each_epoch=false` (no validation pass) and `model.dtype=float32`
  (qlora dequantises its 4-bit weights to fp32 for every matmul on this CPU too).
- `hf-peft` is the baseline: the same LoRA (rank, alpha, dropout, target modules), optimiser
  (torch AdamW), schedule (cosine, warmup), clipping, batch size and batch order, trained by
  `transformers.Trainer` on the rows tunesmith tokenised (`tunesmith.data.build_datasets`).
- Gradient checkpointing and autocast are pinned off (tunesmith's `auto` turns checkpointing on for
  qlora alone); the `lora+gc` and `qlora+gc` rows turn checkpointing on.
- s/step is the median wall time of an optimiser step (steps of a few seconds on two shared
  cores are noisy; RSS is the number this benchmark is for).
- RSS depends on the C allocator as well as on the tensors: glibc keeps freed activations
  resident in its heap, which adds a few hundred MiB of slack that varies by method.
  `--malloc-mmap-threshold 131072` runs the children with that slack removed (at a cost in speed).

    .venv/bin/python bench/qlora_memory.py                       # lora, qlora, hf-peft; 10 steps
    .venv/bin/python bench/qlora_memory.py --steps 20 --methods lora,qlora,full,hf-peft,lora+gc,qlora+gc

Results: a markdown table on stdout and bench/results/qlora_memory.json (written then renamed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "examples" / "quickstart.yaml"
DEFAULT_OUT = REPO / "bench" / "results" / "qlora_memory.json"
ALL_METHODS = ("lora", "qlora", "full", "hf-peft", "lora+gc", "qlora+gc")  # +gc: with gradient checkpointing
BASELINE = "lora"  # ratios are against tunesmith LoRA with fp32 weights
GIB = 2**30


def overrides(method: str, steps: int, extra: list[str] = ()) -> list[str]:
    """The one set of settings every row trains with (hf-peft reads the same config); `extra` is --set.

    Gradient checkpointing and autocast are pinned (where this tunesmith has them): `auto` turns
    checkpointing on for qlora alone, which would compare two things at once.  A `+gc` row asks for it.
    """
    from tunesmith.config import TrainingConfig

    base, _, variant = method.partition("+")
    pinned = {"gradient_checkpointing": "true" if variant == "gc" else "false", "autocast": "false"}
    return [
        f"method={'lora' if base == 'hf-peft' else base}",
        f"training.max_steps={steps}",
        "eval.enabled=false",
        "training.eval_each_epoch=false",
        "model.dtype=float32",
        *(f"training.{key}={value}" for key, value in pinned.items() if key in TrainingConfig.model_fields),
        *extra,
    ]


def weight_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers (tied tensors once); a 4-bit weight is its packed uint8."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


# --- children: one training each -------------------------------------------------------------------


def child_tunesmith(method: str, steps: int, config: Path, run_dir: Path, extra: list[str]) -> dict:
    """tunesmith's own run_training, with a wrapper around its model loader that reads RSS after loading."""
    from tunesmith.config import load_config
    from tunesmith.hardware import peak_rss_bytes, release_free_memory, rss_bytes
    from tunesmith.train import loop
    from tunesmith.train.metrics_log import read_metrics

    after_load: dict = {}
    load_model = loop.load_model

    def load_model_and_measure(*args, **kwargs):
        model = load_model(*args, **kwargs)
        release_free_memory()  # what run_training does right after loading
        after_load.update(rss_bytes=rss_bytes(), peak_rss_bytes=peak_rss_bytes(), weight_bytes=weight_bytes(model))
        return model

    loop.load_model = load_model_and_measure  # run_training calls the name it imported into loop
    cfg = load_config(config, overrides(method, steps, extra))
    summary = loop.run_training(cfg, run_dir)
    train_records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]
    return {
        "after_load": after_load,
        "peak_rss_bytes_training": train_records[-1]["peak_rss_bytes"],  # as of the last step, before saving
        "peak_rss_bytes_self": summary["memory"]["peak_rss_bytes"],
        "step_s": [r["step_s"] for r in train_records],
        "rss_bytes_by_step": [r["rss_bytes"] for r in train_records],
        "first_loss": summary["train"]["first_loss"],
        "final_loss": summary["train"]["final_loss"],
        "steps": summary["train"]["steps"],
        "parameters": summary["model"]["parameters"],
        "trainable_parameters": summary["model"]["trainable_parameters"],
        "dtype": summary["hardware"]["dtype"],
        "threads": summary["hardware"]["threads"],
        "gradient_checkpointing": summary["hardware"].get("gradient_checkpointing", False),
        "autocast": summary["hardware"].get("autocast"),
    }


def baseline_inputs(cfg):
    """(model source, tokenizer, training rows) for a Hugging Face baseline of a tunesmith config: the rows
    tunesmith tokenised, in its first-epoch order, so both see the same batches (Trainer would shuffle
    differently); seeds and threads set as run_training sets them."""
    import torch

    from tunesmith.data import build_datasets
    from tunesmith.data.batching import epoch_order
    from tunesmith.hardware import cpu_threads
    from tunesmith.models import load_tokenizer, resolve_model_source, tunesmith_home

    t = cfg.training
    torch.manual_seed(t.seed)
    torch.set_num_threads(t.num_threads or cpu_threads())
    source = resolve_model_source(cfg.model.name)
    tokenizer = load_tokenizer(source, cfg.model)
    bundle = build_datasets(cfg.data, tokenizer, cache_dir=tunesmith_home() / "tokenized")
    return source, tokenizer, [bundle.train[i] for i in epoch_order(len(bundle.train), t.seed, 0)]


def child_hf_peft(steps: int, config: Path, run_dir: Path, extra: list[str]) -> dict:
    """The baseline: transformers.Trainer + PEFT LoRA on the same tokenised rows, in the same order."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from tunesmith.config import load_config
    from tunesmith.data.batching import collate
    from tunesmith.hardware import peak_rss_bytes, rss_bytes
    from tunesmith.models.families import family_target_modules

    cfg = load_config(config, overrides("hf-peft", steps, extra))
    t = cfg.training
    source, tokenizer, rows = baseline_inputs(cfg)

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.config.use_cache = False
    after_load = {"rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes(), "weight_bytes": weight_bytes(model)}
    model = get_peft_model(model, LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=family_target_modules(model.config.model_type), task_type="CAUSAL_LM",
    ))

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    class Clock(TrainerCallback):
        """Wall time of each optimiser step, and the logged loss of each step."""

        def __init__(self):
            self.step_s, self.rss, self.losses, self.peak_at_last_step, self._tick = [], [], [], 0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._tick = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self._tick)
            self.rss.append(rss_bytes())
            self.peak_at_last_step = peak_rss_bytes()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=str(run_dir), max_steps=steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim="adamw_torch", adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon, seed=t.seed, use_cpu=True, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    clock = Clock()
    trainer = InOrder(model=model, args=args, train_dataset=rows,
                      data_collator=lambda batch: collate(batch, tokenizer.pad_token_id), callbacks=[clock])
    trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "after_load": after_load,
        "peak_rss_bytes_training": clock.peak_at_last_step,
        "peak_rss_bytes_self": peak_rss_bytes(),
        "step_s": clock.step_s,
        "rss_bytes_by_step": clock.rss,
        "first_loss": clock.losses[0] if clock.losses else None,
        "final_loss": clock.losses[-1] if clock.losses else None,
        "steps": len(clock.step_s),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": trainable,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": False,
        "autocast": None,
    }


def run_child(args) -> None:
    run_dir = Path(args.run_dir)
    if args.child == "hf-peft":
        result = child_hf_peft(args.steps, Path(args.config), run_dir, args.set)
    else:
        result = child_tunesmith(args.child, args.steps, Path(args.config), run_dir, args.set)
    Path(args.result).write_text(json.dumps(result))


# --- parent: run each child, read its peak, tabulate --------------------------------------------------


def measure(method: str, steps: int, config: Path, extra: list[str], work: Path, log_dir: Path,
            mmap_threshold: int | None) -> dict:
    """Train `method` in a fresh process; its peak RSS is the kernel's ru_maxrss for that process."""
    env = dict(os.environ)
    if mmap_threshold is not None:
        # A fixed threshold turns off glibc's dynamic one, which after the first large free() serves every
        # allocation under 32 MiB from the heap, where freed activations stay resident (see RESULTS.md).
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    result_file = work / f"{method}.json"
    log_file = log_dir / f"{method}.log"  # the child's own output, for when a number looks wrong
    command = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--steps", str(steps),
               "--config", str(config), "--run-dir", str(work / f"run-{method}"), "--result", str(result_file),
               *(f"--set={item}" for item in extra)]
    result = run_measured(method, command, result_file, log_file, env)
    result["method"] = method
    result["median_step_s"] = statistics.median(result["step_s"]) if result["step_s"] else None
    return result


def run_measured(name: str, command: list[str], result_file: Path, log_file: Path, env: dict | None = None) -> dict:
    """Run `command`, a child that writes its JSON result to `result_file`, with its output in `log_file`; returns
    that result with the child's own peak RSS (its ru_maxrss, from wait4: loading included, no other process's),
    its wall time and its log added.  A failed child ends the benchmark with the end of its log.  (The three
    training benchmarks, qlora_memory, train_throughput and dpo_throughput, measure their runs with it.)"""
    started = time.time()
    with open(log_file, "w", encoding="utf-8") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # rusage of this child alone
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"{name}: the child failed (exit {code}); the end of {log_file}:\n{tail}")
    result = json.loads(result_file.read_text())
    result.update(peak_rss_bytes=usage.ru_maxrss * 1024, wall_s=time.time() - started, log=shown(log_file))
    return result


def run_workload_child(script: str, name: str, raw: dict, work: Path, log_dir: Path) -> dict:
    """`script --child NAME` on the workload `raw` (a config dict, written to a JSON file the child reads), measured
    by `run_measured` (the child's result JSON with its peak RSS, wall time and log); train_throughput's and
    dpo_throughput's runs."""
    result_file, config_file = work / f"{name}.json", work / f"{name}.config.json"
    config_file.write_text(json.dumps(raw))
    command = [sys.executable, str(Path(script).resolve()), "--child", name, "--config-json", str(config_file),
               "--run-dir", str(work / f"run-{name}"), "--result", str(result_file)]
    print(f"{name}: training {raw['training']['max_steps']} steps in a child process ...", file=sys.stderr, flush=True)
    return run_measured(name, command, result_file, log_dir / f"{name}.log")


def shown(path: Path) -> str:
    """A path as the report shows it: relative to the repo where it lies inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def label(method: str) -> str:
    base, _, variant = method.partition("+")
    name = {"hf-peft": "HF Trainer + PEFT LoRA (fp32)", "lora": "tunesmith lora (fp32)",
            "qlora": "tunesmith qlora (NF4, fp32 compute)", "full": "tunesmith full (fp32)"}[base]
    return name + (", gradient checkpointing" if variant == "gc" else "")


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["method"] == BASELINE), None)
    lines = [
        "| method | peak RSS (GiB) | vs tunesmith lora | RSS after load (GiB) | peak by last step (GiB) "
        "| weights (MiB) | s/step (median) | loss first → final |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ratio = f"{r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x" if base else "n/a"
        loss = (f"{r['first_loss']:.3f} → {r['final_loss']:.3f}" if r["first_loss"] is not None else "n/a")
        lines.append(
            f"| {label(r['method'])} | {r['peak_rss_bytes'] / GIB:.3f} | {ratio} "
            f"| {r['after_load']['rss_bytes'] / GIB:.3f} | {r['peak_rss_bytes_training'] / GIB:.3f} "
            f"| {r['after_load']['weight_bytes'] / 2**20:.0f} | {r['median_step_s']:.2f} | {loss} |"
        )
    return "\n".join(lines)


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception as exc:  # missing or broken: qlora then falls back, and the table must say so
        bnb = f"unavailable ({type(exc).__name__})"
    import peft
    import transformers

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "bitsandbytes": bnb, "transformers": transformers.__version__,
            "peft": peft.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps per method (default 10)")
    parser.add_argument("--methods", default="lora,qlora,hf-peft",
                        help=f"comma-separated, from {', '.join(ALL_METHODS)} (default lora,qlora,hf-peft)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the YAML every method trains with")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the JSON results go (logs/ beside it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more config override for every method, e.g. --set training.batch_size=1")
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="run the children with MALLOC_MMAP_THRESHOLD_=BYTES (glibc); default: glibc's own")
    parser.add_argument("--child", choices=ALL_METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
    out = Path(args.out)
    log_dir = out.parent / "logs" / out.stem
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="qlora-memory-") as work:
        for method in methods:
            print(f"{method}: training {args.steps} steps in a child process ...", flush=True)
            result = measure(method, args.steps, Path(args.config), args.set, Path(work), log_dir,
                             args.malloc_mmap_threshold)
            print(f"{method}: peak RSS {result['peak_rss_bytes'] / GIB:.3f} GiB, "
                  f"median {result['median_step_s']:.2f} s/step", flush=True)
            results.append(result)

    from tunesmith.fileio import atomic_write_json

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "config": shown(Path(args.config)),
        "overrides": overrides("<method>", args.steps, args.set),
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "baseline": BASELINE,
        "results": results,
    }
    atomic_write_json(out, report)
    print()
    print(table(results))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()

"""Training throughput and memory: tunesmith against Hugging Face Trainer + PEFT, same model, rows and settings.

The standard workload (bench/RESULTS.md, "Training throughput and memory vs Hugging Face Trainer + PEFT"): the built-in SmolLM2-135M-Instruct in fp32; LoRA r=16, alpha=32,
dropout 0.05 on all linear layers; `../shared/data/gpteacher-roleplay.json` (Alpaca rows through the
chat template, prompt masked); max_length 512; micro-batch 4; AdamW, lr 1e-4; no gradient
checkpointing; no autocast on a CPU.

- `baseline`: transformers.Trainer + PEFT, the ordinary way: each batch padded to its longest row,
  labels -100 on prompt and padding, the model's own loss.  It trains on the rows tunesmith
  tokenised, in tunesmith's first-epoch order, so both see the same batches.  On a CPU with AMX-BF16 or
  AVX512-BF16 it also runs with `bf16=True` (`baseline_bf16`; `baseline_fp32` beside it), and the faster of
  the two is the baseline every ratio is taken against: the peer at its fastest precision on the machine.
- `tunesmith`: `tunesmith.train.loop.run_training` on the same config, i.e. exactly what
  `tunesmith train` runs; its numbers are the ones its summary.json reports.
- `tunesmith_padded` (skipped by --no-padded): tunesmith with `training.packing=false`, to show that
  packing learns the same: validation loss after the same steps, packed vs padded.

Each run is a child process, so each peak RSS (`ru_maxrss` from `os.wait4`) is that run's alone,
loading included.  40 steps by default: a padded run's memory grows with the longest micro-batch it
has met (padded to 1096 tokens in the first 20 batches of this data, 1328 in the first 40, 1932 over
the epoch), while a packed run's is bounded by `training.pass_tokens`; 40 steps is where the
baseline reaches the ~5.6 GiB the issue quotes.  Throughput is trained (unmasked) tokens over the summed wall time of all
optimiser steps, the first included, for every run.  The fp32 matmul peak of this machine is
measured in the parent (2048 x 2048 matrix products), and each run's model FLOP/s is reported as a
fraction of it.  A shared machine's speed drifts from minute to minute (5-10% on the 2-core box), and
a baseline run and a tunesmith run follow each other; `--repeats N` runs N such pairs alternately and
reports the median of the pairs' ratios (each pair's numbers are in the JSON under "pairs").

    .venv/bin/python bench/train_throughput.py --json                 # 40 steps each; JSON on stdout
    .venv/bin/python bench/train_throughput.py --steps 10 --no-padded  # quicker
    .venv/bin/python bench/train_throughput.py --json --repeats 2      # two alternating pairs, median ratios

Results also go to bench/results/train_throughput.json (written then renamed), logs beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qlora_memory import baseline_inputs, machine, run_workload_child, shown  # noqa: E402  (the sibling benchmark's helpers)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "gpteacher-roleplay.json"
DEFAULT_OUT = REPO / "bench" / "results" / "train_throughput.json"
GIB = 2**30
LOSS_STEPS = 10  # "same learning": per-step losses compared over the first this many steps


def workload(steps: int, data: Path, extra: dict) -> dict:
    """The standard workload as a tunesmith config (a dict); `extra` overrides training keys."""
    return {
        "model": {"name": "smollm2-135m-instruct", "dtype": "float32"},
        "data": {"path": str(data), "max_length": 512, "validation_split": 0.02},
        "method": "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "training": {"batch_size": 4, "learning_rate": 1e-4, "max_steps": steps, "gradient_checkpointing": False,
                     "autocast": False, "lr_scheduler": "constant", "eval_each_epoch": True, **extra},
        "eval": {"enabled": False},
    }


# --- children --------------------------------------------------------------------------------------


def child_tunesmith(raw: dict, run_dir: Path) -> dict:
    from tunesmith.config import config_from_dict
    from tunesmith.train.loop import run_training
    from tunesmith.train.metrics_log import read_metrics

    summary = run_training(config_from_dict(raw, "bench workload"), run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    val = [r for r in records if r["type"] == "validation"]
    return {
        "trained_tokens_per_s": summary["train"]["trained_tokens_per_s"],
        "all_tokens_per_s": summary["train"]["all_tokens_per_s"],
        "trained_tokens": summary["train"]["trained_tokens"],
        "all_tokens": round(summary["train"]["all_tokens_per_s"] * summary["train"]["wall_s"]),
        "train_s": summary["train"]["wall_s"],
        "losses": [r["loss"] for r in train],
        "step_s": [r["step_s"] for r in train],
        "val_loss": val[-1]["val_loss"] if val else None,
        "packing": summary["hardware"].get("packing"),
        "pass_tokens": summary["hardware"].get("pass_tokens"),
        "threads": summary["hardware"]["threads"],
        "dtype": summary["hardware"]["dtype"], "autocast": summary["hardware"]["autocast"],
        "gpu_peak_bytes": summary["memory"].get("peak_allocated_bytes"),
        "summary_json": str(run_dir / "summary.json"),
    }


def child_baseline(raw: dict, run_dir: Path) -> dict:
    """transformers.Trainer + PEFT LoRA on tunesmith's tokenised rows, in tunesmith's first-epoch order.

    `raw["peer"]` (taken out before the rest is read as a tunesmith config) sets the peer's precision as its
    users set it: {"dtype": "float32"|"bfloat16", "bf16": bool}: the weights' dtype in from_pretrained and
    TrainingArguments(bf16=...) (autocast); without it, fp32 weights and no autocast."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from tunesmith.config import config_from_dict
    from tunesmith.data.batching import collate

    peer = {"dtype": "float32", "bf16": False, **raw.pop("peer", {})}
    cfg = config_from_dict(raw, "bench workload")
    t = cfg.training
    source, tokenizer, rows = baseline_inputs(cfg)
    trained = [sum(1 for x in r.labels[1:] if x != -100) for r in rows]  # next-token targets per row
    lengths = [len(r.input_ids) for r in rows]

    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, peer["dtype"]))
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    class Clock(TrainerCallback):
        def __init__(self):
            self.step_s, self.losses, self._tick = [], [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._tick = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self._tick)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=str(run_dir), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, optim="adamw_torch", seed=t.seed,
        use_cpu=not on_gpu, bf16=peer["bf16"], logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    clock = Clock()
    trainer = InOrder(model=model, args=args, train_dataset=rows,
                      data_collator=lambda batch: collate(batch, tokenizer.pad_token_id), callbacks=[clock])
    trainer.train()
    n_rows = len(clock.step_s) * t.batch_size
    train_s = sum(clock.step_s)
    batches = [range(i, min(i + t.batch_size, n_rows)) for i in range(0, n_rows, t.batch_size)]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return {
        "trained_tokens_per_s": sum(trained[:n_rows]) / train_s,
        "all_tokens_per_s": sum(lengths[:n_rows]) / train_s,
        "trained_tokens": sum(trained[:n_rows]),
        "all_tokens": sum(lengths[:n_rows]),
        "padded_tokens": padded,
        "train_s": train_s,
        "losses": clock.losses,
        "step_s": clock.step_s,
        "threads": torch.get_num_threads(),
        "dtype": peer["dtype"], "autocast": "bfloat16" if peer["bf16"] else None,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
    }


# --- parent ----------------------------------------------------------------------------------------


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
    """fp32 matmul FLOP/s of this machine with torch's default threads: best of `repeats` n x n products."""
    import torch

    from tunesmith.hardware import cpu_threads

    torch.set_num_threads(cpu_threads())
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        tick = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tick)
    return 2 * size**3 / best


def model_flops_per_step(result: dict, shape: dict) -> float:
    """Useful FLOPs of the run's training: real tokens only (padding is not useful work).

    Per token, the frozen linear layers cost 2P forward and 2P backward (gradients with respect to
    activations only; no weight gradients), as in Kaplan et al. (2020)'s 6P with the weight-gradient
    third left out; the trained LoRA factors add 6 x their parameters; attention adds about
    2 x layers x context x hidden forward and twice that backward (scores and weighted sum, causal half);
    the output projection runs forward and backward on trained tokens only.
    """
    p_body, p_lora, vocab, hidden, layers = (shape[k] for k in ("body_params", "lora_params", "vocab", "hidden", "layers"))
    tokens, trained, avg_ctx = result["all_tokens"], result["trained_tokens"], shape["avg_row_tokens"] / 2
    body = tokens * (4 * p_body + 6 * p_lora + 3 * 2 * layers * avg_ctx * hidden * 2)
    head = trained * 4 * vocab * hidden
    return body + head


def model_shape(raw: dict) -> dict:
    """Parameter counts of the workload's model (built from its config, no weights) and the mean row length."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.config import config_from_dict
    from tunesmith.data import build_datasets
    from tunesmith.models import load_tokenizer, resolve_model_source, tunesmith_home

    cfg = config_from_dict(raw, "bench workload")
    source = resolve_model_source(cfg.model.name)
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")]
    r = cfg.lora.r
    bundle = build_datasets(cfg.data, load_tokenizer(source, cfg.model), cache_dir=tunesmith_home() / "tokenized")
    return {
        "body_params": sum(m.weight.numel() for m in linear),
        "lora_params": sum(r * (m.in_features + m.out_features) for m in linear),
        "vocab": config.vocab_size, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
        "avg_row_tokens": statistics.mean(len(row.input_ids) for row in bundle.train),
    }


def measure(name: str, raw: dict, work: Path, log_dir: Path) -> dict:
    result = run_workload_child(__file__, name, raw, work, log_dir)
    print(f"{name}: {result['trained_tokens_per_s']:.1f} trained tokens/s, peak RSS "
          f"{result['peak_rss_bytes'] / GIB:.2f} GiB", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per run (default 40)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    parser.add_argument("--no-padded", action="store_true", help="skip the tunesmith run with packing off")
    parser.add_argument("--repeats", type=int, default=1,
                        help="baseline/tunesmith pairs, run alternately; the ratios reported are the medians over "
                             "the pairs (default 1)")
    parser.add_argument("--data", default=str(DATA), help="the Alpaca-format data (default: gpteacher-roleplay)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a training.* setting for the tunesmith run, e.g. --set pass_tokens=1024")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the JSON results go (logs/ beside it)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        raw = json.loads(Path(args.config_json).read_text())
        run = child_baseline if args.child.startswith("baseline") else child_tunesmith
        Path(args.result).write_text(json.dumps(run(raw, Path(args.run_dir))))
        return

    from tunesmith.config import parse_value

    data = Path(args.data)
    if not data.is_file():
        raise SystemExit(f"--data: {data} does not exist; the workload needs ../shared/data/gpteacher-roleplay.json "
                         "(see ../shared/data/README.md) or another Alpaca-format file.")
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item}: expected KEY=VALUE, e.g. --set pass_tokens=1024")
        extra[key.removeprefix("training.")] = parse_value(value)
    out = Path(args.out)
    log_dir = out.parent / "logs" / out.stem
    log_dir.mkdir(parents=True, exist_ok=True)

    from tunesmith.hardware import CPU_BF16_FEATURES, cpu_features

    # Issue 24: the peer runs at its fastest precision on the machine, and the ratio is taken against the faster.
    peer_bf16 = any(f in cpu_features() for f in CPU_BF16_FEATURES)
    peak = matmul_peak_flops()
    shape = model_shape(workload(args.steps, data, extra))
    runs = {}
    with tempfile.TemporaryDirectory(prefix="tunesmith-throughput-") as tmp:
        work = Path(tmp)
        pairs = []
        for i in range(max(1, args.repeats)):
            tag = "" if i == 0 else f"_{i + 1}"
            peer = measure("baseline" + tag, workload(args.steps, data, {}), work, log_dir)
            if peer_bf16:  # the peer at its fastest setting: bf16=True where the CPU has bf16 matmuls
                with_bf16 = measure("baseline_bf16" + tag, {**workload(args.steps, data, {}), "peer": {"bf16": True}},
                                    work, log_dir)
                runs.setdefault("baseline_fp32", peer)
                runs.setdefault("baseline_bf16", with_bf16)
                peer = max(peer, with_bf16, key=lambda r: r["trained_tokens_per_s"])
            pairs.append((peer, measure("tunesmith" + tag, workload(args.steps, data, extra), work, log_dir)))
        runs["baseline"], runs["tunesmith"] = pairs[0]
        if not args.no_padded:
            runs["tunesmith_padded"] = measure("tunesmith_padded", workload(args.steps, data, {**extra, "packing": False}),
                                               work, log_dir)
    for result in runs.values():
        result["model_flops_per_s"] = model_flops_per_step(result, shape) / result["train_s"]
        result["mfu"] = result["model_flops_per_s"] / peak
    base, ours = runs["baseline"], runs["tunesmith"]
    n = min(LOSS_STEPS, len(base["losses"]), len(ours["losses"]))
    loss_gap = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"][:n], base["losses"][:n])) if n else None
    pair_ratios = [{"baseline_tokens_per_s": b["trained_tokens_per_s"], "tunesmith_tokens_per_s": t["trained_tokens_per_s"],
                    "baseline_rss_gib": b["peak_rss_bytes"] / GIB, "tunesmith_rss_gib": t["peak_rss_bytes"] / GIB,
                    "ratio": t["trained_tokens_per_s"] / b["trained_tokens_per_s"],
                    "rss_ratio": t["peak_rss_bytes"] / b["peak_rss_bytes"]} for b, t in pairs]
    report = {
        "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), "fp32_matmul_peak_flops": peak},
        "workload": workload(args.steps, data, extra),
        "model_shape": shape,
        **runs,
        "ratio": statistics.median(p["ratio"] for p in pair_ratios),
        "rss_ratio": statistics.median(p["rss_ratio"] for p in pair_ratios),
        "pairs": pair_ratios,
        "loss_max_relative_gap_first_steps": loss_gap,
        "loss_steps_compared": n,
    }
    if "tunesmith_padded" in runs:
        padded = runs["tunesmith_padded"]
        report["val_loss_packed_vs_padded"] = [ours["val_loss"], padded["val_loss"]]
        # the same rows and, through dropout_rows, the same dropout masks: the steps differ by float rounding only
        report["loss_max_relative_gap_packed_vs_padded"] = max(
            abs(a - b) / abs(b) for a, b in zip(ours["losses"], padded["losses"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2))
    os.replace(partial, out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"throughput ratio {report['ratio']:.2f}x, peak RSS ratio {report['rss_ratio']:.2f}x "
              f"(median of {len(pair_ratios)} pair(s)); written: {shown(out)}")


if __name__ == "__main__":
    main()

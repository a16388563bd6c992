"""DPO training throughput and memory: tunesmith against TRL's DPOTrainer, same model, pairs and settings.

The workload (bench/RESULTS.md, "DPO throughput vs TRL DPOTrainer (CPU)"): the built-in SmolLM2-135M-Instruct
in fp32; LoRA r=16, alpha=32, dropout 0.05 on q/k/v/o/gate/up/down (what `lora.target_modules: auto` picks for a
Llama); the first `--pairs` rows of `../shared/data/hh-rlhf-harmless.jsonl` (HH-RLHF conversations: the shared
turns are the prompt, the two last replies the answers), tokenised by tunesmith's data path; max_length 512;
4 pairs a step, no accumulation; AdamW lr 5e-5, constant, no warmup, clipping at 1.0; DPO beta 0.1; the
reference is the base model with the adapter switched off (one forward pass without gradients, on both sides);
no gradient checkpointing, no autocast for tunesmith.

- `trl_fp32`, `trl_bf16`: `trl.DPOTrainer` with `peft_config` (the same LoRA), fp32 weights, without and with
  `bf16=True` (this CPU has AVX512-BF16); gradient checkpointing off (TRL's default is on; off is faster here);
  the faster of the two is the peer every ratio is taken against.  It trains on tunesmith's token ids, in
  tunesmith's first-epoch order (a sequential sampler): a subclass skips DPOTrainer's own tokenising step and
  nothing else, so both sides see the same pairs in the same batches.  LoRA dropout draws differ between the
  two, so per-step losses agree closely, not exactly (step 1 is log 2 on both: the adapter starts at B = 0).
- `tunesmith`: `tunesmith.api.train`, what `tunesmith train` runs, with its CPU defaults (packed passes,
  fused LoRA-dropout/RMSNorm/rotary paths); its numbers are read from the run's summary.json and metrics.jsonl.

Each run is a child process, so each peak RSS (`ru_maxrss` from `os.wait4`) is that run's alone, loading
included.  Throughput is over the summed wall time of all optimiser steps, the first included: pairs/s, and
trained tokens/s (answer tokens, chosen and rejected, the tokens whose log-probs the loss is made of).

    .venv/bin/python bench/dpo_throughput.py                     # 8 steps each (~10 min on 2 cores); a table on stdout
    .venv/bin/python bench/dpo_throughput.py --steps 10 --pairs 48        # the run in bench/RESULTS.md (12.5 min)

Results also go to bench/results/dpo_throughput.json (written then renamed), logs beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qlora_memory import machine, run_workload_child, shown  # noqa: E402  (the sibling benchmark's helpers)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless.jsonl"
DEFAULT_OUT = REPO / "bench" / "results" / "dpo_throughput.json"
GIB = 2**30
LOSS_STEPS = 10  # "same learning": per-step losses shown side by side over the first this many steps
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def workload(steps: int, pairs: int, data: Path, lr: float) -> dict:
    """The workload as a tunesmith config (a dict); the TRL children read the same dict."""
    return {
        "model": {"name": "smollm2-135m-instruct", "dtype": "float32"},
        "data": {"path": str(data), "max_length": 512, "validation_split": 0, "limit": pairs},
        "method": "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "auto"},
        "training": {"batch_size": 4, "gradient_accumulation": 1, "learning_rate": lr, "max_steps": steps,
                     "lr_scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                     "gradient_checkpointing": False, "autocast": False, "eval_each_epoch": False},
        "objective": {"type": "dpo", "beta": 0.1},
        "eval": {"enabled": False},
    }


# --- children --------------------------------------------------------------------------------------


def child_tunesmith(raw: dict, run_dir: Path) -> dict:
    from tunesmith import api
    from tunesmith.config import config_from_dict
    from tunesmith.train.metrics_log import read_metrics

    summary = api.train(config_from_dict(raw, "bench workload"), run_dir)
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]
    steps = len(train)
    return {
        "steps": steps,
        "pairs": steps * raw["training"]["batch_size"],
        "trained_tokens": summary["train"]["trained_tokens"],
        "train_s": summary["train"]["wall_s"],
        "losses": [r["loss"] for r in train],
        "reward_margins": [r.get("reward_margin") for r in train],
        "step_s": [r["step_s"] for r in train],
        "threads": summary["hardware"]["threads"],
        "packing": summary["hardware"].get("packing"), "pass_tokens": summary["hardware"].get("pass_tokens"),
        "precision": "fp32",
        "trainable_parameters": summary["model"]["trainable_parameters"],
    }


def tunesmith_rows(cfg) -> list:
    """The pairs tunesmith trains on, in its first-epoch order (the order of its first `max_steps` steps)."""
    from tunesmith.data.batching import epoch_order
    from tunesmith.data.preference import build_preference_data
    from tunesmith.models import load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source(cfg.model.name), cfg.model)
    train = build_preference_data(cfg.data, tokenizer, "paired").train
    return [train[i] for i in epoch_order(len(train), cfg.training.seed, 0)]


def child_trl(raw: dict, run_dir: Path) -> dict:
    """trl.DPOTrainer + PEFT LoRA on tunesmith's tokenised pairs, in tunesmith's first-epoch order.

    `raw["peer"]` (taken out before the rest is read as a tunesmith config) is {"bf16": bool}: DPOConfig(bf16=...)
    with fp32 weights, as its users set it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tunesmith.config import config_from_dict
    from tunesmith.hardware import cpu_threads
    from tunesmith.models import resolve_model_source

    bf16 = bool(raw.pop("peer", {}).get("bf16", False))
    cfg = config_from_dict(raw, "bench workload")
    t = cfg.training
    torch.set_num_threads(t.num_threads or cpu_threads())
    rows = tunesmith_rows(cfg)[: t.max_steps * t.batch_size]
    if len(rows) < t.max_steps * t.batch_size:
        raise SystemExit(f"{len(rows)} pairs for {t.max_steps} steps of {t.batch_size}: raise --pairs")
    source = resolve_model_source(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.config.use_cache = False

    class OnTunesmithIds(DPOTrainer):
        """DPOTrainer on pairs tokenised already: its own tokenising step is skipped, nothing else."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class Clock(TrainerCallback):
        def __init__(self):
            self.step_s, self._tick = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._tick = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self._tick)

    args = DPOConfig(
        output_dir=str(run_dir), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation, learning_rate=t.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon, optim="adamw_torch",
        beta=cfg.objective.resolved_beta(), max_length=cfg.data.max_length, seed=t.seed,
        train_sampling_strategy="sequential", gradient_checkpointing=False, use_cpu=True, bf16=bf16, fp16=False,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0, disable_tqdm=True,
    )
    peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                             target_modules=TARGETS, task_type="CAUSAL_LM")
    data = Dataset.from_list([{"prompt_ids": r.prompt_ids, "chosen_ids": r.chosen_ids, "rejected_ids": r.rejected_ids}
                              for r in rows])
    clock = Clock()
    trainer = OnTunesmithIds(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[clock])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    steps = len(clock.step_s)
    return {
        "steps": steps,
        "pairs": steps * t.batch_size,
        "trained_tokens": sum(len(r.chosen_ids) + len(r.rejected_ids) for r in rows[: steps * t.batch_size]),
        "train_s": sum(clock.step_s),
        "losses": [h["loss"] for h in logs],
        "reward_margins": [h.get("rewards/margins") for h in logs],
        "step_s": clock.step_s,
        "threads": torch.get_num_threads(),
        "precision": "fp32 weights, bf16=True (autocast)" if bf16 else "fp32",
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


# --- parent ----------------------------------------------------------------------------------------


def measure(name: str, raw: dict, work: Path, log_dir: Path) -> dict:
    result = run_workload_child(__file__, name, raw, work, log_dir)
    result["pairs_per_s"] = result["pairs"] / result["train_s"]
    result["trained_tokens_per_s"] = result["trained_tokens"] / result["train_s"]
    print(f"{name}: {result['pairs_per_s']:.3f} pairs/s, {result['trained_tokens_per_s']:.1f} trained tokens/s, "
          f"peak RSS {result['peak_rss_bytes'] / GIB:.2f} GiB", file=sys.stderr, flush=True)
    return result


def cpu_summary() -> dict:
    """Whether the CPU has the bf16 matmul instructions (machine() names the CPU), and TRL's version."""
    import trl

    from tunesmith.hardware import cpu_features

    flags = cpu_features()
    return {"avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "trl": trl.__version__}


def table(report: dict) -> str:
    peer = report[report["peer"]]
    labels = {"trl_fp32": "TRL DPOTrainer + PEFT", "trl_bf16": "TRL DPOTrainer + PEFT",
              "tunesmith": "tunesmith (`tunesmith train` defaults)"}
    lines = ["| run | precision | pairs/s | trained tokens/s | vs fastest peer | peak RSS (GiB) | vs fastest peer "
             "| median s/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("trl_fp32", "trl_bf16", "tunesmith"):
        if name not in report:
            continue
        r = report[name]
        median = sorted(r["step_s"])[len(r["step_s"]) // 2]
        lines.append(f"| {labels[name]} | {r['precision']} | {r['pairs_per_s']:.3f} | {r['trained_tokens_per_s']:.1f} "
                     f"| {r['trained_tokens_per_s'] / peer['trained_tokens_per_s']:.2f}x "
                     f"| {r['peak_rss_bytes'] / GIB:.2f} | {r['peak_rss_bytes'] / peer['peak_rss_bytes']:.2f}x "
                     f"| {median:.2f} |")
    names = [n for n in ("tunesmith", "trl_fp32", "trl_bf16") if n in report]
    lines += ["", "| step | " + " | ".join(f"{n} loss" for n in names) + " |",
              "|---:|" + "---:|" * len(names)]
    for i in range(report["loss_steps_compared"]):
        lines.append(f"| {i + 1} | " + " | ".join(f"{report[n]['losses'][i]:.6f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps per run (default 8: about 10 minutes on 2 cores)")
    parser.add_argument("--pairs", type=int, default=48,
                        help="read the first this many rows of the data (default 48; at least 4 x --steps must "
                             "survive tunesmith's checks)")
    parser.add_argument("--lr", type=float, default=5e-5, help="learning rate (default 5e-5)")
    parser.add_argument("--no-bf16-peer", action="store_true", help="skip TRL's bf16=True run")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    parser.add_argument("--data", default=str(DATA), help="the preference data (default: hh-rlhf-harmless)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the JSON results go (logs/ beside it)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        raw = json.loads(Path(args.config_json).read_text())
        run = child_trl if args.child.startswith("trl") else child_tunesmith
        Path(args.result).write_text(json.dumps(run(raw, Path(args.run_dir))))
        return

    data = Path(args.data)
    if not data.is_file():
        raise SystemExit(f"--data: {data} does not exist; the workload needs ../shared/data/hh-rlhf-harmless.jsonl "
                         "(see ../shared/data/README.md) or another preference file.")
    out = Path(args.out)
    log_dir = out.parent / "logs" / out.stem
    log_dir.mkdir(parents=True, exist_ok=True)
    cpu = cpu_summary()
    raw = workload(args.steps, args.pairs, data, args.lr)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="tunesmith-dpo-throughput-") as tmp:
        work = Path(tmp)
        runs["trl_fp32"] = measure("trl_fp32", raw, work, log_dir)
        if not args.no_bf16_peer:
            runs["trl_bf16"] = measure("trl_bf16", {**raw, "peer": {"bf16": True}}, work, log_dir)
        runs["tunesmith"] = measure("tunesmith", raw, work, log_dir)
    peer = max((n for n in runs if n.startswith("trl")), key=lambda n: runs[n]["trained_tokens_per_s"])
    ours = runs["tunesmith"]
    n = min(LOSS_STEPS, *(len(r["losses"]) for r in runs.values()))
    report = {
        "command": "python bench/dpo_throughput.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), **cpu},
        "workload": raw,
        **runs,
        "peer": peer,
        "ratio": ours["trained_tokens_per_s"] / runs[peer]["trained_tokens_per_s"],
        "rss_ratio": ours["peak_rss_bytes"] / runs[peer]["peak_rss_bytes"],
        "loss_steps_compared": n,
        "loss_max_relative_gap_vs_trl_fp32": max(
            abs(a - b) / abs(b) for a, b in zip(ours["losses"][:n], runs["trl_fp32"]["losses"][:n])),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2))
    os.replace(partial, out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report))
        print(f"\ntunesmith / fastest peer ({peer}): {report['ratio']:.2f}x trained tokens/s, "
              f"{report['rss_ratio']:.2f}x peak RSS; written: {shown(out)}")


if __name__ == "__main__":
    main()

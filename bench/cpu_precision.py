"""fp32 against bf16 training on this CPU: what `model.dtype: auto` should pick here.

Trains the quickstart config (the built-in model, LoRA, the dates data, evaluation off) for the same steps
three ways, each in its own process through the command line:

- `fp32`: model.dtype=float32, training.autocast=false (what auto picks on every CPU);
- `fp32+autocast`: fp32 weights, bf16 matmuls under autocast;
- `bf16`: model.dtype=bfloat16 (bf16 weights, fp32 adapters, autocast bf16).

and times a bare matmul in both types at the built-in model's shapes, to show what the CPU itself does.
It prints trained tokens/s, their ratio to `fp32`, the median and peak resident memory, and the loss of the
last step.  On a CPU without AMX-BF16/AVX512-BF16 bf16 is emulated, and slower still.

    .venv/bin/python bench/cpu_precision.py              # 40 steps each
    .venv/bin/python bench/cpu_precision.py --steps 20

Results: bench/results/cpu_precision.json (written then renamed) and a summary on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qlora_memory import machine, shown  # noqa: E402  (the sibling benchmarks' helpers)
from scale_out import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "cpu_precision.json"
SETTINGS = {
    "fp32": ["model.dtype=float32", "training.autocast=false"],
    "fp32+autocast": ["model.dtype=float32", "training.autocast=true"],
    "bf16": ["model.dtype=bfloat16"],
}


def matmul_gflops(rows: int, inner: int, cols: int, dtype) -> float:
    import torch

    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
    for _ in range(3):
        a @ b
    repeats = 10
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * inner * cols * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    import torch

    from tunesmith.hardware import cpu_threads, explain_dtype

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps of each run (default 40)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result file (default {shown(DEFAULT_OUT)})")
    args = parser.parse_args()

    torch.set_num_threads(cpu_threads())
    # SmolLM2-135M: hidden 576, MLP 1536, vocabulary 49152; 1024 tokens a pass.
    shapes = [(1024, 576, 576), (1024, 576, 1536), (1024, 576, 49152)]
    matmuls = {f"{r}x{k}x{c}": {name: matmul_gflops(r, k, c, dtype) for name, dtype in
                                (("fp32", torch.float32), ("bf16", torch.bfloat16))} for r, k, c in shapes}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="tunesmith-cpu-precision-") as tmp:
        for name, settings in SETTINGS.items():
            runs[name] = train(Path(tmp) / name.replace("+", "-"), args.steps,
                               [x for item in settings for x in ("--set", item)])
    for run in runs.values():
        run["tokens_per_s_ratio_to_fp32"] = run["trained_tokens_per_s"] / runs["fp32"]["trained_tokens_per_s"]
        run["final_loss"] = run.pop("losses")[-1]
        run.pop("distributed")
    result = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
              "auto_picks": explain_dtype("cpu")[1], "steps": args.steps, "matmul_gflops": matmuls, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(args.out)

    print(f"auto: {result['auto_picks']}")
    for shape, speeds in matmuls.items():
        print(f"matmul {shape}: fp32 {speeds['fp32']:.0f} GFLOP/s, bf16 {speeds['bf16']:.0f} GFLOP/s "
              f"({speeds['bf16'] / speeds['fp32']:.1f}x)")
    for name, run in runs.items():
        print(f"{name:>13}: {run['trained_tokens_per_s']:.1f} trained tokens/s ({run['tokens_per_s_ratio_to_fp32']:.2f}x), "
              f"RSS while training {run['median_training_rss_bytes_process_0'] / 2**30:.2f} GiB "
              f"(peak {run['peak_rss_bytes_process_0'] / 2**30:.2f} GiB), last loss {run['final_loss']:.4f}")
    print(f"written: {shown(args.out)}")


if __name__ == "__main__":
    main()

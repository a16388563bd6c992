"""One process against several, on the same global batch (bench/RESULTS.md, "Several processes against one").

Trains the quickstart config (the built-in model, LoRA, the dates data) for the same steps five times through
the command line, as a user would:

- `one`: one process with training.gradient_accumulation = N (the global batch: batch_size x N rows);
- `ddp`: `tunesmith train ... --nproc N` with accumulation 1, the same global batch over N processes, each
  holding the whole model;
- `fsdp`: the same with distributed.strategy=fsdp, each process holding 1/N of the weights;
- `zero2`, `zero3`: the same with distributed.strategy=deepspeed and zero_stage 2 (optimiser state and
  gradients sharded) or 3 (the weights too).

It prints the per-step losses, their largest difference from `one` (the same steps, so float rounding),
trained tokens/s and the ratio to `one`, and process 0's resident memory: the median over the training steps
(what the process holds while it trains) and the peak (which includes loading the whole model before sharding
it, and process 0 holding it again after training to save and evaluate it).
On a CPU the processes share its cores (cores / N threads each), so the ratio measures what splitting the work
into processes costs or saves, not extra hardware.

    .venv/bin/python bench/scale_out.py                # N = 2, 10 steps each
    .venv/bin/python bench/scale_out.py --nproc 2 --steps 20

Results: bench/results/scale_out.json (written then renamed) and a summary on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qlora_memory import machine, shown  # noqa: E402  (the sibling benchmark's helpers)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "scale_out.json"


def train(run_dir: Path, steps: int, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "tunesmith.cli", "train", str(REPO / "examples" / "quickstart.yaml"),
               "--output", str(run_dir), "--set", "eval.enabled=false", "--set", f"training.max_steps={steps}", *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench: {' '.join(command)} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rss = sorted(r["rss_bytes"] for r in records if r["type"] == "train")
    return {
        "command": " ".join(["tunesmith", *command[3:]]),
        "losses": [r["loss"] for r in records if r["type"] == "train"],
        "trained_tokens_per_s": summary["train"]["trained_tokens_per_s"],
        "peak_rss_bytes_process_0": summary["memory"]["peak_rss_bytes"],
        "median_training_rss_bytes_process_0": rss[len(rss) // 2],
        "distributed": summary.get("distributed"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes of the second run (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps of each run (default 10)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result file (default {shown(DEFAULT_OUT)})")
    args = parser.parse_args()

    runs = {}
    with tempfile.TemporaryDirectory(prefix="tunesmith-scale-out-") as tmp:
        runs["one"] = train(Path(tmp) / "one", args.steps, ["--set", f"training.gradient_accumulation={args.nproc}"])
        for name, settings in (("ddp", ["distributed.strategy=ddp"]), ("fsdp", ["distributed.strategy=fsdp"]),
                               ("zero2", ["distributed.strategy=deepspeed", "distributed.zero_stage=2"]),
                               ("zero3", ["distributed.strategy=deepspeed", "distributed.zero_stage=3"])):
            runs[name] = train(Path(tmp) / name, args.steps,
                               ["--nproc", str(args.nproc), *[x for item in settings for x in ("--set", item)]])
    one = runs["one"]
    for run in runs.values():
        run["loss_max_abs_gap_to_one"] = max(abs(a - b) for a, b in zip(one["losses"], run["losses"]))
        run["tokens_per_s_ratio_to_one"] = run["trained_tokens_per_s"] / one["trained_tokens_per_s"]
    result = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "nproc": args.nproc,
        "steps": args.steps,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(args.out)

    print(f"global batch: {runs['ddp']['distributed']['global_batch_rows']} rows per step, {args.steps} steps; "
          f"one = 1 process, the others {args.nproc} processes")
    print(f"{'step':>4}" + "".join(f"  {name:>10}" for name in runs))
    for i, losses in enumerate(zip(*(run["losses"] for run in runs.values())), 1):
        print(f"{i:>4}" + "".join(f"  {loss:>10.6f}" for loss in losses))
    for name, run in runs.items():
        print(f"{name:>5}: loss gap to one {run['loss_max_abs_gap_to_one']:.1e}, "
              f"{run['trained_tokens_per_s']:.1f} trained tokens/s ({run['tokens_per_s_ratio_to_one']:.2f}x), "
              f"process 0 RSS while training {run['median_training_rss_bytes_process_0'] / 2**30:.2f} GiB "
              f"(peak {run['peak_rss_bytes_process_0'] / 2**30:.2f} GiB)")
    print(f"written: {shown(args.out)}")


if __name__ == "__main__":
    main()

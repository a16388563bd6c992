"""One process against several, on the same global batch (issue 9).

Trains the quickstart config (the built-in model, LoRA, the dates data) for the same steps twice through the
command line, as a user would:

- `one`: one process with training.gradient_accumulation = N (the global batch: batch_size x N rows);
- `nproc`: `tunesmith train ... --nproc N` with accumulation 1, the same global batch over N processes.

It prints the per-step losses of both, their largest difference (they take the same steps, so it should be
float rounding), trained tokens/s of each and their ratio, and the peak RSS each process reported (process 0's
for the N-process run; every process holds the whole model, so the job's total is about N times that).
On a CPU the processes share its cores (cores / N threads each), so the ratio measures what splitting the work
into processes costs or saves, not extra hardware.

    .venv/bin/python bench/scale_out.py                # N = 2, 10 steps
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
    return {
        "command": " ".join(["tunesmith", *command[3:]]),
        "losses": [r["loss"] for r in records if r["type"] == "train"],
        "trained_tokens_per_s": summary["train"]["trained_tokens_per_s"],
        "peak_rss_bytes_process_0": summary["memory"]["peak_rss_bytes"],
        "distributed": summary.get("distributed"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes of the second run (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps of each run (default 10)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result file (default {shown(DEFAULT_OUT)})")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tunesmith-scale-out-") as tmp:
        one = train(Path(tmp) / "one", args.steps, ["--set", f"training.gradient_accumulation={args.nproc}"])
        many = train(Path(tmp) / "nproc", args.steps, ["--nproc", str(args.nproc)])
    gaps = [abs(a - b) for a, b in zip(one["losses"], many["losses"])]
    result = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "nproc": args.nproc,
        "steps": args.steps,
        "one_process": one,
        "n_processes": many,
        "loss_max_abs_gap": max(gaps),
        "tokens_per_s_ratio": many["trained_tokens_per_s"] / one["trained_tokens_per_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(args.out)

    print(f"global batch: {many['distributed']['global_batch_rows']} rows per step, {args.steps} steps")
    print(f"{'step':>4}  {'1 process':>12}  {f'{args.nproc} processes':>12}")
    for i, (a, b) in enumerate(zip(one["losses"], many["losses"]), 1):
        print(f"{i:>4}  {a:>12.6f}  {b:>12.6f}")
    print(f"largest per-step loss gap: {result['loss_max_abs_gap']:.2e}")
    print(f"trained tokens/s: 1 process {one['trained_tokens_per_s']:.1f}, {args.nproc} processes "
          f"{many['trained_tokens_per_s']:.1f} ({result['tokens_per_s_ratio']:.2f}x)")
    print(f"peak RSS: 1 process {one['peak_rss_bytes_process_0'] / 2**30:.2f} GiB; process 0 of {args.nproc} "
          f"{many['peak_rss_bytes_process_0'] / 2**30:.2f} GiB")
    print(f"written: {shown(args.out)}")


if __name__ == "__main__":
    main()

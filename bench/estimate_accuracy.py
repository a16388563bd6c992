"""How close `tunesmith estimate` comes to what runs then measure, on this machine.

Memory: for LoRA, QLoRA and full fine-tuning of the built-in model, at two micro-batch sizes, with and
without gradient checkpointing (12 rows), the estimate (made in this process, before anything loads) against
the peak RSS of the same run (`tunesmith train` in a child process, 6 steps, no before/after evaluation; the
child's summary.json reports its `ru_maxrss`, loading included, which is what the estimate's peak stands for).
The data is the quickstart's (rows of about 70 tokens: a pass of 2 rows holds ~160 tokens, of 8 rows ~580,
so the micro-batch size moves the activations; `--memory-config examples/dialogsum.yaml` takes rows of
100-840 tokens instead, at several times the run time).

Time: for the quickstart and the DialogSum example, `tunesmith estimate --probe` (a few real steps, then
stopped) against the wall time of the whole run, started the same way (`tunesmith train`, measured from
starting the child to its exit, so loading and the before/after evaluation count).

    .venv/bin/python bench/estimate_accuracy.py                     # both tables (about 30 min on 2 cores)
    .venv/bin/python bench/estimate_accuracy.py --only memory       # the 12 memory rows (about 8 min)
    .venv/bin/python bench/estimate_accuracy.py --only time --time-configs examples/quickstart.yaml

Results: markdown tables on stdout, bench/results/estimate_accuracy.json (written then renamed).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tunesmith import api  # noqa: E402
from tunesmith.hardware import cpu_features, cpu_model_name  # noqa: E402

MEMORY_TOLERANCE = 0.20
TIME_TOLERANCE = 0.25


def _train(config: str, overrides: list[str], out: Path) -> tuple[dict, float]:
    """Run `tunesmith train` as a user would (a child process); its summary and its wall time from start to exit."""
    argv = [sys.executable, "-m", "tunesmith.cli", "train", config, "--output", str(out), "--no-fit-check"]
    argv += [x for o in overrides for x in ("--set", o)]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text()), wall


def memory_rows(config: str, steps: int, scratch: Path) -> list[dict]:
    rows = []
    for method, batch, checkpointing in itertools.product(("lora", "qlora", "full"), (2, 8), (False, True)):
        overrides = [f"method={method}", f"training.batch_size={batch}",
                     f"training.gradient_checkpointing={str(checkpointing).lower()}", f"training.max_steps={steps}",
                     "eval.enabled=false", "training.eval_each_epoch=false"]
        est = api.estimate(config, overrides)
        summary, wall = _train(config, overrides, scratch / f"{method}-{batch}-{checkpointing}")
        measured = summary["memory"]["peak_rss_bytes"]
        row = {"method": method, "micro_batch": batch, "gradient_checkpointing": checkpointing,
               "estimated_peak_bytes": est.peak_bytes, "measured_peak_bytes": measured,
               "error": est.peak_bytes / measured - 1, "pass_tokens": est.settings["pass_tokens"],
               "parts_bytes": est.parts}
        rows.append(row)
        print(f"  {method} b{batch} gc={checkpointing}: estimated {est.peak_bytes / 2**30:.3f} GiB, measured "
              f"{measured / 2**30:.3f} GiB ({row['error']:+.1%})", file=sys.stderr, flush=True)
    return rows


def time_rows(configs: list[str], scratch: Path) -> list[dict]:
    rows = []
    for config in configs:
        est = api.estimate(config, [], probe=True)
        summary, wall = _train(config, [], scratch / Path(config).stem)
        row = {"config": config, "estimated_s": est.time_s, "measured_s": wall, "error": est.time_s / wall - 1,
               "estimated_parts_s": est.time_parts, "estimated_step_s": est.step_s, "steps": est.steps,
               "measured_summary_wall_s": summary["wall_s"],
               "measured_step_s": summary["train"].get("wall_s", 0) / max(summary["train"]["steps"], 1)}
        rows.append(row)
        print(f"  {config}: estimated {est.time_s:.0f} s, measured {wall:.0f} s ({row['error']:+.1%})",
              file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("memory", "time"))
    parser.add_argument("--memory-config", default="examples/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--time-configs", nargs="+", default=["examples/quickstart.yaml", "examples/dialogsum.yaml"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "estimate_accuracy.json"))
    args = parser.parse_args()
    features = sorted(f for f in cpu_features() if f.startswith(("avx", "amx", "fma", "f16c")))
    result = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu": cpu_model_name(), "cpu_flags": features, "cores": os.cpu_count(),
              "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="tunesmith-estimate-") as scratch:
        if args.only in (None, "memory"):
            result["memory"] = memory_rows(args.memory_config, args.steps, Path(scratch))
        if args.only in (None, "time"):
            result["time"] = time_rows(args.time_configs, Path(scratch))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)

    print(f"{result['cpu']} ({', '.join(features)}), {result['cores']} cores, {result['when']}")
    ok = True
    if "memory" in result:
        print("\n| method | micro-batch | checkpointing | biggest pass (tokens) | estimated peak (GiB) | measured peak RSS (GiB) | error |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for r in result["memory"]:
            ok &= abs(r["error"]) <= MEMORY_TOLERANCE
            print(f"| {r['method']} | {r['micro_batch']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                  f"{r['pass_tokens']} | {r['estimated_peak_bytes'] / 2**30:.3f} | "
                  f"{r['measured_peak_bytes'] / 2**30:.3f} | {r['error']:+.1%} |")
    if "time" in result:
        print("\n| config | steps | estimated (--probe) | measured wall | error |")
        print("|---|---:|---:|---:|---:|")
        for r in result["time"]:
            ok &= abs(r["error"]) <= TIME_TOLERANCE
            print(f"| {r['config']} | {r['steps']} | {r['estimated_s']:.0f} s | {r['measured_s']:.0f} s | {r['error']:+.1%} |")
    print(f"\nevery row within ±{MEMORY_TOLERANCE:.0%} (memory) / ±{TIME_TOLERANCE:.0%} (time): {'yes' if ok else 'no'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

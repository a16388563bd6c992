"""Knowledge distillation against plain cross-entropy: does the teacher help a pruned student? (bench/RESULTS.md, "Distillation")

The teacher is the quickstart-tuned built-in model (`examples/quickstart.yaml`, trained here first unless
--teacher names a finished run).  The student is that teacher pruned to half its layers (15 of 30, evenly
spaced, from its merged weights), trained in full for the same steps on the same rows twice, from the same
starting weights:

- `kd`: `tunesmith distill examples/distill.yaml`: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE;
- `ce`: the same with distill.alpha = 0, i.e. cross-entropy alone (the teacher is not consulted).

Both end with the validation loss (cross-entropy on the 5% of rows held back) and the before/after
evaluation on examples/data/dates-test.jsonl; the comparison is the held-out loss after the same steps.
`--cache-teacher` adds a third run, `kd-cached`: the same distillation from the teacher's top-k cache.

    .venv/bin/python bench/distill_kd_vs_ce.py                      # trains the teacher, then kd and ce
    .venv/bin/python bench/distill_kd_vs_ce.py --teacher runs/quickstart --cache-teacher

Results: bench/results/distill_kd_vs_ce.json (written then renamed) and a summary on stdout.
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
from qlora_memory import machine, shown  # noqa: E402  (the sibling benchmark's helpers)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "distill_kd_vs_ce.json"


def run(label: str, config: Path, run_dir: Path, overrides: list[str], cache_teacher: bool = False) -> dict:
    from tunesmith.config import load_config
    from tunesmith.distill.run import run_distillation

    cfg = load_config(config, overrides)
    started = time.time()
    summary = run_distillation(cfg, run_dir, cache_teacher=cache_teacher)
    d, tuned = summary["distill"], summary.get("eval", {}).get("tuned", {})
    result = {
        "label": label, "overrides": overrides, "cache_teacher": cache_teacher, "wall_s": time.time() - started,
        "steps": summary["train"]["steps"], "first_loss": summary["train"]["first_loss"],
        "final_loss": summary["train"]["final_loss"],
        "validation_loss": (summary.get("validation") or {}).get("loss"),
        "test_loss": tuned.get("loss"), "test_exact_match": tuned.get("exact_match"),
        "test_rouge_l": tuned.get("rougeL"),
        "trained_tokens_per_s": summary["train"]["trained_tokens_per_s"],
        "peak_rss_gib": summary["memory"]["peak_rss_bytes"] / 2**30,
        "teacher": d["teacher"], "student": d["student"], "run_dir": shown(run_dir),
    }
    print(f"{label}: validation loss {result['validation_loss']:.4f}, held-out test loss {result['test_loss']}, "
          f"exact match {result['test_exact_match']}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="a finished quickstart run folder (default: train one first)")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps of each student (default 40)")
    parser.add_argument("--keep-layers", type=int, default=15, help="the student's layers (default 15 of 30)")
    parser.add_argument("--cache-teacher", action="store_true", help="also distil from the teacher's top-k cache")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the JSON results go")
    args = parser.parse_args()

    from tunesmith.config import load_config
    from tunesmith.train.loop import run_training

    work = Path(tempfile.mkdtemp(prefix="tunesmith-distill-bench-"))
    teacher = Path(args.teacher) if args.teacher else work / "teacher"
    if not args.teacher:
        print("teacher: training examples/quickstart.yaml ...", file=sys.stderr, flush=True)
        run_training(load_config(REPO / "examples" / "quickstart.yaml", ["eval.enabled=false"]), teacher)
    common = [f"teacher.name={teacher}", f"student.prune.keep_layers={args.keep_layers}",
              f"training.max_steps={args.steps}"]
    config = REPO / "examples" / "distill.yaml"
    os.chdir(REPO)  # the example config's data paths are relative to the repository
    runs = [run("kd", config, work / "kd", common), run("ce", config, work / "ce", common + ["distill.alpha=0"])]
    if args.cache_teacher:
        runs.append(run("kd-cached", config, work / "kd-cached", common, cache_teacher=True))
    by = {r["label"]: r for r in runs}
    report = {
        "command": "python bench/distill_kd_vs_ce.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "teacher": str(teacher), "runs": runs,
        "kd_minus_ce_validation_loss": by["kd"]["validation_loss"] - by["ce"]["validation_loss"],
        "kd_minus_ce_test_loss": (by["kd"]["test_loss"] - by["ce"]["test_loss"]
                                  if by["kd"]["test_loss"] is not None and by["ce"]["test_loss"] is not None else None),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2))
    os.replace(partial, out)
    print(json.dumps({k: report[k] for k in ("kd_minus_ce_validation_loss", "kd_minus_ce_test_loss")}, indent=2))
    print(f"written: {shown(out)}; run folders under {work}")


if __name__ == "__main__":
    main()

"""The validated matrix (model family x training method), as the last run of tests/test_matrix.py left it.

The test run never writes this package's files; `python -m tunesmith.models.validated --write` (from a
clone of the repository) runs tests/test_matrix.py, which records each pair's result in the file named by
TUNESMITH_MATRIX_OUT, and then writes validated.json from it (under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from tunesmith.fileio import atomic_write_text

MATRIX_FILE = Path(__file__).with_name("validated.json")
RESULTS_ENV = "TUNESMITH_MATRIX_OUT"  # where tests/test_matrix.py records its results, when set
TEST_FILE = Path(__file__).resolve().parents[3] / "tests" / "test_matrix.py"


def load_matrix() -> dict:
    if not MATRIX_FILE.is_file():
        return {"results": {}}
    return json.loads(MATRIX_FILE.read_text())


def format_matrix(matrix: dict) -> str:
    """A table: one row per family, one column per method; 'ok' where the test run trained it, '-' where
    the pair was not run (not supported, or no 4-bit kernels where the matrix was made)."""
    results = matrix.get("results", {})
    if not results:
        return "no validated matrix yet: run `python -m tunesmith.models.validated --write` to make one."
    families = sorted({key.split("/")[0] for key in results})
    methods = sorted({key.split("/")[1] for key in results})
    width = max(len(f) for f in families) + 2
    lines = ["family".ljust(width) + "".join(m.ljust(9) for m in methods)]
    for family in families:
        cells = [
            ("ok" if results[f"{family}/{m}"].get("ok", True) else "FAILED") if f"{family}/{m}" in results else "-"
            for m in methods
        ]
        lines.append(family.ljust(width) + "".join(c.ljust(9) for c in cells))
    lines.append("")
    lines.append(
        f"ok = a tiny random {', '.join(families)} model trained with that method and its loss fell "
        "(final <= 0.9 x first over 20 steps; for masked-LM families such as BERT, the held-out loss on the same "
        f"hidden tokens fell by 0.1 or more); from {matrix.get('generated_by')} at {matrix.get('generated_at')} "
        f"({', '.join(f'{k} {v}' for k, v in matrix.get('versions', {}).items())})."
    )
    return "\n".join(lines)


def write_matrix(results: dict[str, dict], path: Path = MATRIX_FILE) -> dict:
    """Merge `results` ({"family/method": {"ok", "first_loss", "final_loss"}}) into the matrix at `path`."""
    matrix = json.loads(path.read_text()) if path.is_file() else {"results": {}}
    matrix["results"].update(results)
    matrix["generated_by"] = "tests/test_matrix.py"
    matrix["generated_at"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    matrix["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    atomic_write_text(path, json.dumps(matrix, indent=2, sort_keys=True) + "\n")
    return matrix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunesmith.models.validated",
                                     description="Print the validated family x method matrix, or make it anew.")
    parser.add_argument("--write", action="store_true",
                        help="run tests/test_matrix.py (a clone of the repository is needed) and write validated.json")
    args = parser.parse_args(argv)
    if args.write:
        if not TEST_FILE.is_file():
            print(f"{TEST_FILE} is not here: --write runs the repository's tests; run it from a clone.", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "results.json"
            code = subprocess.call([sys.executable, "-m", "pytest", "-q", str(TEST_FILE)],
                                   env={**os.environ, RESULTS_ENV: str(out)})
            if not out.is_file():
                print("tests/test_matrix.py recorded no results; validated.json is unchanged.", file=sys.stderr)
                return code or 1
            write_matrix(json.loads(out.read_text()))
        print(f"wrote {MATRIX_FILE}")
    print(format_matrix(load_matrix()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

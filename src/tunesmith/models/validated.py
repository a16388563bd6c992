"""The validated matrix (model family x training method), as the last run of tests/test_matrix.py left it."""

from __future__ import annotations

import json
from pathlib import Path

MATRIX_FILE = Path(__file__).with_name("validated.json")


def load_matrix() -> dict:
    if not MATRIX_FILE.is_file():
        return {"results": {}}
    return json.loads(MATRIX_FILE.read_text())


def format_matrix(matrix: dict) -> str:
    """A table: one row per family, one column per method; 'ok' where the test run trained it, '-' where
    the pair was not run (not supported, or no 4-bit kernels where the matrix was made)."""
    results = matrix.get("results", {})
    if not results:
        return "no validated matrix yet: run `python -m pytest tests/test_matrix.py` to make one."
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

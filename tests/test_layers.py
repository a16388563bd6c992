"""The package's layers (ARCHITECTURE.md): config -> hardware -> models -> data -> train -> distill -> evaluate
-> ship -> api -> cli, each importing only the ones before it, checked by import-linter's contract in
pyproject.toml; and no tunesmith import tucked inside a function, where a cycle could hide."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "tunesmith"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(tree_root: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run the contract in `cwd`/pyproject.toml over the `tunesmith` package found in `tree_root`."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tree_root), "PATH": "/usr/bin:/bin"})


@pytest.mark.skipif(not LINT_IMPORTS.is_file(), reason="import-linter is not installed (pip install -e '.[test]')")
def test_every_layer_imports_only_the_layers_below_it():
    result = _lint_imports(REPO / "src", REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.skipif(not LINT_IMPORTS.is_file(), reason="import-linter is not installed (pip install -e '.[test]')")
def test_the_contract_fails_when_a_lower_layer_imports_a_higher_one(tmp_path):
    """The check can fail: a copy of the package where the data layer imports the training loop breaks it."""
    shutil.copytree(PACKAGE, tmp_path / "src" / "tunesmith", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    read = tmp_path / "src" / "tunesmith" / "data" / "read.py"
    read.write_text(read.read_text() + "\nfrom tunesmith.train.loop import run_training  # noqa\n")
    result = _lint_imports(tmp_path / "src", tmp_path)
    assert result.returncode != 0
    assert "tunesmith.data is not allowed to import tunesmith.train" in result.stdout
    assert "tunesmith.data.read -> tunesmith.train.loop" in result.stdout


def _imports_inside_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("tunesmith")):
                    found.append(f"{path.relative_to(REPO)}:{inner.lineno} from {inner.module} (in {node.name})")
                elif isinstance(inner, ast.Import) and any(a.name.startswith("tunesmith") for a in inner.names):
                    found.append(f"{path.relative_to(REPO)}:{inner.lineno} import (in {node.name})")
    return found


def test_no_tunesmith_import_hides_inside_a_function():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _imports_inside_functions(path)]
    assert not found, "import these at the top of the module (a cycle means a layer is wrong):\n" + "\n".join(found)


def test_the_inside_function_check_sees_one(tmp_path):
    sample = REPO / "tests" / "_sample_inner_import.py"
    sample.write_text("def f():\n    from tunesmith.train import loop\n    return loop\n")
    try:
        assert _imports_inside_functions(sample) == ["tests/_sample_inner_import.py:2 from tunesmith.train (in f)"]
    finally:
        sample.unlink()

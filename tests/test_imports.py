"""The package's import structure holds: `lint-imports` checks the contracts in pyproject.toml
([tool.importlinter]: layers, the distributed helpers importing no model code, the core never importing
the user-facing layers, no import cycles between siblings)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lint_imports() -> str | None:
    """The `lint-imports` of the interpreter running the tests (the venv's), else one on PATH."""
    beside = Path(sys.executable).with_name("lint-imports")
    return str(beside) if beside.exists() else shutil.which("lint-imports")


def test_import_contracts_hold():
    exe = _lint_imports()
    assert exe is not None, "import-linter is not installed: pip install -e '.[test]'"
    proc = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"lint-imports failed:\n{proc.stdout}\n{proc.stderr}"

"""The codebase's own rules, checked like everything else: ruff (pyflakes, pycodestyle, zip strict=, format)
and the import-linter contract that keeps the package's layers in the order of the data flow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_ruff_is_clean():
    r = _run(sys.executable, "-m", "ruff", "check", "surgery", "tests", "bench", "plugins")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_ruff_format_is_clean():
    r = _run(sys.executable, "-m", "ruff", "format", "--check", "surgery", "tests", "bench", "plugins")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.slow
def test_layers_follow_the_data_flow():
    r = _run(sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.argv=['lint-imports']; c()")
    assert r.returncode == 0 and "3 kept, 0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_the_contract_catches_an_upward_import(tmp_path):
    """The contracts can fail: in a copy of the package, a compile module importing the engine, the LR
    schedule importing the run, and analyze importing train each break theirs."""
    import os
    import shutil

    shutil.copytree(ROOT / "surgery", tmp_path / "surgery", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "surgery" / "compile" / "_upward_probe.py").write_text("from surgery.engine import execute  # noqa: F401\n")
    with open(tmp_path / "surgery" / "train" / "schedule.py", "a") as f:
        f.write("\nfrom surgery.train.run import train  # noqa: E402, F401\n")
    with open(tmp_path / "surgery" / "analyze.py", "a") as f:
        f.write("\nfrom surgery.train.data import build_corpus  # noqa: E402, F401\n")
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command as c; sys.argv=['lint-imports', '--no-cache']; c()",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert r.returncode != 0 and "surgery.compile is not allowed to import surgery.engine" in r.stdout, r.stdout[-2000:]
    assert "surgery.train.schedule is not allowed to import surgery.train.run" in r.stdout, r.stdout[-2000:]
    assert "surgery.analyze is not allowed to import surgery.train" in r.stdout, r.stdout[-2000:]
    assert "1 kept, 2 broken" in r.stdout, r.stdout[-2000:]  # the data readers untouched

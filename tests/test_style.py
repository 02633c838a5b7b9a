"""The codebase stays ruff clean (lint and format) and mypy --strict clean, checked with every test run."""

import subprocess
import sys
from pathlib import Path

from helpers import REPO

RUFF = Path(sys.executable).parent / "ruff"


def test_ruff_check() -> None:
    proc = subprocess.run([str(RUFF), "check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_ruff_format() -> None:
    proc = subprocess.run([str(RUFF), "format", "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_mypy_strict() -> None:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mypy")], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout

"""The codebase stays ruff clean (lint and format), checked with every test run."""

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

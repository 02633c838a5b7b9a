"""The suite under every supported Python (`.venv/bin/nox -f .ci/noxfile.py`).

- full: the whole suite, ruff and mypy --strict included, under FULL.
- e2e-X.Y: the real end-to-end subset (pytest -m e2e: verify, the pass, the
  lock against real processes, the live receiver, service/notify, status,
  scrub) under each other supported Python.

A supported interpreter that cannot be found fails its session, with its
name: never skipped. Interpreters are looked for on PATH, then where pyenv
keeps them (its shims only answer for the versions pyenv was told to use).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import nox

FULL = "3.11"
OTHERS = ["3.10", "3.12", "3.13"]
nox.options.error_on_missing_interpreters = True
nox.options.reuse_existing_virtualenvs = False
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
nox.options.envdir = os.path.join(ROOT, ".nox")


def _works(path: str) -> bool:
    return subprocess.run([path, "-c", "pass"], capture_output=True).returncode == 0


def _find(version: str) -> str | None:
    """A directory holding a working pythonX.Y."""
    name = f"python{version}"
    found = shutil.which(name)
    candidates = [found] if found else []
    candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/{name}")))
    candidates += [f"/usr/bin/{name}", f"/usr/local/bin/{name}"]
    for path in candidates:
        if path and os.path.exists(path) and _works(path):
            return os.path.dirname(path)
    return None


for _version in [FULL, *OTHERS]:  # ahead of pyenv's shims, which fail for versions not selected
    _where = _find(_version)
    if _where:
        os.environ["PATH"] = _where + os.pathsep + os.environ["PATH"]


@nox.session(python=FULL)
def full(session: nox.Session) -> None:
    session.install("-e", f"{ROOT}[test]")
    session.chdir(ROOT)
    session.run("pytest", *session.posargs)


@nox.session(python=OTHERS)
def e2e(session: nox.Session) -> None:
    session.install("-e", f"{ROOT}[test]")
    session.chdir(ROOT)
    session.run("pytest", "-m", "e2e", *session.posargs)

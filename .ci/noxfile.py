"""The suite under every supported Python found: `.venv/bin/nox -f .ci/noxfile.py`.

- full: the whole suite, ruff and mypy --strict included, under the Python
  that runs nox (the venv's: the machine's own python3, whichever supported
  version that is), in that venv, which README's command has just set up.
- e2e-X.Y: the real end-to-end subset (pytest -m e2e: verify, the pass, the
  lock against real processes, the live receiver, service/notify, status,
  check, scrub) in a fresh venv under each other supported Python found.

Interpreters are looked for on PATH, then where pyenv keeps them (its shims
only answer for the versions pyenv was told to use), then in /usr/bin and
/usr/local/bin. The last line says which were found and which were not. On a
newcomer's machine a missing one is skipped; CI sets CIS490_CI_ALL_PYTHONS=1
(.ci/run), and then a missing one fails its session, with its name.
Arguments after `--` go to every pytest (`-- -k lock -x`); a selection that
holds no e2e test passes the e2e sessions.

A whole run is split over the cores by test file (pytest-xdist, --dist
loadfile: a module's fixtures, such as a booted container, are made once);
a selection after `--` runs in one process. Measured on 2 cores: the full
session 472 s in one process, 298 s on two.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import sys

import nox

SUPPORTED = ("3.10", "3.11", "3.12", "3.13")
THIS = f"{sys.version_info.major}.{sys.version_info.minor}"
STRICT = os.environ.get("CIS490_CI_ALL_PYTHONS") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
nox.options.error_on_missing_interpreters = True
nox.options.reuse_existing_virtualenvs = False
nox.options.envdir = os.path.join(ROOT, ".nox")

if THIS not in SUPPORTED:
    raise SystemExit(f"nox runs under Python {THIS}; cis490-reconcile supports {', '.join(SUPPORTED)}")


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


FOUND = {version: where for version in SUPPORTED if version != THIS and (where := _find(version))}
MISSING = [v for v in SUPPORTED if v != THIS and v not in FOUND]
for _where in FOUND.values():  # ahead of pyenv's shims, which fail for versions not selected
    os.environ["PATH"] = _where + os.pathsep + os.environ["PATH"]
OTHERS = sorted(FOUND) + (MISSING if STRICT else [])  # strict: a missing one is a failing session


def _spread(session: nox.Session) -> list[str]:
    """pytest-xdist's arguments for a whole run (at most 4 workers: more
    were never tried against the tests that time watchdogs and locks)."""
    return [] if session.posargs else ["-n", str(min(os.cpu_count() or 1, 4)), "--dist", "loadfile"]


def _summary() -> None:
    others = ", ".join(sorted(FOUND)) or "none"
    missing = f"not found: {', '.join(MISSING)}" if MISSING else "all found"
    print(f"pythons: full suite {THIS}; end-to-end {others}; {missing}", flush=True)


atexit.register(_summary)  # after nox's own report: the last line


@nox.session(python=False)
def full(session: nox.Session) -> None:
    session.chdir(ROOT)
    session.run(sys.executable, "-m", "pytest", *_spread(session), *session.posargs, external=True)


@nox.session(python=OTHERS)
def e2e(session: nox.Session) -> None:
    session.install("-e", f"{ROOT}[test]")
    session.chdir(ROOT)
    # a selection after `--` may hold no e2e test (pytest's 5); CI passes none
    codes = [0, 5] if session.posargs else [0]
    session.run("pytest", "-m", "e2e", *_spread(session), *session.posargs, success_codes=codes)

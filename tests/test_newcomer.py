"""README's test command, run as a newcomer runs it on a stock fleet OS: a
clone, an empty HOME (no pyenv), PATH=/usr/bin:/bin, and the machine's own
python3 making the venv. Debian 12's is /usr/bin/python3 (3.11); pyenv's
3.10 and 3.12, called by their full paths, stand in for Ubuntu 22.04's and
24.04's. Each run must pass, run the whole suite under its own Python and
the end-to-end subset under each other one on PATH, and end with the line
that says which were found. With CIS490_CI_ALL_PYTHONS=1 (what .ci/run sets)
a missing interpreter fails instead, by name.

The clone is of the committed HEAD: uncommitted changes of a working tree
are not in it. The inner runs select a few tests (after `--`), or this
would run the whole suite three times over. Not e2e: it must not recurse
under the other Pythons. Needs the network for pip (CI has it).
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO

SELECTED = ("--", "tests/test_verify.py", "-q", "-k", "complete or checksum")
NO_E2E = ("--", "tests/test_config.py", "-q", "-k", "unknown")  # no e2e test: pytest's exit 5 there


def readme_command() -> str:
    """The command README gives, word for word: the test fails if it drifts."""
    text = (REPO / "README.md").read_text()
    commands = [line for line in text.splitlines() if line.endswith(".venv/bin/nox -f .ci/noxfile.py")]
    assert len(commands) == 1, commands
    return commands[0]


PYENV = Path("/root/.pyenv/versions")
DEBIAN = Path("/usr/bin/python3.11")


def interpreter(version: str) -> Path:
    if version == "3.11":
        return DEBIAN
    found = sorted(PYENV.glob(f"{version}.*/bin/python{version}"))
    if not found:
        pytest.skip(f"no Python {version} under {PYENV} to stand in for a fleet OS's")
    return found[-1]


def newcomer(
    repo: Path, python: Path, tmp_path: Path, selected: tuple[str, ...] = SELECTED, **extra: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """README's command in `repo`, with `python` as the machine's python3."""
    bin_dir = tmp_path / "bin"  # what /usr/bin/python3 would be on that OS
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(python)
    home = tmp_path / "home"
    home.mkdir()
    keep = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or "CERT" in k or "CA_BUNDLE" in k}
    env = {**keep, "HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "LANG": "C.UTF-8", **extra}
    env["TMPDIR"] = os.environ.get("TMPDIR", "/tmp")
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", f"{readme_command()} {' '.join(repr(a) for a in selected)}"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, time.monotonic() - started


def clone(tmp_path: Path) -> Path:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
    return repo


# the machine's Python -> (end-to-end under, not found), with PATH=/usr/bin:/bin and no pyenv
EXPECTED = {
    "3.11": ("none", "3.10, 3.12, 3.13"),
    "3.10": ("3.11", "3.12, 3.13"),
    "3.12": ("3.11", "3.10, 3.13"),
}


Runs = dict[str, tuple[subprocess.CompletedProcess[str], float]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The four runs at once (they wait mostly on pip and on each other's
    tests; one after another they take three minutes)."""
    if not DEBIAN.exists():
        pytest.skip("Debian's own /usr/bin/python3.11 is not on this machine")
    wanted = {version: (interpreter(version), SELECTED, {}) for version in EXPECTED}
    wanted["strict"] = (DEBIAN, SELECTED, {"CIS490_CI_ALL_PYTHONS": "1"})
    wanted["no-e2e"] = (interpreter("3.10"), NO_E2E, {})

    # made here, not in the threads: pytest creates its base directory lazily, and racily
    tmps = {name: tmp_path_factory.mktemp(f"newcomer-{name}") for name in wanted}

    def one(name: str) -> tuple[subprocess.CompletedProcess[str], float]:
        python, selected, extra = wanted[name]
        return newcomer(clone(tmps[name]), python, tmps[name], selected, **extra)

    with concurrent.futures.ThreadPoolExecutor(len(wanted)) as pool:
        return dict(zip(wanted, pool.map(one, wanted), strict=True))


@pytest.mark.parametrize("version", list(EXPECTED))
def test_the_readme_command_passes_on_a_stock_os(runs: Runs, version: str) -> None:
    proc, took = runs[version]

    print(f"{version}: {took:.0f} s: {proc.stdout.splitlines()[-1:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    e2e, missing = EXPECTED[version]
    last = f"pythons: full suite {version}; end-to-end {e2e}; not found: {missing}"
    assert proc.stdout.splitlines()[-1] == last
    assert proc.stdout.count("5 passed") == 1 + (e2e != "none")  # the selected tests, in each session
    assert "Session full was successful" in proc.stderr
    assert (f"Session e2e-{e2e} was successful" in proc.stderr) is (e2e != "none")


def test_ci_fails_a_missing_interpreter_by_name(runs: Runs) -> None:
    proc, _ = runs["strict"]

    assert proc.returncode != 0
    for version in ("3.10", "3.12", "3.13"):
        assert f"e2e-{version}: failed" in proc.stderr
        assert f"Python interpreter {version} not found" in proc.stderr
    last = "pythons: full suite 3.11; end-to-end none; not found: 3.10, 3.12, 3.13"
    assert proc.stdout.splitlines()[-1] == last


def test_a_selection_without_end_to_end_tests_passes(runs: Runs) -> None:
    """`-- tests/test_config.py` holds no e2e test: the e2e session finds
    none (pytest's exit 5) and passes; the full session ran them."""
    proc, _ = runs["no-e2e"]

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Session e2e-3.11 was successful" in proc.stderr
    assert "deselected" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "pythons: full suite 3.10; end-to-end 3.11; not found: 3.12, 3.13"

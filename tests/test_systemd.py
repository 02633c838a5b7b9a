"""The units in systemd/: checked by systemd-analyze, then run by a real systemd.

The container tests install the package the way README's deploy section
does (a venv made with Debian's /usr/bin/python3, a cis490 system user, the
units copied to /etc/systemd/system, a drop-in for the install path), bind a
test store at /var/lib/cis490 and let systemd run the service.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, LockHolder, Receiver, episode
from systemd_container import SystemdContainer, unavailable_reason

UNITS = REPO / "systemd"
SERVICE, TIMER, LOOP = "cis490-reconcile.service", "cis490-reconcile.timer", "cis490-reconciled.service"
SCRUB, SCRUB_TIMER = "cis490-reconcile-scrub.service", "cis490-reconcile-scrub.timer"
DEPLOY_PYTHON = "/usr/bin/python3"  # not pyenv's: ProtectHome=yes hides /root
VENVS = Path("/opt/cis490-tests")
STORE = "/var/lib/cis490"
# README's deploy step: create the user only where it is missing (the receiver's host usually has it)
ADD_USER = (
    "id -u cis490 >/dev/null 2>&1 || "
    "useradd --system --user-group --no-create-home --shell /usr/sbin/nologin cis490"
)


# --- static checks --------------------------------------------------------------


def analyze_root(tmp_path: Path) -> Path:
    """A root for `systemd-analyze verify --root`: systemd's own units, ours,
    and a stub for every command our units run (they need not exist here)."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    shutil.copytree(UNITS, root / "etc/systemd/system")
    for unit in UNITS.iterdir():
        for command in re.findall(r"^Exec\w+=[-@:+!]*(/\S+)", unit.read_text(), re.M):
            stub = root / command.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    return root


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_verify_clean(tmp_path: Path) -> None:
    root = analyze_root(tmp_path)
    units = sorted(f"/etc/systemd/system/{u.name}" for u in UNITS.iterdir())
    assert len(units) >= 3
    proc = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *units], capture_output=True, text=True
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", [SERVICE, LOOP, SCRUB])
def test_services_are_hardened(unit: str) -> None:
    # --threshold is the exposure times ten: exit status 1 above 1.0
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=10", "--no-pager", str(UNITS / unit)],
        capture_output=True,
        text=True,
    )
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert score, proc.stdout + proc.stderr
    print(f"{unit}: exposure {score.group(1)}")
    assert float(score.group(1)) <= 1.0 and proc.returncode == 0


# --- under a real systemd -------------------------------------------------------

needs_container = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


def _source_digest() -> str:
    digest = hashlib.sha256()
    package = REPO / "cis490_reconcile"
    for path in sorted([REPO / "pyproject.toml", *package.rglob("*.py"), *package.rglob("*.yml")]):
        digest.update(str(path.relative_to(REPO)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def venv() -> Path:
    """The package installed (not editable) in a venv outside any private
    or protected path, keyed by the source so an edit means a new venv."""
    if unavailable_reason() is not None or not Path(DEPLOY_PYTHON).exists():
        pytest.skip(str(unavailable_reason() or f"{DEPLOY_PYTHON} missing"))
    path = VENVS / f"venv-{_source_digest()}"
    if not (path / "bin" / "cis490-reconcile").exists():
        shutil.rmtree(VENVS, ignore_errors=True)
        subprocess.run([DEPLOY_PYTHON, "-m", "venv", str(path)], check=True)
        subprocess.run(
            [str(path / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(REPO)],
            check=True,
            capture_output=True,
        )
    return path


def drop_in(venv: Path, args: str) -> str:
    return f"[Service]\nExecStart=\nExecStart={venv}/bin/cis490-reconcile {args}\nWatchdogSec=3\n"


@pytest.fixture
def deployed(tmp_path: Path, venv: Path) -> Iterator[tuple[SystemdContainer, Receiver]]:
    """A booted systemd with the units installed as README says, the test
    store at /var/lib/cis490 owned by the cis490 user, min_age 0 in
    /etc/cis490/reconcile.toml, WatchdogSec=3 and an immediate timer."""
    (tmp_path / "store").mkdir()
    receiver = Receiver(tmp_path / "store")
    with SystemdContainer(tmp_path / "containers", binds=[f"{receiver.root}:{STORE}"]) as box:
        for _ in range(2):  # README's command, twice: a receiver host may have the user already
            box.run("sh", "-c", ADD_USER)
        for unit in UNITS.iterdir():
            box.write_file(f"/etc/systemd/system/{unit.name}", unit.read_text())
        box.write_file(f"/etc/systemd/system/{SERVICE}.d/test.conf", drop_in(venv, "--once"))
        box.write_file(f"/etc/systemd/system/{LOOP}.d/test.conf", drop_in(venv, "--interval 1"))
        box.write_file(f"/etc/systemd/system/{SCRUB}.d/test.conf", drop_in(venv, "scrub --max-duration 60"))
        box.write_file(
            f"/etc/systemd/system/{TIMER}.d/test.conf",
            "[Timer]\nOnBootSec=1s\nOnUnitInactiveSec=1h\nRandomizedDelaySec=0\n",
        )
        box.write_file("/etc/cis490/reconcile.toml", "min_age = 0\n")
        box.systemctl("daemon-reload")
        yield box, receiver


def own(box: SystemdContainer) -> None:
    box.run("chown", "-R", "cis490:cis490", STORE)


def events(box: SystemdContainer, unit: str) -> list[dict]:
    """What the service printed, as journald stored it (one JSON object each)."""
    out = box.journal("-u", unit, "-o", "json", "_TRANSPORT=stdout")
    return [
        {**json.loads(e["MESSAGE"]), "_priority": e["PRIORITY"]} for e in map(json.loads, out.splitlines())
    ]


def named(found: list[dict], name: str) -> list[dict]:
    return [e for e in found if e["event"] == name]


def finished(box: SystemdContainer, unit: str) -> bool:
    return box.show(unit, "ActiveState") in ("inactive", "failed") and box.show(unit, "Result") != ""


@needs_container
def test_timer_runs_the_service_and_the_journal_tells_what_happened(
    deployed: tuple[SystemdContainer, Receiver],
) -> None:
    box, receiver = deployed
    for name in ("a", "b", "c"):
        receiver.tarball("h1", name)
    receiver.append_row(receiver.receiver_row("h1", "a"))
    receiver.tarball("h2", "cut", blob=receiver.tarball("h2", "whole").read_bytes()[:-100])
    own(box)
    started = time.monotonic()
    box.systemctl("enable", "--now", TIMER)
    box.wait_for(lambda: box.show(SERVICE, "ExecMainExitTimestampMonotonic") not in ("", "0"), 30, "a run")
    box.wait_for(lambda: finished(box, SERVICE), 10, "the run to end")
    print(f"timer to finished run: {time.monotonic() - started:.2f} s")
    assert box.show(SERVICE, "Result") == "success"
    assert box.show(SERVICE, "ExecMainStatus") == "0"
    assert box.show(TIMER, "ActiveState") == "active"  # waiting for OnUnitInactiveSec
    assert sorted(receiver.keys()) == [("h1", "a"), ("h1", "b"), ("h1", "c"), ("h2", "whole")]

    found = events(box, SERVICE)
    summary = named(found, "pass_finished")
    assert len(summary) == 1 and summary[0]["backfilled"] == 3 and summary[0]["corrupt"] == 1
    assert summary[0]["_priority"] == "6"
    corrupt = named(found, "tarball_corrupt")
    assert corrupt[0]["path"] == "h2/cut.tar.zst" and corrupt[0]["_priority"] == "4"
    warnings = box.journal("-u", SERVICE, "-p", "warning", "-o", "cat", "_TRANSPORT=stdout").splitlines()
    assert [json.loads(line)["event"] for line in warnings] == ["tarball_corrupt"]
    assert all(
        line.startswith("{")
        for line in box.journal("-u", SERVICE, "-o", "cat", "_TRANSPORT=stdout").splitlines()
    )


@needs_container
def test_a_stalled_pass_is_killed_by_the_watchdog(deployed: tuple[SystemdContainer, Receiver]) -> None:
    box, receiver = deployed
    receiver.tarball("h1", "a")
    receiver.index.touch()
    own(box)
    # the receiver holds the lock (a host process: same kernel, same inode)
    with LockHolder(receiver.index):
        box.systemctl("start", "--no-block", SERVICE)
        box.wait_for(lambda: named(events(box, SERVICE), "index_lock_waiting") != [], 20, "the lock wait")
        time.sleep(4)  # waiting for the lock is progress: the watchdog (3 s) must not fire
        assert box.show(SERVICE, "ActiveState") == "active"
        pid = box.show(SERVICE, "MainPID")
        box.run("kill", "-STOP", pid)
        stopped = time.monotonic()
        box.wait_for(lambda: finished(box, SERVICE), 15, "the watchdog to kill the stopped pass")
        print(f"SIGSTOP to Result=watchdog: {time.monotonic() - stopped:.2f} s")
        assert box.show(SERVICE, "Result") == "watchdog"
    assert receiver.index.read_bytes() == b""


@needs_container
def test_a_long_progressing_pass_survives_the_watchdog(deployed: tuple[SystemdContainer, Receiver]) -> None:
    box, receiver = deployed
    receiver.tarball("h1", "big", episode(os.urandom(40 << 20)))
    box.write_file("/etc/cis490/reconcile.toml", 'min_age = 0\nmax_read_rate = "8M"\n')  # ~5 s of reading
    own(box)
    started = time.monotonic()
    box.systemctl("start", SERVICE)  # Type=notify: returns at READY
    box.wait_for(lambda: finished(box, SERVICE), 60, "the long pass")
    took = time.monotonic() - started
    print(f"rate-limited 40 MiB pass under WatchdogSec=3: {took:.2f} s")
    assert took > 4
    assert box.show(SERVICE, "Result") == "success"
    assert receiver.keys() == [("h1", "big")]


@needs_container
def test_loop_unit_stays_active_reloads_and_stops_cleanly(
    deployed: tuple[SystemdContainer, Receiver],
) -> None:
    box, receiver = deployed
    receiver.tarball("h1", "a")
    own(box)
    box.systemctl("start", LOOP)
    pid = box.show(LOOP, "MainPID")
    box.wait_for(lambda: len(named(events(box, LOOP), "pass_finished")) >= 2, 20, "two passes")
    receiver.tarball("h1", "b")  # arrives while the loop is idle
    own(box)
    box.wait_for(lambda: len(receiver.keys()) == 2, 20, "the next pass to backfill h1/b")
    box.systemctl("reload", LOOP)
    box.wait_for(lambda: named(events(box, LOOP), "config_reloaded") != [], 20, "the reload")
    assert box.show(LOOP, "ActiveState") == "active"
    assert box.show(LOOP, "MainPID") == pid and box.show(LOOP, "NRestarts") == "0"
    box.systemctl("stop", LOOP)
    assert box.show(LOOP, "Result") == "success"
    assert box.show(LOOP, "ExecMainStatus") == "0"
    stopped = named(events(box, LOOP), "service_stopped")
    assert stopped[0]["signal"] == "SIGTERM" and stopped[0]["passes"] >= 3
    assert sorted(receiver.keys()) == [("h1", "a"), ("h1", "b")]


def readme_commands() -> tuple[str, str]:
    """README's deploy command that enables the timers, and its command
    that switches from the timer to the loop unit (in the units table)."""
    text = (REPO / "README.md").read_text()
    enable = re.search(r"^systemctl enable --now cis490-reconcile\.timer .*$", text, re.M)
    switch = re.search(rf"^\| `{re.escape(LOOP)}` \|.*`(systemctl [^`]*{re.escape(LOOP)}[^`]*)`", text, re.M)
    assert enable is not None, "README's deploy command"
    assert switch is not None, "README's command to switch to the loop"
    return enable[0], switch[1]


@needs_container
def test_readmes_switch_to_the_loop_leaves_only_the_loop_enabled(
    deployed: tuple[SystemdContainer, Receiver],
) -> None:
    """Conflicts= stops the timer when the loop starts, but enabling the
    loop alone left the timer enabled too: both wanted at the next boot."""
    box, receiver = deployed
    receiver.tarball("h1", "a")
    own(box)
    enable, switch = readme_commands()
    box.run("sh", "-c", enable)
    box.run("sh", "-c", switch)
    enabled = {unit: box.systemctl("is-enabled", unit, check=False).stdout.strip() for unit in (TIMER, LOOP)}
    assert enabled == {TIMER: "disabled", LOOP: "enabled"}
    assert box.systemctl("is-enabled", SCRUB_TIMER, check=False).stdout.strip() == "enabled"
    assert box.show(TIMER, "ActiveState") == "inactive"
    box.wait_for(lambda: receiver.keys() == [("h1", "a")], 20, "the loop's first pass")
    assert box.show(LOOP, "ActiveState") == "active"


@needs_container
def test_scrub_unit_checks_the_store_and_fails_on_a_changed_tarball(
    deployed: tuple[SystemdContainer, Receiver],
) -> None:
    box, receiver = deployed
    for name in ("a", "b"):
        receiver.tarball("h1", name)
        receiver.append_row(receiver.receiver_row("h1", name))
    own(box)
    index_before = receiver.index.read_bytes()
    assert box.show(SCRUB_TIMER, "UnitFileState") == "disabled"
    box.systemctl("enable", "--now", SCRUB_TIMER)
    assert box.show(SCRUB_TIMER, "ActiveState") == "active"  # waiting for 02:30
    box.systemctl("start", SCRUB)  # Type=notify: returns at READY
    box.wait_for(lambda: finished(box, SCRUB), 30, "the scrub")
    assert box.show(SCRUB, "Result") == "success"
    summary = named(events(box, SCRUB), "scrub_finished")
    assert len(summary) == 1 and summary[0]["checked"] == 2 and summary[0]["round_completed"] is True

    blob = bytearray((receiver.episodes / "h1/b.tar.zst").read_bytes())
    blob[50] ^= 0xFF  # same size, other bytes: bit rot
    (receiver.episodes / "h1/b.tar.zst").write_bytes(bytes(blob))
    box.systemctl("start", "--no-block", SCRUB)
    box.wait_for(lambda: box.show(SCRUB, "Result") == "exit-code", 30, "the scrub to fail")
    assert box.show(SCRUB, "ExecMainStatus") == "1"
    mismatch = named(events(box, SCRUB), "scrub_mismatch")
    assert [(m["path"], m["line"], m["_priority"]) for m in mismatch] == [("h1/b.tar.zst", 2, "4")]
    assert receiver.index.read_bytes() == index_before  # reported, never fixed


def readme_drop_in(venv: Path) -> str:
    """README's drop-in for quarantine and a metrics directory, as written
    there, with this test's install path."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```ini\n(\[Service\]\nExecStart=\n.*?)```", text, re.DOTALL)
    assert block is not None, "README's drop-in block"
    return block[1].replace("/opt/cis490/.venv", str(venv))


def quarantine_run(box: SystemdContainer, receiver: Receiver, drop_in_text: str) -> None:
    """One run of the service with `drop_in_text` on a store with a cut
    tarball and quarantine_min_age 0."""
    receiver.tarball("h2", "cut", blob=receiver.tarball("h2", "whole").read_bytes()[:-100])
    (receiver.root / "quarantine").mkdir()
    own(box)
    box.run("mkdir", "-p", "/var/lib/prometheus/node-exporter")
    box.write_file(f"/etc/systemd/system/{SERVICE}.d/test.conf", drop_in_text + "WatchdogSec=3\n")
    box.write_file("/etc/cis490/reconcile.toml", "min_age = 0\nquarantine_min_age = 0\n")
    box.systemctl("daemon-reload")
    box.systemctl("start", SERVICE, check=False)
    box.wait_for(lambda: finished(box, SERVICE), 30, "the run to end")


@needs_container
def test_readmes_drop_in_quarantines_a_corrupt_tarball(
    deployed: tuple[SystemdContainer, Receiver], venv: Path
) -> None:
    """Under the shipped unit's sandbox, with README's drop-in: the move is
    a rename, and a rename between two mounts fails (EXDEV) however much
    they share a filesystem. systemd makes each ReadWritePaths= and
    ReadOnlyPaths= entry a mount of its own."""
    box, receiver = deployed
    quarantine_run(box, receiver, readme_drop_in(venv))
    found = events(box, SERVICE)
    assert [e["error"] for e in named(found, "quarantine_failed")] == []
    assert [e["path"] for e in named(found, "tarball_quarantined")] == ["h2/cut.tar.zst"]
    moved = receiver.root / "quarantine" / "h2"
    assert sorted(p.name for p in moved.iterdir()) == ["cut.tar.zst", "cut.tar.zst.json"]
    assert box.show(SERVICE, "Result") == "success"


@needs_container
def test_quarantine_without_the_drop_ins_reset_is_refused_in_one_line(
    deployed: tuple[SystemdContainer, Receiver], venv: Path
) -> None:
    """The shipped unit keeps the episodes read-only, a mount of their own:
    --quarantine-dir without README's ReadOnlyPaths= reset is refused before
    the pass (exit 2, one line), not a failed move per file and pass."""
    box, receiver = deployed
    text = readme_drop_in(venv).replace("ReadOnlyPaths=\n", "")
    quarantine_run(box, receiver, text)
    assert box.show(SERVICE, "ExecMainStatus") == "2"
    said = box.journal("-u", SERVICE, "-o", "cat", "_TRANSPORT=stdout").splitlines()
    assert len(said) == 1 and "in another mount than /var/lib/cis490/episodes" in said[0], said
    assert (receiver.episodes / "h2" / "cut.tar.zst").exists()

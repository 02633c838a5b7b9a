"""`cis490-reconcile scrub`: the real command on real files, in a subprocess.

A scrub re-reads indexed tarballs and compares them with their rows. It must
report what differs, never touch the index, and resume an interrupted round
exactly where it stopped: no row skipped, none read twice.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import (
    REPO,
    NotifySocket,
    Receiver,
    Result,
    clean_env,
    parse_events,
    permissions_apply,
    unsearchable,
    zero_page,
)
from prometheus_client.parser import text_string_to_metric_families

from cis490_reconcile import config, metrics
from cis490_reconcile.log import MAX_EVENTS, make_logger
from cis490_reconcile.notify import Notifier
from cis490_reconcile.scrub import Scrubber, ScrubNotRun
from cis490_reconcile.state import connection

pytestmark = pytest.mark.e2e  # also under every other supported Python (.ci/noxfile.py)

# 256 KiB tarballs read at 4 MiB/s: 16 a second, so a run can be cut short
# mid-round in a fraction of a second and resumed
TARBALL_BYTES = 256 << 10
SLOW = ("--max-read-rate", "4M")


def scrub_argv(receiver: Receiver, state: Path, *args: str) -> list[str]:
    return receiver.argv("--state-dir", str(state), "--log-level", "debug", *args, command="scrub")


def run_scrub(receiver: Receiver, state: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    proc = subprocess.run(
        scrub_argv(receiver, state, *args), capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode in (0, 1), proc.stderr
    return Result(proc.returncode, proc.stdout, proc.stderr, parse_events(proc.stdout))


def indexed(receiver: Receiver, host: str, episode_id: str, size: int = TARBALL_BYTES) -> Path:
    """A tarball and the receiver's row for it. The scrub compares bytes
    only, so random bytes stand in for a real .tar.zst."""
    path = receiver.tarball(host, episode_id, blob=os.urandom(size))
    receiver.append_row(receiver.receiver_row(host, episode_id))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cursor_of(state: Path) -> dict | None:
    """The scrub's cursor as the state database holds it."""
    if not (state / "state.sqlite3").exists():
        return None
    with closing(sqlite3.connect(f"file:{state / 'state.sqlite3'}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT value FROM records WHERE name = 'scrub_cursor'").fetchone()
    return None if row is None else json.loads(row[0])


def scrubbed(result: Result) -> list[tuple[int, str]]:
    return [(e["line"], e["path"]) for e in result.named("tarball_scrubbed")]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


def test_all_good_checks_every_row_and_completes_the_round(receiver: Receiver, state: Path) -> None:
    for i in range(5):
        indexed(receiver, f"h{i % 2}", f"e{i}")
    receiver.append_raw(b"not json\n\n")  # a bad line, and a blank one (not counted)
    receiver.append_row({"episode_id": "legacy", "sha256": "0" * 64, "size_bytes": 1})  # no host_id
    receiver.append_row({"host_id": "../etc", "episode_id": "passwd", "sha256": "0" * 64, "size_bytes": 1})
    receiver.append_raw(b'{"host_id": "h0", "episode_id": "torn"')  # an append in progress
    before = digest(receiver.index)

    result = run_scrub(receiver, state)

    assert result.returncode == 0, result.stdout
    finished = result.one("scrub_finished")
    assert {
        k: finished[k] for k in ("checked", "ok", "mismatched", "missing", "unverifiable", "bad_lines")
    } == {
        "checked": 5,
        "ok": 5,
        "mismatched": 0,
        "missing": 0,
        "unverifiable": 2,
        "bad_lines": 1,
    }
    assert finished["bytes_read"] == 5 * TARBALL_BYTES
    assert finished["round_completed"] is True and finished["stopped_by"] is None
    assert sorted(scrubbed(result)) == [(i + 1, f"h{i % 2}/e{i}.tar.zst") for i in range(5)]
    assert [e["reason"] for e in result.named("row_unverifiable")] == [
        "no host_id",
        "host_id or episode_id is not a safe file name",
    ]
    assert result.one("scrub_round_completed")["round"] == 1
    assert result.named("scrub_mismatch") == result.named("scrub_missing") == []
    assert digest(receiver.index) == before
    assert sorted(p.name for p in state.iterdir()) == ["scrub.lock", "state.sqlite3"]
    # the next run starts the next round from the top
    again = run_scrub(receiver, state)
    assert again.one("scrub_started")["round"] == 2 and again.one("scrub_started")["offset"] == 0
    assert again.one("scrub_finished")["ok"] == 5


def test_changed_missing_and_symlinked_tarballs_are_reported_not_fixed(
    receiver: Receiver, state: Path, tmp_path: Path
) -> None:
    for name in ("good", "flipped", "deleted", "linked", "fifo", "cut"):
        indexed(receiver, "h1", name)
    flipped = receiver.episodes / "h1" / "flipped.tar.zst"
    data = bytearray(flipped.read_bytes())
    data[1000] ^= 0x01  # one bit, same size
    flipped.write_bytes(data)
    (receiver.episodes / "h1" / "deleted.tar.zst").unlink()
    # the symlink points at a copy of the indexed bytes: followed, it would pass
    linked = receiver.episodes / "h1" / "linked.tar.zst"
    outside = tmp_path / "outside.tar.zst"
    outside.write_bytes(linked.read_bytes())
    linked.unlink()
    linked.symlink_to(outside)
    fifo = receiver.episodes / "h1" / "fifo.tar.zst"
    fifo.unlink()
    os.mkfifo(fifo)  # opened, it would block the scrub forever
    cut = receiver.episodes / "h1" / "cut.tar.zst"
    cut.write_bytes(cut.read_bytes()[:-1])
    before = digest(receiver.index)

    result = run_scrub(receiver, state)

    assert result.returncode == 1
    mismatches = result.named("scrub_mismatch")
    assert [(m["path"], m["line"], m["level"]) for m in mismatches] == [
        ("h1/flipped.tar.zst", 2, "warning"),
        ("h1/cut.tar.zst", 6, "warning"),
    ]
    row = receiver.rows()[1]
    assert mismatches[0]["expected_sha256"] == row["sha256"]
    assert mismatches[0]["actual_sha256"] == hashlib.sha256(data).hexdigest()
    assert mismatches[0]["expected_size"] == mismatches[0]["actual_size"] == TARBALL_BYTES
    assert (mismatches[1]["expected_size"], mismatches[1]["actual_size"]) == (
        TARBALL_BYTES,
        TARBALL_BYTES - 1,
    )
    missing = {m["path"]: (m["line"], m["reason"]) for m in result.named("scrub_missing")}
    assert missing == {
        "h1/deleted.tar.zst": (3, "no such file"),
        "h1/linked.tar.zst": (4, "not a regular file: symlink"),
        "h1/fifo.tar.zst": (5, "not a regular file: fifo"),
    }
    finished = result.one("scrub_finished")
    assert (finished["checked"], finished["ok"], finished["mismatched"], finished["missing"]) == (6, 1, 2, 3)
    assert finished["bytes_read"] == 2 * TARBALL_BYTES  # good and flipped; cut differs in size: not read
    assert digest(receiver.index) == before
    assert linked.is_symlink() and flipped.read_bytes() == data


def test_interrupted_by_max_duration_resumes_where_it_stopped(
    receiver: Receiver, state: Path, tmp_path: Path
) -> None:
    rows = [(i + 1, f"h{i % 3}/e{i:02d}.tar.zst") for i in range(40)]
    for i in range(40):
        indexed(receiver, f"h{i % 3}", f"e{i:02d}")
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        env = clean_env(NOTIFY_SOCKET=str(sock.path), WATCHDOG_USEC="500000")
        first = run_scrub(receiver, state, *SLOW, "--max-duration", "1", env=env)
    finally:
        sock.close()

    assert first.returncode == 0
    head = first.one("scrub_finished")
    assert head["stopped_by"] == "max_duration" and head["round_completed"] is False
    assert 0 < head["checked"] < 40 and head["duration_s"] < 2
    cursor = cursor_of(state)
    assert (cursor["line"], cursor["round"], cursor["counts"]["checked"]) == (
        head["checked"],
        1,
        head["checked"],
    )
    fields = sock.fields()
    assert fields[0] == "READY=1" and fields.count("WATCHDOG=1") >= 3, fields
    assert fields[-2:] == ["STOPPING=1", "STATUS=scrub round 1 paused"], fields

    second = run_scrub(receiver, state)

    started = second.one("scrub_started")
    assert (started["round"], started["line"]) == (1, head["checked"])
    assert second.one("scrub_finished")["round_completed"] is True
    both = scrubbed(first) + scrubbed(second)
    assert sorted(both) == rows  # every row once: none skipped, none read twice
    assert second.one("scrub_round_completed")["checked"] == 40


def test_a_stop_inside_a_read_leaves_that_row_for_the_next_run(receiver: Receiver, state: Path) -> None:
    small = indexed(receiver, "h1", "small", size=1000)
    indexed(receiver, "h1", "big", size=4 << 20)  # a minute at 64K/s: the deadline falls inside it

    first = run_scrub(receiver, state, "--max-read-rate", "64K", "--max-duration", "0.5")

    head = first.one("scrub_finished")
    assert (head["checked"], head["stopped_by"], head["round_completed"]) == (1, "max_duration", False)
    assert head["bytes_read"] > 1000  # it was reading big
    cursor = cursor_of(state)
    assert (cursor["line"], cursor["offset"]) == (1, len(receiver.index.read_bytes().splitlines(True)[0]))
    assert cursor["counts"]["bytes_read"] == small.stat().st_size  # a partial read is not the round's

    second = run_scrub(receiver, state)

    assert scrubbed(second) == [(2, "h1/big.tar.zst")]
    assert second.one("scrub_round_completed")["bytes_read"] == 1000 + (4 << 20)


def test_sigterm_mid_round_exits_0_and_resumes(receiver: Receiver, state: Path) -> None:
    rows = [(i + 1, f"h1/e{i:02d}.tar.zst") for i in range(30)]
    for i in range(30):
        indexed(receiver, "h1", f"e{i:02d}")
    proc = subprocess.Popen(scrub_argv(receiver, state, *SLOW), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if sum('"tarball_scrubbed"' in seen for seen in lines) == 3:
            time.sleep(0.03)  # into the next row's read (62 ms at 4M/s)
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=10) == 0
    first = Result(0, "".join(lines), "", parse_events("".join(lines)))
    finished = first.one("scrub_finished")
    assert finished["stopped_by"] == "signal" and not finished["round_completed"]
    assert finished["checked"] < 30

    second = run_scrub(receiver, state)

    assert second.returncode == 0
    assert sorted(scrubbed(first) + scrubbed(second)) == rows
    assert second.one("scrub_finished")["round_completed"] is True


def test_metrics_file_reports_the_mismatch(receiver: Receiver, state: Path, tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        indexed(receiver, "h1", name, size=1000)
    (receiver.episodes / "h1" / "b.tar.zst").write_bytes(os.urandom(1000))
    (receiver.episodes / "h1" / "c.tar.zst").unlink()
    reconcile_metrics = tmp_path / "cis490_reconcile.prom"

    result = run_scrub(receiver, state, "--metrics-file", str(reconcile_metrics))

    assert result.returncode == 1
    assert not reconcile_metrics.exists()  # the pass's file is the pass's
    text = (tmp_path / "cis490_reconcile_scrub.prom").read_text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ns = f"{metrics.NS}_scrub"
    assert samples[(f"{ns}_last_run_rows", (("result", "mismatched"),))] == 1
    assert samples[(f"{ns}_last_run_rows", (("result", "missing"),))] == 1
    assert samples[(f"{ns}_last_run_rows", (("result", "ok"),))] == 1
    assert samples[(f"{ns}_round_rows", (("result", "mismatched"),))] == 1
    assert samples[(f"{ns}_last_run_rows_checked", ())] == 3
    assert samples[(f"{ns}_last_run_bytes_read", ())] == 2000
    assert samples[(f"{ns}_round_progress_ratio", ())] == 1.0
    completed = samples[(f"{ns}_last_round_completed_timestamp_seconds", ())]
    assert time.time() - 60 < completed <= time.time()


@pytest.mark.parametrize(
    ("mode", "reason"),
    [(0o604, "cannot stat: Permission denied"), (0o000, "cannot open: Permission denied")],
    ids=["not-searchable", "not-openable"],
)
def test_a_tarball_that_cannot_be_looked_at_is_unreadable_not_missing(
    receiver: Receiver, state: Path, mode: int, reason: str
) -> None:
    """A host directory listed but not searchable (mode 604), or not even
    opened (000, EIO alike): the file may well be there, so the scrub says it
    could not look, not that it is gone (nor pruned: a pruned run would
    never be looked at again)."""
    indexed(receiver, "h1", "a")
    indexed(receiver, "h2", "b")
    (receiver.episodes / "h2").chmod(mode)
    proc = subprocess.run(
        permissions_apply(scrub_argv(receiver, state)), capture_output=True, text=True, timeout=60
    )
    (receiver.episodes / "h2").chmod(0o755)
    result = Result(proc.returncode, proc.stdout, proc.stderr, parse_events(proc.stdout))
    assert result.returncode == 1
    assert [(e["path"], e["reason"]) for e in result.named("scrub_unreadable")] == [("h2/b.tar.zst", reason)]
    assert result.named("scrub_missing") == []
    finished = result.one("scrub_finished")
    assert (finished["ok"], finished["unreadable"], finished["missing"]) == (1, 1, 0)


def test_a_state_directory_it_may_not_write_fails_in_one_event(receiver: Receiver, tmp_path: Path) -> None:
    """The scrub's user cannot create its lock file: scrub_failed and exit 1,
    not a traceback (internal_error)."""
    indexed(receiver, "h1", "a")
    state = tmp_path / "ro-state"
    state.mkdir(mode=0o555)
    proc = subprocess.run(
        permissions_apply(scrub_argv(receiver, state)), capture_output=True, text=True, timeout=60
    )
    result = Result(proc.returncode, proc.stdout, proc.stderr, parse_events(proc.stdout))
    assert result.returncode == 1, proc.stderr
    assert result.one("scrub_failed")["error"] == "lock file: Permission denied"
    assert result.named("internal_error") == [] and "Traceback" not in proc.stderr


def test_a_state_directory_it_may_not_reach_fails_in_one_event(receiver: Receiver, tmp_path: Path) -> None:
    """Under a parent this user may not search (the units' 0750 state
    directory, an operator's scrub as another user): scrub_failed and exit 1,
    as for one it may not write. Path.is_dir() raised PermissionError there:
    internal_error and a traceback."""
    indexed(receiver, "h1", "a")
    with unsearchable(tmp_path, "state") as state:
        argv = permissions_apply(scrub_argv(receiver, state))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    result = Result(proc.returncode, proc.stdout, proc.stderr, parse_events(proc.stdout))
    assert result.named("internal_error") == [] and "Traceback" not in proc.stderr, proc.stdout
    assert result.returncode == 1
    assert result.one("scrub_failed")["error"] == "lock file: Permission denied"


def test_a_second_scrub_is_refused_while_one_holds_the_lock(receiver: Receiver, state: Path) -> None:
    indexed(receiver, "h1", "a")
    with open(state / "scrub.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run_scrub(receiver, state)
    assert result.returncode == 1
    assert [(e["event"], e["level"]) for e in result.events] == [("scrub_already_running", "error")]
    assert result.events[0]["lock_file"] == str(state / "scrub.lock")
    assert cursor_of(state) is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_a_pass_holds_the_state_directory_ends_the_wait(
    receiver: Receiver, state: Path, signum: signal.Signals
) -> None:
    """No database yet, so the scrub must settle one and waits for the pass
    holding the directory (here: an flock on it in this process). A stop
    was ignored until lock_timeout (30 s), then said as scrub_failed, exit
    1. Now it ends the wait at once: scrub_stopped, exit 0, nothing saved."""
    indexed(receiver, "h1", "a")
    fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        argv = scrub_argv(receiver, state, "--lock-timeout", "30")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        # the scrub takes scrub.lock (an flock of its pid in /proc/locks) just before it waits
        held = re.compile(rf"^\d+: FLOCK +ADVISORY +WRITE +{proc.pid} ", re.M)
        while not held.search(Path("/proc/locks").read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # into the wait
        proc.send_signal(signum)
        stopped_at = time.monotonic()
        out, err = proc.communicate(timeout=40)
        took = time.monotonic() - stopped_at
    finally:
        os.close(fd)

    assert (proc.returncode, err) == (0, ""), out + err
    assert took < 2.0, took
    events = parse_events(out)
    assert [(e["event"], e["stopped_by"], e["state_dir"]) for e in events] == [
        ("scrub_stopped", "signal", str(state))
    ]
    assert cursor_of(state) is None
    again = run_scrub(receiver, state)  # the directory free: it settles and runs
    assert again.returncode == 0 and again.one("scrub_finished")["round_completed"] is True


def test_a_state_database_busy_past_the_timeout_is_one_line_and_kept(
    receiver: Receiver, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer stuck in a transaction: the scrub gives up in one event and
    leaves the database as it is (it used to take it for damaged)."""
    indexed(receiver, "h1", "a")
    assert receiver.run("--state-dir", str(state)).returncode == 0
    inode = (state / "state.sqlite3").stat().st_ino
    monkeypatch.setattr(connection, "connect", functools.partial(connection.connect, busy_timeout_s=0.2))
    cfg = config.build(
        {"episodes_root": str(receiver.episodes), "index": str(receiver.index), "state_dir": str(state)}
    )
    out = io.StringIO()
    with closing(sqlite3.connect(state / "state.sqlite3", isolation_level=None)) as stuck:
        stuck.execute("BEGIN IMMEDIATE")
        with pytest.raises(ScrubNotRun):
            Scrubber(cfg, make_logger("info", out), Notifier({}), lambda: False, None, None).run()
    assert [(e["event"], e["error"]) for e in parse_events(out.getvalue())] == [
        ("scrub_failed", "database is locked")
    ]
    assert (state / "state.sqlite3").stat().st_ino == inode and cursor_of(state) is None


def test_a_damaged_page_of_the_records_is_rebuilt_not_an_internal_error(
    receiver: Receiver, state: Path
) -> None:
    """A page of zeros where the cursor is kept (a bad sector, a torn copy):
    the scrub settles the file as for any unusable one (rebuilt under the
    directory's lock, a new round), and the pass's record is saved again.
    Both used to fail on it every run: an internal_error, state_record_failed."""
    indexed(receiver, "h1", "a")
    assert receiver.run("--state-dir", str(state)).returncode == 0
    assert run_scrub(receiver, state).returncode == 0 and cursor_of(state) is not None
    zero_page(state / "state.sqlite3", "records")
    result = run_scrub(receiver, state)
    assert result.returncode == 0 and result.named("internal_error") == [], result.stdout[-500:]
    assert [e["reason"] for e in result.named("state_rebuilt")] == [
        "not a usable database: database disk image is malformed"
    ]
    assert result.one("scrub_finished")["ok"] == 1 and cursor_of(state) is not None
    after = receiver.run("--state-dir", str(state))
    assert after.returncode == 0 and after.named("state_record_failed") == [], after.stdout


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("replace", "the index was replaced"),
        ("truncate", "the index is shorter than the cursor"),
        ("shift", "the cursor is not at the start of a line"),
    ],
)
def test_a_rewritten_index_restarts_the_round_from_the_top(
    receiver: Receiver, state: Path, change: str, reason: str
) -> None:
    for i in range(8):
        indexed(receiver, "h1", f"e{i}")
    first = run_scrub(receiver, state, *SLOW, "--max-duration", "0.5")
    offset = cursor_of(state)["offset"]
    assert offset > 0 and first.one("scrub_finished")["round_completed"] is False
    data = receiver.index.read_bytes()
    if change == "replace":  # same bytes, another inode
        (receiver.root / "new.jsonl").write_bytes(data)
        os.replace(receiver.root / "new.jsonl", receiver.index)
    elif change == "truncate":
        os.truncate(receiver.index, offset - 1)
    else:  # same inode, longer, but a line now spans the cursor
        receiver.index.write_bytes(b" " + data)

    second = run_scrub(receiver, state)

    restarted = second.one("scrub_round_restarted")
    assert (restarted["level"], restarted["reason"], restarted["previous_offset"]) == (
        "warning",
        reason,
        offset,
    )
    started = second.one("scrub_started")
    assert (started["round"], started["offset"], started["line"]) == (2, 0, 0)
    assert scrubbed(second)[0][0] == 1  # from the first row again
    assert second.one("scrub_finished")["round_completed"] is True


def test_the_scrub_unit_carries_the_pass_units_hardening_verbatim() -> None:
    """test_systemd.py checks every unit with systemd-analyze verify; this
    keeps the scrub's hardening block identical to the reviewed one."""
    units = REPO / "systemd"
    block = (units / "cis490-reconcile.service").read_text().split("# Hardening.", 1)[1]
    scrub_unit = (units / "cis490-reconcile-scrub.service").read_text()
    assert scrub_unit.endswith("# Hardening." + block)
    assert "ExecStart=/opt/cis490/.venv/bin/cis490-reconcile scrub --max-duration 10800\n" in scrub_unit


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--host", "h1"), "--host: a scrub walks the whole index"),
        (("--max-duration", "soon"), "argument --max-duration: expected a number of seconds"),
        (("--state-dir", ""), "scrub keeps its cursor in state_dir, which is not set"),
        (("--state-dir", "/nonexistent"), "keeps its cursor in state_dir /nonexistent: no such directory"),
        (("--state-dir", "/etc/passwd"), "keeps its cursor in state_dir /etc/passwd: not a directory"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(
    receiver: Receiver, state: Path, args: tuple[str, ...], message: str
) -> None:
    indexed(receiver, "h1", "a")
    proc = subprocess.run(scrub_argv(receiver, state, *args), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("cis490-reconcile scrub: error: ") or proc.stderr.startswith(
        "cis490-reconcile: error: "
    )
    assert message in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert cursor_of(state) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown the index")
def test_root_is_refused_when_the_index_belongs_to_another_user(receiver: Receiver, state: Path) -> None:
    """A scrub run by hand as root would leave root's scrub.lock (0640) and
    database in the service user's state directory, and every nightly scrub
    after it would fail (scrub_failed: lock file: Permission denied)."""
    indexed(receiver, "h1", "a")
    os.chown(receiver.index, 4242, 4242)
    proc = subprocess.run(scrub_argv(receiver, state), capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert "refusing to run as root" in proc.stderr and "--allow-root" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert sorted(p.name for p in state.iterdir()) == []  # nothing of root's left there
    allowed = run_scrub(receiver, state, "--allow-root")
    assert allowed.returncode == 0 and allowed.one("scrub_finished")["ok"] == 1


def _pruned_store(receiver: Receiver, old: int, young: int) -> None:
    """Rows of tarballs that are gone: `old` received two days ago, `young` an hour ago."""
    now = time.time()
    for i in range(old + young):
        stamp = now - (2 * 86400 if i < old else 3600)
        receiver.append_row(
            {
                "host_id": "h1",
                "episode_id": f"e{i:05}",
                "received_at_wall": datetime.fromtimestamp(stamp, timezone.utc).isoformat(),
                "sha256": "0" * 64,
                "size_bytes": 100,
                "schema_version": 1,
            }
        )
    (receiver.episodes / "h1").mkdir(exist_ok=True)


def test_pruned_rows_are_counted_not_reported_and_missing_ones_fail(
    receiver: Receiver, state: Path, tmp_path: Path
) -> None:
    _pruned_store(receiver, old=30, young=2)
    indexed(receiver, "h1", "kept", size=1000)
    prom = tmp_path / "cis490_reconcile.prom"

    result = run_scrub(receiver, state, "--retention", "1d", "--metrics-file", str(prom))

    finished = result.one("scrub_finished")
    assert (finished["pruned"], finished["missing"], finished["ok"]) == (30, 2, 1)
    assert [m["path"] for m in result.named("scrub_missing")] == ["h1/e00030.tar.zst", "h1/e00031.tar.zst"]
    assert result.returncode == 1  # the two young ones are missing
    assert finished["bytes_read"] == 1000  # a pruned row costs one lstat, never a read
    scrub_prom = {
        (s.name, s.labels.get("result")): s.value
        for f in text_string_to_metric_families((tmp_path / "cis490_reconcile_scrub.prom").read_text())
        for s in f.samples
    }
    assert scrub_prom[("cis490_reconcile_scrub_last_run_rows", "pruned")] == 30
    assert scrub_prom[("cis490_reconcile_scrub_last_run_rows", "missing")] == 2

    clean = run_scrub(receiver, state, "--retention", "30m")  # the next round: all of them old enough
    assert clean.returncode == 0 and clean.one("scrub_finished")["pruned"] == 32
    assert clean.named("scrub_missing") == []


def test_per_row_events_stop_at_the_cap_with_one_summary(receiver: Receiver, state: Path) -> None:
    """A condition that can cover millions of rows (a store pruned without a
    retention set) must not flood the journal: MAX_EVENTS of a kind, then one
    events_suppressed; the counts stay complete."""
    _pruned_store(receiver, old=MAX_EVENTS + 20, young=0)
    result = run_scrub(receiver, state)  # no retention: every gone tarball is missing
    assert len(result.named("scrub_missing")) == MAX_EVENTS
    (suppressed,) = result.named("events_suppressed")
    assert (suppressed["suppressed_event"], suppressed["after"]) == ("scrub_missing", MAX_EVENTS)
    assert result.one("scrub_finished")["missing"] == MAX_EVENTS + 20
    assert len(result.stdout.encode()) < 1 << 20


# --- pruned rows are read once, then counted (scrubcursor.PrunedRuns) -------------------------


def round_facts(result: Result) -> dict[str, int]:
    finished = result.one("scrub_finished")
    return {k: finished[k] for k in ("checked", "ok", "pruned", "missing", "bad_lines", "pruned_unread")}


def stats_of_episodes(receiver: Receiver, state: Path, *args: str) -> tuple[Result, list[str]]:
    """A scrub under strace: which episode files it looked at."""
    log = state.parent / "strace.log"
    argv = ["strace", "-f", "-qq", "-e", "trace=newfstatat,statx,stat,lstat,openat", "-o", str(log)]
    argv += scrub_argv(receiver, state, *args)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    looked = sorted(set(re.findall(r'"(e\d{5}\.tar\.zst)"', log.read_text())))
    return Result(proc.returncode, proc.stdout, proc.stderr, parse_events(proc.stdout)), looked


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_a_later_round_counts_pruned_rows_without_looking_at_them(receiver: Receiver, state: Path) -> None:
    _pruned_store(receiver, old=300, young=0)
    indexed(receiver, "h1", "kept", size=1000)
    receiver.append_raw(b"not json\n")  # breaks the run: the rows after it are a run of their own
    _pruned_store(receiver, old=100, young=0)

    first, looked_first = stats_of_episodes(receiver, state, "--retention", "1d")
    second, looked_second = stats_of_episodes(receiver, state, "--retention", "1d")

    assert len(looked_first) == 300  # e00000..e00299 (the second batch reuses the names)
    facts = {"checked": 401, "ok": 1, "pruned": 400, "missing": 0, "bad_lines": 1}
    assert round_facts(first) == {**facts, "pruned_unread": 0}
    assert round_facts(second) == {**facts, "pruned_unread": 400}  # the same counts, exactly
    assert looked_second == []  # not one stat of a pruned row's tarball
    assert second.one("scrub_round_completed")["pruned"] == 400
    assert first.returncode == second.returncode == 0


def test_a_longer_retention_or_another_index_reads_the_rows_again(receiver: Receiver, state: Path) -> None:
    _pruned_store(receiver, old=200, young=0)
    assert round_facts(run_scrub(receiver, state, "--retention", "1d"))["pruned"] == 200

    longer = run_scrub(receiver, state, "--retention", "3d")  # received two days ago: within it now
    finished = longer.one("scrub_finished")
    assert (finished["missing"], finished["pruned_unread"]) == (200, 0)
    assert longer.returncode == 1

    again = run_scrub(receiver, state, "--retention", "1d")  # a run is saved only when found pruned again
    assert round_facts(again)["pruned_unread"] == 0
    assert round_facts(run_scrub(receiver, state, "--retention", "1d"))["pruned_unread"] == 200

    receiver.replace_index()
    replaced = run_scrub(receiver, state, "--retention", "1d")
    assert round_facts(replaced) == {**round_facts(again), "pruned_unread": 0}
    with closing(sqlite3.connect(state / "state.sqlite3")) as db:
        (ino,) = {row[0] for row in db.execute("SELECT index_ino FROM scrub_pruned")}
    assert ino == receiver.index.stat().st_ino


def test_runs_grow_across_stopped_runs_and_keep_exact_counts(receiver: Receiver, state: Path) -> None:
    """A scrub stopped in the middle of pruned rows saves its run as far as it
    got; the next one goes on from there and makes it one run."""
    _pruned_store(receiver, old=20_000, young=0)
    stopped = run_scrub(receiver, state, "--retention", "1d", "--max-duration", "0.4")
    assert stopped.one("scrub_finished")["stopped_by"] == "max_duration", stopped.stdout
    for _ in range(5):
        last = run_scrub(receiver, state, "--retention", "1d")
        if last.one("scrub_finished")["round_completed"]:
            break
    with closing(sqlite3.connect(state / "state.sqlite3")) as db:
        runs = db.execute('SELECT start, "end", lines, rows FROM scrub_pruned').fetchall()
    assert runs == [(0, receiver.index.stat().st_size, 20_000, 20_000)]
    assert last.one("scrub_round_completed")["pruned"] == 20_000
    following = run_scrub(receiver, state, "--retention", "1d")
    assert round_facts(following)["pruned_unread"] == 20_000 == round_facts(following)["pruned"]


@pytest.mark.parametrize("change", ["shift", "regrown"])
def test_a_run_of_an_index_rewritten_in_place_never_cuts_a_line(
    receiver: Receiver, state: Path, change: str
) -> None:
    """The same inode rewritten in place (every line a byte later; or
    truncated and filled again with other rows): the runs found before are
    this inode's, but their starts may now fall inside a line. The walk must
    not stop reading there (that line would look torn, and the round would
    end early): the whole index is read and counted."""
    _pruned_store(receiver, old=300, young=0)
    indexed(receiver, "h1", "kept", size=1000)
    _pruned_store(receiver, old=100, young=0)
    assert round_facts(run_scrub(receiver, state, "--retention", "1d"))["pruned"] == 400
    with closing(sqlite3.connect(state / "state.sqlite3")) as db:
        starts = [start for (start,) in db.execute("SELECT start FROM scrub_pruned ORDER BY start")]
    assert len(starts) == 2
    ino = receiver.index.stat().st_ino
    if change == "shift":
        receiver.index.write_bytes(b" " + receiver.index.read_bytes())
        facts = {"checked": 401, "ok": 1, "pruned": 400, "missing": 0, "bad_lines": 0}
    else:
        os.truncate(receiver.index, 0)
        receiver.append_raw(b"x" * (starts[1] + 8) + b"\n")  # a line across the second run's old start
        _pruned_store(receiver, old=200, young=0)
        facts = {"checked": 200, "ok": 0, "pruned": 200, "missing": 0, "bad_lines": 1}
    assert receiver.index.stat().st_ino == ino

    again = run_scrub(receiver, state, "--retention", "1d")

    assert again.one("scrub_finished")["round_completed"] is True
    assert {k: v for k, v in round_facts(again).items() if k != "pruned_unread"} == facts
    assert again.one("scrub_round_completed")["pruned"] == facts["pruned"]
    with closing(sqlite3.connect(state / "state.sqlite3")) as db:  # the run cut by a line: forgotten
        assert starts[1] not in {start for (start,) in db.execute("SELECT start FROM scrub_pruned")}

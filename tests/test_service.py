"""The service side: sd_notify over a real datagram socket, the watchdog
cadence, signals on a real subprocess, the interval loop and SIGHUP reload."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
from helpers import LockHolder, NotifySocket, Receiver, clean_env, episode, parse_events, permissions_apply

from cis490_reconcile.notify import Notifier

pytestmark = pytest.mark.e2e  # also under every other supported Python (.ci/noxfile.py)

BIG = 16 << 20  # a tarball that takes ~2 s to read at RATE
RATE = "8M"
WATCHDOG_USEC = 400_000


@pytest.fixture
def notify_socket(tmp_path: Path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def big_tarball(receiver: Receiver, host: str, episode_id: str, size: int = BIG) -> Path:
    return receiver.tarball(host, episode_id, episode(os.urandom(size)), checksum=True)


def event_waiter(stream: IO[str], timeout_s: float = 20) -> Callable[[str], dict]:
    """wait(name): the next event of that name in a running command's log
    (read by a thread); at most timeout_s each, and an internal_error fails."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()

    def wait(name: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = json.loads(lines.get(timeout=left))
            except queue.Empty:
                break
            assert event["event"] != "internal_error", event.get("exception")
            if event["event"] == name:
                return event
        raise AssertionError(f"no {name} event in {timeout_s} s")

    return wait


def start(receiver: Receiver, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return start_argv(receiver.argv(*args), env)


def start_argv(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or clean_env()
    )


def wait_for_field(sock: NotifySocket, pattern: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(re.fullmatch(pattern, m) for m in sock.fields()):
            return
        time.sleep(0.02)
    raise AssertionError(f"no notification matching {pattern!r}; got {sock.fields()}")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ready_status_watchdog_cadence_and_stopping(
    receiver: Receiver, notify_socket: NotifySocket, workers: str
) -> None:
    """With workers the pings come from the parent, but only while the
    workers' shared counter moves. At 2M/s one 1 MiB read takes 0.5 s here
    and 1 s in one of two workers, longer than the watchdog's period: the
    sleeps that keep the rate must feed it, in a worker as in the parent."""
    big_tarball(receiver, "h1", "big", size=4 << 20)
    env = clean_env(NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
    started = time.monotonic()
    argv = receiver.argv("--once", "--max-read-rate", "2M", "--workers", workers)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert receiver.keys() == [("h1", "big")]
    assert took >= 1.5, "the rate limit did not slow the read"

    fields = notify_socket.fields()
    assert fields[0] == "READY=1", fields[:3]
    assert fields[-2:] == ["STOPPING=1", "STATUS=stopped after 1 pass(es)"]
    pings = notify_socket.times("WATCHDOG=1")
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    half = WATCHDOG_USEC / 2 / 1e6
    assert len(pings) >= 6, pings
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps  # never long enough for systemd to fire
    assert min(gaps) >= half * 0.9, gaps  # and not more often than half the period
    statuses = notify_socket.statuses()
    assert "reading the index" in statuses
    assert any(re.fullmatch(r"verifying [01]/1 unindexed tarballs, \d+\.\d MiB read", s) for s in statuses)


def test_no_watchdog_pings_for_another_pid(receiver: Receiver, notify_socket: NotifySocket) -> None:
    receiver.tarball("h1", "a")
    env = clean_env(NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="1000", WATCHDOG_PID="1")
    proc = subprocess.run(receiver.argv("--once"), capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    fields = notify_socket.fields()
    assert fields[0] == "READY=1" and "STOPPING=1" in fields
    assert "WATCHDOG=1" not in fields


def test_a_watchdog_usec_beyond_any_float_is_no_watchdog(
    receiver: Receiver, notify_socket: NotifySocket
) -> None:
    receiver.tarball("h1", "a")
    env = clean_env(NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="1" + "0" * 400)
    proc = subprocess.run(receiver.argv("--once"), capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout
    assert receiver.keys() == [("h1", "a")]
    fields = notify_socket.fields()
    assert fields[0] == "READY=1" and "STOPPING=1" in fields


def test_nothing_is_sent_without_notify_socket(receiver: Receiver, notify_socket: NotifySocket) -> None:
    receiver.tarball("h1", "a")
    env = clean_env(WATCHDOG_USEC="1000")  # a watchdog without a socket is still nothing to do
    proc = subprocess.run(receiver.argv("--once"), capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert receiver.keys() == [("h1", "a")]
    time.sleep(0.1)
    assert notify_socket.fields() == []
    assert not Notifier({}).enabled and Notifier({}).watchdog_interval_s is None


def test_sigterm_mid_pass_stops_cleanly_and_keeps_what_was_verified(
    receiver: Receiver, notify_socket: NotifySocket
) -> None:
    for name in ("a", "b", "c"):
        receiver.tarball("h1", name)
    big_tarball(receiver, "h2", "big")  # hosts are walked in order: h1's rows are verified first
    receiver.append_raw(b'{"episode_id": "torn", "host_id": "h0"}')  # a row that lost its newline
    env = clean_env(NOTIFY_SOCKET=str(notify_socket.path))
    proc = start(receiver, "--once", "--max-read-rate", RATE, "--workers", "1", env=env)
    wait_for_field(notify_socket, r"STATUS=verifying 3/4 unindexed tarballs, .*")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    finished = [e for e in parse_events(out) if e["event"] == "pass_finished"]
    assert finished and finished[0]["interrupted"] is True
    assert notify_socket.fields()[-2] == "STOPPING=1"
    data = receiver.index.read_bytes()
    assert data.endswith(b"\n")
    assert [json.loads(line)["episode_id"] for line in data.splitlines()] == ["torn", "a", "b", "c"]

    again = receiver.run()  # the next pass finishes the job
    assert again.returncode == 0
    assert sorted(receiver.keys()) == [("h0", "torn"), ("h1", "a"), ("h1", "b"), ("h1", "c"), ("h2", "big")]


@pytest.mark.parametrize("to_every_process", [False, True], ids=["main", "control-group"])
def test_sigterm_stops_the_workers(
    receiver: Receiver, notify_socket: NotifySocket, to_every_process: bool
) -> None:
    """Also when the workers are signalled too, as systemd's stop does (the
    default KillMode=control-group): they leave the stop to the main process
    and are not killed by it (a worker dead of it would fail the pass)."""
    big_tarball(receiver, "h1", "big1")
    big_tarball(receiver, "h1", "big2")
    env = clean_env(NOTIFY_SOCKET=str(notify_socket.path))
    proc = start(receiver, "--once", "--max-read-rate", "4M", "--workers", "2", env=env)
    wait_for_field(notify_socket, r"STATUS=verifying 0/2 unindexed tarballs, [1-9][\d.]* MiB read")
    stopped = time.monotonic()
    if to_every_process:
        workers = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(workers) == 2
        for worker in workers:
            os.kill(int(worker), signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert time.monotonic() - stopped < 2, "workers did not stop at their next read"
    assert proc.returncode == 0, err
    assert next(e for e in parse_events(out) if e["event"] == "pass_finished")["interrupted"] is True
    assert not receiver.index.exists() or receiver.index.read_bytes() == b""
    assert subprocess.run(["pgrep", "-f", str(receiver.episodes)], capture_output=True).stdout == b""


def test_sigterm_while_waiting_for_the_lock(receiver: Receiver, notify_socket: NotifySocket) -> None:
    """The stop ends the wait; the pass tries the lock once more without
    waiting, finds it still held, and says the verified row is left."""
    receiver.tarball("h1", "a")
    receiver.index.touch()
    with LockHolder(receiver.index):
        env = clean_env(NOTIFY_SOCKET=str(notify_socket.path))
        proc = start(receiver, "--once", "--lock-timeout", "60", env=env)
        wait_for_field(notify_socket, r"STATUS=waiting for index lock .*")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    events = parse_events(out)
    assert [(e["rows"], e["reason"]) for e in events if e["event"] == "rows_left_for_next_pass"] == [
        (1, "stopping, lock busy")
    ]
    assert next(e for e in events if e["event"] == "pass_finished")["interrupted"] is True
    assert receiver.index.read_bytes() == b""


def test_sigterm_while_another_pass_holds_the_state_directory(
    receiver: Receiver, notify_socket: NotifySocket, tmp_path: Path
) -> None:
    """The wait for the state directory is a wait for a lock too: a stop
    ends it at once, an interrupted pass with nothing done. It used to wait
    out lock_timeout (past TimeoutStopSec=60 when lock_timeout is longer:
    SIGKILL), then say pass_failed for a pass nobody saw fail. Nor does it
    replace the record and metrics of the pass holding the directory."""
    receiver.tarball("h1", "a")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    kept = ("--state-dir", str(state_dir), "--metrics-file", str(tmp_path / "reconcile.prom"))
    assert receiver.run(*kept).returncode == 0
    index_before = receiver.index.read_bytes()
    metrics_before, record_before = (tmp_path / "reconcile.prom").read_bytes(), receiver.last_pass(state_dir)
    receiver.tarball("h1", "b")
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another pass holds it
        env = clean_env(NOTIFY_SOCKET=str(notify_socket.path))
        proc = start(receiver, "--once", *kept, "--lock-timeout", "60", env=env)
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "pass_started"
        time.sleep(0.3)  # waiting for the directory now
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
        took = time.monotonic() - stopped
    finally:
        os.close(fd)
    assert proc.returncode == 0, err
    assert took < 2, f"the stop waited {took:.1f} s for the state directory"
    events = parse_events(out)
    assert [e["event"] for e in events] == ["pass_finished"], events
    assert events[0]["interrupted"] is True
    assert notify_socket.fields()[-2] == "STOPPING=1"
    assert receiver.index.read_bytes() == index_before
    assert (tmp_path / "reconcile.prom").read_bytes() == metrics_before
    assert receiver.last_pass(state_dir) == record_before and record_before["result"] == "ok"
    assert receiver.run("--state-dir", str(state_dir)).returncode == 0  # the next pass does the work
    assert receiver.keys() == [("h1", "a"), ("h1", "b")]


def test_loop_runs_passes_until_sigterm(receiver: Receiver, notify_socket: NotifySocket) -> None:
    receiver.tarball("h1", "a")
    env = clean_env(NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="600000")
    proc = start(receiver, "--interval", "0.3", env=env)
    try:
        deadline = time.monotonic() + 20

        def passes() -> int:
            return sum(m == "STATUS=reading the index" for m in notify_socket.fields())

        while passes() < 1 or not receiver.index.exists():
            assert time.monotonic() < deadline, notify_socket.fields()
            time.sleep(0.05)
        receiver.tarball("h1", "b")  # appears once the loop is running
        while passes() < 3 or len(receiver.keys()) < 2:
            assert time.monotonic() < deadline, notify_socket.fields()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    events = parse_events(out)
    names = [e["event"] for e in events]
    assert names[0] == "service_started" and names[-1] == "service_stopped"
    assert events[-1]["signal"] == "SIGTERM" and events[-1]["passes"] >= 3
    assert sorted(receiver.keys()) == [("h1", "a"), ("h1", "b")]
    assert any(s.startswith("idle, next pass in") for s in notify_socket.statuses())
    fields = notify_socket.fields()
    assert fields[0] == "READY=1" and fields[-2] == "STOPPING=1"


def test_the_idle_wait_pings_every_half_period(receiver: Receiver, notify_socket: NotifySocket) -> None:
    """A ping not yet due when the idle wait begins was put off by a whole
    half period: the gap then reached (interval mod W/2) + the pass + W/2,
    up to a hair under WatchdogSec, and with the jitter any phase comes
    round (at 900 s and WatchdogSec=60, that hair is a wakeup's latency).
    Here (W = 2 s, interval 1.5 s) every cycle's gap was 1.5-1.65 s."""
    env = clean_env(NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="2000000")
    proc = start(receiver, "--interval", "1.5", env=env)
    try:
        time.sleep(8)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert sum(e["event"] == "pass_finished" for e in parse_events(out)) >= 3
    pings = notify_socket.times("WATCHDOG=1")
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 1.45, gaps  # half the period and a no-op pass; it was 0.5 + jitter + the pass + 1.0


def test_sighup_reloads_and_keeps_the_old_config_when_the_new_one_is_bad(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A bad new config is said and the running one kept. A config file
    replaced by a FIFO nobody writes used to hang the service in open() (no
    pass, no watchdog ping), and by a symlink to /dev/zero to read until
    memory ran out."""
    toml = tmp_path / "reconcile.toml"
    toml.write_text("interval = 0.2\n")
    proc = start(receiver, "--config", str(toml), env=clean_env())
    assert proc.stdout is not None
    wait_event = event_waiter(proc.stdout)
    try:
        wait_event("pass_finished")
        toml.write_text('interval = 0.2\nmax_read_rate = "1G"\n')
        proc.send_signal(signal.SIGHUP)
        assert wait_event("config_reloaded")["changed"] is True
        assert wait_event("pass_started")["max_read_rate"] == 1 << 30
        toml.write_text("interval = 'soon'\n")
        proc.send_signal(signal.SIGHUP)
        assert "interval = 'soon'" in wait_event("config_reload_failed")["error"]
        assert wait_event("pass_started")["max_read_rate"] == 1 << 30  # the old config is kept
        toml.write_text("interval = 1e10\n")  # parses, but no select() could wait that long
        proc.send_signal(signal.SIGHUP)
        assert "interval = 10000000000.0: expected at most" in wait_event("config_reload_failed")["error"]
        assert wait_event("pass_started")["max_read_rate"] == 1 << 30
        for replace in (os.mkfifo, lambda path: path.symlink_to("/dev/zero")):
            toml.unlink()
            replace(toml)
            proc.send_signal(signal.SIGHUP)
            assert wait_event("config_reload_failed")["error"] == f"config file {toml}: not a regular file"
            assert wait_event("pass_started")["max_read_rate"] == 1 << 30
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        finally:
            proc.kill()  # one stuck in open() takes no SIGTERM
    assert proc.returncode == 0
    assert wait_event("service_stopped")["signal"] == "SIGTERM"


def test_a_dry_run_loop_writes_no_metrics_nor_record_after_a_reload(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A dry run writes nothing of ours, in a loop too: its passes' counts are
    rows it would append. After a SIGHUP the reloaded loop used to get the
    sinks of a real pass: a metrics file saying rows were backfilled, and a
    last_pass record for status, though the index was never touched."""
    state = tmp_path / "state"
    state.mkdir()
    assert receiver.run("--state-dir", str(state)).returncode == 0  # a real pass: nothing to do
    index_before = receiver.index.read_bytes() if receiver.index.exists() else None
    receiver.tarball("h1", "a")
    prom = tmp_path / "textfiles" / "cis490_reconcile.prom"
    prom.parent.mkdir()
    toml = tmp_path / "reconcile.toml"
    toml.write_text(f"interval = 0.2\nmetrics_file = '{prom}'\n")
    proc = start(receiver, "--dry-run", "--config", str(toml), "--state-dir", str(state), env=clean_env())
    assert proc.stderr is not None  # a dry run logs on stderr
    wait_event = event_waiter(proc.stderr)
    try:
        wait_event("pass_finished")
        toml.write_text(toml.read_text() + 'max_read_rate = "1G"\n')
        proc.send_signal(signal.SIGHUP)
        assert wait_event("config_reloaded")["changed"] is True
        assert wait_event("pass_finished")["backfilled"] == 1  # would be
        wait_event("pass_finished")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode == 0
    assert (receiver.index.read_bytes() if receiver.index.exists() else None) == index_before
    assert list(prom.parent.iterdir()) == []
    status = subprocess.run(
        receiver.argv("--json", "--state-dir", str(state), command="status"), capture_output=True, text=True
    )
    assert json.loads(status.stdout)["last_pass"]["backfilled"] == 0  # the real pass's


@pytest.mark.skipif(os.geteuid() != 0, reason="the check is of a loop running as root")
def test_a_reload_as_root_naming_an_index_of_another_user_is_refused(
    receiver: Receiver, tmp_path: Path
) -> None:
    """At start, root is refused an index that belongs to another user (the
    receiver's: a lock file root creates there breaks it); a reload naming
    one used to be taken, and the passes appended to it as root."""
    theirs = tmp_path / "theirs" / "index.jsonl"
    theirs.parent.mkdir()
    theirs.touch()
    os.chown(theirs, 65534, 65534)
    toml = tmp_path / "reconcile.toml"
    toml.write_text(f"interval = 0.2\nindex = '{receiver.index}'\n")
    argv = [a for a in receiver.argv("--config", str(toml)) if a not in ("--index", str(receiver.index))]
    receiver.tarball("h1", "a")
    proc = start_argv(argv)
    assert proc.stdout is not None
    wait_event = event_waiter(proc.stdout)
    try:
        wait_event("pass_finished")
        toml.write_text(f"interval = 0.2\nindex = '{theirs}'\n")
        proc.send_signal(signal.SIGHUP)
        assert "refusing to run as root" in wait_event("config_reload_failed")["error"]
        assert wait_event("pass_started")["index"] == str(receiver.index)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode == 0
    assert theirs.read_bytes() == b""


def test_a_reload_naming_an_unsearchable_episodes_root_keeps_the_loop_running(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A path the new config names that this user may not search is a bad
    config like any other: logged, the old one kept. It used to end the loop
    in an internal_error (exit 1, which Restart=on-failure restarts, in vain)."""
    locked = tmp_path / "locked"
    (locked / "episodes").mkdir(parents=True)
    toml = tmp_path / "reconcile.toml"
    toml.write_text(f"interval = 0.2\nepisodes_root = '{receiver.episodes}'\n")
    given = receiver.argv("--config", str(toml))
    argv = [a for a in given if a not in ("--episodes-root", str(receiver.episodes))]  # the file names it
    proc = start_argv(permissions_apply(argv))
    assert proc.stdout is not None
    wait_event = event_waiter(proc.stdout)

    try:
        wait_event("pass_finished")
        locked.chmod(0)
        toml.write_text(f"interval = 0.2\nepisodes_root = '{locked / 'episodes'}'\n")
        proc.send_signal(signal.SIGHUP)
        failed = wait_event("config_reload_failed")
        assert failed["error"] == f"--episodes-root {locked}/episodes: Permission denied"
        assert wait_event("pass_started")["episodes_root"] == str(receiver.episodes)
    finally:
        locked.chmod(0o755)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode == 0


def test_mode_is_required(receiver: Receiver) -> None:
    proc = subprocess.run(receiver.argv(), capture_output=True, text=True, env=clean_env(), timeout=30)
    assert proc.returncode == 2
    assert proc.stderr == (
        "cis490-reconcile: error: nothing to do: pass --once for one pass, or --interval SECONDS for a loop\n"
    )


@pytest.mark.parametrize("split", ["", "1"])  # read by this process alone; in two, the forked one sorting too
def test_a_commit_that_reads_a_replaced_index_whole_feeds_the_watchdog(
    receiver: Receiver, notify_socket: NotifySocket, tmp_path: Path, split: str
) -> None:
    """The index replaced mid-pass: the commit's catch-up reads it whole
    (at 8M rows, most of a minute). It used to send no WATCHDOG=1 at all
    meanwhile, so systemd killed the pass; now each staged batch is
    progress, and so are SQLite's steps while it sorts the keys (here and
    in the forked reader, whose dots the parent counts)."""
    rows = (b'{"episode_id": "e%07d", "host_id": "h%d"}\n' % (i, i % 50) for i in range(1_200_000))
    receiver.append_raw(b"".join(rows))  # read whole in 2-3 s on a fast machine, 17 s on a slow one
    state = ("--state-dir", str(tmp_path))
    began = time.monotonic()
    assert receiver.run(*state).returncode == 0
    # a quarter of what reading it whole takes on this machine (at least 1 s): the commit's read
    # lasts several periods, and each must see a ping however long this machine takes a batch
    period = max(1.0, (time.monotonic() - began) / 4)
    env = clean_env(
        NOTIFY_SOCKET=str(notify_socket.path),
        WATCHDOG_USEC=str(int(period * 1e6)),
        CIS490_TEST_PAUSE_AT="caught_up",
        CIS490_TEST_SPLIT_MIN_BYTES=split,
    )
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen(receiver.argv("--once", *state), text=True, env=env, **pipes)  # type: ignore[call-overload]
    assert proc.stderr is not None and "paused at caught_up" in proc.stderr.readline()
    receiver.replace_index()
    resumed = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "index_restarted" in {e["event"] for e in parse_events(out)}
    (stopping,) = notify_socket.times("STOPPING=1")
    pings = [resumed, *(t for t in notify_socket.times("WATCHDOG=1") if t > resumed), stopping]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    took = stopping - resumed
    print(f"read whole in a commit: {took:.2f} s, period {period:.2f} s, gaps {[round(g, 2) for g in gaps]}")
    assert stopping - resumed > 1.2 * period and max(gaps) < period, gaps  # longer than a period, fed

"""The progress bar: drawn on stderr when it is a real terminal (a pty here),
never when stderr is a pipe or the journal's stream."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import Receiver, episode, parse_events

from cis490_reconcile.termbar import render


def run_with_tty_stderr(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, what the terminal on stderr showed)."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=follower, timeout=60, env=env, text=True)
        os.close(follower)
        follower = -1
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    return proc.returncode, proc.stdout, shown.decode()


@pytest.fixture
def busy(receiver: Receiver) -> Receiver:
    for i in range(6):
        receiver.tarball(f"h{i % 2}", f"e{i}", episode(os.urandom(1 << 20)))
    return receiver


def test_bar_on_a_terminal_for_a_pass_and_status(busy: Receiver) -> None:
    code, stdout, shown = run_with_tty_stderr(busy.argv("--once", "--max-read-rate", "4M"))
    assert code == 0
    assert "\rreconcile  [" in shown and " files  " in shown and "/s" in shown
    assert shown.endswith("\r")  # cleared at the end: the prompt comes back on a clean line
    assert all(line.startswith("{") for line in stdout.splitlines())  # logs untouched

    (busy.episodes / "h0/late.tar.zst").write_bytes((busy.episodes / "h0/e0.tar.zst").read_bytes())
    code, stdout, shown = run_with_tty_stderr(busy.argv("--max-read-rate", "1M", command="status"))
    assert code == 1 and "UNINDEXED" in stdout
    assert re.search(r"\rstatus  \[[#.]+\] +[0-9.]+%  0 files  [0-9.]+ (KiB|MiB)", shown), shown


def test_bar_on_a_terminal_for_a_scrub(busy: Receiver, tmp_path: Path) -> None:
    assert busy.run().returncode == 0  # index them
    state = tmp_path / "state"
    state.mkdir()
    argv = busy.argv("--state-dir", str(state), "--max-read-rate", "8M", command="scrub")
    code, stdout, shown = run_with_tty_stderr(argv)
    assert code == 0 and '"scrub_finished"' in stdout
    assert re.search(r"\rscrub  \[[#.]+\] +[0-9.]+%  [0-9]+ files  [0-9.]+ MiB", shown), shown
    assert shown.endswith("\r")


def test_no_bar_when_piped_or_on_a_dumb_terminal(busy: Receiver) -> None:
    piped = subprocess.run(busy.argv("--once"), capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr == ""

    (busy.episodes / "h0/more.tar.zst").write_bytes((busy.episodes / "h0/e0.tar.zst").read_bytes())
    code, stdout, shown = run_with_tty_stderr(busy.argv("--once"), env={**os.environ, "TERM": "dumb"})
    assert code == 0 and shown == "" and '"row_backfilled"' in stdout


def test_render_shows_percent_rate_and_eta() -> None:
    line = render("scrub", 10, 50 << 20, 0.25, 10.0)
    assert line.startswith("scrub  [######..................]  25.0%  10 files  50.0 MiB  5.0 MiB/s")
    assert line.endswith("ETA 0m30s")
    assert "ETA" not in render("scrub", 1, 10, None, 10.0) and "%" not in render("scrub", 1, 10, None, 10.0)


def test_journal_stream_wins_over_a_terminal(busy: Receiver) -> None:
    """systemd-run --pty or a unit with StandardError=tty+journal: when
    JOURNAL_STREAM names stderr, no bar."""
    leader, follower = pty.openpty()
    try:
        st = os.fstat(follower)
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.run(
            busy.argv("--once"), stdout=subprocess.PIPE, stderr=follower, env=env, timeout=60
        )
        os.close(follower)
        follower = -1
        os.set_blocking(leader, False)
        try:
            shown = os.read(leader, 65536)
        except (BlockingIOError, OSError):
            shown = b""
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0 and b"reconcile" not in shown and b"row_backfilled" in proc.stdout


def test_a_hangup_of_the_terminal_stops_the_pass_cleanly(receiver: Receiver) -> None:
    """An operator's ssh session drops: the terminal under the bar is gone
    (every write to it fails with EIO) and the pass gets SIGHUP. It stops
    as on SIGTERM: verified rows committed, pass_finished, exit 0. The bar's
    failing write used to fail the pass (pass_failed: Input/output error),
    then end it in an internal_error and exit 1."""
    for name in ("a", "b", "c"):
        receiver.tarball("h1", name)
    receiver.tarball("h2", "big", episode(os.urandom(16 << 20)))  # hosts in order: h1's are verified first
    leader, follower = pty.openpty()
    argv = receiver.argv("--once", "--max-read-rate", "4M", "--workers", "1")
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL, text=True
    )
    os.close(follower)
    shown, deadline = b"", time.monotonic() + 30
    while b"  3 files  " not in shown:  # the bar is drawn, h1's tarballs are verified
        assert time.monotonic() < deadline, shown
        shown += os.read(leader, 65536)
    os.close(leader)  # the terminal hangs up
    proc.send_signal(signal.SIGHUP)
    out, _ = proc.communicate(timeout=30)
    events = parse_events(out)
    assert proc.returncode == 0, events[-1]
    assert [e["event"] for e in events if e["event"] in ("pass_failed", "internal_error")] == []
    assert events[-1]["event"] == "pass_finished" and events[-1]["interrupted"] is True
    assert [json.loads(line)["episode_id"] for line in receiver.index.read_bytes().splitlines()] == [
        "a",
        "b",
        "c",
    ]

"""The commit waits for a receiver holding the index lock in any family
(flock, lockf, OFD): real processes contending for a real lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import LockHolder, Receiver

from cis490_reconcile import lock

pytestmark = pytest.mark.e2e  # also under every other supported Python (.ci/noxfile.py)


@pytest.mark.parametrize("mode", ["flock", "lockf", "ofd"])
@pytest.mark.parametrize("separate_lock_file", [False, True])
def test_commit_waits_for_each_lock_family(receiver: Receiver, mode: str, separate_lock_file: bool) -> None:
    receiver.tarball("h1", "a")
    receiver.append_row({"host_id": "h0", "episode_id": "old"})
    before = receiver.index.read_bytes()
    lock_file = receiver.root / "index.lock" if separate_lock_file else receiver.index
    extra = ("--lock-file", str(lock_file)) if separate_lock_file else ()
    holder = LockHolder(lock_file, mode)
    proc = subprocess.Popen(
        receiver.argv("--once", "--lock-timeout", "20", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        # however long a loaded machine takes to get there: the pass says it waits before it ends
        ends = ('"event": "index_lock_waiting"', '"event": "pass_finished"', '"event": "pass_failed"')
        waiting = next(line for line in proc.stdout if any(end in line for end in ends))
        assert ends[0] in waiting, waiting
        time.sleep(0.5)
        assert proc.poll() is None, "the pass did not wait for the lock"
        assert receiver.index.read_bytes() == before
    finally:
        released_at = time.monotonic()
        holder.release()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert time.monotonic() - released_at < 5
    assert receiver.keys() == [("h0", "old"), ("h1", "a")]


@pytest.mark.parametrize("mode", ["flock", "lockf", "ofd"])
def test_lock_timeout_fails_the_pass_clearly(receiver: Receiver, mode: str) -> None:
    receiver.tarball("h1", "a")
    receiver.append_row({"host_id": "h0", "episode_id": "old"})
    before = receiver.index.read_bytes()
    with LockHolder(receiver.index, mode):
        started = time.monotonic()
        result = receiver.run("--lock-timeout", "0.5")
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert elapsed < 10
    assert result.one("pass_failed")["error"] == (
        f"could not lock {receiver.index} within 0.5 s (the receiver or another reconciler holds it)"
    )
    assert receiver.index.read_bytes() == before
    assert receiver.run().returncode == 0  # once the lock is free, the row comes
    assert receiver.keys() == [("h0", "old"), ("h1", "a")]


def test_dry_run_takes_no_lock(receiver: Receiver) -> None:
    receiver.tarball("h1", "a")
    receiver.index.write_bytes(b"")
    holder = LockHolder(receiver.index, "ofd")
    try:
        result = receiver.run("--dry-run", "--lock-timeout", "0.2")
    finally:
        holder.release()
    assert result.returncode == 0
    assert result.stdout.count("\n") == 1
    assert receiver.index.read_bytes() == b""


def test_receiver_append_rows_and_reconciler_serialise(receiver: Receiver) -> None:
    """The exported append_rows, called from another process, waits for the
    same lock the reconciler takes."""
    holder = LockHolder(receiver.index, "flock")
    code = (
        "import sys; from pathlib import Path; from cis490_reconcile.index import append_rows;"
        "append_rows(Path(sys.argv[1]), [{'host_id': 'h', 'episode_id': 'r'}], timeout=20)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(receiver.index)])
    time.sleep(1.0)
    assert proc.poll() is None
    holder.release()
    assert proc.wait(timeout=20) == 0
    assert receiver.keys() == [("h", "r")]


def _contender_gets(path: Path, mode: str) -> bool:
    """Can another process take a `mode` lock on path right now?"""
    code = (
        "import fcntl, os, struct, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    if sys.argv[2] == 'flock': fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "    else: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except OSError: sys.exit(1)\n"
    )
    return subprocess.run([sys.executable, "-c", code, str(path), mode]).returncode == 0


def test_closing_another_fd_of_the_file_keeps_the_lock(tmp_path: Path) -> None:
    """A classic POSIX lock would be gone after the close() below."""
    path = tmp_path / "index.jsonl"
    path.write_bytes(b"")
    with lock.hold(path, os.O_RDWR | os.O_APPEND, timeout=5):
        os.close(os.open(path, os.O_RDONLY))
        assert not _contender_gets(path, "lockf")
        assert not _contender_gets(path, "flock")
    assert _contender_gets(path, "lockf")
    assert _contender_gets(path, "flock")


def test_lock_file_replaced_while_locking_is_locked_again(tmp_path: Path, monkeypatch) -> None:
    """Race 5 in lock.py: the path is renamed over between our open and our
    lock; we must end up holding the file that is at the path now."""
    path = tmp_path / "index.jsonl"
    path.write_bytes(b"old")
    real = lock._try_both
    replaced = []

    def rename_first(fd: int) -> bool:
        if not replaced:
            (tmp_path / "new").write_bytes(b"new")
            os.rename(tmp_path / "new", path)
            replaced.append(True)
        return real(fd)

    monkeypatch.setattr(lock, "_try_both", rename_first)
    with lock.hold(path, os.O_RDWR | os.O_APPEND, timeout=5) as fd:
        assert os.fstat(fd).st_ino == path.stat().st_ino
        assert os.pread(fd, 3, 0) == b"new"

"""The store changes between the listing and the read: a host directory
removed, a tarball deleted, replaced, or growing. No crash, and no row whose
sha256 or size is not the file's."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import Receiver

from cis490_reconcile import config, index, passdata, rowcheck, store, verify
from cis490_reconcile.log import make_logger
from cis490_reconcile.passrun import PassRun
from cis490_reconcile.reconcile import PassFailed, Reconciler
from cis490_reconcile.store import Tarball
from cis490_reconcile.verdicts import Verdict


def one_pass(receiver: Receiver) -> passdata.PassSummary:
    cfg = config.build(
        {
            "episodes_root": receiver.episodes,
            "index": receiver.index,
            "min_age": 0,
            "workers": 1,
            "state_dir": "",
        }
    )
    with Reconciler(cfg, make_logger("error", io.StringIO())) as reconciler:
        return reconciler.run_pass()


def rows_match_files(receiver: Receiver) -> None:
    for row in receiver.rows():
        data = (receiver.episodes / row["host_id"] / f"{row['episode_id']}.tar.zst").read_bytes()
        assert (row["sha256"], row["size_bytes"]) == (hashlib.sha256(data).hexdigest(), len(data)), row


def test_store_changes_after_the_listing(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a", "b", "c", "d", "e"):
        receiver.tarball("h1", name)
    receiver.tarball("h2", "x")
    replacement = receiver.tarball("h9", "c").read_bytes()
    shutil.rmtree(receiver.episodes / "h9")
    real_verify = verify.verify
    h1 = receiver.episodes / "h1"

    def replace_c() -> None:
        (h1 / "c.new").write_bytes(replacement)
        os.rename(h1 / "c.new", h1 / "c.tar.zst")

    def grow_d() -> None:
        with open(h1 / "d.tar.zst", "ab") as f:
            f.write(b"more")

    def rewrite_e_keeping_its_mtime() -> None:  # as rsync --inplace -t does: only its ctime moves
        path = h1 / "e.tar.zst"
        before = path.stat()
        with open(path, "r+b") as f:
            f.seek(before.st_size - 100)
            f.write(os.urandom(100))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    # what happens after the pass stat'ed each file and before it reads it
    meddle = {
        "e": rewrite_e_keeping_its_mtime,  # same size, same mtime, other bytes
        "b": (h1 / "b.tar.zst").unlink,  # deleted
        "c": replace_c,  # replaced by another tarball
        "d": grow_d,  # still growing
        "x": lambda: shutil.rmtree(receiver.episodes / "h2"),  # its host directory removed
    }

    def meddle_then_verify(host, tarball, *args):  # type: ignore[no-untyped-def]
        meddle.pop(tarball.episode_id, lambda: None)()
        return real_verify(host, tarball, *args)

    monkeypatch.setattr(verify, "verify", meddle_then_verify)
    summary = one_pass(receiver)
    assert meddle == {}
    assert (summary.backfilled, summary.unsettled, summary.corrupt) == (1, 5, 0)  # only a was still as seen
    rows_match_files(receiver)

    monkeypatch.setattr(verify, "verify", real_verify)
    again = one_pass(receiver)
    assert (again.backfilled, again.corrupt) == (1, 2)  # the new c; d has bytes after its frame, e a bad end
    rows_match_files(receiver)
    assert sorted(receiver.keys()) == [("h1", "a"), ("h1", "c")]


def test_a_tarball_replaced_by_a_symlink_after_the_listing_is_unsettled(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver (or anyone) swaps a scanned tarball for a symlink before
    the read: the O_NOFOLLOW open fails with ELOOP. That was `unreadable`
    (a warning, and a metric that pages an operator); it is a file replaced
    while we looked, as one removed is. The next pass's listing sees the
    symlink and skips it, as ever, and opens nothing through it."""
    receiver.tarball("h1", "a")
    target = receiver.tarball("h1", "b")
    link = receiver.tarball("h1", "s")
    real_verify = verify.verify

    def swap_then_verify(host, tarball, *args):  # type: ignore[no-untyped-def]
        if tarball.episode_id == "s":
            link.unlink()
            link.symlink_to(target.name)  # a real tarball behind it: never read through the link
        return real_verify(host, tarball, *args)

    monkeypatch.setattr(verify, "verify", swap_then_verify)
    summary = one_pass(receiver)
    assert (summary.backfilled, summary.unsettled, summary.unreadable) == (2, 1, 0)
    monkeypatch.setattr(verify, "verify", real_verify)
    again = one_pass(receiver)
    assert (again.backfilled, again.unsettled, again.unreadable, again.skipped) == (0, 0, 0, 1)
    assert sorted(receiver.keys()) == [("h1", "a"), ("h1", "b")]


def test_scrub_finds_a_tarball_replaced_by_a_symlink_before_its_read_unsettled(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scrub's lstat then open of a row's tarball, the file swapped for a
    symlink between the two: unsettled, as for a pass (it was unreadable)."""
    path = receiver.tarball("h1", "a")
    data = path.read_bytes()
    claim = rowcheck.Checkable("h1", "a", hashlib.sha256(data).hexdigest(), len(data), None)
    real_lstat = store.HostDir.lstat

    def lstat_then_swap(self, name):  # type: ignore[no-untyped-def]
        found = real_lstat(self, name)
        path.rename(path.with_name("elsewhere"))
        path.symlink_to("elsewhere")
        return found

    monkeypatch.setattr(store.HostDir, "lstat", lstat_then_swap)
    with store.Store(receiver.episodes) as episodes:
        found = rowcheck.check(episodes, claim, None, lambda n: None)
    assert found.result == "unsettled", found


def lock_busy_once(monkeypatch: pytest.MonkeyPatch) -> Callable[[], bool]:
    """The first commit finds the index lock busy, and a stop comes
    meanwhile; the lock is free after that. Returns the stop flag."""
    stop = False
    locked = index.locked

    @contextlib.contextmanager
    def busy_once(
        path: Path, lock_file: Path | None, timeout: float, on_wait: Callable[[], None]
    ) -> Iterator[index.LockedIndex]:
        nonlocal stop
        if not stop:
            stop = True
            on_wait()
        with locked(path, lock_file, timeout, on_wait) as ix:
            yield ix

    monkeypatch.setattr(index, "locked", busy_once)
    return lambda: stop


def test_a_stop_while_the_lock_is_busy_still_commits_if_it_is_free_then(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop asked while a commit waits for the index lock: the pass then
    tries the lock once more, without waiting, and commits what it verified
    if it is free. Those rows used to be dropped before that try."""
    receiver.tarball("h1", "a")
    summary = stopped_pass(receiver, lock_busy_once(monkeypatch), workers=1)
    assert summary.interrupted and summary.backfilled == 1
    assert receiver.keys() == [("h1", "a")]


def test_a_worker_death_is_said_even_if_a_stop_comes_while_its_rows_wait_for_the_lock(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker dies; the rows verified before it wait for the lock, and a
    stop comes meanwhile. The pass fails for the death (it used to end as
    merely interrupted, exit 0), and still commits the rows at the last try."""
    receiver.tarball("h1", "a")
    receiver.tarball("h1", "b")
    real_verify_many = verify.verify_many

    def dies_after_one(*args):  # type: ignore[no-untyped-def]
        yield next(iter(real_verify_many(*args)))
        raise passdata.WorkerDied("a verifying worker died")

    monkeypatch.setattr(verify, "verify_many", dies_after_one)
    with pytest.raises(PassFailed, match="worker died") as failed:
        stopped_pass(receiver, lock_busy_once(monkeypatch), workers=1)
    assert failed.value.summary.interrupted and failed.value.summary.backfilled == 1
    assert len(receiver.keys()) == 1


def stopped_pass(
    receiver: Receiver, should_stop: Callable[[], bool], **settings: object
) -> passdata.PassSummary:
    cfg = config.build(
        {"episodes_root": receiver.episodes, "index": receiver.index, "min_age": 0, "workers": 2, **settings}
    )
    with Reconciler(cfg, make_logger("error", io.StringIO()), should_stop=should_stop) as reconciler:
        return reconciler.run_pass()


def test_a_stop_keeps_the_verdicts_the_workers_already_sent(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop that comes as the first verdict of a batch is recorded: the
    rest of the batch is back from the worker too, and is recorded and
    committed, not read again next pass (they used to be dropped)."""
    for i in range(20):
        receiver.tarball("h1", f"e{i:02}")
    cut = receiver.tarball("h1", "e07")
    cut.write_bytes(cut.read_bytes()[:-100])
    stop = False
    record = PassRun.record

    def record_then_stop(self: PassRun, tarball: Tarball, verdict: Verdict) -> None:
        nonlocal stop
        record(self, tarball, verdict)
        stop = True

    monkeypatch.setattr(PassRun, "record", record_then_stop)
    summary = stopped_pass(receiver, lambda: stop)
    assert summary.interrupted and (summary.backfilled, summary.corrupt) == (19, 1)
    rows_match_files(receiver)
    assert len(receiver.keys()) == len(set(receiver.keys())) == 19


def test_a_stop_keeps_what_a_worker_verified_of_its_batch(receiver: Receiver) -> None:
    """A stop while a worker is inside its batch: the worker returns the
    verdicts it has, and the pass commits them. The next pass reads only the
    rest; no row is written twice."""
    for i in range(12):
        receiver.tarball("h1", f"e{i:02}", {"meta.json": b"{}", "data": os.urandom(256 << 10)})
    started = time.monotonic()  # 12 files in one batch, at 512 KiB/s: 2 a second, 6 s in all
    summary = stopped_pass(receiver, lambda: time.monotonic() - started > 1.6, max_read_rate="1M")
    assert summary.interrupted and 1 <= summary.backfilled < 12  # used to be 0: the batch was dropped
    first = summary.backfilled
    rows_match_files(receiver)
    assert stopped_pass(receiver, lambda: False).backfilled == 12 - first
    assert sorted(receiver.keys()) == [("h1", f"e{i:02}") for i in range(12)]

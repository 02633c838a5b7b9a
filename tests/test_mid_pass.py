"""The store changes between the listing and the read: a host directory
removed, a tarball deleted, replaced, or growing. No crash, and no row whose
sha256 or size is not the file's."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import Receiver

from cis490_reconcile import config, index, passdata, verify
from cis490_reconcile.log import make_logger
from cis490_reconcile.reconcile import Reconciler


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


def test_a_stop_while_the_lock_is_busy_still_commits_if_it_is_free_then(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop asked while a commit waits for the index lock: the pass then
    tries the lock once more, without waiting, and commits what it verified
    if it is free. Those rows used to be dropped before that try."""
    receiver.tarball("h1", "a")
    stop = False
    locked = index.locked

    @contextlib.contextmanager
    def busy_once(
        path: Path, lock_file: Path | None, timeout: float, on_wait: Callable[[], None]
    ) -> Iterator[index.LockedIndex]:
        nonlocal stop
        if not stop:  # the first commit finds the lock busy, and a stop comes meanwhile
            stop = True
            on_wait()
        with locked(path, lock_file, timeout, on_wait) as ix:
            yield ix

    monkeypatch.setattr(index, "locked", busy_once)
    cfg = config.build(
        {"episodes_root": receiver.episodes, "index": receiver.index, "min_age": 0, "workers": 1}
    )
    with Reconciler(cfg, make_logger("error", io.StringIO()), should_stop=lambda: stop) as reconciler:
        summary = reconciler.run_pass()
    assert summary.interrupted and summary.backfilled == 1
    assert receiver.keys() == [("h1", "a")]

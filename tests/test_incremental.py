"""Incremental passes: what the state database lets a pass skip, and proof
that it never changes the outcome, whatever happens to the store, the index or
the process in between."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    Receiver,
    parse_events,
    permissions_apply,
    recounted,
    state_contents,
    tmpfs,
    unsearchable,
    zero_page,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cis490_reconcile import config, coverage, rebuild, scan, state
from cis490_reconcile.commit import Committer
from cis490_reconcile.index import encode_row
from cis490_reconcile.indexkeys import CatchUp
from cis490_reconcile.log import make_logger
from cis490_reconcile.passdata import PassSummary
from cis490_reconcile.reconcile import PassFailed, Reconciler
from cis490_reconcile.state import State, connection
from cis490_reconcile.store import HostDir


class Run:
    """In-process passes with a captured log, as a fresh process would run them."""

    def __init__(self, receiver: Receiver, state_dir: Path | None, **settings_: object) -> None:
        values = {"episodes_root": receiver.episodes, "index": receiver.index, "min_age": 0, "workers": 1}
        self.cfg = config.build({**values, "state_dir": state_dir or "", **settings_})
        self.log = io.StringIO()
        self.reconciler = Reconciler(self.cfg, make_logger("debug", self.log), rows_out=io.StringIO())

    def once(self) -> PassSummary:
        return self.reconciler.run_pass()

    def close(self) -> None:
        self.reconciler.close()

    def events(self, name: str) -> list[dict]:
        return [e for e in parse_events(self.log.getvalue()) if e["event"] == name]


@pytest.fixture
def no_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remember directories however recently they changed. Only safe when a
    scheduler tick passes between a listing and the next change (ext4 stamps
    times with a clock that ticks every few ms): tests using this sleep."""
    monkeypatch.setattr(scan, "GUARD_NS", 0)


def tick() -> None:
    time.sleep(0.02)


def test_a_second_process_skips_unchanged_directories(receiver: Receiver, tmp_path: Path) -> None:
    """End to end, with the real guard: directories older than it are not listed again."""
    for host in ("h1", "h2", "h3"):
        for i in range(5):
            receiver.tarball(host, f"e{i}")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    time.sleep(scan.GUARD_NS / 1e9 + 0.2)
    first = receiver.run("--state-dir", str(state_dir)).one("pass_finished")
    assert (first["full"], first["hosts_listed"], first["backfilled"]) == (True, 3, 15)
    assert (state_dir / state.FILE_NAME).stat().st_size > 15 * 16

    second = receiver.run("--state-dir", str(state_dir)).one("pass_finished")
    assert (second["full"], second["hosts_listed"], second["hosts_unchanged"]) == (False, 0, 3)
    assert (second["scanned"], second["backfilled"]) == (0, 0)

    receiver.tarball("h2", "new")  # h2 changes; its row is missing
    third = receiver.run("--state-dir", str(state_dir)).one("pass_finished")
    assert (third["hosts_listed"], third["hosts_unchanged"], third["backfilled"]) == (1, 2, 1)
    assert ("h2", "new") in set(receiver.keys())

    forced = receiver.run("--state-dir", str(state_dir), "--full").one("pass_finished")
    assert (forced["full"], forced["hosts_listed"], forced["scanned"], forced["backfilled"]) == (
        True,
        3,
        16,
        0,
    )


def test_a_pass_with_nothing_new_to_read_leaves_the_row_parser_unloaded(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A quiet pass is mostly start-up, and msgspec's import was a fifth of
    it: rows.py is loaded only once there are index lines to decode."""
    receiver.tarball("h1", "e0")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    assert receiver.run("--state-dir", str(state_dir)).one("pass_finished")["backfilled"] == 1

    def imported() -> set[str]:
        argv = receiver.argv("--once", "--state-dir", str(state_dir))
        proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}

    quiet = imported()
    assert "cis490_reconcile.reconcile" in quiet  # what is imported is seen
    assert {"cis490_reconcile.rows", "msgspec"}.isdisjoint(quiet)
    receiver.tarball("h1", "e1")
    receiver.append_row(receiver.receiver_row("h1", "e1"))  # the receiver indexed one: a line to read
    assert "cis490_reconcile.rows" in imported()


def test_the_guard_lists_a_directory_that_changed_within_its_timestamp_tick(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a filesystem with 1 s timestamps a file added right after a listing
    leaves the directory's mtime unchanged. Simulate one: the pass sees
    timestamps rounded down to the second."""
    real_stat = HostDir.stat

    def coarse(self: HostDir) -> os.stat_result:
        st = real_stat(self)
        fields = list(st)
        seconds = int(st.st_mtime)
        fields[8] = fields[9] = seconds  # st_mtime, st_ctime (int views)
        return os.stat_result(
            (*fields[:10],), {"st_mtime_ns": seconds * 10**9, "st_ctime_ns": seconds * 10**9}
        )

    monkeypatch.setattr(HostDir, "stat", coarse)
    receiver.tarball("h1", "a")
    run = Run(receiver, tmp_path)
    run.once()
    receiver.tarball("h1", "b")  # same second, most likely; at worst a new mtime
    assert run.once().backfilled == 1
    assert sorted(receiver.keys()) == [("h1", "a"), ("h1", "b")]


def test_a_file_left_in_flight_is_revisited(receiver: Receiver, tmp_path: Path, no_guard: None) -> None:
    receiver.tarball("h1", "a")
    receiver.tarball("h1", "young")
    first = Run(receiver, tmp_path, min_age=3600).once()
    assert (first.in_flight, first.backfilled) == (2, 0)
    tick()
    second = Run(receiver, tmp_path, min_age=0).once()  # time passes: both settle
    assert (second.hosts_unchanged, second.hosts_listed, second.backfilled) == (1, 0, 2)


def test_a_pass_with_nothing_to_append_makes_no_index(receiver: Receiver, tmp_path: Path) -> None:
    """Before the receiver's first row, a pass with nothing to append made
    an empty index.jsonl of its own (ours, mode 0640 under the unit's
    UMask), which a receiver running as another user then could not append
    to. Now it leaves the index to the receiver, and still remembers it read
    none: the next pass lists nothing unchanged, and the receiver's new
    file is read on as appended rows, not as an index replaced."""
    receiver.tarball("h1", "young")
    time.sleep(scan.GUARD_NS / 1e9)  # the pass in another process: listed long enough after it changed
    state = ("--state-dir", str(tmp_path))
    first = receiver.run(*state, "--min-age", "3600")
    assert first.one("pass_finished")["in_flight"] == 1, first.stdout
    assert not receiver.index.exists()
    second = receiver.run(*state, "--min-age", "3600")
    assert (second.one("pass_finished")["full"], second.one("pass_finished")["hosts_unchanged"]) == (False, 1)
    assert not receiver.index.exists()
    receiver.append_row(receiver.receiver_row("h1", "young"))  # the receiver makes its index
    third = receiver.run(*state, "--min-age", "0")
    assert "index_restarted" not in third.stdout
    assert (third.one("pass_finished")["backfilled"], third.one("pass_finished")["hosts_unchanged"]) == (0, 1)
    assert receiver.keys() == [("h1", "young")]


def test_a_file_left_in_flight_then_indexed_by_the_receiver_is_not_read_again(
    receiver: Receiver, tmp_path: Path, no_guard: None
) -> None:
    """A tarball in flight at the listing is left unresolved; the receiver
    then appends its row (written in place, or its row late). The next pass,
    in a directory that has not changed since, used to verify it anyway,
    read it whole and log `row_already_present` as if the row had raced it."""
    receiver.tarball("h1", "young")
    assert Run(receiver, tmp_path, min_age=3600).once().in_flight == 1
    receiver.append_row(receiver.receiver_row("h1", "young"))
    tick()
    run = Run(receiver, tmp_path, min_age=0)
    second = run.once()
    assert (second.hosts_unchanged, second.hosts_listed) == (1, 0)
    assert (second.bytes_read, second.raced, second.already_indexed) == (0, 0, 1), second
    assert run.events("row_already_present") == []
    with contextlib.closing(sqlite3.connect(tmp_path / state.FILE_NAME)) as db:
        assert db.execute("SELECT * FROM unresolved").fetchall() == []  # nor by any later pass
    assert receiver.keys() == [("h1", "young")]


def test_a_new_process_resumes_the_index_where_the_last_stopped(
    receiver: Receiver, tmp_path: Path, no_guard: None
) -> None:
    receiver.tarball("h1", "a")
    Run(receiver, tmp_path).once()
    for i in range(3):  # the receiver appends rows meanwhile
        receiver.append_row({"host_id": "h9", "episode_id": f"r{i}"})
    receiver.append_raw(b"garbage\n")
    tick()
    run = Run(receiver, tmp_path)
    summary = run.once()
    assert not summary.full and summary.hosts_unchanged == 1
    assert [e["line"] for e in run.events("index_bad_line")] == [5]  # only the new bytes were parsed
    assert summary.bad_index_lines == 1


def test_an_index_gone_since_the_last_pass_is_an_empty_one(
    receiver: Receiver, tmp_path: Path, no_guard: None
) -> None:
    """The index moved away (rotated, restored elsewhere) has no rows, as
    `check` says: the next pass used the keys the state had read from it,
    called both tarballs already indexed and backfilled them a pass late."""
    receiver.tarball("h1", "a")
    receiver.tarball("h1", "b")
    Run(receiver, tmp_path).once()
    receiver.index.rename(receiver.index.with_name("index.jsonl.1"))
    tick()
    run = Run(receiver, tmp_path)
    summary = run.once()
    assert (summary.already_indexed, summary.backfilled) == (0, 2), summary
    assert run.events("index_restarted")
    assert sorted(receiver.keys()) == [("h1", "a"), ("h1", "b")]
    tick()
    again = Run(receiver, tmp_path)
    assert (again.once().backfilled, again.events("index_restarted")) == (0, [])


@pytest.mark.parametrize("how", ["replaced", "truncated", "rewritten"])
def test_a_changed_index_forces_a_full_parse(
    receiver: Receiver, tmp_path: Path, no_guard: None, how: str
) -> None:
    for name in ("a", "b", "c"):
        receiver.tarball("h1", name)
    Run(receiver, tmp_path).once()
    rows = receiver.index.read_bytes().splitlines(keepends=True)
    assert len(rows) == 3
    if how == "replaced":  # a new file at the path, without the last row
        new = receiver.index.with_name("index.new")
        new.write_bytes(b"".join(rows[:2]))
        os.replace(new, receiver.index)
    elif how == "truncated":
        os.truncate(receiver.index, len(rows[0]) + len(rows[1]))
    else:  # same inode, same length, different rows: someone edited it in place
        edited = rows[2].replace(b'"episode_id": "c"', b'"episode_id": "x"')
        with open(receiver.index, "r+b") as f:
            f.seek(len(rows[0]) + len(rows[1]))
            f.write(edited)
    tick()
    run = Run(receiver, tmp_path)
    summary = run.once()
    assert summary.backfilled == 1, "the missing row was not found again"
    assert sorted(k for k in set(receiver.keys()) if k[1] != "x") == [("h1", "a"), ("h1", "b"), ("h1", "c")]
    assert run.events("state_ignored") or run.events("index_restarted")


def test_an_index_replaced_while_a_commit_waits_is_read_whole_without_the_lock(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver's lock is held only for a read on from the checkpoint:
    an index replaced between a commit's catch-up and its lock (a restore,
    say) is read whole after the lock is let go, never while it is held;
    and that read is no wait for the lock (the alert on lock waits would
    send an operator looking for a holder that never was)."""
    receiver.tarball("h1", "old")
    receiver.append_row(receiver.receiver_row("h1", "old"))
    Run(receiver, tmp_path).once()
    receiver.tarball("h1", "new")
    catch_up = Committer.catch_up
    calls = []

    def then_replaced(self: Committer, *args: object, **kwargs: object) -> None:
        catch_up(self, *args, **kwargs)  # type: ignore[arg-type]
        calls.append(True)
        if len(calls) == 2:  # the pass's, then the commit's: now a new file at the path, one row more
            new = receiver.index.with_name("index.new")
            new.write_bytes(receiver.index.read_bytes() + encode_row({"host_id": "h2", "episode_id": "x"}))
            os.replace(new, receiver.index)

    read_whole = []

    def rebuild_unlocked(*args: object, **kwargs: object) -> CatchUp:
        fd = os.open(receiver.index, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if a commit held it
        finally:
            os.close(fd)
        read_whole.append(True)
        time.sleep(0.5)  # a long index
        return rebuild.rebuild(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Committer, "catch_up", then_replaced)
    monkeypatch.setattr(coverage, "rebuild", rebuild_unlocked)
    run = Run(receiver, tmp_path)
    summary = run.once()
    assert summary.backfilled == 1
    assert read_whole == [True]  # the replaced index, read whole once
    assert summary.lock_wait_s < 0.25, summary  # nobody held the lock
    assert run.events("index_restarted")
    assert receiver.keys() == [("h1", "old"), ("h2", "x"), ("h1", "new")]


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    path.write_bytes(b"nonsense" * 1000)


def _header_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[18] ^= 0xFF  # the header's file format write version
    path.write_bytes(bytes(data))


def _newer_schema(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")


def _other_store(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE store SET episodes_root = '/somewhere/else'")


def _page_zeroed(table: str) -> Callable[[Path], None]:
    """A page of our file gone to zeros (a bad sector, a torn copy): the
    one that holds a small table, found only when the pass reads it."""
    return functools.partial(zero_page, table=table)


def _table_dropped(table: str) -> Callable[[Path], None]:
    """Our file, short of a table its schema version promises (a hand edit,
    a partial copy): at open (store) or mid-pass (keys)."""

    def drop(path: Path) -> None:
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute(f"DROP TABLE {table}")

    return drop


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        _garbage,
        _header_flip,
        _newer_schema,
        _other_store,
        _table_dropped("store"),
        _table_dropped("keys"),
        _page_zeroed("checkpoint"),
        _page_zeroed("records"),
    ],
    ids=[
        "truncated",
        "garbage",
        "header",
        "newer-schema",
        "another-store",
        "no-store-table",
        "no-keys-table",
        "checkpoint-page-zeroed",
        "records-page-zeroed",
    ],
)
def test_a_bad_state_database_is_rebuilt_with_a_warning(
    receiver: Receiver, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    for i in range(300):  # enough rows for a database of several pages
        receiver.tarball("h1", f"a{i}", blob=b"x")
        receiver.append_row({"host_id": "h1", "episode_id": f"a{i}"})
    receiver.tarball("h1", "a")
    first = Run(receiver, tmp_path)
    first.once()
    first.close()
    path = tmp_path / state.FILE_NAME
    damage(path)
    receiver.tarball("h1", "b")
    run = Run(receiver, tmp_path)
    summary = run.once()
    assert run.events("state_rebuilt"), run.log.getvalue()
    assert summary.full and summary.backfilled == 1
    indexed = receiver.keys()
    assert sorted(k for k in indexed if not k[1].startswith("a")) == [("h1", "b")]
    with contextlib.closing(State.open(path, str(receiver.episodes), str(receiver.index))) as rebuilt:
        assert rebuilt.keys.checkpoint().lines == 302  # type: ignore[union-attr]


def test_a_busy_state_database_is_kept_not_rebuilt(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest stuck inside a write transaction (a stopped scrub, say) makes
    the owner's open wait out the busy timeout: that pass fails in one line,
    and the file, which is not damaged, is kept for the next."""
    receiver.tarball("h1", "a")
    first = Run(receiver, tmp_path)
    first.once()
    first.close()
    kept = state_contents(tmp_path)
    monkeypatch.setattr(connection, "connect", functools.partial(connection.connect, busy_timeout_s=0.2))
    stuck = sqlite3.connect(tmp_path / state.FILE_NAME, isolation_level=None)
    try:
        stuck.execute("BEGIN IMMEDIATE")
        receiver.tarball("h1", "b")
        run = Run(receiver, tmp_path)
        with pytest.raises(PassFailed, match=r"^state database: database is locked$"):
            run.once()
        assert run.events("state_rebuilt") == []
    finally:
        stuck.close()
    assert state_contents(tmp_path) == kept
    assert Run(receiver, tmp_path).once().backfilled == 1  # the next pass goes on from it


def test_a_state_directory_this_user_cannot_reach_is_said_and_the_pass_still_works(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A state directory under one this user may not search is unusable
    like a read-only one. It used to end the pass in an internal_error
    (Path.is_dir raises PermissionError there)."""
    receiver.tarball("h1", "a")
    with unsearchable(tmp_path, "state") as state:
        argv = permissions_apply(receiver.argv("--once", "--state-dir", str(state)))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = parse_events(proc.stdout)
    assert [e["reason"] for e in events if e["event"] == "state_dir_unusable"] == ["Permission denied"]
    assert receiver.keys() == [("h1", "a")]


def test_deleted_state_files_are_rebuilt_and_a_missing_directory_is_said(
    receiver: Receiver, tmp_path: Path
) -> None:
    """README: delete the state files at any time, the next pass rebuilds
    them; a missing directory (the units make it as they start) is said,
    and that pass keeps its state in a temporary database."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    receiver.tarball("h1", "a")
    assert receiver.run("--state-dir", str(state_dir)).returncode == 0
    for path in state_dir.iterdir():
        path.unlink()
    receiver.tarball("h1", "b")
    rebuilt = receiver.run("--state-dir", str(state_dir))
    assert rebuilt.one("pass_finished")["backfilled"] == 1 and (state_dir / "state.sqlite3").exists()
    for path in state_dir.iterdir():
        path.unlink()
    state_dir.rmdir()
    receiver.tarball("h1", "c")
    missing = receiver.run("--state-dir", str(state_dir))
    assert missing.one("state_dir_unusable")["reason"] == "no such directory"
    assert missing.one("pass_finished")["backfilled"] == 1 and not state_dir.exists()
    assert receiver.keys() == [("h1", "a"), ("h1", "b"), ("h1", "c")]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_read_only_state_directory_is_said_and_the_pass_still_works(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A real read-only filesystem under the state directory: the pass says
    so, keeps its state in a temporary database, and still backfills."""
    receiver.tarball("h1", "a")
    with tmpfs(tmp_path / "state", "1M") as state_dir:
        subprocess.run(["mount", "-o", "remount,ro", str(state_dir)], check=True)
        result = receiver.run("--state-dir", str(state_dir))
    assert result.returncode == 0
    assert result.one("state_dir_unusable")["reason"] == "not writable by this user"
    assert receiver.keys() == [("h1", "a")]


def test_another_pass_holding_the_state_waits_then_fails_in_one_line(
    receiver: Receiver, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    receiver.tarball("h1", "a")
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        result = receiver.run("--state-dir", str(state_dir), "--lock-timeout", "0.5")
        waited = time.monotonic() - started
    finally:
        os.close(fd)
    assert result.returncode == 1 and waited >= 0.5
    failed = result.one("pass_failed")
    assert failed["error"] == f"another pass holds the state directory {state_dir} (waited 0.5 s)"
    assert not receiver.index.exists()
    assert receiver.run("--state-dir", str(state_dir)).returncode == 0  # released: it runs


def test_old_state_files_are_removed_after_the_first_good_pass(receiver: Receiver, tmp_path: Path) -> None:
    for name in ("state.bin", "last_pass.json"):
        (tmp_path / name).write_bytes(b"from an earlier version")
    receiver.tarball("h1", "a")
    run = Run(receiver, tmp_path)
    run.once()
    assert not (tmp_path / "state.bin").exists() and not (tmp_path / "last_pass.json").exists()
    assert len(run.events("state_file_removed")) == 2


def test_without_a_state_dir_a_loop_keeps_a_temporary_database(receiver: Receiver, no_guard: None) -> None:
    receiver.tarball("h1", "a")
    run = Run(receiver, None)  # no state directory: a temporary database, for as long as the process
    run.once()
    temp = run.reconciler._temp
    assert temp is not None and temp.path.exists()
    tick()
    again = run.once()
    assert (again.full, again.hosts_unchanged, again.scanned) == (False, 1, 0)
    run.close()
    assert not temp.dir.exists()


# --- the property: whatever happened, the same rows and the same database as a full pass ------------

HOSTS = ["h0", "h1", "h2"]
CRASH_POINTS = ("index_written", "appended", "in_transaction", "rebuilding")
step = st.one_of(
    st.tuples(st.just("tarball"), st.sampled_from(HOSTS), st.integers(0, 5)),
    st.tuples(st.just("receiver_row"), st.sampled_from(HOSTS), st.integers(0, 5)),
    st.tuples(st.just("corrupt"), st.sampled_from(HOSTS), st.integers(0, 5)),
    st.tuples(st.just("remove"), st.sampled_from(HOSTS), st.integers(0, 5)),
    st.tuples(st.just("torn"), st.sampled_from(HOSTS), st.integers(0, 5)),
    st.tuples(st.just("replace_index"), st.just(""), st.just(0)),
    st.tuples(st.just("pass"), st.sampled_from(["same process", "new process", "full"]), st.just(0)),
    st.tuples(st.just("crash"), st.sampled_from(CRASH_POINTS), st.just(0)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(step, max_size=14))
def test_any_history_ends_as_one_full_pass_from_scratch(
    tmp_path_factory: pytest.TempPathFactory, history: list[tuple[str, str, int]]
) -> None:
    """Play a random store history against two twins: one reconciled by
    incremental passes (state on disk, sometimes a new process, sometimes a
    pass killed with SIGKILL at a named step), one by full passes without
    state. After a last pass both indexes hold the same rows, and the state
    database holds exactly what one full pass from scratch puts there."""
    saved, scan.GUARD_NS = scan.GUARD_NS, 0
    root = tmp_path_factory.mktemp("history")
    (root / "inc").mkdir()
    (root / "full").mkdir()
    inc, full = Receiver(root / "inc"), Receiver(root / "full")
    state_dir = root / "state"
    state_dir.mkdir()
    keep = Run(inc, state_dir)

    def full_pass() -> None:
        with Reconciler(Run(full, None).cfg, make_logger("error", io.StringIO())) as r:
            r.run_pass()

    try:
        for what, arg, n in history:
            if what == "pass":
                if arg != "same process":
                    keep.close()
                    keep = Run(inc, state_dir, **({"full_every": 1e-9} if arg == "full" else {}))
                keep.once()
                full_pass()
            elif what == "crash":
                env = {**os.environ, "CIS490_TEST_CRASH_AT": arg}
                argv = inc.argv("--once", "--state-dir", str(state_dir), "--workers", "1", "--full")
                before = inc.index.read_bytes() if inc.index.exists() else b""
                done = subprocess.run(argv, env=env, capture_output=True, timeout=60)
                after = inc.index.read_bytes() if inc.index.exists() else b""
                if done.returncode == 0 or after != before:
                    full_pass()  # it never reached the crash point, or appended its rows before it
            else:
                for r in (inc, full):
                    _apply(r, what, arg, n)
            tick()
        keep.close()
        last = Run(inc, state_dir)
        last.once()
        last.close()
        fresh = Run(full, None)
        fresh.reconciler.force_full = True
        fresh.once()
        fresh.close()
        assert _rows(inc) == _rows(full)
        assert sorted(set(_rows(inc))) == _rows(inc), "a duplicate row"
        assert state_contents(state_dir) == state_contents(recounted(inc, root / "scratch"))
    finally:
        keep.close()
        scan.GUARD_NS = saved


def _apply(r: Receiver, what: str, host: str, n: int) -> None:
    """One event of a store's life. The receiver appends a row for a tarball
    that has none (a late row; the in-flight guard is not what is tested)."""
    episode_id = f"e{n}"
    path = r.episodes / host / f"{episode_id}.tar.zst"
    if what == "tarball" and not path.exists():
        r.tarball(host, episode_id, {"meta.json": b"{}", "data": episode_id.encode() * 10})
    elif what == "corrupt" and not path.exists():
        r.tarball(host, episode_id, blob=b"\x28\xb5\x2f\xfd" + b"\x00" * 7)
    elif what == "remove" and path.exists():
        path.unlink()
    elif what == "receiver_row" and path.exists() and (host, episode_id) not in _rows(r):
        row = {"host_id": host, "episode_id": episode_id, "size_bytes": path.stat().st_size}
        r.append_row(row)
    elif what == "torn" and path.exists() and (host, episode_id) not in _rows(r):  # a row without its "\n"
        r.append_raw(json.dumps({"host_id": host, "episode_id": episode_id}, sort_keys=True).encode())
    elif what == "replace_index" and r.index.exists():  # same bytes, another inode
        r.replace_index()


def _rows(r: Receiver) -> list[tuple[str, str]]:
    if not r.index.exists():
        return []
    keys = []
    for line in r.index.read_bytes().splitlines():
        with contextlib.suppress(ValueError):  # two torn rows glued by the simulated receiver
            row = json.loads(line)
            keys.append((row["host_id"], row["episode_id"]))
    return sorted(keys)


def test_an_index_replaced_mid_pass_does_not_make_every_row_an_orphan(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A commit that finds the index replaced reads it all again, which
    makes the pass full from then on; the hosts it listed before counted no
    orphans, and used to be saved with every row an orphan (a false critical
    alert until the next full pass). Their last full pass's counts stand."""
    for host in ("h1", "h2"):
        for i in range(3):
            receiver.tarball(host, f"e{i}")
            receiver.append_row(receiver.receiver_row(host, f"e{i}"))
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    assert receiver.run("--state-dir", str(state_dir), "--full").returncode == 0
    receiver.tarball("h2", "newer")  # to commit: the commit's catch-up finds the index replaced
    env = {**os.environ, "CIS490_TEST_PAUSE_AT": "caught_up"}
    prom = tmp_path / "m.prom"
    argv = receiver.argv("--once", "--state-dir", str(state_dir), "--metrics-file", str(prom), min_age=0)
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stderr is not None and "paused at caught_up" in proc.stderr.readline()
    receiver.replace_index()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    events = parse_events(out)
    assert [e["event"] for e in events if e["event"] == "index_restarted"] == ["index_restarted"]
    assert 'cis490_reconcile_orphan_rows{kind="missing"} 0.0' in prom.read_text()
    assert receiver.keys()[-1] == ("h2", "newer")


def test_a_full_pass_saves_no_orphan_counts_of_an_index_replaced_after_its_listing(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A full pass counts each host's orphans as it lists it, against the
    keys of the index it read first. When a commit then finds the index
    replaced (a restore without some rows) and reads it whole, those counts
    are of rows the index no longer has: saved, they said a tarball was
    missing for a row gone from the index (a false critical alert, until the
    next full pass). The last full pass's counts stand instead."""
    for name in ("a", "b", "c"):
        receiver.tarball("h1", name)
        receiver.append_row(receiver.receiver_row("h1", name))
    state_dir, prom = tmp_path / "state", tmp_path / "m.prom"
    state_dir.mkdir()
    metrics = ("--state-dir", str(state_dir), "--metrics-file", str(prom))
    assert receiver.run(*metrics, "--full").returncode == 0
    assert 'cis490_reconcile_orphan_rows{kind="missing"} 0.0' in prom.read_text()
    rows = receiver.index.read_bytes().splitlines(keepends=True)
    (receiver.episodes / "h1" / "c.tar.zst").unlink()  # and the restored index has no row for it
    env = {**os.environ, "CIS490_TEST_PAUSE_AT": "caught_up"}
    argv = receiver.argv("--once", "--full", *metrics, min_age=0)
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stderr is not None and "paused at caught_up" in proc.stderr.readline()
    restored = receiver.index.with_name("index.restored")
    restored.write_bytes(b"".join(rows[:2]))
    os.replace(restored, receiver.index)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert [e["event"] for e in parse_events(out) if e["event"] == "index_restarted"] == ["index_restarted"]
    status = subprocess.run(
        receiver.argv("--json", "--state-dir", str(state_dir), command="status"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(status.stdout)["totals"]["missing_rows"] == 0, status.stdout
    assert 'cis490_reconcile_orphan_rows{kind="missing"} 0.0' in prom.read_text(), prom.read_text()
    assert receiver.keys() == [("h1", "a"), ("h1", "b")]


def test_a_long_statement_reports_progress_and_a_stop_interrupts_it(tmp_path: Path) -> None:
    """connection.reporting: a statement that reads no row for a long time
    (a rebuild's sort) calls on_progress as it goes; a stop raised there
    interrupts it and is what the caller sees, not SQLite's "interrupted"."""
    from cis490_reconcile.runtime import StopRequested

    db = sqlite3.connect(tmp_path / "x.sqlite3", isolation_level=None)
    count = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3e6)"
        " SELECT count(*) FROM n"  # 3M steps of SQLite's, no row of a table read
    )
    calls = 0

    def tick() -> None:
        nonlocal calls
        calls += 1

    with connection.reporting(db, tick):
        assert db.execute(count).fetchone() == (3_000_000,)
    assert calls >= 3, calls  # millions of steps

    def stop() -> None:
        raise StopRequested

    with pytest.raises(StopRequested), connection.reporting(db, stop):
        db.execute(count).fetchone()
    before = calls
    assert db.execute(count).fetchone() == (3_000_000,) and calls == before  # no handler left

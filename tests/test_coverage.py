"""What the index covers, kept in the state database: read on from the
checkpoint, read from the start when the file is not the one read, and
answer "is it indexed?" the same way by lookup and by merge."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sqlite3
import threading
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest
from helpers import scratch_left, state_contents
from hypothesis import given, settings
from hypothesis import strategies as st

from cis490_reconcile import coverage, indexkeys, rebuild
from cis490_reconcile import state as state_module
from cis490_reconcile.coverage import Coverage
from cis490_reconcile.index import encode_row
from cis490_reconcile.rows import Row
from cis490_reconcile.state import State, StateUnusable, connection


def row(host: str | None, episode: str, received: str | None = "2026-11-01T00:00:00+00:00") -> bytes:
    r: dict[str, object] = {"episode_id": episode}
    if received is not None:
        r["received_at_wall"] = received
    if host is not None:
        r["host_id"] = host
    return encode_row(r)


@contextmanager
def opened(tmp_path: Path, index: Path) -> Iterator[Coverage]:
    state = State.open(tmp_path / "state.sqlite3", "/episodes", str(index))
    try:
        yield Coverage(state)
    finally:
        state.close()


def catch_up(cov: Coverage, index: Path, full: bool = False) -> coverage.CatchUp:
    fd = os.open(index, os.O_RDONLY)
    try:
        return cov.catch_up(fd, full)
    finally:
        os.close(fd)


def covers(cov: Coverage, host_id: str, episode_id: str) -> bool:
    return cov.covered([(host_id, episode_id)]) == [True]


def keys_table(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        query = "SELECT h.name, k.digest, k.offset, k.received, k.copies FROM keys k"
        return sorted(db.execute(query + " JOIN hosts h ON h.id = k.host"))


def test_reads_on_from_the_checkpoint_and_remembers_it(tmp_path: Path) -> None:
    index = tmp_path / "index.jsonl"
    index.write_bytes(row("h1", "a") + b"junk\n" + row(None, "old"))
    with opened(tmp_path, index) as cov:
        first = catch_up(cov, index)
        assert (first.rows, [b.line for b in first.bad], first.rebuilt) == (2, [2], True)
        assert covers(cov, "h1", "a") and not covers(cov, "h2", "a")
        assert covers(cov, "anyone", "old")  # a row without host_id covers every host
    with open(index, "ab") as f:
        f.write(row("h2", "b") + row("h1", "a"))
    with opened(tmp_path, index) as cov:  # a new process: the checkpoint is in the file
        again = catch_up(cov, index)
        assert (again.rows, again.bad, again.rebuilt) == (2, [], False)  # only the new lines
        assert covers(cov, "h2", "b")
        assert cov.host_rows("h1", None).duplicates == 1
        cp = cov.state.keys.checkpoint()
        assert cp is not None and (cp.offset, cp.lines, cp.bad_lines) == (index.stat().st_size, 5, 1)


def test_a_reader_reads_on_from_its_own_checkpoint_once_it_has_one(tmp_path: Path) -> None:
    """A view (status, check, a dry run) starts from the state's checkpoint
    and keeps its own after it: a dry run catches up before each commit, and
    must not read the same tail again (counted again, as duplicates)."""
    index = tmp_path / "index.jsonl"
    index.write_bytes(row("h1", "a"))
    with opened(tmp_path, index) as cov:
        catch_up(cov, index)
    with open(index, "ab") as f:
        f.write(row("h1", "b") + row("h1", "c"))
    view = State.open(tmp_path / "view.sqlite3", "/episodes", str(index))
    try:
        view.attach_base(tmp_path / "state.sqlite3")
        view.keys.copy_hosts_from_base()
        cov = Coverage(view)
        assert catch_up(cov, index).rows == 2
        assert catch_up(cov, index).rows == 0
        assert cov.host_rows("h1", None) == (3, 0, 0)
    finally:
        view.close()


def test_covered_answers_a_batch_in_order_across_hosts_and_query_chunks(tmp_path: Path) -> None:
    """A commit asks about its whole batch at once: more keys than one IN
    (...) takes, several hosts, one unknown host, rows without host_id."""
    index = tmp_path / "index.jsonl"
    index.write_bytes(
        b"".join(row("h1", f"e{i}") for i in range(0, 1000, 2)) + row("h2", "e1") + row(None, "e3")
    )
    asked = [(host, f"e{i}") for i in range(1000) for host in ("h1", "h2", "nobody")]
    with opened(tmp_path, index) as cov:
        catch_up(cov, index)
        got = cov.covered(asked)
    want = [
        (host == "h1" and int(e[1:]) % 2 == 0) or (host, e) == ("h2", "e1") or e == "e3" for host, e in asked
    ]
    assert got == want and sum(got) == 500 + 1 + 3


@pytest.mark.parametrize("full", [False, True])
def test_an_index_of_garbage_costs_bounded_memory(tmp_path: Path, full: bool) -> None:
    """100,000 lines that are not rows, read on from a checkpoint and from
    the start: every one counted, the first MAX_BAD_LINES handed back for
    events, the first EXAMPLES kept, and memory independent of their number."""
    index = tmp_path / "index.jsonl"
    index.write_bytes(row("h1", "a"))
    with opened(tmp_path, index) as cov:
        catch_up(cov, index)
    with open(index, "ab") as f:
        f.write(b"".join(b"not a row %d, %s\n" % (i, b"x" * 100) for i in range(100_000)) + row("h1", "b"))
    with opened(tmp_path, index) as cov:
        tracemalloc.start()
        try:
            found = catch_up(cov, index, full=full)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(found.bad) == indexkeys.MAX_BAD_LINES and found.bad[0].line == 2
        cp = cov.state.keys.checkpoint()
        assert cp is not None and (cp.bad_lines, cp.lines) == (100_000, 100_002)
        assert len(cov.state.keys.bad_line_examples()) == state_module.EXAMPLES
        assert covers(cov, "h1", "b")
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("how", ["replaced", "shrunk", "rewritten"])
def test_an_index_that_is_not_the_one_read_is_read_from_the_start(tmp_path: Path, how: str) -> None:
    index = tmp_path / "index.jsonl"
    index.write_bytes(row("h", "a") + row("h", "b"))
    with opened(tmp_path, index) as cov:
        catch_up(cov, index)
    if how == "replaced":
        (tmp_path / "new").write_bytes(row("h", "c") + row("h", "d") + row("h", "e"))
        os.rename(tmp_path / "new", index)
    elif how == "shrunk":
        index.write_bytes(row("h", "c"))
    else:  # same inode, same length, other bytes before the checkpoint
        data = index.read_bytes()
        index.write_bytes(data.replace(b'"a"', b'"c"') + row("h", "d"))
    with opened(tmp_path, index) as cov:
        found = catch_up(cov, index)
        assert found.rebuilt and found.replaced
        assert not covers(cov, "h", "a") and covers(cov, "h", "c")


def test_a_complete_torn_row_counts_until_it_is_read_whole(tmp_path: Path) -> None:
    index = tmp_path / "index.jsonl"
    index.write_bytes(row("h", "a") + row("h", "t")[:-1])
    with opened(tmp_path, index) as cov:
        found = catch_up(cov, index)
        assert found.torn is not None and covers(cov, "h", "t")
        assert cov.listing("h", ["a", "t", "u"], None).unindexed == ["u"]
        with open(index, "ab") as f:
            f.write(b"\n")
        catch_up(cov, index)
        assert covers(cov, "h", "t") and cov.host_rows("h", None).duplicates == 0


def test_a_full_rebuild_and_reading_on_make_the_same_table(tmp_path: Path) -> None:
    index = tmp_path / "index.jsonl"
    lines = [row(f"h{i % 3}", f"e{i % 7}", f"2026-0{1 + i % 9}-01T00:00:00Z") for i in range(40)]
    index.write_bytes(b"".join(lines[:10]))
    with opened(tmp_path, index) as cov:
        catch_up(cov, index)
        for start in range(10, 40, 10):  # read on in steps
            with open(index, "ab") as f:
                f.write(b"".join(lines[start : start + 10]))
            catch_up(cov, index)
    stepwise = keys_table(tmp_path / "state.sqlite3")
    with opened(tmp_path, index) as cov:
        catch_up(cov, index, full=True)
    assert keys_table(tmp_path / "state.sqlite3") == stepwise
    assert sum(copies for *_, copies in stepwise) == 40 and len(stepwise) == 21


@settings(max_examples=60, deadline=None)
@given(
    indexed=st.lists(st.integers(0, 60), max_size=60),
    listed=st.lists(st.integers(0, 80), max_size=60, unique=True),
    old=st.sets(st.integers(0, 60)),
)
def test_lookup_and_merge_agree(
    tmp_path_factory: pytest.TempPathFactory, indexed: list[int], listed: list[int], old: set[int]
) -> None:
    tmp = tmp_path_factory.mktemp("cov")
    index = tmp / "index.jsonl"
    stamp = {True: "2020-01-01T00:00:00+00:00", False: "2026-01-01T00:00:00+00:00"}
    index.write_bytes(b"".join(row("h", f"e{n}", stamp[n in old]) for n in indexed))
    cutoff = 472_222 * 3600.0  # 2023, a whole hour (retention.cutoff)
    names = [f"e{n}" for n in listed]
    with opened(tmp, index) as cov:
        catch_up(cov, index)
        by_merge = cov.listing("h", names, cutoff)
        saved = coverage._POINT_US, coverage._SCAN_US
        coverage._POINT_US, coverage._SCAN_US = 0.0, 1.0  # force lookups
        try:
            by_lookup = cov.listing("h", names, cutoff)
        finally:
            coverage._POINT_US, coverage._SCAN_US = saved
    have = set(indexed)
    assert (
        sorted(by_merge.unindexed)
        == sorted(by_lookup.unindexed)
        == sorted(f"e{n}" for n in listed if n not in have)
    )
    assert by_merge.matched == by_lookup.matched == len([n for n in listed if n in have])
    assert (
        by_merge.matched_older
        == by_lookup.matched_older
        == len([n for n in listed if n in have and n in old])
    )


def test_a_file_of_something_else_or_another_store_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StateUnusable, match="a database of something else"):
        State.open(other, "/episodes", "/index")
    State.open(tmp_path / "s.sqlite3", "/episodes", "/index").close()
    with pytest.raises(StateUnusable, match="written for another store"):
        State.open(tmp_path / "s.sqlite3", "/elsewhere", "/index")
    (tmp_path / "junk.sqlite3").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StateUnusable, match="not a usable database"):
        State.open(tmp_path / "junk.sqlite3", "/episodes", "/index")
    with sqlite3.connect(tmp_path / "s.sqlite3") as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StateUnusable, match="schema version 99, newer"):
        State.open(tmp_path / "s.sqlite3", "/episodes", "/index")


@pytest.mark.parametrize("reader", [False, True], ids=["transaction", "savepoint"])
def test_a_transaction_sqlite_rolled_back_itself_keeps_its_first_error(tmp_path: Path, reader: bool) -> None:
    """After SQLITE_FULL (and some I/O errors) SQLite has already rolled the
    transaction back: ending it must not raise "no transaction is active"
    over the error that says what happened."""
    state = State.open(tmp_path / "state.sqlite3", "/episodes", "/index")
    try:
        if reader:
            state.attach_base(tmp_path / "state.sqlite3")
        with pytest.raises(ValueError, match="the first error"), state.transaction():
            state.db.execute("ROLLBACK")  # what SQLite does itself on a full disk
            raise ValueError("the first error")
    finally:
        state.close()


def test_a_new_migration_upgrades_a_file_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of version 1 with keys in it, opened by a program with one more
    migration, is upgraded in place: keys kept, the new column there, and a
    ";" inside a comment does not split a statement."""
    index = tmp_path / "index.jsonl"
    index.write_bytes(row("h1", "ep-1"))
    with opened(tmp_path, index) as cov:
        catch_up(cov, index)
    before = keys_table(tmp_path / "state.sqlite3")
    step = "-- a note; with a semicolon\nALTER TABLE hosts ADD COLUMN note TEXT DEFAULT 'n;1';\n"
    monkeypatch.setattr(connection, "MIGRATIONS", (*connection.MIGRATIONS, step))
    State.open(tmp_path / "state.sqlite3", "/episodes", str(index)).close()
    assert keys_table(tmp_path / "state.sqlite3") == before != []
    with sqlite3.connect(tmp_path / "state.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(connection.MIGRATIONS),)
        assert db.execute("SELECT note FROM hosts WHERE name = 'h1'").fetchone() == ("n;1",)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2026-11-25T08:23:02.659399+00:00", 1795594982),
        ("2026-11-25T08:23:02Z", 1795594982),
        ("2026-11-25T08:23:02", 1795594982),  # no zone: UTC, as the receiver writes
        ("2026-11-25T09:23:02+01:00", 1795594982),
        ("yesterday", None),
        (1795594982, None),
        (None, None),
    ],
)
def test_received_seconds(value: object, seconds: int | None) -> None:
    assert indexkeys.received_seconds(value) == seconds


_ZONED = st.datetimes(timezones=st.timezones()).map(datetime.isoformat)  # as the receiver writes them
_RECEIVED = st.one_of(
    st.none(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False),
    st.sampled_from(["", "yesterday", "2026-11-25", "2026-11-25T08:23:02Z", "1969-12-31T23:59:59.5+00:00"]),
    st.datetimes().map(datetime.isoformat),
    _ZONED,
)


def _rows(received: st.SearchStrategy[object]) -> st.SearchStrategy[list[tuple[str | None, str, object]]]:
    hosts = st.one_of(st.none(), st.sampled_from(["h1", "h2", "new-a", "new-b"]))
    episodes = st.text(min_size=1, max_size=8)  # surrogates too: a bad row may hold them
    return st.lists(st.tuples(hosts, episodes, received), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_rows(_ZONED), _rows(_RECEIVED)))
def test_keys_of_a_chunk_are_the_keys_of_each_row(rows: list[tuple[str | None, str, object]]) -> None:
    """KeyOf.many (C loops over a chunk) gives what the functions of one
    row give, new hosts numbered in the same order; the rows are whatever a
    line may hold, timestamps with and without a zone, garbage and numbers."""
    parsed = [Row(episode_id=e, host_id=h, received_at_wall=r) for h, e, r in rows]
    offsets = [i * 100 for i in range(len(parsed) + 1)]
    one: list[str] = []
    many: list[str] = []
    each = indexkeys.KeyOf({"h1": 1, "h2": 2}, lambda name: one.append(name) or 10 + len(one))
    chunk = indexkeys.KeyOf({"h1": 1, "h2": 2}, lambda name: many.append(name) or 10 + len(many))
    expected = [_key_of(each, r, offset) for r, offset in zip(parsed, offsets, strict=False)]
    assert chunk.many(parsed, offsets) == expected
    assert many == one


def _key_of(key: indexkeys.KeyOf, r: Row, offset: int) -> tuple[object, ...]:
    """A row's key, by its definition (state.Key)."""
    return (
        key.host(r.host_id),
        indexkeys.digest(r.episode_id),
        offset,
        indexkeys.received_seconds(r.received_at_wall),
    )


def test_a_read_by_chunks_keys_every_row_where_it_is(tmp_path: Path) -> None:
    """Chunks of clean rows (one Rows each) and chunks with bad lines in
    them (line by line) give the keys, positions and bad lines a read of
    each entry gives."""
    from cis490_reconcile import index

    lines = [row(f"h{i % 3}", f"ep-{i}") for i in range(40_000)]  # 4 chunks
    lines[7_000] = b"not json\n"
    lines[12_345] = b'{"host_id": "h1"}\n'
    lines[15_000] = row(None, "ep-anyone")
    path = tmp_path / "index.jsonl"
    path.write_bytes(b"".join(lines) + b'{"episode_id": "torn"')
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        assert sum(isinstance(c, index.Rows) for c in index.chunks(fd, 0, size)) >= 2
        hosts: dict[str, int] = {}
        each = indexkeys.KeyOf(hosts, lambda n: len(hosts) + 1)
        expected = [_key_of(each, e, e.offset) for e in index.entries(fd, 0, size) if isinstance(e, Row)]
        found = indexkeys.CatchUp()
        reader = indexkeys.KeyReader(indexkeys.KeyOf(dict(hosts), lambda n: len(hosts) + 1), found)
        got = [k for keys, _ in reader.batches(index.chunks(fd, 0, size), 5_000) for k in keys]
    finally:
        os.close(fd)
    assert got == expected and len(got) == 39_998
    assert [b.line for b in found.bad] == [7_001, 12_346]
    assert found.torn is not None and found.torn.line == 40_001
    assert (reader.lines, reader.offset) == (40_000, len(b"".join(lines)))


# --- a rebuild's second half, read by a forked process -------------------------------


def rebuilt(tmp_path: Path, data: bytes, name: str) -> tuple[list[tuple], tuple, tuple]:
    """Rebuild the keys of an index holding `data` into a new state: the
    keys table (and the counts kept with it, checked against the keys),
    what the catch-up found, and the checkpoint."""
    d = tmp_path / name
    d.mkdir()
    index = d / "index.jsonl"
    index.write_bytes(data)
    with opened(d, index) as cov:
        found = catch_up(cov, index, full=True)
        cp = cov.state.keys.checkpoint()
        assert cp is not None
        torn = found.torn and (found.torn.line, found.torn.offset, found.torn.row)
        got = (found.rows, [(b.line, b.offset, b.end, b.reason) for b in found.bad], torn, cov.torn)
    assert scratch_left(d) == []
    contents = state_contents(d)
    return contents["keys"], got, (cp.offset, cp.lines, cp.bad_lines, contents["counts"], contents["hours"])


def serial_and_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes) -> tuple:
    monkeypatch.setattr(rebuild, "SPLIT_MIN_BYTES", 1 << 60)
    serial = rebuilt(tmp_path, data, "serial")
    monkeypatch.setattr(rebuild, "SPLIT_MIN_BYTES", 0)
    return serial, rebuilt(tmp_path, data, "split")


def mixed_index(tail: bytes) -> bytes:
    """Hosts known early and met only late, rows without host_id, the same
    key in both halves, bad lines in both halves."""
    first = [row(f"h{i % 3}", f"e{i}") for i in range(30)] + [b"junk\n", row(None, "anyone"), b"[1]\n"]
    second = [row("late", f"l{i}") for i in range(20)] + [row("h1", "e1"), b"{}\n", row(None, "e5")]
    return b"".join(first + second) + tail


@pytest.mark.parametrize(
    "tail", [b"", row("late", "torn")[:-1], b'{"episode_id": "cut', row("h2", "t")], ids=str
)
def test_a_split_rebuild_equals_a_serial_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tail: bytes
) -> None:
    serial, split = serial_and_split(tmp_path, monkeypatch, mixed_index(tail))
    assert split == serial
    keys, (rows, bad, torn, _), (offset, lines, bad_lines, _, _) = split
    whole = tail.endswith(b"\n")
    assert (
        rows == 30 + 1 + 20 + 1 + 1 + whole and [line for line, *_ in bad] == [31, 33, 55] and bad_lines == 3
    )
    assert ("h1", 2) in {(name, copies) for name, _, _, _, copies in keys}  # e1 in both halves
    assert "late" in {name for name, *_ in keys}  # a host only the forked half met
    assert (lines, offset) == ((57, len(mixed_index(tail))) if whole else (56, len(mixed_index(b""))))
    assert (torn is not None) == (tail != b"" and not whole)


# received at other hours and days, before 1970, or never said: a duplicate's is not its key's
RECEIVED = (
    "2026-11-01T00:00:00+00:00",
    "2026-11-01T05:30:00+00:00",
    "2026-11-03T23:59:59Z",
    "1969-07-20T20:17:00Z",
    None,
)


@settings(max_examples=40, deadline=None)
@given(
    lines=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["a", "b", None]), st.integers(0, 9), st.sampled_from(RECEIVED)).map(
                lambda t: row(t[0], f"e{t[1]}", t[2])
            ),
            st.sampled_from([b"\n", b"garbage\n", b'{"host_id": 1}\n', b"\xff\n"]),
        ),
        max_size=30,
    ),
    tail=st.sampled_from([b"", b"{", row("b", "t")[:-1]]),
)
def test_split_and_serial_rebuilds_agree(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes], tail: bytes
) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        serial, split = serial_and_split(tmp_path_factory.mktemp("i"), monkeypatch, b"".join(lines) + tail)
    assert split == serial


BLANK_MIDDLE = (  # the split falls among blank lines: numbered, but no entries
    b"".join(row("h", f"a{i}") for i in range(20))
    + b"\n" * 400
    + b"".join(row("h", f"b{i}") for i in range(20))
    + b"junk\n"
    + row("h", "t")[:-1]
)


@pytest.mark.parametrize("data", [mixed_index(b""), BLANK_MIDDLE], ids=["mixed", "blank-middle"])
@pytest.mark.parametrize("how", ["raises", "killed"])
@pytest.mark.parametrize("when", ["stage", "sort"])
def test_a_failed_fork_is_read_by_the_pass_itself(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    how: str,
    when: str,
    data: bytes,
) -> None:
    """The child's SplitPart fails (in the child only: the pass stages in
    its own temp table), while it parses its part or, once handed over, as
    it sorts it; the pass reads what it must itself, with the same result,
    line numbers included."""

    def fail(self: state_module.SplitPart, *args: object) -> None:
        if how == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(28, "No space left on device")

    serial, split = serial_and_split(tmp_path, monkeypatch, data)
    assert split == serial
    monkeypatch.setattr(state_module.SplitPart, when, fail)
    assert rebuilt(tmp_path, data, "failed") == serial
    err = capfd.readouterr().err
    assert ("No space left on device" in err) == (how == "raises")


@pytest.mark.parametrize("when", ["stage", "hand_over", "sort"])
def test_a_stopped_fork_is_not_waited_for_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """The forked reader stops (SIGSTOP: a debugger, a frozen cgroup) while
    it parses, once it handed its part over, or as it sorts: the pass stops
    waiting once it has said nothing for a while, and reads what it must
    itself, with the same result."""

    def stopped(self: state_module.SplitPart, *args: object) -> None:
        os.kill(os.getpid(), signal.SIGSTOP)

    serial, _ = serial_and_split(tmp_path, monkeypatch, mixed_index(b""))
    monkeypatch.setattr(rebuild, "CHILD_SILENT_S", 0.5)
    monkeypatch.setattr(state_module.SplitPart, when, stopped)

    def hung(*_: object) -> None:
        raise TimeoutError("the pass still waits for a stopped forked reader")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        assert rebuilt(tmp_path, mixed_index(b""), "stopped") == serial
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_stop_while_the_fork_reads_kills_it_and_keeps_the_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = tmp_path / "index.jsonl"
    index.write_bytes(row("h", "a"))
    forked: list[object] = []
    real_fork = rebuild.syscalls.fork_child

    def fork(work):  # type: ignore[no-untyped-def]
        child = real_fork(work)
        forked.append(child)
        return child

    monkeypatch.setattr(rebuild.syscalls, "fork_child", fork)
    monkeypatch.setattr(rebuild, "SPLIT_MIN_BYTES", 0)
    with opened(tmp_path, index) as cov:
        catch_up(cov, index)
    before = keys_table(tmp_path / "state.sqlite3")
    index.write_bytes(mixed_index(b""))  # another file now: the next catch-up rebuilds

    def stop() -> None:
        raise KeyboardInterrupt  # what a checkpoint raises on a stop request, as far as this goes

    with opened(tmp_path, index) as cov, pytest.raises(KeyboardInterrupt):
        cov.catch_up(os.open(index, os.O_RDONLY), False, stop)
    assert (
        len(forked) == 1 and forked[0].pid is None
    )  # killed and reaped (the one-line index before needed none)
    assert scratch_left(tmp_path) == []
    assert keys_table(tmp_path / "state.sqlite3") == before


@pytest.mark.parametrize("ends", ["done", "stopped"])
def test_the_cycle_collector_is_paused_only_while_a_rebuild_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ends: str
) -> None:
    """Rows and keys hold no reference cycles: a rebuild pauses the
    collector, and turns it on again however it ends."""
    index = tmp_path / "index.jsonl"
    index.write_bytes(mixed_index(b""))
    monkeypatch.setattr(rebuild, "SPLIT_MIN_BYTES", 0)
    seen: list[bool] = []

    def progress() -> None:
        seen.append(gc.isenabled())
        if ends == "stopped":
            raise KeyboardInterrupt  # what a checkpoint raises on a stop request, as far as this goes

    fd = os.open(index, os.O_RDONLY)
    try:
        with opened(tmp_path, index) as cov, contextlib.suppress(KeyboardInterrupt):
            cov.catch_up(fd, True, progress)
    finally:
        os.close(fd)
    assert seen and not any(seen)
    assert gc.isenabled()


def test_no_fork_while_another_thread_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit may rebuild while the verifying pool's threads run: no fork then."""

    def no_fork(work: object) -> None:
        raise AssertionError("forked while another thread ran")

    monkeypatch.setattr(rebuild, "SPLIT_MIN_BYTES", 0)
    monkeypatch.setattr(rebuild.syscalls, "fork_child", no_fork)
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        keys, _, _ = rebuilt(tmp_path, mixed_index(b""), "threaded")
    finally:
        release.set()
        other.join()
    assert len(keys) == 30 + 1 + 20 + 1  # rows, h1's e1 twice: one key
    with pytest.raises(AssertionError, match="forked"):
        rebuilt(tmp_path, mixed_index(b""), "alone")  # the same rebuild alone would fork


def test_rows_we_appended_go_in_as_written_only_where_the_checkpoint_is(tmp_path: Path) -> None:
    """A commit's own rows go into the keys without a read back, as a read
    would have put them (a recount of the whole index agrees), but only
    when they start where the checkpoint stands in the same file."""
    index = tmp_path / "index.jsonl"
    index.write_bytes(row("h1", "a") + row(None, "old"))
    ours = [
        {"host_id": "h1", "episode_id": "b", "received_at_wall": "2026-11-02T10:00:00+00:00"},
        {"host_id": "h2", "episode_id": "c", "received_at_wall": "2026-11-02T11:30:00+00:00"},
    ]
    lines = [encode_row(r) for r in ours]
    with opened(tmp_path, index) as cov:
        catch_up(cov, index)
        start = index.stat().st_size
        with open(index, "ab") as f:
            f.write(b"".join(lines))
        fd = os.open(index, os.O_RDONLY)
        try:
            assert not cov.appended(fd, start + 1, lines, ours)  # not where the checkpoint is
            assert cov.appended(fd, start, lines, ours)
        finally:
            os.close(fd)
        assert catch_up(cov, index).rows == 0  # nothing left to read
    assert state_contents(tmp_path) == state_contents(recounted_index(index, tmp_path / "recount"))


def test_rows_we_appended_are_read_back_when_another_line_came_first(tmp_path: Path) -> None:
    """A line a writer the lock did not stop (a lock file deleted while
    held, a network filesystem) appended between the checkpoint and ours:
    our rows are not where `start` says, so they are read back, and that
    line is keyed too (trusting `start` lost it, and the next pass
    appended a duplicate of it)."""
    index = tmp_path / "index.jsonl"
    index.write_bytes(row("h1", "a"))
    ours = [{"host_id": "h1", "episode_id": "b"}]
    lines = [encode_row(r) for r in ours]
    with opened(tmp_path, index) as cov:
        catch_up(cov, index)
        start = index.stat().st_size
        with open(index, "ab") as f:
            f.write(row("h2", "theirs") + lines[0])
        fd = os.open(index, os.O_RDONLY)
        try:
            assert not cov.appended(fd, start, lines, ours)
        finally:
            os.close(fd)
        assert catch_up(cov, index).bad == []
        assert covers(cov, "h2", "theirs") and covers(cov, "h1", "b")
    assert state_contents(tmp_path) == state_contents(recounted_index(index, tmp_path / "recount"))


def recounted_index(index: Path, directory: Path) -> Path:
    directory.mkdir()
    with opened(directory, index) as cov:
        catch_up(cov, index, full=True)
    return directory

"""What the index covers, kept in the state database: read on from the
checkpoint, read from the start when the file is not the one read, and
answer "is it indexed?" the same way by lookup and by merge."""

from __future__ import annotations

import os
import sqlite3
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cis490_reconcile import coverage
from cis490_reconcile import state as state_module
from cis490_reconcile.coverage import Coverage
from cis490_reconcile.index import encode_row
from cis490_reconcile.state import State, StateUnusable


def row(host: str | None, episode: str, received: str = "2026-11-01T00:00:00+00:00") -> bytes:
    r: dict[str, object] = {"episode_id": episode, "received_at_wall": received}
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
        cp = cov.state.checkpoint()
        assert cp is not None and (cp.offset, cp.lines, cp.bad_lines) == (index.stat().st_size, 5, 1)


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
        assert len(found.bad) == coverage.MAX_BAD_LINES and found.bad[0].line == 2
        cp = cov.state.checkpoint()
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
    cutoff = 1.7e9  # 2023
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
    monkeypatch.setattr(state_module, "MIGRATIONS", (*state_module.MIGRATIONS, step))
    State.open(tmp_path / "state.sqlite3", "/episodes", str(index)).close()
    assert keys_table(tmp_path / "state.sqlite3") == before != []
    with sqlite3.connect(tmp_path / "state.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
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
    assert coverage.received_seconds(value) == seconds

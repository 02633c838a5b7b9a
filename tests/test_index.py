"""index.jsonl: tolerant streaming reads, and the append protocol that never
changes a byte already there."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cis490_reconcile import index
from cis490_reconcile.index import BadLine, IndexReader, append_rows, encode_row


def read(path: Path, reader: IndexReader | None = None) -> tuple[IndexReader, list[BadLine]]:
    reader = reader or IndexReader(path)
    bad: list[BadLine] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        reader.catch_up(fd, bad.append)
    finally:
        os.close(fd)
    return reader, bad


def row(host: str | None, episode: str) -> bytes:
    r = {"episode_id": episode, "sha256": "00", "size_bytes": 1}
    if host is not None:
        r["host_id"] = host
    return encode_row(r)


def test_encode_row_is_the_legacy_format() -> None:
    r = {"host_id": "h", "episode_id": "e", "backfilled": True, "size_bytes": 3, "commit": "c"}
    assert encode_row(r) == (json.dumps(r, sort_keys=True) + "\n").encode()
    assert encode_row({"episode_id": "é\n"}) == b'{"episode_id": "\\u00e9\\n"}\n'


def test_tolerant_read_reports_line_and_offset(tmp_path: Path) -> None:
    lines = [
        row("h1", "a"),
        b"\n",
        b"   \n",
        b"garbage\n",
        b"[1, 2, 3]\n",
        b'{"host_id": "h1"}\n',
        b'{"host_id": 7, "episode_id": "x"}\n',
        b"\xff\xfe not utf-8\n",
        b"[" * 100_000 + b"\n",  # deep nesting: RecursionError in json
        row(None, "old"),
        row("h2", "b"),
    ]
    path = tmp_path / "index.jsonl"
    path.write_bytes(b"".join(lines))
    reader, bad = read(path)
    offsets = [sum(map(len, lines[:i])) for i in range(len(lines))]
    assert [(b.line, b.offset) for b in bad] == [(i + 1, offsets[i]) for i in (3, 4, 5, 6, 7, 8)]
    assert [b.reason for b in bad] == [
        "not valid JSON",
        "not a JSON object",
        "no episode_id string",
        "host_id is not a string",
        "not valid JSON",
        "not valid JSON",
    ]
    assert reader.bad_lines == 6
    assert reader.lines == len(lines)
    assert not reader.torn_tail
    assert reader.keys.covers("h1", "a")
    assert not reader.keys.covers("h2", "a")  # an id indexed under another host
    assert reader.keys.covers("h2", "b")
    assert reader.keys.covers("any-host", "old")  # rows without host_id match on episode_id


def test_overlong_line_is_bad_and_memory_is_not_spent_on_it(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    path.write_bytes(row("h", "a") + b"x" * (3 * index.MAX_LINE_BYTES) + b"\n" + row("h", "b"))
    reader, bad = read(path)
    assert [(b.line, b.reason) for b in bad] == [(2, "line longer than 1 MiB")]
    assert reader.keys.covers("h", "b")
    assert reader.offset == path.stat().st_size


@pytest.mark.parametrize("complete_row", [True, False])
def test_torn_tail_is_not_consumed(tmp_path: Path, complete_row: bool) -> None:
    """A torn last line is parsed only to be conservative, and read again
    once it is terminated."""
    path = tmp_path / "index.jsonl"
    tail = row("h", "t")[:-1] if complete_row else row("h", "t")[:20]
    path.write_bytes(row("h", "a") + tail)
    reader, bad = read(path)
    assert reader.torn_tail
    assert bad == []
    assert reader.offset == len(row("h", "a"))
    assert reader.keys.covers("h", "t") is complete_row
    with open(path, "ab") as f:
        f.write(b"\n" + row("h", "b"))
    reader, bad = read(path, reader)
    assert not reader.torn_tail
    assert len(bad) == (0 if complete_row else 1)
    assert reader.keys.covers("h", "b")


def test_catch_up_parses_only_what_was_appended(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    path.write_bytes(row("h", "a") + b"junk\n")
    reader, bad = read(path)
    assert len(bad) == 1
    with open(path, "ab") as f:
        f.write(row("h", "b"))
    reader, bad = read(path, reader)
    assert bad == []  # the junk line is not reported twice
    assert reader.bad_lines == 1
    assert reader.keys.covers("h", "b")


@pytest.mark.parametrize("how", ["replaced", "shrunk"])
def test_replaced_or_shrunk_index_is_parsed_from_the_start(tmp_path: Path, how: str) -> None:
    path = tmp_path / "index.jsonl"
    path.write_bytes(row("h", "a") + row("h", "b"))
    reader, _ = read(path)
    fd = os.open(path, os.O_RDONLY)
    if how == "replaced":
        new = tmp_path / "new"
        new.write_bytes(row("h", "c") + row("h", "d") + row("h", "e"))
        os.rename(new, path)
    else:
        path.write_bytes(row("h", "c"))
    os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert reader.catch_up(fd, lambda bad: None) is True
    finally:
        os.close(fd)
    assert not reader.keys.covers("h", "a")
    assert reader.keys.covers("h", "c")


def test_append_terminates_torn_tail_and_keeps_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    before = row("h", "a") + b'{"host_id": "h", "episo'
    path.write_bytes(before)
    rows = [{"host_id": "h", "episode_id": f"n{i}"} for i in range(3)]
    written = append_rows(path, rows)
    after = path.read_bytes()
    assert after.startswith(before)
    assert after[len(before) :] == b"\n" + b"".join(encode_row(r) for r in rows)
    assert written == len(after) - len(before)


def test_append_to_missing_index_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    append_rows(path, [{"host_id": "h", "episode_id": "e"}])
    assert path.read_bytes() == encode_row({"host_id": "h", "episode_id": "e"})


def test_append_with_separate_lock_file(tmp_path: Path) -> None:
    path, lock = tmp_path / "index.jsonl", tmp_path / "index.lock"
    path.write_bytes(row("h", "a"))
    append_rows(path, [{"host_id": "h", "episode_id": "b"}], lock_file=lock)
    assert path.read_bytes() == row("h", "a") + encode_row({"host_id": "h", "episode_id": "b"})
    assert lock.exists() and lock.stat().st_size == 0


def test_append_is_one_write_syscall(tmp_path: Path) -> None:
    """strace would do; counting os.write calls is enough to pin the rule."""
    path = tmp_path / "index.jsonl"
    path.write_bytes(b"torn")
    calls: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return real_write(fd, data)

    os.write = counting_write  # type: ignore[assignment]
    try:
        append_rows(path, [{"episode_id": str(i)} for i in range(100)])
    finally:
        os.write = real_write  # type: ignore[assignment]
    assert len(calls) == 1
    assert path.read_bytes().count(b"\n") == 101


def test_short_write_is_an_error_not_a_retry(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    path.write_bytes(row("h", "a"))
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, data[:10])

    os.write = short_write  # type: ignore[assignment]
    try:
        with pytest.raises(index.IndexWriteError, match="short write: 10 of"):
            append_rows(path, [{"episode_id": "b"}])
    finally:
        os.write = real_write  # type: ignore[assignment]
    assert path.read_bytes() == row("h", "a") + encode_row({"episode_id": "b"})[:10]
    append_rows(path, [{"episode_id": "c"}])  # the next append repairs the tail
    reader, bad = read(path)
    assert [b.line for b in bad] == [2]
    assert reader.keys.covers("x", "c")


@settings(max_examples=200, deadline=None)
@given(
    adds=st.lists(st.tuples(st.sampled_from(["h1", "h2", "h3"]), st.integers(0, 300)), max_size=400),
    probes=st.lists(st.tuples(st.sampled_from(["h1", "h2", "h4"]), st.integers(0, 320)), max_size=50),
)
def test_indexed_keys_answer_like_a_set_across_merges(
    adds: list[tuple[str, int]], probes: list[tuple[str, int]]
) -> None:
    """With merges every few keys, membership, the distinct count and the
    stored arrays (sorted, no key twice) stay those of a plain set."""
    keys = index.IndexedKeys()
    keys.MERGE_MIN = 3  # type: ignore[misc]  # merge often: that is what is under test
    truth: set[tuple[str, str]] = set()
    for host, n in adds:
        keys.add(host, f"e{n}")
        truth.add((host, f"e{n}"))
        assert keys.host_rows() == len(truth)
    for host, n in [*probes, *adds[:20]]:
        assert keys.has_row(host, f"e{n}") == ((host, f"e{n}") in truth)
    keys._merge()
    digests = [h << 64 | lo for h, lo in zip(keys._hi, keys._lo, strict=True)]
    assert digests == sorted(set(digests)) and len(digests) == len(truth)

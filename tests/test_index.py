"""index.jsonl: tolerant streaming reads, and the append protocol that never
changes a byte already there."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cis490_reconcile import index
from cis490_reconcile.index import BadLine, TornTail, append_rows, encode_row
from cis490_reconcile.rows import Row


def read(path: Path, start: int = 0, line: int = 0) -> list[index.Entry]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(index.entries(fd, start, os.fstat(fd).st_size, line))
    finally:
        os.close(fd)


def row(host: str | None, episode: str) -> bytes:
    r = {"episode_id": episode, "sha256": "00", "size_bytes": 1}
    if host is not None:
        r["host_id"] = host
    return encode_row(r)


def test_encode_row_is_the_legacy_format() -> None:
    r = {"host_id": "h", "episode_id": "e", "backfilled": True, "size_bytes": 3, "commit": "c"}
    assert encode_row(r) == (json.dumps(r, sort_keys=True) + "\n").encode()
    assert encode_row({"episode_id": "é\n"}) == b'{"episode_id": "\\u00e9\\n"}\n'


def test_every_line_with_its_number_and_offset(tmp_path: Path) -> None:
    lines = [
        row("h1", "a"),
        b"\n",
        b"   \n",
        b"garbage\n",
        b"[1, 2, 3]\n",
        b'{"host_id": "h1"}\n',
        b'{"host_id": 7, "episode_id": "x"}\n',
        b'{"host_id": "", "episode_id": "x"}\n',  # names no directory: not a row for every host
        b"\xff\xfe not utf-8\n",
        b"[" * 100_000 + b"\n",  # deep nesting: RecursionError in json
        row(None, "old"),
        row("h2", "b"),
        b'{"episode_id": "nan", "x": NaN}\n',  # json.loads takes NaN; msgspec does not: json decides
        b'{"episode_id": "u", "x": "\xc0\x80"}\n',  # invalid UTF-8 msgspec would skip; json refuses
    ]
    path = tmp_path / "index.jsonl"
    path.write_bytes(b"".join(lines))
    got = read(path)
    offsets = [sum(map(len, lines[:i])) for i in range(len(lines) + 1)]
    bad = [e for e in got if isinstance(e, BadLine)]
    assert [(b.line, b.offset, b.end) for b in bad] == [
        (i + 1, offsets[i], offsets[i + 1]) for i in (3, 4, 5, 6, 7, 8, 9, 13)
    ]
    assert [b.reason for b in bad] == [
        "not valid JSON",
        "not a JSON object",
        "no episode_id string",
        "host_id is not a string",
        "an empty host_id",
        "not valid JSON",
        "not valid JSON",
        "not valid JSON",
    ]
    rows = [e for e in got if isinstance(e, Row)]
    assert [(r.line, r.host_id, r.episode_id, r.offset) for r in rows] == [
        (1, "h1", "a", 0),
        (11, None, "old", offsets[10]),
        (12, "h2", "b", offsets[11]),
        (13, None, "nan", offsets[12]),
    ]
    assert rows[0].sha256 == "00" and rows[0].size_bytes == 1
    assert not any(isinstance(e, TornTail) for e in got)


def test_overlong_line_is_bad_and_memory_is_not_spent_on_it(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    path.write_bytes(row("h", "a") + b"x" * (3 * index.MAX_LINE_BYTES) + b"\n" + row("h", "b"))
    got = read(path)
    assert [(e.line, e.reason) for e in got if isinstance(e, BadLine)] == [(2, "line longer than 1 MiB")]
    assert got[-1].episode_id == "b" and got[-1].end == path.stat().st_size


@pytest.mark.parametrize("complete_row", [True, False])
def test_torn_tail_comes_last_and_keeps_a_complete_row(tmp_path: Path, complete_row: bool) -> None:
    path = tmp_path / "index.jsonl"
    tail = row("h", "t")[:-1] if complete_row else row("h", "t")[:20]
    path.write_bytes(row("h", "a") + tail)
    *rest, torn = read(path)
    assert isinstance(torn, TornTail) and (torn.line, torn.offset) == (2, len(row("h", "a")))
    assert (torn.row is not None and torn.row.episode_id == "t") is complete_row
    assert [e.episode_id for e in rest] == ["a"]


def test_reading_on_from_an_offset_numbers_lines_from_there(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    path.write_bytes(row("h", "a") + b"junk\n" + row("h", "b"))
    start = len(row("h", "a") + b"junk\n")
    (only,) = read(path, start, line=2)
    assert (only.line, only.episode_id, only.offset) == (3, "b", start)


def test_row_at_names_the_key_of_an_offset(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    path.write_bytes(row("h", "a") + b"junk\n" + row("h", "b"))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert index.row_at(fd, len(row("h", "a")) + 5).episode_id == "b"  # type: ignore[union-attr]
        assert index.row_at(fd, len(row("h", "a"))) is None
    finally:
        os.close(fd)


def sum_lists(lists: list[list[bytes]]) -> list[bytes]:
    return [line for lines in lists for line in lines]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
objects = st.fixed_dictionaries(
    {},
    optional={
        "episode_id": st.one_of(st.text(max_size=4), json_values),
        "host_id": st.one_of(st.text(max_size=4), json_values),
        "received_at_wall": json_values,
        "sha256": json_values,
        "size_bytes": json_values,
    },
).flatmap(
    lambda d: st.dictionaries(st.text(max_size=4), json_values, max_size=2).map(lambda extra: {**extra, **d})
)
raw_lines = st.one_of(
    objects.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
    objects.map(lambda d: json.dumps(d).encode()[:-1]),
)


# rows written as one text and cut anywhere: pieces that join into rows again only across lines,
# and lines of several objects (which msgspec's decode_lines would read as that many values)
cut_rows = st.tuples(
    st.sampled_from([", ", " ", ""]).flatmap(
        lambda sep: st.lists(objects, min_size=2, max_size=4).map(
            lambda o: sep.join(map(json.dumps, o)).encode()
        )
    ),
    st.lists(st.integers(0, 200), max_size=3),
).map(lambda t: _cut(*t))


def _cut(text: bytes, at: list[int]) -> list[bytes]:
    bounds = sorted({min(a, len(text)) for a in at})
    return [text[i:j] for i, j in zip([0, *bounds], [*bounds, len(text)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.one_of(raw_lines.map(lambda line: [line]), cut_rows), max_size=10).map(sum_lists),
    read_size=st.sampled_from([1 << 20, 50, 7]),
)
@example(
    read_size=1 << 20, lines=[b'{"episode_id": "a"}', b" \t", b'{"episode_id": "b"}']
)  # white space only: a blank line
@example(
    read_size=1 << 20, lines=[b'{"episode_id": "a"}', b"\x0b", b"\x0c "]
)  # not JSON's white space: bad lines
@example(
    read_size=1 << 20, lines=[b'{"episode_id": "a"},{"episode_id": "b", "x": "', b'"}']
)  # joined with ",": two rows
@example(
    read_size=1 << 20, lines=[b'{"episode_id": "z"},{"episode_id": "a", "x": [{"b": 1}', b'{"c": 2}]}']
)  # and with ",\n"
# one value over two lines (a "}" then a "{": never inside one), and two on one line to even the count
@example(
    read_size=1 << 20,
    lines=[
        b'{"episode_id": "0"}',
        b'{"episode_id": "a", "x": {"y": 1}',
        b'{"z": 2}}',
        b'{"episode_id": "b"} {"episode_id": "c"}',
    ],
)
@example(
    read_size=1 << 20,
    lines=[b'{"episode_id": "0"}', b'{"episode_id": "a"}{"episode_id": "b"}', b'{"episode_id": "c"}'],
)
@example(
    read_size=1 << 20, lines=[b'{"episode_id": "0"}', b'{"episode_id": "a", "x": "}', b'{"}']
)  # a string with a newline in it: no JSON has one
# a value over two lines that JSON allows, or a blank line, then two values on one line
@example(
    read_size=1 << 20,
    lines=[
        b'{"episode_id": "0"}',
        b'{"episode_id": "a",',
        b'"x": 1}',
        b'{"episode_id": "b"} {"episode_id": "c"}',
    ],
)
@example(read_size=1 << 20, lines=[b'{"episode_id": "0"}', b" ", b'{"episode_id": "a"} {"episode_id": "b"}'])
def test_the_fast_path_decides_exactly_as_json_loads(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes], read_size: int
) -> None:
    """Whether a chunk goes through msgspec at once or line by line, and
    wherever the reads cut the lines, a line is a row exactly when
    json.loads makes it one, with the same key."""
    path = tmp_path_factory.mktemp("idx") / "index.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(index, "READ_CHUNK", read_size)
        got = {e.line: e for e in read(path)}
    for n, raw in enumerate(lines, 1):
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            obj = None
        is_row = (
            isinstance(obj, dict)
            and isinstance(obj.get("episode_id"), str)
            and obj["episode_id"] != ""
            and (obj.get("host_id") is None or (isinstance(obj.get("host_id"), str) and obj["host_id"] != ""))
        )
        entry = got.get(n)
        if not raw.strip(b" \t\n\r"):  # JSON's white space only
            assert entry is None
        elif is_row:
            assert isinstance(entry, Row) and (entry.host_id, entry.episode_id) == (
                obj.get("host_id"),
                obj["episode_id"],
            )
        else:
            assert isinstance(entry, BadLine), (raw, entry)


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
    got = read(path)
    assert [e.line for e in got if isinstance(e, BadLine)] == [2]
    assert got[-1].episode_id == "c"

"""What a line of the index is: a Row, or the reason it is not one.

What is a row is decided by ``json.loads``: a JSON object with a non-empty
string ``episode_id`` and a non-empty string ``host_id`` or none. (A row
without host_id covers its episode on every host; "" names no directory,
so it is no row, not one that covers every host.) For speed the lines
of each 1 MiB chunk are first decoded together by msgspec (about 1 us a row
against 5.8 us for json.loads, measured on an 8M-row index); msgspec accepts
exactly what json accepts except invalid UTF-8 inside fields it skips, so a
chunk is taken that way only when it is valid UTF-8 and its lines cannot
join (_apart: else pieces of garbage lines could make rows); any other
chunk is decided line by line, json.loads judging what msgspec rejects.
Re-measure with ``tests/bench/run.py --only scale``.

Importing msgspec is about 9 ms, a twentieth of a pass that finds nothing
new to read, so the modules a pass imports load this one where they first
need it: index._decoder at the first line to decode, KeyReader.batches
when a read starts, Coverage.appended after an append (a catch-up with
nothing appended returns before either). tests/test_incremental.py checks
that a quiet pass leaves it unloaded. Scrub and its helpers, which always
read lines, import it at the top.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from typing import cast

import msgspec


class Row(msgspec.Struct):
    """A line that is a row: what the index says about one episode. The
    JSON fields are as found (only the key's are checked); line, offset and
    end are where the line is (end: the offset of the next line)."""

    episode_id: str
    host_id: str | None = None
    received_at_wall: object = None
    sha256: object = None
    size_bytes: object = None
    line: int = 0
    offset: int = 0
    end: int = 0


_CHUNK = msgspec.json.Decoder(list[Row])
_ONE = msgspec.json.Decoder(Row)
_FIELDS = frozenset(Row.__struct_fields__[:5])
_EPISODE_ID = operator.attrgetter("episode_id")
_HOST_ID = operator.attrgetter("host_id")


def _judge(raw: bytes) -> Row | str:
    """One line, by json.loads's rules: a Row or why it is not one."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return "not valid JSON"
    if not isinstance(obj, dict):
        return "not a JSON object"
    episode_id, host_id = obj.get("episode_id"), obj.get("host_id")
    if not isinstance(episode_id, str) or not episode_id:
        return "no episode_id string"
    if host_id is not None and not isinstance(host_id, str):
        return "host_id is not a string"
    return _valid(Row(**{k: v for k, v in obj.items() if k in _FIELDS}))


def _valid(row: Row) -> Row | str:
    if not row.episode_id:
        return "no episode_id string"
    if row.host_id == "":
        return "an empty host_id"
    return row


def _apart(joined: bytes, lines: int) -> bool:
    """Whether the `lines` joined lines can only be apart in the array: each
    begins with `{` and ends with `}`, and none holds an array. No string
    spans two lines (the separator holds a newline, which no JSON string
    may), and a `},\n{` inside an object is not JSON (a key must follow the
    comma): only an array could hold one. Without this, pieces of garbage
    lines could join into rows ('{"episode_id": "a"},{"x": "' then '"}').
    0.15 us a row (count, find). Rows with arrays are decided line by line."""
    return (
        joined.count(b"},\n{") == lines - 1
        and joined.startswith(b"[{")
        and joined.endswith(b"}]")
        and joined.find(b"[", 1) < 0
    )


def decode(raws: Sequence[bytes]) -> list[Row | str]:
    """Each line as a Row or a reason: all at once when msgspec takes the
    whole chunk and its lines cannot join, else line by line (msgspec, then
    json.loads as the judge)."""
    try:
        joined = b"[" + b",\n".join(raws) + b"]"
        joined.decode()  # msgspec does not check the UTF-8 of fields it skips; json does
        if _apart(joined, len(raws)) and len(rows := _CHUNK.decode(joined)) == len(raws):  # not "1,2" on one
            if all(map(_EPISODE_ID, rows)) and "" not in map(_HOST_ID, rows):
                return cast("list[Row | str]", rows)
            return list(map(_valid, rows))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        pass
    out: list[Row | str] = []
    for raw in raws:
        try:
            raw.decode()
            out.append(_valid(_ONE.decode(raw)))
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            out.append(_judge(raw))
    return out

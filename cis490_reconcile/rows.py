"""What a line of the index is: a Row, or the reason it is not one.

What is a row is decided by ``json.loads``: a JSON object with a non-empty
string ``episode_id`` and a non-empty string ``host_id`` or none. (A row
without host_id covers its episode on every host; "" names no directory,
so it is no row, not one that covers every host.) msgspec decodes instead
wherever it gives the same answer: it accepts exactly what json accepts
except invalid UTF-8 inside fields it skips, so text is first checked to be
UTF-8, and json.loads judges every line msgspec refuses (`decode`).

The lines of each 1 MiB read are decoded together (`all_rows`) by one
msgspec decode_lines over the bytes as read: 0.33 us a row with the checks
below, against 0.86 for joining the lines into one JSON array and decoding
that, and about 5.8 us for json.loads (measured on the 8M-row bench index;
re-measure with ``tests/bench/run.py --only scale``). decode_lines reads
any white-space-separated JSON values, across lines too, so its answer
counts only when it cannot be anything but one value per line. It is taken
only when each line begins with "{" and ends with "}": then each newline
stands between a "}" and a "{", which never follow each other inside one
JSON value (after a "}" come ",", "}" or "]"), and no string holds a
newline (json and msgspec both refuse control characters in strings). So
no value spans two lines, each line begins one, and as many values as
lines means one value per line, the whole line. Anything else, a blank or
bad line among them, goes line by line.

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


_ONE = msgspec.json.Decoder(Row)
_FIELDS = frozenset(Row.__struct_fields__[:5])
_EPISODE_ID = operator.attrgetter("episode_id")
_HOST_ID = operator.attrgetter("host_id")
_FIRST_BYTE, _LAST_BYTE = operator.itemgetter(0), operator.itemgetter(-1)


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


def decode(raws: Sequence[bytes]) -> list[Row | str]:
    """Each line as a Row or the reason it is not one: msgspec, and
    json.loads as the judge of what msgspec refuses."""
    out: list[Row | str] = []
    for raw in raws:
        try:
            raw.decode()  # msgspec does not check the UTF-8 of fields it skips; json does
            out.append(_valid(_ONE.decode(raw)))
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            out.append(_judge(raw))
    return out


def all_rows(lines: Sequence[bytes], rest: bytes | memoryview) -> list[Row] | None:
    """Each line as a Row when every one is a row (nearly always), decided
    at once; None when any may not be (the caller then decodes them one by
    one). `rest` is lines[1:] as they lie in the file, each ended by a
    newline (lines[0] may have begun in an earlier read), and one
    decode_lines reads it all (why that is safe: the module docstring)."""
    try:
        first, last = bytes(map(_FIRST_BYTE, lines)), bytes(map(_LAST_BYTE, lines))
    except IndexError:  # a blank line
        return None
    if first.count(b"{") != len(lines) or last.count(b"}") != len(lines):
        return None
    try:
        lines[0].decode()  # msgspec does not check the UTF-8 of fields it skips; json does
        str(rest, "utf-8")
        rows = [_ONE.decode(lines[0]), *_ONE.decode_lines(rest)]
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if len(rows) != len(lines) or not all(map(_EPISODE_ID, rows)) or "" in map(_HOST_ID, rows):
        return None
    return rows

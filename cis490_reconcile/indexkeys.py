"""Index lines into keys: the key of a row, and one read of lines that keeps
its place. The state database files a row under its key (state/keys.py):
the host's id, a digest of the episode_id, the row's offset and when it
was received. A pass catching up and a rebuild on two processes
(rebuild.py) read lines the same way, through KeyReader.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, cast

from . import index
from .index import BadLine, Entry, Rows, TornTail
from .state import Checkpoint, Key

if TYPE_CHECKING:
    from .rows import Row

MAX_BAD_LINES = 1000  # bad lines a catch-up hands back (for events); the count is complete
_blake2b, _fromisoformat = hashlib.blake2b, datetime.fromisoformat  # bound once: per-row calls
_HOST, _EPISODE, _RECEIVED = (operator.attrgetter(f) for f in ("host_id", "episode_id", "received_at_wall"))
_DIGEST_OF = functools.partial(_blake2b, digest_size=12)


def _utf8(text: str) -> bytes:
    """A row's id as UTF-8. json.loads gives lone surrogates for escapes
    like "\\ud800", which strict UTF-8 (and SQLite's binding) refuses: they
    pass through, so such a row keys like any other instead of failing."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def digest(episode_id: str) -> bytes:
    """12 bytes of BLAKE2b of the episode_id's UTF-8. Called once a row on a full pass."""
    return _blake2b(_utf8(episode_id), digest_size=12).digest()


def received_seconds(value: object) -> int | None:
    """received_at_wall as unix seconds; None when absent or not a timestamp.
    A timestamp without a zone is UTC, as the receiver writes them. Called
    once a row on a full pass: the common case is one fromisoformat (a
    cache of each hour's seconds, slicing and int() of the minutes and
    seconds cost more in Python than the C parse: measured)."""
    if type(value) is not str:
        return None
    try:
        when = _fromisoformat(value)
    except ValueError:  # before Python 3.11 fromisoformat reads no "Z"
        if not value.endswith("Z"):
            return None
        try:
            when = _fromisoformat(value[:-1] + "+00:00")
        except ValueError:
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp())


def _digests(episode_ids: list[str]) -> list[bytes]:
    """digest of each, in C loops (map) when all are plain UTF-8."""
    try:
        return list(map(_blake2b.digest, map(_DIGEST_OF, map(str.encode, episode_ids))))
    except UnicodeEncodeError:
        return list(map(digest, episode_ids))


def _received(values: list[object]) -> list[int | None]:
    """received_seconds of each, in C loops when all are timestamps with a
    zone, as the receiver writes them; else one by one."""
    try:
        when = list(map(_fromisoformat, values))  # type: ignore[arg-type]
        if all(map(operator.attrgetter("tzinfo"), when)):
            return list(map(int, map(datetime.timestamp, when)))
    except (TypeError, ValueError, OverflowError):
        pass
    return list(map(received_seconds, values))


class KeyOf:
    """The keys of rows (state.Key): a host's id from `hosts`, a host not
    there yet numbered by `new_host`, which also records it."""

    def __init__(self, hosts: dict[str, int], new_host: Callable[[str], int]) -> None:
        self.hosts = hosts
        self.new_host = new_host

    def host(self, name: str | None) -> int:
        """The id of a host_id (0: rows without one). A name with lone
        surrogates is kept as its UTF-8 with backslash escapes (no directory
        can have it: it is not a safe name, so its rows have no tarball)."""
        if name is None:
            return 0
        host = self.hosts.get(name)
        if host is None:
            name = _utf8(name).decode("utf-8", "backslashreplace")
            host = self.hosts.get(name)
            if host is None:
                host = self.hosts[name] = self.new_host(name)
        return host

    def many(self, rows: list[Row], offsets: list[int]) -> list[Key]:
        """The keys of `rows`, row i at offsets[i]: (host(host_id),
        digest(episode_id), offset, received_seconds(received_at_wall)) of
        each, in C loops (1.3 us a row less than a call each, measured on 1M
        rows)."""
        names = list(map(_HOST, rows))
        known = list(map(self.hosts.get, names))
        # rows without host_id, or a host not known yet: one by one
        hosts = list(map(self.host, names)) if None in known else cast("list[int]", known)
        received = _received(list(map(_RECEIVED, rows)))
        digests = _digests(list(map(_EPISODE, rows)))
        return list(zip(hosts, digests, offsets, received, strict=False))  # offsets may go on (Rows.ends)


@dataclass
class CatchUp:
    """What one catch-up found."""

    rows: int = 0  # rows read (new keys and duplicates)
    bad: list[BadLine] = field(default_factory=list)  # bad lines read now
    torn: TornTail | None = None
    rebuilt: bool = False  # read from the start
    replaced: bool = False  # ... because the file is not the one the checkpoint read


class KeyReader:
    """One read of index lines, in batches of keys. It keeps the position
    after the last whole line and the count of bad lines (what a checkpoint
    needs), stops at a torn tail, and keeps only the first MAX_BAD_LINES bad
    lines: a file of nothing but garbage costs no more memory than a row."""

    def __init__(
        self, key: KeyOf, found: CatchUp, offset: int = 0, lines: int = 0, bad_lines: int = 0
    ) -> None:
        self.key = key
        self.found = found
        self.offset, self.lines, self.bad_lines = offset, lines, bad_lines

    def batches(
        self, entries: Iterable[Rows | Entry], size: int
    ) -> Iterator[tuple[list[Key], list[BadLine]]]:
        """(keys, bad lines kept) once at least `size` keys are read (index.chunks:
        a chunk's rows at a time), and once at the end."""
        from .rows import Row  # here: a pass with no line to read never gets here (rows.py)

        found, key = self.found, self.key
        keys: list[Key] = []
        bad: list[BadLine] = []
        last: tuple[int, int] | None = None  # (line, end) of the last line read: the position at each batch
        for entry in entries:
            if isinstance(entry, Rows):  # first: nearly every line is in one
                rows = entry.rows
                keys += key.many(rows, entry.ends)
                last = entry.first + len(rows) - 1, entry.ends[len(rows)]
            elif isinstance(entry, Row):
                keys += key.many([entry], [entry.offset])  # a row among bad lines
                last = entry.line, entry.end
            elif isinstance(entry, TornTail):
                found.torn = entry
                break
            else:
                last = entry.line, entry.end
                self.bad_lines += 1
                if len(found.bad) < MAX_BAD_LINES:
                    found.bad.append(entry)
                    bad.append(entry)
            if len(keys) >= size:
                assert last is not None
                found.rows += len(keys)
                self.lines, self.offset = last
                yield keys, bad
                keys, bad = [], []
        found.rows += len(keys)
        if last is not None:
            self.lines, self.offset = last
        yield keys, bad

    def summary(self) -> dict[str, object]:
        """What a forked reader hands back (JSON): counts, its position,
        the bad lines kept, where a torn tail starts."""
        found = self.found
        return {
            "rows": found.rows,
            "lines": self.lines,
            "offset": self.offset,
            "bad_lines": self.bad_lines,
            "bad": [[b.line, b.offset, b.end, b.reason] for b in found.bad],
            "torn": None if found.torn is None else [found.torn.line, found.torn.offset],
        }

    def lines_before(self, fd: int, start: int) -> int:
        """Lines before `start`, where the next read begins: ours, and any
        blank ones after them (they are no entries, but they are numbered)."""
        return self.lines + index.newlines(fd, self.offset, start)

    def add(self, part: dict[str, Any], fd: int, start: int, end: int) -> None:
        """Go on after a forked reader's `summary` of bytes [start, end), the
        bytes before read by this one: its line numbers count from the lines
        before `start`; its position is ours if it met a line; its torn tail
        is read again here."""
        found = self.found
        before = self.lines_before(fd, start)
        found.rows += part["rows"]
        self.bad_lines += part["bad_lines"]
        room = max(MAX_BAD_LINES - len(found.bad), 0)
        found.bad += [BadLine(n + before, offset, nxt, why) for n, offset, nxt, why in part["bad"][:room]]
        if part["lines"]:
            self.lines, self.offset = before + part["lines"], part["offset"]
        if part["torn"] is not None:
            line, offset = part["torn"]
            torn = next(index.entries(fd, offset, end, before + line - 1))
            assert isinstance(torn, TornTail)
            found.torn = torn

    def checkpoint(self, fd: int, st: os.stat_result, rebuilt_at: float) -> Checkpoint:
        """Keys cover the file up to here."""
        tail = index.tail_digest(fd, self.offset)
        return Checkpoint(st.st_dev, st.st_ino, self.offset, self.lines, self.bad_lines, tail, rebuilt_at)

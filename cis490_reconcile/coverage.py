"""Which episodes the index covers: the state database kept in step with
index.jsonl, and the questions a pass and status ask of it.

Keeping up. The index is append-only, so the database remembers how far it
has read (the checkpoint) and reads on from there: a pass costs the rows
appended since the last one. The checkpoint is trusted only while the file is
the one it read: the same device and inode, at least as long, and the same 4
KiB before the offset. A replaced, truncated or rewritten index is read again
from the start (`rebuild`), as is the whole index on a full pass. A rebuild
stages every key in a temporary table and inserts them sorted, in the
transaction that saves the new checkpoint. Parsing a row is Python and holds
the GIL, so an index over SPLIT_MIN_BYTES is parsed in two halves at once,
the second by a forked process staging into a scratch file that is merged in
that transaction (2M rows: 22.3 s -> 13.8 s; json.loads of every line takes
10.8 s; re-measure: tests/bench/run.py --only scale).

Asking. "Is this episode indexed?" is a point lookup (about 15 us) or, for a
host directory listed whole, a merge of the sorted listing with the host's
keys in digest order (about 0.4 us a key): `listing` picks the cheaper by
the host's row count. A row without host_id covers its episode on every host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import basics, index, retention, syscalls
from .index import BadLine, Row, TornTail
from .state import Checkpoint, HostRows, Key, SplitPart, State

COMMIT_ROWS = 50_000  # keys per transaction while catching up
STAGE_BATCH = 20_000  # keys a rebuild stages at a time (about 3 MB)
# a rebuild reads half of an index this large in a forked process (the concurrency tests lower it)
SPLIT_MIN_BYTES = int(os.environ.get("CIS490_TEST_SPLIT_MIN_BYTES") or 64 << 20)
MAX_BAD_LINES = 1000  # bad lines a catch-up hands back (for events); the count is complete
_POINT_US, _SCAN_US = 15.0, 0.4  # measured costs of a lookup and of a key merged
_blake2b, _fromisoformat = hashlib.blake2b, datetime.fromisoformat  # bound once: per-row calls


def digest(episode_id: str) -> bytes:
    """12 bytes of BLAKE2b of the episode_id's UTF-8 (the surrogates only a
    bad row can hold pass through). Called once a row on a full pass."""
    try:
        raw = episode_id.encode()
    except UnicodeEncodeError:
        raw = episode_id.encode("utf-8", "surrogatepass")
    return _blake2b(raw, digest_size=12).digest()


def received_seconds(value: object) -> int | None:
    """received_at_wall as unix seconds; None when absent or not a timestamp.
    A timestamp without a zone is UTC, as the receiver writes them. Called
    once a row on a full pass: the common case is one fromisoformat."""
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


@dataclass
class CatchUp:
    """What one catch-up found."""

    rows: int = 0  # rows read (new keys and duplicates)
    bad: list[BadLine] = field(default_factory=list)  # bad lines read now
    torn: TornTail | None = None
    rebuilt: bool = False  # read from the start
    replaced: bool = False  # ... because the file is not the one the checkpoint read


@dataclass(frozen=True, slots=True)
class Listing:
    """A host directory's episodes against the index."""

    unindexed: list[str]
    matched: int  # listed episodes with a row of this host
    matched_older: int  # ... received before the cutoff
    rows: HostRows  # the host's rows, counted against the same cutoff

    @property
    def orphans(self) -> tuple[int, int]:
        return orphans(self.rows, self.matched, self.matched_older)


def orphans(rows: HostRows, matched: int = 0, matched_older: int = 0) -> tuple[int, int]:
    """(missing, pruned): a host's rows that no listed tarball matches (all
    of them when its directory is gone), pruned when received before the
    cutoff `rows` was counted against (gone by design), else missing."""
    pruned = rows.older - matched_older
    return rows.rows - matched - pruned, pruned


class _Reader:
    """One read of index lines, in batches of keys. It keeps the position
    after the last whole line and the count of bad lines (what a checkpoint
    needs), stops at a torn tail, and keeps only the first MAX_BAD_LINES bad
    lines: a file of nothing but garbage costs no more memory than a row."""

    def __init__(
        self, key: Callable[[Row], Key], found: CatchUp, offset: int = 0, lines: int = 0, bad_lines: int = 0
    ) -> None:
        self.key = key
        self.found = found
        self.offset, self.lines, self.bad_lines = offset, lines, bad_lines

    def batches(
        self, entries: Iterable[Row | BadLine | TornTail], size: int
    ) -> Iterator[tuple[list[Key], list[BadLine]]]:
        """(keys, bad lines kept) every `size` keys, and once at the end."""
        found, key = self.found, self.key
        keys: list[Key] = []
        bad: list[BadLine] = []
        last: Row | BadLine | None = None  # the position is taken from it at each batch
        for entry in entries:
            if isinstance(entry, Row):  # first: nearly every line is one
                keys.append(key(entry))
                last = entry
                if len(keys) >= size:
                    found.rows += len(keys)
                    self.lines, self.offset = last.line, last.end
                    yield keys, bad
                    keys, bad = [], []
                continue
            if isinstance(entry, TornTail):
                found.torn = entry
                break
            last = entry
            self.bad_lines += 1
            if len(found.bad) < MAX_BAD_LINES:
                found.bad.append(entry)
                bad.append(entry)
        found.rows += len(keys)
        if last is not None:
            self.lines, self.offset = last.line, last.end
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


class Coverage:
    def __init__(self, state: State) -> None:
        self.state = state
        self._hosts = state.keys.host_ids()
        self._add_host = state.keys.add_host  # a forked reader gives provisional ids instead
        self.base_duplicates: dict[int, int] = {}  # rows of the tail that repeat a key of the base
        self.torn: Row | None = None  # a complete row that only lacks its "\n": indexed, to be safe

    # --- reading the index ------------------------------------------------------------

    def catch_up(self, fd: int, full: bool, on_progress: Callable[[], None] = lambda: None) -> CatchUp:
        """Read what the index gained since the checkpoint; everything when
        `full`, or when the checkpoint does not fit this file (or there is none)."""
        st = os.fstat(fd)
        cp = self.state.keys.checkpoint(self.state.last)
        fits = cp is not None and self._fits(fd, st, cp)
        if cp is not None and fits and not full:
            found = self._read_on(fd, st, cp, on_progress)
        else:
            if self.state.base:  # the base's keys are of no use: read it all into ours
                self.state.detach_base()
            found = self._rebuild(fd, st, on_progress, replaced=cp is not None and not fits)
        self.torn = found.torn.row if found.torn is not None else None
        return found

    @staticmethod
    def _fits(fd: int, st: os.stat_result, cp: Checkpoint) -> bool:
        return (
            (st.st_dev, st.st_ino) == (cp.index_dev, cp.index_ino)
            and st.st_size >= cp.offset
            and index.tail_digest(fd, cp.offset) == cp.tail_sha256
        )

    def host_id(self, name: str | None) -> int:
        """The host's id in the database, added if new (None: rows without host_id)."""
        if name is None:
            return 0
        host = self._hosts.get(name)
        if host is None:
            host = self._hosts[name] = self._add_host(name)
        return host

    def known_host(self, name: str) -> int | None:
        return self._hosts.get(name)

    def _key(self, row: Row) -> Key:
        name = row.host_id
        host = 0 if name is None else self._hosts.get(name)  # inline: once a row on a full pass
        if host is None:
            host = self.host_id(name)
        return (host, digest(row.episode_id), row.offset, received_seconds(row.received_at_wall))

    def _read_on(
        self, fd: int, st: os.stat_result, cp: Checkpoint, on_progress: Callable[[], None]
    ) -> CatchUp:
        reader = _Reader(self._key, CatchUp(), cp.offset, cp.lines, cp.bad_lines)
        saved = cp.offset
        for keys, bad in reader.batches(index.entries(fd, cp.offset, st.st_size, cp.lines), COMMIT_ROWS):
            if reader.offset == saved:
                continue  # nothing read since the last commit
            with self.state.transaction():
                self.state.keys.add(self._without_base(keys) if self.state.base else keys)
                basics.step("in_transaction")
                self.state.keys.add_bad_lines((b.line, b.offset, b.reason) for b in bad)
                self.state.keys.save_checkpoint(reader.checkpoint(fd, st, cp.rebuilt_at))
            saved = reader.offset
            on_progress()
        return reader.found

    def _without_base(self, keys: list[Key]) -> list[Key]:
        """Tail rows whose key the base already has are duplicates of it."""
        kept = []
        for key in keys:
            if self.state.keys.in_base(key[0], key[1]):
                self.base_duplicates[key[0]] = self.base_duplicates.get(key[0], 0) + 1
            else:
                kept.append(key)
        return kept

    def _rebuild(
        self, fd: int, st: os.stat_result, on_progress: Callable[[], None], replaced: bool
    ) -> CatchUp:
        """Read the whole index into new keys. Parsing is Python, bound to
        one core, so the second half of a large index is read at the same
        time by a forked process (_ForkedPart); if that fails, it is read
        here. (Staging in a thread while parsing did not help: SQLite needs
        the GIL to bind every key. 2M rows: 21.2 s against 20.6 inline.)"""
        reader = _Reader(self._key, CatchUp(rebuilt=True, replaced=replaced))
        split = _split_point(fd, st.st_size)
        with self.state.keys.rebuilding(), contextlib.ExitStack() as stack:
            part = None if split is None else stack.enter_context(_ForkedPart(self, fd, split, st.st_size))
            basics.step("forked")
            _stage(reader, index.entries(fd, 0, split or st.st_size), self.state.keys.stage, on_progress)
            if part is not None:
                hosts = part.join(reader, on_progress)
                basics.step("split_joined")
                if hosts is None:  # the child failed: read its part here
                    rest = index.entries(fd, part.start, st.st_size, reader.lines_before(fd, part.start))
                    _stage(reader, rest, self.state.keys.stage, on_progress)
                else:
                    stack.enter_context(self.state.keys.attached_split(part.path, hosts))
            with self.state.transaction():
                self.state.keys.replace()
                basics.step("rebuilding")
                self.state.keys.add_bad_lines((b.line, b.offset, b.reason) for b in reader.found.bad)
                self.state.keys.save_checkpoint(reader.checkpoint(fd, st, time.time()))
                if replaced:
                    self.state.records.forget_memos()
        return reader.found

    # --- asking ---------------------------------------------------------------------

    def covered(self, keys: Sequence[tuple[str, str]]) -> list[bool]:
        """For each (host_id, episode_id): a row with this key, or a row
        without host_id for the episode? A few queries for the lot."""
        digests = [digest(episode_id) for _, episode_id in keys]
        by_host: dict[str, list[bytes]] = {}
        for (host_id, _), d in zip(keys, digests, strict=True):
            by_host.setdefault(host_id, []).append(d)
        present = {
            host_id: self.state.keys.present(host, ds)
            for host_id, ds in by_host.items()
            if (host := self._hosts.get(host_id)) is not None
        }
        anyone = self.state.keys.present(0, digests) if self.state.keys.has_host_rows(0) else set()
        return [
            d in anyone or d in present.get(host_id, ()) or self._torn_covers(host_id, episode_id)
            for (host_id, episode_id), d in zip(keys, digests, strict=True)
        ]

    def first_row(self, host_id: str, episode_id: str) -> int | None:
        """Where the first row that covers this episode starts: the host's
        own, else one without host_id, else the torn last line; None when
        the index has none (the same rule as `covered`)."""
        d = digest(episode_id)
        for host in (self._hosts.get(host_id), 0):
            if host is not None and (offset := self.state.keys.first_row(host, d)) is not None:
                return offset
        torn = self.torn
        return torn.offset if torn is not None and self._torn_covers(host_id, episode_id) else None

    def _torn_covers(self, host_id: str, episode_id: str) -> bool:
        torn = self.torn
        return torn is not None and torn.episode_id == episode_id and torn.host_id in (host_id, None)

    def listing(self, host_id: str, names: Iterable[str], cutoff: float | None) -> Listing:
        """The listed episodes the index lacks, and how many it has."""
        names = list(names)
        host = self._hosts.get(host_id)
        rows = self.host_rows(host_id, cutoff)
        matched = matched_older = 0
        unindexed: list[str] = []
        if host is None or not rows.rows:
            unindexed = names
        elif len(names) * _POINT_US < rows.rows * _SCAN_US:
            for name in names:
                received = self.state.keys.has(host, digest(name))
                if received is False:
                    unindexed.append(name)
                else:
                    matched += 1
                    matched_older += retention.older(received, cutoff)
        else:
            listed = sorted((digest(name), name) for name in names)
            keys = iter(self.state.keys.digests(host))
            key = next(keys, None)
            for d, name in listed:
                while key is not None and key[0] < d:
                    key = next(keys, None)
                if key is not None and key[0] == d:
                    matched += 1
                    matched_older += retention.older(key[1], cutoff)
                else:
                    unindexed.append(name)
            unindexed.sort()
        if unindexed and self.state.keys.has_host_rows(0):
            unindexed = [name for name in unindexed if self.state.keys.has(0, digest(name)) is False]
        if self.torn is not None:
            unindexed = [name for name in unindexed if not self._torn_covers(host_id, name)]
        return Listing(unindexed, matched, matched_older, rows)

    def host_rows(self, host_id: str, cutoff: float | None) -> HostRows:
        host = self._hosts.get(host_id)
        if host is None:
            return HostRows(0, 0, 0)
        found = self.state.keys.host_rows(host, cutoff)
        extra = self.base_duplicates.get(host, 0)
        return HostRows(found.rows, found.duplicates + extra, found.older)

    def host_names(self) -> dict[str, int]:
        return dict(self._hosts)


# --- a rebuild's second half, read in a forked process ------------------------------


def _stage(
    reader: _Reader,
    entries: Iterable[index.Entry],
    stage: Callable[[Sequence[Key]], None],
    on_progress: Callable[[], None],
) -> None:
    """Every key of `entries`, STAGE_BATCH at a time, for a rebuild (by this
    process into its temporary table, or by the forked one into a SplitPart)."""
    for keys, _ in reader.batches(entries, STAGE_BATCH):
        stage(keys)
        on_progress()


def _split_point(fd: int, size: int) -> int | None:
    """Where the forked part of a rebuild starts: after the first newline
    past the middle. None for an index too small to be worth a process, with
    no newline in the 1 MiB after the middle, or while another thread runs
    (the verifying pool's, when a commit finds the index replaced): a fork
    then could inherit a lock that thread holds."""
    if size < SPLIT_MIN_BYTES or threading.active_count() > 1:
        return None
    middle = size // 2
    after = os.pread(fd, index.MAX_LINE_BYTES + 1, middle).find(b"\n")
    return None if after < 0 or middle + after + 1 >= size else middle + after + 1


class _ForkedPart:
    """Bytes [start, end) of the index, parsed by a forked process into a
    SplitPart while this one parses the bytes before. The child writes a
    "." for each batch it staged (progress: the watchdog is fed only while
    it moves), then its reader's summary as one JSON line. Leaving the
    context kills the child if it still runs and removes the file."""

    def __init__(self, coverage: Coverage, fd: int, start: int, end: int) -> None:
        self.coverage, self.fd, self.start, self.end = coverage, fd, start, end
        self.path = coverage.state.keys.split_path()
        self.child = syscalls.fork_child(self._read)

    def __enter__(self) -> _ForkedPart:
        return self

    def __exit__(self, *_: object) -> None:
        self.child.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _read(self, out_fd: int) -> None:
        """In the child. Hosts the state does not know get provisional ids
        (-1, -2, ...): only the parent writes to the state database."""
        provisional: dict[str, int] = {}
        self.coverage._add_host = lambda name: provisional.setdefault(name, -1 - len(provisional))
        part = SplitPart(self.path)
        reader = _Reader(self.coverage._key, CatchUp(), self.start)
        with os.fdopen(out_fd, "wb") as out:

            def progress() -> None:
                out.write(b".")
                out.flush()

            _stage(reader, index.entries(self.fd, self.start, self.end), part.stage, progress)
            part.close()
            out.write(json.dumps({**reader.summary(), "hosts": provisional}).encode() + b"\n")

    def join(self, reader: _Reader, on_progress: Callable[[], None]) -> dict[int, int] | None:
        """Wait for the child and go on with `reader` after its part. The
        provisional host ids mapped to the state's; None if the child failed
        (the caller reads the part itself)."""
        out = b""
        while (data := self.child.read(1.0)) != b"":
            if data is not None:
                out += data
                on_progress()
        if not self.child.succeeded() or not out.endswith(b"\n"):
            return None
        part = json.loads(out.lstrip(b"."))
        reader.add(part, self.fd, self.start, self.end)
        return {provisional: self.coverage.host_id(name) for name, provisional in part["hosts"].items()}

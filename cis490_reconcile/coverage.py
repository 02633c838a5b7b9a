"""Which episodes the index covers: the state database kept in step with
index.jsonl, and the questions a pass and status ask of it.

Keeping up. The index is append-only, so the database remembers how far it
has read (the checkpoint) and reads on from there: a pass costs the rows
appended since the last one. The checkpoint is trusted only while the file is
the one it read: the same device and inode, at least as long, and the same 4
KiB before the offset. A replaced, truncated or rewritten index is read again
from the start, as is the whole index on a full pass (rebuild.py: on both
cores, into new keys, in the transaction that saves the new checkpoint).

Asking. "Is this episode indexed?" is a point lookup (about 15 us) or, for a
host directory listed whole, a merge of the sorted listing with the host's
keys in digest order (about 0.4 us a key): `listing` picks the cheaper by
the host's row count. A row without host_id covers its episode on every host.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from . import basics, index, retention, syscalls
from .indexkeys import CatchUp, KeyOf, KeyReader, digest
from .rebuild import rebuild
from .state import EXAMPLES, Checkpoint, HostRows, Key, State

if TYPE_CHECKING:
    from .rows import Row

COMMIT_ROWS = 50_000  # keys per transaction while catching up
_POINT_US, _SCAN_US = 15.0, 0.4  # measured costs of a lookup and of a key merged


class Listing(NamedTuple):
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


class NotReadOn(Exception):
    """The index is not the one the checkpoint was read from (replaced since)."""


class Coverage:
    def __init__(self, state: State) -> None:
        self.state = state
        self._key = KeyOf(state.keys.host_ids(), state.keys.add_host)
        self._hosts = self._key.hosts
        self.base_duplicates: dict[int, int] = {}  # rows of the tail that repeat a key of the base
        self.base_duplicated: dict[tuple[int, bytes], int] = {}  # ... of the first EXAMPLES keys, to name
        self.torn: Row | None = None  # a complete row that only lacks its "\n": indexed, to be safe

    # --- reading the index ------------------------------------------------------------

    def catch_up(
        self, fd: int | None, full: bool, on_progress: Callable[[], None] = lambda: None, whole: bool = True
    ) -> CatchUp:
        """Read what the index gained since the checkpoint; everything when
        `full`, or when the checkpoint does not fit this file (or there is
        none). Without `whole` (under the index lock, which must stay short)
        raises NotReadOn instead of reading the whole index. `fd` None: there
        is no index file (moved away, deleted, not made yet), so no row,
        whatever the checkpoint's file held: an empty file is read instead."""
        # a reader's own checkpoint once it has read on from the base's: never the same rows twice
        cp = self.state.keys.checkpoint() or self.state.keys.checkpoint(self.state.last)
        if fd is None:  # its checkpoint (at offset 0) lets the next pass read on, not start over
            empty = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return self.catch_up(empty, full, on_progress, whole)
            finally:
                os.close(empty)
        st = os.fstat(fd)
        fits = cp is not None and self._fits(fd, st, cp)
        if cp is not None and fits and not full:
            found = self._read_on(fd, st, cp, on_progress)
        elif not whole:
            raise NotReadOn
        else:
            if self.state.base:  # the base's keys are of no use: read it all into ours
                self.state.detach_base()
            found = rebuild(self.state, self._key, fd, st, on_progress, replaced=cp is not None and not fits)
        self.torn = found.torn.row if found.torn is not None else None
        return found

    @staticmethod
    def _fits(fd: int, st: os.stat_result, cp: Checkpoint) -> bool:
        """Whether reading on from `cp` reads every row of this file. One at
        offset 0 (no index yet, or an empty one) fits any file: reading on
        is reading it all, and no row was known to forget."""
        return (
            (cp.offset == 0 or (st.st_dev, st.st_ino) == (cp.index_dev, cp.index_ino))
            and st.st_size >= cp.offset
            and index.tail_digest(fd, cp.offset) == cp.tail_sha256
        )

    def host_id(self, name: str | None) -> int:
        """The host's id in the database, added if new (None: rows without host_id)."""
        return self._key.host(name)

    def known_host(self, name: str) -> int | None:
        return self._hosts.get(name)

    def _read_on(
        self, fd: int, st: os.stat_result, cp: Checkpoint, on_progress: Callable[[], None]
    ) -> CatchUp:
        reader = KeyReader(self._key, CatchUp(), cp.offset, cp.lines, cp.bad_lines)
        if st.st_size == cp.offset:
            return reader.found  # nothing appended since
        saved = cp.offset
        for keys, bad in reader.batches(index.chunks(fd, cp.offset, st.st_size, cp.lines), COMMIT_ROWS):
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

    def appended(
        self, fd: int, start: int, lines: Sequence[bytes], rows: Sequence[Mapping[str, object]]
    ) -> bool:
        """Rows this process appended at `start`, a whole line each, into
        the keys without reading them back (the same KeyOf: the same key a
        read gives): only when the checkpoint is exactly at `start` of this
        very file and our lines are the bytes there (a writer the lock did
        not stop may have appended first: its row would go unkeyed, and the
        checkpoint land inside a line); False, and nothing done, otherwise."""
        st = os.fstat(fd)
        cp = self.state.keys.checkpoint()
        if (
            self.state.base
            or cp is None
            or (cp.index_dev, cp.index_ino, cp.offset) != (st.st_dev, st.st_ino, start)
        ):
            return False
        data = b"".join(lines)
        if syscalls.pread_exact(fd, len(data), start) != data:
            return False
        from .rows import Row  # here, after an append: a pass that appends nothing need not load msgspec

        offsets = list(itertools.accumulate(map(len, lines), initial=start))
        written = [
            Row(
                episode_id=str(row["episode_id"]),
                host_id=str(row["host_id"]),
                received_at_wall=row.get("received_at_wall"),
            )
            for row in rows
        ]
        keys = self._key.many(written, offsets)
        end = offsets[-1]
        tail = index.tail_digest(fd, end)
        with self.state.transaction():
            self.state.keys.add(keys)
            basics.step("in_transaction")
            lines_now = cp.lines + len(lines)
            self.state.keys.save_checkpoint(
                Checkpoint(st.st_dev, st.st_ino, end, lines_now, cp.bad_lines, tail, cp.rebuilt_at)
            )
        return True

    def _without_base(self, keys: list[Key]) -> list[Key]:
        """Tail rows whose key the base already has are duplicates of it."""
        kept = []
        for key in keys:
            if self.state.keys.in_base(key[0], key[1]):
                self.base_duplicates[key[0]] = self.base_duplicates.get(key[0], 0) + 1
                named = (key[0], key[1])
                if named in self.base_duplicated or len(self.base_duplicated) < EXAMPLES:
                    self.base_duplicated[named] = self.base_duplicated.get(named, 0) + 1
            else:
                kept.append(key)
        return kept

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

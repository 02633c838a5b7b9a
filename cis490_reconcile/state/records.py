"""What a pass leaves for the next one and for status: each host
directory's memo (its times when listed, the episodes it left unresolved),
tarballs found unverifiable, the orphan counts of the last full pass, named
JSON records (the last pass, the last scrub, the scrub's cursor), and the
runs of index lines a scrub found pruned."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .connection import Database


class PrunedRun(NamedTuple):
    """Index lines [start, end) a scrub found all pruned (migrations/0003.sql)."""

    start: int
    end: int
    lines: int
    rows: int
    newest: int  # unix seconds: the latest received_at_wall among them
    index_dev: int
    index_ino: int
    tail_sha256: bytes  # of the index's 4 KiB before `end`


class Unverified(NamedTuple):
    """A tarball found unverifiable, as it was then."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    limits: str  # verify.Decoding.key
    reason: str


Memo = tuple[int | None, int | None, Sequence[str]]  # a host directory's (mtime_ns, ctime_ns, unresolved)
NO_MEMO: Memo = (None, None, ())


class Records:
    def __init__(self, database: Database) -> None:
        self.database = database

    @property
    def db(self) -> sqlite3.Connection:
        return self.database.db

    # --- host directories -------------------------------------------------------

    def memos(self) -> dict[int, Memo]:
        """Every host's memo, read at once: a pass looks at each host's."""
        unresolved: dict[int, list[str]] = {}
        for host, episode in self.db.execute("SELECT host, episode_id FROM unresolved"):
            unresolved.setdefault(host, []).append(episode)
        hosts = self.db.execute("SELECT id, dir_mtime_ns, dir_ctime_ns FROM hosts")
        return {host: (mtime, ctime, unresolved.get(host, ())) for host, mtime, ctime in hosts}

    def save_memo(
        self, host: int, before: Memo, times: tuple[int, int] | None, unresolved: Iterable[str]
    ) -> None:
        """Only what changed since `before` (the host's memo in memos()): a
        pass with nothing to do writes nothing."""
        mtime, ctime, was = before
        unresolved = sorted(unresolved)
        if (mtime, ctime) != (times or (None, None)):
            self.db.execute(
                "UPDATE hosts SET dir_mtime_ns = ?, dir_ctime_ns = ? WHERE id = ?",
                (*(times or (None, None)), host),
            )
        if sorted(was) != unresolved:
            self.db.execute("DELETE FROM unresolved WHERE host = ?", (host,))
            self.db.executemany("INSERT INTO unresolved VALUES (?, ?)", [(host, e) for e in unresolved])

    def forget_memos(self) -> None:
        """After the index was replaced: what the memos assumed indexed may not be."""
        self.db.execute("UPDATE hosts SET dir_mtime_ns = NULL, dir_ctime_ns = NULL")

    def save_orphans(self, host: int, missing: int, pruned: int) -> None:
        self.db.execute(
            "UPDATE hosts SET missing_rows = ?, pruned_rows = ? WHERE id = ?", (missing, pruned, host)
        )

    def orphans(self) -> tuple[int, int] | None:
        """(missing, pruned) rows without a tarball, as of the last full pass."""
        row = self.db.execute(
            "SELECT total(missing_rows), total(pruned_rows), count(missing_rows) FROM hosts"
        ).fetchone()
        return None if not row[2] else (int(row[0]), int(row[1]))

    # --- verdicts -------------------------------------------------------------------

    # Read from what the last pass left: a view's base too, so a dry run and status know them.

    def unverified_hosts(self) -> set[int]:
        """Hosts with a remembered unverifiable tarball (few): the others need no lookup."""
        table = f"{self.database.last}.unverifiable"
        return {host for (host,) in self.db.execute(f"SELECT DISTINCT host FROM {table}")}

    def unverified(self, host: int, episode_id: str) -> Unverified | None:
        row = self.db.execute(
            "SELECT dev, ino, size, mtime_ns, ctime_ns, limits, reason "
            f"FROM {self.database.last}.unverifiable WHERE host = ? AND episode_id = ?",
            (host, episode_id),
        ).fetchone()
        return None if row is None else Unverified(*row)

    def save_unverified(self, host: int, episode_id: str, u: Unverified | None) -> None:
        """Remember (or, with None, forget) a tarball's unverifiable verdict."""
        self.db.execute("DELETE FROM unverifiable WHERE host = ? AND episode_id = ?", (host, episode_id))
        if u is not None:
            self.db.execute(
                "INSERT INTO unverifiable VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (host, episode_id, u.dev, u.ino, u.size, u.mtime_ns, u.ctime_ns, u.limits, u.reason),
            )

    # --- named records ---------------------------------------------------------------

    def get(self, name: str, schema: str = "main") -> dict[str, object] | None:
        row = self.db.execute(f"SELECT value FROM {schema}.records WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    def save(self, name: str, value: dict[str, object]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO records VALUES (?, ?)", (name, json.dumps(value, sort_keys=True))
        )

    # --- scrub's pruned runs ---------------------------------------------------------------

    _RUN = 'SELECT start, "end", lines, rows, newest, index_dev, index_ino, tail_sha256 FROM scrub_pruned'
    _OF_INDEX = "index_dev = ? AND index_ino = ?"

    def pruned_runs(self, index_dev: int, index_ino: int, after: int, limit: int) -> list[PrunedRun]:
        """This index's runs that start after offset `after`, in index order,
        at most `limit` (a page: start is the table's rowid)."""
        sql = f"{self._RUN} WHERE start > ? AND {self._OF_INDEX} ORDER BY start LIMIT ?"
        return [PrunedRun(*row) for row in self.db.execute(sql, (after, index_dev, index_ino, limit))]

    def pruned_run_before(self, index_dev: int, index_ino: int, offset: int) -> PrunedRun | None:
        """This index's run that starts last before `offset`."""
        sql = f"{self._RUN} WHERE start < ? AND {self._OF_INDEX} ORDER BY start DESC LIMIT 1"
        row = self.db.execute(sql, (offset, index_dev, index_ino)).fetchone()
        return None if row is None else PrunedRun(*row)

    def save_pruned_runs(
        self, runs: Iterable[PrunedRun], forget: Iterable[int] = (), only_index: tuple[int, int] | None = None
    ) -> None:
        """Add or replace runs (by start); forget those starting at `forget`,
        and with `only_index` every run of another index."""
        if only_index is not None:
            self.db.execute(f"DELETE FROM scrub_pruned WHERE NOT ({self._OF_INDEX})", only_index)
        self.db.executemany("DELETE FROM scrub_pruned WHERE start = ?", ((start,) for start in forget))
        self.db.executemany("INSERT OR REPLACE INTO scrub_pruned VALUES (?, ?, ?, ?, ?, ?, ?, ?)", runs)

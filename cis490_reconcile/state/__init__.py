"""The state database: everything a pass remembers, in one SQLite file, and
every query on it. Nothing else in the package writes SQL.

``<state_dir>/state.sqlite3`` holds what the index covers (one key per
(host_id, episode_id)), how far the index has been read (the checkpoint),
what each host directory looked like when last listed, tarballs found
unverifiable, the orphan counts of the last full pass, and records (the last
pass, the last scrub, the scrub's cursor). Read it with the sqlite3 CLI:

    sqlite3 -readonly /var/lib/cis490-reconcile/state.sqlite3 \\
        'SELECT name, missing_rows, pruned_rows FROM hosts'

The package, by what each module owns:

    connection.py   the file: opening, the schema (migrations/0001.sql and on
                    say what each table and column means), transactions
    keys.py         what the index covers (``state.keys``), and rebuilding it
    records.py      what a pass leaves for the next (``state.records``)

`PRAGMA user_version` is the number of migrations run, `PRAGMA
application_id` marks the file as ours; a file of another program, of a
newer schema or for another store is not used (StateUnusable).

Concurrency: WAL mode, so readers (status, opened read-only) never block the
writer nor are blocked by it; every change is an explicit transaction, and the
checkpoint is committed in the same transaction as the keys it covers, so a
kill -9 at any moment leaves a file consistent in itself (re-measure:
tests/test_crash.py). One pass at a time holds the state directory's flock.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .connection import FILE_NAME, Database, StateUnusable, split_path
from .keys import EXAMPLES, Checkpoint, HostRows, Key, Keys, SplitPart
from .records import Records, Unverified

__all__ = [
    "EXAMPLES",
    "FILE_NAME",
    "Checkpoint",
    "HostRows",
    "Key",
    "SplitPart",
    "State",
    "StateUnusable",
    "Unverified",
    "split_path",
]


class State(Database):
    """One open state database: its keys and its records."""

    def __init__(self, db: sqlite3.Connection) -> None:
        super().__init__(db)
        self.keys = Keys(self)
        self.records = Records(self)

    @classmethod
    def open(cls, path: Path | str, episodes_root: str, index_path: str, readonly: bool = False) -> State:
        """Open (creating and migrating as needed) the state of this store.
        Raises StateUnusable, or OSError/sqlite3.OperationalError when the
        file cannot be opened at all (permissions, a read-only directory)."""
        return cls(cls.connect(path, episodes_root, index_path, readonly))

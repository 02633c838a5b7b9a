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

Who may write what. One rule: only the holder of the state directory's lock
(an exclusive flock on the directory itself, statedir.owned) creates,
replaces or deletes files there: the database (made, migrated, or rebuilt
when unusable), the scratch files of a rebuild on two processes
(state.sqlite3-stage, -split and -sorted: connection.Scratch), the files of
earlier versions. Everyone else writes only in short transactions that
cannot disturb the holder, or not at all.
Each opener says which it is (connection.Access):

    OWNER   a pass, for the whole pass (statedir.owned)
    GUEST   scrub (its cursor, every few seconds of a run that may last
            hours) and the outcome sinks (the last_pass and last_scrub
            records): statedir.guest
    READER  status, check and dry runs (statedir.view)

The races, and how each is handled:

1. Two passes at once (the timer's and one by hand): the second waits for
   the flock up to lock_timeout, then fails in one line (StateBusy). There
   is never more than one owner.
2. A guest writes while a pass runs: WAL admits one writer at a time, and a
   guest's write is one BEGIN IMMEDIATE ... COMMIT of a few rows, which
   waits up to the busy timeout (30 s) for the pass's transaction to end.
   The pass's longest is the one that replaces the keys after a rebuild; a
   guest that waits longer gives up with a warning (scrub_cursor_save_failed,
   state_record_failed), never the pass, which waits at most for one short
   guest write.
3. A guest starts while a pass rebuilds: the rebuild's scratch files are
   the pass's. A guest never opens them, and only an owner removes them (as
   the leftovers of a killed owner, when it opens the database), so a scrub
   can no longer delete the scratch files of a rebuild under way and fail it.
4. A guest finds no database, an older schema or a damaged file: it does not
   make, migrate or rebuild it. A sink gives up with a warning; the scrub,
   which needs its cursor, takes the directory's lock like a pass for as long
   as that takes (waiting up to lock_timeout for a running pass, then failing
   in one line), then writes as a guest again.
5. An owner rebuilds a damaged database that a guest holds open: the guest's
   connection keeps the removed file, and its later writes go with it (the
   next scrub starts a new round; the next run writes its record again).
6. Readers never block the writer nor are blocked by it (WAL); one that
   finds an older schema ignores the file (state_ignored) and reads the
   whole index. A reader sees the state of one moment: one read
   transaction for its whole run (Database.attach_base), or a pass that
   commits meanwhile would give it a new checkpoint with the old counts,
   and rows counted twice would be called missing. Meanwhile the WAL is
   not reset past that moment: it grows by what passes write until the
   reader ends. SQLite may create its -wal and -shm files beside the
   database for a reader: they are SQLite's, not ours.
7. kill -9 of an owner: the kernel drops the flock; the checkpoint is
   committed in the same transaction as the keys it covers, so the file is
   consistent in itself (re-measure: tests/test_crash.py); the next owner
   removes the scratch files the killed rebuild left.
8. kill -9 of a guest in a transaction: SQLite rolls it back; the scrub's
   cursor is then its previous save, a few seconds back.

tests/test_concurrency.py runs every pair of commands at once on one state
directory and proves each of these.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .connection import FILE_NAME, Access, Database, Scratch, StateUnusable, damaged
from .keys import EXAMPLES, Checkpoint, HostRows, Keys
from .records import NO_MEMO, Memo, PrunedRun, Records, Unverified
from .split import Key, SplitPart

__all__ = [
    "EXAMPLES",
    "FILE_NAME",
    "NO_MEMO",
    "Access",
    "Checkpoint",
    "HostRows",
    "Key",
    "Memo",
    "PrunedRun",
    "Records",
    "Scratch",
    "SplitPart",
    "State",
    "StateUnusable",
    "Unverified",
    "damaged",
]


class State(Database):
    """One open state database: its keys and its records."""

    def __init__(self, db: sqlite3.Connection) -> None:
        super().__init__(db)
        self.keys = Keys(self)
        self.records = Records(self)

    @classmethod
    def open(
        cls, path: Path | str, episodes_root: str, index_path: str, access: Access = Access.OWNER
    ) -> State:
        """The state of this store, opened as `access` allows (Database.connect)."""
        return cls(cls.connect(path, episodes_root, index_path, access))

"""A rebuild's keys staged and counted, and the forked reader's part.

A rebuild on two processes (rebuild.py) works in three scratch files beside
the state file (connection.Scratch), neither journaled nor synced: a pass
killed meanwhile leaves them, and the next owner's open removes them.

    stage   the pass stages its part of the index here (Keys.rebuilding)
    split   the forked reader stages its part and its Tally here (SplitPart)
    sorted  the forked reader sorts the keys of the upper hosts here

Each file has one writer at a time, and nobody reads one while it is written
(SQLite without a journal takes an exclusive lock to write): both processes
stage, each into its own file; the reader commits its part and hands it
over; the pass makes `sorted` (empty) and attaches it; then both read both
staging files, the pass sorting the keys of the hosts below a boundary
(keys.LOWER_SHARE of the rows) straight into a new keys table, the reader
those from the boundary up into `sorted`. Keys of one host are in one half,
so the halves follow each other in key order, and the pass adds the upper
half after its own, in order. The pass's transaction must not lock `sorted`
while the reader writes it: it begins deferred (Keys.replacing), and reads
`sorted` only once the reader said it is done; its cached pages of that file
are dropped then, as SQLite does whenever a file changed under a connection
(its change counter).
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
from collections import Counter
from collections.abc import Callable, Sequence
from operator import floordiv, itemgetter

from .connection import CACHE_KIB, Scratch, reporting

Key = tuple[int, bytes, int, int | None]  # (host, digest, offset, received): a row of the keys table
STAGE_ROWS = 100
STAGING = "(host INTEGER, digest BLOB, offset INTEGER, received INTEGER)"
# the upper hosts' keys in key order (copies of a key stay rows: the keys table counts them)
SORTED = STAGING[:-1] + ", PRIMARY KEY (host, digest, offset)) WITHOUT ROWID"
# the forked reader files a host new to the state under a negative id, until the pass gives it one
MAPPED = (
    "CASE WHEN host < 0 THEN coalesce((SELECT id FROM temp.ids WHERE provisional = host), host) ELSE host END"
)


def both_parts(staged: str, test: str) -> str:
    """The keys staged by both processes (the pass's in `staged`, the forked
    reader's in split.staging, under the ids given) whose host passes
    `test`: "< ?1" for the pass's sort, ">= ?1" for the reader's."""
    return (
        f"SELECT host, digest, offset, received FROM {staged} WHERE host {test} UNION ALL "
        f"SELECT {MAPPED}, digest, offset, received FROM split.staging WHERE {MAPPED} {test}"
    )


def scratch_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    return db


def host_ids(db: sqlite3.Connection, hosts: dict[int, int]) -> None:
    """temp.ids, for MAPPED: provisional id -> id."""
    db.execute("CREATE TEMP TABLE ids (provisional INTEGER PRIMARY KEY, id INTEGER)")
    db.executemany("INSERT INTO temp.ids VALUES (?, ?)", hosts.items())


def insert_keys(db: sqlite3.Connection, table: str, keys: Sequence[Key]) -> None:
    """STAGE_ROWS keys a statement: 1.0 us a key against 5.9 for one
    autocommitted INSERT each (measured, 400k keys)."""
    whole = len(keys) - len(keys) % STAGE_ROWS
    flat = list(itertools.chain.from_iterable(keys[:whole]))
    step = 4 * STAGE_ROWS
    many = f"INSERT INTO {table} VALUES " + ", ".join(["(?, ?, ?, ?)"] * STAGE_ROWS)
    db.executemany(many, (flat[i : i + step] for i in range(0, len(flat), step)))
    db.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?)", keys[whole:])


class Tally:
    """What a rebuild counts as it stages keys: rows per host and per (host,
    hour received). Once the keys are in, less their duplicates, these are
    the hosts' counts and received_hours (Keys.replace). Counted as they are
    staged, in the two processes that parse, they spare an aggregate over
    every key afterwards (a GROUP BY by the hour sorts them all: 1.3 us a
    key, measured at 4M). Counts go to two tables beside the staged keys
    whenever FLUSH_PAIRS (host, hour) pairs are held, so memory stays flat;
    rows in index order span few hours, so that is seldom."""

    FLUSH_PAIRS = 10_000

    def __init__(self, db: sqlite3.Connection, schema: str) -> None:
        self.db = db
        self.hosts, self.hours = f"{schema}.tally_hosts", f"{schema}.tally_hours"
        db.execute(f"CREATE TABLE {self.hosts} (host INTEGER PRIMARY KEY, rows INTEGER NOT NULL)")
        db.execute(
            f"CREATE TABLE {self.hours} (host INTEGER, hour INTEGER, rows INTEGER NOT NULL, "
            "PRIMARY KEY (host, hour)) WITHOUT ROWID"
        )
        self._rows: Counter[int] = Counter()
        self._hours: Counter[tuple[int, int]] = Counter()

    def add(self, keys: Sequence[Key]) -> None:
        """Inside the transaction that stages them (it may write)."""
        hosts = list(map(itemgetter(0), keys))
        self._rows.update(hosts)
        received = list(map(itemgetter(3), keys))
        try:
            plain = min(received, default=0) >= 0
        except TypeError:  # a row without received_at_wall
            plain = False
        if plain:
            self._hours.update(zip(hosts, map(floordiv, received, itertools.repeat(3600)), strict=True))
        else:  # the rule of received_hours: none is not counted, a time before 1970 is hour 0
            pairs = zip(hosts, received, strict=True)
            self._hours.update((h, max(r, 0) // 3600) for h, r in pairs if r is not None)
        if len(self._hours) >= self.FLUSH_PAIRS:
            self.flush()

    def flush(self) -> None:
        """Add what is counted to the tables (in a transaction)."""
        more = "ON CONFLICT DO UPDATE SET rows = rows + excluded.rows"
        self.db.executemany(f"INSERT INTO {self.hosts} VALUES (?, ?) {more}", self._rows.items())
        counted = ((host, hour, n) for (host, hour), n in self._hours.items())
        self.db.executemany(f"INSERT INTO {self.hours} VALUES (?, ?, ?) {more}", counted)
        self._rows.clear()
        self._hours.clear()


class SplitPart:
    """The forked reader's side: its keys and Tally staged in `split`, then
    the upper hosts' keys of both parts sorted into `sorted`. Hosts the
    state does not know yet are filed under negative provisional ids; the
    pass gives them ids at the hand-over."""

    def __init__(self, scratch: Scratch) -> None:
        scratch.remove("split", "sorted")
        self.scratch = scratch
        self.db = scratch_db(scratch.split)
        self.db.execute(f"CREATE TABLE staging {STAGING}")
        self.tally = Tally(self.db, "main")
        self.db.execute("BEGIN")

    def stage(self, keys: Sequence[Key]) -> None:
        insert_keys(self.db, "staging", keys)
        self.tally.add(keys)

    def hand_over(self) -> None:
        """The staged keys and their counts, committed: from here on the
        pass reads this file, and nobody writes it."""
        self.tally.flush()
        self.db.execute("COMMIT")
        self.db.close()

    def sort(self, hosts: dict[int, int], high: int, on_progress: Callable[[], None]) -> None:
        """The keys of both parts whose host (under the ids the pass gave,
        `hosts`: provisional id -> id) is `high` or above, into `sorted` in
        key order; the pass sorts the rest at the same time."""
        with contextlib.closing(scratch_db(self.scratch.sorted)) as db, reporting(db, on_progress):
            db.execute("ATTACH DATABASE ? AS stage", (self.scratch.stage,))
            db.execute("ATTACH DATABASE ? AS split", (self.scratch.split,))
            host_ids(db, hosts)
            db.execute("BEGIN")  # into the table the pass made (Keys.join_split)
            db.execute(
                f"INSERT INTO sorted SELECT * FROM ({both_parts('stage.staging', '>= ?1')}) ORDER BY 1, 2, 3",
                (high,),
            )
            db.execute("COMMIT")

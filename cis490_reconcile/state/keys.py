"""What the index covers: one key per (host, episode_id) it has a row for,
how far it has been read (the checkpoint), the host ids keys are filed
under, the first bad lines, and rebuilding all of it from the whole index
(on two processes: split.py)."""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from operator import itemgetter
from typing import NamedTuple

from .connection import Database, Scratch
from .split import MAPPED, SORTED, STAGING, Key, Tally, both_parts, host_ids, insert_keys

EXAMPLES = 100
# The share of the rows whose keys the pass sorts into the keys table while the forked reader sorts the
# rest, which the pass adds after (0.33 us a key): the two sorts should end together. Measured on 8M rows
# (tests/bench/run.py --only scale): with 0.475 the reader's ended 0.3 s before ours, with 0.46 0.2-0.3 s
# after.
LOWER_SHARE = 0.47
_IN_CHUNK = 400  # digests per IN (...): twice that plus two stays under SQLite's oldest 999-variable limit


class Checkpoint(NamedTuple):
    index_dev: int
    index_ino: int
    offset: int
    lines: int
    bad_lines: int
    tail_sha256: bytes
    rebuilt_at: float


class HostRows(NamedTuple):
    """What the keys say about one host (or, for id 0, about rows without host_id)."""

    rows: int
    duplicates: int
    older: int  # rows received before the cutoff asked for


class Keys:
    """The keys table and what goes with it. With a base attached, its keys count too."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @property
    def db(self) -> sqlite3.Connection:
        return self.database.db

    @property
    def base(self) -> bool:
        return self.database.base

    def _both(self, sql: str) -> str:
        """`sql` over main's keys, plus base's when one is attached."""
        return sql if not self.base else f"{sql} UNION ALL {sql.replace(' keys', ' base.keys')}"

    # --- the checkpoint and host ids -------------------------------------------------

    def checkpoint(self, schema: str = "main") -> Checkpoint | None:
        row = self.db.execute(
            f"SELECT index_dev, index_ino, offset, lines, bad_lines, tail_sha256, rebuilt_at "
            f"FROM {schema}.checkpoint"
        ).fetchone()
        return None if row is None else Checkpoint(*row)

    def save_checkpoint(self, cp: Checkpoint) -> None:
        """Inside the transaction that added the keys it covers."""
        self.db.execute(
            "INSERT OR REPLACE INTO checkpoint VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
            (cp.index_dev, cp.index_ino, cp.offset, cp.lines, cp.bad_lines, cp.tail_sha256, cp.rebuilt_at),
        )

    def host_ids(self) -> dict[str, int]:
        """Host name -> id (bounded by the number of hosts, not rows)."""
        return dict(self.db.execute("SELECT name, id FROM hosts"))

    def add_host(self, name: str) -> int:
        cur = self.db.execute("INSERT INTO hosts (name) VALUES (?)", (name,))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def copy_hosts_from_base(self) -> None:
        self.db.execute("INSERT OR IGNORE INTO hosts (id, name) SELECT id, name FROM base.hosts")

    # --- adding keys -------------------------------------------------------------------

    def add(self, keys: Sequence[Key]) -> None:
        """(host, digest, offset, received) of rows read in index order; a
        key already there counts one more copy."""
        self.db.executemany(
            "INSERT INTO keys (host, digest, offset, received) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (host, digest) DO UPDATE SET copies = copies + 1",
            keys,
        )

    def add_bad_lines(self, bad: Iterable[tuple[int, int, str]]) -> None:
        """(line, offset, reason); only the first EXAMPLES are kept."""
        room = EXAMPLES - self.db.execute("SELECT count(*) FROM bad_lines").fetchone()[0]
        self.db.executemany("INSERT OR IGNORE INTO bad_lines VALUES (?, ?, ?)", list(bad)[: max(room, 0)])

    # --- rebuilding ---------------------------------------------------------------------

    @contextmanager
    def rebuilding(self, scratch: Scratch | None) -> Iterator[None]:
        """Collect every key of the whole index with stage (into a temporary
        table, or into `scratch.stage` for a rebuild on two processes), then
        replace the keys in one transaction (`replacing`)."""
        temporary = [f"temp.{t}" for t in ("staging", "ids", "tally_hosts", "tally_hours")]
        for table in temporary:
            self.db.execute(f"DROP TABLE IF EXISTS {table}")
        try:  # a full disk may fail the staging table: its scratch file goes too
            self._staged = "temp.staging"
            if scratch is not None:
                scratch.remove("stage")
                self._attach_scratch("stage", scratch.stage)
                self._staged = "stage.staging"
            self.db.execute(f"CREATE TABLE {self._staged} {STAGING}")
            self._tally = Tally(self.db, "temp")
            yield
        finally:
            # detached first, and without asking which are attached: a statement reads the schema of
            # every attached file, and one the forked reader left half written (a full disk, no journal)
            # is "malformed", which would fail the fallback and call the state database damaged
            for name in ("stage", "split", "sorted"):
                try:
                    self.db.execute(f"DETACH DATABASE {name}")
                except sqlite3.OperationalError as e:
                    if not str(e).startswith("no such database"):
                        raise
            if scratch is not None:
                scratch.remove("stage")
            for table in temporary:
                self.db.execute(f"DROP TABLE IF EXISTS {table}")

    def _attach_scratch(self, name: str, path: str) -> None:
        """A scratch file, written in order or read once: neither journaled
        nor synced, 1 MiB of cache (SQLite's default of 2 MiB for each of
        the three put the peak RSS of a pass over 8M rows at 63.7 MiB)."""
        self.db.execute(f"ATTACH DATABASE ? AS {name}", (path,))
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "cache_size = -1024"):
            self.db.execute(f"PRAGMA {name}.{pragma}")

    def stage(self, keys: Sequence[Key]) -> None:
        with self.database.transaction():
            insert_keys(self.db, self._staged, keys)
            self._tally.add(keys)

    def join_split(self, scratch: Scratch, hosts: dict[int, int]) -> int:
        """The forked reader's part, handed over (`hosts`: its provisional
        ids -> ids): its counts join ours, and `sorted` is made for the keys
        it sorts. Returns the boundary of the two sorts: the host id below
        which LOWER_SHARE of all rows are."""
        db = self.db
        self._attach_scratch("split", scratch.split)
        self._attach_scratch("sorted", scratch.sorted)  # here: ATTACH is never inside a transaction
        db.execute(f"CREATE TABLE sorted.sorted {SORTED}")
        host_ids(db, hosts)
        more = "WHERE true ON CONFLICT DO UPDATE SET rows = rows + excluded.rows"
        with self.database.transaction():
            self._tally.flush()
            db.execute(f"INSERT INTO temp.tally_hosts SELECT {MAPPED}, rows FROM split.tally_hosts {more}")
            db.execute(
                f"INSERT INTO temp.tally_hours SELECT {MAPPED}, hour, rows FROM split.tally_hours {more}"
            )
        counts = db.execute("SELECT host, rows FROM temp.tally_hosts ORDER BY host").fetchall()
        share, seen = sum(n for _, n in counts) * LOWER_SHARE, 0
        for host, n in counts:
            seen += n
            if seen >= share:
                return int(host) + 1
        return 1

    def scratch(self) -> Scratch:
        """Where a rebuild on two processes works: beside the state file."""
        (path,) = self.db.execute("SELECT file FROM pragma_database_list WHERE name = 'main'").fetchone()
        return Scratch.beside(path)

    @contextmanager
    def replacing(self) -> Iterator[None]:
        """The transaction that replaces the keys (replace, add_sorted on two
        processes, then replaced) and saves the new checkpoint. It begins
        deferred (Database.transaction) and replace writes main first: it
        begins while the forked reader still writes `sorted`."""
        self._schema = dict(
            self.db.execute("SELECT name, sql FROM sqlite_master WHERE tbl_name = 'keys' AND sql IS NOT NULL")
        )
        with self.database.transaction(lock_all=False):
            yield

    def replace(self, below: int | None = None) -> None:
        """The staged keys become the keys table, with the hosts' counts and
        received_hours (migrations/0002.sql), inserted sorted (random-order
        inserts cost 2.3x: the B-tree pages are then written once each). On
        two processes only those of the hosts below `below`, while the forked
        reader sorts the rest for add_sorted: in key order, they follow."""
        db, schema = self.db, self._schema
        db.execute("DROP TABLE keys")  # and its triggers; this transaction's first write (replacing)
        db.execute(schema["keys"])
        for table in ("bad_lines", "received_hours", "received_days"):
            db.execute(f"DELETE FROM {table}")
        self._tally.flush()
        # every row counted so far: the duplicates are taken off in replaced()
        counted = "(SELECT rows FROM temp.tally_hosts t WHERE t.host = hosts.id)"
        db.execute(f"UPDATE hosts SET keys = coalesce({counted}, 0), duplicates = 0")
        db.execute("INSERT INTO received_hours SELECT host, hour, rows FROM temp.tally_hours")
        db.execute(schema["key_repeated"])  # counts the duplicates as the keys go in
        if below is None:
            self._insert(f"SELECT host, digest, offset, received FROM {self._staged} ORDER BY 1, 2, 3")
        else:
            self._insert(f"{both_parts(self._staged, '< ?1')} ORDER BY 1, 2, 3", below)

    def add_sorted(self) -> None:
        """The keys the forked reader sorted into `sorted`, after ours."""
        self._insert("SELECT host, digest, offset, received FROM sorted.sorted")

    def _insert(self, keys: str, *args: object) -> None:
        self.db.execute(
            f"INSERT INTO keys (host, digest, offset, received) SELECT * FROM ({keys}) WHERE true "
            "ON CONFLICT (host, digest) DO UPDATE SET copies = copies + 1",
            args,
        )

    def replaced(self) -> None:
        """The counts that need every key in: duplicates off the hosts'
        keys and hours, received_days; then the trigger that counts the
        keys added from now on."""
        db = self.db

        repeated = [h for (h,) in db.execute("SELECT id FROM hosts WHERE duplicates > 0")]
        db.execute("UPDATE hosts SET keys = keys - duplicates WHERE duplicates > 0")
        for again in repeated:  # a later copy was counted at its own hour: count these hosts' keys again
            db.execute("DELETE FROM received_hours WHERE host = ?", (again,))
            db.execute(
                "INSERT INTO received_hours SELECT host, max(received, 0) / 3600, count(*) FROM keys "
                "WHERE host = ? AND received IS NOT NULL GROUP BY 1, 2",
                (again,),
            )
        db.execute(
            "INSERT INTO received_days SELECT host, hour / 24, sum(keys) FROM received_hours GROUP BY 1, 2"
        )
        db.execute(self._schema["key_added"])

    # --- asking -------------------------------------------------------------------------

    def _one(self, sql: str, *args: object) -> bool:
        return self.db.execute(sql, args).fetchone() is not None

    def in_base(self, host: int, digest: bytes) -> bool:
        return self.base and self._one("SELECT 1 FROM base.keys WHERE host = ? AND digest = ?", host, digest)

    def has_host_rows(self, host: int) -> bool:
        return self._one(
            self._both("SELECT 1 FROM keys WHERE host = ?") + " LIMIT 1", *([host] * (1 + self.base))
        )

    def present(self, host: int, digests: Sequence[bytes]) -> set[bytes]:
        """Which of `digests` the host has: one query per _IN_CHUNK of them
        (a point query each costs 3x more in Python's sqlite3)."""
        found: set[bytes] = set()
        for i in range(0, len(digests), _IN_CHUNK):
            part = digests[i : i + _IN_CHUNK]
            sql = self._both(
                f"SELECT digest FROM keys WHERE host = ? AND digest IN ({','.join('?' * len(part))})"
            )
            found.update(d for (d,) in self.db.execute(sql, [host, *part] * (1 + self.base)))
        return found

    def has(self, host: int, digest: bytes) -> int | bool | None:
        """The key's received time (None when unknown), or False when absent."""
        row = self.db.execute(
            self._both("SELECT received FROM keys WHERE host = ? AND digest = ?"),
            (host, digest, host, digest) if self.base else (host, digest),
        ).fetchone()
        return False if row is None else row[0]

    def first_row(self, host: int, digest: bytes) -> int | None:
        """Where the key's first row starts in the index, or None when absent."""
        row = self.db.execute(
            self._both("SELECT offset FROM keys WHERE host = ? AND digest = ?"),
            (host, digest, host, digest) if self.base else (host, digest),
        ).fetchone()
        return None if row is None else int(row[0])

    def digests(self, host: int) -> Iterator[tuple[bytes, int | None]]:
        """(digest, received) of a host's keys in digest order, main's and
        base's merged as they stream (a merge join walks this once)."""
        sql = "SELECT digest, received FROM {}keys WHERE host = ? ORDER BY digest"
        parts = [self.db.execute(sql.format(f"{schema}."), (host,)) for schema in self._schemas()]
        yield from heapq.merge(*parts, key=itemgetter(0))

    def _schemas(self) -> tuple[str, ...]:
        return ("main", "base") if self.base else ("main",)

    def host_rows(self, host: int, cutoff: float | None) -> HostRows:
        """A host's keys, duplicates and keys received before `cutoff`, a
        whole hour (retention.cutoff): from the counts, not the keys."""
        rows = dups = older = 0
        for schema in self._schemas():
            found = self.db.execute(
                f"SELECT keys, duplicates FROM {schema}.hosts WHERE id = ?", (host,)
            ).fetchone()
            if found is not None:
                rows, dups = rows + found[0], dups + found[1]
            if cutoff is not None:
                older += self._older(schema, host, cutoff)
        return HostRows(rows, dups, older)

    def _older(self, schema: str, host: int, cutoff: float) -> int:
        """Whole days before the cutoff's day, then the hours of that day."""
        hour, part = divmod(int(cutoff), 3600)
        assert part == 0 and cutoff == int(cutoff), "the cutoff is a whole hour"
        day = hour // 24
        days = f"SELECT total(keys) FROM {schema}.received_days WHERE host = ?1 AND day < ?2"
        hours = (
            f"SELECT total(keys) FROM {schema}.received_hours WHERE host = ?1 AND hour >= ?3 AND hour < ?4"
        )
        (n,) = self.db.execute(f"SELECT ({days}) + ({hours})", (host, day, day * 24, hour)).fetchone()
        return int(n)

    def all_rows(self) -> dict[int, int]:
        """Rows of the index per host id (keys and their duplicates), from the counts."""
        found: dict[int, int] = {}
        for schema in self._schemas():
            for host, n in self.db.execute(f"SELECT id, keys + duplicates FROM {schema}.hosts"):
                found[host] = found.get(host, 0) + n
        return found

    def rows(
        self, host: int, since: float | None = None, min_copies: int = 1
    ) -> Iterator[tuple[bytes, int, int | None, int]]:
        """(digest, offset, received, copies) of a host's keys with at least
        `min_copies` rows, received at or after `since` or at an unknown time
        (all when since is None)."""
        where = "host = ? AND copies >= ?"
        args: tuple[object, ...] = (host, min_copies)
        if since is not None:  # not older (retention.older): at or after it, or at an unknown time
            where += " AND (max(received, 0) >= ? OR received IS NULL)"
            args += (since,)
        for schema in self._schemas():
            sql = f"SELECT digest, offset, received, copies FROM {schema}.keys WHERE {where}"
            yield from self.db.execute(sql, args)

    def bad_line_examples(self) -> list[tuple[int, int, str]]:
        sql = "SELECT line, offset, reason FROM {}bad_lines"
        rows = self.db.execute(sql.format("")).fetchall()
        if self.base:
            rows += self.db.execute(sql.format("base.")).fetchall()
        return sorted(rows)[:EXAMPLES]

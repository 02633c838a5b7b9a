"""What the index covers: one key per (host, episode_id) it has a row for,
how far it has been read (the checkpoint), the host ids keys are filed
under, the first bad lines, and rebuilding all of it from the whole index
(with a forked reader's SplitPart)."""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from operator import floordiv, itemgetter
from typing import NamedTuple

from .connection import CACHE_KIB, Database, split_path

EXAMPLES = 100
_IN_CHUNK = 400  # digests per IN (...): twice that plus two stays under SQLite's oldest 999-variable limit
Key = tuple[int, bytes, int, int | None]  # (host, digest, offset, received): a row of the keys table
STAGE_ROWS = 100
_STAGING = "(host INTEGER, digest BLOB, offset INTEGER, received INTEGER)"
# keys in key order, a half of a rebuild each: merging two costs no sort (SQLite's MERGE of a UNION ALL)
_SORTED = _STAGING[:-1] + ", PRIMARY KEY (host, digest, offset)) WITHOUT ROWID"


def _insert_keys(db: sqlite3.Connection, table: str, keys: Sequence[Key]) -> None:
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
    """The keys of the part of the index a rebuild reads in a forked process
    (coverage.py says why), staged in a scratch file that only that process
    writes and the pass then merges (Keys.attached_split), with their Tally.
    Hosts the state does not know yet get negative provisional ids there;
    the pass maps them. Neither journaled nor synced: a pass killed meanwhile
    leaves a file that the next owner's open removes."""

    def __init__(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        self.db.execute(f"CREATE TABLE staging {_STAGING}")
        self.tally = Tally(self.db, "main")
        self.db.execute("BEGIN")

    def stage(self, keys: Sequence[Key]) -> None:
        _insert_keys(self.db, "staging", keys)
        self.tally.add(keys)

    def sort(self, hosts: dict[int, int]) -> None:
        """Once the pass has given ids to the hosts only this part met
        (`hosts`: provisional id -> id): the staged keys, under those ids,
        into a table in key order, which the pass merges with its own."""
        self.tally.flush()
        self.db.execute("CREATE TEMP TABLE ids (provisional INTEGER PRIMARY KEY, id INTEGER)")
        self.db.executemany("INSERT INTO temp.ids VALUES (?, ?)", hosts.items())
        mapped = "coalesce((SELECT id FROM temp.ids WHERE provisional = host), host)"
        for table in ("tally_hosts", "tally_hours"):
            self.db.execute(f"UPDATE {table} SET host = {mapped} WHERE host < 0")
        self.db.execute(f"CREATE TABLE sorted {_SORTED}")
        self.db.execute(
            f"INSERT INTO sorted SELECT {mapped}, digest, offset, received FROM staging ORDER BY 1, 2, 3"
        )
        self.db.execute("DROP TABLE staging")

    def close(self) -> None:
        self.db.execute("COMMIT")
        self.db.close()


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
    def rebuilding(self) -> Iterator[None]:
        """Collect every key of the whole index with stage (and a SplitPart),
        then replace the keys in one transaction, inserting them sorted
        (random-order inserts cost 2.3x: the B-tree pages are then written
        once each)."""
        temporary = ("temp.staging", "temp.sorted", "temp.tally_hosts", "temp.tally_hours")
        for table in temporary:
            self.db.execute(f"DROP TABLE IF EXISTS {table}")
        self.db.execute(f"CREATE TEMP TABLE staging {_STAGING}")
        self._tally = Tally(self.db, "temp")
        try:
            yield
        finally:
            for table in temporary:
                self.db.execute(f"DROP TABLE IF EXISTS {table}")

    def stage(self, keys: Sequence[Key]) -> None:
        with self.database.transaction():
            _insert_keys(self.db, "temp.staging", keys)
            self._tally.add(keys)

    def sort_staged(self) -> None:
        """The staged keys into a table in key order, to merge with a
        SplitPart's sorted at the same time in another process."""
        self.db.execute(f"CREATE TEMP TABLE sorted {_SORTED}")
        with self.database.transaction():
            self.db.execute("INSERT INTO temp.sorted SELECT * FROM temp.staging ORDER BY 1, 2, 3")
        self.db.execute("DELETE FROM temp.staging")

    def split_path(self) -> str:
        """Where a SplitPart goes: beside the state file."""
        (path,) = self.db.execute("SELECT file FROM pragma_database_list WHERE name = 'main'").fetchone()
        return split_path(path)

    @contextmanager
    def attached_split(self, path: str) -> Iterator[None]:
        """Have `replace` take a sorted SplitPart's keys too (ATTACH and
        DETACH cannot be in a transaction: this goes around the one that
        replaces)."""
        self.db.execute("ATTACH DATABASE ? AS split", (path,))
        try:
            yield
        finally:
            self.db.execute("DETACH DATABASE split")

    def replace(self) -> None:
        """Inside the transaction that saves the new checkpoint: the staged
        keys, sorted (or sorted_staged's, merged with an attached SplitPart's)
        become the keys table, with the hosts' counts and received_hours and
        _days (migrations/0002.sql)."""
        db = self.db
        schema = dict(
            db.execute("SELECT name, sql FROM sqlite_master WHERE tbl_name = 'keys' AND sql IS NOT NULL")
        )
        db.execute("DROP TABLE keys")  # and its triggers
        db.execute(schema["keys"])
        db.execute(schema["key_repeated"])  # counts the duplicates as the keys go in
        for table in ("bad_lines", "received_hours", "received_days"):
            db.execute(f"DELETE FROM {table}")
        self._tally.flush()
        # every row counted so far: the duplicates are taken off below
        counted = "(SELECT rows FROM temp.tally_hosts t WHERE t.host = hosts.id)"
        db.execute(f"UPDATE hosts SET keys = coalesce({counted}, 0)")
        db.execute("UPDATE hosts SET duplicates = 0")
        db.execute("INSERT INTO received_hours SELECT host, hour, rows FROM temp.tally_hours")
        if db.execute("SELECT 1 FROM pragma_database_list WHERE name = 'split'").fetchone():
            counted = "(SELECT rows FROM split.tally_hosts s WHERE s.host = hosts.id)"
            db.execute(f"UPDATE hosts SET keys = keys + coalesce({counted}, 0)")
            db.execute(
                "INSERT INTO received_hours SELECT host, hour, rows FROM split.tally_hours WHERE true "
                "ON CONFLICT (host, hour) DO UPDATE SET keys = keys + excluded.keys"
            )
            # both halves in key order: merged as they are read, not sorted again
            keys = (
                "SELECT host, digest, offset, received FROM temp.sorted UNION ALL "
                "SELECT host, digest, offset, received FROM split.sorted ORDER BY 1, 2, 3"
            )
        elif db.execute("SELECT 1 FROM temp.sqlite_master WHERE name = 'sorted'").fetchone():
            keys = "SELECT host, digest, offset, received FROM temp.sorted"
        else:
            keys = "SELECT host, digest, offset, received FROM temp.staging ORDER BY 1, 2, 3"
        db.execute(
            f"INSERT INTO keys (host, digest, offset, received) SELECT * FROM ({keys}) WHERE true "
            "ON CONFLICT (host, digest) DO UPDATE SET copies = copies + 1"
        )
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
        db.execute(schema["key_added"])

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
        """(digest, received) of a host's keys in digest order."""
        yield from self.db.execute(
            "SELECT digest, received FROM keys WHERE host = ? ORDER BY digest", (host,)
        )
        if self.base:
            yield from self.db.execute(
                "SELECT digest, received FROM base.keys WHERE host = ? ORDER BY digest", (host,)
            )

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

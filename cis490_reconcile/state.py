"""The state database: everything a pass remembers, in one SQLite file, and
every query on it. Nothing else in the package writes SQL.

``<state_dir>/state.sqlite3`` holds what the index covers (one key per
(host_id, episode_id)), how far the index has been read (the checkpoint),
what each host directory looked like when last listed, tarballs found
unverifiable, the orphan counts of the last full pass, and records (the last
pass, the last scrub, the scrub's cursor). Read it with the sqlite3 CLI:

    sqlite3 -readonly /var/lib/cis490-reconcile/state.sqlite3 \\
        'SELECT name, missing_rows, pruned_rows FROM hosts'

Schema: the numbered migrations, migrations/0001.sql and on, say what each
table and column means. `PRAGMA user_version` is the number of migrations
run, `PRAGMA application_id` marks the file as ours; a file of another
program, of a newer schema or for another store is not used (StateUnusable).

The queries are split in two: State (the file, transactions, host
directories, verdicts, records) and Keys, reached as ``state.keys`` (what
the index covers, and rebuilding it).

Concurrency: WAL mode, so readers (status, opened read-only) never block the
writer nor are blocked by it; every change is an explicit transaction, and the
checkpoint is committed in the same transaction as the keys it covers, so a
kill -9 at any moment leaves a file consistent in itself (re-measure:
tests/test_crash.py). One pass at a time holds the state directory's flock.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "state.sqlite3"
APPLICATION_ID = 0x63343930  # "c490": a file of ours, not any SQLite database
EXAMPLES = 100
CACHE_KIB = 8 << 10  # the page cache: memory stays flat whatever the number of rows
_IN_CHUNK = 400  # digests per IN (...): twice that plus two stays under SQLite's oldest 999-variable limit
MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _migrations() -> tuple[str, ...]:
    """migrations/0001.sql, 0002.sql, ...: the scripts that bring a file of
    version N-1 to version N."""
    scripts = sorted(MIGRATIONS_DIR.glob("*.sql"))
    if [p.name for p in scripts] != [f"{n:04d}.sql" for n in range(1, len(scripts) + 1)]:
        raise RuntimeError(f"{MIGRATIONS_DIR}: migrations must be numbered 0001.sql, 0002.sql, ...")
    return tuple(p.read_text(encoding="utf-8") for p in scripts)


def _statements(script: str) -> Iterator[str]:
    """The statements of a script, split where SQLite's own tokenizer says a
    statement is complete (a ";" in a comment or a string does not split)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""
    if statement.strip():
        yield statement  # a last statement without its ";"


MIGRATIONS = _migrations()
Key = tuple[int, bytes, int, int | None]  # (host, digest, offset, received): a row of the keys table
STAGE_ROWS = 100
_STAGING = "(host INTEGER, digest BLOB, offset INTEGER, received INTEGER)"


def _insert_keys(db: sqlite3.Connection, table: str, keys: Sequence[Key]) -> None:
    """STAGE_ROWS keys a statement: 1.0 us a key against 5.9 for one
    autocommitted INSERT each (measured, 400k keys)."""
    whole = len(keys) - len(keys) % STAGE_ROWS
    flat = list(itertools.chain.from_iterable(keys[:whole]))
    step = 4 * STAGE_ROWS
    many = f"INSERT INTO {table} VALUES " + ", ".join(["(?, ?, ?, ?)"] * STAGE_ROWS)
    db.executemany(many, (flat[i : i + step] for i in range(0, len(flat), step)))
    db.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?)", keys[whole:])


def split_path(state_path: Path | str) -> str:
    return f"{state_path}-split"


class SplitPart:
    """The keys of the part of the index a rebuild reads in a forked process
    (coverage.py says why), staged in a scratch file that only that process
    writes and the pass then merges (Keys.attached_split). Hosts the state
    does not know yet get negative provisional ids there; the pass maps them.
    Neither journaled nor synced: a pass killed meanwhile leaves a file that
    the next writable State.open removes."""

    def __init__(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        self.db.execute(f"CREATE TABLE staging {_STAGING}")
        self.db.execute("BEGIN")

    def stage(self, keys: Sequence[Key]) -> None:
        _insert_keys(self.db, "staging", keys)

    def close(self) -> None:
        self.db.execute("COMMIT")
        self.db.close()


class _RolledBack(Exception):
    pass


class StateUnusable(Exception):
    """The file is damaged, of another schema or for another store; the
    reason says which. The caller starts a new one."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    index_dev: int
    index_ino: int
    offset: int
    lines: int
    bad_lines: int
    tail_sha256: bytes
    rebuilt_at: float


@dataclass(frozen=True, slots=True)
class Unverified:
    """A tarball found unverifiable, as it was then."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    limits: str  # verify.Decoding.key
    reason: str


@dataclass(frozen=True, slots=True)
class HostRows:
    """What the keys say about one host (or, for id 0, about rows without host_id)."""

    rows: int
    duplicates: int
    older: int  # rows received before the cutoff asked for


def connect(path: Path | str, readonly: bool = False, busy_timeout_s: float = 30.0) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, a
    bounded page cache. Read-only connections never write, not even the WAL."""
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=busy_timeout_s, check_same_thread=False)
    db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    db.execute("PRAGMA secure_delete = OFF")  # Debian builds zero freed pages: 70 MiB of writes per 2M rows
    if not readonly:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoint, consistent always
    return db


class Keys:
    """The keys table: one key per (host, episode_id) the index has a row
    for. With a base attached, its keys count too (State.attach_base)."""

    def __init__(self, state: State) -> None:
        self.state = state

    def _both(self, sql: str) -> str:
        """`sql` over main's keys, plus base's when one is attached."""
        return sql if not self.state.base else f"{sql} UNION ALL {sql.replace(' keys', ' base.keys')}"

    def add(self, keys: Sequence[Key]) -> None:
        """(host, digest, offset, received) of rows read in index order; a
        key already there counts one more copy."""
        self.state.db.executemany(
            "INSERT INTO keys (host, digest, offset, received) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (host, digest) DO UPDATE SET copies = copies + 1",
            keys,
        )

    def in_base(self, host: int, digest: bytes) -> bool:
        return self.state.base and self._one(
            "SELECT 1 FROM base.keys WHERE host = ? AND digest = ?", host, digest
        )

    def has_host_rows(self, host: int) -> bool:
        return self._one(
            self._both("SELECT 1 FROM keys WHERE host = ?") + " LIMIT 1", *([host] * (1 + self.state.base))
        )

    def add_bad_lines(self, bad: Iterable[tuple[int, int, str]]) -> None:
        """(line, offset, reason); only the first EXAMPLES are kept."""
        room = EXAMPLES - self.state.db.execute("SELECT count(*) FROM bad_lines").fetchone()[0]
        self.state.db.executemany(
            "INSERT OR IGNORE INTO bad_lines VALUES (?, ?, ?)", list(bad)[: max(room, 0)]
        )

    @contextmanager
    def rebuilding(self) -> Iterator[None]:
        """Collect every key of the whole index with stage (and a SplitPart),
        then replace the keys in one transaction, inserting them sorted
        (random-order inserts cost 2.3x: the B-tree pages are then written
        once each)."""
        self.state.db.execute("DROP TABLE IF EXISTS temp.staging")
        self.state.db.execute(f"CREATE TEMP TABLE staging {_STAGING}")
        try:
            yield
        finally:
            self.state.db.execute("DROP TABLE IF EXISTS temp.staging")
            self.state.db.execute("DROP TABLE IF EXISTS temp.split_hosts")

    def stage(self, keys: Sequence[Key]) -> None:
        with self.state.transaction():
            _insert_keys(self.state.db, "temp.staging", keys)

    def split_path(self) -> str:
        """Where a SplitPart goes: beside the state file."""
        (path,) = self.state.db.execute(
            "SELECT file FROM pragma_database_list WHERE name = 'main'"
        ).fetchone()
        return split_path(path)

    @contextmanager
    def attached_split(self, path: str, hosts: dict[int, int]) -> Iterator[None]:
        """Have `replace` take a SplitPart's keys too, its provisional host
        ids mapped by `hosts` (ATTACH and DETACH cannot be in a transaction:
        this goes around the one that replaces)."""
        db = self.state.db
        db.execute("ATTACH DATABASE ? AS split", (path,))
        try:
            db.execute("CREATE TEMP TABLE split_hosts (provisional INTEGER PRIMARY KEY, id INTEGER)")
            db.executemany("INSERT INTO temp.split_hosts VALUES (?, ?)", hosts.items())
            yield
        finally:
            db.execute("DETACH DATABASE split")

    def replace(self) -> None:
        """Inside the transaction that saves the new checkpoint."""
        db = self.state.db
        (create,) = db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'keys'"
        ).fetchone()
        db.execute("DROP TABLE keys")
        db.execute(create)
        db.execute("DELETE FROM bad_lines")
        staged = "SELECT host, digest, offset, received FROM temp.staging"
        split = db.execute("SELECT 1 FROM pragma_database_list WHERE name = 'split'").fetchone()
        if split:
            staged += (
                " UNION ALL SELECT CASE WHEN s.host < 0 THEN (SELECT id FROM temp.split_hosts"
                " WHERE provisional = s.host) ELSE s.host END, digest, offset, received FROM split.staging s"
            )
        db.execute(
            f"INSERT INTO keys (host, digest, offset, received) SELECT * FROM ({staged}) "
            "WHERE true ORDER BY host, digest, offset "
            "ON CONFLICT (host, digest) DO UPDATE SET copies = copies + 1"
        )

    def _one(self, sql: str, *args: object) -> bool:
        return self.state.db.execute(sql, args).fetchone() is not None

    def present(self, host: int, digests: Sequence[bytes]) -> set[bytes]:
        """Which of `digests` the host has: one query per _IN_CHUNK of them
        (a point query each costs 3x more in Python's sqlite3)."""
        found: set[bytes] = set()
        for i in range(0, len(digests), _IN_CHUNK):
            part = digests[i : i + _IN_CHUNK]
            sql = self._both(
                f"SELECT digest FROM keys WHERE host = ? AND digest IN ({','.join('?' * len(part))})"
            )
            found.update(d for (d,) in self.state.db.execute(sql, [host, *part] * (1 + self.state.base)))
        return found

    def has(self, host: int, digest: bytes) -> int | bool | None:
        """The key's received time (None when unknown), or False when absent."""
        row = self.state.db.execute(
            self._both("SELECT received FROM keys WHERE host = ? AND digest = ?"),
            (host, digest, host, digest) if self.state.base else (host, digest),
        ).fetchone()
        return False if row is None else row[0]

    def first_row(self, host: int, digest: bytes) -> int | None:
        """Where the key's first row starts in the index, or None when absent."""
        row = self.state.db.execute(
            self._both("SELECT offset FROM keys WHERE host = ? AND digest = ?"),
            (host, digest, host, digest) if self.state.base else (host, digest),
        ).fetchone()
        return None if row is None else int(row[0])

    def digests(self, host: int) -> Iterator[tuple[bytes, int | None]]:
        """(digest, received) of a host's keys in digest order."""
        yield from self.state.db.execute(
            "SELECT digest, received FROM keys WHERE host = ? ORDER BY digest", (host,)
        )
        if self.state.base:
            yield from self.state.db.execute(
                "SELECT digest, received FROM base.keys WHERE host = ? ORDER BY digest", (host,)
            )

    def host_rows(self, host: int, cutoff: float | None) -> HostRows:
        rows = dups = older = 0
        for schema in ("main", "base") if self.state.base else ("main",):
            n, copies, old = self.state.db.execute(
                f"SELECT count(*), total(copies), total(received < ?) FROM {schema}.keys WHERE host = ?",
                (-1 if cutoff is None else cutoff, host),
            ).fetchone()
            rows, dups, older = rows + n, dups + int(copies) - n, older + int(old)
        return HostRows(rows, dups, older)

    def rows(
        self, host: int, since: float | None = None, min_copies: int = 1
    ) -> Iterator[tuple[bytes, int, int | None, int]]:
        """(digest, offset, received, copies) of a host's keys with at least
        `min_copies` rows, received at or after `since` or at an unknown time
        (all when since is None)."""
        where = "host = ? AND copies >= ?"
        args: tuple[object, ...] = (host, min_copies)
        if since is not None:
            where += " AND (received >= ? OR received IS NULL)"
            args += (since,)
        for schema in ("main", "base") if self.state.base else ("main",):
            sql = f"SELECT digest, offset, received, copies FROM {schema}.keys WHERE {where}"
            yield from self.state.db.execute(sql, args)

    def bad_line_examples(self) -> list[tuple[int, int, str]]:
        sql = "SELECT line, offset, reason FROM {}bad_lines"
        rows = self.state.db.execute(sql.format("")).fetchall()
        if self.state.base:
            rows += self.state.db.execute(sql.format("base.")).fetchall()
        return sorted(rows)[:EXAMPLES]


class State:
    """One open state database. `attach` adds a read-only second database
    whose keys count too: status and dry runs read the state of the last pass
    that way, and put only the index's newer rows into a temporary one."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.base = False  # a read-only database is attached as "base"
        self.keys = Keys(self)

    @classmethod
    def open(cls, path: Path | str, episodes_root: str, index_path: str, readonly: bool = False) -> State:
        """Open (creating and migrating as needed) the state of this store.
        Raises StateUnusable, or OSError/sqlite3.OperationalError when the
        file cannot be opened at all (permissions, a read-only directory)."""
        try:
            db = connect(path, readonly)
        except sqlite3.OperationalError:
            raise  # cannot be opened at all: permissions, a missing directory
        except sqlite3.DatabaseError as e:
            raise StateUnusable(f"not a usable database: {e}") from None
        if not readonly:  # left by a pass that was killed: this one holds the state directory
            with contextlib.suppress(FileNotFoundError):
                os.unlink(split_path(path))
        try:
            state = cls(db)
            state._check(episodes_root, index_path, readonly)
        except sqlite3.DatabaseError as e:
            db.close()
            if isinstance(e, sqlite3.OperationalError) and "unable to open" in str(e):
                raise
            raise StateUnusable(f"not a usable database: {e}") from None
        except StateUnusable:
            db.close()
            raise
        return state

    def _check(self, episodes_root: str, index_path: str, readonly: bool) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        app = self.db.execute("PRAGMA application_id").fetchone()[0]
        if (app, version) == (0, 0):  # a new file, unless it is someone else's database
            if self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise StateUnusable("a database of something else")
        elif app != APPLICATION_ID:
            raise StateUnusable("a database of something else")
        if version > len(MIGRATIONS):
            raise StateUnusable(f"schema version {version}, newer than this program's {len(MIGRATIONS)}")
        if version < len(MIGRATIONS):
            if readonly:
                raise StateUnusable(f"schema version {version}: the next pass migrates it")
            with self.transaction():
                for script in MIGRATIONS[version:]:
                    for statement in _statements(script):
                        self.db.execute(statement)
                if version == 0:
                    self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    self.db.execute("INSERT INTO store VALUES (1, ?, ?)", (episodes_root, index_path))
                self.db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        found = self.db.execute("SELECT episodes_root, index_path FROM store").fetchone()
        if found != (episodes_root, index_path):
            raise StateUnusable(
                f"written for another store ({found[0]}, {found[1]})" if found else "no store"
            )
        if not readonly:  # a header that forbids writing is found by a write, not by a read
            with contextlib.suppress(_RolledBack), self.transaction():
                self.db.execute("UPDATE store SET index_path = index_path")
                raise _RolledBack

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def attach_base(self, path: Path | str) -> None:
        self.db.execute("ATTACH DATABASE ? AS base", (f"file:{path}?mode=ro",))
        self.base = True

    def detach_base(self) -> None:
        self.db.execute("DETACH DATABASE base")
        self.base = False

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

    # --- host directories -------------------------------------------------------

    def memo(self, host: int) -> tuple[int | None, int | None, list[str]]:
        """(mtime_ns, ctime_ns, unresolved episodes) as the last pass left the host."""
        row = self.db.execute("SELECT dir_mtime_ns, dir_ctime_ns FROM hosts WHERE id = ?", (host,)).fetchone()
        unresolved = [
            r[0] for r in self.db.execute("SELECT episode_id FROM unresolved WHERE host = ?", (host,))
        ]
        return (None, None, unresolved) if row is None else (row[0], row[1], unresolved)

    def save_memo(self, host: int, times: tuple[int, int] | None, unresolved: Iterable[str]) -> None:
        """Only when it changed: a pass with nothing to do writes nothing."""
        mtime, ctime, before = self.memo(host)
        unresolved = sorted(unresolved)
        if (mtime, ctime) != (times or (None, None)):
            self.db.execute(
                "UPDATE hosts SET dir_mtime_ns = ?, dir_ctime_ns = ? WHERE id = ?",
                (*(times or (None, None)), host),
            )
        if sorted(before) != unresolved:
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

    def unverified_hosts(self) -> set[int]:
        """Hosts with a remembered unverifiable tarball (few): the others need no lookup."""
        return {host for (host,) in self.db.execute("SELECT DISTINCT host FROM unverifiable")}

    def unverified(self, host: int, episode_id: str) -> Unverified | None:
        row = self.db.execute(
            "SELECT dev, ino, size, mtime_ns, ctime_ns, limits, reason FROM unverifiable "
            "WHERE host = ? AND episode_id = ?",
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

    # --- records ---------------------------------------------------------------------

    def record(self, name: str, schema: str = "main") -> dict[str, object] | None:
        row = self.db.execute(f"SELECT value FROM {schema}.records WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    def save_record(self, name: str, value: dict[str, object]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO records VALUES (?, ?)", (name, json.dumps(value, sort_keys=True))
        )

"""The state database: everything a pass remembers, in one SQLite file, and
every query on it. Nothing else in the package writes SQL.

``<state_dir>/state.sqlite3`` holds what the index covers (one row per
(host_id, episode_id) key), how far the index has been read (the checkpoint),
what each host directory looked like when last listed, tarballs found
unverifiable, the orphan counts of the last full pass, the last pass's record
and the scrub's cursor. Read it with the sqlite3 CLI:

    sqlite3 -readonly /var/lib/cis490-reconcile/state.sqlite3 \\
        'SELECT name, missing_rows, pruned_rows FROM hosts'

Schema (version 1; `PRAGMA user_version` is the version, MIGRATIONS the
numbered steps to it):

- store(episodes_root, index_path): the store this file describes.
- checkpoint(index_dev, index_ino, offset, lines, bad_lines, tail_sha256,
  rebuilt_at): keys cover the index up to byte `offset` (`lines` lines) of
  the file with that device and inode, whose 4 KiB before `offset` hash to
  `tail_sha256`; `rebuilt_at` is when keys were last read from the whole
  index (a full pass).
- hosts(id, name, dir_mtime_ns, dir_ctime_ns, missing_rows, pruned_rows):
  id 0 stands for rows without host_id (they cover their episode on every
  host). The directory times are a memo: unchanged since the last listing
  means nothing was added or removed. Orphan counts are the last full pass's.
- keys(host, digest, offset, received, copies), WITHOUT ROWID, primary key
  (host, digest): digest is 12 bytes of BLAKE2b of the episode_id
  (collisions within one host: about 1e-17 for a million rows), offset where
  the key's first row starts (read the names there), received its
  received_at_wall in unix seconds (NULL if absent), copies the number of
  rows with the key (over 1: duplicates). About 33 bytes a row on disk.
- bad_lines(line, offset, reason): the first EXAMPLES lines that are not rows.
- unresolved(host, episode_id): episodes the last pass left to look at again.
- unverifiable(host, episode_id, dev, ino, size, mtime_ns, ctime_ns, limits,
  reason): not read again while the file and the decoding limits stay the same.
- records(name, value): JSON documents: the last pass, the scrub cursor.

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
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "state.sqlite3"
APPLICATION_ID = 0x63343930  # "c490": a file of ours, not any SQLite database
EXAMPLES = 100
CACHE_KIB = 8 << 10  # the page cache: memory stays flat whatever the number of rows
KEYS_TABLE = """
    CREATE TABLE keys (
        host INTEGER NOT NULL,
        digest BLOB NOT NULL,
        offset INTEGER NOT NULL,
        received INTEGER,
        copies INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (host, digest)
    ) WITHOUT ROWID"""
MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE store (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        episodes_root TEXT NOT NULL,
        index_path TEXT NOT NULL
    );
    CREATE TABLE checkpoint (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        index_dev INTEGER NOT NULL,
        index_ino INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        lines INTEGER NOT NULL,
        bad_lines INTEGER NOT NULL,
        tail_sha256 BLOB NOT NULL,
        rebuilt_at REAL NOT NULL
    );
    CREATE TABLE hosts (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        dir_mtime_ns INTEGER,
        dir_ctime_ns INTEGER,
        missing_rows INTEGER,
        pruned_rows INTEGER
    );
    INSERT INTO hosts (id, name) VALUES (0, '');
    {KEYS_TABLE};
    CREATE TABLE bad_lines (line INTEGER PRIMARY KEY, offset INTEGER NOT NULL, reason TEXT NOT NULL);
    CREATE TABLE unresolved (
        host INTEGER NOT NULL,
        episode_id TEXT NOT NULL,
        PRIMARY KEY (host, episode_id)
    ) WITHOUT ROWID;
    CREATE TABLE unverifiable (
        host INTEGER NOT NULL,
        episode_id TEXT NOT NULL,
        dev INTEGER NOT NULL,
        ino INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        limits TEXT NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (host, episode_id)
    ) WITHOUT ROWID;
    CREATE TABLE records (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
)


STAGE_ROWS = 100
_STAGE_MANY = "INSERT INTO temp.staging VALUES " + ", ".join(["(?, ?, ?, ?)"] * STAGE_ROWS)


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


class State:
    """One open state database. `attach` adds a read-only second database
    whose keys count too: status and dry runs read the state of the last pass
    that way, and put only the index's newer rows into a temporary one."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.base = False  # a read-only database is attached as "base"

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
                for step in MIGRATIONS[version:]:
                    for statement in step.split(";"):
                        if statement.strip():
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

    # --- keys -------------------------------------------------------------------

    def add_keys(self, keys: Sequence[tuple[int, bytes, int, int | None]]) -> None:
        """(host, digest, offset, received) of rows read in index order; a
        key already there counts one more copy."""
        self.db.executemany(
            "INSERT INTO keys (host, digest, offset, received) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (host, digest) DO UPDATE SET copies = copies + 1",
            keys,
        )

    def in_base(self, host: int, digest: bytes) -> bool:
        return self.base and self._one("SELECT 1 FROM base.keys WHERE host = ? AND digest = ?", host, digest)

    def has_host_rows(self, host: int) -> bool:
        return self._one(
            self._both("SELECT 1 FROM keys WHERE host = ?") + " LIMIT 1", *([host] * (1 + self.base))
        )

    def add_bad_lines(self, bad: Iterable[tuple[int, int, str]]) -> None:
        """(line, offset, reason); only the first EXAMPLES are kept."""
        room = EXAMPLES - self.db.execute("SELECT count(*) FROM bad_lines").fetchone()[0]
        self.db.executemany("INSERT OR IGNORE INTO bad_lines VALUES (?, ?, ?)", list(bad)[: max(room, 0)])

    @contextmanager
    def rebuilding(self) -> Iterator[None]:
        """Collect every key of the whole index with add_staged, then replace
        the keys in one transaction, inserting them sorted (random-order
        inserts cost 2.3x: the B-tree pages are then written once each)."""
        self.db.execute("DROP TABLE IF EXISTS temp.staging")
        self.db.execute(
            "CREATE TEMP TABLE staging (host INTEGER, digest BLOB, offset INTEGER, received INTEGER)"
        )
        try:
            yield
        finally:
            self.db.execute("DROP TABLE IF EXISTS temp.staging")

    def add_staged(self, keys: Sequence[tuple[int, bytes, int, int | None]]) -> None:
        """In one transaction, STAGE_ROWS rows a statement: 1.0 us a row
        against 5.9 for one autocommitted INSERT each (measured, 400k rows)."""
        whole = len(keys) - len(keys) % STAGE_ROWS
        flat = list(itertools.chain.from_iterable(keys[:whole]))
        step = 4 * STAGE_ROWS
        with self.transaction():
            self.db.executemany(_STAGE_MANY, (flat[i : i + step] for i in range(0, len(flat), step)))
            self.db.executemany("INSERT INTO temp.staging VALUES (?, ?, ?, ?)", keys[whole:])

    def replace_keys(self) -> None:
        """Inside the transaction that saves the new checkpoint."""
        self.db.execute("DROP TABLE keys")
        self.db.execute(KEYS_TABLE)
        self.db.execute("DELETE FROM bad_lines")
        self.db.execute(
            "INSERT INTO keys (host, digest, offset, received) SELECT host, digest, offset, received "
            "FROM temp.staging WHERE true ORDER BY host, digest, offset "
            "ON CONFLICT (host, digest) DO UPDATE SET copies = copies + 1"
        )

    def _one(self, sql: str, *args: object) -> bool:
        return self.db.execute(sql, args).fetchone() is not None

    def has(self, host: int, digest: bytes) -> int | bool | None:
        """The key's received time (None when unknown), or False when absent."""
        row = self.db.execute(
            self._both("SELECT received FROM keys WHERE host = ? AND digest = ?"),
            (host, digest, host, digest) if self.base else (host, digest),
        ).fetchone()
        return False if row is None else row[0]

    def digests(self, host: int) -> Iterator[tuple[bytes, int | None]]:
        """(digest, received) of a host's keys in digest order."""
        yield from self.db.execute(
            "SELECT digest, received FROM keys WHERE host = ? ORDER BY digest", (host,)
        )
        if self.base:
            yield from self.db.execute(
                "SELECT digest, received FROM base.keys WHERE host = ? ORDER BY digest", (host,)
            )

    def host_rows(self, host: int, cutoff: float | None) -> HostRows:
        rows = dups = older = 0
        for schema in ("main", "base") if self.base else ("main",):
            n, copies, old = self.db.execute(
                f"SELECT count(*), total(copies), total(received < ?) FROM {schema}.keys WHERE host = ?",
                (-1 if cutoff is None else cutoff, host),
            ).fetchone()
            rows, dups, older = rows + n, dups + int(copies) - n, older + int(old)
        return HostRows(rows, dups, older)

    def key_rows(
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
        for schema in ("main", "base") if self.base else ("main",):
            sql = f"SELECT digest, offset, received, copies FROM {schema}.keys WHERE {where}"
            yield from self.db.execute(sql, args)

    def bad_line_examples(self) -> list[tuple[int, int, str]]:
        sql = "SELECT line, offset, reason FROM {}bad_lines"
        rows = self.db.execute(sql.format("")).fetchall()
        if self.base:
            rows += self.db.execute(sql.format("base.")).fetchall()
        return sorted(rows)[:EXAMPLES]

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

    def unverified_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM unverifiable").fetchone()[0])

    # --- records ---------------------------------------------------------------------

    def record(self, name: str, schema: str = "main") -> dict[str, object] | None:
        row = self.db.execute(f"SELECT value FROM {schema}.records WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    def save_record(self, name: str, value: dict[str, object]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO records VALUES (?, ?)", (name, json.dumps(value, sort_keys=True))
        )

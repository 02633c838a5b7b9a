"""The state database file: opening it, its schema (the numbered
migrations) and transactions. The package docstring says what the file
holds and who may write it."""

from __future__ import annotations

import contextlib
import enum
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

FILE_NAME = "state.sqlite3"
APPLICATION_ID = 0x63343930  # "c490": a file of ours, not any SQLite database
# Each connection's page cache: memory stays flat whatever the number of rows. A full pass
# peaked at 62-63 MiB on 8M rows and 66 MiB on 32M with 8 MiB; with 4 MiB at 54-55 and 57 MiB,
# and no slower (tests/bench/run.py --only scale --rows 8M,32M).
CACHE_KIB = 4 << 10
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


class Scratch(NamedTuple):
    """The scratch files of a rebuild on two processes, beside the state
    file (state/split.py says who writes which, and when)."""

    stage: str  # the pass's staged keys
    split: str  # the forked reader's staged keys and counts
    sorted: str  # the keys of the upper hosts, sorted by the forked reader

    @classmethod
    def beside(cls, state_path: Path | str) -> Scratch:
        return cls(f"{state_path}-stage", f"{state_path}-split", f"{state_path}-sorted")

    def remove(self, *which: str) -> None:
        """Those named (all by default) that exist."""
        for name in which or self._fields:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(getattr(self, name))


class _RolledBack(Exception):
    pass


class StateUnusable(Exception):
    """The file is damaged, of another schema or for another store; the
    reason says which. The caller starts a new one."""


class Access(enum.Enum):
    """How an opener may use the file (the package docstring says who is which)."""

    OWNER = "owner"  # holds the state directory's lock: creates, migrates, removes leftovers
    GUEST = "guest"  # short transactions on an existing file of this schema; creates and removes nothing
    READER = "reader"  # reads only


def connect(
    path: Path | str, access: Access = Access.OWNER, busy_timeout_s: float = 30.0
) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, a
    bounded page cache. Only an owner's may create the file; a reader's
    never writes, not even the WAL."""
    mode = {Access.OWNER: "rwc", Access.GUEST: "rw", Access.READER: "ro"}[access]
    db = sqlite3.connect(
        f"file:{path}?mode={mode}",
        uri=True,
        isolation_level=None,
        timeout=busy_timeout_s,
        check_same_thread=False,
    )
    db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    db.execute("PRAGMA secure_delete = OFF")  # Debian builds zero freed pages: 70 MiB of writes per 2M rows
    if access is not Access.READER:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoint, consistent always
    return db


class Database:
    """One open state database. `attach_base` adds a read-only second
    database whose keys count too: status and dry runs read the state of the
    last pass that way, and put only the index's newer rows into a temporary
    one."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.base = False  # a read-only database is attached as "base"
        self.base_ignored: str | None = None  # why statedir.view went on without the state database

    @classmethod
    def connect(
        cls, path: Path | str, episodes_root: str, index_path: str, access: Access = Access.OWNER
    ) -> sqlite3.Connection:
        """A connection to the state of this store; an owner's creates and
        migrates the file as needed and removes what a killed owner left.
        Raises StateUnusable (for a guest or a reader also when there is no
        file, or one of an older schema), or OSError/sqlite3.OperationalError
        when the file cannot be opened at all (permissions, a read-only
        directory) or used now (busy past the timeout, a full disk): a file
        that is not `damaged` is kept."""
        if access is not Access.OWNER and not os.path.exists(path):
            raise StateUnusable("no state database yet (a pass makes one)")
        try:
            db = connect(path, access)
        except sqlite3.OperationalError:
            raise  # cannot be opened at all: permissions, a missing directory
        except sqlite3.DatabaseError as e:
            raise StateUnusable(f"not a usable database: {e}") from None
        if access is Access.OWNER:  # left by an owner that was killed: this one holds the directory now
            Scratch.beside(path).remove()
        try:
            _check(db, episodes_root, index_path, access)
        except sqlite3.DatabaseError as e:
            db.close()
            if not damaged(e):
                raise
            raise StateUnusable(f"not a usable database: {e}") from None
        except StateUnusable:
            db.close()
            raise
        return db

    def close(self) -> None:
        self.db.close()

    def transaction(self, lock_all: bool = True) -> contextlib.AbstractContextManager[None]:
        """A write transaction (a savepoint inside a reader's: attach_base).
        BEGIN IMMEDIATE takes the write lock of every attached database at
        once; lock_all=False begins deferred, each database locked at its
        first use, for a transaction that must leave one alone (a rebuild's
        `sorted`, which the forked reader writes meanwhile). Its first
        statement must then write main: the lock is waited for there (the
        busy timeout), where after a read it would be refused at once if
        another connection had written since."""
        if self.base:
            return _savepoint(self.db)
        return write_transaction(self.db, "BEGIN IMMEDIATE" if lock_all else "BEGIN")

    def reporting(self, on_progress: Callable[[], None]) -> contextlib.AbstractContextManager[None]:
        return reporting(self.db, on_progress)

    def attach_base(self, path: Path | str) -> None:
        """Attach the state read-only and read it as of this moment from now
        on: one read transaction holds its snapshot (WAL) until it is
        detached, so a pass that commits meanwhile is not seen half (its new
        checkpoint with the old counts: rows counted twice). Changes to main
        are then savepoints inside it (main is the reader's own file).
        Raises StateUnusable when the base lacks part of main's schema."""
        self.db.execute("ATTACH DATABASE ? AS base", (f"file:{path}?mode=ro",))
        self.db.execute("BEGIN")
        self.db.execute("SELECT count(*) FROM base.sqlite_master").fetchone()  # the snapshot starts here
        self.base = True
        # main was just made by this program: a table, column or trigger the base lacks (a hand edit,
        # a partial copy) would fail a query halfway through, where nothing can go on without it
        schema = "SELECT type, name, sql FROM {}.sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        ours, theirs = (set(self.db.execute(schema.format(s))) for s in ("main", "base"))
        if missing := sorted(ours - theirs):
            kind, name, _ = missing[0]
            raise StateUnusable(f"its {kind} {name} is missing or not this program's")

    def detach_base(self) -> None:
        self.db.execute("COMMIT")  # what main holds is kept; DETACH cannot be inside a transaction
        self.db.execute("DETACH DATABASE base")
        self.base = False

    def forget_base(self) -> None:
        """Undo attach_base however far it got, and what main took from the
        base meanwhile: a reader that cannot use it goes on without it."""
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        with contextlib.suppress(sqlite3.OperationalError):  # never attached
            self.db.execute("DETACH DATABASE base")
        self.base = False

    @property
    def last(self) -> str:
        """The schema that holds what the last pass left: base when attached."""
        return "base" if self.base else "main"


# the tables whose size is bounded by the hosts, the records and EXAMPLES, not by the rows
_SMALL_TABLES = ("checkpoint", "hosts", "bad_lines", "unverifiable", "records")
_DAMAGED = ("readonly database", "no such table: ", "no such column: ")


def damaged(error: sqlite3.DatabaseError) -> bool:
    """The file itself is damaged ("malformed", "not a database", a header
    that forbids writing, a table or column its schema version promises
    gone: a hand edit, a partial copy), so its owner may replace it. Not a
    busy database, a full disk or an I/O error: those pass, and the file is
    kept."""
    return type(error) is sqlite3.DatabaseError or any(sign in str(error) for sign in _DAMAGED)


@contextmanager
def write_transaction(db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """Every change is an explicit transaction, the write lock taken at BEGIN
    (a plain BEGIN where only the temporary database is written)."""
    db.execute(begin)
    try:
        yield
    except BaseException:
        if db.in_transaction:  # SQLite may have rolled it back itself (a full disk): keep the first error
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


PROGRESS_STEPS = 1_000_000  # SQLite VM steps between two calls of a long statement's on_progress


@contextmanager
def reporting(db: sqlite3.Connection, on_progress: Callable[[], None]) -> Iterator[None]:
    """on_progress, every PROGRESS_STEPS, while statements run: a rebuild's
    sorts read no row for most of a minute at 8M rows, and the watchdog
    must see them working. If on_progress raises (a stop), SQLite
    interrupts the statement and that exception is raised in its place."""
    raised: list[BaseException] = []

    def handler() -> int:
        try:
            on_progress()
        except BaseException as e:  # StopRequested is one
            raised.append(e)
            return 1  # interrupt: the statement fails with "interrupted"
        return 0

    db.set_progress_handler(handler, PROGRESS_STEPS)
    try:
        yield
    except sqlite3.OperationalError:
        if raised:
            raise raised[0] from None
        raise
    finally:
        db.set_progress_handler(None, 0)
    if raised:
        raise raised[0]


@contextmanager
def _savepoint(db: sqlite3.Connection) -> Iterator[None]:
    """A change inside the reader's read transaction (attach_base)."""
    db.execute("SAVEPOINT change")
    try:
        yield
    except BaseException:
        if db.in_transaction:  # as in write_transaction
            db.execute("ROLLBACK TO change")
            db.execute("RELEASE change")
        raise
    db.execute("RELEASE change")


def _check(db: sqlite3.Connection, episodes_root: str, index_path: str, access: Access) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    app = db.execute("PRAGMA application_id").fetchone()[0]
    if (app, version) == (0, 0):  # a new file, unless it is someone else's database
        if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StateUnusable("a database of something else")
    elif app != APPLICATION_ID:
        raise StateUnusable("a database of something else")
    if version > len(MIGRATIONS):
        raise StateUnusable(f"schema version {version}, newer than this program's {len(MIGRATIONS)}")
    if version < len(MIGRATIONS):
        if access is not Access.OWNER:
            raise StateUnusable(f"schema version {version}: the next pass migrates it")
        with write_transaction(db):
            for script in MIGRATIONS[version:]:
                for statement in _statements(script):
                    db.execute(statement)
            if version == 0:
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute("INSERT INTO store VALUES (1, ?, ?)", (episodes_root, index_path))
            db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
    found = db.execute("SELECT episodes_root, index_path FROM store").fetchone()
    if found != (episodes_root, index_path):
        raise StateUnusable(f"written for another store ({found[0]}, {found[1]})" if found else "no store")
    # the small tables and their indexes checked page by page: damage there (the records above all,
    # which only guests read, and they cannot rebuild the file) is found by an owner's open
    for table in _SMALL_TABLES:
        problems = [p for (p,) in db.execute(f"PRAGMA quick_check({table})") if p != "ok"]
        if problems:
            raise StateUnusable(f"not a usable database: {problems[0]}")
    if access is not Access.READER:  # a header that forbids writing is found by a write, not by a read
        with contextlib.suppress(_RolledBack), write_transaction(db):
            db.execute("UPDATE store SET index_path = index_path")
            raise _RolledBack

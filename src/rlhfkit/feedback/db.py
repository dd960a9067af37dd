"""Database access: SQLite (one file, the default) or PostgreSQL (by URL, for many users).

SQLite allows one writer at a time. Left alone, concurrent submits fail with "database is
locked" and a judgment is lost; so here every write transaction first takes a lock shared by the
threads and processes that use the file (see _SqliteWriteLock) and starts with BEGIN IMMEDIATE,
and WAL mode lets readers carry on while a write is in progress. PostgreSQL needs none of this:
its row locks and unique constraints do the work.

Which write to use, one rule everywhere:
- `transact(fn)` when the transaction inserts a row that a concurrent request may insert too, so a
  unique constraint decides who wins: users, projects, memberships, items, assignments (handing out
  the next item), judgments; and the admin CLI, whose commands are mostly such creates. The loser
  is rolled back and `fn` runs again, sees the winner's row and answers as if it came second. `fn`
  must therefore only touch the session it is given (no side effects a second run would repeat).
- `session(write=True)` for every other write: updates and deletes of existing rows (settings,
  drafts, roles removed, passwords, logouts) and inserts under a fresh random key (login sessions,
  API keys), where no concurrent request can collide and a retry could not change the outcome.
  So is setup code that runs alone (the demo, benchmarks).
Reads use `session()`.

The schema is created and upgraded by Alembic migrations shipped in this package; `migrate()`
runs them programmatically, so no alembic.ini is needed anywhere.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from rlhfkit.errors import UserError
from rlhfkit.feedback.settings import display_url

MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")
_MIGRATION_LOCK_ID = 7_401_337  # any constant: serialises two servers migrating one PostgreSQL


def normalize_url(url: str) -> str:
    """Accept the plain `postgresql://` spelling and use psycopg 3, the driver we ship.

    The result keeps the password (the engine needs it): show `display_url(...)` instead.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not parsed, so the password could not be hidden: the URL is not repeated.
        raise UserError(
            "db_url is not a database URL (e.g. sqlite:///feedback.db, postgresql://user@host/db)"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise UserError(f"db_url {display_url(url)!r}: only SQLite and PostgreSQL are supported")
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise UserError("db_url: SQLite needs a file (sqlite:///feedback.db); in-memory data would be lost")
    return parsed.render_as_string(hide_password=False)


def _sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    assert database is not None
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    # The file holds password hashes and every judgment: readable by its owner only. SQLite gives
    # its -wal and -shm files the database file's mode, so creating it 0600 covers all three.
    os.close(os.open(database, os.O_CREAT | os.O_RDWR, 0o600))
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # pysqlite's own transaction handling starts transactions late and wrongly; we emit BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "busy_timeout=30000", "foreign_keys=ON", "synchronous=NORMAL"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")

    return engine


class _SqliteWriteLock:
    """One SQLite writer at a time, across this process's threads and across processes.

    Threads queue on a threading.Lock, processes (`serve workers=N`, an admin command beside the
    server) on an flock of `<database>-lock`: the kernel hands it to the next waiter at once. With
    SQLite's busy handler alone, which sleeps and polls (up to 100 ms a try), some writers waited
    seconds under load while others got in again and again.
    """

    def __init__(self, database: str):
        self._threads = threading.Lock()
        self._path = f"{database}-lock"
        self._file = -1

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            self._file = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(self._file, fcntl.LOCK_EX)
        except BaseException:
            self._release()
            raise

    def __exit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        if self._file >= 0:
            os.close(self._file)  # which releases the flock
            self._file = -1
        self._threads.release()


class Database:
    """An engine plus two kinds of transaction: `session()` to read, `session(write=True)` to write."""

    def __init__(self, url: str):
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            self.engine = _sqlite_engine(self.url)
        else:
            self.engine = create_engine(self.url, pool_size=10, max_overflow=30, pool_pre_ping=True)
        self._write_lock = _SqliteWriteLock(str(make_url(self.url).database)) if self.is_sqlite else None
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(self.engine.execution_options(write=True), expire_on_commit=False)

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """A transaction: committed on normal exit, rolled back on any exception."""
        lock = self._write_lock if (write and self._write_lock is not None) else nullcontext()
        with lock, (self._writer if write else self._reader).begin() as s:
            yield s

    def transact(self, fn: Callable[[Session], T], retries: int = 3) -> T:
        """Run `fn` in a write transaction, retrying when a concurrent writer got there first.

        A unique-constraint race (two identical submits at once) or a PostgreSQL deadlock rolls
        everything back; running `fn` again then sees the winner's row and answers accordingly
        (a retried submit returns the stored judgment), so no request fails for being concurrent.
        """
        for attempt in range(retries):
            try:
                with self.session(write=True) as s:
                    return fn(s)
            except (IntegrityError, OperationalError) as e:
                retryable = isinstance(e, IntegrityError) or getattr(e.orig, "sqlstate", None) in (
                    "40001",
                    "40P01",
                )
                if not retryable or attempt == retries - 1:
                    raise
        raise AssertionError("unreachable")

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest migration (safe to call on every start)."""
        self._alembic(command.upgrade, "head")

    def downgrade(self, revision: str) -> None:
        """Take the schema back to `revision`, keeping every row it can hold: to run an older release."""
        self._alembic(command.downgrade, revision)

    def _alembic(self, run: Callable[[AlembicConfig, str], None], revision: str) -> None:
        """Run an Alembic command on this database, one server at a time, without an alembic.ini."""
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        lock = self._write_lock or nullcontext()
        with lock, self.engine.execution_options(write=True).begin() as conn:
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_ID})
            cfg.attributes["connection"] = conn
            run(cfg, revision)

    def dispose(self) -> None:
        self.engine.dispose()

"""SQLite backend (stdlib ``sqlite3``): the embedded default, one file in the workspace.

Durability: WAL journal with ``synchronous=FULL``, so a committed transaction (and so every packet
whose receipt was sent) survives a crash or power loss. Foreign keys are on. Every write transaction
is ``BEGIN IMMEDIATE``: it takes the database's single write lock up front, which serialises
writers across threads and processes and makes the reads inside the transaction current (SQLite's
equivalent of PostgreSQL's ``SELECT ... FOR UPDATE``). A writer waits up to ``busy_timeout_s`` for
the lock, then fails with :class:`StoreError`.

One write connection per store, shared by the store's threads under a lock: SQLite serialises
writers anyway, and one connection keeps WAL checkpoints and fsyncs in one place. Packets are
committed in groups by the store's one writer thread (:mod:`.group_commit`): one ``fsync`` per
batch. Read transactions run on up to ``max_readers`` (4) further connections (``query_only``),
which WAL lets read while the writer commits: a read (the revocation check of every call, a
device's record) no longer waits behind a batch's ``fsync`` (issue 15: 14% of the server's busy
samples were threads waiting for the one connection's lock). An in-memory database has one
connection for both.

Packet bodies above ``body_file_bytes`` (64 KiB) live in content-addressed files in
``<database>.bodies/`` (0700 folders, 0600 files, fsynced before the row commits).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

from ..errors import StoreError
from .base import (
    DEFAULT_BODY_FILE_BYTES,
    DEFAULT_EPSILON_BUDGET,
    DEFAULT_MAX_BODY_BYTES,
    Cursor,
    Store,
)
from .group_commit import GroupCommitConfig
from .migrations import MIGRATIONS, Migration

__all__ = ["SQLiteStore"]


class SQLiteStore(Store):
    """A store in one SQLite file (created and migrated if missing).

    Raises :class:`StoreError` if the file cannot be opened, is not a database, or holds a schema
    newer than this build (:class:`~diredi_secure.store.SchemaTooNew`).
    """

    dialect: ClassVar[str] = "sqlite"
    _for_update: ClassVar[str] = ""
    _integrity_error: ClassVar[type[Exception]] = sqlite3.IntegrityError

    def __init__(
        self,
        path: str | Path,
        *,
        default_epsilon_budget: float = DEFAULT_EPSILON_BUDGET,
        busy_timeout_s: float = 30.0,
        migrations: Sequence[Migration] = MIGRATIONS,
        body_file_bytes: int = DEFAULT_BODY_FILE_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        group_commit: GroupCommitConfig = GroupCommitConfig(),  # noqa: B008 - frozen
        max_readers: int = 4,
    ) -> None:
        """``max_readers``: read connections beside the write connection (0: every read takes
        the write connection's lock, as an in-memory database always does)."""
        memory = str(path) == ":memory:"
        body_dir = None if memory else Path(f"{path}.bodies")
        super().__init__(
            name=str(path), default_epsilon_budget=default_epsilon_budget, migrations=migrations,
            body_dir=body_dir, body_file_bytes=body_file_bytes, max_body_bytes=max_body_bytes,
            group_commit=group_commit,
        )
        if body_dir is not None:
            _sweep_temporaries(body_dir)
        self._lock = threading.Lock()
        # Absolute, and opened read-only by URI: a reader opened later (after a chdir, or once the
        # file is gone) never opens or creates another database (review finding F4).
        self._reader_uri = "file:" + urllib.parse.quote(os.path.abspath(str(path))) + "?mode=ro"
        self._busy_timeout_s = busy_timeout_s
        self._max_readers = 0 if memory else max(0, int(max_readers))
        self._readers_cv = threading.Condition()
        self._idle_readers: list[sqlite3.Connection] = []
        self._all_readers: list[sqlite3.Connection] = []
        self._readers_closing = False
        if str(path) != ":memory:":
            # The ledger and packets are private: create the file 0600 before SQLite opens it (its
            # -wal and -shm files take the database file's mode).
            # On OSError, sqlite3.connect below reports why the file cannot be opened.
            with contextlib.suppress(OSError):
                os.close(os.open(str(path), os.O_CREAT | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0),
                                 0o600))
        try:
            # isolation_level=None: the driver never opens transactions behind our back; we issue
            # BEGIN IMMEDIATE / COMMIT / ROLLBACK ourselves.
            self._conn = sqlite3.connect(
                str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"store {path}: cannot open SQLite database: {exc}") from exc
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(path) != ":memory:" and str(mode).lower() != "wal":
                raise StoreError(f"store {path}: SQLite refused WAL mode (got {mode!r})")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(f"store {path}: cannot initialise SQLite database: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Cursor]:
        if not write and self._max_readers:
            with self._reader() as conn:
                yield from _in_transaction(conn, "BEGIN DEFERRED")
            return
        with self._lock:
            yield from _in_transaction(self._conn, "BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """An idle read connection (opened on first need, at most ``max_readers``; a caller
        beyond waits for one to come back). Raises :class:`StoreError` once the store is closing,
        waiting callers included."""
        with self._readers_cv:
            while (not self._readers_closing and not self._idle_readers
                   and len(self._all_readers) >= self._max_readers):
                self._readers_cv.wait()
            if self._readers_closing:
                raise StoreError(f"store {self.name}: read on a closed store")
            conn = self._idle_readers.pop() if self._idle_readers else None
            if conn is None:
                conn = sqlite3.connect(self._reader_uri, uri=True, timeout=self._busy_timeout_s,
                                       isolation_level=None, check_same_thread=False)
                try:
                    conn.execute("PRAGMA query_only=ON")
                    conn.execute("PRAGMA foreign_keys=ON")
                except BaseException:
                    conn.close()
                    raise
                self._all_readers.append(conn)
        try:
            yield conn
        finally:
            with self._readers_cv:
                self._idle_readers.append(conn)
                self._readers_cv.notify_all()

    _CLOSE_WAIT_S: ClassVar[float] = 5.0
    """How long close() lets reads in flight finish before it interrupts them."""

    def _close(self) -> None:
        # Reads in flight finish (or, after _CLOSE_WAIT_S, are interrupted) before their
        # connections close: closing a connection another thread is stepping crashed the process
        # (review finding F1: a segfault within 50 closes under 4 reading threads); the one
        # connection's lock made the old close wait the same way.
        with self._readers_cv:
            self._readers_closing = True
            self._readers_cv.notify_all()

            def settled() -> bool:
                return len(self._idle_readers) == len(self._all_readers)

            if not self._readers_cv.wait_for(settled, self._CLOSE_WAIT_S):
                for conn in self._all_readers:
                    if conn not in self._idle_readers:
                        conn.interrupt()  # the read ends with OperationalError -> StoreError
                self._readers_cv.wait_for(settled)
            for conn in self._all_readers:
                conn.close()
            self._all_readers.clear()
            self._idle_readers.clear()
        with self._lock:
            self._conn.close()


def _in_transaction(conn: sqlite3.Connection, begin: str) -> Iterator[Cursor]:
    """One transaction on ``conn`` (the body of :meth:`SQLiteStore._transaction`): a cursor,
    committed on normal exit, rolled back on any exception."""
    cur = conn.cursor()
    try:
        cur.execute(begin)
        yield cur
        cur.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        cur.close()


_STALE_TEMPORARY_S = 600.0


def _sweep_temporaries(body_dir: Path) -> None:
    """Remove body files a killed writer left half-written (``.tmp-*``, never linked into place:
    no row names them). Only old ones: another process may be writing a fresh one right now."""
    if not body_dir.is_dir():
        return
    cutoff = time.time() - _STALE_TEMPORARY_S
    for tmp in body_dir.glob("*/.tmp-*"):
        with contextlib.suppress(OSError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()

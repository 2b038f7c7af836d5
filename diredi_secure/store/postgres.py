"""PostgreSQL backend (psycopg 3): the shared store of a fleet's stateless ingest replicas.

Packets are committed in groups (:mod:`.group_commit`): one transaction per batch, which locks
the batch's device rows in one statement, in device-id order (so two replicas' batches cannot
deadlock). Transactions run at READ COMMITTED. What makes :meth:`Store.store_packet` safe between replicas is
the row lock it takes first (``SELECT ... FROM devices WHERE device_id = %s FOR UPDATE``): every
acceptance for one device is serialised on that row, and each later statement of the transaction
reads the winner's committed packet, counter and spent epsilon. Unique constraints on
``packets.packet_id`` and ``(device_id, counter)`` are the backstop. Migrations and release
recording take a transaction-scoped advisory lock so that replicas starting together do not race.

Connections come from a small thread-safe pool (``max_connections``); a broken connection is
dropped, so a restarted server is reconnected on the next call. The DSN's password never appears in
``name`` or in error messages this module writes.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from ..errors import StoreError
from .base import DEFAULT_EPSILON_BUDGET, Cursor, Store
from .group_commit import GroupCommitConfig
from .migrations import MIGRATIONS, Migration

__all__ = ["PostgresStore"]

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _redacted(dsn: str) -> str:
    """``postgresql://user@host:port/db`` without the password (best effort)."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "postgresql://<unparseable dsn>"
    user = parts.get("user")
    host = parts.get("host", "")
    port = parts.get("port")
    db = parts.get("dbname", "")
    return f"postgresql://{f'{user}@' if user else ''}{host}{f':{port}' if port else ''}/{db}"


class _PgCursor:
    """Adapts ``?`` placeholders (what the shared queries use) to psycopg's ``%s``."""

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    def execute(self, query: str, params: Sequence[Any] = ()) -> Any:
        # The shared SQL contains no literal '?' or '%' (base.py keeps it so).
        return self._cursor.execute(query.replace("?", "%s"), tuple(params))

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


class _Pool:
    """A minimal blocking connection pool (psycopg_pool is not a dependency)."""

    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any]], max_size: int, timeout_s: float
    ) -> None:
        self._connect = connect
        self._max = max_size
        self._timeout = timeout_s
        self._idle: list[psycopg.Connection[Any]] = []
        self._size = 0
        self._cond = threading.Condition()

    def acquire(self) -> psycopg.Connection[Any]:
        with self._cond:
            while not self._idle and self._size >= self._max:
                if not self._cond.wait(self._timeout):
                    raise StoreError(f"no database connection free after {self._timeout} s")
            if self._idle:
                return self._idle.pop()
            self._size += 1
        try:
            return self._connect()
        except BaseException:
            with self._cond:
                self._size -= 1
                self._cond.notify()
            raise

    def release(self, conn: psycopg.Connection[Any]) -> None:
        with self._cond:
            if conn.closed or conn.broken:
                self._size -= 1
                conn.close()
            else:
                self._idle.append(conn)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PostgresStore(Store):
    """A store in a PostgreSQL database (tables created and migrated if missing).

    ``schema``: if given, the tables live in that schema (created if missing) instead of the
    server's default search path, e.g. one schema per deployment or per test run.

    Raises :class:`StoreError` if the server cannot be reached or holds a newer schema.
    """

    dialect: ClassVar[str] = "postgresql"
    _for_update: ClassVar[str] = " FOR UPDATE"
    _integrity_error: ClassVar[type[Exception]] = psycopg.errors.IntegrityError

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        default_epsilon_budget: float = DEFAULT_EPSILON_BUDGET,
        max_connections: int = 8,
        connect_timeout_s: int = 10,
        pool_timeout_s: float = 30.0,
        migrations: Sequence[Migration] = MIGRATIONS,
        group_commit: GroupCommitConfig = GroupCommitConfig(),  # noqa: B008 - frozen
    ) -> None:
        name = _redacted(dsn) + (f"#{schema}" if schema else "")
        # Bodies stay in their rows (TOASTed): replicas on other hosts share no folder.
        super().__init__(
            name=name, default_epsilon_budget=default_epsilon_budget, migrations=migrations,
            group_commit=group_commit,
        )
        if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
            raise StoreError(f"store {name}: schema name {schema!r} is not a plain identifier")
        if max_connections < 1:
            raise StoreError(f"store {name}: max_connections must be at least 1")
        self._dsn = dsn
        self._schema = schema
        self._connect_timeout = connect_timeout_s
        self._pool = _Pool(self._connect, max_connections, pool_timeout_s)
        try:
            with self._guard("create schema"):
                self._ensure_schema()
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(
                self._dsn, autocommit=True, connect_timeout=self._connect_timeout
            )
        except psycopg.Error as exc:
            raise StoreError(f"store {self.name}: cannot connect: {exc}") from exc
        if self._schema is not None:
            try:
                # search_path may name a schema that does not exist yet: _ensure_schema makes it.
                conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self._schema)))
            except BaseException:
                conn.close()
                raise
        return conn

    def _ensure_schema(self) -> None:
        if self._schema is None:
            return
        conn = self._pool.acquire()
        try:
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self._schema))
            )
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateSchema):
            pass  # another replica created it between IF NOT EXISTS and the insert: fine
        finally:
            self._pool.release(conn)

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Cursor]:
        conn = self._pool.acquire()
        try:
            with conn.transaction(), conn.cursor() as cur:
                if not write:
                    cur.execute("SET TRANSACTION READ ONLY")
                yield _PgCursor(cur)
        finally:
            self._pool.release(conn)

    def _advisory_lock(self, cursor: Cursor, key: int) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(?)", (key,))

    def _close(self) -> None:
        self._pool.close()

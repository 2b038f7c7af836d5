"""Persistence behind one interface: SQLite (embedded default) and PostgreSQL (a fleet).

``open_store(url_or_path)`` picks the backend: a ``postgresql://`` (or ``postgres://``) DSN
opens :class:`PostgresStore`, anything else is a SQLite file path for :class:`SQLiteStore`. Both
create and migrate their schema on open and refuse a database newer than this build. See
docs/STORAGE.md.
"""

from __future__ import annotations

from pathlib import Path

from .base import (
    DEFAULT_BODY_FILE_BYTES,
    DEFAULT_EPSILON_BUDGET,
    CertificateChanged,
    Device,
    DeviceConflict,
    DeviceStatus,
    PacketRecord,
    PacketRow,
    Release,
    Store,
    StoredPacket,
    StoredReceipt,
)
from .group_commit import GroupCommitConfig
from .migrations import MIGRATIONS, SCHEMA_VERSION, Migration, SchemaTooNew
from .postgres import PostgresStore
from .sqlite import SQLiteStore

__all__ = [
    "DEFAULT_BODY_FILE_BYTES",
    "DEFAULT_EPSILON_BUDGET",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "CertificateChanged",
    "Device",
    "DeviceConflict",
    "DeviceStatus",
    "GroupCommitConfig",
    "Migration",
    "PacketRecord",
    "PacketRow",
    "PostgresStore",
    "Release",
    "SQLiteStore",
    "SchemaTooNew",
    "Store",
    "StoredPacket",
    "StoredReceipt",
    "is_postgres_url",
    "open_store",
]

_PG_PREFIXES = ("postgresql://", "postgres://")


def is_postgres_url(url_or_path: str | Path) -> bool:
    """Whether ``open_store`` would treat this as a PostgreSQL DSN."""
    return isinstance(url_or_path, str) and url_or_path.startswith(_PG_PREFIXES)


def open_store(
    url_or_path: str | Path,
    *,
    default_epsilon_budget: float = DEFAULT_EPSILON_BUDGET,
    schema: str | None = None,
) -> Store:
    """Open (creating and migrating if needed) the store at a PostgreSQL DSN or SQLite path.

    ``schema`` applies to PostgreSQL only (tables in that schema). Raises :class:`StoreError`
    (unreachable server, unopenable file, schema newer than this build).
    """
    if is_postgres_url(url_or_path):
        return PostgresStore(
            str(url_or_path), schema=schema, default_epsilon_budget=default_epsilon_budget
        )
    return SQLiteStore(Path(url_or_path), default_epsilon_budget=default_epsilon_budget)

"""Versioned schema migrations, shared by both backends.

Each :class:`Migration` is applied once, in order, inside one transaction together with the row
that records it in ``schema_version``; a database whose version is higher than the last migration
this build knows is refused (:class:`SchemaTooNew`), because older code must not write to a schema
whose rules it does not know. Migrations are append-only: never edit one that has shipped, add the
next version instead.

Column types differ between SQLite and PostgreSQL only in name, so the statements use the tokens
``{blob}``, ``{float}`` and ``{bigint}``, filled in per dialect by :func:`render`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import StoreError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "SchemaTooNew", "render"]


class SchemaTooNew(StoreError):
    """The database was migrated by a newer build than this one; refuse to touch it."""

    reason = "store_schema_too_new"


@dataclass(frozen=True)
class Migration:
    """One schema step: ``version`` (1, 2, ...) and the DDL statements that reach it."""

    version: int
    description: str
    statements: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.version < 1 or not self.statements:
            raise ValueError(f"migration {self.version} needs a positive version and statements")


_TYPES: dict[str, dict[str, str]] = {
    "sqlite": {"blob": "BLOB", "float": "REAL", "bigint": "INTEGER"},
    "postgresql": {"blob": "BYTEA", "float": "DOUBLE PRECISION", "bigint": "BIGINT"},
}

# The replay state (highest counter) and the epsilon ledger (spent, budget) live on the device row
# on purpose: store_packet locks that one row (SELECT ... FOR UPDATE) and so serialises every
# acceptance for a device across replicas, while different devices never contend.
_V1 = Migration(
    1,
    "devices, packets with replay state and epsilon ledger, releases",
    (
        """
        CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            certificate_der {blob} NOT NULL,
            key_id {blob} NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
            enrolled_at_ms {bigint} NOT NULL,
            revoked_at_ms {bigint},
            revocation_reason TEXT,
            epsilon_budget {float} NOT NULL CHECK (epsilon_budget >= 0),
            epsilon_spent {float} NOT NULL DEFAULT 0,
            highest_counter {bigint}
        )
        """,
        """
        CREATE TABLE releases (
            version TEXT PRIMARY KEY,
            sequence {bigint} NOT NULL UNIQUE,
            model_sha256 TEXT NOT NULL,
            attestation_sha256 TEXT NOT NULL,
            created_at_ms {bigint} NOT NULL
        )
        """,
        """
        CREATE TABLE packets (
            packet_id {blob} PRIMARY KEY,
            device_id TEXT NOT NULL REFERENCES devices (device_id),
            counter {bigint} NOT NULL,
            created_at_ms {bigint} NOT NULL,
            received_at_ms {bigint} NOT NULL,
            base_model_version TEXT NOT NULL,
            epsilon {float} NOT NULL,
            packet_sha256 {blob} NOT NULL,
            packet_bytes {blob} NOT NULL,
            receipt_bytes {blob} NOT NULL,
            merged_in_release TEXT REFERENCES releases (version),
            UNIQUE (device_id, counter)
        )
        """,
        "CREATE INDEX packets_by_merge ON packets (merged_in_release, received_at_ms)",
    ),
)

# The composed ledger (docs/PRIVACY.md): each device keeps the RDP curve of everything it has
# released (``privacy.curve_to_json``), and each packet the curve it added. ``epsilon_spent`` is
# then the curve's epsilon at the policy's one delta (a cache for listing, never summed).
_V2 = Migration(
    2,
    "composed epsilon ledger: RDP curves per device and per packet",
    (
        "ALTER TABLE devices ADD COLUMN rdp_spent TEXT",
        "ALTER TABLE packets ADD COLUMN rdp_curve TEXT",
        # What a v1 ledger summed cannot be turned into a curve: keep it as a floor that every
        # later charge adds to, so upgrading never resets a device's budget.
        "ALTER TABLE devices ADD COLUMN epsilon_floor {float} NOT NULL DEFAULT 0",
        "UPDATE devices SET epsilon_floor = epsilon_spent",
    ),
)

# Packet bodies above the store's threshold live in content-addressed files next to the database
# (named by ``packet_sha256``, written and fsynced before the row commits); the row then keeps an
# empty ``packet_bytes`` and ``body_in_file = 1``. Rows written before v3 keep their bodies inline.
_V3 = Migration(
    3,
    "packet bodies above a threshold in content-addressed files",
    ("ALTER TABLE packets ADD COLUMN body_in_file INTEGER NOT NULL DEFAULT 0",),
)

MIGRATIONS: tuple[Migration, ...] = (_V1, _V2, _V3)
SCHEMA_VERSION = MIGRATIONS[-1].version


def render(migration: Migration, dialect: str) -> list[str]:
    """The statements of ``migration`` with the column types of ``dialect``."""
    types = _TYPES[dialect]
    return [statement.format(**types) for statement in migration.statements]


def check_sequence(migrations: Sequence[Migration]) -> None:
    """Raise ``ValueError`` unless ``migrations`` are versions 1, 2, ... n in order."""
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations must be numbered 1..n in order, got {versions}")

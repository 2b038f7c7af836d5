"""Store value types and helpers that need no database."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from diredi_secure.store import MIGRATIONS, SCHEMA_VERSION, Migration, PacketRecord, is_postgres_url
from diredi_secure.store.migrations import check_sequence, render
from diredi_secure.store.postgres import _redacted

GOOD = {
    "device_id": "dev1",
    "packet_id": b"p" * 16,
    "counter": 1,
    "created_at_ms": 1,
    "base_model_version": "edge-v1",
    "epsilon": 0.5,
    "packet_bytes": b"sealed",
    "receipt_bytes": b"receipt",
    "received_at_ms": 2,
}


def test_a_valid_record_constructs() -> None:
    assert PacketRecord(**GOOD).epsilon == 0.5  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device_id", ""),
        ("packet_id", b""),
        ("packet_id", b"x" * 65),
        ("counter", -1),
        ("epsilon", -0.1),
        ("epsilon", math.nan),
        ("epsilon", math.inf),
        ("packet_bytes", b""),
        ("receipt_bytes", b""),
    ],
)
def test_invalid_records_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError):
        PacketRecord(**{**GOOD, field: value})  # type: ignore[arg-type]


def test_migrations_are_numbered_and_render_per_dialect() -> None:
    check_sequence(MIGRATIONS)
    assert len(MIGRATIONS) == SCHEMA_VERSION
    pg = " ".join(render(MIGRATIONS[0], "postgresql"))
    lite = " ".join(render(MIGRATIONS[0], "sqlite"))
    assert "BYTEA" in pg and "{" not in pg and "BLOB" in lite and "{" not in lite
    with pytest.raises(ValueError):
        check_sequence((*MIGRATIONS, Migration(SCHEMA_VERSION + 2, "gap", ("SELECT 1",))))


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("postgresql://u@h/db", True),
        ("postgres://h/db", True),
        ("workspace/cloud.db", False),
        (Path("postgresql://not-a-path-object"), False),
    ],
)
def test_open_store_dispatch(target: str | Path, expected: bool) -> None:
    assert is_postgres_url(target) is expected


def test_dsn_password_is_redacted() -> None:
    assert _redacted("postgresql://alice:s3cret@db.example:5433/fleet") == (
        "postgresql://alice@db.example:5433/fleet"
    )
    assert "s3cret" not in _redacted("host=h user=u password=s3cret dbname=d")

"""Group commit and the one-pass ingest (issue 15 items 1 and 2), on real SQLite and PostgreSQL.

A batch is checked packet by packet in arrival order against the state that includes the packets
before it; a refusal inside a batch leaves the others committed; a body above the threshold lives
in a content-addressed 0600 file that is read back (and checked) through the store; the ingest
path checks a certificate against the CA once, and a revocation refuses the next packet.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from diredi_secure.services.cloud import CloudKeys, Ingest
from psycopg import sql

from diredi_secure.errors import (
    BudgetExceeded,
    CertificateRevoked,
    ReplayDetected,
    StoreError,
    UnknownDevice,
)
from diredi_secure.packet import verify_receipt
from diredi_secure.store import (
    MIGRATIONS,
    CertificateChanged,
    PacketRecord,
    PacketRow,
    PostgresStore,
    SQLiteStore,
    Store,
)

from ..conftest import NOW_MS, Pki, make_payload
from .test_store_backends import CERT, KEY_ID, PG_DSN, T0, _pg_unavailable, composed, record

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s: Store = SQLiteStore(tmp_path / "store.db", default_epsilon_budget=5.0)
        schema = None
    else:
        if why := _pg_unavailable():
            pytest.skip(why)
        schema = f"diredi_gc_{os.getpid()}_{threading.get_ident() % 10_000}"
        s = PostgresStore(PG_DSN, schema=schema, default_epsilon_budget=5.0)
    s.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
    s.register_device("dev2", CERT + b"2", KEY_ID, enrolled_at_ms=T0)
    try:
        yield s
    finally:
        s.close()
        if schema is not None:
            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def rows(*records: PacketRecord) -> list[PacketRow]:
    return [PacketRow.of(r) for r in records]


# ------------------------------------------------------------------------------ one batch
def test_two_packets_of_one_device_in_one_batch_are_checked_in_order(store: Store) -> None:
    out = store.commit_rows(rows(record(1, epsilon=1.0), record(2, epsilon=1.0),
                                 record(1, device_id="dev2", epsilon=0.5)))
    assert [o.duplicate for o in out] == [False, False, False]  # type: ignore[union-attr]
    assert store.highest_counter("dev1") == 2 and store.highest_counter("dev2") == 1
    assert store.epsilon_spent("dev1") == pytest.approx(composed(1.0, 2), rel=1e-9)
    assert store.epsilon_spent("dev2") == pytest.approx(composed(0.5, 1), rel=1e-9)


def test_a_replayed_counter_inside_a_batch_is_refused_and_the_others_commit(store: Store) -> None:
    out = store.commit_rows(rows(
        record(2),
        record(2, packet_id=b"same-counter....", epsilon=0.1),  # counter 2 again, other packet
        record(1, packet_id=b"lower-counter...", epsilon=0.1),  # below the batch's own highest
        record(3),
    ))
    assert isinstance(out[1], ReplayDetected) and isinstance(out[2], ReplayDetected)
    assert not isinstance(out[0], Exception) and not isinstance(out[3], Exception)
    assert [p.counter for p in store.list_packets()] == [2, 3]
    assert store.epsilon_spent("dev1") == pytest.approx(composed(1.0, 2), rel=1e-9)


def test_the_same_packet_twice_in_a_batch_is_stored_once_with_one_receipt(store: Store) -> None:
    first, again = store.commit_rows(rows(record(1), record(1, receipt=b"a-second-receipt")))
    assert not isinstance(first, Exception) and not isinstance(again, Exception)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.receipt_bytes == first.receipt_bytes
    assert len(store.list_packets()) == 1
    assert store.epsilon_spent("dev1") == pytest.approx(composed(1.0, 1), rel=1e-9)  # charged once


def test_a_budget_refusal_inside_a_batch_counts_the_earlier_packets(store: Store) -> None:
    store.set_epsilon_budget("dev1", 1.0)
    out = store.commit_rows(rows(
        record(1, epsilon=0.8),
        record(2, epsilon=0.8),  # composed with the first: over 1.0
        record(3, epsilon=0.1),  # still fits after the first
    ))
    assert isinstance(out[1], BudgetExceeded)
    assert [p.counter for p in store.list_packets()] == [1, 3]
    assert store.highest_counter("dev1") == 3  # the refused one burned no counter


def test_revoked_unknown_and_renewed_devices_are_refused_per_packet(store: Store) -> None:
    store.revoke_device("dev2", revoked_at_ms=T0 + 1, reason="lost")
    stale_cert = dataclasses.replace(record(2), enrolled_certificate=b"an-older-cert")
    out = store.commit_rows(rows(
        record(1, device_id="dev2"), record(1, device_id="ghost"), stale_cert, record(1)))
    assert isinstance(out[0], CertificateRevoked)
    assert isinstance(out[1], UnknownDevice) and not isinstance(out[1], CertificateChanged)
    assert isinstance(out[2], CertificateChanged)
    assert not isinstance(out[3], Exception)
    assert [(p.device_id, p.counter) for p in store.list_packets()] == [("dev1", 1)]


def test_a_packet_id_stored_with_other_bytes_is_a_replay_inside_a_batch(store: Store) -> None:
    store.store_packet(record(1))
    forged = record(1, body=b"other bytes, same id", receipt=b"x")
    (out,) = store.commit_rows(rows(forged))
    assert isinstance(out, ReplayDetected)


def test_concurrent_packets_share_transactions(tmp_path: Path) -> None:
    """Held back behind the write lock, 32 packets queue up and commit in at most 2 batches."""
    s = SQLiteStore(tmp_path / "gc.db", default_epsilon_budget=1e9)
    for c in range(1, 33):  # one device each: the threads race, counters must not
        s.register_device(f"d{c}", CERT + bytes([c]), KEY_ID, enrolled_at_ms=T0)
    results: list[object] = []
    gate = s._lock  # the connection lock every transaction takes: the writer waits on it
    entered = []
    submit = s._submit_row

    def counted(row: PacketRow) -> object:
        entered.append(row)
        return submit(row)

    s._submit_row = counted  # type: ignore[assignment]
    gate.acquire()
    try:
        threads = [threading.Thread(target=lambda c=c: results.append(
            s.store_packet(record(1, device_id=f"d{c}", epsilon=0.01)))) for c in range(1, 33)]
        for t in threads:
            t.start()
        while len(entered) < 32:
            threading.Event().wait(0.001)
        threading.Event().wait(0.2)  # each has queued its packet (or the writer holds it)
    finally:
        gate.release()
    for t in threads:
        t.join()
    assert len(results) == 32 and s._writer.items == 32
    # What the writer took before it blocked, then everything that queued behind it: without group
    # commit this would be 32 transactions.
    assert s._writer.batches <= 2
    assert len(s.list_packets()) == 32
    s.close()


# ------------------------------------------------------------------------------ bodies in files
def test_a_large_body_lives_in_a_private_content_addressed_file(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "b.db", default_epsilon_budget=1e9)
    s.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
    big = os.urandom(100 * 1024)
    small = b"small body"
    s.store_packet(record(1, body=big))
    s.store_packet(record(2, body=small))
    files = [p for p in (tmp_path / "b.db.bodies").rglob("*") if p.is_file()]
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert files[0].read_bytes() == big
    big_row, small_row = s.list_packets()
    assert (big_row.packet_bytes, small_row.packet_bytes) == (big, small)  # read back via the store
    raw = s._conn.execute("SELECT length(packet_bytes), body_in_file FROM packets ORDER BY counter")
    assert raw.fetchall() == [(0, 1), (len(small), 0)]  # the row keeps only the digest
    s.close()
    files[0].write_bytes(big[:-1] + bytes([big[-1] ^ 1]))  # damage it
    with SQLiteStore(tmp_path / "b.db") as again, pytest.raises(StoreError, match="digest"):
        again.list_packets()


def test_a_refused_large_packet_leaves_no_file(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "r.db", default_epsilon_budget=1e9)
    s.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
    s.store_packet(record(5))
    with pytest.raises(ReplayDetected):
        s.store_packet(record(4, body=os.urandom(100 * 1024)))
    assert not [p for p in (tmp_path / "r.db.bodies").rglob("*") if p.is_file()]
    s.close()


def test_a_v2_store_opens_and_keeps_its_inline_bodies(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with SQLiteStore(path, migrations=MIGRATIONS[:2]) as old:
        old.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
        old._conn.execute(  # what a v2 build wrote: the body inline, no body_in_file column
            "INSERT INTO packets (packet_id, device_id, counter, created_at_ms, received_at_ms, "
            "base_model_version, epsilon, packet_sha256, packet_bytes, receipt_bytes) "
            "VALUES (?, 'dev1', 1, 1, 1, 'v1', 0.5, ?, ?, ?)",
            (b"old-packet......", bytes(32), b"x" * 200_000, b"rcpt"))
    with SQLiteStore(path) as new:
        assert new.schema_version() == 3
        (p,) = new.list_packets()
        assert p.packet_bytes == b"x" * 200_000


# ------------------------------------------------------------------------------ one pass
@pytest.fixture
def ingest(pki: Pki, tmp_path: Path) -> Iterator[tuple[Ingest, SQLiteStore]]:
    s = SQLiteStore(tmp_path / "ingest.db", default_epsilon_budget=1e9)
    for device_id, (key, cert) in pki.device_keys.items():
        s.register_device(device_id, cert, key.key_id, enrolled_at_ms=NOW_MS)
    yield Ingest(s, CloudKeys(pki.inbox, pki.receipt_key, pki.ca_cert), clock=lambda: NOW_MS), s
    s.close()


def test_a_certificate_is_checked_against_the_ca_once(pki: Pki, ingest: tuple[Ingest, SQLiteStore]) -> None:
    cloud, store = ingest
    for counter in range(1, 6):
        sealed = pki.seal("device-a", counter, payload=make_payload(counter))
        verify_receipt(cloud.submit(sealed.data), pki.receipt_key.public_key, sealed.data)
    cloud.submit(pki.seal("device-b", 1).data)
    assert cloud.identities.checks == 2  # one per enrolled certificate, not per packet
    assert store.highest_counter("device-a") == 5


def test_a_revoked_device_is_refused_on_its_next_packet(pki: Pki, ingest: tuple[Ingest, SQLiteStore]) -> None:
    cloud, store = ingest
    first = pki.seal("device-a", 1)
    receipt = cloud.submit(first.data)
    store.revoke_device("device-a", revoked_at_ms=NOW_MS, reason="stolen")
    with pytest.raises(CertificateRevoked):
        cloud.submit(pki.seal("device-a", 2).data)
    assert store.highest_counter("device-a") == 1 and len(store.list_packets()) == 1
    assert len(cloud.identities) == 0  # its verified certificate was dropped
    assert cloud.submit(first.data) == receipt  # a retry of what was stored still gets its receipt


def test_a_retry_and_a_replayed_counter_through_the_one_pass(pki: Pki, ingest: tuple[Ingest, SQLiteStore]) -> None:
    cloud, store = ingest
    sealed = pki.seal("device-a", 3)
    receipt = cloud.submit(sealed.data)
    assert cloud.submit(sealed.data) == receipt  # refused by the counter hint, then answered
    with pytest.raises(ReplayDetected):
        cloud.submit(pki.seal("device-a", 3).data)  # same counter, another packet
    assert len(store.list_packets()) == 1


def test_a_renewed_certificate_is_verified_again(pki: Pki, ingest: tuple[Ingest, SQLiteStore]) -> None:
    cloud, store = ingest
    cloud.submit(pki.seal("device-a", 1).data)  # caches device-a's first certificate
    key, cert = pki.add_device("device-a", enroll=False, serial=999)  # a new key and certificate
    store.register_device("device-a", cert, key.key_id, enrolled_at_ms=NOW_MS, renew=True)
    sealed = pki.seal("device-a", 2)
    receipt = cloud.submit(sealed.data)  # CertificateChanged inside, verified again, stored
    verify_receipt(receipt, pki.receipt_key.public_key, sealed.data)
    assert cloud.identities.checks == 2
    assert np.isfinite(store.epsilon_spent("device-a"))

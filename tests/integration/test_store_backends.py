"""The store against real databases: every test runs on SQLite and on PostgreSQL.

PostgreSQL: ``DIREDI_TEST_PG_DSN`` (or ``DIREDI_TEST_POSTGRES_DSN``), default
postgresql://postgres@127.0.0.1:5432/test. Each test gets its own schema, dropped afterwards. The
PostgreSQL cases are marked ``postgres`` and skipped (with the reason) only if no server answers.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql

from diredi_secure import privacy
from diredi_secure.errors import (
    BudgetExceeded,
    CertificateRevoked,
    ReplayDetected,
    StoreError,
    UnknownDevice,
)
from diredi_secure.packet import DeviceDirectory, ReplayState
from diredi_secure.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    DeviceConflict,
    DeviceStatus,
    Migration,
    PacketRecord,
    PostgresStore,
    SchemaTooNew,
    SQLiteStore,
    Store,
    open_store,
)

PG_DSN = os.environ.get(
    "DIREDI_TEST_PG_DSN",
    os.environ.get("DIREDI_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
)
KEY_ID = bytes(range(32))
CERT = b"\x30\x82certificate-der-of-dev1"
T0 = 1_700_000_000_000

_pg_answer: list[str | None] = []


def _pg_unavailable() -> str | None:
    """None if the server answers, else why not (probed once per run)."""
    if not _pg_answer:
        try:
            with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            _pg_answer.append(None)
        except psycopg.Error as exc:
            _pg_answer.append(f"no PostgreSQL server answers at {PG_DSN}: {exc}")
    return _pg_answer[0]


Factory = Callable[..., Store]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def open_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """A factory opening (another handle on) ONE fresh database of the parametrised backend."""
    opened: list[Store] = []
    if request.param == "sqlite":
        path = tmp_path / "store.db"

        def factory(**kwargs: Any) -> Store:
            store = SQLiteStore(path, **kwargs)
            opened.append(store)
            return store

        yield factory
        for store in opened:
            store.close()
        return

    reason = _pg_unavailable()
    if reason is not None:
        pytest.skip(reason)
    schema = f"diredi_test_{uuid.uuid4().hex[:16]}"

    def pg_factory(**kwargs: Any) -> Store:
        store = PostgresStore(PG_DSN, schema=schema, **kwargs)
        opened.append(store)
        return store

    try:
        yield pg_factory
    finally:
        for store in opened:
            store.close()
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def store(open_db: Factory) -> Store:
    s = open_db(default_epsilon_budget=5.0)
    s.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
    return s


def record(
    counter: int,
    *,
    device_id: str = "dev1",
    packet_id: bytes | None = None,
    epsilon: float = 1.0,
    body: bytes | None = None,
    receipt: bytes | None = None,
) -> PacketRecord:
    pid = packet_id if packet_id is not None else f"{device_id}-{counter}".encode().ljust(16, b".")
    return PacketRecord(
        device_id=device_id,
        packet_id=pid,
        counter=counter,
        created_at_ms=T0 + counter,
        base_model_version="edge-v1",
        epsilon=epsilon,
        packet_bytes=body if body is not None else b"sealed:" + pid,
        receipt_bytes=receipt if receipt is not None else b"receipt:" + pid,
        received_at_ms=T0 + 1000 + counter,
        rdp_curve=curve_of(epsilon),
    )


def curve_of(epsilon: float):  # type: ignore[no-untyped-def]
    """The ledger curve of one Gaussian release spending ``epsilon`` at the policy's delta."""
    if epsilon == 0:
        return privacy.zero_curve()
    sigma = privacy.noise_for_epsilon(epsilon, delta=privacy.DEFAULT_DP_POLICY.delta,
                                      sample_rate=1.0, steps=1, lo=0.05, hi=1e5)
    return privacy.gaussian_curve(sigma, 1.0, 1)


def composed(epsilon: float, k: int) -> float:
    """Lifetime epsilon of ``k`` such packets, composed by the ledger's accountant."""
    return privacy.lifetime_epsilon(curve_of(epsilon) * k)


def snapshot(store: Store) -> tuple[object, ...]:
    """Everything a refused call must leave unchanged."""
    return (
        store.list_devices(),
        store.list_packets(unmerged_only=False),
        store.latest_release(),
    )


# ------------------------------------------------------------------------------------ schema
def test_migrates_an_empty_database_and_reopens_without_reapplying(open_db: Factory) -> None:
    first = open_db()
    assert first.schema_version() == SCHEMA_VERSION
    assert first.list_devices() == [] and first.list_packets() == []
    first.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
    first.close()
    again = open_db()
    assert again.schema_version() == SCHEMA_VERSION
    assert [d.device_id for d in again.list_devices()] == ["dev1"]


EXTRA = Migration(SCHEMA_VERSION + 1, "test: extra table", ("CREATE TABLE extra (x {bigint})",))


def test_upgrades_to_a_new_migration_then_older_code_refuses_the_newer_schema(
    open_db: Factory,
) -> None:
    open_db().close()  # at SCHEMA_VERSION
    newer = open_db(migrations=(*MIGRATIONS, EXTRA))
    assert newer.schema_version() == SCHEMA_VERSION + 1
    newer.close()
    with pytest.raises(SchemaTooNew, match=r"newer|upgrade"):
        open_db()
    assert issubclass(SchemaTooNew, StoreError)


def test_a_failing_migration_rolls_back_whole(open_db: Factory) -> None:
    open_db().close()
    broken = Migration(
        SCHEMA_VERSION + 1,
        "test: second statement fails",
        ("CREATE TABLE half_done (x {bigint})", "CREATE TABLE devices (x {bigint})"),
    )
    with pytest.raises(StoreError):
        open_db(migrations=(*MIGRATIONS, broken))
    # The first statement of the failed migration was rolled back with it, so it applies cleanly.
    fixed = Migration(SCHEMA_VERSION + 1, "test", ("CREATE TABLE half_done (x {bigint})",))
    assert open_db(migrations=(*MIGRATIONS, fixed)).schema_version() == SCHEMA_VERSION + 1


# ------------------------------------------------------------------------------------ devices
def test_register_is_idempotent_and_refuses_another_certificate(open_db: Factory) -> None:
    s = open_db(default_epsilon_budget=3.5)
    dev = s.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
    assert dev.status is DeviceStatus.ACTIVE and dev.epsilon_budget == 3.5
    assert dev.key_id == KEY_ID and dev.highest_counter is None and dev.epsilon_spent == 0.0
    assert s.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0 + 5) == dev
    with pytest.raises(DeviceConflict):
        s.register_device("dev1", CERT + b"x", KEY_ID, enrolled_at_ms=T0)
    custom = s.register_device("dev2", b"c2", KEY_ID, enrolled_at_ms=T0, epsilon_budget=1.25)
    assert custom.epsilon_budget == 1.25
    assert [d.device_id for d in s.list_devices()] == ["dev1", "dev2"]
    assert s.get_device("nope") is None
    record_ = s.device_record("dev1")
    assert record_ is not None and record_.certificate_der == CERT


def test_revocation_is_idempotent_and_blocks_packets_and_reenrolment(store: Store) -> None:
    revoked = store.revoke_device("dev1", revoked_at_ms=T0 + 9, reason="stolen")
    assert revoked.status is DeviceStatus.REVOKED and revoked.revoked_at_ms == T0 + 9
    again = store.revoke_device("dev1", revoked_at_ms=T0 + 99, reason="other")
    assert again.revoked_at_ms == T0 + 9 and again.revocation_reason == "stolen"
    with pytest.raises(CertificateRevoked):
        store.store_packet(record(1))
    with pytest.raises(CertificateRevoked):
        store.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
    with pytest.raises(CertificateRevoked):
        store.require_active_device("dev1")
    with pytest.raises(UnknownDevice):
        store.revoke_device("ghost", revoked_at_ms=T0, reason="x")
    assert store.list_packets(unmerged_only=False) == []


def test_device_status_reads_the_status_alone(store: Store) -> None:
    assert store.device_status("dev1") is DeviceStatus.ACTIVE
    assert store.device_status("ghost") is None
    store.revoke_device("dev1", revoked_at_ms=T0 + 9, reason="stolen")
    assert store.device_status("dev1") is DeviceStatus.REVOKED


def test_sqlite_reads_do_not_wait_behind_an_open_write_transaction(tmp_path: Path) -> None:
    """Issue 15: reads run on their own WAL connections; one connection under one lock made the
    revocation check of every call wait behind each batch's fsync."""
    s = SQLiteStore(tmp_path / "s.db")
    s.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
    holding, release = threading.Event(), threading.Event()

    def writer() -> None:
        with s._transaction(write=True) as cur:
            cur.execute("UPDATE devices SET epsilon_budget = 7.0 WHERE device_id = 'dev1'")
            holding.set()
            release.wait(30)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert holding.wait(30)
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.append(s.get_device("dev1")))
        reader.start()
        reader.join(10)  # with one shared connection this waited for `release`
        assert not reader.is_alive(), "a read waited for the open write transaction"
        assert got[0].epsilon_budget == 40.0  # type: ignore[attr-defined]  # the committed state
    finally:
        release.set()
        t.join(30)
    assert s.get_device("dev1").epsilon_budget == 7.0  # type: ignore[union-attr]
    with pytest.raises(sqlite3.OperationalError, match="readonly"), s._reader() as conn:
        conn.execute("UPDATE devices SET epsilon_budget = 1.0")  # readers never write
    s.close()
    assert s._all_readers == []
    with pytest.raises(StoreError):
        s.get_device("dev1")


def test_sqlite_close_waits_for_reads_in_flight(tmp_path: Path) -> None:
    """Review finding F1: close() closed read connections other threads were stepping, and the
    process crashed (a segfault within 50 closes under 4 reading threads)."""
    for trial in range(30):
        s = SQLiteStore(tmp_path / f"c{trial}.db")
        s.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
        errors: list[BaseException] = []
        started = threading.Barrier(5)

        def read(store: SQLiteStore = s, errors: list[BaseException] = errors,
                 started: threading.Barrier = started) -> None:
            started.wait(10)
            for _ in range(200):
                try:
                    store.list_devices()
                    store.device_status("dev1")
                except BaseException as exc:  # the test asserts which ones came
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=read) for _ in range(4)]
        for t in threads:
            t.start()
        started.wait(10)
        s.close()
        for t in threads:
            t.join(30)
        assert all(isinstance(e, StoreError) for e in errors), errors
        assert s._all_readers == [] and s._idle_readers == []


# ------------------------------------------------------------------------------------ packets
def test_store_packet_records_replay_state_and_ledger(store: Store) -> None:
    out = store.store_packet(record(3, epsilon=1.5))
    assert out.receipt_bytes == record(3).receipt_bytes and not out.duplicate
    assert store.highest_counter("dev1") == 3
    assert store.packet_seen(record(3).packet_id)
    assert not store.packet_seen(b"unknown-id......")
    assert store.epsilon_spent("dev1") == pytest.approx(1.5, rel=1e-5)
    [stored] = store.list_packets()
    assert stored.packet_bytes == record(3).packet_bytes
    assert stored.packet_sha256 == hashlib.sha256(record(3).packet_bytes).digest()
    assert (stored.counter, stored.epsilon, stored.merged_in_release) == (3, 1.5, None)
    assert store.get_packet(record(3).packet_id) == stored
    assert store.highest_counter("ghost") is None


def test_idempotent_retry_returns_the_first_receipt_and_charges_once(store: Store) -> None:
    first = store.store_packet(record(1, epsilon=2.0))
    before = snapshot(store)
    # A retry: same bytes; the server computed a fresh receipt (later timestamp) before the call.
    retry = store.store_packet(record(1, epsilon=2.0, receipt=b"a-newer-receipt"))
    assert retry.duplicate and retry.receipt_bytes == first.receipt_bytes
    assert snapshot(store) == before
    assert store.existing_receipt(record(1).packet_id, record(1).packet_bytes) == (
        first.receipt_bytes
    )
    assert store.existing_receipt(b"never-stored....", b"x") is None


def test_same_packet_id_with_other_bytes_is_a_replay(store: Store) -> None:
    store.store_packet(record(1))
    before = snapshot(store)
    forged = record(2, packet_id=record(1).packet_id, body=b"other bytes")
    with pytest.raises(ReplayDetected, match="other bytes"):
        store.store_packet(forged)
    with pytest.raises(ReplayDetected):
        store.existing_receipt(forged.packet_id, forged.packet_bytes)
    assert snapshot(store) == before


@pytest.mark.parametrize("counter", [5, 4, 1])
def test_counter_not_above_highest_is_a_replay(store: Store, counter: int) -> None:
    store.store_packet(record(5))
    before = snapshot(store)
    with pytest.raises(ReplayDetected, match="counter"):
        store.store_packet(record(counter, packet_id=f"fresh-{counter}".encode().ljust(16, b".")))
    assert snapshot(store) == before


def test_budget_exceeded_changes_nothing_and_burns_no_counter(store: Store) -> None:
    store.set_epsilon_budget("dev1", 1.0)
    store.store_packet(record(1, epsilon=0.8))
    before = snapshot(store)
    with pytest.raises(BudgetExceeded):
        store.store_packet(record(2, epsilon=0.8))  # composed: about 1.2 > 1.0
    assert snapshot(store) == before
    assert store.epsilon_spent("dev1") == pytest.approx(0.8, rel=1e-5)
    assert store.highest_counter("dev1") == 1
    assert not store.packet_seen(record(2).packet_id)
    # The refused packet left no trace: a cheaper packet with the same counter is accepted.
    store.store_packet(record(2, epsilon=0.1, packet_id=b"cheaper-2-......"))
    want = privacy.lifetime_epsilon(curve_of(0.8) + curve_of(0.1))
    assert store.epsilon_spent("dev1") == pytest.approx(want, rel=1e-12) and want < 0.9


def test_budget_filled_exactly_despite_float_rounding(store: Store) -> None:
    store.set_epsilon_budget("dev1", privacy.lifetime_epsilon(curve_of(0.1) + curve_of(0.2)))
    store.store_packet(record(1, epsilon=0.1))
    store.store_packet(record(2, epsilon=0.2))  # exactly the budget
    with pytest.raises(BudgetExceeded):
        store.store_packet(record(3, epsilon=0.01))


def test_ledger_composes_five_packets_below_their_sum(store: Store) -> None:
    for i in range(1, 6):
        store.store_packet(record(i, epsilon=1.0))
    spent = store.epsilon_spent("dev1")
    assert spent == pytest.approx(privacy.lifetime_epsilon(curve_of(1.0) * 5), rel=1e-12)
    assert spent < 5.0
    dev = store.get_device("dev1")
    assert dev is not None and dev.rdp_spent is not None and dev.epsilon_delta == 1e-5


def test_certificate_renewal_keeps_the_ledger(store: Store) -> None:
    store.store_packet(record(1, epsilon=1.0))
    before = store.get_device("dev1")
    assert before is not None
    with pytest.raises(DeviceConflict):  # a new certificate is only taken as a renewal
        store.register_device("dev1", CERT + b"renewed", KEY_ID, enrolled_at_ms=T0 + 9)
    renewed = store.register_device("dev1", CERT + b"renewed", bytes(32), enrolled_at_ms=T0 + 9,
                                    renew=True)
    assert renewed.certificate_der == CERT + b"renewed"
    assert renewed.epsilon_spent == before.epsilon_spent
    assert renewed.highest_counter == 1 and renewed.epsilon_budget == before.epsilon_budget
    assert np.array_equal(renewed.rdp_spent, before.rdp_spent)  # type: ignore[arg-type]
    with pytest.raises(ReplayDetected):
        store.store_packet(record(1, epsilon=0.1, packet_id=b"after-renewal..."))


def test_unknown_device_is_refused(store: Store) -> None:
    with pytest.raises(UnknownDevice):
        store.store_packet(record(1, device_id="ghost"))
    with pytest.raises(UnknownDevice):
        store.epsilon_spent("ghost")
    assert store.list_packets(unmerged_only=False) == []


def test_retry_after_revocation_still_gets_its_receipt(store: Store) -> None:
    first = store.store_packet(record(1))
    store.revoke_device("dev1", revoked_at_ms=T0, reason="lost")
    assert store.store_packet(record(1)).receipt_bytes == first.receipt_bytes


# ------------------------------------------------------------------------------ merge, releases
def test_merge_and_releases(store: Store) -> None:
    for c in (1, 2, 3):
        store.store_packet(record(c))
    assert store.latest_release() is None
    digest = "ab" * 32
    v1 = store.record_release("v1", digest, "cd" * 32, T0, merged_packet_ids=[record(1).packet_id])
    assert v1.sequence == 1 and store.latest_release() == v1
    assert [p.counter for p in store.list_packets()] == [2, 3]
    store.mark_merged([record(2).packet_id], "v1")
    store.mark_merged([record(2).packet_id], "v1")  # idempotent
    assert [p.counter for p in store.list_packets()] == [3]
    assert len(store.list_packets(unmerged_only=False)) == 3
    assert store.record_release("v1", digest, "cd" * 32, T0) == v1  # idempotent
    with pytest.raises(StoreError, match="other digests"):
        store.record_release("v1", "ee" * 32, "cd" * 32, T0)
    v2 = store.record_release("v2", "ef" * 32, "cd" * 32, T0 - 5)  # earlier clock, later release
    assert store.latest_release() == v2 and v2.sequence == 2
    assert store.get_release("v1") == v1

    before = snapshot(store)
    with pytest.raises(StoreError, match="already merged into v1"):
        store.mark_merged([record(3).packet_id, record(1).packet_id], "v2")
    with pytest.raises(StoreError, match="not recorded"):
        store.mark_merged([record(3).packet_id], "v9")
    with pytest.raises(StoreError, match="not stored"):
        store.mark_merged([b"never-stored...."], "v2")
    assert snapshot(store) == before  # all or nothing: packet 3 is still unmerged


# ------------------------------------------------------------------------------------ concurrency
def _race(
    stores: list[Store], work: Callable[[Store, int], object], rounds: int
) -> list[list[Any]]:
    """Run ``work(store, round)`` on each store in its own thread, starting each round together."""
    barrier = threading.Barrier(len(stores))
    results: list[list[Any]] = [[] for _ in stores]

    def run(i: int) -> None:
        for r in range(1, rounds + 1):
            barrier.wait(timeout=30)
            try:
                results[i].append(work(stores[i], r))
            except Exception as exc:
                results[i].append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_two_connections_racing_on_one_device_exactly_one_wins_each_counter(
    open_db: Factory,
) -> None:
    a = open_db(default_epsilon_budget=100.0)
    b = open_db(default_epsilon_budget=100.0)  # a second connection (a second replica)
    a.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
    rounds = 15
    names = ("A", "B")

    def submit(s: Store, r: int) -> object:
        tag = names[0] if s is a else names[1]
        return s.store_packet(record(r, packet_id=f"{tag}-{r}".encode().ljust(16, b".")))

    results = _race([a, b], submit, rounds)
    for r in range(rounds):
        outcomes = [results[0][r], results[1][r]]
        wins = [o for o in outcomes if not isinstance(o, Exception)]
        losses = [o for o in outcomes if isinstance(o, Exception)]
        assert len(wins) == 1, f"round {r + 1}: {outcomes}"
        assert isinstance(losses[0], ReplayDetected), f"round {r + 1}: {losses[0]!r}"
    stored = a.list_packets()
    assert [p.counter for p in stored] == list(range(1, rounds + 1))
    assert a.highest_counter("dev1") == rounds
    assert b.epsilon_spent("dev1") == pytest.approx(composed(1.0, rounds), rel=1e-12)


def test_the_same_packet_racing_on_two_connections_is_stored_once(open_db: Factory) -> None:
    a = open_db()
    b = open_db()
    a.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
    results = _race([a, b], lambda s, r: s.store_packet(record(r, epsilon=0.1)), rounds=10)
    for r in range(10):
        outs = [results[0][r], results[1][r]]
        assert all(not isinstance(o, Exception) for o in outs), outs
        assert sorted(o.duplicate for o in outs) == [False, True]
        assert outs[0].receipt_bytes == outs[1].receipt_bytes
    assert len(a.list_packets()) == 10
    assert a.epsilon_spent("dev1") == pytest.approx(composed(0.1, 10), rel=1e-12)


def test_racing_distinct_counters_keep_the_ledger_and_counter_consistent(
    open_db: Factory,
) -> None:
    """Two replicas accept different packets of one device at once: no lost ledger update.

    Without the row lock both would read the same spent epsilon and highest counter, both would
    insert (distinct ids and counters pass the unique constraints) and one update would be lost.
    """
    a = open_db()
    b = open_db()
    a.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0, epsilon_budget=2.0)
    eps = 0.25
    most = max(k for k in range(1, 400) if composed(eps, k) <= 2.0)  # composed, not 8 = 2 / 0.25

    def submit(s: Store, r: int) -> object:
        return s.store_packet(record(2 * r + (0 if s is a else 1), epsilon=eps))

    results = _race([a, b], submit, rounds=12)
    for outcome in (o for per in results for o in per):
        if isinstance(outcome, Exception):
            assert isinstance(outcome, ReplayDetected | BudgetExceeded), repr(outcome)
    stored = a.list_packets()
    assert 1 <= len(stored) <= most
    assert a.epsilon_spent("dev1") == pytest.approx(composed(eps, len(stored)), rel=1e-12)
    assert a.highest_counter("dev1") == max(p.counter for p in stored)
    assert len(stored) == sum(1 for per in results for o in per if not isinstance(o, Exception))


# ------------------------------------------------------------------------------------ failures
def test_a_closed_store_raises_store_error(open_db: Factory) -> None:
    s = open_db()
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.list_devices()


def test_store_implements_the_packet_protocols(store: Store) -> None:
    replay: ReplayState = store
    devices: DeviceDirectory = store
    assert replay.highest_counter("dev1") is None and devices.device_record("dev1") is not None


# ------------------------------------------------------------------------------------ SQLite only
def test_sqlite_pragmas(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "s.db") as s:
        conn = s._conn  # the settings are per connection: read them on the store's own
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


_WRITER = """
import os, sys
from diredi_secure.store import PacketRecord, SQLiteStore
s = SQLiteStore(sys.argv[1])
s.register_device("dev1", b"cert", bytes(32), enrolled_at_ms=1)
from diredi_secure import privacy
rec = PacketRecord("dev1", b"durable-packet..", 1, 2, "edge-v1", 0.5, b"sealed", b"rcpt", 3,
                   rdp_curve=privacy.gaussian_curve(10.0, 1.0, 1))
s.store_packet(rec)
print("stored", flush=True)
os._exit(0)  # no close, no checkpoint: as if killed right after the receipt went out
"""


def test_sqlite_commit_survives_the_process_dying_without_close(tmp_path: Path) -> None:
    path = tmp_path / "durable.db"
    out = subprocess.run(
        [sys.executable, "-c", _WRITER, str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "stored" in out.stdout, out.stderr
    with SQLiteStore(path) as s:
        [p] = s.list_packets()
        assert (p.packet_id, p.receipt_bytes, p.packet_bytes) == (
            b"durable-packet..",
            b"rcpt",
            b"sealed",
        )
        assert s.epsilon_spent("dev1") == pytest.approx(
            privacy.lifetime_epsilon(privacy.gaussian_curve(10.0, 1.0, 1)), rel=1e-12)
        assert s.highest_counter("dev1") == 1


def test_sqlite_reopen_sees_the_packet(tmp_path: Path) -> None:
    path = tmp_path / "again.db"
    with SQLiteStore(path) as s:
        s.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
        s.store_packet(record(1))
    with open_store(path) as s:
        assert isinstance(s, SQLiteStore)
        assert s.get_packet(record(1).packet_id) is not None


@pytest.mark.parametrize(
    "prepare",
    [
        pytest.param(lambda p: p / "missing-dir" / "s.db", id="missing-directory"),
        pytest.param(
            lambda p: (p / "junk.db").write_bytes(b"not a database" * 100) and p / "junk.db",
            id="not-a-database",
        ),
    ],
)
def test_sqlite_open_failures_are_store_errors(
    tmp_path: Path, prepare: Callable[[Path], Path]
) -> None:
    with pytest.raises(StoreError) as info:
        SQLiteStore(prepare(tmp_path))
    assert isinstance(info.value.__cause__, sqlite3.Error)


@pytest.mark.postgres
def test_postgres_unreachable_is_a_store_error_without_the_password() -> None:
    with pytest.raises(StoreError) as info:
        open_store("postgresql://u:s3cret@127.0.0.1:1/db?connect_timeout=2")
    assert "s3cret" not in str(info.value)
    assert isinstance(info.value.__cause__, psycopg.Error)


def test_sqlite_database_is_created_private(tmp_path: Path) -> None:
    """Issue 14 finding 6: cloud.db was 0644."""
    import stat

    path = tmp_path / "cloud.db"
    with SQLiteStore(path) as s:
        s.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=T0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_upgrading_a_v1_ledger_never_resets_a_budget(tmp_path: Path) -> None:
    """Review finding: v2 added the curve column empty, so a device at 39.9 of 40 restarted at 0."""
    from diredi_secure.store.migrations import MIGRATIONS

    path = tmp_path / "v1.db"
    SQLiteStore(path, migrations=MIGRATIONS[:1]).close()  # a deployed v1 database
    con = sqlite3.connect(path)
    con.execute("INSERT INTO devices (device_id, certificate_der, key_id, status, enrolled_at_ms, "
                "epsilon_budget, epsilon_spent, highest_counter) "
                "VALUES ('dev1', ?, ?, 'active', ?, 40.0, 39.9, 5)", (CERT, KEY_ID, T0))
    con.commit()
    con.close()
    with SQLiteStore(path) as s:  # upgrade to v2
        dev = s.get_device("dev1")
        assert dev is not None and dev.epsilon_floor == 39.9
        with pytest.raises(BudgetExceeded):
            s.store_packet(record(6, epsilon=0.5))
        s.store_packet(record(7, epsilon=0.05))
        assert s.epsilon_spent("dev1") == pytest.approx(39.95, rel=1e-6)


def test_the_postgres_password_never_sits_in_the_config_file(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14 finding 5: the DSN with its password was stored in clear in a 0644 cloud.json."""
    import stat

    from diredi_secure.services.workspace import STORE_SECRET_FILE, CloudWorkspace

    monkeypatch.delenv("DIREDI_STORE_PASSWORD", raising=False)
    ws = CloudWorkspace.init(tmp_path / "cloud", now_ms=T0,
                             store="postgresql://alice:s3cr%40t@db.example:5432/fleet",
                             create_store=False)
    text = ws.config_path.read_text()
    assert "s3cr" not in text and "postgresql://alice@db.example:5432/fleet" in text
    secret = ws.root / STORE_SECRET_FILE
    assert secret.read_text() == "s3cr@t" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert ws.store_url() == "postgresql://alice:s3cr%40t@db.example:5432/fleet"
    monkeypatch.setenv("DIREDI_STORE_PASSWORD", "from-env")
    assert ws.store_url() == "postgresql://alice:from-env@db.example:5432/fleet"
    # A SQLite path is stored absolute, so another working directory opens the same database.
    lite = CloudWorkspace.init(tmp_path / "lite", now_ms=T0)
    assert Path(lite.store_url()).is_absolute()

"""The store interface: one abstract class, all the rules, two tiny backends.

:class:`Store` holds every query and every rule (replay, idempotency, the epsilon ledger) in SQL
that both SQLite and PostgreSQL run. A backend supplies only a connection discipline: two abstract
methods, :meth:`Store._transaction` (a cursor inside one transaction that commits on normal exit and
rolls back on any exception) and :meth:`Store._close`, plus two dialect constants. As python-tuf's
``FetcherInterface`` does, the public methods wrap the backend so that every driver or I/O failure
comes out as :class:`~diredi_secure.errors.StoreError` raised ``from`` its cause; the policy errors
a method documents (``ReplayDetected``, ``BudgetExceeded``, ``UnknownDevice``...) pass through as
they are. Clock values are parameters (integer milliseconds since the epoch); nothing here reads
a clock.

What is trusted: the arguments. The store does not verify signatures or parse packets; the caller
(the ingest service) has opened and validated the packet with the protocol core first.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self

import numpy as np

from ..checkpoint import read_regular_file
from ..errors import (
    CertificateRevoked,
    DirediError,
    KeyFileError,
    PolicyError,
    ReplayDetected,
    StoreError,
    TooLarge,
    UnknownDevice,
)
from ..packet import DeviceRecord, DeviceStatus, packet_digest
from ..policy import DEFAULT_LIMITS, DEFAULT_POLICY
from ..privacy import DEFAULT_DP_POLICY, DPPolicy, charge, curve_from_json, curve_to_json
from .group_commit import GroupCommitConfig, GroupCommitter
from .migrations import Migration, SchemaTooNew, check_sequence, render

if TYPE_CHECKING:
    from ..packet import OpenedPacket

__all__ = [
    "DEFAULT_BODY_FILE_BYTES",
    "DEFAULT_EPSILON_BUDGET",
    "CertificateChanged",
    "Device",
    "DeviceConflict",
    "DeviceStatus",
    "PacketRecord",
    "PacketRow",
    "Release",
    "Store",
    "StoredPacket",
    "StoredReceipt",
]

DEFAULT_EPSILON_BUDGET = DEFAULT_POLICY.lifetime_epsilon_budget
"""Lifetime epsilon budget of a device enrolled without one (the policy's default)."""

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_PACKET_ID_BYTES = 64
# pg_advisory_xact_lock key that serialises migrations across replicas starting together.
_MIGRATION_LOCK_KEY = 0x5D1E_D100
_RELEASE_LOCK_KEY = 0x5D1E_D101


DEFAULT_BODY_FILE_BYTES = 64 * 1024
"""Packet bodies above this many bytes go to a content-addressed file instead of the row."""

DEFAULT_MAX_BODY_BYTES = DEFAULT_LIMITS.max_packet_bytes
"""Cap on reading one body file back: the largest packet ingest accepts by default
(``Limits.max_packet_bytes``), so no body the default limits let in is refused."""


class DeviceConflict(PolicyError):
    """A device id is already enrolled with a different certificate."""

    reason = "device_conflict"


class CertificateChanged(UnknownDevice):
    """The packet was verified under a certificate the device no longer has enrolled (renewed
    between the caller's check and the commit). The caller drops what it cached and retries."""

    reason = "certificate_changed"


@dataclass(frozen=True)
class Device:
    """An enrolled device, its replay state and its epsilon ledger."""

    device_id: str
    certificate_der: bytes
    key_id: bytes
    """SHA-256 of the device public key's SubjectPublicKeyInfo (32 bytes)."""
    status: DeviceStatus
    enrolled_at_ms: int
    revoked_at_ms: int | None
    revocation_reason: str | None
    epsilon_budget: float
    """Lifetime epsilon this device may spend, at the ledger's delta (``epsilon_delta``)."""
    epsilon_spent: float
    """Composed lifetime epsilon (RDP over every accepted packet) at ``epsilon_delta``."""
    highest_counter: int | None
    """Highest packet counter accepted so far; ``None`` before the first packet."""
    rdp_spent: np.ndarray | None = field(default=None, compare=False)
    """The composed RDP curve (``privacy.RDP_ORDERS``) the ledger keeps; ``epsilon_spent`` is read
    off it."""
    epsilon_delta: float = DEFAULT_DP_POLICY.delta
    """The one delta every epsilon of this ledger is stated at."""
    epsilon_floor: float = 0.0
    """Epsilon summed by a schema-v1 ledger before the upgrade; added to the composed curve."""


@dataclass(frozen=True)
class PacketRecord:
    """What ``store_packet`` persists for one accepted packet (validated on construction).

    ``packet_bytes`` are the SignedPacket bytes exactly as received (still encrypted; the merge job
    opens them again). ``receipt_bytes`` is the signed receipt the caller computed before the call;
    it is sent only after ``store_packet`` returns (the transaction has committed).
    """

    device_id: str
    packet_id: bytes
    counter: int
    created_at_ms: int
    base_model_version: str
    epsilon: float
    packet_bytes: bytes
    receipt_bytes: bytes
    received_at_ms: int
    packet_sha256: bytes | None = None
    """``packet.packet_digest`` of the packet (what was signed + the signature): the idempotency
    key. ``None``: computed from ``packet_bytes``."""
    rdp_curve: np.ndarray | None = field(default=None, compare=False)
    """What this packet adds to the device's composed ledger (``OpenedPacket.charge.curve``).
    Required by :meth:`Store.store_packet`."""
    enrolled_certificate: bytes | None = field(default=None, compare=False)
    """The enrolled certificate (DER) the caller verified the packet under, when it worked from a
    cached copy: the store refuses with :class:`CertificateChanged` if the device's enrolled
    certificate is another one by the time the packet commits. ``None``: not checked."""

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ValueError("device_id must not be empty")
        if not 1 <= len(self.packet_id) <= _MAX_PACKET_ID_BYTES:
            raise ValueError(f"packet_id must be 1..{_MAX_PACKET_ID_BYTES} bytes")
        if self.counter < 0:
            raise ValueError(f"counter must be non-negative, got {self.counter}")
        if not self.packet_bytes or not self.receipt_bytes:
            raise ValueError("packet_bytes and receipt_bytes must not be empty")
        if not math.isfinite(self.epsilon) or self.epsilon < 0:
            raise ValueError(f"epsilon must be finite and non-negative, got {self.epsilon!r}")

    @classmethod
    def from_opened(
        cls,
        opened: OpenedPacket,
        *,
        packet_bytes: bytes,
        receipt_bytes: bytes,
        received_at_ms: int,
        enrolled_certificate: bytes | None = None,
    ) -> PacketRecord:
        """The record of a packet that ``packet.open_packet`` accepted (header fields copied)."""
        header = opened.header
        return cls(
            device_id=header.device_id,
            packet_id=header.packet_id,
            counter=header.counter,
            created_at_ms=header.created_at_ms,
            base_model_version=header.base_model_version,
            epsilon=opened.epsilon,
            packet_bytes=packet_bytes,
            receipt_bytes=receipt_bytes,
            received_at_ms=received_at_ms,
            rdp_curve=opened.charge.curve,
            packet_sha256=opened.packet_sha256,
            enrolled_certificate=enrolled_certificate,
        )


_ROW_MAGIC = b"DRW1"


@dataclass(frozen=True)
class PacketRow:
    """What the store's writer commits for one packet: a :class:`PacketRecord` with its digest
    computed (the one hash) and its ledger curve required. Internal to the store and its writer
    processes (``to_bytes`` / ``from_bytes`` carry it between processes of one server, without
    pickle)."""

    device_id: str
    packet_id: bytes
    counter: int
    created_at_ms: int
    received_at_ms: int
    base_model_version: str
    epsilon: float
    digest: bytes
    body: bytes
    receipt_bytes: bytes
    rdp_curve: np.ndarray = field(compare=False)
    enrolled_certificate: bytes | None = None

    @classmethod
    def of(cls, record: PacketRecord) -> PacketRow:
        if record.rdp_curve is None:
            raise ValueError("store_packet needs the packet's RDP curve (PacketRecord.rdp_curve)")
        return cls(
            device_id=record.device_id,
            packet_id=bytes(record.packet_id),
            counter=record.counter,
            created_at_ms=record.created_at_ms,
            received_at_ms=record.received_at_ms,
            base_model_version=record.base_model_version,
            epsilon=float(record.epsilon),
            digest=record.packet_sha256 or _digest_of(record.packet_bytes),
            body=bytes(record.packet_bytes),
            receipt_bytes=bytes(record.receipt_bytes),
            rdp_curve=record.rdp_curve,
            enrolled_certificate=record.enrolled_certificate,
        )

    def to_bytes(self) -> bytes:
        """Magic, the numbers, then u32-length-prefixed fields (the curve as privacy's JSON)."""
        cert = self.enrolled_certificate
        fields = (
            self.device_id.encode(), self.packet_id, self.base_model_version.encode(),
            self.digest, self.body, self.receipt_bytes, curve_to_json(self.rdp_curve).encode(),
            b"" if cert is None else cert,
        )  # fmt: skip
        parts = [_ROW_MAGIC, struct.pack(">qqqdB", self.counter, self.created_at_ms,
                                         self.received_at_ms, self.epsilon, cert is not None)]
        for value in fields:
            parts += (struct.pack(">I", len(value)), value)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> PacketRow:
        """Raises ``ValueError`` on anything :meth:`to_bytes` did not write."""
        if data[:4] != _ROW_MAGIC:
            raise ValueError("not a packet row")
        head = struct.calcsize(">qqqdB")
        counter, created, received, epsilon, has_cert = struct.unpack_from(">qqqdB", data, 4)
        pos, values = 4 + head, []
        for _ in range(8):
            (n,) = struct.unpack_from(">I", data, pos)
            pos += 4
            if pos + n > len(data):
                raise ValueError("truncated packet row")
            values.append(data[pos:pos + n])
            pos += n
        if pos != len(data):
            raise ValueError("trailing bytes after a packet row")
        curve = curve_from_json(values[6].decode())
        if curve is None:
            raise ValueError("packet row without a curve")
        return cls(
            device_id=values[0].decode(), packet_id=values[1], counter=counter,
            created_at_ms=created, received_at_ms=received,
            base_model_version=values[2].decode(), epsilon=epsilon, digest=values[3],
            body=values[4], receipt_bytes=values[5], rdp_curve=curve,
            enrolled_certificate=values[7] if has_cert else None,
        )


@dataclass(frozen=True)
class StoredPacket:
    """A packet as stored (``merged_in_release`` is ``None`` until a release merges it)."""

    packet_id: bytes
    device_id: str
    counter: int
    created_at_ms: int
    received_at_ms: int
    base_model_version: str
    epsilon: float
    packet_sha256: bytes
    packet_bytes: bytes
    receipt_bytes: bytes
    merged_in_release: str | None


@dataclass(frozen=True)
class StoredReceipt:
    """Result of ``store_packet``: the receipt to send, and whether this was a retry."""

    receipt_bytes: bytes
    duplicate: bool
    """True if these packet bytes were already stored: ``receipt_bytes`` is the first receipt."""


@dataclass(frozen=True)
class Release:
    """A recorded model release; ``sequence`` orders releases (1, 2, ...) by recording."""

    version: str
    model_sha256: str
    attestation_sha256: str
    created_at_ms: int
    sequence: int


class Cursor(Protocol):
    """The DB-API cursor subset the queries use (``?`` placeholders in every dialect)."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    @property
    def rowcount(self) -> int: ...


_DEVICE_COLUMNS = (
    "device_id, certificate_der, key_id, status, enrolled_at_ms, revoked_at_ms, "
    "revocation_reason, epsilon_budget, epsilon_spent, highest_counter, rdp_spent, epsilon_floor"
)
_PACKET_COLUMNS = (
    "packet_id, device_id, counter, created_at_ms, received_at_ms, base_model_version, epsilon, "
    "packet_sha256, packet_bytes, receipt_bytes, merged_in_release"
)
_PACKET_READ_COLUMNS = _PACKET_COLUMNS + ", body_in_file"
_RELEASE_COLUMNS = "version, model_sha256, attestation_sha256, created_at_ms, sequence"


def _device(row: Sequence[Any]) -> Device:
    return Device(
        device_id=row[0],
        certificate_der=bytes(row[1]),
        key_id=bytes(row[2]),
        status=DeviceStatus(row[3]),
        enrolled_at_ms=int(row[4]),
        revoked_at_ms=None if row[5] is None else int(row[5]),
        revocation_reason=row[6],
        epsilon_budget=float(row[7]),
        epsilon_spent=float(row[8]),
        highest_counter=None if row[9] is None else int(row[9]),
        rdp_spent=curve_from_json(row[10]),
        epsilon_floor=float(row[11]),
    )


def _packet(row: Sequence[Any], body: bytes | None = None) -> StoredPacket:
    return StoredPacket(
        packet_id=bytes(row[0]),
        device_id=row[1],
        counter=int(row[2]),
        created_at_ms=int(row[3]),
        received_at_ms=int(row[4]),
        base_model_version=row[5],
        epsilon=float(row[6]),
        packet_sha256=bytes(row[7]),
        packet_bytes=bytes(row[8]) if body is None else body,
        receipt_bytes=bytes(row[9]),
        merged_in_release=row[10],
    )


def _release(row: Sequence[Any]) -> Release:
    return Release(
        version=row[0],
        model_sha256=row[1],
        attestation_sha256=row[2],
        created_at_ms=int(row[3]),
        sequence=int(row[4]),
    )


def _digest_of(packet_bytes: bytes) -> bytes:
    """``packet_digest`` of a packet; SHA-256 of the bytes when they do not parse as one (only
    tests store such bytes: ingest stores opened packets)."""
    try:
        return packet_digest(packet_bytes)
    except DirediError:
        return hashlib.sha256(packet_bytes).digest()


def _with_charge(device: Device, counter: int, curve: np.ndarray, epsilon: float) -> Device:
    return Device(
        device_id=device.device_id, certificate_der=device.certificate_der,
        key_id=device.key_id, status=device.status, enrolled_at_ms=device.enrolled_at_ms,
        revoked_at_ms=device.revoked_at_ms, revocation_reason=device.revocation_reason,
        epsilon_budget=device.epsilon_budget, epsilon_spent=epsilon, highest_counter=counter,
        rdp_spent=curve, epsilon_delta=device.epsilon_delta, epsilon_floor=device.epsilon_floor,
    )


def _check_budget_value(budget: float) -> float:
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"epsilon budget must be finite and non-negative, got {budget!r}")
    return float(budget)


class Store(ABC):
    """Persistence for the cloud: devices, packets, replay state, epsilon ledger, releases.

    Implements ``packet.ReplayState`` (:meth:`highest_counter`, :meth:`packet_seen`) and
    ``packet.DeviceDirectory`` (:meth:`device_record`), so it can be handed to ``open_packet``.
    Thread-safe: a store may be shared by the threads of one server, and several stores (processes,
    replicas) may share one database; :meth:`store_packet` is atomic across all of them.

    Every public method raises :class:`StoreError` when the database fails (unreachable, I/O error,
    locked past the timeout, closed store), besides the policy errors it documents.
    """

    dialect: ClassVar[str]
    """Key of the column-type table in :mod:`.migrations` (``sqlite`` / ``postgresql``)."""
    _for_update: ClassVar[str]
    """Row-lock suffix for a SELECT inside a write transaction (empty where the lock is global)."""
    _integrity_error: ClassVar[type[Exception]]
    """The driver's exception for a violated unique or foreign-key constraint."""

    def __init__(
        self,
        *,
        name: str,
        default_epsilon_budget: float,
        migrations: Sequence[Migration],
        dp_policy: DPPolicy = DEFAULT_DP_POLICY,
        body_dir: Path | None = None,
        body_file_bytes: int = DEFAULT_BODY_FILE_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        group_commit: GroupCommitConfig = GroupCommitConfig(),  # noqa: B008 - frozen
    ) -> None:
        """``body_dir``: where packet bodies above ``body_file_bytes`` go (content-addressed files,
        0600); ``None`` keeps every body in its row. ``max_body_bytes``: the most read back from
        one body file. ``group_commit``: bounds of one batch."""
        self._name = name
        self._dp = dp_policy
        self._default_budget = _check_budget_value(default_epsilon_budget)
        check_sequence(migrations)
        self._migrations = tuple(migrations)
        self._closed = False
        self._body_dir = body_dir
        self._body_file_bytes = body_file_bytes
        self._max_body_bytes = max_body_bytes
        self._writer: GroupCommitter[PacketRow, StoredReceipt] = GroupCommitter(
            self.commit_rows, config=group_commit)
        self._submit_row: Callable[[PacketRow], StoredReceipt] = self._writer.submit

    # ---------------------------------------------------------------- what a backend supplies
    @abstractmethod
    def _transaction(self, *, write: bool) -> AbstractContextManager[Cursor]:
        """A cursor inside one transaction: commit on normal exit, roll back on any exception.

        ``write=True`` must take whatever lock makes the following reads current for a writer
        (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the ``FOR UPDATE`` row locks the queries take).
        """

    @abstractmethod
    def _close(self) -> None:
        """Release connections. Called once."""

    def _advisory_lock(self, cursor: Cursor, key: int) -> None:  # noqa: B027 - optional hook
        """Serialise a rare global operation (migration, release) across processes.

        No-op by default: backends whose write transactions already exclude each other need none.
        """

    # ---------------------------------------------------------------- the public wrapper
    @property
    def name(self) -> str:
        """Where this store lives (a file path or a DSN without its password)."""
        return self._name

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        if self._closed:
            raise StoreError(f"store {self._name}: {action} on a closed store")
        try:
            yield
        except DirediError:
            raise
        except Exception as exc:
            raise StoreError(f"store {self._name}: {action} failed: {exc}") from exc

    def close(self) -> None:
        """Close the store; later calls raise :class:`StoreError`. Idempotent."""
        if self._closed:
            return
        self._writer.close()  # what is queued commits first
        self._closed = True
        with self._guard_closing():
            self._close()

    @contextmanager
    def _guard_closing(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            raise StoreError(f"store {self._name}: close failed: {exc}") from exc

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r})"

    # ---------------------------------------------------------------- schema
    def _migrate(self) -> None:
        """Bring the schema to the last known migration; refuse a newer database.

        Raises :class:`SchemaTooNew` (a :class:`StoreError`) if the database is ahead of this build.
        """
        with self._guard("schema migration"), self._transaction(write=True) as cur:
            self._advisory_lock(cur, _MIGRATION_LOCK_KEY)
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, description TEXT NOT NULL)"
            )
            cur.execute("SELECT MAX(version) FROM schema_version")
            row = cur.fetchone()
            current = 0 if row is None or row[0] is None else int(row[0])
            latest = self._migrations[-1].version if self._migrations else 0
            if current > latest:
                raise SchemaTooNew(
                    f"store {self._name}: database schema is version {current}, this build knows "
                    f"up to {latest}; upgrade the software (refusing to touch a newer schema)"
                )
            for migration in self._migrations[current:]:
                for statement in render(migration, self.dialect):
                    cur.execute(statement)
                cur.execute(
                    "INSERT INTO schema_version (version, description) VALUES (?, ?)",
                    (migration.version, migration.description),
                )

    def schema_version(self) -> int:
        """The schema version recorded in the database (0 if none)."""
        with self._guard("read schema version"), self._transaction(write=False) as cur:
            cur.execute("SELECT MAX(version) FROM schema_version")
            row = cur.fetchone()
            return 0 if row is None or row[0] is None else int(row[0])

    # ---------------------------------------------------------------- devices
    def register_device(
        self,
        device_id: str,
        certificate_der: bytes,
        key_id: bytes,
        *,
        enrolled_at_ms: int,
        epsilon_budget: float | None = None,
        renew: bool = False,
    ) -> Device:
        """Enrol a device (the caller has verified its certificate against the device CA).

        Idempotent: enrolling again with the same certificate returns the stored device unchanged.
        ``epsilon_budget`` defaults to the store's ``default_epsilon_budget``.

        ``renew=True`` accepts a *new* certificate for an enrolled, active device id (certificate
        renewal: the caller verified the new certificate and its proof of possession). The device
        keeps its ledger, budget and replay counter: a budget cannot be reset by renewing.

        Raises :class:`CertificateRevoked` if the device id was revoked (a revoked device cannot
        re-enrol itself), :class:`DeviceConflict` if it is enrolled with another certificate and
        ``renew`` is false.
        """
        if not device_id:
            raise ValueError("device_id must not be empty")
        budget = self._default_budget if epsilon_budget is None else epsilon_budget
        budget = _check_budget_value(budget)
        certificate_der = bytes(certificate_der)
        with self._guard(f"register device {device_id}"), self._transaction(write=True) as cur:
            # ON CONFLICT DO NOTHING makes two replicas enrolling the same device at once safe: the
            # loser waits for the winner's row and then compares certificates below.
            cur.execute(
                "INSERT INTO devices (device_id, certificate_der, key_id, status, enrolled_at_ms, "
                "epsilon_budget, epsilon_spent) VALUES (?, ?, ?, 'active', ?, ?, 0) "
                "ON CONFLICT DO NOTHING",
                (device_id, certificate_der, bytes(key_id), enrolled_at_ms, budget),
            )
            device = self._device_row(cur, device_id, lock=True)
            assert device is not None  # inserted or already there, and rows are never deleted
            if device.status is DeviceStatus.REVOKED:
                raise CertificateRevoked(f"device {device_id} is revoked; it cannot re-enrol")
            if device.certificate_der != certificate_der:
                if not renew:
                    raise DeviceConflict(
                        f"device {device_id} is already enrolled with another certificate"
                    )
                cur.execute(
                    "UPDATE devices SET certificate_der = ?, key_id = ? WHERE device_id = ?",
                    (certificate_der, bytes(key_id), device_id),
                )
                device = self._device_row(cur, device_id, lock=False)
                assert device is not None
            return device

    def get_device(self, device_id: str) -> Device | None:
        """The device, or ``None`` if it was never enrolled."""
        with self._guard(f"read device {device_id}"), self._transaction(write=False) as cur:
            return self._device_row(cur, device_id, lock=False)

    def device_status(self, device_id: str) -> DeviceStatus | None:
        """The device's status alone (``None``: never enrolled): one indexed read of one column,
        for the revocation check of every call (issue 15: :meth:`get_device` also decoded the
        device's privacy curve, per call)."""
        with self._guard(f"read device {device_id}"), self._transaction(write=False) as cur:
            cur.execute("SELECT status FROM devices WHERE device_id = ?", (device_id,))
            row = cur.fetchone()
            # decoded inside the guard: a damaged value is a StoreError, as in get_device
            return None if row is None else DeviceStatus(row[0])

    def device_record(self, device_id: str) -> DeviceRecord | None:
        """``packet.DeviceDirectory``: the device as ``open_packet`` needs it, or ``None``."""
        device = self.get_device(device_id)
        if device is None:
            return None
        return DeviceRecord(device.device_id, device.certificate_der, device.status,
                            rdp_spent=device.rdp_spent, epsilon_budget=device.epsilon_budget,
                            epsilon_floor=device.epsilon_floor)

    def require_active_device(self, device_id: str) -> Device:
        """The device if enrolled and active.

        Raises :class:`UnknownDevice` or :class:`CertificateRevoked` otherwise.
        """
        device = self.get_device(device_id)
        if device is None:
            raise UnknownDevice(f"device {device_id} is not enrolled")
        if device.status is not DeviceStatus.ACTIVE:
            raise CertificateRevoked(f"device {device_id} is revoked")
        return device

    def revoke_device(self, device_id: str, *, revoked_at_ms: int, reason: str) -> Device:
        """Revoke a device: its later packets and enrolments are refused.

        Idempotent: revoking a revoked device keeps the first time and reason.
        Raises :class:`UnknownDevice` if it was never enrolled.
        """
        with self._guard(f"revoke device {device_id}"), self._transaction(write=True) as cur:
            cur.execute(
                "UPDATE devices SET status = 'revoked', revoked_at_ms = ?, revocation_reason = ? "
                "WHERE device_id = ? AND status = 'active'",
                (revoked_at_ms, reason, device_id),
            )
            device = self._device_row(cur, device_id, lock=False)
            if device is None:
                raise UnknownDevice(f"device {device_id} is not enrolled")
            return device

    def list_devices(self) -> list[Device]:
        """Every enrolled device (active and revoked), ordered by device id."""
        with self._guard("list devices"), self._transaction(write=False) as cur:
            cur.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device_id")  # noqa: S608 - constants only
            return [_device(row) for row in cur.fetchall()]

    def ledger_summary(self) -> dict[str, float]:
        """Fleet figures in one aggregate query (for metrics): devices active / revoked /
        exhausted (no budget left), the sum and the largest composed epsilon spent, and the
        ledger's delta."""
        with self._guard("summarise the ledger"), self._transaction(write=False) as cur:
            cur.execute(
                "SELECT "
                "COALESCE(SUM(CASE WHEN status = 'active' THEN 1 ELSE 0 END), 0), "
                "COALESCE(SUM(CASE WHEN status = 'revoked' THEN 1 ELSE 0 END), 0), "
                "COALESCE(SUM(CASE WHEN status = 'active' AND epsilon_spent >= epsilon_budget "
                "THEN 1 ELSE 0 END), 0), "
                "COALESCE(SUM(epsilon_spent), 0), COALESCE(MAX(epsilon_spent), 0) FROM devices"
            )
            row = cur.fetchone()
        return {
            "devices_active": float(row[0]),
            "devices_revoked": float(row[1]),
            "devices_exhausted": float(row[2]),
            "ledger_epsilon_spent_sum": float(row[3]),
            "ledger_epsilon_spent_max": float(row[4]),
            "ledger_delta": float(self._dp.delta),
        }

    def set_epsilon_budget(self, device_id: str, budget: float) -> Device:
        """Set a device's lifetime epsilon budget (may be below what it has spent: it then stops).

        Raises :class:`UnknownDevice` if it was never enrolled.
        """
        budget = _check_budget_value(budget)
        with self._guard(f"set budget of {device_id}"), self._transaction(write=True) as cur:
            cur.execute(
                "UPDATE devices SET epsilon_budget = ? WHERE device_id = ?", (budget, device_id)
            )
            device = self._device_row(cur, device_id, lock=False)
            if device is None:
                raise UnknownDevice(f"device {device_id} is not enrolled")
            return device

    def epsilon_spent(self, device_id: str) -> float:
        """The device's composed lifetime epsilon at the ledger's delta (RDP over its packets).

        Raises :class:`UnknownDevice` if it was never enrolled.
        """
        device = self.get_device(device_id)
        if device is None:
            raise UnknownDevice(f"device {device_id} is not enrolled")
        return device.epsilon_spent

    def _device_row(self, cur: Cursor, device_id: str, *, lock: bool) -> Device | None:
        suffix = self._for_update if lock else ""
        query = f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?{suffix}"  # noqa: S608 - constants only
        cur.execute(query, (device_id,))
        row = cur.fetchone()
        return None if row is None else _device(row)

    # ---------------------------------------------------------------- packet.ReplayState
    def highest_counter(self, device_id: str) -> int | None:
        """Highest accepted counter of the device; ``None`` if none (or not enrolled)."""
        device = self.get_device(device_id)
        return None if device is None else device.highest_counter

    def packet_seen(self, packet_id: bytes) -> bool:
        """Whether a packet with this id is stored (from any device)."""
        with self._guard("look up packet id"), self._transaction(write=False) as cur:
            cur.execute("SELECT 1 FROM packets WHERE packet_id = ?", (bytes(packet_id),))
            return cur.fetchone() is not None

    def existing_receipt(self, packet_id: bytes, packet_bytes: bytes) -> bytes | None:
        """The stored receipt if exactly these packet bytes are stored under ``packet_id``.

        Lets the ingest service answer a retry before opening the packet again (``open_packet``
        would refuse it as a replay). Returns ``None`` if the id is unknown; raises
        :class:`ReplayDetected` if the id is stored with other bytes.
        """
        digest = _digest_of(packet_bytes)
        with self._guard("look up packet"), self._transaction(write=False) as cur:
            cur.execute(
                "SELECT packet_sha256, receipt_bytes FROM packets WHERE packet_id = ?",
                (bytes(packet_id),),
            )
            row = cur.fetchone()
        if row is None:
            return None
        if bytes(row[0]) != digest:
            raise ReplayDetected(f"packet id {bytes(packet_id).hex()} was stored with other bytes")
        return bytes(row[1])

    # ---------------------------------------------------------------- packets
    def store_packet(self, record: PacketRecord) -> StoredReceipt:
        """Accept one packet atomically: check replay, charge the ledger, store, commit.

        The packet joins the store's group commit (:mod:`.group_commit`): one writer commits the
        packets that arrived together in one transaction, and this call returns only once that
        transaction has committed. Inside it each packet is checked in arrival order against the
        state including the packets before it (two packets of one device in one batch are
        checked exactly as if committed one after the other), holding the device rows' locks: if
        the same ``packet_id`` is stored with the same digest, return the stored receipt
        (``duplicate=True``, idempotent retry); otherwise refuse a known id, a counter not above
        the device's highest, a revoked or unknown device, an ``enrolled_certificate`` that is no
        longer the enrolled one, or an epsilon that would take the device past its lifetime
        budget; then insert the packet, raise the highest counter and the spent epsilon. A
        refused packet changes nothing and does not abort the others. The caller sends
        ``StoredReceipt.receipt_bytes`` only after this returns.

        Raises :class:`ReplayDetected` (id stored with other bytes, counter not increasing),
        :class:`BudgetExceeded`, :class:`UnknownDevice`, :class:`CertificateChanged`,
        :class:`CertificateRevoked`, :class:`StoreError`.
        """
        if self._closed:
            raise StoreError(f"store {self._name}: store packet on a closed store")
        return self._submit_row(PacketRow.of(record))

    def commit_rows(self, rows: Sequence[PacketRow]) -> list[StoredReceipt | DirediError]:
        """Commit a batch in ONE transaction; one outcome per row, in order (the writer's work).

        If the batch as a whole fails (a constraint raced in by another process, a deadlock, a
        driver error), it is rolled back and each row is committed in its own transaction, so
        every outcome is still exact and one bad row never takes the others down.
        """
        try:
            return self._commit_batch(rows)
        except DirediError as exc:
            if len(rows) == 1:
                return [self._refusal(rows[0], exc)]
        return [self._commit_alone(row) for row in rows]

    def _commit_alone(self, row: PacketRow) -> StoredReceipt | DirediError:
        try:
            return self._commit_batch([row])[0]
        except DirediError as exc:
            return self._refusal(row, exc)

    def _refusal(self, row: PacketRow, exc: DirediError) -> DirediError:
        # The device row lock serialises one device; a unique violation can then only be the
        # same packet id raced in by ANOTHER device's transaction: a replay, not a store fault.
        if isinstance(exc, StoreError) and isinstance(exc.__cause__, self._integrity_error):
            replay = ReplayDetected(f"packet id {row.packet_id.hex()} was stored concurrently")
            replay.__cause__ = exc
            return replay
        return exc

    def _commit_batch(self, rows: Sequence[PacketRow]) -> list[StoredReceipt | DirediError]:
        written: list[Path] = []
        try:
            with self._guard("store packets"), self._transaction(write=True) as cur:
                outcomes, accepted = self._apply_rows(cur, rows)
                for row in accepted:  # durable before the rows that name them commit
                    path = self._write_body(row)
                    if path is not None:
                        written.append(path)
        except BaseException:
            for path in written:  # no committed row names them (their rows just rolled back)
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        return outcomes

    def _apply_rows(
        self, cur: Cursor, rows: Sequence[PacketRow]
    ) -> tuple[list[StoredReceipt | DirediError], list[PacketRow]]:
        ids = sorted({row.device_id for row in rows})
        marks = ", ".join("?" * len(ids))
        # Every device row of the batch, locked in one statement and in one order (device id), so
        # two replicas' batches cannot deadlock on each other's rows.
        cur.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id IN ({marks}) "  # noqa: S608 - constants only
            f"ORDER BY device_id{self._for_update}",
            ids,
        )
        devices: dict[str, Device] = {d.device_id: d for d in map(_device, cur.fetchall())}
        touched: set[str] = set()
        outcomes: list[StoredReceipt | DirediError] = []
        accepted: list[PacketRow] = []
        for row in rows:
            try:
                outcome = self._apply_row(cur, row, devices)
            except PolicyError as exc:
                outcomes.append(exc)
                continue
            outcomes.append(outcome)
            if not outcome.duplicate:
                touched.add(row.device_id)
                accepted.append(row)
        for device_id in sorted(touched):
            device = devices[device_id]
            assert device.rdp_spent is not None  # set by the charge that touched it
            cur.execute(
                "UPDATE devices SET highest_counter = ?, epsilon_spent = ?, rdp_spent = ? "
                "WHERE device_id = ?",
                (device.highest_counter, device.epsilon_spent, curve_to_json(device.rdp_spent),
                 device_id),
            )
        return outcomes, accepted

    def _apply_row(self, cur: Cursor, row: PacketRow, devices: dict[str, Device]) -> StoredReceipt:
        """Check and insert one row against ``devices`` (the batch's current state, updated)."""
        device = devices.get(row.device_id)
        refusal: PolicyError | None = None
        if device is None:
            refusal = UnknownDevice(f"device {row.device_id} is not enrolled")
        elif device.status is not DeviceStatus.ACTIVE:
            refusal = CertificateRevoked(f"device {row.device_id} is revoked")
        elif device.highest_counter is not None and row.counter <= device.highest_counter:
            refusal = ReplayDetected(
                f"device {row.device_id}: counter {row.counter} is not above the highest "
                f"accepted ({device.highest_counter})"
            )
        elif (row.enrolled_certificate is not None
              and row.enrolled_certificate != device.certificate_der):
            refusal = CertificateChanged(
                f"device {row.device_id} renewed its certificate; verify the packet again")
        if refusal is not None:
            # A retry of a stored packet lands here (its counter is not above the highest, or
            # the device was revoked since): it gets its first receipt, not the refusal.
            duplicate = self._stored_receipt(cur, row)
            if duplicate is None:
                raise refusal
            return duplicate
        assert device is not None
        new_curve, new_eps = charge(
            device_id=row.device_id,
            spent_curve=(device.rdp_spent if device.rdp_spent is not None
                         else curve_from_json(None)),
            packet_curve=row.rdp_curve,
            budget=device.epsilon_budget,
            policy=self._dp,
            floor=device.epsilon_floor,
        )
        in_file = self._body_dir is not None and len(row.body) > self._body_file_bytes
        cur.execute(
            f"INSERT INTO packets ({_PACKET_COLUMNS}, rdp_curve, body_in_file) "  # noqa: S608 - constants only
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?) ON CONFLICT DO NOTHING",
            (
                row.packet_id, row.device_id, row.counter, row.created_at_ms, row.received_at_ms,
                row.base_model_version, row.epsilon, row.digest, b"" if in_file else row.body,
                row.receipt_bytes, curve_to_json(row.rdp_curve), 1 if in_file else 0,
            ),
        )
        if cur.rowcount == 0:  # the id is stored already (by this device or another)
            duplicate = self._stored_receipt(cur, row)
            if duplicate is None:
                raise ReplayDetected(f"packet id {row.packet_id.hex()} was already stored")
            return duplicate
        devices[row.device_id] = _with_charge(device, row.counter, new_curve, new_eps)
        return StoredReceipt(row.receipt_bytes, duplicate=False)

    def _stored_receipt(self, cur: Cursor, row: PacketRow) -> StoredReceipt | None:
        """The first receipt when ``row``'s id is stored with ``row``'s digest (a retry); ``None``
        when the id is not stored; raises :class:`ReplayDetected` when it is, with another."""
        cur.execute("SELECT packet_sha256, receipt_bytes FROM packets WHERE packet_id = ?",
                    (row.packet_id,))
        existing = cur.fetchone()
        if existing is None:
            return None
        if bytes(existing[0]) != row.digest:
            raise ReplayDetected(
                f"packet id {row.packet_id.hex()} was already stored with other bytes")
        return StoredReceipt(bytes(existing[1]), duplicate=True)

    # ---------------------------------------------------------------- packet bodies in files
    def _body_path(self, digest: bytes) -> Path:
        assert self._body_dir is not None
        name = digest.hex()
        return self._body_dir / name[:2] / name

    def _write_body(self, row: PacketRow) -> Path | None:
        """Write ``row``'s body to its content-addressed file (0600, fsynced, then linked into
        place, so no reader ever sees half a file); the path if this call created it."""
        if self._body_dir is None or len(row.body) <= self._body_file_bytes:
            return None
        if len(row.body) > self._max_body_bytes:
            # Refused before anything is written or acknowledged: _read_body could never read it
            # back (an operator raised limits.max_packet_bytes above the store's max_body_bytes).
            raise StoreError(f"store {self._name}: a packet body of {len(row.body)} bytes is over "
                             f"the store's max_body_bytes ({self._max_body_bytes}); raise both together")
        path = self._body_path(row.digest)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.parent / f".tmp-{os.getpid()}-{path.name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
        try:
            view = memoryview(row.body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces: the first copy of a digest stays
            created = True
        except FileExistsError:
            created = False
        finally:
            tmp.unlink()
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return path if created else None

    def _read_body(self, digest: bytes) -> bytes:
        if self._body_dir is None:
            raise StoreError(f"store {self._name}: a packet body is in a file, but this store "
                             "was opened without its body folder")
        path = self._body_path(digest)
        try:
            # Bounded, regular files only: a FIFO, a link to a device or a grown file in the body
            # folder is refused by reason, never read until it hangs or exhausts memory.
            data = read_regular_file(path, "packet body", self._max_body_bytes)
        except (KeyFileError, TooLarge) as exc:
            raise StoreError(f"store {self._name}: packet body {path.name[:16]} is unreadable: "
                             f"{exc.message}") from exc
        if _digest_of(data) != digest:
            raise StoreError(f"store {self._name}: packet body {path.name[:16]} does not match "
                             "its digest (altered or damaged)")
        return data

    def _stored_packet(self, row: Sequence[Any]) -> StoredPacket:
        return _packet(row, self._read_body(bytes(row[7])) if row[11] else None)

    def get_packet(self, packet_id: bytes) -> StoredPacket | None:
        """The stored packet with this id, or ``None``."""
        with self._guard("read packet"), self._transaction(write=False) as cur:
            query = f"SELECT {_PACKET_READ_COLUMNS} FROM packets WHERE packet_id = ?"  # noqa: S608 - constants only
            cur.execute(query, (bytes(packet_id),))
            row = cur.fetchone()
        return None if row is None else self._stored_packet(row)

    def list_packets(
        self, *, unmerged_only: bool = True, device_id: str | None = None
    ) -> list[StoredPacket]:
        """Stored packets in arrival order (received time, then device, then counter)."""
        where: list[str] = []
        params: list[Any] = []
        if unmerged_only:
            where.append("merged_in_release IS NULL")
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        with self._guard("list packets"), self._transaction(write=False) as cur:
            cur.execute(
                f"SELECT {_PACKET_READ_COLUMNS} FROM packets{clause} "  # noqa: S608 - constants only
                "ORDER BY received_at_ms, device_id, counter",
                params,
            )
            rows = cur.fetchall()
        return [self._stored_packet(row) for row in rows]

    def iter_packets(
        self, *, unmerged_only: bool = True, page_size: int = 256
    ) -> Iterator[StoredPacket]:
        """Stored packets in :meth:`list_packets` order, read ``page_size`` at a time.

        For jobs over a fleet's packets (the merge): at most one page is held, each page is its own
        short read transaction (keyset pagination on the arrival order, so a page never repeats or
        skips a row that was there when the previous page was read). Packets stored while the
        iteration runs appear if they sort after the last page read.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size!r}")
        after: tuple[int, str, int] | None = None
        while True:
            where: list[str] = []
            params: list[Any] = []
            if unmerged_only:
                where.append("merged_in_release IS NULL")
            if after is not None:
                # Row-value comparison: the (received, device, counter) key is unique per device.
                where.append("(received_at_ms, device_id, counter) > (?, ?, ?)")
                params.extend(after)
            clause = f" WHERE {' AND '.join(where)}" if where else ""
            with self._guard("iterate packets"), self._transaction(write=False) as cur:
                cur.execute(
                    f"SELECT {_PACKET_READ_COLUMNS} FROM packets{clause} "  # noqa: S608 - constants only
                    "ORDER BY received_at_ms, device_id, counter LIMIT ?",
                    (*params, page_size),
                )
                rows = cur.fetchall()
            page = [self._stored_packet(row) for row in rows]
            yield from page
            if len(page) < page_size:
                return
            last = page[-1]
            after = (last.received_at_ms, last.device_id, last.counter)

    def mark_merged(self, packet_ids: Sequence[bytes], release_version: str) -> None:
        """Mark packets as merged into a recorded release (all or none).

        Idempotent for packets already marked with the same release. Raises :class:`StoreError`
        if the release is not recorded, a packet id is unknown, or a packet was merged into
        another release.
        """
        with (
            self._guard(f"mark packets merged into {release_version}"),
            self._transaction(write=True) as cur,
        ):
            self._mark_merged(cur, packet_ids, release_version)

    def _mark_merged(self, cur: Cursor, packet_ids: Sequence[bytes], release_version: str) -> None:
        cur.execute("SELECT 1 FROM releases WHERE version = ?", (release_version,))
        if cur.fetchone() is None:
            raise StoreError(f"store {self._name}: release {release_version} is not recorded")
        for raw in packet_ids:
            pid = bytes(raw)
            cur.execute(
                f"SELECT merged_in_release FROM packets WHERE packet_id = ?{self._for_update}",  # noqa: S608 - constants only
                (pid,),
            )
            row = cur.fetchone()
            if row is None:
                raise StoreError(f"store {self._name}: packet {pid.hex()} is not stored")
            if row[0] is not None and row[0] != release_version:
                raise StoreError(
                    f"store {self._name}: packet {pid.hex()} was already merged into {row[0]}"
                )
            cur.execute(
                "UPDATE packets SET merged_in_release = ? WHERE packet_id = ?",
                (release_version, pid),
            )

    # ---------------------------------------------------------------- releases
    def record_release(
        self,
        version: str,
        model_sha256: str,
        attestation_sha256: str,
        created_at_ms: int,
        *,
        merged_packet_ids: Sequence[bytes] = (),
    ) -> Release:
        """Record a published release; optionally mark its merged packets in the same transaction.

        Digests are lowercase hex SHA-256. Idempotent when recorded again with the same digests;
        raises :class:`StoreError` if ``version`` is recorded with other digests (or for the
        reasons of :meth:`mark_merged`).
        """
        for label, value in (("model", model_sha256), ("attestation", attestation_sha256)):
            if not _SHA256_HEX.fullmatch(value):
                raise ValueError(f"{label} digest must be 64 lowercase hex digits, got {value!r}")
        with self._guard(f"record release {version}"), self._transaction(write=True) as cur:
            self._advisory_lock(cur, _RELEASE_LOCK_KEY)
            cur.execute(f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE version = ?", (version,))  # noqa: S608 - constants only
            row = cur.fetchone()
            if row is not None:
                release = _release(row)
                if (release.model_sha256, release.attestation_sha256) != (
                    model_sha256,
                    attestation_sha256,
                ):
                    raise StoreError(
                        f"store {self._name}: release {version} is already recorded with other "
                        "digests"
                    )
            else:
                cur.execute("SELECT COALESCE(MAX(sequence), 0) FROM releases")
                sequence = int(cur.fetchone()[0]) + 1
                cur.execute(
                    f"INSERT INTO releases ({_RELEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?)",  # noqa: S608 - constants only
                    (version, model_sha256, attestation_sha256, created_at_ms, sequence),
                )
                release = Release(
                    version, model_sha256, attestation_sha256, created_at_ms, sequence
                )
            if merged_packet_ids:
                self._mark_merged(cur, merged_packet_ids, version)
            return release

    def latest_release(self) -> Release | None:
        """The most recently recorded release, or ``None``."""
        with self._guard("read latest release"), self._transaction(write=False) as cur:
            cur.execute(f"SELECT {_RELEASE_COLUMNS} FROM releases ORDER BY sequence DESC LIMIT 1")  # noqa: S608 - constants only
            row = cur.fetchone()
            return None if row is None else _release(row)

    def get_release(self, version: str) -> Release | None:
        """The release recorded under ``version``, or ``None``."""
        with self._guard(f"read release {version}"), self._transaction(write=False) as cur:
            cur.execute(f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE version = ?", (version,))  # noqa: S608 - constants only
            row = cur.fetchone()
            return None if row is None else _release(row)

"""The cloud's gRPC server: knowledge ingest, the update channel, enrolment, health, reflection.

Layers, thinnest at the edge:

* :class:`Ingest`, :class:`Enrollment`, :class:`ReleaseFolder` hold the logic over the protocol
  core and the store (bytes in, bytes or typed errors out; no gRPC types), so a benchmark or a
  test can call them in-process.
* The servicers decode the request, call one of those, and map a :class:`DirediError` to a status
  through :func:`~.status.abort_with` (the one table). ``KnowledgeService`` is registered with
  *raw-bytes* handlers: the packet reaches the core exactly as the device sent it (nothing is
  re-serialised); the receipt acknowledges ``packet.packet_digest`` (the signed transcript and the
  signature, not the unsigned attached certificate), and leaves as the signed bytes
  ``make_receipt`` produced.
* :class:`CloudServer` wires them into one ``grpc.Server`` with TLS or mTLS, size caps,
  keepalive, ``grpc.health.v1`` and server reflection.

Durable before receipt: ``Ingest.submit`` returns the receipt only after ``Store.store_packet``
has committed; a retry of the same packet (same digest: a copy whose certificate was stripped or
altered counts as the same packet) is answered from the store (``existing_receipt``) before the
packet is opened again, so it gets the first receipt byte for byte.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import ipaddress
import json
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
)
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from diredi_secure._crypto import (
    InboxKey,
    SigningKey,
    check_device_certificate,
    verify_signature,
)
from diredi_secure._proto.diredi.v1 import services_pb2 as spb
from diredi_secure._proto.diredi.v1 import services_pb2_grpc as sgrpc
from diredi_secure.checkpoint import CheckpointHeader, check_checkpoint_header
from diredi_secure.device_identities import VerifiedIdentities
from diredi_secure.envelope import CiphertextDigest, PacketHeader
from diredi_secure.errors import (
    CertificateInvalid,
    CertificateRevoked,
    DirediError,
    LocalError,
    MalformedPacket,
    PeerError,
    PolicyError,
    PolicyViolation,
    SignatureInvalid,
    TooLarge,
    UnknownDevice,
)
from diredi_secure.knowledge import KnowledgePayload
from diredi_secure.ml.payload_fit import ModelShapes, check_entries_fit
from diredi_secure.packet import DeviceRecord, inspect_packet, make_receipt, open_packet
from diredi_secure.policy import DEFAULT_POLICY, PacketPolicy
from diredi_secure.serde import CiphertextHasher
from diredi_secure.store import CertificateChanged, DeviceStatus, PacketRecord, Store

from .observe import IngestObserver, Metrics, OpsServer
from .ratelimit import RefusalLimiter
from .status import (
    NotFound,
    ServiceUnavailable,
    abort_async,
    abort_internal,
    abort_with,
    refusal_status,
)
from .transport import ServerTls, TransportConfig, add_port, peer_device_id, server_options

__all__ = [
    "ENROLL_DOMAIN",
    "CloudKeys",
    "CloudServer",
    "Enrollment",
    "Ingest",
    "ReleaseFolder",
    "ReleasedModelShapes",
    "enroll_proof_message",
]

log = logging.getLogger("diredi.services")

ENROLL_DOMAIN = b"diredi-enroll-v1"
_SERVICE_NAMES = tuple(
    spb.DESCRIPTOR.services_by_name[name].full_name
    for name in ("KnowledgeService", "UpdateService", "EnrollmentService")
)
KNOWLEDGE_SERVICE, UPDATE_SERVICE, ENROLLMENT_SERVICE = _SERVICE_NAMES


def enroll_proof_message(certificate_der: bytes) -> bytes:
    """What a device signs with its Ed25519 key to prove it holds the certificate's key."""
    return ENROLL_DOMAIN + certificate_der


HOST_REFUSAL_FACTOR = 8
"""Without mTLS, a host is cooled down after this many times a device's refusal limit."""


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class CloudKeys:
    """The cloud's trusted material: inbox (HPKE) key, receipt key, device CA certificate (DER)."""

    inbox_key: InboxKey
    receipt_key: SigningKey
    device_ca_der: bytes


def _check_peer(peer: str | None, device_id: str, *, mtls: bool) -> None:
    if not mtls:
        return
    if peer is None:
        raise CertificateInvalid("mTLS is required but the client presented no device certificate")
    if peer != device_id:
        raise UnknownDevice(f"TLS client is device {peer}, but the request is for {device_id}")


# ------------------------------------------------------------------------------------------------
# Logic without gRPC types
# ------------------------------------------------------------------------------------------------
class _CloudLogic:
    """What every cloud-side service holds: the store, the keys, the policy, caps and the clock."""

    def __init__(
        self,
        store: Store,
        keys: CloudKeys,
        *,
        policy: PacketPolicy = DEFAULT_POLICY,
        config: TransportConfig | None = None,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.store = store
        self.keys = keys
        self.policy = policy
        self.config = config or TransportConfig()
        self.clock = clock


class _EnrolledDevices:
    """What ``open_packet`` reads about devices, cached in this process (one pass per packet).

    ``device_record`` reads a device from the store once and keeps its certificate and status
    (not its ledger: the store's writer charges exactly, in the transaction that stores the
    packet). ``highest_counter`` is a hint, the highest counter this process has seen committed,
    so a replayed counter is refused before decryption; ``packet_seen`` is always false. Neither
    decides anything on its own: ``store_packet`` re-checks revocation, the enrolled certificate,
    the packet id and the counter in its write transaction, and :meth:`forget` drops a device
    whose packet the store refused for revocation or a changed certificate.
    """

    _MAX_DEVICES = 200_000  # beyond this, further devices are read per packet (bounded memory)

    def __init__(self, store: Store, identities: VerifiedIdentities) -> None:
        self._store = store
        self._identities = identities
        self._records: dict[str, DeviceRecord] = {}
        self._highest: dict[str, int] = {}

    def device_record(self, device_id: str) -> DeviceRecord | None:
        record = self._records.get(device_id)
        if record is not None:
            return record
        device = self._store.get_device(device_id)
        if device is None:
            return None  # not cached: an enrolment takes effect on the next packet
        record = DeviceRecord(device.device_id, device.certificate_der, device.status)
        if len(self._records) < self._MAX_DEVICES:
            self._records[device_id] = record
            if device.highest_counter is not None:
                self.committed(device_id, device.highest_counter)
        return record

    def highest_counter(self, device_id: str) -> int | None:
        return self._highest.get(device_id)

    def packet_seen(self, packet_id: bytes) -> bool:
        return False  # ids are checked exactly by store_packet, inside its transaction

    def committed(self, device_id: str, counter: int) -> None:
        if counter > self._highest.get(device_id, -1):
            self._highest[device_id] = counter

    def forget(self, device_id: str) -> None:
        record = self._records.pop(device_id, None)
        self._highest.pop(device_id, None)
        if record is not None:
            self._identities.forget(record.certificate_der)


class _Lookup:
    """The device record one ``open_packet`` call was given (the certificate it verified under)."""

    def __init__(self, devices: _EnrolledDevices) -> None:
        self._devices = devices
        self.record: DeviceRecord | None = None

    def device_record(self, device_id: str) -> DeviceRecord | None:
        self.record = self._devices.device_record(device_id)
        return self.record


class ReleasedModelShapes:
    """The shapes a packet's entries must have, per released model, from the release repository.

    Trusted: the repository folder (the cloud's own). For a model SHA-256 the index says was
    released (to the fleet, or to one device), the TUF metadata of that release's role names
    the model file and the reference set that shipped with it; their safetensors *headers* give
    the parameter count, the reference rows and the input shape (no tensor is read, torch is not
    imported). Cached per model (a released file never changes); a model the repository does
    not hold (yet) gives ``None``: ingest then leaves the check to the merge, which skips a
    packet that does not fit.
    """

    _MAX_CACHED = 4096
    _MAX_METADATA_BYTES = 16 * 1024 * 1024

    def __init__(self, repository: Path, *, max_file_bytes: int = 1 << 32) -> None:
        self._repository = Path(repository)
        self._max_file_bytes = max_file_bytes
        self._cache: dict[tuple[str, str | None], ModelShapes] = {}
        self._lock = threading.Lock()

    def __call__(self, model_sha: str, device_id: str | None) -> ModelShapes | None:
        """The shapes of model ``model_sha`` released to ``device_id`` (``None``: the fleet)."""
        key = (model_sha, device_id)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        if not re.fullmatch(r"[0-9a-f]{64}", model_sha):
            return None
        shapes = self._read(model_sha, device_id)
        if shapes is not None:
            with self._lock:
                if len(self._cache) < self._MAX_CACHED:
                    self._cache[key] = shapes
        return shapes

    def _read(self, model_sha: str, device_id: str | None) -> ModelShapes | None:
        from diredi_secure.release.repository import MODEL_TARGET, REFERENCE_SET_TARGET

        from .edge import device_prefix, device_role  # edge imports this module

        prefix, role = ("", "targets") if device_id is None else (device_prefix(device_id),
                                                                   device_role(device_id))
        reference_sha = self._reference_of(model_sha, prefix + MODEL_TARGET,
                                           prefix + REFERENCE_SET_TARGET, role)
        if reference_sha is None:
            log.warning("model %s is in the release index but not in the repository's %s role: "
                        "its packets' shapes are left to the merge", model_sha[:16], role)
            return None
        folder = self._repository / "targets" / prefix
        model = self._header(folder / f"{model_sha}.{MODEL_TARGET}")
        reference = self._header(folder / f"{reference_sha}.{REFERENCE_SET_TARGET}")
        if model is None or reference is None or len(reference.tensors) != 1:
            return None
        (_, ref_shape), = reference.tensors.values()
        if len(ref_shape) < 2:
            return None
        parameters = sum(math.prod(shape) for _, shape in model.tensors.values())
        return ModelShapes(parameters=parameters, reference_rows=ref_shape[0],
                           image_shape=tuple(ref_shape[1:]))

    def _reference_of(self, model_sha: str, model_path: str, reference_path: str,
                      role: str) -> str | None:
        """The SHA-256 of the reference set published in the same version of ``role`` as the
        model (newest version first: a model is usually the role's current release)."""
        folder = self._repository / "metadata"
        versions = []
        for file in folder.glob(f"*.{role}.json"):
            version = file.name.split(".", 1)[0]
            if version.isdigit():
                versions.append((int(version), file))
        for _, file in sorted(versions, reverse=True):
            try:
                if file.stat().st_size > self._MAX_METADATA_BYTES:
                    continue
                targets = json.loads(file.read_bytes()).get("signed", {}).get("targets", {})
                model = targets.get(model_path, {}).get("hashes", {}).get("sha256")
                if model != model_sha:
                    continue
                reference = targets.get(reference_path, {}).get("hashes", {}).get("sha256")
            except (OSError, ValueError, AttributeError):
                continue
            return reference if isinstance(reference, str) and re.fullmatch(r"[0-9a-f]{64}", reference) \
                else None
        return None

    def _header(self, path: Path) -> CheckpointHeader | None:
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                return check_checkpoint_header(handle, size, max_bytes=self._max_file_bytes)
        except (OSError, DirediError) as exc:
            log.warning("cannot read the header of %s: %s", path.name, exc)
            return None


@dataclasses.dataclass(frozen=True)
class Accepted:
    """What :meth:`Ingest.accept` answers: the receipt, and the packet's verified header
    (``None`` for a retry that no longer opens, answered from the store with its first receipt)."""

    receipt: bytes
    header: PacketHeader | None
    duplicate: bool = False
    """A retry of a stored packet: it got its first receipt and charged nothing now."""


class Ingest(_CloudLogic):
    """Accept knowledge packets: open with the core, store in one transaction, return the receipt.

    Trusted: ``keys``, ``store``, ``clock`` (ms), ``released_models`` (when set: model SHA-256 ->
    the device it was released to, ``None`` for the fleet; ``CloudWorkspace.released_models``).
    Untrusted: the packet bytes.

    One pass per packet: the envelope is parsed once (inside ``open_packet``), the device's
    enrolled certificate is checked against the CA once per certificate
    (:class:`~diredi_secure.device_identities.VerifiedIdentities`), key ids are computed here once,
    and the store is touched once, by the group commit that stores the packet (no read before
    it). A packet that fails to open for a policy reason is looked up once: if exactly it is
    stored, that is a retry and gets its first receipt.
    """

    released_models: Callable[[], Mapping[str, str | None]] | None = None
    model_shapes: Callable[[str, str | None], ModelShapes | None] | None = None
    """With ``released_models``: the shapes a released model implies for a packet's entries
    (:class:`ReleasedModelShapes`); ``None``: entries are checked by the merge only."""

    def __init__(
        self,
        store: Store,
        keys: CloudKeys,
        *,
        policy: PacketPolicy = DEFAULT_POLICY,
        config: TransportConfig | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``monotonic``: seconds, for the refusal limit's windows (a fake clock in tests)."""
        super().__init__(store, keys, policy=policy, config=config, clock=clock)
        self.refusals = RefusalLimiter(self.config.refusals, clock=monotonic)
        # Without mTLS, every refusal also counts for the caller's host, at HOST_REFUSAL_FACTOR
        # times the per-device limit: a client declaring a fresh device id on every packet was a
        # fresh key each time and never limited (attacker finding F6, bypass: 902 of 902 fully
        # processed refusals).
        limits = self.config.refusals
        self.host_refusals = RefusalLimiter(
            dataclasses.replace(limits, refusals_per_window=limits.refusals_per_window * HOST_REFUSAL_FACTOR),
            clock=monotonic)
        self.identities = VerifiedIdentities(keys.device_ca_der)
        self._devices = _EnrolledDevices(store, self.identities)
        self._inbox_key_id = keys.inbox_key.key_id
        self._receipt_key_id = keys.receipt_key.key_id

    def submit(self, data: bytes, *, peer: str | None = None, mtls: bool = False, streamed: bool = False,
               ciphertext_digest: CiphertextDigest | None = None,
               origin: Callable[[], str | None] | None = None) -> bytes:
        """The signed receipt for ``data`` once it is durably stored (or was stored before):
        :meth:`accept` without the header."""
        return self.accept(data, peer=peer, mtls=mtls, streamed=streamed,
                           ciphertext_digest=ciphertext_digest, origin=origin).receipt

    def accept(self, data: bytes, *, peer: str | None = None, mtls: bool = False, streamed: bool = False,
               ciphertext_digest: CiphertextDigest | None = None,
               origin: Callable[[], str | None] | None = None) -> Accepted:
        """The signed receipt for ``data`` once it is durably stored (or was stored before), with
        the packet's verified header (for the log line and the metrics, which so parse nothing
        again) and whether it was a retry (:class:`Accepted`).

        A device refused too often is answered :class:`ServiceUnavailable` (``rate_limited``)
        before any other work (:mod:`.ratelimit`): the device is the mTLS ``peer``, or without
        mTLS the declared device id at ``origin()`` (the caller's host, when known; asked only
        when needed).

        ``ciphertext_digest``: the SHA-256 of the ciphertext field that :meth:`assemble` took while
        the stream arrived (trusted: our own code), so a wire-version-2 packet is not hashed again
        (``open_packet`` checks it describes this packet's ciphertext field).

        Raises the core's and the store's typed errors: :class:`TooLarge`, ``MalformedPacket``,
        ``SignatureInvalid``, ``UnknownDevice``, ``CertificateRevoked``, ``ReplayDetected`` (same
        id, other bytes; or a stale counter), ``BudgetExceeded``, ``StoreError``...
        """
        device = peer if mtls else None
        host_key = None
        if not mtls:
            host = None if origin is None else origin()
            host_key = None if host is None else f"host@{host}"
            self.host_refusals.check(host_key)
        if not mtls and self.refusals.cooling_down():
            device = self._declared_device(data, origin)  # only while someone is cooled down
        self.refusals.check(device)
        try:
            return self._submit(data, peer=peer, mtls=mtls, streamed=streamed,
                                ciphertext_digest=ciphertext_digest)
        except (PeerError, PolicyError):
            # The peer's fault (not ours: a LocalError such as StoreError is never counted).
            if not mtls and device is None:
                device = self._declared_device(data, origin)
            self.refusals.refused(device)
            self.host_refusals.refused(host_key)
            raise

    def _declared_device(self, data: bytes, origin: Callable[[], str | None] | None) -> str | None:
        """The device id ``data`` declares (unverified), at ``origin()``: the key of the refusal
        limit without mTLS. Bytes that do not parse count for their host as a whole
        (``unparsed@host``; attacker finding F6: 1,532 refused 4 MiB calls in 20 s were never
        limited), which cools down only that host's unparseable bytes; ``None`` without a host."""
        host = None if origin is None else origin()
        try:
            device_id = inspect_packet(data, self.config.limits).device_id
        except DirediError:
            return None if host is None else f"unparsed@{host}"
        return device_id if host is None else f"{device_id}@{host}"

    def _submit(self, data: bytes, *, peer: str | None, mtls: bool, streamed: bool,
                ciphertext_digest: CiphertextDigest | None) -> Accepted:
        limits = self.config.limits
        cap = limits.max_packet_bytes if streamed else limits.max_unary_bytes
        if len(data) > cap:
            raise TooLarge("unary packet" if not streamed else "streamed packet", len(data), cap)
        for attempt in (1, 2):
            now_ms = self.clock()
            lookup = _Lookup(self._devices)
            try:
                opened = open_packet(
                    data,
                    inbox_key=self.keys.inbox_key,
                    device_ca=self.keys.device_ca_der,
                    devices=lookup,
                    replay=self._devices,
                    now_ms=now_ms,
                    policy=self.policy,
                    limits=limits,
                    ciphertext_digest=ciphertext_digest,
                    identities=self.identities,
                    inbox_key_id=self._inbox_key_id,
                )
            except PolicyError as exc:
                if isinstance(exc, UnknownDevice) and lookup.record is not None and attempt == 1:
                    # Perhaps only our cached certificate is old (the device renewed it).
                    self._devices.forget(lookup.record.device_id)
                    continue
                # A retry of a stored packet fails to open (its counter is spent, its clock window
                # may have passed, its device may be revoked since): it gets its first receipt.
                return Accepted(self._stored_receipt(data, exc, peer=peer, mtls=mtls), None,
                                duplicate=True)
            header = opened.header
            _check_peer(peer, header.device_id, mtls=mtls)
            released_to = self._check_base_model(header.base_model_version, header.device_id)
            self._check_entries(opened.payload, header.base_model_version, released_to)
            receipt = make_receipt(self.keys.receipt_key, opened, stored_at_ms=now_ms,
                                   receipt_key_id=self._receipt_key_id)
            record = PacketRecord.from_opened(
                opened, packet_bytes=data, receipt_bytes=receipt, received_at_ms=now_ms,
                enrolled_certificate=None if lookup.record is None else lookup.record.certificate_der)
            try:
                stored = self.store.store_packet(record)
            except (CertificateRevoked, UnknownDevice) as exc:
                self._devices.forget(header.device_id)  # revoked or renewed: read it afresh
                if isinstance(exc, CertificateChanged) and attempt == 1:
                    continue  # verify again under the certificate enrolled now
                raise
            self._devices.committed(header.device_id, header.counter)
            # the transaction has committed
            return Accepted(stored.receipt_bytes, header, duplicate=stored.duplicate)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _stored_receipt(self, data: bytes, refusal: PolicyError, *, peer: str | None,
                        mtls: bool) -> bytes:
        """The first receipt if exactly ``data`` is stored; else ``refusal`` is raised."""
        header = inspect_packet(data, self.config.limits)  # it parsed once already: cannot fail
        _check_peer(peer, header.device_id, mtls=mtls)
        existing = self.store.existing_receipt(header.packet_id, data)
        if existing is None:
            raise refusal
        return existing

    def _check_base_model(self, base_model_version: str, device_id: str) -> str | None:
        """Who the packet's base model was released to (``None``: the fleet, or no index)."""
        if self.released_models is None:
            return None
        # A packet must update a model this cloud released to this device or its fleet;
        # otherwise it is charged and stored and then blocks the merge (issue 14 finding 7).
        models = self.released_models()
        if base_model_version not in models:
            raise PolicyViolation(
                f"base model {base_model_version[:16]} was never released here",
                reason="unknown_base_model")
        target = models[base_model_version]
        if target is not None and target != device_id:
            raise PolicyViolation(
                f"base model {base_model_version[:16]} was released to another device",
                reason="unknown_base_model")
        return target

    def _check_entries(self, payload: KnowledgePayload, base_model_version: str,
                       released_to: str | None) -> None:
        if self.released_models is None or self.model_shapes is None:
            return
        # Every entry must fit the model and the reference set it was computed against; one that
        # does not is refused here (naming the entry), before it is charged and stored, instead
        # of being skipped by every merge after (issue 14 finding 7).
        shapes = self.model_shapes(base_model_version, released_to)  # the index is read once
        if shapes is not None:
            check_entries_fit(payload, shapes)

    def assemble(self, chunks: Iterable[bytes], *, hasher: CiphertextHasher | None = None) -> bytes:
        """Reassemble a streamed packet from serialised ``Chunk`` messages (see
        :class:`StreamAssembler`, which the asyncio server feeds one chunk at a time)."""
        assembler = self.assembler(hasher=hasher)
        for raw in chunks:
            assembler.add(raw)
        return assembler.result()

    def assembler(self, *, hasher: CiphertextHasher | None = None) -> StreamAssembler:
        return StreamAssembler(self.config.limits.max_packet_bytes, self.config.min_stream_bytes_per_s,
                               hasher=hasher)


class StreamAssembler:
    """Reassemble a streamed packet from serialised ``Chunk`` messages, enforcing order and caps.

    The first chunk may declare ``total_length`` (later ones repeat it or leave it 0); offsets
    must follow each other exactly; no chunk may be empty; the total never exceeds the declared
    length nor ``cap``; after 5 s the stream must have averaged ``min_bytes_per_s``. Raises
    :class:`MalformedPacket` / :class:`TooLarge` as soon as a chunk breaks a rule, before it is
    buffered. ``hasher`` sees each accepted chunk as it arrives (it hashes the ciphertext field on
    the way: the one pass over it; ``hasher.result()`` then goes to :meth:`Ingest.submit`).
    """

    def __init__(self, cap: int, min_bytes_per_s: float, *, hasher: CiphertextHasher | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._cap = cap
        self._min_rate = min_bytes_per_s
        self._hasher = hasher
        self._monotonic = monotonic
        self._started = monotonic()
        self._buffer = bytearray()
        self._declared = 0
        self._index = 0

    def add(self, raw: bytes) -> None:
        index, buffer = self._index, self._buffer
        elapsed = self._monotonic() - self._started
        if elapsed > 5.0 and len(buffer) / elapsed < self._min_rate:
            raise MalformedPacket(
                f"stream too slow: {len(buffer)} bytes in {elapsed:.0f} s, below "
                f"{self._min_rate} bytes/s")
        chunk = _parse_chunk(raw)
        if index == 0:
            self._declared = int(chunk.total_length)
            if self._declared > self._cap:
                raise TooLarge("declared streamed packet", self._declared, self._cap)
        elif chunk.total_length not in (0, self._declared):
            raise MalformedPacket(f"chunk {index} declares another total length")
        if chunk.offset != len(buffer):
            raise MalformedPacket(f"chunk {index} is at offset {chunk.offset}, expected {len(buffer)}")
        if not chunk.data:
            raise MalformedPacket(f"chunk {index} is empty")
        limit = self._declared or self._cap
        if len(buffer) + len(chunk.data) > limit:
            raise TooLarge("streamed packet", len(buffer) + len(chunk.data), limit)
        buffer += chunk.data
        if self._hasher is not None:
            self._hasher.update(chunk.data)
        self._index = index + 1

    def result(self) -> bytes:
        if not self._buffer:
            raise MalformedPacket("the stream carried no chunk")
        if self._declared and len(self._buffer) != self._declared:
            raise MalformedPacket(f"stream ended at {len(self._buffer)} bytes of a declared {self._declared}")
        return bytes(self._buffer)


def _parse_chunk(raw: bytes) -> Any:
    try:
        return spb.Chunk.FromString(raw)
    except Exception as exc:
        raise MalformedPacket("a stream chunk does not decode") from exc


def _peer_host(context: grpc.ServicerContext) -> str | None:
    """The caller's host from gRPC's peer string (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6") or not rest:
        return None
    host = rest.rpartition(":")[0].strip("[]")
    if kind == "ipv6":
        # One IPv6 caller holds a /64 (2^64 addresses): per-host limits key on the prefix, or an
        # attacker would be a fresh "host" per call (attacker note on the per-host limits).
        try:
            address = ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            return host[:64] or None
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return host[:64] or None


async def _paced(context: grpc.aio.ServicerContext, *, deadline_s: float, idle_s: float) -> AsyncIterator[bytes]:
    """The call's request messages (``context.read()``), but a chunk must arrive within
    ``idle_s`` of the last one and the whole stream within ``deadline_s``: otherwise
    :class:`_StreamCut` names the limit. On the asyncio server a stalled stream holds no thread,
    only this coroutine (attacker findings F2, F7). ``context.read()``, not grpc.aio's request
    iterator: that one keeps its last message in a reference cycle until the cycle collector
    runs (attacker finding F2)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        left = deadline - loop.time()
        wait = min(idle_s, left)
        try:
            if wait <= 0:
                raise TimeoutError
            async with asyncio.timeout(wait):  # no Task per chunk (wait_for made one)
                raw = await context.read()
        except TimeoutError:
            fired = (f"over the server's deadline of {deadline_s:g} s" if wait == left or wait <= 0
                     else f"no chunk for {idle_s:g} s")
            log.info("cancelling a packet stream: %s", fired)
            raise _StreamCut(fired) from None
        if raw is grpc.aio.EOF:
            return
        yield raw


class _StreamCut(Exception):
    """A stream the server ended at one of its limits (the message names it). Answered
    DEADLINE_EXCEEDED: retryable, as a slow link may do better next time."""


@dataclass(frozen=True)
class EnrollResult:
    device_id: str
    inbox_key_id: bytes
    receipt_public_key: bytes


class Enrollment(_CloudLogic):
    """Register devices holding a certificate from the device CA and its key; report status."""

    def enroll(self, certificate: bytes, proof: bytes, *, peer: str | None = None, mtls: bool = False) -> EnrollResult:
        """Check the certificate against the CA and the proof of possession, then register.

        Idempotent for the same certificate. Raises ``CertificateInvalid``, ``SignatureInvalid``,
        ``CertificateRevoked`` (a revoked device cannot re-enrol), ``DeviceConflict``, ``TooLarge``.
        """
        limits = self.config.limits
        if len(proof) > limits.max_signature_bytes:
            raise TooLarge("enrolment proof", len(proof), limits.max_signature_bytes)
        now_ms = self.clock()
        identity = check_device_certificate(
            certificate, self.keys.device_ca_der, now_ms=now_ms, max_bytes=limits.max_certificate_bytes
        )
        _check_peer(peer, identity.device_id, mtls=mtls)
        try:
            verify_signature(identity.public_key, proof, enroll_proof_message(certificate))
        except SignatureInvalid as exc:
            raise SignatureInvalid(
                f"enrolment proof of device {identity.device_id} does not verify under its certificate key"
            ) from exc
        self.store.register_device(
            identity.device_id,
            certificate,
            identity.public_key.key_id,
            enrolled_at_ms=now_ms,
            epsilon_budget=self.policy.lifetime_epsilon_budget,
            renew=True,  # a renewed certificate keeps the device's ledger, budget and counter
        )
        log.info("enrolled device %s", identity.device_id)
        return EnrollResult(
            identity.device_id, self.keys.inbox_key.key_id, self.keys.receipt_key.public_key.raw
        )

    def status(self, device_id: str, *, peer: str | None = None, mtls: bool = False) -> dict[str, Any]:
        if len(device_id) > self.config.limits.max_device_id_chars:
            raise TooLarge("device id", len(device_id), self.config.limits.max_device_id_chars)
        _check_peer(peer, device_id, mtls=mtls)
        device = self.store.get_device(device_id)
        if device is None:
            return {"device_id": device_id, "status": "unknown"}
        return {
            "device_id": device_id,
            "status": "active" if device.status is DeviceStatus.ACTIVE else "revoked",
            "epsilon_spent": device.epsilon_spent,
            "epsilon_budget": device.epsilon_budget,
            "epsilon_delta": device.epsilon_delta,
            "highest_counter": device.highest_counter or 0,
        }


_ROLE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TARGET_PART = re.compile(r"^[A-Za-z0-9._-]{1,255}$")


class ReleaseFolder:
    """Serve a TUF repository folder (``metadata/``, ``targets/``) read-only, confined, capped."""

    def __init__(self, folder: Path, config: TransportConfig | None = None) -> None:
        self.folder = Path(folder)
        self.config = config or TransportConfig()

    def metadata(self, role: str, version: int) -> bytes:
        """``<version>.<role>.json`` (``<role>.json`` for version 0); raises NotFound, TooLarge."""
        if not _ROLE.fullmatch(role):
            raise MalformedPacket(f"bad role name {role[:80]!r}")
        name = f"{role}.json" if version == 0 else f"{version}.{role}.json"
        path = self.folder / "metadata" / name
        data = self._read(path, self.config.max_metadata_bytes, f"metadata {name}")
        return data

    def target(self, path: str, max_length: int) -> Iterator[tuple[bytes, int, int]]:
        """Chunks ``(data, offset, total)`` of a target; raises NotFound, TooLarge, MalformedPacket."""
        parts = path.split("/")
        if len(path) > 1024 or not parts or not all(_TARGET_PART.fullmatch(p) and p not in (".", "..") for p in parts):
            raise MalformedPacket(f"bad target path {path[:80]!r}")
        file = self._confined(self.folder / "targets" / path, "targets")
        try:
            st = file.stat()
        except OSError as exc:
            raise NotFound(f"target {path} is not published") from exc
        if not stat.S_ISREG(st.st_mode):  # a folder (e.g. "devices") or a device node
            raise NotFound(f"target {path} is not published")
        size = st.st_size
        cap = self.config.max_target_bytes
        if max_length:
            cap = min(cap, max_length)
        if size > cap:
            raise TooLarge(f"target {path}", size, cap)
        return self._chunks(file, size)

    def _chunks(self, file: Path, size: int) -> Iterator[tuple[bytes, int, int]]:
        offset = 0
        with open(file, "rb") as handle:
            while offset < size and (data := handle.read(min(self.config.chunk_bytes, size - offset))):
                yield data, offset, size
                offset += len(data)

    def _confined(self, path: Path, area: str) -> Path:
        # Per area, not per repository: the repository folder also holds keys/ (private signing
        # keys), which a link under targets/ or metadata/ must never reach.
        base = (self.folder / area).resolve()
        resolved = path.resolve()
        if not resolved.is_relative_to(base):
            raise MalformedPacket(f"path escapes the repository's {area}/ folder")
        return resolved

    def _read(self, path: Path, cap: int, what: str) -> bytes:
        file = self._confined(path, "metadata")
        try:
            with open(file, "rb") as handle:  # read at most cap + 1: the file may grow after a stat
                data = handle.read(cap + 1)
            if len(data) > cap:
                raise TooLarge(what, len(data), cap)
            return data
        except OSError as exc:
            raise NotFound(f"{what} is not published") from exc


# ------------------------------------------------------------------------------------------------
# Interceptors: request arrival, streaming calls, revocation (all on the asyncio server)
# ------------------------------------------------------------------------------------------------
def _with_behavior(handler: Any, wrap: Callable[[Any], Any]) -> Any:
    """``handler`` with its one behavior replaced by ``wrap(behavior)`` (serialisers kept)."""
    for attr in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, attr)
        if behavior is not None:
            return handler._replace(**{attr: wrap(behavior)})
    return handler


def _preceded(behavior: Any, *, streaming: bool, check: Callable[[Any], None],
              check_async: Callable[[Any], Awaitable[None]]) -> Any:
    """``behavior`` run after a check of its context: ``check`` in the handler's thread for a
    plain function (the asyncio server runs those in its thread pool), ``check_async`` awaited
    for a coroutine or an async generator (which run on the event loop)."""
    if inspect.isasyncgenfunction(behavior):
        async def agen(request: Any, context: Any) -> AsyncIterator[Any]:
            await check_async(context)
            async for item in behavior(request, context):
                yield item
        return agen
    if inspect.iscoroutinefunction(behavior):
        async def coro(request: Any, context: Any) -> Any:
            await check_async(context)
            return await behavior(request, context)
        return coro
    if streaming:
        def gen(request: Any, context: Any) -> Iterator[Any]:
            check(context)
            yield from behavior(request, context)
        return gen

    def call(request: Any, context: Any) -> Any:
        check(context)
        return behavior(request, context)
    return call


class _Abort(Exception):
    """Raised by :meth:`_ThreadContext.abort` in a pool thread; the coroutine that ran the handler
    ends the call with it on the event loop."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _ThreadContext:
    """What a plain (threaded) handler of ours sees of its call: the peer, its TLS identity, and
    ``abort``. grpc.aio's own context must not be used off the event loop; this one is read on the
    loop before the handler starts, and ``abort`` raises :class:`_Abort` for the loop to send."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._peer = context.peer()
        self._auth: Mapping[str, Any] = context.auth_context()

    def peer(self) -> str:
        return str(self._peer)

    def auth_context(self) -> Mapping[str, Any]:
        return self._auth  # grpc.aio's auth_context() already returned a fresh dict

    def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise _Abort(code, details)


def _caller_key(context: Any) -> str:
    """Who a call is from, for the per-caller limits: the mTLS peer's device id, or the caller's
    host without one (``host:?`` when gRPC names none)."""
    device = peer_device_id(context)
    return f"device:{device}" if device is not None else f"host:{_peer_host(context) or '?'}"


def _call_plain(behavior: Callable[[Any, Any], Any], request: Any,
                context: _ThreadContext) -> tuple[bool, Any]:
    """Run a plain handler in a pool thread: ``(True, response)`` or ``(False, (code, details))``.

    The refusal comes back as plain values, never as the :class:`_Abort` that carried it: that
    exception's context chain holds the frames (and the request bytes) it was raised through,
    and once grpc.aio's AbortError joined the chain it lived in a reference cycle until the
    cyclic collector ran, 4 MiB per refused call (attacker finding F2: RSS 106 MB -> 5 GB in
    40 s of refused unary Submits)."""
    try:
        return True, behavior(request, context)
    except _Abort as exc:
        return False, (exc.code, exc.details)
    except Exception as exc:  # the catch-all: nothing untyped reaches a peer
        return False, refusal_status(exc)


class RequestArrivalLimit(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The first gate of every call with one request message: a cap per caller, an arrival
    limit for the message, typed decoding (attacker findings F7, F1, F3).

    On the threaded server a unary call whose message never came held a thread before any of our
    code ran, and 20 such calls starved every honest one. Here each one-request method is served
    as a stream: a coroutine on the event loop (no thread) first counts the call against its
    caller (the mTLS device, or the host without mTLS: at most ``max_calls_per_device`` /
    ``max_calls_per_host`` open at once, more answered UNAVAILABLE ``overloaded`` at once, so one
    caller cannot hold the server's ``max_concurrent_calls``); then waits for the message and ends
    the call with DEADLINE_EXCEEDED (``request_deadline``) when it has not come within
    ``seconds``; then decodes it (a message that does not decode is ``malformed``, never gRPC's
    UNKNOWN with the parser's text); then runs the method: a coroutine on the loop, a plain
    function in ``pool`` with a :class:`_ThreadContext`. gRPC has no server-side option for any
    of this (its deadlines are the client's): written here.
    """

    def __init__(self, seconds: float, pool: futures.Executor, *, per_device: int = 8,
                 per_host: int = 64) -> None:
        self._seconds = seconds
        self._pool = pool
        self._per = {"device": per_device, "host": per_host}
        self._open: dict[str, int] = {}  # open calls per caller; touched on the event loop only

    async def _enter(self, context: grpc.aio.ServicerContext) -> str:
        key = _caller_key(context)
        open_now = self._open.get(key, 0)
        if open_now >= self._per[key.partition(":")[0]]:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "overloaded: too many calls open at once from this caller; retry later")
        self._open[key] = open_now + 1
        return key

    def _leave(self, key: str) -> None:
        left = self._open.get(key, 1) - 1
        if left:
            self._open[key] = left
        else:
            self._open.pop(key, None)

    async def _request(self, context: grpc.aio.ServicerContext,
                       decode: Callable[[bytes], Any] | None) -> tuple[bool, Any]:
        """``(True, request)``, or ``(False, (code, details))`` for the caller to abort with (see
        :func:`_call_plain`: the AbortError's traceback keeps the frames it passes through).

        Read with ``context.read()``, not the request iterator grpc.aio passes: that iterator is
        an async generator in a reference cycle with its receiver, and it keeps the message it
        last yielded (4 MiB) until Python's cycle collector runs (attacker finding F2)."""
        try:
            # asyncio.timeout, not wait_for: no Task per call (issue 15: the event loop's share
            # of a packet's CPU)
            async with asyncio.timeout(self._seconds):
                raw = await context.read()
        except TimeoutError:
            return False, (grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"request_deadline: the request did not arrive within {self._seconds:g} s")
        if raw is grpc.aio.EOF:
            return False, (grpc.StatusCode.INVALID_ARGUMENT, "malformed: the call carried no request")
        if decode is None:
            return True, raw
        try:
            return True, decode(raw)
        except Exception:  # DecodeError, or whatever a generated parser raises
            return False, (grpc.StatusCode.INVALID_ARGUMENT, "malformed: the request does not decode")

    async def _opened(self, context: grpc.aio.ServicerContext,
                      decode: Callable[[bytes], Any] | None) -> tuple[str, Any]:
        """Count the call against its caller and read its request: ``(caller key, request)``;
        the caller :meth:`_leave` s the key when the call ends. A refused or late request ends
        the call here (its key already left)."""
        key = await self._enter(context)
        try:
            ok, got = await self._request(context, decode)
        except BaseException:
            self._leave(key)
            raise
        if not ok:
            self._leave(key)
            await context.abort(*got)
        return key, got

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.request_streaming:
            return _decoded_stream(handler)
        first, pool, enter, leave = self._request, self._pool, self._enter, self._leave
        decode = handler.request_deserializer
        raw_handler = handler._replace(request_streaming=True, request_deserializer=None)
        if not handler.response_streaming:
            behavior = handler.unary_unary

            async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                key = await enter(context)
                try:
                    del requests  # never iterated: the message is read with context.read()
                    ok, got = await first(context, decode)
                    if ok and inspect.iscoroutinefunction(behavior):
                        return await behavior(got, context)
                    if ok:
                        ok, got = await asyncio.get_running_loop().run_in_executor(
                            pool, _call_plain, behavior, got, _ThreadContext(context))
                finally:
                    leave(key)
                if ok:
                    return got
                await context.abort(*got)
            return raw_handler._replace(unary_unary=None, stream_unary=unary)
        streaming = handler.unary_stream
        opened = self._opened
        if inspect.isasyncgenfunction(streaming):
            async def responses(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                del requests  # never iterated: the message is read with context.read()
                key, request = await opened(context, decode)
                try:
                    async for item in streaming(request, context):
                        yield item
                finally:
                    leave(key)
            return raw_handler._replace(unary_stream=None, stream_stream=responses)
        if inspect.iscoroutinefunction(streaming):  # writes with context.write (Health/Watch)
            async def writes(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                del requests
                key, request = await opened(context, decode)
                try:
                    return await streaming(request, context)
                finally:
                    leave(key)
            return raw_handler._replace(unary_stream=None, stream_stream=writes)
        raise TypeError(f"{handler_call_details.method}: a streaming method must run on the event loop")


_MAX_DECODED_STREAM_MESSAGE = 64 * 1024
"""Largest message of a request stream decoded here (reflection's are a few hundred bytes)."""


def _decoded_stream(handler: Any) -> Any:
    """A request-streaming handler whose messages are read with ``context.read()`` and decoded
    here: one that does not decode, or is over 64 KiB, ends the call ``malformed`` (reflection
    answered gRPC's UNKNOWN with the parser's text, F3). Not grpc.aio's request iterator, and the
    abort sent outside any loop or ``except`` block: the iterator kept its last message, and an
    AbortError's traceback kept the frames, until the cycle collector ran (a 4 MiB message per
    reflection call: 106 MB -> 1.8 GB in 30 s, F2 again). SubmitStream has no deserializer (raw
    chunks, read by :func:`_paced`) and is returned as it is."""
    decode = handler.request_deserializer
    if decode is None:
        return handler

    async def decoded(context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        while True:
            raw = await context.read()
            if raw is grpc.aio.EOF:
                return
            message = None
            if len(raw) <= _MAX_DECODED_STREAM_MESSAGE:
                try:
                    message = decode(raw)
                except Exception:  # DecodeError, or whatever a generated parser raises
                    message = None
            del raw
            if message is None:
                break
            yield message
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            "malformed: a request message does not decode (or is over 64 KiB)")

    def wrap(behavior: Any) -> Any:
        if inspect.isasyncgenfunction(behavior):
            async def agen(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                del requests  # never iterated: see decoded()
                async for item in behavior(decoded(context), context):
                    yield item
            return agen
        if inspect.iscoroutinefunction(behavior):
            async def coro(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                del requests
                return await behavior(decoded(context), context)
            return coro
        raise TypeError("a request-streaming method must run on the event loop")

    return _with_behavior(handler._replace(request_deserializer=None), wrap)


class StreamCallLimiter(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Bound the streaming calls that are not SubmitStream (which has its own slots, idle limit
    and deadline): ``Health/Watch`` and reflection, and ``FetchTarget``.

    Each open stream costs the server memory and, on the threaded server, held one of its threads
    (24 idle Watch or reflection calls took all 16 and every unary call timed out: attacker
    finding F1). So at most ``max_watch_streams`` Watch/reflection calls and ``max_fetch_streams``
    fetches run at once (more are answered UNAVAILABLE ``overloaded``, retryable), and the server
    ends an open one at its deadline (``watch_stream_deadline_s``; fetches: ``stream_deadline_s``
    or the ``FetchTarget`` entry of ``deadlines``) with DEADLINE_EXCEEDED; a client that stops
    reading is cut 5 s later. gRPC has no server-side option for either: written here.
    """

    def __init__(self, config: TransportConfig) -> None:
        fetch_s = config.deadlines.get("FetchTarget", config.stream_deadline_s)
        self._limits = {"watch": (config.max_watch_streams, config.watch_stream_deadline_s),
                        "fetch": (config.max_fetch_streams, fetch_s)}
        self._per_caller = {"watch": config.max_watch_streams_per_caller,
                            "fetch": config.max_fetch_streams_per_caller}
        self._open = {"watch": 0, "fetch": 0}  # touched on the event loop only
        self._by_caller: dict[tuple[str, str], int] = {}  # (pool, caller) -> open streams

    @staticmethod
    def _pool(method: str) -> str | None:
        if method.endswith("/FetchTarget"):
            return "fetch"
        if method == "/grpc.health.v1.Health/Watch" or method.startswith("/grpc.reflection."):
            return "watch"
        return None

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        pool = self._pool(handler_call_details.method)
        if pool is None:
            return handler
        limit, deadline_s = self._limits[pool]
        open_calls = self._open

        over = f"stream_deadline: the server ends this stream after {deadline_s:g} s"

        by_caller, per_caller = self._by_caller, self._per_caller[pool]
        caller: list[tuple[str, str]] = []

        async def take(context: Any) -> None:
            # One caller may not hold the whole pool (attacker finding F4: one device with 4
            # unread fetches blocked every device's FetchTarget until the stream deadline).
            key = (pool, _caller_key(context))
            if open_calls[pool] >= limit or by_caller.get(key, 0) >= per_caller:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "overloaded: too many streaming calls at once; retry later")
            open_calls[pool] += 1
            by_caller[key] = by_caller.get(key, 0) + 1
            caller.append(key)

        def give() -> None:
            open_calls[pool] -= 1
            key = caller.pop()
            if (left := by_caller.get(key, 1) - 1) > 0:
                by_caller[key] = left
            else:
                by_caller.pop(key, None)

        def guarded(behavior: Any) -> Any:
            if inspect.iscoroutinefunction(behavior):  # writes with context.write (Health/Watch)
                async def run_coroutine(request: Any, context: Any) -> Any:
                    await take(context)
                    try:
                        try:
                            return await asyncio.wait_for(behavior(request, context), deadline_s)
                        except TimeoutError:
                            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, over)
                    finally:
                        give()
                return run_coroutine
            if not inspect.isasyncgenfunction(behavior):
                raise TypeError(f"{handler_call_details.method}: a bounded stream must run on the event loop")

            async def run(request: Any, context: Any) -> AsyncIterator[Any]:
                await take(context)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + deadline_s
                task = asyncio.current_task()
                # wait_for below ends a stream whose next response is late; a client that stops
                # reading blocks the write instead, and is cut by this backstop.
                backstop = loop.call_later(deadline_s + 5.0, task.cancel) if task is not None else None
                responses = aiter(behavior(request, context))
                try:
                    while True:
                        try:
                            item = await asyncio.wait_for(anext(responses), max(deadline - loop.time(), 0))
                        except StopAsyncIteration:
                            return
                        except TimeoutError:
                            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, over)
                        yield item
                finally:
                    if backstop is not None:
                        backstop.cancel()
                    give()
            return run

        return _with_behavior(handler, guarded)


class RevocationInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuse every call of a revoked device, whatever the service (issue 14 finding 6).

    The TLS layer only checks the chain to the device CA, so a revoked certificate still completes
    the handshake; this looks the verified peer's device id up in the store on every call and
    answers PERMISSION_DENIED (``certificate_revoked``) before the handler runs. A peer without a
    device certificate (no mTLS) is left to the handlers. One indexed read per call (in the
    server's thread pool, never on the event loop), ``KnowledgeService/Submit`` included: the
    store's write transaction refuses a revoked device too, but only after the packet's
    signature, HPKE and accountant work, and a revoked device's undecodable bytes were answered
    ``malformed``, not ``certificate_revoked`` (attacker finding F5).
    """

    def __init__(self, store: Store, pool: futures.Executor) -> None:
        self._store = store
        self._pool = pool

    def _refusal(self, device_id: str) -> DirediError | None:
        try:
            status = self._store.device_status(device_id)
        except DirediError as exc:
            return exc
        if status is DeviceStatus.REVOKED:
            return CertificateRevoked(f"device {device_id} is revoked")
        return None

    def _check(self, context: Any) -> None:
        device_id = peer_device_id(context)
        error = None if device_id is None else self._refusal(device_id)
        if error is not None:
            abort_with(context, error)

    async def _check_async(self, context: Any) -> None:
        device_id = peer_device_id(context)
        if device_id is None:
            return
        error = await asyncio.get_running_loop().run_in_executor(self._pool, self._refusal, device_id)
        if error is not None:
            await abort_async(context, error)

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _with_behavior(handler, lambda behavior: _preceded(
            behavior, streaming=handler.response_streaming, check=self._check,
            check_async=self._check_async))


# ------------------------------------------------------------------------------------------------
# Servicers: decode, call, map errors
# ------------------------------------------------------------------------------------------------
class _Knowledge:
    def __init__(self, ingest: Ingest, mtls: bool, observer: IngestObserver | None = None, *,
                 pool: futures.Executor) -> None:
        self.ingest = ingest
        self.pool = pool  # the server's threads: the store and the crypto never run on the loop
        self.mtls = mtls
        self.observer = observer or IngestObserver()  # one log line per accepted/refused packet
        self._streams = threading.BoundedSemaphore(ingest.config.max_ingest_streams)
        self._per_peer: dict[str | None, int] = {}  # open streams per device (or caller host)
        self._per_peer_lock = threading.Lock()

    def _take_stream(self, peer: str | None) -> bool:
        """One open stream per device (so one device cannot hold every slot), and at most
        ``max_ingest_streams`` in all."""
        with self._per_peer_lock:
            if self._per_peer.get(peer, 0) >= 1:
                return False
            if not self._streams.acquire(blocking=False):
                return False
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            return True

    def _give_stream(self, peer: str | None) -> None:
        with self._per_peer_lock:
            left = self._per_peer.get(peer, 1) - 1
            if left:
                self._per_peer[peer] = left
            else:
                self._per_peer.pop(peer, None)
            self._streams.release()

    def _refuse(self, context: grpc.ServicerContext, exc: Exception) -> NoReturn:
        context.abort(*self._refusal(exc))
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises

    def submit(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        started, peer = time.monotonic(), peer_device_id(context)
        try:
            accepted = self.ingest.accept(request, peer=peer, mtls=self.mtls,
                                          origin=lambda: _peer_host(context))
        except Exception as exc:
            self.observer.refused(method="Submit", error=exc, packet=request, peer=peer, started=started)
            self._refuse(context, exc)
        self.observer.accepted(method="Submit", packet=request, receipt=accepted.receipt, peer=peer,
                               started=started, header=accepted.header, duplicate=accepted.duplicate)
        return accepted.receipt

    @staticmethod
    def _refusal(exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """The status a refused packet's call ends with (logged as :func:`refusal_status` does).

        Overloaded or rate limited is sent as is (not through :func:`refusal_status`, which would
        replace a LocalError's text by the generic "internal error" line and log it as our fault;
        neither is, and the client needs the reason to back off)."""
        if isinstance(exc, _StreamCut):
            return grpc.StatusCode.DEADLINE_EXCEEDED, f"stream cancelled: {exc}"
        if isinstance(exc, ServiceUnavailable):
            return grpc.StatusCode.UNAVAILABLE, exc.one_line()
        return refusal_status(exc, quiet=True)

    async def submit_stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        """A coroutine on the event loop: receiving holds no thread (a stalled stream costs one
        coroutine until its idle limit); the store and the packet's crypto run in the pool."""
        del requests  # never iterated: the chunks are read with context.read() (see _paced)
        loop = asyncio.get_running_loop()
        started, peer = time.monotonic(), peer_device_id(context)
        refusals = self.ingest.refusals
        host = _peer_host(context)
        # Without mTLS a stream's failures (framing, stalls) count for its host's streams as a
        # whole (F6: 2,814 refused streams in 45 s were never limited).
        device = peer if self.mtls else f"stream@{host or '?'}"
        # One stream per device; without mTLS there is no device yet: one per caller host, so one
        # anonymous client cannot hold every slot (attacker finding F3).
        slot = peer if peer is not None else f"host:{host or '?'}"
        early: tuple[grpc.StatusCode, str] | None = None
        try:
            refusals.check(device)  # a cooled-down device takes no slot and sends no byte
            if not self.mtls and host is not None:
                refusals.check(f"unparsed@{host}")  # this host's unparseable packets, cooled down
                self.ingest.host_refusals.check(f"host@{host}")  # or the host as a whole
            if not self._take_stream(slot):
                raise ServiceUnavailable(
                    "too many packet streams at once (or one already open for this device); "
                    "retry later", reason="overloaded")
        except ServiceUnavailable as exc:
            self.observer.refused(method="SubmitStream", error=exc, packet=None, peer=peer, started=started)
            early = self._refusal(exc)
        if early is not None:
            await context.abort(*early)  # outside the except block (F2)
        config = self.ingest.config
        data: bytes | None = None
        assembler: StreamAssembler | None = None
        refusal: tuple[grpc.StatusCode, str] | None = None
        try:
            if self.mtls and peer is not None:
                # Who may stream at all is settled before a byte is buffered.
                await loop.run_in_executor(self.pool, self.ingest.store.require_active_device, peer)
            hasher = CiphertextHasher()  # the ciphertext is hashed as it arrives (wire version 2)
            assembler = self.ingest.assembler(hasher=hasher)
            try:
                async for raw in _paced(context, deadline_s=config.ingest_stream_deadline_s,
                                        idle_s=config.ingest_stream_idle_s):
                    assembler.add(raw)
                data = assembler.result()
            except (PeerError, PolicyError, _StreamCut):
                refusals.refused(device)  # Ingest.submit counts the refusals after this point
                raise
            assembler = None
            accepted = await loop.run_in_executor(self.pool, functools.partial(
                self.ingest.accept, data, peer=peer, mtls=self.mtls, streamed=True,
                ciphertext_digest=hasher.result(), origin=lambda: host))
        except Exception as exc:
            error: Exception = exc
            if isinstance(exc, _StreamCut):
                error = MalformedPacket(f"stream cancelled: {exc}")
            self.observer.refused(method="SubmitStream", error=error, packet=data, peer=peer, started=started)
            refusal = self._refusal(exc)
            error = None  # type: ignore[assignment]  # its traceback holds the frames (F2)
        finally:
            self._give_stream(slot)
        if refusal is not None:
            # Sent outside the except block, with the buffers dropped: the AbortError's traceback
            # keeps this frame, which must not hold up to 64 MiB (attacker finding F2).
            data = assembler = None
            await context.abort(*refusal)
        assert data is not None  # stored: the receipt came back
        self.observer.accepted(method="SubmitStream", packet=data, receipt=accepted.receipt, peer=peer,
                               started=started, header=accepted.header, duplicate=accepted.duplicate)
        return accepted.receipt

    def handler(self) -> grpc.GenericRpcHandler:
        # No (de)serialisers: the packet arrives, and the receipt leaves, as exact bytes.
        return grpc.method_handlers_generic_handler(
            KNOWLEDGE_SERVICE,
            {
                "Submit": grpc.unary_unary_rpc_method_handler(self.submit),
                "SubmitStream": grpc.stream_unary_rpc_method_handler(self.submit_stream),
            },
        )


class _EnrollmentServicer(sgrpc.EnrollmentServiceServicer):
    def __init__(self, enrollment: Enrollment, mtls: bool, refusals: RefusalLimiter) -> None:
        self.enrollment = enrollment
        self.mtls = mtls
        self.refusals = refusals  # the ingest's limiter: one count per device for both

    def Enroll(self, request: Any, context: grpc.ServicerContext) -> Any:
        peer = peer_device_id(context)
        # Each refused enrolment cost a certificate chain check and a signature check: the same
        # refusal limit as packets, keyed on the mTLS peer, or without mTLS on the caller's host
        # (there is no verified device before the enrolment succeeds).
        who = peer if self.mtls and peer is not None else f"enroll@{_peer_host(context) or '?'}"
        try:
            self.refusals.check(who)
        except ServiceUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, exc.one_line())  # as _Knowledge._refuse
        try:
            result = self.enrollment.enroll(
                bytes(request.certificate), bytes(request.proof), peer=peer, mtls=self.mtls
            )
        except DirediError as exc:
            if not isinstance(exc, LocalError):  # the caller's fault, never the cloud's own
                self.refusals.refused(who)
            abort_with(context, exc)
        except Exception as exc:  # the catch-all: nothing untyped reaches a peer
            abort_internal(context, exc)
        return spb.EnrollResponse(
            device_id=result.device_id,
            inbox_key_id=result.inbox_key_id,
            receipt_public_key=result.receipt_public_key,
        )

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            status = self.enrollment.status(request.device_id, peer=peer_device_id(context), mtls=self.mtls)
        except DirediError as exc:
            abort_with(context, exc)
        except Exception as exc:  # the catch-all: nothing untyped reaches a peer
            abort_internal(context, exc)
        return spb.DeviceStatusResponse(**status)


class _UpdateServicer(sgrpc.UpdateServiceServicer):
    def __init__(self, folder: ReleaseFolder | None, metrics: Metrics | None = None, *,
                 pool: futures.Executor) -> None:
        self.pool = pool
        self.folder = folder
        self.metrics = metrics

    def _count(self, kind: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.release_fetches.labels(kind, outcome).inc()

    def _require(self) -> ReleaseFolder:
        if self.folder is None:
            raise NotFound("this cloud serves no release repository")
        return self.folder

    def GetMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            data = self._require().metadata(request.role, int(request.version))
        except DirediError as exc:
            # "No such version" is how a TUF client learns there is no newer root: not a refusal.
            self._count("metadata", exc.reason)
            abort_with(context, exc, quiet=isinstance(exc, NotFound))
        except Exception as exc:  # the catch-all: nothing untyped reaches a peer
            abort_internal(context, exc)
        self._count("metadata", "served")
        return spb.MetadataResponse(metadata=data)

    async def FetchTarget(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # An async generator on the event loop (a slow reader holds no thread); each file read
        # runs in the pool.
        loop = asyncio.get_running_loop()
        try:
            chunks = await loop.run_in_executor(
                self.pool, lambda: iter(self._require().target(request.path, int(request.max_length))))
            while (item := await loop.run_in_executor(self.pool, next, chunks, None)) is not None:
                data, offset, total = item
                yield spb.Chunk(data=data, offset=offset, total_length=total if offset == 0 else 0)
            self._count("target", "served")
        except DirediError as exc:
            self._count("target", exc.reason)
            await abort_async(context, exc)
        except Exception as exc:  # the catch-all: nothing untyped reaches a peer
            await abort_async(context, exc)


# ------------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------------
def _metadata_versions(repository: Path) -> Callable[[], dict[str, int]]:
    """The newest version of each top-level TUF role in ``repository/metadata`` (for metrics)."""
    def versions() -> dict[str, int]:
        newest: dict[str, int] = {}
        folder = repository / "metadata"
        for file in folder.glob("*.json") if folder.is_dir() else ():
            version, _, role = file.stem.partition(".")
            if version.isdigit() and role:
                newest[role] = max(newest.get(role, 0), int(version))
        timestamp = folder / "timestamp.json"
        if timestamp.is_file() and timestamp.stat().st_size < 64 * 1024:
            version = json.loads(timestamp.read_bytes()).get("signed", {}).get("version")
            if isinstance(version, int):
                newest["timestamp"] = version
        return newest
    return versions


_T = TypeVar("_T")
_LOOP_LOCK = threading.Lock()
_LOOP: asyncio.AbstractEventLoop | None = None


def _event_loop() -> asyncio.AbstractEventLoop:
    """The one asyncio event loop (in a daemon thread) that runs every :class:`CloudServer` of this
    process: grpc.aio is happiest with one loop, and the callers of the server are threads."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="diredi-grpc-loop", daemon=True).start()
            _LOOP = loop
        return _LOOP


def _on_loop(coroutine: Coroutine[Any, Any, _T], timeout_s: float | None = None) -> _T:
    """Run ``coroutine`` on the servers' event loop and wait for its result (from any thread but
    the loop's own)."""
    return asyncio.run_coroutine_threadsafe(coroutine, _event_loop()).result(timeout_s)


class CloudServer:
    """One gRPC server hosting every cloud service. ``start()`` returns the bound port.

    TLS is required unless ``insecure=True`` (logged). With ``tls.require_client_auth`` (mTLS),
    each call's TLS client must be the device the request is about.
    """

    def __init__(
        self,
        *,
        store: Store,
        keys: CloudKeys,
        listen: str = "127.0.0.1:0",
        tls: ServerTls | None = None,
        insecure: bool = False,
        repository_dir: Path | None = None,
        policy: PacketPolicy = DEFAULT_POLICY,
        config: TransportConfig | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        max_workers: int = 16,
        released_models: Callable[[], Mapping[str, str | None]] | None = None,
        ops_listen: str | None = None,
        reuse_port: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``ops_listen``: host:port of the plain-HTTP ops endpoint (``/healthz``, ``/metrics``;
        no device certificate needed), or ``None`` for none. Metrics are collected either way
        (``self.metrics``). ``reuse_port``: bind with ``SO_REUSEPORT`` so that several server
        processes share ``listen`` (``cloud serve --workers N``; the kernel spreads connections).
        ``monotonic``: the refusal limit's clock (seconds; tests pass a fake one)."""
        self.reuse_port = reuse_port
        self.config = config or TransportConfig()
        self.store = store
        self.listen = listen
        self.tls = tls
        self.insecure = insecure
        mtls = bool(tls and tls.require_client_auth)
        self.mtls = mtls
        self.ingest = Ingest(store, keys, policy=policy, config=self.config, clock=clock,
                             monotonic=monotonic)
        self.ingest.released_models = released_models
        if released_models is not None and repository_dir is not None:
            self.ingest.model_shapes = ReleasedModelShapes(repository_dir,
                                                           max_file_bytes=self.config.max_target_bytes)
        self.enrollment = Enrollment(store, keys, policy=policy, config=self.config, clock=clock)
        # Health/Watch and reflection are coroutines on the event loop (no thread each).
        self.health = health.aio.HealthServicer()
        self.metrics = Metrics(ledger=store.ledger_summary,
                               releases=None if repository_dir is None else _metadata_versions(repository_dir))
        self._serving = False
        self._stopped = threading.Event()
        self.ops = None if ops_listen is None else OpsServer(ops_listen, self.metrics, self._is_healthy)
        # The asyncio server (attacker finding F7): a call's request is read on the event loop,
        # so a call whose message never comes holds no thread; the plain handlers (unary calls:
        # the store, the crypto) run in this pool of ``max_workers`` threads, the streaming ones
        # are coroutines that hand each blocking step to it.
        self._pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="diredi-rpc")
        interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (
            RequestArrivalLimit(self.config.unary_deadline_s, self._pool,
                                per_device=self.config.max_calls_per_device,
                                per_host=self.config.max_calls_per_host),
            *((RevocationInterceptor(store, self._pool),) if mtls else ()),
            StreamCallLimiter(self.config))
        options = [*(o for o in server_options(self.config) if o[0] != "grpc.so_reuseport"),
                   ("grpc.so_reuseport", 1 if reuse_port else 0)]
        folder = None if repository_dir is None else ReleaseFolder(repository_dir, self.config)
        knowledge = _Knowledge(self.ingest, mtls, IngestObserver(self.metrics), pool=self._pool)

        async def build() -> grpc.aio.Server:
            server = grpc.aio.server(migration_thread_pool=self._pool, options=options,
                                     maximum_concurrent_rpcs=self.config.max_concurrent_calls,
                                     interceptors=interceptors)
            server.add_generic_rpc_handlers((knowledge.handler(),))
            sgrpc.add_EnrollmentServiceServicer_to_server(
                _EnrollmentServicer(self.enrollment, mtls, self.ingest.refusals), server)
            sgrpc.add_UpdateServiceServicer_to_server(
                _UpdateServicer(folder, self.metrics, pool=self._pool), server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            reflection.enable_server_reflection(
                (*_SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
            return server

        self._server = _on_loop(build())
        self.port: int | None = None

    def start(self) -> int:
        async def start() -> int:
            port = add_port(self._server, self.listen, self.tls, insecure=self.insecure,
                            reuse_port=self.reuse_port)
            await self._server.start()
            for name in ("", *_SERVICE_NAMES):
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            return port

        self.port = _on_loop(start())
        self._serving = True
        if self.ops is not None:
            self.ops.start()
        log.info("cloud serving on port %d (%s)", self.port, "mTLS" if self.mtls else "TLS" if self.tls else "INSECURE")
        return self.port

    def wait(self) -> None:
        """Block until :meth:`stop` (from another thread or a signal handler) has finished."""
        while not self._stopped.wait(0.5):
            pass

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace_s``, then close."""
        if self._stopped.is_set():
            return
        self._serving = False
        if self.ops is not None:
            self.ops.stop()

        async def stop() -> None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace_s)

        try:
            _on_loop(stop())
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._stopped.set()

    def _is_healthy(self) -> bool:
        """Serving, and the store answers (one trivial read)."""
        if not self._serving:
            return False
        self.store.schema_version()
        return True

    def __enter__(self) -> CloudServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

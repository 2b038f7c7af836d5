"""Seal and open knowledge packets: bytes in, typed objects or typed errors out.

A packet is a :class:`~diredi_secure.envelope.SignedEnvelope`:

* ``header``: the canonical protobuf bytes of a :class:`~diredi_secure.envelope.PacketHeader`,
  signed as sent and never re-serialised by the receiver;
* ``enc``, ``ciphertext``: HPKE (RFC 9180, base mode) of the safetensors payload to the cloud's
  inbox key, with the header bytes as the HPKE ``info``, so a ciphertext cannot be moved under
  another header;
* ``signature``: Ed25519 by the device key over :func:`signed_transcript` (domain tag, then each of
  header, enc and ciphertext length-prefixed).

Like h11, this module does no I/O: the clock (``now_ms``), randomness (``random_bytes``) and state
(:class:`DeviceDirectory`, :class:`ReplayState`) are parameters. :func:`open_packet` performs every
check in a fixed order, cheapest first, refusing oversize input before any decryption, and only
*checks* replay state: the caller records acceptance (a store does it in the transaction that
stores the packet), so a rejected packet never changes state.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np

from ._crypto import (
    AEAD_TAG_BYTES,
    DeviceIdentity,
    HpkeSuite,
    InboxKey,
    InboxPublicKey,
    SigningKey,
    VerifyKey,
    check_device_certificate,
    enc_length,
    hpke_open,
    hpke_seal,
    sha256,
    sign,
    verify_signature,
)
from .envelope import ENVELOPE_VERSION, FORMAT_VERSION, PacketHeader, ReceiptBody, SignedEnvelope
from .errors import (
    CertificateRevoked,
    HeaderMismatch,
    MalformedPacket,
    PolicyViolation,
    ReplayDetected,
    StalePacket,
    TooLarge,
    UnknownDevice,
)
from .knowledge import (
    DPParameters,
    KnowledgePayload,
    check_descriptor,
    decode_payload,
    encode_payload,
)
from .policy import DEFAULT_LIMITS, DEFAULT_POLICY, Limits, PacketPolicy
from .privacy import PacketCharge, account_packet, charge
from .serde import (
    envelope_from_bytes,
    envelope_to_bytes,
    header_from_bytes,
    header_to_bytes,
    receipt_body_from_bytes,
    receipt_body_to_bytes,
    receipt_from_bytes,
    receipt_to_bytes,
)

__all__ = [
    "DeviceDirectory",
    "DeviceRecord",
    "DeviceStatus",
    "MemoryDeviceDirectory",
    "MemoryReplayState",
    "OpenedPacket",
    "ReplayState",
    "SealedPacket",
    "inspect_packet",
    "make_receipt",
    "open_packet",
    "seal_packet",
    "signed_transcript",
    "verify_receipt",
]

_SIG_DOMAIN = b"diredi-packet-v1\x00"
_RECEIPT_DOMAIN = b"diredi-receipt-v1\x00"


def signed_transcript(header: bytes, enc: bytes, ciphertext: bytes) -> bytes:
    """The exact bytes the device signs: domain tag, then length-prefixed header, enc, ciphertext.

    Length prefixes make the split unambiguous (no bytes can migrate between fields).
    """
    return b"".join(
        (
            _SIG_DOMAIN,
            struct.pack(">I", len(header)),
            header,
            struct.pack(">I", len(enc)),
            enc,
            struct.pack(">Q", len(ciphertext)),
            ciphertext,
        )
    )


# ------------------------------------------------------------------------------------------------
# State interfaces (a store implements them; in-memory versions for tests and the demo)
# ------------------------------------------------------------------------------------------------
class DeviceStatus(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


@dataclass(frozen=True)
class DeviceRecord:
    """An enrolled device as the cloud knows it."""

    device_id: str
    certificate_der: bytes
    status: DeviceStatus = DeviceStatus.ACTIVE
    rdp_spent: np.ndarray | None = field(default=None, compare=False)
    """The device's composed ledger curve (``privacy``), when the directory keeps one: lets
    ``open_packet`` refuse an over-budget packet before decrypting it."""
    epsilon_budget: float | None = None
    epsilon_floor: float = 0.0


class DeviceDirectory(Protocol):
    """The cloud's registry of enrolled devices (and so its revocation list)."""

    def device_record(self, device_id: str) -> DeviceRecord | None: ...


class ReplayState(Protocol):
    """What replay protection reads: packet ids seen, and the highest counter per device."""

    def highest_counter(self, device_id: str) -> int | None: ...

    def packet_seen(self, packet_id: bytes) -> bool: ...


@dataclass
class MemoryDeviceDirectory:
    """In-memory :class:`DeviceDirectory` (tests, the demo, a lab)."""

    records: dict[str, DeviceRecord] = field(default_factory=dict)

    def enroll(self, device_id: str, certificate_der: bytes) -> None:
        self.records[device_id] = DeviceRecord(device_id, certificate_der)

    def revoke(self, device_id: str) -> None:
        record = self.records.get(device_id)
        if record is None:
            raise UnknownDevice(f"device {device_id} is not enrolled")
        self.records[device_id] = DeviceRecord(
            device_id, record.certificate_der, DeviceStatus.REVOKED
        )

    def device_record(self, device_id: str) -> DeviceRecord | None:
        return self.records.get(device_id)


@dataclass
class MemoryReplayState:
    """In-memory :class:`ReplayState`; :meth:`record` is called once a packet is accepted."""

    seen: set[bytes] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=dict)

    def highest_counter(self, device_id: str) -> int | None:
        return self.counters.get(device_id)

    def packet_seen(self, packet_id: bytes) -> bool:
        return packet_id in self.seen

    def record(self, device_id: str, packet_id: bytes, counter: int) -> None:
        """Record an accepted packet; raises :class:`ReplayDetected` if it is not fresh."""
        _check_replay(self, device_id, packet_id, counter)
        self.seen.add(packet_id)
        self.counters[device_id] = counter


def _check_replay(state: ReplayState, device_id: str, packet_id: bytes, counter: int) -> None:
    if state.packet_seen(packet_id):
        raise ReplayDetected(f"packet {packet_id.hex()} was already received")
    highest = state.highest_counter(device_id)
    if highest is not None and counter <= highest:
        raise ReplayDetected(
            f"device {device_id} counter {counter} does not exceed its highest {highest}"
        )


# ------------------------------------------------------------------------------------------------
# Sealing (device side)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SealedPacket:
    data: bytes
    header: PacketHeader

    @property
    def packet_id(self) -> bytes:
        return self.header.packet_id


def seal_packet(
    payload: KnowledgePayload,
    *,
    device_key: SigningKey,
    device_id: str,
    counter: int,
    base_model_version: str,
    dp: DPParameters,
    inbox: InboxPublicKey,
    now_ms: int,
    random_bytes: Callable[[int], bytes],
    suite: HpkeSuite = HpkeSuite.X25519_SHA256_AES128GCM,
    device_certificate: bytes = b"",
    limits: Limits = DEFAULT_LIMITS,
) -> SealedPacket:
    """Encode, encrypt to ``inbox`` and sign ``payload``; returns the packet bytes and header.

    ``random_bytes(n)`` supplies the 128-bit packet id (pass ``os.urandom`` in production, a seeded
    generator in tests); ``now_ms`` is the creation time. Raises :class:`TooLarge` if the payload
    exceeds ``limits`` (the cloud would refuse it anyway).
    """
    plaintext, descriptor = encode_payload(payload)
    check_descriptor(descriptor, limits)
    packet_id = random_bytes(16)
    if len(packet_id) != 16:
        raise MalformedPacket("random_bytes(16) must return 16 bytes")
    header = PacketHeader(
        format_version=FORMAT_VERSION,
        suite=suite,
        packet_id=packet_id,
        device_id=device_id,
        counter=counter,
        created_at_ms=now_ms,
        base_model_version=base_model_version,
        payload=descriptor,
        dp=dp,
        recipient_key_id=inbox.key_id,
        signer_key_id=device_key.key_id,
    )
    header_bytes = header_to_bytes(header)
    enc, ciphertext = hpke_seal(suite, inbox, plaintext, info=header_bytes)
    signature = sign(device_key, signed_transcript(header_bytes, enc, ciphertext))
    data = envelope_to_bytes(
        SignedEnvelope(
            envelope_version=ENVELOPE_VERSION,
            header=header_bytes,
            enc=enc,
            ciphertext=ciphertext,
            signature=signature,
            device_certificate=device_certificate,
        )
    )
    if len(data) > limits.max_packet_bytes:
        raise TooLarge("sealed packet", len(data), limits.max_packet_bytes)
    return SealedPacket(data, header)


# ------------------------------------------------------------------------------------------------
# Opening (cloud side)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenedPacket:
    """A packet that passed every check. ``packet_sha256`` is :func:`packet_digest` of it (what
    was signed, and the signature)."""

    header: PacketHeader
    payload: KnowledgePayload
    device: DeviceIdentity
    packet_sha256: bytes
    charge: PacketCharge

    @property
    def epsilon(self) -> float:
        """This packet's own epsilon at its delta, as the cloud recomputed it."""
        return self.charge.epsilon


_DIGEST_DOMAIN = b"diredi-packet-digest-v1\x00"


def packet_digest(data: bytes, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The packet's identity for idempotency, receipts and attestations: SHA-256 over what the
    device signed and its signature, *not* the optional attached certificate (which no signature
    covers). A copy with the certificate stripped or swapped has the same digest, so it cannot take
    the genuine packet's place (issue 14 finding 8). Raises like :func:`inspect_packet`."""
    env = envelope_from_bytes(data, limits)
    return sha256(b"".join((_DIGEST_DOMAIN, struct.pack(">I", len(env.signature)), env.signature,
                            signed_transcript(env.header, env.enc, env.ciphertext))))


def inspect_packet(data: bytes, limits: Limits = DEFAULT_LIMITS) -> PacketHeader:
    """Parse the header of a packet WITHOUT verifying anything (for display; needs no key)."""
    return header_from_bytes(envelope_from_bytes(data, limits).header, limits)


def _check_structure(
    env: SignedEnvelope, header: PacketHeader, inbox_key_id: bytes, limits: Limits
) -> None:
    check_descriptor(header.payload, limits)
    if len(env.ciphertext) != header.payload.length + AEAD_TAG_BYTES:
        raise HeaderMismatch(
            f"ciphertext is {len(env.ciphertext)} bytes, the header declares a payload of "
            f"{header.payload.length} (+{AEAD_TAG_BYTES} tag)"
        )
    if len(env.enc) != enc_length(header.suite):
        raise HeaderMismatch(
            f"enc is {len(env.enc)} bytes, suite {header.suite.name} needs {enc_length(header.suite)}"
        )
    if header.recipient_key_id != inbox_key_id:
        raise HeaderMismatch(
            f"packet is sealed to inbox key {header.recipient_key_id.hex()[:16]}, "
            f"not ours ({inbox_key_id.hex()[:16]})"
        )


def _authenticate_device(
    env: SignedEnvelope,
    header: PacketHeader,
    *,
    device_ca: bytes,
    devices: DeviceDirectory,
    now_ms: int,
    limits: Limits,
) -> tuple[DeviceIdentity, DeviceRecord]:
    record = devices.device_record(header.device_id)
    if record is None:
        raise UnknownDevice(f"device {header.device_id} is not enrolled")
    if record.status == DeviceStatus.REVOKED:
        raise CertificateRevoked(f"device {header.device_id} is revoked")
    if env.device_certificate and env.device_certificate != record.certificate_der:
        # Name a certificate from another CA as such; one from our CA that is not the enrolled
        # one (a re-provisioned or cloned device) is an unknown identity.
        check_device_certificate(
            env.device_certificate, device_ca, now_ms=now_ms, max_bytes=limits.max_certificate_bytes
        )
        raise UnknownDevice(
            f"packet carries a certificate other than the one device {header.device_id} enrolled"
        )
    identity = check_device_certificate(
        record.certificate_der, device_ca, now_ms=now_ms, max_bytes=limits.max_certificate_bytes
    )
    if identity.device_id != header.device_id:
        raise HeaderMismatch(
            f"certificate names device {identity.device_id}, header {header.device_id}"
        )
    if identity.public_key.key_id != header.signer_key_id:
        raise HeaderMismatch("header signer key id differs from the device certificate's key")
    verify_signature(
        identity.public_key, env.signature, signed_transcript(env.header, env.enc, env.ciphertext)
    )
    return identity, record


def _check_policy(header: PacketHeader, policy: PacketPolicy, now_ms: int) -> PacketCharge:
    if int(header.suite) not in policy.accepted_suites:
        raise PolicyViolation(f"cipher suite {header.suite.name} is not accepted by policy")
    age = now_ms - header.created_at_ms
    if age > policy.max_age_ms:
        raise StalePacket(
            f"packet was created {age / 1000:.0f} s ago, over the {policy.max_age_ms / 1000:.0f} s window"
        )
    if -age > policy.max_future_skew_ms:
        raise StalePacket(
            f"packet is dated {-age / 1000:.0f} s in the future, over the {policy.max_future_skew_ms / 1000:.0f} s skew"
        )
    if (
        policy.allowed_base_models is not None
        and header.base_model_version not in policy.allowed_base_models
    ):
        raise PolicyViolation(f"base model {header.base_model_version} is not a current release")
    # Every DP figure is bounded and recomputed by the privacy package, before decryption.
    return account_packet(header.dp, header.payload.entries, policy.dp)


def open_packet(
    data: bytes,
    *,
    inbox_key: InboxKey,
    device_ca: bytes,
    devices: DeviceDirectory,
    replay: ReplayState,
    now_ms: int,
    policy: PacketPolicy = DEFAULT_POLICY,
    limits: Limits = DEFAULT_LIMITS,
) -> OpenedPacket:
    """Verify, decrypt and validate an untrusted packet. Changes no state.

    Order: size cap; envelope and header parse (versions, suite); declared sizes (before any
    decryption); recipient key; device enrolment, revocation and certificate (checked once); signature; policy
    (suite, clock window, DP declaration, base model); replay; HPKE open; payload decode
    (safetensors only; dtype, shape, finiteness, norm bound). Raises the first failure as a
    :class:`~diredi_secure.errors.DirediError` subclass naming it.

    Trusted inputs: ``inbox_key``, ``device_ca`` (DER), ``devices``, ``replay``, ``now_ms``.
    """
    if len(data) > limits.max_packet_bytes:
        raise TooLarge("packet", len(data), limits.max_packet_bytes)
    env = envelope_from_bytes(data, limits)
    header = header_from_bytes(env.header, limits)
    _check_structure(env, header, inbox_key.key_id, limits)
    identity, record = _authenticate_device(
        env, header, device_ca=device_ca, devices=devices, now_ms=now_ms, limits=limits
    )
    cost = _check_policy(header, policy, now_ms)
    if record.rdp_spent is not None and record.epsilon_budget is not None:
        # Early refusal of an exhausted budget; the store re-checks inside its transaction.
        charge(device_id=header.device_id, spent_curve=record.rdp_spent, packet_curve=cost.curve,
               budget=record.epsilon_budget, policy=policy.dp, floor=record.epsilon_floor)
    _check_replay(replay, header.device_id, header.packet_id, header.counter)
    plaintext = hpke_open(header.suite, inbox_key, env.enc, env.ciphertext, info=env.header)
    payload = decode_payload(
        plaintext, header.payload, limits, max_l2_norm=policy.max_entry_l2_norm
    )
    return OpenedPacket(header=header, payload=payload, device=identity,
                        packet_sha256=packet_digest(data, limits),
                        charge=cost)


# ------------------------------------------------------------------------------------------------
# Receipts
# ------------------------------------------------------------------------------------------------
def make_receipt(receipt_key: SigningKey, opened: OpenedPacket, *, stored_at_ms: int) -> bytes:
    """The cloud's signed receipt for a stored packet (deterministic: same inputs, same bytes)."""
    body = receipt_body_to_bytes(
        ReceiptBody(
            format_version=FORMAT_VERSION,
            packet_id=opened.header.packet_id,
            packet_sha256=opened.packet_sha256,
            device_id=opened.header.device_id,
            counter=opened.header.counter,
            stored_at_ms=stored_at_ms,
            receipt_key_id=receipt_key.key_id,
        )
    )
    return receipt_to_bytes(body, sign(receipt_key, _RECEIPT_DOMAIN + body))


def verify_receipt(receipt: bytes, receipt_public_key: VerifyKey, packet: bytes) -> ReceiptBody:
    """Device side: check the receipt is the cloud's and acknowledges exactly ``packet``."""
    body_bytes, signature = receipt_from_bytes(receipt)
    verify_signature(receipt_public_key, signature, _RECEIPT_DOMAIN + body_bytes)
    body = receipt_body_from_bytes(body_bytes)
    if body.receipt_key_id != receipt_public_key.key_id:
        raise HeaderMismatch("receipt names another receipt key")
    if body.packet_sha256 != packet_digest(packet):
        raise HeaderMismatch("receipt acknowledges other packet bytes")
    return body

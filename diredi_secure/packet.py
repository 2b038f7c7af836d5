"""Seal and open knowledge packets: bytes in, typed objects or typed errors out.

A packet is a :class:`~diredi_secure.envelope.SignedEnvelope`:

* ``header``: the canonical protobuf bytes of a :class:`~diredi_secure.envelope.PacketHeader`,
  signed as sent and never re-serialised by the receiver;
* ``enc``, ``ciphertext``: HPKE (RFC 9180, base mode) of the safetensors payload to the cloud's
  inbox key, with the header bytes as the HPKE ``info``, so a ciphertext cannot be moved under
  another header;
* ``signature``: Ed25519 by the device key over :func:`signed_transcript`. Wire version 1 (the
  envelope's ``envelope_version``): a domain tag, then header, enc and ciphertext, each
  length-prefixed. Wire version 2: another domain tag, header and enc as in 1, then the ciphertext's
  length and its SHA-256 instead of its bytes, so verifying a 1 MiB packet runs Ed25519 over a few
  hundred bytes and the receiver can hash the ciphertext as it streams in
  (:class:`~diredi_secure.serde.CiphertextHasher`). The two tags differ, so a signature made for
  one version never verifies as the other (a relabelled packet is ``SignatureInvalid``). Which
  versions the cloud accepts is ``PacketPolicy.accepted_wire_versions``; devices seal version 2.

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
from .device_identities import VerifiedIdentities
from .envelope import (
    ENVELOPE_VERSION,
    FORMAT_VERSION,
    CiphertextDigest,
    PacketHeader,
    ReceiptBody,
    SignedEnvelope,
)
from .errors import (
    CertificateRevoked,
    HeaderMismatch,
    MalformedPacket,
    PolicyViolation,
    ReplayDetected,
    StalePacket,
    TooLarge,
    UnknownDevice,
    UnsupportedVersion,
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
    ciphertext_span,
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
    "packet_digest",
    "seal_packet",
    "signed_transcript",
    "verify_receipt",
]

_SIG_DOMAIN = b"diredi-packet-v1\x00"
_SIG_DOMAIN_V2 = b"diredi-packet-v2\x00"
_RECEIPT_DOMAIN = b"diredi-receipt-v1\x00"


def signed_transcript(
    header: bytes, enc: bytes, ciphertext: bytes, *, wire_version: int = ENVELOPE_VERSION
) -> bytes:
    """The exact bytes the device signs for a packet of ``wire_version``.

    Version 1: ``"diredi-packet-v1\\0" || u32 len(header) || header || u32 len(enc) || enc ||
    u64 len(ciphertext) || ciphertext``. Version 2: ``"diredi-packet-v2\\0" || u32 len(header) ||
    header || u32 len(enc) || enc || u64 len(ciphertext) || SHA-256(ciphertext)`` (big-endian
    lengths). Length prefixes make the split unambiguous (no bytes can migrate between fields);
    the tag separates the versions. Raises :class:`UnsupportedVersion` for another version.
    """
    if wire_version == 1:
        return _transcript_v1(header, enc, ciphertext)
    if wire_version == 2:
        return _transcript_v2(header, enc, len(ciphertext), sha256(ciphertext))
    raise UnsupportedVersion(f"wire version {wire_version} has no signed transcript")


def _transcript_v1(header: bytes, enc: bytes, ciphertext: bytes) -> bytes:
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


def _transcript_v2(
    header: bytes, enc: bytes, ciphertext_length: int, ciphertext_sha256: bytes
) -> bytes:
    return b"".join(
        (
            _SIG_DOMAIN_V2,
            struct.pack(">I", len(header)),
            header,
            struct.pack(">I", len(enc)),
            enc,
            struct.pack(">Q", ciphertext_length),
            ciphertext_sha256,
        )
    )


def _envelope_transcript(env: SignedEnvelope, hint: CiphertextDigest | None = None) -> bytes:
    """:func:`signed_transcript` of a parsed envelope; for version 2 the ciphertext is hashed
    here unless ``hint`` (the receiver's own digest, taken as the bytes arrived) describes exactly
    this envelope's ciphertext field."""
    if env.envelope_version == 1:
        return _transcript_v1(env.header, env.enc, env.ciphertext)
    if env.envelope_version == 2:
        if hint is not None and (hint.offset, hint.length) == ciphertext_span(env):
            digest = hint.sha256
        else:
            digest = sha256(env.ciphertext)
        return _transcript_v2(env.header, env.enc, len(env.ciphertext), digest)
    raise UnsupportedVersion(f"envelope version {env.envelope_version} has no signed transcript")


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
    wire_version: int = ENVELOPE_VERSION,
) -> SealedPacket:
    """Encode, encrypt to ``inbox`` and sign ``payload``; returns the packet bytes and header.

    ``random_bytes(n)`` supplies the 128-bit packet id (pass ``os.urandom`` in production, a seeded
    generator in tests); ``now_ms`` is the creation time. ``wire_version`` 2 (the default) signs
    the ciphertext's digest, 1 the ciphertext itself (for a cloud that has not yet accepted 2).
    Raises :class:`TooLarge` if the payload exceeds ``limits`` (the cloud would refuse it anyway),
    :class:`UnsupportedVersion` for an unknown ``wire_version``.
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
    signature = sign(
        device_key, signed_transcript(header_bytes, enc, ciphertext, wire_version=wire_version)
    )
    data = envelope_to_bytes(
        SignedEnvelope(
            envelope_version=wire_version,
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
_DIGEST_DOMAIN_V2 = b"diredi-packet-digest-v2\x00"


def packet_digest(
    data: bytes,
    limits: Limits = DEFAULT_LIMITS,
    *,
    ciphertext_digest: CiphertextDigest | None = None,
) -> bytes:
    """The packet's identity for idempotency, receipts and attestations: SHA-256 over what the
    device signed and its signature, *not* the optional attached certificate (which no signature
    covers). A copy with the certificate stripped or swapped has the same digest, so it cannot take
    the genuine packet's place (issue 14 finding 8). Raises like :func:`inspect_packet`.

    Wire version 1: ``SHA-256("diredi-packet-digest-v1\\0" || u32 len(sig) || sig ||
    transcript_v1)``. Wire version 2: the same with tag ``"diredi-packet-digest-v2\\0"`` over
    ``transcript_v2``, which holds SHA-256(ciphertext): it binds every signed byte (the ciphertext
    through its digest) without a second pass over the ciphertext. ``ciphertext_digest``: the
    receiver's own digest of the ciphertext (see :func:`open_packet`).
    """
    env = envelope_from_bytes(data, limits)
    return _digest(env, _envelope_transcript(env, ciphertext_digest))


def _digest(env: SignedEnvelope, transcript: bytes) -> bytes:
    domain = _DIGEST_DOMAIN if env.envelope_version == 1 else _DIGEST_DOMAIN_V2
    return sha256(
        b"".join((domain, struct.pack(">I", len(env.signature)), env.signature, transcript))
    )


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
    ciphertext_digest: CiphertextDigest | None,
    identities: VerifiedIdentities | None = None,
) -> tuple[DeviceIdentity, DeviceRecord, bytes]:
    """The device's identity and record, and the transcript its signature verified over."""
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
    # The enrolled certificate, checked against the CA once per certificate when a cache is given.
    check = identities.check if identities is not None else check_device_certificate
    identity = check(
        record.certificate_der, device_ca, now_ms=now_ms, max_bytes=limits.max_certificate_bytes
    )
    if identity.device_id != header.device_id:
        raise HeaderMismatch(
            f"certificate names device {identity.device_id}, header {header.device_id}"
        )
    if identity.public_key.key_id != header.signer_key_id:
        raise HeaderMismatch("header signer key id differs from the device certificate's key")
    # Hashed only here, once the device and its certificate checked out (v2: one pass, or none
    # when the receiver hashed while receiving).
    transcript = _envelope_transcript(env, ciphertext_digest)
    verify_signature(identity.public_key, env.signature, transcript)
    return identity, record, transcript


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
    ciphertext_digest: CiphertextDigest | None = None,
    identities: VerifiedIdentities | None = None,
    inbox_key_id: bytes | None = None,
) -> OpenedPacket:
    """Verify, decrypt and validate an untrusted packet. Changes no state.

    ``identities`` (trusted): a cache of verified enrolled certificates for ``device_ca``, so a
    certificate is checked against the CA once, not per packet. ``inbox_key_id`` (trusted):
    ``inbox_key.key_id`` computed once by the caller.

    Order: size cap; envelope parse; wire version against ``policy.accepted_wire_versions`` (a
    retired version is ``PolicyViolation`` reason ``wire_version_retired``); header parse
    (versions, suite); declared sizes (before any
    decryption); recipient key; device enrolment, revocation and certificate (checked once); signature; policy
    (suite, clock window, DP declaration, base model); replay; HPKE open; payload decode
    (safetensors only; dtype, shape, finiteness, norm bound). Raises the first failure as a
    :class:`~diredi_secure.errors.DirediError` subclass naming it.

    Trusted inputs: ``inbox_key``, ``device_ca`` (DER), ``devices``, ``replay``, ``now_ms``, and
    ``ciphertext_digest``: SHA-256 of the ciphertext field as *this receiver* computed it while the
    bytes arrived (:class:`~diredi_secure.serde.CiphertextHasher`), used for a version-2 packet only
    if its span is exactly the parsed ciphertext's (else the ciphertext is hashed here).
    """
    if len(data) > limits.max_packet_bytes:
        raise TooLarge("packet", len(data), limits.max_packet_bytes)
    env = envelope_from_bytes(data, limits)
    if env.envelope_version not in policy.accepted_wire_versions:
        # Before any signature or decryption work: a device cannot downgrade to a retired version.
        raise PolicyViolation(
            f"wire version {env.envelope_version} is retired by policy (accepted: "
            f"{', '.join(str(v) for v in sorted(policy.accepted_wire_versions))})",
            reason="wire_version_retired",
        )
    header = header_from_bytes(env.header, limits)
    _check_structure(
        env, header, inbox_key.key_id if inbox_key_id is None else inbox_key_id, limits
    )
    identity, record, transcript = _authenticate_device(
        env,
        header,
        device_ca=device_ca,
        devices=devices,
        now_ms=now_ms,
        limits=limits,
        ciphertext_digest=ciphertext_digest,
        identities=identities,
    )
    cost = _check_policy(header, policy, now_ms)
    if record.rdp_spent is not None and record.epsilon_budget is not None:
        # Early refusal of an exhausted budget; the store re-checks inside its transaction.
        charge(
            device_id=header.device_id,
            spent_curve=record.rdp_spent,
            packet_curve=cost.curve,
            budget=record.epsilon_budget,
            policy=policy.dp,
            floor=record.epsilon_floor,
        )
    _check_replay(replay, header.device_id, header.packet_id, header.counter)
    plaintext = hpke_open(header.suite, inbox_key, env.enc, env.ciphertext, info=env.header)
    payload = decode_payload(
        plaintext, header.payload, limits, max_l2_norm=policy.max_entry_l2_norm
    )
    return OpenedPacket(
        header=header,
        payload=payload,
        device=identity,
        packet_sha256=_digest(env, transcript),
        charge=cost,
    )


# ------------------------------------------------------------------------------------------------
# Receipts
# ------------------------------------------------------------------------------------------------
def make_receipt(
    receipt_key: SigningKey,
    opened: OpenedPacket,
    *,
    stored_at_ms: int,
    receipt_key_id: bytes | None = None,
) -> bytes:
    """The cloud's signed receipt for a stored packet (deterministic: same inputs, same bytes).

    ``receipt_key_id``: ``receipt_key.key_id`` computed once by the caller (trusted)."""
    body = receipt_body_to_bytes(
        ReceiptBody(
            format_version=FORMAT_VERSION,
            packet_id=opened.header.packet_id,
            packet_sha256=opened.packet_sha256,
            device_id=opened.header.device_id,
            counter=opened.header.counter,
            stored_at_ms=stored_at_ms,
            receipt_key_id=receipt_key.key_id if receipt_key_id is None else receipt_key_id,
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

"""Domain types of the wire envelope: packet header, signed envelope, receipt body.

Frozen dataclasses that validate in their constructor; :mod:`diredi_secure.serde` is the only place
that converts them to and from protobuf messages. A header that fails validation raises
:class:`~diredi_secure.errors.MalformedPacket` (when parsed from the wire) or the same error for a
caller building a bad one (the message names the field).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._crypto import HpkeSuite
from .errors import MalformedPacket
from .knowledge import DPParameters, PayloadDescriptor, shown
from .policy import WIRE_VERSIONS

__all__ = [
    "ENVELOPE_VERSION",
    "ENVELOPE_VERSIONS",
    "FORMAT_VERSION",
    "CiphertextDigest",
    "PacketHeader",
    "ReceiptBody",
    "SignedEnvelope",
]

FORMAT_VERSION = 1
"""Version of :class:`PacketHeader` and :class:`ReceiptBody` (the same in both wire versions)."""
ENVELOPE_VERSIONS = WIRE_VERSIONS
"""Every :class:`SignedEnvelope` version this build parses; each names its signature transcript
(``packet.signed_transcript``): 1 signs the ciphertext itself, 2 its SHA-256."""
ENVELOPE_VERSION = 2
"""The version this build seals (devices emit it by default)."""

_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_COUNTER = 2**63 - 1
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise MalformedPacket(message)


@dataclass(frozen=True)
class PacketHeader:
    """Everything a packet declares in the clear (signed, and bound into the HPKE ``info``)."""

    format_version: int
    suite: HpkeSuite
    packet_id: bytes
    device_id: str
    counter: int
    created_at_ms: int
    base_model_version: str
    payload: PayloadDescriptor
    dp: DPParameters
    recipient_key_id: bytes
    signer_key_id: bytes

    def __post_init__(self) -> None:
        _require(
            len(self.packet_id) == 16, f"packet id must be 16 bytes, got {len(self.packet_id)}"
        )
        _require(bool(_DEVICE_ID_RE.fullmatch(self.device_id)), f"bad device id {shown(self.device_id)}")
        # Stores keep counters in a signed 64-bit column: refuse larger ones here, as malformed,
        # before any open or accounting work (issue 14 finding 6).
        _require(
            1 <= self.counter <= _MAX_COUNTER, f"counter must lie in 1..2^63-1, got {self.counter}"
        )
        _require(self.created_at_ms > 0, "created_at must be a positive Unix time in ms")
        _require(
            bool(_VERSION_RE.fullmatch(self.base_model_version)),
            f"bad base model version {shown(self.base_model_version)}",
        )
        _require(len(self.recipient_key_id) == 32, "recipient key id must be 32 bytes")
        _require(len(self.signer_key_id) == 32, "signer key id must be 32 bytes")


@dataclass(frozen=True)
class SignedEnvelope:
    """The outer message: exact header bytes, HPKE ``enc`` and ciphertext, device signature."""

    envelope_version: int
    header: bytes
    enc: bytes
    ciphertext: bytes
    signature: bytes
    device_certificate: bytes = b""


@dataclass(frozen=True)
class ReceiptBody:
    """What the cloud's receipt asserts: this exact packet is durably stored."""

    format_version: int
    packet_id: bytes
    packet_sha256: bytes
    device_id: str
    counter: int
    stored_at_ms: int
    receipt_key_id: bytes

    def __post_init__(self) -> None:
        _require(len(self.packet_id) == 16, "receipt packet id must be 16 bytes")
        _require(len(self.packet_sha256) == 32, "receipt packet digest must be 32 bytes")
        _require(len(self.receipt_key_id) == 32, "receipt key id must be 32 bytes")
        _require(bool(_DEVICE_ID_RE.fullmatch(self.device_id)), f"bad device id {shown(self.device_id)}")


@dataclass(frozen=True)
class CiphertextDigest:
    """SHA-256 of a packet's ciphertext field, computed by the *receiver* while the packet bytes
    arrived (``serde.CiphertextHasher``), with where in those bytes the field lay.

    Not from the peer: our own code's claim about bytes the peer sent. ``packet.open_packet`` uses
    it only when the parsed envelope puts its ciphertext exactly at ``offset``/``length``, and
    otherwise hashes the ciphertext itself.
    """

    offset: int
    length: int
    sha256: bytes

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length < 0 or len(self.sha256) != 32:
            raise ValueError("a ciphertext digest has a non-negative span and 32 bytes of SHA-256")

"""The only module that touches protobuf message classes: wire bytes <-> domain dataclasses.

Parsing is strict: input over its cap is refused before parsing, bytes must decode, and must be the
*canonical* (deterministic) encoding of what they decode to, with no fields this version does not
know. That rejects unknown fields, duplicated fields and padded varints, so one header has exactly
one byte string -- the one that was signed. (A new field means a new format version.)
Versions are checked here; every failure is a typed :class:`~diredi_secure.errors.PeerError`.
"""

from __future__ import annotations

import hashlib
from typing import TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from ._crypto import suite_from_wire
from ._proto.diredi.v1 import packet_pb2 as pb
from .envelope import (
    ENVELOPE_VERSIONS,
    FORMAT_VERSION,
    CiphertextDigest,
    PacketHeader,
    ReceiptBody,
    SignedEnvelope,
)
from .errors import MalformedPacket, PayloadInvalid, TooLarge, UnsupportedVersion
from .knowledge import (
    DPParameters,
    PayloadDescriptor,
    PayloadEntry,
    PayloadKind,
    WireDType,
    shown,
)
from .policy import DEFAULT_LIMITS, Limits

__all__ = [
    "CiphertextHasher",
    "ciphertext_span",
    "dp_from_proto",
    "dp_to_proto",
    "envelope_from_bytes",
    "envelope_to_bytes",
    "header_from_bytes",
    "header_to_bytes",
    "receipt_body_from_bytes",
    "receipt_body_to_bytes",
    "receipt_from_bytes",
    "receipt_to_bytes",
]

_KIND_TO_PB = {
    PayloadKind.REFERENCE_LOGITS: pb.PAYLOAD_KIND_REFERENCE_LOGITS,
    PayloadKind.WEIGHT_DELTA: pb.PAYLOAD_KIND_WEIGHT_DELTA,
    PayloadKind.LABEL_HISTOGRAM: pb.PAYLOAD_KIND_LABEL_HISTOGRAM,
    PayloadKind.DP_PROTOTYPES: pb.PAYLOAD_KIND_DP_PROTOTYPES,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}
_DTYPE_TO_PB: dict[str, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "int8": pb.DTYPE_INT8,
    "int4": pb.DTYPE_INT4,
}
_DTYPE_FROM_PB: dict[int, WireDType] = {
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_INT8: "int8",
    pb.DTYPE_INT4: "int4",
}

M = TypeVar("M", bound=Message)


def _parse(cls: type[M], data: bytes, what: str, cap: int) -> M:
    if len(data) > cap:
        raise TooLarge(what, len(data), cap)
    if not data:
        raise MalformedPacket(f"{what} is empty")
    msg = cls()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise MalformedPacket(f"{what} does not decode as protobuf") from exc
    if _has_unknown_fields(msg):
        raise MalformedPacket(f"{what} carries fields this version does not know")
    if msg.SerializeToString(deterministic=True) != data:
        raise MalformedPacket(
            f"{what} is not in canonical encoding: {_canonical_fault(_descriptor(msg), data)}"
        )
    return msg


# Why refuse rather than re-serialise: the signature is over the bytes as sent and the receipt keys
# on the digest of those bytes, so a second encoding of the same header would be a second packet.
# The canonical form (docs/WIRE.md, "Canonical encoding") is protobuf's deterministic encoding:
# fields in ascending number, each once (repeated scalars packed in one run), fields at their
# default value omitted, minimal varints. Everything below only *names* which rule the bytes broke,
# for a second implementation's author; the check itself is the byte comparison above. It runs
# after a successful parse (so lengths are in bounds and nesting is as deep as the schema).
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_FD = FieldDescriptor
_VARINT_TYPES = {
    _FD.TYPE_INT32, _FD.TYPE_INT64, _FD.TYPE_UINT32, _FD.TYPE_UINT64, _FD.TYPE_SINT32,
    _FD.TYPE_SINT64, _FD.TYPE_BOOL, _FD.TYPE_ENUM,
}  # fmt: skip
_LEN_TYPES = {_FD.TYPE_STRING, _FD.TYPE_BYTES, _FD.TYPE_MESSAGE}


def _descriptor(msg: Message) -> Descriptor:
    desc: Descriptor = msg.DESCRIPTOR  # type: ignore[assignment]  # upb's class has the same API
    return desc


def _read_varint(data: bytes, pos: int) -> tuple[int, int, bool]:
    """Return (value, next position, minimal?) of the varint at ``pos``."""
    value = shift = 0
    start = pos
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return value, pos, pos - start == max(1, (value.bit_length() + 6) // 7)


def _canonical_fault(desc: Descriptor, data: bytes, path: str = "") -> str:
    """Name the first canonical-encoding rule ``data`` (which parsed as ``desc``) breaks, or ''."""
    pos, last = 0, 0
    while pos < len(data):
        key, pos, minimal = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        fd = desc.fields_by_number[number]  # parsed without unknown fields: every number is known
        name = f"field {number} ({path}{fd.name})"
        packed = fd.is_repeated and fd.type not in _LEN_TYPES  # proto3 packs repeated scalars
        if not minimal:
            return f"padded varint in the tag of {name}"
        if number < last:
            return f"fields out of order ({name} after field {last})"
        if number == last and not fd.is_repeated:
            return f"{name} repeated"
        if packed and wire_type != _LEN:
            return f"repeated {name} not packed"
        if number == last and packed:
            return f"packed {name} split into several runs"
        last = number
        if wire_type == _VARINT:
            value, pos, minimal = _read_varint(data, pos)
            if not minimal:
                return f"padded varint in {name}"
            if value == 0 and not fd.has_presence:
                return f"default-valued {name} present"
            continue
        if wire_type in (_I64, _I32):
            width = 8 if wire_type == _I64 else 4
            # All-zero bits: +0.0 or a zero fixed-width integer, the default (-0.0 is a value).
            if not fd.has_presence and not any(data[pos : pos + width]):
                return f"default-valued {name} present"
            pos += width
            continue
        length, pos, minimal = _read_varint(data, pos)
        body, pos = data[pos : pos + length], pos + length
        if not minimal:
            return f"padded varint in the length of {name}"
        if fd.message_type is not None:
            # An empty sub-message is kept: message fields have presence, so b"" is a value.
            fault = _canonical_fault(fd.message_type, body, f"{path}{fd.name}.")
            if fault:
                return fault
        elif not body and not fd.has_presence:
            return f"{'empty packed' if packed else 'default-valued'} {name} present"
        elif packed and fd.type in _VARINT_TYPES:
            at = 0
            while at < len(body):
                _, at, minimal = _read_varint(body, at)
                if not minimal:
                    return f"padded varint in {name}"
    return "" if path else "encoding differs from the deterministic one"


def _has_unknown_fields(msg: Message) -> bool:
    if len(UnknownFieldSet(msg)):
        return True
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        items = value if fd.is_repeated else [value]
        if any(_has_unknown_fields(item) for item in items):
            return True
    return False


def _ser(msg: Message) -> bytes:
    return msg.SerializeToString(deterministic=True)


# -- DP parameters ------------------------------------------------------------------------------
def dp_to_proto(dp: DPParameters) -> pb.DPParameters:
    return pb.DPParameters(
        noise_multiplier=dp.noise_multiplier,
        clip_norm=dp.clip_norm,
        sample_rate=dp.sample_rate,
        steps=dp.steps,
        accountant=dp.accountant,
        epsilon=dp.epsilon,
        delta=dp.delta,
        poisson_sampling=dp.poisson_sampling,
        total_epsilon=dp.total_epsilon,
        noise_seeded=dp.noise_seeded,
    )


def dp_from_proto(msg: pb.DPParameters) -> DPParameters:
    try:
        return DPParameters(
            noise_multiplier=msg.noise_multiplier,
            clip_norm=msg.clip_norm,
            sample_rate=msg.sample_rate,
            steps=int(msg.steps),
            accountant=msg.accountant,
            epsilon=msg.epsilon,
            delta=msg.delta,
            poisson_sampling=msg.poisson_sampling,
            total_epsilon=msg.total_epsilon,
            noise_seeded=msg.noise_seeded,
        )
    except PayloadInvalid as exc:
        raise MalformedPacket(f"header DP parameters: {exc.message}") from exc


# -- header -------------------------------------------------------------------------------------
def header_to_bytes(header: PacketHeader) -> bytes:
    entries = [
        pb.PayloadEntry(
            name=e.name,
            kind=_KIND_TO_PB[e.kind],
            dtype=_DTYPE_TO_PB[e.dtype],  # type: ignore[arg-type]
            shape=list(e.shape),
            scale=e.scale,
            noise_multiplier=e.noise_multiplier,
            epsilon=e.epsilon,
            index_length=e.index_length,
        )
        for e in header.payload.entries
    ]
    msg = pb.PacketHeader(
        format_version=header.format_version,
        suite=int(header.suite),  # type: ignore[arg-type]
        packet_id=header.packet_id,
        device_id=header.device_id,
        counter=header.counter,
        created_at_ms=header.created_at_ms,
        base_model_version=header.base_model_version,
        payload=pb.PayloadDescriptor(
            entries=entries, length=header.payload.length, sha256=header.payload.sha256
        ),
        dp=dp_to_proto(header.dp),
        recipient_key_id=header.recipient_key_id,
        signer_key_id=header.signer_key_id,
    )
    return _ser(msg)


def header_from_bytes(data: bytes, limits: Limits = DEFAULT_LIMITS) -> PacketHeader:
    """Parse and validate header bytes (untrusted). Raises a :class:`PeerError` subclass."""
    msg = _parse(pb.PacketHeader, data, "packet header", limits.max_header_bytes)
    if msg.format_version != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"packet format version {msg.format_version} (this build speaks {FORMAT_VERSION})"
        )
    suite = suite_from_wire(int(msg.suite))
    entries = []
    for e in msg.payload.entries:
        if e.kind not in _KIND_FROM_PB:
            raise MalformedPacket(f"payload entry {shown(e.name)}: unknown kind {e.kind}")
        if e.dtype not in _DTYPE_FROM_PB:
            raise MalformedPacket(f"payload entry {shown(e.name)}: unknown dtype {e.dtype}")
        entries.append(
            PayloadEntry(
                name=e.name,
                kind=_KIND_FROM_PB[e.kind],
                dtype=_DTYPE_FROM_PB[e.dtype],
                shape=tuple(int(d) for d in e.shape),
                scale=e.scale,
                noise_multiplier=e.noise_multiplier,
                epsilon=e.epsilon,
                index_length=int(e.index_length),
            )
        )
    descriptor = PayloadDescriptor(
        entries=tuple(entries), length=int(msg.payload.length), sha256=bytes(msg.payload.sha256)
    )
    return PacketHeader(
        format_version=msg.format_version,
        suite=suite,
        packet_id=bytes(msg.packet_id),
        device_id=msg.device_id,
        counter=int(msg.counter),
        created_at_ms=int(msg.created_at_ms),
        base_model_version=msg.base_model_version,
        payload=descriptor,
        dp=dp_from_proto(msg.dp),
        recipient_key_id=bytes(msg.recipient_key_id),
        signer_key_id=bytes(msg.signer_key_id),
    )


# -- envelope -----------------------------------------------------------------------------------
def envelope_to_bytes(env: SignedEnvelope) -> bytes:
    return _ser(
        pb.SignedPacket(
            envelope_version=env.envelope_version,
            header=env.header,
            enc=env.enc,
            ciphertext=env.ciphertext,
            signature=env.signature,
            device_certificate=env.device_certificate,
        )
    )


def envelope_from_bytes(data: bytes, limits: Limits = DEFAULT_LIMITS) -> SignedEnvelope:
    """Parse the outer envelope (untrusted), checking each field's cap before anything else."""
    msg = _parse(pb.SignedPacket, data, "signed packet", limits.max_packet_bytes)
    if msg.envelope_version not in ENVELOPE_VERSIONS:
        raise UnsupportedVersion(
            f"envelope version {msg.envelope_version} (this build speaks "
            f"{', '.join(str(v) for v in sorted(ENVELOPE_VERSIONS))})"
        )
    for name, cap in (
        ("header", limits.max_header_bytes),
        ("enc", limits.max_enc_bytes),
        ("signature", limits.max_signature_bytes),
        ("device_certificate", limits.max_certificate_bytes),
    ):
        size = len(getattr(msg, name))
        if size > cap:
            raise TooLarge(f"packet {name}", size, cap)
    if not msg.header or not msg.signature or not msg.enc:
        raise MalformedPacket("signed packet lacks a header, an enc or a signature")
    return SignedEnvelope(
        envelope_version=msg.envelope_version,
        header=bytes(msg.header),
        enc=bytes(msg.enc),
        ciphertext=bytes(msg.ciphertext),
        signature=bytes(msg.signature),
        device_certificate=bytes(msg.device_certificate),
    )


# -- where the ciphertext lies (wire version 2 signs its digest) ---------------------------------
# SignedPacket holds only varint (version) and length-delimited (bytes) fields, and a parsed
# envelope is canonical (fields once each, ascending, minimal varints, defaults omitted), so the
# ciphertext's position follows from the lengths of the fields before it (version, header and enc
# are numbered below it; tests/unit/test_wire_v2.py pins that).
_ENVELOPE_FIELDS = {fd.name: fd.number for fd in pb.SignedPacket.DESCRIPTOR.fields}
_CIPHERTEXT_FIELD = _ENVELOPE_FIELDS["ciphertext"]
_WIRE_VARINT, _WIRE_LEN = 0, 2
_MAX_VARINT_BYTES = 10


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def ciphertext_span(env: SignedEnvelope) -> tuple[int, int]:
    """``(offset, length)`` of ``env.ciphertext`` inside the bytes ``env`` was parsed from.

    Exact for every envelope :func:`envelope_from_bytes` returns (those bytes are the canonical
    encoding); used to check that a :class:`CiphertextDigest` describes this very field.
    """
    offset = 0
    if env.envelope_version:
        offset += _varint_size(_ENVELOPE_FIELDS["envelope_version"] << 3)
        offset += _varint_size(env.envelope_version)
    for name, value in (("header", env.header), ("enc", env.enc)):
        if value:
            offset += _varint_size(_ENVELOPE_FIELDS[name] << 3) + _varint_size(len(value))
            offset += len(value)
    if env.ciphertext:
        offset += _varint_size(_CIPHERTEXT_FIELD << 3) + _varint_size(len(env.ciphertext))
    return offset, len(env.ciphertext)


class CiphertextHasher:
    """Feed it SignedPacket bytes as they arrive: it hashes the ciphertext field on the way, so a
    streamed wire-version-2 packet needs no second pass over its largest field.

    It reads only the outer framing (tags, varints, lengths; a few dozen bytes per packet) and
    passes field contents through as slices. Untrusted input cannot make it allocate: a declared
    length is skipped, not buffered. Input it does not expect (another wire type, a second
    ciphertext field, a varint over 10 bytes, a stream that stops inside a field) makes
    :meth:`result` ``None``; the receiver then hashes the parsed ciphertext itself, and the parse
    refuses what is not a canonical envelope anyway. The result is a claim of this code about
    these bytes: ``open_packet`` uses it only where :func:`ciphertext_span` agrees.
    """

    def __init__(self) -> None:
        self._consumed = 0  # bytes of earlier updates
        self._varint = bytearray()
        self._expect = "key"  # "key" | "varint" | "length"
        self._field = 0
        self._skip = 0  # content bytes of the current field still to pass
        self._hashing = False
        self._hash = hashlib.sha256()
        self._span: tuple[int, int] | None = None
        self._failed = False

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk)
        size, i = len(view), 0
        while i < size and not self._failed:
            if self._skip:
                take = min(self._skip, size - i)
                if self._hashing:
                    self._hash.update(view[i : i + take])
                self._skip -= take
                i += take
                self._hashing = self._hashing and self._skip > 0
                continue
            byte = view[i]
            i += 1
            self._varint.append(byte)
            if byte & 0x80:
                if len(self._varint) >= _MAX_VARINT_BYTES:
                    self._failed = True
                continue
            value = _varint_value(self._varint)
            self._varint.clear()
            self._on_varint(value, self._consumed + i)
        self._consumed += size

    def _on_varint(self, value: int, position: int) -> None:
        if self._expect == "key":
            self._field, wire_type = value >> 3, value & 7
            if wire_type == _WIRE_VARINT:
                self._expect = "varint"
            elif wire_type == _WIRE_LEN:
                self._expect = "length"
            else:
                self._failed = True
        elif self._expect == "varint":
            self._expect = "key"
        else:
            self._expect = "key"
            self._skip = value
            if self._field == _CIPHERTEXT_FIELD:
                if self._span is not None:
                    self._failed = True
                    return
                self._span = (position, value)
                self._hashing = value > 0

    def result(self) -> CiphertextDigest | None:
        """The ciphertext's digest and where it lay, or ``None`` (see the class docstring)."""
        if self._failed or self._span is None or self._skip or self._varint:
            return None
        if self._expect != "key":
            return None
        return CiphertextDigest(
            offset=self._span[0], length=self._span[1], sha256=self._hash.copy().digest()
        )


def _varint_value(data: bytes | bytearray) -> int:
    value = 0
    for shift, byte in enumerate(data):
        value |= (byte & 0x7F) << (7 * shift)
    return value


# -- receipts -----------------------------------------------------------------------------------
def receipt_body_to_bytes(body: ReceiptBody) -> bytes:
    return _ser(
        pb.ReceiptBody(
            format_version=body.format_version,
            packet_id=body.packet_id,
            packet_sha256=body.packet_sha256,
            device_id=body.device_id,
            counter=body.counter,
            stored_at_ms=body.stored_at_ms,
            receipt_key_id=body.receipt_key_id,
        )
    )


def receipt_body_from_bytes(data: bytes) -> ReceiptBody:
    msg = _parse(pb.ReceiptBody, data, "receipt body", 4096)
    if msg.format_version != FORMAT_VERSION:
        raise UnsupportedVersion(f"receipt format version {msg.format_version}")
    return ReceiptBody(
        format_version=msg.format_version,
        packet_id=bytes(msg.packet_id),
        packet_sha256=bytes(msg.packet_sha256),
        device_id=msg.device_id,
        counter=int(msg.counter),
        stored_at_ms=int(msg.stored_at_ms),
        receipt_key_id=bytes(msg.receipt_key_id),
    )


def receipt_to_bytes(body_bytes: bytes, signature: bytes) -> bytes:
    return _ser(pb.Receipt(body=body_bytes, signature=signature))


def receipt_from_bytes(data: bytes) -> tuple[bytes, bytes]:
    """Split a serialised Receipt into ``(body_bytes, signature)`` (not yet verified)."""
    msg = _parse(pb.Receipt, data, "receipt", 8192)
    return bytes(msg.body), bytes(msg.signature)

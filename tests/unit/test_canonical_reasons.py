"""The canonical-encoding check names the rule a header breaks (docs/WIRE.md, "Canonical encoding").

Each case builds a header byte string by hand, one protobuf field at a time, the way another
language's encoder might, and checks both that it is refused and that the reason says why. The
accepted case is the same fields encoded canonically, so every refusal is about the encoding alone.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diredi_secure._proto.diredi.v1 import packet_pb2 as pb
from diredi_secure.errors import MalformedPacket
from diredi_secure.serde import envelope_from_bytes, header_from_bytes, receipt_body_from_bytes


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _len(number: int, body: bytes) -> bytes:
    return _key(number, 2) + _varint(len(body)) + body


def _uint(number: int, value: int) -> bytes:
    return _key(number, 0) + _varint(value)


def _double(number: int, value: float) -> bytes:
    return _key(number, 1) + struct.pack("<d", value)


# A payload entry and header, field by field, in ascending field number (canonical).
ENTRY = [
    _len(1, b"logits"),
    _uint(2, pb.PAYLOAD_KIND_REFERENCE_LOGITS),
    _uint(3, pb.DTYPE_FLOAT32),
    _len(4, _varint(4) + _varint(10)),  # shape [4, 10], packed
]
HEADER = {
    1: _uint(1, 1),
    2: _uint(2, 1),
    3: _len(3, bytes(range(16))),
    4: _len(4, b"device-a"),
    5: _uint(5, 7),
    6: _uint(6, 1_700_000_000_000),
    7: _len(7, b"m-1"),
    8: _len(8, _len(1, b"".join(ENTRY)) + _uint(2, 160)),
    10: _len(10, bytes(32)),
    11: _len(11, b"\x01" * 32),
}


def _header(**replace: bytes) -> bytes:
    fields = dict(HEADER)
    for name, data in replace.items():
        fields[int(name[1:])] = data
    return b"".join(fields[n] for n in sorted(fields))


def _entry_header(*entry: bytes) -> bytes:
    return _header(f8=_len(8, _len(1, b"".join(entry)) + _uint(2, 160)))


def test_hand_built_canonical_header_is_accepted() -> None:
    data = _header()
    msg = pb.PacketHeader.FromString(data)
    assert msg.SerializeToString(deterministic=True) == data
    assert header_from_bytes(data).counter == 7


CASES = {
    # What protobufjs writes for a proto3 field set explicitly to its default (counter: 0).
    "explicit zero varint": (_header(f5=_uint(5, 0)), "default-valued field 5 (counter) present"),
    "explicit empty string": (
        _header(f7=_len(7, b"")),
        "default-valued field 7 (base_model_version)",
    ),
    "explicit 0.0 double, nested": (
        _entry_header(*ENTRY, _double(5, 0.0)),
        "default-valued field 5 (payload.entries.scale) present",
    ),
    "explicit enum zero, nested": (
        _entry_header(ENTRY[0], _uint(2, 0), *ENTRY[2:]),
        "default-valued field 2 (payload.entries.kind) present",
    ),
    "empty packed repeated": (
        _entry_header(*ENTRY[:3], _len(4, b"")),
        "empty packed field 4 (payload.entries.shape) present",
    ),
    "fields out of order": (
        HEADER[1] + HEADER[2] + HEADER[4] + HEADER[3] + b"".join(HEADER[n] for n in (5, 6, 7, 8, 10, 11)),
        "fields out of order (field 3 (packet_id) after field 4)",
    ),
    # A singular field twice: protobuf keeps the later value, hiding the first from a reader.
    "singular field repeated": (
        b"".join(HEADER[n] for n in range(1, 5))
        + _uint(5, 6)
        + _uint(5, 7)
        + b"".join(HEADER[n] for n in (6, 7, 8, 10, 11)),
        "field 5 (counter) repeated",
    ),
    "repeated scalar not packed": (
        _entry_header(*ENTRY[:3], _uint(4, 4), _uint(4, 10)),
        "repeated field 4 (payload.entries.shape) not packed",
    ),
    "packed field split": (
        _entry_header(*ENTRY[:3], _len(4, _varint(4)), _len(4, _varint(10))),
        "packed field 4 (payload.entries.shape) split into several runs",
    ),
    "padded varint value": (
        _header(f5=_key(5, 0) + b"\x87\x00"),
        "padded varint in field 5 (counter)",
    ),
    "padded varint tag": (
        _header(f5=b"\xa8\x00" + _varint(7)),
        "padded varint in the tag of field 5 (counter)",
    ),
    "padded length": (
        _header(f4=_key(4, 2) + b"\x88\x00" + b"device-a"),
        "padded varint in the length of field 4 (device_id)",
    ),
    "padded packed element": (
        _entry_header(*ENTRY[:3], _len(4, b"\x84\x00" + _varint(10))),
        "padded varint in field 4 (payload.entries.shape)",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_non_canonical_header_is_refused_with_the_rule_it_breaks(case: str) -> None:
    data, reason = CASES[case]
    pb.PacketHeader.FromString(data)  # it does parse: only the encoding is wrong
    with pytest.raises(MalformedPacket) as err:
        header_from_bytes(data)
    assert str(err.value).startswith("packet header is not in canonical encoding: ")
    assert reason in str(err.value)


def test_unknown_field_keeps_its_own_reason() -> None:
    with pytest.raises(MalformedPacket, match="fields this version does not know"):
        header_from_bytes(_header() + _uint(127, 1))


def test_envelope_and_receipt_use_the_same_rules() -> None:
    envelope = _uint(1, 1) + _len(2, _header()) + _len(3, b"") + _len(4, b"ct")
    with pytest.raises(MalformedPacket, match=r"default-valued field 3 \(enc\) present"):
        envelope_from_bytes(envelope)
    body = _uint(1, 1) + _len(4, b"d") + _len(2, bytes(16))
    with pytest.raises(
        MalformedPacket, match=r"out of order \(field 2 \(packet_id\) after field 4"
    ):
        receipt_body_from_bytes(body)


def test_negative_zero_is_a_value_not_the_default() -> None:
    # -0.0 has a sign bit, so deterministic encoding writes it; it must not be called a default.
    data = _entry_header(*ENTRY, _double(5, -0.0))
    assert pb.PacketHeader.FromString(data).SerializeToString(deterministic=True) == data
    header_from_bytes(data)  # passes the encoding check (and -0.0 is a valid float scale)


@given(
    counter=st.integers(min_value=0, max_value=2**64 - 1),
    device=st.text(alphabet="abcdef-0123456789", max_size=20),
    shape=st.lists(st.integers(min_value=0, max_value=2**40), max_size=4),
)
def test_every_deterministic_encoding_passes_and_an_explicit_default_never_does(
    counter: int, device: str, shape: list[int]
) -> None:
    msg = pb.PacketHeader(format_version=1, suite=1, device_id=device, counter=counter)
    msg.payload.entries.add(name="x", shape=shape)
    data = msg.SerializeToString(deterministic=True)
    try:
        header_from_bytes(data)
    except MalformedPacket as exc:
        assert "canonical" not in str(exc)
    if counter == 0:
        # Insert an explicit counter=0 where it belongs (after field 4 or earlier ones).
        cut = len(msg.SerializeToString(deterministic=True)) - len(
            pb.PacketHeader(payload=msg.payload).SerializeToString(deterministic=True)
        )
        with pytest.raises(MalformedPacket, match=r"default-valued field 5 \(counter\)"):
            header_from_bytes(data[:cut] + _uint(5, 0) + data[cut:])

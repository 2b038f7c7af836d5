"""Known-answer tests: data files in this folder pin the wire format (see make_vectors.py)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from diredi_secure import _crypto
from diredi_secure.knowledge import encode_payload
from diredi_secure.packet import open_packet, packet_digest
from diredi_secure.serde import envelope_from_bytes, header_from_bytes

from ..conftest import NOW_MS, build_pki, make_payload

HERE = Path(__file__).parent
PACKETS = json.loads((HERE / "packets.json").read_text())["vectors"]
ED25519 = json.loads((HERE / "ed25519_rfc8032.json").read_text())["vectors"]


@pytest.mark.parametrize("v", ED25519, ids=lambda v: v["public"][:8])
def test_ed25519_rfc8032(v: dict[str, str]) -> None:
    key = _crypto.SigningKey.from_seed(bytes.fromhex(v["secret"]))
    assert key.public_key.raw.hex() == v["public"]
    assert _crypto.sign(key, bytes.fromhex(v["message"])).hex() == v["signature"]
    _crypto.verify_signature(
        _crypto.VerifyKey.from_raw(bytes.fromhex(v["public"])),
        bytes.fromhex(v["signature"]),
        bytes.fromhex(v["message"]),
    )


@pytest.mark.parametrize("v", PACKETS, ids=lambda v: v["file"])
def test_fixed_inputs_give_exactly_these_header_bytes(v: dict[str, object]) -> None:
    pki = build_pki()
    packet_id = bytes.fromhex(str(v["packet_id"]))
    sealed = pki.seal(
        "device-a",
        counter=int(v["counter"]),
        suite=_crypto.HpkeSuite(int(v["suite"])),  # type: ignore[call-overload]
        random_bytes=lambda n: packet_id,
        now_ms=int(v["now_ms"]),
        wire_version=int(v.get("wire_version", 1)),  # type: ignore[call-overload]
    )  # type: ignore[call-overload]
    assert envelope_from_bytes(sealed.data).header.hex() == v["header_hex"]
    _data, desc = encode_payload(make_payload())
    assert desc.sha256.hex() == v["payload_sha256"]


@pytest.mark.parametrize("v", PACKETS, ids=lambda v: v["file"])
def test_stored_packet_opens_to_exactly_this_header(v: dict[str, object]) -> None:
    pki = build_pki()
    data = (HERE / str(v["file"])).read_bytes()
    opened = open_packet(data, **pki.open_kwargs(now_ms=NOW_MS))  # type: ignore[arg-type]
    assert opened.header == header_from_bytes(bytes.fromhex(str(v["header_hex"])))
    assert opened.header.packet_id.hex() == v["packet_id"]
    assert opened.header.signer_key_id.hex() == v["signer_key_id"]
    assert opened.header.recipient_key_id.hex() == v["recipient_key_id"]
    expected = make_payload().tensors[0].values.astype(np.float16).astype(np.float32)
    assert np.array_equal(opened.payload.tensors[0].values, expected)


def _independent_transcript(version: int, header: bytes, enc: bytes, ciphertext: bytes) -> bytes:
    """The signed transcript written out again from docs/PROTOCOL.md, not from packet.py."""
    tail = ciphertext if version == 1 else hashlib.sha256(ciphertext).digest()
    return (
        b"diredi-packet-v%d\x00" % version
        + struct.pack(">I", len(header))
        + header
        + struct.pack(">I", len(enc))
        + enc
        + struct.pack(">Q", len(ciphertext))
        + tail
    )


@pytest.mark.parametrize("v", PACKETS, ids=lambda v: v["file"])
def test_signature_and_digest_follow_the_documented_transcript(v: dict[str, object]) -> None:
    pki = build_pki()
    data = (HERE / str(v["file"])).read_bytes()
    env = envelope_from_bytes(data)
    version = int(v.get("wire_version", 1))  # type: ignore[call-overload]
    assert env.envelope_version == version
    transcript = _independent_transcript(version, env.header, env.enc, env.ciphertext)
    key, _cert = pki.device_keys["device-a"]
    _crypto.verify_signature(key.public_key, env.signature, transcript)
    digest = hashlib.sha256(
        b"diredi-packet-digest-v%d\x00" % version
        + struct.pack(">I", len(env.signature))
        + env.signature
        + transcript
    ).digest()
    assert packet_digest(data) == digest
    if version == 2:
        assert hashlib.sha256(env.ciphertext).hexdigest() == v["ciphertext_sha256"]
        assert digest.hex() == v["packet_digest"]


def test_both_wire_versions_are_pinned() -> None:
    files = {str(v["file"]) for v in PACKETS}
    assert {f"packet_v{w}_suite{s}.bin" for w in (1, 2) for s in (1, 2, 3)} <= files

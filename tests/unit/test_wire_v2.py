"""Wire version 2: the transcript signs a digest of the ciphertext; the receiver hashes as bytes arrive."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diredi_secure._proto.diredi.v1 import packet_pb2 as pb
from diredi_secure.envelope import ENVELOPE_VERSION, CiphertextDigest
from diredi_secure.errors import ConfigError, UnsupportedVersion
from diredi_secure.packet import open_packet, packet_digest, signed_transcript
from diredi_secure.policy import PacketPolicy
from diredi_secure.serde import CiphertextHasher, ciphertext_span, envelope_from_bytes

from ..conftest import Pki, build_pki, make_payload

_PKI = build_pki()
_V2 = _PKI.seal("device-a", 1, payload=make_payload(n_ref=300))
_V1 = _PKI.seal("device-a", 2, wire_version=1)


def _hash_in_chunks(data: bytes, cuts: list[int]) -> CiphertextDigest | None:
    hasher = CiphertextHasher()
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        hasher.update(data[start:cut])
        start = cut
    return hasher.result()


def test_devices_seal_version_2_by_default() -> None:
    assert ENVELOPE_VERSION == 2
    assert envelope_from_bytes(_V2.data).envelope_version == 2
    assert envelope_from_bytes(_V1.data).envelope_version == 1


def test_ciphertext_follows_the_fields_it_is_located_by() -> None:
    numbers = {fd.name: fd.number for fd in pb.SignedPacket.DESCRIPTOR.fields}
    assert (
        max(numbers["envelope_version"], numbers["header"], numbers["enc"]) < numbers["ciphertext"]
    )


@pytest.mark.parametrize("sealed", [_V1, _V2], ids=["v1", "v2"])
def test_span_is_where_the_ciphertext_lies(sealed) -> None:  # type: ignore[no-untyped-def]
    env = envelope_from_bytes(sealed.data)
    offset, length = ciphertext_span(env)
    assert sealed.data[offset : offset + length] == env.ciphertext
    assert sealed.data.find(env.ciphertext) == offset


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(_V2.data)), max_size=12))
def test_hashing_in_any_chunking_gives_the_ciphertext_digest(cuts: list[int]) -> None:
    env = envelope_from_bytes(_V2.data)
    result = _hash_in_chunks(_V2.data, cuts)
    assert result is not None
    assert (result.offset, result.length) == ciphertext_span(env)
    assert result.sha256 == hashlib.sha256(env.ciphertext).digest()


@pytest.mark.parametrize(
    "data",
    [
        _V2.data[:-3],  # stream stopped inside the last field
        _V2.data[:40],  # stopped before the ciphertext
        b"\x0d\x00\x00\x00\x00" + _V2.data,  # a fixed32 field: not in SignedPacket
        b"\xff" * 11,  # a varint over 10 bytes
        _V2.data + _V2.data,  # a second ciphertext field
    ],
    ids=["truncated", "before-ciphertext", "wire-type-5", "long-varint", "two-ciphertexts"],
)
def test_unexpected_framing_gives_no_digest(data: bytes) -> None:
    assert _hash_in_chunks(data, [7, 100]) is None


def test_signed_transcript_of_an_unknown_version_is_refused() -> None:
    with pytest.raises(UnsupportedVersion):
        signed_transcript(b"h", b"e", b"c", wire_version=3)


def test_version_2_transcript_is_small_and_holds_the_ciphertext_digest() -> None:
    env = envelope_from_bytes(_V2.data)
    transcript = signed_transcript(env.header, env.enc, env.ciphertext, wire_version=2)
    assert hashlib.sha256(env.ciphertext).digest() in transcript
    assert env.ciphertext not in transcript
    assert len(transcript) == 17 + 4 + len(env.header) + 4 + len(env.enc) + 8 + 32


def test_digest_hint_gives_the_same_packet_and_the_same_digest(pki: Pki) -> None:
    hint = _hash_in_chunks(_V2.data, [1000])
    plain = open_packet(_V2.data, **pki.open_kwargs())  # type: ignore[arg-type]
    hinted = open_packet(_V2.data, ciphertext_digest=hint, **pki.open_kwargs())  # type: ignore[arg-type]
    assert plain.packet_sha256 == hinted.packet_sha256 == packet_digest(_V2.data)
    assert packet_digest(_V2.data, ciphertext_digest=hint) == plain.packet_sha256


def test_versions_have_distinct_digests_of_one_seal() -> None:
    # The same header, enc and ciphertext under the two transcripts never share a digest domain.
    env = envelope_from_bytes(_V2.data)
    assert (
        signed_transcript(env.header, env.enc, env.ciphertext, wire_version=1)[:17]
        != (signed_transcript(env.header, env.enc, env.ciphertext, wire_version=2)[:17])
    )


@pytest.mark.parametrize("versions", [frozenset(), frozenset({3}), frozenset({1, 2, 3})])
def test_policy_accepts_only_known_wire_versions(versions: frozenset[int]) -> None:
    with pytest.raises(ConfigError):
        PacketPolicy(accepted_wire_versions=versions)


def test_policy_accepts_both_versions_by_default() -> None:
    assert PacketPolicy().accepted_wire_versions == frozenset({1, 2})

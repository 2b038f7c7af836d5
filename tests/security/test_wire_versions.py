"""Attacks on the wire versions: altered v2 ciphertext, relabelled versions, downgrade, lying hints."""

from __future__ import annotations

import hashlib

import pytest

from diredi_secure.envelope import CiphertextDigest, SignedEnvelope
from diredi_secure.errors import PolicyViolation, SignatureInvalid, UnsupportedVersion
from diredi_secure.packet import open_packet
from diredi_secure.policy import PacketPolicy
from diredi_secure.serde import ciphertext_span, envelope_from_bytes, envelope_to_bytes

from ..conftest import Pki
from .test_packet_attacks import accept, refuse

RETIRE_V1 = PacketPolicy(accepted_wire_versions=frozenset({2}))


def _with(env: SignedEnvelope, **changes: object) -> bytes:
    fields = {**env.__dict__, **changes}
    return envelope_to_bytes(SignedEnvelope(**fields))  # type: ignore[arg-type]


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def test_v2_altered_ciphertext_is_a_bad_signature(pki: Pki) -> None:
    env = envelope_from_bytes(pki.seal().data)
    assert env.envelope_version == 2
    altered = _with(env, ciphertext=_flip_last_byte(env.ciphertext))  # same length: passes sizes
    refuse(pki, altered, SignatureInvalid)


def test_v2_altered_ciphertext_with_the_receivers_own_digest_of_it(pki: Pki) -> None:
    # The stream hashed what actually arrived: the digest is honest, the signature is not for it.
    env = envelope_from_bytes(pki.seal().data)
    altered = _with(env, ciphertext=_flip_last_byte(env.ciphertext))
    offset, length = ciphertext_span(envelope_from_bytes(altered))
    digest = hashlib.sha256(altered[offset : offset + length]).digest()
    refuse(
        pki, altered, SignatureInvalid, ciphertext_digest=CiphertextDigest(offset, length, digest)
    )


def test_a_digest_that_describes_other_bytes_is_not_used(pki: Pki) -> None:
    # A hint whose span is not this packet's ciphertext field is ignored: the ciphertext is hashed.
    good = pki.seal().data
    env = envelope_from_bytes(good)
    altered = _with(env, ciphertext=_flip_last_byte(env.ciphertext))
    offset, length = ciphertext_span(env)
    stale = CiphertextDigest(offset + 1, length, hashlib.sha256(env.ciphertext).digest())
    refuse(pki, altered, SignatureInvalid, ciphertext_digest=stale)


def test_v1_relabelled_v2_is_a_bad_signature(pki: Pki) -> None:
    env = envelope_from_bytes(pki.seal(wire_version=1).data)
    refuse(pki, _with(env, envelope_version=2), SignatureInvalid)


def test_v2_relabelled_v1_is_a_bad_signature(pki: Pki) -> None:
    env = envelope_from_bytes(pki.seal(wire_version=2).data)
    refuse(pki, _with(env, envelope_version=1), SignatureInvalid)


def test_unknown_wire_version_is_unsupported(pki: Pki) -> None:
    env = envelope_from_bytes(pki.seal().data)
    refuse(pki, _with(env, envelope_version=3), UnsupportedVersion)


def test_downgrade_to_a_retired_version_is_refused(pki: Pki) -> None:
    error = refuse(pki, pki.seal(wire_version=1).data, PolicyViolation, policy=RETIRE_V1)
    assert error.reason == "wire_version_retired"
    accept_v2 = open_packet(pki.seal(counter=2).data, policy=RETIRE_V1, **pki.open_kwargs())  # type: ignore[arg-type]
    assert accept_v2.header.counter == 2


def test_retired_version_is_refused_before_the_signature_is_checked(pki: Pki) -> None:
    env = envelope_from_bytes(pki.seal(wire_version=1).data)
    forged = _with(env, signature=b"\x00" * 64)
    error = refuse(pki, forged, PolicyViolation, policy=RETIRE_V1)
    assert error.reason == "wire_version_retired"


@pytest.mark.parametrize("version", [1, 2])
def test_both_versions_accepted_by_default(pki: Pki, version: int) -> None:
    accept(pki, pki.seal(counter=version, wire_version=version).data)

"""Attestations: Merkle root known answers, predicate round trip, envelope verification refusals."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner

from diredi_secure.errors import AttestationInvalid, ReleaseRefused, TooLarge
from diredi_secure.release.attest import (
    DSSE_PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    AuditVerdict,
    DeviceEpsilon,
    ReleasePredicate,
    merkle_root,
    sign_attestation,
    verify_attestation,
)

# RFC 6962 test tree (certificate-transparency merkle_tree_test): leaves and the roots of prefixes.
RFC6962_LEAVES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                  "606162636465666768696a6b6c6d6e6f"]  # fmt: skip
RFC6962_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
MODEL = b"model bytes"
DIGEST = hashlib.sha256(MODEL).hexdigest()


@pytest.mark.parametrize("n", range(1, 9))
def test_merkle_root_matches_rfc6962_vectors(n: int) -> None:
    leaves = [bytes.fromhex(x) for x in RFC6962_LEAVES[:n]]
    assert merkle_root(leaves).hex() == RFC6962_ROOTS[n - 1]


def test_merkle_root_of_nothing_is_the_empty_hash() -> None:
    assert merkle_root([]) == hashlib.sha256(b"").digest()


def _reference_root(leaves: list[bytes]) -> bytes:
    """Slow reference: hash level by level, promoting an odd last node (equivalent for RFC 6962)."""
    level = [hashlib.sha256(b"\x00" + leaf).digest() for leaf in leaves]
    if not level:
        return hashlib.sha256(b"").digest()
    while len(level) > 1:
        nxt = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
               for i in range(0, len(level) - 1, 2)]  # fmt: skip
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


@given(st.lists(st.binary(max_size=40), max_size=40))
def test_merkle_root_agrees_with_level_by_level_reference(leaves: list[bytes]) -> None:
    assert merkle_root(leaves) == _reference_root(leaves)


def _predicate(verdict: AuditVerdict = AuditVerdict.PASS, forced: bool = False) -> ReleasePredicate:
    return ReleasePredicate.build(
        release_version=3,
        parent_digest="ab" * 32,
        parent_version=2,
        packet_digests=[b"\x02" * 32, b"\x01" * 32],
        epsilon=[DeviceEpsilon("dev-b", 0.5, 2.0), DeviceEpsilon("dev-a", 1.0, 1.0)],
        accountant="rdp",
        audit_report_digest="cd" * 32,
        audit_verdict=verdict,
        audit_forced=forced,
        training_config_digest="ef" * 32,
        version="1.2.3",
    )


def test_predicate_round_trips_and_sorts_packet_digests() -> None:
    pred = _predicate()
    assert ReleasePredicate.from_dict(pred.to_dict()) == pred
    assert pred.packet_count == 2
    assert pred.packet_merkle_root == merkle_root([b"\x01" * 32, b"\x02" * 32]).hex()
    assert [e.device_id for e in pred.epsilon] == ["dev-a", "dev-b"]


def test_sign_then_verify_returns_the_statement() -> None:
    signer = CryptoSigner.generate_ed25519()
    envelope = sign_attestation("model.safetensors", MODEL, _predicate(), [signer])
    outer = json.loads(envelope)
    assert outer["payloadType"] == DSSE_PAYLOAD_TYPE
    statement = json.loads(base64.b64decode(outer["payload"]))
    assert statement["_type"] == STATEMENT_TYPE
    assert statement["predicateType"] == PREDICATE_TYPE
    assert statement["subject"] == [{"name": "model.safetensors", "digest": {"sha256": DIGEST}}]
    att = verify_attestation(
        envelope, [signer.public_key], DIGEST, expected_name="model.safetensors"
    )
    assert att.predicate == _predicate()
    assert att.signer_keyids == (signer.public_key.keyid,)


def test_threshold_of_two_needs_two_signatures() -> None:
    a, b = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    one = sign_attestation("m", MODEL, _predicate(), [a])
    with pytest.raises(AttestationInvalid, match="2 trusted key"):
        verify_attestation(one, [a.public_key, b.public_key], DIGEST, threshold=2)
    two = sign_attestation("m", MODEL, _predicate(), [a, b])
    verify_attestation(two, [a.public_key, b.public_key], DIGEST, threshold=2)


def test_modified_payload_breaks_the_signature() -> None:
    signer = CryptoSigner.generate_ed25519()
    outer = json.loads(sign_attestation("m", MODEL, _predicate(), [signer]))
    statement = json.loads(base64.b64decode(outer["payload"]))
    statement["predicate"]["audit"]["verdict"] = "pass"
    statement["predicate"]["privacy"]["epsilon"] = []
    outer["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(AttestationInvalid, match="not signed"):
        verify_attestation(json.dumps(outer).encode(), [signer.public_key], DIGEST)


@pytest.mark.parametrize(
    "blob",
    [b"", b"[]", b"{}", b'{"payload": "!!", "payloadType": "x", "signatures": []}', b"\xff\xfe"],
)
def test_malformed_envelopes_are_attestation_invalid(blob: bytes) -> None:
    signer = CryptoSigner.generate_ed25519()
    with pytest.raises(AttestationInvalid):
        verify_attestation(blob, [signer.public_key], DIGEST)


def test_oversized_envelope_is_refused_before_parsing() -> None:
    signer = CryptoSigner.generate_ed25519()
    with pytest.raises(TooLarge):
        verify_attestation(b"x" * 2048, [signer.public_key], DIGEST, max_bytes=1024)


def test_failed_verdict_refused_and_forced_one_accepted_only_when_allowed() -> None:
    signer = CryptoSigner.generate_ed25519()
    failed = sign_attestation("m", MODEL, _predicate(AuditVerdict.FAIL), [signer])
    with pytest.raises(ReleaseRefused) as info:
        verify_attestation(failed, [signer.public_key], DIGEST)
    assert info.value.reason == "audit_failed"
    forced = sign_attestation("m", MODEL, _predicate(AuditVerdict.FAIL, forced=True), [signer])
    assert verify_attestation(forced, [signer.public_key], DIGEST).predicate.audit_forced
    with pytest.raises(ReleaseRefused, match="forced"):
        verify_attestation(forced, [signer.public_key], DIGEST, accept_forced=False)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("release", "version"), True),
        (("packets", "count"), "2"),
        (("audit", "verdict"), "maybe"),
        (("parent", "digest"), {"sha256": "zz"}),
        (("privacy", "epsilon"), [{"device": "d", "round": -1, "total": 1}]),
        (("privacy", "epsilon"), "lots"),
    ],
)
def test_malformed_predicates_are_refused(path: tuple[str, str], value: object) -> None:
    data = _predicate().to_dict()
    data[path[0]][path[1]] = value
    with pytest.raises(AttestationInvalid):
        ReleasePredicate.from_dict(data)


def test_predicate_constructor_rejects_inconsistent_lineage() -> None:
    with pytest.raises(ValueError, match="parent_version"):
        ReleasePredicate.build(
            release_version=2, parent_digest="ab" * 32, parent_version=2, packet_digests=[],
            epsilon=[], accountant="rdp", audit_report_digest="cd" * 32,
            audit_verdict=AuditVerdict.PASS, training_config_digest="ef" * 32,
        )  # fmt: skip

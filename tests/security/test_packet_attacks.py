"""One named test per attack on knowledge packets (issue 2). Each asserts the typed error AND that a
rejected packet changes no state: the replay state does not advance."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from diredi_secure import _crypto
from diredi_secure._proto.diredi.v1 import packet_pb2 as pb
from diredi_secure.envelope import ENVELOPE_VERSION, SignedEnvelope
from diredi_secure.errors import (
    CertificateInvalid,
    CertificateRevoked,
    DecryptionFailed,
    DirediError,
    HeaderMismatch,
    MalformedPacket,
    PayloadInvalid,
    PolicyViolation,
    ReplayDetected,
    SignatureInvalid,
    StalePacket,
    TooLarge,
    UnknownDevice,
    UnsupportedVersion,
)
from diredi_secure.knowledge import KnowledgePayload, PayloadKind, PayloadTensor, encode_payload
from diredi_secure.packet import open_packet, signed_transcript
from diredi_secure.policy import Limits
from diredi_secure.serde import (
    envelope_from_bytes,
    envelope_to_bytes,
    header_from_bytes,
    header_to_bytes,
)

from ..conftest import NOW_MS, Pki, make_payload, seeded


def refuse(pki: Pki, data: bytes, error: type[DirediError], **kwargs: object) -> DirediError:
    before = (set(pki.replay.seen), dict(pki.replay.counters))
    with pytest.raises(error) as info:
        open_packet(data, **{**pki.open_kwargs(), **kwargs})  # type: ignore[arg-type]
    assert (pki.replay.seen, pki.replay.counters) == before, (
        "a rejected packet changed replay state"
    )
    assert info.value.reason and str(info.value)
    return info.value


def accept(pki: Pki, data: bytes) -> None:
    opened = open_packet(data, **pki.open_kwargs())  # type: ignore[arg-type]
    pki.replay.record(opened.header.device_id, opened.header.packet_id, opened.header.counter)


def resign(pki: Pki, env: SignedEnvelope, device_id: str = "device-a") -> bytes:
    """Re-sign an envelope with the real device key: isolates the check under test from the signature."""
    key, _ = pki.device_keys[device_id]
    sig = _crypto.sign(key, signed_transcript(env.header, env.enc, env.ciphertext))
    return envelope_to_bytes(
        SignedEnvelope(ENVELOPE_VERSION, env.header, env.enc, env.ciphertext, sig, env.device_certificate)
    )


def reseal_with_header(
    pki: Pki, mutate_header, payload_bytes: bytes | None = None, device_id: str = "device-a"
) -> bytes:
    """Build a validly signed and encrypted packet whose header was edited by ``mutate_header``
    (a device that is enrolled but malicious or buggy)."""
    good = pki.seal(device_id)
    header = header_from_bytes(envelope_from_bytes(good.data).header)
    msg = pb.PacketHeader.FromString(header_to_bytes(header))
    mutate_header(msg)
    header_bytes = msg.SerializeToString(deterministic=True)
    plaintext = payload_bytes if payload_bytes is not None else encode_payload(make_payload())[0]
    enc, ct = _crypto.hpke_seal(
        _crypto.HpkeSuite(msg.suite or 1), pki.inbox.public_key, plaintext, header_bytes
    )
    env = SignedEnvelope(ENVELOPE_VERSION, header_bytes, enc, ct, b"\0" * 64, pki.device_keys[device_id][1])
    return resign(pki, env, device_id)


def pki_payload() -> tuple[PayloadTensor, ...]:
    return (
        PayloadTensor(
            "reference_logits", PayloadKind.REFERENCE_LOGITS, np.ones((4, 10)), "float32"
        ),
    )


def test_flipped_bit_anywhere_is_refused(pki: Pki) -> None:
    data = pki.seal().data
    for pos in range(0, len(data), max(1, len(data) // 97)):
        for bit in (0, 7):
            mutated = bytearray(data)
            mutated[pos] ^= 1 << bit
            refuse(pki, bytes(mutated), DirediError)
    accept(pki, data)  # the untouched packet still opens


def test_truncated_packet(pki: Pki) -> None:
    data = pki.seal().data
    for cut in (1, 10, len(data) // 2, len(data) - 1):
        refuse(pki, data[:cut], DirediError)


def test_empty_input(pki: Pki) -> None:
    refuse(pki, b"", MalformedPacket)


def test_malformed_protobuf(pki: Pki) -> None:
    refuse(pki, b"\xff\xff\xff\xff\xff", MalformedPacket)
    refuse(pki, b"\x12\x80\x80\x80\x80\x10garbage", MalformedPacket)  # length beyond the buffer


def test_non_canonical_encoding_is_refused(pki: Pki) -> None:
    data = pki.seal().data
    refuse(pki, data + b"\xf8\x07\x01", MalformedPacket)  # an unknown field 127 appended


def test_signature_by_key_the_ca_did_not_certify(pki: Pki) -> None:
    # A rogue CA issues a certificate for device-a's id to the attacker's key.
    rogue_ca_key = _crypto.SigningKey.from_seed(seeded("rogue-ca"))
    rogue_ca = _crypto.create_ca_certificate(
        rogue_ca_key, common_name="test device CA", now_ms=NOW_MS, valid_days=10, serial=9
    )
    attacker = _crypto.SigningKey.from_seed(seeded("attacker"))
    rogue_cert = _crypto.issue_device_certificate(
        rogue_ca_key,
        rogue_ca,
        device_id="device-a",
        device_public_key=attacker.public_key,
        serial=5,
        now_ms=NOW_MS,
    )
    pki.device_keys["device-a"] = (attacker, rogue_cert)
    err = refuse(pki, pki.seal().data, CertificateInvalid)
    assert "device CA" in str(err)


def test_signature_by_attacker_key_claiming_enrolled_device(pki: Pki) -> None:
    good = envelope_from_bytes(pki.seal().data)
    attacker = _crypto.SigningKey.from_seed(seeded("attacker"))
    sig = _crypto.sign(attacker, signed_transcript(good.header, good.enc, good.ciphertext))
    forged = envelope_to_bytes(
        SignedEnvelope(ENVELOPE_VERSION, good.header, good.enc, good.ciphertext, sig, good.device_certificate)
    )
    refuse(pki, forged, SignatureInvalid)


def test_revoked_certificate(pki: Pki) -> None:
    data = pki.seal("device-b").data
    pki.devices.revoke("device-b")
    refuse(pki, data, CertificateRevoked)


def test_unknown_device(pki: Pki) -> None:
    pki.add_device("device-x", enroll=False)
    pki.devices.records.pop("device-x", None)
    refuse(pki, pki.seal("device-x").data, UnknownDevice)


def test_headers_swapped_between_two_valid_packets(pki: Pki) -> None:
    a = envelope_from_bytes(pki.seal("device-a", 1).data)
    b = envelope_from_bytes(pki.seal("device-a", 2, payload=KnowledgePayload(pki_payload())).data)
    # Swap headers and re-sign with the real key: only the HPKE info binding can catch it.
    swapped = resign(
        pki, SignedEnvelope(ENVELOPE_VERSION, b.header, a.enc, a.ciphertext, a.signature, a.device_certificate)
    )
    refuse(pki, swapped, (HeaderMismatch, DecryptionFailed))  # type: ignore[arg-type]
    # Same length payloads: the ciphertext length check passes, the HPKE info check does not.
    c = envelope_from_bytes(pki.seal("device-a", 3).data)
    swapped_same_len = resign(
        pki, SignedEnvelope(ENVELOPE_VERSION, c.header, a.enc, a.ciphertext, a.signature, a.device_certificate)
    )
    refuse(pki, swapped_same_len, DecryptionFailed)
    # Without re-signing, the signature already fails.
    refuse(
        pki,
        envelope_to_bytes(
            SignedEnvelope(ENVELOPE_VERSION, c.header, a.enc, a.ciphertext, a.signature, a.device_certificate)
        ),
        SignatureInvalid,
    )


def test_ciphertext_sealed_to_another_inbox_key(pki: Pki) -> None:
    other = _crypto.InboxKey.from_seeds(seeded("other/x"), seeded("other/m", 64))
    err = refuse(pki, pki.seal(inbox=other.public_key).data, HeaderMismatch)
    assert "inbox key" in str(err)
    # And a device that lies about the recipient key id gets a decryption failure.
    lying = reseal_with_header(pki, lambda h: None)
    env = envelope_from_bytes(lying)
    enc, ct = _crypto.hpke_seal(
        _crypto.HpkeSuite(1), other.public_key, encode_payload(make_payload())[0], env.header
    )
    refuse(
        pki,
        resign(pki, SignedEnvelope(ENVELOPE_VERSION, env.header, enc, ct, b"", env.device_certificate)),
        DecryptionFailed,
    )


def test_replayed_packet_id(pki: Pki) -> None:
    data = pki.seal().data
    accept(pki, data)
    refuse(pki, data, ReplayDetected)
    # Same packet id under a higher counter (a device reusing ids) is still a replay.
    same_id = pki.seal(counter=5, random_bytes=lambda n: envelope_packet_id(data))
    refuse(pki, same_id.data, ReplayDetected)


def envelope_packet_id(data: bytes) -> bytes:
    return header_from_bytes(envelope_from_bytes(data).header).packet_id


def test_counter_going_backwards(pki: Pki) -> None:
    accept(pki, pki.seal(counter=10).data)
    refuse(pki, pki.seal(counter=9).data, ReplayDetected)
    refuse(pki, pki.seal(counter=10).data, ReplayDetected)
    accept(pki, pki.seal(counter=11).data)


@pytest.mark.parametrize(
    "offset_ms, what", [(10 * 60 * 1000, "future"), (-8 * 24 * 3600 * 1000, "ago")]
)
def test_created_at_outside_policy_window(pki: Pki, offset_ms: int, what: str) -> None:
    err = refuse(pki, pki.seal(now_ms=NOW_MS + offset_ms).data, StalePacket)
    assert what in str(err)


def test_unknown_format_version(pki: Pki) -> None:
    refuse(
        pki, reseal_with_header(pki, lambda h: setattr(h, "format_version", 2)), UnsupportedVersion
    )
    env = envelope_from_bytes(pki.seal().data)
    msg = pb.SignedPacket.FromString(envelope_to_bytes(env))
    msg.envelope_version = 7
    refuse(pki, msg.SerializeToString(deterministic=True), UnsupportedVersion)


def test_unknown_suite(pki: Pki) -> None:
    def set_suite(h: pb.PacketHeader) -> None:
        h.suite = 99  # type: ignore[assignment]

    data = pki.seal().data
    env = envelope_from_bytes(data)
    msg = pb.PacketHeader.FromString(env.header)
    set_suite(msg)
    refuse(
        pki,
        resign(
            pki,
            SignedEnvelope(
                ENVELOPE_VERSION,
                msg.SerializeToString(deterministic=True),
                env.enc,
                env.ciphertext,
                b"",
                env.device_certificate,
            ),
        ),
        UnsupportedVersion,
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_payload_with_nan_or_inf(pki: Pki, bad: float) -> None:
    values = np.ones((4, 10), dtype=np.float32)
    values[1, 3] = bad
    from diredi_secure.checkpoint import checkpoint_bytes

    payload_bytes = checkpoint_bytes({"reference_logits": values}, {"format": "diredi-payload-v1"})
    data = _with_payload(pki, payload_bytes, shape=(4, 10), dtype=pb.DTYPE_FLOAT32)
    err = refuse(pki, data, PayloadInvalid)
    assert "NaN or Inf" in str(err)


def _with_payload(pki: Pki, payload_bytes: bytes, *, shape: tuple[int, ...], dtype: int) -> bytes:
    import hashlib

    def edit(h: pb.PacketHeader) -> None:
        del h.payload.entries[:]
        h.payload.entries.add(
            name="reference_logits",
            kind=pb.PAYLOAD_KIND_REFERENCE_LOGITS,
            dtype=dtype,
            shape=list(shape),
        )  # type: ignore[arg-type]
        h.payload.length = len(payload_bytes)
        h.payload.sha256 = hashlib.sha256(payload_bytes).digest()

    return reseal_with_header(pki, edit, payload_bytes)


def test_payload_over_size_cap_refused_before_decryption(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    import diredi_secure.packet as packet_mod

    monkeypatch.setattr(
        packet_mod, "hpke_open", lambda *a, **k: calls.append(1) or b""
    )  # spy: must not run
    big = KnowledgePayload(
        (PayloadTensor("weight_delta", PayloadKind.WEIGHT_DELTA, np.zeros(70_000), "float32"),)
    )
    data = pki.seal(payload=big).data
    limits = Limits(max_payload_bytes=200_000)
    refuse(pki, data, TooLarge, limits=limits)
    refuse(pki, data, TooLarge, limits=Limits(max_packet_bytes=100_000))
    assert calls == [], "decryption ran on an oversize packet"


def test_declared_shape_differs_from_real(pki: Pki) -> None:
    from diredi_secure.checkpoint import checkpoint_bytes

    payload_bytes = checkpoint_bytes({"reference_logits": np.ones((4, 10), np.float32)}, {})
    err = refuse(
        pki, _with_payload(pki, payload_bytes, shape=(5, 8), dtype=pb.DTYPE_FLOAT32), PayloadInvalid
    )
    assert "shape" in str(err)
    err = refuse(
        pki,
        _with_payload(pki, payload_bytes, shape=(4, 10), dtype=pb.DTYPE_FLOAT16),
        PayloadInvalid,
    )
    assert "dtype" in str(err)


def test_pickle_bytes_where_safetensors_expected(pki: Pki) -> None:
    payload_bytes = pickle.dumps({"reference_logits": np.ones((4, 10), np.float32)}, protocol=4)
    err = refuse(
        pki,
        _with_payload(pki, payload_bytes, shape=(4, 10), dtype=pb.DTYPE_FLOAT32),
        PayloadInvalid,
    )
    assert "pickle" in str(err)


def test_epsilon_over_policy_and_no_dp(pki: Pki) -> None:
    from dataclasses import replace

    from ..conftest import DEFAULT_DP

    refuse(
        pki,
        pki.seal(dp=replace(DEFAULT_DP, epsilon=50.0, total_epsilon=50.0)).data,
        PolicyViolation,
    )
    refuse(pki, pki.seal(dp=replace(DEFAULT_DP, noise_multiplier=0.0)).data, PolicyViolation)
    refuse(pki, pki.seal(dp=replace(DEFAULT_DP, total_epsilon=1.0)).data, PolicyViolation)


def test_norm_bound(pki: Pki) -> None:
    from diredi_secure.policy import PacketPolicy

    err = refuse(pki, pki.seal().data, PayloadInvalid, policy=PacketPolicy(max_entry_l2_norm=1.0))
    assert "norm" in str(err)


def test_enrolled_device_signing_as_another(pki: Pki) -> None:
    # device-b signs a packet whose header claims device-a.
    def claim_a(h: pb.PacketHeader) -> None:
        h.device_id = "device-a"

    data = reseal_with_header(pki, claim_a, device_id="device-b")
    refuse(pki, data, (UnknownDevice, HeaderMismatch))  # type: ignore[arg-type]


def test_header_copy_is_independent(pki: Pki) -> None:
    # the decoded header is a frozen value: mutating a copy of the message cannot affect it
    data = pki.seal().data
    env = envelope_from_bytes(data)
    assert copy.deepcopy(env) == env

"""Every bad-input case of the protocol core again, through gRPC (issue 5): each submitted raw to a
real cloud on loopback (mTLS, SQLite), each asserting the status code, the refusal's reason, and that
the store did not change (packets, devices, replay state, epsilon ledger)."""

from __future__ import annotations

import hashlib
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from diredi_secure.services.edge import EdgeAgent
from diredi_secure.services.status import status_for

from diredi_secure import _crypto, privacy
from diredi_secure._proto.diredi.v1 import packet_pb2 as pb
from diredi_secure.checkpoint import checkpoint_bytes
from diredi_secure.envelope import ENVELOPE_VERSION, SignedEnvelope
from diredi_secure.errors import (
    CertificateInvalid,
    DecryptionFailed,
    DirediError,
    EpsilonUnderstated,
    HeaderMismatch,
    MalformedPacket,
    PayloadInvalid,
    ReplayDetected,
    SignatureInvalid,
    StalePacket,
    TooLarge,
    UnsupportedVersion,
)
from diredi_secure.knowledge import DPParameters, KnowledgePayload, encode_payload
from diredi_secure.packet import seal_packet, signed_transcript
from diredi_secure.serde import envelope_from_bytes, envelope_to_bytes
from diredi_secure.store import Store
from tests.integration.services_harness import DP, Cloud, payload, running_cloud


@dataclass
class Setup:
    cloud: Cloud
    agent: EdgeAgent
    counter: int = 100

    def next_counter(self) -> int:
        self.counter += 1
        return self.counter

    def seal(self, *, now_ms: int | None = None, counter: int | None = None, packet: KnowledgePayload | None = None,
             inbox: _crypto.InboxPublicKey | None = None, dp: DPParameters = DP,
             key: _crypto.SigningKey | None = None, cert: bytes | None = None, packet_id: bytes | None = None) -> bytes:
        ws = self.agent.workspace
        pid = packet_id or hashlib.sha256(f"pid-{time.perf_counter_ns()}".encode()).digest()[:16]
        return seal_packet(
            packet or payload(0), device_key=key or ws.signing_key(), device_id=ws.device_id,
            counter=counter or self.next_counter(), base_model_version="v1", dp=dp,
            inbox=inbox or ws.inbox_public_key(), now_ms=now_ms or int(time.time() * 1000),
            random_bytes=lambda n: pid, device_certificate=cert if cert is not None else ws.certificate(),
        ).data

    def resign(self, env: SignedEnvelope) -> bytes:
        sig = _crypto.sign(self.agent.workspace.signing_key(), signed_transcript(env.header, env.enc, env.ciphertext))
        return envelope_to_bytes(SignedEnvelope(ENVELOPE_VERSION, env.header, env.enc, env.ciphertext, sig, env.device_certificate))

    def with_header(self, mutate: Callable[[pb.PacketHeader], None], plaintext: bytes | None = None) -> bytes:
        env = envelope_from_bytes(self.seal())
        msg = pb.PacketHeader.FromString(env.header)
        mutate(msg)
        header = msg.SerializeToString(deterministic=True)
        plain = plaintext if plaintext is not None else encode_payload(payload(0))[0]
        suite = msg.suite if msg.suite in (1, 2, 3) else 1
        enc, ct = _crypto.hpke_seal(_crypto.HpkeSuite(suite), self.agent.workspace.inbox_public_key(), plain, header)
        return self.resign(SignedEnvelope(ENVELOPE_VERSION, header, enc, ct, b"", env.device_certificate))

    def with_payload(self, plain: bytes, shape: tuple[int, ...], dtype: int = pb.DTYPE_FLOAT32) -> bytes:
        def edit(h: pb.PacketHeader) -> None:
            del h.payload.entries[:]
            h.payload.entries.add(name="reference_logits", kind=pb.PAYLOAD_KIND_REFERENCE_LOGITS, dtype=dtype, shape=list(shape))  # type: ignore[arg-type]
            h.payload.length = len(plain)
            h.payload.sha256 = hashlib.sha256(plain).digest()

        return self.with_header(edit, plain)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with running_cloud(tmp_path_factory.mktemp("svc-cases")) as cloud:
        agent = cloud.device("device-a")
        s = Setup(cloud, agent)
        agent.submit(s.seal())  # one accepted packet: the replay cases replay it
        yield s
        agent.close()


def state(store: Store, device_id: str) -> tuple[object, ...]:
    return (tuple(store.list_packets(unmerged_only=False)), tuple(store.list_devices()),
            store.highest_counter(device_id), store.epsilon_spent(device_id))


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x01
    return bytes(b)


def _other_inbox() -> _crypto.InboxPublicKey:
    return _crypto.InboxKey.from_seeds(b"\x01" * 32, b"\x02" * 64).public_key


def _rogue_cert(s: Setup) -> tuple[_crypto.SigningKey, bytes]:
    rogue_ca_key = _crypto.generate_signing_key()
    rogue_ca = _crypto.create_ca_certificate(rogue_ca_key, common_name="rogue", now_ms=int(time.time() * 1000), valid_days=1, serial=3)
    key = _crypto.generate_signing_key()
    cert = _crypto.issue_device_certificate(rogue_ca_key, rogue_ca, device_id="device-a", device_public_key=key.public_key,
                                            serial=4, now_ms=int(time.time() * 1000))
    return key, cert


def _swapped_headers(s: Setup) -> bytes:
    a, b = envelope_from_bytes(s.seal()), envelope_from_bytes(s.seal())
    return s.resign(SignedEnvelope(ENVELOPE_VERSION, b.header, a.enc, a.ciphertext, b"", a.device_certificate))


def _nan_payload(s: Setup) -> bytes:
    values = np.ones((4, 10), np.float32)
    values[0, 0] = np.nan
    return s.with_payload(checkpoint_bytes({"reference_logits": values}, {}), (4, 10))


CASES: list[tuple[str, Callable[[Setup], bytes], type[DirediError]]] = [
    ("flipped_bit_in_ciphertext", lambda s: _flip(s.seal(), len(s.seal()) // 2), SignatureInvalid),
    ("flipped_bit_in_header", lambda s: _flip(s.seal(), 12), DirediError),
    ("truncated", lambda s: s.seal()[:-7], DirediError),
    ("empty", lambda s: b"", MalformedPacket),
    ("malformed_protobuf", lambda s: b"\xff\xff\xff\xff", MalformedPacket),
    ("key_the_ca_did_not_certify", lambda s: s.seal(key=_rogue_cert(s)[0], cert=_rogue_cert(s)[1]), CertificateInvalid),
    ("headers_swapped", _swapped_headers, DecryptionFailed),
    ("sealed_to_another_inbox", lambda s: s.seal(inbox=_other_inbox()), HeaderMismatch),
    ("replayed_packet_id", lambda s: s.seal(counter=10**6, packet_id=s.cloud.store.list_packets(unmerged_only=False)[0].packet_id), ReplayDetected),
    ("counter_backwards", lambda s: s.seal(counter=1), ReplayDetected),
    ("created_in_the_future", lambda s: s.seal(now_ms=int(time.time() * 1000) + 3_600_000), StalePacket),
    ("created_too_long_ago", lambda s: s.seal(now_ms=int(time.time() * 1000) - 30 * 86_400_000), StalePacket),
    ("unknown_format_version", lambda s: s.with_header(lambda h: setattr(h, "format_version", 9)), UnsupportedVersion),
    ("unknown_suite", lambda s: s.with_header(lambda h: setattr(h, "suite", 42)), UnsupportedVersion),
    ("nan_payload", _nan_payload, PayloadInvalid),
    ("declared_shape_differs", lambda s: s.with_payload(checkpoint_bytes({"reference_logits": np.ones((4, 10), np.float32)}, {}), (5, 8)), PayloadInvalid),
    ("pickle_payload", lambda s: s.with_payload(pickle.dumps(np.ones((4, 10), np.float32), protocol=4), (4, 10)), PayloadInvalid),
    ("epsilon_understated", lambda s: s.seal(dp=replace(DP, epsilon=0.05, total_epsilon=0.05)), EpsilonUnderstated),
    ("epsilon_over_policy", lambda s: s.seal(dp=replace(DP, epsilon=60.0, total_epsilon=60.0)), DirediError),
    ("noise_free_histogram", lambda s: s.seal(packet=_exact_histogram()), privacy.UnaccountedRelease),
    ("seeded_noise", lambda s: s.seal(dp=replace(DP, noise_seeded=True)), privacy.NoiseSeeded),
    ("noise_multiplier_0.01", lambda s: s.seal(dp=replace(DP, noise_multiplier=0.01)), privacy.ParameterOutOfBounds),
    ("steps_2^64-1", lambda s: s.seal(dp=replace(DP, steps=2**64 - 1)), privacy.ParameterOutOfBounds),
]


def _exact_histogram() -> KnowledgePayload:
    """The exact private label counts, declared as needing no noise (issue 13 finding 3)."""
    from diredi_secure.knowledge import PayloadKind, PayloadTensor

    return KnowledgePayload((*payload(0).tensors, PayloadTensor(
        "label_histogram", PayloadKind.LABEL_HISTOGRAM, np.arange(10, dtype=np.float32), "float32")))


@pytest.mark.parametrize("name, make, error", CASES, ids=[c[0] for c in CASES])
def test_bad_packet_through_grpc(setup: Setup, name: str, make: Callable[[Setup], bytes], error: type[DirediError]) -> None:
    data = make(setup)
    before = state(setup.cloud.store, "device-a")
    submit = setup.agent.channel.unary_unary("/diredi.v1.KnowledgeService/Submit")
    with pytest.raises(grpc.RpcError) as info:
        submit(data, timeout=10)
    code, details = info.value.code(), info.value.details() or ""
    if error is DirediError:
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED), (code, details)
    else:
        assert code == status_for(error("x") if error is not TooLarge else TooLarge("x", 1, 0)), (code, details)
        assert details.startswith(error.reason + ":"), details
    assert state(setup.cloud.store, "device-a") == before, f"{name}: the store changed"


def test_oversize_packet_refused_before_decryption_through_grpc(setup: Setup, tmp_path: Path) -> None:
    from diredi_secure.knowledge import PayloadKind, PayloadTensor

    big = KnowledgePayload((PayloadTensor("weight_delta", PayloadKind.WEIGHT_DELTA, np.zeros(2_000_000), "float32"),))
    data = setup.seal(packet=big)
    before = state(setup.cloud.store, "device-a")
    with pytest.raises(grpc.RpcError) as info:
        setup.agent.channel.unary_unary("/diredi.v1.KnowledgeService/Submit")(data, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert state(setup.cloud.store, "device-a") == before

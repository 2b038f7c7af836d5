"""One named case per attack on the cloud's gRPC surface; each asserts the status code AND that the
store did not change."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from diredi_secure.services.cloud import enroll_proof_message
from diredi_secure.services.transport import TransportConfig

from diredi_secure import _crypto
from diredi_secure._proto.diredi.v1 import services_pb2 as spb
from diredi_secure._proto.diredi.v1 import services_pb2_grpc as sgrpc
from diredi_secure.errors import (
    CertificateRevoked,
    DirediError,
    ReplayDetected,
    TooLarge,
    UnknownDevice,
)
from diredi_secure.packet import seal_packet
from diredi_secure.policy import Limits
from diredi_secure.store import Store
from tests.integration.services_harness import DP, Cloud, payload, running_cloud

C = grpc.StatusCode


def snapshot(store: Store) -> tuple[object, ...]:
    return (tuple(store.list_packets(unmerged_only=False)), tuple(store.list_devices()))


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    config = TransportConfig(limits=Limits(max_unary_bytes=64 * 1024, max_packet_bytes=256 * 1024), chunk_bytes=16 * 1024)
    with running_cloud(tmp_path, config=config) as c:
        yield c


def _raw_submit(channel: grpc.Channel, data: bytes) -> bytes:
    return channel.unary_unary("/diredi.v1.KnowledgeService/Submit")(data, timeout=5)  # type: ignore[no-any-return]


def _code(fn: object, *args: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.code(), info.value.details() or ""


def test_same_packet_id_with_other_bytes_is_refused(cloud: Cloud) -> None:
    agent = cloud.device("device-a")
    first = agent.seal(payload(0), dp=DP, base_model_version="v1")
    agent.submit(first.data)
    ws = agent.workspace
    forged = seal_packet(  # the device's own key, the same packet id, other content
        payload(1), device_key=ws.signing_key(), device_id="device-a", counter=2,
        base_model_version="v1", dp=DP, inbox=ws.inbox_public_key(), now_ms=int(time.time() * 1000),
        random_bytes=lambda n: first.packet_id, device_certificate=ws.certificate(),
    )
    before = snapshot(cloud.store)
    code, details = _code(_raw_submit, agent.channel, forged.data)
    assert (code, details.split(":")[0]) == (C.ALREADY_EXISTS, "replay")
    assert snapshot(cloud.store) == before
    with pytest.raises(ReplayDetected):  # the agent surfaces it as the typed error
        agent.submit(forged.data)


def test_revoked_device_is_refused_on_the_next_call(cloud: Cloud) -> None:
    agent = cloud.device("device-a")
    agent.submit_payload(payload(0), dp=DP, base_model_version="v1")
    cloud.store.revoke_device("device-a", revoked_at_ms=int(time.time() * 1000), reason="stolen")
    sealed = agent.seal(payload(1), dp=DP, base_model_version="v1")
    before = snapshot(cloud.store)
    code, details = _code(_raw_submit, agent.channel, sealed.data)
    assert (code, details.split(":")[0]) == (C.PERMISSION_DENIED, "certificate_revoked")
    with pytest.raises(CertificateRevoked):
        agent.submit(sealed.data)
    with pytest.raises(CertificateRevoked):  # nor may it enrol again
        agent.enroll()
    if cloud.mtls:  # and, at the transport, every other service refuses it too (issue 14)
        code, details = _code(sgrpc.EnrollmentServiceStub(agent.channel).GetStatus,
                              spb.DeviceStatusRequest(device_id="device-a"))
        assert (code, details.split(":")[0]) == (C.PERMISSION_DENIED, "certificate_revoked")
        from diredi_secure.services.jobs import update_device

        with pytest.raises(DirediError, match="certificate_revoked"):
            update_device(agent)
    assert snapshot(cloud.store) == before


def test_unenrolled_device_is_refused(cloud: Cloud) -> None:
    enrolled = cloud.device("device-a")  # gives the workspace its receipt key path
    stranger = cloud.device("device-x", enroll=False)
    stranger.workspace.update_config(receipt_public_key=enrolled.workspace.config()["receipt_public_key"])
    sealed = stranger.seal(payload(), dp=DP, base_model_version="v1")
    before = snapshot(cloud.store)
    with pytest.raises(UnknownDevice):
        stranger.submit(sealed.data)
    assert snapshot(cloud.store) == before


def test_oversize_unary_is_refused_with_resource_exhausted(cloud: Cloud) -> None:
    agent = cloud.device("device-a")
    before = snapshot(cloud.store)
    # Between our unary cap and gRPC's message cap: our own check (reason too_large).
    code, details = _code(_raw_submit, agent.channel, b"\x00" * (cloud.config.limits.max_unary_bytes + 1))
    assert (code, details.split(":")[0]) == (C.RESOURCE_EXHAUSTED, "too_large")
    # Above gRPC's message cap, sent by a client that raised its own: gRPC refuses on the server.
    big = grpc.secure_channel(
        cloud.target, grpc.ssl_channel_credentials(agent.workspace.client_tls().root_pem,
                                                  agent.workspace.client_tls().key_pem,
                                                  agent.workspace.client_tls().cert_pem),
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.ssl_target_name_override", "localhost")],
    )
    code, _ = _code(_raw_submit, big, b"\x00" * (cloud.config.max_message_bytes + 1))
    assert code == C.RESOURCE_EXHAUSTED
    sealed = agent.seal(payload(rows=4000), dp=DP, base_model_version="v1")
    assert len(sealed.data) > cloud.config.limits.max_unary_bytes
    code, _ = _code(_raw_submit, agent.channel, sealed.data)  # a big real packet must be streamed
    assert code == C.RESOURCE_EXHAUSTED
    assert snapshot(cloud.store) == before
    big.close()


def _stream(channel: grpc.Channel, chunks: list[spb.Chunk]) -> bytes:
    call = channel.stream_unary("/diredi.v1.KnowledgeService/SubmitStream", request_serializer=spb.Chunk.SerializeToString)
    return call(iter(chunks), timeout=5)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("name", "make", "code", "reason"),
    [
        ("gap", lambda d: [spb.Chunk(data=d[:100], offset=0, total_length=len(d)), spb.Chunk(data=d[200:], offset=200)], C.INVALID_ARGUMENT, "malformed"),
        ("overlap", lambda d: [spb.Chunk(data=d[:100], offset=0, total_length=len(d)), spb.Chunk(data=d[50:], offset=50)], C.INVALID_ARGUMENT, "malformed"),
        ("declared_over_cap", lambda d: [spb.Chunk(data=d, offset=0, total_length=10**9)], C.RESOURCE_EXHAUSTED, "too_large"),
        ("more_than_declared", lambda d: [spb.Chunk(data=d, offset=0, total_length=10), ], C.RESOURCE_EXHAUSTED, "too_large"),
        ("short_of_declared", lambda d: [spb.Chunk(data=d[:100], offset=0, total_length=len(d))], C.INVALID_ARGUMENT, "malformed"),
        ("empty_chunk", lambda d: [spb.Chunk(data=b"", offset=0, total_length=len(d))], C.INVALID_ARGUMENT, "malformed"),
        ("changed_total", lambda d: [spb.Chunk(data=d[:100], offset=0, total_length=len(d)), spb.Chunk(data=d[100:], offset=100, total_length=5)], C.INVALID_ARGUMENT, "malformed"),
        ("endless_undeclared", lambda d: [spb.Chunk(data=b"x" * 16384, offset=i * 16384) for i in range(20)], C.RESOURCE_EXHAUSTED, "too_large"),
    ],
)
def test_stream_attacks(cloud: Cloud, name: str, make: object, code: grpc.StatusCode, reason: str) -> None:
    agent = cloud.device("device-a")
    data = agent.seal(payload(), dp=DP, base_model_version="v1").data
    before = snapshot(cloud.store)
    got, details = _code(_stream, agent.channel, make(data))  # type: ignore[operator]
    assert (got, details.split(":")[0]) == (code, reason), name
    assert snapshot(cloud.store) == before


def test_client_without_certificate_is_refused_when_mtls_is_on(cloud: Cloud) -> None:
    agent = cloud.device("device-a")
    tls = agent.workspace.client_tls(mtls=False)
    channel = cloud.channel(tls)
    code, _ = _code(sgrpc.EnrollmentServiceStub(channel).GetStatus, spb.DeviceStatusRequest(device_id="device-a"))
    assert code == C.UNAVAILABLE  # the TLS handshake fails: no RPC reaches the service
    channel.close()


def test_plaintext_client_cannot_talk_to_a_tls_server(cloud: Cloud) -> None:
    channel = grpc.insecure_channel(cloud.target)
    code, _ = _code(sgrpc.EnrollmentServiceStub(channel).GetStatus, spb.DeviceStatusRequest(device_id="device-a"), 3)
    assert code in (C.UNAVAILABLE, C.DEADLINE_EXCEEDED)
    channel.close()


def test_client_certificate_from_another_ca_is_refused(cloud: Cloud, tmp_path: Path) -> None:
    from diredi_secure.services.workspace import CloudWorkspace

    rogue = CloudWorkspace.init(tmp_path / "rogue", now_ms=int(time.time() * 1000))
    dev = rogue.provision_device(tmp_path / "rogue-dev", "device-a", target=cloud.target, now_ms=int(time.time() * 1000))
    tls = dev.client_tls()
    channel = cloud.channel(replace(tls, root_pem=_crypto.certificate_pem(cloud.workspace.keys().device_ca_der)))
    code, _ = _code(sgrpc.EnrollmentServiceStub(channel).GetStatus, spb.DeviceStatusRequest(device_id="device-a"))
    assert code == C.UNAVAILABLE
    channel.close()


def test_tls_peer_cannot_act_for_another_device(cloud: Cloud) -> None:
    a = cloud.device("device-a")
    b = cloud.device("device-b")
    sealed_b = b.seal(payload(), dp=DP, base_model_version="v1")
    before = snapshot(cloud.store)
    code, details = _code(_raw_submit, a.channel, sealed_b.data)  # A's TLS identity, B's packet
    assert (code, details.split(":")[0]) == (C.PERMISSION_DENIED, "unknown_device")
    code, _ = _code(sgrpc.EnrollmentServiceStub(a.channel).GetStatus, spb.DeviceStatusRequest(device_id="device-b"))
    assert code == C.PERMISSION_DENIED
    code, _ = _code(sgrpc.EnrollmentServiceStub(a.channel).Enroll,
                    spb.EnrollRequest(certificate=b.workspace.certificate(),
                                      proof=_crypto.sign(b.workspace.signing_key(), enroll_proof_message(b.workspace.certificate()))))
    assert code == C.PERMISSION_DENIED
    assert snapshot(cloud.store) == before


def test_enrolment_without_proof_of_possession_is_refused(cloud: Cloud) -> None:
    agent = cloud.device("device-a", enroll=False)
    stub = sgrpc.EnrollmentServiceStub(agent.channel)
    cert = agent.workspace.certificate()
    other_key = _crypto.generate_signing_key()
    before = snapshot(cloud.store)
    for proof in (b"", b"\x00" * 64, _crypto.sign(other_key, enroll_proof_message(cert)),
                  _crypto.sign(agent.workspace.signing_key(), cert)):  # no domain tag
        code, details = _code(stub.Enroll, spb.EnrollRequest(certificate=cert, proof=proof))
        assert (code, details.split(":")[0]) == (C.UNAUTHENTICATED, "signature_invalid")
    code, _ = _code(stub.Enroll, spb.EnrollRequest(certificate=b"\x30\x03junk", proof=b""))
    assert code == C.UNAUTHENTICATED
    code, _ = _code(stub.Enroll, spb.EnrollRequest(certificate=cert, proof=b"\x00" * 65))
    assert code == C.RESOURCE_EXHAUSTED
    assert snapshot(cloud.store) == before


def test_update_service_refuses_traversal_and_oversize(cloud: Cloud) -> None:
    agent = cloud.device("device-a")
    stub = sgrpc.UpdateServiceStub(agent.channel)
    secret = cloud.workspace.root / "receipt.key"
    assert secret.exists()
    for path in ("../receipt.key", "../../cloud/receipt.key", "/etc/passwd", "a//b", ".", "x/../../receipt.key"):
        code, _ = _code(lambda p: list(stub.FetchTarget(spb.TargetRequest(path=p), timeout=5)), path)
        assert code == C.INVALID_ARGUMENT, path
    for role in ("../cloud", "root.json/..", "a/b"):
        code, _ = _code(stub.GetMetadata, spb.MetadataRequest(role=role))
        assert code == C.INVALID_ARGUMENT, role
    code, _ = _code(stub.GetMetadata, spb.MetadataRequest(role="root", version=7))
    assert code == C.NOT_FOUND
    (cloud.workspace.repository_dir / "targets").mkdir(exist_ok=True)
    (cloud.workspace.repository_dir / "targets" / "big.bin").write_bytes(b"x" * 5000)
    code, details = _code(lambda: list(stub.FetchTarget(spb.TargetRequest(path="big.bin", max_length=4000), timeout=5)))
    assert (code, details.split(":")[0]) == (C.RESOURCE_EXHAUSTED, "too_large")


def test_packet_over_the_lifetime_budget_is_refused_and_charges_nothing(cloud: Cloud) -> None:
    agent = cloud.device("device-a")
    # Two packets compose (RDP) to more than 1.2x one of them: the second must be refused.
    cloud.store.set_epsilon_budget("device-a", DP.composed_epsilon * 1.2)
    agent.submit_payload(payload(0), dp=DP, base_model_version="v1")
    ledger = agent.workspace.ledger()
    ledger["budget"] = 100.0  # the device's own ledger would allow it; the cloud's does not
    import json

    from diredi_secure.checkpoint import atomic_write_bytes

    atomic_write_bytes(agent.workspace.root / "ledger.json", json.dumps(ledger).encode())
    sealed = agent.seal(payload(1), dp=DP, base_model_version="v1")
    before = snapshot(cloud.store)
    code, details = _code(_raw_submit, agent.channel, sealed.data)
    assert (code, details.split(":")[0]) == (C.RESOURCE_EXHAUSTED, "budget_exceeded")
    assert snapshot(cloud.store) == before


def test_device_ledger_refuses_before_sealing(cloud: Cloud) -> None:
    agent = cloud.device("device-a")
    import json

    from diredi_secure.checkpoint import atomic_write_bytes
    from diredi_secure.errors import BudgetExceeded

    ledger = agent.workspace.ledger()
    ledger["budget"] = 10.0
    atomic_write_bytes(agent.workspace.root / "ledger.json", json.dumps(ledger).encode())
    sealed = 0
    with pytest.raises(BudgetExceeded):
        for i in range(100):
            agent.seal(payload(i), dp=DP, base_model_version="v1")
            sealed += 1
    from diredi_secure import privacy

    one = privacy.Mechanism(privacy.MechanismKind.DP_SGD, DP.noise_multiplier, DP.sample_rate,
                            DP.steps).curve()
    fits = max(k for k in range(1, 200)
               if privacy.lifetime_epsilon(one * k) <= ledger["budget"])
    assert sealed == fits > ledger["budget"] // DP.composed_epsilon  # composition, not a sum
    assert agent.workspace.ledger()["spent"] <= ledger["budget"] + 1e-9
    assert agent.workspace.last_counter() == sealed  # the refused seal burnt no counter
    assert len(agent.workspace.pending()) == sealed


def test_too_large_error_is_typed_on_the_device(cloud: Cloud) -> None:
    agent = cloud.device("device-a")
    agent.config = TransportConfig(limits=Limits(max_unary_bytes=10**6), chunk_bytes=16 * 1024)  # device thinks unary is fine
    sealed = agent.seal(payload(rows=4000), dp=DP, base_model_version="v1")
    with pytest.raises(TooLarge):
        agent.submit(sealed.data)


def test_certificate_renewal_keeps_the_ledger_so_a_budget_cannot_be_reset(cloud: Cloud) -> None:
    """Issue 13: renewing under the same id was refused, which invited re-enrolment under new ids;
    now a renewal is accepted and keeps the spent epsilon, the budget and the replay counter."""
    agent = cloud.device("device-a")
    agent.submit_payload(payload(0), dp=DP, base_model_version="v1")
    before = cloud.store.get_device("device-a")
    assert before is not None and before.epsilon_spent > 0
    renewed_ws = cloud.workspace.provision_device(
        cloud.workspace.root.parent / "dev-device-a-renewed", "device-a", target=cloud.target,
        now_ms=int(time.time() * 1000))
    renewed = cloud.agent(renewed_ws)  # enrols the new certificate
    after = cloud.store.get_device("device-a")
    assert after is not None and after.certificate_der == renewed_ws.certificate()
    assert after.certificate_der != before.certificate_der
    assert (after.epsilon_spent, after.epsilon_budget, after.highest_counter) == (
        before.epsilon_spent, before.epsilon_budget, before.highest_counter)
    status = renewed.status()
    assert status.epsilon_spent == before.epsilon_spent and status.epsilon_delta == 1e-5
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "diredi_secure.cli", "cloud", "devices",
                          "--workspace", str(cloud.workspace.root), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    [row] = [json.loads(line) for line in out.stdout.splitlines()]
    assert row["epsilon_spent"] == before.epsilon_spent and row["delta"] == 1e-5


def test_stalled_streams_cannot_starve_health_and_unary_calls(tmp_path: Path) -> None:
    """Issue 14 finding 2: 16 stalled SubmitStreams made Health and GetStatus time out. Now at
    most ``max_ingest_streams`` are served at once (the rest are refused as retryable
    ``overloaded``), and a stalled one is cancelled at the server's own deadline."""
    import threading

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    config = TransportConfig(max_ingest_streams=2, ingest_stream_deadline_s=3.0)
    with running_cloud(tmp_path, config=config) as cloud:
        agent = cloud.device("device-a")
        release = threading.Event()

        def stalled() -> Iterator[bytes]:
            yield spb.Chunk(offset=0, total_length=1000, data=b"x" * 10).SerializeToString()
            release.wait(30)

        stream = agent.channel.stream_unary("/diredi.v1.KnowledgeService/SubmitStream")
        futures = [stream.future(stalled(), timeout=30) for _ in range(32)]
        time.sleep(0.5)
        health = health_pb2_grpc.HealthStub(agent.channel).Check(health_pb2.HealthCheckRequest(),
                                                                 timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert agent.status().status == "active"  # both answer within their deadlines
        ok = agent.submit_payload(payload(0), dp=DP, base_model_version="v1")  # and Submit too
        assert ok.device_id == "device-a"
        codes = []
        for f in futures:
            try:
                f.result(timeout=20)
            except grpc.RpcError as exc:
                codes.append((exc.code(), (exc.details() or "").split(":")[0]))
        release.set()
        overloaded = [c for c in codes if c == (C.UNAVAILABLE, "overloaded")]
        assert len(overloaded) >= 31  # one stream per device: only one was ever served
        assert len(codes) == 32  # the served stall was cancelled by the server's deadline


def test_a_copy_with_the_certificate_stripped_cannot_take_the_genuine_packets_place(
    tmp_path: Path,
) -> None:
    """Issue 14 finding 8: the attached certificate is outside the signature while idempotency
    keyed on the whole envelope, so a stripped copy stored first made the genuine bytes "stored
    with other bytes" and blocked the device's outbox. Now both are one packet with one receipt."""
    from diredi_secure.envelope import SignedEnvelope
    from diredi_secure.packet import packet_digest, verify_receipt
    from diredi_secure.serde import envelope_from_bytes, envelope_to_bytes

    with running_cloud(tmp_path, mtls=False) as cloud:
        agent = cloud.device("device-a")
        sealed = agent.seal(payload(0), dp=DP, base_model_version="v1")
        env = envelope_from_bytes(sealed.data)
        assert env.device_certificate
        stripped = envelope_to_bytes(SignedEnvelope(env.envelope_version, env.header, env.enc,
                                                    env.ciphertext, env.signature, b""))
        assert stripped != sealed.data and packet_digest(stripped) == packet_digest(sealed.data)
        first = _raw_submit(agent.channel, stripped)  # an on-path copier gets in first
        agent.flush_outbox()  # the genuine bytes: acknowledged, not refused
        assert agent.workspace.pending() == []
        verify_receipt(first, agent.workspace.receipt_public_key(), sealed.data)
        assert len(cloud.store.list_packets()) == 1


def test_idle_watch_and_reflection_calls_cannot_starve_the_server(tmp_path: Path) -> None:
    """Attacker finding F1: 24 idle Health/Watch or reflection calls held all 16 threads and
    every unary call timed out. Now at most ``max_watch_streams`` are served at once (the rest
    are refused ``overloaded``), and a served one is cancelled at its deadline."""
    import threading

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    config = TransportConfig(max_watch_streams=2, watch_stream_deadline_s=3.0)
    with running_cloud(tmp_path, config=config) as cloud:  # 8 server threads
        agent = cloud.device("device-a")
        health = health_pb2_grpc.HealthStub(agent.channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(12)]
        release = threading.Event()

        def idle() -> Iterator[reflection_pb2.ServerReflectionRequest]:
            release.wait(30)
            return
            yield  # pragma: no cover - a generator that sends nothing

        reflect = reflection_pb2_grpc.ServerReflectionStub(agent.channel)
        reflections = [reflect.ServerReflectionInfo(idle(), timeout=30) for _ in range(12)]
        time.sleep(1.0)
        started = time.monotonic()
        check = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert agent.status().status == "active"
        ok = agent.submit_payload(payload(0), dp=DP, base_model_version="v1")
        assert ok.device_id == "device-a" and time.monotonic() - started < 10
        codes = []
        for call in [*watches, *reflections]:
            try:
                for _ in call:
                    pass
            except grpc.RpcError as exc:
                codes.append((exc.code(), (exc.details() or "").split(":")[0]))
        release.set()
        assert len(codes) == 24  # every call ended: refused, or cancelled at the deadline
        assert sum(c == (C.UNAVAILABLE, "overloaded") for c in codes) >= 20
        assert sum(c == (C.DEADLINE_EXCEEDED, "stream_deadline") for c in codes) >= 1

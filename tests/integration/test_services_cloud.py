"""The cloud's gRPC services end to end on loopback: real TLS/mTLS, real SQLite (and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from diredi_secure.services.transport import TransportConfig
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from diredi_secure.packet import verify_receipt
from diredi_secure.policy import Limits

from .services_harness import DP, Cloud, payload, pg_unavailable, running_cloud


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cloud]:
    if request.param == "postgres" and (why := pg_unavailable()):
        pytest.skip(why)
    with running_cloud(tmp_path, backend=request.param) as c:
        yield c


def test_submit_round_trip_stores_then_acknowledges(cloud: Cloud) -> None:
    agent = cloud.device("device-a")
    sealed = agent.seal(payload(), dp=DP, base_model_version="v1")
    body = agent.submit(sealed.data)
    assert (body.device_id, body.counter, body.packet_id) == ("device-a", 1, sealed.packet_id)
    stored = cloud.store.get_packet(sealed.packet_id)
    assert stored is not None and stored.packet_bytes == sealed.data  # as received, still sealed
    assert cloud.store.epsilon_spent("device-a") == pytest.approx(DP.composed_epsilon)
    status = agent.status()
    assert (status.status, status.highest_counter) == ("active", 1)
    assert status.epsilon_spent == pytest.approx(DP.composed_epsilon)
    assert agent.workspace.pending() == []  # acknowledged packets leave the outbox
    agent.close()


def test_retry_of_the_same_bytes_gets_the_same_receipt_and_is_stored_once(cloud: Cloud) -> None:
    agent = cloud.device("device-a")
    sealed = agent.seal(payload(), dp=DP, base_model_version="v1")
    first = agent._submit(sealed.data, timeout=5)
    second = agent._submit(sealed.data, timeout=5)
    assert first == second
    verify_receipt(first, agent.workspace.receipt_public_key(), sealed.data)
    assert len(cloud.store.list_packets()) == 1
    assert cloud.store.epsilon_spent("device-a") == pytest.approx(DP.composed_epsilon)  # charged once
    agent.close()


def test_outbox_is_resent_after_an_outage(cloud: Cloud) -> None:
    agent = cloud.device("device-a")
    sealed = agent.seal(payload(), dp=DP, base_model_version="v1")  # sealed, never sent
    assert [pid for pid, _ in agent.workspace.pending()] == [sealed.packet_id]
    (body,) = agent.flush_outbox()
    assert body.packet_id == sealed.packet_id and agent.workspace.pending() == []
    agent.close()


def test_stream_submit_above_the_unary_cap(tmp_path: Path) -> None:
    config = TransportConfig(limits=Limits(max_unary_bytes=64 * 1024), chunk_bytes=16 * 1024)
    with running_cloud(tmp_path, config=config) as cloud:
        agent = cloud.device("device-a")
        sealed = agent.seal(payload(rows=4000), dp=DP, base_model_version="v1")
        assert len(sealed.data) > config.limits.max_unary_bytes  # so it must travel streamed
        body = agent.submit(sealed.data)
        assert body.packet_id == sealed.packet_id
        stored = cloud.store.get_packet(sealed.packet_id)
        assert stored is not None and stored.packet_bytes == sealed.data
        again = agent.submit(sealed.data)  # a streamed retry is idempotent too
        assert again == body
        agent.close()


def test_server_restart_keeps_every_acknowledged_packet(tmp_path: Path) -> None:
    with running_cloud(tmp_path) as cloud:
        agent = cloud.device("device-a")
        sealed = [agent.seal(payload(i), dp=DP, base_model_version="v1") for i in range(3)]
        receipts = [agent._submit(s.data, timeout=5) for s in sealed]
        workspace, device_ws = cloud.workspace, agent.workspace
        agent.close()
    with running_cloud(tmp_path, workspace=workspace) as restarted:  # same cloud.db, new process state
        agent = restarted.agent(device_ws, enroll=False)
        assert [agent._submit(s.data, timeout=5) for s in sealed] == receipts
        assert len(restarted.store.list_packets()) == 3
        assert restarted.store.get_device("device-a").highest_counter == 3  # type: ignore[union-attr]
        agent.close()


def test_health_reports_serving(cloud: Cloud) -> None:
    agent = cloud.device("device-a", enroll=False)
    stub = health_pb2_grpc.HealthStub(agent.channel)
    for service in ("", "diredi.v1.KnowledgeService", "diredi.v1.UpdateService", "diredi.v1.EnrollmentService"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    agent.close()


def test_reflection_lists_the_services(cloud: Cloud) -> None:
    agent = cloud.device("device-a", enroll=False)
    stub = reflection_pb2_grpc.ServerReflectionStub(agent.channel)
    (response,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for s in response.list_services_response.service}
    assert {"diredi.v1.KnowledgeService", "diredi.v1.UpdateService", "diredi.v1.EnrollmentService",
            "grpc.health.v1.Health"} <= names
    agent.close()


def test_update_service_serves_metadata_and_chunked_targets(tmp_path: Path) -> None:
    config = TransportConfig(chunk_bytes=1000)
    with running_cloud(tmp_path, config=config) as cloud:
        agent = cloud.device("device-a")  # before the stand-in metadata: a kit refuses a fake root
        repo = cloud.workspace.repository_dir
        (repo / "metadata").mkdir(exist_ok=True)
        (repo / "metadata" / "1.root.json").write_bytes(b'{"root": 1}')
        (repo / "metadata" / "timestamp.json").write_bytes(b'{"ts": 1}')
        (repo / "targets" / "fleet").mkdir(parents=True)
        blob = bytes(range(256)) * 20
        (repo / "targets" / "fleet" / "abc.model.safetensors").write_bytes(blob)
        from diredi_secure.services.fetcher import GrpcReleaseFetcher

        fetcher = GrpcReleaseFetcher(agent.channel, config=config)
        assert fetcher.fetch("release:/metadata/1.root.json") is not None
        assert b"".join(fetcher.fetch("release:/metadata/1.root.json")) == b'{"root": 1}'
        assert b"".join(fetcher.fetch("release:/metadata/timestamp.json")) == b'{"ts": 1}'
        assert b"".join(fetcher.fetch("release:/targets/fleet/abc.model.safetensors")) == blob
        from tuf.api.exceptions import DownloadError, DownloadHTTPError

        with pytest.raises(DownloadHTTPError) as missing:
            b"".join(fetcher.fetch("release:/metadata/2.root.json"))
        assert missing.value.status_code == 404  # how TUF learns there is no newer root
        with pytest.raises(DownloadError):
            fetcher.download_bytes("release:/targets/fleet/abc.model.safetensors", max_length=100)
        agent.close()


def test_plain_tls_without_client_certificate_works_when_mtls_is_off(tmp_path: Path) -> None:
    with running_cloud(tmp_path, mtls=False) as cloud:
        agent = cloud.device("device-a", mtls=False)
        body = agent.submit_payload(payload(), dp=DP, base_model_version="v1")
        assert body.counter == 1
        agent.close()


def test_grpc_cap_refuses_before_our_code_with_resource_exhausted(cloud: Cloud) -> None:
    agent = cloud.device("device-a")
    with pytest.raises(grpc.RpcError) as info:
        agent._submit(b"\x00" * (cloud.config.max_message_bytes + 1), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert cloud.store.list_packets() == []
    agent.close()


def test_submit_retries_with_backoff_then_reports_unavailable(cloud: Cloud) -> None:
    import random

    from diredi_secure.services.edge import EdgeAgent, RetryPolicy
    from diredi_secure.services.status import ServiceUnavailable

    agent = cloud.device("device-a")
    sealed = agent.seal(payload(), dp=DP, base_model_version="v1")
    agent.close()
    ws = agent.workspace
    ws.update_config(target="127.0.0.1:1")  # nothing listens there
    sleeps: list[float] = []
    policy = RetryPolicy(attempts=4, base_delay_s=0.5, factor=2.0, max_delay_s=1.5)
    dead = EdgeAgent(ws, config=cloud.config, retry=policy, sleep=sleeps.append, rng=random.Random(7))
    with pytest.raises(ServiceUnavailable):
        dead.submit(sealed.data)
    assert len(sleeps) == 3  # attempts - 1 waits, each within its exponential, capped window
    for k, slept in enumerate(sleeps):
        assert 0 <= slept <= min(1.5, 0.5 * 2**k)
    assert ws.pending() != []  # still queued for later
    dead.close()
    ws.update_config(target=cloud.target)
    revived = cloud.agent(ws, enroll=False)
    assert [b.packet_id for b in revived.flush_outbox()] == [sealed.packet_id]
    revived.close()

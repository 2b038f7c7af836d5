"""Issue 14 finding 9 and the bounded streams: back-pressure, not loss.

* A burst of devices submitting at once to one real server (loopback, mTLS, SQLite) through the
  real agent: the server answers what it cannot take now with a retryable ``overloaded``
  status, the agents back off with jitter and resend, and every packet ends acknowledged by a
  receipt that verified, none lost (50 devices in the default suite, 200 marked slow).
* A stream that sends one chunk and then stalls is cancelled at ``ingest_stream_idle_s``, well
  before the server's deadline, while Health keeps answering, and its slot is free again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from diredi_secure.services.cloud import CloudServer
from diredi_secure.services.edge import EdgeAgent, RetryPolicy
from diredi_secure.services.transport import TransportConfig
from diredi_secure.services.workspace import CloudWorkspace
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diredi_secure._proto.diredi.v1 import services_pb2 as spb
from diredi_secure.envelope import ReceiptBody
from diredi_secure.packet import verify_receipt
from diredi_secure.policy import Limits
from diredi_secure.store import open_store
from tests.integration.services_harness import DP, half_open_call, payload, running_cloud


def _burst(tmp_path: Path, devices: int, caplog: pytest.LogCaptureFixture) -> None:
    now_ms = int(time.time() * 1000)
    ws = CloudWorkspace.init(tmp_path / "cloud", now_ms=now_ms)
    store = open_store(ws.store_url())
    # gRPC takes at most 8 calls at once (max_concurrent_calls) and refuses the rest, so a burst
    # of devices certainly meets the overload answer; two worker threads do the work.
    config = TransportConfig(max_concurrent_calls=8)
    server = CloudServer(store=store, keys=ws.keys(), tls=ws.server_tls(mtls=True),
                         repository_dir=ws.repository_dir, config=config, max_workers=2)
    port = server.start()
    sleeps: list[float] = []
    lock = threading.Lock()

    def sleep(seconds: float) -> None:
        with lock:
            sleeps.append(seconds)
        time.sleep(seconds)

    agents: list[EdgeAgent] = []
    try:
        for i in range(devices):
            dev = ws.provision_device(tmp_path / f"dev-{i}", f"device-{i:03d}",
                                      target=f"127.0.0.1:{port}", now_ms=now_ms)
            agent = EdgeAgent(dev, mtls=True, config=config, sleep=sleep, rng=random.Random(i),
                              retry=RetryPolicy(attempts=12, base_delay_s=0.05, max_delay_s=2.0))
            agent.enroll()
            agents.append(agent)
        barrier = threading.Barrier(devices)
        receipts: dict[str, ReceiptBody] = {}
        sent: dict[str, bytes] = {}
        failures: list[BaseException] = []

        def run(index: int, agent: EdgeAgent) -> None:
            try:
                sealed = agent.seal(payload(index), dp=DP, base_model_version="v1")
                barrier.wait(timeout=120)
                body = agent.submit(sealed.data)  # retries overload; verifies the receipt
                with lock:
                    receipts[agent.workspace.device_id] = body
                    sent[agent.workspace.device_id] = sealed.data
            except BaseException as exc:  # reported by the assertion below
                with lock:
                    failures.append(exc)

        with caplog.at_level(logging.WARNING, logger="diredi.edge"):
            threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(agents)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
        assert not failures, failures[:3]
        assert len(receipts) == devices  # every device acknowledged, none lost
        stored = store.list_packets(unmerged_only=False)
        assert len(stored) == devices and len({p.packet_id for p in stored}) == devices
        receipt_key = agents[0].workspace.receipt_public_key()
        for agent in agents:
            device_id = agent.workspace.device_id
            assert agent.workspace.pending() == []  # the outbox is empty: acknowledged
            # The receipt acknowledges exactly the bytes this device sent (verified again here).
            filed = agent.workspace.receipts / f"{receipts[device_id].packet_id.hex()}.receipt"
            verify_receipt(filed.read_bytes(), receipt_key, sent[device_id])
        overloaded = [r for r in caplog.records if "overloaded" in r.getMessage()]
        assert overloaded and sleeps, "the burst never met the overload answer"
    finally:
        for agent in agents:
            agent.close()
        server.stop(grace_s=0.5)
        store.close()


def test_50_devices_at_once_are_all_acknowledged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _burst(tmp_path, 50, caplog)


@pytest.mark.slow
def test_200_devices_at_once_are_all_acknowledged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _burst(tmp_path, 200, caplog)


def test_a_stalled_stream_is_cancelled_at_the_idle_limit_and_health_keeps_answering(
    tmp_path: Path,
) -> None:
    config = TransportConfig(limits=Limits(max_unary_bytes=64 * 1024, max_packet_bytes=256 * 1024),
                             chunk_bytes=16 * 1024, ingest_stream_idle_s=1.0,
                             ingest_stream_deadline_s=60.0)
    with running_cloud(tmp_path, config=config) as cloud:
        agent = cloud.device("device-a")
        release = threading.Event()

        def one_chunk_then_stall() -> Iterator[bytes]:
            yield spb.Chunk(offset=0, total_length=100_000, data=b"x" * 10).SerializeToString()
            release.wait(30)

        stream = agent.channel.stream_unary("/diredi.v1.KnowledgeService/SubmitStream")
        started = time.monotonic()
        call = stream.future(one_chunk_then_stall(), timeout=30)
        health = health_pb2_grpc.HealthStub(agent.channel)
        time.sleep(0.3)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            call.result(timeout=20)
        elapsed = time.monotonic() - started
        release.set()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # retryable: the device resends
        assert 0.9 <= elapsed < 10.0  # the idle limit (1 s), far from the 60 s deadline
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        # The slot is free again: the same device streams a real packet to its receipt.
        sealed = agent.seal(payload(rows=4000), dp=DP, base_model_version="v1")
        assert len(sealed.data) > config.limits.max_unary_bytes
        assert agent.submit(sealed.data).device_id == "device-a"
        assert len(cloud.store.list_packets(unmerged_only=False)) == 1


def test_a_slow_but_steady_stream_is_not_cut_by_the_idle_limit(tmp_path: Path) -> None:
    """Chunks 0.4 s apart under an idle limit of 1 s: the limit is per gap, not per stream."""
    config = TransportConfig(limits=Limits(max_unary_bytes=64 * 1024, max_packet_bytes=256 * 1024),
                             chunk_bytes=16 * 1024, ingest_stream_idle_s=1.0,
                             min_stream_bytes_per_s=1024)
    with running_cloud(tmp_path, config=config) as cloud:
        agent = cloud.device("device-a")
        data = agent.seal(payload(rows=4000), dp=DP, base_model_version="v1").data
        step = config.chunk_bytes

        def slow() -> Iterator[spb.Chunk]:
            for offset in range(0, len(data), step):
                if offset:
                    time.sleep(0.4)
                yield spb.Chunk(data=data[offset:offset + step], offset=offset,
                                total_length=len(data) if offset == 0 else 0)

        stream = agent.channel.stream_unary("/diredi.v1.KnowledgeService/SubmitStream",
                                            request_serializer=spb.Chunk.SerializeToString)
        receipt = stream(slow(), timeout=30)
        verify_receipt(receipt, agent.workspace.receipt_public_key(), data)


def test_half_open_unary_calls_hold_no_thread_and_are_dropped_at_the_arrival_limit(tmp_path: Path) -> None:
    """Attacker finding F7: on the threaded server a unary call whose request never arrived held
    one of the server's threads before any of our code ran; 20 of them made Health, GetStatus and
    Submit time out. On the asyncio server the request is read on the event loop: 24 such calls
    (three times the server's 8 threads) leave every honest call answering at once, and once the
    request arrival limit (``unary_deadline_s``) has passed they no longer count against
    ``max_concurrent_calls`` (32 here): 40 more, and honest calls still get through."""
    config = TransportConfig(unary_deadline_s=1.5, max_concurrent_calls=32, max_calls_per_device=64)
    methods = ("/grpc.health.v1.Health/Check", "/diredi.v1.EnrollmentService/GetStatus",
               "/diredi.v1.KnowledgeService/Submit")
    release = threading.Event()
    with running_cloud(tmp_path, config=config) as cloud:  # 8 server threads
        agent = cloud.device("device-a")
        health = health_pb2_grpc.HealthStub(agent.channel)
        try:
            held = [half_open_call(agent.channel, methods[i % 3], release) for i in range(24)]
            time.sleep(0.5)
            started = time.monotonic()
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert agent.status().status == "active"
            assert agent.submit_payload(payload(0), dp=DP, base_model_version="v1").device_id == "device-a"
            assert time.monotonic() - started < 5.0
            assert not any(call.done() for call in held)  # all 24 still open on the client side
            time.sleep(2.0)  # past the arrival limit: the server has dropped them
            held += [half_open_call(agent.channel, methods[i % 3], release) for i in range(40)]
            time.sleep(2.0)  # these too (64 in all against a limit of 32 at once)
            started = time.monotonic()
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert agent.submit_payload(payload(1), dp=DP, base_model_version="v1").device_id == "device-a"
            assert time.monotonic() - started < 5.0
        finally:
            release.set()

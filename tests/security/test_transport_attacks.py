"""Transport-level attacks on the asyncio cloud server that it holds (regression tests).

Each case runs a real server on loopback (tests/integration/services_harness.py) and an attacker
holding a valid device certificate (mTLS): a revoked device on every service, huge or many
metadata headers, calls cancelled mid-way in numbers (no stream slot may leak), unfinished
TCP/TLS handshakes, and unary packets at the exact size caps. Each asserts the status code and
reason the attacker gets, and that an honest call still answers after.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from diredi_secure.services.cloud import enroll_proof_message
from diredi_secure.services.edge import EdgeAgent
from diredi_secure.services.transport import TransportConfig
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from diredi_secure._crypto import sign
from diredi_secure._proto.diredi.v1 import services_pb2 as spb
from diredi_secure._proto.diredi.v1 import services_pb2_grpc as sgrpc
from diredi_secure.policy import Limits
from tests.integration.services_harness import DP, Cloud, half_open_call, payload, running_cloud

C = grpc.StatusCode
SMALL = Limits(max_unary_bytes=64 * 1024, max_packet_bytes=256 * 1024)


def _status(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), (info.value.details() or "").split(":")[0]


def _health_ok(agent: EdgeAgent) -> None:
    started = time.monotonic()
    check = health_pb2_grpc.HealthStub(agent.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert time.monotonic() - started < 5.0


def _chunks(data: bytes, step: int) -> Iterator[spb.Chunk]:
    for offset in range(0, len(data), step):
        yield spb.Chunk(data=data[offset:offset + step], offset=offset,
                        total_length=len(data) if offset == 0 else 0)


def _publish_target(cloud: Cloud, name: str, size: int) -> None:
    folder = cloud.workspace.repository_dir / "targets"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"\x5a" * size)


def test_a_revoked_device_is_refused_certificate_revoked_on_every_service(tmp_path: Path) -> None:
    with running_cloud(tmp_path, config=TransportConfig(limits=SMALL, chunk_bytes=16 * 1024)) as cloud:
        _publish_target(cloud, "t.bin", 1024)
        agent = cloud.device("device-a")
        honest = cloud.device("device-b")
        fresh = agent.seal(payload(0), dp=DP, base_model_version="v1").data
        cloud.store.revoke_device("device-a", revoked_at_ms=int(time.time() * 1000), reason="stolen")
        channel = agent.channel
        cert = agent.workspace.certificate()
        proof = sign(agent.workspace.signing_key(), enroll_proof_message(cert))
        health = health_pb2_grpc.HealthStub(channel)
        enrollment = sgrpc.EnrollmentServiceStub(channel)
        update = sgrpc.UpdateServiceStub(channel)
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        stream = channel.stream_unary("/diredi.v1.KnowledgeService/SubmitStream",
                                      request_serializer=spb.Chunk.SerializeToString)
        calls: dict[str, Callable[[], object]] = {
            "Health/Check": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5),
            "Health/Watch": lambda: next(health.Watch(health_pb2.HealthCheckRequest(), timeout=5)),
            "reflection": lambda: next(reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)),
            "GetStatus": lambda: enrollment.GetStatus(spb.DeviceStatusRequest(device_id="device-a"), timeout=5),
            "GetStatus of another device": lambda: enrollment.GetStatus(
                spb.DeviceStatusRequest(device_id="device-b"), timeout=5),
            "Enroll again": lambda: enrollment.Enroll(spb.EnrollRequest(certificate=cert, proof=proof), timeout=5),
            "Submit": lambda: channel.unary_unary("/diredi.v1.KnowledgeService/Submit")(fresh, timeout=5),
            # F5: refused before any work on the bytes (was malformed, after the parse)
            "Submit of garbage": lambda: channel.unary_unary("/diredi.v1.KnowledgeService/Submit")(
                b"\xff\xff", timeout=5),
            "SubmitStream": lambda: stream(_chunks(fresh, 16 * 1024), timeout=5),
            "SubmitStream of garbage": lambda: channel.stream_unary("/diredi.v1.KnowledgeService/SubmitStream")(
                iter([b"\xff\xff"]), timeout=5),
            "GetMetadata": lambda: update.GetMetadata(spb.MetadataRequest(role="root", version=1), timeout=5),
            "FetchTarget": lambda: next(update.FetchTarget(spb.TargetRequest(path="t.bin"), timeout=5)),
        }
        got = {name: _status(call) for name, call in calls.items()}
        assert got == {name: (C.PERMISSION_DENIED, "certificate_revoked") for name in calls}
        assert [p.device_id for p in cloud.store.list_packets(unmerged_only=False)] == []
        _health_ok(honest)
        assert honest.status().status == "active"


def test_huge_or_many_metadata_headers_are_refused_and_the_server_keeps_answering(tmp_path: Path) -> None:
    with running_cloud(tmp_path) as cloud:
        agent = cloud.device("device-a")
        tls = agent.workspace.client_tls()
        channel = grpc.secure_channel(
            cloud.target, grpc.ssl_channel_credentials(tls.root_pem, tls.key_pem, tls.cert_pem),
            options=[("grpc.ssl_target_name_override", "localhost"),
                     ("grpc.max_metadata_size", 64 << 20), ("grpc.absolute_max_metadata_size", 64 << 20)])
        health = health_pb2_grpc.HealthStub(channel)
        enrollment = sgrpc.EnrollmentServiceStub(channel)
        shapes = {"one 1 MB header": [("x-a", "a" * 1_000_000)],
                  "one 100 kB binary header": [("x-b-bin", b"\x00\xff" * 50_000)],
                  "500 small headers": [(f"x-{i}", "v" * 20) for i in range(500)],
                  "1000 copies of a header": [("x-d", "v")] * 1000}
        try:
            for _ in range(5):
                for name, metadata in shapes.items():
                    for call in (lambda md=metadata: health.Check(health_pb2.HealthCheckRequest(), timeout=5,
                                                                  metadata=md),
                                 lambda md=metadata: enrollment.GetStatus(
                                     spb.DeviceStatusRequest(device_id="device-a"), timeout=5, metadata=md)):
                        code, _ = _status(call)
                        assert code == C.RESOURCE_EXHAUSTED, name
            _health_ok(agent)
            assert agent.status().status == "active"
            assert agent.submit_payload(payload(0), dp=DP, base_model_version="v1").device_id == "device-a"
        finally:
            channel.close()


def _until(deadline_s: float, attempt: Callable[[], bool]) -> bool:
    """True once ``attempt()`` is; the server releases a cancelled call's slot asynchronously."""
    end = time.monotonic() + deadline_s
    while True:
        if attempt():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.2)


def test_calls_cancelled_midway_in_numbers_leak_no_stream_slot(tmp_path: Path) -> None:
    """60 FetchTarget, Health/Watch and SubmitStream calls, each cancelled after it started
    (RST_STREAM), against 2 slots of each kind: afterwards both slots of each kind serve."""
    config = TransportConfig(limits=SMALL, chunk_bytes=16 * 1024, max_fetch_streams=2, max_watch_streams=2,
                             max_ingest_streams=2)
    with running_cloud(tmp_path, config=config) as cloud:
        _publish_target(cloud, "t.bin", 1 << 20)
        attacker = cloud.device("device-x")
        honest = [cloud.device("device-a"), cloud.device("device-b")]
        fetch = sgrpc.UpdateServiceStub(attacker.channel).FetchTarget
        watch = health_pb2_grpc.HealthStub(attacker.channel).Watch
        stream = attacker.channel.stream_unary("/diredi.v1.KnowledgeService/SubmitStream")
        codes = set()
        for i in range(60):
            try:
                if i % 3 == 0:
                    call = fetch(spb.TargetRequest(path="t.bin"), timeout=10)
                    next(call)
                    call.cancel()
                elif i % 3 == 1:
                    call = watch(health_pb2.HealthCheckRequest(), timeout=10)
                    next(call)
                    call.cancel()
                else:
                    done = threading.Event()

                    def one_chunk(done: threading.Event = done) -> Iterator[bytes]:
                        yield spb.Chunk(offset=0, total_length=100_000, data=b"x" * 1000).SerializeToString()
                        done.wait(5)

                    future = stream.future(one_chunk(), timeout=10)
                    time.sleep(0.02)
                    future.cancel()
                    done.set()
            except grpc.RpcError as exc:  # a slot still held by the previous cancelled call
                codes.add((exc.code(), (exc.details() or "").split(":")[0]))
        assert codes <= {(C.UNAVAILABLE, "overloaded")}

        def two_fetches() -> bool:
            calls = [sgrpc.UpdateServiceStub(a.channel).FetchTarget(spb.TargetRequest(path="t.bin"), timeout=10)
                     for a in honest]
            try:
                return all(len(next(c).data) > 0 for c in calls)
            except grpc.RpcError:
                return False
            finally:
                for c in calls:
                    c.cancel()

        def two_watches() -> bool:
            calls = [health_pb2_grpc.HealthStub(a.channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
                     for a in honest]
            try:
                return all(next(c).status == health_pb2.HealthCheckResponse.SERVING for c in calls)
            except grpc.RpcError:
                return False
            finally:
                for c in calls:
                    c.cancel()

        assert _until(5.0, two_fetches)
        assert _until(5.0, two_watches)
        for agent in honest:  # two streamed packets (both ingest slots) to their receipts
            sealed = agent.seal(payload(rows=4000), dp=DP, base_model_version="v1")
            assert len(sealed.data) > SMALL.max_unary_bytes
            assert agent.submit(sealed.data).device_id == agent.workspace.device_id
        _health_ok(honest[0])


def test_unfinished_tcp_and_tls_handshakes_do_not_delay_honest_calls(tmp_path: Path) -> None:
    with running_cloud(tmp_path) as cloud:
        agent = cloud.device("device-a")
        sockets = []
        try:
            for i in range(100):
                sock = socket.create_connection(("127.0.0.1", cloud.port), timeout=5)
                if i % 2:  # the start of a TLS ClientHello, never finished
                    sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20)
                sockets.append(sock)
            time.sleep(0.5)
            _health_ok(agent)
            assert agent.status().status == "active"
            assert agent.submit_payload(payload(0), dp=DP, base_model_version="v1").device_id == "device-a"
        finally:
            for sock in sockets:
                sock.close()


def test_unary_submit_at_the_exact_size_caps_gets_typed_refusals(tmp_path: Path) -> None:
    config = TransportConfig(limits=SMALL, chunk_bytes=16 * 1024)
    with running_cloud(tmp_path, config=config) as cloud:
        agent = cloud.device("device-a")
        tls = agent.workspace.client_tls()
        channel = grpc.secure_channel(
            cloud.target, grpc.ssl_channel_credentials(tls.root_pem, tls.key_pem, tls.cert_pem),
            options=[("grpc.ssl_target_name_override", "localhost"), ("grpc.max_send_message_length", 64 << 20)])
        submit = channel.unary_unary("/diredi.v1.KnowledgeService/Submit")
        cap, message_cap = SMALL.max_unary_bytes, config.max_message_bytes
        try:
            sizes = {cap: (C.INVALID_ARGUMENT, "malformed"), cap + 1: (C.RESOURCE_EXHAUSTED, "too_large"),
                     message_cap: (C.RESOURCE_EXHAUSTED, "too_large")}
            for size, expected in sizes.items():
                data = b"\x00" * size
                assert _status(lambda: submit(data, timeout=5)) == expected, size  # noqa: B023
            code, _ = _status(lambda: submit(b"\x00" * (message_cap + 1), timeout=5))
            assert code == C.RESOURCE_EXHAUSTED  # gRPC's own message cap, on the server
            assert cloud.store.list_packets(unmerged_only=False) == []
            _health_ok(agent)
        finally:
            channel.close()


def test_one_caller_cannot_hold_the_servers_call_limit(tmp_path: Path) -> None:
    """Attacker finding F1 (grpc.aio): 200 half-open calls from one device took all of the
    server's concurrent calls and 90 of 114 honest calls failed RESOURCE_EXHAUSTED. A device may
    hold ``max_calls_per_device`` calls open; the rest are refused ``overloaded`` at once, before
    their request is read, and everyone else is served."""
    config = TransportConfig(max_concurrent_calls=32, max_calls_per_device=4)
    release = threading.Event()
    with running_cloud(tmp_path, config=config) as cloud:
        attacker = cloud.device("device-a")
        honest = cloud.device("device-b")
        try:
            held = [half_open_call(attacker.channel, "/grpc.health.v1.Health/Check", release) for _ in range(60)]
            time.sleep(1.0)
            refused = [call for call in held if call.done()]
            assert len(refused) == 56  # all but the 4 the device may hold
            assert {(c.exception().code(), (c.exception().details() or "").split(":")[0])  # type: ignore[union-attr]
                    for c in refused} == {(C.UNAVAILABLE, "overloaded")}
            for _ in range(5):
                _health_ok(honest)
                assert honest.status().status == "active"
            assert honest.submit_payload(payload(0), dp=DP, base_model_version="v1").device_id == "device-b"
        finally:
            release.set()


@pytest.mark.parametrize("mtls", [True, False], ids=["mtls", "no-mtls"])
def test_requests_that_do_not_decode_are_malformed_never_unknown(tmp_path: Path, mtls: bool) -> None:
    """Attacker finding F3: three bytes that are no protobuf message, sent to any protobuf
    method, were answered UNKNOWN "Unexpected <class DecodeError>: Error parsing message with
    type ..." (gRPC's own text). Now each is ``malformed`` (INVALID_ARGUMENT)."""
    methods = ["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
               "/diredi.v1.EnrollmentService/GetStatus", "/diredi.v1.EnrollmentService/Enroll",
               "/diredi.v1.UpdateService/GetMetadata", "/diredi.v1.UpdateService/FetchTarget",
               "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"]
    with running_cloud(tmp_path, mtls=mtls) as cloud:
        agent = cloud.device("device-a")
        got = {}
        for method in methods:
            call = agent.channel.stream_stream(method)(iter([b"\xff\xff\xff"]), timeout=5)
            got[method] = _status(lambda call=call: list(call))  # type: ignore[misc]
        assert got == {m: (C.INVALID_ARGUMENT, "malformed") for m in methods}
        _health_ok(agent)


def test_refused_unary_calls_do_not_keep_their_request_bytes(tmp_path: Path) -> None:
    """Attacker finding F2: every refused 4 MiB unary Submit stayed in memory until Python's
    cycle collector ran (grpc.aio keeps the AbortError in a reference cycle, and the error chained
    to frames holding the request): RSS 106 MB -> 5 GB in 40 s. With the collector off here,
    40 refused 1 MiB calls leave well under 40 MiB behind."""
    import gc
    import tracemalloc

    with running_cloud(tmp_path, config=TransportConfig(limits=Limits(max_unary_bytes=2 * 1024 * 1024))) as cloud:
        agent = cloud.device("device-a")
        submit = agent.channel.unary_unary("/diredi.v1.KnowledgeService/Submit")
        junk = b"\x01" * (1024 * 1024)
        assert _status(lambda: submit(junk, timeout=10)) == (C.INVALID_ARGUMENT, "malformed")
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            codes = set()
            for i in range(40):
                try:  # not pytest.raises: its ExceptionInfo keeps this side's frames (and bytes)
                    submit(junk[:-1 - i], timeout=10)
                except grpc.RpcError as exc:
                    codes.add(exc.code())
            assert codes <= {C.INVALID_ARGUMENT, C.UNAVAILABLE}  # malformed, then rate limited
            time.sleep(0.5)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            gc.enable()
        assert grown < 12 * 1024 * 1024, f"{grown / 2**20:.1f} MiB stayed behind"
        _health_ok(agent)


def test_undecodable_packets_without_mtls_are_rate_limited_per_host(tmp_path: Path) -> None:
    """Attacker finding F6: without mTLS, bytes that do not parse as a packet have no device, and
    1,532 refused 4 MiB calls in 20 s were never limited. They now count for their host
    (``unparsed@host``) and are answered ``rate_limited`` past the limit."""
    from diredi_secure.services.ratelimit import RefusalLimits

    limits = RefusalLimits(refusals_per_window=3, refusal_window_s=60.0, refusal_cooldown_s=60.0)
    with running_cloud(tmp_path, mtls=False, config=TransportConfig(refusals=limits)) as cloud:
        agent = cloud.device("device-a")
        submit = agent.channel.unary_unary("/diredi.v1.KnowledgeService/Submit")
        codes = [_status(lambda: submit(b"\x01" * 1000, timeout=5)) for _ in range(6)]
        assert codes[:4] == [(C.INVALID_ARGUMENT, "malformed")] * 4
        assert codes[4:] == [(C.UNAVAILABLE, "rate_limited")] * 2
        # a real packet of a device on that host is not touched by the junk's cool-down
        assert agent.submit_payload(payload(0), dp=DP, base_model_version="v1").device_id == "device-a"


def test_a_connection_that_never_finishes_its_handshake_is_closed(tmp_path: Path) -> None:
    """Attacker note: silent TCP connections and unfinished TLS handshakes stayed open for
    gRPC's default 120 s; ``handshake_timeout_ms`` closes them."""
    with running_cloud(tmp_path, config=TransportConfig(handshake_timeout_ms=1000)) as cloud:
        sock = socket.create_connection(("127.0.0.1", cloud.port), timeout=10)
        try:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20)
            started = time.monotonic()
            assert sock.recv(1024) == b""  # closed by the server
            assert time.monotonic() - started < 8.0
        finally:
            sock.close()


def test_one_caller_cannot_hold_every_fetch_or_watch_slot(tmp_path: Path) -> None:
    """Attacker finding F4: one device with 4 unread FetchTarget streams and 2 Watch calls held
    every slot, and every other device's fetch and watch was refused until the stream deadline.
    A caller may now hold ``max_fetch_streams_per_caller`` fetches and
    ``max_watch_streams_per_caller`` watches; everyone else is still served."""
    with running_cloud(tmp_path, config=TransportConfig(max_fetch_streams=4, max_watch_streams=2)) as cloud:
        _publish_target(cloud, "big.bin", 8 * 1024 * 1024)
        attacker = cloud.device("device-a")
        honest = cloud.device("device-b")
        a_update = sgrpc.UpdateServiceStub(attacker.channel)
        held = [a_update.FetchTarget(spb.TargetRequest(path="big.bin"), timeout=30) for _ in range(2)]
        watch = health_pb2_grpc.HealthStub(attacker.channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        try:
            for call in held:
                next(call)  # served: one chunk read, then never again
            next(watch)
            assert _status(lambda: next(a_update.FetchTarget(spb.TargetRequest(path="big.bin"), timeout=5))) \
                == (C.UNAVAILABLE, "overloaded")
            assert _status(lambda: next(health_pb2_grpc.HealthStub(attacker.channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=5))) == (C.UNAVAILABLE, "overloaded")
            h_update = sgrpc.UpdateServiceStub(honest.channel)
            got = sum(len(c.data) for c in h_update.FetchTarget(spb.TargetRequest(path="big.bin"), timeout=30))
            assert got == 8 * 1024 * 1024
            first = next(health_pb2_grpc.HealthStub(honest.channel).Watch(health_pb2.HealthCheckRequest(), timeout=5))
            assert first.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            for call in (*held, watch):
                call.cancel()


def test_a_reflection_message_over_64_kib_is_malformed(tmp_path: Path) -> None:
    """Attacker re-test (F2 through reflection): a 4 MiB message per reflection call was kept
    until the cycle collector ran (106 MB -> 1.8 GB in 30 s). Reflection requests are a few
    hundred bytes: one over 64 KiB is refused ``malformed`` without being decoded."""
    with running_cloud(tmp_path, mtls=False) as cloud:
        agent = cloud.device("device-a")
        reflect = reflection_pb2_grpc.ServerReflectionStub(agent.channel)
        big = reflection_pb2.ServerReflectionRequest(file_by_filename="x" * (65 * 1024))
        assert _status(lambda: list(reflect.ServerReflectionInfo(iter([big]), timeout=5))) == \
            (C.INVALID_ARGUMENT, "malformed")
        small = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(reflect.ServerReflectionInfo(iter([small]), timeout=5))
        assert any(s.name == "diredi.v1.KnowledgeService" for s in answer.list_services_response.service)


def test_without_mtls_fresh_device_ids_do_not_escape_the_refusal_limit(tmp_path: Path) -> None:
    """Attacker re-test (F6 bypass): a client declaring a new device id on every packet was a new
    key each time and was never limited (902 of 902 refusals fully processed). Every refusal
    without mTLS also counts for the caller's host, at 8 times the per-device limit."""
    from diredi_secure.services.ratelimit import RefusalLimits

    limits = RefusalLimits(refusals_per_window=1, refusal_window_s=60.0, refusal_cooldown_s=60.0)
    with running_cloud(tmp_path, mtls=False, config=TransportConfig(refusals=limits)) as cloud:
        ghosts = [cloud.device(f"ghost-{i}", enroll=False) for i in range(11)]
        submit = ghosts[0].channel.unary_unary("/diredi.v1.KnowledgeService/Submit")
        packets = [g.seal(payload(i), dp=DP, base_model_version="v1").data for i, g in enumerate(ghosts)]
        reasons = [_status(lambda data=data: submit(data, timeout=5))[1] for data in packets]  # type: ignore[misc]
        assert reasons[:9] == ["unknown_device"] * 9  # each a fresh device: never over its own limit
        assert reasons[9:] == ["rate_limited"] * 2  # the host is, past 8 refusals
        # ... and its streams are refused before a chunk is read (they were received in full):
        # a truncated stream is answered rate_limited, not malformed after its bytes
        stream = ghosts[0].channel.stream_unary("/diredi.v1.KnowledgeService/SubmitStream",
                                                request_serializer=spb.Chunk.SerializeToString)
        head = [next(_chunks(packets[0], 1024))]
        assert _status(lambda: stream(iter(head), timeout=5)) == (C.UNAVAILABLE, "rate_limited")


def test_ipv6_callers_are_keyed_on_their_64_prefix() -> None:
    """Per-host limits key an IPv6 caller on its /64 (one subscriber's allocation), or a client
    could be a fresh "host" per call; IPv4-mapped addresses are their IPv4 host."""
    from diredi_secure.services.cloud import _peer_host

    class _Ctx:
        def __init__(self, peer: str) -> None:
            self._peer = peer

        def peer(self) -> str:
            return self._peer

    a = _peer_host(_Ctx("ipv6:[2001:db8:1:2:aaaa::1]:5000"))  # type: ignore[arg-type]
    b = _peer_host(_Ctx("ipv6:[2001:db8:1:2:bbbb:cccc:dddd:9]:6000"))  # type: ignore[arg-type]
    assert a == b == "2001:db8:1:2::/64"
    assert _peer_host(_Ctx("ipv6:[2001:db8:1:3::1]:1")) != a  # type: ignore[arg-type]
    assert _peer_host(_Ctx("ipv6:[::ffff:10.0.0.1]:1")) == "10.0.0.1"  # type: ignore[arg-type]
    assert _peer_host(_Ctx("ipv4:10.0.0.1:5")) == "10.0.0.1"  # type: ignore[arg-type]
    assert _peer_host(_Ctx("unix:/tmp/x")) is None  # type: ignore[arg-type]

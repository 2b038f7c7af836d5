"""Issue 14: a per-device limit on refusals. A device whose packets keep being refused is answered
``rate_limited`` (UNAVAILABLE, retryable) before any signature, HPKE or accountant work, for a
cool-down; honest devices are unaffected; memory stays bounded whatever ids arrive."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from diredi_secure.services import cloud as cloud_module
from diredi_secure.services.config import parse_config
from diredi_secure.services.ratelimit import RATE_LIMITED, RefusalLimiter, RefusalLimits
from diredi_secure.services.status import ServiceUnavailable
from diredi_secure.services.transport import TransportConfig

from diredi_secure.errors import ConfigError
from tests.integration.services_harness import DP, Cloud, payload, running_cloud


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


LIMITS = RefusalLimits(refusals_per_window=3, refusal_window_s=10.0, refusal_cooldown_s=30.0,
                       refusal_tracked_devices=1000)


# -- the limiter alone ------------------------------------------------------------------------------
def test_a_device_over_the_limit_is_cooled_down_then_let_back() -> None:
    clock = FakeClock()
    limiter = RefusalLimiter(LIMITS, clock=clock)
    for _ in range(3):
        limiter.refused("dev-bad")
        limiter.check("dev-bad")  # at the limit, not over it
    limiter.refused("dev-bad")
    with pytest.raises(ServiceUnavailable) as info:
        limiter.check("dev-bad")
    assert info.value.reason == RATE_LIMITED
    limiter.check("dev-good")  # others are not touched
    clock.now += 29.0
    with pytest.raises(ServiceUnavailable):
        limiter.check("dev-bad")
    clock.now += 1.0  # the cool-down is over: counted afresh
    limiter.check("dev-bad")
    for _ in range(3):
        limiter.refused("dev-bad")
    limiter.check("dev-bad")



def test_expired_cool_downs_are_dropped_so_nobody_pays_for_them() -> None:
    # Attacker note: one cooled device that never came back kept cooling_down() true for good,
    # and every later packet without mTLS paid an extra header parse.
    clock = FakeClock()
    limiter = RefusalLimiter(LIMITS, clock=clock)
    for device in ("dev-a", "dev-b"):
        for _ in range(4):
            limiter.refused(device)
    assert limiter.cooling_down() and limiter.tracked()[1] == 2
    clock.now += 30.0
    assert not limiter.cooling_down() and limiter.tracked()[1] == 0

def test_the_window_expires_with_the_clock() -> None:
    clock = FakeClock()
    limiter = RefusalLimiter(LIMITS, clock=clock)
    for _ in range(3):
        limiter.refused("dev-a")
    clock.now += 10.0  # the window is over: its three refusals no longer count
    for _ in range(3):
        limiter.refused("dev-a")
    limiter.check("dev-a")
    limiter.refused("dev-a")  # the fourth within this window
    with pytest.raises(ServiceUnavailable):
        limiter.check("dev-a")


def test_memory_is_bounded_under_100k_fake_ids_and_a_cooled_device_stays_cooled() -> None:
    clock = FakeClock()
    limiter = RefusalLimiter(LIMITS, clock=clock)
    for _ in range(4):
        limiter.refused("dev-bad")
    for i in range(100_000):
        limiter.refused(f"fake-{i}")
    counted, cooling = limiter.tracked()
    assert counted <= LIMITS.refusal_tracked_devices and cooling == 1
    with pytest.raises(ServiceUnavailable):  # fresh ids evicted counters, not the cool-down
        limiter.check("dev-bad")
    for i in range(5000):  # ids that all earn a cool-down: that LRU is bounded too
        for _ in range(4):
            limiter.refused(f"loud-{i}")
    counted, cooling = limiter.tracked()
    assert counted <= LIMITS.refusal_tracked_devices and cooling == LIMITS.refusal_tracked_devices


def test_zero_turns_the_limit_off() -> None:
    limiter = RefusalLimiter(RefusalLimits(refusals_per_window=0))
    for _ in range(100):
        limiter.refused("dev-a")
    limiter.check("dev-a")
    assert limiter.tracked() == (0, 0)


def test_limits_come_from_the_limits_section_of_cloud_toml() -> None:
    cfg = parse_config("[limits]\nrefusals_per_window = 5\nrefusal_cooldown_s = 12\nmax_entries = 4\n")
    assert cfg.refusals.refusals_per_window == 5 and cfg.refusals.refusal_cooldown_s == 12.0
    assert cfg.limits.max_entries == 4
    assert cfg.transport_config().refusals == cfg.refusals
    assert parse_config(cfg.to_toml()) == cfg  # `config show` round-trips
    assert parse_config("").refusals == RefusalLimits()
    for bad in ("refusals_per_window = -1", "refusal_window_s = 0", "refusals_per_window = 1.5",
                "refusal_tracked_devices = 0", "refusal_bogus = 1"):
        with pytest.raises(ConfigError):
            parse_config(f"[limits]\n{bad}\n")


# -- through a real server ----------------------------------------------------------------------------
@pytest.fixture(params=[True, False], ids=["mtls", "tls"])
def limited(request: pytest.FixtureRequest, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Cloud, FakeClock, list[int]]]:
    opened: list[int] = []
    real_open = cloud_module.open_packet

    def counting_open(*args: object, **kwargs: object) -> object:
        opened.append(1)  # every call here is signature + HPKE + accountant work
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cloud_module, "open_packet", counting_open)
    clock = FakeClock()
    with running_cloud(tmp_path, mtls=request.param, config=TransportConfig(refusals=LIMITS)) as cloud:
        cloud.server.ingest.refusals = RefusalLimiter(LIMITS, clock=clock)
        yield cloud, clock, opened


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 1  # inside the ciphertext: SignatureInvalid
    return bytes(b)


def _submit(channel: grpc.Channel, data: bytes) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/diredi.v1.KnowledgeService/Submit")(data, timeout=10)
    return info.value.code(), (info.value.details() or "").split(":")[0]


def test_invalid_packets_get_a_device_rate_limited_before_any_work(
    limited: tuple[Cloud, FakeClock, list[int]],
) -> None:
    cloud, clock, opened = limited
    bad, good = cloud.device("device-bad"), cloud.device("device-good")
    for _ in range(4):
        invalid = _flip(bad.seal(payload(0), dp=DP, base_model_version="v1").data)
        assert _submit(bad.channel, invalid) == (grpc.StatusCode.UNAUTHENTICATED, "signature_invalid")
    assert len(opened) == 4
    valid = bad.seal(payload(1), dp=DP, base_model_version="v1").data
    assert _submit(bad.channel, valid) == (grpc.StatusCode.UNAVAILABLE, RATE_LIMITED)
    assert _submit(bad.channel, _flip(valid)) == (grpc.StatusCode.UNAVAILABLE, RATE_LIMITED)
    assert len(opened) == 4  # refused before open_packet: no signature, HPKE or accountant work
    assert cloud.store.list_packets(unmerged_only=False) == []

    assert good.submit_payload(payload(2), dp=DP, base_model_version="v1").device_id == "device-good"

    # The device's agent sees a retryable refusal, backs off, and keeps the packet in its outbox.
    sleeps = len(cloud.sleeps)
    with pytest.raises(ServiceUnavailable):
        bad.submit(valid)
    assert len(cloud.sleeps) - sleeps == bad.retry.attempts - 1
    assert [p for p, _ in bad.workspace.pending()]
    clock.now += LIMITS.refusal_cooldown_s
    bodies = bad.flush_outbox()
    assert {b.device_id for b in bodies} == {"device-bad"} and bad.workspace.pending() == []


def test_a_refused_stream_counts_and_a_cooled_device_cannot_open_one(
    limited: tuple[Cloud, FakeClock, list[int]],
) -> None:
    from diredi_secure._proto.diredi.v1 import services_pb2 as spb

    cloud, _, _ = limited
    if not cloud.mtls:
        pytest.skip("streams are keyed on the mTLS peer before a byte is read")
    bad = cloud.device("device-bad")
    stream = bad.channel.stream_unary("/diredi.v1.KnowledgeService/SubmitStream",
                                      request_serializer=spb.Chunk.SerializeToString)
    for _ in range(4):
        with pytest.raises(grpc.RpcError) as info:
            stream(iter([spb.Chunk(offset=0, total_length=10**12, data=b"x")]), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as info:
        stream(iter([spb.Chunk(offset=0, total_length=10, data=b"x")]), timeout=10)
    assert (info.value.code(), (info.value.details() or "").split(":")[0]) == (
        grpc.StatusCode.UNAVAILABLE, RATE_LIMITED)


@pytest.mark.parametrize("mtls", [True, False], ids=["mtls", "no-mtls"])
def test_refused_enrolments_are_rate_limited_too(tmp_path: Path, mtls: bool) -> None:
    """Each refused Enroll cost the cloud a certificate chain check and a signature check, and
    was never counted: a device (or, without mTLS, a host) sending bad enrolments in a loop is
    cooled down like one sending bad packets, and answered ``rate_limited`` before that work."""
    from diredi_secure._proto.diredi.v1 import services_pb2 as spb
    from diredi_secure._proto.diredi.v1 import services_pb2_grpc as sgrpc

    with running_cloud(tmp_path, mtls=mtls, config=TransportConfig(refusals=LIMITS)) as cloud:
        agent = cloud.device("device-a", enroll=False)
        stub = sgrpc.EnrollmentServiceStub(agent.channel)
        cert = agent.workspace.certificate()
        bad = spb.EnrollRequest(certificate=cert, proof=b"\x00" * 64)
        for _ in range(LIMITS.refusals_per_window + 1):
            with pytest.raises(grpc.RpcError) as info:
                stub.Enroll(bad, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED or \
                (info.value.details() or "").startswith("signature_invalid")
        with pytest.raises(grpc.RpcError) as info:
            stub.Enroll(bad, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (info.value.details() or "").startswith(RATE_LIMITED)
        assert cloud.store.get_device("device-a") is None
        if mtls:  # another device is not touched; without mTLS the whole host waits
            assert cloud.device("device-b").status().status == "active"

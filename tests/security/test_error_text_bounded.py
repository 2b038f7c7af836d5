"""A refusal never repeats a peer's string at full length (attack F6).

A packet whose header carried a 10,000-character ``base_model_version`` was refused with a
10,036-character status message; over gRPC the client then saw RESOURCE_EXHAUSTED (its metadata
limit) instead of ``malformed``. The core clips every peer value it quotes (``knowledge.shown``),
and ``status.details_for`` caps the whole details string as a last line of defence.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from diredi_secure.services.edge import EdgeAgent
from diredi_secure.services.status import details_for

from diredi_secure import _crypto
from diredi_secure._proto.diredi.v1 import packet_pb2 as pb
from diredi_secure.envelope import ENVELOPE_VERSION, SignedEnvelope
from diredi_secure.errors import MalformedPacket, PayloadInvalid
from diredi_secure.knowledge import (
    SHOWN_CHARS,
    PayloadKind,
    PayloadTensor,
    clipped,
    encode_payload,
    shown,
)
from diredi_secure.packet import seal_packet, signed_transcript
from diredi_secure.serde import envelope_from_bytes, envelope_to_bytes, header_from_bytes
from tests.integration.services_harness import DP, Cloud, payload, running_cloud

LONG = 10_000
SHORT_MESSAGE = 300  # every refusal below fits well under this


def _header_with(data: bytes, mutate: Callable[[pb.PacketHeader], None]) -> bytes:
    msg = pb.PacketHeader.FromString(envelope_from_bytes(data).header)
    mutate(msg)
    return msg.SerializeToString(deterministic=True)


def _sealed(device_key: _crypto.SigningKey, inbox: _crypto.InboxPublicKey, device_id: str) -> bytes:
    return seal_packet(payload(0), device_key=device_key, device_id=device_id, counter=1,
                       base_model_version="v1", dp=DP, inbox=inbox, now_ms=int(time.time() * 1000),
                       random_bytes=lambda n: b"\x01" * n).data  # fmt: skip


def _long_version(h: pb.PacketHeader) -> None:
    h.base_model_version = "v" * LONG


def _long_device_id(h: pb.PacketHeader) -> None:
    h.device_id = "d" * LONG


# -- the library ---------------------------------------------------------------------------------
def test_clipped_and_shown_bound_their_output() -> None:
    assert clipped("abc") == "abc" and shown("abc") == "'abc'"
    long = clipped("x" * LONG)
    assert long.startswith("x" * SHOWN_CHARS) and len(long) < SHOWN_CHARS + 40
    assert f"{LONG} chars" in long
    assert len(shown("y" * LONG)) < SHOWN_CHARS + 40


@pytest.mark.parametrize("mutate", [_long_version, _long_device_id], ids=["version", "device_id"])
def test_a_long_header_field_is_malformed_with_a_short_message(
    mutate: Callable[[pb.PacketHeader], None],
) -> None:
    packet = _sealed(_crypto.generate_signing_key(), _crypto.generate_inbox_key().public_key, "dev-1")
    with pytest.raises(MalformedPacket) as info:
        header_from_bytes(_header_with(packet, mutate))
    assert len(info.value.one_line()) < SHORT_MESSAGE, len(info.value.one_line())
    assert "clipped" in info.value.message


def test_sealing_with_a_long_version_is_refused_with_a_short_message() -> None:
    with pytest.raises(MalformedPacket) as info:
        seal_packet(payload(0), device_key=_crypto.generate_signing_key(), device_id="dev-1",
                    counter=1, base_model_version="v" * LONG, dp=DP,
                    inbox=_crypto.generate_inbox_key().public_key, now_ms=int(time.time() * 1000),
                    random_bytes=lambda n: b"\x01" * n)  # fmt: skip
    assert len(info.value.one_line()) < SHORT_MESSAGE


def test_a_long_entry_name_is_refused_with_a_short_message() -> None:
    with pytest.raises(PayloadInvalid) as info:
        PayloadTensor("n" * LONG, PayloadKind.REFERENCE_LOGITS, payload(0).tensors[0].values, "float16")
    assert len(info.value.one_line()) < SHORT_MESSAGE


def test_details_for_caps_the_whole_details() -> None:
    details = details_for(MalformedPacket("z" * 1_000_000))
    assert len(details) <= 1000 and details.startswith("malformed: ") and details.endswith("[clipped]")
    assert details_for(MalformedPacket("short")) == "malformed: short"


# -- over gRPC -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cloud, EdgeAgent]]:
    with running_cloud(tmp_path_factory.mktemp("error-text")) as cloud:
        agent = cloud.device("device-a")
        yield cloud, agent
        agent.close()


def _resealed(agent: EdgeAgent, mutate: Callable[[pb.PacketHeader], None]) -> bytes:
    """An honest packet from the enrolled device with ``mutate`` applied to its header, encrypted
    and signed again, so only the long field is wrong."""
    ws = agent.workspace
    pid = hashlib.sha256(f"pid-{time.perf_counter_ns()}".encode()).digest()[:16]
    data = seal_packet(payload(0), device_key=ws.signing_key(), device_id=ws.device_id,
                       counter=int(time.time() * 1000), base_model_version="v1", dp=DP,
                       inbox=ws.inbox_public_key(), now_ms=int(time.time() * 1000),
                       random_bytes=lambda n: pid, device_certificate=ws.certificate()).data  # fmt: skip
    env = envelope_from_bytes(data)
    header = _header_with(data, mutate)
    enc, ct = _crypto.hpke_seal(_crypto.HpkeSuite(pb.PacketHeader.FromString(header).suite),
                                ws.inbox_public_key(), encode_payload(payload(0))[0], header)  # fmt: skip
    sig = _crypto.sign(ws.signing_key(), signed_transcript(header, enc, ct))
    return envelope_to_bytes(SignedEnvelope(ENVELOPE_VERSION, header, enc, ct, sig, env.device_certificate))


@pytest.mark.parametrize("mutate", [_long_version, _long_device_id], ids=["version", "device_id"])
def test_a_long_header_field_is_malformed_over_grpc(
    served: tuple[Cloud, EdgeAgent], mutate: Callable[[pb.PacketHeader], None]
) -> None:
    _, agent = served
    submit = agent.channel.unary_unary("/diredi.v1.KnowledgeService/Submit")
    with pytest.raises(grpc.RpcError) as info:
        submit(_resealed(agent, mutate), timeout=10)
    details = info.value.details() or ""
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), details[:200])
    assert details.startswith("malformed:") and len(details) < SHORT_MESSAGE, details[:200]

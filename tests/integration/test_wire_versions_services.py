"""Both wire versions through the real server on loopback (mTLS, SQLite): unary and streamed."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import grpc
import pytest
from diredi_secure.services.edge import EdgeAgent
from diredi_secure.services.transport import TransportConfig

from diredi_secure.packet import packet_digest, seal_packet, verify_receipt
from diredi_secure.policy import Limits, PacketPolicy
from diredi_secure.serde import CiphertextHasher, envelope_from_bytes

from .services_harness import DP, payload, running_cloud

# Unary up to 64 KiB, streams in 16 KiB chunks: a 4,000-row payload must stream.
CONFIG = TransportConfig(limits=Limits(max_unary_bytes=64 * 1024), chunk_bytes=16 * 1024)


def _seal(agent: EdgeAgent, counter: int, *, wire_version: int, rows: int) -> bytes:
    ws = agent.workspace
    return seal_packet(
        payload(counter, rows=rows), device_key=ws.signing_key(), device_id=ws.device_id,
        counter=counter, base_model_version="v1", dp=DP, inbox=ws.inbox_public_key(),
        now_ms=int(time.time() * 1000), random_bytes=lambda n: hashlib.sha256(b"%d" % counter).digest()[:n],
        device_certificate=ws.certificate(), wire_version=wire_version,
    ).data


def test_the_edge_agent_seals_version_2(tmp_path: Path) -> None:
    with running_cloud(tmp_path, config=CONFIG) as cloud:
        agent = cloud.device("device-a")
        sealed = agent.seal(payload(), dp=DP, base_model_version="v1")
        assert envelope_from_bytes(sealed.data).envelope_version == 2
        agent.submit(sealed.data)
        agent.close()


@pytest.mark.parametrize("rows", [64, 4000], ids=["unary", "streamed"])
def test_both_versions_are_stored_and_acknowledged(tmp_path: Path, rows: int) -> None:
    with running_cloud(tmp_path, config=CONFIG) as cloud:
        agent = cloud.device("device-a")
        for counter, version in ((1, 1), (2, 2)):
            data = _seal(agent, counter, wire_version=version, rows=rows)
            assert (len(data) > CONFIG.limits.max_unary_bytes) == (rows == 4000)
            body = agent.submit(data)
            stored = cloud.store.get_packet(body.packet_id)
            assert stored is not None and stored.packet_bytes == data
            assert body.packet_sha256 == packet_digest(data)
        agent.close()


def test_a_retired_version_is_refused_by_the_server(tmp_path: Path) -> None:
    with running_cloud(tmp_path, config=CONFIG) as cloud:
        cloud.server.ingest.policy = PacketPolicy(accepted_wire_versions=frozenset({2}))
        agent = cloud.device("device-a")
        unary = _seal(agent, 1, wire_version=1, rows=64)
        streamed = _seal(agent, 2, wire_version=1, rows=4000)
        calls = [lambda: agent._submit(unary, timeout=10),
                 lambda: agent._submit_stream(agent._chunks(streamed), timeout=10)]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "wire_version_retired" in str(info.value.details())
        assert cloud.store.list_packets() == []
        agent.submit(_seal(agent, 3, wire_version=2, rows=4000))  # version 2 still goes through
        agent.close()


def test_assemble_hashes_the_ciphertext_as_chunks_arrive(tmp_path: Path) -> None:
    with running_cloud(tmp_path, config=CONFIG) as cloud:
        agent = cloud.device("device-a")
        data = _seal(agent, 1, wire_version=2, rows=4000)
        hasher = CiphertextHasher()
        chunks = (c.SerializeToString() for c in agent._chunks(data))
        assert cloud.server.ingest.assemble(chunks, hasher=hasher) == data
        result = hasher.result()
        assert result is not None
        assert result.sha256 == hashlib.sha256(envelope_from_bytes(data).ciphertext).digest()
        receipt = cloud.server.ingest.submit(data, streamed=True, ciphertext_digest=result)
        verify_receipt(receipt, agent.workspace.receipt_public_key(), data)
        agent.close()

"""The whole DiReDi round through gRPC on loopback, and a cloud killed with SIGKILL mid-stream.

* ``test_full_round_through_grpc``: cloud init, KD + release v1, devices enrol over mTLS, update
  to v1 through the gRPC TUF fetcher, DP reverse distillation on the installed model, submit,
  merge (packets opened again from the store), release v2 with per-device delegated roles, update
  to each device's own v2 (parent = the installed v1). Tiny epochs: it tests the wiring, not
  accuracy.
* ``test_sigkill_keeps_every_acknowledged_packet``: ``diredi cloud serve`` as a SUBPROCESS, killed
  with SIGKILL while a device streams packets, restarted: every acknowledged packet is stored with
  the receipt the device holds, a resubmit gets that same receipt, nothing is stored twice.

Both run on SQLite, and on PostgreSQL when ``DIREDI_TEST_POSTGRES_DSN`` is set.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from diredi_secure.services import jobs
from diredi_secure.services.cloud import CloudServer
from diredi_secure.services.edge import EdgeAgent, RetryPolicy
from diredi_secure.services.status import ServiceUnavailable
from diredi_secure.services.workspace import CloudWorkspace, DeviceWorkspace

from diredi_secure import privacy
from diredi_secure.errors import DirediError, ReleaseRefused
from diredi_secure.knowledge import PayloadKind
from diredi_secure.ml.data import load_npz_dataset
from diredi_secure.ml.reverse import RDConfig
from diredi_secure.packet import verify_receipt
from diredi_secure.release import AuditVerdict
from diredi_secure.store import Store

from .services_harness import DP, payload

PG_DSN = os.environ.get("DIREDI_TEST_POSTGRES_DSN")
BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=[
        pytest.mark.postgres,
        pytest.mark.skipif(not PG_DSN, reason="DIREDI_TEST_POSTGRES_DSN is not set"),
    ]),
]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _settings() -> jobs.JobSettings:
    tiny = jobs.JobSettings.tiny()
    # no synthesis / prototype inputs: the fastest merge that still runs every step
    return replace(tiny, merge=replace(tiny.merge, epochs=1, synthesize=False, use_prototypes=False))


def _drop_schema(schema: str) -> None:
    import psycopg
    from psycopg import sql

    assert PG_DSN is not None
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=BACKENDS)
def cloud_ws(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CloudWorkspace]:
    """A fresh cloud workspace whose store is SQLite (in it) or a PostgreSQL schema of its own."""
    if request.param == "postgres":
        schema = f"diredi_rt_{uuid.uuid4().hex[:12]}"
        ws = CloudWorkspace.init(tmp_path / "cloud", now_ms=_now_ms(), store=PG_DSN, store_schema=schema)
        try:
            yield ws
        finally:
            _drop_schema(schema)
    else:
        yield CloudWorkspace.init(tmp_path / "cloud", now_ms=_now_ms())


def _agent(ws: DeviceWorkspace) -> EdgeAgent:
    return EdgeAgent(ws, retry=RetryPolicy(attempts=2, base_delay_s=0.01), sleep=lambda _s: None,
                     rng=random.Random(0))


@contextlib.contextmanager
def _released_cloud(tmp_path: Path, *, check_releases: bool = False,
                    ) -> Iterator[tuple[CloudWorkspace, Store, int]]:
    """A cloud workspace with release v1 (seed 1) served over mTLS; stopped and closed after.
    ``check_releases``: ingest refuses packets against models not in the release index."""
    ws = CloudWorkspace.init(tmp_path / "cloud", now_ms=_now_ms())
    jobs.distill_and_release(ws, now=datetime.now(UTC), seed=1, settings=_settings())
    store = ws.open_store()
    srv = CloudServer(store=store, keys=ws.keys(), tls=ws.server_tls(mtls=True),
                      repository_dir=ws.repository_dir, max_workers=4,
                      released_models=ws.released_models() if check_releases else None)
    port = srv.start()
    try:
        yield ws, store, port
    finally:
        srv.stop(grace_s=0.5)
        store.close()


# ------------------------------------------------------------------------------------------------
# The full round
# ------------------------------------------------------------------------------------------------
def test_full_round_through_grpc(cloud_ws: CloudWorkspace, tmp_path: Path) -> None:
    ws = cloud_ws
    v1 = jobs.distill_and_release(ws, now=datetime.now(UTC), seed=0, settings=_settings())
    assert (v1.version, v1.packet_count, v1.audit_verdict) == (1, 0, "not_applicable")
    with pytest.raises(Exception, match="already published"):
        jobs.distill_and_release(ws, now=datetime.now(UTC), settings=_settings())

    store = ws.open_store()
    server = CloudServer(store=store, keys=ws.keys(), tls=ws.server_tls(mtls=True),
                         repository_dir=ws.repository_dir, max_workers=4)
    port = server.start()
    agents: dict[str, EdgeAgent] = {}
    try:
        for user in ("A", "C"):
            dws = ws.provision_device(tmp_path / f"dev-{user}", f"device-{user}",
                                      target=f"127.0.0.1:{port}", now_ms=_now_ms())
            agent = agents[user] = _agent(dws)
            agent.enroll()
            first = jobs.update_device(agent)
            assert (first.status, first.release.version, first.release.prefix) == ("installed", 1, "")
            assert first.release.model_sha256 == v1.model_sha256
            jobs.export_user_data(ws, user, tmp_path / f"{user}.npz")
            rnd = jobs.reverse_on_device(
                agent, load_npz_dataset(tmp_path / f"{user}.npz"), epsilon=4.0,
                kinds=(PayloadKind.REFERENCE_LOGITS, PayloadKind.LABEL_HISTOGRAM),
                rd=RDConfig(epochs=1),
            )
            assert rnd.base_model_sha256 == v1.model_sha256 and rnd.base_version == 1
            assert rnd.dp.composed_epsilon == pytest.approx(4.0, rel=1e-5)  # the total, composed
            body = agent.submit(rnd.sealed.data)
            assert body.device_id == f"device-{user}"
        assert len(store.list_packets()) == 2

        # A failing gate blocks the release and changes nothing.
        def failing_gate(_inputs: jobs.GateInput) -> jobs.GateOutcome:
            return jobs.GateOutcome(AuditVerdict.FAIL, b'{"verdict": "fail"}')

        with pytest.raises(ReleaseRefused, match="audit gate"):
            jobs.merge_and_release(ws, store, now=datetime.now(UTC), settings=_settings(),
                                   audit_gate=failing_gate)
        assert len(store.list_packets()) == 2
        assert jobs.update_device(agents["A"]).status == "up_to_date"

        v2 = jobs.merge_and_release(ws, store, now=datetime.now(UTC), settings=_settings(),
                                    audit_gate=jobs.accounting_gate)
        assert (v2.version, v2.packet_count, v2.audit_verdict, v2.audit_forced) == (2, 2, "pass", False)
        assert set(v2.device_models) == {"device-A", "device-C"}
        assert store.list_packets() == []  # every packet marked merged into v2
        assert {p.merged_in_release for p in store.list_packets(unmerged_only=False)} == {"2"}

        for user, agent in agents.items():
            second = jobs.update_device(agent)
            device_id = f"device-{user}"
            assert (second.status, second.release.version) == ("installed", 2)
            assert second.release.prefix == jobs.device_prefix(device_id)
            assert second.release.role == jobs.device_role(device_id)
            assert second.release.model_sha256 == v2.device_models[device_id]
            assert second.release.parent_sha256 == v1.model_sha256
            assert second.attestation is not None
            predicate = second.attestation.predicate
            assert predicate.packet_count == 1 and [e.device_id for e in predicate.epsilon] == [device_id]
            assert jobs.update_device(agent).status == "up_to_date"
        # Nothing left to merge.
        with pytest.raises(Exception, match="no unmerged packets"):
            jobs.merge_and_release(ws, store, now=datetime.now(UTC), settings=_settings(),
                                   audit_gate=jobs.accounting_gate)
    finally:
        for agent in agents.values():
            agent.close()
        server.stop(grace_s=0.5)
        store.close()


def test_forced_release_is_recorded_in_the_attestation(tmp_path: Path) -> None:
    """A failed gate with force_release publishes, and the attestation says verdict fail, forced."""
    with _released_cloud(tmp_path) as (ws, store, port):
        dws = ws.provision_device(tmp_path / "dev", "device-f", target=f"127.0.0.1:{port}",
                                  now_ms=_now_ms())
        with _agent(dws) as agent:
            agent.enroll()
            jobs.update_device(agent)
            rng = np.random.default_rng(0)
            n = 120
            from diredi_secure.ml.data import Dataset

            data = Dataset(rng.random((n, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, n))
            rnd = jobs.reverse_on_device(agent, data, epsilon=2.0, rd=RDConfig(epochs=1))
            agent.submit(rnd.sealed.data)

            def failing_gate(_inputs: jobs.GateInput) -> jobs.GateOutcome:
                return jobs.GateOutcome(AuditVerdict.FAIL, b'{"verdict": "fail"}')

            out = jobs.merge_and_release(ws, store, now=datetime.now(UTC), settings=_settings(),
                                         audit_gate=failing_gate, force_release=True)
            assert (out.audit_verdict, out.audit_forced) == ("fail", True)
            result = jobs.update_device(agent)  # the device accepts forced audits by default policy
            assert result.attestation is not None
            assert result.attestation.predicate.audit_verdict is AuditVerdict.FAIL
            assert result.attestation.predicate.audit_forced is True


# ------------------------------------------------------------------------------------------------
# SIGKILL
# ------------------------------------------------------------------------------------------------
def _serve(ws: CloudWorkspace, run_dir: Path, tag: str) -> tuple[subprocess.Popen[bytes], int]:
    """``diredi cloud serve`` as a subprocess on an ephemeral port; returns it and the port."""
    port_file = run_dir / f"port-{tag}"
    log_file = run_dir / f"cloud-{tag}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "diredi_secure.cli", "cloud", "serve", "--workspace", str(ws.root),
         "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--log-file", str(log_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"cloud serve exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''!r}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("cloud serve did not write its port file in 60 s")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_keeps_every_acknowledged_packet(backend: str, tmp_path: Path) -> None:
    schema = f"diredi_kill_{uuid.uuid4().hex[:12]}" if backend == "postgres" else None
    ws = CloudWorkspace.init(tmp_path / "cloud", now_ms=_now_ms(),
                             store=PG_DSN if schema else None, store_schema=schema)
    ws.open_store().close()
    # The server only accepts packets against a released model: record one named "v1" (this test
    # is about durability, not the learning loop, so no real model is trained).
    (ws.root / "releases.json").write_text(
        '{"format": 1, "models": {"v1": {"version": 1, "prefix": "", "device": null}}, "fleet": []}')
    proc, port = _serve(ws, tmp_path, "1")
    try:
        devices = [ws.provision_device(tmp_path / f"dev-{i}", f"device-{i}",
                                       target=f"127.0.0.1:{port}", now_ms=_now_ms()) for i in range(2)]
        for dws in devices:
            with _agent(dws) as agent:
                agent.enroll()
        acknowledged: dict[bytes, bytes] = {}  # packet id -> receipt bytes, as the devices hold them
        sealed_all: dict[bytes, bytes] = {}
        lock = threading.Lock()
        enough = threading.Event()
        stop = threading.Event()

        def stream(dws: DeviceWorkspace, seed: int) -> None:
            with _agent(dws) as agent:
                for k in range(200):
                    if stop.is_set():
                        return
                    sealed = agent.seal(payload(seed * 1000 + k), dp=DP, base_model_version="v1")
                    with lock:
                        sealed_all[sealed.packet_id] = sealed.data
                    try:
                        agent.submit(sealed.data)
                    except ServiceUnavailable:
                        return  # the cloud is gone: this packet stays in the outbox
                    with lock:
                        acknowledged[sealed.packet_id] = (dws.receipts / f"{sealed.packet_id.hex()}.receipt").read_bytes()
                        if len(acknowledged) >= 8:
                            enough.set()

        threads = [threading.Thread(target=stream, args=(d, i)) for i, d in enumerate(devices)]
        for t in threads:
            t.start()
        assert enough.wait(60), "no receipts within 60 s"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
        assert acknowledged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    proc, port = _serve(ws, tmp_path, "2")
    try:
        with ws.open_store() as store:
            stored = {p.packet_id: p for p in store.list_packets(unmerged_only=False)}
            for pid, receipt in acknowledged.items():  # durable before the receipt was sent
                assert pid in stored, f"acknowledged packet {pid.hex()} lost"
                assert stored[pid].receipt_bytes == receipt
                assert stored[pid].packet_bytes == sealed_all[pid]
            assert set(stored) <= set(sealed_all)
        for dws in devices:
            dws.update_config(target=f"127.0.0.1:{port}")
            with _agent(dws) as agent:
                for pid in [p for p in acknowledged if (dws.receipts / f"{p.hex()}.receipt").exists()]:
                    again = agent._submit(sealed_all[pid], timeout=10)
                    assert again == acknowledged[pid]  # the very same receipt bytes
                    verify_receipt(again, dws.receipt_public_key(), sealed_all[pid])
                agent.flush_outbox()  # sealed before the kill, never acknowledged: sent now
                assert dws.pending() == []
        with ws.open_store() as store:
            rows = store.list_packets(unmerged_only=False)
            assert len(rows) == len({r.packet_id for r in rows}) == len(sealed_all)  # each once
            for i in range(2):
                mine = [r for r in rows if r.device_id == f"device-{i}"]
                one = privacy.Mechanism(privacy.MechanismKind.DP_SGD, DP.noise_multiplier,
                                        DP.sample_rate, DP.steps).curve()
                assert store.epsilon_spent(f"device-{i}") == pytest.approx(
                    privacy.lifetime_epsilon(one * len(mine)), rel=1e-9)  # composed once per packet
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        if schema is not None:
            _drop_schema(schema)


def test_one_packet_that_does_not_fit_its_model_does_not_stop_the_release(tmp_path: Path) -> None:
    """Issue 14 finding 7: reference logits with 64 rows (the reference set has 300) were stored
    and then stopped every merge; now that packet is skipped and named, the others are merged."""
    from diredi_secure.knowledge import KnowledgePayload, PayloadTensor
    from diredi_secure.ml.data import Dataset

    from ..conftest import honest_dp

    with _released_cloud(tmp_path) as (ws, store, port), contextlib.ExitStack() as agents:
        devices = []
        for name in ("device-h", "device-p"):
            dws = ws.provision_device(tmp_path / name, name, target=f"127.0.0.1:{port}",
                                      now_ms=_now_ms())
            agent = agents.enter_context(_agent(dws))
            agent.enroll()
            v1 = jobs.update_device(agent)
            devices.append(agent)
        rng = np.random.default_rng(0)
        data = Dataset(rng.random((90, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, 90))
        honest = jobs.reverse_on_device(devices[0], data, epsilon=2.0, rd=RDConfig(epochs=1))
        devices[0].submit(honest.sealed.data)
        bad = KnowledgePayload((PayloadTensor("reference_logits", PayloadKind.REFERENCE_LOGITS,
                                              np.zeros((64, 10), np.float32), "float16"),))
        devices[1].submit_payload(bad, dp=honest_dp(2.0),
                                  base_model_version=v1.release.model_sha256)
        out = jobs.merge_and_release(ws, store, now=datetime.now(UTC), settings=_settings(),
                                     audit_gate=jobs.accounting_gate)
        assert out.packet_count == 1 and set(out.device_models) == {"device-h"}
        [(_pid, why)] = out.skipped_packets.items()
        assert "64 rows" in why


def test_a_packet_against_a_model_never_released_is_refused_at_ingest(tmp_path: Path) -> None:
    """Issue 14 finding 7 (ingest side): a never-released base model was charged and stored."""
    from diredi_secure.knowledge import KnowledgePayload, PayloadTensor

    from ..conftest import honest_dp

    with _released_cloud(tmp_path, check_releases=True) as (ws, store, port):
        dws = ws.provision_device(tmp_path / "dev", "device-n", target=f"127.0.0.1:{port}",
                                  now_ms=_now_ms())
        with _agent(dws) as agent:
            agent.enroll()
            v1 = jobs.update_device(agent)
            logits = KnowledgePayload((PayloadTensor(
                "reference_logits", PayloadKind.REFERENCE_LOGITS, np.zeros((300, 10), np.float32),
                "float16"),))
            with pytest.raises(DirediError, match="never released"):
                agent.submit_payload(logits, dp=honest_dp(2.0), base_model_version="f" * 64)
            assert store.list_packets() == [] and store.epsilon_spent("device-n") == 0.0
            body = agent.submit_payload(logits, dp=honest_dp(2.0),
                                        base_model_version=v1.release.model_sha256)
            assert body.device_id == "device-n" and len(store.list_packets()) == 1

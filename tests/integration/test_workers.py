"""Issue 15 item 3: ``diredi cloud serve --workers 2``, run as an operator runs it (a subprocess),
on SQLite (one writer process fed by the workers) and on PostgreSQL (each worker its own store).

What must hold across processes: every packet stored once with a receipt that verifies, the ledger
exact; the same packet bytes racing on connections that land on both workers give one row and the
same receipt; two packets of one device with one counter racing give one accepted and one
``ReplayDetected``; SIGTERM stops every process, and a SIGKILLed parent takes its workers with it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from diredi_secure.services.cloud import KNOWLEDGE_SERVICE
from diredi_secure.services.edge import EdgeAgent, RetryPolicy
from diredi_secure.services.status import error_from_rpc
from diredi_secure.services.transport import TransportConfig, channel_credentials
from diredi_secure.services.workspace import CloudWorkspace, DeviceWorkspace

from diredi_secure.errors import DirediError, ReplayDetected
from diredi_secure.packet import inspect_packet, verify_receipt
from diredi_secure.store import Store

from ..conftest import honest_dp
from .services_harness import PG_DSN, payload, pg_unavailable
from .test_cli_operations import diredi, free_port, one_line_failure

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balancing: Linux"),
]

CONFIG = TransportConfig()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux ``/proc``: no psutil in the environment)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *_children(kid)]
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie whose parent has not reaped it yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@dataclass
class Served:
    """A running ``diredi cloud serve --workers 2`` and what the tests need to talk to it."""

    backend: str
    workspace: CloudWorkspace
    proc: subprocess.Popen[str]
    port: int
    ops_port: int
    log_file: Path
    root: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        return [p for p in _children(self.proc.pid)
                if "spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]

    def device(self, device_id: str) -> EdgeAgent:
        ws = self.workspace.provision_device(self.root / f"dev-{device_id}", device_id,
                                             target=self.target, now_ms=_now_ms())
        agent = self.agent(ws)
        agent.enroll()
        return agent

    def agent(self, ws: DeviceWorkspace) -> EdgeAgent:
        return EdgeAgent(ws, mtls=True, config=CONFIG, target=self.target,
                         retry=RetryPolicy(attempts=3, base_delay_s=0.05), rng=random.Random(0))

    def fresh_submit(self, ws: DeviceWorkspace) -> tuple[grpc.Channel, Callable[..., Any]]:
        """A raw Submit on a connection of its own (a local subchannel pool: no sharing), so
        the kernel's SO_REUSEPORT hash may send it to either worker."""
        options = [*CONFIG.common_options(), ("grpc.use_local_subchannel_pool", 1),
                   ("diredi.test.connection", uuid.uuid4().hex)]
        channel = grpc.secure_channel(self.target, channel_credentials(ws.client_tls(mtls=True)),
                                      options=options)
        return channel, channel.unary_unary(f"/{KNOWLEDGE_SERVICE}/Submit")

    def events(self, device_id: str) -> list[dict[str, Any]]:
        """The per-packet log lines of the workers for one device."""
        out = []
        for line in self.log_file.read_text().splitlines():
            if not line.startswith("{"):
                continue
            doc = json.loads(line)
            if doc.get("event") in ("packet_accepted", "packet_refused") and doc.get("device") == device_id:
                out.append(doc)
        return out

    def store(self) -> Store:
        return self.workspace.open_store()


def _start(root: Path, ws: CloudWorkspace, backend: str, *extra: str) -> Served:
    # The packets name base model "v1": record it as released (as test_roundtrip_grpc does).
    (ws.root / "releases.json").write_text(
        '{"format": 1, "models": {"v1": {"version": 1, "prefix": "", "device": null}}, "fleet": []}')
    port_file, log_file, ops_port = root / "port", root / "serve.log", free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "diredi_secure.cli", "cloud", "serve", "-w", str(ws.root),
         "--workers", "2", "--listen", "127.0.0.1:0", "--port-file", str(port_file),
         "--ops-listen", f"127.0.0.1:{ops_port}", "--log-format", "json",
         "--log-file", str(log_file), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate(timeout=30)
            raise AssertionError(f"cloud serve --workers 2 did not start: {err}")
        time.sleep(0.1)
    return Served(backend, ws, proc, int(port_file.read_text()), ops_port, log_file, root)


def _stop(served: Served) -> None:
    pids = _children(served.proc.pid)
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
        try:
            served.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.communicate(timeout=30)
    for pid in _wait_gone(pids, 5):
        os.kill(pid, signal.SIGKILL)  # only our own, and only if the test already failed on them


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    backend = request.param
    root = tmp_path_factory.mktemp(f"workers-{backend}")
    schema = None
    if backend == "postgres":
        reason = pg_unavailable()
        if reason is not None:
            pytest.skip(reason)
        schema = f"diredi_wk_{uuid.uuid4().hex[:12]}"
        ws = CloudWorkspace.init(root / "cloud", now_ms=_now_ms(), store=PG_DSN, store_schema=schema)
    else:
        ws = CloudWorkspace.init(root / "cloud", now_ms=_now_ms())
    served = _start(root, ws, backend)
    try:
        yield served
    finally:
        _stop(served)
        if schema is not None:
            import psycopg
            from psycopg import sql

            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _race(calls: list[Callable[[], Any]]) -> list[bytes | DirediError]:
    """Run the calls at once (a barrier); each outcome is the receipt bytes or the typed error."""
    barrier = threading.Barrier(len(calls))
    outcomes: list[bytes | DirediError | None] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = bytes(calls[i]())
        except grpc.RpcError as exc:
            outcomes[i] = error_from_rpc(exc, "submit")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(o is not None for o in outcomes)
    return [o for o in outcomes if o is not None]


# ------------------------------------------------------------------------------------------------
def test_many_devices_every_packet_once_with_a_receipt_and_an_exact_ledger(served: Served) -> None:
    agents = [served.device(f"fleet-{served.backend}-{i}") for i in range(8)]
    per_device = 4
    failures: list[BaseException] = []

    def send(agent: EdgeAgent) -> None:
        try:
            for k in range(per_device):  # EdgeAgent.submit verifies each receipt against the bytes
                agent.submit(agent.seal(payload(k), dp=honest_dp(), base_model_version="v1").data)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=send, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    store = served.store()
    try:
        for agent in agents:
            ws = agent.workspace
            stored = store.list_packets(device_id=ws.device_id)
            assert len(stored) == per_device
            assert len({p.packet_id for p in stored}) == per_device
            assert sorted(p.counter for p in stored) == list(range(1, per_device + 1))
            receipts = {p.name: p.read_bytes() for p in ws.receipts.glob("*.receipt")}
            for p in stored:  # the stored receipt is the one the device filed, and it verifies
                assert receipts[f"{p.packet_id.hex()}.receipt"] == p.receipt_bytes
                verify_receipt(p.receipt_bytes, ws.receipt_public_key(), p.packet_bytes)
            # The cloud's ledger composes exactly what the device's own ledger composed.
            assert store.epsilon_spent(ws.device_id) == pytest.approx(float(ws.ledger()["spent"]), rel=1e-9)
            agent.close()
    finally:
        store.close()
    events = [e for a in agents for e in served.events(a.workspace.device_id)]
    assert len(events) == len(agents) * per_device  # one log line per packet, from its worker
    assert all(e["event"] == "packet_accepted" and e["packet_id"] for e in events)
    served_by = {e.get("worker") for e in events}
    assert served_by == {0, 1}, served_by  # 8 connections: both workers took some


def test_the_same_packet_racing_on_both_workers_is_stored_once(served: Served) -> None:
    device_id = f"twin-{served.backend}"
    agent = served.device(device_id)
    data = agent.seal(payload(7), dp=honest_dp(), base_model_version="v1").data
    header = inspect_packet(data)
    connections = [served.fresh_submit(agent.workspace) for _ in range(16)]
    try:
        outcomes = _race([lambda s=submit: s(data, timeout=30) for _, submit in connections])
    finally:
        for channel, _ in connections:
            channel.close()
    receipts = [o for o in outcomes if isinstance(o, bytes)]
    refusals = [o for o in outcomes if not isinstance(o, bytes)]
    assert receipts, refusals
    assert len(set(receipts)) == 1  # every receipt is the first receipt, byte for byte
    assert all(isinstance(r, DirediError) and r.reason != "internal" for r in refusals), refusals
    verify_receipt(receipts[0], agent.workspace.receipt_public_key(), data)
    store = served.store()
    try:
        rows = store.list_packets(device_id=device_id)
        assert [p.packet_id for p in rows] == [header.packet_id]
        assert rows[0].receipt_bytes == receipts[0]
        assert store.epsilon_spent(device_id) == pytest.approx(float(agent.workspace.ledger()["spent"]), rel=1e-9)
    finally:
        store.close()
    served_by = {e.get("worker") for e in served.events(device_id)}
    assert served_by == {0, 1}, served_by  # 16 fresh connections: the race crossed processes
    agent.close()


def test_two_packets_with_one_counter_racing_one_accepted_one_replay(served: Served) -> None:
    device_id = f"clone-{served.backend}"
    agent = served.device(device_id)
    agent.submit(agent.seal(payload(1), dp=honest_dp(), base_model_version="v1").data)
    rounds, workers_seen = 4, set[Any]()
    for r in range(rounds):
        # A copy of the device's state before sealing: both copies reserve the same counter.
        twin_root = served.root / f"{device_id}-twin-{r}"
        shutil.copytree(agent.workspace.root, twin_root)
        twin = DeviceWorkspace.open(twin_root)
        first = agent.seal(payload(10 + r), dp=honest_dp(), base_model_version="v1").data
        second = served.agent(twin).seal(payload(20 + r), dp=honest_dp(), base_model_version="v1").data
        h1, h2 = inspect_packet(first), inspect_packet(second)
        assert h1.counter == h2.counter and h1.packet_id != h2.packet_id
        connections = [served.fresh_submit(agent.workspace) for _ in range(8)]
        packets = [first, second] * 4
        try:
            outcomes = _race([lambda s=submit, d=d: s(d, timeout=30)
                              for (_, submit), d in zip(connections, packets, strict=True)])
        finally:
            for channel, _ in connections:
                channel.close()
        store = served.store()
        try:
            rows = [p for p in store.list_packets(device_id=device_id) if p.counter == h1.counter]
            assert len(rows) == 1
            winner = rows[0].packet_bytes
            spent = store.epsilon_spent(device_id)
        finally:
            store.close()
        for sent, outcome in zip(packets, outcomes, strict=True):
            if sent == winner:
                assert outcome == rows[0].receipt_bytes, outcome
            else:
                assert isinstance(outcome, ReplayDetected), outcome
        # Charged once: what either copy's own ledger says after its one packet.
        assert spent == pytest.approx(float(agent.workspace.ledger()["spent"]), rel=1e-9)
        workers_seen |= {e.get("worker") for e in served.events(device_id) if e.get("counter") == h1.counter}
    assert workers_seen == {0, 1}, workers_seen
    agent.close()


def test_worker_zero_serves_the_ops_endpoint(served: Served) -> None:
    served.device(f"ops-{served.backend}").close()  # at least one device, whichever worker enrols it
    health = urllib.request.urlopen(f"http://127.0.0.1:{served.ops_port}/healthz", timeout=5)
    assert health.status == 200 and health.read() == b"SERVING\n"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{served.ops_port}/metrics", timeout=5).read().decode()
    assert "# TYPE diredi_submits_total counter" in metrics  # worker 0's own counters
    # The store's gauges are the whole fleet's, whichever worker enrolled each device.
    store = served.store()
    try:
        active = sum(1 for d in store.list_devices() if d.revoked_at_ms is None)
    finally:
        store.close()
    assert f"diredi_devices_active {float(active)}" in metrics, metrics


def test_sigterm_stops_every_process(served: Served) -> None:
    workers = served.workers()
    everything = _children(served.proc.pid)
    assert len(workers) == 2, everything
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=30) == 0
    assert _wait_gone(everything, 5) == []


def test_a_killed_parent_takes_its_workers_with_it(tmp_path: Path) -> None:
    ws = CloudWorkspace.init(tmp_path / "cloud", now_ms=_now_ms())
    served = _start(tmp_path, ws, "sqlite")
    try:
        # A second --workers server on the same port would join its SO_REUSEPORT group: refused.
        line = one_line_failure(diredi("cloud", "serve", "-w", str(ws.root), "--workers", "2",
                                       "--listen", served.target))
        assert "already listens" in line, line
        workers = served.workers()
        everything = _children(served.proc.pid)
        assert len(workers) == 2
        served.proc.send_signal(signal.SIGKILL)
        served.proc.wait(timeout=30)
        assert _wait_gone(everything, 10) == []
    finally:
        _stop(served)


def test_the_cli_refuses_in_one_line(tmp_path: Path) -> None:
    env_name = "DIREDI_TEST_WORKERS_PASS"
    CloudWorkspace.init(tmp_path / "locked", now_ms=_now_ms(), passphrase=b"right passphrase")
    os.environ[env_name] = "wrong passphrase"
    try:
        line = one_line_failure(diredi("cloud", "serve", "-w", str(tmp_path / "locked"), "--workers", "2",
                                       "--listen", "127.0.0.1:0", "--passphrase-env", env_name))
        assert "passphrase" in line.lower(), line
    finally:
        del os.environ[env_name]
    w = str(CloudWorkspace.init(tmp_path / "plain", now_ms=_now_ms()).root)
    assert "workers" in one_line_failure(diredi("cloud", "serve", "-w", w, "--workers", "0"))
    assert "listen" in one_line_failure(diredi("cloud", "serve", "-w", w, "--workers", "2",
                                               "--listen", "not-an-address"))

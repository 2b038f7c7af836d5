"""Ingest throughput over loopback gRPC (mTLS, SQLite or PostgreSQL) against an in-process
open_packet baseline.

    .venv/bin/python benchmarks/bench_ingest.py [--count 200] [--big-count 20] [--devices 8 --fleet 1000]
        [--postgres postgresql://127.0.0.1:5432/test]

For a 1 KiB and a 1 MiB payload it measures, in the same run:
  * open_packet in-process (verify + decrypt + decode; no store, no network): the baseline;
  * Ingest.submit in-process (open + one store transaction, + receipt): SQLite with
    synchronous=FULL, or with --postgres a fresh schema in that database (dropped afterwards);
  * Submit over gRPC on 127.0.0.1 with mTLS, one device, sequential calls;
and prints submits/s and the ratio to the baseline. With --fleet N, N packets (1 KiB) are sent by
--devices concurrent devices and packets/s, p50 and p99 latency are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
from diredi_secure.benchmarks._dp import training_only_dp
from diredi_secure.services.cloud import CloudServer
from diredi_secure.services.edge import EdgeAgent
from diredi_secure.services.transport import TransportConfig
from diredi_secure.services.workspace import CloudWorkspace, DeviceWorkspace
from psycopg import sql

from diredi_secure.knowledge import KnowledgePayload, PayloadKind, PayloadTensor
from diredi_secure.packet import (
    MemoryDeviceDirectory,
    MemoryReplayState,
    open_packet,
    seal_packet,
    verify_receipt,
)
from diredi_secure.policy import Limits, PacketPolicy
from diredi_secure.privacy import DPPolicy
from diredi_secure.store import open_store
from diredi_secure.store.base import Store

# Ingest recomputes the declared epsilon from the declared mechanisms: the header is the policy's
# own schedule at a total of 0.6 (a weight delta alone: post-processing, no further cost).
DP = training_only_dp(0.6)
POLICY = PacketPolicy(dp=DPPolicy(lifetime_epsilon_budget=1e9))


def now_ms() -> int:
    return int(time.time() * 1000)


def payload_of(nbytes: int, seed: int) -> KnowledgePayload:
    values = np.random.default_rng(seed).normal(size=nbytes // 4).astype(np.float32)
    return KnowledgePayload((PayloadTensor("weight_delta", PayloadKind.WEIGHT_DELTA, values, "float32"),))


def seal_many(ws: DeviceWorkspace, nbytes: int, n: int, first_counter: int) -> list[bytes]:
    key, cert, inbox = ws.signing_key(), ws.certificate(), ws.inbox_public_key()
    payload = payload_of(nbytes, 0)
    return [
        seal_packet(payload, device_key=key, device_id=ws.device_id, counter=first_counter + i,
                    base_model_version="v1", dp=DP, inbox=inbox, now_ms=now_ms(), random_bytes=os.urandom,
                    device_certificate=cert).data
        for i in range(n)
    ]


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="packets per run for 1 KiB")
    parser.add_argument("--big-count", type=int, default=20, help="packets per run for 1 MiB")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--fleet", type=int, default=0, help="packets for the concurrent-devices run (0: skip)")
    parser.add_argument("--postgres", metavar="DSN", default=None,
                        help="store in this PostgreSQL database (a fresh schema, dropped at the end)")
    args = parser.parse_args(argv)
    config = TransportConfig(limits=Limits(max_unary_bytes=4 * 1024 * 1024))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cloud = CloudWorkspace.init(root / "cloud", now_ms=now_ms())
        schema = f"bench_ingest_{os.getpid()}_{int(time.time())}" if args.postgres else None
        store = open_store(args.postgres or cloud.store_url(), default_epsilon_budget=1e9,
                           schema=schema)
        try:
            run(args, cloud, root, store, config)
        finally:
            store.close()
            if args.postgres and schema:
                with psycopg.connect(args.postgres, autocommit=True) as conn:
                    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def run(args: argparse.Namespace, cloud: CloudWorkspace, root: Path, store: Store,
        config: TransportConfig) -> None:
    keys = cloud.keys()
    server = CloudServer(store=store, keys=keys, tls=cloud.server_tls(mtls=True), policy=POLICY, config=config)
    port = server.start()
    target = f"127.0.0.1:{port}"
    kind = "PostgreSQL" if args.postgres else "SQLite WAL synchronous=FULL"
    print(f"cloud on {target} (mTLS, {kind}); cpus={os.cpu_count()}")
    agents: list[EdgeAgent] = []
    for i in range(max(1, args.devices)):
        ws = cloud.provision_device(root / f"dev{i}", f"device-{i}", target=target, now_ms=now_ms())
        agent = EdgeAgent(ws, config=config)
        agent.enroll()
        agents.append(agent)
    ws0, agent0 = agents[0].workspace, agents[0]
    receipt_key = ws0.receipt_public_key()
    counter = 1
    print(f"{'payload':>8} {'n':>5} {'open_packet/s':>14} {'Ingest.submit/s':>16} {'gRPC submit/s':>14} "
          f"{'grpc/open':>9} {'grpc/ingest':>11}")
    for label, nbytes, n in (("1 KiB", 1024, args.count), ("1 MiB", 1024 * 1024, args.big_count)):
        # baseline: open the same packet n times (open_packet checks replay state, records none)
        directory = MemoryDeviceDirectory()
        directory.enroll(ws0.device_id, ws0.certificate())
        (probe,) = seal_many(ws0, nbytes, 1, 10**9)
        t = time.perf_counter()
        for _ in range(n):
            open_packet(probe, inbox_key=keys.inbox_key, device_ca=keys.device_ca_der, devices=directory,
                        replay=MemoryReplayState(), now_ms=now_ms(), policy=POLICY, limits=config.limits)
        base = rate(n, time.perf_counter() - t)
        packets = seal_many(ws0, nbytes, n, counter)
        counter += n
        t = time.perf_counter()
        for data in packets:
            server.ingest.submit(data)
        ingest = rate(n, time.perf_counter() - t)
        packets = seal_many(ws0, nbytes, n, counter)
        counter += n
        t = time.perf_counter()
        for data in packets:
            verify_receipt(agent0._submit(data, timeout=30), receipt_key, data)
        grpc_rate = rate(n, time.perf_counter() - t)
        print(f"{label:>8} {n:>5} {base:>14.1f} {ingest:>16.1f} {grpc_rate:>14.1f} "
              f"{grpc_rate / base:>9.2f} {grpc_rate / ingest:>11.2f}")
    if args.fleet:
        per = args.fleet // len(agents)
        work = {a.workspace.device_id: seal_many(a.workspace, 1024, per, counter if a is agent0 else 1) for a in agents}
        latencies: list[float] = []
        lock = threading.Lock()

        def run(agent: EdgeAgent) -> None:
            mine = []
            for data in work[agent.workspace.device_id]:
                t0 = time.perf_counter()
                agent._submit(data, timeout=60)
                mine.append(time.perf_counter() - t0)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=run, args=(a,)) for a in agents]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - t
        q = statistics.quantiles(latencies, n=100)
        print(f"fleet: {len(latencies)} packets (1 KiB) from {len(agents)} concurrent devices: "
              f"{rate(len(latencies), elapsed):.1f} packets/s, p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms")
    for agent in agents:
        agent.close()
    server.stop()


if __name__ == "__main__":
    main()

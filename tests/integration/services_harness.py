"""A real cloud on an ephemeral loopback port (TLS or mTLS, real store) and provisioned devices.

Shared by tests/integration/test_services_*.py and tests/security/test_services_*.py.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from diredi_secure.services.cloud import CloudServer
from diredi_secure.services.edge import EdgeAgent, RetryPolicy
from diredi_secure.services.transport import ClientTls, TransportConfig, open_channel
from diredi_secure.services.workspace import CloudWorkspace, DeviceWorkspace

from diredi_secure.knowledge import KnowledgePayload, PayloadKind, PayloadTensor
from diredi_secure.store import Store, open_store

PG_DSN = os.environ.get(
    "DIREDI_TEST_PG_DSN",
    os.environ.get("DIREDI_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
)

from ..conftest import honest_dp  # noqa: E402 - after the DSN constants it documents

DP = honest_dp(2.0)


def payload(seed: int = 0, rows: int = 64, classes: int = 10) -> KnowledgePayload:
    rng = np.random.default_rng(seed)
    return KnowledgePayload(
        (PayloadTensor("reference_logits", PayloadKind.REFERENCE_LOGITS, rng.normal(size=(rows, classes)), "float16"),)
    )


def pg_unavailable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_DSN, connect_timeout=3):
            return None
    except Exception as exc:
        return f"no PostgreSQL server answers at {PG_DSN}: {exc}"


@dataclass
class Cloud:
    workspace: CloudWorkspace
    store: Store
    server: CloudServer
    port: int
    mtls: bool
    config: TransportConfig
    sleeps: list[float] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def device(self, device_id: str, *, enroll: bool = True, mtls: bool | None = None) -> EdgeAgent:
        ws = self.workspace.provision_device(
            self.workspace.root.parent / f"dev-{device_id}", device_id, target=self.target,
            now_ms=int(time.time() * 1000),
        )
        return self.agent(ws, enroll=enroll, mtls=mtls)

    def agent(self, ws: DeviceWorkspace, *, enroll: bool = True, mtls: bool | None = None) -> EdgeAgent:
        ws.update_config(target=self.target)
        agent = EdgeAgent(
            ws, mtls=self.mtls if mtls is None else mtls, config=self.config,
            retry=RetryPolicy(attempts=3, base_delay_s=0.01), sleep=self.sleeps.append,
            rng=random.Random(0),
        )
        if enroll:
            agent.enroll()
        return agent

    def channel(self, tls: ClientTls | None) -> grpc.Channel:
        return open_channel(self.target, tls, config=self.config)


@contextmanager
def running_cloud(
    root: Path,
    *,
    mtls: bool = True,
    backend: str = "sqlite",
    config: TransportConfig | None = None,
    workspace: CloudWorkspace | None = None,
) -> Iterator[Cloud]:
    """Start a cloud (creating its workspace unless given) and stop it, closing the store, after."""
    ws = workspace or CloudWorkspace.init(root / "cloud", now_ms=int(time.time() * 1000))
    schema = None
    if backend == "postgres":
        schema = f"diredi_svc_{uuid.uuid4().hex[:12]}"
        store = open_store(PG_DSN, schema=schema)
    else:
        store = open_store(ws.store_url())
    config = config or TransportConfig()
    server = CloudServer(
        store=store, keys=ws.keys(), tls=ws.server_tls(mtls=mtls),
        repository_dir=ws.repository_dir, config=config, max_workers=8,
    )
    port = server.start()
    try:
        yield Cloud(ws, store, server, port, mtls, config)
    finally:
        server.stop(grace_s=0.5)
        store.close()
        if schema is not None:
            import psycopg
            from psycopg import sql

            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def half_open_call(channel: grpc.Channel, method: str, release: threading.Event) -> grpc.Future:
    """A call to a one-request method whose request message never comes (headers only), until
    ``release`` is set: the attacker of findings F7 and F1."""
    def never() -> Iterator[bytes]:
        release.wait(60)
        return
        yield  # pragma: no cover - a generator that sends nothing

    return channel.stream_unary(method).future(never(), timeout=60)

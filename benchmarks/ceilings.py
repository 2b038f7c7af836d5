"""``diredi bench ceilings``: each path of the project against its physical ceiling, in one run.

    diredi bench ceilings [--workers 2] [--postgres DSN] [--quick] [--write-readme README.md]

Measured in the same run, on loopback only, every loop bounded by a count and a deadline:

* crypto ceiling: Ed25519 verify + HPKE open of one 1 KiB packet (wire version 2), on one core
  and on ``--workers`` cores (processes);
* a bare grpcio mTLS echo server (one process) and a bare grpcio mTLS server that only verifies and
  opens (``--workers`` processes on one port, ``SO_REUSEPORT``), driven by the same clients as the
  project's server;
* raw SQLite (WAL, ``synchronous=FULL``) at 1 and 32 rows per commit; raw PostgreSQL the same with
  ``--postgres``; SHA-256 of update-sized bytes;
* the project's ingest (``diredi cloud serve --workers N`` with N = ``--workers``, in child
  processes, real mTLS clients, one per device): SQLite and, with ``--postgres``, PostgreSQL (a
  fresh schema, dropped afterwards); 1/8/32 devices; 1 KiB/64 KiB/1 MiB payloads; then p50/p99
  latency at half the measured 8-device rate;
* the update channel (a 256 MB model through ``diredi edge update`` in a child process, its wall
  time and peak RSS) and DP RD per epoch against plain training.

``bench_update.measure_for_ceilings`` and ``bench_rd.measure_for_ceilings`` are used when those
modules provide them; otherwise the paths are measured here. Every figure is printed with its ratio
to its ceiling; the last line is
``ceilings: ingest_vs_grpc_floor=X ingest_vs_crypto=Y p99_half_ms=Z update_vs_sha256=U
update_rss_over_model_mb=M rd_dp_overhead=R`` (1 KiB, 8 devices, ``--workers``; PostgreSQL's
ingest when ``--postgres`` is given, SQLite's otherwise; the other store's is the line above it).
Speed is reported, never asserted.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import multiprocessing as mp
import os
import re
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from diredi_secure import _crypto
from diredi_secure.errors import ConfigError
from diredi_secure.packet import seal_packet, signed_transcript
from diredi_secure.serde import envelope_from_bytes

KIB, MIB = 1024, 1024 * 1024
README_START = "<!-- ceilings:start -->"
README_END = "<!-- ceilings:end -->"
HEADLINE_DEVICES = 8


@dataclass(frozen=True)
class Plan:
    """Counts and deadlines of one run (``--quick``: a smoke that finishes in well under a minute)."""

    crypto_n: int
    grpc_n: int
    sqlite_rows: int
    sha_mb: int
    ingest: Mapping[int, int]  # payload bytes -> packets per run (over all devices)
    devices: tuple[int, ...]
    headline_devices: int
    half_load_n: int
    update_mb: int
    rd_epochs: tuple[int, int]  # per epoch = (t(b) - t(a)) / (b - a)
    deadline_s: float  # per measurement

    @staticmethod
    def for_run(quick: bool) -> Plan:
        if quick:
            return Plan(
                crypto_n=100,
                grpc_n=80,
                sqlite_rows=64,
                sha_mb=16,
                ingest={KIB: 48},
                devices=(1, 4),
                headline_devices=4,
                half_load_n=24,
                update_mb=4,
                rd_epochs=(1, 3),
                deadline_s=6.0,
            )
        return Plan(
            crypto_n=2000,
            grpc_n=1500,
            sqlite_rows=2000,
            sha_mb=256,
            ingest={KIB: 1000, 64 * KIB: 300, MIB: 40},
            devices=(1, 8, 32),
            headline_devices=HEADLINE_DEVICES,
            half_load_n=600,
            update_mb=256,
            rd_epochs=(1, 6),
            deadline_s=60.0,
        )


@dataclass
class Report:
    """Printed rows (figure, unit, ceiling name, ratio) and the headline numbers."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    out: Callable[[str], None] = print

    def add(self, name: str, value: float, unit: str, ceiling: str | None = None) -> None:
        self.figures[name] = value
        ratio = ""
        if ceiling is not None:
            ratio = f"{value / self.figures[ceiling]:.3f} of {ceiling}"
        self.rows.append((name, f"{value:,.1f} {unit}", ratio))
        self.out(f"{name:<44} {value:>12,.1f} {unit:<10} {ratio}")


def _deadline_loop(n: int, deadline_s: float, step: Callable[[], object]) -> float:
    """Run ``step`` up to ``n`` times or until the deadline; returns the rate per second."""
    step()  # warm-up
    done, start = 0, time.perf_counter()
    while done < n and (done < 3 or time.perf_counter() - start < deadline_s):
        step()
        done += 1
    return done / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# The material: a cloud workspace, devices, and sealed packets
# ------------------------------------------------------------------------------------------------
def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Verifier:
    """What a bare server needs to verify and open: the inbox key file and each device's key."""

    inbox_key_path: str
    device_keys: Mapping[str, bytes]  # device id -> raw Ed25519 public key

    def load(self) -> tuple[_crypto.InboxKey, dict[str, _crypto.VerifyKey]]:
        inbox = _crypto.load_inbox_key(Path(self.inbox_key_path), None)
        return inbox, {d: _crypto.VerifyKey.from_raw(k) for d, k in self.device_keys.items()}


def verify_and_open(data: bytes, verify_key: _crypto.VerifyKey, inbox: _crypto.InboxKey) -> bytes:
    """The per-packet work no ingest can avoid: parse the envelope, verify the device's signature
    over its transcript, HPKE-open the ciphertext. (The header's suite is taken as suite 1, the
    suite these packets are sealed with: a real server reads it from the header.)"""
    env = envelope_from_bytes(data)
    transcript = signed_transcript(
        env.header, env.enc, env.ciphertext, wire_version=env.envelope_version
    )
    _crypto.verify_signature(verify_key, env.signature, transcript)
    return _crypto.hpke_open(
        _crypto.HpkeSuite.X25519_SHA256_AES128GCM, inbox, env.enc, env.ciphertext, info=env.header
    )


class Fleet:
    """A cloud workspace with ``n`` provisioned devices and a per-device counter."""

    def __init__(self, root: Path, n: int, *, postgres: str | None = None) -> None:
        from diredi_secure.services.workspace import CloudWorkspace

        self.root = root
        self.cloud = CloudWorkspace.init(root / "cloud", now_ms=_now_ms())
        self.devices = [
            self.cloud.provision_device(
                root / f"dev{i}", f"device-{i}", target="127.0.0.1:1", now_ms=_now_ms()
            )
            for i in range(n)
        ]
        self.counters = {ws.device_id: 0 for ws in self.devices}
        self._keys = {ws.device_id: (ws.signing_key(), ws.certificate()) for ws in self.devices}
        self.inbox = self.devices[0].inbox_public_key()

    def verifier(self) -> Verifier:
        return Verifier(
            str(self.cloud.root / "inbox.key"),
            {d: k.public_key.raw for d, (k, _) in self._keys.items()},
        )

    def seal(self, device_index: int, nbytes: int) -> bytes:
        from diredi_secure.benchmarks._dp import training_only_dp

        from diredi_secure.knowledge import KnowledgePayload, PayloadKind, PayloadTensor

        ws = self.devices[device_index]
        key, cert = self._keys[ws.device_id]
        self.counters[ws.device_id] += 1
        values = np.random.default_rng(self.counters[ws.device_id]).normal(size=nbytes // 4)
        payload = KnowledgePayload(
            (
                PayloadTensor(
                    "weight_delta", PayloadKind.WEIGHT_DELTA, values.astype(np.float32), "float32"
                ),
            )
        )
        return seal_packet(
            payload,
            device_key=key,
            device_id=ws.device_id,
            counter=self.counters[ws.device_id],
            base_model_version="v1",
            dp=training_only_dp(0.6),
            inbox=self.inbox,
            now_ms=_now_ms(),
            random_bytes=os.urandom,
            device_certificate=cert,
        ).data

    def work(self, devices: int, total: int, nbytes: int) -> list[list[bytes]]:
        per = max(1, total // devices)
        return [[self.seal(i, nbytes) for _ in range(per)] for i in range(devices)]


# ------------------------------------------------------------------------------------------------
# Crypto ceiling (processes: one per core)
# ------------------------------------------------------------------------------------------------
def _crypto_worker(
    verifier: Verifier, device_id: str, packet: bytes, n: int, barrier: Any, results: Any
) -> None:
    inbox, keys = verifier.load()
    key = keys[device_id]
    verify_and_open(packet, key, inbox)  # warm-up, and a check that it opens
    barrier.wait(timeout=300)  # every process imported and warm before any clock starts
    t0 = time.perf_counter()
    for _ in range(n):
        verify_and_open(packet, key, inbox)
    results.put((n, t0, time.perf_counter()))


def crypto_rate(verifier: Verifier, device_id: str, packet: bytes, n: int, processes: int) -> float:
    """Packets/s of verify + open with ``processes`` processes each doing ``n`` of them (from the
    first start to the last finish: perf_counter is one system-wide monotonic clock on Linux)."""
    if processes == 1:
        inbox, keys = verifier.load()
        key = keys[device_id]
        return _deadline_loop(n, 30.0, lambda: verify_and_open(packet, key, inbox))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(
            target=_crypto_worker,
            daemon=True,
            args=(verifier, device_id, packet, n, barrier, results),
        )
        for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    got: list[tuple[int, float, float]] = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
    return float(sum(g[0] for g in got) / (max(g[2] for g in got) - min(g[1] for g in got)))


# ------------------------------------------------------------------------------------------------
# Bare grpcio servers (echo; verify-and-open), each in its own process
# ------------------------------------------------------------------------------------------------
_METHOD = "/diredi.bench.Bare/Call"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bare_server(
    kind: str, tls: Any, port: int, verifier: Verifier | None, ready: Any, stop: Any
) -> None:
    from concurrent import futures

    from diredi_secure.services.transport import peer_device_id, server_credentials

    handler: Callable[[bytes, grpc.ServicerContext], bytes]
    if kind == "echo":

        def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
            return request
    else:
        assert verifier is not None
        inbox, keys = verifier.load()

        def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
            verify_and_open(request, keys[peer_device_id(context) or ""], inbox)
            return b"ok"

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", 8 * MIB)],
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "diredi.bench.Bare", {"Call": grpc.unary_unary_rpc_method_handler(handler)}
            ),
        )
    )
    server.add_secure_port(f"127.0.0.1:{port}", server_credentials(tls))
    server.start()
    ready.put(os.getpid())
    stop.wait()
    server.stop(0)


class BareServers:
    """``processes`` bare servers of ``kind`` on one port (SO_REUSEPORT)."""

    def __init__(self, kind: str, tls: Any, processes: int, verifier: Verifier | None) -> None:
        ctx = mp.get_context("spawn")
        self.port = _free_port()
        self._ready, self._stop = ctx.Queue(), ctx.Event()
        self._procs = [
            ctx.Process(
                target=_bare_server,
                daemon=True,
                args=(kind, tls, self.port, verifier, self._ready, self._stop),
            )
            for _ in range(processes)
        ]

    def __enter__(self) -> BareServers:
        for p in self._procs:
            p.start()
        for _ in self._procs:
            self._ready.get(timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


# ------------------------------------------------------------------------------------------------
# Clients: one mTLS channel per device, one thread each
# ------------------------------------------------------------------------------------------------
@dataclass
class Load:
    rate: float
    latencies_ms: list[float]

    def quantile(self, q: int) -> float:
        if len(self.latencies_ms) < 2:
            return self.latencies_ms[0] if self.latencies_ms else math.nan
        return statistics.quantiles(self.latencies_ms, n=100)[q - 1]


def drive(
    target: str,
    fleet: Fleet,
    work: Sequence[Sequence[bytes]],
    method: str,
    *,
    interval_s: float | None = None,
    deadline_s: float = 60.0,
) -> Load:
    """Send each device's packets on its own mTLS channel, closed loop (or paced every
    ``interval_s`` per device); returns packets/s over the whole run and every latency."""
    from diredi_secure.services.transport import TransportConfig, open_channel

    config = TransportConfig()
    channels = [
        open_channel(target, fleet.devices[i].client_tls(mtls=True), config=config)
        for i in range(len(work))
    ]
    calls = [ch.unary_unary(method) for ch in channels]
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=30)
    latencies: list[float] = []
    sent = [0]
    lock = threading.Lock()
    start = time.perf_counter() + 0.05
    stop_at = start + deadline_s

    def run(i: int) -> None:
        mine = []
        if (wait := start - time.perf_counter()) > 0:  # every thread starts at `start` (a short
            time.sleep(wait)  # closed-loop run used to finish before it: a negative rate)
        for k, data in enumerate(work[i]):
            if interval_s is not None:
                wait = start + (k + i / len(work)) * interval_s - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            if time.perf_counter() > stop_at:
                break
            t0 = time.perf_counter()
            calls[i](data, timeout=120)
            mine.append((time.perf_counter() - t0) * 1000)
        with lock:
            latencies.extend(mine)
            sent[0] += len(mine)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - start
    for ch in channels:
        ch.close()
    return Load(sent[0] / elapsed, latencies)


# ------------------------------------------------------------------------------------------------
# The project's ingest server, in its own process
# ------------------------------------------------------------------------------------------------
class ProjectServer:
    """The project's server as an operator runs it: ``diredi cloud serve --workers N`` over the
    fleet's workspace, in child processes (so clients and server do not share a GIL, as with the
    bare servers); devices enrolled through it. ``N = 1`` is the single-process server; above, N
    processes on one ``SO_REUSEPORT`` port (services/workers.py). The workspace's cloud.toml gets
    the store, an effectively unlimited lifetime budget and warning-level logs (no line per
    packet, as the in-process server of earlier runs); releases.json names base model "v1"."""

    def __init__(self, fleet: Fleet, store_url: str, schema: str | None, workers: int) -> None:
        self.fleet = fleet
        self.workers = workers
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._env = dict(os.environ)
        self._configure(store_url, schema)

    def _configure(self, store_url: str, schema: str | None) -> None:
        import tomllib

        import tomli_w
        from diredi_secure.services.workspace import STORE_PASSWORD_ENV, _split_password

        from diredi_secure.store import is_postgres_url

        ws = self.fleet.cloud
        doc = tomllib.loads(ws.config_path.read_text())
        if is_postgres_url(store_url):
            store_url, password = _split_password(store_url)
            if password is not None:  # never into cloud.toml: the child reads it from the env
                self._env[STORE_PASSWORD_ENV] = password
        doc["store"] = {"url": store_url, "schema": schema or ""}
        doc.setdefault("privacy", {})["lifetime_epsilon_budget"] = 1e9
        doc.setdefault("server", {})["log_level"] = "warning"
        ws.config_path.write_text(tomli_w.dumps(doc))
        (ws.root / "releases.json").write_text(
            '{"format": 1, "models": {"v1": {"version": 1, "prefix": "", "device": null}}, '
            '"fleet": []}'
        )

    def __enter__(self) -> ProjectServer:
        from diredi_secure.services.edge import EdgeAgent

        name = f"serve-{os.getpid()}-{time.monotonic_ns()}"
        port_file, log = self.fleet.root / f"{name}.port", self.fleet.root / f"{name}.log"
        with log.open("wb") as err:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "diredi_secure.cli", "cloud", "serve",
                 "-w", str(self.fleet.cloud.root), "--workers", str(self.workers),
                 "--listen", "127.0.0.1:0", "--port-file", str(port_file)],
                env=self._env, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
                raise ConfigError(f"diredi cloud serve --workers {self.workers} did not start: "
                                  f"{last}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        for ws in self.fleet.devices:
            ws.update_config(target=f"127.0.0.1:{self.port}")
            agent = EdgeAgent(ws)
            agent.enroll()
            agent.close()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()  # SIGTERM: the server (and its workers) stop
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# ------------------------------------------------------------------------------------------------
# Raw stores and SHA-256
# ------------------------------------------------------------------------------------------------
def _rows(n: int) -> list[tuple[bytes, str, int, bytes, bytes]]:
    body = os.urandom(KIB + 400)
    return [(os.urandom(16), f"device-{i % 8}", i, body, os.urandom(180)) for i in range(n)]


_TABLE = (
    "CREATE TABLE packets (packet_id BYTEA PRIMARY KEY, device_id TEXT NOT NULL, "
    "counter BIGINT NOT NULL, body BYTEA, receipt BYTEA)"
)


def sqlite_rate(root: Path, rows: int, per_commit: int, deadline_s: float) -> float:
    """Rows/s inserted by ``BEGIN IMMEDIATE; INSERT x per_commit; COMMIT`` (WAL, fsync on)."""
    path = root / f"raw-{per_commit}.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(_TABLE.replace("BYTEA", "BLOB"))
    data = _rows(rows)
    start, done = time.perf_counter(), 0
    for i in range(0, rows, per_commit):
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO packets VALUES (?, ?, ?, ?, ?)", data[i : i + per_commit])
        db.execute("COMMIT")
        done += len(data[i : i + per_commit])
        if time.perf_counter() - start > deadline_s:
            break
    elapsed = time.perf_counter() - start
    db.close()
    return done / elapsed


def postgres_rate(dsn: str, rows: int, per_commit: int, deadline_s: float) -> float:
    import psycopg
    from psycopg import sql

    schema = f"bench_ceil_{os.getpid()}_{per_commit}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        with psycopg.connect(dsn) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            conn.execute(_TABLE)
            conn.commit()
            data = _rows(rows)
            start, done = time.perf_counter(), 0
            for i in range(0, rows, per_commit):
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO packets VALUES (%s, %s, %s, %s, %s)", data[i : i + per_commit]
                    )
                conn.commit()
                done += len(data[i : i + per_commit])
                if time.perf_counter() - start > deadline_s:
                    break
            elapsed = time.perf_counter() - start
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )
    return done / elapsed


def sha256_rate(megabytes: int) -> float:
    """MB/s of SHA-256 over ``megabytes`` of bytes in 1 MiB updates (as a streamed install)."""
    data = memoryview(os.urandom(MIB) * megabytes)
    h = hashlib.sha256()
    start = time.perf_counter()
    for i in range(0, len(data), MIB):
        h.update(data[i : i + MIB])
    h.digest()
    return megabytes / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# Update and RD (another module's measurement when it has one)
# ------------------------------------------------------------------------------------------------
def _external(module: str) -> Callable[..., Mapping[str, float]] | None:
    try:
        mod = importlib.import_module(f"diredi_secure.benchmarks.{module}")
    except ModuleNotFoundError:
        return None
    fn = getattr(mod, "measure_for_ceilings", None)
    return fn if callable(fn) else None


def update_figures(root: Path, model_mb: int) -> tuple[float, float]:
    """``(MB/s, peak RSS over the model in MB)`` of ``diredi edge update`` installing a release
    whose model is ``model_mb`` MB, through the real CLI in a child process (its own rusage)."""
    external = _external("bench_update")
    if external is not None:
        got = external(model_mb=model_mb)
        return float(got["update_mb_per_s"]), float(got["peak_rss_over_model_mb"])
    from diredi_secure.services.cloud import CloudServer
    from diredi_secure.services.edge import EdgeAgent
    from diredi_secure.services.workspace import CloudWorkspace

    from diredi_secure.checkpoint import checkpoint_bytes
    from diredi_secure.release import AuditVerdict, ReleasePredicate
    from diredi_secure.release.repository import ReleaseBundle, ReleaseRepository
    from diredi_secure.store import open_store

    now = datetime.now(UTC).replace(microsecond=0)
    cloud = CloudWorkspace.init(
        root / "ucloud", now_ms=int(now.timestamp() * 1000), create_repository=False
    )
    repo = ReleaseRepository.create(cloud.repository_dir, now=now)
    # A hair under model_mb MiB: the device's default cap on a release file is 256 MiB exactly.
    model = checkpoint_bytes(
        {"w": np.zeros((model_mb * MIB - 64 * KIB) // 4, np.float32)}, {"v": "1"}
    )
    model_size_mb = len(model) / MIB
    digest = hashlib.sha256(b"bench").hexdigest()
    predicate = ReleasePredicate.build(
        release_version=1,
        parent_digest=None,
        parent_version=None,
        packet_digests=[],
        epsilon=[],
        accountant="rdp",
        audit_report_digest=digest,
        audit_verdict=AuditVerdict.PASS,
        training_config_digest=digest,
        version="bench",
    )
    repo.publish(ReleaseBundle(1, model, b'{"arch": "mlp"}', predicate), now=now)
    del model
    store = open_store(cloud.store_url())
    server = CloudServer(
        store=store,
        keys=cloud.keys(),
        tls=cloud.server_tls(mtls=True),
        repository_dir=cloud.repository_dir,
    )
    port = server.start()
    try:
        device = cloud.provision_device(
            root / "udev", "device-u", target=f"127.0.0.1:{port}", now_ms=_now_ms()
        )
        agent = EdgeAgent(device)
        agent.enroll()
        agent.close()
        # The server runs in this process, the device in its own: its rusage is the device's.
        log = root / "update.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys; from diredi_secure.cli import main; sys.exit(main(sys.argv[1:]))",
                    "edge",
                    "update",
                    "--workspace",
                    str(device.root),
                    "--server",
                    f"127.0.0.1:{port}",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
            start = time.perf_counter()
            _, status, usage = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
        output = log.read_text(errors="replace")
        if proc.returncode != 0 or "installed" not in output:
            raise ConfigError(f"edge update failed in the benchmark: {output.strip()[-300:]}")
    finally:
        server.stop()
        store.close()
    return model_size_mb / elapsed, usage.ru_maxrss / 1024 - model_size_mb  # ru_maxrss: KiB


def rd_overhead(epochs: tuple[int, int]) -> float:
    """DP RD seconds per epoch over plain training's: ``bench_rd``'s measurement, the same one
    ``diredi bench rd`` prints (the two training loops of ``reverse_distill`` on the digits
    student, the default grad-sample mode, per epoch = the difference of an ``epochs[1]``-epoch
    and a ``epochs[0]`` = 1-epoch run; torch in a spawned child)."""
    from diredi_secure.benchmarks.bench_rd import measure_for_ceilings

    return float(measure_for_ceilings(epochs=epochs)["dp_overhead"])


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def _ingest(
    report: Report,
    fleet: Fleet,
    plan: Plan,
    label: str,
    store_url: str,
    schema: str | None,
    half_load: bool,
    workers: int,
) -> dict[str, float]:
    from diredi_secure.services.cloud import KNOWLEDGE_SERVICE

    method = f"/{KNOWLEDGE_SERVICE}/Submit"
    got: dict[str, float] = {}
    with ProjectServer(fleet, store_url, schema, workers) as server:
        target = f"127.0.0.1:{server.port}"
        for nbytes, total in plan.ingest.items():
            for devices in plan.devices:
                load = drive(
                    target,
                    fleet,
                    fleet.work(devices, total, nbytes),
                    method,
                    deadline_s=plan.deadline_s,
                )
                name = f"ingest {label} {nbytes // KIB} KiB {devices} dev"
                ceiling = (
                    "bare verify+open server"
                    if nbytes == KIB
                    else f"crypto 1 core {nbytes // KIB} KiB"
                )
                report.add(name, load.rate, "packets/s", ceiling)
                got[f"{nbytes}/{devices}"] = load.rate
        rate = got[f"{KIB}/{plan.headline_devices}"]
        if half_load:
            d = plan.headline_devices
            load = drive(
                target,
                fleet,
                fleet.work(d, plan.half_load_n, KIB),
                method,
                interval_s=d / (rate / 2),
                deadline_s=plan.deadline_s,
            )
            report.add(f"ingest {label} half load ({rate / 2:,.0f}/s) p50", load.quantile(50), "ms")
            report.add(f"ingest {label} half load p99", load.quantile(99), "ms")
            got["p99"] = load.quantile(99)
    return got


def run(
    *,
    workers: int = 2,
    postgres: str | None = None,
    quick: bool = False,
    out: Callable[[str], None] = print,
) -> Report:
    if not 1 <= workers <= 64:
        raise ConfigError(f"--workers must lie in [1, 64], got {workers}")
    plan = Plan.for_run(quick)
    report = Report(out=out)
    out(
        f"ceilings: {'quick' if quick else 'full'} run, {os.cpu_count()} CPUs, --workers {workers}, "
        f"headline 1 KiB x {plan.headline_devices} devices"
    )
    with tempfile.TemporaryDirectory(prefix="diredi-ceilings-") as tmp:
        root = Path(tmp)
        fleet = Fleet(root, max(plan.devices))
        verifier = fleet.verifier()
        probe = fleet.seal(0, KIB)
        device0 = fleet.devices[0].device_id
        report.add(
            "crypto 1 core", crypto_rate(verifier, device0, probe, plan.crypto_n, 1), "packets/s"
        )
        report.add(
            f"crypto {workers} cores",
            crypto_rate(verifier, device0, probe, plan.crypto_n, workers),
            "packets/s",
            "crypto 1 core",
        )
        for nbytes in plan.ingest:
            if nbytes != KIB:  # the ceiling of the larger payloads' ingest rows
                big = fleet.seal(0, nbytes)
                report.add(
                    f"crypto 1 core {nbytes // KIB} KiB",
                    crypto_rate(verifier, device0, big, max(10, plan.crypto_n // 20), 1),
                    "packets/s",
                )
        tls = fleet.cloud.server_tls(mtls=True)
        d = plan.headline_devices
        with BareServers("echo", tls, 1, None) as echo:
            work = fleet.work(d, plan.grpc_n, KIB)
            load = drive(f"127.0.0.1:{echo.port}", fleet, work, _METHOD, deadline_s=plan.deadline_s)
            report.add("bare grpc mTLS echo (1 process)", load.rate, "calls/s")
        with BareServers("verify", tls, workers, verifier) as bare:
            work = fleet.work(d, plan.grpc_n, KIB)
            load = drive(f"127.0.0.1:{bare.port}", fleet, work, _METHOD, deadline_s=plan.deadline_s)
            report.add("bare verify+open server", load.rate, "packets/s", f"crypto {workers} cores")
        for per in (1, 32):
            report.add(
                f"raw sqlite {per}/commit",
                sqlite_rate(root, plan.sqlite_rows, per, plan.deadline_s),
                "rows/s",
            )
        if postgres:
            for per in (1, 32):
                report.add(
                    f"raw postgres {per}/commit",
                    postgres_rate(postgres, plan.sqlite_rows, per, plan.deadline_s),
                    "rows/s",
                )
        report.add("sha256", sha256_rate(plan.sha_mb), "MB/s")
        # Counters continue across runs; the SQLite store lives in the cloud workspace.
        sqlite = _ingest(
            report, fleet, plan, "sqlite", fleet.cloud.store_url(), None, half_load=True,
            workers=workers,
        )
        headline = sqlite
        if postgres:
            schema = f"bench_ceil_ingest_{os.getpid()}"
            try:
                headline = _ingest(
                    report, fleet, plan, "postgres", postgres, schema, half_load=True,
                    workers=workers,
                )
            finally:
                import psycopg
                from psycopg import sql

                with psycopg.connect(postgres, autocommit=True) as admin:
                    admin.execute(
                        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                    )
        mb_s, rss = update_figures(root, plan.update_mb)
        report.add(f"update {plan.update_mb} MB (diredi edge update)", mb_s, "MB/s", "sha256")
        report.add("update peak RSS over the model", rss, "MB")
        report.add("DP RD per epoch / plain", rd_overhead(plan.rd_epochs), "x")
    f = report.figures
    lines = {}
    for label, got in (("sqlite", sqlite), ("postgres", headline if postgres else None)):
        if got is None:
            continue
        rate = got[f"{KIB}/{plan.headline_devices}"]
        lines[label] = (
            f"ingest_vs_grpc_floor={rate / f['bare verify+open server']:.3f} "
            f"ingest_vs_crypto={rate / f[f'crypto {workers} cores']:.3f} "
            f"p99_half_ms={got['p99']:.1f} "
            f"update_vs_sha256={f[f'update {plan.update_mb} MB (diredi edge update)'] / f['sha256']:.3f} "
            f"update_rss_over_model_mb={f['update peak RSS over the model']:.1f} "
            f"rd_dp_overhead={f['DP RD per epoch / plain']:.2f}"
        )
    if postgres:
        out(f"ceilings[sqlite]: {lines['sqlite']}")
    report.figures["_line"] = 0.0
    report.rows.append(("_line", lines["postgres" if postgres else "sqlite"], ""))
    out(f"ceilings: {lines['postgres' if postgres else 'sqlite']}")
    return report


def readme_table(report: Report, command: str) -> str:
    rows = [r for r in report.rows if r[0] != "_line"]
    body = "\n".join(f"| {name} | {value} | {ratio} |" for name, value, ratio in rows)
    line = next(v for n, v, _ in report.rows if n == "_line")
    return (
        f"{README_START}\n<!-- generated by `{command}`; do not edit -->\n\n"
        f"| figure | measured | ratio to its ceiling (same run) |\n|---|---|---|\n{body}\n\n"
        f"`ceilings: {line}`\n{README_END}"
    )


def write_readme(path: Path, report: Report, command: str) -> None:
    """Replace the generated block between the markers (refused when the markers are missing)."""
    text = path.read_text()
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise ConfigError(f"{path} has no {README_START} ... {README_END} block to replace")
    path.write_text(pattern.sub(lambda _m: readme_table(report, command), text, count=1))

"""``diredi cloud serve --workers N``: N server processes on one port, one store writer.

Why processes: the server is mostly Python, so one process never uses more than one core; the
kernel spreads connections over N processes that bind the same port with ``SO_REUSEPORT``.

* **PostgreSQL**: each worker opens its own store and group-commits on its own; the device row
  locks of ``store_packet`` keep replay checks, receipts and the ledger exact across processes.
* **SQLite**: one writer. The parent process holds the only store that commits packets; each
  worker verifies and opens packets itself and sends the resulting row (``PacketRow.to_bytes``,
  no pickle) over its ``multiprocessing`` pipe; the parent feeds every worker's rows into one
  group commit and answers with the receipt or the typed refusal, so a worker sends a receipt only
  after the parent's commit that holds its packet. Workers read the database directly (WAL lets
  readers run beside the writer) and enrol devices directly (rare, under SQLite's file lock).

Lifetimes: a worker whose pipe closes (the parent died, even by SIGKILL) exits at once; the
parent stops the workers on SIGTERM or Ctrl-C, then closes the store; a worker that exits on its
own stops the others and the command fails. Only worker 0 serves the ops endpoint. What crosses
the spawn itself is :class:`WorkerOptions` (plain values, by ``multiprocessing``'s own pickling,
from the parent to its child); rows and answers cross the pipe as bytes, bounded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from diredi_secure.errors import (
    BudgetExceeded,
    CertificateRevoked,
    ConfigError,
    DirediError,
    LocalError,
    PolicyViolation,
    ReplayDetected,
    StoreError,
    UnknownDevice,
)
from diredi_secure.store import (
    CertificateChanged,
    DeviceConflict,
    PacketRow,
    SQLiteStore,
    Store,
    StoredReceipt,
    is_postgres_url,
)

__all__ = ["RemoteWriter", "WorkerOptions", "serve_workers"]

log = logging.getLogger("diredi.services")

_READY, _ROW, _OK, _ERR = b"P", b"R", b"K", b"E"
_ID = struct.Struct(">Q")
# Bounds on one pipe message. An answer is a receipt or a short refusal; a row is one packet
# (at most ``limits.max_packet_bytes``) plus its receipt, certificate and ledger curve.
_MAX_ANSWER_BYTES = 1 << 20
_ROW_OVERHEAD_BYTES = 1 << 20
# The refusals a writer may answer with, by name: anything else arrives as a StoreError.
_ERRORS: dict[str, type[DirediError]] = {
    cls.__name__: cls
    for cls in (ReplayDetected, BudgetExceeded, UnknownDevice, CertificateChanged,
                CertificateRevoked, PolicyViolation, DeviceConflict, StoreError)
}


@dataclass(frozen=True)
class WorkerOptions:
    """What every worker needs to build its server (plain values: they cross a process spawn)."""

    workspace: str
    listen: str
    mtls: bool
    insecure: bool
    max_workers: int
    ops_listen: str | None
    log_level: str
    log_format: str
    log_file: str | None
    passphrase_env: str | None


# ------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------
class RemoteWriter:
    """``Store._submit_row`` of a worker: the row goes to the writer process, the call returns
    once the writer's commit holding it is done (or raises the writer's typed refusal)."""

    def __init__(self, conn: Connection, on_lost: Callable[[], None]) -> None:
        self._conn = conn
        self._on_lost = on_lost
        self._send = threading.Lock()
        self._pending: dict[int, tuple[threading.Event, list[bytes]]] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._lost = False
        threading.Thread(target=self._read, name="diredi-writer-link", daemon=True).start()

    def send_ready(self, port: int) -> None:
        with self._send:
            self._conn.send_bytes(_READY + _ID.pack(port))

    def submit(self, row: PacketRow) -> StoredReceipt:
        done, box = threading.Event(), list[bytes]()
        with self._lock:
            if self._lost:
                raise StoreError("the store writer process is gone")
            self._next += 1
            ident = self._next
            self._pending[ident] = (done, box)
        try:
            with self._send:
                self._conn.send_bytes(_ROW + _ID.pack(ident) + row.to_bytes())
        except (OSError, ValueError) as exc:
            self._fail_all()
            raise StoreError("the store writer process is gone") from exc
        done.wait()
        if not box:
            raise StoreError("the store writer process is gone")
        return _decode_outcome(box[0])

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv_bytes(_MAX_ANSWER_BYTES)
                (ident,) = _ID.unpack_from(message)
                with self._lock:
                    waiter = self._pending.pop(ident, None)
                if waiter is not None:
                    waiter[1].append(message[_ID.size:])
                    waiter[0].set()
        except (EOFError, OSError):
            pass
        self._fail_all()
        self._on_lost()

    def _fail_all(self) -> None:
        with self._lock:
            self._lost = True
            pending, self._pending = self._pending, {}
        for done, _ in pending.values():
            done.set()


def _encode_outcome(outcome: StoredReceipt | BaseException) -> bytes:
    if isinstance(outcome, StoredReceipt):
        return _OK + (b"\x01" if outcome.duplicate else b"\x00") + outcome.receipt_bytes
    if isinstance(outcome, DirediError) and type(outcome).__name__ in _ERRORS:
        kind, reason, message = type(outcome).__name__, outcome.reason, outcome.message
    else:  # logged here in full; the worker (and the device) get the generic store fault
        log.error("store writer failed: %r", outcome)
        kind, reason, message = "StoreError", StoreError.reason, "the store failed"
    return _ERR + json.dumps({"kind": kind, "reason": reason, "message": message}).encode()


def _decode_outcome(data: bytes) -> StoredReceipt:
    if data[:1] == _OK:
        return StoredReceipt(data[2:], duplicate=data[1:2] == b"\x01")
    try:
        info = json.loads(data[1:])
        cls = _ERRORS[info["kind"]]
        raise cls(str(info["message"]), reason=str(info["reason"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError("the store writer sent an answer this build does not know") from exc


def _worker_main(options: WorkerOptions, index: int, port: int, conn: Connection) -> None:
    """One server process (spawned): its own store handle and gRPC server on the shared port."""
    stopping = _on_stop_signals(ignore_sigint=True)  # the parent decides on Ctrl-C
    from .observe import configure_logging
    from .workspace import CloudWorkspace

    configure_logging(options.log_level, options.log_format,
                      Path(options.log_file) if options.log_file else None)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(index))
    ws = CloudWorkspace.open(Path(options.workspace))
    cfg = ws.settings()
    store = ws.open_store()
    # The pipe also tells the worker when the parent is gone (EOF): it exits at once.
    writer = RemoteWriter(conn, on_lost=lambda: os._exit(3))
    if not is_postgres_url(ws.store_url()):
        store._submit_row = writer.submit  # packets go to the one writer process
    server = _build_server(ws, cfg, options, store, index=index,
                           listen=f"{options.listen.rsplit(':', 1)[0]}:{port}")
    server.start()
    writer.send_ready(port)
    try:
        while not stopping:
            time.sleep(0.2)
    finally:
        server.stop(grace_s=5)
        store.close()


class _WorkerField(logging.Filter):
    """Adds ``worker=<index>`` to every log line of a worker (which process served a packet)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def _on_stop_signals(*, ignore_sigint: bool) -> list[int]:
    """Record SIGTERM (and SIGINT unless ignored) in the returned list, which the main thread
    polls. The handler only appends: a handler that stops a server or sets a ``threading.Event``
    can deadlock on a lock the interrupted main thread holds (seen before this: a worker that
    called ``server.stop`` in its handler did not stop within 15 s and was killed)."""
    received: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: received.append(signum))
    signal.signal(signal.SIGINT,
                  signal.SIG_IGN if ignore_sigint else lambda signum, _: received.append(signum))
    return received


def _build_server(ws: Any, cfg: Any, options: WorkerOptions, store: Store, *, index: int,
                  listen: str) -> Any:
    from diredi_secure._secrets import passphrase_from_env

    from .cloud import CloudServer

    keys = ws.keys(passphrase_from_env(options.passphrase_env))
    tls = None if options.insecure else ws.server_tls(mtls=options.mtls)
    return CloudServer(
        store=store, keys=keys, tls=tls, insecure=options.insecure, listen=listen,
        repository_dir=ws.repository_dir, released_models=ws.released_models(),
        policy=cfg.policy, config=cfg.transport_config(), max_workers=options.max_workers,
        ops_listen=options.ops_listen if index == 0 else None, reuse_port=True,
    )


# ------------------------------------------------------------------------------------------------
# Parent side
# ------------------------------------------------------------------------------------------------
def _reserve_port(listen: str) -> tuple[socket.socket, int]:
    """Bind (not listen) ``listen`` with SO_REUSEPORT, so port 0 becomes one port every worker
    can bind; the kernel only hands connections to listening sockets, so this one gets none.

    Raises :class:`ConfigError` (reason ``listen``) for an address that is not ``host:port``, a
    host that does not resolve, a bind that fails, or a port some server already listens on
    (another ``--workers`` server of this user could otherwise join the same port silently)."""
    from .transport import _check_bindable

    _check_bindable(listen, reuse_port=True)  # the same refusals, worded as a single server's
    host, _, port = listen.rpartition(":")
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    holder = socket.socket(family, kind, proto)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(address)
        bound = holder.getsockname()
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(1.0)
            if probe.connect_ex(bound) == 0:
                raise ConfigError(f"cannot listen on {listen!r}: a server already listens on port "
                                  f"{bound[1]}", reason="listen")
    except OSError as exc:
        holder.close()
        raise ConfigError(f"cannot listen on {listen!r}: {exc.strerror}", reason="listen") from exc
    except BaseException:
        holder.close()
        raise
    return holder, int(bound[1])


def _serve_link(conn: Connection, store: SQLiteStore | None, pool: futures.Executor,
                ready: Callable[[int], None], max_row_bytes: int) -> None:
    """Answer one worker's rows through the writer's group commit, until its pipe closes."""
    send = threading.Lock()

    def commit(ident: bytes, payload: bytes) -> None:
        assert store is not None
        outcome: StoredReceipt | BaseException
        try:
            outcome = store._submit_row(PacketRow.from_bytes(payload))
        except BaseException as exc:  # every outcome goes back to the waiting worker
            outcome = exc
        with send, contextlib.suppress(OSError, ValueError):  # the worker is gone: nobody waits
            conn.send_bytes(ident + _encode_outcome(outcome))

    try:
        while True:
            message = conn.recv_bytes(max_row_bytes)  # OSError above it: the link closes
            kind, ident, payload = message[:1], message[1:1 + _ID.size], message[1 + _ID.size:]
            if kind == _READY:
                ready(_ID.unpack(ident)[0])
            elif kind == _ROW and store is not None:
                pool.submit(commit, ident, payload)
    except (EOFError, OSError):  # the worker is gone, or sent what no worker sends: drop it
        with send:
            conn.close()  # a worker still running sees EOF and exits; its pending calls fail


def serve_workers(options: WorkerOptions, workers: int, *,
                  on_ready: Callable[[int], None]) -> None:
    """Run ``workers`` server processes on ``options.listen`` until SIGTERM (or Ctrl-C).

    ``on_ready(port)`` is called once every worker serves. Raises :class:`ConfigError` if
    ``workers`` is below 1, the address cannot be bound or a worker fails to start. When it
    returns (or raises) every worker has exited: each gets SIGTERM and 15 s, then SIGKILL. A
    worker that exits on its own stops the others and raises :class:`LocalError`
    (``worker_exited``), so a supervisor sees a failure, not a clean stop.
    """
    from .workspace import CloudWorkspace

    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}", reason="workers")
    ws = CloudWorkspace.open(Path(options.workspace))
    max_row_bytes = ws.settings().transport_config().limits.max_packet_bytes + _ROW_OVERHEAD_BYTES
    holder, port = _reserve_port(options.listen)
    try:
        store = ws.open_store()  # migrates once, before any worker opens it
    except BaseException:
        holder.close()
        raise
    writer: SQLiteStore | None = store if isinstance(store, SQLiteStore) else None
    if writer is None:
        store.close()  # each PostgreSQL worker opens its own
    stopping = _on_stop_signals(ignore_sigint=False)
    context = multiprocessing.get_context("spawn")
    pool = futures.ThreadPoolExecutor(max_workers=max(32, 16 * workers),
                                      thread_name_prefix="diredi-writer")
    processes: list[Any] = []
    serving: set[int] = set()
    lost: LocalError | None = None

    def exited() -> bool:
        return any(p.exitcode is not None for p in processes)

    try:
        for index in range(workers):
            parent_end, child_end = context.Pipe()
            proc = context.Process(target=_worker_main, args=(options, index, port, child_end),
                                   name=f"diredi-serve-{index}", daemon=False)
            proc.start()
            child_end.close()
            processes.append(proc)
            threading.Thread(target=_serve_link,
                             args=(parent_end, writer, pool, lambda _port, i=index: serving.add(i),
                                   max_row_bytes),
                             name=f"diredi-link-{index}", daemon=True).start()
        while len(serving) < workers:  # set.add from the link threads: atomic under the GIL
            if stopping:
                return
            if exited():
                raise ConfigError("a server worker exited while starting (see the log)",
                                  reason="workers")
            time.sleep(0.05)
        holder.close()
        on_ready(port)
        while not stopping:
            dead = [p for p in processes if p.exitcode is not None]
            if dead:
                lost = LocalError(f"server worker {dead[0].name} exited with code "
                                  f"{dead[0].exitcode}; the others were stopped",
                                  reason="worker_exited")
                log.error("%s", lost.message)
                break
            time.sleep(0.2)
    finally:
        holder.close()
        for proc in processes:
            if proc.exitcode is None:
                proc.terminate()  # SIGTERM: each stops its server with a grace period
        for proc in processes:
            proc.join(15)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        pool.shutdown(wait=True)
        if writer is not None:
            writer.close()
    if lost is not None:  # the server did not stop because it was asked to
        raise lost

"""What an operator sees: structured logs, Prometheus metrics, and an ops endpoint (health +
metrics) that needs no device certificate.

* :func:`configure_logging` sets the ``diredi`` loggers up once per process: ``console`` (one
  readable line, ``key=value`` fields after the message) or ``json`` (one object per line, the
  fields at top level), at a chosen level, to stderr or a file.
* :class:`IngestObserver` is called by the knowledge servicer once per submission: one log line
  per accepted and per refused packet (device, counter, epsilon with its delta, payload and packet
  bytes, peer, reason, latency) and the matching metrics. It never raises into the call.
* :class:`Metrics` holds the collectors in a registry of their own (several servers in one test
  process do not collide); ledger figures and the release versions are read from the store and
  the repository at scrape time, with one aggregate query (no per-device series: a fleet of
  millions must not become millions of series).
* :class:`OpsServer` serves ``/metrics`` (Prometheus text format) and ``/healthz`` over plain
  HTTP on a port of its own, so a load balancer or a Kubernetes probe can check the server
  without a device certificate. It carries no device data; bind it to an internal address.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from diredi_secure.errors import ConfigError, DirediError

if TYPE_CHECKING:
    from diredi_secure.envelope import PacketHeader

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "IngestObserver",
    "Metrics",
    "OpsServer",
    "configure_logging",
]

log = logging.getLogger("diredi.ingest")

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("console", "json")
# Attributes every LogRecord has; anything else a caller put in ``extra`` is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


# The stdlib's logging is the library; these two formatters (a few lines each) are all that the
# JSON and key=value outputs need, so no structured-logging dependency is added for them.
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601 UTC), ``level``, ``logger``, ``msg``, fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


class ConsoleFormatter(logging.Formatter):
    """``2026-12-02T10:00:00Z info diredi.ingest: accepted device=dev-a counter=3 ...``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        line = f"{ts} {record.levelname.lower()} {record.name}: {record.getMessage()}"
        extra = " ".join(f"{k}={_console_value(v)}" for k, v in _fields(record).items())
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _console_value(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return json.dumps(text) if (not text or any(c.isspace() or c in "\"=" for c in text)) else text


def configure_logging(level: str = "info", fmt: str = "console", file: Path | None = None) -> None:
    """Route every ``diredi*`` logger (and warnings) to stderr or ``file`` (appended)."""
    if level not in LOG_LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.captureWarnings(True)


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)


class _ScrapeCollector(Collector):
    """Figures read at scrape time: the ledger (one aggregate query) and the release versions."""

    def __init__(self, ledger: Callable[[], dict[str, float]] | None,
                 releases: Callable[[], dict[str, int]] | None) -> None:
        self._ledger = ledger
        self._releases = releases

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self._ledger is not None:
            try:
                figures = self._ledger()
            except Exception:  # a scrape must never take the server down; it shows as missing
                log.warning("ledger figures unavailable for a metrics scrape", exc_info=True)
                figures = {}
            for name, help_text in (
                ("devices_active", "Enrolled devices not revoked."),
                ("devices_revoked", "Revoked devices."),
                ("devices_exhausted", "Active devices with no epsilon budget left."),
                ("ledger_epsilon_spent_sum", "Sum over devices of the composed epsilon spent (at the policy's delta)."),
                ("ledger_epsilon_spent_max", "Largest composed epsilon spent by one device (at the policy's delta)."),
                ("ledger_delta", "The one delta every epsilon in the ledger is stated at."),
            ):
                if name in figures:
                    yield GaugeMetricFamily(f"diredi_{name}", help_text, value=figures[name])
        if self._releases is not None:
            family = GaugeMetricFamily("diredi_release_metadata_version",
                                       "Newest TUF metadata version served, by role.", labels=["role"])
            try:
                for role, version in sorted(self._releases().items()):
                    family.add_metric([role], version)
            except Exception:
                log.warning("release versions unavailable for a metrics scrape", exc_info=True)
            yield family


class Metrics:
    """The server's Prometheus collectors, in their own registry."""

    def __init__(self, *, ledger: Callable[[], dict[str, float]] | None = None,
                 releases: Callable[[], dict[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.submits = Counter("diredi_submits", "Packet submissions by outcome and reason.",
                               ["outcome", "reason", "method"], registry=self.registry)
        self.ingest_seconds = Histogram("diredi_ingest_seconds",
                                        "Time from the call's start to its answer, by outcome.",
                                        ["outcome"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.packet_bytes = Counter("diredi_packet_bytes", "Packet bytes accepted (whole signed packets).",
                                    registry=self.registry)
        self.epsilon_charged = Counter("diredi_epsilon_charged",
                                       "Sum of the per-packet total epsilon of accepted packets (declared, at the policy's delta).",
                                       registry=self.registry)
        self.release_fetches = Counter("diredi_release_fetches", "Update-channel requests served, by kind and outcome.",
                                       ["kind", "outcome"], registry=self.registry)
        self.registry.register(_ScrapeCollector(ledger, releases))

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


class IngestObserver:
    """Called once per submission; logs one line and updates the metrics. Never raises."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    def accepted(self, *, method: str, packet: bytes, receipt: bytes, peer: str | None,
                 started: float, header: PacketHeader | None = None, duplicate: bool = False) -> None:
        """``header``: the verified header of the packet stored (ingest had it: nothing is parsed
        again; issue 15: parsing the packet and its receipt for this line was 0.1 ms a packet);
        without it the packet's and the receipt's claims are read back. ``duplicate``: a retry
        answered with its first receipt (logged, its epsilon not counted again: the ledger
        charged it once)."""
        try:
            elapsed = time.monotonic() - started
            if header is not None:
                fields = _header_fields(header)
                fields["packet_id"] = header.packet_id.hex()
            else:
                fields = _packet_fields(packet)
                fields.update(_receipt_fields(receipt))
            if self.metrics is not None:
                self.metrics.submits.labels("accepted", "", method).inc()
                self.metrics.ingest_seconds.labels("accepted").observe(elapsed)
                self.metrics.packet_bytes.inc(len(packet))
                eps = None if duplicate else fields.get("epsilon")
                if isinstance(eps, float) and eps == eps and eps != float("inf"):
                    self.metrics.epsilon_charged.inc(eps)
            log.info("packet accepted", extra={"event": "packet_accepted", "method": method, **fields,
                                               "duplicate": duplicate,
                                               "packet_bytes": len(packet), "peer": peer or "-",
                                               "ms": round(elapsed * 1000, 2)})
        except Exception:  # observing must never change the answer
            log.debug("could not log an accepted packet", exc_info=True)

    def refused(self, *, method: str, error: BaseException, packet: bytes | None, peer: str | None,
                started: float) -> None:
        try:
            elapsed = time.monotonic() - started
            reason = error.reason if isinstance(error, DirediError) else "internal"
            fields = _packet_fields(packet) if packet is not None else {}
            if self.metrics is not None:
                self.metrics.submits.labels("refused", reason, method).inc()
                self.metrics.ingest_seconds.labels("refused").observe(elapsed)
            level = logging.ERROR if reason == "internal" else logging.INFO
            log.log(level, "packet refused", extra={
                "event": "packet_refused", "method": method, "reason": reason, **fields,
                "packet_bytes": len(packet) if packet is not None else 0, "peer": peer or "-",
                "ms": round(elapsed * 1000, 2),
                # A peer's error text can be long; its one-line form, cut, is enough to diagnose.
                "detail": (error.one_line() if isinstance(error, DirediError) else type(error).__name__)[:300],
            })
        except Exception:
            log.debug("could not log a refused packet", exc_info=True)


def _packet_fields(packet: bytes) -> dict[str, Any]:
    """What the (unverified) header claims, for the log line; nothing if it does not parse."""
    from diredi_secure.packet import inspect_packet

    try:
        header = inspect_packet(packet)
    except DirediError:
        return {}
    return _header_fields(header)


def _header_fields(header: PacketHeader) -> dict[str, Any]:
    return {
        "device": header.device_id,
        "counter": header.counter,
        "epsilon": float(header.dp.composed_epsilon),
        "delta": float(header.dp.delta),
        "payload_bytes": header.payload.length,
        "base_model": header.base_model_version[:16],
    }


def _receipt_fields(receipt: bytes) -> dict[str, Any]:
    from diredi_secure.serde import receipt_body_from_bytes, receipt_from_bytes

    body_bytes, _ = receipt_from_bytes(receipt)
    body = receipt_body_from_bytes(body_bytes)
    return {"device": body.device_id, "counter": body.counter, "packet_id": body.packet_id.hex()}


# ------------------------------------------------------------------------------------------------
# the ops endpoint
# ------------------------------------------------------------------------------------------------
class OpsServer:
    """``GET /metrics`` and ``GET /healthz`` on their own HTTP port (no device certificate).

    ``healthy`` answers whether the gRPC server is serving and its store answers; ``/healthz``
    returns 200 ``SERVING`` or 503 ``NOT_SERVING``. Anything else is 404. Bodies are tiny and
    requests carry no input beyond the path, so there is nothing for a caller to make it parse.
    """

    def __init__(self, listen: str, metrics: Metrics, healthy: Callable[[], bool]) -> None:
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"ops endpoint {listen!r} is not host:port", reason="listen")
        host = host.strip("[]") or "127.0.0.1"
        ops = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5  # seconds a client may take to send its request line

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, ops.metrics.exposition(),
                               "text/plain; version=0.0.4; charset=utf-8")
                elif path in ("/healthz", "/readyz", "/livez"):
                    ok = ops._healthy()
                    self._send(200 if ok else 503, b"SERVING\n" if ok else b"NOT_SERVING\n", "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logging.getLogger("diredi.ops").debug(format, *args)

        self.metrics = metrics
        self._health_check = healthy
        try:
            self._httpd = ThreadingHTTPServer((host, int(port)), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {listen!r} for the ops endpoint: {exc.strerror}",
                              reason="listen") from exc
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="diredi-ops", daemon=True)

    def _healthy(self) -> bool:
        try:
            return bool(self._health_check())
        except Exception:
            return False

    def start(self) -> int:
        self._thread.start()
        log.info("ops endpoint (health, metrics) on port %d", self.port)
        return self.port

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

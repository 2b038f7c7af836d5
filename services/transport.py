"""Channel and server credentials, size caps, keepalive and deadlines, in one place.

* **TLS by default.** The cloud presents its server certificate (ECDSA P-256 key, issued by the
  device CA, whose certificate every device holds). With ``require_client_auth`` the server is
  **mTLS**: a device must present its TLS client certificate from the same CA, and
  :func:`peer_device_id` reads the device id the TLS layer verified.
* **Plaintext** only when the caller passes ``insecure=True`` explicitly; it logs a warning each
  time a server or channel is made that way.
* **Caps.** Both sides cap message sizes from :class:`TransportConfig` (derived from the core's
  ``Limits``): a unary packet above ``max_unary_bytes`` is refused by gRPC itself with
  ``RESOURCE_EXHAUSTED`` before our code sees it; streamed packets arrive in chunks under that cap.
* **Keepalive** pings detect dead peers; the server tolerates them at the client's interval.
* **Deadlines**: every client call goes through :meth:`TransportConfig.deadline_for`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import grpc

from diredi_secure._crypto import DEVICE_URI_PREFIX
from diredi_secure.errors import ConfigError
from diredi_secure.policy import DEFAULT_LIMITS, Limits

from .ratelimit import RefusalLimits

__all__ = [
    "ClientTls",
    "ServerTls",
    "TransportConfig",
    "channel_credentials",
    "open_channel",
    "peer_device_id",
    "server_credentials",
    "server_options",
]

log = logging.getLogger("diredi.services")

# Envelope fields, the Chunk wrapper and gRPC framing on top of the packet bytes themselves.
_FRAMING_SLACK = 64 * 1024


@dataclass(frozen=True)
class TransportConfig:
    """Every transport cap and timer (bytes, milliseconds, seconds as named)."""

    limits: Limits = DEFAULT_LIMITS
    chunk_bytes: int = 1024 * 1024
    """Size of one streamed chunk (packets and release targets)."""
    max_metadata_bytes: int = 4 * 1024 * 1024
    """Largest TUF metadata file the update service serves and the fetcher accepts."""
    max_target_bytes: int = 512 * 1024 * 1024
    """Largest release target the update service streams."""
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    unary_deadline_s: float = 10.0
    stream_deadline_s: float = 120.0
    max_concurrent_streams: int = 32
    """HTTP/2 streams (calls) one connection may have open at once."""
    max_concurrent_calls: int = 256
    """Calls the server has open at once, all callers together (grpcio's
    ``maximum_concurrent_rpcs``; beyond it ``RESOURCE_EXHAUSTED``, read as ``overloaded`` by the
    agent). It also bounds the request bytes buffered at once: at most this many messages of
    ``max_message_bytes``."""
    max_calls_per_device: int = 8
    """Calls one mTLS device may have open at once; more are answered UNAVAILABLE ``overloaded``
    before their request is read (a device runs one or two at a time)."""
    max_calls_per_host: int = 64
    """The same for a caller without a device certificate, per host: larger, because every
    device behind one NAT or proxy shares its host."""
    handshake_timeout_ms: int = 10_000
    """A connection that has not finished its TLS and HTTP/2 handshake by then is closed."""
    max_ingest_streams: int = 4
    """SubmitStream calls served at once; more are refused as ``overloaded`` (retryable), so slow
    or stalled streams can never hold every worker thread (Health and unary calls keep answering)."""
    ingest_stream_deadline_s: float = 60.0
    """Server-side limit on one SubmitStream, whatever deadline the client set: then cancelled."""
    ingest_stream_idle_s: float = 10.0
    """A SubmitStream that sends no chunk for this long is cancelled (a stall frees its slot well
    before ``ingest_stream_deadline_s``)."""
    max_watch_streams: int = 2
    """Health/Watch and reflection calls served at once (each holds a server thread)."""
    watch_stream_deadline_s: float = 30.0
    """The server cancels an open Health/Watch or reflection call after this long."""
    max_fetch_streams: int = 4
    max_watch_streams_per_caller: int = 1
    """Health/Watch and reflection calls one caller (mTLS device, or host) may hold open."""
    max_fetch_streams_per_caller: int = 2
    """FetchTarget downloads one caller (mTLS device, or host) may run at once."""
    """FetchTarget downloads served at once; each is cancelled at its deadline
    (``stream_deadline_s``, or ``deadlines["FetchTarget"]``)."""
    min_stream_bytes_per_s: int = 64 * 1024
    """After the first 5 s, a stream slower than this on average is refused (slow-loris)."""
    max_connection_idle_ms: int = 5 * 60 * 1000
    max_connection_age_ms: int = 60 * 60 * 1000
    max_connection_age_grace_ms: int = 60 * 1000
    deadlines: dict[str, float] = field(default_factory=dict)
    """Per-method overrides of the deadline, by method name (``Submit``, ``FetchTarget``...)."""
    refusals: RefusalLimits = field(default_factory=RefusalLimits)
    """The per-device refusal limit (set in ``cloud.toml``'s ``[limits]``, like ``limits``)."""

    def __post_init__(self) -> None:
        if self.chunk_bytes <= 0 or self.chunk_bytes > self.limits.max_unary_bytes:
            raise ConfigError(
                f"chunk_bytes must lie in (0, max_unary_bytes={self.limits.max_unary_bytes}]"
            )
        for name in ("unary_deadline_s", "stream_deadline_s", "ingest_stream_deadline_s",
                     "ingest_stream_idle_s", "max_ingest_streams", "max_watch_streams",
                     "watch_stream_deadline_s", "max_fetch_streams", "min_stream_bytes_per_s", "max_connection_idle_ms",
                     "max_connection_age_ms", "max_connection_age_grace_ms", "max_concurrent_calls",
                     "max_calls_per_device", "max_calls_per_host", "handshake_timeout_ms",
                     "max_concurrent_streams", "max_watch_streams_per_caller",
                     "max_fetch_streams_per_caller"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")

    @property
    def max_message_bytes(self) -> int:
        """The gRPC message cap on both sides: a unary packet plus framing slack."""
        return max(self.limits.max_unary_bytes, self.chunk_bytes) + _FRAMING_SLACK

    def deadline_for(self, method: str, *, streaming: bool = False) -> float:
        """Seconds a call of ``method`` may take (every client call has one)."""
        default = self.stream_deadline_s if streaming else self.unary_deadline_s
        return self.deadlines.get(method, default)

    def common_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
        ]


def server_options(config: TransportConfig) -> list[tuple[str, Any]]:
    return [
        *config.common_options(),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.max_connection_idle_ms", config.max_connection_idle_ms),
        ("grpc.max_connection_age_ms", config.max_connection_age_ms),
        ("grpc.max_connection_age_grace_ms", config.max_connection_age_grace_ms),
        ("grpc.server_handshake_timeout_ms", config.handshake_timeout_ms),
        # accept the clients' keepalive pings at their interval (no GOAWAY "too_many_pings")
        ("grpc.http2.min_ping_interval_without_data_ms", config.keepalive_time_ms // 2),
        ("grpc.so_reuseport", 0),
    ]


@dataclass(frozen=True)
class ServerTls:
    """The cloud's TLS identity; ``client_ca_pem`` and ``require_client_auth`` turn on mTLS."""

    key_pem: bytes
    cert_pem: bytes
    client_ca_pem: bytes | None = None
    require_client_auth: bool = False

    def __post_init__(self) -> None:
        if self.require_client_auth and not self.client_ca_pem:
            raise ConfigError("mTLS needs the device CA certificate to verify clients")

    def __repr__(self) -> str:
        return f"ServerTls(mtls={self.require_client_auth})"


@dataclass(frozen=True)
class ClientTls:
    """What a device trusts (``root_pem``) and, for mTLS, presents (its TLS key and certificate)."""

    root_pem: bytes
    key_pem: bytes | None = None
    cert_pem: bytes | None = None
    server_name: str | None = None
    """Overrides the name checked against the server certificate (when dialling an IP alias)."""

    def __post_init__(self) -> None:
        if (self.key_pem is None) != (self.cert_pem is None):
            raise ConfigError("a client TLS identity needs both its key and its certificate")

    def __repr__(self) -> str:
        return f"ClientTls(mtls={self.key_pem is not None})"


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(tls.key_pem, tls.cert_pem)],
        root_certificates=tls.client_ca_pem,
        require_client_auth=tls.require_client_auth,
    )


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.root_pem, private_key=tls.key_pem, certificate_chain=tls.cert_pem
    )


def _check_bindable(listen: str, *, reuse_port: bool = False) -> None:
    """Refuse an address gRPC could not bind, with the reason, before gRPC tries (its C core
    prints its own error lines to stderr and then raises a bare RuntimeError)."""
    import socket

    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"cannot listen on {listen!r}: not host:port", reason="listen")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"cannot listen on {listen!r}: no such host ({exc})", reason="listen") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # the port is shared by the server processes of one `cloud serve`
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {listen!r}: {exc.strerror}", reason="listen") from exc


def add_port(
    server: grpc.Server, listen: str, tls: ServerTls | None, *, insecure: bool = False,
    reuse_port: bool = False,
) -> int:
    """Bind ``listen`` with TLS (or plaintext only if ``insecure``); returns the bound port.
    ``reuse_port``: the server was built with ``grpc.so_reuseport=1`` and shares the port."""
    if tls is None:
        if not insecure:
            raise ConfigError("no TLS identity for the server: pass one, or --insecure explicitly")
        log.warning("serving WITHOUT TLS on %s (--insecure): packets travel sealed, metadata in clear", listen)
    _check_bindable(listen, reuse_port=reuse_port)
    try:
        if tls is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, server_credentials(tls))
    except RuntimeError as exc:  # grpcio raises a bare RuntimeError when the bind fails
        raise ConfigError(
            f"cannot listen on {listen!r}: the address is in use, not local or not host:port",
            reason="listen",
        ) from exc
    if port == 0:
        raise ConfigError(f"cannot listen on {listen!r}", reason="listen")
    return int(port)


def open_channel(
    target: str,
    tls: ClientTls | None,
    *,
    config: TransportConfig | None = None,
    insecure: bool = False,
) -> grpc.Channel:
    """A channel to the cloud with TLS (mTLS when ``tls`` carries a key), caps and keepalive."""
    config = config or TransportConfig()
    options = config.common_options()
    if tls is None:
        if not insecure:
            raise ConfigError("no TLS trust root for the channel: pass one, or --insecure explicitly")
        log.warning("connecting to %s WITHOUT TLS (--insecure)", target)
        return grpc.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, channel_credentials(tls), options=options)


def peer_device_id(context: grpc.ServicerContext) -> str | None:
    """The device id of an mTLS peer, as the TLS layer verified it (``None`` without mTLS).

    gRPC has checked the chain to the device CA; we take the single ``urn:diredi:device:`` URI in
    the certificate's SAN (the same naming the packet-signing certificate uses).
    """
    auth = context.auth_context()
    uris = [
        v.decode("utf-8", "replace")
        for v in auth.get("x509_subject_alternative_name", [])
        if v.startswith(DEVICE_URI_PREFIX.encode())
    ]
    if len(uris) != 1:
        return None
    return str(uris[0][len(DEVICE_URI_PREFIX) :])

"""The ONE table from typed errors to gRPC status codes, and back again on the client.

Servicers never choose a status code themselves: they let a :class:`DirediError` escape into
:func:`abort_with`, which looks the error's class up here (nearest ancestor in the table wins),
and puts ``"<reason>: <message>"`` in the status details. :class:`LocalError` (the cloud's own
fault: its store, its configuration) is logged in full on the server and sent with its reason
and a generic message only, so a database path or DSN never reaches a device.

The client side (:func:`error_from_rpc`) turns a status back into the typed error named by the
reason, so the device agent and the CLI handle remote refusals exactly like local ones; transport
failures (no server, deadline passed) become :class:`ServiceUnavailable`, which is the only kind
the agent retries.

docs/PROTOCOL.md prints this table; tests/security/test_services_status.py checks it covers every
DirediError subclass.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from diredi_secure import errors as E
from diredi_secure import privacy
from diredi_secure.store import DeviceConflict

__all__ = [
    "RETRYABLE_CODES",
    "STATUS_TABLE",
    "NotFound",
    "ServiceUnavailable",
    "abort_async",
    "abort_with",
    "details_for",
    "error_from_rpc",
    "refusal_status",
    "status_for",
]

log = logging.getLogger("diredi.services")


class ServiceUnavailable(E.LocalError):
    """The cloud could not be reached or did not answer in time (retrying may help)."""

    reason = "unavailable"


class NotFound(E.PolicyError):
    """What was asked for does not exist here (an unpublished release file)."""

    reason = "not_found"


_C = grpc.StatusCode

STATUS_TABLE: dict[type[E.DirediError], grpc.StatusCode] = {
    # The peer sent bad data: retrying the same bytes fails the same way.
    E.PeerError: _C.INVALID_ARGUMENT,
    E.MalformedPacket: _C.INVALID_ARGUMENT,
    E.UnsupportedVersion: _C.INVALID_ARGUMENT,
    E.TooLarge: _C.RESOURCE_EXHAUSTED,  # the code gRPC's own message size cap uses
    E.SignatureInvalid: _C.UNAUTHENTICATED,
    E.CertificateInvalid: _C.UNAUTHENTICATED,
    E.DecryptionFailed: _C.INVALID_ARGUMENT,
    E.HeaderMismatch: _C.INVALID_ARGUMENT,
    E.PayloadInvalid: _C.INVALID_ARGUMENT,
    E.ModelFormatError: _C.INVALID_ARGUMENT,
    E.AttestationInvalid: _C.INVALID_ARGUMENT,
    E.ReleaseError: _C.INVALID_ARGUMENT,
    # Authentic and well formed, but policy refuses it.
    E.PolicyError: _C.FAILED_PRECONDITION,
    E.UnknownDevice: _C.PERMISSION_DENIED,
    E.CertificateRevoked: _C.PERMISSION_DENIED,
    E.ReplayDetected: _C.ALREADY_EXISTS,
    E.StalePacket: _C.FAILED_PRECONDITION,
    E.PolicyViolation: _C.FAILED_PRECONDITION,
    E.BudgetExceeded: _C.RESOURCE_EXHAUSTED,  # a quota: the device's lifetime epsilon
    E.EpsilonUnderstated: _C.FAILED_PRECONDITION,  # the packet's own accounting does not hold
    privacy.ParameterOutOfBounds: _C.FAILED_PRECONDITION,  # declared DP parameter out of bounds
    privacy.UnaccountedRelease: _C.FAILED_PRECONDITION,  # private entry without noise
    privacy.NoiseSeeded: _C.FAILED_PRECONDITION,  # research-seeded (predictable) noise
    E.ReleaseRefused: _C.FAILED_PRECONDITION,
    DeviceConflict: _C.ALREADY_EXISTS,
    # The cloud's own state or configuration is at fault.
    E.LocalError: _C.INTERNAL,
    E.ConfigError: _C.INTERNAL,
    E.KeyFileError: _C.INTERNAL,
    E.StoreError: _C.UNAVAILABLE,  # database unreachable or locked: a retry may succeed
    E.DatasetError: _C.INTERNAL,
    ServiceUnavailable: _C.UNAVAILABLE,
    NotFound: _C.NOT_FOUND,
    E.DirediError: _C.UNKNOWN,
}

RETRYABLE_CODES = frozenset({_C.UNAVAILABLE, _C.DEADLINE_EXCEEDED})
"""Codes after which the same request may succeed; every submit is idempotent, so retry is safe."""


def status_for(exc: E.DirediError) -> grpc.StatusCode:
    """The status code of ``exc``: its class's entry, else its nearest ancestor's."""
    for cls in type(exc).__mro__:
        if cls in STATUS_TABLE:
            return STATUS_TABLE[cls]
    return grpc.StatusCode.UNKNOWN  # unreachable: DirediError is in the table


def details_for(exc: E.DirediError, *, max_chars: int = 1000) -> str:
    """Status details: ``reason: message`` (one line, at most ``max_chars``, the ``reason:``
    prefix kept); a generic message for local errors.

    The cap is a last line of defence for a message that repeats a peer's string (the core clips
    those to 64 characters, ``knowledge.shown``): gRPC fails a call whose details exceed its
    metadata limit with RESOURCE_EXHAUSTED, which would hide the real refusal from the client."""
    if isinstance(exc, E.LocalError):
        return f"{exc.reason}: internal error on the cloud ({type(exc).__name__})"
    text = exc.one_line()
    if len(text) > max_chars:
        marker = "...[clipped]"
        text = text[: max_chars - len(marker)] + marker
    return text


def refusal_status(exc: BaseException, *, quiet: bool = False) -> tuple[grpc.StatusCode, str]:
    """The status code and details a call that failed with ``exc`` ends with, logged on the way.

    A :class:`DirediError` gets its table entry (local errors logged in full, peer ones briefly;
    ``quiet``: a peer refusal is logged at debug only, because the caller logs it itself or it is
    an expected answer, such as "no newer root" to a TUF client). Anything else is a bug or a
    library failure nobody typed: logged in full, answered INTERNAL with a generic line (no
    paths, no messages)."""
    if not isinstance(exc, E.DirediError):
        log.error("unexpected error serving a call", exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"internal: internal error on the cloud ({type(exc).__name__})"
    code = status_for(exc)
    if isinstance(exc, E.LocalError):
        log.error("call failed on our side: %s", exc.one_line(), exc_info=exc)
    else:
        log.log(logging.DEBUG if quiet else logging.INFO, "refused (%s): %s", code.name, exc.one_line())
    return code, details_for(exc)


def abort_with(context: grpc.ServicerContext, exc: E.DirediError, *, quiet: bool = False) -> NoReturn:
    """Abort the call with the status of ``exc`` (see :func:`refusal_status`)."""
    context.abort(*refusal_status(exc, quiet=quiet))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def abort_internal(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    """Abort with INTERNAL for an exception that is not a :class:`DirediError` (a bug, or a
    library failure nobody typed): logged in full here, never sent (no paths, no messages)."""
    context.abort(*refusal_status(exc))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


async def abort_async(context: grpc.aio.ServicerContext, exc: BaseException, *,
                      quiet: bool = False) -> NoReturn:
    """:func:`abort_with` / :func:`abort_internal` for a coroutine handler on the asyncio server."""
    await context.abort(*refusal_status(exc, quiet=quiet))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def _reason_table() -> dict[str, type[E.DirediError]]:
    table: dict[str, type[E.DirediError]] = {}
    for cls in STATUS_TABLE:
        table.setdefault(cls.reason, cls)
    return table


_BY_REASON = _reason_table()
# Reasons the cloud gives with UNAVAILABLE: kept on the ServiceUnavailable the device sees.
_RETRYABLE_REASONS = frozenset({"overloaded", "rate_limited"})


def error_from_rpc(exc: grpc.RpcError, what: str) -> E.DirediError:
    """The typed error a failed call stands for (``what`` names the call, for the message).

    A status whose details start with a known reason becomes that error class (the cloud refused);
    a transport failure (UNAVAILABLE or DEADLINE_EXCEEDED without one) becomes
    :class:`ServiceUnavailable`; anything else a :class:`PeerError` (the cloud answered nonsense).
    """
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or ""
    reason, _, message = details.partition(": ")
    cls = _BY_REASON.get(reason)
    if cls is None and code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Concurrent RPC limit" in details:
        # grpcio's maximum_concurrent_rpcs refusal: the server is busy, not the packet too large;
        # retry with backoff (issue 14 finding 9: a burst of honest devices was dropped).
        return ServiceUnavailable(f"{what}: the cloud is busy ({details})", reason="overloaded")
    if cls is ServiceUnavailable or (cls is None and code in RETRYABLE_CODES):
        # Keep the cloud's own reason (overloaded, rate_limited) where it gave one.
        kept = reason if reason in _RETRYABLE_REASONS else None
        error = ServiceUnavailable(f"{what}: {code.name} {details}".strip())
        if kept is not None:
            error.reason = kept
        return error
    if cls is None and code == grpc.StatusCode.FAILED_PRECONDITION and reason.isidentifier():
        # A policy refusal with its own reason (e.g. delta_over_policy): keep the reason.
        return E.PolicyViolation(f"{what}: the cloud refused ({code.name}): {message or details}",
                                 reason=reason)
    if cls is None:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            cls = E.TooLarge  # gRPC's own message size cap, on either side
        else:
            return E.PeerError(f"{what}: the cloud answered {code.name}: {details}", reason="rpc")
    err: E.DirediError = cls.__new__(cls)
    E.DirediError.__init__(err, f"{what}: the cloud refused ({code.name}): {message or details}")
    err.code = code  # type: ignore[attr-defined]
    return err

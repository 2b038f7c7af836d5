"""The error -> status table covers every DirediError subclass, and round-trips on the device."""

from __future__ import annotations

import grpc
import pytest
from diredi_secure.services import status
from diredi_secure.services.status import (
    STATUS_TABLE,
    ServiceUnavailable,
    error_from_rpc,
    status_for,
)

import diredi_secure.release.errors
import diredi_secure.store  # noqa: F401
from diredi_secure import errors as E


def _all_subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_all_subclasses(sub)}
    return out


def test_every_error_of_errors_py_has_its_own_row() -> None:
    named = {getattr(E, n) for n in E.__all__}
    missing = sorted(c.__name__ for c in named if c not in STATUS_TABLE)
    assert missing == []


def test_every_subclass_anywhere_maps_to_a_definite_code() -> None:
    for cls in _all_subclasses(E.DirediError):
        err = cls.__new__(cls)
        E.DirediError.__init__(err, "x")
        assert status_for(err) != grpc.StatusCode.UNKNOWN, cls
        assert status_for(err) != grpc.StatusCode.OK


@pytest.mark.parametrize(("cls", "code"), [
    (E.TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (E.ReplayDetected, grpc.StatusCode.ALREADY_EXISTS),
    (E.CertificateRevoked, grpc.StatusCode.PERMISSION_DENIED),
    (E.SignatureInvalid, grpc.StatusCode.UNAUTHENTICATED),
    (E.StoreError, grpc.StatusCode.UNAVAILABLE),
    (E.BudgetExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_pinned_rows(cls: type[E.DirediError], code: grpc.StatusCode) -> None:
    assert STATUS_TABLE[cls] == code


class _FakeCall(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A finished call as the client sees it (a real RpcError carries exactly these two)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> None: ...
    def trailing_metadata(self) -> None: ...
    def is_active(self) -> bool: return False
    def time_remaining(self) -> None: ...
    def cancel(self) -> bool: return False
    def add_callback(self, cb: object) -> bool: return False


def test_round_trip_by_reason() -> None:
    for cls in STATUS_TABLE:
        err = cls.__new__(cls)
        E.DirediError.__init__(err, "why")
        back = error_from_rpc(_FakeCall(status_for(err), status.details_for(err)), "call")
        assert type(back) is cls or isinstance(back, ServiceUnavailable), cls


def test_local_errors_do_not_leak_their_message() -> None:
    err = E.StoreError("store postgresql://admin@db.internal/prod: timeout")
    assert "db.internal" not in status.details_for(err)


def test_transport_failures_are_retryable() -> None:
    assert isinstance(error_from_rpc(_FakeCall(grpc.StatusCode.UNAVAILABLE, "connect failed"), "x"), ServiceUnavailable)
    assert isinstance(error_from_rpc(_FakeCall(grpc.StatusCode.DEADLINE_EXCEEDED, ""), "x"), ServiceUnavailable)


def test_server_overload_is_retryable_not_too_large() -> None:
    """Issue 14 finding 9: grpcio's concurrency refusal (RESOURCE_EXHAUSTED, no reason) was read as
    TooLarge, which the agent does not retry; a burst of honest devices lost packets."""
    import grpc
    from diredi_secure.services.status import ServiceUnavailable, error_from_rpc

    from diredi_secure.errors import TooLarge

    class _Err(grpc.RpcError, grpc.Call):  # type: ignore[misc]
        def __init__(self, details: str) -> None:
            self._details = details

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self) -> str:
            return self._details

        def initial_metadata(self):  # type: ignore[no-untyped-def]
            return None

        def trailing_metadata(self):  # type: ignore[no-untyped-def]
            return None

        def is_active(self) -> bool:
            return False

        def time_remaining(self):  # type: ignore[no-untyped-def]
            return None

        def cancel(self) -> bool:
            return False

        def add_callback(self, callback):  # type: ignore[no-untyped-def]
            return False

    busy = error_from_rpc(_Err("Concurrent RPC limit exceeded!"), "submit")
    assert isinstance(busy, ServiceUnavailable) and busy.reason == "overloaded"
    big = error_from_rpc(_Err("Received message larger than max (5 vs. 4)"), "submit")
    assert isinstance(big, TooLarge)


def test_an_untyped_exception_reaches_the_peer_as_internal_without_its_message() -> None:
    """Issue 14 finding 6: untyped exceptions reached clients as UNKNOWN with absolute paths."""
    import grpc
    import pytest
    from diredi_secure.services.cloud import _Knowledge

    class _Aborted(Exception):
        pass

    class _Ctx:
        def abort(self, code: grpc.StatusCode, details: str) -> None:
            self.code, self.details = code, details
            raise _Aborted

        def auth_context(self) -> dict[str, list[bytes]]:
            return {}

    class _Boom:
        from diredi_secure.services.transport import TransportConfig

        config = TransportConfig()

        def accept(self, *a: object, **k: object) -> bytes:
            raise RuntimeError("/srv/diredi/secret/cloud.json exploded")

    from concurrent.futures import ThreadPoolExecutor

    ctx = _Ctx()
    with pytest.raises(_Aborted), ThreadPoolExecutor(1) as pool:
        _Knowledge(_Boom(), mtls=False, pool=pool).submit(b"x", ctx)  # type: ignore[arg-type]
    assert ctx.code == grpc.StatusCode.INTERNAL
    assert ctx.details == "internal: internal error on the cloud (RuntimeError)"


def test_unavailable_keeps_the_clouds_retryable_reason() -> None:
    # The agent retries both; the reason tells an operator which limit it met.
    for reason in ("rate_limited", "overloaded"):
        err = error_from_rpc(_FakeCall(grpc.StatusCode.UNAVAILABLE, f"{reason}: slow down"), "x")
        assert isinstance(err, ServiceUnavailable) and err.reason == reason
    other = error_from_rpc(_FakeCall(grpc.StatusCode.UNAVAILABLE, "made_up: text"), "x")
    assert isinstance(other, ServiceUnavailable) and other.reason == ServiceUnavailable.reason

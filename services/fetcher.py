"""A python-tuf fetcher that speaks ``UpdateService`` (GetMetadata, FetchTarget) over gRPC.

It plugs into :class:`diredi_secure.release.fetcher.ReleaseFetcher`, which parses the updater's
``release:/metadata/...`` and ``release:/targets/...`` URLs; python-tuf's public ``fetch`` wraps any
failure into ``DownloadError`` and caps lengths while streaming. A ``NOT_FOUND`` status becomes
``DownloadHTTPError(..., 404)``: how the TUF client learns no newer root exists. Every call has a
deadline; chunks must arrive in order, and never exceed the cap given to the fetcher.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from tuf.api.exceptions import DownloadError, DownloadHTTPError

from diredi_secure._proto.diredi.v1 import services_pb2 as spb
from diredi_secure._proto.diredi.v1 import services_pb2_grpc as sgrpc
from diredi_secure.release.fetcher import MetadataRequest, ReleaseFetcher

from .transport import TransportConfig

__all__ = ["GrpcReleaseFetcher"]


class GrpcReleaseFetcher(ReleaseFetcher):
    """Fetch TUF metadata and targets from the cloud's UpdateService on ``channel``."""

    def __init__(self, channel: grpc.Channel, *, config: TransportConfig | None = None) -> None:
        self.config = config or TransportConfig()
        self._stub: Any = sgrpc.UpdateServiceStub(channel)

    def _fetch_metadata(self, request: MetadataRequest) -> Iterator[bytes]:
        try:
            response = self._stub.GetMetadata(
                spb.MetadataRequest(role=request.role, version=request.version or 0),
                timeout=self.config.deadline_for("GetMetadata"),
            )
        except grpc.RpcError as exc:
            raise _download_error(exc, request.filename) from exc
        data = bytes(response.metadata)
        if len(data) > self.config.max_metadata_bytes:
            raise DownloadError(f"{request.filename} is over the metadata cap")
        return iter((data,))

    def _fetch_target(self, path: str) -> Iterator[bytes]:
        stream = self._stub.FetchTarget(
            spb.TargetRequest(path=path, max_length=self.config.max_target_bytes),
            timeout=self.config.deadline_for("FetchTarget", streaming=True),
        )
        return self._chunks(stream, path)

    def _chunks(self, stream: Any, path: str) -> Iterator[bytes]:
        received = 0
        try:
            for chunk in stream:
                if chunk.offset != received:
                    raise DownloadError(f"{path}: chunk at offset {chunk.offset}, expected {received}")
                received += len(chunk.data)
                if received > self.config.max_target_bytes:
                    raise DownloadError(f"{path}: over the target cap")
                yield bytes(chunk.data)
        except grpc.RpcError as exc:
            raise _download_error(exc, path) from exc
        finally:
            stream.cancel()


def _download_error(exc: grpc.RpcError, name: str) -> DownloadError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code == grpc.StatusCode.NOT_FOUND:
        return DownloadHTTPError(f"{name} not found", 404)
    return DownloadError(f"{name}: {code.name if code else 'error'} {details}")

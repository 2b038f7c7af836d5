"""Transports for the device-side TUF client: one abstract method per transport.

python-tuf's ``FetcherInterface`` hides the network behind ``_fetch(url) -> Iterator[bytes]``; its
public ``fetch``/``download_file`` wrap every failure into ``DownloadError`` and enforce the
length cap while streaming. The updater addresses files with two fixed URL bases::

    release:/metadata/<name>   e.g. release:/metadata/3.snapshot.json, .../timestamp.json
    release:/targets/<path>    e.g. release:/targets/fleets/eu/<sha256>.model.safetensors

:class:`ReleaseFetcher` parses those URLs (refusing anything else) and calls
``_fetch_metadata(role, version)`` or ``_fetch_target(path)``. :class:`LocalFolderFetcher` reads a
repository workspace; the gRPC fetcher implements the same two methods over ``UpdateService``.

A missing file must raise ``DownloadHTTPError(..., 404)``: that is how the TUF client learns that
no newer root version exists.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

__all__ = [
    "METADATA_BASE_URL",
    "TARGETS_BASE_URL",
    "LocalFolderFetcher",
    "MetadataRequest",
    "ReleaseFetcher",
    "parse_metadata_name",
]

METADATA_BASE_URL: Final = "release:/metadata/"
TARGETS_BASE_URL: Final = "release:/targets/"
DEFAULT_CHUNK_BYTES: Final = 64 * 1024

_METADATA_NAME = re.compile(r"^(?:(?P<version>[1-9][0-9]{0,9})\.)?(?P<role>[A-Za-z0-9_-]+)\.json$")
_TARGET_PART = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class MetadataRequest:
    """A metadata file the client asks for: ``role`` at ``version`` (None = newest, timestamp)."""

    role: str
    version: int | None

    @property
    def filename(self) -> str:
        return f"{self.role}.json" if self.version is None else f"{self.version}.{self.role}.json"


def parse_metadata_name(name: str) -> MetadataRequest:
    """Split ``3.snapshot.json`` into role and version; raises ``DownloadError`` if malformed.

    The role name is URL-quoted by python-tuf; our role names use only ``[a-z0-9_-]`` (no dots,
    so ``N.role`` is never ambiguous) and need no decoding; anything else is refused.
    """
    match = _METADATA_NAME.fullmatch(name)
    if match is None or match["role"] in (".", ".."):
        raise DownloadError(f"malformed metadata name {name!r}")
    version = match["version"]
    return MetadataRequest(role=match["role"], version=int(version) if version else None)


def _check_target_path(path: str) -> str:
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") or not _TARGET_PART.fullmatch(p) for p in parts):
        raise DownloadError(f"malformed target path {path!r}")
    return path


class ReleaseFetcher(FetcherInterface, metaclass=abc.ABCMeta):
    """A TUF fetcher that speaks in roles and target paths instead of URLs.

    Subclasses implement :meth:`_fetch_metadata` and :meth:`_fetch_target`, yielding chunks and
    raising ``DownloadHTTPError(msg, 404)`` for a file that does not exist. Any other exception
    is wrapped into ``DownloadError`` by python-tuf's ``fetch``; lengths are capped by its
    ``download_file`` while streaming, so an endless stream stops at the declared length.
    """

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.startswith(METADATA_BASE_URL):
            return self._fetch_metadata(parse_metadata_name(url[len(METADATA_BASE_URL) :]))
        if url.startswith(TARGETS_BASE_URL):
            return self._fetch_target(_check_target_path(url[len(TARGETS_BASE_URL) :]))
        raise DownloadError(f"unexpected URL {url!r}")

    @abc.abstractmethod
    def _fetch_metadata(self, request: MetadataRequest) -> Iterator[bytes]:
        """Stream the bytes of one metadata file."""

    @abc.abstractmethod
    def _fetch_target(self, path: str) -> Iterator[bytes]:
        """Stream the bytes of one target file (``path`` already has the hash prefix)."""


class LocalFolderFetcher(ReleaseFetcher):
    """Reads a repository workspace (``metadata/`` and ``targets/``) from a local folder.

    Used for USB-stick / shared-folder updates and for tests. Paths are confined to the folder.
    Files are streamed in chunks, never read whole, so the length cap applies to endless files.
    """

    def __init__(self, folder: Path, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.folder = Path(folder)
        self.chunk_bytes = chunk_bytes

    def _fetch_metadata(self, request: MetadataRequest) -> Iterator[bytes]:
        return self._stream(self.folder / "metadata" / request.filename)

    def _fetch_target(self, path: str) -> Iterator[bytes]:
        return self._stream(self.folder / "targets" / path)

    def _stream(self, path: Path) -> Iterator[bytes]:
        base = self.folder.resolve()
        resolved = path.resolve()
        if not resolved.is_relative_to(base):
            raise DownloadError(f"{path} escapes the repository folder")
        if not resolved.is_file():
            raise DownloadHTTPError(f"{path.relative_to(self.folder)} not found", 404)
        return self._chunks(resolved)

    def _chunks(self, path: Path) -> Iterator[bytes]:
        with open(path, "rb") as handle:
            while chunk := handle.read(self.chunk_bytes):
                yield chunk

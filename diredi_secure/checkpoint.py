"""Tensor files: safetensors only, never pickle.

A checkpoint is a safetensors file (tensors + a ``__metadata__`` map of strings). Loading checks the
size cap and the format *before* handing the bytes to the safetensors parser, and refuses pickle
and zip (``torch.save``) files by their magic, because ``torch.load``/``pickle.loads`` on untrusted
bytes is code execution. Every failure is a :class:`~diredi_secure.errors.ModelFormatError`.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from .errors import KeyFileError, ModelFormatError, TooLarge

__all__ = [
    "DEFAULT_MAX_CHECKPOINT_BYTES",
    "CheckpointHeader",
    "atomic_write_bytes",
    "check_checkpoint_header",
    "checkpoint_bytes",
    "load_checkpoint",
    "load_checkpoint_bytes",
    "read_private_bytes",
    "read_regular_file",
    "save_checkpoint",
]

DEFAULT_MAX_CHECKPOINT_BYTES = 256 * 1024 * 1024
_MAX_HEADER_BYTES = 16 * 1024 * 1024

_PICKLE_PROTO = b"\x80"  # pickle protocol 2+ starts with the PROTO opcode and its version
_PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default zip container


def checkpoint_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """Serialise ``tensors`` and string ``metadata`` as safetensors bytes (deterministic)."""
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    meta = {str(k): str(v) for k, v in metadata.items()}
    return bytes(_st_save(arrays, metadata=meta or None))


def atomic_write_bytes(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename, fsync the folder.

    The temporary file has an unpredictable name and is created with
    ``O_CREAT | O_EXCL | O_NOFOLLOW`` (never through a planted link, never an existing file).
    ``private=True`` (keys, secrets) creates it with mode 0600 from the first byte, so the content
    is never readable by others in between, and makes a new parent folder 0700.
    """
    path = Path(path)
    if private and not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_READ_FLAGS = (
    os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
)
_READ_CHUNK = 1 << 20


def read_regular_file(path: Path, what: str, max_bytes: int, *, private: bool = False) -> bytes:
    """The bytes of the regular file at ``path`` (symlinks followed), at most ``max_bytes``.

    The one reader for key, certificate, kit and other operator-supplied files. The file is opened
    ``O_NONBLOCK`` (a FIFO nobody writes to cannot hang the open) and every check is made on the
    *opened* descriptor (``fstat``), so the file read is the file checked: it must be a regular
    file (not a FIFO, a device such as ``/dev/zero``, a socket or a folder), and at most
    ``max_bytes + 1`` bytes are ever read, so a file that grows after the check cannot exhaust
    memory either. ``private=True`` (keys, secrets) also refuses a file group or others may read,
    as ssh does: a secret that was ever readable by others is disclosed; a symlink to a 0600 file
    is accepted, as ssh accepts one.

    Raises :class:`KeyFileError` (missing or unreadable, the ``OSError`` chained as its cause;
    reason ``not_regular_file`` for a FIFO, device or folder; ``key_file_permissions`` for the
    mode) or :class:`TooLarge`.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(
                f"{what} {path} is not a regular file (a FIFO, device, socket or folder)",
                reason="not_regular_file")
        if private and st.st_mode & 0o077:
            raise KeyFileError(
                f"{what} {path} is readable by group or others (mode {st.st_mode & 0o777:o}); "
                "it must be 0600: chmod 600 it if it was never exposed, else replace it",
                reason="key_file_permissions")
        if st.st_size > max_bytes:
            raise TooLarge(f"{what} {path}", st.st_size, max_bytes)
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:
            chunk = os.read(fd, min(_READ_CHUNK, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:  # it grew after the fstat: refused, read no further
            raise TooLarge(f"{what} {path} (grew while read)", total, max_bytes)
        return b"".join(chunks)
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def read_private_bytes(path: Path, what: str, max_bytes: int) -> bytes:
    """A private file's bytes (a key, a secret): :func:`read_regular_file` with ``private=True``."""
    return read_regular_file(path, what, max_bytes, private=True)


def save_checkpoint(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> None:
    """Write a safetensors checkpoint to ``path`` atomically."""
    atomic_write_bytes(Path(path), checkpoint_bytes(tensors, metadata))


def load_checkpoint_bytes(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse untrusted safetensors bytes into ``(tensors, metadata)``.

    Raises :class:`TooLarge` over ``max_bytes`` and :class:`ModelFormatError` for pickle, zip, or
    anything that is not a well-formed safetensors file.
    """
    if len(data) > max_bytes:
        raise TooLarge("checkpoint", len(data), max_bytes)
    if len(data) < 8:
        raise ModelFormatError(f"not safetensors: {len(data)} bytes is shorter than the header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > _MAX_HEADER_BYTES or header_len > len(data) - 8 or data[8:9] != b"{":
        # Name the dangerous formats: a zip (torch.save) or pickle stream never has a plausible
        # safetensors header length in its first 8 bytes, so these checks cannot misfire.
        if data.startswith(_ZIP_MAGIC):
            raise ModelFormatError("refusing a zip/torch.save file: only safetensors is accepted")
        if data[:1] == _PICKLE_PROTO and data[1:2] in _PICKLE_PROTOCOLS:
            raise ModelFormatError("refusing pickle bytes: only safetensors is accepted")
        raise ModelFormatError(f"not safetensors: header length {header_len} is out of bounds")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError("not safetensors: header is not JSON") from exc
    if not isinstance(header, dict):
        raise ModelFormatError("not safetensors: header is not a JSON object")
    raw_meta = header.get("__metadata__") or {}
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise ModelFormatError("safetensors metadata must map strings to strings")
    try:
        tensors = dict(_st_load(data))
    except Exception as exc:  # the parser raises several types; all mean "malformed"
        raise ModelFormatError(f"malformed safetensors: {exc}") from exc
    return tensors, dict(raw_meta)


def load_checkpoint(
    path: Path, *, max_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read and parse a checkpoint file; see :func:`load_checkpoint_bytes`."""
    try:
        data = read_regular_file(Path(path), "checkpoint", max_bytes)
    except KeyFileError as exc:
        raise ModelFormatError(exc.message) from exc
    return load_checkpoint_bytes(data, max_bytes=max_bytes)


# Bytes per element of every dtype the numpy loader of safetensors accepts (safetensors.numpy's
# _TYPES): a header naming any other dtype would not load, so it is refused at install.
_DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
_MAX_TENSOR_NAME = 1024
_MAX_TENSOR_DIMS = 16


@dataclass(frozen=True)
class CheckpointHeader:
    """A safetensors header that is consistent with its file: ``tensors`` maps each name to
    ``(dtype, shape)``; ``metadata`` is the ``__metadata__`` string map."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]
    header_bytes: int


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # json.loads keeps the last of two equal keys; the Rust parser may not agree.
            raise ModelFormatError(f"safetensors header names {key[:64]!r} twice")
        out[key] = value
    return out


def check_checkpoint_header(
    handle: BinaryIO,
    size: int,
    *,
    expected_names: Collection[str] | None = None,
    max_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES,
) -> CheckpointHeader:
    """Check a safetensors file's header against its size without reading any tensor.

    ``handle`` is positioned anywhere (it is read from offset 0); ``size`` is the file's length.
    Checks: the size cap; the 8-byte header length is in bounds; the header is one JSON object
    without duplicate keys; ``__metadata__`` maps strings to strings; every tensor has a known
    dtype, a shape of at most 16 non-negative dimensions, and ``data_offsets`` whose span is
    exactly ``prod(shape) * itemsize``; the spans tile the data section from 0 to its end with
    no hole and no overlap (what the safetensors parser requires); with ``expected_names``, the
    tensor names are exactly those. Pickle and zip files are named as such. Raises
    :class:`TooLarge` or :class:`ModelFormatError`; reads at most 8 + 16 MiB.
    """
    if size > max_bytes:
        raise TooLarge("checkpoint", size, max_bytes)
    try:
        handle.seek(0)
        head = handle.read(9)
        if len(head) < 8:
            raise ModelFormatError(f"not safetensors: {size} bytes is shorter than the header")
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > _MAX_HEADER_BYTES or header_len > size - 8 or head[8:9] != b"{":
            if head.startswith(_ZIP_MAGIC):
                raise ModelFormatError("refusing a zip/torch.save file: only safetensors")
            if head[:1] == _PICKLE_PROTO and head[1:2] in _PICKLE_PROTOCOLS:
                raise ModelFormatError("refusing pickle bytes: only safetensors is accepted")
            raise ModelFormatError(f"not safetensors: header length {header_len} is out of bounds")
        handle.seek(8)
        raw = handle.read(header_len)
    except OSError as exc:
        raise ModelFormatError(f"cannot read the checkpoint header: {exc.strerror}") from exc
    if len(raw) != header_len:
        raise ModelFormatError("not safetensors: the file is shorter than its header")
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError("not safetensors: header is not JSON") from exc
    if not isinstance(header, dict):
        raise ModelFormatError("not safetensors: header is not a JSON object")
    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise ModelFormatError("safetensors metadata must map strings to strings")
    data_len = size - 8 - header_len
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not name or len(name) > _MAX_TENSOR_NAME:
            raise ModelFormatError(f"safetensors tensor name of length {len(name)} refused")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ModelFormatError(f"tensor {name[:64]!r}: entry is not dtype, shape, offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise ModelFormatError(f"tensor {name[:64]!r}: unsupported dtype {str(dtype)[:16]!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_TENSOR_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise ModelFormatError(f"tensor {name[:64]!r}: shape must be non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise ModelFormatError(f"tensor {name[:64]!r}: data_offsets out of the file")
        count = 1
        for dim in shape:
            count *= dim
        if count * _DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            raise ModelFormatError(f"tensor {name[:64]!r}: {dtype}{shape} does not fill its span")
        tensors[name] = (dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise ModelFormatError(f"tensor {name[:64]!r}: data overlaps or leaves a hole")
        position = end
    if position != data_len:
        raise ModelFormatError(f"safetensors data section has {data_len - position} stray bytes")
    if expected_names is not None and set(tensors) != set(expected_names):
        missing = sorted(set(expected_names) - set(tensors))[:4]
        extra = sorted(set(tensors) - set(expected_names))[:4]
        raise ModelFormatError(f"checkpoint tensors differ: missing {missing}, unexpected {extra}")
    return CheckpointHeader(tensors, dict(raw_meta), header_len)

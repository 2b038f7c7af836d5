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
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from .errors import KeyFileError, ModelFormatError, TooLarge

__all__ = [
    "DEFAULT_MAX_CHECKPOINT_BYTES",
    "atomic_write_bytes",
    "checkpoint_bytes",
    "load_checkpoint",
    "load_checkpoint_bytes",
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


def read_private_bytes(path: Path, what: str, max_bytes: int) -> bytes:
    """A private file's bytes (a key, a secret), at most ``max_bytes``. Refuses one that group or
    others may read, as ssh does: a secret that was ever readable by others is disclosed.
    Raises :class:`KeyFileError` (reason ``key_file_permissions`` for the mode) or TooLarge."""
    try:
        st = Path(path).stat()
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"{what} {path} is readable by group or others (mode {st.st_mode & 0o777:o}); "
                "it must be 0600: chmod 600 it if it was never exposed, else replace it",
                reason="key_file_permissions")
        if st.st_size > max_bytes:
            raise TooLarge(f"{what} {path}", st.st_size, max_bytes)
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from exc


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
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise TooLarge(f"checkpoint {path}", size, max_bytes)
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFormatError(f"cannot read checkpoint {path}: {exc.strerror}") from exc
    return load_checkpoint_bytes(data, max_bytes=max_bytes)

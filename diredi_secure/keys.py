"""Load and save every key and certificate file the CLI writes, for programs using the library.

One function pair per kind of file, so a caller never imports :mod:`diredi_secure._crypto`:

=============================  ===============================  ==============================
file the CLI writes            what it holds                    functions
=============================  ===============================  ==============================
``ca.key``, ``device.key``,    Ed25519 private key, PKCS#8 PEM  :func:`load_signing_key`,
``receipt.key``                (scrypt-wrapped with a           :func:`save_signing_key`
                               passphrase)
``inbox.key``                  X25519 + ML-KEM-768 private      :func:`load_inbox_key`,
                               keys, two PEM blocks             :func:`save_inbox_key`
``inbox.pub``                  the two public keys (SPKI PEM)   :func:`load_inbox_public_key`,
                                                                :func:`save_inbox_public_key`
``tls/server.key``,            ECDSA P-256 TLS identity,        :func:`load_tls_key`,
``tls.key``                    PKCS#8 PEM                       :func:`save_tls_key`
``ca.crt``, ``device.crt``     X.509, DER                       :func:`load_certificate`,
``tls/server.crt``,            X.509, PEM                       :func:`save_certificate`
``tls.crt``
receipt public key             raw Ed25519 (hex in              :func:`load_verify_key`,
(``device.json``)              ``device.json``), or SPKI PEM    :func:`save_verify_key`
=============================  ===============================  ==============================

Trust: files are read as untrusted bytes with a size cap, and only from a regular file (a symlink
is followed; a FIFO, a device such as ``/dev/zero`` or a folder is refused, and no more than the
cap is ever read). Private key files must be mode 0600 (refused otherwise, as ssh does) and are written 0600, atomically (temporary file, rename), so a
failed save leaves no partial file. Every failure is a :class:`~diredi_secure.errors.KeyFileError`
(missing, unreadable, wrong passphrase, wrong key type), :class:`~diredi_secure.errors.TooLarge`
or, for certificates, :class:`~diredi_secure.errors.CertificateInvalid`. A passphrase is bytes;
``None`` means the file is in clear, and an empty passphrase is refused (``ConfigError``) rather
than silently writing the key in clear.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from . import _crypto
from ._crypto import InboxKey, InboxPublicKey, SigningKey, TlsKey, VerifyKey
from .checkpoint import atomic_write_bytes, read_regular_file
from .errors import KeyFileError

__all__ = [
    "generate_tls_key",
    "load_certificate",
    "load_inbox_key",
    "load_inbox_public_key",
    "load_signing_key",
    "load_tls_key",
    "load_verify_key",
    "save_certificate",
    "save_inbox_key",
    "save_inbox_public_key",
    "save_signing_key",
    "save_tls_key",
    "save_verify_key",
]

MAX_PUBLIC_FILE_BYTES = 64 * 1024
"""Cap on a public key or certificate file (a certificate chain of a few KiB fits many times)."""

_HEX_KEY = re.compile(rb"\s*([0-9a-fA-F]{64})\s*")


def _read_public(path: Path, what: str) -> bytes:
    return read_regular_file(Path(path), what, MAX_PUBLIC_FILE_BYTES)


@contextlib.contextmanager
def _writing(what: str, path: Path) -> Iterator[None]:
    """An ``OSError`` while writing ``what`` to ``path`` becomes a typed :class:`KeyFileError`."""
    try:
        yield
    except OSError as exc:
        raise KeyFileError(f"cannot write {what} {path}: {exc.strerror}") from exc


def _write(path: Path, data: bytes, what: str, *, private: bool) -> None:
    with _writing(what, path):
        atomic_write_bytes(Path(path), data, private=private)


# -- Ed25519 signing keys (device, CA, receipt) --------------------------------------------------
def load_signing_key(path: Path, passphrase: bytes | None = None) -> SigningKey:
    """An Ed25519 private key (``device.key``, ``ca.key``, ``receipt.key``)."""
    return _crypto.load_signing_key(Path(path), passphrase)


def save_signing_key(key: SigningKey, path: Path, passphrase: bytes | None = None) -> None:
    """Write ``key`` as the CLI does: PKCS#8 PEM, scrypt-wrapped if a passphrase is given, 0600."""
    with _writing("signing key", path):
        _crypto.save_signing_key(key, Path(path), passphrase)


def load_verify_key(path: Path) -> VerifyKey:
    """An Ed25519 public key: SubjectPublicKeyInfo PEM, or 64 hex digits (the raw key, as
    ``device.json`` keeps the cloud's receipt key)."""
    data = _read_public(path, "public key")
    hexed = _HEX_KEY.fullmatch(data)
    if hexed is not None:
        return VerifyKey.from_raw(bytes.fromhex(hexed.group(1).decode()))
    return VerifyKey.from_pem(data)


def save_verify_key(key: VerifyKey, path: Path) -> None:
    """Write an Ed25519 public key as SubjectPublicKeyInfo PEM (not private: mode 0644)."""
    _write(path, key.pem, "public key", private=False)


# -- the cloud inbox (HPKE) ----------------------------------------------------------------------
def load_inbox_key(path: Path, passphrase: bytes | None = None) -> InboxKey:
    """The cloud's inbox private keys (``inbox.key``: X25519 then ML-KEM-768)."""
    return _crypto.load_inbox_key(Path(path), passphrase)


def save_inbox_key(key: InboxKey, path: Path, passphrase: bytes | None = None) -> None:
    with _writing("inbox key", path):
        _crypto.save_inbox_key(key, Path(path), passphrase)


def load_inbox_public_key(path: Path) -> InboxPublicKey:
    """The inbox public key devices seal to (``inbox.pub``, as published in a release)."""
    return _crypto.load_inbox_public_key(_read_public(path, "inbox public key"))


def save_inbox_public_key(key: InboxPublicKey, path: Path) -> None:
    _write(path, key.pem, "inbox public key", private=False)


# -- TLS identities ------------------------------------------------------------------------------
def generate_tls_key() -> TlsKey:
    """A fresh ECDSA P-256 TLS identity key (from the OS CSPRNG)."""
    return _crypto.generate_tls_key()


def load_tls_key(path: Path, passphrase: bytes | None = None) -> TlsKey:
    """A TLS identity key (``tls/server.key``, a device kit's ``tls.key``)."""
    return _crypto.load_tls_key(Path(path), passphrase)


def save_tls_key(key: TlsKey, path: Path, passphrase: bytes | None = None) -> None:
    with _writing("TLS key", path):
        _crypto.save_tls_key(key, Path(path), passphrase)


# -- certificates --------------------------------------------------------------------------------
def load_certificate(path: Path) -> bytes:
    """A certificate file, DER or PEM (the CLI writes CA and device certificates as DER, TLS
    certificates as PEM), returned as DER after checking it parses as X.509. Verifies no
    signature or validity period: :func:`diredi_secure.open_packet` and the services do that."""
    data = _read_public(path, "certificate")
    if data.lstrip().startswith(b"-----BEGIN"):
        return _crypto.certificate_der_from_pem(data)
    _crypto.certificate_pem(data)  # parses, or CertificateInvalid
    return data


def save_certificate(der: bytes, path: Path, *, pem: bool = False) -> None:
    """Write a DER certificate as DER (default) or PEM (what gRPC's TLS credentials take)."""
    data = _crypto.certificate_pem(der)  # parses, or CertificateInvalid
    _write(path, data if pem else der, "certificate", private=False)

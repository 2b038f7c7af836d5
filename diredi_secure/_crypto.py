"""The only module that imports ``cryptography``: recipe-level signing, sealing and certificates.

Everything here is a small recipe over pyca/cryptography (Ed25519, HPKE per RFC 9180 in base mode,
X.509). Every failure collapses into one typed error from :mod:`diredi_secure.errors`, raised
``from`` its cause; verification raises and returns ``None``. Time is always passed in.

Key ids are the SHA-256 of the public key's DER SubjectPublicKeyInfo (DESIGN.md section 3). An
inbox key bundles an X25519 key and an ML-KEM-768 key so that one inbox serves every suite; its id
is the SHA-256 of both SPKIs concatenated.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import ipaddress
import re
import secrets
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .checkpoint import atomic_write_bytes, read_private_bytes
from .errors import (
    CertificateInvalid,
    ConfigError,
    DecryptionFailed,
    KeyFileError,
    SignatureInvalid,
    TooLarge,
    UnsupportedVersion,
)

__all__ = [
    "DeviceIdentity",
    "HpkeSuite",
    "InboxKey",
    "InboxPublicKey",
    "SigningKey",
    "TlsKey",
    "VerifyKey",
    "build_crl",
    "certificate_pem",
    "check_device_certificate",
    "create_ca_certificate",
    "generate_inbox_key",
    "generate_signing_key",
    "generate_tls_key",
    "hpke_open",
    "hpke_seal",
    "issue_device_certificate",
    "issue_tls_device_certificate",
    "issue_tls_server_certificate",
    "load_inbox_key",
    "load_inbox_public_key",
    "load_signing_key",
    "load_tls_key",
    "parse_crl",
    "save_inbox_key",
    "save_signing_key",
    "save_tls_key",
    "sha256",
    "sign",
    "verify_signature",
]

DEVICE_URI_PREFIX = "urn:diredi:device:"
_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_KEY_FILE_BYTES = 64 * 1024


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _passphrase_or_none(passphrase: bytes | None) -> bytes | None:
    if passphrase is not None and not passphrase:
        raise ConfigError("an empty passphrase would store the key in clear: omit it instead")
    return passphrase


# ------------------------------------------------------------------------------------------------
# Passphrase-wrapped private key files
# ------------------------------------------------------------------------------------------------
# Hand-written because cryptography's PKCS#8 writer (BestAvailableEncryption, and the
# PrivateFormat.PKCS8.encryption_builder()) can only set PBKDF2, whose memory-free cost an attacker
# with a GPU farm shrugs off (it wrote 2,048 iterations; issue 14 finding 6). scrypt is memory-hard
# and in every OpenSSL cryptography ships with. The envelope is small, versioned, and everything
# before the ciphertext is the AEAD's associated data, so a changed parameter is a failed tag:
#
#   "DRDK" | version=1 | kdf=1 (scrypt) | log2(n) | r | p | salt_len | salt
#          | aead=1 (AES-256-GCM) | nonce_len=12 | nonce | ciphertext || 16-byte tag
#
# armoured as PEM ("DIREDI ENCRYPTED PRIVATE KEY"). The plaintext is the key file's clear PKCS#8
# PEM (one block, or the inbox key's two), so one envelope serves every key type and the clear
# loaders parse what comes out. Every parameter read back is bounded before the KDF runs: the file
# is attacker-writable in the threat model of a copied backup, and n = 2^40 would be a denial of
# service, not an error.
_WRAP_LABEL = b"DIREDI ENCRYPTED PRIVATE KEY"
_WRAP_MAGIC = b"DRDK"
_WRAP_VERSION = 1
_KDF_SCRYPT = 1
_AEAD_AES256GCM = 1
# n = 2^17, r = 8, p = 1: 128 MiB per derivation (OWASP's recommended scrypt setting).
SCRYPT_LOG2_N = 17
SCRYPT_R = 8
SCRYPT_P = 1
# What a reader accepts: at most 128 MiB and the work of n = 2^17, r = 8, p = 1.
_SCRYPT_LOG2_N_BOUNDS = (15, 17)
_SCRYPT_MAX_R = 8
_SCRYPT_MAX_P = 1
_SALT_BOUNDS = (16, 64)
_GCM_NONCE = 12
_GCM_TAG = 16


def _scrypt_key(passphrase: bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=1 << log2_n, r=r, p=p).derive(passphrase)


def _wrap_private_pem(
    clear_pem: bytes,
    passphrase: bytes,
    *,
    log2_n: int = SCRYPT_LOG2_N,
    salt: bytes | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """The envelope above around ``clear_pem``. Salt and nonce come from the OS CSPRNG unless
    given (known-answer tests); ``log2_n`` must lie within what :func:`_unwrap_private_pem`
    accepts, so that no file written here is one the reader refuses."""
    lo, hi = _SCRYPT_LOG2_N_BOUNDS
    if not lo <= log2_n <= hi:
        raise ConfigError(f"scrypt log2(n) must be in [{lo}, {hi}], got {log2_n}")
    salt = secrets.token_bytes(16) if salt is None else salt
    nonce = secrets.token_bytes(_GCM_NONCE) if nonce is None else nonce
    if not _SALT_BOUNDS[0] <= len(salt) <= _SALT_BOUNDS[1] or len(nonce) != _GCM_NONCE:
        raise ConfigError("salt must be 16..64 bytes and the nonce 12")
    header = (
        _WRAP_MAGIC
        + bytes([_WRAP_VERSION, _KDF_SCRYPT, log2_n, SCRYPT_R, SCRYPT_P, len(salt)])
        + salt
        + bytes([_AEAD_AES256GCM, len(nonce)])
        + nonce
    )
    key = _scrypt_key(passphrase, salt, log2_n, SCRYPT_R, SCRYPT_P)
    body = header + AESGCM(key).encrypt(nonce, clear_pem, header)
    b64 = base64.encodebytes(body)  # 76-column lines, each ending in a newline
    return b"-----BEGIN " + _WRAP_LABEL + b"-----\n" + b64 + b"-----END " + _WRAP_LABEL + b"-----\n"


def _is_wrapped(data: bytes) -> bool:
    return data.lstrip().startswith(b"-----BEGIN " + _WRAP_LABEL + b"-----")


def _unwrap_private_pem(data: bytes, passphrase: bytes, what: str) -> bytes:
    """The clear PEM inside a wrapped key file. Every field is bounded before scrypt runs; any
    failure (unknown version, parameters out of bounds, wrong passphrase, altered bytes) is a
    :class:`KeyFileError` naming ``what``."""
    armour = rb"\s*-----BEGIN %s-----\n([A-Za-z0-9+/=\n]+)-----END %s-----\s*"
    m = re.fullmatch(armour % (_WRAP_LABEL, _WRAP_LABEL), data)
    if m is None:
        raise KeyFileError(f"{what}: malformed encrypted key armour")
    try:
        body = base64.b64decode(m.group(1).replace(b"\n", b""), validate=True)
    except binascii.Error as exc:
        raise KeyFileError(f"{what}: malformed encrypted key armour") from exc
    if len(body) < 11 or body[:4] != _WRAP_MAGIC:
        raise KeyFileError(f"{what}: not a diredi encrypted key")
    version, kdf, log2_n, r, p, salt_len = body[4:10]
    if version != _WRAP_VERSION:
        raise KeyFileError(f"{what}: encrypted key format version {version} is not supported")
    if kdf != _KDF_SCRYPT:
        raise KeyFileError(f"{what}: key derivation function {kdf} is not supported")
    lo, hi = _SCRYPT_LOG2_N_BOUNDS
    if not lo <= log2_n <= hi or not 1 <= r <= _SCRYPT_MAX_R or not 1 <= p <= _SCRYPT_MAX_P:
        raise KeyFileError(
            f"{what}: scrypt parameters out of bounds (log2 n={log2_n} in [{lo}, {hi}], "
            f"r={r} <= {_SCRYPT_MAX_R}, p={p} <= {_SCRYPT_MAX_P})"
        )
    if not _SALT_BOUNDS[0] <= salt_len <= _SALT_BOUNDS[1]:
        raise KeyFileError(f"{what}: salt of {salt_len} bytes is out of bounds {_SALT_BOUNDS}")
    at = 10 + salt_len
    if len(body) < at + 2:
        raise KeyFileError(f"{what}: encrypted key is truncated")
    salt = body[10:at]
    aead, nonce_len = body[at], body[at + 1]
    if aead != _AEAD_AES256GCM or nonce_len != _GCM_NONCE:
        raise KeyFileError(f"{what}: cipher {aead} with a {nonce_len}-byte nonce is not supported")
    ct_at = at + 2 + nonce_len
    if len(body) < ct_at + _GCM_TAG + 1:
        raise KeyFileError(f"{what}: encrypted key is truncated")
    header, nonce = body[:ct_at], body[at + 2 : ct_at]
    key = _scrypt_key(passphrase, salt, log2_n, r, p)
    try:
        return AESGCM(key).decrypt(nonce, body[ct_at:], header)
    except InvalidTag as exc:
        raise KeyFileError(f"{what}: wrong passphrase, or the file was altered") from exc


def _private_key_file(clear_pem: bytes, passphrase: bytes | None) -> bytes:
    """What a key file holds: the clear PEM, or the scrypt envelope when a passphrase is given."""
    passphrase = _passphrase_or_none(passphrase)
    return clear_pem if passphrase is None else _wrap_private_pem(clear_pem, passphrase)


def _clear_pem(data: bytes, passphrase: bytes | None, what: str) -> tuple[bytes, bytes | None]:
    """(PEM, the password PKCS#8 still needs) for a key file's bytes: a wrapped file is opened
    here; a clear one or a legacy PBKDF2 PKCS#8 file (read-only compatibility: files written
    before the envelope) passes through with the passphrase for OpenSSL to use."""
    if not _is_wrapped(data):
        return data, passphrase
    if passphrase is None:
        raise KeyFileError(f"{what} is encrypted: give its passphrase")
    return _unwrap_private_pem(data, passphrase, what), None


_CLEAR = serialization.NoEncryption()


def _read_key_file(path: Path) -> bytes:
    return read_private_bytes(path, "key file", _MAX_KEY_FILE_BYTES)


def _load_private_pem(data: bytes, passphrase: bytes | None, what: str) -> object:
    try:
        return serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:  # password given for a clear key, or missing for an encrypted one
        raise KeyFileError(f"{what}: {exc}") from exc
    except ValueError as exc:
        raise KeyFileError(f"{what}: not a PEM private key, or the passphrase is wrong") from exc


# ------------------------------------------------------------------------------------------------
# Ed25519 signing keys
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class VerifyKey:
    """An Ed25519 public key."""

    _key: ed25519.Ed25519PublicKey

    @classmethod
    def from_raw(cls, raw: bytes) -> VerifyKey:
        try:
            return cls(ed25519.Ed25519PublicKey.from_public_bytes(raw))
        except ValueError as exc:
            raise SignatureInvalid("not a 32-byte Ed25519 public key") from exc

    @classmethod
    def from_pem(cls, pem: bytes) -> VerifyKey:
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise KeyFileError("not a PEM public key") from exc
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise KeyFileError("the public key is not Ed25519")
        return cls(key)

    @property
    def raw(self) -> bytes:
        return self._key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def spki_der(self) -> bytes:
        return self._key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def pem(self) -> bytes:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def key_id(self) -> bytes:
        """SHA-256 of the DER SubjectPublicKeyInfo."""
        return sha256(self.spki_der)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)


@dataclass(frozen=True, eq=False)
class SigningKey:
    """An Ed25519 private key. Never printed: ``repr`` shows the key id only."""

    _key: ed25519.Ed25519PrivateKey

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """Deterministic key from 32 seed bytes (test vectors; use :func:`generate_signing_key`)."""
        if len(seed) != 32:
            raise ConfigError("an Ed25519 seed is 32 bytes")
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def public_key(self) -> VerifyKey:
        return VerifyKey(self._key.public_key())

    @property
    def key_id(self) -> bytes:
        return self.public_key.key_id

    def private_pem(self, passphrase: bytes | None = None) -> bytes:
        """PKCS#8 PEM, or with a passphrase that PEM in the scrypt envelope (see
        ``_wrap_private_pem``)."""
        clear = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _CLEAR
        )
        return _private_key_file(clear, passphrase)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id.hex()[:16]}...)"


def generate_signing_key() -> SigningKey:
    return SigningKey(ed25519.Ed25519PrivateKey.generate())


def save_signing_key(key: SigningKey, path: Path, passphrase: bytes | None = None) -> None:
    """Write the key as PKCS#8 PEM (scrypt + AES-256-GCM envelope with ``passphrase`` if given),
    mode 0600, atomically."""
    atomic_write_bytes(Path(path), key.private_pem(passphrase), private=True)


def load_signing_key(path: Path, passphrase: bytes | None = None) -> SigningKey:
    """Load an Ed25519 key saved by :func:`save_signing_key`; raises :class:`KeyFileError`."""
    what = f"key file {path}"
    pem, password = _clear_pem(_read_key_file(Path(path)), passphrase, what)
    key = _load_private_pem(pem, password, what)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} does not hold an Ed25519 key")
    return SigningKey(key)


def sign(key: SigningKey, data: bytes) -> bytes:
    """Ed25519 signature (deterministic: the same key and data give the same 64 bytes)."""
    return key._key.sign(data)


def verify_signature(public_key: VerifyKey, signature: bytes, data: bytes) -> None:
    """Raise :class:`SignatureInvalid` unless ``signature`` is valid for ``data``."""
    try:
        public_key._key.verify(signature, data)
    except InvalidSignature as exc:
        raise SignatureInvalid(
            f"signature does not verify under key {public_key.key_id.hex()[:16]}"
        ) from exc


# ------------------------------------------------------------------------------------------------
# HPKE (RFC 9180, base mode)
# ------------------------------------------------------------------------------------------------
class HpkeSuite(IntEnum):
    """Cipher suites; values equal the wire enum ``diredi.v1.Suite``."""

    X25519_SHA256_AES128GCM = 1
    X25519_SHA256_CHACHA20POLY1305 = 2
    MLKEM768X25519_SHA256_AES256GCM = 3


_SUITES: dict[HpkeSuite, tuple[hpke.KEM, hpke.AEAD]] = {
    HpkeSuite.X25519_SHA256_AES128GCM: (hpke.KEM.X25519, hpke.AEAD.AES_128_GCM),
    HpkeSuite.X25519_SHA256_CHACHA20POLY1305: (hpke.KEM.X25519, hpke.AEAD.CHACHA20_POLY1305),
    HpkeSuite.MLKEM768X25519_SHA256_AES256GCM: (hpke.KEM.MLKEM768_X25519, hpke.AEAD.AES_256_GCM),
}
AEAD_TAG_BYTES = 16


def suite_from_wire(value: int) -> HpkeSuite:
    try:
        return HpkeSuite(value)
    except ValueError as exc:
        raise UnsupportedVersion(f"unknown cipher suite {value}") from exc


def enc_length(suite: HpkeSuite) -> int:
    """Length of the encapsulated key for ``suite``."""
    return int(_SUITES[suite][0].enc_length())


@dataclass(frozen=True, eq=False)
class InboxPublicKey:
    """The cloud inbox's public keys (X25519 and ML-KEM-768); devices seal packets to it."""

    _x25519: x25519.X25519PublicKey
    _mlkem: mlkem.MLKEM768PublicKey

    @property
    def pem(self) -> bytes:
        fmt = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return self._x25519.public_bytes(*fmt) + self._mlkem.public_bytes(*fmt)

    @property
    def key_id(self) -> bytes:
        fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return sha256(self._x25519.public_bytes(*fmt) + self._mlkem.public_bytes(*fmt))


@dataclass(frozen=True, eq=False)
class InboxKey:
    """The cloud inbox's private keys. ``repr`` shows the key id only."""

    _x25519: x25519.X25519PrivateKey
    _mlkem: mlkem.MLKEM768PrivateKey

    @classmethod
    def from_seeds(cls, x25519_seed: bytes, mlkem_seed: bytes) -> InboxKey:
        """Deterministic key (32 + 64 seed bytes) for test vectors."""
        try:
            return cls(
                x25519.X25519PrivateKey.from_private_bytes(x25519_seed),
                mlkem.MLKEM768PrivateKey.from_seed_bytes(mlkem_seed),
            )
        except ValueError as exc:
            raise ConfigError("inbox seeds are 32 (X25519) and 64 (ML-KEM-768) bytes") from exc

    @property
    def public_key(self) -> InboxPublicKey:
        return InboxPublicKey(self._x25519.public_key(), self._mlkem.public_key())

    @property
    def key_id(self) -> bytes:
        return self.public_key.key_id

    def __repr__(self) -> str:
        return f"InboxKey(key_id={self.key_id.hex()[:16]}...)"


def generate_inbox_key() -> InboxKey:
    return InboxKey(x25519.X25519PrivateKey.generate(), mlkem.MLKEM768PrivateKey.generate())


def save_inbox_key(key: InboxKey, path: Path, passphrase: bytes | None = None) -> None:
    """Both private keys as PKCS#8 PEM blocks in one file (in one scrypt envelope if a passphrase
    is given)."""
    fmt = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _CLEAR)
    clear = key._x25519.private_bytes(*fmt) + key._mlkem.private_bytes(*fmt)
    atomic_write_bytes(Path(path), _private_key_file(clear, passphrase), private=True)


def _pem_blocks(data: bytes) -> list[bytes]:
    return [
        m.group(0)
        for m in re.finditer(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\n?", data, re.S)
    ]


def load_inbox_key(path: Path, passphrase: bytes | None = None) -> InboxKey:
    what = f"inbox key file {path}"
    pem, password = _clear_pem(_read_key_file(Path(path)), passphrase, what)
    blocks = _pem_blocks(pem)
    if len(blocks) != 2:
        raise KeyFileError(f"inbox key file {path} must hold 2 PEM blocks, found {len(blocks)}")
    xk = _load_private_pem(blocks[0], password, what)
    mk = _load_private_pem(blocks[1], password, what)
    if not isinstance(xk, x25519.X25519PrivateKey) or not isinstance(mk, mlkem.MLKEM768PrivateKey):
        raise KeyFileError(f"inbox key file {path} must hold an X25519 then an ML-KEM-768 key")
    return InboxKey(xk, mk)


def load_inbox_public_key(pem: bytes) -> InboxPublicKey:
    """Parse the inbox public key (two SPKI PEM blocks) as published in a release."""
    if len(pem) > _MAX_KEY_FILE_BYTES:
        raise TooLarge("inbox public key", len(pem), _MAX_KEY_FILE_BYTES)
    blocks = _pem_blocks(pem)
    if len(blocks) != 2:
        raise KeyFileError(f"an inbox public key has 2 PEM blocks, found {len(blocks)}")
    try:
        xk = serialization.load_pem_public_key(blocks[0])
        mk = serialization.load_pem_public_key(blocks[1])
    except ValueError as exc:
        raise KeyFileError("inbox public key is not valid PEM") from exc
    if not isinstance(xk, x25519.X25519PublicKey) or not isinstance(mk, mlkem.MLKEM768PublicKey):
        raise KeyFileError("inbox public key must be an X25519 then an ML-KEM-768 key")
    return InboxPublicKey(xk, mk)


def hpke_seal(
    suite: HpkeSuite, recipient: InboxPublicKey, plaintext: bytes, info: bytes
) -> tuple[bytes, bytes]:
    """HPKE base-mode seal; returns ``(enc, ciphertext)``.

    The ephemeral key comes from OpenSSL's CSPRNG: cryptography's HPKE API takes no ephemeral key,
    so sealed bytes are not reproducible (test vectors pin everything else).
    """
    kem, aead = _SUITES[suite]
    public: x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
    if kem == hpke.KEM.X25519:
        public = recipient._x25519
    else:
        public = hpke.MLKEM768X25519PublicKey(recipient._mlkem, recipient._x25519)
    sealed = hpke.Suite(kem, hpke.KDF.HKDF_SHA256, aead).encrypt(plaintext, public, info=info)
    n = kem.enc_length()
    return sealed[:n], sealed[n:]


def hpke_open(
    suite: HpkeSuite, recipient: InboxKey, enc: bytes, ciphertext: bytes, info: bytes
) -> bytes:
    """HPKE base-mode open; raises :class:`DecryptionFailed` for any failure."""
    kem, aead = _SUITES[suite]
    private: x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey
    if kem == hpke.KEM.X25519:
        private = recipient._x25519
    else:
        private = hpke.MLKEM768X25519PrivateKey(recipient._mlkem, recipient._x25519)
    if len(enc) != kem.enc_length():
        raise DecryptionFailed(
            f"encapsulated key is {len(enc)} bytes, suite needs {kem.enc_length()}"
        )
    try:
        return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, aead).decrypt(
            enc + ciphertext, private, info=info
        )
    except (InvalidTag, ValueError) as exc:
        raise DecryptionFailed(
            "HPKE open failed: wrong inbox key, tampered ciphertext, or another header"
        ) from exc


# ------------------------------------------------------------------------------------------------
# X.509: device CA, device and server certificates, revocation
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceIdentity:
    """What a verified device certificate asserts."""

    device_id: str
    public_key: VerifyKey
    serial: int
    not_after_ms: int


def _utc(ms: int) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.UTC)


def _load_cert(der: bytes, what: str, max_bytes: int = 8 * 1024) -> x509.Certificate:
    if len(der) > max_bytes:
        raise TooLarge(what, len(der), max_bytes)
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError (fuzzing)
        raise CertificateInvalid(f"{what} is not a DER X.509 certificate") from exc


def certificate_pem(der: bytes) -> bytes:
    """PEM form of a DER certificate (gRPC's TLS credentials take PEM)."""
    return _load_cert(der, "certificate", 1 << 20).public_bytes(serialization.Encoding.PEM)


def certificate_der_from_pem(pem: bytes) -> bytes:
    try:
        return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except ValueError as exc:
        raise CertificateInvalid("not a PEM X.509 certificate") from exc


def certificate_subject_cn(der: bytes) -> str:
    """The subject common name of a certificate (for display and lookup; verifies nothing)."""
    try:
        cns = _load_cert(der, "certificate").subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:
        raise CertificateInvalid(f"certificate is malformed: {exc}") from exc
    if len(cns) != 1:
        raise CertificateInvalid("certificate must have exactly one common name")
    return str(cns[0].value)


def create_ca_certificate(
    ca_key: SigningKey, *, common_name: str, now_ms: int, valid_days: int, serial: int
) -> bytes:
    """A self-signed Ed25519 CA certificate (DER) for issuing device and server certificates."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _utc(now_ms)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key._key.public_key())
        .serial_number(serial)
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key._key, algorithm=None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _issue(
    ca_key: SigningKey,
    ca_cert_der: bytes,
    *,
    subject_cn: str,
    san: list[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    public_key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey,
    serial: int,
    now_ms: int,
    valid_days: int,
) -> bytes:
    ca = _load_cert(ca_cert_der, "CA certificate")
    now = _utc(now_ms)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .sign(ca_key._key, algorithm=None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


def validate_device_id(device_id: str) -> str:
    if not _DEVICE_ID_RE.fullmatch(device_id):
        raise ConfigError(
            f"device id {device_id!r} must be 1-128 characters of [A-Za-z0-9._-], starting alphanumeric"
        )
    return device_id


def issue_device_certificate(
    ca_key: SigningKey,
    ca_cert_der: bytes,
    *,
    device_id: str,
    device_public_key: VerifyKey,
    serial: int,
    now_ms: int,
    valid_days: int = 3650,
) -> bytes:
    """A device certificate (DER): CN and SAN URI ``urn:diredi:device:<id>``, TLS client auth."""
    return _issue_for_device(
        ca_key, ca_cert_der, device_id, device_public_key._key, serial, now_ms, valid_days
    )


def _issue_for_device(
    ca_key: SigningKey,
    ca_cert_der: bytes,
    device_id: str,
    public_key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey,
    serial: int,
    now_ms: int,
    valid_days: int,
) -> bytes:
    """Both device certificates (packet signing, mTLS) name the device the same way."""
    validate_device_id(device_id)
    return _issue(
        ca_key,
        ca_cert_der,
        subject_cn=device_id,
        san=[x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)],
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        public_key=public_key,
        serial=serial,
        now_ms=now_ms,
        valid_days=valid_days,
    )


# gRPC's TLS stack (BoringSSL) does not sign TLS handshakes with Ed25519
# (NO_COMMON_SIGNATURE_ALGORITHMS), so TLS *leaf* keys -- the server's and each device's mTLS client
# key -- are ECDSA P-256. The device CA stays Ed25519 (BoringSSL verifies Ed25519 certificate
# signatures) and the device's Ed25519 key keeps signing packets.
@dataclass(frozen=True, eq=False)
class TlsKey:
    """An ECDSA P-256 private key used only as a TLS identity. ``repr`` never shows it."""

    _key: ec.EllipticCurvePrivateKey

    def private_pem(self) -> bytes:
        """PKCS#8 PEM in clear (gRPC's credentials take the PEM bytes in memory)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _CLEAR
        )

    def __repr__(self) -> str:
        return "TlsKey(ECDSA P-256)"


def generate_tls_key() -> TlsKey:
    return TlsKey(ec.generate_private_key(ec.SECP256R1()))


def save_tls_key(key: TlsKey, path: Path, passphrase: bytes | None = None) -> None:
    """PKCS#8 PEM (in the scrypt envelope when a passphrase is given), mode 0600, atomically."""
    atomic_write_bytes(Path(path), _private_key_file(key.private_pem(), passphrase), private=True)


def load_tls_key(path: Path, passphrase: bytes | None = None) -> TlsKey:
    """Load a key saved by :func:`save_tls_key`; raises :class:`KeyFileError`."""
    what = f"TLS key file {path}"
    pem, password = _clear_pem(_read_key_file(Path(path)), passphrase, what)
    key = _load_private_pem(pem, password, what)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise KeyFileError(f"TLS key file {path} does not hold an ECDSA P-256 key")
    return TlsKey(key)


def issue_tls_server_certificate(
    ca_key: SigningKey,
    ca_cert_der: bytes,
    *,
    hostnames: list[str],
    tls_key: TlsKey,
    serial: int,
    now_ms: int,
    valid_days: int = 825,
) -> bytes:
    """The cloud endpoint's TLS certificate (DER) for ``tls_key``; SAN holds each host name/IP."""
    if not hostnames:
        raise ConfigError("a server certificate needs at least one host name")
    san: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            san.append(x509.DNSName(host))
    return _issue(
        ca_key,
        ca_cert_der,
        subject_cn=hostnames[0],
        san=san,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        public_key=tls_key._key.public_key(),
        serial=serial,
        now_ms=now_ms,
        valid_days=valid_days,
    )


def issue_tls_device_certificate(
    ca_key: SigningKey,
    ca_cert_der: bytes,
    *,
    device_id: str,
    tls_key: TlsKey,
    serial: int,
    now_ms: int,
    valid_days: int = 3650,
) -> bytes:
    """A device's mTLS client certificate (DER): CN and SAN URI ``urn:diredi:device:<id>``."""
    return _issue_for_device(
        ca_key, ca_cert_der, device_id, tls_key._key.public_key(), serial, now_ms, valid_days
    )


def check_device_certificate(
    cert_der: bytes, ca_cert_der: bytes, *, now_ms: int, max_bytes: int = 8 * 1024
) -> DeviceIdentity:
    """Verify a device certificate against the device CA at time ``now_ms``.

    Checks: DER parses (under ``max_bytes``), issuer is the CA, the CA's signature verifies, the
    validity window holds, it is not a CA, it is for TLS client auth, and the CN equals the SAN
    device URI. Raises :class:`CertificateInvalid` naming the failed check. Revocation is the
    caller's to check (the cloud keeps the list; see :mod:`diredi_secure.packet`).
    """
    cert = _load_cert(cert_der, "device certificate", max_bytes)
    ca = _load_cert(ca_cert_der, "CA certificate", 1 << 20)
    try:
        return _check_device_certificate(cert, ca, now_ms)
    except (ValueError, TypeError) as exc:  # cryptography parses fields lazily
        raise CertificateInvalid(f"device certificate is malformed: {exc}") from exc


def _check_device_certificate(
    cert: x509.Certificate, ca: x509.Certificate, now_ms: int
) -> DeviceIdentity:
    device_id = _check_device_naming(cert, ca, now_ms)
    public = cert.public_key()
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise CertificateInvalid("device certificate key is not Ed25519")
    return DeviceIdentity(
        device_id=device_id,
        public_key=VerifyKey(public),
        serial=cert.serial_number,
        not_after_ms=int(cert.not_valid_after_utc.timestamp() * 1000),
    )


def _check_device_naming(cert: x509.Certificate, ca: x509.Certificate, now_ms: int | None) -> str:
    """The checks both device certificates share (issuer, signature, window unless ``now_ms`` is
    None, not a CA, client auth, one device id in CN and SAN); returns the device id."""
    if cert.issuer != ca.subject:
        raise CertificateInvalid("device certificate was not issued by the device CA")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateInvalid(
            "device certificate signature does not verify under the device CA"
        ) from exc
    now = _utc(now_ms) if now_ms is not None else None
    if now is not None and not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise CertificateInvalid(
            f"device certificate is not valid at {now.isoformat()} "
            f"(valid {cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()})"
        )
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise CertificateInvalid("a CA certificate cannot act as a device certificate")
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise CertificateInvalid(f"device certificate lacks an extension: {exc}") from exc
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertificateInvalid("device certificate is not for TLS client authentication")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    uris = [
        u
        for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(DEVICE_URI_PREFIX)
    ]
    if len(cns) != 1 or len(uris) != 1 or uris[0] != DEVICE_URI_PREFIX + str(cns[0].value):
        raise CertificateInvalid(
            "device certificate must name one device id, equal in CN and SAN URI"
        )
    return str(cns[0].value)


def _device_cert_any(data: bytes, what: str, max_bytes: int) -> x509.Certificate:
    """A device certificate as DER (``device.crt``) or PEM (``tls.crt``)."""
    if len(data) > max_bytes:
        raise TooLarge(what, len(data), max_bytes)
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            return x509.load_pem_x509_certificate(data)
        except (ValueError, x509.InvalidVersion) as exc:
            raise CertificateInvalid(f"{what} is not a PEM X.509 certificate") from exc
    return _load_cert(data, what, max_bytes)


def check_tls_device_certificate(
    cert: bytes,
    ca_cert_der: bytes,
    *,
    now_ms: int,
    tls_key: TlsKey | None = None,
    max_bytes: int = 8 * 1024,
) -> str:
    """Verify a device's mTLS certificate (PEM or DER) against the device CA at ``now_ms``; with
    ``tls_key``, also that the certificate is for that key. Returns the device id.

    Raises :class:`CertificateInvalid` naming the failed check (as
    :func:`check_device_certificate`), or when the key is not ECDSA P-256 or not ``tls_key``'s.
    """
    parsed = _device_cert_any(cert, "TLS device certificate", max_bytes)
    ca = _load_cert(ca_cert_der, "CA certificate", 1 << 20)
    try:
        device_id = _check_device_naming(parsed, ca, now_ms)
        public = parsed.public_key()
    except (ValueError, TypeError) as exc:
        raise CertificateInvalid(f"TLS device certificate is malformed: {exc}") from exc
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise CertificateInvalid("TLS device certificate key is not ECDSA P-256")
    if tls_key is not None and public != tls_key._key.public_key():
        raise CertificateInvalid(f"TLS certificate of {device_id} is not for this TLS key")
    return device_id


def reissue_device_certificate(
    ca_key: SigningKey,
    ca_cert_der: bytes,
    cert: bytes,
    *,
    serial: int,
    now_ms: int,
    valid_days: int = 3650,
    max_bytes: int = 8 * 1024,
) -> bytes:
    """Certificate renewal: a new certificate (new serial and validity, DER) for the same device
    id and the same public key as ``cert`` (a packet-signing Ed25519 or an mTLS P-256 device
    certificate, DER or PEM). The device keeps its keys; no private key is needed here.

    ``cert`` must have been issued by this CA (its signature and naming are checked); its validity
    window is not (renewing an expired certificate is the point). Raises :class:`CertificateInvalid`.
    """
    parsed = _device_cert_any(cert, "device certificate", max_bytes)
    ca = _load_cert(ca_cert_der, "CA certificate", 1 << 20)
    try:
        device_id = _check_device_naming(parsed, ca, None)
        public = parsed.public_key()
    except (ValueError, TypeError) as exc:
        raise CertificateInvalid(f"device certificate is malformed: {exc}") from exc
    if not isinstance(public, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise CertificateInvalid("device certificate key is neither Ed25519 nor ECDSA")
    return _issue_for_device(ca_key, ca_cert_der, device_id, public, serial, now_ms, valid_days)


def build_crl(
    ca_key: SigningKey,
    ca_cert_der: bytes,
    *,
    revoked_serials: list[int],
    now_ms: int,
    next_update_days: int = 7,
) -> bytes:
    """A DER X.509 CRL signed by the device CA listing ``revoked_serials`` (for distribution)."""
    ca = _load_cert(ca_cert_der, "CA certificate", 1 << 20)
    now = _utc(now_ms)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now)
        .next_update(now + _dt.timedelta(days=next_update_days))
    )
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(ca_key._key, algorithm=None).public_bytes(serialization.Encoding.DER)


def parse_crl(crl_der: bytes, ca_cert_der: bytes, *, max_bytes: int = 1 << 20) -> frozenset[int]:
    """Verify a CRL's signature by the device CA and return the revoked serial numbers."""
    if len(crl_der) > max_bytes:
        raise TooLarge("CRL", len(crl_der), max_bytes)
    try:
        crl = x509.load_der_x509_crl(crl_der)
    except ValueError as exc:
        raise CertificateInvalid("not a DER X.509 CRL") from exc
    ca = _load_cert(ca_cert_der, "CA certificate", 1 << 20)
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise CertificateInvalid("CRL is not signed by the device CA")
    return frozenset(r.serial_number for r in crl)

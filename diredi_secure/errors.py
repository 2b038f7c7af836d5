"""Typed errors: one family per side that can be at fault.

* :class:`PeerError` -- the other side (a device, a repository, a file someone handed us) sent bad
  data. Retrying the same bytes will fail the same way.
* :class:`PolicyError` -- the data is well formed and authentic, but our policy refuses it (revoked
  device, replay, budget exhausted, release audit failed).
* :class:`LocalError` -- our own state or configuration is wrong (missing key file, bad passphrase,
  unreachable database). The peer is not to blame.

Every error carries a short, stable ``reason`` code (used in logs, CLI output and gRPC status
details) and a human message naming what failed. Causes are chained with ``raise ... from``.
Recipes collapse low-level failures into one of these (as pyca/cryptography's ``InvalidToken``
does), so callers never need to catch library exceptions.
"""

from __future__ import annotations

__all__ = [
    "AttestationInvalid",
    "BudgetExceeded",
    "CertificateInvalid",
    "CertificateRevoked",
    "ConfigError",
    "DatasetError",
    "DecryptionFailed",
    "DirediError",
    "EpsilonUnderstated",
    "HeaderMismatch",
    "KeyFileError",
    "LocalError",
    "MalformedPacket",
    "ModelFormatError",
    "PayloadInvalid",
    "PeerError",
    "PolicyError",
    "PolicyViolation",
    "ReleaseError",
    "ReleaseRefused",
    "ReplayDetected",
    "SignatureInvalid",
    "StalePacket",
    "StoreError",
    "TooLarge",
    "UnknownDevice",
    "UnsupportedVersion",
]


class DirediError(Exception):
    """Base of every error this library raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason

    def one_line(self) -> str:
        """``reason: message`` on a single line (what the CLI prints)."""
        text = " ".join(self.message.split())
        return f"{self.reason}: {text}"


# --------------------------------------------------------------------------------------------
# The peer sent bad data.
# --------------------------------------------------------------------------------------------
class PeerError(DirediError):
    """The data we were handed is malformed, forged or corrupt."""

    reason = "peer_error"


class MalformedPacket(PeerError):
    """The bytes do not parse as the envelope or header they claim to be."""

    reason = "malformed"


class UnsupportedVersion(PeerError):
    """A format version or cipher suite this build does not speak."""

    reason = "unsupported_version"


class TooLarge(PeerError):
    """An input exceeds a size cap; refused before any expensive work (e.g. decryption)."""

    reason = "too_large"

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} is {size} bytes, over the cap of {limit}")
        self.what = what
        self.size = size
        self.limit = limit


class SignatureInvalid(PeerError):
    """A signature does not verify under the key it names."""

    reason = "signature_invalid"


class CertificateInvalid(PeerError):
    """A certificate is malformed, expired, or not issued by the trusted CA."""

    reason = "certificate_invalid"


class DecryptionFailed(PeerError):
    """HPKE open failed: wrong recipient key, tampered ciphertext, or header moved."""

    reason = "decryption_failed"


class HeaderMismatch(PeerError):
    """The header disagrees with the envelope or the payload it describes."""

    reason = "header_mismatch"


class PayloadInvalid(PeerError):
    """The payload does not decode as declared (dtype, shape, finiteness, norm, format)."""

    reason = "payload_invalid"


class ModelFormatError(PeerError):
    """A model file is not a safetensors checkpoint we accept (pickle is always refused)."""

    reason = "model_format"


class AttestationInvalid(PeerError):
    """A release attestation is malformed, unsigned, or does not match what it attests."""

    reason = "attestation_invalid"


class ReleaseError(PeerError):
    """A release failed TUF verification (rollback, freeze, mix-and-match, bad hashes...)."""

    reason = "release_invalid"


# --------------------------------------------------------------------------------------------
# Policy refused it.
# --------------------------------------------------------------------------------------------
class PolicyError(DirediError):
    """Authentic, well-formed input that our policy refuses."""

    reason = "policy"


class UnknownDevice(PolicyError):
    """The device is not enrolled (or its certificate names another device)."""

    reason = "unknown_device"


class CertificateRevoked(PolicyError):
    """The device certificate is on the revocation list."""

    reason = "certificate_revoked"


class ReplayDetected(PolicyError):
    """A packet id already seen, or a counter that does not go up."""

    reason = "replay"


class StalePacket(PolicyError):
    """``created_at`` lies outside the accepted clock window (too old or in the future)."""

    reason = "stale"


class PolicyViolation(PolicyError):
    """A declared parameter breaks policy (epsilon too high, wrong base model, norm bound...)."""

    reason = "policy_violation"


class EpsilonUnderstated(PolicyViolation):
    """The declared epsilon is below what an accountant recomputes from the declared parameters."""

    reason = "epsilon_understated"


class BudgetExceeded(PolicyViolation):
    """Accepting this packet would take the device past its lifetime epsilon budget."""

    reason = "budget_exceeded"


class ReleaseRefused(PolicyError):
    """A release is authentic but refused (failed audit verdict, disallowed parent)."""

    reason = "release_refused"


# --------------------------------------------------------------------------------------------
# Our own state or configuration is wrong.
# --------------------------------------------------------------------------------------------
class LocalError(DirediError):
    """Our own state or configuration is wrong; the peer is not to blame."""

    reason = "local_error"


class ConfigError(LocalError):
    """A configuration value or command-line argument is invalid."""

    reason = "config"


class KeyFileError(LocalError):
    """A key or certificate file is missing, unreadable, or the passphrase is wrong."""

    reason = "key_file"


class StoreError(LocalError):
    """The persistent store failed (database unreachable, schema too new, I/O error)."""

    reason = "store"


class DatasetError(LocalError):
    """A dataset file is missing or malformed (wrong keys, lengths, labels out of range)."""

    reason = "dataset"

"""Release-specific errors: each names the attack or failure it refuses.

They all subclass the project-wide families in :mod:`diredi_secure.errors`, so a caller that
only knows ``ReleaseError`` / ``PolicyError`` / ``LocalError`` still catches them. The ``reason``
codes are stable (logs, CLI output, gRPC status details).
"""

from __future__ import annotations

from diredi_secure.errors import LocalError, ReleaseError

__all__ = [
    "InstallFailed",
    "ReleaseExpired",
    "ReleaseInconsistent",
    "ReleaseRollback",
    "ReleaseSignatureInvalid",
    "ReleaseUnavailable",
    "TargetMismatch",
    "TargetTooLong",
]


class ReleaseRollback(ReleaseError):
    """Metadata or a model older than what the device already trusts (rollback attack)."""

    reason = "release_rollback"


class ReleaseExpired(ReleaseError):
    """Metadata expired at the device's clock (freeze attack, or a stalled repository)."""

    reason = "release_expired"


class ReleaseInconsistent(ReleaseError):
    """Metadata disagrees with the version or hash its parent role pinned (mix-and-match)."""

    reason = "release_inconsistent"


class ReleaseSignatureInvalid(ReleaseError):
    """Metadata is not signed by a threshold of the keys its delegator trusts."""

    reason = "release_unsigned"


class TargetMismatch(ReleaseError):
    """A downloaded file's length or hash differs from the signed targets metadata (tampering)."""

    reason = "target_mismatch"


class TargetTooLong(ReleaseError):
    """A download ran past the length the signed metadata declares (endless-data attack)."""

    reason = "target_too_long"


class ReleaseUnavailable(ReleaseError):
    """The repository does not have the release or file asked for, or the transport failed."""

    reason = "release_unavailable"


class InstallFailed(LocalError):
    """Writing the verified release into the device's slots failed; the old model is kept."""

    reason = "install_failed"

"""Secure model releases: TUF metadata (python-tuf), in-toto attestations in DSSE, A/B install.

Cloud side: :class:`ReleaseRepository` (create, publish, delegate, rotate root and online keys).
Device side: :class:`DeviceUpdater` over a :class:`ReleaseFetcher` (local folder now, gRPC later).
"""

from __future__ import annotations

from .attest import (
    Attestation,
    AuditVerdict,
    DeviceEpsilon,
    ReleasePredicate,
    merkle_root,
    sign_attestation,
    verify_attestation,
)
from .errors import (
    InstallFailed,
    ReleaseExpired,
    ReleaseInconsistent,
    ReleaseRollback,
    ReleaseSignatureInvalid,
    ReleaseUnavailable,
    TargetMismatch,
    TargetTooLong,
)
from .fetcher import LocalFolderFetcher, MetadataRequest, ReleaseFetcher, parse_metadata_name
from .repository import (
    ExpiryPolicy,
    PublishedRelease,
    ReleaseBundle,
    ReleaseRepository,
    RepositoryConfig,
    RoleKeys,
)
from .updater import (
    DeviceUpdater,
    InstalledModel,
    InstalledRelease,
    SlotStore,
    UpdatePolicy,
    UpdateResult,
)

__all__ = [
    "Attestation",
    "AuditVerdict",
    "DeviceEpsilon",
    "DeviceUpdater",
    "ExpiryPolicy",
    "InstallFailed",
    "InstalledModel",
    "InstalledRelease",
    "LocalFolderFetcher",
    "MetadataRequest",
    "PublishedRelease",
    "ReleaseBundle",
    "ReleaseExpired",
    "ReleaseFetcher",
    "ReleaseInconsistent",
    "ReleasePredicate",
    "ReleaseRepository",
    "ReleaseRollback",
    "ReleaseSignatureInvalid",
    "ReleaseUnavailable",
    "RepositoryConfig",
    "RoleKeys",
    "SlotStore",
    "TargetMismatch",
    "TargetTooLong",
    "UpdatePolicy",
    "UpdateResult",
    "merkle_root",
    "parse_metadata_name",
    "sign_attestation",
    "verify_attestation",
]

"""The cloud side of secure releases: a TUF repository kept in a workspace folder.

Layout of a workspace (python-tuf's Metadata API writes every file; nothing here is a home-made
manifest)::

    metadata/1.root.json, 2.root.json ...   every root version (devices walk the chain)
    metadata/timestamp.json                  the only unversioned file a client fetches
    metadata/N.snapshot.json, N.targets.json, N.<delegated>.json   consistent snapshots
    metadata/snapshot.json, targets.json ... latest copies, for the repository's own reading
    targets/<dir>/<sha256>.<name>            consistent-snapshot target files
    keys/<keyid>.pem                         Ed25519 private keys (PKCS#8 PEM)

A release is a set of targets at fixed paths under a prefix (``""`` for the whole fleet,
``fleets/<name>/`` or ``devices/<id>/`` for a delegated role): the model (safetensors), its
architecture JSON, its DSSE attestation, the reference set and the cloud inbox public key. The
release version travels in each target's ``custom`` field, signed with the targets metadata.

Time is a parameter (``now``) of every operation that sets an expiry. Keys are Ed25519, made,
stored (encrypted when a passphrase is given) and used through _crypto.py's recipes, wrapped as a
securesystemslib ``Signer`` so python-tuf and DSSE sign with them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from securesystemslib.signer import Key, SecretsHandler, Signature, Signer, SSlibKey
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from diredi_secure import _crypto
from diredi_secure.checkpoint import atomic_write_bytes, load_checkpoint_bytes, read_regular_file
from diredi_secure.errors import ConfigError, KeyFileError, ReleaseRefused, StoreError, TooLarge

from .attest import AuditVerdict, ReleasePredicate, sign_attestation

__all__ = [
    "RELEASE_FILES",
    "ExpiryPolicy",
    "PublishedRelease",
    "ReleaseBundle",
    "ReleaseRepository",
    "RepositoryConfig",
    "RoleKeys",
    "key_id",
]

#: Fixed target names of one release (joined to the release prefix).
MODEL_TARGET: Final = "model.safetensors"
ARCHITECTURE_TARGET: Final = "architecture.json"
ATTESTATION_TARGET: Final = "model.attestation.json"
REFERENCE_SET_TARGET: Final = "reference_set.safetensors"
INBOX_KEY_TARGET: Final = "inbox_public_key.pem"
RELEASE_FILES: Final = (
    MODEL_TARGET,
    ARCHITECTURE_TARGET,
    ATTESTATION_TARGET,
    REFERENCE_SET_TARGET,
    INBOX_KEY_TARGET,
)
#: Key of our entry in a TargetFile's ``custom`` map.
CUSTOM_KEY: Final = "diredi"

_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_ROLE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # no dots: N.role.json stays unambiguous
_TOP_LEVEL = (Root.type, Targets.type, Snapshot.type, Timestamp.type)


def key_id(public_raw: bytes) -> str:
    """Key id of an Ed25519 public key: SHA-256 of its SubjectPublicKeyInfo (DESIGN.md s. 3)."""
    if len(public_raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return hashlib.sha256(_ED25519_SPKI_PREFIX + public_raw).hexdigest()


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)
    delegated: timedelta = timedelta(days=90)

    def for_role(self, role: str) -> timedelta:
        """The lifetime of ``role`` (any delegated role gets ``delegated``)."""
        return {
            Root.type: self.root,
            Targets.type: self.targets,
            Snapshot.type: self.snapshot,
            Timestamp.type: self.timestamp,
        }.get(role, self.delegated)


@dataclass(frozen=True)
class RoleKeys:
    """How many keys a role has and how many must sign."""

    keys: int = 1
    threshold: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= self.keys:
            raise ConfigError(f"threshold {self.threshold} must be in 1..{self.keys} keys")


@dataclass(frozen=True)
class RepositoryConfig:
    """Keys and expiries of a new repository; 1-of-1 keys everywhere suits local use."""

    root: RoleKeys = RoleKeys()
    targets: RoleKeys = RoleKeys()
    snapshot: RoleKeys = RoleKeys()
    timestamp: RoleKeys = RoleKeys()
    expiry: ExpiryPolicy = field(default_factory=ExpiryPolicy)
    max_metadata_bytes: int = 16 * 1024 * 1024
    """Cap on reading one of the repository's own metadata files. Above python-tuf's largest
    default download cap (``targets_max_length``, 5 MB), so no file a device would accept is
    refused; the same cap as the cloud's release-shape reader (``services/cloud.py``)."""

    def __post_init__(self) -> None:
        if self.max_metadata_bytes <= 0:
            raise ConfigError("max_metadata_bytes must be positive")

    def role_keys(self, role: str) -> RoleKeys:
        """The key spec of a top-level ``role``."""
        return {
            Root.type: self.root,
            Targets.type: self.targets,
            Snapshot.type: self.snapshot,
            Timestamp.type: self.timestamp,
        }[role]


@dataclass(frozen=True)
class ReleaseBundle:
    """The files of one model release; the attestation is made and signed by ``publish``."""

    version: int
    model: bytes
    architecture: bytes
    predicate: ReleasePredicate
    reference_set: bytes | None = None
    inbox_public_key: bytes | None = None
    attestation: bytes | None = None  # a DSSE envelope made elsewhere (CI); None = sign here

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ConfigError("release version must be >= 1")
        if self.predicate.release_version != self.version:
            raise ConfigError(
                f"predicate says v{self.predicate.release_version}, bundle says v{self.version}"
            )


@dataclass(frozen=True)
class PublishedRelease:
    """What ``publish`` wrote: the release version, its role and prefix, and target hashes."""

    version: int
    role: str
    prefix: str
    model_sha256: str
    targets: Mapping[str, str]  # target path -> sha256
    targets_version: int
    snapshot_version: int
    timestamp_version: int


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ConfigError("the clock must return timezone-aware datetimes")
    return now.astimezone(UTC)


class _KeySigner(Signer):
    """A securesystemslib ``Signer`` over a project Ed25519 key (signing happens in _crypto.py)."""

    def __init__(self, key: _crypto.SigningKey) -> None:
        raw = key.public_key.raw
        self._key = key
        self._public = SSlibKey(key_id(raw), "ed25519", "ed25519", {"public": raw.hex()})

    @property
    def public_key(self) -> SSlibKey:
        return self._public

    def sign(self, payload: bytes) -> Signature:
        return Signature(self._public.keyid, _crypto.sign(self._key, payload).hex())

    @classmethod
    def from_priv_key_uri(
        cls,
        priv_key_uri: str,
        public_key: Key,
        secrets_handler: SecretsHandler | None = None,
    ) -> _KeySigner:
        raise NotImplementedError("keys are loaded through the workspace key store")


class _KeyStore:
    """Ed25519 private keys as PKCS#8 PEM files named by key id, encrypted with a passphrase.

    Generation, PEM (en|de)cryption and signing are _crypto.py's recipes (the only importer of
    ``cryptography``); this class only names files. Without a passphrase the PEM is clear text
    (mode 0600) -- fine for a lab, not for offline root keys.
    """

    def __init__(self, folder: Path, passphrase: bytes | None) -> None:
        self._folder = folder
        self._passphrase = passphrase

    def generate(self) -> _KeySigner:
        """Make and store a new Ed25519 key; its key id is the SHA-256 of its SPKI."""
        signer = _KeySigner(_crypto.generate_signing_key())
        self._folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(signer.public_key.keyid)
        if path.exists():
            raise KeyFileError(f"key file {path.name} already exists")
        _crypto.save_signing_key(signer._key, path, self._passphrase)
        return signer

    def has(self, keyid: str) -> bool:
        return self._path(keyid).is_file()

    def signer(self, public: Key) -> _KeySigner:
        """Load the signer for ``public``; :class:`KeyFileError` when missing or mismatched."""
        signer = _KeySigner(_crypto.load_signing_key(self._path(public.keyid), self._passphrase))
        if signer.public_key.keyval != public.keyval:
            raise KeyFileError(f"key file for {public.keyid[:16]}... holds another key")
        return signer

    def _path(self, keyid: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", keyid):
            raise KeyFileError(f"malformed key id {keyid!r}")
        return self._folder / f"{keyid}.pem"


class ReleaseRepository:
    """A TUF repository in a workspace folder: create, publish, delegate, rotate.

    Trusted: the workspace (its metadata and keys are ours). Every method that signs takes
    ``now`` (timezone-aware) to compute expiries. Errors: :class:`ConfigError` for bad arguments,
    :class:`KeyFileError` for missing keys, :class:`StoreError` for unreadable metadata.
    """

    def __init__(
        self,
        workspace: Path,
        *,
        config: RepositoryConfig | None = None,
        passphrase: bytes | None = None,
    ) -> None:
        """Open an existing workspace (use :meth:`create` for a new one)."""
        self.workspace = Path(workspace)
        self.config = config or RepositoryConfig()
        self.metadata_dir = self.workspace / "metadata"
        self.targets_dir = self.workspace / "targets"
        self._keys = _KeyStore(self.workspace / "keys", passphrase)

    # ---------------------------------------------------------------------------------------
    # creation
    # ---------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        workspace: Path,
        *,
        now: datetime,
        config: RepositoryConfig | None = None,
        passphrase: bytes | None = None,
    ) -> ReleaseRepository:
        """Create keys and version 1 of root, targets, snapshot and timestamp in ``workspace``.

        Raises :class:`ConfigError` if the workspace already holds a repository.
        """
        repo = cls(workspace, config=config, passphrase=passphrase)
        if (repo.metadata_dir / "1.root.json").exists():
            raise ConfigError(f"{repo.workspace} already holds a release repository")
        now = _utc(now)
        repo.metadata_dir.mkdir(parents=True, exist_ok=True)
        repo.targets_dir.mkdir(parents=True, exist_ok=True)
        root = Root(expires=now + repo.config.expiry.root, consistent_snapshot=True)
        for role in _TOP_LEVEL:
            spec = repo.config.role_keys(role)
            for _ in range(spec.keys):
                root.add_key(repo._keys.generate().public_key, role)
            root.roles[role].threshold = spec.threshold
        root_md = Metadata(root)
        repo._sign(root_md, root, Root.type)
        repo._write(Root.type, root_md)

        targets_md = Metadata(Targets(expires=now + repo.config.expiry.targets))
        repo._sign(targets_md, root, Targets.type)
        repo._write(Targets.type, targets_md)
        repo._snapshot_and_timestamp(now)
        return repo

    # ---------------------------------------------------------------------------------------
    # reading
    # ---------------------------------------------------------------------------------------
    def root(self) -> Metadata[Root]:
        """The newest root metadata."""
        return self._load(Root.type)

    def trusted_root_bytes(self, version: int = 1) -> bytes:
        """Bytes of root ``version``: what a device is provisioned with as its trust anchor."""
        return self._read_file(self.metadata_dir / f"{version}.root.json")

    def targets(self, role: str = Targets.type) -> Metadata[Targets]:
        """The newest metadata of a targets role (top-level or delegated)."""
        return self._load(role)

    def current_release(self, prefix: str = "", role: str = Targets.type) -> int | None:
        """The release version currently published under ``prefix`` by ``role`` (None if none)."""
        target = self.targets(role).signed.targets.get(prefix + MODEL_TARGET)
        if target is None:
            return None
        info = target.custom
        if not isinstance(info, dict) or not isinstance(info.get(CUSTOM_KEY), dict):
            return None
        version = info[CUSTOM_KEY].get("release")
        return version if isinstance(version, int) else None

    # ---------------------------------------------------------------------------------------
    # publishing
    # ---------------------------------------------------------------------------------------
    def publish(
        self,
        bundle: ReleaseBundle,
        *,
        now: datetime,
        role: str = Targets.type,
        prefix: str = "",
    ) -> PublishedRelease:
        """Publish ``bundle`` under ``prefix`` as ``role``; sign targets, snapshot, timestamp.

        The attestation is signed by the keys of ``role`` (the same keys that sign the targets
        metadata, so a device needs no other trust anchor). Raises :class:`ConfigError` when the
        version does not go up or the prefix is not delegated to ``role``; :class:`KeyFileError`
        when a key is missing; :class:`ModelFormatError` when the model is not safetensors;
        :class:`ReleaseRefused` when the audit failed and was not forced.
        """
        now = _utc(now)
        _check_prefix(prefix)
        current = self.current_release(prefix, role)
        if current is not None and bundle.version <= current:
            raise ConfigError(
                f"release v{bundle.version} does not supersede the published v{current}"
            )
        # Defence in depth: the device refuses these too, but the cloud should never sign them.
        load_checkpoint_bytes(bundle.model, max_bytes=len(bundle.model))
        if (
            bundle.predicate.audit_verdict is AuditVerdict.FAIL
            and not bundle.predicate.audit_forced
        ):
            raise ReleaseRefused(
                f"release v{bundle.version} failed its privacy audit (force it explicitly)",
                reason="audit_failed",
            )
        attestation = bundle.attestation
        if attestation is None:
            attestation = sign_attestation(
                MODEL_TARGET, bundle.model, bundle.predicate, self.signers(role)
            )
        files: dict[str, bytes] = {
            MODEL_TARGET: bundle.model,
            ARCHITECTURE_TARGET: bundle.architecture,
            ATTESTATION_TARGET: attestation,
        }
        if bundle.reference_set is not None:
            files[REFERENCE_SET_TARGET] = bundle.reference_set
        if bundle.inbox_public_key is not None:
            files[INBOX_KEY_TARGET] = bundle.inbox_public_key
        custom = {CUSTOM_KEY: {"release": bundle.version}}
        targets_version = self.add_targets(
            {prefix + name: data for name, data in files.items()},
            now=now,
            role=role,
            custom=custom,
            remove_prefix=prefix,
        )
        snapshot_version, timestamp_version = self._snapshot_and_timestamp(now)
        return PublishedRelease(
            version=bundle.version,
            role=role,
            prefix=prefix,
            model_sha256=hashlib.sha256(bundle.model).hexdigest(),
            targets={prefix + n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
            targets_version=targets_version,
            snapshot_version=snapshot_version,
            timestamp_version=timestamp_version,
        )

    def add_targets(
        self,
        files: Mapping[str, bytes],
        *,
        now: datetime,
        role: str = Targets.type,
        custom: Mapping[str, Any] | None = None,
        remove_prefix: str | None = None,
    ) -> int:
        """Write ``files`` as targets of ``role`` and sign a new version of it (no snapshot).

        With ``remove_prefix`` the role's release files under that prefix are dropped first, so a
        release never mixes files of two versions (an absent optional file stays absent).
        Returns the new version of the role's metadata. Call :meth:`snapshot_and_timestamp` after
        (``publish`` does).
        """
        now = _utc(now)
        md = self.targets(role)
        for path in files:
            _check_target_path(path)
            if role != Targets.type and not self._delegation(role).is_delegated_path(path):
                raise ConfigError(f"target {path!r} is not delegated to role {role!r}")
        if remove_prefix is not None:
            for name in RELEASE_FILES:
                md.signed.targets.pop(remove_prefix + name, None)
        for path, data in files.items():
            target = TargetFile.from_data(path, data, ["sha256"])
            if custom is not None:
                target.unrecognized_fields["custom"] = copy.deepcopy(dict(custom))
            self._write_target(target, data)
            md.signed.targets[path] = target
        self._bump(md, role, now)
        return int(md.signed.version)

    def snapshot_and_timestamp(self, *, now: datetime) -> tuple[int, int]:
        """Sign a new snapshot over the newest targets roles, then a new timestamp over it."""
        return self._snapshot_and_timestamp(_utc(now))

    def refresh_timestamp(self, *, now: datetime) -> int:
        """Re-sign the timestamp with a fresh expiry (run this more often than it expires)."""
        now = _utc(now)
        md = self._load(Timestamp.type)
        self._bump(md, Timestamp.type, now)
        return int(md.signed.version)

    # ---------------------------------------------------------------------------------------
    # delegations
    # ---------------------------------------------------------------------------------------
    def add_delegation(
        self,
        name: str,
        *,
        paths: Sequence[str],
        now: datetime,
        keys: RoleKeys | None = None,
        terminating: bool = True,
    ) -> None:
        """Delegate ``paths`` (e.g. ``["fleets/eu/*"]``) from targets to a new role ``name``.

        The new role gets fresh keys and an empty version 1; targets, snapshot and timestamp are
        re-signed. A per-fleet role uses ``fleets/<fleet>/*``; a per-device one
        ``devices/<device-id>/*``. Raises :class:`ConfigError` for a bad or existing name.
        """
        now = _utc(now)
        if not _ROLE_NAME.fullmatch(name) or name in _TOP_LEVEL:
            raise ConfigError(f"invalid delegated role name {name!r}")
        if not paths:
            raise ConfigError("a delegation needs at least one path pattern")
        spec = keys or RoleKeys()
        targets_md = self.targets()
        delegations = targets_md.signed.delegations
        if delegations is None:
            delegations = Delegations(keys={}, roles={})
            targets_md.signed.delegations = delegations
        if delegations.roles is None or name in delegations.roles:
            raise ConfigError(f"role {name!r} is already delegated")
        role = DelegatedRole(name, [], spec.threshold, terminating, paths=list(paths))
        delegations.roles[name] = role
        for _ in range(spec.keys):
            targets_md.signed.add_key(self._keys.generate().public_key, name)
        self._bump(targets_md, Targets.type, now)

        delegated_md = Metadata(Targets(expires=now + self.config.expiry.delegated))
        self._sign(delegated_md, targets_md.signed, name)
        self._write(name, delegated_md)
        self._snapshot_and_timestamp(now)

    # ---------------------------------------------------------------------------------------
    # root rotation
    # ---------------------------------------------------------------------------------------
    def rotate_root(
        self,
        *,
        now: datetime,
        keys: int | None = None,
        threshold: int | None = None,
    ) -> int:
        """Replace the root keys with ``keys`` fresh ones (threshold ``threshold``).

        The new root version is signed by a threshold of the *old* root keys and of the *new*
        ones, as the TUF client requires to accept a rotation. Returns the new root version.
        Raises :class:`KeyFileError` when too few old root keys are at hand.
        """
        now = _utc(now)
        old_root = self.root().signed
        old_signers = self.signers(Root.type)
        new_root = copy.deepcopy(old_root)
        self._fresh_keys(new_root, Root.type, keys, threshold)
        new_root.version += 1
        new_root.expires = now + self.config.expiry.root
        new_md = Metadata(new_root)
        for signer in old_signers:
            new_md.sign(signer, append=True)
        self._sign(new_md, new_root, Root.type, append=True)
        self._write(Root.type, new_md)
        return int(new_root.version)

    def rotate_online(
        self,
        role: str,
        *,
        now: datetime,
        keys: int | None = None,
        threshold: int | None = None,
    ) -> int:
        """Replace the keys of a top-level online role (targets, snapshot or timestamp).

        A new root version lists the fresh keys (signed by the root keys, which stay), then the
        role's metadata and the snapshot and timestamp are re-signed, newer versions, so devices
        move to the new keys on their next update and refuse anything the old keys sign. Use it
        when an online key may have leaked. Returns the new root version. Raises
        :class:`ConfigError` for another role and :class:`KeyFileError` when too few root keys are
        at hand.
        """
        if role not in (Targets.type, Snapshot.type, Timestamp.type):
            raise ConfigError(f"online roles are targets, snapshot and timestamp, not {role!r}")
        now = _utc(now)
        md = self.root()
        root = md.signed
        signers = self.signers(Root.type)
        self._fresh_keys(root, role, keys, threshold)
        root.version += 1
        root.expires = now + self.config.expiry.root
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        self._write(Root.type, md)
        if role == Targets.type:
            self._bump(self._load(Targets.type), Targets.type, now)
        self._snapshot_and_timestamp(now)
        return int(root.version)

    # ---------------------------------------------------------------------------------------
    # internals
    # ---------------------------------------------------------------------------------------
    def _fresh_keys(self, root: Root, role: str, keys: int | None, threshold: int | None) -> None:
        """Replace ``role``'s keys in ``root`` with ``keys`` fresh ones (default: as many as now)
        at ``threshold`` (default: as now); the new private keys are saved in the key folder."""
        current = root.roles[role]
        spec = RoleKeys(keys=keys if keys is not None else len(current.keyids),
                        threshold=threshold if threshold is not None else current.threshold)
        for keyid in list(current.keyids):
            root.revoke_key(keyid, role)
        for _ in range(spec.keys):
            root.add_key(self._keys.generate().public_key, role)
        root.roles[role].threshold = spec.threshold

    def _delegation(self, role: str) -> DelegatedRole:
        delegations = self.targets().signed.delegations
        if delegations is None or delegations.roles is None or role not in delegations.roles:
            raise ConfigError(f"no delegated role {role!r}")
        return delegations.roles[role]

    def _role_keys(self, role: str) -> tuple[list[Key], int]:
        """Public keys and threshold of ``role`` as its delegator (root or targets) says."""
        if role in _TOP_LEVEL:
            root = self.root().signed
            role_obj = root.get_delegated_role(role)
            return [root.get_key(k) for k in role_obj.keyids], role_obj.threshold
        targets = self.targets().signed
        role_obj = self._delegation(role)
        return [targets.get_key(k) for k in role_obj.keyids], role_obj.threshold

    def signers(self, role: str) -> list[Signer]:
        """Signers for every locally held key of ``role``; :class:`KeyFileError` below threshold."""
        keys, threshold = self._role_keys(role)
        signers: list[Signer] = [self._keys.signer(k) for k in keys if self._keys.has(k.keyid)]
        if len(signers) < threshold:
            raise KeyFileError(
                f"role {role!r} needs {threshold} signature(s); only {len(signers)} key(s) here"
            )
        return signers

    def _sign(
        self, md: Metadata[Any], delegator: Root | Targets, role: str, *, append: bool = False
    ) -> None:
        """Sign ``md`` with every key of ``role`` (as ``delegator`` names them) held locally."""
        role_obj = delegator.get_delegated_role(role)
        keys = [delegator.get_key(k) for k in role_obj.keyids]
        held = [self._keys.signer(k) for k in keys if self._keys.has(k.keyid)]
        if len(held) < role_obj.threshold:
            raise KeyFileError(
                f"role {role!r} needs {role_obj.threshold} signature(s); only {len(held)} here"
            )
        if not append:
            md.signatures.clear()
        for signer in held:
            md.sign(signer, append=True)

    def _delegator_for(self, role: str) -> Root | Targets:
        if role in _TOP_LEVEL:
            return self.root().signed
        return self.targets().signed

    def _bump(self, md: Metadata[Any], role: str, now: datetime) -> None:
        signed: Signed = md.signed
        signed.version += 1
        signed.expires = now + self.config.expiry.for_role(role)
        self._sign(md, self._delegator_for(role), role)
        self._write(role, md)

    def _snapshot_and_timestamp(self, now: datetime) -> tuple[int, int]:
        snapshot_path = self.metadata_dir / "snapshot.json"
        if snapshot_path.exists():
            snapshot_md: Metadata[Any] = self._load(Snapshot.type)
            snapshot_md.signed.version += 1
        else:
            snapshot_md = Metadata(Snapshot())
        snapshot: Snapshot = snapshot_md.signed
        snapshot.expires = now + self.config.expiry.snapshot
        for role in self._targets_roles():
            data = self._read(role)
            version = Metadata.from_bytes(data).signed.version
            snapshot.meta[f"{role}.json"] = MetaFile.from_data(version, data, ["sha256"])
        self._sign(snapshot_md, self.root().signed, Snapshot.type)
        self._write(Snapshot.type, snapshot_md)

        timestamp_path = self.metadata_dir / "timestamp.json"
        if timestamp_path.exists():
            timestamp_md: Metadata[Any] = self._load(Timestamp.type)
            timestamp_md.signed.version += 1
        else:
            timestamp_md = Metadata(Timestamp())
        timestamp: Timestamp = timestamp_md.signed
        timestamp.expires = now + self.config.expiry.timestamp
        timestamp.snapshot_meta = MetaFile.from_data(
            snapshot.version, self._read(Snapshot.type), ["sha256"]
        )
        self._sign(timestamp_md, self.root().signed, Timestamp.type)
        self._write(Timestamp.type, timestamp_md)
        return int(snapshot.version), int(timestamp.version)

    def _targets_roles(self) -> list[str]:
        roles = [Targets.type]
        delegations = self.targets().signed.delegations
        if delegations is not None and delegations.roles is not None:
            roles.extend(delegations.roles)
        return roles

    def _read(self, role: str) -> bytes:
        return self._read_file(self.metadata_dir / f"{role}.json")

    def _read_file(self, path: Path) -> bytes:
        """One metadata file, bounded (``config.max_metadata_bytes``) and regular files only: a
        FIFO, a device or an endless file in the workspace is a :class:`StoreError` naming why,
        never a hang or an out-of-memory."""
        try:
            return read_regular_file(path, "metadata", self.config.max_metadata_bytes)
        except (KeyFileError, TooLarge) as exc:
            raise StoreError(exc.message) from exc

    def _load(self, role: str) -> Metadata[Any]:
        data = self._read(role)
        try:
            return Metadata.from_bytes(data)
        except Exception as exc:  # DeserializationError and friends: our own file is corrupt
            raise StoreError(f"metadata {role}.json does not parse: {exc}") from exc

    def _write(self, role: str, md: Metadata[Any]) -> None:
        """Write ``md`` as ``N.role.json`` (consistent snapshot) and ``role.json`` (latest).

        The timestamp is the only role a client fetches unversioned, and it is written last by
        every operation: it is the commit point that makes a new snapshot visible.
        """
        data = md.to_bytes()
        if role != Timestamp.type:
            atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.{role}.json", data)
        atomic_write_bytes(self.metadata_dir / f"{role}.json", data)

    def _write_target(self, target: TargetFile, data: bytes) -> None:
        directory, _, name = target.path.rpartition("/")
        digest = target.hashes["sha256"]
        folder = self.targets_dir / directory if directory else self.targets_dir
        atomic_write_bytes(folder / f"{digest}.{name}", data)


def _check_prefix(prefix: str) -> None:
    if prefix and (not prefix.endswith("/") or prefix.startswith("/")):
        raise ConfigError(f"release prefix {prefix!r} must be relative and end with '/'")
    if prefix:
        _check_target_path(prefix + "x")


def _check_target_path(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"invalid target path {path!r}")
    if not all(re.fullmatch(r"[A-Za-z0-9._-]+", p) for p in parts):
        raise ConfigError(f"target path {path!r} has characters outside [A-Za-z0-9._-/]")


def describe(repo: ReleaseRepository) -> dict[str, Any]:
    """A JSON-able summary of the repository state (versions, expiries, releases)."""
    root = repo.root().signed
    out: dict[str, Any] = {
        "root_version": root.version,
        "root_threshold": root.roles[Root.type].threshold,
        "root_keys": len(root.roles[Root.type].keyids),
        "roles": {},
    }
    for role in repo._targets_roles():
        md = repo.targets(role).signed
        out["roles"][role] = {
            "version": md.version,
            "expires": md.expires.isoformat(),
            "targets": {p: t.hashes["sha256"] for p, t in sorted(md.targets.items())},
        }
    return json.loads(json.dumps(out))  # type: ignore[no-any-return]

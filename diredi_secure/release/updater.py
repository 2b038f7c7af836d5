"""The device side of secure releases: verify with python-tuf, check the attestation, install A/B.

``DeviceUpdater.update()`` runs python-tuf's client workflow (``tuf.ngclient.Updater``: root
chain, timestamp, snapshot, targets, delegations; thresholds, expiry at *our* clock, rollback and
mix-and-match checks, pinned lengths and hashes), then checks the release's in-toto attestation
against the keys the verified metadata names, refuses pickle or malformed models, and installs
the files atomically into the inactive slot of an A/B pair. Until the final rename of
``active.json`` nothing the device runs has changed; the previous model stays in the other slot.

Targets are streamed: each chunk the fetcher yields is hashed and written at once into a staging
folder beside the slots (0600 files, O_EXCL), so a 256 MB model is received, hashed and written
once and never held in memory; its safetensors header is then checked against the file size
without reading a tensor. Length and hashes are checked against the ``TargetFile`` of the verified
metadata (python-tuf's own check, done in-stream) before anything is installed; a failed check
removes the staging folder and leaves both slots as they were.

Every failure is a typed :class:`~diredi_secure.errors.DirediError` (see ``errors.py`` in this
package for the ``ReleaseError`` subclasses); python-tuf exceptions never escape.

State folder layout::

    tuf/                 python-tuf's metadata cache (root_history/, timestamp.json ...)
    trusted_root.json    the root the device was provisioned with (its trust anchor)
    slots/a/, slots/b/   the two install slots (model.safetensors, architecture.json, ...)
    slots/.incoming-*/   a release being received (removed on failure, renamed into its slot)
    active.json          which slot runs, and the release record of both slots
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import queue
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from securesystemslib.signer import Key
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from diredi_secure.checkpoint import (
    DEFAULT_MAX_CHECKPOINT_BYTES,
    CheckpointHeader,
    check_checkpoint_header,
    load_checkpoint_bytes,
    read_regular_file,
)
from diredi_secure.errors import (
    AttestationInvalid,
    ConfigError,
    DirediError,
    KeyFileError,
    ModelFormatError,
    ReleaseError,
    ReleaseRefused,
    StoreError,
    TooLarge,
)

from .attest import MAX_ATTESTATION_BYTES, Attestation, verify_attestation
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
from .fetcher import METADATA_BASE_URL, TARGETS_BASE_URL
from .repository import (
    ARCHITECTURE_TARGET,
    ATTESTATION_TARGET,
    CUSTOM_KEY,
    INBOX_KEY_TARGET,
    MODEL_TARGET,
    REFERENCE_SET_TARGET,
)

__all__ = [
    "DeviceUpdater",
    "InstalledModel",
    "InstalledRelease",
    "SlotStaging",
    "SlotStore",
    "UpdatePolicy",
    "UpdateResult",
    "map_tuf_error",
]

Clock = Callable[[], datetime]
_SLOTS: Final = ("a", "b")
_STATE_FORMAT: Final = 1
_STAGING_PREFIX: Final = ".incoming-"
_CREATE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
_MAX_STATE_BYTES: Final = 1024 * 1024
"""Cap on ``active.json`` (two release records: a few hundred bytes; the cap the device
workspace puts on its own state files)."""


def _read_local(path: Path, what: str, max_bytes: int) -> bytes | None:
    """A file of the device's release state, or ``None`` when it does not exist.

    Read with :func:`read_regular_file` (one open, checked on the descriptor, at most
    ``max_bytes + 1`` bytes read), so a FIFO, a device or a file grown past its cap put in its
    place (by a local user or an operator mistake) cannot hang or exhaust the updater. Raises
    :class:`StoreError` for any other failure, naming why (``not a regular file``, the cap).
    """
    try:
        return read_regular_file(path, what, max_bytes)
    except KeyFileError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return None
        raise StoreError(exc.message) from exc
    except TooLarge as exc:
        raise StoreError(exc.message) from exc


@dataclass(frozen=True)
class UpdatePolicy:
    """What the device accepts, and the caps on what it downloads.

    ``prefix``/``role``: where the device's releases live (``""``/``targets`` for the whole fleet;
    ``fleets/eu/``/``fleet-eu`` for a delegated one). A new model's attested parent must be the
    installed model, one of ``allowed_parents`` (hex SHA-256), or anything when
    ``require_parent_match`` is false; a first install accepts any parent. ``accept_unaudited``:
    install a release attested ``not_audited`` (published without an audit report); off by
    default, so such a release is refused (:class:`ReleaseRefused`, reason ``not_audited``).
    """

    prefix: str = ""
    role: str = Targets.type
    require_parent_match: bool = True
    allowed_parents: frozenset[str] = frozenset()
    accept_forced_audit: bool = True
    accept_unaudited: bool = False
    max_model_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES
    max_file_bytes: int = 64 * 1024 * 1024  # architecture, reference set, inbox key
    max_attestation_bytes: int = MAX_ATTESTATION_BYTES
    tuf: UpdaterConfig = field(default_factory=UpdaterConfig)


@dataclass(frozen=True)
class InstalledRelease:
    """The record of an installed release (kept in ``active.json``)."""

    version: int
    model_sha256: str
    role: str
    prefix: str
    slot: str
    files: tuple[str, ...]
    parent_sha256: str | None
    audit_verdict: str
    audit_forced: bool
    installed_at: str

    @classmethod
    def from_dict(cls, data: Any) -> InstalledRelease:
        try:
            return cls(
                version=int(data["version"]),
                model_sha256=str(data["model_sha256"]),
                role=str(data["role"]),
                prefix=str(data["prefix"]),
                slot=str(data["slot"]),
                files=tuple(str(f) for f in data["files"]),
                parent_sha256=None if data["parent_sha256"] is None else str(data["parent_sha256"]),
                audit_verdict=str(data["audit_verdict"]),
                audit_forced=bool(data["audit_forced"]),
                installed_at=str(data["installed_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"release record is corrupt: {exc!r}") from exc


@dataclass(frozen=True)
class InstalledModel:
    """The running model: its release record, tensors, safetensors metadata and architecture."""

    release: InstalledRelease
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]
    architecture: dict[str, Any]
    slot_dir: Path


@dataclass(frozen=True)
class UpdateResult:
    """Outcome of :meth:`DeviceUpdater.update`."""

    status: Literal["installed", "up_to_date"]
    release: InstalledRelease
    attestation: Attestation | None = None


# ------------------------------------------------------------------------------------------------
# python-tuf exceptions -> our errors
# ------------------------------------------------------------------------------------------------
_ROLLBACK_MESSAGES = (
    re.compile(r"must be >="),  # timestamp / snapshot version went down
    re.compile(r"^Expected \S+\.json version \d+, got \d+\.$"),  # snapshot meta went down
)


def map_tuf_error(exc: Exception, stage: Literal["metadata", "target"]) -> DirediError:
    """Translate a python-tuf exception into our typed error, naming the attack it indicates.

    ``stage`` says whether metadata (refresh, target lookup) or a target download failed: a hash
    mismatch in metadata means mixed-up metadata, in a target it means tampered bytes.
    """
    text = str(exc) or type(exc).__name__
    where = "metadata" if stage == "metadata" else "target"
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        return ReleaseSignatureInvalid(f"{where} below its signature threshold: {text}")
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return ReleaseExpired(f"{text} (freeze attack or stale repository)")
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        if any(p.search(text) for p in _ROLLBACK_MESSAGES):
            return ReleaseRollback(f"metadata version went down: {text}")
        return ReleaseInconsistent(f"metadata version is not the one pinned: {text}")
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        if stage == "metadata":
            return ReleaseInconsistent(f"metadata does not match its pinned hash: {text}")
        return TargetMismatch(f"downloaded file does not match the signed hash: {text}")
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        return TargetTooLong(f"{where} longer than declared: {text}")
    if isinstance(exc, tuf_exc.DownloadHTTPError):
        return ReleaseUnavailable(f"{where} not available ({exc.status_code}): {text}")
    if isinstance(exc, tuf_exc.DownloadError):
        cause = exc.__cause__
        detail = f"{text}: {cause}" if cause is not None else text
        return ReleaseUnavailable(f"{where} download failed: {detail}")
    if isinstance(exc, tuf_exc.RepositoryError):
        return ReleaseError(f"{where} failed verification: {text}")
    raise TypeError(f"not a python-tuf error: {exc!r}")


@contextlib.contextmanager
def _tuf_errors(stage: Literal["metadata", "target"]) -> Iterator[None]:
    try:
        yield
    except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
        raise map_tuf_error(exc, stage) from exc
    except OSError as exc:
        raise StoreError(f"device release cache: {exc}") from exc


# ------------------------------------------------------------------------------------------------
# A/B slots
# ------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class SlotStore:
    """Two install slots and an ``active.json`` pointer, switched by one atomic rename.

    Install writes every file of the new release into the *inactive* slot (temporary name,
    fsync, rename), then writes ``active.json`` the same way. A crash before that last rename
    leaves ``active.json`` pointing at the old slot, which was never touched. The slot that was
    active stays on disk as the fallback (:meth:`revert`).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @property
    def _active_path(self) -> Path:
        return self.folder / "active.json"

    def _state(self) -> dict[str, Any]:
        raw = _read_local(self._active_path, "release state", _MAX_STATE_BYTES)
        if raw is None:
            return {"format": _STATE_FORMAT, "active": None, "previous": None}
        try:
            state = json.loads(raw)
        except ValueError as exc:
            raise StoreError(f"{self._active_path} is not JSON") from exc
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise StoreError(f"{self._active_path} has an unknown format")
        return state

    def active(self) -> InstalledRelease | None:
        """The running release, or None before the first install."""
        record = self._state().get("active")
        return None if record is None else InstalledRelease.from_dict(record)

    def previous(self) -> InstalledRelease | None:
        """The release kept in the other slot for fallback, if any."""
        record = self._state().get("previous")
        return None if record is None else InstalledRelease.from_dict(record)

    def slot_dir(self, slot: str) -> Path:
        if slot not in _SLOTS:
            raise StoreError(f"unknown slot {slot!r}")
        return self.folder / "slots" / slot

    def inactive_slot(self) -> str:
        active = self.active()
        return "a" if active is None or active.slot == "b" else "b"

    def install(
        self,
        files: Mapping[str, bytes],
        release: InstalledRelease,
        *,
        before_commit: Callable[[], None] | None = None,
    ) -> InstalledRelease:
        """Write ``files`` into ``release.slot`` and make it active; the old one becomes previous.

        ``before_commit`` runs after every file is durable and before the commit rename (tests
        use it to simulate a crash there). Raises :class:`InstallFailed` on I/O errors.
        """
        with self.staging() as staged:
            for name, data in files.items():
                staged.receive(name, (data,), max_bytes=len(data))
            return staged.commit(release, before_commit=before_commit)

    @contextlib.contextmanager
    def staging(self) -> Iterator[SlotStaging]:
        """Hold the install lock and a fresh staging folder; remove it unless it was committed.

        Files are received into the staging folder (:meth:`SlotStaging.receive`), checked, then
        :meth:`SlotStaging.commit` renames the folder into the inactive slot and switches
        ``active.json``. Leftovers of a crashed install are removed first.
        """
        with self._exclusive():
            slots = self.folder / "slots"
            try:
                slots.mkdir(parents=True, exist_ok=True)
                for stale in slots.glob(_STAGING_PREFIX + "*"):
                    shutil.rmtree(stale, ignore_errors=True)
                folder = slots / f"{_STAGING_PREFIX}{secrets.token_hex(8)}"
                folder.mkdir(mode=0o700)
            except OSError as exc:
                raise InstallFailed(f"cannot stage a release in {slots}: {exc}") from exc
            staged = SlotStaging(self, folder)
            try:
                yield staged
            finally:
                if not staged.committed:
                    shutil.rmtree(folder, ignore_errors=True)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold an exclusive lock on the slot folder: two installs (two `edge update` processes,
        or the agent and an operator) must not write the same inactive slot at once."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.folder / ".install.lock", os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:
            raise InstallFailed(f"cannot lock {self.folder}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write_state(self, state: Mapping[str, Any]) -> Path:
        tmp_state = self.folder / ".active.json.tmp"
        _write_synced(tmp_state, json.dumps(state, sort_keys=True, indent=1).encode())
        return tmp_state

    def revert(self) -> InstalledRelease:
        """Make the previous release active again (a local decision: the new model misbehaves)."""
        state = self._state()
        if state.get("previous") is None:
            raise StoreError("there is no previous release to revert to")
        new_state = {**state, "active": state["previous"], "previous": state["active"]}
        try:
            os.replace(self._write_state(new_state), self._active_path)
            _fsync_dir(self.folder)
        except OSError as exc:
            raise InstallFailed(f"revert failed: {exc}") from exc
        return InstalledRelease.from_dict(new_state["active"])


@dataclass(frozen=True)
class StagedFile:
    """A file received into the staging folder: its length, its hex digests, and (``keep``) its
    bytes."""

    path: Path
    length: int
    digests: dict[str, str]
    data: bytes | None = None


class _ChunkSink:
    """Hash and write chunks in a worker thread, fed through a short queue.

    :meth:`put` re-raises the worker's error (an ``OSError`` from the write) at the next chunk;
    :meth:`close` ends the worker, waits for it, and re-raises its error. After an error the
    worker only drains the queue, so the producer never blocks on it.
    """

    def __init__(self, handle: Any, hashers: list[Any]) -> None:
        self._handle = handle
        self._hashers = hashers
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="diredi-install", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                for hasher in self._hashers:
                    hasher.update(chunk)
                view = memoryview(chunk)
                while view:  # a raw file may write less than asked
                    view = view[self._handle.write(view) or 0 :]
            except BaseException as exc:  # handed to the producer, which raises it
                self._error = exc

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


class SlotStaging:
    """A release being received (see :meth:`SlotStore.staging`); holds the install lock."""

    def __init__(self, store: SlotStore, folder: Path) -> None:
        self.store = store
        self.folder = folder
        self.committed = False

    def path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith(".") or name == "..":
            raise InstallFailed(f"refusing slot file name {name!r}")
        return self.folder / name

    def receive(
        self,
        name: str,
        chunks: Iterable[bytes],
        *,
        max_bytes: int,
        hash_algorithms: Iterable[str] = (),
        keep: bool = False,
    ) -> StagedFile:
        """Write ``chunks`` to the new file ``name`` as they arrive, hashing them on the way.

        The file is created 0600 with ``O_EXCL | O_NOFOLLOW`` and fsynced. More than
        ``max_bytes`` stops the stream with python-tuf's ``DownloadLengthMismatchError``;
        an unknown hash algorithm is python-tuf's ``LengthOrHashMismatchError`` (both as
        ``download_file`` / ``verify_length_and_hashes`` raise them). Exceptions the chunk
        iterator raises propagate. ``keep``: also return the bytes (small files only).
        """
        path = self.path(name)
        try:
            hashers = {algo: hashlib.new(algo) for algo in hash_algorithms}
        except ValueError as exc:
            raise tuf_exc.LengthOrHashMismatchError(f"unsupported hash algorithm: {exc}") from exc
        kept: list[bytes] = []
        received = 0
        try:
            fd = os.open(path, _CREATE_FLAGS, 0o600)
            with os.fdopen(fd, "wb", buffering=0) as handle:
                # Hashing and writing run in a second thread while this one waits for the next
                # chunk (hashlib, file writes and gRPC's wait all release the GIL): the install
                # then takes about the longer of the two, not their sum. At most 4 chunks wait.
                sink = _ChunkSink(handle, list(hashers.values()))
                try:
                    for chunk in chunks:
                        received += len(chunk)
                        if received > max_bytes:
                            raise tuf_exc.DownloadLengthMismatchError(
                                f"Downloaded {received} bytes exceeding the maximum allowed "
                                f"length of {max_bytes}"
                            )
                        sink.put(chunk)
                        if keep:
                            kept.append(chunk)
                finally:
                    sink.close()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise InstallFailed(f"cannot write {name} into the staging folder: {exc}") from exc
        digests = {algo: hasher.hexdigest() for algo, hasher in hashers.items()}
        return StagedFile(path, received, digests, b"".join(kept) if keep else None)

    def check_model(self, name: str, *, max_bytes: int) -> CheckpointHeader:
        """Check the staged safetensors file's header against its size (no tensor is read)."""
        path = self.path(name)
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                return check_checkpoint_header(handle, size, max_bytes=max_bytes)
        except OSError as exc:
            raise InstallFailed(f"cannot read the staged {name}: {exc.strerror}") from exc

    def commit(
        self, release: InstalledRelease, *, before_commit: Callable[[], None] | None = None
    ) -> InstalledRelease:
        """Move the staged files into ``release.slot`` (the inactive one) and make it active.

        Order: the staged files are durable (each fsynced, then the folder); if the inactive
        slot still holds the fallback, ``active.json`` first forgets it (a crash while it is
        replaced leaves no pointer to a half-removed slot); the old slot is removed, the staging
        folder renamed into its place; then ``before_commit`` and the atomic rename of
        ``active.json``. Raises :class:`InstallFailed`.
        """
        store = self.store
        if self.committed:
            raise InstallFailed("this staging folder was already committed")
        if release.slot != store.inactive_slot():
            raise InstallFailed(f"slot {release.slot!r} is the running one")
        for name in release.files:
            if not self.path(name).is_file():
                raise InstallFailed(f"release file {name!r} was not received")
        target = store.slot_dir(release.slot)
        state = store._state()
        try:
            _fsync_dir(self.folder)
            if target.exists():
                if state.get("previous") is not None:
                    os.replace(store._write_state({**state, "previous": None}), store._active_path)
                    _fsync_dir(store.folder)
                shutil.rmtree(target)  # the old fallback: it is replaced by the running release
            os.rename(self.folder, target)
            self.committed = True
            _fsync_dir(target.parent)
            new_state = {
                "format": _STATE_FORMAT,
                "active": asdict(release),
                "previous": state.get("active"),
            }
            tmp_state = store._write_state(new_state)
            if before_commit is not None:
                before_commit()
            os.replace(tmp_state, store._active_path)
            _fsync_dir(store.folder)
        except OSError as exc:
            raise InstallFailed(f"installing v{release.version} failed: {exc}") from exc
        return release


# ------------------------------------------------------------------------------------------------
# The updater
# ------------------------------------------------------------------------------------------------
def _release_version(target: TargetFile) -> int:
    custom = target.custom
    entry = custom.get(CUSTOM_KEY) if isinstance(custom, dict) else None
    version = entry.get("release") if isinstance(entry, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ReleaseError(f"target {target.path} carries no release version")
    return version


class DeviceUpdater:
    """Verify and install releases on a device.

    Trusted: ``trusted_root`` (the root metadata the device was provisioned with; stored in the
    state folder on first use), the state folder, and ``clock`` (timezone-aware; expiry is judged
    against it). Untrusted: everything ``fetcher`` returns.
    """

    def __init__(
        self,
        state_dir: Path,
        fetcher: FetcherInterface,
        *,
        clock: Clock,
        trusted_root: bytes | None = None,
        policy: UpdatePolicy | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.fetcher = fetcher
        self.clock = clock
        self.policy = policy or UpdatePolicy()
        self.slots = SlotStore(self.state_dir)
        self._tuf_dir = self.state_dir / "tuf"
        self._root_path = self.state_dir / "trusted_root.json"
        self._provision(trusted_root)

    def _provision(self, trusted_root: bytes | None) -> None:
        try:
            stored = self._trusted_root()
            if stored is None:
                if trusted_root is None:
                    raise ConfigError(f"{self.state_dir} is not provisioned: pass a trusted root")
                self.state_dir.mkdir(parents=True, exist_ok=True)
                _write_synced(self._root_path, trusted_root)
            elif trusted_root is not None and trusted_root != stored:
                raise ConfigError(f"{self.state_dir} was provisioned with another trusted root")
        except OSError as exc:
            raise StoreError(f"cannot provision {self.state_dir}: {exc}") from exc

    def _provisioned_root(self) -> bytes:
        root = self._trusted_root()
        if root is None:
            raise StoreError(f"{self._root_path} is missing: the device is not provisioned")
        return root

    def _trusted_root(self) -> bytes | None:
        """The stored trust anchor (``None`` before provisioning), capped at python-tuf's own
        ``root_max_length``: no root the updater would accept is longer."""
        return _read_local(self._root_path, "trusted root", self.policy.tuf.root_max_length)

    # -- reading --------------------------------------------------------------------------------
    def installed(self) -> InstalledRelease | None:
        """The running release record, or None."""
        return self.slots.active()

    def current_model(self) -> InstalledModel:
        """Load the running model (safetensors only; pickle refused); check it against its record.

        Raises :class:`StoreError` when nothing is installed, :class:`ModelFormatError` when the
        file is not safetensors or not the bytes that were verified at install.
        """
        release = self.slots.active()
        if release is None:
            raise StoreError("no model is installed")
        return self._load_slot(release)

    def previous_model(self) -> InstalledModel | None:
        """The fallback model in the other slot, if any."""
        release = self.slots.previous()
        return None if release is None else self._load_slot(release)

    def _load_slot(self, release: InstalledRelease) -> InstalledModel:
        slot_dir = self.slots.slot_dir(release.slot)
        path = slot_dir / MODEL_TARGET
        # One bounded read: the bytes hashed are the bytes parsed (no second open that a swapped
        # file could answer differently).
        data = _read_slot_file(path, "installed model", self.policy.max_model_bytes)
        if hashlib.sha256(data).hexdigest() != release.model_sha256:
            raise ModelFormatError(f"installed model {path} changed since it was verified")
        tensors, metadata = load_checkpoint_bytes(data, max_bytes=self.policy.max_model_bytes)
        raw = _read_slot_file(slot_dir / ARCHITECTURE_TARGET, "installed architecture",
                              self.policy.max_file_bytes)
        try:
            architecture = json.loads(raw)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError
            raise ModelFormatError(f"architecture of v{release.version} is unreadable") from exc
        return InstalledModel(release, tensors, metadata, architecture, slot_dir)

    # -- updating -------------------------------------------------------------------------------
    def _tuf_updater(self) -> Updater:
        self._tuf_dir.mkdir(parents=True, exist_ok=True)
        with _tuf_errors("metadata"):
            updater = Updater(
                metadata_dir=str(self._tuf_dir),
                metadata_base_url=METADATA_BASE_URL,
                target_dir=str(self.state_dir / "slots"),  # unused: targets stream via _receive
                target_base_url=TARGETS_BASE_URL,
                fetcher=self.fetcher,
                config=self.policy.tuf,
                bootstrap=self._provisioned_root(),
            )
        now = self.clock()
        if now.tzinfo is None:
            raise ConfigError("the device clock must return timezone-aware datetimes")
        # python-tuf reads the wall clock once, when its TrustedMetadataSet is made; every expiry
        # check uses this attribute. Setting it is how we pass our clock in (its own tests patch
        # datetime instead). Pinned by tests/unit/test_release_updater.py::test_clock_is_used.
        updater._trusted_set.reference_time = now.astimezone(UTC)
        return updater

    def check(self) -> int | None:
        """Refresh metadata and return the published release version (None if nothing published)."""
        updater = self._tuf_updater()
        with _tuf_errors("metadata"):
            target = updater.get_targetinfo(self.policy.prefix + MODEL_TARGET)
        return None if target is None else _release_version(target)

    def update(self, *, before_commit: Callable[[], None] | None = None) -> UpdateResult:
        """Fetch, verify and install the newest release; the running model is kept on any error.

        Raises a :class:`ReleaseError` subclass for TUF failures (rollback, freeze,
        mix-and-match, signatures, tampered or endless targets), :class:`AttestationInvalid`,
        :class:`ReleaseRefused` (failed audit, not audited, wrong parent), :class:`ModelFormatError` (pickle
        or malformed model), :class:`TooLarge`, :class:`InstallFailed` / :class:`StoreError`.
        """
        policy = self.policy
        updater = self._tuf_updater()
        with _tuf_errors("metadata"):
            infos = {
                name: updater.get_targetinfo(policy.prefix + name)
                for name in (
                    MODEL_TARGET,
                    ARCHITECTURE_TARGET,
                    ATTESTATION_TARGET,
                    REFERENCE_SET_TARGET,
                    INBOX_KEY_TARGET,
                )
            }
        model_info = infos[MODEL_TARGET]
        if model_info is None:
            raise ReleaseUnavailable(f"no release is published at {policy.prefix + MODEL_TARGET}")
        version = _release_version(model_info)
        model_sha256 = model_info.hashes.get("sha256")
        if model_sha256 is None:
            raise ReleaseError("the model target has no sha256 hash")
        for name, info in infos.items():
            if info is not None and _release_version(info) != version:
                raise ReleaseInconsistent(
                    f"{name} belongs to v{_release_version(info)}, the model to v{version}"
                )
        for name in (ARCHITECTURE_TARGET, ATTESTATION_TARGET):
            if infos[name] is None:
                raise ReleaseUnavailable(f"release v{version} has no {name}")

        installed = self.slots.active()
        if installed is not None:
            if version < installed.version:
                raise ReleaseRollback(
                    f"published release v{version} is older than installed v{installed.version}"
                )
            if version == installed.version:
                if model_sha256 == installed.model_sha256:
                    return UpdateResult("up_to_date", installed)
                raise ReleaseInconsistent(
                    f"release v{version} now names another model than the installed one"
                )

        limits = {
            MODEL_TARGET: policy.max_model_bytes,
            ATTESTATION_TARGET: policy.max_attestation_bytes,
        }
        for name, info in infos.items():
            cap = limits.get(name, policy.max_file_bytes)
            if info is not None and info.length > cap:
                raise TooLarge(f"release file {name}", info.length, cap)

        wanted = {n: i for n, i in infos.items() if i is not None}
        with self.slots.staging() as staged:
            # The small files first: a release whose attestation fails is refused before its
            # model is fetched.
            small = {
                name: self._receive(staged, name, wanted[name], updater, keep=True)
                for name in (ATTESTATION_TARGET, ARCHITECTURE_TARGET)
            }
            keys, threshold = self._attestation_keys()
            attestation = verify_attestation(
                small[ATTESTATION_TARGET],
                keys,
                model_sha256,
                threshold=threshold,
                expected_name=MODEL_TARGET,
                accept_forced=policy.accept_forced_audit,
                accept_unaudited=policy.accept_unaudited,
                max_bytes=policy.max_attestation_bytes,
            )
            predicate = attestation.predicate
            if predicate.release_version != version:
                raise AttestationInvalid(
                    f"attestation is for v{predicate.release_version}, the targets say v{version}"
                )
            self._check_parent(installed, predicate.parent_digest)
            try:
                architecture = json.loads(small[ARCHITECTURE_TARGET])
            except (ValueError, UnicodeDecodeError) as exc:
                raise ModelFormatError(f"architecture of v{version} is not JSON") from exc
            if not isinstance(architecture, dict):
                raise ModelFormatError(f"architecture of v{version} is not a JSON object")

            for name, info in wanted.items():
                if name not in small:
                    self._receive(staged, name, info, updater)
            staged.check_model(MODEL_TARGET, max_bytes=policy.max_model_bytes)

            release = InstalledRelease(
                version=version,
                model_sha256=model_sha256,
                role=policy.role,
                prefix=policy.prefix,
                slot=self.slots.inactive_slot(),
                files=tuple(sorted(wanted)),
                parent_sha256=predicate.parent_digest,
                audit_verdict=predicate.audit_verdict.value,
                audit_forced=predicate.audit_forced,
                installed_at=self.clock().astimezone(UTC).isoformat(),
            )
            staged.commit(release, before_commit=before_commit)
        return UpdateResult("installed", release, attestation)

    def _receive(
        self,
        staged: SlotStaging,
        name: str,
        info: TargetFile,
        updater: Updater,
        *,
        keep: bool = False,
    ) -> bytes:
        """Stream one target into the staging folder and check it against verified metadata.

        This is python-tuf's ``Updater.download_target`` without its two extra passes (a
        temporary file that ``verify_length_and_hashes`` reads again, then a copy): the same
        URL, the same length cap while streaming (``DownloadLengthMismatchError``), and the same
        length-and-every-hash check against ``info`` (``LengthOrHashMismatchError``), computed on
        the chunks as they are written. Returns the bytes with ``keep`` (small files), else b"".
        """
        path = info.path
        if (
            updater._trusted_set.root.consistent_snapshot
            and self.policy.tuf.prefix_targets_with_hash
        ):
            dirname, sep, basename = path.rpartition("/")
            path = f"{dirname}{sep}{next(iter(info.hashes.values()))}.{basename}"
        with _tuf_errors("target"):
            got = staged.receive(
                name,
                self.fetcher.fetch(TARGETS_BASE_URL + path),
                max_bytes=info.length,
                hash_algorithms=info.hashes,
                keep=keep,
            )
            if got.length != info.length:
                raise tuf_exc.LengthOrHashMismatchError(
                    f"Length mismatch, observed: {got.length}, expected: {info.length}"
                )
            for algo, expected in info.hashes.items():
                if not hmac.compare_digest(got.digests[algo], expected):
                    raise tuf_exc.LengthOrHashMismatchError(
                        f"Observed hash {got.digests[algo]} does not match expected hash {expected}"
                    )
        return got.data or b""

    def _attestation_keys(self) -> tuple[list[Key], int]:
        """Keys (and threshold) of the role that publishes our releases, from verified metadata.

        After ``refresh`` python-tuf has written the metadata it verified into its cache folder
        (``root.json`` links to the newest trusted root); we read the delegating role from there.
        """
        tuf = self.policy.tuf
        try:
            # Read capped like python-tuf caps what it downloads (Metadata.from_file would read
            # whatever is there, a FIFO included).
            delegator: Root | Targets
            if self.policy.role == Targets.type:
                data = read_regular_file(self._tuf_dir / "root.json", "cached root",
                                         tuf.root_max_length)
                delegator = Metadata[Root].from_bytes(data).signed
            else:
                data = read_regular_file(self._tuf_dir / "targets.json", "cached targets",
                                         tuf.targets_max_length)
                delegator = Metadata[Targets].from_bytes(data).signed
            role = delegator.get_delegated_role(self.policy.role)
            return [delegator.get_key(k) for k in role.keyids], role.threshold
        except (KeyFileError, TooLarge, ValueError, tuf_exc.RepositoryError) as exc:
            raise ReleaseError(
                f"cannot find the keys of role {self.policy.role!r} in verified metadata: {exc}"
            ) from exc

    def _check_parent(self, installed: InstalledRelease | None, parent: str | None) -> None:
        policy = self.policy
        if installed is None or not policy.require_parent_match:
            return
        if parent is not None and (
            parent == installed.model_sha256 or parent in policy.allowed_parents
        ):
            return
        shown = "none" if parent is None else f"{parent[:16]}..."
        raise ReleaseRefused(
            f"release parent {shown} is not the installed model v{installed.version}",
            reason="parent_mismatch",
        )


def _read_slot_file(path: Path, what: str, max_bytes: int) -> bytes:
    """An installed file (bounded, regular files only); :class:`ModelFormatError` if it cannot be
    read, :class:`TooLarge` over ``max_bytes`` (as ``load_checkpoint`` maps them)."""
    try:
        return read_regular_file(path, what, max_bytes)
    except KeyFileError as exc:
        raise ModelFormatError(exc.message) from exc

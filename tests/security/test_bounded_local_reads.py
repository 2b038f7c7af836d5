"""Release metadata, device release state, model files, packet bodies, the release's inbox key
and ``cloud.toml`` are read through the one bounded reader (issue 14, bounded readers).

Before, each of these readers did ``stat()``/``exists()``/``is_file()`` and then an unbounded
``read_bytes()``: a FIFO put in the file's place (by another local user, an operator mistake or a
swap between the check and the read) hung the process forever, and a file over its cap was read
whole before anything refused it. Each case runs the reader in a thread with a deadline (and the
module has a pytest timeout), so a regression fails instead of hanging the suite. No case links
a file to ``/dev/zero``: run against the old readers, that would eat the machine's memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import pytest
from diredi_secure.services.config import _MAX_CONFIG_BYTES, CONFIG_FILE, initial_toml, load_config
from diredi_secure.services.edge import adopt_inbox_key
from diredi_secure.services.workspace import DeviceWorkspace

from diredi_secure import _crypto
from diredi_secure.checkpoint import checkpoint_bytes
from diredi_secure.errors import ConfigError, KeyFileError, ModelFormatError, StoreError, TooLarge
from diredi_secure.keys import MAX_PUBLIC_FILE_BYTES
from diredi_secure.release import (
    AuditVerdict,
    DeviceUpdater,
    LocalFolderFetcher,
    ReleaseBundle,
    ReleasePredicate,
    ReleaseRepository,
    RepositoryConfig,
    UpdatePolicy,
)
from diredi_secure.release.repository import (
    ARCHITECTURE_TARGET,
    ATTESTATION_TARGET,
    INBOX_KEY_TARGET,
    MODEL_TARGET,
)
from diredi_secure.release.updater import _MAX_STATE_BYTES, InstalledRelease
from diredi_secure.store import SQLiteStore
from diredi_secure.store.base import DEFAULT_MAX_BODY_BYTES

from .test_bounded_reads import refused_with, within_deadline

pytestmark = pytest.mark.timeout(120)

T0 = datetime(2026, 3, 1, tzinfo=UTC)
R = TypeVar("R")


def returns(fn: Callable[[], R]) -> R:
    """``fn()``'s result, within the deadline; a test failure if it raised or hung."""
    result = within_deadline(fn)
    assert isinstance(result, tuple) and result[0] == "ok", f"refused: {result!r}"
    return cast(R, result[1])


def _fifo_in_place_of(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path, 0o600)


def _over(path: Path, cap: int) -> None:
    """``path`` becomes a sparse regular file one byte over ``cap`` (no disk or memory spent)."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(cap + 1)


# -- cloud.toml ----------------------------------------------------------------------------------
@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / CONFIG_FILE
    path.write_text(initial_toml(store_url="cloud.db", store_schema=None, hostnames=("localhost",)))
    return path


def test_a_valid_config_still_loads(config_file: Path) -> None:
    assert returns(lambda: load_config(config_file)).store.url == "cloud.db"


def test_a_config_fifo_is_refused_without_hanging(config_file: Path) -> None:
    _fifo_in_place_of(config_file)
    exc = refused_with(lambda: load_config(config_file), ConfigError)
    assert exc.reason == "file" and "not a regular file" in exc.message


def test_a_config_over_the_cap_is_refused_unread(config_file: Path) -> None:
    _over(config_file, _MAX_CONFIG_BYTES)
    exc = refused_with(lambda: load_config(config_file), ConfigError)
    assert "over the cap" in exc.message
    assert isinstance(exc.__cause__, TooLarge) and exc.__cause__.limit == _MAX_CONFIG_BYTES


# -- the cloud's release repository ----------------------------------------------------------------
def _bundle(version: int) -> ReleaseBundle:
    model = checkpoint_bytes({"w": np.full(3, float(version), np.float32)}, {})
    pred = ReleasePredicate.build(
        release_version=version, parent_digest=None, parent_version=None, packet_digests=[],
        epsilon=[], accountant="rdp", audit_report_digest="ad" * 32,
        audit_verdict=AuditVerdict.PASS, training_config_digest="00" * 32,
    )  # fmt: skip
    return ReleaseBundle(version, model, b'{"layers": [3]}', pred)


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    repo = ReleaseRepository.create(tmp_path / "repo", now=T0)
    repo.publish(_bundle(1), now=T0)
    return repo


def test_a_repository_metadata_fifo_is_a_store_error(repo: ReleaseRepository) -> None:
    _fifo_in_place_of(repo.metadata_dir / "1.root.json")
    exc = refused_with(repo.trusted_root_bytes, StoreError)
    assert "not a regular file" in exc.message
    _fifo_in_place_of(repo.metadata_dir / "targets.json")
    exc = refused_with(repo.targets, StoreError)
    assert "not a regular file" in exc.message


def test_repository_metadata_over_the_cap_is_a_store_error(repo: ReleaseRepository) -> None:
    """The cap is ``RepositoryConfig.max_metadata_bytes``; a root file over it is refused."""
    root = repo.trusted_root_bytes()
    capped = ReleaseRepository(repo.workspace, config=RepositoryConfig(max_metadata_bytes=len(root)))
    assert capped.trusted_root_bytes() == root  # exactly at the cap: read
    (repo.metadata_dir / "1.root.json").write_bytes(root + b" ")
    exc = refused_with(capped.trusted_root_bytes, StoreError)
    assert f"over the cap of {len(root)}" in exc.message
    assert isinstance(exc.__cause__, TooLarge)


# -- the device's release state ----------------------------------------------------------------
@pytest.fixture
def device(repo: ReleaseRepository, tmp_path: Path) -> DeviceUpdater:
    dev = DeviceUpdater(tmp_path / "device", LocalFolderFetcher(repo.workspace), clock=lambda: T0,
                        trusted_root=repo.trusted_root_bytes())  # fmt: skip
    dev.update()
    return dev


def test_an_installed_model_still_loads(device: DeviceUpdater) -> None:
    model = returns(device.current_model)
    assert np.all(model.tensors["w"] == 1.0) and model.architecture == {"layers": [3]}


def test_a_release_state_fifo_is_a_store_error(device: DeviceUpdater) -> None:
    _fifo_in_place_of(device.state_dir / "active.json")
    exc = refused_with(device.installed, StoreError)
    assert "not a regular file" in exc.message


def test_release_state_over_the_cap_is_a_store_error(device: DeviceUpdater) -> None:
    _over(device.state_dir / "active.json", _MAX_STATE_BYTES)
    exc = refused_with(device.installed, StoreError)
    assert f"over the cap of {_MAX_STATE_BYTES}" in exc.message


def test_a_trusted_root_fifo_is_a_store_error(device: DeviceUpdater) -> None:
    _fifo_in_place_of(device.state_dir / "trusted_root.json")
    exc = refused_with(
        lambda: DeviceUpdater(device.state_dir, device.fetcher, clock=lambda: T0), StoreError)
    assert "not a regular file" in exc.message


def test_a_trusted_root_over_python_tufs_cap_is_a_store_error(device: DeviceUpdater) -> None:
    cap = UpdatePolicy().tuf.root_max_length
    _over(device.state_dir / "trusted_root.json", cap)
    exc = refused_with(
        lambda: DeviceUpdater(device.state_dir, device.fetcher, clock=lambda: T0), StoreError)
    assert f"over the cap of {cap}" in exc.message


@pytest.mark.parametrize("name", ["architecture.json", "model.safetensors"])
def test_an_installed_file_fifo_is_a_model_format_error(device: DeviceUpdater, name: str) -> None:
    release = device.installed()
    assert release is not None
    _fifo_in_place_of(device.slots.slot_dir(release.slot) / name)
    exc = refused_with(device.current_model, ModelFormatError)
    assert "not a regular file" in exc.message


def test_an_installed_architecture_over_the_cap_is_too_large(device: DeviceUpdater) -> None:
    release = device.installed()
    assert release is not None
    capped = DeviceUpdater(device.state_dir, device.fetcher, clock=lambda: T0,
                           policy=UpdatePolicy(max_file_bytes=1024))  # fmt: skip
    (device.slots.slot_dir(release.slot) / "architecture.json").write_bytes(b" " * 1025)
    exc = refused_with(capped.current_model, TooLarge)
    assert isinstance(exc, TooLarge) and exc.limit == 1024


# -- ml.models.load_model --------------------------------------------------------------------------
def test_a_model_fifo_is_a_model_format_error(tmp_path: Path) -> None:
    from diredi_secure.ml.models import load_model

    path = tmp_path / "model.safetensors"
    os.mkfifo(path, 0o600)
    exc = refused_with(lambda: load_model(path), ModelFormatError)
    assert "not a regular file" in exc.message


def test_a_model_over_the_cap_is_too_large_before_parsing(tmp_path: Path) -> None:
    from diredi_secure.ml.models import ModelSpec, build_model, load_model, save_model

    path = tmp_path / "model.safetensors"
    spec = ModelSpec(architecture="mlp_student", hidden=4)
    save_model(path, build_model(spec), spec)
    size = path.stat().st_size
    assert returns(lambda: load_model(path, max_bytes=size))[1] == spec  # at the cap: loads
    exc = refused_with(lambda: load_model(path, max_bytes=size - 1), TooLarge)
    assert isinstance(exc, TooLarge) and exc.limit == size - 1


# -- packet bodies in the store ------------------------------------------------------------------
@pytest.fixture
def body_store(tmp_path: Path) -> Path:
    from ..integration.test_store_backends import CERT, KEY_ID, record
    from ..integration.test_store_backends import T0 as ENROLLED_MS

    with SQLiteStore(tmp_path / "b.db", default_epsilon_budget=1e9) as s:
        s.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=ENROLLED_MS)
        s.store_packet(record(1, body=os.urandom(100 * 1024)))  # above the file threshold
    return tmp_path / "b.db"


def _body_file(db: Path) -> Path:
    (body,) = [p for p in Path(f"{db}.bodies").rglob("*") if p.is_file()]
    return body


def test_a_stored_body_still_reads_back(body_store: Path) -> None:
    body = _body_file(body_store)
    with SQLiteStore(body_store) as s:
        (packet,) = s.list_packets()
    assert hashlib.sha256(packet.packet_bytes).hexdigest() == hashlib.sha256(body.read_bytes()).hexdigest()


def test_a_body_fifo_is_a_store_error(body_store: Path) -> None:
    _fifo_in_place_of(_body_file(body_store))
    with SQLiteStore(body_store) as s:
        exc = refused_with(s.list_packets, StoreError)
    assert "not a regular file" in exc.message


def test_a_body_over_the_cap_is_refused_unread(body_store: Path) -> None:
    _over(_body_file(body_store), DEFAULT_MAX_BODY_BYTES)
    with SQLiteStore(body_store) as s:
        exc = refused_with(s.list_packets, StoreError)
    assert f"over the cap of {DEFAULT_MAX_BODY_BYTES}" in exc.message


def test_a_body_the_store_could_not_read_back_is_refused_before_it_is_stored(tmp_path: Path) -> None:
    """A body over ``max_body_bytes`` (an operator raised the packet cap, not the store's) is a
    StoreError at store time, nothing written: never a receipt for a packet that cannot be read."""
    from ..integration.test_store_backends import CERT, KEY_ID, record
    from ..integration.test_store_backends import T0 as ENROLLED_MS

    with SQLiteStore(tmp_path / "c.db", default_epsilon_budget=1e9, body_file_bytes=1024,
                     max_body_bytes=64 * 1024) as s:
        s.register_device("dev1", CERT, KEY_ID, enrolled_at_ms=ENROLLED_MS)
        s.store_packet(record(1, body=os.urandom(60 * 1024)))  # a file, under the cap: fine
        exc = refused_with(lambda: s.store_packet(record(2, body=os.urandom(65 * 1024))), StoreError)
        assert "max_body_bytes" in exc.message
        assert len(s.list_packets()) == 1
    assert len([p for p in Path(f"{tmp_path / 'c.db'}.bodies").rglob("*") if p.is_file()]) == 1


# -- the inbox key a release installs ----------------------------------------------------------
def _installed(tmp_path: Path, *, with_inbox: bool = True) -> tuple[DeviceWorkspace, Path, InstalledRelease]:
    ws = DeviceWorkspace(tmp_path / "dev")
    slot = ws.release_dir / "slots" / "a"
    slot.mkdir(parents=True)
    files = (ARCHITECTURE_TARGET, ATTESTATION_TARGET, MODEL_TARGET)
    release = InstalledRelease(
        version=1, model_sha256="00" * 32, role="targets", prefix="", slot="a",
        files=tuple(sorted(files + ((INBOX_KEY_TARGET,) if with_inbox else ()))), parent_sha256=None,
        audit_verdict="pass", audit_forced=False, installed_at=T0.isoformat(),
    )  # fmt: skip
    return ws, slot / INBOX_KEY_TARGET, release


def test_a_release_inbox_key_is_adopted(tmp_path: Path) -> None:
    ws, inbox, release = _installed(tmp_path)
    pem = _crypto.generate_inbox_key().public_key.pem
    inbox.write_bytes(pem)
    assert returns(lambda: adopt_inbox_key(ws, release)) is True
    assert ws.inbox_public_key().key_id == _crypto.load_inbox_public_key(pem).key_id
    ws2, _, without = _installed(tmp_path / "other", with_inbox=False)
    assert adopt_inbox_key(ws2, without) is False


def test_a_release_inbox_key_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    """Before, ``is_file()`` then ``read_bytes()``: a FIFO was silently skipped (the old key kept)
    and one swapped in between the two hung the device."""
    ws, inbox, release = _installed(tmp_path)
    os.mkfifo(inbox, 0o644)
    exc = refused_with(lambda: adopt_inbox_key(ws, release), KeyFileError)
    assert exc.reason == "not_regular_file"
    assert not (ws.root / "inbox.pub").exists()


def test_a_release_inbox_key_over_the_cap_is_too_large(tmp_path: Path) -> None:
    ws, inbox, release = _installed(tmp_path)
    _over(inbox, MAX_PUBLIC_FILE_BYTES)
    exc = refused_with(lambda: adopt_inbox_key(ws, release), TooLarge)
    assert isinstance(exc, TooLarge) and exc.limit == MAX_PUBLIC_FILE_BYTES

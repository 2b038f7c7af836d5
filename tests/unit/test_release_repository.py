"""ReleaseRepository: metadata layout, expiries from the clock, keys, delegations, root rotation."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from tuf.api.metadata import Metadata, Root, Snapshot

from diredi_secure import _crypto
from diredi_secure.checkpoint import checkpoint_bytes
from diredi_secure.errors import ConfigError, KeyFileError, ModelFormatError
from diredi_secure.release import (
    AuditVerdict,
    ExpiryPolicy,
    ReleaseBundle,
    ReleasePredicate,
    ReleaseRepository,
    RepositoryConfig,
    RoleKeys,
)
from diredi_secure.release.repository import key_id

T0 = datetime(2026, 3, 1, tzinfo=UTC)
MODEL = checkpoint_bytes({"w": np.zeros(2, np.float32)}, {})


def bundle(version: int, model: bytes = MODEL) -> ReleaseBundle:
    pred = ReleasePredicate.build(
        release_version=version, parent_digest=None, parent_version=None, packet_digests=[],
        epsilon=[], accountant="rdp", audit_report_digest="ad" * 32,
        audit_verdict=AuditVerdict.PASS, training_config_digest="00" * 32,
    )  # fmt: skip
    return ReleaseBundle(version, model, b"{}", pred, reference_set=b"ref", inbox_public_key=b"pk")


def test_create_writes_version_one_of_every_role_with_configured_expiries(tmp_path: Path) -> None:
    expiry = ExpiryPolicy(timestamp=timedelta(hours=6))
    repo = ReleaseRepository.create(tmp_path, now=T0, config=RepositoryConfig(expiry=expiry))
    root = Metadata[Root].from_bytes(repo.trusted_root_bytes(1)).signed
    assert root.consistent_snapshot
    assert root.expires == T0 + timedelta(days=365)
    ts = Metadata.from_file(str(repo.metadata_dir / "timestamp.json")).signed
    assert ts.expires == T0 + timedelta(hours=6)
    snap = Metadata.from_file(str(repo.metadata_dir / "1.snapshot.json")).signed
    assert snap.expires == T0 + timedelta(days=7)
    assert repo.targets().signed.expires == T0 + timedelta(days=90)
    with pytest.raises(ConfigError, match="already"):
        ReleaseRepository.create(tmp_path, now=T0)


def test_naive_clock_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="timezone"):
        ReleaseRepository.create(tmp_path, now=datetime(2026, 1, 1))


def test_root_threshold_and_key_ids_are_spki_hashes(tmp_path: Path) -> None:
    repo = ReleaseRepository.create(tmp_path, now=T0, config=RepositoryConfig(root=RoleKeys(3, 2)))
    root = repo.root().signed
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 3
    assert len(repo.root().signatures) == 3
    for keyid in root.roles["root"].keyids:
        raw = bytes.fromhex(root.keys[keyid].keyval["public"])
        assert keyid == key_id(raw) == _crypto.VerifyKey.from_raw(raw).key_id.hex()
    with pytest.raises(ConfigError):
        RoleKeys(keys=1, threshold=2)


def test_publish_pins_every_file_by_length_and_hash(tmp_path: Path) -> None:
    repo = ReleaseRepository.create(tmp_path, now=T0)
    published = repo.publish(bundle(1), now=T0)
    targets = repo.targets().signed.targets
    assert set(targets) == set(published.targets) == {
        "model.safetensors", "architecture.json", "model.attestation.json",
        "reference_set.safetensors", "inbox_public_key.pem",
    }  # fmt: skip
    for path, target in targets.items():
        data = (repo.targets_dir / f"{target.hashes['sha256']}.{path}").read_bytes()
        assert target.length == len(data)
        assert target.hashes["sha256"] == hashlib.sha256(data).hexdigest()
        assert target.custom == {"diredi": {"release": 1}}
    assert repo.current_release() == 1


def test_publish_refuses_same_version_and_pickle(tmp_path: Path) -> None:
    repo = ReleaseRepository.create(tmp_path, now=T0)
    repo.publish(bundle(1), now=T0)
    with pytest.raises(ConfigError, match="supersede"):
        repo.publish(bundle(1), now=T0)
    with pytest.raises(ModelFormatError):
        repo.publish(bundle(2, model=b"\x80\x04K\x01."), now=T0)


def test_a_new_release_drops_optional_files_of_the_old_one(tmp_path: Path) -> None:
    repo = ReleaseRepository.create(tmp_path, now=T0)
    repo.publish(bundle(1), now=T0)
    b2 = bundle(2)
    repo.publish(ReleaseBundle(2, b2.model, b2.architecture, b2.predicate), now=T0)
    assert "reference_set.safetensors" not in repo.targets().signed.targets


def test_delegated_role_only_signs_its_paths(tmp_path: Path) -> None:
    repo = ReleaseRepository.create(tmp_path, now=T0)
    repo.add_delegation("fleet-eu", paths=["fleets/eu/*"], now=T0)
    repo.publish(bundle(1), now=T0, role="fleet-eu", prefix="fleets/eu/")
    assert repo.current_release("fleets/eu/", "fleet-eu") == 1
    with pytest.raises(ConfigError, match="not delegated"):
        repo.publish(bundle(1), now=T0, role="fleet-eu", prefix="fleets/us/")
    with pytest.raises(ConfigError):
        repo.add_delegation("fleet-eu", paths=["x/*"], now=T0)
    with pytest.raises(ConfigError):
        repo.add_delegation("Bad.Name", paths=["x/*"], now=T0)
    snapshot = Metadata[Snapshot].from_file(str(repo.metadata_dir / "snapshot.json")).signed
    assert "fleet-eu.json" in snapshot.meta


def test_rotate_root_is_signed_by_old_and_new_thresholds(tmp_path: Path) -> None:
    repo = ReleaseRepository.create(tmp_path, now=T0)
    old = repo.root()
    assert repo.rotate_root(now=T0, keys=2, threshold=2) == 2
    new = repo.root()
    old.signed.verify_delegate("root", new.signed_bytes, new.signatures)
    new.signed.verify_delegate("root", new.signed_bytes, new.signatures)
    assert not set(old.signed.roles["root"].keyids) & set(new.signed.roles["root"].keyids)


def test_missing_key_file_is_a_key_file_error(tmp_path: Path) -> None:
    repo = ReleaseRepository.create(tmp_path, now=T0)
    for pem in (tmp_path / "keys").glob("*.pem"):
        pem.unlink()
    with pytest.raises(KeyFileError):
        repo.publish(bundle(1), now=T0)


def test_passphrase_encrypts_keys_at_rest(tmp_path: Path) -> None:
    repo = ReleaseRepository.create(tmp_path, now=T0, passphrase=b"correct horse")
    pems = list((tmp_path / "keys").glob("*.pem"))
    assert pems and all(b"ENCRYPTED" in p.read_bytes() for p in pems)
    with pytest.raises(KeyFileError):
        ReleaseRepository(tmp_path, passphrase=b"wrong").publish(bundle(1), now=T0)
    ReleaseRepository(tmp_path, passphrase=b"correct horse").publish(bundle(1), now=T0)
    assert repo.current_release() == 1


def test_bad_target_paths_are_refused(tmp_path: Path) -> None:
    repo = ReleaseRepository.create(tmp_path, now=T0)
    for path in ["../x", "/abs", "a//b", "sp ace"]:
        with pytest.raises(ConfigError):
            repo.add_targets({path: b"x"}, now=T0)
    with pytest.raises(ConfigError):
        repo.publish(bundle(1), now=T0, prefix="no-slash")

"""One named test per attack on secure releases (DESIGN.md section 4, issue 4).

The repository simulator is a real :class:`ReleaseRepository` in a temporary folder, served to a
real :class:`DeviceUpdater` by :class:`AttackFetcher`, a local-folder fetcher through which the
attacker can replace the bytes of any metadata or target file (as python-tuf's own
``RepositorySimulator`` does). Each attack must be refused with a typed error naming it, and the
device must keep running the model it had.
"""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Timestamp

from diredi_secure.errors import (
    AttestationInvalid,
    ConfigError,
    ModelFormatError,
    ReleaseRefused,
)
from diredi_secure.release import (
    AuditVerdict,
    DeviceUpdater,
    LocalFolderFetcher,
    MetadataRequest,
    ReleaseBundle,
    ReleaseExpired,
    ReleaseInconsistent,
    ReleaseRepository,
    ReleaseRollback,
    ReleaseSignatureInvalid,
    RepositoryConfig,
    RoleKeys,
    TargetMismatch,
    TargetTooLong,
    sign_attestation,
)
from diredi_secure.release.repository import ATTESTATION_TARGET, MODEL_TARGET

from .release_fixtures import attacker_root, model_bytes, predicate

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
Payload = bytes | Callable[[], Iterator[bytes]]


class AttackFetcher(LocalFolderFetcher):
    """Serves the workspace, except files the attacker replaced (by metadata name / target path)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.metadata: dict[str, Payload] = {}
        self.targets: dict[str, Payload] = {}

    def _fetch_metadata(self, request: MetadataRequest) -> Iterator[bytes]:
        return self._serve(self.metadata.get(request.filename)) or super()._fetch_metadata(request)

    def _fetch_target(self, path: str) -> Iterator[bytes]:
        return self._serve(self.targets.get(path)) or super()._fetch_target(path)

    @staticmethod
    def _serve(payload: Payload | None) -> Iterator[bytes] | None:
        if payload is None:
            return None
        return iter([payload]) if isinstance(payload, bytes) else payload()


@dataclass
class World:
    """A repository, an attacker-controlled transport, a device and a settable clock."""

    repo: ReleaseRepository
    fetcher: AttackFetcher
    state: Path
    now: datetime = T0
    models: dict[int, bytes] = field(default_factory=dict)

    def device(self) -> DeviceUpdater:
        return DeviceUpdater(
            self.state,
            self.fetcher,
            clock=lambda: self.now,
            trusted_root=self.repo.trusted_root_bytes(1),
        )

    def publish(self, version: int, **kw: object) -> None:
        model = model_bytes(version)
        self.models[version] = model
        parent = self.models.get(version - 1)
        self.repo.publish(
            ReleaseBundle(version, model, b'{"arch": "mlp"}', predicate(version, parent), **kw),  # type: ignore[arg-type]
            now=self.now,
        )

    def publish_raw(self, version: int, model: bytes, attestation: bytes) -> None:
        """A compromised or buggy publisher: real keys, no publisher-side checks."""
        self.repo.add_targets(
            {MODEL_TARGET: model, "architecture.json": b"{}", ATTESTATION_TARGET: attestation},
            now=self.now,
            custom={"diredi": {"release": version}},
            remove_prefix="",
        )
        self.repo.snapshot_and_timestamp(now=self.now)

    def assert_running(self, version: int) -> None:
        loaded = self.device().current_model()
        assert loaded.release.version == version
        assert np.all(loaded.tensors["w"] == float(version))


def make_world(tmp_path: Path, config: RepositoryConfig | None = None) -> World:
    repo = ReleaseRepository.create(tmp_path / "repo", now=T0, config=config)
    world = World(repo, AttackFetcher(repo.workspace), tmp_path / "device")
    world.publish(1)
    assert world.device().update().status == "installed"
    return world


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def metadata_file(world: World, name: str) -> bytes:
    return (world.repo.metadata_dir / name).read_bytes()


# ------------------------------------------------------------------------------------------------
def test_baseline_v1_then_v2_installs(world: World) -> None:
    world.publish(2)
    result = world.device().update()
    assert result.status == "installed" and result.release.version == 2
    world.assert_running(2)
    previous = world.device().previous_model()
    assert previous is not None and previous.release.version == 1


def test_rollback_to_older_timestamp_is_refused(world: World) -> None:
    old_timestamp = metadata_file(world, "timestamp.json")
    world.publish(2)
    world.device().update()
    world.fetcher.metadata["timestamp.json"] = old_timestamp
    with pytest.raises(ReleaseRollback, match="timestamp version"):
        world.device().update()
    world.assert_running(2)


def test_rollback_to_older_model_release_is_refused(world: World) -> None:
    world.publish(2)
    world.device().update()
    # The publisher (compromised or confused) re-signs the v1 model as the current release.
    model_v1 = world.models[1]
    attestation = sign_attestation(
        MODEL_TARGET, model_v1, predicate(1, None), world.repo.signers("targets")
    )
    world.publish_raw(1, model_v1, attestation)
    with pytest.raises(ReleaseRollback, match="older than installed v2"):
        world.device().update()
    world.assert_running(2)


def test_freeze_expired_timestamp_is_refused(world: World) -> None:
    world.publish(2)  # a release the frozen device would want
    world.now = T0 + timedelta(days=1, seconds=1)  # the timestamp lives 1 day
    with pytest.raises(ReleaseExpired, match="timestamp"):
        world.device().update()
    world.assert_running(1)


def test_freeze_replayed_old_timestamp_is_refused_once_expired(world: World) -> None:
    frozen = metadata_file(world, "timestamp.json")
    world.now = T0 + timedelta(days=2)
    world.repo.refresh_timestamp(now=world.now)
    world.fetcher.metadata["timestamp.json"] = frozen  # the attacker withholds the fresh one
    with pytest.raises(ReleaseExpired):
        world.device().update()
    world.assert_running(1)


def test_mix_and_match_snapshot_from_another_release_is_refused(world: World) -> None:
    snapshot_v1 = metadata_file(world, "snapshot.json")
    world.publish(2)
    timestamp = Metadata[Timestamp].from_bytes(metadata_file(world, "timestamp.json")).signed
    current = timestamp.snapshot_meta
    world.fetcher.metadata[f"{current.version}.snapshot.json"] = snapshot_v1
    with pytest.raises(ReleaseInconsistent):
        world.device().update()
    world.assert_running(1)


def test_mix_and_match_targets_from_another_release_is_refused(world: World) -> None:
    targets_v1 = metadata_file(world, "targets.json")
    world.publish(2)
    version = Metadata.from_bytes(metadata_file(world, "targets.json")).signed.version
    world.fetcher.metadata[f"{version}.targets.json"] = targets_v1
    with pytest.raises(ReleaseInconsistent):
        world.device().update()
    world.assert_running(1)


def _model_url(world: World) -> str:
    target = world.repo.targets().signed.targets[MODEL_TARGET]
    return f"{target.hashes['sha256']}.{MODEL_TARGET}"


def test_tampered_model_bytes_are_refused(world: World) -> None:
    world.publish(2)
    genuine = world.models[2]
    tampered = genuine[:-1] + bytes([genuine[-1] ^ 1])
    world.fetcher.targets[_model_url(world)] = tampered
    with pytest.raises(TargetMismatch):
        world.device().update()
    world.assert_running(1)


def test_endless_target_stops_at_declared_length(world: World) -> None:
    world.publish(2)
    served: list[int] = []

    def endless() -> Iterator[bytes]:
        for chunk in itertools.repeat(b"\0" * 4096):
            served.append(len(chunk))
            yield chunk

    world.fetcher.targets[_model_url(world)] = endless
    with pytest.raises(TargetTooLong):
        world.device().update()
    assert sum(served) <= len(world.models[2]) + 4096  # stopped right after the declared length
    world.assert_running(1)


def test_target_longer_than_declared_on_disk_is_refused(world: World) -> None:
    world.publish(2)
    world.fetcher.targets[_model_url(world)] = world.models[2] + b"trailing"
    with pytest.raises(TargetTooLong):
        world.device().update()
    world.assert_running(1)


def test_timestamp_below_signature_threshold_is_refused(tmp_path: Path) -> None:
    world = make_world(tmp_path, RepositoryConfig(timestamp=RoleKeys(keys=2, threshold=2)))
    world.publish(2)
    md = Metadata.from_bytes(metadata_file(world, "timestamp.json"))
    md.signatures.pop(next(iter(md.signatures)))  # one of the two required signatures
    world.fetcher.metadata["timestamp.json"] = md.to_bytes()
    with pytest.raises(ReleaseSignatureInvalid, match="threshold"):
        world.device().update()
    world.assert_running(1)


def _attacker_root(world: World, version: int) -> bytes:
    return attacker_root(metadata_file(world, f"{version - 1}.root.json"), version)


def test_bad_root_rotation_next_to_a_good_one_is_refused(world: World) -> None:
    assert world.repo.rotate_root(now=world.now, keys=2, threshold=2) == 2  # good rotation
    world.publish(2)
    world.fetcher.metadata["3.root.json"] = _attacker_root(world, 3)  # bad rotation after it
    with pytest.raises(ReleaseSignatureInvalid, match="root"):
        world.device().update()
    world.assert_running(1)
    # Without the forged root the device follows the good rotation and installs v2.
    del world.fetcher.metadata["3.root.json"]
    assert world.device().update().release.version == 2
    assert (world.state / "tuf" / "root_history" / "2.root.json").is_file()


def test_root_rotation_without_old_signatures_is_refused(world: World) -> None:
    world.fetcher.metadata["2.root.json"] = _attacker_root(world, 2)
    with pytest.raises(ReleaseSignatureInvalid):
        world.device().update()
    world.assert_running(1)


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp"])
def test_online_key_rotation_moves_devices_to_the_new_keys(world: World, role: str) -> None:
    old = world.repo.signers(role)
    assert world.repo.rotate_online(role, now=world.now, keys=2, threshold=2) == 2
    assert not {s.public_key.keyid for s in old} & set(world.repo.root().signed.roles[role].keyids)
    world.publish(2)
    assert world.device().update().release.version == 2
    assert (world.state / "tuf" / "root_history" / "2.root.json").is_file()


def test_timestamp_signed_by_a_rotated_out_key_is_refused(world: World) -> None:
    (old,) = world.repo.signers("timestamp")  # say it leaked
    world.repo.rotate_online("timestamp", now=world.now)
    assert world.device().update().status == "up_to_date"  # and now trusts the new key
    world.publish(2)
    forged = Metadata.from_bytes(metadata_file(world, "timestamp.json"))
    forged.signed.version += 1
    forged.signatures.clear()
    forged.sign(old)
    world.fetcher.metadata["timestamp.json"] = forged.to_bytes()
    with pytest.raises(ReleaseSignatureInvalid, match="threshold"):
        world.device().update()
    world.assert_running(1)
    del world.fetcher.metadata["timestamp.json"]
    assert world.device().update().release.version == 2


def test_online_key_rotation_refuses_the_root_role(world: World) -> None:
    with pytest.raises(ConfigError, match="online roles"):
        world.repo.rotate_online("root", now=world.now)


def test_attestation_with_wrong_subject_digest_is_refused(world: World) -> None:
    model = model_bytes(2)
    other = model_bytes(99)
    attestation = sign_attestation(
        MODEL_TARGET, other, predicate(2, world.models[1]), world.repo.signers("targets")
    )
    world.publish_raw(2, model, attestation)
    with pytest.raises(AttestationInvalid, match="subject digest"):
        world.device().update()
    world.assert_running(1)


def test_attestation_with_failed_audit_is_refused(world: World) -> None:
    model = model_bytes(2)
    attestation = sign_attestation(
        MODEL_TARGET,
        model,
        predicate(2, world.models[1], AuditVerdict.FAIL),
        world.repo.signers("targets"),
    )
    world.publish_raw(2, model, attestation)
    with pytest.raises(ReleaseRefused, match="failed its audit") as info:
        world.device().update()
    assert info.value.reason == "audit_failed"
    world.assert_running(1)


def test_publisher_refuses_failed_audit_unless_forced(world: World) -> None:
    model = model_bytes(2)
    with pytest.raises(ReleaseRefused):
        world.repo.publish(
            ReleaseBundle(2, model, b"{}", predicate(2, world.models[1], AuditVerdict.FAIL)),
            now=world.now,
        )
    forced = predicate(2, world.models[1], AuditVerdict.FAIL, audit_forced=True)
    world.repo.publish(ReleaseBundle(2, model, b"{}", forced), now=world.now)
    result = world.device().update()
    assert result.release.audit_forced and result.release.audit_verdict == "fail"


def test_attestation_by_unknown_key_is_refused(world: World) -> None:
    model = model_bytes(2)
    stranger = CryptoSigner.generate_ed25519()
    attestation = sign_attestation(MODEL_TARGET, model, predicate(2, world.models[1]), [stranger])
    world.publish_raw(2, model, attestation)
    with pytest.raises(AttestationInvalid, match="trusted key"):
        world.device().update()
    world.assert_running(1)


def test_attestation_by_a_delegated_fleet_key_does_not_sign_fleet_wide(world: World) -> None:
    world.repo.add_delegation("fleet-eu", paths=["fleets/eu/*"], now=world.now)
    model = model_bytes(2)
    attestation = sign_attestation(
        MODEL_TARGET, model, predicate(2, world.models[1]), world.repo.signers("fleet-eu")
    )
    world.publish_raw(2, model, attestation)
    with pytest.raises(AttestationInvalid):
        world.device().update()
    world.assert_running(1)


def test_pickle_model_file_is_refused(world: World) -> None:
    evil = pickle.dumps({"w": [1.0, 2.0]}, protocol=4)
    attestation = sign_attestation(
        MODEL_TARGET, evil, predicate(2, world.models[1]), world.repo.signers("targets")
    )
    world.publish_raw(2, evil, attestation)
    with pytest.raises(ModelFormatError, match="pickle"):
        world.device().update()
    world.assert_running(1)


def test_release_with_a_foreign_parent_is_refused(world: World) -> None:
    model = model_bytes(2)
    foreign = predicate(2, b"some other model")
    attestation = sign_attestation(MODEL_TARGET, model, foreign, world.repo.signers("targets"))
    world.publish_raw(2, model, attestation)
    with pytest.raises(ReleaseRefused) as info:
        world.device().update()
    assert info.value.reason == "parent_mismatch"
    world.assert_running(1)


def test_crash_between_write_and_rename_keeps_the_old_model(world: World) -> None:
    world.publish(2)

    def crash() -> None:
        raise KeyboardInterrupt("power lost")  # not an Exception: nothing may swallow it

    with pytest.raises(KeyboardInterrupt):
        world.device().update(before_commit=crash)
    world.assert_running(1)  # a fresh DeviceUpdater, as after a reboot
    assert world.device().update().release.version == 2
    world.assert_running(2)

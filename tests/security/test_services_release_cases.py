"""Every bad-input case of the secure-release issue again, through gRPC (issue 5).

tests/security/test_release_attacks.py stages each attack in a local-folder fetcher. Here the
attacker is the server side instead: a real cloud (mTLS, SQLite) on an ephemeral loopback port
serves its release repository folder through ``UpdateService``, and each case tampers with or
replaces files in that folder (or publishes a bad release with the cloud's real keys, as a
compromised publisher would). The device updates through :class:`GrpcReleaseFetcher`, exactly as
``diredi edge update`` does. Each case asserts

* the typed error the local-fetcher test expects (the same classes, the same reasons),
* that the device still runs the model it had (record and tensors, from a fresh updater),
* that the cloud's store did not change (devices, packets, replay state, ledger, releases), and
* that serving was read-only (every file of the repository folder is as before the update).

The UpdateService's own caps (target above the requested length, oversize metadata, unknown
role or target, paths that escape the folder) are checked with direct calls and their status codes.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from diredi_secure.services.cloud import ReleaseFolder
from diredi_secure.services.edge import EdgeAgent
from diredi_secure.services.fetcher import GrpcReleaseFetcher
from diredi_secure.services.transport import TransportConfig
from diredi_secure.services.workspace import CloudWorkspace
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Timestamp

from diredi_secure._proto.diredi.v1 import services_pb2 as spb
from diredi_secure._proto.diredi.v1 import services_pb2_grpc as sgrpc
from diredi_secure.checkpoint import checkpoint_bytes
from diredi_secure.errors import (
    AttestationInvalid,
    ModelFormatError,
    ReleaseRefused,
)
from diredi_secure.release import (
    AuditVerdict,
    DeviceUpdater,
    ReleaseBundle,
    ReleaseExpired,
    ReleaseInconsistent,
    ReleaseRepository,
    ReleaseRollback,
    ReleaseSignatureInvalid,
    ReleaseUnavailable,
    RepositoryConfig,
    RoleKeys,
    TargetMismatch,
    TargetTooLong,
    UpdateResult,
    sign_attestation,
)
from diredi_secure.release.repository import ATTESTATION_TARGET, MODEL_TARGET
from diredi_secure.store import Store
from tests.integration.services_harness import Cloud, running_cloud
from tests.security.release_fixtures import attacker_root, model_bytes, predicate

C = grpc.StatusCode
DEVICE = "device-a"
# Two timestamp keys, both required: the below-threshold case needs them; the rest do not mind.
REPO_CONFIG = RepositoryConfig(timestamp=RoleKeys(keys=2, threshold=2))


# ------------------------------------------------------------------------------------------------
# The scene: a cloud serving its repository, one enrolled device running v1
# ------------------------------------------------------------------------------------------------
def store_state(store: Store) -> tuple[object, ...]:
    return (
        tuple(store.list_packets(unmerged_only=False)),
        tuple(store.list_devices()),
        store.highest_counter(DEVICE),
        store.epsilon_spent(DEVICE),
        store.latest_release(),
    )


def folder_state(folder: Path) -> dict[str, str]:
    """Every file under ``folder``: link target, or size, mtime and SHA-256 (below 16 MiB).

    What serving may not touch: the UpdateService is read-only.
    """
    state: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            state[name] = "-> " + os.readlink(path)
        elif path.is_file():
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.st_size < 1 << 24 else ""
            state[name] = f"{stat.st_size} {stat.st_mtime_ns} {digest}"
    return state


@dataclass
class Scene:
    cloud: Cloud
    repo: ReleaseRepository
    agent: EdgeAgent
    now: datetime
    models: dict[int, bytes] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return Path(self.cloud.workspace.repository_dir)

    def updater(self) -> DeviceUpdater:
        """A fresh updater (as after a reboot) fetching over the agent's mTLS channel."""
        updater: DeviceUpdater = self.agent.updater(clock=lambda: self.now)
        return updater

    def update(self, **kw: Any) -> UpdateResult:
        result: UpdateResult = self.updater().update(**kw)
        return result

    def publish(self, version: int) -> None:
        model = model_bytes(version)
        self.models[version] = model
        bundle = ReleaseBundle(
            version, model, b'{"arch": "mlp"}', predicate(version, self.models.get(version - 1))
        )
        self.repo.publish(bundle, now=self.now)

    def publish_raw(self, version: int, model: bytes, attestation: bytes) -> None:
        """A compromised or buggy publisher: the cloud's real keys, no publisher-side checks."""
        self.repo.add_targets(
            {MODEL_TARGET: model, "architecture.json": b"{}", ATTESTATION_TARGET: attestation},
            now=self.now,
            custom={"diredi": {"release": version}},
            remove_prefix="",
        )
        self.repo.snapshot_and_timestamp(now=self.now)

    def served(self, name: str) -> Path:
        """A file of the served folder (``metadata/...`` or ``targets/...``)."""
        return self.folder / name

    def model_path(self) -> Path:
        target = self.repo.targets().signed.targets[MODEL_TARGET]
        return self.served(f"targets/{target.hashes['sha256']}.{MODEL_TARGET}")

    def assert_running(self, version: int) -> None:
        loaded = self.updater().current_model()
        assert loaded.release.version == version
        assert loaded.release.model_sha256 == hashlib.sha256(self.models[version]).hexdigest()
        assert np.all(loaded.tensors["w"] == float(version))

    def refused(
        self, error: type[BaseException], match: str | None = None, **update_kw: Any
    ) -> pytest.ExceptionInfo[BaseException]:
        """Run the device's update through gRPC; it must raise ``error`` and change nothing."""
        installed = self.updater().installed()
        store_before = store_state(self.cloud.store)
        folder_before = folder_state(self.folder)
        with pytest.raises(error, match=match) as info:
            self.update(**update_kw)
        assert self.updater().installed() == installed, "the device's installed release changed"
        assert store_state(self.cloud.store) == store_before, "the cloud's store changed"
        assert folder_state(self.folder) == folder_before, "serving wrote to the repository"
        return info

    def stub(self) -> Any:
        return sgrpc.UpdateServiceStub(self.agent.channel)


@contextmanager
def make_scene(root: Path, config: TransportConfig | None = None) -> Iterator[Scene]:
    now = datetime.now(UTC).replace(microsecond=0)
    workspace = CloudWorkspace.init(
        root / "cloud", now_ms=int(now.timestamp() * 1000), create_repository=False
    )
    repo = ReleaseRepository.create(workspace.repository_dir, now=now, config=REPO_CONFIG)
    with running_cloud(root, workspace=workspace, config=config) as cloud:
        agent = cloud.device(DEVICE)  # provisioned with root v1 of this repository, enrolled
        scene = Scene(cloud, repo, agent, now)
        assert isinstance(scene.updater().fetcher, GrpcReleaseFetcher)  # the wire, not a folder
        scene.publish(1)
        assert scene.update().status == "installed"
        scene.assert_running(1)
        try:
            yield scene
        finally:
            agent.close()


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    with make_scene(tmp_path) as scene:
        yield scene


def _status(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


# ------------------------------------------------------------------------------------------------
# Baseline: the same scene installs a good release (so every refusal below is the attack's doing)
# ------------------------------------------------------------------------------------------------
def test_baseline_v2_installs_through_grpc(scene: Scene) -> None:
    scene.publish(2)
    result = scene.update()
    assert result.status == "installed" and result.release.version == 2
    scene.assert_running(2)
    previous = scene.updater().previous_model()
    assert previous is not None and previous.release.version == 1
    assert scene.update().status == "up_to_date"


# ------------------------------------------------------------------------------------------------
# Rollback
# ------------------------------------------------------------------------------------------------
def test_rollback_server_serves_older_timestamp(scene: Scene) -> None:
    old_timestamp = scene.served("metadata/timestamp.json").read_bytes()
    scene.publish(2)
    scene.update()
    scene.served("metadata/timestamp.json").write_bytes(old_timestamp)
    scene.refused(ReleaseRollback, "timestamp version")
    scene.assert_running(2)


def test_rollback_server_publishes_older_model_release(scene: Scene) -> None:
    scene.publish(2)
    scene.update()
    model_v1 = scene.models[1]
    attestation = sign_attestation(
        MODEL_TARGET, model_v1, predicate(1, None), scene.repo.signers("targets")
    )
    scene.publish_raw(1, model_v1, attestation)
    scene.refused(ReleaseRollback, "older than installed v2")
    scene.assert_running(2)


# ------------------------------------------------------------------------------------------------
# Freeze
# ------------------------------------------------------------------------------------------------
def test_freeze_expired_timestamp_at_the_device_clock(scene: Scene) -> None:
    scene.publish(2)  # a release the frozen device would want
    scene.now += timedelta(days=1, seconds=1)  # the timestamp lives 1 day
    scene.refused(ReleaseExpired, "timestamp")
    scene.assert_running(1)


def test_freeze_server_replays_an_old_timestamp_once_expired(scene: Scene) -> None:
    frozen = scene.served("metadata/timestamp.json").read_bytes()
    scene.now += timedelta(days=2)
    scene.repo.refresh_timestamp(now=scene.now)
    scene.served("metadata/timestamp.json").write_bytes(frozen)  # the fresh one is withheld
    scene.refused(ReleaseExpired)
    scene.assert_running(1)


# ------------------------------------------------------------------------------------------------
# Mix-and-match
# ------------------------------------------------------------------------------------------------
def test_mix_and_match_server_serves_snapshot_of_another_release(scene: Scene) -> None:
    snapshot_v1 = scene.served("metadata/snapshot.json").read_bytes()
    scene.publish(2)
    ts = Metadata[Timestamp].from_bytes(scene.served("metadata/timestamp.json").read_bytes())
    scene.served(f"metadata/{ts.signed.snapshot_meta.version}.snapshot.json").write_bytes(
        snapshot_v1
    )
    scene.refused(ReleaseInconsistent)
    scene.assert_running(1)


def test_mix_and_match_server_serves_targets_of_another_release(scene: Scene) -> None:
    targets_v1 = scene.served("metadata/targets.json").read_bytes()
    scene.publish(2)
    version = scene.repo.targets().signed.version
    scene.served(f"metadata/{version}.targets.json").write_bytes(targets_v1)
    scene.refused(ReleaseInconsistent)
    scene.assert_running(1)


# ------------------------------------------------------------------------------------------------
# Arbitrary software, endless data
# ------------------------------------------------------------------------------------------------
def test_server_serves_tampered_model_bytes(scene: Scene) -> None:
    scene.publish(2)
    genuine = scene.models[2]
    scene.model_path().write_bytes(genuine[:-1] + bytes([genuine[-1] ^ 1]))
    scene.refused(TargetMismatch)
    scene.assert_running(1)


def test_server_serves_target_longer_than_declared(scene: Scene) -> None:
    scene.publish(2)
    scene.model_path().write_bytes(scene.models[2] + b"trailing")
    scene.refused(TargetTooLong)
    scene.assert_running(1)


def test_server_serves_huge_target_device_stops_at_declared_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The nearest a file-backed server gets to endless data: a 256 MiB (sparse) model file.

    ``ReleaseFolder`` streams a file only up to its size at ``stat`` time, so a truly endless
    stream cannot be served; the device must still stop reading right after the declared length,
    which the count of chunks the server actually produced shows.
    """
    chunk = 64 * 1024
    with make_scene(tmp_path, TransportConfig(chunk_bytes=chunk)) as scene:
        served: list[int] = []
        original = ReleaseFolder._chunks

        def counting(
            self: ReleaseFolder, file: Path, size: int
        ) -> Iterator[tuple[bytes, int, int]]:
            for item in original(self, file, size):
                served.append(len(item[0]))
                yield item

        monkeypatch.setattr(ReleaseFolder, "_chunks", counting)
        scene.publish(2)
        huge = 256 * 1024 * 1024
        with open(scene.model_path(), "r+b") as handle:
            handle.truncate(huge)  # the genuine bytes, then zeros: sparse, so cheap on disk
        started = time.perf_counter()
        scene.refused(TargetTooLong)
        elapsed = time.perf_counter() - started
        scene.assert_running(1)
        time.sleep(0.2)  # let the server thread notice the cancellation
        assert sum(served) < 32 * 1024 * 1024, f"the server streamed {sum(served)} bytes"
        assert elapsed < 10, elapsed


# ------------------------------------------------------------------------------------------------
# Signatures and keys
# ------------------------------------------------------------------------------------------------
def test_server_serves_timestamp_below_signature_threshold(scene: Scene) -> None:
    scene.publish(2)
    path = scene.served("metadata/timestamp.json")
    md = Metadata.from_bytes(path.read_bytes())
    assert len(md.signatures) == 2
    md.signatures.pop(next(iter(md.signatures)))  # one of the two required signatures
    path.write_bytes(md.to_bytes())
    scene.refused(ReleaseSignatureInvalid, "threshold")
    scene.assert_running(1)


def _attacker_root(scene: Scene, version: int) -> bytes:
    return attacker_root(scene.served(f"metadata/{version - 1}.root.json").read_bytes(), version)


def test_server_serves_bad_root_rotation_next_to_a_good_one(scene: Scene) -> None:
    assert scene.repo.rotate_root(now=scene.now, keys=2, threshold=2) == 2  # good rotation
    scene.publish(2)
    forged = scene.served("metadata/3.root.json")
    forged.write_bytes(_attacker_root(scene, 3))  # bad rotation after it
    scene.refused(ReleaseSignatureInvalid, "root")
    scene.assert_running(1)
    # Without the forged root the device follows the good rotation and installs v2.
    forged.unlink()
    assert scene.update().release.version == 2
    scene.assert_running(2)
    assert (scene.agent.workspace.release_dir / "tuf" / "root_history" / "2.root.json").is_file()


def test_server_serves_root_rotation_without_old_signatures(scene: Scene) -> None:
    scene.served("metadata/2.root.json").write_bytes(_attacker_root(scene, 2))
    scene.refused(ReleaseSignatureInvalid)
    scene.assert_running(1)


# ------------------------------------------------------------------------------------------------
# Attestations and model files, published with the cloud's real keys
# ------------------------------------------------------------------------------------------------
def test_attestation_with_wrong_subject_digest(scene: Scene) -> None:
    attestation = sign_attestation(
        MODEL_TARGET, model_bytes(99), predicate(2, scene.models[1]), scene.repo.signers("targets")
    )
    scene.publish_raw(2, model_bytes(2), attestation)
    scene.refused(AttestationInvalid, "subject digest")
    scene.assert_running(1)


def test_attestation_with_failed_audit_verdict(scene: Scene) -> None:
    model = model_bytes(2)
    failed = predicate(2, scene.models[1], AuditVerdict.FAIL)
    attestation = sign_attestation(MODEL_TARGET, model, failed, scene.repo.signers("targets"))
    scene.publish_raw(2, model, attestation)
    info = scene.refused(ReleaseRefused, "failed its audit")
    assert isinstance(info.value, ReleaseRefused) and info.value.reason == "audit_failed"
    scene.assert_running(1)


def test_attestation_by_unknown_key(scene: Scene) -> None:
    model = model_bytes(2)
    stranger = CryptoSigner.generate_ed25519()
    attestation = sign_attestation(MODEL_TARGET, model, predicate(2, scene.models[1]), [stranger])
    scene.publish_raw(2, model, attestation)
    scene.refused(AttestationInvalid, "trusted key")
    scene.assert_running(1)


def test_attestation_by_a_delegated_fleet_key_does_not_sign_fleet_wide(scene: Scene) -> None:
    scene.repo.add_delegation("fleet-eu", paths=["fleets/eu/*"], now=scene.now)
    model = model_bytes(2)
    fleet = scene.repo.signers("fleet-eu")
    attestation = sign_attestation(MODEL_TARGET, model, predicate(2, scene.models[1]), fleet)
    scene.publish_raw(2, model, attestation)
    scene.refused(AttestationInvalid)
    scene.assert_running(1)


def test_pickle_model_file(scene: Scene) -> None:
    evil = pickle.dumps({"w": [1.0, 2.0]}, protocol=4)
    attestation = sign_attestation(
        MODEL_TARGET, evil, predicate(2, scene.models[1]), scene.repo.signers("targets")
    )
    scene.publish_raw(2, evil, attestation)
    scene.refused(ModelFormatError, "pickle")
    scene.assert_running(1)


def test_release_with_a_foreign_parent(scene: Scene) -> None:
    model = model_bytes(2)
    foreign = predicate(2, b"some other model")
    attestation = sign_attestation(MODEL_TARGET, model, foreign, scene.repo.signers("targets"))
    scene.publish_raw(2, model, attestation)
    info = scene.refused(ReleaseRefused)
    assert isinstance(info.value, ReleaseRefused) and info.value.reason == "parent_mismatch"
    scene.assert_running(1)


# ------------------------------------------------------------------------------------------------
# Crash mid install (the download came through gRPC)
# ------------------------------------------------------------------------------------------------
def test_crash_between_write_and_rename_keeps_the_old_model(scene: Scene) -> None:
    scene.publish(2)

    def crash() -> None:
        raise KeyboardInterrupt("power lost")  # not an Exception: nothing may swallow it

    scene.refused(KeyboardInterrupt, before_commit=crash)
    scene.assert_running(1)  # a fresh DeviceUpdater, as after a reboot
    assert scene.update().release.version == 2
    scene.assert_running(2)


# ------------------------------------------------------------------------------------------------
# The UpdateService's own caps and confinement
# ------------------------------------------------------------------------------------------------
def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)


def test_target_request_above_its_max_length_is_resource_exhausted(scene: Scene) -> None:
    stub, model = scene.stub(), scene.models[1]
    path = scene.model_path().relative_to(scene.folder / "targets").as_posix()
    before = store_state(scene.cloud.store)
    chunks = list(stub.FetchTarget(spb.TargetRequest(path=path, max_length=len(model)), timeout=5))
    assert b"".join(c.data for c in chunks) == model  # exactly the cap: served
    code, details = _status(
        lambda: list(
            stub.FetchTarget(spb.TargetRequest(path=path, max_length=len(model) - 1), timeout=5)
        )
    )
    assert code == C.RESOURCE_EXHAUSTED and details.startswith("too_large:"), (code, details)
    assert store_state(scene.cloud.store) == before


def test_server_cap_on_targets_refuses_and_device_keeps_its_model(tmp_path: Path) -> None:
    with make_scene(tmp_path, TransportConfig(max_target_bytes=4096)) as scene:
        model = checkpoint_bytes(
            {"w": np.full((4, 3), 2.0, np.float32), "pad": np.zeros(2048, np.float32)}, {}
        )
        scene.models[2] = model
        bundle = ReleaseBundle(2, model, b"{}", predicate(2, scene.models[1]))
        scene.repo.publish(bundle, now=scene.now)
        info = scene.refused(ReleaseUnavailable, "RESOURCE_EXHAUSTED")
        assert "too_large" in str(info.value)
        scene.assert_running(1)


def test_oversize_metadata_is_resource_exhausted_and_device_keeps_its_model(scene: Scene) -> None:
    _sparse(scene.served("metadata/2.root.json"), scene.cloud.config.max_metadata_bytes + 1)
    code, details = _status(
        lambda: scene.stub().GetMetadata(spb.MetadataRequest(role="root", version=2), timeout=5)
    )
    assert code == C.RESOURCE_EXHAUSTED and details.startswith("too_large:"), (code, details)
    scene.refused(ReleaseUnavailable, "RESOURCE_EXHAUSTED")  # the root update cannot go on
    scene.assert_running(1)


# fmt: off
BAD_CALLS: list[tuple[str, Callable[[Any], object], grpc.StatusCode, str]] = [
    ("unknown_role", lambda s: s.GetMetadata(spb.MetadataRequest(role="no-such-role", version=0), timeout=5), C.NOT_FOUND, "not_found:"),
    ("unpublished_root_version", lambda s: s.GetMetadata(spb.MetadataRequest(role="root", version=99), timeout=5), C.NOT_FOUND, "not_found:"),
    ("role_with_a_path", lambda s: s.GetMetadata(spb.MetadataRequest(role="../cloud", version=0), timeout=5), C.INVALID_ARGUMENT, "malformed:"),
    ("role_with_dots", lambda s: s.GetMetadata(spb.MetadataRequest(role="1.root", version=0), timeout=5), C.INVALID_ARGUMENT, "malformed:"),
    ("empty_role", lambda s: s.GetMetadata(spb.MetadataRequest(role="", version=0), timeout=5), C.INVALID_ARGUMENT, "malformed:"),
    ("overlong_role", lambda s: s.GetMetadata(spb.MetadataRequest(role="r" * 65, version=0), timeout=5), C.INVALID_ARGUMENT, "malformed:"),
    ("unknown_target", lambda s: list(s.FetchTarget(spb.TargetRequest(path="nothing.bin"), timeout=5)), C.NOT_FOUND, "not_found:"),
    ("target_path_escapes", lambda s: list(s.FetchTarget(spb.TargetRequest(path="../keys/x"), timeout=5)), C.INVALID_ARGUMENT, "malformed:"),
    ("absolute_target_path", lambda s: list(s.FetchTarget(spb.TargetRequest(path="/etc/passwd"), timeout=5)), C.INVALID_ARGUMENT, "malformed:"),
    ("empty_target_path", lambda s: list(s.FetchTarget(spb.TargetRequest(path=""), timeout=5)), C.INVALID_ARGUMENT, "malformed:"),
    ("overlong_target_path", lambda s: list(s.FetchTarget(spb.TargetRequest(path="a/" * 600 + "b"), timeout=5)), C.INVALID_ARGUMENT, "malformed:"),
    ("symlink_out_of_the_folder", lambda s: list(s.FetchTarget(spb.TargetRequest(path="leak.json"), timeout=5)), C.INVALID_ARGUMENT, "malformed:"),
]
# fmt: on


@pytest.mark.parametrize("name, call, code, prefix", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_update_service_refuses_bad_requests(
    scene: Scene, name: str, call: Callable[[Any], object], code: grpc.StatusCode, prefix: str
) -> None:
    # A link inside targets/ to the cloud's own config, outside the served folder.
    scene.served("targets/leak.json").symlink_to(scene.cloud.workspace.config_path)
    store_before, folder_before = store_state(scene.cloud.store), folder_state(scene.folder)
    got, details = _status(lambda: call(scene.stub()))
    assert got == code and details.startswith(prefix), (name, got, details)
    assert b'"store"' not in details.encode()  # nothing of the cloud's config leaks
    assert store_state(scene.cloud.store) == store_before
    assert folder_state(scene.folder) == folder_before
    assert scene.update().status == "up_to_date"  # the channel and the service still work


def test_link_from_targets_into_the_repository_keys_is_not_served(scene: Scene) -> None:
    key = sorted((scene.folder / "keys").iterdir())[0]
    scene.served("targets/key.pem").symlink_to(Path("..") / "keys" / key.name)
    code, details = _status(
        lambda: list(scene.stub().FetchTarget(spb.TargetRequest(path="key.pem"), timeout=5))
    )
    assert code == C.INVALID_ARGUMENT and details.startswith("malformed:"), (code, details)


def test_fetching_a_folder_is_not_found_without_paths(scene: Scene) -> None:
    """Issue 14 finding 6: FetchTarget on a folder answered UNKNOWN with the server's absolute path."""
    scene.served("targets/a-folder").mkdir()
    code, details = _status(
        lambda: list(scene.stub().FetchTarget(spb.TargetRequest(path="a-folder"), timeout=5)))
    assert code == C.NOT_FOUND and details.startswith("not_found:"), (code, details)
    assert "/" not in details.split(":", 1)[1].replace("a-folder", "")

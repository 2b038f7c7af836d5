"""Device side: fetcher URL handling, the clock, error mapping, A/B slots, fleets, the CLI flow."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.exceptions import DownloadError, DownloadHTTPError
from typer.testing import CliRunner

from diredi_secure.checkpoint import checkpoint_bytes
from diredi_secure.errors import ConfigError, ModelFormatError, ReleaseError, StoreError
from diredi_secure.release import (
    AuditVerdict,
    DeviceUpdater,
    LocalFolderFetcher,
    ReleaseBundle,
    ReleaseExpired,
    ReleaseInconsistent,
    ReleasePredicate,
    ReleaseRepository,
    ReleaseRollback,
    ReleaseSignatureInvalid,
    ReleaseUnavailable,
    TargetMismatch,
    TargetTooLong,
    UpdatePolicy,
    parse_metadata_name,
)
from diredi_secure.release.cli import app, edge_update
from diredi_secure.release.updater import map_tuf_error

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def model_of(version: int) -> bytes:
    return checkpoint_bytes({"w": np.full(3, float(version), np.float32)}, {})


def release(version: int, parent: int | None = None) -> ReleaseBundle:
    model = model_of(version)
    digest = None if parent is None else hashlib.sha256(model_of(parent)).hexdigest()
    pred = ReleasePredicate.build(
        release_version=version, parent_digest=digest, parent_version=parent, packet_digests=[],
        epsilon=[], accountant="rdp", audit_report_digest="ad" * 32,
        audit_verdict=AuditVerdict.PASS, training_config_digest="00" * 32,
    )  # fmt: skip
    return ReleaseBundle(version, model, b'{"layers": [3]}', pred)


@pytest.mark.parametrize(
    ("name", "role", "version"),
    [("timestamp.json", "timestamp", None), ("12.snapshot.json", "snapshot", 12),
     ("1.root.json", "root", 1), ("3.fleet-eu.json", "fleet-eu", 3)],
)  # fmt: skip
def test_parse_metadata_name(name: str, role: str, version: int | None) -> None:
    request = parse_metadata_name(name)
    assert (request.role, request.version, request.filename) == (role, version, name)


@pytest.mark.parametrize("name", ["../root.json", "root", "0.root.json", "a/b.json", ".json"])
def test_parse_metadata_name_refuses_junk(name: str) -> None:
    with pytest.raises(DownloadError):
        parse_metadata_name(name)


def test_local_fetcher_confines_paths_and_reports_404(tmp_path: Path) -> None:
    (tmp_path / "metadata").mkdir()
    (tmp_path / "secret").write_bytes(b"s")
    fetcher = LocalFolderFetcher(tmp_path)
    with pytest.raises(DownloadHTTPError) as info:
        fetcher.download_bytes("release:/metadata/2.root.json", 100)
    assert info.value.status_code == 404
    for url in ["release:/targets/../secret", "release:/elsewhere/x", "file:///etc/passwd"]:
        with pytest.raises(DownloadError):
            fetcher.download_bytes(url, 100)


@pytest.mark.parametrize(
    ("exc", "stage", "expected"),
    [
        (tuf_exc.UnsignedMetadataError("x"), "metadata", ReleaseSignatureInvalid),
        (tuf_exc.ExpiredMetadataError("x"), "metadata", ReleaseExpired),
        (tuf_exc.BadVersionNumberError("New timestamp version 2 must be >= 3"), "metadata",
         ReleaseRollback),
        (tuf_exc.BadVersionNumberError("Expected targets.json version 2, got 3."), "metadata",
         ReleaseRollback),
        (tuf_exc.BadVersionNumberError("Expected snapshot version 4, got 3"), "metadata",
         ReleaseInconsistent),
        (tuf_exc.LengthOrHashMismatchError("x"), "metadata", ReleaseInconsistent),
        (tuf_exc.LengthOrHashMismatchError("x"), "target", TargetMismatch),
        (tuf_exc.DownloadLengthMismatchError("x"), "target", TargetTooLong),
        (tuf_exc.DownloadHTTPError("x", 404), "target", ReleaseUnavailable),
        (tuf_exc.DownloadError("x"), "metadata", ReleaseUnavailable),
        (tuf_exc.RepositoryError("x"), "metadata", ReleaseError),
    ],
)  # fmt: skip
def test_map_tuf_error_names_the_attack(exc: Exception, stage: str, expected: type) -> None:
    mapped = map_tuf_error(exc, stage)  # type: ignore[arg-type]
    assert type(mapped) is expected


def _world(tmp_path: Path) -> tuple[ReleaseRepository, Path]:
    repo = ReleaseRepository.create(tmp_path / "repo", now=T0)
    repo.publish(release(1), now=T0)
    return repo, tmp_path / "device"


def test_clock_is_used_for_expiry(tmp_path: Path) -> None:
    repo, state = _world(tmp_path)
    late = DeviceUpdater(state, LocalFolderFetcher(repo.workspace),
                         clock=lambda: T0 + timedelta(days=2),
                         trusted_root=repo.trusted_root_bytes())  # fmt: skip
    with pytest.raises(ReleaseExpired):
        late.update()
    on_time = DeviceUpdater(state, LocalFolderFetcher(repo.workspace), clock=lambda: T0)
    assert on_time.update().release.version == 1


def test_provisioning_rules(tmp_path: Path) -> None:
    repo, state = _world(tmp_path)
    with pytest.raises(ConfigError, match="not provisioned"):
        DeviceUpdater(state, LocalFolderFetcher(repo.workspace), clock=lambda: T0)
    DeviceUpdater(state, LocalFolderFetcher(repo.workspace), clock=lambda: T0,
                  trusted_root=repo.trusted_root_bytes())  # fmt: skip
    with pytest.raises(ConfigError, match="another trusted root"):
        DeviceUpdater(state, LocalFolderFetcher(repo.workspace), clock=lambda: T0,
                      trusted_root=b"{}")  # fmt: skip


def test_model_changed_at_rest_is_detected_and_revert_works(tmp_path: Path) -> None:
    repo, state = _world(tmp_path)
    dev = DeviceUpdater(state, LocalFolderFetcher(repo.workspace), clock=lambda: T0,
                        trusted_root=repo.trusted_root_bytes())  # fmt: skip
    with pytest.raises(StoreError, match="no model"):
        dev.current_model()
    dev.update()
    repo.publish(release(2, parent=1), now=T0)
    assert dev.update().release.slot == "b"
    assert dev.slots.revert().version == 1
    assert dev.current_model().release.version == 1
    path = state / "slots" / "a" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ModelFormatError, match="changed"):
        dev.current_model()


def test_fleet_device_installs_its_delegated_release(tmp_path: Path) -> None:
    repo, state = _world(tmp_path)
    repo.add_delegation("fleet-eu", paths=["fleets/eu/*"], now=T0)
    repo.publish(release(5), now=T0, role="fleet-eu", prefix="fleets/eu/")
    dev = DeviceUpdater(state, LocalFolderFetcher(repo.workspace), clock=lambda: T0,
                        trusted_root=repo.trusted_root_bytes(),
                        policy=UpdatePolicy(prefix="fleets/eu/", role="fleet-eu"))  # fmt: skip
    result = dev.update()
    assert result.release.version == 5 and result.release.role == "fleet-eu"
    assert np.all(dev.current_model().tensors["w"] == 5.0)


def test_cli_init_publish_update_twice_and_verify(tmp_path: Path) -> None:
    import typer

    edge = typer.Typer()
    edge.command("update")(edge_update)
    edge.command("noop")(lambda: None)
    runner = CliRunner()
    repo, dev, now = tmp_path / "repo", tmp_path / "dev", "2026-03-01T00:00:00+00:00"
    model = tmp_path / "m.safetensors"
    arch = tmp_path / "arch.json"
    arch.write_text('{"layers": [3]}')
    report = tmp_path / "audit.json"  # an audited release (without one it is not_audited)
    report.write_text('{"verdict": "pass"}')

    def ok(application: typer.Typer, args: list[str]) -> str:
        result = runner.invoke(application, args)
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output

    ok(app, ["init", str(repo), "--now", now])
    root = str(repo / "metadata" / "1.root.json")
    for version in (1, 2):
        model.write_bytes(release(version).model)
        ok(app, ["publish", str(repo), "--model", str(model), "--architecture", str(arch),
                 "--epsilon", "dev-1=0.5:1.5", "--audit-report", str(report), "--now", now])  # fmt: skip
        out = ok(edge, ["update", "--from", str(repo), "--state", str(dev), "--root", root,
                        "--now", now])  # fmt: skip
        assert f"installed v{version}" in out
    assert "up to date: v2" in ok(edge, ["update", "--from", str(repo), "--state", str(dev),
                                         "--now", now])  # fmt: skip
    assert "ok: release v2" in ok(app, ["verify", str(repo), "--now", now])
    late = runner.invoke(edge, ["update", "--from", str(repo), "--state", str(dev),
                                "--now", "2026-03-05T00:00:00+00:00"])  # fmt: skip
    assert isinstance(late.exception, ReleaseExpired)
    assert "device stays on v2" in late.exception.one_line()


def test_two_installs_at_once_are_serialised(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 14 finding 6: `SlotStore.install` took no lock; two at once wrote one slot."""
    import threading
    import time as _time

    from diredi_secure.release.errors import InstallFailed
    from diredi_secure.release.updater import InstalledRelease, SlotStore

    slots = SlotStore(tmp_path / "slots")
    commits: list[int] = []
    outcomes: list[str] = []

    def slow_commit() -> None:
        commits.append(1)  # a second install reaching here would have rewritten this one's slot
        _time.sleep(0.2)

    def install(v: int) -> None:
        rel = InstalledRelease(version=v, model_sha256="0" * 64, role="targets", prefix="",
                               slot="a", files=("model.safetensors",), parent_sha256=None,
                               audit_verdict="pass", audit_forced=False, installed_at="now")
        try:
            slots.install({"model.safetensors": b"v%d" % v}, rel, before_commit=slow_commit)
            outcomes.append("installed")
        except InstallFailed:
            outcomes.append("refused")  # slot a became the running one: the second must not touch it

    threads = [threading.Thread(target=install, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(commits) == 1
    assert sorted(outcomes) == ["installed", "refused"]
    active = slots.active()
    assert active is not None and (slots.slot_dir("a") / "model.safetensors").read_bytes() == (
        b"v%d" % active.version)

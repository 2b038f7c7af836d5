"""Releases cannot lie about their audit (issue 16 item 5).

A release published without an audit report is attested ``not_audited`` (never ``pass`` with a
null report digest); a device refuses it unless its own policy allows unaudited releases; and an
attestation that claims ``pass`` (or any verdict) without naming its report is refused as
malformed, even when the publisher's real key signed it. The device keeps running what it had.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
from securesystemslib.dsse import Envelope
from typer.testing import CliRunner

from diredi_secure.errors import AttestationInvalid, ReleaseRefused
from diredi_secure.release import (
    AuditVerdict,
    DeviceUpdater,
    LocalFolderFetcher,
    ReleaseBundle,
    ReleasePredicate,
    UpdatePolicy,
    sign_attestation,
)
from diredi_secure.release.attest import DSSE_PAYLOAD_TYPE, build_statement
from diredi_secure.release.cli import app, edge_update
from diredi_secure.release.repository import ATTESTATION_TARGET, MODEL_TARGET

from .release_fixtures import model_bytes, predicate
from .test_release_attacks import World, make_world


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)  # v1, audited, installed


def unaudited(version: int, parent: bytes) -> ReleasePredicate:
    return ReleasePredicate.build(
        release_version=version,
        parent_digest=hashlib.sha256(parent).hexdigest(),
        parent_version=version - 1,
        packet_digests=[],
        epsilon=[],
        accountant="rdp",
        audit_report_digest=None,
        audit_verdict=AuditVerdict.NOT_AUDITED,
        training_config_digest=hashlib.sha256(b"{}").hexdigest(),
        version="test",
    )


def test_a_verdict_without_its_report_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="without an audit report digest"):
        ReleasePredicate.build(
            release_version=1, parent_digest=None, parent_version=None, packet_digests=[],
            epsilon=[], accountant="rdp", audit_report_digest=None,
            audit_verdict=AuditVerdict.PASS, training_config_digest="00" * 32,
        )  # fmt: skip
    with pytest.raises(ValueError, match="names no audit report"):
        ReleasePredicate.build(
            release_version=1, parent_digest=None, parent_version=None, packet_digests=[],
            epsilon=[], accountant="rdp", audit_report_digest="ab" * 32,
            audit_verdict=AuditVerdict.NOT_AUDITED, training_config_digest="00" * 32,
        )  # fmt: skip


def test_unaudited_release_is_refused_by_default(world: World) -> None:
    model = model_bytes(2)
    world.repo.publish(ReleaseBundle(2, model, b"{}", unaudited(2, world.models[1])), now=world.now)
    with pytest.raises(ReleaseRefused, match="without a privacy audit") as info:
        world.device().update()
    assert info.value.reason == "not_audited"
    world.assert_running(1)


def test_unaudited_release_installs_where_the_device_policy_allows_it(world: World) -> None:
    model = model_bytes(2)
    world.models[2] = model
    world.repo.publish(ReleaseBundle(2, model, b"{}", unaudited(2, world.models[1])), now=world.now)
    device = DeviceUpdater(world.state, world.fetcher, clock=lambda: world.now,
                           policy=UpdatePolicy(accept_unaudited=True))  # fmt: skip
    result = device.update()
    assert result.status == "installed"
    assert result.release.audit_verdict == "not_audited"
    world.assert_running(2)


@pytest.mark.parametrize("verdict", ["pass", "inconclusive"])
def test_forged_verdict_with_a_null_report_digest_is_refused(world: World, verdict: str) -> None:
    """The publisher's real targets key signs ``verdict: pass, reportDigest: null`` (what every
    unaudited release said before): malformed, whatever the device's policy on unaudited ones."""
    model = model_bytes(2)
    honest = predicate(2, world.models[1])
    statement = json.loads(build_statement(MODEL_TARGET, hashlib.sha256(model).hexdigest(), honest))
    statement["predicate"]["audit"] = {"reportDigest": None, "verdict": verdict, "forced": False}
    envelope = Envelope(json.dumps(statement, sort_keys=True).encode(), DSSE_PAYLOAD_TYPE, {})
    for signer in world.repo.signers("targets"):
        envelope.sign(signer)
    world.publish_raw(2, model, json.dumps(envelope.to_dict()).encode())
    for policy in (UpdatePolicy(), UpdatePolicy(accept_unaudited=True)):
        device = DeviceUpdater(world.state, world.fetcher, clock=lambda: world.now, policy=policy)
        with pytest.raises(AttestationInvalid, match="without an audit report digest"):
            device.update()
        world.assert_running(1)


def test_publish_without_a_report_is_attested_not_audited(tmp_path: Path) -> None:
    """The CLI path that used to write ``verdict: pass, reportDigest: null``."""
    runner = CliRunner()
    repo, now = tmp_path / "repo", "2026-03-01T00:00:00+00:00"
    (tmp_path / "m.safetensors").write_bytes(model_bytes(1))
    (tmp_path / "arch.json").write_text("{}")
    assert runner.invoke(app, ["init", str(repo), "--now", now]).exit_code == 0
    publish = ["publish", str(repo), "--model", str(tmp_path / "m.safetensors"),
               "--architecture", str(tmp_path / "arch.json"), "--now", now]  # fmt: skip
    lying = runner.invoke(app, [*publish, "--audit-verdict", "pass"])
    assert lying.exit_code != 0 and "needs the --audit-report" in str(lying.exception)
    assert runner.invoke(app, publish).exit_code == 0

    (attestation,) = (repo / "targets").glob(f"*.{ATTESTATION_TARGET}")
    payload = json.loads(base64.b64decode(json.loads(attestation.read_bytes())["payload"]))
    assert payload["predicate"]["audit"] == {"reportDigest": None, "verdict": "not_audited",
                                             "forced": False}  # fmt: skip

    state, root = tmp_path / "dev", str(repo / "metadata" / "1.root.json")
    update = ["--from", str(repo), "--state", str(state), "--root", root, "--now", now]
    refused = runner.invoke(edge_update_app(), update)
    assert isinstance(refused.exception, ReleaseRefused)
    assert refused.exception.reason == "not_audited"
    assert "device stays on no model" in refused.exception.one_line()
    allowed = runner.invoke(edge_update_app(), [*update, "--allow-unaudited"])
    assert allowed.exit_code == 0 and "installed v1" in allowed.output
    updater = DeviceUpdater(state, LocalFolderFetcher(repo), clock=lambda: world_now())
    installed = updater.installed()
    assert installed is not None and installed.audit_verdict == "not_audited"


def world_now() -> datetime:
    return datetime(2026, 3, 1, tzinfo=UTC)


def edge_update_app() -> typer.Typer:
    application = typer.Typer()
    application.command()(edge_update)
    return application


def test_failed_report_keeps_its_digest(world: World) -> None:
    """A forced failed release still names its report (the verdict is checkable)."""
    model = model_bytes(2)
    forced = predicate(2, world.models[1], AuditVerdict.FAIL, audit_forced=True)
    attestation = sign_attestation(MODEL_TARGET, model, forced, world.repo.signers("targets"))
    world.publish_raw(2, model, attestation)
    result = world.device().update()
    assert result.attestation is not None
    assert result.attestation.predicate.audit_report_digest == hashlib.sha256(b"report").hexdigest()

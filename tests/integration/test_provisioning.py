"""Factory provisioning and certificate renewal (issue 16 item 4), and the device's own policy on
unaudited releases (item 5), through the real `diredi` command and a real gRPC server on loopback.

The factory holds a copy of the device CA folder and the cloud's public export; the cloud
workspace is moved out of reach while the kit is made and installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from diredi_secure.services.edge import EdgeAgent
from diredi_secure.services.provision import (
    CloudPublic,
    KitInvalid,
    apply_renewal,
    build_kit,
    build_renewal,
    install_kit,
    load_ca,
)
from diredi_secure.services.workspace import CloudWorkspace, DeviceWorkspace

from diredi_secure.checkpoint import checkpoint_bytes
from diredi_secure.errors import CertificateInvalid, ReleaseRefused
from diredi_secure.release import AuditVerdict, ReleaseBundle, ReleasePredicate, ReleaseRepository
from tests.integration.services_harness import DP, Cloud, payload, running_cloud


def diredi(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diredi_secure.cli", *args], cwd=cwd,
                          capture_output=True, text=True, check=False, timeout=120,
                          env=dict(os.environ))  # fmt: skip


def ok(*args: str, cwd: Path) -> str:
    r = diredi(*args, cwd=cwd)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def refused(*args: str, cwd: Path, reason: str) -> str:
    r = diredi(*args, cwd=cwd)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert reason in lines[0], lines[0]
    return lines[0]


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cloud workspace, and a factory folder with only the CA copy and the public export."""
    root = tmp_path_factory.mktemp("prov")
    ok("cloud", "init", "cloud", cwd=root)
    ok("cloud", "export-public", "-w", "cloud", "--out", "factory/public", cwd=root)
    shutil.copytree(root / "cloud" / "ca", root / "factory" / "ca")
    return root / "factory"


def test_kit_is_made_and_installed_without_the_cloud_workspace(factory: Path) -> None:
    cloud = factory.parent / "cloud"
    hidden = factory.parent / "cloud.out-of-reach"
    cloud.rename(hidden)
    try:
        ok("provision", "kit", "--ca", "ca", "--device-id", "dev-1", "--public", "public",
           "--target", "127.0.0.1:50999", "--out", "kit-1", cwd=factory)  # fmt: skip
        kit = factory / "kit-1"
        manifest = json.loads((kit / "kit.json").read_text())
        assert manifest["format"] == "diredi-device-kit/1" and manifest["device_id"] == "dev-1"
        for name, entry in manifest["files"].items():
            assert hashlib.sha256((kit / name).read_bytes()).hexdigest() == entry["sha256"]
        assert {p.name for p in kit.iterdir()} == {*manifest["files"], "kit.json"}
        assert (kit / "device.key").stat().st_mode & 0o777 == 0o600
        assert (kit / "tls.key").stat().st_mode & 0o777 == 0o600
        assert not (kit / "ca.key").exists()

        out = ok("edge", "init", "dev-1", "--kit", "kit-1", cwd=factory)
        assert "refuses unaudited releases" in out
        ws = DeviceWorkspace.open(factory / "dev-1")
        config = ws.config()
        assert (config["device_id"], config["target"], config["allow_unaudited"]) == (
            "dev-1", "127.0.0.1:50999", False)  # fmt: skip
        assert ws.trusted_root() == (factory / "public" / "trusted_root.json").read_bytes()
        assert (ws.root / "device.key").stat().st_mode & 0o777 == 0o600
        ws.inbox_public_key()
        ws.client_tls()
    finally:
        hidden.rename(cloud)
    assert not cloud.joinpath("device.json").exists()


def _fresh_kit(factory: Path, name: str) -> Path:
    """A kit as `provision kit` writes it (in-process: only the refusal needs the real command)."""
    ca_key, ca_cert = load_ca(factory / "ca")
    return build_kit(factory / name, ca_key=ca_key, ca_cert=ca_cert, device_id=name,
                     public=CloudPublic.load(factory / "public"), target="127.0.0.1:50999",
                     now_ms=now_ms())  # fmt: skip


def _rewrite_manifest(kit: Path, name: str) -> None:
    manifest = json.loads((kit / "kit.json").read_text())
    data = (kit / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (kit / "kit.json").write_text(json.dumps(manifest))


def _tamper_file(kit: Path, other: Path) -> None:
    with (kit / "tls.crt").open("ab") as f:
        f.write(b"\n")


def _extra_file(kit: Path, other: Path) -> None:
    (kit / "ca.key").write_bytes(b"not listed")


def _missing_file(kit: Path, other: Path) -> None:
    (kit / "device.crt").unlink()


def _swapped_key(kit: Path, other: Path) -> None:
    """Another device's key with a manifest that agrees: the certificate does not."""
    shutil.copy(other / "device.key", kit / "device.key")
    _rewrite_manifest(kit, "device.key")


def _swapped_tls_key(kit: Path, other: Path) -> None:
    shutil.copy(other / "tls.key", kit / "tls.key")
    _rewrite_manifest(kit, "tls.key")


def _readable_key(kit: Path, other: Path) -> None:
    (kit / "device.key").chmod(0o644)


def _wrong_format(kit: Path, other: Path) -> None:
    manifest = json.loads((kit / "kit.json").read_text())
    manifest["format"] = "diredi-device-kit/99"
    (kit / "kit.json").write_text(json.dumps(manifest))


def _other_device_id(kit: Path, other: Path) -> None:
    manifest = json.loads((kit / "kit.json").read_text())
    manifest["device_id"] = "dev-other"
    (kit / "kit.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        (_tamper_file, "does not match its SHA-256"),
        (_extra_file, "does not list"),
        (_missing_file, "device.crt"),
        (_swapped_key, "is not the key device.crt certifies"),
        (_swapped_tls_key, "not for this TLS key"),
        (_readable_key, "readable by group or others"),
        (_wrong_format, "is not 'diredi-device-kit/1'"),
        (_other_device_id, "not dev-other"),
    ],
)
def test_a_bad_kit_is_refused_and_leaves_no_device(factory: Path, attack, reason: str) -> None:  # type: ignore[no-untyped-def]
    name = f"bad-{attack.__name__.strip('_').replace('_', '-')}"
    kit = _fresh_kit(factory, name)
    attack(kit, _fresh_kit(factory, f"{name}-other"))
    before = sorted(p.name for p in factory.iterdir())
    refused("edge", "init", f"dev-{name}", "--kit", name, cwd=factory, reason=reason)
    assert sorted(p.name for p in factory.iterdir()) == before  # no device, no temp folder


def test_the_factory_refuses_a_ca_the_cloud_does_not_trust(factory: Path) -> None:
    ok("keys", "device-ca", "--out", "rogue-ca", cwd=factory)
    refused("provision", "kit", "--ca", "rogue-ca", "--device-id", "dev-r", "--public", "public",
            "--target", "127.0.0.1:1", "--out", "kit-r", cwd=factory, reason="not the one the cloud")  # fmt: skip
    assert not (factory / "kit-r").exists()


def test_edge_init_needs_exactly_one_source(factory: Path) -> None:
    refused("edge", "init", "dev-x", cwd=factory, reason="give either --kit")
    assert not (factory / "dev-x").exists()


# ------------------------------------------------------------------------------------------------
# Over gRPC: enrolment of a kit-made device, renewal keeping the ledger, unaudited releases
# ------------------------------------------------------------------------------------------------
def _kit_device(cloud: Cloud, factory: Path, device_id: str, **kw: object) -> DeviceWorkspace:
    ca_key, ca_cert = load_ca(factory / "ca")
    kit = build_kit(factory / f"kit-{device_id}", ca_key=ca_key, ca_cert=ca_cert,
                    device_id=device_id, public=CloudPublic.load(factory / "public"),
                    target=cloud.target, now_ms=now_ms())  # fmt: skip
    return install_kit(kit, factory / f"ws-{device_id}", now_ms=now_ms(), **kw)  # type: ignore[arg-type]


@pytest.fixture
def served(tmp_path: Path) -> tuple[Cloud, Path]:
    with running_cloud(tmp_path) as cloud:
        factory = tmp_path / "factory"
        shutil.copytree(cloud.workspace.ca_dir, factory / "ca")
        from diredi_secure.services.provision import export_public

        export_public(cloud.workspace, factory / "public")
        yield cloud, factory  # type: ignore[misc]


def test_renewal_over_grpc_keeps_the_device_ledger(served: tuple[Cloud, Path]) -> None:
    cloud, factory = served
    ws = _kit_device(cloud, factory, "dev-renew")
    agent = cloud.agent(ws)  # enrols the kit's certificate over mTLS
    agent.submit_payload(payload(0), dp=DP, base_model_version="v1")
    agent.close()
    before = cloud.store.get_device("dev-renew")
    assert before is not None and before.epsilon_spent > 0
    old_cert, old_tls = ws.certificate(), (ws.root / "tls.crt").read_bytes()
    old_key = (ws.root / "device.key").read_bytes()

    # The factory sees only the device's public certificates (a copy of the two files).
    public_certs = factory / "certs-dev-renew"
    public_certs.mkdir()
    for name in ("device.crt", "tls.crt"):
        shutil.copy(ws.root / name, public_certs / name)
    ok("provision", "renew", "--ca", "ca", "--from", public_certs.name, "--out", "renewal",
       cwd=factory)  # fmt: skip
    assert "renewed" in ok("edge", "renew", "-w", str(ws.root), "--kit", "renewal", cwd=factory)
    assert ws.certificate() != old_cert and (ws.root / "tls.crt").read_bytes() != old_tls
    assert (ws.root / "device.key").read_bytes() == old_key  # same key, new certificate

    renewed = cloud.agent(ws)  # a new channel with the renewed TLS identity; enrols again
    after = cloud.store.get_device("dev-renew")
    assert after is not None and after.certificate_der == ws.certificate()
    assert (after.epsilon_spent, after.epsilon_budget, after.highest_counter, after.key_id) == (
        before.epsilon_spent, before.epsilon_budget, before.highest_counter, before.key_id)  # fmt: skip
    body = renewed.submit_payload(payload(1), dp=DP, base_model_version="v1")
    assert body.counter == 2
    status = renewed.status()
    assert status.epsilon_spent > before.epsilon_spent and status.highest_counter == 2
    renewed.close()


def test_a_renewal_for_another_device_changes_nothing(served: tuple[Cloud, Path]) -> None:
    cloud, factory = served
    a = _kit_device(cloud, factory, "dev-a")
    b = _kit_device(cloud, factory, "dev-b")
    ca_key, ca_cert = load_ca(factory / "ca")
    build_renewal(factory / "renew-b", ca_key=ca_key, ca_cert=ca_cert, device_certs=b.root,
                  now_ms=now_ms())  # fmt: skip
    cert = a.certificate()
    with pytest.raises(KitInvalid, match="is for 'dev-b'"):
        apply_renewal(a, factory / "renew-b", now_ms=now_ms())
    manifest = json.loads((factory / "renew-b" / "kit.json").read_text())
    manifest["device_id"] = "dev-a"  # claims to be for a: the certificates still name b
    (factory / "renew-b" / "kit.json").write_text(json.dumps(manifest))
    with pytest.raises(CertificateInvalid, match="names dev-b"):
        apply_renewal(a, factory / "renew-b", now_ms=now_ms())
    assert a.certificate() == cert


def _publish_unaudited(ws: CloudWorkspace) -> None:
    model = checkpoint_bytes({"w": __import__("numpy").zeros(3, "float32")}, {})
    predicate = ReleasePredicate.build(
        release_version=1, parent_digest=None, parent_version=None, packet_digests=[],
        epsilon=[], accountant="none", audit_report_digest=None,
        audit_verdict=AuditVerdict.NOT_AUDITED, training_config_digest="00" * 32,
    )  # fmt: skip
    ReleaseRepository(ws.repository_dir).publish(
        ReleaseBundle(1, model, b"{}", predicate), now=datetime.now(UTC)
    )


def test_unaudited_release_over_grpc_follows_the_device_policy(served: tuple[Cloud, Path]) -> None:
    cloud, factory = served
    _publish_unaudited(cloud.workspace)
    strict = _kit_device(cloud, factory, "dev-strict")
    lenient = _kit_device(cloud, factory, "dev-lenient", allow_unaudited=True)
    assert lenient.config()["allow_unaudited"] is True
    with EdgeAgent(strict, config=cloud.config) as agent:
        with pytest.raises(ReleaseRefused, match="without a privacy audit") as info:
            agent.updater().update()
        assert info.value.reason == "not_audited"
        assert agent.updater().installed() is None
    with EdgeAgent(lenient, config=cloud.config) as agent:
        result = agent.updater().update()
        assert (result.status, result.release.audit_verdict) == ("installed", "not_audited")

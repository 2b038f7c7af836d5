"""``diredi release ...`` (cloud side) and ``edge_update`` (for ``diredi edge update --from DIR``).

The wall clock is read here, at the edge of the program, and passed into the core; ``--now``
overrides it (ISO 8601) to show freeze attacks and to make scripted demos deterministic.
Expected failures raise :class:`~diredi_secure.errors.DirediError`; ``diredi``'s ``main`` turns
them into exit status 2 and one line.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from diredi_secure._secrets import passphrase_from_env as _passphrase
from diredi_secure.errors import ConfigError, DirediError

from .attest import AuditVerdict, DeviceEpsilon, ReleasePredicate
from .fetcher import LocalFolderFetcher
from .repository import (
    MODEL_TARGET,
    ReleaseBundle,
    ReleaseRepository,
    RepositoryConfig,
    RoleKeys,
    describe,
)
from .updater import DeviceUpdater, UpdatePolicy

__all__ = ["app", "edge_update"]

app = typer.Typer(help="Publish and verify signed model releases (TUF).", no_args_is_help=True)

_MAX_INPUT = 512 * 1024 * 1024

Workspace = Annotated[Path, typer.Argument(help="Release repository workspace folder.")]
NowOpt = Annotated[
    str | None, typer.Option("--now", help="Clock override, ISO 8601 with offset (default: now).")
]
PassEnv = Annotated[
    str | None,
    typer.Option(help="Environment variable holding the key passphrase (keys stored encrypted)."),
]
PrefixOpt = Annotated[str, typer.Option(help="Release prefix, e.g. fleets/eu/ ('' = whole fleet).")]
RoleOpt = Annotated[
    str, typer.Option(help="TUF role that signs the release (targets or delegated).")
]
AllowUnauditedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-unaudited",
        help="Accept a release attested not_audited (published without an audit report); "
        "refused by default.",
    ),
]


def _now(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(f"--now {value!r} is not ISO 8601") from exc
    if parsed.tzinfo is None:
        raise ConfigError("--now needs a UTC offset, e.g. 2026-01-01T00:00:00+00:00")
    return parsed.astimezone(UTC)


def _read(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > _MAX_INPUT:
            raise ConfigError(f"{what} {path} is {size} bytes, over the cap of {_MAX_INPUT}")
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}", reason="file") from exc


def _parse_epsilon(items: list[str]) -> list[DeviceEpsilon]:
    out = []
    for item in items:
        device, sep, values = item.partition("=")
        round_s, sep2, total_s = values.partition(":")
        try:
            if not sep or not sep2:
                raise ValueError(item)
            out.append(DeviceEpsilon(device, float(round_s), float(total_s)))
        except ValueError as exc:
            raise ConfigError(f"--epsilon {item!r} is not DEVICE=ROUND:TOTAL") from exc
    return out


def _parse_digests(path: Path | None) -> list[bytes]:
    if path is None:
        return []
    digests = []
    for line_no, line in enumerate(_read(path, "packet digest list").decode().splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        try:
            digest = bytes.fromhex(text)
        except ValueError as exc:
            raise ConfigError(f"{path}:{line_no}: not a hex digest") from exc
        if len(digest) != 32:
            raise ConfigError(f"{path}:{line_no}: a packet digest is 32 bytes")
        digests.append(digest)
    return digests


@app.command("init")
def init(
    workspace: Workspace,
    root_keys: Annotated[int, typer.Option(help="Number of root keys.")] = 1,
    root_threshold: Annotated[int, typer.Option(help="Root signatures required.")] = 1,
    targets_keys: Annotated[int, typer.Option(help="Number of targets keys.")] = 1,
    targets_threshold: Annotated[int, typer.Option(help="Targets signatures required.")] = 1,
    passphrase_env: PassEnv = None,
    now: NowOpt = None,
) -> None:
    """Create a release repository: keys, root, targets, snapshot and timestamp (all v1)."""
    config = RepositoryConfig(
        root=RoleKeys(root_keys, root_threshold),
        targets=RoleKeys(targets_keys, targets_threshold),
    )
    repo = ReleaseRepository.create(
        workspace, now=_now(now), config=config, passphrase=_passphrase(passphrase_env)
    )
    typer.echo(
        f"release repository created in {workspace} "
        f"(root {root_threshold}-of-{root_keys}); provision devices with "
        f"{repo.metadata_dir / '1.root.json'}"
    )


@app.command("publish")
def publish(
    workspace: Workspace,
    model: Annotated[Path, typer.Option(help="Model weights (safetensors).")],
    architecture: Annotated[Path, typer.Option(help="Architecture JSON of the model.")],
    version: Annotated[int | None, typer.Option(help="Release version (default: next).")] = None,
    reference_set: Annotated[Path | None, typer.Option(help="Public reference set.")] = None,
    inbox_key: Annotated[Path | None, typer.Option(help="Cloud inbox public key (PEM).")] = None,
    parent_digest: Annotated[
        str | None, typer.Option(help="Parent model SHA-256 (default: the published model).")
    ] = None,
    parent_version: Annotated[int | None, typer.Option(help="Parent release version.")] = None,
    packet_digests: Annotated[
        Path | None, typer.Option(help="File of merged packet SHA-256s, one hex per line.")
    ] = None,
    epsilon: Annotated[
        list[str] | None, typer.Option(help="DEVICE=ROUND:TOTAL epsilon spent (repeatable).")
    ] = None,
    accountant: Annotated[str, typer.Option(help="DP accountant used.")] = "rdp",
    audit_report: Annotated[
        Path | None,
        typer.Option(
            help="Privacy audit report file (its digest is attested). Without one the "
            "release is attested not_audited, and devices refuse it by default."
        ),
    ] = None,
    audit_verdict: Annotated[
        AuditVerdict | None,
        typer.Option(
            help="The report's verdict (needs --audit-report; default: pass with a "
            "report, not_audited without)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Publish despite a failed audit.")] = False,
    training_config: Annotated[
        Path | None, typer.Option(help="Training config file (its digest is attested).")
    ] = None,
    role: RoleOpt = "targets",
    prefix: PrefixOpt = "",
    passphrase_env: PassEnv = None,
    now: NowOpt = None,
) -> None:
    """Publish a model release: targets + attestation, signed; snapshot and timestamp refreshed."""
    repo = ReleaseRepository(workspace, passphrase=_passphrase(passphrase_env))
    current = repo.current_release(prefix, role)
    release_version = version if version is not None else (current or 0) + 1
    if parent_digest is None and current is not None:
        parent_target = repo.targets(role).signed.targets[prefix + MODEL_TARGET]
        parent_digest = parent_target.hashes["sha256"]
        parent_version = current if parent_version is None else parent_version
    if audit_report is None and audit_verdict not in (None, AuditVerdict.NOT_AUDITED):
        raise ConfigError(
            f"--audit-verdict {audit_verdict.value} needs the --audit-report it "
            "comes from (without a report the release is not_audited)"
        )
    if audit_report is not None and audit_verdict is AuditVerdict.NOT_AUDITED:
        raise ConfigError("--audit-verdict not_audited contradicts --audit-report")
    if audit_verdict is None:
        audit_verdict = AuditVerdict.NOT_AUDITED if audit_report is None else AuditVerdict.PASS
    model_bytes = _read(model, "model")
    training = _read(training_config, "training config") if training_config else b"{}"
    predicate = ReleasePredicate.build(
        release_version=release_version,
        parent_digest=parent_digest,
        parent_version=parent_version,
        packet_digests=_parse_digests(packet_digests),
        epsilon=_parse_epsilon(epsilon or []),
        accountant=accountant,
        audit_report_digest=(
            hashlib.sha256(_read(audit_report, "audit report")).hexdigest()
            if audit_report
            else None
        ),
        audit_verdict=audit_verdict,
        audit_forced=force and audit_verdict is AuditVerdict.FAIL,
        training_config_digest=hashlib.sha256(training).hexdigest(),
    )
    bundle = ReleaseBundle(
        version=release_version,
        model=model_bytes,
        architecture=_read(architecture, "architecture"),
        predicate=predicate,
        reference_set=_read(reference_set, "reference set") if reference_set else None,
        inbox_public_key=_read(inbox_key, "inbox key") if inbox_key else None,
    )
    published = repo.publish(bundle, now=_now(now), role=role, prefix=prefix)
    typer.echo(
        f"published v{published.version} ({prefix or '/'} by {role}): model "
        f"{published.model_sha256[:16]}..., {len(published.targets)} targets, "
        f"snapshot v{published.snapshot_version}, timestamp v{published.timestamp_version}"
    )


@app.command("rotate-root")
def rotate_root(
    workspace: Workspace,
    keys: Annotated[int | None, typer.Option(help="New number of root keys.")] = None,
    threshold: Annotated[int | None, typer.Option(help="New root threshold.")] = None,
    passphrase_env: PassEnv = None,
    now: NowOpt = None,
) -> None:
    """Replace the root keys; the new root is signed by the old and the new thresholds."""
    repo = ReleaseRepository(workspace, passphrase=_passphrase(passphrase_env))
    version = repo.rotate_root(now=_now(now), keys=keys, threshold=threshold)
    typer.echo(f"root rotated to v{version}")


@app.command("rotate-key")
def rotate_key(
    workspace: Workspace,
    role: Annotated[str, typer.Option(help="Online role: targets, snapshot or timestamp.")],
    keys: Annotated[int | None, typer.Option(help="New number of keys for the role.")] = None,
    threshold: Annotated[int | None, typer.Option(help="New threshold for the role.")] = None,
    passphrase_env: PassEnv = None,
    now: NowOpt = None,
) -> None:
    """Replace an online role's keys (a new root lists them; devices follow on their next update)."""
    repo = ReleaseRepository(workspace, passphrase=_passphrase(passphrase_env))
    version = repo.rotate_online(role, now=_now(now), keys=keys, threshold=threshold)
    typer.echo(f"{role} keys rotated; root v{version}")


@app.command("delegate")
def delegate(
    workspace: Workspace,
    name: Annotated[str, typer.Argument(help="Delegated role name, e.g. fleet-eu.")],
    path: Annotated[list[str], typer.Option(help="Path pattern, e.g. fleets/eu/* (repeatable).")],
    keys: Annotated[int, typer.Option(help="Number of signing keys made for the new role.")] = 1,
    threshold: Annotated[int, typer.Option(help="Signatures of the role required (<= --keys).")] = 1,
    passphrase_env: PassEnv = None,
    now: NowOpt = None,
) -> None:
    """Delegate release paths (per fleet or per device) to a new role with its own keys."""
    repo = ReleaseRepository(workspace, passphrase=_passphrase(passphrase_env))
    repo.add_delegation(name, paths=path, now=_now(now), keys=RoleKeys(keys, threshold))
    typer.echo(f"delegated {', '.join(path)} to role {name}")


@app.command("refresh-timestamp")
def refresh_timestamp(
    workspace: Workspace, passphrase_env: PassEnv = None, now: NowOpt = None
) -> None:
    """Re-sign the timestamp with a fresh expiry (run more often than it expires)."""
    repo = ReleaseRepository(workspace, passphrase=_passphrase(passphrase_env))
    typer.echo(f"timestamp v{repo.refresh_timestamp(now=_now(now))}")


@app.command("verify")
def verify(
    workspace: Workspace,
    role: RoleOpt = "targets",
    prefix: PrefixOpt = "",
    now: NowOpt = None,
    show: Annotated[bool, typer.Option(help="Print the repository summary as JSON.")] = False,
    allow_unaudited: AllowUnauditedOpt = False,
) -> None:
    """Verify the repository as a fresh device would (root v1 -> newest, attestation, model)."""
    repo = ReleaseRepository(workspace)
    clock_now = _now(now)
    with tempfile.TemporaryDirectory(prefix="diredi-verify-") as state:
        updater = DeviceUpdater(
            Path(state),
            LocalFolderFetcher(workspace),
            clock=lambda: clock_now,
            trusted_root=repo.trusted_root_bytes(1),
            policy=UpdatePolicy(prefix=prefix, role=role, accept_unaudited=allow_unaudited),
        )
        result = updater.update()
    rel = result.release
    typer.echo(
        f"ok: release v{rel.version} model {rel.model_sha256[:16]}... verifies "
        f"(root v{repo.root().signed.version}, audit {rel.audit_verdict}"
        f"{' FORCED' if rel.audit_forced else ''})"
    )
    if show:
        typer.echo(json.dumps(describe(repo), indent=2))


def edge_update(
    from_dir: Annotated[Path, typer.Option("--from", help="Release repository folder.")],
    state: Annotated[Path, typer.Option(help="Device state folder.")] = Path("device"),
    root: Annotated[
        Path | None, typer.Option(help="Trusted root metadata (first update only).")
    ] = None,
    prefix: PrefixOpt = "",
    role: RoleOpt = "targets",
    now: NowOpt = None,
    allow_unaudited: AllowUnauditedOpt = False,
) -> None:
    """Update this device from a release folder: verify (TUF + attestation), install A/B."""
    clock_now = _now(now)
    updater = DeviceUpdater(
        state,
        LocalFolderFetcher(from_dir),
        clock=lambda: clock_now,
        trusted_root=_read(root, "trusted root") if root is not None else None,
        policy=UpdatePolicy(prefix=prefix, role=role, accept_unaudited=allow_unaudited),
    )
    before = updater.installed()
    try:
        result = updater.update()
    except DirediError as exc:
        kept = f"v{before.version}" if before is not None else "no model"
        exc.args = (f"{exc.message} (device stays on {kept})",)
        raise
    rel = result.release
    if result.status == "up_to_date":
        typer.echo(f"up to date: v{rel.version} ({rel.model_sha256[:16]}...)")
    else:
        typer.echo(
            f"installed v{rel.version} ({rel.model_sha256[:16]}...) in slot {rel.slot}"
            + (f", previous v{before.version} kept" if before is not None else "")
        )

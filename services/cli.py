"""``diredi cloud ...`` and ``diredi edge ...``: run the cloud and a device from a workspace.

Expected failures raise :class:`DirediError` subclasses; the ``diredi`` entry point prints them as
one line and exits 2.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from diredi_secure._secrets import passphrase_from_env as _passphrase
from diredi_secure.checkpoint import atomic_write_bytes
from diredi_secure.errors import ConfigError
from diredi_secure.knowledge import PayloadKind

from .cloud import CloudServer
from .edge import EdgeAgent
from .workspace import CloudWorkspace, DeviceWorkspace

__all__ = ["cloud_app", "edge_app"]

cloud_app = typer.Typer(help="Run the cloud: init, serve, revoke, merge.", no_args_is_help=True)
edge_app = typer.Typer(help="Run a device: init, enroll, update, submit.", no_args_is_help=True)

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace folder")]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _now() -> datetime:
    return datetime.now(UTC)


def _log_to(log_file: Path | None, level: int = logging.INFO) -> None:
    """Log to ``log_file`` (appending) if given, else to stderr."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(level=level, format=fmt, filename=str(log_file), force=True)
    else:
        logging.basicConfig(level=level, format=fmt, force=True)


def _settings(tiny: bool) -> object:
    from .jobs import JobSettings

    return JobSettings.tiny() if tiny else JobSettings()



# ------------------------------------------------------------------------------------------------
# cloud
# ------------------------------------------------------------------------------------------------
@cloud_app.command("init")
def cloud_init(
    workspace: Annotated[Path, typer.Argument(help="Folder to create")],
    hostname: Annotated[list[str] | None, typer.Option(help="Host names/IPs in the server certificate")] = None,
    store: Annotated[str | None, typer.Option(help="PostgreSQL DSN (default: cloud.db in the workspace)")] = None,
    store_schema: Annotated[str | None, typer.Option(help="PostgreSQL schema for the tables")] = None,
    passphrase_env: Annotated[str | None, typer.Option(help="Env var holding the key passphrase")] = None,
) -> None:
    """Create a cloud workspace: device CA, inbox key, receipt key, TLS identity, store, TUF repository."""
    ws = CloudWorkspace.init(
        workspace, now_ms=_now_ms(), hostnames=tuple(hostname or ("localhost", "127.0.0.1")),
        store=store, store_schema=store_schema, passphrase=_passphrase(passphrase_env),
    )
    ws.open_store().close()  # create and migrate the schema now
    typer.echo(f"cloud workspace ready in {ws.root}")


@cloud_app.command("serve")
def cloud_serve(
    workspace: WorkspaceOpt,
    listen: Annotated[str, typer.Option(help="host:port to listen on")] = "127.0.0.1:50051",
    mtls: Annotated[bool, typer.Option("--mtls/--no-mtls", help="Require device client certificates")] = True,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plaintext (NO TLS); logs a warning")] = False,
    passphrase_env: Annotated[str | None, typer.Option(help="Env var holding the key passphrase")] = None,
    port_file: Annotated[Path | None, typer.Option(help="Write the bound port here once serving (for --listen HOST:0)")] = None,
    log_file: Annotated[Path | None, typer.Option(help="Append logs to this file (default: stderr)")] = None,
) -> None:
    """Serve Knowledge, Update and Enrollment services (with health and reflection) until SIGTERM."""
    _log_to(log_file)
    ws = CloudWorkspace.open(workspace)
    store = ws.open_store()
    server = CloudServer(
        store=store, keys=ws.keys(_passphrase(passphrase_env)),
        tls=None if insecure else ws.server_tls(mtls=mtls), insecure=insecure,
        listen=listen, repository_dir=ws.repository_dir, released_models=ws.released_models(),
    )
    port = server.start()
    if port_file is not None:
        atomic_write_bytes(port_file, f"{port}\n".encode())  # written only once the port serves
    typer.echo(f"serving on {listen.rsplit(':', 1)[0]}:{port}", err=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(grace_s=5))
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop(grace_s=5)
    finally:
        store.close()


@cloud_app.command("revoke")
def cloud_revoke(
    device: Annotated[str, typer.Argument(help="Device id")],
    workspace: WorkspaceOpt,
    reason: Annotated[str, typer.Option(help="Why (recorded)")] = "revoked by operator",
) -> None:
    """Revoke a device: its next call (submit, enrol) is refused, by every replica."""
    with CloudWorkspace.open(workspace).open_store() as store:
        record = store.revoke_device(device, revoked_at_ms=_now_ms(), reason=reason)
    typer.echo(f"device {device} revoked (since {record.revoked_at_ms})")


@cloud_app.command("ledger")
def cloud_ledger(
    workspace: WorkspaceOpt,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per device")] = False,
) -> None:
    """Every device's composed epsilon ledger: spent and budget at the policy's one delta."""
    import json as _json

    with CloudWorkspace.open(workspace).open_store() as store:
        devices = store.list_devices()
    for d in devices:
        row = {"device_id": d.device_id, "status": d.status.value, "epsilon_spent": d.epsilon_spent,
               "epsilon_budget": d.epsilon_budget, "delta": d.epsilon_delta,
               "highest_counter": d.highest_counter or 0}
        if as_json:
            typer.echo(_json.dumps(row, sort_keys=True))
        else:
            typer.echo(f"{d.device_id}: {d.status.value}, epsilon {d.epsilon_spent:.4g} of "
                       f"{d.epsilon_budget:.4g} (composed, delta {d.epsilon_delta:.0e}), "
                       f"counter {d.highest_counter or 0}")
    if not devices and not as_json:
        typer.echo("no device enrolled")


@cloud_app.command("distill")
def cloud_distill(
    workspace: WorkspaceOpt,
    seed: Annotated[int, typer.Option(help="Seed of the scenario and the training")] = 0,
    scenario: Annotated[Path | None, typer.Option(help="A saved scenario folder (default: build one from --seed)")] = None,
    tiny: Annotated[bool, typer.Option("--tiny", help="1-2 epochs everywhere (smoke tests only)")] = False,
    passphrase_env: Annotated[str | None, typer.Option(help="Env var holding the key passphrase")] = None,
    log_file: Annotated[Path | None, typer.Option(help="Append logs to this file")] = None,
) -> None:
    """Scenario, teacher, KD student, then publish release v1 (TUF + attestation)."""
    from .jobs import JobSettings, distill_and_release

    _log_to(log_file, logging.WARNING if log_file is None else logging.INFO)
    settings = _settings(tiny)
    assert isinstance(settings, JobSettings)
    out = distill_and_release(
        CloudWorkspace.open(workspace), now=_now(), seed=seed, scenario_dir=scenario,
        settings=settings, passphrase=_passphrase(passphrase_env),
    )
    for name, value in out.metrics.items():
        typer.echo(f"  {name} {value:.3f}")
    typer.echo(f"published release v{out.version} model {out.model_sha256[:16]} "
               f"(audit: {out.audit_verdict}) in {out.seconds:.1f} s")


@cloud_app.command("export-user")
def cloud_export_user(
    workspace: WorkspaceOpt,
    user: Annotated[str, typer.Option(help="Scenario user name (A, B, C...)")],
    out: Annotated[Path, typer.Option(help="npz file to write (arrays x, y)")],
    part: Annotated[str, typer.Option(help="train, val or test")] = "train",
) -> None:
    """Write one scenario user's private data as npz (a lab device's data for `edge reverse`)."""
    from .jobs import export_user_data

    n = export_user_data(CloudWorkspace.open(workspace), user, out, part=part)
    typer.echo(f"user {user} {part}: {n} examples written to {out}")


@cloud_app.command("merge")
def cloud_merge(
    workspace: WorkspaceOpt,
    seed: Annotated[int, typer.Option(help="Seed of the merge and re-KD")] = 0,
    audit_profile: Annotated[str, typer.Option(help="Audit gate: accounting, fast or full")] = "fast",
    force_release: Annotated[bool, typer.Option("--force-release", help="Publish despite a failed audit (recorded in the attestation)")] = False,
    tiny: Annotated[bool, typer.Option("--tiny", help="1-2 epochs everywhere (smoke tests only)")] = False,
    passphrase_env: Annotated[str | None, typer.Option(help="Env var holding the key passphrase")] = None,
    log_file: Annotated[Path | None, typer.Option(help="Append logs to this file")] = None,
) -> None:
    """Open the stored packets, merge into the cloud model, re-KD, audit gate, publish next release."""
    from .jobs import JobSettings, default_audit_gate, merge_and_release

    _log_to(log_file, logging.WARNING if log_file is None else logging.INFO)
    settings = _settings(tiny)
    assert isinstance(settings, JobSettings)
    ws = CloudWorkspace.open(workspace)
    with ws.open_store() as store:
        out = merge_and_release(
            ws, store, now=_now(), seed=seed, settings=settings,
            audit_gate=default_audit_gate(audit_profile), force_release=force_release,
            passphrase=_passphrase(passphrase_env),
        )
    for pid, why in out.skipped_packets.items():
        typer.echo(f"  skipped packet {pid[:16]}: {why}")
    for device, sha in out.device_models.items():
        typer.echo(f"  device {device}: model {sha[:16]} under devices/{device}/")
    for name, value in out.metrics.items():
        typer.echo(f"  {name} {value:.3f}")
    forced = " FORCED" if out.audit_forced else ""
    typer.echo(f"published release v{out.version} fleet model {out.model_sha256[:16]} from "
               f"{out.packet_count} packets (audit: {out.audit_verdict}{forced}) in {out.seconds:.1f} s")


# ------------------------------------------------------------------------------------------------
# edge
# ------------------------------------------------------------------------------------------------
@edge_app.command("init")
def edge_init(
    workspace: Annotated[Path, typer.Argument(help="Device folder to create")],
    device_id: Annotated[str, typer.Option("--device-id", help="Device id (in its certificates)")],
    cloud_workspace: Annotated[Path, typer.Option("--cloud", help="Cloud workspace whose CA provisions the device (lab)")],
    target: Annotated[str, typer.Option(help="Cloud address host:port")] = "127.0.0.1:50051",
) -> None:
    """Provision a device from the cloud's device CA: signing key + certificate, TLS key +
    certificate, CA certificate, inbox public key, and the release root (TUF trust anchor)."""
    ws = CloudWorkspace.open(cloud_workspace).provision_device(workspace, device_id, target=target, now_ms=_now_ms())
    typer.echo(f"device {device_id} provisioned in {ws.root}")


ServerOpt = Annotated[
    str | None, typer.Option("--server", help="Cloud address host:port (saved in the device config)")
]


def _agent(workspace: Path, insecure: bool, server: str | None = None) -> EdgeAgent:
    ws = DeviceWorkspace.open(workspace)
    if server is not None:
        ws.update_config(target=server)
    return EdgeAgent(ws, insecure=insecure)


@edge_app.command("enroll")
def edge_enroll(workspace: WorkspaceOpt, server: ServerOpt = None, insecure: bool = False) -> None:
    """Register the device with the cloud (proof of possession of its key)."""
    with _agent(workspace, insecure, server) as agent:
        typer.echo(f"enrolled as {agent.enroll()}")


@edge_app.command("status")
def edge_status(workspace: WorkspaceOpt, server: ServerOpt = None, insecure: bool = False) -> None:
    """Ask the cloud for this device's status and epsilon ledger."""
    with _agent(workspace, insecure, server) as agent:
        s = agent.status()
    typer.echo(f"{s.device_id}: {s.status}, epsilon {s.epsilon_spent:.4g}/{s.epsilon_budget:.4g} "
               f"(composed, delta {s.epsilon_delta:.0e}), counter {s.highest_counter}")


@edge_app.command("submit")
def edge_submit(
    workspace: WorkspaceOpt,
    packet: Annotated[Path | None, typer.Option(help="A sealed packet file (default: resend the outbox)")] = None,
    server: ServerOpt = None,
    insecure: bool = False,
) -> None:
    """Submit a packet (or every unacknowledged one) with retries; verify each receipt."""
    with _agent(workspace, insecure, server) as agent:
        bodies = [agent.submit(packet.read_bytes())] if packet is not None else agent.flush_outbox()
    for body in bodies:
        typer.echo(f"acknowledged {body.packet_id.hex()} counter {body.counter} at {body.stored_at_ms}")


@edge_app.command("update")
def edge_update(
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w", help="Device workspace (updates over gRPC)")] = None,
    from_dir: Annotated[Path | None, typer.Option("--from", help="Update from a local release folder instead (no server)")] = None,
    state: Annotated[Path, typer.Option(help="With --from: the device state folder")] = Path("device"),
    trusted_root: Annotated[Path | None, typer.Option("--trusted-root", "--root", help="Root metadata to trust first (default: the one from provisioning)")] = None,
    server: ServerOpt = None,
    insecure: bool = False,
) -> None:
    """Fetch, verify (TUF + attestation) and install the newest release for this device.

    Over gRPC from the device workspace: its own release (devices/<id>/, signed by its delegated
    role) when the cloud published one, else the fleet release. With ``--from DIR``: from a local
    release folder into ``--state`` (as ``diredi release`` publishes it).
    """
    if (workspace is None) == (from_dir is None):
        raise ConfigError("give either --workspace (update over gRPC) or --from DIR (a local release folder)")
    if from_dir is not None:
        from diredi_secure.release.cli import edge_update as update_from_folder

        update_from_folder(from_dir=from_dir, state=state, root=trusted_root)
        return
    from .jobs import update_device

    assert workspace is not None
    with _agent(workspace, insecure, server) as agent:
        root = trusted_root.read_bytes() if trusted_root is not None else None
        result = update_device(agent, trusted_root=root)
    where = result.release.prefix or "fleet"
    typer.echo(f"{result.status}: release v{result.release.version} ({where}) "
               f"model {result.release.model_sha256[:16]}")


@edge_app.command("reverse")
def edge_reverse(
    workspace: WorkspaceOpt,
    data: Annotated[Path, typer.Option(help="The user's private data (npz with x, y)")],
    epsilon: Annotated[float, typer.Option(help="Total epsilon the packet spends (DP-SGD and noised entries composed, at the policy's delta; inf: no DP, refused by the cloud)")] = 8.0,
    kind: Annotated[list[str] | None, typer.Option(help="Payload kind (repeat): reference_logits, weight_delta, label_histogram, dp_prototypes. Default: weight_delta, dp_prototypes, label_histogram (the demo's and the loop's)")] = None,
    epochs: Annotated[int | None, typer.Option(help="RD epochs (default: ml's)")] = None,
    research_seed: Annotated[int | None, typer.Option(help="RESEARCH ONLY: fix every private random draw (the header says so; the cloud refuses such packets by default). Default: fresh OS randomness")] = None,
    submit: Annotated[bool, typer.Option("--submit", help="Send the packet and verify the receipt")] = False,
    server: ServerOpt = None,
    insecure: bool = False,
    log_file: Annotated[Path | None, typer.Option(help="Append logs to this file")] = None,
) -> None:
    """Reverse distillation on the INSTALLED model with DP; seal the packet (and submit it)."""
    from diredi_secure.ml.data import load_npz_dataset
    from diredi_secure.ml.reverse import DEFAULT_PAYLOAD_KINDS, RDConfig

    from .jobs import reverse_on_device

    _log_to(log_file, logging.WARNING if log_file is None else logging.INFO)
    try:
        kinds = (tuple(PayloadKind(k) for k in kind) if kind else DEFAULT_PAYLOAD_KINDS)
    except ValueError as exc:
        raise ConfigError(f"unknown payload kind: {exc}") from exc
    dataset = load_npz_dataset(data)
    rd = RDConfig(epochs=epochs, research_seed=research_seed)
    with _agent(workspace, insecure, server) as agent:
        out = reverse_on_device(agent, dataset, epsilon=math.inf if math.isinf(epsilon) else epsilon,
                                kinds=kinds, rd=rd)
        eps = out.dp.composed_epsilon
        typer.echo(f"sealed packet {out.sealed.packet_id.hex()} on release v{out.base_version}: "
                   f"epsilon {eps:.3f} (delta {out.dp.delta:.2g}), payload {out.payload_bytes} bytes, "
                   f"packet {out.packet_bytes} bytes, {out.seconds:.1f} s")
        if submit:
            body = agent.submit(out.sealed.data)
            typer.echo(f"acknowledged {body.packet_id.hex()} counter {body.counter} at {body.stored_at_ms}")
        else:
            typer.echo("queued in the outbox: send it with `diredi edge submit`")

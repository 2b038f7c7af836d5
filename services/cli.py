"""``diredi cloud ...`` and ``diredi edge ...``: run the cloud and a device from a workspace.

Expected failures raise :class:`DirediError` subclasses; the ``diredi`` entry point prints them as
one line and exits 2.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from diredi_secure.errors import ConfigError
from diredi_secure.store import open_store

from .cloud import CloudServer
from .edge import EdgeAgent
from .workspace import CloudWorkspace, DeviceWorkspace

__all__ = ["cloud_app", "edge_app"]

cloud_app = typer.Typer(help="Run the cloud: init, serve, revoke, merge.", no_args_is_help=True)
edge_app = typer.Typer(help="Run a device: init, enroll, update, submit.", no_args_is_help=True)

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace folder")]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _passphrase(env_name: str | None) -> bytes | None:
    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError(f"environment variable {env_name} is not set or empty")
    return value.encode()


# ------------------------------------------------------------------------------------------------
# cloud
# ------------------------------------------------------------------------------------------------
@cloud_app.command("init")
def cloud_init(
    workspace: Annotated[Path, typer.Argument(help="Folder to create")],
    hostname: Annotated[list[str] | None, typer.Option(help="Host names/IPs in the server certificate")] = None,
    store: Annotated[str | None, typer.Option(help="PostgreSQL DSN (default: cloud.db in the workspace)")] = None,
    passphrase_env: Annotated[str | None, typer.Option(help="Env var holding the key passphrase")] = None,
) -> None:
    """Create a cloud workspace: device CA, inbox key, receipt key, TLS identity, store."""
    ws = CloudWorkspace.init(
        workspace, now_ms=_now_ms(), hostnames=tuple(hostname or ("localhost", "127.0.0.1")),
        store=store, passphrase=_passphrase(passphrase_env),
    )
    open_store(ws.store_url()).close()  # create and migrate the schema now
    typer.echo(f"cloud workspace ready in {ws.root}")


@cloud_app.command("serve")
def cloud_serve(
    workspace: WorkspaceOpt,
    listen: Annotated[str, typer.Option(help="host:port to listen on")] = "127.0.0.1:50051",
    mtls: Annotated[bool, typer.Option("--mtls/--no-mtls", help="Require device client certificates")] = True,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plaintext (NO TLS); logs a warning")] = False,
    passphrase_env: Annotated[str | None, typer.Option(help="Env var holding the key passphrase")] = None,
) -> None:
    """Serve Knowledge, Update and Enrollment services (with health and reflection) until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ws = CloudWorkspace.open(workspace)
    store = open_store(ws.store_url())
    server = CloudServer(
        store=store, keys=ws.keys(_passphrase(passphrase_env)),
        tls=None if insecure else ws.server_tls(mtls=mtls), insecure=insecure,
        listen=listen, repository_dir=ws.repository_dir,
    )
    port = server.start()
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
    with open_store(CloudWorkspace.open(workspace).store_url()) as store:
        record = store.revoke_device(device, revoked_at_ms=_now_ms(), reason=reason)
    typer.echo(f"device {device} revoked (since {record.revoked_at_ms})")


@cloud_app.command("merge")
def cloud_merge(workspace: WorkspaceOpt) -> None:
    """Merge the stored packets into the cloud model and publish a release (not wired yet)."""
    CloudWorkspace.open(workspace)
    raise ConfigError("cloud merge is not wired to diredi_secure.ml.merge in this build yet")


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
    """Provision a device: signing key and certificate, TLS key and certificate, CA, inbox key."""
    ws = CloudWorkspace.open(cloud_workspace).provision_device(workspace, device_id, target=target, now_ms=_now_ms())
    typer.echo(f"device {device_id} provisioned in {ws.root}")


def _agent(workspace: Path, insecure: bool) -> EdgeAgent:
    return EdgeAgent(DeviceWorkspace.open(workspace), insecure=insecure)


@edge_app.command("enroll")
def edge_enroll(workspace: WorkspaceOpt, insecure: bool = False) -> None:
    """Register the device with the cloud (proof of possession of its key)."""
    with _agent(workspace, insecure) as agent:
        typer.echo(f"enrolled as {agent.enroll()}")


@edge_app.command("status")
def edge_status(workspace: WorkspaceOpt, insecure: bool = False) -> None:
    """Ask the cloud for this device's status and epsilon ledger."""
    with _agent(workspace, insecure) as agent:
        s = agent.status()
    typer.echo(f"{s.device_id}: {s.status}, epsilon {s.epsilon_spent:.4g}/{s.epsilon_budget:.4g}, counter {s.highest_counter}")


@edge_app.command("submit")
def edge_submit(
    workspace: WorkspaceOpt,
    packet: Annotated[Path | None, typer.Option(help="A sealed packet file (default: resend the outbox)")] = None,
    insecure: bool = False,
) -> None:
    """Submit a packet (or every unacknowledged one) with retries; verify each receipt."""
    with _agent(workspace, insecure) as agent:
        bodies = [agent.submit(packet.read_bytes())] if packet is not None else agent.flush_outbox()
    for body in bodies:
        typer.echo(f"acknowledged {body.packet_id.hex()} counter {body.counter} at {body.stored_at_ms}")


@edge_app.command("update")
def edge_update(
    workspace: WorkspaceOpt,
    trusted_root: Annotated[Path | None, typer.Option(help="Root metadata to provision with (first run)")] = None,
    insecure: bool = False,
) -> None:
    """Fetch, verify (TUF + attestation) and install the newest release over UpdateService."""
    with _agent(workspace, insecure) as agent:
        root = trusted_root.read_bytes() if trusted_root is not None else None
        result = agent.updater(trusted_root=root).update()
        slot = agent.workspace.release_dir / "slots" / result.release.slot / "inbox_public_key.pem"
        if slot.is_file():
            agent.workspace.set_inbox_public_key(slot.read_bytes())
    typer.echo(f"{result.status}: release v{result.release.version} ({result.release.model_sha256[:16]})")

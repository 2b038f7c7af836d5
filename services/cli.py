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


def _read_file(path: Path, what: str, cap: int) -> bytes:
    """An operator-named file: a regular file only, at most ``cap`` bytes read (typed errors)."""
    from diredi_secure.checkpoint import read_regular_file
    from diredi_secure.errors import KeyFileError, TooLarge

    try:
        return read_regular_file(path, what, cap)
    except (KeyFileError, TooLarge) as exc:
        raise ConfigError(exc.one_line().split(": ", 1)[-1], reason="file") from exc


def _step(message: str) -> None:
    """One flushed progress line on stderr per step of a long job (a pipe sees each as it happens)."""
    typer.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


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
    workspace: Annotated[Path, typer.Argument(help="Folder to create (must not exist, or be empty)")],
    hostname: Annotated[list[str] | None, typer.Option(help="Host name or IP in the server certificate (repeat; default: localhost, 127.0.0.1)")] = None,
    store: Annotated[str | None, typer.Option(help="SQLite file (relative to here) or PostgreSQL DSN; default: cloud.db in the workspace. A DSN's password goes to the 0600 store.secret, never into cloud.toml")] = None,
    store_schema: Annotated[str | None, typer.Option(help="PostgreSQL schema for the tables")] = None,
    passphrase_env: Annotated[str | None, typer.Option(help="Name of an env var holding a passphrase to encrypt the private keys with")] = None,
) -> None:
    """Create a cloud workspace: device CA, keys, TLS identity, store, TUF repository, cloud.toml.

    The inbox key, receipt key and server TLS identity are made here. All or nothing: a failed
    init leaves no folder behind."""
    ws = CloudWorkspace.init(
        workspace, now_ms=_now_ms(), hostnames=tuple(hostname or ("localhost", "127.0.0.1")),
        store=store, store_schema=store_schema, passphrase=_passphrase(passphrase_env),
    )
    typer.echo(f"cloud workspace ready in {ws.root} (configuration: {ws.config_path.name})")


config_app = typer.Typer(help="The cloud workspace's configuration (cloud.toml).", no_args_is_help=True)
cloud_app.add_typer(config_app, name="config")


@config_app.command("show")
def cloud_config_show(
    workspace: WorkspaceOpt,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of TOML")] = False,
) -> None:
    """Print the effective configuration: every key, the file's values over the defaults."""
    import json as _json

    cfg = CloudWorkspace.open(workspace).settings()
    typer.echo(_json.dumps(cfg.as_dict(), indent=2, sort_keys=True) if as_json else cfg.to_toml().rstrip())


@config_app.command("check")
def cloud_config_check(workspace: WorkspaceOpt) -> None:
    """Validate cloud.toml (exit 2 with the reason if it is not valid)."""
    ws = CloudWorkspace.open(workspace)
    ws.settings()
    typer.echo(f"{ws.config_path}: valid")


@cloud_app.command("serve")
def cloud_serve(
    workspace: WorkspaceOpt,
    listen: Annotated[str | None, typer.Option(help="host:port to listen on (default: server.listen in cloud.toml, 127.0.0.1:50051)")] = None,
    mtls: Annotated[bool | None, typer.Option("--mtls/--no-mtls", help="Require device client certificates (default: server.mtls, on)")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plaintext (NO TLS); logs a warning")] = False,
    ops_listen: Annotated[str | None, typer.Option(help="host:port of the plain-HTTP /healthz and /metrics endpoint (no device certificate); default: server.ops_listen, none")] = None,
    max_workers: Annotated[int | None, typer.Option(help="gRPC worker threads (default: server.max_workers, 16)")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error (default: server.log_level, info)")] = None,
    log_format: Annotated[str | None, typer.Option(help="console or json (default: server.log_format, console)")] = None,
    log_file: Annotated[Path | None, typer.Option(help="Append logs to this file (default: server.log_file, else stderr)")] = None,
    passphrase_env: Annotated[str | None, typer.Option(help="Name of an env var holding the key passphrase")] = None,
    port_file: Annotated[Path | None, typer.Option(help="Write the bound port here once serving (for --listen HOST:0)")] = None,
    workers: Annotated[int, typer.Option(help="Server processes sharing the port (SO_REUSEPORT); SQLite: one writer process fed by them")] = 1,
) -> None:
    """Serve Knowledge, Update and Enrollment services (with health and reflection) until SIGTERM.

    Settings come from the workspace's cloud.toml (see `diredi cloud config show`); each flag
    overrides its key. The configuration is validated before anything binds."""
    from .observe import configure_logging

    ws = CloudWorkspace.open(workspace)
    cfg = ws.settings()
    server_cfg = cfg.server
    listen = listen or server_cfg.listen
    mtls = server_cfg.mtls if mtls is None else mtls
    log_path = log_file or (ws.path(server_cfg.log_file) if server_cfg.log_file else None)
    configure_logging(log_level or server_cfg.log_level, log_format or server_cfg.log_format, log_path)
    if workers != 1:
        _serve_workers(ws, workers, listen=listen, mtls=mtls, insecure=insecure, ops_listen=(ops_listen or server_cfg.ops_listen) or None,
                       max_workers=max_workers or server_cfg.max_workers, log_level=log_level or server_cfg.log_level,
                       log_format=log_format or server_cfg.log_format, log_path=log_path, passphrase_env=passphrase_env,
                       port_file=port_file)
        return
    keys = ws.keys(_passphrase(passphrase_env))
    tls = None if insecure else ws.server_tls(mtls=mtls)
    store = ws.open_store()
    try:
        server = CloudServer(
            store=store, keys=keys, tls=tls, insecure=insecure, listen=listen,
            repository_dir=ws.repository_dir, released_models=ws.released_models(),
            policy=cfg.policy, config=cfg.transport_config(),
            max_workers=max_workers or server_cfg.max_workers,
            ops_listen=(ops_listen or server_cfg.ops_listen) or None,
        )
        port = server.start()
    except BaseException:
        store.close()
        raise
    if port_file is not None:
        atomic_write_bytes(port_file, f"{port}\n".encode())  # written only once the port serves
    ops = f", ops endpoint on port {server.ops.port}" if server.ops is not None else ""
    typer.echo(f"serving on {listen.rsplit(':', 1)[0]}:{port}{ops}", err=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(grace_s=5))
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop(grace_s=5)
    finally:
        store.close()


def _serve_workers(ws: CloudWorkspace, workers: int, *, listen: str, mtls: bool, insecure: bool, ops_listen: str | None,
                   max_workers: int, log_level: str, log_format: str, log_path: Path | None,
                   passphrase_env: str | None, port_file: Path | None) -> None:
    from .workers import WorkerOptions, serve_workers

    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}", reason="workers")
    ws.keys(_passphrase(passphrase_env))  # refuse a wrong passphrase here, once, before spawning
    options = WorkerOptions(workspace=str(ws.root), listen=listen, mtls=mtls, insecure=insecure,
                            max_workers=max_workers, ops_listen=ops_listen, log_level=log_level,
                            log_format=log_format, log_file=None if log_path is None else str(log_path),
                            passphrase_env=passphrase_env)

    def ready(port: int) -> None:
        if port_file is not None:
            atomic_write_bytes(port_file, f"{port}\n".encode())  # written once every worker serves
        typer.echo(f"serving on {listen.rsplit(':', 1)[0]}:{port} with {workers} workers", err=True)

    serve_workers(options, workers, on_ready=ready)


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


def _device_row(d: object) -> dict[str, object]:
    from diredi_secure.store import Device

    assert isinstance(d, Device)
    return {"device_id": d.device_id, "status": d.status.value, "epsilon_spent": d.epsilon_spent,
            "epsilon_budget": d.epsilon_budget, "delta": d.epsilon_delta,
            "highest_counter": d.highest_counter or 0, "enrolled_at_ms": d.enrolled_at_ms,
            "revoked_at_ms": d.revoked_at_ms, "revocation_reason": d.revocation_reason}


def _iso(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@cloud_app.command("devices")
def cloud_devices(
    workspace: WorkspaceOpt,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per device")] = False,
    status: Annotated[str | None, typer.Option(help="Only devices with this status: active or revoked")] = None,
) -> None:
    """Every enrolled device: status, when enrolled or revoked, composed epsilon spent of its budget."""
    import json as _json

    if status not in (None, "active", "revoked"):
        raise ConfigError(f"--status must be active or revoked, not {status!r}")
    with CloudWorkspace.open(workspace).open_store() as store:
        devices = [d for d in store.list_devices() if status is None or d.status.value == status]
    for d in devices:
        if as_json:
            typer.echo(_json.dumps(_device_row(d), sort_keys=True))
        else:
            since = _iso(d.revoked_at_ms) if d.revoked_at_ms is not None else _iso(d.enrolled_at_ms)
            typer.echo(f"{d.device_id}: {d.status.value} since {since}, epsilon {d.epsilon_spent:.4g} "
                       f"of {d.epsilon_budget:.4g} at delta {d.epsilon_delta:.0e} (composed), "
                       f"counter {d.highest_counter or 0}")
    if not devices and not as_json:
        typer.echo("no device enrolled" if status is None else f"no {status} device")


@cloud_app.command("ledger")
def cloud_ledger(
    workspace: WorkspaceOpt,
    device: Annotated[str | None, typer.Argument(help="The device whose ledger to show (required; every device's spend: `diredi cloud devices`)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of text")] = False,
) -> None:
    """One device's composed epsilon ledger, with each packet it was charged for.

    Spent and budget at the policy's delta; every device at once is `diredi cloud devices`."""
    import json as _json

    from diredi_secure.errors import UnknownDevice

    if device is None:  # the list of every device was a twin of `cloud devices`
        raise ConfigError("`diredi cloud ledger` takes a DEVICE; every device's ledger: run "
                          "`diredi cloud devices`", reason="moved")
    with CloudWorkspace.open(workspace).open_store() as store:
        one = store.get_device(device)
        if one is None:
            raise UnknownDevice(f"device {device} is not enrolled here")
        devices = [one]
        packets = store.list_packets(unmerged_only=False, device_id=device)
    for d in devices:
        row = _device_row(d)
        if as_json:
            typer.echo(_json.dumps(row, sort_keys=True))
        else:
            typer.echo(f"{d.device_id}: {d.status.value}, epsilon {d.epsilon_spent:.4g} of "
                       f"{d.epsilon_budget:.4g} at delta {d.epsilon_delta:.0e} (composed), "
                       f"counter {d.highest_counter or 0}")
    for p in packets:
        entry = {"packet_id": p.packet_id.hex(), "counter": p.counter, "epsilon": p.epsilon,
                 "delta": devices[0].epsilon_delta, "received_at_ms": p.received_at_ms,
                 "merged_in_release": p.merged_in_release}
        if as_json:
            typer.echo(_json.dumps(entry, sort_keys=True))
        else:
            typer.echo(f"  counter {p.counter}: epsilon {p.epsilon:.4g} at delta {devices[0].epsilon_delta:.0e}, "
                       f"received {_iso(p.received_at_ms)}, packet {p.packet_id.hex()[:16]}, "
                       f"{'merged in ' + p.merged_in_release if p.merged_in_release else 'not merged'}")


@cloud_app.command("packets")
def cloud_packets(
    workspace: WorkspaceOpt,
    device: Annotated[str | None, typer.Option(help="Only this device's packets")] = None,
    unmerged: Annotated[bool, typer.Option("--unmerged", help="Only packets no release has merged yet")] = False,
    limit: Annotated[int, typer.Option(help="Show at most this many (the newest)")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per packet")] = False,
) -> None:
    """Stored packets, oldest first: device, counter, epsilon at delta, packet bytes, merge."""
    import json as _json

    if limit < 1:
        raise ConfigError("--limit must be at least 1")
    with CloudWorkspace.open(workspace).open_store() as store:
        packets = store.list_packets(unmerged_only=unmerged, device_id=device)
        delta = store.ledger_summary()["ledger_delta"]
    shown = packets[-limit:]
    for p in shown:
        row = {"packet_id": p.packet_id.hex(), "device_id": p.device_id, "counter": p.counter,
               "epsilon": p.epsilon, "delta": delta, "packet_bytes": len(p.packet_bytes),
               "base_model_version": p.base_model_version, "received_at_ms": p.received_at_ms,
               "merged_in_release": p.merged_in_release}
        if as_json:
            typer.echo(_json.dumps(row, sort_keys=True))
        else:
            typer.echo(f"{p.packet_id.hex()[:16]} {p.device_id} counter {p.counter}: epsilon {p.epsilon:.4g} "
                       f"at delta {delta:.0e}, {len(p.packet_bytes):,} packet bytes, base {p.base_model_version[:12]}, "
                       f"{_iso(p.received_at_ms)}, {'merged in ' + p.merged_in_release if p.merged_in_release else 'not merged'}")
    if not as_json:
        more = f" (the newest {len(shown)} of {len(packets)})" if len(packets) > len(shown) else ""
        typer.echo(f"{len(packets)} packet(s){more}")


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
        settings=settings, passphrase=_passphrase(passphrase_env), progress=_step,
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
    executor: Annotated[str, typer.Option(help="Where the merge and re-KD run: inprocess or ray")] = "inprocess",
    address: Annotated[str, typer.Option(help="Ray: local (start one here), auto (the cluster this machine joined) or ray://host:port")] = "local",
    workers: Annotated[int | None, typer.Option(help="Ray local: CPUs to start it with (default 1)")] = None,
) -> None:
    """Open the stored packets, merge into the cloud model, re-KD, audit gate, publish next release."""
    from diredi_secure.ml.executor import make_executor

    from .jobs import JobSettings, default_audit_gate, merge_and_release

    _log_to(log_file, logging.WARNING if log_file is None else logging.INFO)
    settings = _settings(tiny)
    assert isinstance(settings, JobSettings)
    ws = CloudWorkspace.open(workspace)
    with ws.open_store() as store, make_executor(executor, address=address, workers=workers) as jobs_on:
        out = merge_and_release(
            ws, store, now=_now(), seed=seed, settings=settings,
            audit_gate=default_audit_gate(audit_profile), force_release=force_release,
            passphrase=_passphrase(passphrase_env), executor=jobs_on, progress=_step,
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
    kit: Annotated[Path | None, typer.Option("--kit", help="Device kit from `diredi provision kit` (the factory's way)")] = None,
    cloud_workspace: Annotated[Path | None, typer.Option("--cloud", help="LAB ONLY: provision from this cloud workspace's CA, on the cloud's machine")] = None,
    device_id: Annotated[str | None, typer.Option("--device-id", help="With --cloud: the device id (in its certificates)")] = None,
    target: Annotated[str | None, typer.Option(help="Cloud address host:port (default: the kit's; with --cloud 127.0.0.1:50051)")] = None,
    allow_unaudited: Annotated[bool, typer.Option("--allow-unaudited", help="Device policy: install releases attested not_audited (default: refuse them)")] = False,
) -> None:
    """Make a device workspace from a device kit (or, in a lab, from a cloud workspace's CA).

    The kit is checked first: manifest digests, certificates against the CA, each key against
    its certificate; nothing is left behind when it is refused."""
    from .provision import install_kit

    if (kit is None) == (cloud_workspace is None):
        raise ConfigError("give either --kit KIT (from `diredi provision kit`) or --cloud W (lab)")
    if kit is not None:
        if device_id is not None:
            raise ConfigError("--device-id comes from the kit; it goes with --cloud only")
        ws = install_kit(kit, workspace, now_ms=_now_ms(), target=target, allow_unaudited=allow_unaudited)
    else:
        if device_id is None:
            raise ConfigError("--cloud needs --device-id")
        assert cloud_workspace is not None
        ws = CloudWorkspace.open(cloud_workspace).provision_device(
            workspace, device_id, target=target or "127.0.0.1:50051", now_ms=_now_ms(),
            allow_unaudited=allow_unaudited)
    policy = "accepts" if allow_unaudited else "refuses"
    typer.echo(f"device {ws.device_id} provisioned in {ws.root} ({policy} unaudited releases)")


from .provision_cli import edge_renew, export_public_command  # noqa: E402 - the commands mount here

edge_app.command("renew")(edge_renew)
cloud_app.command("export-public")(export_public_command)


ServerOpt = Annotated[
    str | None, typer.Option("--server", help="Cloud address host:port (saved in the device config)")
]
InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="Plaintext gRPC, NO TLS (a cloud served with --insecure; tests only)")
]


def _agent(workspace: Path, insecure: bool, server: str | None = None) -> EdgeAgent:
    """An agent for ``workspace``; ``--server`` is used for this call and saved in the device
    config only once the call has succeeded (see :func:`_remember_server`), so a typo is not kept."""
    ws = DeviceWorkspace.open(workspace)
    return EdgeAgent(ws, insecure=insecure, target=server)


def _remember_server(workspace: Path, server: str | None) -> None:
    if server is not None:
        DeviceWorkspace.open(workspace).update_config(target=server)


@edge_app.command("enroll")
def edge_enroll(workspace: WorkspaceOpt, server: ServerOpt = None, insecure: InsecureOpt = False) -> None:
    """Register the device with the cloud (proof of possession of its key)."""
    with _agent(workspace, insecure, server) as agent:
        typer.echo(f"enrolled as {agent.enroll()}")
    _remember_server(workspace, server)


@edge_app.command("status")
def edge_status(workspace: WorkspaceOpt, server: ServerOpt = None, insecure: InsecureOpt = False) -> None:
    """Ask the cloud for this device's status and epsilon ledger."""
    with _agent(workspace, insecure, server) as agent:
        s = agent.status()
    _remember_server(workspace, server)
    typer.echo(f"{s.device_id}: {s.status}, epsilon {s.epsilon_spent:.4g} of {s.epsilon_budget:.4g} "
               f"at delta {s.epsilon_delta:.0e} (composed), counter {s.highest_counter}")


@edge_app.command("submit")
def edge_submit(
    workspace: WorkspaceOpt,
    packet: Annotated[Path | None, typer.Option(help="A sealed packet file (default: resend the outbox)")] = None,
    server: ServerOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Submit a packet (or every unacknowledged one) with retries; verify each receipt."""
    with _agent(workspace, insecure, server) as agent:
        bodies = ([agent.submit(_read_file(packet, "packet", agent.config.limits.max_packet_bytes))]
                  if packet is not None else agent.flush_outbox())
    _remember_server(workspace, server)
    for body in bodies:
        typer.echo(f"acknowledged {body.packet_id.hex()} counter {body.counter} at {body.stored_at_ms}")


@edge_app.command("update")
def edge_update(
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w", help="Device workspace (updates over gRPC)")] = None,
    from_dir: Annotated[Path | None, typer.Option("--from", help="Update from a local release folder instead (no server)")] = None,
    state: Annotated[Path, typer.Option(help="With --from: the device state folder")] = Path("device"),
    trusted_root: Annotated[Path | None, typer.Option("--trusted-root", "--root", help="Root metadata to trust first (default: the one from provisioning)")] = None,
    server: ServerOpt = None,
    insecure: InsecureOpt = False,
    allow_unaudited: Annotated[bool, typer.Option("--allow-unaudited", help="With --from: accept a release attested not_audited (a device workspace follows its own policy, set at edge init)")] = False,
) -> None:
    """Fetch, verify (TUF + attestation) and install the newest release for this device.

    Over gRPC from the device workspace: its own release (devices/<id>/, signed by its delegated
    role) when the cloud published one, else the fleet release. With ``--from DIR``: from a local
    release folder into ``--state`` (as ``diredi release`` publishes it).
    """
    if (workspace is None) == (from_dir is None):
        raise ConfigError("give either --workspace (update over gRPC) or --from DIR (a local release folder)")
    if allow_unaudited and workspace is not None:
        raise ConfigError("--allow-unaudited goes with --from: a device workspace follows its own "
                          "policy (edge init --allow-unaudited)")
    if from_dir is not None:
        from diredi_secure.release.cli import edge_update as update_from_folder

        update_from_folder(from_dir=from_dir, state=state, root=trusted_root, allow_unaudited=allow_unaudited)
        return
    from .edge import update_device  # not .jobs: the update path stays free of torch

    assert workspace is not None
    with _agent(workspace, insecure, server) as agent:
        root = _read_file(trusted_root, "trusted root", 1024 * 1024) if trusted_root is not None else None
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
    insecure: InsecureOpt = False,
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
                   f"epsilon {eps:.3f} at delta {out.dp.delta:.0e}, {out.payload_bytes:,} payload bytes, "
                   f"{out.packet_bytes:,} packet bytes, {out.seconds:.1f} s")
        if submit:
            body = agent.submit(out.sealed.data)
            typer.echo(f"acknowledged {body.packet_id.hex()} counter {body.counter} at {body.stored_at_ms}")
        else:
            typer.echo("queued in the outbox: send it with `diredi edge submit`")

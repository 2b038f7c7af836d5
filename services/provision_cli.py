"""``diredi provision ...`` (the factory), ``diredi cloud export-public`` and ``diredi edge renew``.

The factory side needs the device CA folder and the cloud's public export, never the cloud
workspace. Expected failures raise :class:`DirediError` subclasses (one line, exit 2).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from diredi_secure._secrets import passphrase_from_env as _passphrase

from .provision import CloudPublic, apply_renewal, build_kit, build_renewal, export_public, load_ca
from .workspace import CloudWorkspace, DeviceWorkspace

__all__ = ["app", "edge_renew", "export_public_command"]

app = typer.Typer(
    help="Factory provisioning: device kits from the device CA, and certificate renewal.",
    no_args_is_help=True,
)

CaOpt = Annotated[Path, typer.Option("--ca", help="Device CA folder (ca.key and ca.crt)")]
CaPassEnv = Annotated[
    str | None,
    typer.Option(help="Name of an env var holding the device CA key's passphrase"),
]
ValidDays = Annotated[int, typer.Option(min=1, max=36500, help="Certificate validity in days")]


def _now_ms() -> int:
    return int(time.time() * 1000)


@app.command("kit")
def provision_kit(
    device_id: Annotated[str, typer.Option("--device-id", help="Device id (in its certificates)")],
    public: Annotated[
        Path,
        typer.Option("--public", help="The cloud's public files (`diredi cloud export-public`)"),
    ],
    target: Annotated[str, typer.Option(help="Cloud address host:port the device will call")],
    out: Annotated[Path, typer.Option("--out", help="Kit folder to create (must not exist)")],
    ca: CaOpt = Path("device-ca"),
    ca_passphrase_env: CaPassEnv = None,
    valid_days: ValidDays = 3650,
) -> None:
    """Write a self-contained device kit from the device CA, for `diredi edge init --kit`.

    Signing key + certificate, TLS identity, CA chain, TUF root, inbox key, cloud address, and
    kit.json listing every file's SHA-256 (private files 0600)."""
    ca_key, ca_cert = load_ca(ca, _passphrase(ca_passphrase_env))
    build_kit(out, ca_key=ca_key, ca_cert=ca_cert, device_id=device_id,
              public=CloudPublic.load(public), target=target, now_ms=_now_ms(),
              valid_days=valid_days)  # fmt: skip
    typer.echo(
        f"device kit for {device_id} written to {out} (install: diredi edge init DIR --kit {out})"
    )


@app.command("renew")
def provision_renew(
    device_certs: Annotated[
        Path,
        typer.Option(
            "--from",
            help="Folder with the device's current device.crt and tls.crt "
            "(public files; a device workspace will do)",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Renewal folder to create (must not exist)")],
    ca: CaOpt = Path("device-ca"),
    ca_passphrase_env: CaPassEnv = None,
    valid_days: ValidDays = 3650,
) -> None:
    """Reissue an enrolled device's certificates for the keys it already has.

    New serial and validity, same id. Install with `diredi edge renew`, then `diredi edge
    enroll`: the cloud keeps the device's epsilon ledger."""
    ca_key, ca_cert = load_ca(ca, _passphrase(ca_passphrase_env))
    device_id, _ = build_renewal(out, ca_key=ca_key, ca_cert=ca_cert, device_certs=device_certs,
                                 now_ms=_now_ms(), valid_days=valid_days)  # fmt: skip
    typer.echo(f"renewed certificates for {device_id} written to {out}")


def export_public_command(
    workspace: Annotated[Path, typer.Option("--workspace", "-w", help="Cloud workspace")],
    out: Annotated[Path, typer.Option("--out", help="Folder to create (must not exist)")],
) -> None:
    """Write what a factory needs from the cloud, nothing private (for `diredi provision kit`).

    The device CA certificate (the devices' TLS trust root), the TUF root v1, the inbox public
    key, the server name."""
    export_public(CloudWorkspace.open(workspace), out)
    typer.echo(f"public provisioning files written to {out} (give them to the factory)")


def edge_renew(
    workspace: Annotated[Path, typer.Option("--workspace", "-w", help="Device workspace")],
    renewal: Annotated[
        Path, typer.Option("--kit", help="Renewal folder from `diredi provision renew`")
    ],
) -> None:
    """Install renewed certificates from `diredi provision renew` (checked first).

    They are checked against this device's CA and keys; then run `diredi edge enroll` so the
    cloud stores them."""
    device_id = apply_renewal(DeviceWorkspace.open(workspace), renewal, now_ms=_now_ms())
    typer.echo(f"certificates of {device_id} renewed: run `diredi edge enroll` to register them")

"""The ``diredi`` command.

Expected failures (every :class:`~diredi_secure.errors.DirediError`, a missing file, a bad
argument) exit with status 2 and one line on stderr, never a traceback. Sub-commands of the other
layers (release, audit, cloud, edge, bench, ml) are mounted from their own modules.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from typer.exceptions import TyperException

from . import _crypto
from ._secrets import passphrase_from_env as _passphrase
from .errors import ConfigError, DirediError
from .knowledge import DPParameters, KnowledgePayload, PayloadKind, PayloadTensor, WireDType
from .packet import (
    MemoryDeviceDirectory,
    MemoryReplayState,
    inspect_packet,
    open_packet,
    seal_packet,
)

app = typer.Typer(
    name="diredi",
    help="DiReDi-secure: private reverse distillation for edge AI models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
keys_app = typer.Typer(help="Create device CA, device and inbox keys.", no_args_is_help=True)
packet_app = typer.Typer(help="Seal, open and inspect knowledge packets.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(packet_app, name="packet")

out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)

PassEnv = Annotated[
    str | None,
    typer.Option(
        help="Name of an environment variable holding the key passphrase (keys are stored encrypted)."
    ),
]


def _now_ms() -> int:
    return int(time.time() * 1000)



def _read(path: Path, what: str, cap: int = 256 * 1024 * 1024) -> bytes:
    from .checkpoint import read_regular_file
    from .errors import KeyFileError, TooLarge

    try:  # a regular file only (no FIFO, no /dev/zero link), never more than cap bytes read
        return read_regular_file(path, what, cap)
    except (KeyFileError, TooLarge) as exc:
        raise ConfigError(exc.one_line().split(": ", 1)[-1], reason="file") from exc


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ------------------------------------------------------------------------------------------------
# keys
# ------------------------------------------------------------------------------------------------
@keys_app.command("device-ca")
def keys_device_ca(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for ca.key and ca.crt")] = Path(
        "device-ca"
    ),
    name: Annotated[str, typer.Option(help="CA common name")] = "DiReDi device CA",
    valid_days: Annotated[int, typer.Option(help="Certificate validity in days")] = 3650,
    passphrase_env: PassEnv = None,
) -> None:
    """Create the manufacturer's device CA (Ed25519 key and self-signed certificate)."""
    key = _crypto.generate_signing_key()
    cert = _crypto.create_ca_certificate(
        key,
        common_name=name,
        now_ms=_now_ms(),
        valid_days=valid_days,
        serial=secrets.randbits(63) + 1,
    )
    _crypto.save_signing_key(key, out_dir / "ca.key", _passphrase(passphrase_env))
    _write(out_dir / "ca.crt", cert)
    out.print(f"device CA written to {out_dir}/ (key id {key.key_id.hex()})")


@keys_app.command("device")
def keys_device(
    device_id: Annotated[str, typer.Option("--id", help="Device id (goes in the certificate)")],
    ca_dir: Annotated[Path, typer.Option("--ca", help="Folder with ca.key and ca.crt")] = Path(
        "device-ca"
    ),
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for device.key and device.crt")
    ] = Path("device"),
    valid_days: Annotated[int, typer.Option(help="Certificate validity in days")] = 3650,
    ca_passphrase_env: PassEnv = None,
    passphrase_env: PassEnv = None,
) -> None:
    """Create a device signing key and certificate, for `packet seal` and the library.

    A device that runs `diredi edge` needs a whole kit instead: `diredi provision kit`.
    """
    _crypto.validate_device_id(device_id)
    ca_key = _crypto.load_signing_key(ca_dir / "ca.key", _passphrase(ca_passphrase_env))
    ca_cert = _read(ca_dir / "ca.crt", "CA certificate")
    key = _crypto.generate_signing_key()
    cert = _crypto.issue_device_certificate(
        ca_key,
        ca_cert,
        device_id=device_id,
        device_public_key=key.public_key,
        serial=secrets.randbits(63) + 1,
        now_ms=_now_ms(),
        valid_days=valid_days,
    )
    _crypto.save_signing_key(key, out_dir / "device.key", _passphrase(passphrase_env))
    _write(out_dir / "device.crt", cert)
    out.print(f"device {device_id} written to {out_dir}/ (key id {key.key_id.hex()})")


@keys_app.command("inbox")
def keys_inbox(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for inbox.key and inbox.pub")
    ] = Path("inbox"),
    passphrase_env: PassEnv = None,
) -> None:
    """Create the cloud's HPKE inbox key (X25519 + ML-KEM-768)."""
    key = _crypto.generate_inbox_key()
    _crypto.save_inbox_key(key, out_dir / "inbox.key", _passphrase(passphrase_env))
    _write(out_dir / "inbox.pub", key.public_key.pem)
    out.print(f"inbox key written to {out_dir}/ (key id {key.key_id.hex()})")


# ------------------------------------------------------------------------------------------------
# packet
# ------------------------------------------------------------------------------------------------
def _payload_from_npz(path: Path, dtype: str) -> KnowledgePayload:
    raw = _read(path, "payload file", 64 * 1024 * 1024)

    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
    except (ValueError, OSError) as exc:
        raise ConfigError(f"payload file {path} is not a .npz of plain arrays") from exc
    kinds = {k.value for k in PayloadKind}
    unknown = sorted(set(arrays) - kinds - {f"{k}.index" for k in kinds})
    if unknown or not arrays:
        raise ConfigError(
            f"payload arrays must be named by kind ({', '.join(sorted(kinds))}); got {unknown or 'none'}"
        )
    if dtype not in ("float32", "float16", "int8"):
        raise ConfigError(f"--dtype must be float32, float16 or int8, not {dtype!r}")
    wire: WireDType = dtype  # type: ignore[assignment]  # checked just above
    tensors = [
        PayloadTensor(
            name=k, kind=PayloadKind(k), values=v, dtype=wire, index=arrays.get(f"{k}.index")
        )
        for k, v in arrays.items()
        if k in kinds
    ]
    return KnowledgePayload(tuple(tensors))


@packet_app.command("seal")
def packet_seal(
    payload: Annotated[
        Path, typer.Option(help=".npz with arrays named by payload kind (e.g. reference_logits)")
    ],
    dp_json: Annotated[
        Path,
        typer.Option(
            "--dp",
            help="JSON of the DP parameters used (noise_multiplier, clip_norm, sample_rate, steps, accountant, epsilon, delta, total_epsilon)",
        ),
    ],
    device_dir: Annotated[
        Path, typer.Option("--device", help="Folder with device.key and device.crt")
    ],
    inbox_pub: Annotated[Path, typer.Option("--inbox", help="Cloud inbox public key (inbox.pub)")],
    counter: Annotated[int, typer.Option(help="Per-device counter; must exceed every earlier one")],
    base_model: Annotated[
        str, typer.Option(help="Version of the shipped model the payload was computed against")
    ],
    output: Annotated[Path, typer.Option("--out", help="Where to write the packet")],
    suite: Annotated[
        int,
        typer.Option(
            help="HPKE suite: 1 X25519/AES-128-GCM, 2 X25519/ChaCha20-Poly1305, 3 ML-KEM-768+X25519/AES-256-GCM"
        ),
    ] = 1,
    dtype: Annotated[str, typer.Option(help="Wire dtype: float32, float16 or int8")] = "float16",
    passphrase_env: PassEnv = None,
) -> None:
    """Seal a payload into a signed packet encrypted to the cloud's inbox key."""
    key = _crypto.load_signing_key(device_dir / "device.key", _passphrase(passphrase_env))
    cert = _read(device_dir / "device.crt", "device certificate")
    try:
        dp = DPParameters(**json.loads(_read(dp_json, "DP parameters file", 64 * 1024)))
    except (TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"DP parameters file {dp_json}: {exc}") from exc
    device_id = _device_id_of(cert)
    sealed = seal_packet(
        _payload_from_npz(payload, dtype),
        device_key=key,
        device_id=device_id,
        counter=counter,
        base_model_version=base_model,
        dp=dp,
        inbox=_crypto.load_inbox_public_key(_read(inbox_pub, "inbox public key", 64 * 1024)),
        now_ms=_now_ms(),
        random_bytes=os.urandom,
        suite=_crypto.suite_from_wire(suite),
        device_certificate=cert,
    )
    _write(output, sealed.data)
    out.print(f"sealed packet {sealed.packet_id.hex()} ({len(sealed.data):,} packet bytes) -> {output}",
              markup=False)


def _device_id_of(cert_der: bytes) -> str:
    return _crypto.certificate_subject_cn(cert_der)


def _header_dict(header: Any) -> dict[str, Any]:
    return {
        "format_version": header.format_version,
        "suite": header.suite.name,
        "packet_id": header.packet_id.hex(),
        "device_id": header.device_id,
        "counter": header.counter,
        "created_at_ms": header.created_at_ms,
        "base_model_version": header.base_model_version,
        "payload": {
            "length": header.payload.length,
            "sha256": header.payload.sha256.hex(),
            "entries": [
                {
                    "name": e.name,
                    "kind": e.kind.value,
                    "dtype": e.dtype,
                    "shape": list(e.shape),
                    "index_length": e.index_length,
                    "noise_multiplier": e.noise_multiplier,
                    "epsilon": e.epsilon,
                }
                for e in header.payload.entries
            ],
        },
        "dp": {k: getattr(header.dp, k) for k in header.dp.__dataclass_fields__},
        "recipient_key_id": header.recipient_key_id.hex(),
        "signer_key_id": header.signer_key_id.hex(),
    }


@packet_app.command("inspect")
def packet_inspect(
    file: Annotated[Path, typer.Argument(help="Sealed packet file")],
) -> None:
    """Print a packet's header as JSON. Verifies NOTHING and needs no key."""
    header = inspect_packet(_read(file, "packet"))
    out.print_json(json.dumps({"verified": False, "header": _header_dict(header)}))


@packet_app.command("open")
def packet_open(
    file: Annotated[Path, typer.Argument(help="Sealed packet file")],
    inbox_dir: Annotated[Path, typer.Option("--inbox", help="Folder with inbox.key")],
    ca_cert: Annotated[Path, typer.Option("--ca-cert", help="Device CA certificate (ca.crt)")],
    device_cert: Annotated[
        list[Path], typer.Option("--device-cert", help="Enrolled device certificate(s)")
    ],
    passphrase_env: PassEnv = None,
) -> None:
    """Verify and decrypt a packet against the given enrolled devices; print header and payload summary."""
    inbox = _crypto.load_inbox_key(inbox_dir / "inbox.key", _passphrase(passphrase_env))
    directory = MemoryDeviceDirectory()
    for path in device_cert:
        cert = _read(path, "device certificate")
        directory.enroll(_device_id_of(cert), cert)
    opened = open_packet(
        _read(file, "packet"),
        inbox_key=inbox,
        device_ca=_read(ca_cert, "CA certificate"),
        devices=directory,
        replay=MemoryReplayState(),
        now_ms=_now_ms(),
    )
    summary = {
        "verified": True,
        "header": _header_dict(opened.header),
        "payload": [
            {
                "name": t.name,
                "kind": t.kind.value,
                "shape": list(t.values.shape),
                "l2_norm": float(np.linalg.norm(t.values)),
                "mean": float(t.values.mean()) if t.values.size else 0.0,
            }
            for t in opened.payload.tensors
        ],
    }
    out.print_json(json.dumps(summary))


# ------------------------------------------------------------------------------------------------
# demo and sub-apps of other layers
# ------------------------------------------------------------------------------------------------
@app.command("demo-protocol", hidden=True)
def demo_protocol() -> None:
    """Show the protocol: seal, open, and refusals of a tampered copy, a replay and a revoked device."""
    from .demo_protocol import run_protocol_demo

    run_protocol_demo(out)


#: Commands that were twins of another and were removed, each pointing to the one kept (a script
#: that still calls the old name stops with one line saying what to run instead, exit 2).
MOVED_COMMANDS: dict[str, str] = {
    "scenario make": "ml scenario --out DIR [--seed N]",
}


def _moved(old: str, new: str) -> Any:
    def command(ctx: typer.Context) -> None:
        raise ConfigError(f"`diredi {old}` was removed: run `diredi {new}`", reason="moved")

    command.__doc__ = f"Removed: run `diredi {new}`."
    return command


_MOVED_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}
app.command("scenario", hidden=True, context_settings=_MOVED_SETTINGS)(
    _moved("scenario make", MOVED_COMMANDS["scenario make"])
)


_SUBAPPS = (
    # (module, attribute, name, help)
    (
        "diredi_secure.release.cli",
        "app",
        "release",
        "Publish and verify signed model releases (TUF).",
    ),
    ("diredi_secure.audits.cli", "app", "audit", "Privacy-leakage audit of knowledge packets."),
    ("diredi_secure.services.cli", "cloud_app", "cloud", "Run the cloud: init, distill, serve, revoke, merge."),
    (
        "diredi_secure.services.cli",
        "edge_app",
        "edge",
        "Run a device: init, enroll, status, update, reverse, submit.",
    ),
    (
        "diredi_secure.services.provision_cli",
        "app",
        "provision",
        "Factory provisioning: device kits from the device CA; certificate renewal.",
    ),
    ("diredi_secure.ml.cli", "app", "ml", "The learning loop in one process: a scenario, then KD, DP RD, merge, re-KD."),
    ("diredi_secure.benchmarks.cli", "app", "bench", "Reproduction and performance benchmarks."),
)


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"diredi {version('diredi-secure')}")
        except PackageNotFoundError:  # running from a source tree that was never installed
            typer.echo("diredi (not installed)")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_version_callback, is_eager=True),
    ] = False,
) -> None:
    """DiReDi-secure: private reverse distillation for edge AI models."""


def _mount_subapps() -> None:
    for module_name, attr, name, help_text in _SUBAPPS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that layer is not built in this checkout
            raise
        sub = getattr(module, attr, None)
        if isinstance(sub, typer.Typer):
            app.add_typer(sub, name=name, help=help_text)


def _mount_demo() -> None:
    try:
        module = importlib.import_module("diredi_secure.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "diredi_secure.demo":
            raise
        app.command("demo", help="Run the demo (the protocol round trip and its refusals).")(
            demo_protocol
        )
        return
    app.command("demo", help="Run the whole DiReDi loop: a cloud and three devices over gRPC.")(module.demo_command)
    app.command("demo-device", hidden=True)(module.demo_device_command)


_mount_subapps()
_mount_demo()


def main(argv: list[str] | None = None) -> int:
    """Entry point: expected failures exit 2 with one line, never a traceback."""
    try:
        result = app(args=argv, prog_name="diredi", standalone_mode=False)
    except DirediError as exc:
        err.print(f"diredi: {exc.one_line()}", markup=False)
        return 2
    except typer.Abort:
        err.print("diredi: aborted", markup=False)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except TyperException as exc:  # usage errors: bad option, missing argument
        if "NoArgsIsHelp" in type(exc).__name__:
            return 0
        err.print(f"diredi: {exc.format_message()}", markup=False)
        return 2
    except KeyboardInterrupt:
        err.print("diredi: interrupted", markup=False)
        return 130
    except FileNotFoundError as exc:
        err.print(f"diredi: not found: {exc.filename}", markup=False)
        return 2
    except OSError as exc:  # a folder where a file was expected, a full disk, a port in use...
        where = f": {exc.filename}" if exc.filename else ""
        err.print(f"diredi: {exc.strerror or type(exc).__name__}{where}", markup=False)
        return 2
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

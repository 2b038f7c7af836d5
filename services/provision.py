"""Factory provisioning: device kits made from the device CA and the cloud's public files only.

The cloud workspace never leaves the cloud. What the factory needs from it is public and comes
out of ``diredi cloud export-public`` (:func:`export_public`): the device CA certificate (the TLS
trust root devices pin for the cloud endpoint, whose server certificate it issued), root metadata
v1 of the release repository (the TUF trust anchor), the inbox public key and the server name.
The factory holds the device CA folder (``ca.key`` + ``ca.crt``) and, per device, writes a
**device kit** (:func:`build_kit`)::

    kit.json            {"format": "diredi-device-kit/1", "device_id", "target", "server_name",
                         "issued_at_ms", "files": {name: {"sha256", "bytes"}}}
    device.key          Ed25519 packet-signing key (0600)
    device.crt          its certificate (DER) from the device CA
    tls.key, tls.crt    mTLS client identity (ECDSA P-256, 0600; PEM certificate, same device id)
    ca.crt              the device CA certificate (DER): chain and TLS trust root
    trusted_root.json   TUF root metadata v1
    inbox.pub           the cloud's inbox public key (when the cloud exported one)

``diredi edge init --kit KIT`` (:func:`install_kit`) checks the kit and builds the device workspace
in a private folder renamed into place only once everything verified, so a refused kit leaves no
device behind. The manifest's digests catch a kit damaged or altered on its way (a truncated copy,
a swapped file); they are not a signature: a kit travels from the factory line to the device over
a channel the factory trusts, as NVFlare's startup kits do.

Certificate renewal keeps the device's keys: :func:`build_renewal` reads only a device's *public*
certificates and reissues them (new serial, new validity, same id and keys); :func:`apply_renewal`
installs them on the device after checking they certify its own keys. Enrolling again then
replaces the certificate in the cloud's store, which keeps the device's epsilon ledger, budget and
replay counter (``Store.register_device(renew=True)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, Root

from diredi_secure import _crypto
from diredi_secure.checkpoint import atomic_write_bytes, read_regular_file
from diredi_secure.errors import CertificateInvalid, ConfigError, KeyFileError, TooLarge
from diredi_secure.policy import DEFAULT_POLICY

from .workspace import CloudWorkspace, DeviceWorkspace

__all__ = [
    "KIT_FORMAT",
    "PUBLIC_FORMAT",
    "RENEWAL_FORMAT",
    "CloudPublic",
    "KitInvalid",
    "KitLimits",
    "apply_renewal",
    "build_kit",
    "build_renewal",
    "export_public",
    "install_kit",
    "load_ca",
]

KIT_FORMAT = "diredi-device-kit/1"
RENEWAL_FORMAT = "diredi-device-renewal/1"
PUBLIC_FORMAT = "diredi-cloud-public/1"
MANIFEST = "kit.json"
PUBLIC_MANIFEST = "public.json"

_KIT_FILES = {
    "device.key",
    "device.crt",
    "tls.key",
    "tls.crt",
    "ca.crt",
    "trusted_root.json",
    "inbox.pub",
}
# A lab cloud made without a release repository has no root to hand out (nor any release).
_KIT_REQUIRED = _KIT_FILES - {"inbox.pub", "trusted_root.json"}
_PRIVATE = {"device.key", "tls.key"}
_RENEWAL_FILES = {"device.crt", "tls.crt"}


class KitInvalid(ConfigError):
    """A device kit, renewal or public export is incomplete, damaged or inconsistent."""

    reason = "kit_invalid"


@dataclass(frozen=True)
class KitLimits:
    """Caps on what a kit may hold (a kit is read before anything in it is trusted)."""

    max_manifest_bytes: int = 64 * 1024
    max_file_bytes: int = 4 * 1024 * 1024  # root metadata with many keys; certificates are ~1 KiB
    max_certificate_bytes: int = 8 * 1024


DEFAULT_KIT_LIMITS = KitLimits()


def _serial() -> int:
    return secrets.randbits(63) + 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: Path, what: str, cap: int, *, private: bool = False) -> bytes:
    """A kit file through the one bounded reader (regular files only, at most ``cap`` bytes, 0600
    if ``private``); every refusal is a :class:`KitInvalid`."""
    try:
        return read_regular_file(path, what, cap, private=private)
    except (KeyFileError, TooLarge) as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise KitInvalid(f"{what} {path} is missing") from exc
        raise KitInvalid(exc.message) from exc


def _check_trusted_root(data: bytes) -> None:
    """Root metadata that parses and is signed by a threshold of its own root keys."""
    try:
        md = Metadata[Root].from_bytes(data)
        if not isinstance(md.signed, Root):
            raise KitInvalid("trusted_root.json is not root metadata")
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except KitInvalid:
        raise
    except (RepositoryError, ValueError, KeyError, TypeError) as exc:
        raise KitInvalid(f"trusted_root.json is not self-signed TUF root metadata: {exc}") from exc


@contextmanager
def _building(final: Path, what: str) -> Iterator[Path]:
    """A private folder next to ``final``, renamed onto it when the block succeeds, removed when
    it fails: a refused kit leaves nothing behind (``final`` must not exist, or be empty)."""
    final = Path(final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise ConfigError(f"{final} exists and is not an empty folder; {what} goes to a new one")
    final.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        os.chmod(building, 0o700)
        yield building
        os.replace(building, final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------
# What the cloud publishes
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CloudPublic:
    """The public things a device needs from the cloud, validated on construction."""

    ca_cert: bytes  # DER
    trusted_root: bytes | None
    server_name: str | None
    inbox_public_pem: bytes | None = None

    def __post_init__(self) -> None:
        _crypto.certificate_pem(self.ca_cert)  # DER that parses (CertificateInvalid)
        if self.trusted_root is not None:
            _check_trusted_root(self.trusted_root)
        if self.inbox_public_pem is not None:
            _crypto.load_inbox_public_key(self.inbox_public_pem)
        if self.server_name is not None and not (0 < len(self.server_name) <= 253):
            raise KitInvalid("server_name must be 1-253 characters")

    @classmethod
    def from_cloud(cls, ws: CloudWorkspace) -> CloudPublic:
        root = ws.trusted_root()
        if root is None:
            raise ConfigError(f"{ws.root} has no release repository: no trust anchor to export")
        inbox = ws.root / "inbox.pub"
        return cls(
            ca_cert=_read(ws.ca_dir / "ca.crt", "CA certificate", 1 << 20),
            trusted_root=root,
            server_name=ws.settings().server.hostnames[0],
            inbox_public_pem=_read(inbox, "inbox public key", 1 << 20) if inbox.is_file() else None,
        )

    def files(self) -> dict[str, bytes]:
        out = {"ca.crt": self.ca_cert}
        if self.trusted_root is not None:
            out["trusted_root.json"] = self.trusted_root
        if self.inbox_public_pem is not None:
            out["inbox.pub"] = self.inbox_public_pem
        return out

    @classmethod
    def load(cls, folder: Path, *, limits: KitLimits = DEFAULT_KIT_LIMITS) -> CloudPublic:
        """Read an export written by :func:`export_public`; raises :class:`KitInvalid`."""
        manifest, files = _read_manifested(
            Path(folder),
            PUBLIC_MANIFEST,
            PUBLIC_FORMAT,
            allowed={"ca.crt", "trusted_root.json", "inbox.pub"},
            required={"ca.crt", "trusted_root.json"},
            limits=limits,
        )
        server_name = manifest.get("server_name")
        if server_name is not None and not isinstance(server_name, str):
            raise KitInvalid("public.json: server_name must be a string")
        return cls(
            ca_cert=files["ca.crt"],
            trusted_root=files["trusted_root.json"],
            server_name=server_name,
            inbox_public_pem=files.get("inbox.pub"),
        )


def export_public(ws: CloudWorkspace, out: Path) -> Path:
    """Write the cloud's public provisioning files to a new folder ``out`` (no private key)."""
    public = CloudPublic.from_cloud(ws)
    with _building(out, "the export") as building:
        _write_manifested(
            building,
            PUBLIC_MANIFEST,
            PUBLIC_FORMAT,
            public.files(),
            {"server_name": public.server_name},
        )
    return Path(out)


# ------------------------------------------------------------------------------------------------
# Manifests
# ------------------------------------------------------------------------------------------------
def _write_manifested(
    folder: Path,
    name: str,
    fmt: str,
    files: dict[str, bytes],
    fields: dict[str, Any],
    *,
    already_written: frozenset[str] = frozenset(),
) -> None:
    listing = {}
    for fname, data in sorted(files.items()):
        if fname not in already_written:
            atomic_write_bytes(folder / fname, data, private=fname in _PRIVATE)
        listing[fname] = {"sha256": _sha256(data), "bytes": len(data)}
    manifest = {"format": fmt, **fields, "files": listing}
    atomic_write_bytes(
        folder / name, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    )


def _read_manifested(
    folder: Path, name: str, fmt: str, *, allowed: set[str], required: set[str], limits: KitLimits
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and every file it lists, each checked against its length and SHA-256.

    Refuses a missing or unknown format, a file the manifest does not list or lists but lacks, a
    name outside ``allowed``, and a private file others may read."""
    if not folder.is_dir():
        raise KitInvalid(f"{folder} is not a folder")
    try:
        manifest = json.loads(_read(folder / name, "manifest", limits.max_manifest_bytes))
    except (ValueError, RecursionError) as exc:
        raise KitInvalid(f"{folder / name} is not JSON") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise KitInvalid(f"{folder / name}: format {got!r} is not {fmt!r}")
    listing = manifest.get("files")
    if not isinstance(listing, dict):
        raise KitInvalid(f"{folder / name}: 'files' must be an object")
    unknown = set(listing) - allowed
    if unknown:
        raise KitInvalid(f"{folder / name} lists files no kit holds: {sorted(unknown)}")
    missing = required - set(listing)
    if missing:
        raise KitInvalid(f"{folder / name} does not list {sorted(missing)}")
    present = {p.name for p in folder.iterdir()} - {name}
    unlisted = present - set(listing)
    if unlisted:
        raise KitInvalid(f"{folder} holds files its manifest does not list: {sorted(unlisted)}")
    files: dict[str, bytes] = {}
    for fname, entry in sorted(listing.items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise KitInvalid(f"{folder / name}: entry for {fname} needs a sha256")
        path = folder / fname
        data = _read(path, fname, limits.max_file_bytes, private=fname in _PRIVATE)
        if _sha256(data) != entry["sha256"]:
            raise KitInvalid(f"{fname} in {folder} does not match its SHA-256 in {name}")
        files[fname] = data
    return manifest, files


# ------------------------------------------------------------------------------------------------
# Factory side
# ------------------------------------------------------------------------------------------------
def load_ca(ca_dir: Path, passphrase: bytes | None = None) -> tuple[_crypto.SigningKey, bytes]:
    """The device CA (``ca.key``, ``ca.crt``) from the factory's CA folder."""
    ca_dir = Path(ca_dir)
    return (
        _crypto.load_signing_key(ca_dir / "ca.key", passphrase),
        _read(ca_dir / "ca.crt", "CA certificate", 1 << 20),
    )


def _kit_files(
    ca_key: _crypto.SigningKey,
    ca_cert: bytes,
    *,
    device_id: str,
    now_ms: int,
    valid_days: int,
    passphrase: bytes | None,
    scratch: Path,
    serial: Callable[[], int],
) -> dict[str, bytes]:
    """A fresh device identity: the key files as the key savers write them (0600), certificates."""
    _crypto.validate_device_id(device_id)
    key = _crypto.generate_signing_key()
    cert = _crypto.issue_device_certificate(
        ca_key,
        ca_cert,
        device_id=device_id,
        device_public_key=key.public_key,
        serial=serial(),
        now_ms=now_ms,
        valid_days=valid_days,
    )
    tls_key = _crypto.generate_tls_key()
    tls_cert = _crypto.issue_tls_device_certificate(
        ca_key,
        ca_cert,
        device_id=device_id,
        tls_key=tls_key,
        serial=serial(),
        now_ms=now_ms,
        valid_days=valid_days,
    )
    _crypto.save_signing_key(key, scratch / "device.key", passphrase)
    _crypto.save_tls_key(tls_key, scratch / "tls.key")
    return {
        "device.key": (scratch / "device.key").read_bytes(),
        "device.crt": cert,
        "tls.key": (scratch / "tls.key").read_bytes(),
        "tls.crt": _crypto.certificate_pem(tls_cert),
    }


def build_kit(
    out: Path,
    *,
    ca_key: _crypto.SigningKey,
    ca_cert: bytes,
    device_id: str,
    public: CloudPublic,
    target: str,
    now_ms: int,
    valid_days: int = 3650,
    passphrase: bytes | None = None,
    serial: Callable[[], int] = _serial,
) -> Path:
    """Write a device kit for ``device_id`` to the new folder ``out`` (all or nothing).

    Raises :class:`KitInvalid` when the CA is not the one the cloud published (its devices would
    be refused at enrolment), :class:`ConfigError` for a bad device id or an ``out`` in use.
    """
    if public.ca_cert != ca_cert:
        raise KitInvalid(
            "the device CA's certificate is not the one the cloud exported: devices "
            "it provisions would be refused (wrong CA folder or export?)"
        )
    _check_target(target)
    with _building(out, "the kit") as building:
        files = _kit_files(
            ca_key,
            ca_cert,
            device_id=device_id,
            now_ms=now_ms,
            valid_days=valid_days,
            passphrase=passphrase,
            scratch=building,
            serial=serial,
        )
        files.update(public.files())
        _write_manifested(
            building,
            MANIFEST,
            KIT_FORMAT,
            files,
            {
                "device_id": device_id,
                "target": target,
                "server_name": public.server_name,
                "issued_at_ms": now_ms,
            },
            already_written=frozenset(_PRIVATE),
        )
    return Path(out)


def build_renewal(
    out: Path,
    *,
    ca_key: _crypto.SigningKey,
    ca_cert: bytes,
    device_certs: Path,
    now_ms: int,
    valid_days: int = 3650,
    serial: Callable[[], int] = _serial,
    limits: KitLimits = DEFAULT_KIT_LIMITS,
) -> tuple[str, Path]:
    """Reissue a device's two certificates for the keys they certify; returns (device id, out).

    ``device_certs`` is a folder with the device's current ``device.crt`` and ``tls.crt`` (public
    files: a device workspace, or a copy of just those two). Both must come from this CA and name
    the same device; they may have expired. Raises :class:`CertificateInvalid`, :class:`KitInvalid`.
    """
    folder = Path(device_certs)
    cap = limits.max_certificate_bytes
    old = {name: _read(folder / name, "certificate", cap) for name in sorted(_RENEWAL_FILES)}
    new_device = _crypto.reissue_device_certificate(
        ca_key,
        ca_cert,
        old["device.crt"],
        serial=serial(),
        now_ms=now_ms,
        valid_days=valid_days,
        max_bytes=cap,
    )
    new_tls = _crypto.reissue_device_certificate(
        ca_key,
        ca_cert,
        old["tls.crt"],
        serial=serial(),
        now_ms=now_ms,
        valid_days=valid_days,
        max_bytes=cap,
    )
    device_id = _crypto.check_device_certificate(new_device, ca_cert, now_ms=now_ms).device_id
    tls_id = _crypto.check_tls_device_certificate(new_tls, ca_cert, now_ms=now_ms)
    if tls_id != device_id:
        raise KitInvalid(f"device.crt names {device_id} but tls.crt names {tls_id}")
    with _building(out, "the renewal") as building:
        _write_manifested(
            building,
            MANIFEST,
            RENEWAL_FORMAT,
            {"device.crt": new_device, "tls.crt": _crypto.certificate_pem(new_tls)},
            {"device_id": device_id, "issued_at_ms": now_ms},
        )
    return device_id, Path(out)


def _check_target(target: str) -> None:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"cloud address {target!r} must be host:port")


# ------------------------------------------------------------------------------------------------
# Device side
# ------------------------------------------------------------------------------------------------
def install_kit(
    kit: Path,
    root: Path,
    *,
    now_ms: int,
    target: str | None = None,
    allow_unaudited: bool = False,
    passphrase: bytes | None = None,
    epsilon_budget: float = DEFAULT_POLICY.lifetime_epsilon_budget,
    limits: KitLimits = DEFAULT_KIT_LIMITS,
) -> DeviceWorkspace:
    """Make the device workspace ``root`` from a kit; all or nothing.

    Checked before the workspace appears: the manifest (format, every listed file present with its
    SHA-256, nothing unlisted, private files 0600), that ``device.crt`` and ``tls.crt`` verify
    against the kit's CA at ``now_ms`` and name the manifest's device, that each key is the one its
    certificate certifies, that the TUF root is self-signed, and that the inbox key parses.
    ``allow_unaudited`` is the device's own release policy (``device.json``): install releases
    attested ``not_audited``. Raises :class:`KitInvalid`, :class:`CertificateInvalid`,
    :class:`KeyFileError` (a wrong passphrase), :class:`ConfigError` (``root`` in use).
    """
    manifest, files = _read_manifested(
        Path(kit), MANIFEST, KIT_FORMAT, allowed=_KIT_FILES, required=_KIT_REQUIRED, limits=limits
    )
    device_id = manifest.get("device_id")
    if not isinstance(device_id, str):
        raise KitInvalid("kit.json: device_id must be a string")
    _crypto.validate_device_id(device_id)
    target = target if target is not None else manifest.get("target")
    if not isinstance(target, str):
        raise KitInvalid("kit.json: target must be a string (or give --target)")
    _check_target(target)
    server_name = manifest.get("server_name")
    if server_name is not None and not isinstance(server_name, str):
        raise KitInvalid("kit.json: server_name must be a string")
    public = CloudPublic(
        ca_cert=files["ca.crt"],
        trusted_root=files.get("trusted_root.json"),
        server_name=server_name,
        inbox_public_pem=files.get("inbox.pub"),
    )
    if DeviceWorkspace(Path(root)).config_path.exists():
        raise ConfigError(f"{root} is already a device workspace")
    with _building(Path(root), "the device workspace") as building:
        for name, data in files.items():
            atomic_write_bytes(building / name, data, private=name in _PRIVATE)
        _check_identity(
            files["device.crt"],
            files["tls.crt"],
            building,
            device_id,
            public.ca_cert,
            now_ms=now_ms,
            passphrase=passphrase,
        )
        ws = DeviceWorkspace(building)
        _write_json(
            ws.config_path,
            {
                "format": 1,
                "device_id": device_id,
                "target": target,
                "server_name": server_name,
                "receipt_public_key": None,
                "allow_unaudited": bool(allow_unaudited),
            },
        )
        _write_json(
            building / "ledger.json", {"budget": epsilon_budget, "spent": 0.0, "packets": {}}
        )
        atomic_write_bytes(building / "counter", b"0\n")
        ws.outbox.mkdir()
        ws.receipts.mkdir()
    return DeviceWorkspace(Path(root))


def _check_identity(
    device_crt: bytes,
    tls_crt: bytes,
    keys: Path,
    device_id: str,
    ca_cert: bytes,
    *,
    now_ms: int,
    passphrase: bytes | None,
) -> None:
    """Both certificates verify against the CA at ``now_ms``, name ``device_id`` and certify the
    keys in the folder ``keys`` (``device.key``, ``tls.key``). Raises CertificateInvalid."""
    cap = DEFAULT_KIT_LIMITS.max_certificate_bytes
    identity = _crypto.check_device_certificate(device_crt, ca_cert, now_ms=now_ms, max_bytes=cap)
    if identity.device_id != device_id:
        raise CertificateInvalid(f"device.crt names {identity.device_id}, not {device_id}")
    key = _crypto.load_signing_key(keys / "device.key", passphrase)
    if key.public_key != identity.public_key:
        raise CertificateInvalid(f"device.key is not the key device.crt certifies for {device_id}")
    tls_id = _crypto.check_tls_device_certificate(
        tls_crt,
        ca_cert,
        now_ms=now_ms,
        tls_key=_crypto.load_tls_key(keys / "tls.key"),
        max_bytes=cap,
    )
    if tls_id != device_id:
        raise CertificateInvalid(f"tls.crt names {tls_id}, not {device_id}")


def apply_renewal(
    ws: DeviceWorkspace,
    renewal: Path,
    *,
    now_ms: int,
    passphrase: bytes | None = None,
    limits: KitLimits = DEFAULT_KIT_LIMITS,
) -> str:
    """Install renewed certificates into a device workspace; returns the device id.

    Checked first (nothing changes otherwise): the manifest and digests, that both certificates
    verify against the device's own CA at ``now_ms``, name this device and certify this device's
    keys. Then ``tls.crt`` and ``device.crt`` are each replaced atomically. Enrol again afterwards
    (``diredi edge enroll``) so the cloud stores the new certificate; it keeps the ledger.
    """
    manifest, files = _read_manifested(
        Path(renewal),
        MANIFEST,
        RENEWAL_FORMAT,
        allowed=_RENEWAL_FILES,
        required=_RENEWAL_FILES,
        limits=limits,
    )
    device_id = ws.device_id
    if manifest.get("device_id") != device_id:
        raise KitInvalid(
            f"the renewal is for {manifest.get('device_id')!r}, this device is {device_id}"
        )
    _check_identity(
        files["device.crt"],
        files["tls.crt"],
        ws.root,
        device_id,
        ws.ca_certificate(),
        now_ms=now_ms,
        passphrase=passphrase,
    )
    atomic_write_bytes(ws.root / "tls.crt", files["tls.crt"])
    atomic_write_bytes(ws.root / "device.crt", files["device.crt"])
    return device_id


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")

"""Workspace folders of the cloud and of a device: layout, creation, and loading.

Cloud workspace (``diredi cloud init W``)::

    ca/ca.key, ca/ca.crt        device CA (Ed25519): issues device and server certificates. In
                                production it is kept offline by the manufacturer; a lab keeps it here.
    inbox.key, inbox.pub        HPKE inbox key (X25519 + ML-KEM-768); devices seal packets to it
    receipt.key                 Ed25519 key signing receipts
    tls/server.key, server.crt  the gRPC endpoint's TLS identity (ECDSA P-256, from the device CA)
    cloud.db                    the SQLite store (``[store] url`` in cloud.toml may name another
                                file or a PostgreSQL DSN, ``schema`` the PostgreSQL schema)
    repository/                 the TUF release repository (python-tuf; made at init, keys in
                                repository/keys/) that the UpdateService serves
    scenario/, models/, audits/ written by the learning jobs (services/jobs.py)
    releases.json               index of published models (version, prefix, role, sha256)
    cloud.toml                  the configuration (services/config.py: store, server, TLS, logs,
                                limits, privacy policy; no secrets; paths relative to the workspace)

Device workspace (``diredi edge init W --kit KIT``, from a device kit: services/provision.py)::

    device.key, device.crt      Ed25519 key signing packets, its certificate (DER) from the device CA
    tls.key, tls.crt            mTLS client identity (ECDSA P-256, PEM certificate, same device id)
    ca.crt                      device CA certificate (DER): the TLS trust root for the cloud
    inbox.pub                   the cloud's inbox public key (from provisioning or a release)
    trusted_root.json           the release repository's root metadata v1 (TUF trust anchor)
    device.json                 {"device_id", "target", "server_name", "receipt_public_key",
                                 "allow_unaudited" (release policy: default false), ...}
    counter                     last packet counter used (written atomically BEFORE sealing)
    ledger.json                 the device's own epsilon ledger
    outbox/<id>.packet          sealed packets not yet acknowledged (resent as the same bytes)
    receipts/<id>.receipt       verified receipts
    release/                    DeviceUpdater state (TUF cache, A/B slots)

Everything written goes through ``atomic_write_bytes`` (temp file, fsync, rename).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from diredi_secure import _crypto
from diredi_secure._crypto import (
    generate_tls_key,
    issue_tls_server_certificate,
    load_tls_key,
    save_tls_key,
)
from diredi_secure.checkpoint import atomic_write_bytes, read_private_bytes, read_regular_file
from diredi_secure.errors import ConfigError, KeyFileError, StoreError, TooLarge
from diredi_secure.policy import DEFAULT_LIMITS, DEFAULT_POLICY
from diredi_secure.privacy import DEFAULT_DP_POLICY, charge, curve_from_json, curve_to_json
from diredi_secure.release import ReleaseRepository
from diredi_secure.store import Store, is_postgres_url, open_store

from .cloud import CloudKeys
from .config import CONFIG_FILE, CloudConfig, initial_toml, load_config, parse_config
from .transport import ClientTls, ServerTls

__all__ = ["CloudWorkspace", "DeviceWorkspace"]

_MAX_STATE_BYTES = 1024 * 1024


def _serial() -> int:
    return secrets.randbits(63) + 1


def _read(path: Path, what: str, cap: int = _MAX_STATE_BYTES) -> bytes:
    # The one bounded reader: a regular file (no FIFO, no /dev/zero link), at most cap bytes read.
    try:
        return read_regular_file(path, what, cap)
    except (KeyFileError, TooLarge) as exc:
        raise ConfigError(exc.one_line().split(": ", 1)[-1]) from exc


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(_read(path, what))
    except ValueError as exc:
        raise ConfigError(f"{what} {path} is not JSON") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object")
    return data


STORE_SECRET_FILE = "store.secret"  # noqa: S105 - a file name, not a password
STORE_PASSWORD_ENV = "DIREDI_STORE_PASSWORD"  # noqa: S105 - a variable name


def _split_password(dsn: str) -> tuple[str, str | None]:
    """``postgresql://user:pw@host/db`` -> (``postgresql://user@host/db``, ``pw``). A key=value
    DSN with ``password=`` is refused: name the password through the environment instead."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    if "://" not in dsn:
        if "password=" in dsn:
            raise ConfigError(f"give the store password in ${STORE_PASSWORD_ENV}, not in the DSN")
        return dsn, None
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn, None
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    clean = parts._replace(netloc=f"{user}@{netloc[1]}")
    return urlunsplit(clean), unquote(parts.password)


def _with_password(dsn: str, password: str) -> str:
    from urllib.parse import quote, urlsplit, urlunsplit

    if "://" not in dsn:
        return f"{dsn} password='{password}'"
    parts = urlsplit(dsn)
    userhost = parts.netloc.rsplit("@", 1)
    if len(userhost) == 2:
        netloc = f"{userhost[0]}:{quote(password, safe='')}@{userhost[1]}"
    else:
        netloc = f":{quote(password, safe='')}@{userhost[0]}"
    return urlunsplit(parts._replace(netloc=netloc))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")


# ------------------------------------------------------------------------------------------------
# Cloud
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CloudWorkspace:
    root: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def repository_dir(self) -> Path:
        return self.root / "repository"

    @property
    def config_path(self) -> Path:
        """``cloud.toml`` (``cloud.json`` in a workspace made before it, read as before)."""
        toml = self.root / CONFIG_FILE
        legacy = self.root / "cloud.json"
        return legacy if legacy.is_file() and not toml.exists() else toml

    @classmethod
    def init(
        cls,
        root: Path,
        *,
        now_ms: int,
        hostnames: tuple[str, ...] = ("localhost", "127.0.0.1"),
        store: str | None = None,
        store_schema: str | None = None,
        passphrase: bytes | None = None,
        create_repository: bool = True,
        create_store: bool = True,
    ) -> CloudWorkspace:
        """Create a cloud workspace, store schema included (unless ``create_store`` is false: a
        store that is not reachable yet is then made at first use); refuses to overwrite one (ConfigError).

        All or nothing: everything is made in a private folder next to ``root`` and renamed into
        place only once the store answers, so a failed init (a store that refuses, a full disk)
        leaves nothing behind and can simply be retried.

        With ``create_repository`` the TUF release repository is made too (root v1 is what
        :meth:`provision_device` hands each device as its trust anchor).
        """
        final = Path(root)
        if (final / CONFIG_FILE).exists() or (final / "cloud.json").exists():
            raise ConfigError(f"{final} is already a cloud workspace")
        if final.exists() and (not final.is_dir() or any(final.iterdir())):
            raise ConfigError(f"{final} exists and is not an empty folder")
        final.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{final.name}.init-", dir=final.parent))
        try:
            ws = cls(building)
            ws._make(now_ms=now_ms, hostnames=hostnames, store=store, store_schema=store_schema,
                     passphrase=passphrase, create_repository=create_repository, final=final,
                     create_store=create_store)
            os.replace(building, final)  # onto nothing, or onto the empty folder that was there
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        return cls(final)

    def _make(self, *, now_ms: int, hostnames: tuple[str, ...], store: str | None,
              store_schema: str | None, passphrase: bytes | None, create_repository: bool,
              final: Path, create_store: bool) -> None:
        ws = self
        os.chmod(ws.root, 0o700)
        ca_key = _crypto.generate_signing_key()
        ca_cert = _crypto.create_ca_certificate(
            ca_key, common_name="DiReDi device CA", now_ms=now_ms, valid_days=3650, serial=_serial()
        )
        _crypto.save_signing_key(ca_key, ws.ca_dir / "ca.key", passphrase)
        atomic_write_bytes(ws.ca_dir / "ca.crt", ca_cert)
        inbox = _crypto.generate_inbox_key()
        _crypto.save_inbox_key(inbox, ws.root / "inbox.key", passphrase)
        atomic_write_bytes(ws.root / "inbox.pub", inbox.public_key.pem)
        _crypto.save_signing_key(
            _crypto.generate_signing_key(), ws.root / "receipt.key", passphrase
        )
        tls_key = generate_tls_key()
        server_cert = issue_tls_server_certificate(
            ca_key,
            ca_cert,
            hostnames=list(hostnames),
            tls_key=tls_key,
            serial=_serial(),
            now_ms=now_ms,
        )
        save_tls_key(tls_key, ws.root / "tls" / "server.key")  # gRPC needs it in clear in memory
        atomic_write_bytes(ws.root / "tls" / "server.crt", _crypto.certificate_pem(server_cert))
        if create_repository:
            ReleaseRepository.create(
                ws.repository_dir, now=datetime.fromtimestamp(now_ms / 1000, UTC), passphrase=passphrase
            )
        ws.repository_dir.mkdir(exist_ok=True)
        store_url = store or "cloud.db"
        if is_postgres_url(store_url):
            # The password never sits in cloud.toml: a private file (0600), or the environment.
            store_url, password = _split_password(store_url)
            if password is not None:
                atomic_write_bytes(ws.root / STORE_SECRET_FILE, password.encode(), private=True)
        else:
            # Relative to the workspace (so it works from any folder and moves with it); a path
            # given relative to where init runs is made relative to the final workspace.
            given = Path(store_url)
            absolute = given if given.is_absolute() else (Path.cwd() / given if store else final / given)
            store_url = os.path.relpath(absolute.resolve(), final.resolve())
        atomic_write_bytes(ws.root / CONFIG_FILE, initial_toml(
            store_url=store_url, store_schema=store_schema, hostnames=tuple(hostnames)).encode())
        ws.settings()  # what was written must read back
        if not create_store:
            return
        if is_postgres_url(store_url):
            ws.open_store().close()  # create and migrate the schema now: a refusal undoes the init
        else:
            # Create the SQLite file now too: inside the workspace it is made in the folder being
            # built (and renamed with it); a path outside the workspace is made where it will live.
            target = (final / store_url).resolve()
            inside = target.is_relative_to(final.resolve())
            open_store(str(ws.root / store_url if inside else target), schema=None).close()

    @classmethod
    def open(cls, root: Path) -> CloudWorkspace:
        ws = cls(Path(root))
        if not ws.config_path.is_file():
            raise ConfigError(
                f"{ws.root} is not a cloud workspace (no {CONFIG_FILE}): run `diredi cloud init`"
            )
        return ws

    def settings(self) -> CloudConfig:
        """The validated configuration (``cloud.toml``; a legacy ``cloud.json`` maps onto it)."""
        path = self.config_path
        if path.suffix == ".json":
            legacy = _read_json(path, "cloud config")
            store = legacy.get("store")
            if not isinstance(store, str) or not store:
                raise ConfigError(f"{path}: 'store' must name a SQLite path or a DSN")
            doc = {"store": {"url": store, "schema": legacy.get("store_schema") or ""},
                   "server": {"hostnames": list(legacy.get("hostnames", ["localhost"]))}}
            return parse_config(tomli_w.dumps(doc), source=str(path))
        return load_config(path)

    def config(self) -> dict[str, Any]:
        """The workspace's store and host names as a plain dict (older callers)."""
        cfg = self.settings()
        return {"store": cfg.store.url, "store_schema": cfg.store.schema or None,
                "hostnames": list(cfg.server.hostnames)}

    def path(self, relative: str) -> Path:
        """A path from the configuration, relative to the workspace unless absolute."""
        p = Path(relative)
        return p if p.is_absolute() else self.root / p

    def store_url(self) -> str:
        """The store's SQLite path or PostgreSQL DSN, with the password (if any) taken from
        ``$DIREDI_STORE_PASSWORD`` or the workspace's 0600 ``store.secret``, never from
        the configuration file."""
        store = self.settings().store.url
        if not is_postgres_url(store):
            return str(self.path(store))
        _, inline = _split_password(store)
        if inline is not None:
            raise ConfigError(f"{self.config_path}: the store DSN carries a password in clear; "
                              f"move it to {STORE_SECRET_FILE} (0600) or ${STORE_PASSWORD_ENV}")
        password = os.environ.get(STORE_PASSWORD_ENV)
        secret = self.root / STORE_SECRET_FILE
        if password is None and secret.is_file():
            password = read_private_bytes(secret, "store secret", 4096).decode("utf-8").strip()
        return store if password is None else _with_password(store, password)

    def store_schema(self) -> str | None:
        return self.settings().store.schema or None

    def released_models(self) -> Callable[[], dict[str, str | None]]:
        """A reader of the models this cloud released: model SHA-256 -> the device it was made for
        (``None``: the fleet model). Re-reads ``releases.json`` only when it changed, so ingest can
        ask it for every packet."""
        path = self.root / "releases.json"
        cache: dict[str, Any] = {"key": None, "value": {}}

        def read() -> dict[str, str | None]:
            try:
                st = path.stat()
            except FileNotFoundError:
                return {}
            except OSError as exc:
                raise StoreError(f"cannot read the release index {path}: {exc.strerror}") from exc
            key = (st.st_mtime_ns, st.st_size)
            if cache["key"] != key:
                models = _read_json(path, "release index").get("models", {})
                cache["value"] = {sha: info.get("device") for sha, info in models.items()}
                cache["key"] = key
            return dict(cache["value"])

        return read

    def open_store(self) -> Store:
        """The workspace's store (SQLite file or PostgreSQL DSN + schema), migrated."""
        return open_store(self.store_url(), schema=self.store_schema())

    def trusted_root(self) -> bytes | None:
        """Root metadata v1 of the release repository (None if the workspace has none)."""
        path = self.repository_dir / "metadata" / "1.root.json"
        return _read(path, "root metadata") if path.is_file() else None

    def ca(self, passphrase: bytes | None = None) -> tuple[_crypto.SigningKey, bytes]:
        return (
            _crypto.load_signing_key(self.ca_dir / "ca.key", passphrase),
            _read(self.ca_dir / "ca.crt", "CA certificate"),
        )

    def keys(self, passphrase: bytes | None = None) -> CloudKeys:
        return CloudKeys(
            inbox_key=_crypto.load_inbox_key(self.root / "inbox.key", passphrase),
            receipt_key=_crypto.load_signing_key(self.root / "receipt.key", passphrase),
            device_ca_der=_read(self.ca_dir / "ca.crt", "CA certificate"),
        )

    def server_tls(self, *, mtls: bool) -> ServerTls:
        tls = self.settings().tls
        client_ca = _read(self.path(tls.client_ca), "client CA certificate")
        return ServerTls(
            key_pem=load_tls_key(self.path(tls.key)).private_pem(),
            cert_pem=_read(self.path(tls.cert), "server certificate"),
            client_ca_pem=client_ca if client_ca.startswith(b"-----BEGIN") else _crypto.certificate_pem(client_ca),
            require_client_auth=mtls,
        )

    def provision_device(
        self,
        device_root: Path,
        device_id: str,
        *,
        target: str,
        now_ms: int,
        passphrase: bytes | None = None,
        allow_unaudited: bool = False,
    ) -> DeviceWorkspace:
        """Lab provisioning on the cloud's machine (``edge init --cloud W``): a device kit made with
        this workspace's CA and installed at once. A factory uses ``diredi provision kit`` with
        the CA folder and ``cloud export-public`` instead (services/provision.py)."""
        ca_key, ca_cert = self.ca(passphrase)
        return DeviceWorkspace.init(
            device_root,
            device_id=device_id,
            ca_key=ca_key,
            ca_cert=ca_cert,
            target=target,
            now_ms=now_ms,
            inbox_public_pem=_read(self.root / "inbox.pub", "inbox public key"),
            server_name=self.config().get("hostnames", ["localhost"])[0],
            trusted_root=self.trusted_root(),
            allow_unaudited=allow_unaudited,
        )


# ------------------------------------------------------------------------------------------------
# Device
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceWorkspace:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "device.json"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def receipts(self) -> Path:
        return self.root / "receipts"

    @property
    def release_dir(self) -> Path:
        return self.root / "release"

    @property
    def trusted_root_path(self) -> Path:
        return self.root / "trusted_root.json"

    def trusted_root(self) -> bytes | None:
        """The TUF root this device was provisioned with (None if provisioning gave none)."""
        path = self.trusted_root_path
        return _read(path, "trusted root", 4 * 1024 * 1024) if path.is_file() else None

    @classmethod
    def init(
        cls,
        root: Path,
        *,
        device_id: str,
        ca_key: _crypto.SigningKey,
        ca_cert: bytes,
        target: str,
        now_ms: int,
        inbox_public_pem: bytes | None = None,
        server_name: str | None = None,
        epsilon_budget: float = DEFAULT_POLICY.lifetime_epsilon_budget,
        passphrase: bytes | None = None,
        trusted_root: bytes | None = None,
        allow_unaudited: bool = False,
    ) -> DeviceWorkspace:
        """Provision a device workspace: Ed25519 signing key + certificate, TLS key + certificate.

        One path with the factory's: a device kit is built in a private temporary folder and
        installed (services/provision.py), so the layout has one home and a failure leaves no
        workspace behind. ``allow_unaudited``: the device's release policy (device.json).
        """
        from .provision import CloudPublic, build_kit, install_kit

        _crypto.validate_device_id(device_id)
        root = Path(root)
        if cls(root).config_path.exists():
            raise ConfigError(f"{root} is already a device workspace")
        public = CloudPublic(ca_cert=ca_cert, trusted_root=trusted_root, server_name=server_name,
                             inbox_public_pem=inbox_public_pem)
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{root.name}.kit-", dir=root.parent) as scratch:
            kit = build_kit(Path(scratch) / "kit", ca_key=ca_key, ca_cert=ca_cert,
                            device_id=device_id, public=public, target=target, now_ms=now_ms,
                            passphrase=passphrase)
            return install_kit(kit, root, now_ms=now_ms, allow_unaudited=allow_unaudited,
                               passphrase=passphrase, epsilon_budget=epsilon_budget)

    @classmethod
    def open(cls, root: Path) -> DeviceWorkspace:
        ws = cls(Path(root))
        if not ws.config_path.is_file():
            raise ConfigError(
                f"{ws.root} is not a device workspace (no device.json): run `diredi edge init`"
            )
        return ws

    # -- configuration -------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return _read_json(self.config_path, "device config")

    def update_config(self, **changes: Any) -> None:
        data = self.config()
        data.update(changes)
        _write_json(self.config_path, data)

    @property
    def device_id(self) -> str:
        return str(self.config()["device_id"])

    def allows_unaudited(self) -> bool:
        """The device's own release policy: install releases attested ``not_audited``
        (``edge init --allow-unaudited``; default refuse)."""
        return self.config().get("allow_unaudited") is True

    def signing_key(self, passphrase: bytes | None = None) -> _crypto.SigningKey:
        return _crypto.load_signing_key(self.root / "device.key", passphrase)

    def certificate(self) -> bytes:
        return _read(self.root / "device.crt", "device certificate")

    def ca_certificate(self) -> bytes:
        return _read(self.root / "ca.crt", "CA certificate")

    def client_tls(self, *, mtls: bool = True) -> ClientTls:
        server_name = self.config().get("server_name")
        return ClientTls(
            root_pem=_crypto.certificate_pem(self.ca_certificate()),
            key_pem=load_tls_key(self.root / "tls.key").private_pem() if mtls else None,
            cert_pem=_read(self.root / "tls.crt", "TLS certificate") if mtls else None,
            server_name=server_name if isinstance(server_name, str) else None,
        )

    def inbox_public_key(self) -> _crypto.InboxPublicKey:
        path = self.root / "inbox.pub"
        if not path.is_file():
            raise KeyFileError(
                f"{path} is missing: provision the inbox key or install a release first"
            )
        return _crypto.load_inbox_public_key(_read(path, "inbox public key"))

    def set_inbox_public_key(self, pem: bytes) -> None:
        _crypto.load_inbox_public_key(pem)
        atomic_write_bytes(self.root / "inbox.pub", pem)

    def receipt_public_key(self) -> _crypto.VerifyKey:
        raw = self.config().get("receipt_public_key")
        if not isinstance(raw, str):
            raise KeyFileError(f"{self.root} has no receipt key yet: enrol the device first")
        return _crypto.VerifyKey.from_raw(bytes.fromhex(raw))

    # -- counter and ledger ---------------------------------------------------------------------
    def last_counter(self) -> int:
        text = _read(self.root / "counter", "counter file").decode("ascii", "replace").strip()
        if not text.isdigit():
            raise StoreError(f"counter file in {self.root} is corrupt: {text[:20]!r}")
        return int(text)

    def reserve_counter(self) -> int:
        """The next counter, persisted (fsync'd) before it is used: a crash never reuses one."""
        counter = self.last_counter() + 1
        atomic_write_bytes(self.root / "counter", f"{counter}\n".encode())
        return counter

    def ledger(self) -> dict[str, Any]:
        return _read_json(self.root / "ledger.json", "epsilon ledger")

    def check_epsilon(self, packet_curve: np.ndarray) -> float:
        """The composed lifetime epsilon with this packet; raises BudgetExceeded, changes nothing."""
        ledger = self.ledger()
        _, eps = charge(device_id=self.device_id, spent_curve=curve_from_json(ledger.get("rdp")),
                        packet_curve=packet_curve, budget=float(ledger["budget"]))
        return eps

    def charge_epsilon(self, packet_id: bytes, packet_curve: np.ndarray, epsilon: float) -> float:
        """Compose a packet into the device's own ledger (RDP, at the policy's delta); raises
        BudgetExceeded. Returns the new composed lifetime epsilon."""
        ledger = self.ledger()
        new_curve, eps = charge(device_id=self.device_id,
                                spent_curve=curve_from_json(ledger.get("rdp")),
                                packet_curve=packet_curve, budget=float(ledger["budget"]))
        ledger["spent"] = eps
        ledger["delta"] = DEFAULT_DP_POLICY.delta
        ledger["rdp"] = curve_to_json(new_curve)
        ledger["packets"][packet_id.hex()] = epsilon
        _write_json(self.root / "ledger.json", ledger)
        return eps

    # -- outbox and receipts --------------------------------------------------------------------
    def put_outbox(self, packet_id: bytes, data: bytes) -> None:
        atomic_write_bytes(self.outbox / f"{packet_id.hex()}.packet", data)

    def pending(self) -> list[tuple[bytes, bytes]]:
        """Sealed packets not yet acknowledged, oldest first (by counter order of creation)."""
        files = sorted(self.outbox.glob("*.packet"), key=lambda p: p.stat().st_mtime_ns)
        return [(bytes.fromhex(p.stem), _read(p, "outbox packet", DEFAULT_LIMITS.max_packet_bytes))
                for p in files]

    def acknowledge(self, packet_id: bytes, receipt: bytes) -> None:
        atomic_write_bytes(self.receipts / f"{packet_id.hex()}.receipt", receipt)
        (self.outbox / f"{packet_id.hex()}.packet").unlink(missing_ok=True)

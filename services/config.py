"""The cloud workspace's configuration file, ``cloud.toml``: store, server, TLS, logs, limits and
the privacy policy, validated at start with an error that names the key.

Every section maps onto the dataclass that already holds those settings in code (so a default
has one home): ``[limits]`` is :class:`~diredi_secure.policy.Limits` (the size caps) and
:class:`~.ratelimit.RefusalLimits` (the per-device refusal limit, keys ``refusal*``), ``[transport]``
:class:`~.transport.TransportConfig`, ``[policy]`` :class:`~diredi_secure.policy.PacketPolicy`,
``[privacy]`` :class:`~diredi_secure.privacy.DPPolicy` and ``[privacy.bounds]`` its
``DPBounds``. A key not in the dataclass, a value of the wrong type, or a value its
``__post_init__`` refuses is a :class:`ConfigError` naming ``section.key``.

Secrets never sit in the file: a store URL carrying a password, or any key that looks like a
secret, is refused. The store password comes from ``$DIREDI_STORE_PASSWORD`` (or the 0600
``store.secret``); key passphrases from the environment variable named by ``--passphrase-env``.

Paths (the SQLite store, the TLS files) are relative to the workspace, so the workspace works
from any working directory and can be moved as one folder.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from diredi_secure.checkpoint import read_regular_file
from diredi_secure.errors import ConfigError, KeyFileError, TooLarge
from diredi_secure.policy import DEFAULT_POLICY, Limits, PacketPolicy
from diredi_secure.store import is_postgres_url

from .observe import LOG_FORMATS, LOG_LEVELS
from .ratelimit import RefusalLimits
from .transport import TransportConfig

__all__ = [
    "CONFIG_FILE", "CloudConfig", "ServerSettings", "StoreSettings", "TlsSettings", "initial_toml",
    "load_config", "parse_config",
]

CONFIG_FILE = "cloud.toml"
FORMAT = 2
_MAX_CONFIG_BYTES = 256 * 1024
_SECRET_WORDS = ("password", "passphrase", "secret", "private_key", "token")


@dataclass(frozen=True)
class StoreSettings:
    url: str = "cloud.db"
    """SQLite file (relative to the workspace) or ``postgresql://user@host:port/db``."""
    schema: str = ""
    """PostgreSQL schema for the tables (empty: the server's default)."""

    def __post_init__(self) -> None:
        if not self.url:
            raise ConfigError("store.url must name a SQLite file or a PostgreSQL DSN")
        if is_postgres_url(self.url) and _dsn_has_password(self.url):
            raise ConfigError("store.url carries a password: put it in $DIREDI_STORE_PASSWORD "
                              "(or the workspace's 0600 store.secret), never in cloud.toml")


@dataclass(frozen=True)
class ServerSettings:
    listen: str = "127.0.0.1:50051"
    """host:port of the gRPC endpoint."""
    mtls: bool = True
    """Require device client certificates (each call must come from the device it is about)."""
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")
    """Names in the server certificate (set at init; changing it needs a new certificate)."""
    max_workers: int = 16
    """gRPC worker threads."""
    ops_listen: str = ""
    """host:port of the plain-HTTP ops endpoint (/healthz, /metrics); empty: none."""
    log_level: str = "info"
    log_format: str = "console"
    log_file: str = ""
    """Append logs here (relative to the workspace); empty: stderr."""

    def __post_init__(self) -> None:
        _check_host_port(self.listen, "server.listen")
        if self.ops_listen:
            _check_host_port(self.ops_listen, "server.ops_listen")
        if not 1 <= self.max_workers <= 1024:
            raise ConfigError("server.max_workers must lie in [1, 1024]")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"server.log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"server.log_format must be one of {', '.join(LOG_FORMATS)}")


@dataclass(frozen=True)
class TlsSettings:
    cert: str = "tls/server.crt"
    key: str = "tls/server.key"
    client_ca: str = "ca/ca.crt"
    """The device CA whose certificates the server accepts as mTLS clients."""


@dataclass(frozen=True)
class CloudConfig:
    """Everything ``cloud.toml`` can set, with the code's defaults for what it leaves out."""

    store: StoreSettings = field(default_factory=StoreSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    limits: Limits = field(default_factory=Limits)
    refusals: RefusalLimits = field(default_factory=RefusalLimits)
    """Also in ``[limits]``: its keys (``refusals_per_window``...) are disjoint from ``Limits``'."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    policy: PacketPolicy = DEFAULT_POLICY

    def to_toml(self) -> str:
        """The effective configuration, every key, as TOML (what ``cloud config show`` prints)."""
        return tomli_w.dumps(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        privacy = _fields_of(self.policy.dp, skip=("bounds",))
        privacy["bounds"] = _fields_of(self.policy.dp.bounds)
        return {
            "format": FORMAT,
            "store": _fields_of(self.store),
            "server": _fields_of(self.server),
            "tls": _fields_of(self.tls),
            "limits": {**_fields_of(self.limits), **_fields_of(self.refusals)},
            "transport": _fields_of(self.transport, skip=("limits", "deadlines")),
            "policy": _fields_of(self.policy, skip=("dp",)),
            "privacy": privacy,
        }

    def transport_config(self) -> TransportConfig:
        """The transport settings with the ``[limits]`` section inside (as the server takes them)."""
        return dataclasses.replace(self.transport, limits=self.limits, refusals=self.refusals)


# Scalar fields a section may set, per dataclass; nested dataclasses are sections of their own.
def _settable(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default) or isinstance(default, dict):
            continue
        out[f.name] = default
    return out


_OPTIONAL_SETS = {("policy", "allowed_base_models")}  # None (any) or a list


def _fields_of(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _settable(type(obj)):
        if name in skip:
            continue
        value = getattr(obj, name)
        if value is None:
            continue  # TOML has no null: an unset optional is simply absent
        if isinstance(value, frozenset | set):
            value = sorted(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, not {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, not {value!r}")
        return value
    if isinstance(default, tuple | frozenset) or (section, key) in _OPTIONAL_SETS:
        if not isinstance(value, list) or len(value) > 10_000:
            raise ConfigError(f"{where} must be a list")
        sample = next(iter(default), None) if default else None
        kind = type(sample) if sample is not None else str
        if any(not isinstance(v, kind) or isinstance(v, bool) for v in value):
            raise ConfigError(f"{where} must be a list of {kind.__name__}")
        return frozenset(value) if isinstance(default, frozenset) or default is None else tuple(value)
    raise ConfigError(f"{where} cannot be set from the file")


def _section(cls_default: Any, section: str, table: Any, *, nested: tuple[str, ...] = ()) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table")
    settable = _settable(type(cls_default))
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in nested:
            continue
        if any(word in key.lower() for word in _SECRET_WORDS):
            raise ConfigError(f"{section}.{key}: secrets never go in cloud.toml; use the "
                              "environment (see docs/OPERATIONS.md)")
        if key not in settable:
            known = ", ".join(sorted(settable))
            raise ConfigError(f"unknown key {section}.{key} (known: {known})")
        values[key] = _coerce(section, key, value, settable[key])
    try:
        return dataclasses.replace(cls_default, **values)
    except ConfigError as exc:
        raise ConfigError(f"[{section}]: {exc.message}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"[{section}]: {exc}") from exc


def parse_config(text: str, *, source: str = CONFIG_FILE) -> CloudConfig:
    """Validate ``text`` (TOML) into a :class:`CloudConfig`; raises :class:`ConfigError`."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
    version = doc.pop("format", FORMAT)
    if version != FORMAT:
        raise ConfigError(f"{source}: format {version!r} is not supported (this version reads {FORMAT})")
    known = {"store", "server", "tls", "limits", "transport", "policy", "privacy"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown section or key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    defaults = CloudConfig()
    try:
        store = _section(defaults.store, "store", doc.get("store", {}))
        server = _section(defaults.server, "server", doc.get("server", {}))
        tls = _section(defaults.tls, "tls", doc.get("tls", {}))
        limits_table = doc.get("limits", {})
        refusal_keys = tuple(_settable(RefusalLimits))
        limits = _section(defaults.limits, "limits", limits_table, nested=refusal_keys)
        refusals = defaults.refusals
        if isinstance(limits_table, dict):
            refusals = _section(refusals, "limits",
                                {k: v for k, v in limits_table.items() if k in refusal_keys})
        transport = _section(dataclasses.replace(defaults.transport, limits=limits, refusals=refusals),
                             "transport", doc.get("transport", {}))
        privacy_table = doc.get("privacy", {})
        dp = defaults.policy.dp
        if isinstance(privacy_table, dict) and "bounds" in privacy_table:
            dp = dataclasses.replace(dp, bounds=_section(dp.bounds, "privacy.bounds", privacy_table["bounds"]))
        dp = _section(dp, "privacy", privacy_table, nested=("bounds",))
        policy = _section(dataclasses.replace(defaults.policy, dp=dp), "policy", doc.get("policy", {}))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}") from exc
    return CloudConfig(store=store, server=server, tls=tls, limits=limits, refusals=refusals,
                       transport=transport, policy=policy)


def load_config(path: Path) -> CloudConfig:
    """Read and validate ``path`` (a missing file is an error: a workspace always has one).

    The file is read with :func:`read_regular_file` (one open, checked on the descriptor, at most
    ``_MAX_CONFIG_BYTES + 1`` bytes read): a FIFO or device in its place cannot hang or exhaust
    the server at start. Raises :class:`ConfigError`: reason ``file`` when it is missing,
    unreadable or not a regular file; ``config`` when it is over the cap, not UTF-8, or invalid.
    """
    try:
        data = read_regular_file(path, "config file", _MAX_CONFIG_BYTES)
    except TooLarge as exc:
        raise ConfigError(exc.message) from exc
    except KeyFileError as exc:
        raise ConfigError(exc.message, reason="file") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text") from exc
    return parse_config(text, source=str(path))


def initial_toml(*, store_url: str, store_schema: str | None, hostnames: tuple[str, ...]) -> str:
    """The ``cloud.toml`` that ``cloud init`` writes: what init chose, and where the rest is."""
    head = (
        "# DiReDi-secure cloud workspace configuration.\n"
        "# Every key and its effective value: `diredi cloud config show -w <workspace>`.\n"
        "# Sections: [store] [server] [tls] [limits] [transport] [policy] [privacy] [privacy.bounds].\n"
        "# Secrets never go here: the store password comes from $DIREDI_STORE_PASSWORD (or the\n"
        "# 0600 store.secret), key passphrases from the variable named by --passphrase-env.\n"
        "# Paths are relative to this folder.\n\n"
    )
    doc: dict[str, Any] = {
        "format": FORMAT,
        "store": {"url": store_url, **({"schema": store_schema} if store_schema else {})},
        "server": {"hostnames": list(hostnames)},
    }
    return head + tomli_w.dumps(doc)


def _dsn_has_password(url: str) -> bool:
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    return parts.password is not None or "password" in parse_qs(parts.query)


def _check_host_port(value: str, where: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where} must be host:port, not {value!r}")

"""The on-disk cache of noise-multiplier searches: a small JSON file, one entry per parameter set.

Why: a search (:func:`~diredi_secure.privacy.noise_for_epsilon`) is about 40 accountant curves,
most of a second on a small device, and a device pays it again in every process (each
``diredi edge reverse``) although the answer depends on the policy and the target alone. The
file keeps the answers between processes.

What is trusted: nothing in the file. Anyone who can write the user's cache folder can edit it, so
a stored noise multiplier is only a *candidate*: the search (``_schedule.search_noise``) re-checks
it with the accountant before using it (it must spend at most the target, and a hair less noise
must spend more, i.e. it is the value a fresh search returns to within its tolerance) and
otherwise searches again and overwrites it. A tampered file can cost time, never privacy: every
epsilon a device declares is still computed by the accountant from the noise multiplier it uses.

Where: ``$DIREDI_NOISE_CACHE`` (a file path; ``off`` disables it), else
``$XDG_CACHE_HOME/diredi/noise-search.json``, else ``~/.cache/diredi/noise-search.json``. Written
atomically with mode 0600 (:func:`~diredi_secure.checkpoint.atomic_write_bytes`); read with a size
cap, never through a link or from anything but a regular file, and ignored when group or others
may write it. Failed searches are not stored: they cost one
or two curves, as much as a check of a stored answer. A cache that cannot be read or written is
skipped (logged once): it is an optimisation, never a dependency.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path

from ._accountant import ACCOUNTANT, RDP_ORDERS

__all__ = [
    "NOISE_CACHE_ENV",
    "NoiseSearchCache",
    "default_noise_cache_path",
    "noise_search_cache",
    "set_noise_search_cache",
]

log = logging.getLogger(__name__)

#: Environment variable naming the cache file; one of :data:`_OFF` disables the cache.
NOISE_CACHE_ENV = "DIREDI_NOISE_CACHE"
_OFF = frozenset({"", "0", "off", "no", "none", "false", "disabled"})
_FORMAT = "diredi-noise-search"
_VERSION = 1
#: Entries kept (oldest dropped first): a fleet's policy has a handful of targets.
MAX_ENTRIES = 256
#: The file is refused above this size (256 entries take about 60 KiB).
MAX_FILE_BYTES = 256 * 1024
# The accountant the stored answers belong to: its name and its order grid.
_ACCOUNTANT_ID = f"{ACCOUNTANT}:" + hashlib.sha256(
    ",".join(map(str, RDP_ORDERS)).encode()).hexdigest()[:16]


def default_noise_cache_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where the cache lives by default (``None``: disabled). See the module docstring."""
    env = os.environ if environ is None else environ
    chosen = env.get(NOISE_CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in _OFF else Path(chosen).expanduser()
    xdg = env.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative value is ignored
        return Path(xdg) / "diredi" / "noise-search.json"
    home = env.get("HOME")
    if not home:
        try:
            home = str(Path.home())
        except (KeyError, RuntimeError):  # no home folder: no cache
            return None
    return Path(home) / ".cache" / "diredi" / "noise-search.json"


def search_key(
    epsilon: float, *, delta: float, sample_rate: float, steps: int, extra: tuple[float, ...],
    lo: float, hi: float, tolerance: float,
) -> str:
    """The full parameter set of one search, exact (``float.hex``), with the accountant's id."""
    parts = [_ACCOUNTANT_ID, f"tol={tolerance.hex()}", f"eps={float(epsilon).hex()}",
             f"delta={float(delta).hex()}", f"q={float(sample_rate).hex()}", f"steps={int(steps)}",
             "extra=" + ",".join(float(s).hex() for s in extra),
             f"lo={float(lo).hex()}", f"hi={float(hi).hex()}"]
    return "|".join(parts)


class NoiseSearchCache:
    """One cache file (``path=None``: disabled, nothing read or written).

    :meth:`get` returns an unverified candidate (the caller checks it); :meth:`put` stores an
    answer. ``hits``, ``misses``, ``refused`` and ``writes`` count what happened (``refused`` is
    incremented by the caller for a candidate that failed its check)."""

    def __init__(self, path: Path | None) -> None:
        self.path = None if path is None else Path(path)
        self.hits = 0
        self.misses = 0
        self.refused = 0
        self.writes = 0
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> NoiseSearchCache:
        return cls(default_noise_cache_path(environ))

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("noise-search cache %s: %s (continuing without it)", self.path, message)

    def _load(self) -> dict[str, float]:
        """The stored entries; empty when the file is missing, oversized, writable by others or
        malformed (a bad file is replaced at the next :meth:`put`)."""
        if self.path is None:
            return {}
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang the device (it is then refused
            # as not a regular file); O_NOFOLLOW: nor may a link lead the read elsewhere.
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._warn(f"cannot open ({exc.strerror})")
            return {}
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022:
                self._warn("not a regular file, or writable by group or others: ignored")
                return {}
            with os.fdopen(fd, "rb", closefd=False) as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            self._warn(f"cannot read ({exc.strerror})")
            return {}
        finally:
            os.close(fd)
        if len(data) > MAX_FILE_BYTES:
            self._warn(f"larger than {MAX_FILE_BYTES} bytes: ignored")
            return {}
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            return {}
        if (not isinstance(obj, dict) or obj.get("format") != _FORMAT
                or obj.get("version") != _VERSION or not isinstance(obj.get("entries"), dict)):
            return {}
        out: dict[str, float] = {}
        for k, v in obj["entries"].items():
            if (isinstance(k, str) and len(k) <= 1024 and isinstance(v, float)
                    and math.isfinite(v) and v > 0):
                out[k] = v
        return out

    def get(self, key: str) -> float | None:
        """The stored noise multiplier for ``key``, unverified, or ``None``."""
        if self.path is None:
            return None
        with self._lock:
            value = self._load().get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def put(self, key: str, value: float) -> None:
        """Store ``value`` for ``key`` (read-modify-write; concurrent writers: the last one wins,
        which loses at most an entry that will be searched again)."""
        if self.path is None or not (math.isfinite(value) and value > 0):
            return
        from ..checkpoint import atomic_write_bytes  # safetensors/numpy: off the import path

        with self._lock:
            entries = self._load()
            entries.pop(key, None)
            entries[key] = float(value)
            while len(entries) > MAX_ENTRIES:
                entries.pop(next(iter(entries)))
            body = json.dumps({"format": _FORMAT, "version": _VERSION, "entries": entries},
                              sort_keys=False, separators=(",", ":")).encode()
            try:
                atomic_write_bytes(self.path, body, private=True)
            except OSError as exc:
                self._warn(f"cannot write ({exc.strerror})")
                return
            self.writes += 1


_current: NoiseSearchCache | None = None
_current_lock = threading.Lock()


def noise_search_cache() -> NoiseSearchCache:
    """The process's cache: the one :func:`set_noise_search_cache` installed, else the default
    location (read from the environment on first use)."""
    global _current
    with _current_lock:
        if _current is None:
            _current = NoiseSearchCache.from_environment()
        return _current


def set_noise_search_cache(cache: NoiseSearchCache | None) -> NoiseSearchCache | None:
    """Install ``cache`` for this process (``NoiseSearchCache(None)`` disables caching; ``None``
    goes back to the environment's default at next use). Returns the previous one. Answers
    already in memory (``noise_for_epsilon``'s own cache) stay: they do not depend on the file."""
    global _current
    with _current_lock:
        previous, _current = _current, cache
        return previous

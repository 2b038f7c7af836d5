"""A per-device limit on refusals: a device whose packets keep being refused is cooled down.

Every refused packet costs the cloud the work that refused it (a signature check, an HPKE open,
an accountant run). A device that sends packet after packet that fails -- a malicious one, or a
broken one in a loop -- is answered, once it has been refused more than
:attr:`RefusalLimits.refusals_per_window` times within :attr:`RefusalLimits.refusal_window_s`, with
a cheap typed refusal (:class:`~.status.ServiceUnavailable`, reason ``rate_limited``: retryable,
so an honest device backs off and its outbox resends later) for
:attr:`RefusalLimits.refusal_cooldown_s`, *before* any of that work.

Who "a device" is: the mTLS peer (its id was verified by the TLS layer), or without mTLS the
device id the packet declares together with the caller's host (unauthenticated: a forger on
another host cannot cool a victim down; one on the victim's host can, and the victim then only
waits). A packet that does not even parse has no device and is not counted: parsing is the cheap
part.

Memory is bounded whatever the ids: devices being counted sit in one LRU of at most
``refusal_tracked_devices`` entries, devices in cool-down in a second one of the same bound (so
an attacker cycling through fresh ids evicts only other counters, never a device that earned its
cool-down; to evict one of those it must earn as many cool-downs itself). The clock is injected
(seconds, monotonic), so tests run the window without waiting.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from diredi_secure.errors import ConfigError

from .status import ServiceUnavailable

__all__ = ["RATE_LIMITED", "RefusalLimiter", "RefusalLimits"]

RATE_LIMITED = "rate_limited"
"""The reason of the refusal a cooled-down device gets (status UNAVAILABLE: retry later)."""


@dataclass(frozen=True)
class RefusalLimits:
    """The per-device refusal limit (``[limits]`` in ``cloud.toml``)."""

    refusals_per_window: int = 64
    """A device refused more often than this within one window is cooled down. An honest device
    is refused rarely (its agent never resends a refused packet), so the default leaves room for
    a misconfigured one to show its errors; 0 turns the limit off."""
    refusal_window_s: float = 60.0
    """Length of the counting window (fixed windows, each starting at a device's first refusal)."""
    refusal_cooldown_s: float = 60.0
    """How long a cooled-down device is answered ``rate_limited`` without any other work."""
    refusal_tracked_devices: int = 10_000
    """Most devices counted at once, and most devices in cool-down at once (two bounded LRUs)."""

    def __post_init__(self) -> None:
        if isinstance(self.refusals_per_window, bool) or not isinstance(self.refusals_per_window, int) \
                or self.refusals_per_window < 0:
            raise ConfigError("refusals_per_window must be an integer >= 0 (0: no limit)")
        for name in ("refusal_window_s", "refusal_cooldown_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value <= 7 * 86_400):
                raise ConfigError(f"{name} must lie in (0, 604800] seconds")
        if not (isinstance(self.refusal_tracked_devices, int) and 1 <= self.refusal_tracked_devices <= 10_000_000):
            raise ConfigError("refusal_tracked_devices must lie in [1, 10000000]")


class _Count:
    __slots__ = ("count", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.count = 0


class RefusalLimiter:
    """Counts refusals per device and cools down those over the limit. Thread-safe.

    :meth:`check` before any work (raises :class:`ServiceUnavailable` ``rate_limited`` for a
    device in cool-down); :meth:`refused` after a refusal the peer caused.
    """

    def __init__(self, limits: RefusalLimits | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or RefusalLimits()
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: OrderedDict[str, _Count] = OrderedDict()
        self._cooling: OrderedDict[str, float] = OrderedDict()  # device -> cool-down ends (clock)

    @property
    def enabled(self) -> bool:
        return self.limits.refusals_per_window > 0

    def cooling_down(self) -> bool:
        """Whether any device is in cool-down now (callers skip finding a key when none is).
        Expired cool-downs are dropped here, oldest first (every entry has the same length, and
        a renewed one moves to the end, so the order is the order of expiry)."""
        if not self._cooling:
            return False
        with self._lock:
            now = self._clock()
            while self._cooling and next(iter(self._cooling.values())) <= now:
                self._cooling.popitem(last=False)
            return bool(self._cooling)

    def tracked(self) -> tuple[int, int]:
        """(devices counted, devices in cool-down): both bounded by ``refusal_tracked_devices``."""
        with self._lock:
            return len(self._counts), len(self._cooling)

    def check(self, device: str | None) -> None:
        """Raise ``ServiceUnavailable`` (``rate_limited``) if ``device`` is in cool-down."""
        if device is None or not self._cooling:
            return
        with self._lock:
            until = self._cooling.get(device)
            if until is None:
                return
            now = self._clock()
            if now >= until:
                del self._cooling[device]
                return
        raise ServiceUnavailable(
            f"device {device[:80]} was refused more than {self.limits.refusals_per_window} times "
            f"in {self.limits.refusal_window_s:g} s; retry in {until - now:.0f} s",
            reason=RATE_LIMITED)

    def refused(self, device: str | None) -> None:
        """Count one refusal of ``device``; past the limit it is cooled down."""
        if device is None or not self.enabled:
            return
        limits = self.limits
        with self._lock:
            now = self._clock()
            entry = self._counts.get(device)
            if entry is None or now - entry.started >= limits.refusal_window_s:
                entry = _Count(now)
                self._counts[device] = entry
            self._counts.move_to_end(device)
            entry.count += 1
            if entry.count > limits.refusals_per_window:
                del self._counts[device]
                self._cooling[device] = now + limits.refusal_cooldown_s
                self._cooling.move_to_end(device)
                while len(self._cooling) > limits.refusal_tracked_devices:
                    self._cooling.popitem(last=False)
            while len(self._counts) > limits.refusal_tracked_devices:
                self._counts.popitem(last=False)

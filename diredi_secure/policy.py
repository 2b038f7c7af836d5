"""Limits on untrusted input and the cloud's DP policy, in one place.

``Limits`` is the single config dataclass holding every size cap (as python-tuf's
``UpdaterConfig`` does): parsers take it as a parameter and refuse oversize input *before* doing
expensive work. ``PacketPolicy`` holds what the cloud accepts: clock window, epsilon per packet,
lifetime epsilon per device, norm bound on payloads, allowed base models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import BudgetExceeded, ConfigError, PolicyViolation

__all__ = ["DEFAULT_LIMITS", "DEFAULT_POLICY", "Limits", "PacketPolicy", "check_budget"]


@dataclass(frozen=True)
class Limits:
    """Size caps on everything that arrives from outside. All sizes in bytes unless named."""

    max_packet_bytes: int = 64 * 1024 * 1024
    """Whole SignedPacket (streamed submissions); unary submissions use ``max_unary_bytes``."""
    max_unary_bytes: int = 4 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    max_payload_bytes: int = 48 * 1024 * 1024
    max_certificate_bytes: int = 8 * 1024
    max_signature_bytes: int = 64
    max_enc_bytes: int = 1200  # X25519: 32; ML-KEM-768+X25519: 1120
    max_entries: int = 8
    max_tensor_rank: int = 4
    max_tensor_elements: int = 16 * 1024 * 1024
    max_device_id_chars: int = 128
    max_model_version_chars: int = 128

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"limit {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class PacketPolicy:
    """What the cloud accepts from devices (checked after the packet authenticates)."""

    max_future_skew_ms: int = 5 * 60 * 1000
    """A packet created further in the future than this is refused (device clock ahead)."""
    max_age_ms: int = 7 * 24 * 3600 * 1000
    """A packet created longer ago than this is refused (stale or replayed from a capture)."""
    max_epsilon_per_packet: float = 10.0
    lifetime_epsilon_budget: float = 40.0
    max_delta: float = 1e-3
    max_entry_l2_norm: float = 1e6
    """Bound on the L2 norm of every payload tensor (post-dequantisation)."""
    require_dp: bool = True
    """Refuse packets whose training declares no DP (noise multiplier 0 or epsilon infinite)."""
    allowed_base_models: frozenset[str] | None = None
    """If set, the base model versions a packet may be computed against."""
    accepted_suites: frozenset[int] = field(default_factory=lambda: frozenset({1, 2, 3}))

    def __post_init__(self) -> None:
        if self.max_future_skew_ms < 0 or self.max_age_ms <= 0:
            raise ConfigError("clock window must be non-negative with a positive max age")
        for name in ("max_epsilon_per_packet", "lifetime_epsilon_budget", "max_entry_l2_norm"):
            value = getattr(self, name)
            if not (value > 0):
                raise ConfigError(f"{name} must be positive, got {value!r}")
        if not (0 < self.max_delta < 1):
            raise ConfigError(f"max_delta must lie in (0, 1), got {self.max_delta!r}")


DEFAULT_LIMITS = Limits()
DEFAULT_POLICY = PacketPolicy()


def check_budget(*, device_id: str, spent: float, requested: float, budget: float) -> None:
    """Raise :class:`BudgetExceeded` if ``spent + requested`` would exceed ``budget``.

    Composition here is the simple sum of per-packet epsilons (basic composition). By itself that
    bounds the device's total privacy loss at (sum of epsilons, sum of deltas). The ledger does not
    sum deltas yet; each packet's delta is only capped by ``max_delta``, so after n packets the
    guarantee is (sum of epsilons, n * max_delta) -- a known gap (docs/ARCHITECTURE.md, "Known gaps").
    """
    if not math.isfinite(requested) or requested < 0:
        raise PolicyViolation(f"device {device_id} declared a non-finite or negative epsilon")
    if spent + requested > budget + 1e-12:
        raise BudgetExceeded(
            f"device {device_id} has spent epsilon {spent:.4g} of {budget:.4g}; "
            f"this packet needs {requested:.4g} more"
        )

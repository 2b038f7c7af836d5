"""The cloud's DP policy: the fixed delta, the caps, the parameter bounds and the RD schedule.

Everything a device declares is checked against this before any epsilon is computed, and the
schedule here (not the user's dataset) fixes every DP parameter that goes on the wire.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from ._mechanisms import DPBounds

__all__ = ["DEFAULT_DP_POLICY", "DPPolicy"]


@dataclass(frozen=True)
class DPPolicy:
    """DP limits and the data-independent RD schedule, in one place.

    ``delta`` is *the* delta: every packet's (epsilon, delta) and every device's lifetime ledger are
    stated at it. It is fixed, not ``1/(10 N)``, because a delta computed from N publishes N.
    The schedule (``batches_per_epoch`` fixes the Poisson rate ``q = 1/batches_per_epoch``,
    ``epochs`` the step count ``epochs * batches_per_epoch``) is the same for every user; what
    varies with N is only the expected batch ``q N``, which never leaves the device.
    """

    delta: float = 1e-5
    max_epsilon_per_packet: float = 10.0
    lifetime_epsilon_budget: float = 40.0
    bounds: DPBounds = field(default_factory=DPBounds)
    allow_seeded_noise: bool = False
    """Accept packets whose noise came from a fixed research seed (header ``noise_seeded``).
    Never on in production: such noise is predictable and the packet's epsilon is infinite."""
    batches_per_epoch: int = 3
    epochs: int = 30
    clip_norm: float = 1.0
    histogram_share: float = 1.0 / 16.0
    """Fraction of a packet's target total epsilon spent on the label histogram (standalone)."""
    prototype_share: float = 1.0 / 4.0
    """Fraction spent on the prototypes (standalone); DP-SGD gets what the composition leaves."""
    prototype_clip: float = 3.5
    epsilon_rel_tolerance: float = 1e-9
    """Declared epsilons may fall short of the cloud's recomputation by this relative amount only:
    device and cloud run the same deterministic accountant, so the gap is float rounding."""

    def __post_init__(self) -> None:
        if not (0 < self.delta < 1e-2):
            raise ConfigError(f"policy delta must lie in (0, 0.01), got {self.delta!r}")
        for name in ("max_epsilon_per_packet", "lifetime_epsilon_budget", "clip_norm",
                     "prototype_clip"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ConfigError(f"policy {name} must be finite and > 0, got {v!r}")
        if self.batches_per_epoch < 1 or self.epochs < 1:
            raise ConfigError("batches_per_epoch and epochs must be >= 1")
        if not (self.histogram_share > 0 and self.prototype_share > 0
                and self.histogram_share + self.prototype_share < 1):
            raise ConfigError("histogram and prototype shares must be > 0 and sum below 1")
        if not (0 <= self.epsilon_rel_tolerance < 1e-3):
            raise ConfigError("epsilon_rel_tolerance must lie in [0, 1e-3)")

    @property
    def sample_rate(self) -> float:
        return 1.0 / self.batches_per_epoch

    @property
    def steps(self) -> int:
        return self.epochs * self.batches_per_epoch


DEFAULT_DP_POLICY = DPPolicy()

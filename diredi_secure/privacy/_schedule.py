"""The data-independent RD schedule: every DP parameter on the wire from the policy and the target
epsilon alone.

``schedule_for(total_epsilon, ...)`` splits a packet's *total* budget: the label histogram and the
prototypes get fixed shares (standalone epsilons at the policy's delta), then the DP-SGD noise
multiplier is searched so that the composition of everything the packet releases spends exactly
``total_epsilon``. A local-DP baseline asking for neither entry gives DP-SGD the whole budget, so
methods compared at one ``total_epsilon`` spend the same.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..errors import ConfigError
from ._accountant import compose, epsilon_from_curve, gaussian_curve
from ._policy import DEFAULT_DP_POLICY, DPPolicy

__all__ = ["RDSchedule", "noise_for_epsilon", "schedule_for"]


@dataclass(frozen=True)
class RDSchedule:
    """What a device runs and declares; identical for every user under one policy and target."""

    target_epsilon: float
    delta: float
    sample_rate: float
    steps: int
    clip_norm: float
    noise_multiplier: float
    training_epsilon: float
    histogram_noise_multiplier: float | None
    prototype_noise_multiplier: float | None
    prototype_clip: float
    total_epsilon: float


def _eps(sigma: float, q: float, steps: int, delta: float, extra: tuple[float, ...]) -> float:
    curves = [gaussian_curve(sigma, q, steps), *(gaussian_curve(s, 1.0, 1) for s in extra)]
    return epsilon_from_curve(compose(curves), delta)[0]


@functools.lru_cache(maxsize=512)
def noise_for_epsilon(
    epsilon: float, *, delta: float, sample_rate: float, steps: int,
    extra: tuple[float, ...] = (), lo: float = 0.3, hi: float = 1e4,
) -> float:
    """Smallest noise multiplier (to 1e-10 relative) whose mechanism, composed with the single
    Gaussian releases of multipliers ``extra``, spends at most ``epsilon`` at ``delta``.

    Raises :class:`ConfigError` when even ``hi`` overspends (the extras alone take the budget) or
    ``lo`` already underspends (the target is above what the bounds let a device use)."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"target epsilon must be finite and > 0, got {epsilon!r}")
    if _eps(hi, sample_rate, steps, delta, extra) > epsilon:
        raise ConfigError(f"epsilon {epsilon:g} cannot be met at delta {delta:g}: the other "
                          "releases already spend it")
    if _eps(lo, sample_rate, steps, delta, extra) <= epsilon:
        raise ConfigError(f"epsilon {epsilon:g} is above what noise multiplier {lo:g} spends; "
                          "ask for less")
    a, b = math.log(lo), math.log(hi)
    while b - a > 1e-10:  # spend within ~1e-9 relative of the target
        mid = 0.5 * (a + b)
        if _eps(math.exp(mid), sample_rate, steps, delta, extra) > epsilon:
            a = mid
        else:
            b = mid
    return math.exp(b)


@functools.lru_cache(maxsize=128)
def schedule_for(
    total_epsilon: float, *, histogram: bool, prototypes: bool,
    policy: DPPolicy = DEFAULT_DP_POLICY,
) -> RDSchedule:
    """The schedule spending ``total_epsilon`` (at ``policy.delta``) on DP-SGD plus the noised
    entries asked for. ``prototypes`` implies the histogram (its counts are their denominator)."""
    histogram = histogram or prototypes
    b = policy.bounds
    d, q, steps = policy.delta, policy.sample_rate, policy.steps
    sh = (noise_for_epsilon(total_epsilon * policy.histogram_share, delta=d, sample_rate=1.0,
                            steps=1, lo=b.min_noise_multiplier, hi=b.max_noise_multiplier)
          if histogram else None)
    sp = (noise_for_epsilon(total_epsilon * policy.prototype_share, delta=d, sample_rate=1.0,
                            steps=1, lo=b.min_noise_multiplier, hi=b.max_noise_multiplier)
          if prototypes else None)
    extra = tuple(s for s in (sh, sp) if s is not None)
    sigma = noise_for_epsilon(total_epsilon, delta=d, sample_rate=q, steps=steps, extra=extra,
                              lo=b.min_noise_multiplier, hi=b.max_noise_multiplier)
    return RDSchedule(
        target_epsilon=total_epsilon, delta=d, sample_rate=q, steps=steps,
        clip_norm=policy.clip_norm, noise_multiplier=sigma,
        training_epsilon=_eps(sigma, q, steps, d, ()),
        histogram_noise_multiplier=sh, prototype_noise_multiplier=sp,
        prototype_clip=policy.prototype_clip, total_epsilon=_eps(sigma, q, steps, d, extra),
    )

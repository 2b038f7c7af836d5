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
import logging
import math
from dataclasses import dataclass

from ..errors import ConfigError
from ._accountant import compose, epsilon_from_curve, gaussian_curve
from ._noise_cache import NoiseSearchCache, noise_search_cache, search_key
from ._policy import DEFAULT_DP_POLICY, DPPolicy

__all__ = [
    "SEARCH_TOLERANCE",
    "RDSchedule",
    "clear_accounting_caches",
    "noise_for_epsilon",
    "schedule_for",
    "search_noise",
]

log = logging.getLogger(__name__)


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


#: The bisection stops when its bracket is this narrow in log space: the answer spends within
#: about 1e-9 relative of the target. Part of the on-disk cache key.
SEARCH_TOLERANCE = 1e-10


def _eps(sigma: float, q: float, steps: int, delta: float, extra: tuple[float, ...]) -> float:
    curves = [gaussian_curve(sigma, q, steps), *(gaussian_curve(s, 1.0, 1) for s in extra)]
    return epsilon_from_curve(compose(curves), delta)[0]


def _is_search_answer(
    sigma: float, epsilon: float, *, delta: float, sample_rate: float, steps: int,
    extra: tuple[float, ...], lo: float, hi: float,
) -> bool:
    """Whether ``sigma`` (read from the cache: untrusted) is what the search returns, to within its
    tolerance: it spends at most ``epsilon`` (the privacy check) and ``sigma`` shrunk by twice the
    tolerance spends more (the same noise every device of this policy declares, hence the same
    header and the same utility). Two accountant curves; the first is the one the caller uses next,
    already in the curve cache when it does."""
    if not (isinstance(sigma, float) and math.isfinite(sigma) and lo <= sigma <= hi):
        return False
    if _eps(sigma, sample_rate, steps, delta, extra) > epsilon:
        return False
    below = sigma * math.exp(-2.0 * SEARCH_TOLERANCE)
    return below >= lo and _eps(below, sample_rate, steps, delta, extra) > epsilon


def search_noise(
    epsilon: float, *, delta: float, sample_rate: float, steps: int,
    extra: tuple[float, ...] = (), lo: float = 0.3, hi: float = 1e4,
    cache: NoiseSearchCache | None = None,
) -> float:
    """:func:`noise_for_epsilon` without its in-memory cache, with the on-disk ``cache`` given
    explicitly (``None``: none). A stored answer is used only if it passes
    :func:`_is_search_answer`; otherwise it counts as ``refused``, the search runs and the answer
    is stored over it. Raises :class:`ConfigError` as :func:`noise_for_epsilon` does."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"target epsilon must be finite and > 0, got {epsilon!r}")
    extra = tuple(float(s) for s in extra)
    key = None
    if cache is not None and cache.enabled:
        key = search_key(epsilon, delta=delta, sample_rate=sample_rate, steps=steps, extra=extra,
                         lo=lo, hi=hi, tolerance=SEARCH_TOLERANCE)
        stored = cache.get(key)
        if stored is not None:
            if _is_search_answer(stored, epsilon, delta=delta, sample_rate=sample_rate,
                                 steps=steps, extra=extra, lo=lo, hi=hi):
                return stored
            cache.refused += 1
            log.warning("noise-search cache entry failed its check (edited or stale): searching")
    if _eps(hi, sample_rate, steps, delta, extra) > epsilon:
        raise ConfigError(f"epsilon {epsilon:g} cannot be met at delta {delta:g}: the other "
                          "releases already spend it")
    if _eps(lo, sample_rate, steps, delta, extra) <= epsilon:
        raise ConfigError(f"epsilon {epsilon:g} is above what noise multiplier {lo:g} spends; "
                          "ask for less")
    a, b = math.log(lo), math.log(hi)
    while b - a > SEARCH_TOLERANCE:  # spend within ~1e-9 relative of the target
        mid = 0.5 * (a + b)
        if _eps(math.exp(mid), sample_rate, steps, delta, extra) > epsilon:
            a = mid
        else:
            b = mid
    sigma = math.exp(b)
    if cache is not None and key is not None:
        cache.put(key, sigma)
    return sigma


@functools.lru_cache(maxsize=512)
def noise_for_epsilon(
    epsilon: float, *, delta: float, sample_rate: float, steps: int,
    extra: tuple[float, ...] = (), lo: float = 0.3, hi: float = 1e4,
) -> float:
    """Smallest noise multiplier (to 1e-10 relative) whose mechanism, composed with the single
    Gaussian releases of multipliers ``extra``, spends at most ``epsilon`` at ``delta``.

    Cached in memory per parameter set, and on disk between processes (the process's
    :func:`~diredi_secure.privacy.noise_search_cache`; every stored answer is re-checked with the
    accountant before use, see :func:`search_noise`).

    Raises :class:`ConfigError` when even ``hi`` overspends (the extras alone take the budget) or
    ``lo`` already underspends (the target is above what the bounds let a device use)."""
    return search_noise(epsilon, delta=delta, sample_rate=sample_rate, steps=steps, extra=extra,
                        lo=lo, hi=hi, cache=noise_search_cache())


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


def clear_accounting_caches() -> None:
    """Empty every in-memory accounting cache (curves, epsilons, searches, schedules): what a new
    process starts with. For benchmarks and tests; results never depend on the caches."""
    from ._accountant import _gaussian_curve
    from ._mechanisms import _gaussian_epsilon, _mechanisms_epsilon

    for cached in (_gaussian_curve, _gaussian_epsilon, _mechanisms_epsilon, noise_for_epsilon,
                   schedule_for):
        cached.cache_clear()

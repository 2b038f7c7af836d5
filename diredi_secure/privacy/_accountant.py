"""The one accountant: Renyi DP of the Poisson-subsampled Gaussian mechanism, composed by addition.

Why by hand: Opacus' RDP analysis (``opacus.accountants.analysis.rdp``) is the reference, but importing
it imports ``opacus`` and so torch, and the cloud's ingest path and ledger must stay torch-free and
cheap. The maths below is the integer-order formula of Mironov, Talwar & Zhang (2019, Sec. 3.3,
exact for integer orders) and the RDP -> (epsilon, delta) conversion of Balle et al. (2020, Thm 21),
the one Opacus' ``get_privacy_spent`` uses. ``tests/unit/test_privacy.py`` checks both against
Opacus' ``RDPAccountant`` on the same orders, and the lifetime composition against Opacus' PRV
accountant as an independent upper bound.

A curve is a float64 vector over :data:`RDP_ORDERS`. Composition of any mechanisms (DP-SGD steps,
a histogram, prototypes, every packet of a device's life) is the sum of their curves: exact for RDP,
and constant-size, so the ledger stores one curve per device. The discrete Gaussian used for
integer releases has the same RDP curve as the continuous one at sample rate 1 (it is
``1/(2 sigma^2)``-zCDP; Canonne, Kamath & Steinke 2020, Thm 4), so one formula covers both.

Cost: with the policy's bounds (:class:`~diredi_secure.privacy.DPBounds`) one curve is
``sum(RDP_ORDERS)`` (about 33k) terms in one vectorised pass (a segmented log-sum-exp, about half
a millisecond), whatever a device declares; curves and epsilons are also cached per parameter set.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import numpy as np
from scipy.special import gammaln, logsumexp

__all__ = [
    "ACCOUNTANT",
    "RDP_ORDERS",
    "compose",
    "epsilon_from_curve",
    "gaussian_curve",
    "zero_curve",
]

#: Name written in packet headers and ledgers for this accountant (orders and formula versioned).
ACCOUNTANT = "rdp"

#: Integer orders: the formula is exact there, and integers up to 1024 cover epsilons from about 0.012
#: (large orders) to several hundred (order 2). Changing them changes stored ledgers: version it.
RDP_ORDERS: tuple[int, ...] = (*range(2, 65), 80, 96, 128, 160, 192, 256, 384, 512, 1024)
_ORDERS = np.asarray(RDP_ORDERS, dtype=np.float64)


def zero_curve() -> np.ndarray:
    """The curve of doing nothing (the identity of composition)."""
    return np.zeros(len(RDP_ORDERS), dtype=np.float64)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    # log E[(p/q)^alpha] for the subsampled Gaussian, integer alpha: binomial expansion. The slow
    # reference for _log_a_all (tests/unit/test_privacy_cache.py checks one against the other).
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    log_terms = log_binom + (k * (k - 1)) / (2.0 * sigma * sigma)
    if q < 1.0:
        log_terms = log_terms + k * math.log(q) + (alpha - k) * math.log1p(-q)
        return float(logsumexp(log_terms))
    return float(log_terms[-1])


# Every order's binomial expansion laid end to end (sum(RDP_ORDERS) + len(RDP_ORDERS) terms, about
# 33k): one vectorised pass over all orders instead of one scipy call per order (18 ms -> ~1 ms a
# curve; a noise search computes about 40).
_SEG_K = np.concatenate([np.arange(a + 1, dtype=np.float64) for a in RDP_ORDERS])
_SEG_A = np.concatenate([np.full(a + 1, a, dtype=np.float64) for a in RDP_ORDERS])
_SEG_START = np.cumsum([0, *(a + 1 for a in RDP_ORDERS[:-1])])
_SEG_LEN = np.asarray([a + 1 for a in RDP_ORDERS])
_SEG_LOG_BINOM = gammaln(_SEG_A + 1) - gammaln(_SEG_K + 1) - gammaln(_SEG_A - _SEG_K + 1)
_SEG_K_PAIRS = _SEG_K * (_SEG_K - 1)


def _log_a_all(q: float, sigma: float) -> np.ndarray:
    """:func:`_log_a_int` for every order at once (0 < q < 1): a segmented log-sum-exp."""
    terms = (_SEG_LOG_BINOM + _SEG_K_PAIRS / (2.0 * sigma * sigma)
             + _SEG_K * math.log(q) + (_SEG_A - _SEG_K) * math.log1p(-q))
    # As scipy's logsumexp: the maximal terms (ties counted) are taken out of the sum, which then
    # goes through log1p. log A is often ~1e-16 (large noise, small q): peak + log(1 + tiny)
    # would keep no correct digit of it.
    peak = np.maximum.reduceat(terms, _SEG_START)
    spread = np.repeat(peak, _SEG_LEN)
    is_peak = terms == spread
    ties = np.add.reduceat(is_peak.astype(np.float64), _SEG_START)
    rest = np.exp(terms - spread)
    rest[is_peak] = 0.0
    out: np.ndarray = np.log1p(np.add.reduceat(rest, _SEG_START) / ties) + np.log(ties) + peak
    return out


def gaussian_curve(noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
    """RDP curve of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism.

    ``noise_multiplier`` is the noise std divided by the L2 sensitivity. Callers bound the inputs
    first (:func:`~diredi_secure.privacy.check_mechanism`); here only the maths' domain is checked.
    Cached per parameter set (a fleet declares a handful; ingest must not pay milliseconds per
    packet): the returned array is read-only.
    """
    return _gaussian_curve(float(noise_multiplier), float(sample_rate), int(steps))


@functools.lru_cache(maxsize=4096)
def _gaussian_curve(noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
    out = _compute_gaussian_curve(noise_multiplier, sample_rate, steps)
    out.flags.writeable = False
    return out


def _compute_gaussian_curve(noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise multiplier must be finite and > 0, got {noise_multiplier!r}")
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample rate must lie in (0, 1], got {sample_rate!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    if steps == 0:
        return zero_curve()
    if sample_rate == 1.0:
        per_step = _ORDERS / (2.0 * noise_multiplier**2)
    else:
        per_step = _log_a_all(sample_rate, noise_multiplier) / (_ORDERS - 1)
    return per_step * float(steps)


def compose(curves: Iterable[np.ndarray]) -> np.ndarray:
    """Composition: the sum of the curves."""
    total = zero_curve()
    for c in curves:
        total = total + np.asarray(c, dtype=np.float64)
    return total


def epsilon_from_curve(curve: np.ndarray, delta: float) -> tuple[float, int]:
    """Smallest epsilon over the orders for which the curve gives (epsilon, ``delta``)-DP, and the
    order that reaches it. Balle et al. (2020) conversion, as Opacus' ``get_privacy_spent``."""
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    curve = np.asarray(curve, dtype=np.float64)
    if curve.shape != _ORDERS.shape:
        raise ValueError(f"curve has shape {curve.shape}, expected {_ORDERS.shape}")
    if not np.any(curve > 0):
        return 0.0, RDP_ORDERS[0]
    eps = (
        curve
        - (math.log(delta) + np.log(_ORDERS)) / (_ORDERS - 1)
        + np.log((_ORDERS - 1) / _ORDERS)
    )
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    return max(0.0, float(eps[i])), RDP_ORDERS[i]

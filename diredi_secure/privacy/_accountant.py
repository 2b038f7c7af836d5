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

Cost: with the policy's bounds (:class:`~diredi_secure.privacy.DPBounds`) one curve is at most
``sum(RDP_ORDERS)`` (about 33k) vectorised terms: milliseconds, whatever a device declares.
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
    # log E[(p/q)^alpha] for the subsampled Gaussian, integer alpha: binomial expansion.
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    log_terms = log_binom + (k * (k - 1)) / (2.0 * sigma * sigma)
    if q < 1.0:
        log_terms = log_terms + k * math.log(q) + (alpha - k) * math.log1p(-q)
        return float(logsumexp(log_terms))
    return float(log_terms[-1])


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
        per_step = np.array(
            [_log_a_int(sample_rate, noise_multiplier, a) / (a - 1) for a in RDP_ORDERS]
        )
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

"""One-run canary audit (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023).

Protocol: ``m`` canaries; each is put into the user's training data independently with probability
1/2 (``S_i`` in {-1, +1}). One RD run. Each canary gets a score through what the adversary sees (the
packet); the auditor guesses "in" for the ``k_plus`` highest scores, "out" for the ``k_minus``
lowest, and abstains on the rest. With ``r = k_plus + k_minus`` guesses of which ``v`` are right:

* for an epsilon-DP mechanism the number of correct guesses is stochastically dominated by
  ``Binomial(r, e^eps / (1 + e^eps))`` (their Theorem 3.1);
* for (epsilon, delta)-DP (their Theorem 5.2 / the procedure in their appendix),
  ``P[W >= v] <= P[Bin(r, q) >= v] + 2 m delta * max_{1<=i<=v} P[v-i <= Bin(r, q) < v] / i`` with
  ``q = e^eps / (1 + e^eps)``.

The epsilon lower bound at confidence ``1 - p`` is the largest epsilon whose p-value is below ``p``
(bisection: the p-value grows with epsilon). Choosing ``(k_plus, k_minus)`` after looking at the
data would void the confidence, so the guess sizes come from a fixed grid given in advance and the
level is split over it (Bonferroni): each grid point is tested at ``p / len(grid)``.

Pure numpy/scipy; the scoring of canaries through a packet lives in :mod:`.scenario`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from diredi_secure.errors import ConfigError

__all__ = [
    "DEFAULT_GUESS_PLANS",
    "CanaryAudit",
    "audit_canary_scores",
    "epsilon_lower_bound",
    "p_value",
    "sample_inclusion",
]

#: Guess plans ``(f_plus, f_minus)``: guess "in" on the top ``f_plus * m`` scores and "out" on the
#: bottom ``f_minus * m``. Fixed before any scores are seen; the confidence level is shared across
#: them. Positive-only plans matter: membership signals are one-sided (a memorised canary stands
#: out, a missing one looks like any other), as Steinke et al. also find.
DEFAULT_GUESS_PLANS: tuple[tuple[float, float], ...] = (
    (0.02, 0.0), (0.05, 0.0), (0.1, 0.0), (0.2, 0.0), (0.05, 0.05), (0.25, 0.25), (0.5, 0.5),
)


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ConfigError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def p_value(m: int, r: int, v: int, *, epsilon: float, delta: float) -> float:
    """Probability of ``>= v`` correct guesses out of ``r`` under an (epsilon, delta)-DP null.

    Implements the bound of Steinke, Nasr & Jagielski 2023 (Theorem 5.2) as stated in the module
    docstring. Monotone non-decreasing in epsilon. Raises :class:`ConfigError` on bad inputs.
    """
    _check_counts(m, r, v)
    if epsilon < 0 or not math.isfinite(epsilon):
        raise ConfigError(f"epsilon must be finite and >= 0, got {epsilon}")
    if not 0.0 <= delta <= 1.0:
        raise ConfigError(f"delta must be in [0, 1], got {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    alpha = 0.0
    if delta > 0.0 and v > 0:
        # P[v - i <= Bin < v] for i = 1..v, i.e. cumulative pmf downward from v - 1
        pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
        windows = np.cumsum(pmf)
        alpha = float(np.max(windows / np.arange(1, v + 1)))
    return min(1.0, beta + 2.0 * m * delta * alpha)


def epsilon_lower_bound(
    m: int, r: int, v: int, *, delta: float, p: float = 0.05, iterations: int = 50
) -> float:
    """Largest epsilon such that ``p_value(m, r, v, eps, delta) < p`` (0 if none): with confidence
    ``1 - p`` the mechanism is not (eps, delta)-DP for any eps below the returned value."""
    _check_counts(m, r, v)
    if not 0.0 < p < 1.0:
        raise ConfigError(f"p must be in (0, 1), got {p}")
    if p_value(m, r, v, epsilon=0.0, delta=delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, epsilon=hi, delta=delta) < p:
        lo, hi = hi, hi * 2.0
        if hi > 1e3:  # every guess right with huge r: the bound is just very large
            return lo
    for _ in range(iterations):
        mid = (lo + hi) / 2.0
        if p_value(m, r, v, epsilon=mid, delta=delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


def sample_inclusion(m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` independent fair coins: True = the canary goes into the training data."""
    if m < 1:
        raise ConfigError(f"need at least one canary, got {m}")
    return rng.random(m) < 0.5


@dataclass(frozen=True)
class CanaryAudit:
    """Result of the one-run audit."""

    m: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    delta: float
    confidence: float
    epsilon_lower_bound: float
    grid: tuple[tuple[int, int, float], ...]  # (k_plus, k_minus, eps_lb) per grid point

    @property
    def accuracy(self) -> float:
        return self.correct / self.guesses if self.guesses else float("nan")

    def to_json(self) -> dict[str, object]:
        return {
            "m": self.m,
            "guesses": self.guesses,
            "correct": self.correct,
            "k_plus": self.k_plus,
            "k_minus": self.k_minus,
            "delta": self.delta,
            "confidence": self.confidence,
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "grid": [{"k_plus": a, "k_minus": b, "eps_lb": e} for a, b, e in self.grid],
        }


def audit_canary_scores(
    scores: ArrayLike,
    included: ArrayLike,
    *,
    delta: float,
    confidence: float = 0.95,
    guess_plans: Sequence[tuple[float, float]] = DEFAULT_GUESS_PLANS,
) -> CanaryAudit:
    """Guess from scores (higher = more likely included) and bound epsilon at ``confidence``.

    For each plan ``(f_plus, f_minus)`` of the fixed grid, ``round(f_plus * m)`` "in" guesses go
    on the top scores and ``round(f_minus * m)`` "out" guesses on the bottom ones; the best bound
    over the grid is reported, each computed at ``p = (1 - confidence) / len(grid)`` so the
    maximum still holds at ``confidence``. Ties in scores are broken at random by a fixed permutation (seeded by m) so
    that equal scores carry no information.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    inc = np.asarray(included).astype(bool).ravel()
    if s.shape != inc.shape or s.size == 0:
        raise ConfigError(f"{s.size} canary scores for {inc.size} inclusion bits")
    if not np.all(np.isfinite(s)):
        raise ConfigError("canary scores must be finite")
    if not guess_plans or any(
        not (0.0 <= a <= 1.0 and 0.0 <= b <= 1.0 and 0.0 < a + b <= 1.0) for a, b in guess_plans
    ):
        raise ConfigError(f"guess plans must be fractions summing to (0, 1], got {guess_plans}")
    m = s.size
    p = (1.0 - confidence) / len(guess_plans)
    tie_break = np.random.default_rng(m).permutation(m)
    order = np.lexsort((tie_break, s))  # ascending score, ties by the permutation
    grid: list[tuple[int, int, float]] = []
    best: tuple[float, int, int, int, int] = (-1.0, 0, 0, 0, 0)
    for f_plus, f_minus in guess_plans:
        k_plus = min(m, round(f_plus * m))
        k_minus = min(m - k_plus, round(f_minus * m))
        if k_plus + k_minus == 0:
            k_plus = 1
        top = order[m - k_plus:] if k_plus else order[:0]
        bottom = order[:k_minus]
        v = int(inc[top].sum()) + int((~inc[bottom]).sum())
        r = k_plus + k_minus
        eps = epsilon_lower_bound(m, r, v, delta=delta, p=p)
        grid.append((k_plus, k_minus, eps))
        if eps > best[0]:
            best = (eps, r, v, k_plus, k_minus)
    eps, r, v, k_plus, k_minus = best
    return CanaryAudit(
        m=m,
        guesses=r,
        correct=v,
        k_plus=k_plus,
        k_minus=k_minus,
        delta=delta,
        confidence=confidence,
        epsilon_lower_bound=max(eps, 0.0),
        grid=tuple(grid),
    )

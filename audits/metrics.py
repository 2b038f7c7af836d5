"""Attack metrics: ROC with exact counts, AUC, TPR at low FPR with Clopper-Pearson intervals,
the DP consistency test of a ROC curve, and a log-log ROC plot.

Scores are "higher means member". Everything is computed from integer counts (true and false
positives at each threshold), so that every rate has an exact binomial confidence interval. Pure
numpy/scipy; matplotlib only for the plot (Agg backend, PNG bytes, no display).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from diredi_secure.errors import ConfigError

__all__ = [
    "AttackMetrics",
    "DPConsistency",
    "RateInterval",
    "Roc",
    "attack_metrics",
    "auc",
    "clopper_pearson",
    "dp_consistency",
    "roc_curve",
    "roc_loglog_png",
    "tpr_at_fpr",
]


@dataclass(frozen=True)
class RateInterval:
    """``successes / trials`` with a two-sided Clopper-Pearson interval at ``confidence``."""

    successes: int
    trials: int
    low: float
    high: float
    confidence: float

    @property
    def rate(self) -> float:
        return self.successes / self.trials if self.trials else float("nan")


def clopper_pearson(successes: int, trials: int, *, confidence: float = 0.95) -> RateInterval:
    """Exact (Clopper-Pearson) two-sided interval for a binomial proportion.

    ``low = Beta(a/2; k, n-k+1)``, ``high = Beta(1-a/2; k+1, n-k)`` with the conventions
    low = 0 at k = 0 and high = 1 at k = n. Raises :class:`ConfigError` on impossible counts.
    """
    if trials < 0 or not 0 <= successes <= trials:
        raise ConfigError(f"impossible counts: {successes} successes in {trials} trials")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    if trials == 0:
        return RateInterval(0, 0, 0.0, 1.0, confidence)
    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = (
        1.0
        if successes == trials
        else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    )
    return RateInterval(successes, trials, low, high, confidence)


@dataclass(frozen=True)
class Roc:
    """ROC as exact counts: at ``thresholds[i]`` (predict member iff score >= it)."""

    thresholds: NDArray[np.float64]
    tp: NDArray[np.int64]
    fp: NDArray[np.int64]
    positives: int
    negatives: int

    @property
    def tpr(self) -> NDArray[np.float64]:
        return self.tp / max(self.positives, 1)

    @property
    def fpr(self) -> NDArray[np.float64]:
        return self.fp / max(self.negatives, 1)


def _split(scores: ArrayLike, is_member: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(is_member).astype(bool).ravel()
    if s.shape != y.shape:
        raise ConfigError(f"{s.size} scores for {y.size} membership labels")
    if not np.all(np.isfinite(s)):
        raise ConfigError("attack scores must be finite")
    if y.all() or not y.any():
        raise ConfigError("need at least one member and one non-member to score an attack")
    return s, y


def roc_curve(scores: ArrayLike, is_member: ArrayLike) -> Roc:
    """Every distinct operating point, from (0, 0) (threshold +inf) to (1, 1)."""
    s, y = _split(scores, is_member)
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    # last index of each run of equal scores: ties are decided together
    distinct = np.nonzero(np.diff(s_sorted))[0]
    ends = np.concatenate([distinct, [s_sorted.size - 1]])
    tp = np.cumsum(y_sorted)[ends]
    fp = (ends + 1) - tp
    return Roc(
        thresholds=np.concatenate([[np.inf], s_sorted[ends]]),
        tp=np.concatenate([[0], tp]).astype(np.int64),
        fp=np.concatenate([[0], fp]).astype(np.int64),
        positives=int(y.sum()),
        negatives=int((~y).sum()),
    )


def auc(scores: ArrayLike, is_member: ArrayLike) -> float:
    """Area under the ROC (ties count one half): the Mann-Whitney U statistic / (P * N)."""
    s, y = _split(scores, is_member)
    ranks = stats.rankdata(s)
    p = int(y.sum())
    n = int(y.size - p)
    u = float(ranks[y].sum()) - p * (p + 1) / 2.0
    return u / (p * n)


def tpr_at_fpr(roc: Roc, max_fpr: float, *, confidence: float = 0.95) -> RateInterval:
    """The best TPR among operating points with empirical FPR <= ``max_fpr``, with its interval.

    With N negatives, FPR below 1/N is only reached at zero false positives, so at 0.1% FPR with
    fewer than 1000 non-members this reports the TPR at zero false positives (stated in the report).
    """
    allowed = roc.fp <= math.floor(max_fpr * roc.negatives + 1e-9)
    best = int(np.max(roc.tp[allowed]))
    return clopper_pearson(best, roc.positives, confidence=confidence)


@dataclass(frozen=True)
class DPConsistency:
    """Result of checking every ROC point against (epsilon, delta)-DP with exact intervals.

    ``empirical_epsilon`` is the largest epsilon the curve proves at the given confidence (the
    smallest that would make every point consistent); ``consistent`` is ``empirical_epsilon <=
    epsilon``. Both directions of the hypothesis test are checked (TPR vs FPR and TNR vs FNR).
    """

    epsilon: float
    delta: float
    confidence: float
    empirical_epsilon: float
    worst_threshold: float
    violations: int
    points: int

    @property
    def consistent(self) -> bool:
        return self.violations == 0


def _eps_from_rates(hi_rate_low: NDArray[np.float64], lo_rate_high: NDArray[np.float64],
                    delta: float) -> NDArray[np.float64]:
    num = hi_rate_low - delta
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.where(
            num <= 0.0,
            0.0,
            np.where(lo_rate_high <= 0.0, np.inf, np.log(np.maximum(num, 1e-300) / lo_rate_high)),
        )
    return np.maximum(eps, 0.0)


def dp_consistency(
    roc: Roc, *, epsilon: float, delta: float, confidence: float = 0.95, bonferroni: bool = True
) -> DPConsistency:
    """Check ``TPR_low <= exp(eps) * FPR_high + delta`` at every threshold (and the mirror test).

    One-sided Clopper-Pearson bounds at ``confidence``; with ``bonferroni`` the confidence is split
    over all thresholds and both directions, so the family of tests holds jointly at
    ``confidence`` and a correctly implemented DP run fails with probability at most 1 -
    ``confidence`` (no silent false alarms from testing many thresholds).
    """
    if epsilon < 0 or not 0.0 <= delta < 1.0:
        raise ConfigError(f"invalid (epsilon, delta) = ({epsilon}, {delta})")
    points = roc.tp.size
    alpha = 1.0 - confidence
    if bonferroni:
        alpha = alpha / (2 * points)
    p, n = roc.positives, roc.negatives
    tp, fp = roc.tp.astype(np.float64), roc.fp.astype(np.float64)
    # one-sided bounds: lower on a rate of successes, upper on the other
    tpr_low = np.where(tp > 0, stats.beta.ppf(alpha, tp, p - tp + 1), 0.0)
    fpr_high = np.where(fp < n, stats.beta.ppf(1 - alpha, fp + 1, n - fp), 1.0)
    tnr_low = np.where(n - fp > 0, stats.beta.ppf(alpha, n - fp, fp + 1), 0.0)
    fnr_high = np.where(p - tp < p, stats.beta.ppf(1 - alpha, p - tp + 1, tp), 1.0)
    eps_fwd = _eps_from_rates(np.nan_to_num(tpr_low), np.nan_to_num(fpr_high, nan=1.0), delta)
    eps_bwd = _eps_from_rates(np.nan_to_num(tnr_low), np.nan_to_num(fnr_high, nan=1.0), delta)
    eps_all = np.maximum(eps_fwd, eps_bwd)
    worst = int(np.argmax(eps_all))
    return DPConsistency(
        epsilon=float(epsilon),
        delta=float(delta),
        confidence=confidence,
        empirical_epsilon=float(eps_all[worst]),
        worst_threshold=float(roc.thresholds[worst]),
        violations=int(np.sum(eps_all > epsilon)),
        points=points,
    )


@dataclass(frozen=True)
class AttackMetrics:
    """Summary of one membership attack: the figures the report and the verdict use."""

    name: str
    auc: float
    auc_interval: tuple[float, float]
    tpr_at_1pct: RateInterval
    tpr_at_01pct: RateInterval
    members: int
    non_members: int
    consistency: DPConsistency | None

    def to_json(self) -> dict[str, object]:
        def ri(r: RateInterval) -> dict[str, object]:
            return {"rate": r.rate, "low": r.low, "high": r.high, "successes": r.successes,
                    "trials": r.trials, "confidence": r.confidence}

        out: dict[str, object] = {
            "name": self.name,
            "auc": self.auc,
            "auc_interval": list(self.auc_interval),
            "tpr_at_1pct_fpr": ri(self.tpr_at_1pct),
            "tpr_at_0.1pct_fpr": ri(self.tpr_at_01pct),
            "members": self.members,
            "non_members": self.non_members,
        }
        if self.consistency is not None:
            c = self.consistency
            out["dp_consistency"] = {
                "epsilon": c.epsilon, "delta": c.delta, "confidence": c.confidence,
                "empirical_epsilon": c.empirical_epsilon, "violations": c.violations,
                "points": c.points, "consistent": c.consistent,
            }
        return out


def auc_interval(auc_value: float, positives: int, negatives: int,
                 *, confidence: float = 0.95) -> tuple[float, float]:
    """Hanley & McNeil (1982) normal-approximation interval for the AUC, clipped to [0, 1]."""
    a = min(max(auc_value, 1e-12), 1 - 1e-12)
    q1 = a / (2 - a)
    q2 = 2 * a * a / (1 + a)
    var = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (
        positives * negatives
    )
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    half = z * math.sqrt(max(var, 0.0))
    return (max(0.0, auc_value - half), min(1.0, auc_value + half))


def attack_metrics(
    name: str,
    scores: ArrayLike,
    is_member: ArrayLike,
    *,
    epsilon: float | None = None,
    delta: float = 1e-5,
    confidence: float = 0.95,
) -> AttackMetrics:
    """AUC (with interval), TPR at 1% and 0.1% FPR (Clopper-Pearson) and, if ``epsilon`` is
    given (``math.inf`` included), the DP consistency test of the whole curve."""
    roc = roc_curve(scores, is_member)
    a = auc(scores, is_member)
    return AttackMetrics(
        name=name,
        auc=a,
        auc_interval=auc_interval(a, roc.positives, roc.negatives, confidence=confidence),
        tpr_at_1pct=tpr_at_fpr(roc, 0.01, confidence=confidence),
        tpr_at_01pct=tpr_at_fpr(roc, 0.001, confidence=confidence),
        members=roc.positives,
        non_members=roc.negatives,
        # also for an infinite claim: nothing can violate it, but the curve's empirical epsilon
        # (what the positive control proves) is still worth reporting
        consistency=(
            None
            if epsilon is None
            else dp_consistency(roc, epsilon=epsilon, delta=delta, confidence=confidence)
        ),
    )


def roc_loglog_png(curves: Sequence[tuple[str, Roc]], *, title: str = "Membership inference ROC",
                   epsilon: float | None = None, delta: float = 0.0) -> bytes:
    """Log-log ROC of each curve (plus chance and, if given, the (eps, delta)-DP boundary), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=110)
    try:
        floor = 1e-4
        grid = np.logspace(-4, 0, 200)
        ax.plot(grid, grid, ls="--", c="grey", lw=0.8, label="chance")
        if epsilon is not None and math.isfinite(epsilon):
            ax.plot(grid, np.minimum(1.0, math.exp(epsilon) * grid + delta), ls=":", c="k",
                    lw=0.9, label=f"DP bound (eps={epsilon:g})")
        for label, roc in curves:
            fpr = np.maximum(roc.fpr, floor)
            tpr = np.maximum(roc.tpr, floor)
            ax.step(fpr, tpr, where="post", lw=1.2, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(floor, 1.0)
        ax.set_ylim(floor, 1.0)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)

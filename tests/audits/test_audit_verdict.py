"""The verdict logic on synthetic attacks: each pass criterion of issue 6 decides on its own."""

from __future__ import annotations

import math

import numpy as np
import pytest
from diredi_secure.audits import accounting, canary, inspection, metrics
from diredi_secure.audits.suite import ChannelAttack, decide_verdict

from diredi_secure.knowledge import DPParameters

DELTA = 1e-6


def _dp(epsilon: float = 0.99, total: float = 0.0) -> DPParameters:
    return DPParameters(noise_multiplier=5.0, clip_norm=1.0, sample_rate=0.4, steps=90,
                        accountant="prv", epsilon=epsilon, delta=DELTA, total_epsilon=total)


def _attack(scores: np.ndarray, included: np.ndarray, claimed: float,
            consistency: bool = True) -> ChannelAttack:
    am = metrics.attack_metrics("c/a", scores, included,
                                epsilon=claimed if consistency else None, delta=DELTA)
    return ChannelAttack("c", "a", scores, am, metrics.roc_curve(scores, included),
                         canary.audit_canary_scores(scores, included, delta=DELTA))


CLEAN = inspection.InspectionResult(ok=True, findings=())


def _coins(m: int = 256, seed: int = 0) -> tuple[np.random.Generator, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng, canary.sample_inclusion(m, rng)


def _decide(claimed: float, attacks: tuple[ChannelAttack, ...], eps_lb: float,
            dp: DPParameters | None = None) -> dict[str, bool]:
    verdict, crit = decide_verdict(claimed, DELTA, dp or _dp(), _ok_accounting(), attacks,
                                   eps_lb, CLEAN)
    out = {name: ok for name, ok, _ in crit}
    assert (verdict == "pass") == all(out.values())
    return out


def _ok_accounting() -> accounting.PacketAccountingCheck:
    # a check without findings (its recomputation is tested in test_audit_maths.py)
    return accounting.PacketAccountingCheck(
        declared_epsilon=0.99, declared_total_epsilon=0.0, declared_delta=DELTA,
        declared_accountant="prv", recomputed=None, training_only=None)


def test_chance_attack_passes_every_criterion() -> None:
    rng, inc = _coins()
    att = _attack(rng.normal(size=inc.size), inc, 1.0)
    crit = _decide(1.0, (att,), att.canary_audit.epsilon_lower_bound)
    assert all(crit.values()), crit


def test_lower_bound_above_claim_fails_only_that_criterion() -> None:
    rng, inc = _coins()
    att = _attack(rng.normal(size=inc.size), inc, 1.0)
    crit = _decide(1.0, (att,), 1.01)
    assert not crit["eps lower bound <= claimed"]
    assert crit["ROC consistent with (eps, delta)"]
    # equal is allowed: the criterion is eps_lb <= claimed
    assert _decide(1.0, (att,), 1.0)["eps lower bound <= claimed"]


def test_roc_point_above_the_dp_line_fails() -> None:
    rng, inc = _coins(512)
    # a strong signal on 1/4 of the members: TPR_low well above e^0.5 FPR_high + delta at the
    # top thresholds, while the AUC stays moderate
    s = rng.normal(size=inc.size)
    strong = inc & (rng.random(inc.size) < 0.25)
    s[strong] += 8.0
    att = _attack(s, inc, 0.5)
    assert att.metrics.consistency is not None and att.metrics.consistency.violations > 0
    # the criterion is exactly TPR_low <= exp(eps) FPR_high + delta at every threshold
    roc, c = att.roc, att.metrics.consistency
    alpha = (1 - c.confidence) / (2 * c.points)
    from scipy import stats

    tp, fp = roc.tp.astype(float), roc.fp.astype(float)
    tpr_low = np.where(tp > 0, stats.beta.ppf(alpha, tp, roc.positives - tp + 1), 0.0)
    fpr_high = np.where(fp < roc.negatives,
                        stats.beta.ppf(1 - alpha, fp + 1, roc.negatives - fp), 1.0)
    assert np.any(tpr_low > math.exp(0.5) * fpr_high + DELTA)
    crit = _decide(0.5, (att,), 0.0)
    assert not crit["ROC consistent with (eps, delta)"]
    # the same curve is consistent with a claim large enough
    att8 = _attack(s, inc, 8.0)
    assert _decide(8.0, (att8,), 0.0)["ROC consistent with (eps, delta)"]


def test_untested_curve_or_no_attack_fails_a_finite_claim() -> None:
    rng, inc = _coins()
    att = _attack(rng.normal(size=inc.size), inc, 1.0, consistency=False)
    assert not _decide(1.0, (att,), 0.0)["ROC consistent with (eps, delta)"]
    assert not _decide(1.0, (), 0.0)["ROC consistent with (eps, delta)"]


@pytest.mark.parametrize(
    ("dp", "failed"),
    [
        (_dp(epsilon=1.2), "declared epsilon <= claimed"),
        (_dp(epsilon=0.9, total=1.05), "declared epsilon <= claimed"),
        (DPParameters(noise_multiplier=0.0, clip_norm=1.0, sample_rate=0.4, steps=90,
                      accountant="none", epsilon=math.inf, delta=DELTA), "packet is DP"),
        (DPParameters(noise_multiplier=5.0, clip_norm=1.0, sample_rate=0.4, steps=90,
                      accountant="prv", epsilon=0.9, delta=DELTA, poisson_sampling=False),
         "packet is DP"),
    ],
)
def test_header_criteria(dp: DPParameters, failed: str) -> None:
    rng, inc = _coins()
    att = _attack(rng.normal(size=inc.size), inc, 1.0)
    assert not _decide(1.0, (att,), 0.0, dp)[failed]

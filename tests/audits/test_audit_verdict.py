"""The verdict logic on synthetic attacks: per mechanism (pass / fail / inconclusive above the
ceiling) and overall."""

from __future__ import annotations

import math

import numpy as np
import pytest
from diredi_secure.audits import canary, inspection, metrics
from diredi_secure.audits.mechanisms import MechanismAudit, detection_ceiling, judge_mechanism
from diredi_secure.audits.suite import decide_verdict

from diredi_secure.knowledge import DPParameters

DELTA = 1e-5
CLEAN = inspection.InspectionResult(ok=True, findings=())


def _dp(epsilon: float = 0.9, total: float = 1.0) -> DPParameters:
    return DPParameters(noise_multiplier=13.5, clip_norm=1.0, sample_rate=1 / 3, steps=90,
                        accountant="rdp", epsilon=epsilon, delta=DELTA, total_epsilon=total)


def _coins(m: int = 512, seed: int = 0) -> tuple[np.random.Generator, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng, canary.sample_inclusion(m, rng)


def _judge(scores: np.ndarray, inc: np.ndarray, claimed: float) -> MechanismAudit:
    am = metrics.attack_metrics("m/a", scores, inc, epsilon=claimed, delta=DELTA)
    ca = canary.audit_canary_scores(scores, inc, delta=DELTA)
    ceiling = detection_ceiling(inc, delta=DELTA, canary_confidence=0.95, roc_confidence=0.95)
    return judge_mechanism("m", claimed_epsilon=claimed, delta=DELTA, ceiling=ceiling,
                           eps_lower_bound=ca.epsilon_lower_bound,
                           consistency=(("m/a", am.consistency),))


def test_ceiling_of_512_canaries_is_about_4_4() -> None:
    _, inc = _coins(512)
    # the suite's DP-SGD split: 3 mechanisms, 3 channels (one-run), 6 tests (ROC)
    c = detection_ceiling(inc, delta=1e-6, canary_confidence=1 - 0.05 / 9,
                          roc_confidence=1 - 0.05 / 18)
    assert 3.5 < c < 4.7


def test_chance_attack_passes_below_the_ceiling() -> None:
    rng, inc = _coins()
    m = _judge(rng.normal(size=inc.size), inc, 1.0)
    assert m.verdict == "pass", m.detail


def test_a_claim_above_the_ceiling_is_inconclusive_never_pass() -> None:
    rng, inc = _coins()
    m = _judge(rng.normal(size=inc.size), inc, 8.0)
    assert m.ceiling < 8.0
    assert m.verdict == "inconclusive"
    assert "ceiling" in m.detail and f"{m.ceiling:.3f}" in m.line()
    verdict, crit = decide_verdict(8.0, _dp(7.5, 8.0), None, CLEAN, (m,))
    assert verdict == "fail"  # no accounting: criterion 3
    from diredi_secure.audits.accounting import PacketAccountingCheck

    ok = PacketAccountingCheck(7.5, 8.0, DELTA, "rdp", charge=None)
    verdict, crit = decide_verdict(8.0, _dp(7.5, 8.0), ok, CLEAN, (m,))
    assert verdict == "inconclusive", crit


def test_a_perfect_attack_fails_a_claim_below_the_ceiling() -> None:
    _, inc = _coins()
    m = _judge(inc.astype(float), inc, 1.0)
    assert m.verdict == "fail"
    assert m.eps_lower_bound > 1.0 and m.roc_epsilon > 1.0


def test_any_failing_mechanism_fails_the_packet() -> None:
    from diredi_secure.audits.accounting import PacketAccountingCheck

    rng, inc = _coins()
    good = _judge(rng.normal(size=inc.size), inc, 1.0)
    high = _judge(rng.normal(size=inc.size), inc, 8.0)
    bad = _judge(inc.astype(float), inc, 1.0)
    ok = PacketAccountingCheck(0.9, 1.0, DELTA, "rdp", charge=None)
    assert decide_verdict(1.0, _dp(), ok, CLEAN, (good, good))[0] == "pass"
    assert decide_verdict(1.0, _dp(), ok, CLEAN, (good, high))[0] == "inconclusive"
    assert decide_verdict(1.0, _dp(), ok, CLEAN, (good, high, bad))[0] == "fail"
    dirty = inspection.InspectionResult(ok=False, findings=("copy",))
    assert decide_verdict(1.0, _dp(), ok, dirty, (good,))[0] == "fail"


def test_untested_curve_or_extra_failure_fails() -> None:
    rng, inc = _coins()
    s = rng.normal(size=inc.size)
    ca = canary.audit_canary_scores(s, inc, delta=DELTA)
    m = judge_mechanism("m", claimed_epsilon=1.0, delta=DELTA, ceiling=4.0,
                        eps_lower_bound=ca.epsilon_lower_bound, consistency=(("m/a", None),))
    assert m.verdict == "fail"
    m = judge_mechanism("m", claimed_epsilon=1.0, delta=DELTA, ceiling=4.0, eps_lower_bound=0.0,
                        consistency=(), extra_failure="noise floor")
    assert m.verdict == "fail" and "noise floor" in m.detail


@pytest.mark.parametrize(
    ("dp", "failed"),
    [
        (_dp(epsilon=1.2, total=1.2), "declared epsilon <= claimed"),
        (DPParameters(noise_multiplier=0.0, clip_norm=1.0, sample_rate=0.4, steps=90,
                      accountant="none", epsilon=math.inf, delta=DELTA), "packet is DP"),
        (DPParameters(noise_multiplier=5.0, clip_norm=1.0, sample_rate=0.4, steps=90,
                      accountant="rdp", epsilon=0.9, delta=DELTA, poisson_sampling=False),
         "packet is DP"),
    ],
)
def test_header_criteria(dp: DPParameters, failed: str) -> None:
    from diredi_secure.audits.accounting import PacketAccountingCheck

    rng, inc = _coins()
    good = _judge(rng.normal(size=inc.size), inc, 1.0)
    ok = PacketAccountingCheck(0.9, 1.0, DELTA, "rdp", charge=None)
    verdict, crit = decide_verdict(1.0, dp, ok, CLEAN, (good,))
    assert verdict == "fail" and not dict((n, o) for n, o, _ in crit)[failed]


def test_noise_floor_flags_runs_that_vary_too_little() -> None:
    from diredi_secure.audits.mechanisms import noise_floor

    rng = np.random.default_rng(0)
    honest = [rng.normal(0, 1.0, 5000) for _ in range(8)]
    ok = noise_floor(honest[:4], honest[4:])
    assert ok.ok and 0.9 < ok.ratio < 1.1
    small = [rng.normal(0, 0.1, 5000) for _ in range(4)]  # 10x less noise
    low = noise_floor(small, honest[4:])
    assert not low.ok and low.ratio < 0.02
    same = noise_floor([honest[0]] * 4, honest[4:])  # a fixed seed: identical runs
    assert not same.ok and same.ratio == 0.0

"""Unit tests on the audit maths: accounting, metrics, the one-run canary bound."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
from diredi_secure.audits import accounting, canary, metrics
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from diredi_secure.errors import ConfigError, PolicyViolation


@dataclass(frozen=True)
class DP:
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    sample_rate: float = 0.01
    steps: int = 1000
    accountant: str = "rdp"
    epsilon: float = 2.11
    delta: float = 1e-5
    poisson_sampling: bool = True
    total_epsilon: float = 0.0


@dataclass(frozen=True)
class Entry:
    name: str
    noise_multiplier: float = 0.0
    epsilon: float = 0.0


# ------------------------------------------------------------------------------------ accounting
def test_rdp_recomputation_matches_opacus_accountant() -> None:
    acc = RDPAccountant()
    acc.history = [(1.0, 0.01, 1000)]
    mech = accounting.GaussianMechanism(1.0, 0.01, 1000)
    ours, _ = accounting.rdp_epsilon([mech], delta=1e-5)
    # our order grid is a superset of Opacus' defaults: never looser
    assert ours <= acc.get_epsilon(1e-5) + 1e-9
    assert ours == pytest.approx(2.10, abs=0.02)


def test_prv_not_above_rdp_over_a_grid() -> None:
    for sigma, q, steps in [(0.6, 0.05, 200), (1.0, 0.01, 1000), (2.0, 0.1, 50), (5.0, 1.0, 1)]:
        rec = accounting.recompute_epsilon(
            [accounting.GaussianMechanism(sigma, q, steps)], delta=1e-5
        )
        assert rec.prv_within_rdp, (sigma, q, steps, rec)
        assert 0 < rec.prv_epsilon <= rec.rdp_epsilon + 0.05


def test_honest_packet_passes_and_under_declared_packet_is_flagged() -> None:
    honest = accounting.check_packet_accounting(DP(), dataset_size=10_000, batch_size=100)
    assert honest.ok, honest.findings
    low = accounting.check_packet_accounting(DP(epsilon=1.0))
    assert not low.ok
    assert any("below the recomputed" in f for f in low.findings)
    with pytest.raises(accounting.AccountingError) as info:
        accounting.verify_packet_accounting(DP(epsilon=1.0))
    assert isinstance(info.value, PolicyViolation)


def test_prv_declared_epsilon_is_checked_against_prv() -> None:
    prv = accounting.recompute_epsilon(
        [accounting.GaussianMechanism(1.0, 0.01, 1000)], delta=1e-5
    ).prv_epsilon
    assert accounting.check_packet_accounting(DP(accountant="prv", epsilon=prv)).ok
    # the same number under "rdp" under-reports
    assert not accounting.check_packet_accounting(DP(accountant="rdp", epsilon=prv)).ok


@pytest.mark.parametrize(
    ("dp", "kwargs", "needle"),
    [
        (DP(poisson_sampling=False), {}, "poisson"),
        (DP(), {"dataset_size": 10_000, "batch_size": 50}, "sample rate"),
        (DP(), {"dataset_size": 100_000}, "not below 1/n"),
        (DP(noise_multiplier=0.0), {}, "no Gaussian mechanism"),
        (DP(sample_rate=1.5), {}, "no Gaussian mechanism"),
        (DP(clip_norm=0.0), {}, "clip norm"),
    ],
)
def test_implausible_parameters_are_flagged(
    dp: DP, kwargs: dict[str, int], needle: str
) -> None:
    check = accounting.check_packet_accounting(dp, **kwargs)  # type: ignore[arg-type]
    assert not check.ok
    assert any(needle in f for f in check.findings), check.findings


def test_noisy_payload_entries_are_composed_into_the_packet() -> None:
    hist = Entry("label_histogram", noise_multiplier=5.0, epsilon=0.1)  # truly about 1
    check = accounting.check_packet_accounting(DP(total_epsilon=2.2), [hist])
    assert any("label_histogram" in f for f in check.findings)
    own = accounting.recompute_epsilon(
        [accounting.GaussianMechanism(5.0, 1.0, 1)], delta=1e-5
    )
    good = Entry("label_histogram", noise_multiplier=5.0, epsilon=own.rdp_epsilon)
    assert check.recomputed is not None
    total = check.recomputed.rdp_epsilon
    assert total > 2.10  # composition adds something
    ok = accounting.check_packet_accounting(DP(total_epsilon=total), [good])
    assert ok.ok, ok.findings
    under = accounting.check_packet_accounting(DP(total_epsilon=2.11), [good])
    assert any("total epsilon" in f for f in under.findings)


def test_lifetime_composition_is_rdp_exact_and_below_basic_composition() -> None:
    dp = DP()
    life = accounting.compose_lifetime_epsilon([(dp, ()), (dp, ()), (dp, ())], delta=1e-5)
    one_long, _ = accounting.rdp_epsilon(
        [accounting.GaussianMechanism(1.0, 0.01, 3000)], delta=1e-5
    )
    assert life.rdp_epsilon == pytest.approx(one_long, rel=1e-9)
    assert life.prv_epsilon <= life.rdp_epsilon + 0.1
    assert life.rdp_epsilon < life.sum_of_declared
    single, _ = accounting.rdp_epsilon([accounting.GaussianMechanism(1.0, 0.01, 1000)],
                                       delta=1e-5)
    assert life.tightest > single
    # heterogeneous packets
    other = DP(noise_multiplier=2.0, sample_rate=0.05, steps=100, epsilon=0.5)
    het = accounting.compose_lifetime_epsilon(
        [(dp, ()), (other, [Entry("label_histogram", 5.0, 1.0)])], delta=1e-5
    )
    assert len(het.mechanisms) == 3
    with pytest.raises(ConfigError):
        accounting.compose_lifetime_epsilon([], delta=1e-5)


# ---------------------------------------------------------------------------------- metrics
def test_clopper_pearson_known_values() -> None:
    r = metrics.clopper_pearson(0, 10)
    assert r.low == 0.0
    assert r.high == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-9)
    r = metrics.clopper_pearson(10, 10)
    assert r.high == 1.0
    assert r.low == pytest.approx(0.025 ** (1 / 10), rel=1e-9)
    r = metrics.clopper_pearson(5, 10)
    assert r.low == pytest.approx(0.187086, abs=1e-5)
    assert r.high == pytest.approx(0.812914, abs=1e-5)
    with pytest.raises(ConfigError):
        metrics.clopper_pearson(11, 10)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=4, max_size=60),
    st.randoms(use_true_random=False),
)
def test_roc_and_auc_match_sklearn(raw: list[int], rnd: object) -> None:
    scores = np.array(raw, dtype=float)
    labels = np.array([i % 2 == 0 for i in range(len(raw))])
    roc = metrics.roc_curve(scores, labels)
    fpr, tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(roc.fpr, fpr)
    np.testing.assert_allclose(roc.tpr, tpr)
    assert metrics.auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_tpr_at_low_fpr_uses_exact_counts() -> None:
    negatives = np.concatenate([np.arange(0, 990), np.arange(2000, 2010)])
    scores = np.concatenate([np.arange(1000, 1100), negatives]).astype(float)
    labels = np.concatenate([np.ones(100, bool), np.zeros(1000, bool)])
    roc = metrics.roc_curve(scores, labels)
    # 10 non-members score above every member: FPR 1% admits exactly those 10
    r = metrics.tpr_at_fpr(roc, 0.01)
    assert r.trials == 100
    assert r.successes == 100
    r0 = metrics.tpr_at_fpr(roc, 0.001)
    assert r0.successes == 0  # one FP allowed, but the 10 largest scores are non-members


def _randomized_response(eps: float, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    members = rng.random(n) < 0.5
    keep = rng.random(n) < math.exp(eps) / (1 + math.exp(eps))
    guess = np.where(keep, members, ~members)
    return guess.astype(float), members


def test_dp_consistency_accepts_dp_and_rejects_a_leak() -> None:
    rng = np.random.default_rng(1)
    scores, members = _randomized_response(1.0, 4000, rng)
    roc = metrics.roc_curve(scores, members)
    ok = metrics.dp_consistency(roc, epsilon=1.0, delta=1e-5)
    assert ok.consistent and ok.empirical_epsilon <= 1.0
    assert ok.empirical_epsilon > 0.6  # the test has power
    leak = metrics.dp_consistency(roc, epsilon=0.3, delta=1e-5)
    assert not leak.consistent


def test_attack_metrics_and_plot() -> None:
    rng = np.random.default_rng(2)
    members = rng.random(400) < 0.5
    scores = rng.normal(size=400) + 2.0 * members
    m = metrics.attack_metrics("loss", scores, members, epsilon=1.0)
    assert 0.85 < m.auc < 0.98
    assert m.auc_interval[0] < m.auc < m.auc_interval[1]
    assert m.consistency is not None and not m.consistency.consistent
    png = metrics.roc_loglog_png([("loss", metrics.roc_curve(scores, members))], epsilon=1.0)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------- canary
def _slow_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 5.2 by direct sums of binomial terms, term by term (no scipy)."""
    q = 1.0 / (1.0 + math.exp(-eps))
    qf = Fraction(q)
    pmf = [float(Fraction(math.comb(r, k)) * qf**k * (1 - qf) ** (r - k)) for k in range(r + 1)]
    tail = math.fsum(pmf[v:])
    alpha = 0.0
    for i in range(1, v + 1):
        alpha = max(alpha, math.fsum(pmf[v - i:v]) / i)
    return min(1.0, tail + 2 * m * delta * alpha)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40).flatmap(
        lambda r: st.tuples(st.just(r), st.integers(0, r), st.integers(r, 3 * r))
    ),
    st.floats(0.0, 4.0),
    st.sampled_from([0.0, 1e-5, 1e-3]),
)
def test_p_value_matches_slow_reference(rvm: tuple[int, int, int], eps: float,
                                        delta: float) -> None:
    r, v, m = rvm
    fast = canary.p_value(m, r, v, epsilon=eps, delta=delta)
    assert fast == pytest.approx(_slow_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-14)


def test_epsilon_lower_bound_is_the_p_value_crossing() -> None:
    m, r, v, delta, p = 1000, 100, 90, 1e-5, 0.05
    eps = canary.epsilon_lower_bound(m, r, v, delta=delta, p=p)
    assert canary.p_value(m, r, v, epsilon=eps, delta=delta) < p
    assert canary.p_value(m, r, v, epsilon=eps + 1e-6, delta=delta) >= p
    # slow reference: scan a grid
    grid = np.arange(eps - 0.02, eps + 0.02, 0.001)
    below = [float(e) for e in grid if _slow_p_value(m, r, v, float(e), delta) < p]
    assert max(below) == pytest.approx(eps, abs=0.0011)
    assert canary.epsilon_lower_bound(m, r, 50, delta=delta) == 0.0  # chance-level guessing


def test_canary_audit_is_valid_and_has_power_on_randomized_response() -> None:
    """Randomized response is exactly eps-DP per canary: the bound must stay below eps (95%) and
    get close to it with all guesses made."""
    rng = np.random.default_rng(3)
    eps, m, runs = 1.0, 1000, 40
    bounds = []
    for _ in range(runs):
        scores, inc = _randomized_response(eps, m, rng)
        scores = scores + 1e-3 * rng.random(m)
        bounds.append(canary.audit_canary_scores(scores, inc, delta=0.0).epsilon_lower_bound)
    assert np.mean(np.array(bounds) > eps) <= 0.1
    assert np.median(bounds) > 0.5
    # no leak at all: bound 0 nearly always
    null = [
        canary.audit_canary_scores(rng.random(m), rng.random(m) < 0.5, delta=1e-5)
        .epsilon_lower_bound
        for _ in range(20)
    ]
    assert np.mean(np.array(null) > 0) <= 0.1


def test_canary_audit_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        canary.audit_canary_scores([1.0, 2.0], [True], delta=1e-5)
    with pytest.raises(ConfigError):
        canary.p_value(10, 5, 6, epsilon=1.0, delta=0.0)

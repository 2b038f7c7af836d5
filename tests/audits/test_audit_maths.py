"""Unit tests on the audit maths: accounting (through diredi_secure.privacy), metrics, the one-run
canary bound."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
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
from diredi_secure.knowledge import DPParameters, PayloadKind
from diredi_secure.ml.reverse import RDConfig, dp_parameters_for
from diredi_secure.privacy import (
    DEFAULT_DP_POLICY,
    RDP_ORDERS,
    epsilon_from_curve,
    gaussian_epsilon,
)

SHIPPED = (PayloadKind.REFERENCE_LOGITS, PayloadKind.WEIGHT_DELTA, PayloadKind.DP_PROTOTYPES)


def _packet(total: float = 8.0, **dp_changes: object) -> tuple[DPParameters, list[Entry]]:
    """The header and entry declarations the shipped device configuration puts on the wire."""
    cfg = RDConfig(epsilon=total, kinds=SHIPPED)
    sched = cfg.schedule()
    assert sched.histogram_noise_multiplier is not None
    assert sched.prototype_noise_multiplier is not None
    entries = [Entry("reference_logits", PayloadKind.REFERENCE_LOGITS),
               Entry("weight_delta", PayloadKind.WEIGHT_DELTA)]
    for name, kind, sigma in (("label_histogram", PayloadKind.LABEL_HISTOGRAM,
                               sched.histogram_noise_multiplier),
                              ("dp_prototypes", PayloadKind.DP_PROTOTYPES,
                               sched.prototype_noise_multiplier)):
        entries.append(Entry(name, kind, sigma, gaussian_epsilon(sigma, DEFAULT_DP_POLICY.delta)))
    return replace(dp_parameters_for(cfg, seeded=False), **dp_changes), entries  # type: ignore[arg-type]


@dataclass(frozen=True)
class Entry:
    name: str
    kind: PayloadKind
    noise_multiplier: float = 0.0
    epsilon: float = 0.0


# ------------------------------------------------------------------------------------ accounting
def test_shipped_header_is_accepted_with_its_mechanism_epsilons() -> None:
    dp, entries = _packet(8.0)
    check = accounting.check_packet_accounting(dp, entries)
    assert check.ok, check.findings
    claims = {c.kind.value: c.epsilon for c in check.claims}
    # the figures docs/AUDIT.md quotes: DP-SGD about 7.5, histogram 0.5, prototypes 2 at total 8
    assert claims["dp_sgd"] == pytest.approx(7.53, abs=0.01)
    assert claims["label_histogram"] == pytest.approx(0.5, abs=1e-6)
    assert claims["dp_prototypes"] == pytest.approx(2.0, abs=1e-5)
    assert check.recomputed_epsilon == pytest.approx(8.0, abs=1e-4)
    assert check.to_json()["ok"] is True


def test_header_is_the_same_for_every_n() -> None:
    # nothing in the header depends on the user's data: the audit's claims are the devices' claims
    a, _ = _packet(2.0)
    b, _ = _packet(2.0)
    assert a == b and a.delta == DEFAULT_DP_POLICY.delta and a.accountant == "rdp"


def test_recomputation_matches_opacus_rdp_accountant() -> None:
    # an independent reference: Opacus' own accountant on the same integer orders
    dp, entries = _packet(2.0)
    acc = RDPAccountant()
    acc.history = [(dp.noise_multiplier, dp.sample_rate, dp.steps)]
    theirs = acc.get_epsilon(dp.delta, alphas=[float(a) for a in RDP_ORDERS])
    check = accounting.check_packet_accounting(dp, entries)
    assert check.charge is not None, check.findings
    assert check.charge.training_epsilon == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"epsilon": 0.5}, "epsilon_"),
        ({"total_epsilon": 1.0}, "epsilon_"),
        ({"noise_seeded": True}, "seeded_noise"),
        ({"poisson_sampling": False}, "no_poisson_sampling"),
        ({"delta": 1e-3}, "delta_over_policy"),
        ({"accountant": "prv"}, "accountant_unsupported"),
        ({"noise_multiplier": 0.01}, "dp_parameter_out_of_bounds"),
    ],
)
def test_a_bad_header_is_one_finding_with_its_reason(changes: dict[str, object],
                                                     reason: str) -> None:
    dp, entries = _packet(8.0, **changes)
    check = accounting.check_packet_accounting(dp, entries)
    # (an understated epsilon is refused as "epsilon_understated" or "epsilon_mismatch")
    assert not check.ok and len(check.reasons) == 1, check.findings
    assert check.reasons[0].startswith(reason), check.reasons
    with pytest.raises(PolicyViolation) as info:
        accounting.verify_packet_accounting(dp, entries)
    assert info.value.reason == check.reasons[0]


def test_an_entry_without_noise_is_unaccounted() -> None:
    dp, entries = _packet(8.0)
    entries[2] = Entry("label_histogram", PayloadKind.LABEL_HISTOGRAM)
    check = accounting.check_packet_accounting(dp, entries)
    assert check.reasons == ("unaccounted_release",)


def test_lifetime_composition_is_the_ledger_composition() -> None:
    dp, entries = _packet(2.0)
    life = accounting.compose_lifetime_epsilon([(dp, entries)] * 3)
    one = accounting.check_packet_accounting(dp, entries).charge
    assert one is not None
    assert life.epsilon == pytest.approx(
        epsilon_from_curve(3 * one.curve, DEFAULT_DP_POLICY.delta)[0], rel=1e-12)
    assert one.epsilon < life.epsilon < life.sum_of_declared
    assert len(life.mechanisms) == 9
    with pytest.raises(ConfigError):
        accounting.compose_lifetime_epsilon([])


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

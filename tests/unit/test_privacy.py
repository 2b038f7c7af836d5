"""The privacy package (issue 13): accountant against Opacus, bounds, schedule, ledger composition."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from diredi_secure import privacy
from diredi_secure.errors import BudgetExceeded, EpsilonUnderstated, PolicyViolation
from diredi_secure.privacy import Mechanism, MechanismKind

from ..conftest import honest_dp

DELTA = 1e-5


def test_rdp_curve_matches_opacus_rdp_accountant() -> None:
    from opacus.accountants import RDPAccountant

    for sigma, q, steps in [(1.1, 1 / 3, 90), (0.7, 0.01, 1000), (4.0, 1.0, 1), (2.3, 0.5, 7)]:
        acc = RDPAccountant()
        acc.history = [(sigma, q, steps)]
        want = acc.get_epsilon(DELTA, alphas=[float(a) for a in privacy.RDP_ORDERS])
        got = privacy.epsilon_from_curve(privacy.gaussian_curve(sigma, q, steps), DELTA)[0]
        assert got == pytest.approx(want, rel=1e-9)


def test_ledger_composed_epsilon_of_five_packets_is_below_their_sum_and_matches_opacus() -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    dp = honest_dp(2.0)
    one = Mechanism(MechanismKind.DP_SGD, dp.noise_multiplier, dp.sample_rate, dp.steps).curve()
    curve = privacy.zero_curve()
    for _ in range(5):
        curve, eps = privacy.charge(device_id="d", spent_curve=curve, packet_curve=one, budget=40.0)
    assert eps < 5 * dp.total_epsilon
    acc = RDPAccountant()
    acc.history = [(dp.noise_multiplier, dp.sample_rate, dp.steps)] * 5
    assert eps == pytest.approx(acc.get_epsilon(DELTA, alphas=[float(a) for a in privacy.RDP_ORDERS]),
                                rel=1e-9)
    # And PRV (a tighter, numerically computed bound) is never above ours: we are an upper bound.
    prv = PRVAccountant()
    prv.history = [(dp.noise_multiplier, dp.sample_rate, dp.steps)] * 5
    assert prv.get_epsilon(DELTA) <= eps + 0.05


def test_schedule_spends_exactly_the_target_and_is_n_free() -> None:
    for total in (1.0, 4.0, 8.0):
        full = privacy.schedule_for(total, histogram=True, prototypes=True)
        assert full.total_epsilon == pytest.approx(total, rel=1e-5) and full.total_epsilon <= total
        dpsgd = privacy.schedule_for(total, histogram=False, prototypes=False)
        assert dpsgd.total_epsilon == pytest.approx(total, rel=1e-5)
        assert dpsgd.noise_multiplier < full.noise_multiplier  # the whole budget goes to DP-SGD
    assert "n" not in {f.lower() for f in privacy.RDSchedule.__dataclass_fields__}


@pytest.mark.parametrize(
    "sigma, q, steps",
    [(0.01, 0.5, 10), (1e-300, 0.5, 10), (1e300, 0.5, 10), (1.0, 0.5, 2**64 - 1),
     (math.nan, 0.5, 10), (1.0, 0.0, 10), (1.0, 1.5, 10), (1.0, 0.5, 0)],
)
def test_declared_parameters_out_of_bounds_are_refused_before_accounting(
    sigma: float, q: float, steps: int
) -> None:
    dp = replace(honest_dp(), noise_multiplier=sigma if math.isfinite(sigma) else 1.0,
                 sample_rate=q if q <= 1 else 1.0, steps=steps)
    if not math.isfinite(sigma) or q > 1:
        dp = SimpleNamespace(**{**dp.__dict__, "noise_multiplier": sigma, "sample_rate": q})
    t0 = time.perf_counter()
    with pytest.raises(privacy.ParameterOutOfBounds) as info:
        privacy.account_packet(dp, [])
    assert info.value.reason == "dp_parameter_out_of_bounds"
    assert time.perf_counter() - t0 < 1.0  # refused before any expensive work


def test_accounting_of_the_worst_allowed_declaration_is_cheap() -> None:
    b = privacy.DPBounds()
    t0 = time.perf_counter()
    privacy.gaussian_curve(b.min_noise_multiplier, 0.999, b.max_steps)
    assert time.perf_counter() - t0 < 2.0


def _entry(kind: str, sigma: float, eps: float) -> SimpleNamespace:
    return SimpleNamespace(name=kind, kind=kind, noise_multiplier=sigma, epsilon=eps)


@pytest.mark.parametrize("kind", ["label_histogram", "dp_prototypes"])
def test_noise_free_private_entry_is_refused_with_a_named_reason(kind: str) -> None:
    with pytest.raises(privacy.UnaccountedRelease) as info:
        privacy.account_packet(honest_dp(), [_entry(kind, 0.0, 0.0)])
    assert info.value.reason == "unaccounted_release"


def test_post_processing_entry_may_not_declare_a_mechanism() -> None:
    with pytest.raises(privacy.UnaccountedRelease):
        privacy.account_packet(honest_dp(), [_entry("reference_logits", 2.0, 0.5)])


def test_understatement_tolerance_is_the_accountants_numerical_error() -> None:
    dp = honest_dp(8.0)
    privacy.account_packet(dp, [])  # honest: accepted
    with pytest.raises(EpsilonUnderstated):  # 1.25 % short was accepted before
        privacy.account_packet(replace(dp, total_epsilon=dp.total_epsilon * 0.9875), [])
    with pytest.raises(EpsilonUnderstated):
        privacy.account_packet(replace(dp, total_epsilon=dp.total_epsilon * (1 - 1e-6)), [])
    with pytest.raises(PolicyViolation) as info:
        privacy.account_packet(replace(dp, total_epsilon=50.0, epsilon=50.0), [])
    assert info.value.reason == "epsilon_mismatch"


def test_seeded_noise_is_refused_by_default_policy() -> None:
    dp = replace(honest_dp(), noise_seeded=True)
    with pytest.raises(privacy.NoiseSeeded):
        privacy.account_packet(dp, [])
    privacy.account_packet(dp, [], replace(privacy.DEFAULT_DP_POLICY, allow_seeded_noise=True))


def test_delta_above_policy_and_other_accountants_are_refused() -> None:
    with pytest.raises(PolicyViolation) as info:
        privacy.account_packet(replace(honest_dp(), delta=1e-3), [])
    assert info.value.reason == "delta_over_policy"
    with pytest.raises(PolicyViolation) as info:
        privacy.account_packet(replace(honest_dp(), accountant="prv"), [])
    assert info.value.reason == "accountant_unsupported"


def test_budget_is_refused_on_the_composed_figure() -> None:
    one = honest_dp(8.0)
    curve = Mechanism(MechanismKind.DP_SGD, one.noise_multiplier, one.sample_rate, one.steps).curve()
    with pytest.raises(BudgetExceeded):
        privacy.charge(device_id="d", spent_curve=curve, packet_curve=curve, budget=9.0)


def test_ledger_curve_round_trips_and_refuses_another_grid() -> None:
    c = privacy.gaussian_curve(1.0, 0.1, 10)
    assert np.array_equal(privacy.curve_from_json(privacy.curve_to_json(c)), c)
    with pytest.raises(ValueError):
        privacy.curve_from_json('{"accountant": "rdp", "orders": [2, 3], "rdp": [0, 0]}')


def test_noise_source_is_unpredictable_by_default_and_seeded_only_on_request() -> None:
    a, b = privacy.NoiseSource.secure(), privacy.NoiseSource.secure()
    assert not a.is_seeded
    assert not np.array_equal(a.numpy().normal(size=8), b.numpy().normal(size=8))
    s1, s2 = privacy.NoiseSource.seeded(3), privacy.NoiseSource.seeded(3)
    assert s1.is_seeded and np.array_equal(s1.numpy().normal(size=8), s2.numpy().normal(size=8))


def test_discrete_gaussian_is_integer_and_has_the_declared_spread() -> None:
    src = privacy.NoiseSource.secure()
    counts = np.zeros(4000, dtype=np.int64)
    out = src.discrete_gaussian(counts, 5.0)
    assert np.array_equal(out, np.rint(out))
    assert abs(out.mean()) < 0.5 and out.std() == pytest.approx(5.0, rel=0.08)


def test_non_finite_entry_epsilon_and_non_integer_steps_are_refused_before_decryption() -> None:
    """Review findings: a NaN entry epsilon passed the header checks; float steps were truncated."""
    s = privacy.schedule_for(8.0, histogram=True, prototypes=True)
    dp = replace(honest_dp(8.0, histogram=True, prototypes=True))
    hist = _entry("label_histogram", s.histogram_noise_multiplier, math.nan)  # type: ignore[arg-type]
    with pytest.raises(PolicyViolation) as info:
        privacy.account_packet(dp, [hist])
    assert info.value.reason == "epsilon_mismatch"
    for steps in (2.9, math.nan, True):
        bad = SimpleNamespace(**{**honest_dp().__dict__, "steps": steps})
        with pytest.raises(PolicyViolation):
            privacy.account_packet(bad, [])


def test_curve_storage_is_exact_and_reads_the_earlier_form() -> None:
    import json

    c = np.abs(np.random.default_rng(3).normal(size=len(privacy.RDP_ORDERS))) * 1e-3
    text = privacy.curve_to_json(c)
    assert json.loads(text)["orders"] == list(privacy.RDP_ORDERS)
    assert privacy.curve_from_json(text).tobytes() == c.tobytes()  # bit-exact
    earlier = json.dumps({"accountant": "rdp", "orders": list(privacy.RDP_ORDERS),
                          "rdp": [float(v) for v in c]})
    assert privacy.curve_from_json(earlier).tobytes() == c.tobytes()
    for bad in (text[:-10] + '"}', text.replace('"}', '00"}'), text[:-4] + 'zz"}',
                text.replace(text[len(text) - 18:-2], "000000000000f0ff")):  # -inf
        with pytest.raises(ValueError):
            privacy.curve_from_json(bad)

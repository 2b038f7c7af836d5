"""Reverse distillation on the device (diredi_secure.ml.reverse)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from diredi_secure.errors import ConfigError, PayloadInvalid
from diredi_secure.knowledge import PayloadKind, PayloadTensor, decode_payload, encode_payload
from diredi_secure.ml.data import Dataset
from diredi_secure.ml.models import build_model, count_parameters, flat_parameters, student_spec
from diredi_secure.ml.reverse import (
    RDConfig,
    default_learning_rate,
    reverse_distill,
    trials_epsilon,
)
from diredi_secure.privacy import (
    ACCOUNTANT,
    DEFAULT_DP_POLICY,
    Mechanism,
    MechanismKind,
    mechanisms_epsilon,
)

ALL = (PayloadKind.REFERENCE_LOGITS, PayloadKind.WEIGHT_DELTA, PayloadKind.DP_PROTOTYPES)


def _data(n: int = 60, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.random((n, 1, 8, 8)).astype(np.float32) * 0.3
    x[np.arange(n), 0, y % 8, y // 2] = 1.0  # a learnable mark per class
    return Dataset(x, y), rng.random((20, 1, 8, 8)).astype(np.float32)


def test_reported_epsilon_matches_opacus_accountant() -> None:
    """The header's training epsilon is the RDP of the policy's schedule, as Opacus counts it;
    no DP parameter depends on the user's N (the delta is the policy's, not 1/(10 N))."""
    from opacus.accountants import RDPAccountant

    data, ref = _data()
    cfg = RDConfig(epsilon=4.0, epochs=2, research_seed=0)
    res = reverse_distill(build_model(student_spec(), seed=0), data, ref, cfg)
    dp = res.dp
    assert dp.accountant == ACCOUNTANT and dp.poisson_sampling and dp.noise_seeded
    assert dp.delta == DEFAULT_DP_POLICY.delta
    assert dp.sample_rate == pytest.approx(1 / 3) and dp.steps == 6
    assert dp.clip_norm == DEFAULT_DP_POLICY.clip_norm
    acc = RDPAccountant()
    acc.history = [(dp.noise_multiplier, dp.sample_rate, dp.steps)]
    assert dp.epsilon == pytest.approx(acc.get_epsilon(dp.delta), rel=1e-2)
    # Training alone: the total is the training epsilon, which spends the target.
    assert dp.total_epsilon == pytest.approx(4.0, rel=1e-5) and dp.epsilon == dp.total_epsilon
    other, _ = _data(n=200, seed=1)
    assert reverse_distill(build_model(student_spec(), seed=0), other, ref, cfg).dp == dp


def test_rd_target_is_the_total_with_noised_entries() -> None:
    data, ref = _data()
    cfg = RDConfig(epsilon=1.0, epochs=2, kinds=ALL, top_m=5, research_seed=0)
    shipped = build_model(student_spec(), seed=0)
    before = flat_parameters(shipped).copy()
    res = reverse_distill(shipped, data, ref, cfg)
    assert np.array_equal(flat_parameters(shipped), before)  # the shipped model is untouched
    hist = res.payload.get(PayloadKind.LABEL_HISTOGRAM)
    protos = res.payload.get(PayloadKind.DP_PROTOTYPES)
    logits = res.payload.get(PayloadKind.REFERENCE_LOGITS)
    assert hist is not None and protos is not None and logits is not None
    pol = DEFAULT_DP_POLICY
    assert hist.noise_multiplier > 0 and hist.epsilon == pytest.approx(pol.histogram_share, rel=1e-4)
    assert protos.epsilon == pytest.approx(pol.prototype_share, rel=1e-4)
    assert protos.values.shape == (10, 64)
    assert logits.values.shape == (5, 10) and logits.index is not None
    expected = mechanisms_epsilon([
        Mechanism(MechanismKind.DP_SGD, res.dp.noise_multiplier, res.dp.sample_rate,
                  res.dp.steps),
        Mechanism(MechanismKind.LABEL_HISTOGRAM, hist.noise_multiplier),
        Mechanism(MechanismKind.DP_PROTOTYPES, protos.noise_multiplier)], res.dp.delta)
    assert res.dp.total_epsilon == pytest.approx(expected)
    assert res.dp.total_epsilon == pytest.approx(1.0, rel=1e-5)
    assert res.dp.epsilon < res.dp.total_epsilon < res.dp.epsilon + hist.epsilon + protos.epsilon
    # A training-only run at the same target gives DP-SGD the whole budget: less noise.
    local = reverse_distill(shipped, data, ref, replace(cfg, kinds=(PayloadKind.WEIGHT_DELTA,)))
    assert local.dp.total_epsilon == pytest.approx(res.dp.total_epsilon, rel=1e-6)
    assert local.dp.noise_multiplier < res.dp.noise_multiplier
    wd = res.payload.get(PayloadKind.WEIGHT_DELTA)
    assert wd is not None and wd.values.shape == (count_parameters(shipped),)
    data_bytes, desc = encode_payload(res.payload)
    assert decode_payload(data_bytes, desc).get(PayloadKind.DP_PROTOTYPES) is not None


def test_rd_non_private_is_marked() -> None:
    data, ref = _data()
    res = reverse_distill(build_model(student_spec(), seed=0), data, ref,
                          RDConfig(epsilon=math.inf, epochs=2, kinds=ALL, research_seed=0))
    assert math.isinf(res.dp.epsilon) and res.dp.accountant == "none"
    assert res.dp.noise_multiplier == 0.0
    assert res.payload.get(PayloadKind.LABEL_HISTOGRAM).noise_multiplier == 0.0  # type: ignore[union-attr]


def test_rd_is_deterministic_under_a_research_seed_and_top_k() -> None:
    data, ref = _data()
    cfg = RDConfig(epsilon=8.0, epochs=1, kinds=(PayloadKind.WEIGHT_DELTA,), top_k=50,
                   delta_dtype="int8", noise_multiplier=1.0, research_seed=3)
    a = reverse_distill(build_model(student_spec(), seed=0), data, ref, cfg)
    b = reverse_distill(build_model(student_spec(), seed=0), data, ref, cfg)
    assert a.payload == b.payload and a.dp.noise_seeded
    entry = a.payload.get(PayloadKind.WEIGHT_DELTA)
    assert entry is not None and entry.values.shape == (50,) and entry.index is not None
    # Without a research seed the noise is the CSPRNG's: another draw, and the header says so.
    c = reverse_distill(build_model(student_spec(), seed=0), data, ref,
                        replace(cfg, research_seed=None))
    assert not c.dp.noise_seeded and c.payload != a.payload


def test_learning_rate_falls_with_the_noise_only() -> None:
    sigmas = [0.5, 2.0, 2.5, 4.0, 6.0, 13.0]
    lrs = [default_learning_rate(s) for s in sigmas]
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.02, 0.02]
    assert lrs == sorted(lrs, reverse=True)


def test_tuning_trials_are_priced() -> None:
    base = RDConfig(epsilon=8.0, kinds=ALL)
    one = trials_epsilon(base, 1)
    assert one == pytest.approx(8.0, rel=1e-5)  # one training-only run spends the target
    three = trials_epsilon(base, 3)
    assert one < three < 3 * one


def test_empty_poisson_batches_do_not_break_training() -> None:
    data, ref = _data(n=3)
    res = reverse_distill(build_model(student_spec(), seed=0), data, ref,
                          RDConfig(noise_multiplier=1.0, epochs=20, research_seed=0))
    assert res.dp.steps == 60
    assert all(torch.isfinite(p).all() for p in res.adapted.parameters())


def test_invalid_settings_refused() -> None:
    with pytest.raises(ConfigError):
        RDConfig(epsilon=0.0)
    with pytest.raises(ConfigError):
        RDConfig(research_seed=-1)
    data, ref = _data()
    with pytest.raises(ConfigError):
        reverse_distill(build_model(student_spec()), data.subset(np.arange(0)), ref, RDConfig())


def test_non_finite_payload_refused() -> None:
    with pytest.raises(PayloadInvalid):
        PayloadTensor("reference_logits", PayloadKind.REFERENCE_LOGITS,
                      np.array([[np.nan] * 10], np.float32))

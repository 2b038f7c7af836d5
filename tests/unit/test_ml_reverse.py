"""Reverse distillation on the device (diredi_secure.ml.reverse)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diredi_secure.errors import ConfigError, PayloadInvalid
from diredi_secure.knowledge import PayloadKind, PayloadTensor, decode_payload, encode_payload
from diredi_secure.ml.data import Dataset
from diredi_secure.ml.models import build_model, count_parameters, flat_parameters, student_spec
from diredi_secure.ml.reverse import RDConfig, composed_epsilon, reverse_distill

ALL = (PayloadKind.REFERENCE_LOGITS, PayloadKind.WEIGHT_DELTA, PayloadKind.DP_PROTOTYPES)


def _data(n: int = 60, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.random((n, 1, 8, 8)).astype(np.float32) * 0.3
    x[np.arange(n), 0, y % 8, y // 2] = 1.0  # a learnable mark per class
    return Dataset(x, y), rng.random((20, 1, 8, 8)).astype(np.float32)


def test_reported_epsilon_matches_opacus_accountant() -> None:
    from opacus.accountants import RDPAccountant

    data, ref = _data()
    res = reverse_distill(build_model(student_spec(), seed=0), data, ref,
                          RDConfig(epsilon=4.0, epochs=2, batch_size=20, accountant="rdp"), seed=0)
    dp = res.dp
    assert dp.accountant == "rdp" and dp.poisson_sampling
    assert dp.delta <= 1.0 / (10 * len(data))
    assert dp.sample_rate == pytest.approx(1 / 3) and dp.steps == 6
    acc = RDPAccountant()
    acc.history = [(dp.noise_multiplier, dp.sample_rate, dp.steps)]
    assert dp.epsilon == pytest.approx(acc.get_epsilon(dp.delta), rel=1e-3)
    assert dp.epsilon <= 4.0 + 0.05


def test_rd_at_epsilon_one_composes_noised_entries() -> None:
    data, ref = _data()
    cfg = RDConfig(epsilon=1.0, epochs=2, batch_size=20, kinds=ALL, accountant="rdp", top_m=5)
    shipped = build_model(student_spec(), seed=0)
    before = flat_parameters(shipped).copy()
    res = reverse_distill(shipped, data, ref, cfg, seed=0)
    assert np.array_equal(flat_parameters(shipped), before)  # the shipped model is untouched
    hist = res.payload.get(PayloadKind.LABEL_HISTOGRAM)
    protos = res.payload.get(PayloadKind.DP_PROTOTYPES)
    logits = res.payload.get(PayloadKind.REFERENCE_LOGITS)
    assert hist is not None and protos is not None and logits is not None
    assert hist.noise_multiplier > 0 and 0 < hist.epsilon <= 0.5 + 0.05
    assert protos.values.shape == (10, 64) and 0 < protos.epsilon <= 2.05
    assert logits.values.shape == (5, 10) and logits.index is not None
    expected = composed_epsilon("rdp", [(res.dp.noise_multiplier, res.dp.sample_rate, res.dp.steps),
                                        (hist.noise_multiplier, 1.0, 1),
                                        (protos.noise_multiplier, 1.0, 1)], res.dp.delta)
    assert res.dp.total_epsilon == pytest.approx(expected)
    assert res.dp.epsilon < res.dp.total_epsilon < res.dp.epsilon + hist.epsilon + protos.epsilon
    wd = res.payload.get(PayloadKind.WEIGHT_DELTA)
    assert wd is not None and wd.values.shape == (count_parameters(shipped),)
    data_bytes, desc = encode_payload(res.payload)
    assert decode_payload(data_bytes, desc).get(PayloadKind.DP_PROTOTYPES) is not None


def test_rd_non_private_is_marked() -> None:
    data, ref = _data()
    res = reverse_distill(build_model(student_spec(), seed=0), data, ref,
                          RDConfig(epsilon=math.inf, epochs=2, kinds=ALL), seed=0)
    assert math.isinf(res.dp.epsilon) and res.dp.accountant == "none"
    assert res.dp.noise_multiplier == 0.0
    assert res.payload.get(PayloadKind.LABEL_HISTOGRAM).noise_multiplier == 0.0  # type: ignore[union-attr]


def test_rd_is_deterministic_and_top_k() -> None:
    data, ref = _data()
    cfg = RDConfig(epsilon=8.0, epochs=1, batch_size=20, kinds=(PayloadKind.WEIGHT_DELTA,),
                   top_k=50, delta_dtype="int8", noise_multiplier=1.0)
    a = reverse_distill(build_model(student_spec(), seed=0), data, ref, cfg, seed=3)
    b = reverse_distill(build_model(student_spec(), seed=0), data, ref, cfg, seed=3)
    assert a.payload == b.payload
    entry = a.payload.get(PayloadKind.WEIGHT_DELTA)
    assert entry is not None and entry.values.shape == (50,) and entry.index is not None


def test_empty_poisson_batches_do_not_break_training() -> None:
    data, ref = _data(n=3)
    res = reverse_distill(build_model(student_spec(), seed=0), data, ref,
                          RDConfig(noise_multiplier=1.0, epochs=20, batch_size=1),
                          seed=0)
    assert res.dp.steps == 60
    assert all(torch.isfinite(p).all() for p in res.adapted.parameters())


def test_invalid_settings_refused() -> None:
    with pytest.raises(ConfigError):
        RDConfig(epsilon=0.0)
    with pytest.raises(ConfigError):
        RDConfig(accountant="gdp")  # type: ignore[arg-type]
    data, ref = _data()
    with pytest.raises(ConfigError):
        reverse_distill(build_model(student_spec()), data.subset(np.arange(0)), ref, RDConfig(),
                        seed=0)


def test_non_finite_payload_refused() -> None:
    with pytest.raises(PayloadInvalid):
        PayloadTensor("reference_logits", PayloadKind.REFERENCE_LOGITS,
                      np.array([[np.nan] * 10], np.float32))

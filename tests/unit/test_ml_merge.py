"""Cloud merge and re-KD on synthetic payloads (diredi_secure.ml.merge, .rekd)."""

from __future__ import annotations

import numpy as np
import pytest

from diredi_secure.errors import PayloadInvalid
from diredi_secure.knowledge import KnowledgePayload, PayloadKind, PayloadTensor
from diredi_secure.ml.data import Dataset
from diredi_secure.ml.merge import (
    DeviceKnowledge,
    MergeConfig,
    aggregate_differences,
    device_support,
    merge_into_teacher,
)
from diredi_secure.ml.models import build_model, student_spec, teacher_spec
from diredi_secure.ml.rekd import user_weights

ROWS = 20


def _shipped_logits() -> np.ndarray:
    z = np.zeros((ROWS, 10))
    z[:, 0] = 5.0  # the shipped model calls everything class 0
    return z


def _support(classes: dict[int, float]) -> np.ndarray:
    s = np.full(10, 0.0)
    for c, v in classes.items():
        s[c] = v
    return s / s.sum()


def test_single_honest_device_class_survives_where_mean_erases_it() -> None:
    cfg = MergeConfig()
    honest = np.zeros((ROWS, 10))
    honest[:5, 7] = 10.0  # only this device knows class 7
    quiet = np.zeros((ROWS, 10))
    supports = [_support({0: 1, 7: 1}), _support({0: 1, 9: 1}), _support(dict.fromkeys(range(10), 1))]
    merged, weights, _ = aggregate_differences([honest, quiet, quiet], supports, cfg,
                                               _shipped_logits())
    after = (_shipped_logits() + merged).argmax(1)
    assert list(after[:5]) == [7] * 5 and list(after[5:]) == [0] * 15
    assert weights == [1.0, 1.0, 1.0]
    mean = (_shipped_logits() + (honest + quiet + quiet) / 3).argmax(1)
    assert list(mean[:5]) == [0] * 5  # what averaging does


def test_off_support_poisoner_is_zeroed() -> None:
    cfg = MergeConfig()
    honest = np.zeros((ROWS, 10))
    honest[:5, 7] = 10.0
    poison = np.zeros((ROWS, 10))
    poison[:, 9] = 1000.0  # pushes class 9 everywhere while declaring it has no 9s
    supports = [_support({0: 1, 7: 1}), _support(dict.fromkeys(range(7), 1))]
    merged, weights, scores = aggregate_differences([honest, poison], supports, cfg,
                                                    _shipped_logits())
    assert scores[1] == pytest.approx(1.0) and weights[1] == 0.0
    after = (_shipped_logits() + merged).argmax(1)
    assert list(after[:5]) == [7] * 5 and 9 not in after


def test_oversized_device_is_bounded() -> None:
    cfg = MergeConfig(gate_rows=False)
    poison = np.zeros((ROWS, 10))
    poison[:, 3] = 1e6  # on a class it declares, but absurdly large
    merged, _, _ = aggregate_differences([poison], [_support(dict.fromkeys(range(10), 1))], cfg)
    assert np.linalg.norm(merged, axis=1).max() <= cfg.row_clip + 1e-6
    assert np.linalg.norm(merged) <= cfg.device_clip * np.sqrt(ROWS) + 1e-6


def test_device_support_and_user_weights() -> None:
    hist = PayloadTensor("label_histogram", PayloadKind.LABEL_HISTOGRAM,
                         np.array([-3, 0, 0, 0, 0, 0, 0, 6, 6, 0], np.float32), dtype="float32")
    s = device_support(KnowledgePayload((hist,)))
    assert s[7] == pytest.approx(0.5) and s[0] == 0.0
    z = np.eye(10)[[7, 0]]
    w = user_weights(z, s, beta=0.5)
    assert w[0] > w[1]


def test_merge_refuses_misshapen_payloads() -> None:
    ref = np.zeros((4, 1, 8, 8), np.float32)
    presumed = Dataset(np.zeros((2, 1, 8, 8), np.float32), np.array([0, 1]))
    bad = PayloadTensor("reference_logits", PayloadKind.REFERENCE_LOGITS, np.zeros((3, 10)))
    with pytest.raises(PayloadInvalid):
        merge_into_teacher(build_model(teacher_spec(), seed=0), build_model(student_spec(), seed=0),
                           [DeviceKnowledge("d", KnowledgePayload((bad,)))], ref, presumed,
                           MergeConfig(epochs=1), seed=0)
    wd = PayloadTensor("weight_delta", PayloadKind.WEIGHT_DELTA, np.zeros(7))
    with pytest.raises(PayloadInvalid):
        merge_into_teacher(build_model(teacher_spec(), seed=0), build_model(student_spec(), seed=0),
                           [DeviceKnowledge("d", KnowledgePayload((wd,)))], ref, presumed,
                           MergeConfig(epochs=1), seed=0)

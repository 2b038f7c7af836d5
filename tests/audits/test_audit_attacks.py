"""Attack scoring, inspection and reconstruction helpers on synthetic data (fast). The end-to-end
audits (positive control, DP run) are in test_audit_gate.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from diredi_secure.audits import membership, metrics

from diredi_secure.errors import ConfigError


def test_loss_threshold_and_lira_separate_synthetic_members() -> None:
    rng = np.random.default_rng(0)
    n, c = 400, 10
    labels = rng.integers(0, c, n)
    members = rng.random(n) < 0.5
    base = rng.normal(size=(n, c))
    target = base.copy()
    target[np.arange(n), labels] += np.where(members, 2.0, 0.0)  # members got fitted
    lt = membership.loss_threshold_scores(target, base, labels)
    assert metrics.auc(lt, members) > 0.95
    shadows = np.stack([membership.logit_confidence(base + 0.1 * rng.normal(size=(n, c)), labels)
                        for _ in range(4)])
    lira = membership.lira_offline_scores(membership.logit_confidence(target, labels), shadows)
    assert metrics.auc(lira, members) > 0.95
    # no signal: chance
    null = membership.loss_threshold_scores(base, base, labels)
    assert metrics.auc(null + 1e-9 * rng.random(n), members) < 0.65
    with pytest.raises(ConfigError):
        membership.lira_offline_scores(lt, shadows[:1])


def test_cross_entropy_and_logit_confidence_are_stable() -> None:
    z = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    y = np.array([0, 2])
    ce = membership.cross_entropy(z, y)
    assert ce[0] == pytest.approx(0.0, abs=1e-9)
    assert ce[1] == pytest.approx(math.log(3))
    phi = membership.logit_confidence(z, y)
    assert phi[1] == pytest.approx(math.log(1 / 3) - math.log(2 / 3))
    assert np.all(np.isfinite(phi))


def test_psnr_ssim() -> None:
    from diredi_secure.audits import reconstruction

    rng = np.random.default_rng(0)
    a = rng.random((8, 8))
    assert reconstruction.ssim(a, a) == pytest.approx(1.0)
    assert reconstruction.psnr(a, a) == math.inf
    assert reconstruction.psnr(a, a + 0.1) == pytest.approx(20.0)
    assert reconstruction.ssim(a, rng.random((8, 8))) < 0.5


def test_inspection_flags_unnoised_prototypes_and_copies() -> None:
    from diredi_secure.audits import inspection

    from diredi_secure.knowledge import (
        KnowledgePayload,
        PayloadKind,
        PayloadTensor,
        encode_payload,
    )
    from diredi_secure.ml.data import Dataset

    rng = np.random.default_rng(0)
    x = (rng.random((20, 1, 8, 8)) < 0.3).astype(np.float32)
    y = np.arange(20) % 10  # two samples per class
    private = Dataset(x, y)
    reference = rng.random((50, 1, 8, 8)).astype(np.float32) * 0.5
    exact = np.stack([x[y == c].reshape(2, -1).mean(0) for c in range(10)])
    copies = x[:10].reshape(10, -1)  # one private sample per row: a copy
    hist = np.bincount(y, minlength=10).astype(np.float32)
    for values, needle in ((exact, "not there"), (copies, "near copy")):
        payload = KnowledgePayload((
            PayloadTensor("label_histogram", PayloadKind.LABEL_HISTOGRAM, hist + 30.0,
                          dtype="float32", noise_multiplier=10.0, epsilon=0.5),
            PayloadTensor("dp_prototypes", PayloadKind.DP_PROTOTYPES, values,
                          noise_multiplier=5.0, epsilon=1.0),
        ))
        wire, desc = encode_payload(payload)
        res = inspection.inspect_payload(payload, desc, wire, private=private,
                                         reference_x=reference)
        assert not res.ok
        assert any(needle in f for f in res.findings), res.findings
    # an honestly noised payload passes
    noisy = np.clip(exact + rng.normal(0, 1.0, exact.shape), 0, 1).astype(np.float32)
    payload = KnowledgePayload((
        PayloadTensor("label_histogram", PayloadKind.LABEL_HISTOGRAM,
                      hist + rng.normal(0, 10, 10).astype(np.float32), dtype="float32",
                      noise_multiplier=10.0, epsilon=0.5),
        PayloadTensor("dp_prototypes", PayloadKind.DP_PROTOTYPES, noisy, noise_multiplier=5.0,
                      epsilon=1.0),
    ))
    wire, desc = encode_payload(payload)
    res = inspection.inspect_payload(payload, desc, wire, private=private, reference_x=reference)
    assert res.ok, res.findings

"""The streamed merge (diredi_secure.ml.merge.merge_streamed) against the in-memory rule.

Real payloads: four devices run DP RD (Opacus) on the digits users against a tiny shipped model
(research-seeded noise, so the payloads are fixed); the streamed merge must reproduce
``merge_into_teacher`` -- same transfer rows, weights, claims and kernels, the same teacher up to
float summation order -- whatever the chunk size.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import numpy as np
import pytest

from diredi_secure.errors import ConfigError
from diredi_secure.ml.data import Dataset, Scenario, make_scenario
from diredi_secure.ml.distill import KDConfig, TrainConfig, distill_student, train_classifier
from diredi_secure.ml.evaluate import predict_logits
from diredi_secure.ml.executor import InProcessExecutor
from diredi_secure.ml.merge import (
    DeviceKnowledge,
    MergeConfig,
    MergeResult,
    merge_into_teacher,
    merge_streamed,
)
from diredi_secure.ml.models import (
    build_model,
    load_model_bytes,
    model_bytes,
    student_spec,
    teacher_spec,
)
from diredi_secure.ml.reverse import DEFAULT_PAYLOAD_KINDS, RDConfig, reverse_distill

# Low claim confidences: a one-epoch RD model is rarely 0.7 sure; the claims must not be vacuous.
CONFIG = replace(
    MergeConfig(),
    epochs=1,
    synth_steps=2,
    jitter_per_class=3,
    anchor_relax_confidence=0.2,
    own_claim_confidence=0.2,
)


@cache
def _setup() -> tuple[Scenario, bytes, bytes, tuple[DeviceKnowledge, ...]]:
    sc = make_scenario(0)
    teacher = build_model(teacher_spec(), seed=0)
    train_classifier(teacher, sc.presumed_train, TrainConfig(epochs=2), seed=0)
    student = build_model(student_spec(), seed=1)
    distill_student(student, teacher, sc.presumed_train, sc.reference_x, KDConfig(epochs=2), seed=0)
    devices = []
    for i in range(5):
        user = sc.users[i % len(sc.users)].train
        part = Dataset(user.x[i * 5 : i * 5 + 80], user.y[i * 5 : i * 5 + 80])
        kinds = DEFAULT_PAYLOAD_KINDS if i != 3 else DEFAULT_PAYLOAD_KINDS[1:]  # one without delta
        rd = RDConfig(epsilon=8.0, epochs=2, kinds=tuple(kinds), research_seed=100 + i)
        devices.append(
            DeviceKnowledge(
                f"dev-{i}#1", reverse_distill(student, part, sc.reference_x, rd).payload
            )
        )
    return (
        sc,
        model_bytes(teacher, teacher_spec()),
        model_bytes(student, student_spec()),
        tuple(devices),
    )


@cache
def _in_memory() -> MergeResult:
    sc, teacher, shipped, devices = _setup()
    return merge_into_teacher(
        load_model_bytes(teacher)[0],
        load_model_bytes(shipped)[0],
        list(devices),
        sc.reference_x,
        sc.presumed_train,
        CONFIG,
        seed=3,
        rng=np.random.default_rng(7),
        presumed_val=sc.presumed_val,
    )


@pytest.mark.parametrize("chunk_size", [2, 64])
def test_streamed_merge_equals_in_memory_merge(chunk_size: int) -> None:
    sc, teacher, shipped, devices = _setup()
    reference = _in_memory()
    calls = []

    def stream() -> list[DeviceKnowledge]:
        calls.append(1)
        return list(devices)

    streamed = merge_streamed(
        teacher,
        shipped,
        stream,
        sc.reference_x,
        sc.presumed_train,
        CONFIG,
        seed=3,
        rng=np.random.default_rng(7),
        presumed_val=sc.presumed_val,
        executor=InProcessExecutor(),
        chunk_size=chunk_size,
    )
    assert len(calls) == 2  # two passes over the stream, nothing kept between them but the plan
    np.testing.assert_allclose(streamed.transfer_x, reference.transfer_x, atol=1e-6)
    assert streamed.transfer_owner == reference.transfer_owner
    assert streamed.owner_rows == reference.owner_rows
    assert streamed.weights.keys() == reference.weights.keys()
    for name, w in reference.weights.items():
        assert streamed.weights[name] == pytest.approx(w, abs=1e-9)
        np.testing.assert_array_equal(streamed.own_claims_of(name), reference.own_claims_of(name))
    assert any((reference.own_claims_of(n) >= 0).any() for n in reference.weights)  # not vacuous
    assert streamed.sensor_kernels.keys() == reference.sensor_kernels.keys()
    z_ref = predict_logits(reference.teacher, sc.presumed_test.x)
    z_str = predict_logits(streamed.teacher, sc.presumed_test.x)
    np.testing.assert_allclose(z_str, z_ref, atol=1e-3)


def test_streamed_merge_refuses_what_it_cannot_stream() -> None:
    sc, teacher, shipped, devices = _setup()
    with pytest.raises(ConfigError, match="owner_rows_only"):
        merge_streamed(
            teacher,
            shipped,
            lambda: devices,
            sc.reference_x,
            sc.presumed_train,
            replace(CONFIG, owner_rows_only=False),
            seed=0,
        )
    with pytest.raises(ConfigError, match="nothing to merge"):
        merge_streamed(
            teacher, shipped, lambda: (), sc.reference_x, sc.presumed_train, CONFIG, seed=0
        )
    flips = iter([devices, devices[:2]])
    with pytest.raises(ConfigError, match="changed between"):
        merge_streamed(
            teacher, shipped, lambda: next(flips), sc.reference_x, sc.presumed_train, CONFIG, seed=0
        )

"""The MNIST scenario's models: an edge model of realistic size (a depthwise-separable CNN of
50k-150k parameters) and a teacher at least 10x larger; checkpoints and DP-SGD work on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diredi_secure.errors import ModelFormatError
from diredi_secure.ml.data import Dataset
from diredi_secure.ml.models import (
    ModelSpec,
    build_model,
    count_parameters,
    load_model_bytes,
    mnist_specs,
    model_bytes,
    specs_for,
)


def test_sizes_are_pinned_and_the_teacher_is_over_ten_times_the_student() -> None:
    teacher, student = (count_parameters(build_model(s)) for s in mnist_specs())
    assert (teacher, student) == (935_338, 86_026)
    assert 50_000 <= student <= 150_000
    assert teacher >= 10 * student


def test_the_student_is_depthwise_separable() -> None:
    model = build_model(mnist_specs()[1])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups == c.in_channels > 1]
    pointwise = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(depthwise) == 4 and len(pointwise) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("spec", mnist_specs(), ids=lambda s: s.architecture)
def test_28x28_models_run_and_round_trip_through_safetensors(spec: ModelSpec) -> None:
    model = build_model(spec, seed=0).eval()
    x = torch.rand(3, 1, 28, 28)
    z = model(x)
    assert z.shape == (3, 10)
    back, spec_back, _ = load_model_bytes(model_bytes(model, spec))
    assert spec_back == spec
    torch.testing.assert_close(back(x), z)


def test_specs_for_names_each_scenario_and_refuses_others() -> None:
    assert specs_for("mnist") == mnist_specs()
    assert specs_for("digits")[1].architecture == "mlp_student"
    with pytest.raises(ModelFormatError):
        specs_for("cifar")


def test_dp_sgd_runs_on_the_depthwise_student() -> None:
    """Opacus computes per-sample gradients of grouped (depthwise) convolutions and GroupNorm: one
    short RD run on random 28x28 images spends its target and sends a full-size delta."""
    from diredi_secure.knowledge import PayloadKind
    from diredi_secure.ml.reverse import RDConfig, reverse_distill

    spec = mnist_specs()[1]
    shipped = build_model(spec, seed=0).eval()
    rng = np.random.default_rng(0)
    data = Dataset(rng.random((24, 1, 28, 28)), rng.integers(0, 10, 24))
    cfg = RDConfig(epsilon=8.0, epochs=1, kinds=(PayloadKind.WEIGHT_DELTA,), research_seed=1)
    res = reverse_distill(shipped, data, rng.random((10, 1, 28, 28)).astype(np.float32), cfg)
    assert res.dp.total_epsilon == pytest.approx(8.0, rel=1e-6)
    delta = res.payload.get(PayloadKind.WEIGHT_DELTA)
    assert delta is not None and delta.values.size == count_parameters(shipped)
    assert float(np.abs(delta.values).sum()) > 0

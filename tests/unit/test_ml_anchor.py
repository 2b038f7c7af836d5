"""What keeps presumed knowledge through the merge and re-KD: the anchor, the prototype noise
filter, the transfer-input modes and the presumed floor of per-user re-KD."""

from __future__ import annotations

import numpy as np
import pytest

from diredi_secure.errors import ConfigError
from diredi_secure.knowledge import KnowledgePayload, PayloadKind, PayloadTensor
from diredi_secure.ml.merge import (
    DeviceKnowledge,
    MergeConfig,
    anchor_relief,
    anchor_scale,
    transfer_inputs,
)
from diredi_secure.ml.models import build_model, flat_parameters, student_spec
from diredi_secure.ml.rekd import ReKDConfig, rekd_weights


def test_anchor_keeps_rows_that_look_presumed_and_frees_the_rest() -> None:
    presumed_z = np.zeros((100, 10))
    presumed_z[:, 0] = np.linspace(10.0, 20.0, 100)  # the old teacher's max logit on its own data
    rows = np.zeros((4, 10))
    rows[:, 0] = [25.0, 15.0, 10.5, 2.0]
    scale = anchor_scale(rows, presumed_z, (0.0, 0.1))
    hi = np.quantile(presumed_z.max(1), 0.1)
    assert scale[0] == 0.0 and scale[1] == 0.0  # typical presumed rows: no change allowed
    assert scale[3] == 1.0  # far below anything presumed: the full merged change
    assert scale[2] == pytest.approx((hi - 10.5) / (hi - 10.0))
    assert np.all(np.diff(scale) >= 0)  # less confident -> more freedom


def test_anchor_relief_frees_rows_a_device_confidently_puts_in_its_new_class() -> None:
    probs = np.full((4, 10), 0.01)
    probs[0, 9] = 0.91  # confident 9, a class the device supports and the manufacturer lacks
    probs[1, 9] = 0.5  # 9, but not confident
    probs[2, 3] = 0.91  # confident, but 3 is a presumed class: the anchor must still hold
    probs[3, 8] = 0.91  # confident 8, a class the device does not support
    support = np.eye(10)[9] * 0.7 + np.eye(10)[3] * 0.3
    known = np.arange(7)
    relief = anchor_relief([probs], [support], [1.0], known, 0.7, 0.05, 4)
    assert relief.tolist() == [1.0, 0.0, 0.0, 0.0]
    # a device the merge zeroed (weight 0) or without a weight delta frees nothing
    assert anchor_relief([probs], [support], [0.0], known, 0.7, 0.05, 4).tolist() == [0.0] * 4
    assert anchor_relief([None], [support], [1.0], known, 0.7, 0.05, 4).tolist() == [0.0] * 4


def _device(counts: list[float], sigma: float) -> DeviceKnowledge:
    rng = np.random.default_rng(0)
    protos = PayloadTensor("dp_prototypes", PayloadKind.DP_PROTOTYPES,
                           rng.uniform(0, 1, (10, 64)).astype(np.float32), dtype="float16",
                           noise_multiplier=sigma, epsilon=2.0)
    hist = PayloadTensor("label_histogram", PayloadKind.LABEL_HISTOGRAM,
                         np.asarray(counts, np.float32), dtype="float32")
    n = flat_parameters(build_model(student_spec(), seed=0)).size
    delta = PayloadTensor("weight_delta", PayloadKind.WEIGHT_DELTA, np.zeros(n, np.float32))
    return DeviceKnowledge("d", KnowledgePayload((protos, hist, delta)))


@pytest.mark.parametrize(("mode", "per_class"), [("both", 2), ("prototypes", 1), ("synthesis", 1)])
def test_transfer_modes(mode: str, per_class: int) -> None:
    counts = [40.0, 40.0, 0, 0, 0, 0, 0, 0, 0, 0]
    cfg = MergeConfig(transfer_mode=mode, jitter_per_class=4, synth_steps=2)  # type: ignore[arg-type]
    x, y, owner = transfer_inputs([_device(counts, 1.5)], build_model(student_spec(), seed=0), cfg,
                                  np.random.default_rng(0))
    assert len(x) == 2 * 4 * per_class and set(y.tolist()) == {0, 1} and set(owner.tolist()) == {0}
    assert x.shape[1:] == (1, 8, 8) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_noisy_prototypes_are_skipped() -> None:
    # sigma 1.5 * clip 3.5 / count: 0.13 per pixel at 40 examples, 1.05 at 5.
    counts = [40.0, 5.0, 0, 0, 0, 0, 0, 0, 0, 0]
    cfg = MergeConfig(transfer_mode="prototypes", jitter_per_class=3, max_prototype_noise=0.3)
    _, y, _ = transfer_inputs([_device(counts, 1.5)], build_model(student_spec(), seed=0), cfg,
                              np.random.default_rng(0), prototype_clip=3.5)
    assert set(y.tolist()) == {0}
    _, y, _ = transfer_inputs([_device(counts, 1.5)], build_model(student_spec(), seed=0),
                              MergeConfig(transfer_mode="prototypes", jitter_per_class=3),
                              np.random.default_rng(0), prototype_clip=3.5)
    assert set(y.tolist()) == {0, 1}


def test_presumed_floor_keeps_presumed_rows_weighted() -> None:
    z = np.eye(10)[[1, 2, 9, 9]]  # two presumed rows (classes 1, 2), two transfer rows of class 9
    support = np.eye(10)[9]  # the user only has 9s
    floored = rekd_weights(z, 2, support, ReKDConfig(beta=0.8, presumed_floor=1.0))
    bare = rekd_weights(z, 2, support, ReKDConfig(beta=0.8, presumed_floor=0.0))
    assert bare[0] == pytest.approx(0.2) and floored[0] == pytest.approx(1.0)
    assert floored[2] == pytest.approx(0.2 + 0.8 * 10)


@pytest.mark.parametrize("kwargs", [{"anchor_quantiles": (0.5, 0.2)}, {"transfer_mode": "x"},
                                    {"max_prototype_noise": 0.0}, {"presumed_kd_weight": -1.0},
                                    {"anchor_relax_confidence": 0.0},
                                    {"anchor_relax_confidence": 1.5}])
def test_invalid_merge_settings_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        MergeConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ReKDConfig(presumed_floor=-1.0)

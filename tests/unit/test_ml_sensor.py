"""The user's sensor kernel, estimated from DP prototypes, and the re-KD rows rendered through it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from diredi_secure.errors import ConfigError, PayloadInvalid
from diredi_secure.knowledge import (
    KnowledgePayload,
    PayloadKind,
    PayloadTensor,
    decode_payload,
    encode_payload,
)
from diredi_secure.ml.data import Dataset, apply_domain_shift, load_digits_dataset
from diredi_secure.ml.distill import KDConfig
from diredi_secure.ml.merge import DeviceKnowledge, MergeConfig, merge_into_teacher
from diredi_secure.ml.models import build_model, student_spec, teacher_spec
from diredi_secure.ml.rekd import ReKDConfig, rekd_student
from diredi_secure.ml.reverse import RDConfig, extract_payload
from diredi_secure.ml.sensor import _expected_clipped, estimate_sensor_kernel, render
from diredi_secure.privacy import NoiseSource

CLIP = 3.5


def _presumed() -> Dataset:
    data = load_digits_dataset()
    keep = data.y < 7
    return Dataset(data.x[keep][:400], data.y[keep][:400])


def _shift_blur_kernel() -> np.ndarray:
    """apply_domain_shift(shift=1, blur=0.5) as a 5x5 kernel: half the pixel up-left of the output,
    half a 3x3 box around it."""
    k = np.zeros((5, 5))
    k[1, 1] += 0.5
    k[0:3, 0:3] += 0.5 / 9
    return k


def _payload(presumed: Dataset, shifted: bool, noise: float, count: float = 20.0) -> KnowledgePayload:
    """Prototypes as a device computes them (clipped inputs, class means, Gaussian noise of std
    ``noise`` per pixel, clipped to [0, 1]), declaring the noise multiplier that gives ``noise``."""
    rng = np.random.default_rng(1)
    x = apply_domain_shift(presumed.x) if shifted else presumed.x
    flat = x.reshape(len(x), -1).astype(np.float64)
    flat = flat * np.minimum(1.0, CLIP / np.linalg.norm(flat, axis=1, keepdims=True))
    protos = np.zeros((10, 64))
    for c in range(7):
        protos[c] = np.clip(flat[presumed.y == c].mean(0) + rng.normal(0.0, noise, 64), 0.0, 1.0)
    counts = np.array([count] * 7 + [0.0] * 3, np.float32)
    return KnowledgePayload((
        PayloadTensor("dp_prototypes", PayloadKind.DP_PROTOTYPES, protos.astype(np.float32),
                      dtype="float32", noise_multiplier=noise * count / CLIP, epsilon=2.0),
        PayloadTensor("label_histogram", PayloadKind.LABEL_HISTOGRAM, counts, dtype="float32"),
    ))


def test_render_identity_and_shift_blur_match_the_scenario_distortion() -> None:
    x = load_digits_dataset().x[:20]
    ident = np.zeros((5, 5))
    ident[2, 2] = 1.0
    np.testing.assert_allclose(render(x, ident), x, atol=1e-6)
    # Equal except the last row and column, which the scenario's crop-then-blur zero-fills.
    np.testing.assert_allclose(render(x, _shift_blur_kernel())[..., :7, :7],
                               apply_domain_shift(x)[..., :7, :7], atol=1e-5)
    with pytest.raises(ConfigError):
        render(x, np.zeros((4, 4)))


def test_kernel_recovers_a_shifted_sensor_from_noisy_prototypes() -> None:
    presumed = _presumed()
    fit = estimate_sensor_kernel(_payload(presumed, True, noise=0.1), presumed, clip=CLIP)
    assert fit is not None and fit.classes == 7
    assert fit.ratio < 0.5  # predicts held-out classes far better than "no change"
    err = np.abs(render(presumed.x, fit.kernel) - apply_domain_shift(presumed.x)).mean()
    same = np.abs(presumed.x - apply_domain_shift(presumed.x)).mean()
    assert err < 0.3 * same


def test_expected_clipped_prototype_matches_sampling() -> None:
    rng = np.random.default_rng(0)
    mu = np.array([-0.5, 0.0, 0.2, 0.5, 0.9, 1.3])
    for tau in (1e-3, 0.1, 0.4, 1.0, 10.0):  # the range the noise model is used in
        value, slope = _expected_clipped(mu, tau)
        draws = np.clip(mu[:, None] + rng.normal(0.0, tau, (len(mu), 200_000)), 0.0, 1.0)
        np.testing.assert_allclose(value, draws.mean(1), atol=4e-3)
        h = 1e-5
        numeric = (_expected_clipped(mu + h, tau)[0] - _expected_clipped(mu - h, tau)[0]) / (2 * h)
        np.testing.assert_allclose(slope, numeric, atol=1e-6)


def test_noise_model_reads_the_devices_own_prototypes_better_than_the_linear_fit() -> None:
    """Prototypes from the device's own mechanism (``extract_payload`` at the default budget, 12
    shifted images per class, through the int4 wire format): the clip to [0, 1] lifts the noisy
    background, which the linear fit reads as a wider blur. Every draw, the noise model is closer
    to the true shift + blur kernel."""
    data = load_digits_dataset()
    presumed = _presumed()
    model = build_model(student_spec(), seed=0)
    cfg = RDConfig(kinds=(PayloadKind.DP_PROTOTYPES, PayloadKind.LABEL_HISTOGRAM))
    errors: dict[bool, list[float]] = {True: [], False: []}
    for seed in range(6):
        rng = np.random.default_rng(seed)
        idx = np.concatenate([rng.choice(np.flatnonzero(data.y == c), 12, replace=False)
                              for c in range(10)])
        user = Dataset(apply_domain_shift(data.x[idx]), data.y[idx])
        payload = extract_payload(model, model, user, presumed.x[:4], cfg,
                                  schedule=cfg.schedule(), noise=NoiseSource.seeded(seed))
        payload = decode_payload(*encode_payload(payload))
        for noise_model in (True, False):
            fit = estimate_sensor_kernel(payload, presumed, clip=cfg.policy.prototype_clip,
                                         noise_model=noise_model)
            assert fit is not None
            errors[noise_model].append(float(np.abs(fit.kernel - _shift_blur_kernel()).sum()))
    assert all(a < b for a, b in zip(errors[True], errors[False], strict=True)), errors
    assert np.mean(errors[True]) < 0.8 * np.mean(errors[False]), errors


@pytest.mark.parametrize("multiplier", [0.0, 1e-300, 1e-12, 1e6, 1e30, 1e300, 1.7e308])
def test_a_published_noise_multiplier_out_of_range_keeps_the_linear_fit(multiplier: float) -> None:
    """The multiplier is the device's own claim: a wrong one must not raise (1.7e308 x the clip
    overflows), hang the merge for everyone, or blow the kernel up: out of range, the linear fit."""
    presumed = _presumed()
    payload = _payload(presumed, True, noise=0.3)
    lying = KnowledgePayload(tuple(
        PayloadTensor(e.name, e.kind, e.values, dtype=e.dtype, noise_multiplier=multiplier,
                      epsilon=e.epsilon) if e.kind is PayloadKind.DP_PROTOTYPES else e
        for e in payload.tensors))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value warnings either
        fit = estimate_sensor_kernel(lying, presumed, clip=CLIP)
    linear = estimate_sensor_kernel(payload, presumed, clip=CLIP, noise_model=False)
    assert fit is not None and linear is not None
    np.testing.assert_array_equal(fit.kernel, linear.kernel)
    honest = estimate_sensor_kernel(payload, presumed, clip=CLIP)
    assert honest is not None and not np.array_equal(honest.kernel, linear.kernel)
    no_clip = estimate_sensor_kernel(payload, presumed, clip=None)
    assert no_clip is not None
    np.testing.assert_array_equal(
        no_clip.kernel, estimate_sensor_kernel(payload, presumed, clip=None, noise_model=False).kernel)


def test_unshifted_user_fails_the_gate_and_missing_parts_give_none() -> None:
    presumed = _presumed()
    for noise in (0.0, 0.1):
        fit = estimate_sensor_kernel(_payload(presumed, False, noise=noise), presumed, clip=CLIP)
        assert fit is not None and fit.ratio >= 0.9, noise  # "no change" explains it as well
    only_hist = KnowledgePayload(tuple(e for e in _payload(presumed, True, 0.1).tensors
                                       if e.kind is PayloadKind.LABEL_HISTOGRAM))
    assert estimate_sensor_kernel(only_hist, presumed, clip=CLIP) is None
    few = _payload(presumed, True, 0.1, count=1.0)  # below min_class_count everywhere
    assert estimate_sensor_kernel(few, presumed, clip=CLIP) is None
    bad = KnowledgePayload((
        PayloadTensor("dp_prototypes", PayloadKind.DP_PROTOTYPES, np.zeros((10, 5), np.float32)),
        PayloadTensor("label_histogram", PayloadKind.LABEL_HISTOGRAM, np.ones(10, np.float32)),
    ))
    with pytest.raises(PayloadInvalid):
        estimate_sensor_kernel(bad, presumed, clip=CLIP)


def test_rekd_trains_on_the_rendered_rows_only_when_given_a_kernel() -> None:
    presumed = _presumed().subset(np.arange(120))
    teacher = build_model(student_spec(), seed=0)
    cfg = ReKDConfig(kd=KDConfig(epochs=1))
    support = np.full(10, 0.1)
    plain = rekd_student(teacher, student_spec(), presumed, presumed.x[:0], cfg, seed=3,
                         support=support)
    dom = rekd_student(teacher, student_spec(), presumed, presumed.x[:0], cfg, seed=3,
                       support=support, domain_kernel=_shift_blur_kernel())
    same = rekd_student(teacher, student_spec(), presumed, presumed.x[:0], cfg, seed=3,
                        support=support)
    p_plain = [p.detach().numpy() for p in plain.parameters()]
    assert all(np.array_equal(a, b.detach().numpy()) for a, b in zip(p_plain, same.parameters(), strict=True))
    assert not all(np.array_equal(a, b.detach().numpy()) for a, b in zip(p_plain, dom.parameters(), strict=True))
    with pytest.raises(ConfigError):
        ReKDConfig(domain_weight=-1.0)


def test_merge_keeps_the_kernel_of_a_shifted_device_only() -> None:
    presumed = _presumed()
    ref = presumed.x[:4]
    devices = [DeviceKnowledge("shifted", _payload(presumed, True, 0.1)),
               DeviceKnowledge("plain", _payload(presumed, False, 0.1))]
    args = (build_model(teacher_spec(), seed=0), build_model(student_spec(), seed=0), devices,
            ref, presumed)
    merged = merge_into_teacher(*args, MergeConfig(epochs=0), seed=0)
    assert set(merged.sensor_kernels) == {"shifted"}
    assert merged.transfer_owner[:4] == ("",) * 4
    assert set(merged.transfer_owner[4:]) == {"shifted", "plain"}
    off = merge_into_teacher(*args, MergeConfig(epochs=0, sensor_gate=None), seed=0)
    assert off.sensor_kernels == {}
    with pytest.raises(ConfigError):
        MergeConfig(sensor_kernel_size=4)

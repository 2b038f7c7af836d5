"""Round-5 merge and re-KD rules: floored log-probability differences, claims by confident devices,
owner-only device rows, and the user's domain for the transfer inputs."""

from __future__ import annotations

import numpy as np
import pytest

from diredi_secure.errors import ConfigError
from diredi_secure.ml.distill import KDConfig
from diredi_secure.ml.merge import MergeConfig, difference_space, owner_rows_only, relief_claims
from diredi_secure.ml.models import student_spec
from diredi_secure.ml.rekd import ReKDConfig, rekd_student
from diredi_secure.ml.sensor import render
from tests.unit.conftest import RekdToy


def test_floored_log_prob_difference_follows_the_adapted_models_choice() -> None:
    # An image of an 8: the shipped model never saw 7 or 8 (very low logits); the adapted model
    # learned both and prefers 8, but 7 climbed further from where it started.
    shipped = np.array([[10.0, -30.0, -15.0]])  # classes: 1, 7, 8
    adapted = np.array([[2.0, 3.0, 6.0]])
    raw = adapted - shipped
    assert raw.argmax() == 1  # summed onto a teacher, the raw difference teaches 7
    d = difference_space(adapted, 16.0) - difference_space(shipped, 16.0)
    assert d.argmax() == 2  # the floored log-probability difference teaches 8
    assert np.all(difference_space(adapted, 16.0) >= -16.0)
    np.testing.assert_allclose(np.exp(difference_space(adapted, 1e9)).sum(1), 1.0)
    assert difference_space(shipped, None) is shipped  # off: raw logits, the earlier rule
    with pytest.raises(ConfigError):
        MergeConfig(difference_floor=0.0)
    with pytest.raises(ConfigError):
        MergeConfig(relief_hard_weight=-1.0)


def test_relief_claims_take_the_most_confident_device_on_its_own_new_class() -> None:
    a = np.full((3, 10), 0.01)
    a[0, 8], a[1, 8], a[2, 3] = 0.8, 0.75, 0.95  # row 2: a presumed class, never claimed
    b = np.full((3, 10), 0.01)
    b[0, 9], b[1, 9] = 0.9, 0.6
    sup_a = np.eye(10)[8]
    sup_b = np.eye(10)[9]
    known = np.arange(7)
    claims, who = relief_claims([a, b], [sup_a, sup_b], [1.0, 1.0], known, 0.7, 0.05, 3)
    assert claims.tolist() == [9, 8, -1] and who.tolist() == [1, 0, -1]
    # a zero-weight device claims nothing
    claims, _ = relief_claims([a, b], [sup_a, sup_b], [1.0, 0.0], known, 0.7, 0.05, 3)
    assert claims.tolist() == [8, 8, -1]


def test_relief_claims_are_capped_per_class_and_kept_to_reference_and_own_rows() -> None:
    n = 20
    poison = np.full((n, 10), 0.01)
    poison[:, 9] = np.linspace(0.80, 0.99, n)  # calls every row a confident 9
    sup = np.eye(10)[9]
    owner = np.array([-1] * 16 + [0, 0, 1, 1])  # 16 reference rows; rows 16-19 from devices 0, 1
    claim, who = relief_claims([poison], [sup], [1.0], np.arange(7), 0.7, 0.05, n,
                               owner=owner, max_share=0.25)
    public = claim[:16]
    assert (public == 9).sum() == 4  # a quarter of the 16 reference rows ...
    assert public[-4:].tolist() == [9] * 4  # ... its most confident ones
    assert claim[16:].tolist() == [9, 9, -1, -1]  # its own rows, never device 1's
    assert set(who[claim >= 0].tolist()) == {0}
    uncapped, _ = relief_claims([poison], [sup], [1.0], np.arange(7), 0.7, 0.05, n)
    assert (uncapped == 9).all()
    with pytest.raises(ConfigError):
        MergeConfig(max_claim_share=0.0)


def test_device_rows_keep_only_their_owners_difference() -> None:
    diffs = [np.ones((5, 10)), 2 * np.ones((5, 10))]
    owner = np.array([0, 1, 1])  # rows 2, 3, 4 came from devices 0, 1, 1; rows 0, 1 are reference
    out = owner_rows_only(diffs, owner, 2)
    assert out[0][:, 0].tolist() == [1, 1, 1, 0, 0]
    assert out[1][:, 0].tolist() == [2, 2, 0, 2, 2]
    assert diffs[0].min() == 1  # the inputs are not modified


def test_render_takes_an_empty_batch() -> None:
    assert render(np.zeros((0, 1, 8, 8), np.float32), np.eye(5)).shape == (0, 1, 8, 8)


def test_rekd_renders_the_transfer_inputs_only_when_asked(rekd_toy: RekdToy) -> None:
    presumed, transfer, teacher = rekd_toy
    kernel = np.zeros((5, 5))
    kernel[2, 3] = 1.0  # a one-pixel shift
    support = np.full(10, 0.1)

    def params(cfg: ReKDConfig) -> list[np.ndarray]:
        m = rekd_student(teacher, student_spec(), presumed, transfer, cfg, seed=3, support=support,
                         domain_kernel=kernel)
        return [p.detach().numpy() for p in m.parameters()]

    kd = KDConfig(epochs=1)
    with_t = params(ReKDConfig(kd=kd))
    again = params(ReKDConfig(kd=kd))
    without = params(ReKDConfig(kd=kd, domain_transfer=False))
    assert all(np.array_equal(a, b) for a, b in zip(with_t, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(with_t, without, strict=True))

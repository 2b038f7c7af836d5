"""Round-6 per-user re-KD corrections: the new-class prior and the user's own claims."""

from __future__ import annotations

import numpy as np
import pytest

from diredi_secure.errors import ConfigError
from diredi_secure.ml.distill import KDConfig
from diredi_secure.ml.models import student_spec
from diredi_secure.ml.rekd import ReKDConfig, apply_own_claims, new_class_prior, rekd_student
from tests.unit.conftest import RekdToy

KNOWN = np.arange(7)  # the manufacturer's presumed classes; 7, 8, 9 are new


def test_new_class_prior_lowers_only_the_new_classes_the_user_lacks() -> None:
    cfg = ReKDConfig(prior_weight=1.0, prior_floor=0.02)
    a = np.array([0.01, 0.02, 0.0, 0.04, 0.0, 0.0, 0.0, 0.48, 0.45, 0.0])  # user A: 7s and 8s
    off = new_class_prior(a, KNOWN, cfg)
    assert np.all(off[:7] == 0.0)  # a presumed class is never pushed down
    assert off[7] == 0.0 and -0.1 < off[8] < 0.0  # A's most common new class is the reference
    np.testing.assert_allclose(off[9], np.log(0.02 / 0.50))  # no 9s: about -3.2
    assert np.all(new_class_prior(a, KNOWN, ReKDConfig(prior_weight=0.0)) == 0.0)
    # half the weight, half the offset
    np.testing.assert_allclose(new_class_prior(a, KNOWN, ReKDConfig(prior_weight=0.5)), off / 2)
    # an even user gets (almost) nothing; a histogram that does not sum to 1 is normalised
    even = new_class_prior(np.full(10, 3.0), KNOWN, cfg)
    np.testing.assert_allclose(even, 0.0, atol=1e-12)
    # every class known: nothing to correct
    assert np.all(new_class_prior(a, np.arange(10), cfg) == 0.0)
    with pytest.raises(ConfigError):
        ReKDConfig(prior_floor=0.0)
    with pytest.raises(ConfigError):
        ReKDConfig(prior_weight=-1.0)


def test_own_claims_raise_the_claimed_class_only_where_the_teacher_is_not_on_a_presumed_one() -> None:
    cfg = ReKDConfig(own_claim_margin=4.0, own_claim_known_limit=0.5)
    z = np.zeros((4, 10), np.float32)
    z[0, 9] = 5.0  # the merged teacher says 9 (B's call on A's 7)
    z[1, 3] = 9.0  # confident presumed 3: a claim there is ignored
    z[2, 8] = 2.0
    claims = np.array([7, 7, -1, 8])
    out = apply_own_claims(z, claims, KNOWN, cfg)
    assert out[0].argmax() == 7 and out[0, 7] == pytest.approx(9.0)  # 5 + margin 4
    np.testing.assert_array_equal(out[1], z[1])
    np.testing.assert_array_equal(out[2], z[2])  # no claim
    np.testing.assert_array_equal(out[3], z[3])  # uniform teacher: 0.7 of its mass is presumed
    loose = apply_own_claims(z, claims, KNOWN, ReKDConfig(own_claim_known_limit=0.8))
    assert loose[3, 8] == pytest.approx(4.0)  # with a looser limit that row is claimed too
    np.testing.assert_array_equal(z[0, 7], 0.0)  # the input is not modified
    # off
    np.testing.assert_array_equal(apply_own_claims(z, claims, KNOWN, ReKDConfig(own_claim_margin=None)), z)
    with pytest.raises(ConfigError):
        apply_own_claims(z, claims[:3], KNOWN, cfg)
    with pytest.raises(ConfigError):
        apply_own_claims(z, np.array([10, -1, -1, -1]), KNOWN, cfg)
    with pytest.raises(ConfigError):
        ReKDConfig(own_claim_margin=-1.0)
    with pytest.raises(ConfigError):
        ReKDConfig(own_claim_known_limit=1.5)


def test_rekd_student_uses_own_claims_only_for_a_user_model(rekd_toy: RekdToy) -> None:
    presumed, transfer, teacher = rekd_toy
    claims = np.full(20, -1, np.int64)
    claims[:10] = 8
    # an untrained teacher is unsure everywhere: let every claim through
    cfg = ReKDConfig(kd=KDConfig(epochs=1), own_claim_known_limit=1.0)

    def params(**kw: object) -> list[np.ndarray]:
        m = rekd_student(teacher, student_spec(), presumed, transfer, cfg, seed=3, **kw)  # type: ignore[arg-type]
        return [p.detach().numpy() for p in m.parameters()]

    support = np.full(10, 0.1)
    plain = params(support=support)
    claimed = params(support=support, own_claims=claims)
    assert not all(np.array_equal(a, b) for a, b in zip(plain, claimed, strict=True))
    # the fleet model (no support) ignores claims
    fleet = params()
    assert all(np.array_equal(a, b) for a, b in zip(fleet, params(own_claims=claims), strict=True))
    with pytest.raises(ConfigError):
        params(support=support, own_claims=claims[:5])


def test_the_release_job_keeps_every_own_claim_of_a_device_across_packets() -> None:
    from diredi_secure.ml.rekd import combine_own_claims

    # Sparse (rows, classes) per packet, rows in the release's concatenated transfer set.
    first = (np.array([0, 3]), np.array([7, 8]))
    second = (np.array([1]), np.array([7]))  # a second packet of the device, same group: same rows
    other_group = (np.array([4]), np.array([9]))  # a packet on another base: rows from offset 4
    out = combine_own_claims([first, second, other_group], 7)
    assert out.tolist() == [7, 7, -1, 8, 9, -1, -1]

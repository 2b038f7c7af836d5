"""One merge over several base models (``merge_groups_streamed``), the claim quorum on public
reference rows and the presumed anchor (issue 17: a fleet's rounds eroded the presumed classes).

Real payloads from the streamed-merge tests (four devices with a weight delta, one without).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from diredi_secure.errors import ConfigError
from diredi_secure.ml.data import NUM_CLASSES
from diredi_secure.ml.distill import KDConfig, distill_student
from diredi_secure.ml.merge import (
    MergeConfig,
    MergeGroup,
    MergeResult,
    merge_groups_streamed,
    merge_into_teacher,
    merge_streamed,
    public_flip_scale,
    relief_claims,
)
from diredi_secure.ml.models import (
    build_model,
    load_model_bytes,
    model_bytes,
    student_spec,
    teacher_spec,
)

from .test_ml_streamed_merge import CONFIG, _setup


def _merge(groups: list[MergeGroup], **kw: object) -> MergeResult:
    sc, teacher, _, _ = _setup()
    return merge_groups_streamed(
        teacher, groups, sc.reference_x, sc.presumed_train, CONFIG, seed=3,
        rng=np.random.default_rng(7), presumed_val=sc.presumed_val, chunk_size=2,
        **kw,  # type: ignore[arg-type]
    )


def _other_base() -> bytes:
    """A second released edge model (another seed): a stale or per-user base."""
    sc, teacher, _, _ = _setup()
    student = build_model(student_spec(), seed=9)
    distill_student(student, load_model_bytes(teacher)[0], sc.presumed_train, sc.reference_x,
                    KDConfig(epochs=1), seed=9)
    return model_bytes(student, student_spec())


def test_groups_on_one_base_are_one_merge() -> None:
    """Splitting one base's devices into two groups changes nothing: the same bytes."""
    sc, teacher, shipped, devices = _setup()
    whole = merge_streamed(teacher, shipped, lambda: devices, sc.reference_x, sc.presumed_train,
                           CONFIG, seed=3, rng=np.random.default_rng(7),
                           presumed_val=sc.presumed_val, chunk_size=2)
    split = _merge([MergeGroup(shipped, lambda: devices[:2]),
                    MergeGroup(shipped, lambda: devices[2:])])
    assert model_bytes(split.teacher, teacher_spec()) == model_bytes(whole.teacher, teacher_spec())
    np.testing.assert_array_equal(split.transfer_x, whole.transfer_x)
    assert split.weights == whole.weights and split.owner_rows == whole.owner_rows
    for name in whole.weights:
        np.testing.assert_array_equal(split.own_claims_of(name), whole.own_claims_of(name))


def test_each_group_is_differenced_against_its_own_base() -> None:
    """Devices 2-4 on the shipped model get what they get in a one-base merge; devices 0-1,
    computed against another base, are synthesised and bounded against that base."""
    _, _, shipped, devices = _setup()
    other = _other_base()
    same = _merge([MergeGroup(shipped, lambda: devices)])
    mixed = _merge([MergeGroup(other, lambda: devices[:2]),
                    MergeGroup(shipped, lambda: devices[2:])])
    assert len(mixed.transfer_x) == len(same.transfer_x)
    for dev in devices[2:]:
        name = dev.device_id
        assert mixed.weights[name] == same.weights[name]
        if name in same.owner_rows:
            a, b = same.owner_rows[name]
            np.testing.assert_array_equal(mixed.transfer_x[a:b], same.transfer_x[a:b])
    a, b = same.owner_rows[devices[0].device_id]
    assert not np.array_equal(mixed.transfer_x[a:b], same.transfer_x[a:b])  # other base's synthesis
    assert model_bytes(mixed.teacher, teacher_spec()) != model_bytes(same.teacher, teacher_spec())


def test_presumed_anchor_is_what_the_teacher_keeps_on_presumed_data() -> None:
    _, teacher, shipped, devices = _setup()
    groups = [MergeGroup(shipped, lambda: devices)]
    plain = model_bytes(_merge(groups).teacher, teacher_spec())
    assert model_bytes(_merge(groups, presumed_anchor=teacher).teacher, teacher_spec()) == plain
    # Another anchor (an untrained teacher) changes what the KD term keeps.
    stranger = model_bytes(build_model(teacher_spec(), seed=4), teacher_spec())
    assert model_bytes(_merge(groups, presumed_anchor=stranger).teacher, teacher_spec()) != plain


def test_no_device_in_any_group_is_refused() -> None:
    _, _, shipped, _ = _setup()
    with pytest.raises(ConfigError, match="nothing to merge"):
        _merge([MergeGroup(shipped, lambda: []), MergeGroup(shipped, lambda: [])])


def test_public_scale_counts_effective_devices() -> None:
    """n_c = the shares summed over the largest: three devices of share 0.7 and three of 0.1
    are 3.4 devices' worth of class 9; with public_devices 3 their moves count 3 / 3.4."""
    mass, peak = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    mass[9], peak[9] = 3 * 0.7 + 3 * 0.1, 0.7
    mass[8], peak[8] = 0.8, 0.7  # the digits loop: one main supporter and a little of another
    scale = public_flip_scale(mass, peak, 3.0)
    assert scale[9] == pytest.approx(3.0 / (2.4 / 0.7))
    assert scale[8] == 1.0 and scale[0] == 1.0  # no one can move a row to 0: nothing to scale
    assert (public_flip_scale(mass, peak, None) == 1.0).all()


def _confident(rows: int, row_class: dict[int, int]) -> np.ndarray:
    p = np.full((rows, NUM_CLASSES), 0.01)
    p[:, 0] = 1.0 - 0.01 * (NUM_CLASSES - 1)
    for r, c in row_class.items():
        p[r] = 0.01
        p[r, c] = 1.0 - 0.01 * (NUM_CLASSES - 1)
    return p


def test_a_lone_claim_on_a_public_row_needs_the_quorum() -> None:
    """Rows 0-3 public, rows 4-5 device 0's own. Three devices support 9: device 0 alone claims
    public row 0 and its own row 4; devices 0 and 1 claim public row 1."""
    sup = np.zeros(NUM_CLASSES)
    sup[9] = 1.0
    probs = [_confident(6, {0: 9, 1: 9, 4: 9}), _confident(6, {1: 9}), _confident(6, {})]
    owner = np.array([-1, -1, -1, -1, 0, 0])
    known = np.arange(7)
    args = (probs, [sup] * 3, [1.0] * 3, known, 0.7, 0.05, 6)
    loose, _ = relief_claims(*args, owner=owner)
    assert loose.tolist() == [9, 9, -1, -1, 9, -1]
    strict, who = relief_claims(*args, owner=owner, quorum=0.5)  # needs 2 of 3
    assert strict.tolist() == [-1, 9, -1, -1, 9, -1]  # the lone public claim goes, its own row stays
    assert who[0] == -1 and who[4] == 0
    # In a small fleet (at most public_devices devices' worth able: here 3) every claim stands.
    small, _ = relief_claims(*args, owner=owner, quorum=0.5, quorum_above=3.0)
    assert small.tolist() == loose.tolist()
    tighter, _ = relief_claims(*args, owner=owner, quorum=0.5, quorum_above=2.0)
    assert tighter.tolist() == strict.tolist()
    # A main supporter claims alone against a minor one (the digits loop: B 0.7 of 9s, C 0.1).
    minor = np.full(NUM_CLASSES, 0.1)
    major = np.zeros(NUM_CLASSES)
    major[9] = 0.7
    probs_2 = [_confident(6, {0: 9}), _confident(6, {})]
    main, _ = relief_claims(probs_2, [major, minor], [1.0, 1.0], known, 0.7, 0.05, 6,
                            owner=owner, quorum=0.5)
    assert main[0] == 9
    # One supporter of a class still claims alone.
    alone, _ = relief_claims(probs[:1], [sup], [1.0], known, 0.7, 0.05, 6, owner=owner,
                             quorum=0.5)
    assert alone.tolist() == [9, 9, -1, -1, 9, -1]


def test_quorum_setting_is_bounded() -> None:
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="claim_quorum"):
            replace(MergeConfig(), claim_quorum=bad)


def test_three_devices_merge_as_before_the_public_row_rules() -> None:
    """The digits loop's three users (A, B, C): no class has more than three devices' worth able,
    so the claim quorum and the public-row scale change no byte of the in-memory merge (what
    ``diredi bench reproduce`` runs)."""
    sc, teacher, shipped, devices = _setup()
    trio = list(devices[:3])

    def merged(config: MergeConfig) -> bytes:
        out = merge_into_teacher(load_model_bytes(teacher)[0], load_model_bytes(shipped)[0], trio,
                                 sc.reference_x, sc.presumed_train, config, seed=3,
                                 rng=np.random.default_rng(7), presumed_val=sc.presumed_val)
        return model_bytes(out.teacher, teacher_spec())

    assert CONFIG.claim_quorum is not None and CONFIG.public_devices is not None
    before = replace(CONFIG, claim_quorum=None, public_devices=None)
    plain = merged(before)
    assert merged(CONFIG) == plain
    # Not vacuous: counting at most one device's worth per class does change this merge.
    assert merged(replace(CONFIG, public_devices=1.0)) != plain


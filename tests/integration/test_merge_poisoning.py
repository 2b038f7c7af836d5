"""A poisoning device against the merge, on the digits scenario at epsilon 8 (seed 0).

The device declares class 9 (B's histogram and prototypes) and sends B's weight delta with the
last layer's class-9 bias raised by 20: its model calls every input a confident 9. The anchor
relief trusts such confidence, so without the per-class claim cap this one device took the merged
teacher's presumed accuracy from 0.98 to 0.43-0.64 (docs/METHOD.md, round 5). A poisoner can still
erase other users' new classes in the merged teacher (its 9s win A's 7s and 8s): the anchor only
guards presumed ones. A user's own per-user model follows that user's own claims (round 6) and
keeps part of them (the second test).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from diredi_secure.knowledge import KnowledgePayload, PayloadKind, PayloadTensor
from diredi_secure.ml.data import Scenario, make_scenario
from diredi_secure.ml.distill import distill_student, train_classifier
from diredi_secure.ml.evaluate import accuracy
from diredi_secure.ml.loop import LoopConfig
from diredi_secure.ml.merge import DeviceKnowledge, MergeConfig, MergeResult, merge_into_teacher
from diredi_secure.ml.models import build_model, flat_parameters, student_spec, teacher_spec
from diredi_secure.ml.rekd import ReKDConfig, rekd_student
from diredi_secure.ml.reverse import RDConfig, reverse_distill


def _everything_is(cls: int, payload: KnowledgePayload, n_params: int) -> KnowledgePayload:
    out = []
    for t in payload.tensors:
        if t.kind == PayloadKind.WEIGHT_DELTA:
            v = np.zeros(n_params, np.float32)
            if t.index is None:
                v[:] = t.values.reshape(-1)
            else:
                v[t.index] = t.values.reshape(-1)
            v[n_params - 10 + cls] += 20.0  # the last layer's bias for ``cls``
            t = PayloadTensor(t.name, t.kind, v, "float32")
        out.append(t)
    return KnowledgePayload(tuple(out))


World = tuple[int, LoopConfig, Scenario, nn.Module, nn.Module, RDConfig]


@pytest.fixture(scope="module")
def world() -> World:
    """Seed 0: the scenario, the teacher and the shipped student after KD (shared by the tests)."""
    torch.set_num_threads(1)
    seed, cfg = 0, LoopConfig()
    sc = make_scenario(seed)
    teacher = build_model(teacher_spec(), seed=seed)
    train_classifier(teacher, sc.presumed_train, cfg.teacher, seed=seed)
    shipped = build_model(student_spec(), seed=seed + 1)
    distill_student(shipped, teacher, sc.presumed_train, sc.reference_x, cfg.kd, seed=seed)
    rd = replace(cfg.rd, epsilon=8.0)
    return seed, cfg, sc, teacher, shipped, rd


@pytest.mark.timeout(300)
def test_claim_cap_keeps_a_poisoner_off_the_presumed_classes(world: World) -> None:
    seed, cfg, sc, teacher, shipped, rd = world
    b = sc.users[1]
    honest = reverse_distill(shipped, b.train, sc.reference_x, replace(rd, research_seed=11))
    devices = [DeviceKnowledge("B", honest.payload),
               DeviceKnowledge("P", _everything_is(9, honest.payload,
                                                   flat_parameters(shipped).size))]

    def merge(merge: MergeConfig, devs: list[DeviceKnowledge]) -> MergeResult:
        return merge_into_teacher(teacher, shipped, devs, sc.reference_x, sc.presumed_train,
                                  merge, seed=seed, rng=np.random.default_rng(2),
                                  presumed_val=sc.presumed_val, prototype_clip=rd.policy.prototype_clip)

    def presumed_after(config: MergeConfig) -> float:
        merged = merge(config, devices)
        assert merged.weights["P"] == 1.0  # it declares what it pushes: the score cannot see it
        return accuracy(merged.teacher, sc.presumed_val)

    before = accuracy(teacher, sc.presumed_val)
    with_p = merge(cfg.merge, devices)
    capped = accuracy(with_p.teacher, sc.presumed_val)
    # Own claims (per-user re-KD, round 6) are each device's alone: the poisoner's do not change
    # B's, and its own stay within the cap (a quarter of the reference rows, class 9 only).
    alone = merge(cfg.merge, devices[:1])
    n_b = len(alone.transfer_x)
    np.testing.assert_array_equal(with_p.own_claims["B"][:n_b], alone.own_claims["B"])
    n_ref = len(sc.reference_x)
    p_claims = with_p.own_claims["P"]
    assert set(np.unique(p_claims[p_claims >= 0]).tolist()) == {9}
    assert (p_claims[:n_ref] >= 0).sum() == int(0.25 * n_ref)
    assert np.all(p_claims[n_ref:n_b] == -1)  # B's rows are not the poisoner's to claim
    uncapped = presumed_after(MergeConfig(max_claim_share=None))
    no_relief = presumed_after(MergeConfig(anchor_relax_confidence=None))
    # Measured (privacy/ schedule: a total of 8 at delta 1e-5, B's RD noise from research seeds
    # 11-14): 0.982 before; capped 0.894-0.956; uncapped 0.487-0.619; no relief at all (the
    # clipped soft difference alone) 0.956-0.965. The cap leaves the poisoner about the room it
    # has without the relief (0 to 6 points more over those draws; the margins below were 0.05
    # and 0.08 when they rested on one draw); the rest is the bound of the row / device clips.
    assert capped >= no_relief - 0.08 and capped >= before - 0.10
    assert uncapped < capped - 0.2  # the attack is real: without the cap it lands


@pytest.mark.timeout(300)
def test_own_claims_keep_a_users_new_classes_in_its_own_model_under_attack(world: World) -> None:
    # The gap the cap leaves: the poisoner's 9s win A's 7s and 8s in the *merged teacher*. A's own
    # per-user model follows A's own claims there (round 6), so it keeps more of them. Measured
    # (seed 0, A + B + poisoner): teacher 0.30 on A's validation set, A's model 0.53, and 0.23
    # without own claims and prior (METHOD.md, round 6, has the same attack on other draws).
    seed, cfg, sc, teacher, shipped, rd = world
    a, b = sc.users[0], sc.users[1]
    res = [reverse_distill(shipped, u.train, sc.reference_x, replace(rd, research_seed=10 + i))
           for i, u in enumerate((a, b))]
    poison = _everything_is(9, res[1].payload, flat_parameters(shipped).size)
    devices = [DeviceKnowledge("A", res[0].payload), DeviceKnowledge("B", res[1].payload),
               DeviceKnowledge("P", poison)]
    merged = merge_into_teacher(teacher, shipped, devices, sc.reference_x, sc.presumed_train,
                                cfg.merge, seed=seed, rng=np.random.default_rng(2),
                                presumed_val=sc.presumed_val, prototype_clip=rd.policy.prototype_clip)

    def a_model(rekd: ReKDConfig) -> float:
        m = rekd_student(merged.teacher, student_spec(), sc.presumed_train, merged.transfer_x,
                         rekd, seed=seed + 2, support=merged.supports["A"],
                         own_claims=merged.own_claims["A"])
        return accuracy(m, a.val)

    teacher_a = accuracy(merged.teacher, a.val)
    own = a_model(cfg.rekd)
    without = a_model(replace(cfg.rekd, own_claim_margin=None, prior_weight=0.0))
    print(f"A under attack: teacher {teacher_a:.3f}, A's model {own:.3f} (without own claims "
          f"and prior {without:.3f})")
    assert own >= without + 0.15 and own >= teacher_a + 0.2

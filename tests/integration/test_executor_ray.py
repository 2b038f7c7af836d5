"""The cloud's jobs on Ray equal the jobs in process, byte for byte, for the same seeds.

A local Ray instance with 2 worker CPUs runs the streamed merge (chunks of packets, the teacher's
fine-tuning) and the fleet and per-user re-KD; the in-process executor runs the same calls. The
models must be the same bytes. Skipped only when Ray is not installed (``pip install
'diredi-secure[ray]'``; ``make test`` installs it).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from diredi_secure.errors import ConfigError, PayloadInvalid
from diredi_secure.ml.executor import InProcessExecutor, JobExecutor, make_executor
from diredi_secure.ml.merge import merge_streamed
from diredi_secure.ml.models import model_bytes, student_spec, teacher_spec
from diredi_secure.ml.rekd import ReKDConfig, UserReKD, UserReKDShared, rekd_user_task

from ..unit.test_ml_streamed_merge import CONFIG, _setup

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'diredi-secure[ray]'")


@pytest.fixture(scope="module")
def ray_executor() -> Iterator[JobExecutor]:
    with make_executor("ray", address="local", workers=2) as ex:
        assert ex.workers == 2
        yield ex


def _round(executor: JobExecutor) -> tuple[bytes, list[bytes]]:
    sc, teacher, shipped, devices = _setup()
    merged = merge_streamed(
        teacher,
        shipped,
        lambda: devices,
        sc.reference_x,
        sc.presumed_train,
        CONFIG,
        seed=5,
        rng=np.random.default_rng(11),
        presumed_val=sc.presumed_val,
        executor=executor,
        chunk_size=2,
    )
    teacher_bytes = model_bytes(merged.teacher, teacher_spec())
    shared = UserReKDShared(
        teacher_bytes,
        student_spec(),
        sc.presumed_train,
        merged.transfer_x,
        len(sc.reference_x),
        ReKDConfig(max_transfer_rows=400),
        seed=2,
    )
    users = [
        UserReKD(
            d.device_id,
            merged.supports[d.device_id],
            merged.sensor_kernels.get(d.device_id),
            (merged.own_claim_rows[d.device_id],),
            (merged.owner_rows[d.device_id],) if d.device_id in merged.owner_rows else (),
            True,
        )
        for d in devices
    ]
    return teacher_bytes, list(executor.map(rekd_user_task, shared, users))


def test_ray_equals_in_process(ray_executor: JobExecutor) -> None:
    teacher_local, users_local = _round(InProcessExecutor())
    teacher_ray, users_ray = _round(ray_executor)
    assert teacher_ray == teacher_local
    assert len(users_ray) == len(users_local) == 5
    assert users_ray == users_local
    assert len(set(users_local)) == 5  # five different users, five different models


def _refuse(_shared: None, item: int) -> int:
    if item == 2:
        raise PayloadInvalid("item 2 is bad")
    return item * 10


def test_a_task_error_comes_back_typed(ray_executor: JobExecutor) -> None:
    assert list(ray_executor.map(_refuse, None, [0, 1])) == [0, 10]
    with pytest.raises(PayloadInvalid, match="item 2 is bad"):
        list(ray_executor.map(_refuse, None, range(5)))
    with pytest.raises(PayloadInvalid):
        list(InProcessExecutor().map(_refuse, None, range(5)))


def test_unknown_executor_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown executor"):
        make_executor("spark")

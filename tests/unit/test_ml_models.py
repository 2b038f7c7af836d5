"""Models, checkpoints and KD (diredi_secure.ml.models, .distill)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from diredi_secure.errors import ModelFormatError
from diredi_secure.ml.data import make_scenario
from diredi_secure.ml.distill import (
    KDConfig,
    TrainConfig,
    distill_student,
    kl_to_teacher,
    train_classifier,
)
from diredi_secure.ml.models import (
    build_model,
    count_parameters,
    flat_parameters,
    load_model,
    load_model_bytes,
    model_bytes,
    save_model,
    set_flat_parameters,
    student_spec,
    teacher_spec,
)


def test_sizes_and_no_batchnorm() -> None:
    t, s = build_model(teacher_spec(), seed=0), build_model(student_spec(), seed=0)
    assert count_parameters(t) >= 10 * count_parameters(s)
    for m in (t, s):
        assert not any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(s.train(), strict=False) == []
    assert ModuleValidator.validate(t.train(), strict=False) == []


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    m = build_model(teacher_spec(), seed=1)
    save_model(tmp_path / "t.safetensors", m, teacher_spec(), {"version": "3"})
    back, spec, meta = load_model(tmp_path / "t.safetensors")
    assert spec == teacher_spec() and meta == {"version": "3"}
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(m.eval()(x), back(x))


def test_pickle_checkpoint_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save(build_model(student_spec()).state_dict(), buf)
    with pytest.raises(ModelFormatError):
        load_model_bytes(buf.getvalue())
    with pytest.raises(ModelFormatError):
        load_model_bytes(pickle.dumps({"a": 1}))
    (tmp_path / "p.pt").write_bytes(buf.getvalue())
    with pytest.raises(ModelFormatError):
        load_model(tmp_path / "p.pt")


def test_checkpoint_that_does_not_fit_refused() -> None:
    data = model_bytes(build_model(student_spec()), teacher_spec())  # lies about its architecture
    with pytest.raises(ModelFormatError, match="do not fit"):
        load_model_bytes(data)


def test_flat_parameters_round_trip() -> None:
    m = build_model(student_spec(), seed=0)
    flat = flat_parameters(m)
    assert flat.shape == (count_parameters(m),)
    set_flat_parameters(m, flat + 1.0)
    assert np.allclose(flat_parameters(m), flat + 1.0)
    with pytest.raises(ModelFormatError):
        set_flat_parameters(m, flat[:-1])


def test_kd_lowers_kl_to_teacher() -> None:
    s = make_scenario(0)
    teacher = train_classifier(build_model(teacher_spec(), seed=0), s.presumed_train,
                               TrainConfig(epochs=3), seed=0)
    student = build_model(student_spec(), seed=0)
    before = kl_to_teacher(student, teacher, s.reference_x)
    distill_student(student, teacher, s.presumed_train, s.reference_x, KDConfig(epochs=3), seed=0)
    after = kl_to_teacher(student, teacher, s.reference_x)
    assert after < 0.5 * before

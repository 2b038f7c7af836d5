"""Loaders and the scenario builder (diredi_secure.ml.data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diredi_secure.errors import DatasetError
from diredi_secure.ml.data import (
    NUM_CLASSES,
    apply_domain_shift,
    load_digits_dataset,
    load_npz_dataset,
    load_scenario,
    make_scenario,
    save_scenario,
)


def test_digits_are_scaled_images() -> None:
    ds = load_digits_dataset()
    assert ds.x.shape == (1797, 1, 8, 8)
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    assert set(np.unique(ds.y)) == set(range(NUM_CLASSES))


def test_npz_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "mine.npz"
    np.savez(path, x=np.random.default_rng(0).random((5, 8, 8)), y=np.array([0, 1, 2, 3, 9]))
    ds = load_npz_dataset(path)
    assert ds.x.shape == (5, 1, 8, 8) and list(ds.y) == [0, 1, 2, 3, 9]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((2, 64)), "y": np.zeros(2, int)}, "must hold arrays"),
        ({"x": np.zeros((3, 64)), "y": np.zeros(2, int)}, "rows"),
        ({"x": np.zeros((2, 64)), "y": np.array([0, 10])}, "labels must lie"),
        ({"x": np.zeros((2, 64)), "y": np.array([0, -1])}, "labels must lie"),
        ({"x": np.zeros((2, 63)), "y": np.zeros(2, int)}, "64 pixels"),
        ({"x": np.zeros((2, 64)), "y": np.zeros(2, float)}, "integers"),
    ],
)
def test_npz_refused(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=message):
        load_npz_dataset(path)


def test_npz_missing_file_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read"):
        load_npz_dataset(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DatasetError):
        load_npz_dataset(tmp_path / "junk.npz")


def test_npz_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, int))
    with pytest.raises(DatasetError):
        load_npz_dataset(path)


def test_scenario_is_deterministic_and_disjoint() -> None:
    a, b = make_scenario(3), make_scenario(3)
    assert np.array_equal(a.reference_x, b.reference_x)
    assert np.array_equal(a.users[0].train.x, b.users[0].train.x)
    assert not np.array_equal(a.reference_x, make_scenario(4).reference_x)
    # presumed data only holds presumed classes
    assert set(np.unique(a.presumed_train.y)) <= set(a.config.presumed_classes)
    assert set(np.unique(a.presumed_test.y)) <= set(a.config.presumed_classes)
    # users hold classes the manufacturer lacked
    assert a.user("A").train.class_counts()[7:9].sum() > 0.6 * len(a.user("A").train)
    assert a.user("B").train.class_counts()[9] > 0.6 * len(a.user("B").train)
    # training images never appear in any test set
    train_rows = {r.tobytes() for r in a.presumed_train.x} | {r.tobytes() for r in a.reference_x}
    assert not train_rows & {r.tobytes() for r in a.presumed_test.x}
    assert set(np.unique(a.reference_y)) == set(range(NUM_CLASSES))


def test_shifted_user_sees_the_distortion() -> None:
    s = make_scenario(0)
    c = s.user("C")
    assert c.shifted
    # shifted right/down: the last column holds more ink than in undistorted images
    assert c.train.x[..., :, 7].mean() > 2 * s.presumed_train.x[..., :, 7].mean()
    x = np.zeros((1, 1, 8, 8), np.float32)
    x[0, 0, 2, 2] = 1.0
    y = apply_domain_shift(x, shift=1, blur=0.0)
    assert y[0, 0, 3, 3] == 1.0 and y.sum() == 1.0


def test_scenario_save_load(tmp_path: Path) -> None:
    s = make_scenario(1)
    save_scenario(s, tmp_path / "sc")
    t = load_scenario(tmp_path / "sc")
    assert t.seed == 1 and t.config == s.config
    assert np.array_equal(t.users[2].test.x, s.users[2].test.x)
    assert np.array_equal(t.presumed_val.y, s.presumed_val.y)
    (tmp_path / "sc" / "scenario.json").write_text("{}")
    with pytest.raises(DatasetError):
        load_scenario(tmp_path / "sc")

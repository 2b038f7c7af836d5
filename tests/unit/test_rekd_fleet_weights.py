"""The fleet model's sample weights (issue 17: uniform weights drowned the presumed rows as the
fleet's transfer set grew, and the presumed guard then held the fleet model back every round)."""

from __future__ import annotations

import numpy as np
import pytest
from diredi_secure.services.jobs import JobSettings

from diredi_secure.errors import ConfigError
from diredi_secure.ml.rekd import fleet_weights


@pytest.mark.parametrize(("n_p", "n_t"), [(450, 900), (450, 45_000), (1426, 3_000_000)])
def test_presumed_rows_keep_their_share_as_the_transfer_set_grows(n_p: int, n_t: int) -> None:
    w = fleet_weights(n_p, n_t, 0.5)
    assert w.shape == (n_p + n_t,) and np.all(w[n_p:] == 1.0)
    share = w[:n_p].sum() / w.sum()
    assert share == pytest.approx(0.5, rel=1e-5)
    w3 = fleet_weights(n_p, n_t, 0.25)  # never below the uniform share (450 of 1,350 is 1/3)
    assert w3[:n_p].sum() / w3.sum() == pytest.approx(max(0.25, n_p / (n_p + n_t)), rel=1e-5)


def test_a_small_transfer_set_keeps_uniform_weights() -> None:
    # 300 transfer rows against 450 presumed ones: the presumed share (0.6) is already above 0.5
    assert np.all(fleet_weights(450, 300, 0.5) == 1.0)
    assert np.all(fleet_weights(450, 9_000, None) == 1.0)  # None: uniform, as before
    assert np.all(fleet_weights(0, 10, 0.5) == 1.0) and np.all(fleet_weights(10, 0, 0.5) == 1.0)


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_a_share_outside_the_open_unit_interval_is_refused(share: float) -> None:
    with pytest.raises(ConfigError):
        fleet_weights(10, 10, share)
    with pytest.raises(ConfigError):
        JobSettings(fleet_presumed_share=share)


def test_the_cloud_jobs_weight_the_fleet_model_by_default() -> None:
    assert JobSettings().fleet_presumed_share == 0.5
    assert JobSettings(fleet_presumed_share=None).digest() != JobSettings().digest()

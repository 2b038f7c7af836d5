"""Shared fixtures of the unit tests."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from diredi_secure.ml.data import Dataset
from diredi_secure.ml.models import build_model, student_spec

RekdToy = tuple[Dataset, np.ndarray, nn.Module]


@pytest.fixture
def rekd_toy() -> RekdToy:
    """Re-KD inputs in seconds: 40 random presumed images of classes 0-6, 20 random transfer
    inputs, and an untrained student as the teacher."""
    rng = np.random.default_rng(0)
    presumed = Dataset(rng.uniform(0, 1, (40, 1, 8, 8)).astype(np.float32),
                       np.arange(40, dtype=np.int64) % 7)
    transfer = rng.uniform(0, 1, (20, 1, 8, 8)).astype(np.float32)
    return presumed, transfer, build_model(student_spec(), seed=0)

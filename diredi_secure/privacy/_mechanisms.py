"""The mechanisms a device runs on private data, their sensitivities and the bounds on their
parameters.

| mechanism | what it releases | L2 sensitivity (add/remove one example) | sampling |
|---|---|---|---|
| ``dp_sgd`` | the DP-trained model (its reference logits and weight delta are post-processing) | the clip norm, per step | Poisson, rate ``q``, ``steps`` steps |
| ``label_histogram`` | class counts + discrete Gaussian noise | 1 | none (rate 1, one release) |
| ``dp_prototypes`` | per-class sums of inputs clipped to norm ``C`` + Gaussian noise ``sigma C`` | ``C`` | none (rate 1, one release) |

Every declared parameter is bounded by :class:`DPBounds` *before* the accountant runs on it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from ..errors import PolicyViolation
from ._accountant import compose, epsilon_from_curve, gaussian_curve

__all__ = [
    "DPBounds",
    "Mechanism",
    "MechanismKind",
    "ParameterOutOfBounds",
    "check_mechanism",
    "gaussian_epsilon",
    "mechanisms_epsilon",
]


class MechanismKind(StrEnum):
    DP_SGD = "dp_sgd"
    LABEL_HISTOGRAM = "label_histogram"
    DP_PROTOTYPES = "dp_prototypes"


class ParameterOutOfBounds(PolicyViolation):
    """A declared DP parameter lies outside what the policy lets the accountant compute with."""

    reason = "dp_parameter_out_of_bounds"


@dataclass(frozen=True)
class DPBounds:
    """Ranges every declared DP parameter must lie in before any epsilon is computed from it.

    They bound the accountant's work (one curve is a fixed number of terms) and refuse settings no
    honest device uses: a noise multiplier below ``min_noise_multiplier`` gives an epsilon of
    hundreds per step, above ``max_noise_multiplier`` it is numerically indistinguishable from no
    release at all.
    """

    min_noise_multiplier: float = 0.3
    max_noise_multiplier: float = 1e4
    min_sample_rate: float = 1e-6
    max_steps: int = 1_000_000
    max_clip_norm: float = 1e3

    def __post_init__(self) -> None:
        if not (0 < self.min_noise_multiplier < self.max_noise_multiplier < math.inf):
            raise ValueError("noise multiplier bounds must satisfy 0 < min < max < inf")
        if not (0 < self.min_sample_rate <= 1) or self.max_steps < 1 or not self.max_clip_norm > 0:
            raise ValueError("sample-rate, steps and clip bounds must be positive")


@dataclass(frozen=True)
class Mechanism:
    """``steps`` compositions of a (Poisson-subsampled, at ``sample_rate``) Gaussian mechanism with
    noise std ``noise_multiplier`` times its sensitivity."""

    kind: MechanismKind
    noise_multiplier: float
    sample_rate: float = 1.0
    steps: int = 1

    def curve(self) -> np.ndarray:
        return gaussian_curve(self.noise_multiplier, self.sample_rate, self.steps)


def check_mechanism(m: Mechanism, bounds: DPBounds) -> None:
    """Raise :class:`ParameterOutOfBounds` naming the field unless every parameter is in bounds."""
    sigma, q, steps = m.noise_multiplier, m.sample_rate, m.steps
    name = m.kind.value
    if not isinstance(sigma, float | int) or not math.isfinite(sigma):
        raise ParameterOutOfBounds(f"{name}: noise multiplier {sigma!r} is not finite")
    if not (bounds.min_noise_multiplier <= sigma <= bounds.max_noise_multiplier):
        raise ParameterOutOfBounds(
            f"{name}: noise multiplier {sigma:.6g} outside [{bounds.min_noise_multiplier:g}, "
            f"{bounds.max_noise_multiplier:g}]"
        )
    if not isinstance(q, float | int) or not (bounds.min_sample_rate <= q <= 1.0):
        raise ParameterOutOfBounds(
            f"{name}: sample rate {q!r} outside [{bounds.min_sample_rate:g}, 1]"
        )
    if not isinstance(steps, int) or not (1 <= steps <= bounds.max_steps):
        raise ParameterOutOfBounds(f"{name}: steps {steps!r} outside [1, {bounds.max_steps}]")
    if m.kind is not MechanismKind.DP_SGD and (q != 1.0 or steps != 1):
        raise ParameterOutOfBounds(f"{name}: released once without sampling (rate 1, 1 step)")


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Epsilon of one (unsampled) Gaussian release with this noise multiplier at ``delta``.
    Cached per parameter set (pure; bounded)."""
    return _gaussian_epsilon(float(noise_multiplier), float(delta))


@functools.lru_cache(maxsize=4096)
def _gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    return epsilon_from_curve(gaussian_curve(noise_multiplier, 1.0, 1), delta)[0]


def mechanisms_epsilon(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """Epsilon of the composition of ``mechanisms`` at ``delta``. Cached per (mechanisms, delta):
    ingest and the device ask for the same few compositions again and again."""
    return _mechanisms_epsilon(tuple(mechanisms), float(delta))


@functools.lru_cache(maxsize=4096)
def _mechanisms_epsilon(mechanisms: tuple[Mechanism, ...], delta: float) -> float:
    return epsilon_from_curve(compose(m.curve() for m in mechanisms), delta)[0]

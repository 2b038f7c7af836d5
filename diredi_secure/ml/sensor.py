"""A user's sensor, estimated from their DP prototypes: a linear filter on the manufacturer's images.

Knowledge cannot cross a domain the transfer inputs do not cover (METHOD-NOTES.md), and a user's
noised prototypes are too noisy to stand in for their domain at small counts (about 11 examples
per class at epsilon 8: per-pixel noise 0.47). But 7 noisy class means constrain a *small* model of
the difference well: we fit a non-negative ``size x size`` convolution kernel ``k`` (zero padding)
such that ``k * mean_c(presumed images of class c) ~= prototype_c`` over the presumed classes the
user declares enough examples of, weighting each class by its noised count (the prototype's noise
std falls as ``1 / count``). A shift plus blur (digits' shifted user C) is exactly such a kernel; no
change is the centred delta. The cloud then renders its own labelled presumed images through
``k``: inputs in the user's domain whose labels it knows, for that user's re-KD.

The noise model (round 7 of docs/METHOD.md). The device adds Gaussian noise to each class sum
(std ``noise_multiplier * clip``, published in the payload), divides by the noised count and clips
the result to [0, 1] (``reverse.extract_payload``). That clip is not noise-neutral: a background
pixel (true value 0) comes out as ``max(0, noise)``, on average ``0.4 * std`` above 0, and a plain
least-squares kernel explains that lift with spurious taps spread away from the true ones (it read
user C's shift + blur as a much wider blur; C's per-user model scored 0.67 on validation, seeds
0-5, against 0.89 with the true kernel and 0.83 with this model). So the kernel is fitted by non-linear least squares to the *expected*
clipped prototype, ``E[clip(mu + e, 0, 1)]`` with ``e ~ N(0, tau_c^2)`` and
``tau_c = noise_multiplier * clip / count_c``, starting from the linear fit. scipy has bounded
non-linear least squares but no censored-Gaussian regression, so the link is written here. The
multiplier is the device's own claim: outside ``[_TAU_MIN, _TAU_MAX]`` (noise-free, or noise that
leaves a prototype no information about any pixel; also what a device that lies would publish) the
linear fit is kept, so no published value can raise, overflow or blow the kernel up.

Gate: with few classes a flexible kernel also "explains" sampling noise. The fit is kept only when
its leave-one-class-out residual is below ``gate`` times that of the identity (no change). The gate
is the linear fit's, as chosen in round 5; only the kernel it keeps comes from the noise model.

Everything here is post-processing of the DP prototypes and histogram: no extra privacy cost.
Trusted inputs: a payload that passed packet validation; raises :class:`PayloadInvalid` on shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, nnls
from scipy.special import ndtr

from ..errors import ConfigError, PayloadInvalid
from ..knowledge import KnowledgePayload, PayloadKind
from .data import NUM_CLASSES, Dataset

__all__ = ["SensorFit", "estimate_sensor_kernel", "render"]

_SIDE = 8
# Per-pixel prototype noise std outside which the noise model is not used (module docstring). At
# 1e-9 the clip is exact to far below the int4 wire step; at 10 the expected clipped value moves by
# under 0.04 over the whole pixel range.
_TAU_MIN, _TAU_MAX = 1e-9, 10.0


@dataclass(frozen=True)
class SensorFit:
    """A fitted kernel, its leave-one-class-out residual ratio against the identity (below 1: it
    predicts unseen classes' prototypes better than "no change"), and how many classes it used."""

    kernel: np.ndarray
    ratio: float
    classes: int


def _patches(img: np.ndarray, size: int) -> np.ndarray:
    """``[n, 8, 8]`` -> ``[n * 64, size * size]`` zero-padded neighbourhoods (row-major offsets)."""
    r = size // 2
    p = np.pad(img, [(0, 0), (r, r), (r, r)])
    cols = [p[:, dy : dy + _SIDE, dx : dx + _SIDE].reshape(len(img), _SIDE * _SIDE)
            for dy in range(size) for dx in range(size)]
    out: np.ndarray = np.stack(cols, -1).reshape(-1, size * size)
    return out


def _expected_clipped(mu: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """``E[clip(mu + e, 0, 1)]`` for ``e ~ N(0, tau^2)``, and its derivative in ``mu``."""

    def lifted(m: np.ndarray) -> np.ndarray:  # E[max(m + e, 0)]
        z = m / tau
        out: np.ndarray = m * ndtr(z) + tau * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)
        return out

    value = lifted(mu) - lifted(mu - 1.0)
    slope = ndtr(mu / tau) - ndtr((mu - 1.0) / tau)
    return value, slope


def _censored_fit(design: list[np.ndarray], target: list[np.ndarray], w: np.ndarray,
                  tau: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The non-negative kernel whose expected clipped prototypes best fit ``target`` (weighted
    like the linear fit), from ``start``."""
    tau = np.where(tau < _TAU_MIN, 0.0, tau)
    if not np.any(tau > 0) or np.any(tau > _TAU_MAX):
        return start  # noise-free (the clip only touches values outside [0, 1]) or no information

    def residual(k: np.ndarray) -> np.ndarray:
        parts = []
        for i in range(len(design)):
            mu = design[i] @ k
            pred = _expected_clipped(mu, tau[i])[0] if tau[i] > 0 else np.clip(mu, 0.0, 1.0)
            parts.append(w[i] * (pred - target[i]))
        return np.concatenate(parts)

    def jacobian(k: np.ndarray) -> np.ndarray:
        parts = []
        for i in range(len(design)):
            mu = design[i] @ k
            if tau[i] > 0:
                slope = _expected_clipped(mu, tau[i])[1]
            else:
                slope = ((mu > 0) & (mu < 1)).astype(np.float64)
            parts.append(w[i] * slope[:, None] * design[i])
        return np.concatenate(parts)

    fit = least_squares(residual, np.maximum(start, 1e-6), jac=jacobian, bounds=(0.0, np.inf))
    out: np.ndarray = fit.x
    return out


def render(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Images ``[n, 1, 8, 8]`` in [0, 1] through ``kernel`` (zero padding), clipped to [0, 1]."""
    size = kernel.shape[0]
    if kernel.shape != (size, size) or size % 2 == 0:
        raise ConfigError(f"kernel must be square with an odd side, got {kernel.shape}")
    n = len(x)
    out = _patches(np.asarray(x, np.float64).reshape(n, _SIDE, _SIDE), size) @ kernel.reshape(-1)
    img: np.ndarray = np.clip(out, 0.0, 1.0).reshape(n, 1, _SIDE, _SIDE).astype(np.float32)
    return img


def estimate_sensor_kernel(
    payload: KnowledgePayload,
    presumed: Dataset,
    *,
    clip: float | None,
    size: int = 5,
    min_class_count: float = 3.0,
    noise_model: bool = True,
) -> SensorFit | None:
    """Fit the user's sensor kernel from ``payload``'s prototypes and histogram; None without them.

    ``clip`` is the prototype clip norm of the policy (the device clipped every input to that L2
    norm before summing; the presumed images are clipped alike so that the two sides compare).
    Needs at least two presumed classes with ``min_class_count`` noised examples.
    ``noise_model=False`` keeps the linear fit (round 5; for ablations), as does ``clip=None``.
    """
    protos = payload.get(PayloadKind.DP_PROTOTYPES)
    hist = payload.get(PayloadKind.LABEL_HISTOGRAM)
    if protos is None or hist is None:
        return None
    if protos.values.size != NUM_CLASSES * _SIDE * _SIDE or hist.values.size != NUM_CLASSES:
        raise PayloadInvalid("dp_prototypes / label_histogram do not fit the 8x8, 10-class model")
    if size < 1 or size % 2 == 0:
        raise ConfigError(f"kernel size must be odd and >= 1, got {size}")
    p = protos.values.reshape(NUM_CLASSES, -1).astype(np.float64)
    counts = hist.values.reshape(-1).astype(np.float64)
    flat = presumed.x.reshape(len(presumed), -1).astype(np.float64)
    if clip is not None:
        norms = np.linalg.norm(flat, axis=1, keepdims=True)
        flat = flat * np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    # The device's per-pixel noise std on each class prototype (its sum noise over its count).
    # Without the clip norm the noise scale is unknown (as in merge's prototype-noise check): the
    # linear fit is kept.
    noise_std = float(protos.noise_multiplier) * clip if clip is not None else math.nan
    design, target, weight, tau = [], [], [], []
    for c in np.unique(presumed.y):
        if counts[c] < min_class_count or not np.all(np.isfinite(p[c])):
            continue
        mean = flat[presumed.y == c].mean(0).reshape(1, _SIDE, _SIDE)
        design.append(_patches(mean, size))
        target.append(p[c])
        weight.append(counts[c])
        tau.append(noise_std / max(counts[c], 1.0))
    if len(design) < 2:
        return None
    w = np.asarray(weight) / np.mean(weight)

    def solve(idx: list[int]) -> np.ndarray:
        a = np.concatenate([design[i] * w[i] for i in idx])
        b = np.concatenate([target[i] * w[i] for i in idx])
        k: np.ndarray = nnls(a, b)[0]
        return k

    identity = np.zeros(size * size)
    identity[size * size // 2] = 1.0
    held_k = held_i = 0.0
    for j in range(len(design)):
        k = solve([i for i in range(len(design)) if i != j])
        held_k += float(w[j] ** 2 * np.sum((design[j] @ k - target[j]) ** 2))
        held_i += float(w[j] ** 2 * np.sum((design[j] @ identity - target[j]) ** 2))
    kernel = solve(list(range(len(design))))
    if noise_model and math.isfinite(noise_std):
        kernel = _censored_fit(design, target, w, np.asarray(tau), kernel)
    kernel = kernel.reshape(size, size)
    tiny = 1e-9 * sum(len(t) for t in target)  # both ~0: identity is exact, nothing to gain
    return SensorFit(kernel, (held_k + tiny) / (held_i + tiny), len(design))

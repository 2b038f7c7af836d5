"""Membership-inference attack scores: loss threshold and offline LiRA.

Scores are "higher means member". These functions are pure numpy/scipy: the per-example statistics
come from :mod:`.suite`, which evaluates the models the adversary can build from a packet.

* **Loss threshold** (Yeom et al. 2018), calibrated by the shipped model the cloud itself released
  (Watson et al. 2022 "difficulty calibration"): ``score = loss_shipped(x, y) - loss_target(x, y)``,
  how much the user's run lowered the loss of that example.
* **Offline LiRA** (Carlini et al. 2022, "Membership Inference Attacks From First Principles",
  Section 4 offline variant): the statistic is the logit-scaled confidence
  ``phi = log(p_y / (1 - p_y))``; ``N`` shadow RD runs *without* the target examples give, for each
  example, the OUT distribution of ``phi``, modelled as a Gaussian. With few shadows the variance is
  pooled over examples (their recommendation below 64 shadows). The score is the one-sided
  z-statistic ``(phi_target - mu_out) / sigma_out`` (monotone in their likelihood ratio
  ``1 - Phi(...)`` p-value test, so the ROC is the same).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from diredi_secure.errors import ConfigError

__all__ = [
    "cross_entropy",
    "lira_offline_scores",
    "logit_confidence",
    "loss_threshold_scores",
]

_EPS = 1e-12


def _logits_labels(logits: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if z.ndim != 2 or z.shape[0] != y.size:
        raise ConfigError(f"logits of shape {list(z.shape)} for {y.size} labels")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ConfigError("labels out of range for the logits")
    return z, y


def cross_entropy(logits: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
    """Per-example cross-entropy loss, numerically stable."""
    z, y = _logits_labels(logits, labels)
    zmax = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
    out: NDArray[np.float64] = lse - z[np.arange(y.size), y]
    return out


def logit_confidence(logits: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
    """LiRA's statistic ``log p_y - log(1 - p_y)``, computed stably from logits."""
    z, y = _logits_labels(logits, labels)
    correct = z[np.arange(y.size), y]
    others = z.copy()
    others[np.arange(y.size), y] = -np.inf
    omax = others.max(axis=1)
    log_rest = np.log(np.exp(others - omax[:, None]).sum(axis=1)) + omax
    out: NDArray[np.float64] = correct - log_rest
    return out


def loss_threshold_scores(
    target_logits: ArrayLike, reference_logits: ArrayLike, labels: ArrayLike
) -> NDArray[np.float64]:
    """``loss_reference - loss_target``: the drop in loss the user's run caused (higher = member)."""
    return cross_entropy(reference_logits, labels) - cross_entropy(target_logits, labels)


def lira_offline_scores(
    target_stat: ArrayLike, shadow_out_stats: ArrayLike, *, pooled_variance: bool = True
) -> NDArray[np.float64]:
    """Offline LiRA z-scores from ``target_stat`` ``[n]`` and OUT shadow statistics ``[S, n]``.

    Raises :class:`ConfigError` with fewer than 2 shadows (no variance to estimate).
    """
    t = np.asarray(target_stat, dtype=np.float64).ravel()
    s = np.asarray(shadow_out_stats, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != t.size:
        raise ConfigError(f"shadow statistics of shape {list(s.shape)} for {t.size} examples")
    if s.shape[0] < 2:
        raise ConfigError(f"offline LiRA needs at least 2 shadow runs, got {s.shape[0]}")
    mu = s.mean(axis=0)
    if pooled_variance:
        sd = np.full_like(mu, float(np.sqrt(np.mean(s.var(axis=0, ddof=1)))))
    else:
        sd = s.std(axis=0, ddof=1)
    out: NDArray[np.float64] = (t - mu) / np.maximum(sd, _EPS)
    return out

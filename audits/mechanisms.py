"""The device implementations the audit attacks, the attacks on the histogram and prototypes, the
detection ceiling and the per-mechanism verdict.

A packet of the shipped device configuration releases three mechanisms: DP-SGD (its model reaches
the cloud as reference logits and a weight delta), the label histogram (discrete Gaussian) and the
prototypes (Gaussian on clipped class sums, divided by the noised counts). The audit attacks each
against the epsilon its own declared parameters give (``accounting.mechanism_claims``):

* DP-SGD: the canary membership attacks of :mod:`.suite`, plus a noise-floor check (shadow runs of
  the device's implementation must vary as much as the auditor's honest reference runs);
* histogram and prototypes: they are cheap, so the audit runs the device's own release code
  (``reverse.extract_payload``) ``trials`` times on neighbouring datasets ``D`` and ``D + canary``
  (a fair coin per trial), encodes and decodes each payload as the cloud would, scores each trial
  with the likelihood-ratio statistic an adversary who knows ``D`` computes, and bounds epsilon
  with the same one-run bound and Clopper-Pearson ROC test as the canary attacks (independent
  trials are a special case of Steinke et al.'s setting). The prototypes are divided by the noised
  histogram, so the prototype attack sees both: it is tested against their composed epsilon.

:class:`LyingDevice` selects the implementation under attack: the honest one, or a positive
control that keeps the honest header (``reverse.dp_parameters_for``) and breaks one thing.

The ceiling: with ``m`` trials (or canaries) no attack, even a perfect one, proves an epsilon above
what a perfect guess gives (about 4.4 for 512 canaries at the suite's Bonferroni split). A claim
above the ceiling of its attack cannot fail, so its verdict is ``inconclusive``, never ``pass``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

import numpy as np

from diredi_secure.errors import ConfigError
from diredi_secure.privacy import NoiseSource

from . import canary, metrics

if TYPE_CHECKING:
    from torch import nn

    from diredi_secure.ml.data import Dataset
    from diredi_secure.ml.reverse import RDConfig

__all__ = [
    "LyingDevice",
    "MechanismAudit",
    "MechanismVerdict",
    "NoiseFloor",
    "ReleaseTrials",
    "detection_ceiling",
    "device_noise",
    "device_rd_config",
    "judge_mechanism",
    "noise_floor",
    "run_release_trials",
    "shipped_device_config",
]

MechanismVerdict = Literal["pass", "fail", "inconclusive"]

#: Noise multiplier standing in for "none" in the no-DP-SGD-noise control (RDConfig needs > 0).
_NO_NOISE = 1e-9
#: The noise-floor check fails when the device's runs vary less than this fraction of the honest
#: reference's (variance ratio). Measured on the default scenario, 4 against 4 runs of the shipped
#: configuration, 300 resamples of 40 honest runs: at least 0.90 (1 % quantile 0.94) at total
#: epsilon 1 and 8; 10x less noise gives about 0.01. 0.5 catches a noise std 1.4x too small.
NOISE_FLOOR_RATIO = 0.5


class LyingDevice(StrEnum):
    """Which implementation produces the outputs under attack. Every variant declares the honest
    header; all but ``HONEST`` are positive controls the audit must fail."""

    HONEST = "honest"
    NO_DPSGD_NOISE = "no_dpsgd_noise"
    NO_HISTOGRAM_NOISE = "no_histogram_noise"
    NO_PROTOTYPE_NOISE = "no_prototype_noise"
    FIXED_SEED = "fixed_seed"
    """``NoiseSource.seeded(0)`` for every run, while the header says ``noise_seeded=False``."""
    SMALL_DPSGD_NOISE = "small_dpsgd_noise"
    """A DP-SGD noise multiplier 10 times smaller than declared."""


def shipped_device_config(epsilon: float) -> RDConfig:
    """The RD configuration devices ship with at a total target ``epsilon``: the default payload
    (:data:`diredi_secure.ml.reverse.DEFAULT_PAYLOAD_KINDS`, what ``diredi edge reverse`` and the
    demo send), so the audit attacks exactly what ships."""
    from diredi_secure.ml.reverse import DEFAULT_PAYLOAD_KINDS, RDConfig

    return RDConfig(epsilon=epsilon, kinds=DEFAULT_PAYLOAD_KINDS)


class _NoHistogramNoise(NoiseSource):
    def discrete_gaussian(self, counts: np.ndarray, noise_multiplier: float) -> np.ndarray:
        return np.asarray(counts).astype(np.int64).astype(np.float64)


class _ZeroNormal:
    """Stands in for the numpy generator whose ``normal`` draws the prototype noise."""

    def normal(self, loc: float = 0.0, scale: float = 1.0,
               size: tuple[int, ...] | None = None) -> np.ndarray:
        return np.full(size if size is not None else (), loc, dtype=np.float64)


class _NoPrototypeNoise(NoiseSource):
    # extract_payload draws the prototype noise, and only it, from numpy(): DP-SGD uses torch
    # generators and the secure histogram OpenDP's own sampler
    def numpy(self) -> np.random.Generator:
        return _ZeroNormal()  # type: ignore[return-value]


def device_noise(implementation: LyingDevice) -> NoiseSource:
    """The noise source the implementation uses for one RD run (a fresh CSPRNG one if honest)."""
    if implementation is LyingDevice.FIXED_SEED:
        return NoiseSource.seeded(0)
    if implementation is LyingDevice.NO_HISTOGRAM_NOISE:
        return _NoHistogramNoise(_seed=None)
    if implementation is LyingDevice.NO_PROTOTYPE_NOISE:
        return _NoPrototypeNoise(_seed=None)
    return NoiseSource.secure()


def device_rd_config(rd: RDConfig, implementation: LyingDevice) -> RDConfig:
    """The configuration the implementation actually trains with. The DP-SGD controls override the
    noise multiplier but keep the honest learning rate, so only the noise differs."""
    if implementation not in (LyingDevice.NO_DPSGD_NOISE, LyingDevice.SMALL_DPSGD_NOISE):
        return rd
    from diredi_secure.ml.reverse import default_learning_rate, dp_parameters_for

    sigma = dp_parameters_for(rd, seeded=False).noise_multiplier
    lr = rd.lr if rd.lr is not None else default_learning_rate(sigma)
    new = _NO_NOISE if implementation is LyingDevice.NO_DPSGD_NOISE else sigma / 10.0
    return replace(rd, noise_multiplier=new, lr=lr)


@dataclass(frozen=True)
class ReleaseTrials:
    """Scores of the neighbouring-dataset trials on the histogram and the prototypes."""

    included: np.ndarray
    histogram_scores: np.ndarray
    prototype_scores: np.ndarray
    canary_label: int


def _clipped(x: np.ndarray, clip: float) -> np.ndarray:
    flat = x.reshape(len(x), -1).astype(np.float64)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    out: np.ndarray = flat * np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    return out


def run_release_trials(
    shipped: nn.Module, data: Dataset, rd: RDConfig, *, trials: int,
    implementation: LyingDevice, rng: np.random.Generator,
) -> ReleaseTrials:
    """Run the device's histogram/prototype release ``trials`` times on ``data`` with or without
    one canary record (a fair coin each), as the cloud decodes it.

    The canary is a sparse binary image (norm above the policy's prototype clip, so it moves its
    class sum by the full sensitivity) with a random label ``c``. Scores (higher = canary in),
    from an adversary who knows ``data``: the released count of ``c`` minus its true count; and
    the released sum of class ``c`` (prototype times released count) minus the true clipped sum,
    projected on the canary's clipped direction.
    """
    from diredi_secure.knowledge import PayloadKind, decode_payload, encode_payload
    from diredi_secure.ml.data import NUM_CLASSES, Dataset
    from diredi_secure.ml.reverse import extract_payload

    clip = rd.policy.prototype_clip
    shape = data.x.shape[1:]
    size = int(np.prod(shape))
    x_c = np.zeros(size, np.float32)
    x_c[rng.choice(size, size=min(size, 20), replace=False)] = 1.0
    label = int(rng.integers(0, NUM_CLASSES))
    canary_set = Dataset(x_c.reshape(1, *shape), np.array([label]))
    u = _clipped(x_c[None], clip)[0]
    u = u / max(float(np.linalg.norm(u)), 1e-12)
    count_d = float(np.sum(data.y == label))
    sum_d = _clipped(data.x[data.y == label], clip).sum(axis=0) @ u
    schedule = rd.schedule() if rd.private else None
    # Release what the configuration releases: the histogram alone, or the prototypes with the
    # histogram they are divided by (a histogram-only packet crashed the release gate here).
    with_protos = PayloadKind.DP_PROTOTYPES in rd.kinds
    cfg = replace(rd, kinds=(PayloadKind.DP_PROTOTYPES,) if with_protos
                  else (PayloadKind.LABEL_HISTOGRAM,))
    included = canary.sample_inclusion(trials, rng)
    hist = np.empty(trials)
    proto = np.empty(trials)
    with_canary = Dataset.concat([data, canary_set])
    for i, inc in enumerate(included):
        d = with_canary if inc else data
        payload = extract_payload(shipped, shipped, d, np.zeros((0, *shape), np.float32), cfg,
                                  schedule=schedule, noise=device_noise(implementation))
        seen = decode_payload(*encode_payload(payload))
        h = seen.get(PayloadKind.LABEL_HISTOGRAM)
        p = seen.get(PayloadKind.DP_PROTOTYPES)
        if h is None or (with_protos and p is None):
            raise ConfigError("the release trials' payload lacks the histogram or the prototypes "
                              f"(kinds {[k.value for k in cfg.kinds]})")
        released_count = float(h.values[label])
        hist[i] = released_count - count_d
        proto[i] = (float(p.values[label].astype(np.float64) @ u) * max(released_count, 1.0)
                    - sum_d) if p is not None else float("nan")
    return ReleaseTrials(included, hist, proto, label)


def detection_ceiling(included: np.ndarray, *, delta: float, canary_confidence: float,
                      roc_confidence: float) -> float:
    """The largest epsilon the audit's tests can prove with these inclusion bits: the one-run bound
    and the ROC test of a *perfect* attack (scores equal to the bits) at the audit's confidences."""
    perfect = np.asarray(included, dtype=np.float64)
    one_run = canary.audit_canary_scores(perfect, included, delta=delta,
                                         confidence=canary_confidence).epsilon_lower_bound
    roc = metrics.dp_consistency(metrics.roc_curve(perfect, included), epsilon=0.0, delta=delta,
                                 confidence=roc_confidence).empirical_epsilon
    return max(one_run, roc)


@dataclass(frozen=True)
class MechanismAudit:
    """The verdict on one mechanism: its claimed epsilon against what its attacks prove."""

    mechanism: str
    claimed_epsilon: float
    delta: float
    ceiling: float
    eps_lower_bound: float
    roc_epsilon: float
    attacks: tuple[str, ...]
    verdict: MechanismVerdict
    detail: str
    covers: tuple[str, ...] = ()
    """The mechanisms whose composed epsilon ``claimed_epsilon`` is (what the attacked output
    depends on); empty means this mechanism alone."""

    def line(self) -> str:
        return (f"{self.mechanism}: verdict={self.verdict} claimed_eps={self.claimed_epsilon:.4g} "
                f"eps_lb={self.eps_lower_bound:.3f} roc_eps={self.roc_epsilon:.3f} "
                f"ceiling={self.ceiling:.3f}")

    def to_json(self) -> dict[str, object]:
        return {"mechanism": self.mechanism, "claimed_epsilon": self.claimed_epsilon,
                "delta": self.delta, "ceiling": self.ceiling,
                "eps_lower_bound": self.eps_lower_bound, "roc_epsilon": self.roc_epsilon,
                "attacks": list(self.attacks), "verdict": self.verdict, "detail": self.detail,
                "claim_covers": list(self.covers or (self.mechanism,))}


def judge_mechanism(
    mechanism: str, *, claimed_epsilon: float, delta: float, ceiling: float,
    eps_lower_bound: float, consistency: tuple[tuple[str, metrics.DPConsistency | None], ...],
    extra_failure: str | None = None, covers: tuple[str, ...] = (),
) -> MechanismAudit:
    """``fail`` if the one-run bound exceeds the claim, some ROC curve is inconsistent with it (or
    was not tested) or ``extra_failure`` says why; else ``inconclusive`` if the claim is at or above
    the ceiling (no attack could have failed it); else ``pass``."""
    roc_eps = max((c.empirical_epsilon for _, c in consistency if c is not None), default=0.0)
    reasons: list[str] = []
    if eps_lower_bound > claimed_epsilon:
        reasons.append(f"one-run bound {eps_lower_bound:.3f} > claimed {claimed_epsilon:.4g}")
    untested = [n for n, c in consistency if c is None]
    if not consistency or (untested and math.isfinite(claimed_epsilon)):
        reasons.append("no ROC test" if not consistency else "untested: " + ", ".join(untested))
    bad = [n for n, c in consistency if c is not None and not c.consistent]
    if bad:
        reasons.append(f"ROC above the ({claimed_epsilon:.4g}, delta) line: " + ", ".join(bad))
    if extra_failure:
        reasons.append(extra_failure)
    verdict: MechanismVerdict
    if reasons:
        verdict, detail = "fail", "; ".join(reasons)
    elif not claimed_epsilon < ceiling:
        verdict = "inconclusive"
        detail = (f"claimed {claimed_epsilon:.4g} is at or above the ceiling {ceiling:.3f}: no "
                  "attack with this many canaries could show a violation")
    else:
        verdict, detail = "pass", f"bounds below the claim {claimed_epsilon:.4g}"
    return MechanismAudit(mechanism, claimed_epsilon, delta, ceiling, eps_lower_bound, roc_eps,
                          tuple(n for n, _ in consistency), verdict, detail, covers)


@dataclass(frozen=True)
class NoiseFloor:
    """DP-SGD's noise floor: how much runs of the device's implementation on the same data vary,
    against the auditor's honest reference runs (mean per-coordinate variance of the weight
    delta). ``ok`` is False when the device's runs vary less than ``threshold`` times as much."""

    device_variance: float
    reference_variance: float
    threshold: float

    @property
    def ratio(self) -> float:
        return self.device_variance / self.reference_variance if self.reference_variance > 0 \
            else math.inf

    @property
    def ok(self) -> bool:
        return self.ratio >= self.threshold

    def to_json(self) -> dict[str, object]:
        return {"device_variance": self.device_variance,
                "reference_variance": self.reference_variance, "ratio": self.ratio,
                "threshold": self.threshold, "ok": self.ok}


def noise_floor(device: list[np.ndarray], reference: list[np.ndarray], *,
                threshold: float = NOISE_FLOOR_RATIO) -> NoiseFloor:
    """Compare the spread of two sets of (>= 2) flat weight deltas of runs on the same data."""
    dv = float(np.mean(np.var(np.stack(device), axis=0, ddof=1)))
    rv = float(np.mean(np.var(np.stack(reference), axis=0, ddof=1)))
    return NoiseFloor(dv, rv, threshold)

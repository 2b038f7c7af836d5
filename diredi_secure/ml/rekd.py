"""Re-KD: a new edge model distilled from the updated teacher, per user or for the whole fleet.

Per-user: every transfer sample is weighted by ``(1 - beta) + beta * C * h[c]`` where ``c`` is the
teacher's predicted class and ``h`` the user's *noised* class shares (from their DP histogram), so
the student's small capacity goes to what the user needs and knowledge they never use gives way
("initial redundant knowledge is reduced", Sun et al. 2024). The user's own domain inputs (derived
from their DP prototypes) are added to the transfer set; with the user's estimated sensor kernel
(``MergeResult.sensor_kernels``), so are the labelled presumed images and the transfer inputs
rendered through it. Fleet: uniform weights over everything.

Two per-user corrections of the teacher's targets (ours, round 6 of docs/METHOD.md), both
post-processing of what the user's device already released:

* **Label-shift prior** on the classes the manufacturer's presumed data lacks: the teacher's logits
  for a new class ``c`` get ``prior_weight * log((h[c] + prior_floor) / (max_new h + prior_floor))``
  (at most 0): the Bayes correction for a user whose class prior differs from the training mix,
  restricted to new classes so that no presumed class is ever pushed down (the presumed-accuracy
  promise). A user who reports no 9s gets a model that needs more evidence to say 9.
* **Own claims**: on transfer rows where the user's own adapted model confidently names a new class
  it has data of (``MergeResult.own_claims``), and the merged teacher puts at most
  ``own_claim_known_limit`` of its mass on presumed classes, that class is raised to
  ``own_claim_margin`` above the teacher's top logit. The merged teacher sums every device; where
  two devices each know only their own new class (A: 7 and 8, B: 9), B's model calls A's 7s a
  confident 9 and the sum can side with B: in A's own model, A's evidence wins. Only the user's own
  claims move only the user's own model, so a poisoner's claims reach no one else through this.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from ..errors import ConfigError
from .data import NUM_CLASSES, Dataset
from .distill import KDConfig, kd_train
from .evaluate import predict_logits
from .models import ModelSpec, build_model
from .sensor import render

__all__ = [
    "ReKDConfig",
    "UserReKD",
    "UserReKDShared",
    "apply_own_claims",
    "combine_own_claims",
    "new_class_prior",
    "rekd_student",
    "rekd_user_task",
    "rekd_weights",
    "user_transfer_rows",
    "user_weights",
]


@dataclass(frozen=True)
class ReKDConfig:
    """``beta`` in [0, 1] is how far samples are re-weighted toward the user's histogram.

    ``presumed_floor``: the manufacturer's labelled presumed samples weigh at least this much
    (before normalisation; 1 is their fleet weight), so a per-user model keeps covering the
    presumed classes whatever the user's histogram says: only the transfer inputs follow it.
    """

    beta: float = 0.8
    kd: KDConfig = field(default_factory=KDConfig)
    # 5 chosen on validation with the round-6 corrections below (docs/METHOD.md; 3 in round 5, 1
    # before).
    presumed_floor: float = 5.0
    # Weight of the images rendered through the user's sensor kernel (``domain_kernel``), relative
    # to the user's weight of the same image undistorted.
    domain_weight: float = 1.0
    # Render the transfer inputs through the kernel too, not only the presumed images: without
    # them the user's own domain holds no example of the classes the presumed data lacks, and the
    # shifted user C scored 0.00 on 7, 8 and 9 (round 5).
    domain_transfer: bool = True
    # Label-shift prior on the new classes (module docstring); 0 turns it off.
    prior_weight: float = 1.0
    prior_floor: float = 0.02
    # Own claims (module docstring); None turns them off.
    own_claim_margin: float | None = 4.0
    own_claim_known_limit: float = 0.5
    # A per-user model learns from at most this many transfer rows: the reference set and the
    # user's own rows always, then a seeded sample of the other users' rows (None: all of them).
    # The fleet's transfer set grows with the number of devices; without a cap each per-user
    # re-KD costs O(N) and the release O(N^2) (docs/FLEET.md). The fleet model uses every row.
    max_transfer_rows: int | None = None

    def __post_init__(self) -> None:
        if self.prior_weight < 0 or self.prior_floor <= 0:
            raise ConfigError("prior_weight must be >= 0 and prior_floor > 0")
        if self.own_claim_margin is not None and self.own_claim_margin < 0:
            raise ConfigError(f"own_claim_margin must be >= 0, got {self.own_claim_margin}")
        if not 0.0 <= self.own_claim_known_limit <= 1.0:
            raise ConfigError("own_claim_known_limit must lie in [0, 1]")
        if self.domain_weight < 0:
            raise ConfigError(f"domain_weight must be >= 0, got {self.domain_weight}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta must lie in [0, 1], got {self.beta}")
        if self.presumed_floor < 0:
            raise ConfigError(f"presumed_floor must be >= 0, got {self.presumed_floor}")
        if self.max_transfer_rows is not None and self.max_transfer_rows < 1:
            raise ConfigError(f"max_transfer_rows must be >= 1, got {self.max_transfer_rows}")


def user_weights(teacher_logits: np.ndarray, support: np.ndarray, beta: float) -> np.ndarray:
    """Per-sample weights toward ``support`` (class shares, sums to 1) by predicted class."""
    pred = teacher_logits.argmax(1)
    s = np.clip(np.asarray(support, np.float64), 0.0, None)
    s = s / s.sum() if s.sum() > 0 else np.full(NUM_CLASSES, 1.0 / NUM_CLASSES)
    out: np.ndarray = ((1.0 - beta) + beta * NUM_CLASSES * s[pred]).astype(np.float32)
    return out


def rekd_weights(
    teacher_logits: np.ndarray, n_presumed: int, support: np.ndarray, config: ReKDConfig
) -> np.ndarray:
    """Per-user sample weights: the first ``n_presumed`` rows (labelled presumed data) are floored
    at ``config.presumed_floor``; the rest follow :func:`user_weights`."""
    w = user_weights(teacher_logits, support, config.beta)
    w[:n_presumed] = np.maximum(w[:n_presumed], config.presumed_floor)
    return w


def fleet_weights(n_presumed: int, n_transfer: int, presumed_share: float | None) -> np.ndarray:
    """Sample weights of the fleet model (no user's support): 1 on every row, except that the
    first ``n_presumed`` rows (the labelled presumed data) are raised so that together they
    carry at least ``presumed_share`` of the total weight (``None``: uniform).

    Uniform weights let the presumed rows' share fall as the transfer set grows with the fleet
    (every contributing device adds its rows): about 11% at N = 200 and next to nothing at
    N = 10,000, and the fleet model then lost enough presumed accuracy for the release's presumed
    guard to hold it back in every round after the first (issue 17 fleet runs: it froze at
    round 1's model while the teacher improved). Never lowered below 1: with fewer transfer
    rows than that share implies, the weights stay uniform."""
    if presumed_share is not None and not 0.0 < presumed_share < 1.0:
        raise ConfigError(f"presumed_share must lie in (0, 1) (or None), got {presumed_share}")
    w = np.ones(n_presumed + n_transfer, np.float32)
    if presumed_share is not None and n_presumed and n_transfer:
        raise_to = presumed_share / (1.0 - presumed_share) * n_transfer / n_presumed
        w[:n_presumed] = max(1.0, raise_to)
    return w


def new_class_prior(support: np.ndarray, known: np.ndarray, config: ReKDConfig) -> np.ndarray:
    """Per-class logit offsets (all <= 0, 0 on ``known`` classes): the label-shift prior."""
    s = np.clip(np.asarray(support, np.float64), 0.0, None)
    s = s / s.sum() if s.sum() > 0 else np.full(NUM_CLASSES, 1.0 / NUM_CLASSES)
    new = np.ones(NUM_CLASSES, bool)
    new[np.asarray(known, np.int64)] = False
    out = np.zeros(NUM_CLASSES)
    if new.any() and config.prior_weight > 0:
        f = config.prior_floor
        out[new] = config.prior_weight * np.log((s[new] + f) / (s[new].max() + f))
    return out


def apply_own_claims(
    z: np.ndarray, claims: np.ndarray, known: np.ndarray, config: ReKDConfig
) -> np.ndarray:
    """``z`` (teacher logits, one row per claim entry) with each claimed class raised to
    ``own_claim_margin`` above the row's top logit, where the row's softmax puts at most
    ``own_claim_known_limit`` on the ``known`` classes (the manufacturer's presumed classes)."""
    out = np.array(z, np.float32, copy=True)
    if config.own_claim_margin is None:
        return out
    c = np.asarray(claims, np.int64)
    if c.shape != (len(out),):
        raise ConfigError(f"own_claims must have one entry per transfer row ({len(out)})")
    if np.any(c >= NUM_CLASSES):
        raise ConfigError("own_claims names a class past the model's outputs")
    e = np.exp(out - out.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    known_mass = p[:, np.asarray(known, np.int64)].sum(1)
    rows = np.flatnonzero((c >= 0) & (known_mass <= config.own_claim_known_limit))
    raised = out[rows].max(1) + config.own_claim_margin
    out[rows, c[rows]] = np.maximum(out[rows, c[rows]], raised)
    return out


def rekd_student(
    teacher: nn.Module,
    spec: ModelSpec,
    presumed: Dataset,
    transfer_x: np.ndarray,
    config: ReKDConfig,
    *,
    seed: int,
    support: np.ndarray | None = None,
    domain_kernel: np.ndarray | None = None,
    own_claims: np.ndarray | None = None,
    presumed_share: float | None = None,
) -> nn.Module:
    """Distil a fresh ``spec`` student from ``teacher`` on presumed data + ``transfer_x``.

    With ``support`` (the user's noised class shares) samples are weighted toward that user; without
    it this is the fleet model, whose presumed rows carry at least ``presumed_share`` of the weight
    (:func:`fleet_weights`; ``None``: uniform, as the loop's generic re-KD).
    ``domain_kernel`` (``MergeResult.sensor_kernels[user]``) adds the labelled presumed images and
    (``config.domain_transfer``) the transfer inputs rendered through the user's estimated sensor,
    with the teacher's logits on the clean image as targets: inputs in the user's own domain.
    With ``support``, the targets carry the user's new-class prior (:func:`new_class_prior`) and,
    with ``own_claims`` (``MergeResult.own_claims[user]``, one entry per ``transfer_x`` row), the
    user's own claims (:func:`apply_own_claims`).
    """
    n_p = len(presumed)
    x = np.concatenate([presumed.x, transfer_x.astype(np.float32)])
    y = np.concatenate([presumed.y, -np.ones(len(transfer_x), np.int64)])
    z = predict_logits(teacher, x)
    if support is not None:
        known = np.unique(presumed.y)
        z = z + new_class_prior(support, known, config)[None, :].astype(np.float32)
        if own_claims is not None:
            z[n_p:] = apply_own_claims(z[n_p:], own_claims, known, config)
    w = (fleet_weights(n_p, len(transfer_x), presumed_share) if support is None
         else rekd_weights(z, n_p, support, config))
    if domain_kernel is not None and n_p:
        n = len(x) if config.domain_transfer else n_p  # the presumed rows come first
        x = np.concatenate([x, render(x[:n], domain_kernel)])
        y = np.concatenate([y, y[:n]])
        z = np.concatenate([z, z[:n]])
        w = np.concatenate([w, w[:n] * config.domain_weight])
    student = build_model(spec, seed=seed)
    return kd_train(student, x, y, z, config.kd, seed=seed, sample_weights=w)


def user_transfer_rows(
    n_rows: int, n_ref: int, own: Sequence[tuple[int, int]], cap: int | None, *, seed: int
) -> np.ndarray:
    """The transfer rows one user's re-KD learns from (sorted): all of them without ``cap``; else
    the ``n_ref`` reference rows, the user's own ``[start, stop)`` ranges, and a sample (seeded) of
    the other rows until ``cap`` rows are chosen (the reference and own rows are never dropped)."""
    if cap is None or n_rows <= cap:
        return np.arange(n_rows)
    keep = np.zeros(n_rows, bool)
    keep[:n_ref] = True
    for start, stop in own:
        keep[start:stop] = True
    others = np.flatnonzero(~keep)
    room = max(cap - int(keep.sum()), 0)
    if room and others.size:
        pick = np.random.default_rng(seed).choice(others.size, min(room, others.size), replace=False)
        keep[others[pick]] = True
    return np.flatnonzero(keep)


@dataclass(frozen=True)
class UserReKDShared:
    """What every per-user re-KD task of a release shares (models as safetensors bytes)."""

    teacher: bytes
    spec: ModelSpec
    presumed: Dataset
    transfer_x: np.ndarray
    n_ref: int
    config: ReKDConfig
    seed: int


@dataclass(frozen=True)
class UserReKD:
    """One user's inputs to re-KD: noised class shares, sensor kernel, own claims (sparse, global
    transfer rows; later parts win where two packets claim one row) and own transfer rows."""

    device_id: str
    support: np.ndarray
    kernel: np.ndarray | None = None
    claims: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
    own_rows: tuple[tuple[int, int], ...] = ()
    has_claims: bool = False


def combine_own_claims(parts: Sequence[tuple[np.ndarray, np.ndarray]], rows: int) -> np.ndarray:
    """One device's own claims over ``rows`` transfer rows from its packets' sparse claims
    ``(rows, classes)`` (global rows); -1 where it claims nothing. Two packets of one device in one
    merge group share the reference rows: every claim is kept, later parts win where both claim."""
    out = np.full(rows, -1, np.int64)
    for r, c in parts:
        out[np.asarray(r, np.int64)] = np.asarray(c, np.int64)
    return out


def rekd_user_task(shared: UserReKDShared, user: UserReKD) -> bytes:
    """A per-user model (safetensors bytes): an executor task over :func:`rekd_student`."""
    from .models import load_model_bytes, model_bytes

    teacher, _, _ = load_model_bytes(shared.teacher)
    n = len(shared.transfer_x)
    # Each user's sample of other rows differs (and is fixed by the release seed and its id).
    seed = shared.seed + int.from_bytes(hashlib.sha256(user.device_id.encode()).digest()[:4], "big")
    rows = user_transfer_rows(n, shared.n_ref, user.own_rows, shared.config.max_transfer_rows,
                              seed=seed)
    own_claims = combine_own_claims(user.claims, n)[rows] if user.has_claims else None
    model = rekd_student(teacher, shared.spec, shared.presumed, shared.transfer_x[rows],
                         shared.config, seed=shared.seed, support=user.support,
                         domain_kernel=user.kernel, own_claims=own_claims)
    return model_bytes(model, shared.spec)

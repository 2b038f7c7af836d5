"""Cloud merge: aggregate device knowledge without voting minorities away, then distil it up.

Aggregation (ours; the paper gives none). Averaging, the median and the trimmed mean across devices
all erased classes that only one device knew (METHOD-NOTES.md), so devices are *summed*, each with
bounded influence:

1. **Clip** each device's logit-difference matrix: every row to L2 ``row_clip``, then the whole
   matrix to Frobenius norm ``device_clip * sqrt(rows)``. An oversized device is scaled down, never
   allowed to dominate.
2. **Support weighting**: a device's positive logit changes for class c are scaled by
   ``min(1, support_c / support_threshold)``, where ``support_c`` is its noised label-histogram share
   (uniform when it sent no histogram). A device may only push up classes it declares data for.
3. **Outlier score**: the share of a device's positive change that lies on classes outside its
   declared support. Above ``off_support_tolerance`` its whole weight ramps down to 0.
4. Sum the bounded contributions on top of the teacher's own logits (temperature 1).

Each device's difference is taken between floored log-probabilities of its adapted and the shipped
model (:func:`difference_space`), so it says which class the device moved toward, not how far a
class it never saw climbed; rows derived from one device's packet take only that device's
difference (``owner_rows_only``).

Transfer inputs: the public reference set, plus inputs derived from each device's
``dp_prototypes`` (noised class means in the user's own domain, jittered), plus -- when a device
sent a ``weight_delta`` -- inputs synthesised from its adapted model (data-free: gradient ascent on
the adapted model's class score, starting from the prototypes). The last two carry domains the
reference set does not cover. Both are post-processing of DP outputs: no extra privacy cost.

Reverse distillation into the teacher: fine-tune it on presumed data (cross entropy, keeps old
knowledge) plus KL toward the merged targets on the transfer inputs.

Each device's sensor kernel (``sensor.py``: a small convolution fitted to its DP prototypes) is
estimated here and returned for per-user re-KD, which renders presumed images through it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, PayloadInvalid
from ..knowledge import KnowledgePayload, PayloadKind, PayloadTensor
from .data import NUM_CLASSES, Dataset
from .evaluate import predict_logits
from .models import flat_parameters, set_flat_parameters
from .payload_fit import ModelShapes, check_entries_fit
from .sensor import estimate_sensor_kernel

if TYPE_CHECKING:
    from .executor import JobExecutor

# RDConfig's default prototype clip norm, used when the caller does not pass the policy's.
DEFAULT_PROTOTYPE_CLIP = 3.5

__all__ = [
    "DeviceKnowledge",
    "MergeConfig",
    "MergeGroup",
    "MergeResult",
    "aggregate_differences",
    "anchor_relief",
    "anchor_scale",
    "apply_claim_quorum",
    "device_support",
    "difference_space",
    "merge_groups_streamed",
    "merge_into_teacher",
    "merge_streamed",
    "owner_rows_only",
    "public_flip_scale",
    "relief_claims",
    "transfer_inputs",
]


@dataclass(frozen=True)
class DeviceKnowledge:
    """One accepted packet's payload, by device."""

    device_id: str
    payload: KnowledgePayload


@dataclass(frozen=True)
class MergeConfig:
    """Merge settings; defaults calibrated on the digits scenario's validation splits."""

    row_clip: float = 40.0
    device_clip: float = 30.0
    logit_floor_gap: float = 8.0
    # Devices' differences between log-probabilities floored at -difference_floor
    # (:func:`difference_space`); None: raw logit differences (the rule before round 5, kept to
    # compare). 16 chosen on validation (docs/METHOD.md, round 5).
    difference_floor: float | None = 16.0
    gate_rows: bool = True
    support_threshold: float = 0.05
    off_support_tolerance: float = 0.25
    min_class_count: float = 3.0
    use_prototypes: bool = True
    synthesize: bool = True
    transfer_mode: Literal["both", "prototypes", "synthesis"] = "both"
    max_prototype_noise: float | None = None
    anchor_quantiles: tuple[float, float] | None = (0.0, 0.15)
    presumed_kd_weight: float = 1.0
    # Sensor kernel per device from its DP prototypes (``sensor.py``), kept when its
    # leave-one-class-out residual is below ``sensor_gate`` x the identity's; None: never fit.
    sensor_gate: float | None = 0.7
    sensor_kernel_size: int = 5
    # A kernel fitted on fewer presumed classes is dropped: its leave-one-class-out check has too
    # few folds to tell a sensor from the sampling noise of a few small class means (round 5:
    # seed 0, user A passed the gate on 4 classes with a wrong kernel).
    sensor_min_classes: int = 5
    # Per-device anchor relief: a transfer row takes the full merged change, whatever the anchor
    # says, when some device with merge weight > 0 has its adapted model (shipped + weight delta)
    # put at least this softmax mass on one class it supports (noised share >= support_threshold)
    # that the presumed data lacks (:func:`anchor_relief`). None: off. 0.7 chosen on validation
    # (docs/METHOD.md, round 4).
    anchor_relax_confidence: float | None = 0.7
    # Weight of a cross-entropy term toward the relieving device's class on rows it claims
    # (:func:`relief_claims`) that carry no other label: 0 turns it off.
    relief_hard_weight: float = 1.0
    # Rows derived from one device's packet (its prototypes, their synthesised neighbours) take
    # only that device's difference: the others' models never saw that domain (round 5).
    owner_rows_only: bool = True
    # A device's claims (:func:`relief_claims`) of one class on the public reference rows count
    # only up to this share of those rows, its most confident first; None: no cap. The reference
    # set covers every class about evenly (a tenth each on digits), so an honest device claims
    # well under a quarter of it (12-23% measured); a poisoner whose model calls everything its
    # declared class claims all of it (round 5: with no cap one such device took the merged
    # teacher's presumed accuracy from 0.98 to 0.50-0.63).
    max_claim_share: float | None = 0.25
    # A claim on a public reference row holds only where its claimants carry at least this share
    # of the support for the claimed class: the sum of the claimants' noised shares of it against
    # the sum over every device that could claim it (merge weight > 0, a weight delta, share >=
    # support_threshold). None: any one device's claim holds. Each device's model is wrong
    # somewhere and a fleet's claims are the union of its devices': at N = 40, 53 of 210
    # presumed-class reference rows were claimed (all wrongly) for a new class and hard-labelled
    # so (issue 17). It holds only for classes more than ``public_devices`` devices' worth could
    # claim (their shares summed over the largest; with ``public_devices`` None, always): a small
    # fleet's claims, and the digits loop's three users', all stand as before. The devices' own
    # rows are claimed by their owner alone (``owner_rows_only``), quorum or not. 1/3 chosen on validation (docs/METHOD.md,
    # the fleet paragraph).
    claim_quorum: float | None = 1 / 3
    # On a public reference row, the devices that moved it to class c count at most this many
    # devices' worth: their summed bounded differences are scaled by min(1, public_devices / n_c),
    # n_c the effective number of devices that could move a row to c (merge weight > 0, share >=
    # support_threshold: the sum of their noised shares of c over the largest). None: the plain
    # sum. Why: the anchor lets the merge change the rows the teacher is least sure of
    # (``anchor_quantiles``), presumed-class rows among them; one device's bounded move there is
    # what the digits loop was tuned with, the sum of forty is not (at N = 40, 24 of 210
    # presumed-class reference rows got a wrong target, issue 17). With n_c <= 3 (the digits loop)
    # nothing changes. 3 chosen on validation (docs/METHOD.md, the fleet paragraph).
    public_devices: float | None = 3.0
    # Each device's own claims (:func:`relief_claims` with that device alone, same confidence, owner
    # rule and cap) are returned in ``MergeResult.own_claims`` for its per-user re-KD
    # (``ReKDConfig.own_claim_margin``); None: none are computed (round 6).
    own_claim_confidence: float | None = 0.7
    jitter_per_class: int = 24
    jitter_std: float = 0.08
    synth_steps: int = 20
    synth_lr: float = 0.05
    kd_temperature: float = 1.0
    # Weight of the transfer terms (KL to the merged targets, CE on labelled rows) against CE + KD
    # on presumed data; 2 chosen on validation (docs/METHOD.md, round 5; was 1).
    transfer_weight: float = 2.0
    epochs: int = 25
    lr: float = 0.002
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.row_clip <= 0 or self.device_clip <= 0 or self.kd_temperature <= 0:
            raise ConfigError("clip norms and temperature must be > 0")
        if not (0 <= self.off_support_tolerance < 1) or self.support_threshold <= 0:
            raise ConfigError("off_support_tolerance must lie in [0, 1), support_threshold > 0")
        if self.epochs < 0 or self.lr <= 0 or self.batch_size <= 0 or self.jitter_per_class < 0:
            raise ConfigError("invalid training settings in the merge config")
        if self.transfer_mode not in ("both", "prototypes", "synthesis"):
            raise ConfigError(f"transfer_mode must be both/prototypes/synthesis, got {self.transfer_mode!r}")
        if self.max_prototype_noise is not None and self.max_prototype_noise <= 0:
            raise ConfigError("max_prototype_noise must be > 0")
        if self.anchor_quantiles is not None:
            lo, hi = self.anchor_quantiles
            if not 0.0 <= lo < hi <= 1.0:
                raise ConfigError(f"anchor_quantiles must satisfy 0 <= lo < hi <= 1, got {self.anchor_quantiles}")
        if self.presumed_kd_weight < 0:
            raise ConfigError("presumed_kd_weight must be >= 0")
        if self.difference_floor is not None and self.difference_floor <= 0:
            raise ConfigError("difference_floor must be > 0 (or None)")
        if self.sensor_min_classes < 0:
            raise ConfigError("sensor_min_classes must be >= 0")
        if self.max_claim_share is not None and not 0 < self.max_claim_share <= 1:
            raise ConfigError("max_claim_share must lie in (0, 1] (or None)")
        if self.claim_quorum is not None and not 0 < self.claim_quorum <= 1:
            raise ConfigError("claim_quorum must lie in (0, 1] (or None)")
        if self.public_devices is not None and not self.public_devices >= 1:
            raise ConfigError("public_devices must be >= 1 (or None)")
        if self.relief_hard_weight < 0:
            raise ConfigError("relief_hard_weight must be >= 0")
        if self.sensor_gate is not None and self.sensor_gate <= 0:
            raise ConfigError("sensor_gate must be > 0 (or None)")
        if self.anchor_relax_confidence is not None and not 0 < self.anchor_relax_confidence <= 1:
            raise ConfigError("anchor_relax_confidence must lie in (0, 1]")
        if self.own_claim_confidence is not None and not 0 < self.own_claim_confidence <= 1:
            raise ConfigError("own_claim_confidence must lie in (0, 1] (or None)")
        if self.sensor_kernel_size < 1 or self.sensor_kernel_size % 2 == 0:
            raise ConfigError("sensor_kernel_size must be odd and >= 1")


@dataclass(frozen=True)
class MergeResult:
    """The updated teacher and what the merge decided per device."""

    teacher: nn.Module
    transfer_x: np.ndarray
    weights: dict[str, float]
    off_support: dict[str, float]
    supports: dict[str, np.ndarray] = field(default_factory=dict)
    # Which device's packet each transfer row came from (its id), "" for the public reference set:
    # per-user re-KD can give a device's own-domain rows more weight or its adapted model's logits.
    transfer_owner: tuple[str, ...] = ()
    # Each device's estimated sensor kernel (only devices whose fit passed the gate): per-user
    # re-KD renders the presumed images through it (``rekd_student(domain_kernel=...)``).
    sensor_kernels: dict[str, np.ndarray] = field(default_factory=dict)
    # Per device, per transfer row: the new class its own adapted model claims there (-1: none;
    # ``MergeConfig.own_claim_confidence``). Per-user re-KD lets a user's own claims win over the
    # merged teacher in that user's model only (``rekd_student(own_claims=...)``).
    own_claims: dict[str, np.ndarray] = field(default_factory=dict)
    # Per device: the [start, stop) of the transfer rows derived from its packet (contiguous).
    owner_rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    # The streamed merge's own claims, sparse: (rows, classes) per device, the rows where
    # ``own_claims`` would be >= 0 (a dense row per device does not fit a fleet's transfer set).
    own_claim_rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def own_claims_of(self, device_id: str) -> np.ndarray | None:
        """The device's dense own claims (one entry per transfer row), from either form."""
        if device_id in self.own_claims:
            return self.own_claims[device_id]
        sparse = self.own_claim_rows.get(device_id)
        if sparse is None:
            return None
        out = np.full(len(self.transfer_x), -1, np.int64)
        out[sparse[0]] = sparse[1]
        return out


def device_support(payload: KnowledgePayload) -> np.ndarray:
    """The device's class shares from its noised histogram (uniform if it sent none)."""
    hist = payload.get(PayloadKind.LABEL_HISTOGRAM)
    if hist is None:
        return np.full(NUM_CLASSES, 1.0 / NUM_CLASSES)
    counts = np.clip(hist.values.astype(np.float64).reshape(-1), 0.0, None)
    if counts.shape != (NUM_CLASSES,):
        raise PayloadInvalid(f"label_histogram must have {NUM_CLASSES} values")
    total = counts.sum()
    return counts / total if total > 0 else np.full(NUM_CLASSES, 1.0 / NUM_CLASSES)


def _dense_reference_diff(payload: KnowledgePayload, n_ref: int) -> np.ndarray | None:
    entry = payload.get(PayloadKind.REFERENCE_LOGITS)
    if entry is None:
        return None
    values = entry.values.astype(np.float64)
    if values.ndim != 2 or values.shape[1] != NUM_CLASSES:
        raise PayloadInvalid(f"reference_logits must be [M, {NUM_CLASSES}], got {values.shape}")
    if entry.index is None:
        if values.shape[0] != n_ref:
            raise PayloadInvalid(f"reference_logits has {values.shape[0]} rows, reference has {n_ref}")
        return values
    if entry.index.size and int(entry.index.max()) >= n_ref:
        raise PayloadInvalid("reference_logits index points past the reference set")
    dense = np.zeros((n_ref, NUM_CLASSES))
    dense[entry.index] = values
    return dense


def check_payload_fits(
    payload: KnowledgePayload, shipped: nn.Module, n_ref: int, *,
    image_shape: tuple[int, ...] = (1, 8, 8),
) -> None:
    """Raise :class:`PayloadInvalid` unless every entry fits the model it claims to update and
    its reference set (what :func:`merge_into_teacher` will index with) of ``image_shape`` images.
    Shapes only: the rule is :func:`~.payload_fit.check_entries_fit`, which ingest applies too
    (with the shapes from the release's headers, without torch)."""
    check_entries_fit(payload, ModelShapes(parameters=int(flat_parameters(shipped).size),
                                           reference_rows=n_ref, image_shape=tuple(image_shape)))


def adapted_model(shipped: nn.Module, payload: KnowledgePayload) -> nn.Module | None:
    """``shipped + weight_delta`` when the device sent a weight delta (post-processing)."""
    entry = payload.get(PayloadKind.WEIGHT_DELTA)
    if entry is None:
        return None
    base = flat_parameters(shipped)
    delta = np.zeros_like(base)
    if entry.index is None:
        if entry.values.size != base.size:
            raise PayloadInvalid(f"weight_delta has {entry.values.size} values, model {base.size}")
        delta = entry.values.reshape(-1).astype(np.float32)
    else:
        if entry.index.size and int(entry.index.max()) >= base.size:
            raise PayloadInvalid("weight_delta index points past the model's parameters")
        delta[entry.index] = entry.values.reshape(-1)
    model = copy.deepcopy(shipped)
    set_flat_parameters(model, base + delta)
    return model.eval()


def bound_difference(
    diff: np.ndarray, support: np.ndarray, config: MergeConfig, z_shipped: np.ndarray | None = None,
    *, rows: int | None = None,
) -> tuple[np.ndarray, float, float]:
    """Clip one device's difference, scale by support; returns (bounded, weight, off_support).

    With ``z_shipped`` (the cloud shipped that model, so it knows its scores; in the same space as
    ``diff``, :func:`difference_space`) a row counts only where the adapted model changed its
    decision to a class the device supports: elsewhere the difference is DP noise or a global bias
    shift that would spill onto other users' inputs.

    ``rows``: the row count of the whole matrix when ``diff`` holds only the rows where it can be
    non-zero (the streamed merge): the Frobenius limit ``device_clip * sqrt(rows)`` is the same as
    for the full matrix, and zero rows change nothing else.
    """
    bounded, weight, off_share, _ = _bound(diff, support, config, z_shipped, rows=rows)
    return bounded, weight, off_share


def _bound(
    diff: np.ndarray, support: np.ndarray, config: MergeConfig, z_shipped: np.ndarray | None,
    *, rows: int | None = None,
) -> tuple[np.ndarray, float, float, np.ndarray]:
    """:func:`bound_difference` plus, per row, the class the device's decision moved to where the
    row gate let it through (``-1``: no gate, the whole row counts as it is)."""
    d = np.nan_to_num(diff.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(d, axis=1, keepdims=True)
    d = d * np.minimum(1.0, config.row_clip / np.maximum(norms, 1e-12))
    limit = config.device_clip * np.sqrt(max(d.shape[0] if rows is None else rows, 1))
    total = float(np.linalg.norm(d))
    if total > limit:
        d = d * (limit / total)
    pos = np.clip(d, 0.0, None)
    off = support < config.support_threshold
    pos_mass = float(pos.sum())
    off_share = float(pos[:, off].sum() / pos_mass) if pos_mass > 0 else 0.0
    tol = config.off_support_tolerance
    weight = float(np.clip(1.0 - max(0.0, off_share - tol) / (1.0 - tol), 0.0, 1.0))
    flip = np.full(d.shape[0], -1, np.int64)
    if z_shipped is not None and config.gate_rows:
        new_pred = (z_shipped + d).argmax(1)
        gate = (new_pred != z_shipped.argmax(1)) & (support[new_pred] >= config.support_threshold)
        d = d * gate[:, None]
        flip = np.where(gate, new_pred, -2)  # -2: gated out, the row adds nothing
    gain = np.minimum(1.0, support / config.support_threshold)
    d = np.where(d > 0, d * gain[None, :], d)
    return d * weight, weight, off_share, flip


def _flip_able(support: np.ndarray, weight: float, config: MergeConfig) -> np.ndarray:
    """One device's noised share of each class it could move a row to (its supported classes;
    0 elsewhere, and everywhere for a device of merge weight 0)."""
    s = np.asarray(support, np.float64)
    able: np.ndarray = np.where(s >= config.support_threshold, s, 0.0) if weight > 0 else np.zeros(NUM_CLASSES)
    return able


def public_flip_scale(mass: np.ndarray, peak: np.ndarray, public_devices: float | None
                      ) -> np.ndarray:
    """Per class c: the factor on the summed moves of public rows to c,
    ``min(1, public_devices / n_c)`` (:attr:`MergeConfig.public_devices`), where ``n_c =
    mass_c / peak_c`` is the effective number of devices able to move a row to c (the sum of
    their noised shares of c over the largest one); 1 without the setting."""
    if public_devices is None:
        return np.ones(NUM_CLASSES)
    m, top = np.asarray(mass, np.float64), np.asarray(peak, np.float64)
    n = np.where(top > 0, m / np.maximum(top, 1e-12), 0.0)
    out: np.ndarray = np.minimum(1.0, public_devices / np.maximum(n, 1.0))
    return out


def aggregate_differences(
    diffs: list[np.ndarray], supports: list[np.ndarray], config: MergeConfig,
    z_shipped: np.ndarray | None = None,
) -> tuple[np.ndarray, list[float], list[float]]:
    """Sum of the bounded differences (rows x classes) with each device's weight and score."""
    if not diffs:
        raise ConfigError("nothing to aggregate")
    out = np.zeros_like(diffs[0], dtype=np.float64)
    weights, scores = [], []
    for d, s in zip(diffs, supports, strict=True):
        bounded, w, off = bound_difference(d, s, config, z_shipped)
        out += bounded
        weights.append(w)
        scores.append(off)
    return out, weights, scores


def _public_scaled_sum(
    diffs: list[np.ndarray], supports: list[np.ndarray], config: MergeConfig, z_shipped: np.ndarray,
    n_ref: int, plain: np.ndarray,
) -> np.ndarray:
    """The summed bounded differences on the public reference rows, each device's move of a row
    to class c scaled by :func:`public_flip_scale`. ``plain`` (the unscaled sum) is returned as
    it is when every factor is 1."""
    flips, bounded = [], []
    mass, peak = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    for d, s in zip(diffs, supports, strict=True):
        b, w, _, flip = _bound(d, s, config, z_shipped)
        able = _flip_able(s, w, config)
        mass += able
        peak = np.maximum(peak, able)
        flips.append(flip[:n_ref])
        bounded.append(b[:n_ref])
    scale = public_flip_scale(mass, peak, config.public_devices)
    if (scale == 1.0).all():
        return plain
    out = np.zeros_like(plain)
    for b, flip in zip(bounded, flips, strict=True):
        factor = np.where(flip >= 0, scale[np.maximum(flip, 0)], 1.0)
        out += b * factor[:, None]
    return out


def _synthesize(
    model: nn.Module, start: np.ndarray, labels: np.ndarray, config: MergeConfig
) -> np.ndarray:
    """Data-free inputs: nudge ``start`` to raise the adapted model's score for ``labels``."""
    x = torch.from_numpy(start.astype(np.float32)).clone().requires_grad_(True)
    y = torch.from_numpy(labels.astype(np.int64))
    for p in model.parameters():
        p.requires_grad_(False)
    for _ in range(config.synth_steps):
        loss = F.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x -= config.synth_lr * grad.sign()
            x.clamp_(0.0, 1.0)
    return x.detach().numpy()


def _prototype_noise(protos: PayloadTensor, count: float, clip: float | None) -> float:
    """Expected per-pixel noise std of one noised class mean: ``sigma * clip / count``."""
    if clip is None or protos.noise_multiplier <= 0:
        return 0.0
    return float(protos.noise_multiplier * clip / max(count, 1.0))


def transfer_inputs(
    devices: list[DeviceKnowledge],
    shipped: nn.Module,
    config: MergeConfig,
    rng: np.random.Generator,
    *,
    prototype_clip: float | None = None,
    image_shape: tuple[int, ...] = (1, 8, 8),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs beyond the reference set that cover the users' domains (images of ``image_shape``).

    Returns ``(x, label, device_index)``: jittered noised prototypes of every class a device
    declares enough (noised) examples of, and/or (``config.transfer_mode``) those inputs moved by
    data-free synthesis toward what the device's adapted model calls that class. With
    ``config.max_prototype_noise`` and the devices' ``prototype_clip`` (public policy), a class
    whose noised mean carries more than that per-pixel noise std is skipped: at small counts the
    Gaussian noise swamps the mean and the input teaches garbage.
    """
    xs, ys, owners = [], [], []
    keep_raw = config.transfer_mode in ("both", "prototypes")
    want_synth = config.synthesize and config.transfer_mode in ("both", "synthesis")
    for i, dev in enumerate(devices):
        jittered = _jittered_prototypes(dev, config, rng, prototype_clip, image_shape)
        if not jittered:
            continue
        dev_x, dev_y = [jx for jx, _ in jittered], [jy for _, jy in jittered]
        model = adapted_model(shipped, dev.payload) if want_synth else None
        for jx, jy in zip(dev_x, dev_y, strict=True):
            if keep_raw or model is None:
                xs.append(jx)
                ys.append(jy)
                owners.append(np.full(len(jy), i, np.int64))
            if model is not None:
                xs.append(_synthesize(model, jx, jy, config))
                ys.append(jy.copy())
                owners.append(np.full(len(jy), i, np.int64))
    if not xs:
        return (np.zeros((0, *image_shape), np.float32), np.zeros(0, np.int64),
                np.zeros(0, np.int64))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(owners)


def _jittered_prototypes(
    dev: DeviceKnowledge, config: MergeConfig, rng: np.random.Generator,
    prototype_clip: float | None, image_shape: tuple[int, ...] = (1, 8, 8),
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One device's jittered noised prototypes, per class it declares enough of: ``(x, label)``.
    Draws from ``rng`` in class order (both merges draw devices in the same order)."""
    protos = dev.payload.get(PayloadKind.DP_PROTOTYPES)
    hist = dev.payload.get(PayloadKind.LABEL_HISTOGRAM)
    if protos is None or not config.use_prototypes or config.jitter_per_class == 0:
        return []
    p = protos.values.reshape(NUM_CLASSES, -1)
    pixels = int(np.prod(image_shape))
    if p.shape[1] != pixels:
        raise PayloadInvalid(
            f"dp_prototypes must be [{NUM_CLASSES}, {pixels}], got {protos.values.shape}")
    counts = hist.values.reshape(-1) if hist is not None else np.full(NUM_CLASSES, np.inf)
    out = []
    for c in range(NUM_CLASSES):
        if counts[c] < config.min_class_count:
            continue
        if (config.max_prototype_noise is not None
                and _prototype_noise(protos, float(counts[c]), prototype_clip)
                > config.max_prototype_noise):
            continue
        k = config.jitter_per_class
        jit = p[c][None, :] + rng.normal(0.0, config.jitter_std, size=(k, pixels))
        out.append((np.clip(jit, 0.0, 1.0).reshape(k, *image_shape).astype(np.float32),
                    np.full(k, c, np.int64)))
    return out


def merge_into_teacher(
    teacher: nn.Module,
    shipped_student: nn.Module,
    devices: list[DeviceKnowledge],
    reference_x: np.ndarray,
    presumed: Dataset,
    config: MergeConfig,
    *,
    seed: int,
    rng: np.random.Generator | None = None,
    presumed_val: Dataset | None = None,
    prototype_clip: float | None = None,
) -> MergeResult:
    """Aggregate ``devices``' knowledge and distil it into a copy of ``teacher``.

    ``devices`` hold payloads that already passed packet verification and policy. ``presumed_val``
    (the manufacturer's own held-out data) calibrates the anchor (``config.anchor_quantiles``);
    without it the presumed training data does. ``prototype_clip`` is the policy's prototype clip
    norm (for ``config.max_prototype_noise``). Raises :class:`PayloadInvalid` for a payload whose
    shapes do not fit the reference set or model.
    """
    rng = rng if rng is not None else np.random.default_rng(seed)
    n_ref = len(reference_x)
    supports = [device_support(d.payload) for d in devices]
    extra_x, extra_y, extra_owner = transfer_inputs(devices, shipped_student, config, rng,
                                                    prototype_clip=prototype_clip,
                                                    image_shape=tuple(reference_x.shape[1:]))
    transfer_x = np.concatenate([reference_x.astype(np.float32), extra_x])
    n_t = len(transfer_x)

    # Each device's logit difference on every transfer input: from its adapted model when it sent a
    # weight delta (it can be queried anywhere), else its reference logits (reference rows only).
    diffs: list[np.ndarray] = []
    has_diff = np.zeros((len(devices), n_t), bool)
    z_shipped = predict_logits(shipped_student, transfer_x).astype(np.float64)
    base = difference_space(z_shipped, config.difference_floor)
    adapted_probs: list[np.ndarray | None] = []
    for i, dev in enumerate(devices):
        model = adapted_model(shipped_student, dev.payload)
        d = np.zeros((n_t, NUM_CLASSES))
        adapted_probs.append(None)
        if model is not None:
            z_adapted = predict_logits(model, transfer_x).astype(np.float64)
            d = difference_space(z_adapted, config.difference_floor) - base
            has_diff[i] = True
            if config.anchor_relax_confidence is not None or config.own_claim_confidence is not None:
                e = np.exp(z_adapted - z_adapted.max(1, keepdims=True))
                adapted_probs[i] = e / e.sum(1, keepdims=True)
        else:
            ref = _dense_reference_diff(dev.payload, n_ref)
            if ref is not None:
                # The cloud knows the shipped logits: rebuild the adapted ones, then difference.
                d[:n_ref] = (difference_space(z_shipped[:n_ref] + ref, config.difference_floor)
                             - base[:n_ref])
                has_diff[i, :n_ref] = True
        diffs.append(d)
    names = [d.device_id for d in devices]
    if config.owner_rows_only:
        diffs = owner_rows_only(diffs, extra_owner, n_ref)
    if devices:
        merged, weights, scores = aggregate_differences(diffs, supports, config, base)
        if config.public_devices is not None and config.gate_rows:
            merged[:n_ref] = _public_scaled_sum(diffs, supports, config, base, n_ref,
                                                merged[:n_ref])
    else:
        merged, weights, scores = np.zeros((n_t, NUM_CLASSES)), [], []

    teacher = copy.deepcopy(teacher)
    z_teacher = predict_logits(teacher, transfer_x).astype(np.float64)
    anchor = np.ones(n_t)
    claim: np.ndarray | None = None
    claimant = np.full(n_t, -1, np.int64)
    if config.anchor_quantiles is not None:
        cal = presumed_val if presumed_val is not None and len(presumed_val) else presumed
        anchor = anchor_scale(z_teacher, predict_logits(teacher, cal.x), config.anchor_quantiles)
        if config.anchor_relax_confidence is not None:
            owner = np.concatenate([np.full(n_ref, -1, np.int64), extra_owner])
            claim, claimant = relief_claims(
                adapted_probs, supports, weights, np.unique(presumed.y),
                config.anchor_relax_confidence, config.support_threshold, n_t,
                owner=owner if config.owner_rows_only else None,
                max_share=config.max_claim_share, quorum=config.claim_quorum,
                quorum_above=config.public_devices)
            anchor = np.maximum(anchor, (claim >= 0).astype(np.float64))
        merged = merged * anchor[:, None]
    # A CE-trained teacher pushes classes it never saw to very low logits (-18 on digits); floor
    # them at ``max - logit_floor_gap`` so a bounded device difference can still raise them.
    z_teacher = np.maximum(z_teacher, z_teacher.max(1, keepdims=True) - config.logit_floor_gap)
    target = z_teacher + merged
    # Prototype inputs a device owns but could not label through a model: its class label.
    hard = np.full(n_t, -1, np.int64)
    hard_w = np.zeros(n_t, np.float32)
    for j in range(len(extra_x)):
        i = int(extra_owner[j])
        hard[n_ref + j] = extra_y[j]
        hard_w[n_ref + j] = (weights[i] * anchor[n_ref + j]
                             * min(1.0, supports[i][extra_y[j]] / config.support_threshold))
    if claim is not None and config.relief_hard_weight > 0:
        # The summed target can still favour another class the device raised less (round 5: A's
        # model calls a reference 8 an 8, B's raise of 9 there wins the sum): the device's own
        # confident call, which relieved the anchor, is also a label.
        rows = (claim >= 0) & (hard < 0)
        hard[rows] = claim[rows]
        hard_w[rows] = config.relief_hard_weight * np.asarray(weights)[claimant[rows]]
    presumed_z = predict_logits(teacher, presumed.x) if config.presumed_kd_weight > 0 else None
    _finetune_teacher(teacher, presumed, transfer_x, target.astype(np.float32), hard, hard_w,
                      config, seed=seed, presumed_z=presumed_z)
    own: dict[str, np.ndarray] = {}
    if config.own_claim_confidence is not None:
        owner_all = np.concatenate([np.full(n_ref, -1, np.int64), extra_owner])
        for i, name in enumerate(names):
            alone = [p if j == i else None for j, p in enumerate(adapted_probs)]
            own[name], _ = relief_claims(
                alone, supports, weights, np.unique(presumed.y), config.own_claim_confidence,
                config.support_threshold, n_t, owner=owner_all if config.owner_rows_only else None,
                max_share=config.max_claim_share)
    kernels: dict[str, np.ndarray] = {}
    if config.sensor_gate is not None:
        clip = prototype_clip if prototype_clip is not None else DEFAULT_PROTOTYPE_CLIP
        for dev in devices:
            fit = estimate_sensor_kernel(dev.payload, presumed, clip=clip,
                                         size=config.sensor_kernel_size,
                                         min_class_count=config.min_class_count)
            if (fit is not None and fit.ratio < config.sensor_gate
                    and fit.classes >= config.sensor_min_classes):
                kernels[dev.device_id] = fit.kernel
    owner_rows: dict[str, tuple[int, int]] = {}
    for i, name in enumerate(names):
        mine = np.flatnonzero(extra_owner == i)
        if mine.size:
            owner_rows[name] = (n_ref + int(mine[0]), n_ref + int(mine[-1]) + 1)
    return MergeResult(
        teacher=teacher,
        transfer_x=transfer_x,
        weights=dict(zip(names, weights, strict=True)),
        off_support=dict(zip(names, scores, strict=True)),
        supports=dict(zip(names, supports, strict=True)),
        transfer_owner=tuple([""] * n_ref + [names[int(i)] for i in extra_owner]),
        sensor_kernels=kernels,
        own_claims=own,
        owner_rows=owner_rows,
    )


def difference_space(z: np.ndarray, floor: float | None) -> np.ndarray:
    """Logits as they are (``floor`` None), or log-probabilities floored at ``-floor``.

    Why the floor: a raw logit difference measures how far a class moved, not where it ended.
    Classes the shipped model never saw sit at very low logits, so an adapted model that learned 7
    and 8 raises both by some 20 logits on an image of an 8 and, summed onto the teacher, the
    larger raise wins whichever class the adapted model prefers (seed 2: 20 of 30 reference 8s got
    target 7). Floored log-probabilities make each device's difference its likelihood ratio
    (adapted over shipped) on the classes it can tell apart: the target is then the teacher's
    belief times each device's evidence, and a class both models rule out adds nothing.
    """
    if floor is None:
        return z
    z = z.astype(np.float64)
    m = z.max(1, keepdims=True)
    lp = z - (m + np.log(np.exp(z - m).sum(1, keepdims=True)))
    out: np.ndarray = np.maximum(lp, -floor)
    return out


def owner_rows_only(diffs: list[np.ndarray], owner: np.ndarray, n_ref: int) -> list[np.ndarray]:
    """Zero device ``i``'s difference on transfer rows derived from another device's packet.

    Rows ``n_ref + j`` came from device ``owner[j]``'s prototypes (in that user's domain). Another
    device's adapted model never saw that domain; what it says there is noise or its own new class
    spilling over (round 5: B's 9 won over A's 7s and 8s on A's rows). Reference rows keep all.
    """
    out = []
    for i, d in enumerate(diffs):
        d = d.copy()
        d[n_ref:][np.asarray(owner) != i] = 0.0
        out.append(d)
    return out


def relief_claims(
    probs: list[np.ndarray | None], supports: list[np.ndarray], weights: list[float],
    known_classes: np.ndarray, confidence: float, support_threshold: float, n_rows: int,
    *, owner: np.ndarray | None = None, max_share: float | None = None,
    quorum: float | None = None, quorum_above: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the class some device claims and that device's index (both ``-1``: none).

    A device with merge weight > 0 claims a row where its adapted model (softmax ``probs[i]``,
    ``None`` for a device without a weight delta) puts at least ``confidence`` on a class that
    device supports (noised share >= ``support_threshold``) and that is not among
    ``known_classes`` (the classes of the manufacturer's presumed data). Where several devices
    claim a row, the most confident wins. With ``owner`` (per row: the device whose packet it came
    from, ``-1`` for a public reference row) a device claims only reference rows and its own rows;
    with ``max_share`` it claims each class on at most that share of the reference rows, its most
    confident first. With ``quorum`` a claim on a public row holds only where the noised shares
    of the claimed class of the devices claiming the row sum to at least ``quorum`` times those
    of every device able to claim it (a model, weight > 0, support; :attr:`MergeConfig.claim_quorum`).
    Where the most confident claim lacks the quorum the row has none (another class's is not
    promoted). With ``quorum_above`` the quorum holds only for classes that more than that many
    devices' worth could claim (their shares summed over the largest): a small fleet's claims all
    stand.

    The anchor (:func:`anchor_scale`) lets claimed rows take the full merged change: a user's model
    confidently naming a new class it has data of is evidence the old teacher's confidence there is
    misplaced (seed 2: the old teacher calls user B's 9s 3 or 5 with presumed-like confidence).
    Everything here is post-processing of DP releases (weight delta, histogram).
    """
    known = np.zeros(NUM_CLASSES, bool)
    known[np.asarray(known_classes, np.int64)] = True
    claim = np.full(n_rows, -1, np.int64)
    claimant = np.full(n_rows, -1, np.int64)
    best = np.zeros(n_rows)
    public = np.ones(n_rows, bool) if owner is None else np.asarray(owner) < 0
    n_public = int(public.sum())
    votes = np.zeros((n_rows, NUM_CLASSES))
    able, peak = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    for i, (p, sup, w) in enumerate(zip(probs, supports, weights, strict=True)):
        if p is None or w <= 0:
            continue
        ok = (np.asarray(sup) >= support_threshold) & ~known
        share = np.where(ok, np.asarray(sup, np.float64), 0.0)
        able += share
        peak = np.maximum(peak, share)
        conf, pred = p.max(1), p.argmax(1)
        mine = (conf >= confidence) & ok[pred]
        if owner is not None:
            mine &= public | (np.asarray(owner) == i)
        if max_share is not None:
            cap = int(np.floor(max_share * n_public))
            for c in np.unique(pred[mine & public]):
                rows = np.flatnonzero(mine & public & (pred == c))
                if len(rows) > cap:
                    mine[rows[np.argsort(-conf[rows], kind="stable")[cap:]]] = False
        votes[np.flatnonzero(mine), pred[mine]] += np.asarray(sup, np.float64)[pred[mine]]
        take = mine & (conf > best)
        claim[take] = pred[take]
        claimant[take] = i
        best[take] = conf[take]
    if quorum is not None:
        apply_claim_quorum(claim, claimant, votes, able, public, quorum, peak=peak,
                           above=quorum_above)
    return claim, claimant


def apply_claim_quorum(
    claim: np.ndarray, claimant: np.ndarray, votes: np.ndarray, able: np.ndarray,
    public: np.ndarray, quorum: float, *, peak: np.ndarray | None = None,
    above: float | None = None,
) -> None:
    """Drop (in place) the claims on ``public`` rows where the claimants' noised shares of the
    claimed class (``votes``: rows x classes, summed) are below ``quorum`` times those of every
    device able to claim it (``able``: per class). With ``peak`` (per class, the largest such
    share) and ``above``, classes with at most ``above`` devices' worth able (``able / peak``)
    keep every claim."""
    able = np.asarray(able, np.float64)
    exempt = np.zeros(NUM_CLASSES, bool)
    if above is not None and peak is not None:
        top = np.asarray(peak, np.float64)
        exempt = np.where(top > 0, able / np.maximum(top, 1e-12), 0.0) <= above
    rows = np.flatnonzero(public & (claim >= 0))
    need = quorum * able[claim[rows]]
    weak = (votes[rows, claim[rows]] < need * (1.0 - 1e-9)) & ~exempt[claim[rows]]
    claim[rows[weak]] = -1
    claimant[rows[weak]] = -1


def anchor_relief(
    probs: list[np.ndarray | None], supports: list[np.ndarray], weights: list[float],
    known_classes: np.ndarray, confidence: float, support_threshold: float, n_rows: int,
) -> np.ndarray:
    """Per-row 0/1: 1 where :func:`relief_claims` finds a claim."""
    claim, _ = relief_claims(probs, supports, weights, known_classes, confidence,
                             support_threshold, n_rows)
    claimed: np.ndarray = (claim >= 0).astype(np.float64)
    return claimed


def anchor_scale(
    z_rows: np.ndarray, z_presumed: np.ndarray, quantiles: tuple[float, float]
) -> np.ndarray:
    """Per-row factor in [0, 1] on how much the merge may change the old teacher there.

    The old teacher's maximum logit separates its own (presumed) distribution from inputs it never
    saw (AUROC 0.97 between presumed-class and new-class reference images, digits, seed 0). Rows
    scoring above the ``hi`` quantile of that score on the manufacturer's presumed data keep the
    old teacher (factor 0), rows below the ``lo`` quantile take the full merged change (factor 1),
    linear in between. This is what keeps noisy device differences from relabelling presumed
    images (on seed 0, 59 of 210 presumed-class reference rows had their target flipped).
    """
    score = z_rows.max(1)
    ref = z_presumed.max(1)
    lo, hi = (float(np.quantile(ref, q)) for q in quantiles)
    out: np.ndarray = np.clip((hi - score) / max(hi - lo, 1e-6), 0.0, 1.0)
    return out


def _finetune_teacher(
    teacher: nn.Module, presumed: Dataset, tx: np.ndarray, target: np.ndarray,
    hard: np.ndarray, hard_w: np.ndarray, config: MergeConfig, *, seed: int,
    presumed_z: np.ndarray | None = None,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    px, py = torch.from_numpy(presumed.x), torch.from_numpy(presumed.y)
    x, z = torch.from_numpy(tx), torch.from_numpy(target)
    hy, hw = torch.from_numpy(hard), torch.from_numpy(hard_w)
    pz = torch.from_numpy(presumed_z.astype(np.float32)) if presumed_z is not None else None
    t = config.kd_temperature
    opt = torch.optim.Adam(teacher.parameters(), lr=config.lr)
    teacher.train()
    n, m = len(tx), len(py)
    steps = max(1, int(np.ceil(n / config.batch_size)))
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=gen)
        pperm = torch.randperm(m, generator=gen)
        for s in range(steps):
            idx = perm[s * config.batch_size : (s + 1) * config.batch_size]
            pidx = pperm[(s * config.batch_size) % m :][: config.batch_size]
            out = teacher(x[idx])
            kl = (t * t) * F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(z[idx] / t, 1),
                                    log_target=True, reduction="none").sum(1)
            ce_h = F.cross_entropy(out, hy[idx].clamp(min=0), reduction="none") * hw[idx]
            loss = config.transfer_weight * (kl + ce_h).mean()
            if m:
                out_p = teacher(px[pidx])
                loss = loss + F.cross_entropy(out_p, py[pidx])
                if pz is not None:
                    # Keep the old teacher's soft knowledge on presumed data, not only its labels.
                    loss = loss + config.presumed_kd_weight * (t * t) * F.kl_div(
                        F.log_softmax(out_p / t, 1), F.log_softmax(pz[pidx] / t, 1),
                        log_target=True, reduction="batchmean")
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    teacher.eval()


# ------------------------------------------------------------------------------------------------
# The streamed merge: the same rule over a stream of packets, on any executor
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _DevicePlan:
    """Pass 1's view of one device: no payload is kept, only what fixes its transfer rows."""

    index: int
    device_id: str
    support: np.ndarray
    start: int
    """Its first own transfer row (rows ``[start, start + rows)`` derive from its packet)."""
    jittered: tuple[tuple[np.ndarray, np.ndarray], ...]
    synth: bool

    @property
    def rows(self) -> int:
        per_class = sum(len(y) for _, y in self.jittered)
        return per_class * (2 if self.synth and self.keeps_raw else 1)

    keeps_raw: bool = True


@dataclass(frozen=True)
class _ChunkShared:
    shipped: bytes
    """The model these packets were computed against (safetensors, architecture in metadata)."""
    reference_x: np.ndarray
    presumed: Dataset
    config: MergeConfig
    n_rows: int
    prototype_clip: float | None


@dataclass(frozen=True)
class _DeviceOut:
    index: int
    weight: float
    off_support: float
    own_x: np.ndarray
    own_y: np.ndarray
    own_diff: np.ndarray
    """The device's bounded, weighted difference on its own rows (no other device's is there)."""
    relief_own: tuple[np.ndarray, np.ndarray, np.ndarray]
    """Its anchor-relief claims on its own rows: (global rows, classes, confidences)."""
    own_claims: tuple[np.ndarray, np.ndarray]
    kernel: np.ndarray | None


@dataclass(frozen=True)
class _ChunkOut:
    ref_sum: np.ndarray
    ref_best: np.ndarray
    ref_claim: np.ndarray
    ref_claimant: np.ndarray
    devices: tuple[_DeviceOut, ...]
    ref_votes: np.ndarray
    """Per reference row and class: the claimants' noised shares of it, summed (the quorum)."""
    able: np.ndarray
    """Per class: the noised shares of the chunk's devices that could claim it, summed."""
    able_peak: np.ndarray
    """Per class: the largest of those shares."""
    flip_mass: np.ndarray
    """Per class: the noised shares summed over the devices that could move a row to it."""
    flip_peak: np.ndarray
    """Per class: the largest of those shares."""
    ref_by_class: np.ndarray | None
    """The reference rows' bounded differences summed by the class each device moved the row
    to (rows x moved-to class x classes); None without ``public_devices``."""


def _claims_local(
    probs: np.ndarray, support: np.ndarray, known: np.ndarray, confidence: float,
    threshold: float, n_ref: int, max_share: float | None,
) -> np.ndarray:
    """:func:`relief_claims`' rule for one device on its rows (reference rows first, then its own):
    the mask of rows it claims. The owner rule holds by construction (only these rows)."""
    ok = (np.asarray(support) >= threshold) & ~known
    conf, pred = probs.max(1), probs.argmax(1)
    mine: np.ndarray = (conf >= confidence) & ok[pred]
    if max_share is not None:
        public = np.arange(len(probs)) < n_ref
        cap = int(np.floor(max_share * n_ref))
        for c in np.unique(pred[mine & public]):
            rows = np.flatnonzero(mine & public & (pred == c))
            if len(rows) > cap:
                mine[rows[np.argsort(-conf[rows], kind="stable")[cap:]]] = False
    return mine


def _chunk_task(shared: _ChunkShared, chunk: list[tuple[_DevicePlan, KnowledgePayload]]) -> _ChunkOut:
    """Pass 2, one chunk of devices: each one's bounded difference, claims and sensor (a task)."""
    from .models import load_model_bytes

    config = shared.config
    shipped, _, _ = load_model_bytes(shared.shipped)
    ref_x = shared.reference_x.astype(np.float32)
    n_ref = len(ref_x)
    known = np.zeros(NUM_CLASSES, bool)
    known[np.unique(shared.presumed.y)] = True
    z_ref = predict_logits(shipped, ref_x).astype(np.float64)
    keep_raw = config.transfer_mode in ("both", "prototypes")
    ref_sum = np.zeros((n_ref, NUM_CLASSES))
    best = np.zeros(n_ref)
    claim = np.full(n_ref, -1, np.int64)
    claimant = np.full(n_ref, -1, np.int64)
    votes = np.zeros((n_ref, NUM_CLASSES))
    able, able_peak = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    flip_mass, flip_peak = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    scaled = config.public_devices is not None and config.gate_rows
    by_class = np.zeros((n_ref, NUM_CLASSES, NUM_CLASSES)) if scaled else None
    relief = config.anchor_quantiles is not None and config.anchor_relax_confidence is not None
    outs = []
    for plan, payload in chunk:
        dev = DeviceKnowledge(plan.device_id, payload)
        model = adapted_model(shipped, payload)
        xs, ys = [], []
        for jx, jy in plan.jittered:
            if keep_raw or not plan.synth or model is None:
                xs.append(jx)
                ys.append(jy)
            if plan.synth and model is not None:
                xs.append(_synthesize(model, jx, jy, config))
                ys.append(jy.copy())
        own_x = np.concatenate(xs) if xs else np.zeros((0, *ref_x.shape[1:]), np.float32)
        own_y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
        if len(own_x) != plan.rows:
            raise PayloadInvalid(f"device {plan.device_id}: its packet changed between the passes")
        z_own = predict_logits(shipped, own_x).astype(np.float64)
        base = difference_space(np.concatenate([z_ref, z_own]), config.difference_floor)
        d = np.zeros((n_ref + len(own_x), NUM_CLASSES))
        probs = None
        if model is not None:
            z_adapted = predict_logits(model, np.concatenate([ref_x, own_x])).astype(np.float64)
            d = difference_space(z_adapted, config.difference_floor) - base
            e = np.exp(z_adapted - z_adapted.max(1, keepdims=True))
            probs = e / e.sum(1, keepdims=True)
        else:
            ref = _dense_reference_diff(payload, n_ref)
            if ref is not None:
                d[:n_ref] = (difference_space(z_ref + ref, config.difference_floor) - base[:n_ref])
        bounded, w, off, flip = _bound(d, plan.support, config, base, rows=shared.n_rows)
        ref_sum += bounded[:n_ref]
        if by_class is not None:
            mover = _flip_able(plan.support, w, config)
            flip_mass += mover
            flip_peak = np.maximum(flip_peak, mover)
            moved = np.flatnonzero(flip[:n_ref] >= 0)
            by_class[moved, flip[moved]] += bounded[moved]
        own_rows = np.arange(plan.start, plan.start + len(own_x))
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
        relief_own = empty
        if relief and probs is not None and w > 0:
            assert config.anchor_relax_confidence is not None
            mine = _claims_local(probs, plan.support, known, config.anchor_relax_confidence,
                                 config.support_threshold, n_ref, config.max_claim_share)
            conf, pred = probs.max(1), probs.argmax(1)
            share = np.asarray(plan.support, np.float64)
            claimable = np.where((share >= config.support_threshold) & ~known, share, 0.0)
            able += claimable
            able_peak = np.maximum(able_peak, claimable)
            ref_mine = np.flatnonzero(mine[:n_ref])
            votes[ref_mine, pred[ref_mine]] += share[pred[ref_mine]]
            take = mine[:n_ref] & (conf[:n_ref] > best)
            claim[take], claimant[take], best[take] = pred[:n_ref][take], plan.index, conf[:n_ref][take]
            own_mine = mine[n_ref:]
            relief_own = (own_rows[own_mine], pred[n_ref:][own_mine], conf[n_ref:][own_mine])
        own_claims = empty[:2]
        if config.own_claim_confidence is not None and probs is not None and w > 0:
            mine = _claims_local(probs, plan.support, known, config.own_claim_confidence,
                                 config.support_threshold, n_ref, config.max_claim_share)
            rows = np.concatenate([np.arange(n_ref), own_rows])
            own_claims = (rows[mine], probs.argmax(1)[mine])
        kernel = None
        if config.sensor_gate is not None:
            clip = shared.prototype_clip if shared.prototype_clip is not None else DEFAULT_PROTOTYPE_CLIP
            fit = estimate_sensor_kernel(dev.payload, shared.presumed, clip=clip,
                                         size=config.sensor_kernel_size,
                                         min_class_count=config.min_class_count)
            if (fit is not None and fit.ratio < config.sensor_gate
                    and fit.classes >= config.sensor_min_classes):
                kernel = fit.kernel
        outs.append(_DeviceOut(plan.index, w, off, own_x, own_y, bounded[n_ref:], relief_own,
                               own_claims, kernel))
    return _ChunkOut(ref_sum, best, claim, claimant, tuple(outs), votes, able, able_peak, flip_mass,
                     flip_peak, by_class)


@dataclass(frozen=True)
class _FinetuneShared:
    teacher: bytes
    presumed: Dataset
    transfer_x: np.ndarray
    target: np.ndarray
    hard: np.ndarray
    hard_w: np.ndarray
    presumed_z: np.ndarray | None
    config: MergeConfig
    seed: int


def _finetune_task(shared: _FinetuneShared, _: None) -> bytes:
    from .models import load_model_bytes, model_bytes

    teacher, spec, _meta = load_model_bytes(shared.teacher)
    _finetune_teacher(teacher, shared.presumed, shared.transfer_x, shared.target, shared.hard,
                      shared.hard_w, shared.config, seed=shared.seed, presumed_z=shared.presumed_z)
    return model_bytes(teacher, spec)


def _chunks(items: Iterable[tuple[_DevicePlan, KnowledgePayload]], size: int
            ) -> Iterator[list[tuple[_DevicePlan, KnowledgePayload]]]:
    chunk: list[tuple[_DevicePlan, KnowledgePayload]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class MergeGroup:
    """The packets of one merge computed against one base model.

    ``shipped`` is that base model (safetensors bytes: the released edge model the devices ran);
    ``devices()`` streams the packets and must yield the same devices in the same order each time
    it is called. Each device's difference is taken against its own group's ``shipped`` model.
    """

    shipped: bytes
    devices: Callable[[], Iterable[DeviceKnowledge]]


def merge_streamed(
    teacher: bytes,
    shipped_student: bytes,
    devices: Callable[[], Iterable[DeviceKnowledge]],
    reference_x: np.ndarray,
    presumed: Dataset,
    config: MergeConfig,
    *,
    seed: int,
    rng: np.random.Generator | None = None,
    presumed_val: Dataset | None = None,
    prototype_clip: float | None = None,
    executor: JobExecutor | None = None,
    chunk_size: int = 64,
    presumed_anchor: bytes | None = None,
) -> MergeResult:
    """:func:`merge_into_teacher`'s rule over a stream of devices, on ``executor``.

    ``devices()`` must yield the same devices in the same order each time it is called (it is
    called twice: the store streams them, nothing holds every payload). ``teacher`` and
    ``shipped_student`` are safetensors bytes (what the workspace stores). Pass 1 (here) draws each
    device's jittered prototypes from ``rng`` in stream order, as :func:`merge_into_teacher` does,
    and lays out the transfer rows; pass 2 runs ``chunk_size`` devices per task (synthesis,
    differences, claims, sensor kernels) and sums the chunks in stream order; the teacher's
    fine-tuning is one more task. The result equals :func:`merge_into_teacher`'s up to float
    summation order (same draws, same rows; the tests check it), and is the same bytes on every
    executor for the same seeds. Own claims come back sparse (``MergeResult.own_claim_rows``).
    Needs ``config.owner_rows_only`` (what makes a device's work independent of the others').
    ``presumed_anchor``: see :func:`merge_groups_streamed`.
    Raises :class:`ConfigError` for an empty stream, :class:`PayloadInvalid` as the in-memory merge.
    """
    return merge_groups_streamed(
        teacher, [MergeGroup(shipped_student, devices)], reference_x, presumed, config, seed=seed,
        rng=rng, presumed_val=presumed_val, prototype_clip=prototype_clip, executor=executor,
        chunk_size=chunk_size, presumed_anchor=presumed_anchor)


def merge_groups_streamed(
    teacher: bytes,
    groups: Sequence[MergeGroup],
    reference_x: np.ndarray,
    presumed: Dataset,
    config: MergeConfig,
    *,
    seed: int,
    rng: np.random.Generator | None = None,
    presumed_val: Dataset | None = None,
    prototype_clip: float | None = None,
    executor: JobExecutor | None = None,
    chunk_size: int = 64,
    presumed_anchor: bytes | None = None,
) -> MergeResult:
    """One merge of packets computed against several base models: :func:`merge_streamed`'s rule
    with every group's devices summed on one transfer set and one fine-tuning of ``teacher``.

    Each device's difference, claims and synthesised rows come from its own group's base model
    (what it was computed against); the reference rows appear once and take every device's
    bounded difference, whichever its base, as if all devices were one group. Why one fine-tuning
    and not one merge per base (issue 17): once devices run their own per-user models every device
    is its own group, and a merge per group fine-tuned the teacher once per device, each time
    anchored on the teacher the previous device left: at N = 40 the teacher's presumed accuracy
    walked from 0.98 to 0.91 within one round and the fleet model's with it.

    ``presumed_anchor`` (safetensors bytes; default ``teacher``): the model whose logits on the
    presumed data the fine-tuning's KD term keeps (``config.presumed_kd_weight``). The cloud passes
    the manufacturer's original teacher, so that round after round the merged teacher is held to
    the same presumed knowledge rather than to whatever the last round left.
    Raises :class:`ConfigError` for no devices at all, :class:`PayloadInvalid` as the in-memory
    merge.
    """
    from .executor import InProcessExecutor
    from .models import load_model_bytes

    if not config.owner_rows_only:
        raise ConfigError("the streamed merge needs owner_rows_only (each device's rows its own)")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    executor = executor if executor is not None else InProcessExecutor()
    rng = rng if rng is not None else np.random.default_rng(seed)
    n_ref = len(reference_x)
    image_shape = tuple(reference_x.shape[1:])
    keep_raw = config.transfer_mode in ("both", "prototypes")
    want_synth = config.synthesize and config.transfer_mode in ("both", "synthesis")

    plans: list[_DevicePlan] = []
    group_plans: list[list[_DevicePlan]] = []
    start = n_ref
    for group in groups:
        mine: list[_DevicePlan] = []
        for dev in group.devices():
            jittered = _jittered_prototypes(dev, config, rng, prototype_clip, image_shape)
            synth = want_synth and dev.payload.get(PayloadKind.WEIGHT_DELTA) is not None
            plan = _DevicePlan(len(plans), dev.device_id, device_support(dev.payload), start,
                               tuple(jittered), synth, keep_raw)
            plans.append(plan)
            mine.append(plan)
            start += plan.rows
        group_plans.append(mine)
    if not plans:
        raise ConfigError("nothing to merge")
    n_t = start

    def paired(group: MergeGroup, mine: list[_DevicePlan]
               ) -> Iterator[tuple[_DevicePlan, KnowledgePayload]]:
        count = 0
        for plan, dev in zip(mine, group.devices(), strict=False):
            if dev.device_id != plan.device_id:
                raise ConfigError("the device stream changed between the merge's two passes")
            count += 1
            yield plan, dev.payload
        if count != len(mine):
            raise ConfigError("the device stream changed between the merge's two passes")

    transfer_x = np.zeros((n_t, *image_shape), np.float32)
    transfer_x[:n_ref] = reference_x
    extra_y = np.zeros(n_t - n_ref, np.int64)
    merged = np.zeros((n_t, NUM_CLASSES))
    best = np.zeros(n_t)
    claim = np.full(n_t, -1, np.int64)
    claimant = np.full(n_t, -1, np.int64)
    weights = np.zeros(len(plans))
    scores = np.zeros(len(plans))
    own_claim_rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    kernels: dict[str, np.ndarray] = {}
    votes = np.zeros((n_ref, NUM_CLASSES))
    able, able_peak = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    flip_mass, flip_peak = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    by_class = (np.zeros((n_ref, NUM_CLASSES, NUM_CLASSES))
                if config.public_devices is not None and config.gate_rows else None)
    for group, mine in zip(groups, group_plans, strict=True):
        if not mine:
            continue
        shared = _ChunkShared(group.shipped, reference_x.astype(np.float32), presumed, config,
                              n_t, prototype_clip)
        for out in executor.map(_chunk_task, shared, _chunks(paired(group, mine), chunk_size)):
            merged[:n_ref] += out.ref_sum
            votes += out.ref_votes
            able += out.able
            able_peak = np.maximum(able_peak, out.able_peak)
            flip_mass += out.flip_mass
            flip_peak = np.maximum(flip_peak, out.flip_peak)
            if by_class is not None and out.ref_by_class is not None:
                by_class += out.ref_by_class
            take = out.ref_claim >= 0
            take &= out.ref_best > best[:n_ref]
            claim[:n_ref][take] = out.ref_claim[take]
            claimant[:n_ref][take] = out.ref_claimant[take]
            best[:n_ref][take] = out.ref_best[take]
            for dev_out in out.devices:
                plan = plans[dev_out.index]
                rows = slice(plan.start, plan.start + plan.rows)
                transfer_x[rows] = dev_out.own_x
                extra_y[plan.start - n_ref : plan.start - n_ref + plan.rows] = dev_out.own_y
                merged[rows] = dev_out.own_diff
                r, c, conf = dev_out.relief_own
                claim[r], claimant[r], best[r] = c, plan.index, conf
                weights[plan.index], scores[plan.index] = dev_out.weight, dev_out.off_support
                if config.own_claim_confidence is not None:
                    own_claim_rows[plan.device_id] = dev_out.own_claims
                if dev_out.kernel is not None:
                    kernels[plan.device_id] = dev_out.kernel

    if by_class is not None:
        # Moves of public rows count at most ``public_devices`` devices' worth per class; when no
        # class has more able devices the plain sum stands (the same bytes as without the rule).
        scale = public_flip_scale(flip_mass, flip_peak, config.public_devices)
        if not (scale == 1.0).all():
            merged[:n_ref] = (by_class * scale[None, :, None]).sum(1)
    teacher_model, _, _ = load_model_bytes(teacher)
    z_teacher = predict_logits(teacher_model, transfer_x).astype(np.float64)
    anchor = np.ones(n_t)
    if config.anchor_quantiles is not None:
        cal = presumed_val if presumed_val is not None and len(presumed_val) else presumed
        anchor = anchor_scale(z_teacher, predict_logits(teacher_model, cal.x),
                              config.anchor_quantiles)
        if config.anchor_relax_confidence is not None:
            if config.claim_quorum is not None:
                public = np.arange(n_t) < n_ref
                apply_claim_quorum(claim[:n_ref], claimant[:n_ref], votes, able, public[:n_ref],
                                   config.claim_quorum, peak=able_peak,
                                   above=config.public_devices)
            anchor = np.maximum(anchor, (claim >= 0).astype(np.float64))
        else:
            claim[:] = -1
        merged = merged * anchor[:, None]
    else:
        claim[:] = -1
    z_teacher = np.maximum(z_teacher, z_teacher.max(1, keepdims=True) - config.logit_floor_gap)
    target = z_teacher + merged
    owner = np.concatenate([np.full(p.rows, p.index, np.int64) for p in plans])
    supports = np.stack([p.support for p in plans])
    hard = np.full(n_t, -1, np.int64)
    hard_w = np.zeros(n_t, np.float32)
    hard[n_ref:] = extra_y
    hard_w[n_ref:] = (weights[owner] * anchor[n_ref:]
                      * np.minimum(1.0, supports[owner, extra_y] / config.support_threshold))
    if config.relief_hard_weight > 0:
        rows_h = (claim >= 0) & (hard < 0)
        hard[rows_h] = claim[rows_h]
        hard_w[rows_h] = config.relief_hard_weight * weights[claimant[rows_h]]
    presumed_z = None
    if config.presumed_kd_weight > 0:
        keeper = (teacher_model if presumed_anchor is None
                  else load_model_bytes(presumed_anchor)[0])
        presumed_z = predict_logits(keeper, presumed.x)
    tuned = executor.run(_finetune_task, _FinetuneShared(
        teacher, presumed, transfer_x, target.astype(np.float32), hard, hard_w, presumed_z,
        config, seed), None)
    tuned_model, _, _ = load_model_bytes(tuned)
    names = [p.device_id for p in plans]
    return MergeResult(
        teacher=tuned_model,
        transfer_x=transfer_x,
        weights={n: float(w) for n, w in zip(names, weights, strict=True)},
        off_support={n: float(s) for n, s in zip(names, scores, strict=True)},
        supports={p.device_id: p.support for p in plans},
        transfer_owner=tuple([""] * n_ref + [names[int(i)] for i in owner]),
        sensor_kernels=kernels,
        own_claims={},
        owner_rows={p.device_id: (p.start, p.start + p.rows) for p in plans if p.rows},
        own_claim_rows=own_claim_rows,
    )

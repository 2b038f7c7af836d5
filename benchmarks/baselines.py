"""The alternatives a user or manufacturer would pick instead of DiReDi, on the same artefacts.

Every function here works on models the reproduction benchmark already trained (the shipped student,
the devices' DP-adapted copies from RD), so one RD per user and epsilon serves every method:

* :func:`fedavg_model` -- one-shot FedAvg of weight deltas: ``shipped + server_lr * mean(deltas)``.
  With ``server_lr`` equal to the number of devices this is the *sum* of the deltas.
* :func:`federated_distillation_model` -- FedMD / DS-FL style: the devices' logits on the public
  reference set are averaged (no RD into a teacher, no bounding of any device) and the shipped
  student is distilled toward that consensus.
* :func:`oracle_teacher` -- the privacy-violating upper bound: a teacher trained on the presumed
  data *and every user's raw training data*.
* :func:`select_on_validation` -- picks a hyperparameter by mean accuracy on the users' validation
  splits (never a test set).

Trusted inputs only (models and data the benchmark built itself); nothing here parses bytes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from diredi_secure.errors import ConfigError
from diredi_secure.knowledge import KnowledgePayload, PayloadKind, PayloadTensor, encode_payload
from diredi_secure.ml import Dataset, KDConfig, TrainConfig, build_model, train_classifier
from diredi_secure.ml.data import NUM_CLASSES, UserSplit
from diredi_secure.ml.distill import kd_train
from diredi_secure.ml.evaluate import accuracy, predict_logits
from diredi_secure.ml.models import ModelSpec

__all__ = [
    "fedavg_model",
    "fedavg_upload_bytes",
    "federated_distillation_model",
    "logits_upload_bytes",
    "mean_user_accuracy",
    "oracle_teacher",
    "raw_data_bytes",
    "select_on_validation",
    "user_class_shares",
    "weight_delta",
]

T = TypeVar("T")


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def weight_delta(adapted: nn.Module, shipped: nn.Module) -> np.ndarray:
    """``theta_adapted - theta_shipped`` over the parameters, flat, float32 (named_parameters order).

    Raises :class:`ConfigError` when the two models do not have the same parameters.
    """
    a, s = _params(adapted), _params(shipped)
    if a.keys() != s.keys() or any(a[k].shape != s[k].shape for k in a):
        raise ConfigError("adapted and shipped models do not share an architecture")
    out: np.ndarray = torch.cat([(a[k] - s[k]).reshape(-1) for k in s]).numpy().astype(np.float32)
    return out


def fedavg_model(shipped: nn.Module, adapted: Sequence[nn.Module], server_lr: float = 1.0) -> nn.Module:
    """One FedAvg round from weight deltas: ``shipped + server_lr * mean_i(adapted_i - shipped)``.

    Returns a new model; ``shipped`` is not modified. Raises :class:`ConfigError` with no devices.
    """
    if not adapted:
        raise ConfigError("FedAvg needs at least one device")
    if not server_lr > 0:
        raise ConfigError(f"server_lr must be > 0, got {server_lr}")
    base = _params(shipped)
    mean = {k: torch.zeros_like(v) for k, v in base.items()}
    for model in adapted:
        p = _params(model)
        if p.keys() != base.keys():
            raise ConfigError("a device model does not share the shipped architecture")
        for k in base:
            mean[k] += (p[k] - base[k]) / len(adapted)
    out = copy.deepcopy(shipped)
    with torch.no_grad():
        for k, v in out.named_parameters():
            v.copy_(base[k] + server_lr * mean[k])
    return out.eval()


def fedavg_upload_bytes(adapted: nn.Module, shipped: nn.Module) -> int:
    """Bytes one device uploads in FedAvg: its full float32 weight delta in the payload encoding."""
    entry = PayloadTensor("weight_delta", PayloadKind.WEIGHT_DELTA, weight_delta(adapted, shipped),
                          dtype="float32")
    data, _ = encode_payload(KnowledgePayload((entry,)))
    return len(data)


def logits_upload_bytes(logits: np.ndarray) -> int:
    """Bytes one device uploads in federated distillation: its reference-set logits, float16."""
    entry = PayloadTensor("reference_logits", PayloadKind.REFERENCE_LOGITS, logits, dtype="float16")
    data, _ = encode_payload(KnowledgePayload((entry,)))
    return len(data)


def raw_data_bytes(data: Dataset) -> int:
    """What uploading the raw training data would cost (float32 images + int64 labels)."""
    return int(data.x.nbytes + data.y.nbytes)


def federated_distillation_model(
    shipped: nn.Module,
    adapted: Sequence[nn.Module],
    reference_x: np.ndarray,
    config: KDConfig,
    *,
    seed: int,
) -> tuple[nn.Module, np.ndarray]:
    """FedMD / DS-FL one round: average the devices' logits on ``reference_x`` and distil a copy of
    ``shipped`` toward the average (KL at ``config.temperature`` only: the reference set is
    unlabelled). Returns ``(model, consensus_logits)``."""
    if not adapted:
        raise ConfigError("federated distillation needs at least one device")
    consensus = np.mean([predict_logits(m, reference_x) for m in adapted], axis=0)
    student = copy.deepcopy(shipped)
    unlabelled = -np.ones(len(reference_x), np.int64)
    kd_train(student, reference_x.astype(np.float32), unlabelled, consensus.astype(np.float32),
             config, seed=seed)
    return student.eval(), consensus.astype(np.float32)


def oracle_teacher(
    spec: ModelSpec,
    presumed: Dataset,
    users: Sequence[UserSplit],
    config: TrainConfig,
    *,
    seed: int,
) -> nn.Module:
    """A fresh teacher trained on presumed data plus every user's raw training data (the upper
    bound DiReDi exists to avoid: it needs the users' private data in the cloud)."""
    data = Dataset.concat([presumed, *(u.train for u in users)])
    return train_classifier(build_model(spec, seed=seed), data, config, seed=seed)


def user_class_shares(data: Dataset) -> np.ndarray:
    """The true class shares of ``data`` (only the oracle may use them)."""
    counts = np.bincount(data.y, minlength=NUM_CLASSES).astype(np.float64)
    shares: np.ndarray = counts / max(float(counts.sum()), 1.0)
    return shares


def mean_user_accuracy(models: Sequence[nn.Module], users: Sequence[UserSplit], split: str) -> float:
    """Mean over users of ``models[i]``'s accuracy on user i's ``split`` ("val" or "test")."""
    if split not in ("val", "test"):
        raise ConfigError(f"split must be 'val' or 'test', got {split!r}")
    return float(np.mean([accuracy(m, getattr(u, split)) for m, u in zip(models, users, strict=True)]))


def select_on_validation(
    candidates: Sequence[T],
    build: Callable[[T], Sequence[nn.Module]],
    users: Sequence[UserSplit],
) -> tuple[T, dict[str, float]]:
    """Build the per-user models for each candidate setting and keep the one with the best mean
    accuracy on the users' *validation* splits (ties: the first candidate). Never reads a test set.
    Returns the chosen candidate and every candidate's validation score (keyed by ``str``)."""
    if not candidates:
        raise ConfigError("no candidate hyperparameters to choose from")
    scores: dict[str, float] = {}
    best: T = candidates[0]
    best_score = -1.0
    for cand in candidates:
        score = mean_user_accuracy(build(cand), users, "val")
        scores[str(cand)] = score
        if score > best_score:
            best, best_score = cand, score
    return best, scores

"""Cloud-side training: the teacher on presumed data, and knowledge distillation (KD) of a student.

KD loss (Hinton et al. 2015), per sample with weight ``w``:

    w * [ (1 - alpha) * CE(z_s, y)  +  alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) ]

on labelled samples, and ``w * T^2 * KL`` alone on unlabelled ones (label -1), where the teacher's
logits are the only target. Defaults (``KDConfig``): T = 4, alpha = 0.7, Adam lr 0.01, 40 epochs,
batch 64. The teacher is frozen during KD, so its logits are computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .data import Dataset
from .evaluate import predict_logits

__all__ = [
    "KDConfig",
    "TrainConfig",
    "distill_student",
    "kd_train",
    "kl_to_teacher",
    "train_classifier",
]


@dataclass(frozen=True)
class TrainConfig:
    """Supervised training (the teacher): Adam, cross entropy."""

    epochs: int = 30
    lr: float = 0.005
    batch_size: int = 64
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.batch_size <= 0 or self.weight_decay < 0:
            raise ConfigError(f"invalid training config {self}")


@dataclass(frozen=True)
class KDConfig:
    """Knowledge distillation of a student from a frozen teacher (defaults documented above)."""

    temperature: float = 4.0
    alpha: float = 0.7
    epochs: int = 40
    lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and 0.0 <= self.alpha <= 1.0 and self.epochs >= 0
                and self.lr > 0 and self.batch_size > 0 and self.weight_decay >= 0):
            raise ConfigError(f"invalid KD config {self}")


def train_classifier(model: nn.Module, data: Dataset, config: TrainConfig, *, seed: int) -> nn.Module:
    """Train ``model`` in place with cross entropy on ``data``; returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model.train()
    for _ in range(config.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), config.batch_size):
            idx = perm[i : i + config.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
            opt.step()
    model.eval()
    return model


def kd_train(
    student: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    teacher_logits: np.ndarray,
    config: KDConfig,
    *,
    seed: int,
    sample_weights: np.ndarray | None = None,
) -> nn.Module:
    """KD on precomputed teacher logits. ``y`` is -1 for unlabelled samples. Trains in place."""
    n = len(x)
    if teacher_logits.shape[0] != n or y.shape != (n,):
        raise ConfigError("x, y and teacher_logits must have the same number of rows")
    w = np.ones(n, np.float32) if sample_weights is None else np.asarray(sample_weights, np.float32)
    if w.shape != (n,) or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ConfigError("sample_weights must be n finite non-negative numbers")
    w = w / max(float(w.mean()), 1e-12)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y.astype(np.int64))
    zt, wt = torch.from_numpy(teacher_logits.astype(np.float32)), torch.from_numpy(w)
    t = config.temperature
    opt = torch.optim.Adam(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    student.train()
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, config.batch_size):
            idx = perm[i : i + config.batch_size]
            z = student(xt[idx])
            kl = (t * t) * F.kl_div(F.log_softmax(z / t, 1), F.log_softmax(zt[idx] / t, 1),
                                    log_target=True, reduction="none").sum(1)
            labelled = yt[idx] >= 0
            ce = F.cross_entropy(z, yt[idx].clamp(min=0), reduction="none")
            alpha = torch.where(labelled, torch.tensor(config.alpha), torch.tensor(1.0))
            per = alpha * kl + (1 - alpha) * ce * labelled.float()
            loss = (per * wt[idx]).mean()
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    student.eval()
    return student


def distill_student(
    student: nn.Module,
    teacher: nn.Module,
    labelled: Dataset,
    unlabelled_x: np.ndarray,
    config: KDConfig,
    *,
    seed: int,
    sample_weights: np.ndarray | None = None,
) -> nn.Module:
    """Distil ``student`` from the frozen ``teacher`` on ``labelled`` plus ``unlabelled_x``."""
    x = np.concatenate([labelled.x, unlabelled_x.astype(np.float32)])
    y = np.concatenate([labelled.y, -np.ones(len(unlabelled_x), np.int64)])
    return kd_train(student, x, y, predict_logits(teacher, x), config, seed=seed,
                    sample_weights=sample_weights)


@torch.no_grad()
def kl_to_teacher(student: nn.Module, teacher: nn.Module, x: np.ndarray, temperature: float = 4.0) -> float:
    """Mean KL(teacher || student) at ``temperature`` on ``x`` (what KD minimises)."""
    zs = torch.from_numpy(predict_logits(student, x)) / temperature
    zt = torch.from_numpy(predict_logits(teacher, x)) / temperature
    return float(F.kl_div(F.log_softmax(zs, 1), F.log_softmax(zt, 1), log_target=True,
                          reduction="batchmean"))

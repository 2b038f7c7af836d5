"""Accuracy, overall and per class, of a model on a labelled dataset."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data import NUM_CLASSES, Dataset

__all__ = ["Evaluation", "accuracy", "evaluate", "predict_logits"]


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Logits ``[N, C]`` of ``model`` on images ``x`` (eval mode, no gradients)."""
    model.eval()
    outs = [model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], np.float32)))
            for i in range(0, len(x), batch_size)]
    if not outs:
        return np.zeros((0, NUM_CLASSES), np.float32)
    return torch.cat(outs).numpy().astype(np.float32)


@dataclass(frozen=True)
class Evaluation:
    """``overall`` accuracy and ``per_class`` accuracy (NaN for classes absent from the set)."""

    overall: float
    per_class: tuple[float, ...]
    n: int


def evaluate(model: nn.Module, data: Dataset) -> Evaluation:
    if len(data) == 0:
        return Evaluation(float("nan"), tuple([float("nan")] * NUM_CLASSES), 0)
    pred = predict_logits(model, data.x).argmax(1)
    correct = pred == data.y
    per = []
    for c in range(NUM_CLASSES):
        mask = data.y == c
        per.append(float(correct[mask].mean()) if mask.any() else float("nan"))
    return Evaluation(float(correct.mean()), tuple(per), len(data))


def accuracy(model: nn.Module, data: Dataset) -> float:
    return evaluate(model, data).overall

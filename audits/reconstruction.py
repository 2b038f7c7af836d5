"""Reconstruction attacks on knowledge packets.

* **Gradient inversion** on ``weight_delta`` (DLG, Zhu et al. 2019, with the cosine objective of
  Geiping et al. 2020): the delta is ``-lr`` times a sum of (clipped, noised, momentum-filtered)
  mini-batch gradients over ``steps`` steps, so the attacker treats ``-delta`` as the direction of
  the average gradient at the shipped weights and optimises ``batch_size`` dummy images (in
  [0, 1] through a sigmoid) and soft labels so that their gradient points the same way. Each
  reconstruction is matched to its closest private image; PSNR and SSIM are compared with a
  data-prior baseline (as many public reference images, matched the same way): a reconstruction
  that is no closer to the private data than public images of the same kind has learnt nothing
  about the user.
* **Label recovery** on every payload kind: the user's dominant classes are read off the last-layer
  bias of a weight delta (iDLG's observation), the mean reference-logit change per class, or the
  noised histogram (prototypes travel with it); precision of the top-k guess against chance k/C.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diredi_secure.knowledge import KnowledgePayload, PayloadKind
from diredi_secure.ml.data import NUM_CLASSES, Dataset
from diredi_secure.ml.models import flat_parameters

__all__ = [
    "ReconstructionResult",
    "invert_weight_delta",
    "label_recovery",
    "psnr",
    "run_reconstruction",
    "ssim",
]


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two images in ``[0, data_range]``."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    if mse <= 0:
        return float("inf")
    return 10.0 * float(np.log10(data_range**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, window: int = 3) -> float:
    """Mean SSIM (Wang et al. 2004) over all ``window`` x ``window`` patches with uniform weights
    (8x8 images are too small for the usual 11x11 Gaussian window)."""
    x = np.asarray(a, np.float64)
    x = x.reshape(x.shape[-2], x.shape[-1])
    y = np.asarray(b, np.float64).reshape(x.shape)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    h, w = int(x.shape[0]), int(x.shape[1])
    vals = []
    for i in range(h - window + 1):
        for j in range(w - window + 1):
            px, py = x[i:i + window, j:j + window], y[i:i + window, j:j + window]
            mx, my = px.mean(), py.mean()
            vx, vy = px.var(ddof=1), py.var(ddof=1)
            cov = float(((px - mx) * (py - my)).sum() / (px.size - 1))
            vals.append(((2 * mx * my + c1) * (2 * cov + c2)) /
                        ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def _best_match(images: np.ndarray, private: np.ndarray) -> tuple[list[float], list[float]]:
    """For each image, PSNR and SSIM against its closest (by MSE) private image."""
    flat_p = private.reshape(len(private), -1).astype(np.float64)
    ps, ss = [], []
    for im in images:
        d = ((flat_p - im.reshape(-1)) ** 2).mean(axis=1)
        j = int(np.argmin(d))
        ps.append(psnr(im, private[j]))
        ss.append(ssim(im, private[j]))
    return ps, ss


def invert_weight_delta(
    shipped: nn.Module, delta: np.ndarray, *, batch_size: int, iterations: int, seed: int,
    image_shape: tuple[int, ...] = (1, 8, 8),
) -> np.ndarray:
    """DLG-style inversion: ``batch_size`` images whose gradient at the shipped weights best
    aligns (cosine) with ``-delta``. Returns images ``[B, *image_shape]`` in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(shipped).eval()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    target = -torch.from_numpy(np.asarray(delta, np.float32).reshape(-1))
    target = target / target.norm().clamp_min(1e-12)
    x_raw = torch.randn((batch_size, *image_shape), generator=gen, requires_grad=True)
    y_raw = torch.randn((batch_size, NUM_CLASSES), generator=gen, requires_grad=True)
    opt = torch.optim.Adam([x_raw, y_raw], lr=0.1)
    for _ in range(iterations):
        opt.zero_grad()
        x = torch.sigmoid(x_raw)
        logits = model(x)
        loss = torch.sum(-F.softmax(y_raw, 1) * F.log_softmax(logits, 1), 1).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        g = torch.cat([gr.reshape(-1) for gr in grads])
        obj = 1.0 - torch.dot(g, target) / g.norm().clamp_min(1e-12)
        obj.backward()
        opt.step()
    return torch.sigmoid(x_raw).detach().numpy().astype(np.float32)


def _top_classes(values: np.ndarray, k: int) -> set[int]:
    return {int(c) for c in np.argsort(-values, kind="stable")[:k]}


def label_recovery(payload: KnowledgePayload, private_labels: np.ndarray,
                   hidden_layer_bias_size: int | None = None) -> dict[str, dict[str, float]]:
    """Top-k class guesses per payload kind vs the user's true dominant classes (k = classes that
    hold at least 5 % of the user's data); chance precision is k / C."""
    counts = np.bincount(private_labels, minlength=NUM_CLASSES).astype(np.float64)
    k = max(1, int(np.sum(counts >= 0.05 * counts.sum())))
    truth = _top_classes(counts, k)
    out: dict[str, dict[str, float]] = {}

    def record(kind: str, signal: np.ndarray) -> None:
        guess = _top_classes(signal, k)
        out[kind] = {"k": float(k), "precision": len(guess & truth) / k,
                     "chance": k / NUM_CLASSES}

    wd = payload.get(PayloadKind.WEIGHT_DELTA)
    if wd is not None and wd.index is None and wd.values.size >= NUM_CLASSES:
        record("weight_delta", wd.values.reshape(-1)[-NUM_CLASSES:])  # last-layer bias
    rl = payload.get(PayloadKind.REFERENCE_LOGITS)
    if rl is not None and rl.values.ndim == 2 and rl.values.shape[1] == NUM_CLASSES:
        record("reference_logits", rl.values.mean(axis=0))
    hist = payload.get(PayloadKind.LABEL_HISTOGRAM)
    if hist is not None and hist.values.shape == (NUM_CLASSES,):
        record("label_histogram", hist.values)
    proto = payload.get(PayloadKind.DP_PROTOTYPES)
    if proto is not None and hist is not None:
        record("dp_prototypes", hist.values)
    return out


@dataclass(frozen=True)
class ReconstructionResult:
    """Gradient-inversion quality vs the data-prior baseline, and label recovery."""

    attempted: bool
    recon_psnr: float
    recon_ssim: float
    baseline_psnr: float
    baseline_ssim: float
    labels: dict[str, dict[str, float]]
    examples: np.ndarray | None = None   # a few reconstructions, for the report
    matches: np.ndarray | None = None    # their closest private images
    notes: tuple[str, ...] = field(default=())

    @property
    def beats_baseline(self) -> bool:
        return self.attempted and self.recon_psnr > self.baseline_psnr + 1.0

    def to_json(self) -> dict[str, object]:
        return {"attempted": self.attempted, "recon_psnr": self.recon_psnr,
                "recon_ssim": self.recon_ssim, "baseline_psnr": self.baseline_psnr,
                "baseline_ssim": self.baseline_ssim, "beats_baseline": self.beats_baseline,
                "labels": self.labels, "notes": list(self.notes)}


def run_reconstruction(
    shipped: nn.Module, payload: KnowledgePayload, private: Dataset, reference_x: np.ndarray, *,
    batch_size: int, lr: float, steps: int, iterations: int, trials: int, seed: int,
) -> ReconstructionResult:
    """Run both attacks on one payload (``lr`` and ``steps`` are what RD used; recorded)."""
    labels = label_recovery(payload, private.y)
    wd = payload.get(PayloadKind.WEIGHT_DELTA)
    notes = [f"RD used batch {batch_size}, lr {lr:g}, {steps} steps"]
    n_params = flat_parameters(shipped).size
    if wd is None or wd.index is not None or wd.values.size != n_params:
        notes.append("no dense weight_delta in the payload: gradient inversion not applicable")
        return ReconstructionResult(False, float("nan"), float("nan"), float("nan"),
                                    float("nan"), labels, notes=tuple(notes))
    recons = np.concatenate([
        invert_weight_delta(shipped, wd.values, batch_size=batch_size, iterations=iterations,
                            seed=seed + t)
        for t in range(trials)
    ])
    rp, rs = _best_match(recons, private.x)
    rng = np.random.default_rng(seed)
    prior = reference_x[rng.choice(len(reference_x), size=min(len(recons), len(reference_x)),
                                   replace=False)]
    bp, bs = _best_match(prior, private.x)
    order = np.argsort(rp)[::-1][:6]
    flat_p = private.x.reshape(len(private), -1)
    match = np.stack([private.x[int(np.argmin(((flat_p - recons[i].reshape(-1)) ** 2).mean(1)))]
                      for i in order])
    return ReconstructionResult(
        True, float(np.mean(rp)), float(np.mean(rs)), float(np.mean(bp)), float(np.mean(bs)),
        labels, examples=recons[order], matches=match, notes=tuple(notes))

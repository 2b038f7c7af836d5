"""Reverse distillation (RD) on the device: DP fine-tuning and extraction of the knowledge payload.

The device fine-tunes a copy of its shipped edge model on the user's private data with DP-SGD
through Opacus (per-sample clipping, Gaussian noise, Poisson sampling, PRV or RDP accountant) and a
KD "pull" toward the frozen shipped model on the user's own inputs, then extracts only what changed:

* ``reference_logits``: ``z_adapted(x) - z_shipped(x)`` on the public reference set (optionally only
  the top-m rows by L2 disagreement), post-processing of the DP model: no extra privacy cost.
* ``weight_delta``: ``theta_adapted - theta_shipped`` flat over trainable parameters in state_dict
  order (optionally top-k by magnitude), also post-processing.
* ``label_histogram``: class counts + Gaussian noise (L2 sensitivity 1 under add/remove one
  example), its own epsilon.
* ``dp_prototypes``: per-class sums of inputs clipped to L2 norm ``prototype_clip`` + Gaussian noise
  (sensitivity ``prototype_clip``), divided by the noised counts: the user's input domain, its own
  epsilon. Requesting prototypes also sends the histogram (its counts are the denominator).

Every epsilon comes from an Opacus accountant; the total composes DP-SGD with the noised entries in
one accountant history at the same delta. Opacus is wrapped here and nowhere else.

The noise multiplier for a target epsilon is searched once per setting (``get_noise_multiplier``,
cached) and passed to ``make_private``: the search costs seconds with the PRV accountant.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..knowledge import DPParameters, KnowledgePayload, PayloadKind, PayloadTensor, WireDType
from .data import NUM_CLASSES, Dataset
from .evaluate import accuracy, predict_logits
from .models import flat_parameters

__all__ = [
    "RDConfig",
    "RDResult",
    "default_learning_rate",
    "extract_payload",
    "gaussian_epsilon",
    "noise_multiplier_for",
    "reverse_distill",
    "select_rd_config",
]

AccountantName = Literal["prv", "rdp"]
NON_PRIVATE_ACCOUNTANT = "none"


def default_learning_rate(noise_multiplier: float) -> float:
    """SGD learning rate per noise level (METHOD-NOTES: lr 0.1 at sigma 8.7 destroyed the model).

    Chosen on validation splits: 0.02 for sigma >= 6 (about epsilon 1), 0.05 for sigma >= 2.5
    (about epsilon 4), 0.1 below (epsilon 8 and non-private).
    """
    if noise_multiplier >= 6.0:
        return 0.02
    if noise_multiplier >= 2.5:
        return 0.05
    return 0.1


@dataclass(frozen=True)
class RDConfig:
    """Reverse-distillation settings. ``epsilon=math.inf`` (and no ``noise_multiplier``) means the
    non-private baseline mode: plain SGD, header accountant ``"none"`` and epsilon ``inf``.

    ``delta`` defaults to ``1 / (10 N)`` for N training examples. ``lr`` defaults per noise level
    (:func:`default_learning_rate`). ``pull_weight`` weighs ``T^2 KL(shipped || adapted)`` on the
    user's inputs (0.1: 0.5 blocked learning new classes in the prototype).
    """

    epsilon: float = 8.0
    delta: float | None = None
    noise_multiplier: float | None = None
    clip_norm: float = 1.0
    batch_size: int = 50
    epochs: int = 30
    lr: float | None = None
    momentum: float = 0.9
    pull_weight: float = 0.1
    pull_temperature: float = 2.0
    accountant: AccountantName = "prv"
    kinds: tuple[PayloadKind, ...] = (PayloadKind.REFERENCE_LOGITS,)
    top_m: int | None = None
    logits_dtype: WireDType = "float16"
    top_k: int | None = None
    # 4-bit delta and prototypes: docs/PAYLOAD-SIZE.md measured no accuracy change against fp16
    # (within noise, eps 8, 2 seeds x 3 noise draws) at a third of the bytes.
    delta_dtype: WireDType = "int4"
    prototype_dtype: WireDType = "int4"
    histogram_epsilon: float = 0.5
    prototype_epsilon: float = 2.0
    prototype_clip: float = 3.5

    def __post_init__(self) -> None:
        if not (self.epsilon > 0) or (self.noise_multiplier is not None and self.noise_multiplier < 0):
            raise ConfigError("epsilon must be > 0 (inf for non-private); noise multiplier >= 0")
        if self.delta is not None and not (0 < self.delta < 1):
            raise ConfigError(f"delta must lie in (0, 1), got {self.delta}")
        if self.clip_norm <= 0 or self.batch_size <= 0 or self.epochs < 0 or self.pull_weight < 0:
            raise ConfigError("clip_norm and batch_size must be > 0, epochs and pull_weight >= 0")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError("lr must be > 0")
        if self.accountant not in ("prv", "rdp"):
            raise ConfigError(f"accountant must be 'prv' or 'rdp', got {self.accountant!r}")
        if not self.kinds:
            raise ConfigError("at least one payload kind is needed")
        if self.histogram_epsilon <= 0 or self.prototype_epsilon <= 0 or self.prototype_clip <= 0:
            raise ConfigError("histogram/prototype epsilon and prototype clip must be > 0")
        for n in (self.top_m, self.top_k):
            if n is not None and n <= 0:
                raise ConfigError("top_m / top_k must be positive")

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None or math.isfinite(self.epsilon)


@dataclass(frozen=True)
class RDResult:
    """What RD produced: the payload, the DP parameters actually spent (for the packet header),
    the adapted model (stays on the device) and a few diagnostics."""

    payload: KnowledgePayload
    dp: DPParameters
    adapted: nn.Module
    lr: float
    info: dict[str, float] = field(default_factory=dict)


@functools.lru_cache(maxsize=256)
def noise_multiplier_for(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Smallest noise multiplier reaching ``epsilon`` (Opacus' search, cached per setting)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=accountant))


def _accountant(name: str, history: list[tuple[float, float, int]]) -> object:
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if name == "prv" else RDPAccountant()
    acc.history = list(history)
    return acc


def composed_epsilon(name: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of the composition of the mechanisms in ``history`` (sigma, q, steps) at ``delta``."""
    if not history:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(_accountant(name, history).get_epsilon(delta))  # type: ignore[attr-defined]


def gaussian_epsilon(noise_multiplier: float, delta: float, accountant: str = "prv") -> float:
    """Epsilon of one release of the Gaussian mechanism with this noise multiplier."""
    return composed_epsilon(accountant, [(noise_multiplier, 1.0, 1)], delta)


def _train_private(
    model: nn.Module, shipped: nn.Module, data: Dataset, config: RDConfig, *,
    noise_multiplier: float, sample_rate: float, lr: float, seed: int,
) -> tuple[nn.Module, float, int]:
    """DP-SGD through Opacus. Returns (unwrapped model, epsilon spent, steps)."""
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum)
    engine = PrivacyEngine(accountant=config.accountant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=noise_multiplier, max_grad_norm=config.clip_norm,
            poisson_sampling=True, noise_generator=torch.Generator().manual_seed(seed + 1),
        )
    # Opacus 1.6 returns 3 values in hook mode and 4 with fast gradient clipping.
    dp_model, dp_opt, dp_loader = wrapped[0], wrapped[1], wrapped[-1]
    delta = _delta(config, len(data))
    dp_model.train()
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    for _ in range(config.epochs):
        for x, y in dp_loader:
            dp_opt.zero_grad()
            loss = _rd_loss(dp_model, shipped, x, y, config)
            loss.backward()  # type: ignore[no-untyped-call]
            dp_opt.step()  # also on an empty Poisson batch: noise only, and the step is counted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps = float(engine.get_epsilon(delta))
    steps = sum(s for _, _, s in engine.accountant.history)
    inner: nn.Module = dp_model._module
    # Drop the hooks Opacus attached so the returned model is a plain module.
    dp_model.remove_hooks()
    inner.eval()
    return inner, eps, int(steps)


def _rd_loss(
    model: nn.Module, shipped: nn.Module, x: torch.Tensor, y: torch.Tensor, config: RDConfig
) -> torch.Tensor:
    z: torch.Tensor = model(x)
    if x.shape[0] == 0:
        return z.sum() * 0.0  # empty Poisson batch: zero gradient, noise is still added
    loss = F.cross_entropy(z, y)
    if config.pull_weight > 0:
        t = config.pull_temperature
        with torch.no_grad():
            zs = shipped(x)
        pull = F.kl_div(F.log_softmax(z / t, 1), F.log_softmax(zs / t, 1), log_target=True,
                        reduction="batchmean")
        loss = loss + config.pull_weight * t * t * pull
    return loss


def _train_plain(
    model: nn.Module, shipped: nn.Module, data: Dataset, config: RDConfig, *, lr: float, seed: int
) -> tuple[nn.Module, int]:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum)
    model.train()
    steps = 0
    for _ in range(config.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), config.batch_size):
            idx = perm[i : i + config.batch_size]
            optimizer.zero_grad()
            loss = _rd_loss(model, shipped, x[idx], y[idx], config)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            steps += 1
    model.eval()
    return model, steps


def _delta(config: RDConfig, n: int) -> float:
    return config.delta if config.delta is not None else 1.0 / (10.0 * max(n, 1))


def _top_rows(diff: np.ndarray, m: int | None) -> np.ndarray | None:
    if m is None or m >= diff.shape[0]:
        return None
    score = np.linalg.norm(diff, axis=1)
    return np.sort(np.argsort(-score, kind="stable")[:m]).astype(np.int64)


def extract_payload(
    adapted: nn.Module,
    shipped: nn.Module,
    data: Dataset,
    reference_x: np.ndarray,
    config: RDConfig,
    *,
    delta: float,
    rng: np.random.Generator,
) -> tuple[KnowledgePayload, list[tuple[float, float, int]]]:
    """Build the payload entries ``config.kinds`` asks for.

    Returns the payload and the accountant history entries of the noised releases (for the
    composed epsilon). In non-private mode nothing is noised and entries carry epsilon 0.
    """
    private = config.private
    entries: list[PayloadTensor] = []
    history: list[tuple[float, float, int]] = []
    kinds = set(config.kinds)
    if PayloadKind.REFERENCE_LOGITS in kinds:
        diff = predict_logits(adapted, reference_x) - predict_logits(shipped, reference_x)
        index = _top_rows(diff, config.top_m)
        values = diff if index is None else diff[index]
        entries.append(PayloadTensor("reference_logits", PayloadKind.REFERENCE_LOGITS, values,
                                     dtype=config.logits_dtype, index=index))
    if PayloadKind.WEIGHT_DELTA in kinds:
        delta_vec = flat_parameters(adapted) - flat_parameters(shipped)
        windex: np.ndarray | None = None
        if config.top_k is not None and config.top_k < delta_vec.size:
            windex = np.sort(np.argsort(-np.abs(delta_vec), kind="stable")[: config.top_k])
            delta_vec = delta_vec[windex]
        entries.append(PayloadTensor("weight_delta", PayloadKind.WEIGHT_DELTA, delta_vec,
                                     dtype=config.delta_dtype, index=windex))
    want_protos = PayloadKind.DP_PROTOTYPES in kinds
    if PayloadKind.LABEL_HISTOGRAM in kinds or want_protos:
        counts = np.bincount(data.y, minlength=NUM_CLASSES).astype(np.float64)
        sigma_h, eps_h = 0.0, 0.0
        if private:
            sigma_h = noise_multiplier_for(config.histogram_epsilon, delta, 1.0, 1, config.accountant)
            eps_h = gaussian_epsilon(sigma_h, delta, config.accountant)
            history.append((sigma_h, 1.0, 1))
            counts = counts + rng.normal(0.0, sigma_h, size=counts.shape)
        entries.append(PayloadTensor("label_histogram", PayloadKind.LABEL_HISTOGRAM,
                                     counts.astype(np.float32), dtype="float32",
                                     noise_multiplier=sigma_h, epsilon=eps_h))
        if want_protos:
            flat = data.x.reshape(len(data), -1).astype(np.float64)
            norms = np.linalg.norm(flat, axis=1, keepdims=True)
            flat = flat * np.minimum(1.0, config.prototype_clip / np.maximum(norms, 1e-12))
            sums = np.zeros((NUM_CLASSES, flat.shape[1]))
            np.add.at(sums, data.y, flat)
            sigma_p, eps_p = 0.0, 0.0
            if private:
                sigma_p = noise_multiplier_for(config.prototype_epsilon, delta, 1.0, 1,
                                               config.accountant)
                eps_p = gaussian_epsilon(sigma_p, delta, config.accountant)
                history.append((sigma_p, 1.0, 1))
                sums = sums + rng.normal(0.0, sigma_p * config.prototype_clip, size=sums.shape)
            protos = np.clip(sums / np.maximum(counts, 1.0)[:, None], 0.0, 1.0)  # post-processing
            entries.append(PayloadTensor("dp_prototypes", PayloadKind.DP_PROTOTYPES,
                                         protos.astype(np.float32), dtype=config.prototype_dtype,
                                         noise_multiplier=sigma_p, epsilon=eps_p))
    return KnowledgePayload(tuple(entries)), history


def reverse_distill(
    shipped: nn.Module,
    data: Dataset,
    reference_x: np.ndarray,
    config: RDConfig,
    *,
    seed: int,
    rng: np.random.Generator | None = None,
) -> RDResult:
    """Fine-tune a copy of ``shipped`` on the user's ``data`` with DP-SGD and extract the payload.

    ``shipped`` is not modified; a frozen deep copy (never wrapped by Opacus) gives the pull term's
    targets. Raises :class:`ConfigError` for an empty dataset or invalid settings.
    """
    if len(data) == 0:
        raise ConfigError("reverse distillation needs at least one training example")
    rng = rng if rng is not None else np.random.default_rng(seed)
    frozen = copy.deepcopy(shipped).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    model = copy.deepcopy(shipped).train()
    for p in model.parameters():
        p.requires_grad_(True)
    n = len(data)
    delta = _delta(config, n)
    # Opacus' Poisson loader samples each example with q = 1 / len(loader) and runs len(loader)
    # steps per epoch; account with exactly those numbers.
    batches = max(1, math.ceil(n / config.batch_size))
    sample_rate = 1.0 / batches
    planned_steps = config.epochs * batches
    if config.private:
        sigma = (config.noise_multiplier if config.noise_multiplier is not None else
                 noise_multiplier_for(config.epsilon, delta, sample_rate, planned_steps,
                                      config.accountant))
        lr = config.lr if config.lr is not None else default_learning_rate(sigma)
        adapted, eps, steps = _train_private(model, frozen, data, config, noise_multiplier=sigma,
                                             sample_rate=sample_rate, lr=lr, seed=seed)
    else:
        sigma = 0.0
        lr = config.lr if config.lr is not None else default_learning_rate(0.0)
        adapted, steps = _train_plain(model, frozen, data, config, lr=lr, seed=seed)
        eps = math.inf
    payload, history = extract_payload(adapted, frozen, data, reference_x, config, delta=delta,
                                       rng=rng)
    if config.private:
        total = composed_epsilon(config.accountant, [(sigma, sample_rate, steps), *history], delta)
        dp = DPParameters(noise_multiplier=sigma, clip_norm=config.clip_norm,
                          sample_rate=sample_rate, steps=steps, accountant=config.accountant,
                          epsilon=eps, delta=delta, poisson_sampling=True,
                          total_epsilon=max(total, eps))
    else:
        dp = DPParameters(noise_multiplier=0.0, clip_norm=0.0, sample_rate=sample_rate,
                          steps=steps, accountant=NON_PRIVATE_ACCOUNTANT, epsilon=math.inf,
                          delta=0.0, poisson_sampling=False, total_epsilon=math.inf)
    return RDResult(payload=payload, dp=dp, adapted=adapted, lr=lr)


def select_rd_config(
    shipped: nn.Module,
    train: Dataset,
    val: Dataset,
    reference_x: np.ndarray,
    base: RDConfig,
    *,
    lrs: tuple[float, ...] = (0.02, 0.05, 0.1),
    pull_weights: tuple[float, ...] = (0.1,),
    seed: int,
) -> tuple[RDConfig, dict[tuple[float, float], float]]:
    """Choose the learning rate and pull weight for ``base``'s noise level on the user's
    validation split (never a test set). Each trial is a full DP run; the device should charge
    the tuning runs to its budget (or tune on a proxy), which the caller decides."""
    scores: dict[tuple[float, float], float] = {}
    for lr in lrs:
        for pw in pull_weights:
            cfg = replace(base, lr=lr, pull_weight=pw,
                          kinds=(PayloadKind.REFERENCE_LOGITS,), top_m=None)
            res = reverse_distill(shipped, train, reference_x, cfg, seed=seed)
            scores[(lr, pw)] = accuracy(res.adapted, val)
    best = max(scores, key=lambda k: (scores[k], -k[0]))
    return replace(base, lr=best[0], pull_weight=best[1]), scores

"""Reverse distillation (RD) on the device: DP fine-tuning and extraction of the knowledge payload.

The device fine-tunes a copy of its shipped edge model on the user's private data with DP-SGD
through Opacus (per-sample clipping, Gaussian noise, Poisson sampling) and a KD "pull" toward the
frozen shipped model on the user's own inputs, then extracts only what changed:

* ``reference_logits``: ``z_adapted(x) - z_shipped(x)`` on the public reference set (optionally only
  the top-m rows by L2 disagreement), post-processing of the DP model: no extra privacy cost.
* ``weight_delta``: ``theta_adapted - theta_shipped`` flat over trainable parameters in state_dict
  order (optionally top-k by magnitude), also post-processing.
* ``label_histogram``: class counts + discrete Gaussian noise (L2 sensitivity 1 under add/remove
  one example), its own epsilon.
* ``dp_prototypes``: per-class sums of inputs clipped to L2 norm ``prototype_clip`` + Gaussian noise
  (sensitivity ``prototype_clip``), divided by the noised counts: the user's input domain, its own
  epsilon. Requesting prototypes also sends the histogram (its counts are the denominator).

Every DP parameter and epsilon comes from :mod:`diredi_secure.privacy` (the schedule fixes them
from the policy and the target epsilon; the noise source is CSPRNG-seeded per run). Opacus is
wrapped here and nowhere else; its own accountant is not consulted.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..knowledge import DPParameters, KnowledgePayload, PayloadKind, PayloadTensor, WireDType
from ..privacy import (
    ACCOUNTANT,
    DEFAULT_DP_POLICY,
    DPPolicy,
    Mechanism,
    MechanismKind,
    NoiseSource,
    RDSchedule,
    gaussian_epsilon,
    mechanisms_epsilon,
    schedule_for,
)
from .data import NUM_CLASSES, Dataset
from .evaluate import accuracy, predict_logits
from .models import flat_parameters

__all__ = [
    "DEFAULT_PAYLOAD_KINDS",
    "GRAD_SAMPLE_MODES",
    "RDConfig",
    "RDResult",
    "default_grad_sample_mode",
    "default_learning_rate",
    "dp_parameters_for",
    "extract_payload",
    "reverse_distill",
    "select_rd_config",
    "trials_epsilon",
]

NON_PRIVATE_ACCOUNTANT = "none"

#: The payload a device sends by default, everywhere (`edge reverse`, the agent, the demo, the
#: loop): a 4-bit weight delta, 4-bit DP prototypes and the noised label histogram they need.
#: Reference logits next to a delta are dead weight (the merge rebuilds them from the delta).
DEFAULT_PAYLOAD_KINDS: tuple[PayloadKind, ...] = (
    PayloadKind.WEIGHT_DELTA, PayloadKind.DP_PROTOTYPES, PayloadKind.LABEL_HISTOGRAM)


def default_learning_rate(noise_multiplier: float) -> float:
    """SGD learning rate per noise level, monotone in the noise: 0.02 for sigma >= 6 (about a total
    epsilon of 1 under the default policy), 0.05 for sigma >= 2.5, 0.1 below (chosen on
    validation splits; METHOD-NOTES: lr 0.1 at sigma 8.7 destroyed the model)."""
    if noise_multiplier >= 6.0:
        return 0.02
    if noise_multiplier >= 2.5:
        return 0.05
    return 0.1


@dataclass(frozen=True)
class RDConfig:
    """Reverse-distillation settings.

    ``epsilon`` is the packet's *total* target: DP-SGD composed with every noised entry asked for
    spends exactly this at the policy's delta (``privacy.schedule_for``). Every DP parameter on the
    wire comes from ``policy`` and ``epsilon``, never from the user's data: sample rate
    ``1/policy.batches_per_epoch``, ``epochs * batches_per_epoch`` steps, the policy's clip norm
    and delta. ``epsilon=math.inf`` is the non-private baseline (plain SGD, accountant "none").

    ``noise_multiplier`` overrides the DP-SGD noise (research and audit controls; the header then
    declares what it implies). ``research_seed`` makes every private draw deterministic for
    research only: the header records it and the cloud's default policy refuses the packet.
    """

    epsilon: float = 8.0
    noise_multiplier: float | None = None
    epochs: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    pull_weight: float = 0.1
    pull_temperature: float = 2.0
    kinds: tuple[PayloadKind, ...] = (PayloadKind.REFERENCE_LOGITS,)
    top_m: int | None = None
    logits_dtype: WireDType = "float16"
    top_k: int | None = None
    # 4-bit delta and prototypes: docs/PAYLOAD-SIZE.md measured no accuracy change against fp16
    # (within noise, eps 8, 2 seeds x 3 noise draws) at a third of the bytes.
    delta_dtype: WireDType = "int4"
    prototype_dtype: WireDType = "int4"
    research_seed: int | None = None
    policy: DPPolicy = DEFAULT_DP_POLICY

    def __post_init__(self) -> None:
        if not (self.epsilon > 0) or (self.noise_multiplier is not None and self.noise_multiplier <= 0):
            raise ConfigError("epsilon must be > 0 (inf for non-private); noise multiplier > 0")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError("epochs must be >= 1")
        if self.pull_weight < 0:
            raise ConfigError("pull_weight must be >= 0")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError("lr must be > 0")
        if not self.kinds:
            raise ConfigError("at least one payload kind is needed")
        if self.research_seed is not None and self.research_seed < 0:
            raise ConfigError("research_seed must be >= 0")
        for n in (self.top_m, self.top_k):
            if n is not None and n <= 0:
                raise ConfigError("top_m / top_k must be positive")

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None or math.isfinite(self.epsilon)

    @property
    def steps(self) -> int:
        """Data-independent step count: epochs times the policy's batches per epoch."""
        return (self.epochs or self.policy.epochs) * self.policy.batches_per_epoch

    def schedule(self) -> RDSchedule:
        """The DP parameters this configuration puts on the wire (same for every user)."""
        kinds = set(self.kinds)
        policy = self.policy if self.epochs is None else replace(self.policy, epochs=self.epochs)
        return schedule_for(float(self.epsilon), histogram=PayloadKind.LABEL_HISTOGRAM in kinds,
                            prototypes=PayloadKind.DP_PROTOTYPES in kinds, policy=policy)

    def noise_source(self) -> NoiseSource:
        return (NoiseSource.seeded(self.research_seed) if self.research_seed is not None
                else NoiseSource.secure())


@dataclass(frozen=True)
class RDResult:
    """What RD produced: the payload, the DP parameters actually spent (for the packet header),
    the adapted model (stays on the device) and a few diagnostics."""

    payload: KnowledgePayload
    dp: DPParameters
    adapted: nn.Module
    lr: float
    info: dict[str, float] = field(default_factory=dict)


#: Opacus's ways of computing per-sample gradients ("ghost" clipping needs a wrapped criterion and
#: is not offered).
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "ew", "functorch")


def default_grad_sample_mode(model: nn.Module) -> str:
    """The fastest Opacus grad-sample mode for ``model``'s kind, as ``diredi bench rd`` measured it
    on the project's student models (same parameters in every mode, to float rounding; CPU time,
    the shared machines' wall clock being noisier): ExpandedWeights (``ew``) for a model without
    convolutions (the digits MLP: 1.5-2.9x plain SGD per epoch, against 1.7-3.1x with ``hooks``
    and 4-6x with ``functorch``), ``functorch`` for one with them (the MNIST depthwise-separable
    CNN, a 2-epoch DP run at 150 / 300 examples: 1.10 / 1.45 s, against 1.17 / 1.98 s with ``ew``
    and 1.26 / 2.29 s with ``hooks``)."""
    has_conv = any(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in model.modules())
    return "functorch" if has_conv else "ew"


def _train_private(
    model: nn.Module, shipped: nn.Module, data: Dataset, config: RDConfig, *,
    noise_multiplier: float, lr: float, noise: NoiseSource,
    grad_sample_mode: str | None = None,
) -> nn.Module:
    """DP-SGD through Opacus with the schedule's Poisson rate and step count (not N's): the
    sampling masks and the gradient noise both come from ``noise`` (CSPRNG-seeded by default).

    The batches come from Opacus's own Poisson sampler (``UniformWithReplacementSampler``: one
    independent Bernoulli(``q``) mask over the N examples per step, ``config.steps`` masks) indexing
    the tensors directly: the same draws a ``DPDataLoader`` makes, without its per-example fetch and
    collate (a third of a small model's DP step). ``grad_sample_mode`` is one of
    :data:`GRAD_SAMPLE_MODES` (default: :func:`default_grad_sample_mode`); it changes how the
    per-example gradients are computed, not the mechanism."""
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    mode = default_grad_sample_mode(model) if grad_sample_mode is None else grad_sample_mode
    if mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {mode!r}")
    policy = config.policy
    x_all, y_all = torch.from_numpy(data.x), torch.from_numpy(data.y)
    # Opacus reads the Poisson rate (1/len) and the dataset size from a loader; it never iterates it.
    shape_only = DPDataLoader(torch.utils.data.TensorDataset(x_all, y_all),
                              sample_rate=policy.sample_rate)
    sampler = UniformWithReplacementSampler(num_samples=len(data), sample_rate=policy.sample_rate,
                                            generator=noise.torch_generator(), steps=config.steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG off": docs/PRIVACY.md, floating point
        engine = PrivacyEngine(accountant="rdp")  # its accountant is unused: privacy/ is
        wrapped = engine.make_private(
            module=model, optimizer=optimizer, data_loader=shape_only,
            noise_multiplier=noise_multiplier, max_grad_norm=policy.clip_norm,
            poisson_sampling=False, noise_generator=noise.torch_generator(),
            grad_sample_mode=mode,
        )
    dp_model, dp_opt = wrapped[0], wrapped[1]
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Opacus truncates q N to an int; the unbiased average divides by q N itself.
    dp_opt.expected_batch_size = max(policy.sample_rate * len(data), 1.0)
    dp_model.train()
    with warnings.catch_warnings():
        # Once per backward with "hooks": the input needs no gradient, which is the case here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing",
                                category=UserWarning)
        for indices in sampler:
            dp_opt.zero_grad()
            if indices:
                idx = torch.as_tensor(indices, dtype=torch.long)
                loss = _rd_loss(dp_model, shipped, x_all[idx], y_all[idx], config)
                loss.backward()  # type: ignore[no-untyped-call]
            else:
                # An empty Poisson batch has no per-sample gradients (ExpandedWeights refuses a
                # batch of 0): say so, and the step below adds noise only, as for any batch.
                for p in trainable:
                    p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
            dp_opt.step()  # also on an empty Poisson batch: noise only, and the step is counted
    inner: nn.Module = dp_model._module
    dp_model.remove_hooks()
    inner.eval()
    return inner


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
    model: nn.Module, shipped: nn.Module, data: Dataset, config: RDConfig, *, lr: float,
    gen: torch.Generator,
) -> tuple[nn.Module, int]:
    batch_size = max(1, math.ceil(len(data) / config.policy.batches_per_epoch))
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum)
    model.train()
    steps = 0
    for _ in range(config.epochs or config.policy.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            optimizer.zero_grad()
            loss = _rd_loss(model, shipped, x[idx], y[idx], config)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            steps += 1
    model.eval()
    return model, steps


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
    schedule: RDSchedule | None,
    noise: NoiseSource,
) -> KnowledgePayload:
    """Build the payload entries ``config.kinds`` asks for.

    ``schedule`` gives the histogram's and prototypes' noise multipliers (``None``: non-private
    mode, nothing is noised and entries carry epsilon 0). The histogram is released with OpenDP's
    discrete Gaussian (sensitivity 1), the prototype sums with a Gaussian of std
    ``sigma * prototype_clip`` (sensitivity ``prototype_clip``); all noise comes from ``noise``.
    """
    entries: list[PayloadTensor] = []
    kinds = set(config.kinds)
    delta = config.policy.delta
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
        if schedule is not None:
            if schedule.histogram_noise_multiplier is None:
                raise ConfigError("the DP schedule has no histogram noise: schedule and payload "
                                  "kinds disagree (the histogram is sent with the prototypes)")
            sigma_h = schedule.histogram_noise_multiplier
            eps_h = gaussian_epsilon(sigma_h, delta)
            counts = noise.discrete_gaussian(counts, sigma_h)
        entries.append(PayloadTensor("label_histogram", PayloadKind.LABEL_HISTOGRAM,
                                     counts.astype(np.float32), dtype="float32",
                                     noise_multiplier=sigma_h, epsilon=eps_h))
        if want_protos:
            clip = config.policy.prototype_clip
            flat = data.x.reshape(len(data), -1).astype(np.float64)
            norms = np.linalg.norm(flat, axis=1, keepdims=True)
            flat = flat * np.minimum(1.0, clip / np.maximum(norms, 1e-12))
            sums = np.zeros((NUM_CLASSES, flat.shape[1]))
            np.add.at(sums, data.y, flat)
            sigma_p, eps_p = 0.0, 0.0
            if schedule is not None:
                if schedule.prototype_noise_multiplier is None:
                    raise ConfigError("the DP schedule has no prototype noise: schedule and "
                                      "payload kinds disagree")
                sigma_p = schedule.prototype_noise_multiplier
                eps_p = gaussian_epsilon(sigma_p, delta)
                sums = sums + noise.numpy().normal(0.0, sigma_p * clip, size=sums.shape)
            protos = np.clip(sums / np.maximum(counts, 1.0)[:, None], 0.0, 1.0)  # post-processing
            entries.append(PayloadTensor("dp_prototypes", PayloadKind.DP_PROTOTYPES,
                                         protos.astype(np.float32), dtype=config.prototype_dtype,
                                         noise_multiplier=sigma_p, epsilon=eps_p))
    return KnowledgePayload(tuple(entries))


def dp_parameters_for(
    config: RDConfig, *, seeded: bool, schedule: RDSchedule | None = None
) -> DPParameters:
    """The header's DP block for ``config``: a function of the policy and the target alone
    (``privacy.account_packet`` recomputes exactly these figures on the cloud).

    ``schedule`` is ``config.schedule()`` when the caller has it already. Its epsilons are the
    accountant's figures for the schedule's own noise; only a ``noise_multiplier`` override is
    accounted afresh (the same accountant, the same mechanisms, the same floats)."""
    sched = config.schedule() if schedule is None else schedule
    policy = config.policy
    if config.noise_multiplier is None:
        sigma, eps, total = sched.noise_multiplier, sched.training_epsilon, sched.total_epsilon
    else:
        sigma = config.noise_multiplier
        mechs = [Mechanism(MechanismKind.DP_SGD, sigma, policy.sample_rate, config.steps)]
        if sched.histogram_noise_multiplier is not None:
            mechs.append(Mechanism(MechanismKind.LABEL_HISTOGRAM, sched.histogram_noise_multiplier))
        if sched.prototype_noise_multiplier is not None:
            mechs.append(Mechanism(MechanismKind.DP_PROTOTYPES, sched.prototype_noise_multiplier))
        eps = mechanisms_epsilon(mechs[:1], policy.delta)
        total = mechanisms_epsilon(mechs, policy.delta)
    return DPParameters(
        noise_multiplier=sigma, clip_norm=policy.clip_norm, sample_rate=policy.sample_rate,
        steps=config.steps, accountant=ACCOUNTANT, epsilon=eps, delta=policy.delta,
        poisson_sampling=True, total_epsilon=total, noise_seeded=seeded,
    )


def reverse_distill(
    shipped: nn.Module,
    data: Dataset,
    reference_x: np.ndarray,
    config: RDConfig,
    *,
    noise: NoiseSource | None = None,
) -> RDResult:
    """Fine-tune a copy of ``shipped`` on the user's ``data`` with DP-SGD and extract the payload.

    Every private draw (Poisson masks, DP-SGD noise, histogram and prototype noise) comes from
    ``noise``: by default a fresh CSPRNG-seeded source (``config.research_seed`` makes it
    deterministic and the header says so). ``shipped`` is not modified; a frozen deep copy gives
    the pull term's targets. Raises :class:`ConfigError` for an empty dataset or invalid settings.
    """
    if len(data) == 0:
        raise ConfigError("reverse distillation needs at least one training example")
    noise = noise if noise is not None else config.noise_source()
    frozen = copy.deepcopy(shipped).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    model = copy.deepcopy(shipped).train()
    for p in model.parameters():
        p.requires_grad_(True)
    if config.private:
        schedule: RDSchedule | None = config.schedule()
        dp = dp_parameters_for(config, seeded=noise.is_seeded, schedule=schedule)
        lr = config.lr if config.lr is not None else default_learning_rate(dp.noise_multiplier)
        adapted = _train_private(model, frozen, data, config, noise_multiplier=dp.noise_multiplier,
                                 lr=lr, noise=noise)
    else:
        schedule = None
        lr = config.lr if config.lr is not None else default_learning_rate(0.0)
        adapted, _ = _train_plain(model, frozen, data, config, lr=lr,
                                      gen=noise.torch_generator())
        dp = DPParameters(noise_multiplier=0.0, clip_norm=0.0,
                          sample_rate=config.policy.sample_rate, steps=config.steps,
                          accountant=NON_PRIVATE_ACCOUNTANT, epsilon=math.inf, delta=0.0,
                          poisson_sampling=False, total_epsilon=math.inf,
                          noise_seeded=noise.is_seeded)
    payload = extract_payload(adapted, frozen, data, reference_x, config, schedule=schedule,
                              noise=noise)
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
) -> tuple[RDConfig, dict[tuple[float, float], float]]:
    """Choose the learning rate and pull weight for ``base``'s noise level on the user's
    validation split (never a test set).

    Each trial is a full DP-SGD run on the user's data and releases a choice that depends on it:
    the tuning costs privacy. ``trials_epsilon`` (below) is what the trials add to the packet's
    spend; a device must charge it (docs/PRIVACY.md, "Tuning"). The research loop uses this; the
    shipped device path never does (it uses :func:`default_learning_rate`)."""
    scores: dict[tuple[float, float], float] = {}
    for lr in lrs:
        for pw in pull_weights:
            cfg = replace(base, lr=lr, pull_weight=pw,
                          kinds=(PayloadKind.REFERENCE_LOGITS,), top_m=None)
            res = reverse_distill(shipped, train, reference_x, cfg)
            scores[(lr, pw)] = accuracy(res.adapted, val)
    best = max(scores, key=lambda k: (scores[k], -k[0]))
    return replace(base, lr=best[0], pull_weight=best[1]), scores


def trials_epsilon(base: RDConfig, trials: int) -> float:
    """Epsilon (at the policy's delta) of ``trials`` DP-SGD runs of ``base``'s schedule: what
    :func:`select_rd_config` spends before the released run."""
    dp = dp_parameters_for(replace(base, kinds=(PayloadKind.REFERENCE_LOGITS,)), seeded=False)
    m = Mechanism(MechanismKind.DP_SGD, dp.noise_multiplier, dp.sample_rate, dp.steps * trials)
    return mechanisms_epsilon([m], base.policy.delta)

"""The end-to-end privacy audit of reverse distillation on one scenario.

Threat model. The adversary is the cloud (or anyone who obtains a device's packets): it knows the
shipped edge model, the public reference set, the RD algorithm and its hyperparameters, and, as DP
allows, every record of the user's data except the one in question (the auditor grants it that
knowledge to run shadow RD runs). It sees the decoded payload of one packet. The unit of privacy is
one training example of the user (add/remove one example, DP-SGD's neighbouring relation). A white-
box bound attacks the DP-adapted model itself, which never leaves the device.

One audit run attacks the exact configuration devices ship (``AuditConfig.rd``: same payload
kinds, the policy's N-independent DP parameters and delta) and every mechanism in its packet:

1. build the shipped student (supervised on the manufacturer's presumed data; KD from the teacher
   does not change what RD leaks, and is skipped for speed);
2. draw ``m`` canaries (random sparse binary patterns with a random label: off the data manifold,
   so only memorisation fits them), each put into the user's training data with probability 1/2;
3. run RD once with the device implementation under test (honest, or a lying control of
   :class:`~.mechanisms.LyingDevice`), encode and decode the payload as the cloud would; the
   header is what the honest configuration declares;
4. build what the cloud can build: for ``weight_delta`` the adapted model (shipped + delta), for
   ``reference_logits`` a surrogate distilled from the shipped model towards ``z_shipped + diff`` on
   the reference set; plus the white-box adapted model;
5. DP-SGD: score every canary with the loss-threshold attack and offline LiRA (``shadows`` device
   runs on the user's data without canaries) on every channel; ROC test and one-run bound against
   DP-SGD's own epsilon; the noise floor (shadow runs against the auditor's honest reference runs);
6. histogram and prototypes: neighbouring-dataset trials of the device's release code
   (:func:`~.mechanisms.run_release_trials`), tested against their own epsilons;
7. accounting (``privacy.account_packet``), packet inspection, reconstruction attacks;
8. per mechanism pass / fail / inconclusive (claim above the ceiling of its attack), and the
   overall verdict (see :func:`decide_verdict`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from diredi_secure.errors import ConfigError
from diredi_secure.knowledge import (
    DPParameters,
    KnowledgePayload,
    PayloadKind,
    decode_payload,
    encode_payload,
)
from diredi_secure.ml.data import Dataset, Scenario, make_scenario
from diredi_secure.ml.distill import KDConfig, TrainConfig, kd_train, train_classifier
from diredi_secure.ml.evaluate import accuracy, predict_logits
from diredi_secure.ml.merge import adapted_model
from diredi_secure.ml.models import build_model, flat_parameters, student_spec
from diredi_secure.ml.reverse import RDConfig, RDResult, dp_parameters_for, reverse_distill
from diredi_secure.privacy import MechanismKind, NoiseSource

from . import accounting, canary, inspection, mechanisms, membership, metrics, reconstruction
from .mechanisms import LyingDevice, MechanismAudit, NoiseFloor, shipped_device_config
from .metrics import AttackMetrics, Roc
from .profiles import PROFILES, AuditProfile

Verdict = Literal["pass", "fail", "inconclusive"]

__all__ = [
    "PROFILES",
    "AuditConfig",
    "AuditProfile",
    "AuditResult",
    "ChannelAttack",
    "LyingDevice",
    "Verdict",
    "decide_verdict",
    "run_audit",
]


@dataclass(frozen=True)
class AuditConfig:
    """One audit. ``epsilon`` is the claim under test: the packet's *total* epsilon (``math.inf``:
    the device trains without DP, the positive control whose header honestly says so). ``rd`` is
    the RD configuration devices run (default: :func:`.mechanisms.shipped_device_config` at
    ``epsilon``: reference logits, weight delta, prototypes and the label histogram, every DP
    parameter from the policy, the same for every N); its ``epsilon`` must equal the claim.
    ``implementation`` selects the device implementation under attack (honest, or a lying
    positive control that keeps the honest header). ``threads`` is torch's intra-op thread count
    during the run (restored afterwards): the audited models are tiny, so one thread is fastest,
    and on a shared 2-core machine two contending threads made DP-SGD 3 to 8 times slower."""

    epsilon: float = 8.0
    rd: RDConfig | None = None
    implementation: LyingDevice = LyingDevice.HONEST
    profile: AuditProfile = field(default_factory=lambda: PROFILES["fast"])
    seed: int = 0
    user: str = "A"
    confidence: float = 0.95
    threads: int = 1

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if not (self.epsilon > 0):
            raise ConfigError(f"claimed epsilon must be > 0, got {self.epsilon}")
        if not 0.5 < self.confidence < 1.0:
            raise ConfigError(f"confidence must be in (0.5, 1), got {self.confidence}")
        if self.rd is not None and self.rd.epsilon != self.epsilon:
            raise ConfigError(f"the RD configuration targets epsilon {self.rd.epsilon:g}, the "
                              f"claim under test is {self.epsilon:g}")
        LyingDevice(self.implementation)

    @property
    def device_config(self) -> RDConfig:
        return self.rd if self.rd is not None else shipped_device_config(self.epsilon)


@dataclass(frozen=True)
class ChannelAttack:
    """Scores of one attack on one channel (what the adversary evaluates)."""

    channel: str
    attack: str
    scores: np.ndarray
    metrics: AttackMetrics
    roc: Roc
    canary_audit: canary.CanaryAudit


@dataclass(frozen=True)
class AuditResult:
    config: AuditConfig
    claimed_epsilon: float
    delta: float
    dp: DPParameters
    """The header the device declared (for a lying control: the honest one it pretends to)."""
    accounting: accounting.PacketAccountingCheck | None
    attacks: tuple[ChannelAttack, ...]
    natural: tuple[metrics.AttackMetrics, ...]
    natural_rocs: tuple[tuple[str, metrics.Roc], ...]
    inspection: inspection.InspectionResult
    reconstruction: reconstruction.ReconstructionResult
    eps_lower_bound: float
    best_attack: ChannelAttack
    mechanisms: tuple[MechanismAudit, ...]
    noise_floor: NoiseFloor | None
    release_attacks: tuple[tuple[str, metrics.AttackMetrics, canary.CanaryAudit], ...]
    verdict: Verdict
    criteria: tuple[tuple[str, bool, str], ...]
    leak_detected: bool
    utility: dict[str, float]
    seconds: dict[str, float]
    settings: dict[str, object]

    def summary_line(self) -> str:
        m = self.best_attack.metrics
        claimed = "inf" if math.isinf(self.claimed_epsilon) else f"{self.claimed_epsilon:g}"
        return (
            f"audit: verdict={self.verdict} eps_lb={self.eps_lower_bound:.3f} "
            f"claimed_eps={claimed} auc={m.auc:.3f} tpr_at_1pct_fpr={m.tpr_at_1pct.rate:.3f}"
        )

    def text_lines(self) -> list[str]:
        """One line per mechanism (claim, bounds, ceiling), then the summary line."""
        return [*(m.line() for m in self.mechanisms), self.summary_line()]


def _make_canaries(m: int, rng: np.random.Generator, density: float = 0.15) -> Dataset:
    """``m`` canaries: random sparse binary 8x8 patterns (about ``density`` of pixels on) with a
    uniformly random label. They lie off the digit manifold, so a model only fits one by
    memorising that very example: the strongest input-space canary we found for this MLP
    (held-out digits with a wrong label gave AUC 0.56 even without DP; these give about 0.84)."""
    x = (rng.random((m, 1, 8, 8)) < density).astype(np.float32)
    return Dataset(x, rng.integers(0, 10, size=m))


def _dense_reference_diff(payload: KnowledgePayload, n_ref: int) -> np.ndarray | None:
    entry = payload.get(PayloadKind.REFERENCE_LOGITS)
    if entry is None:
        return None
    values = entry.values.astype(np.float32)
    if entry.index is None:
        return values
    dense = np.zeros((n_ref, values.shape[1]), np.float32)
    dense[entry.index] = values
    return dense


def _surrogate(shipped: nn.Module, payload: KnowledgePayload, reference_x: np.ndarray,
               epochs: int, seed: int) -> nn.Module | None:
    """What the cloud distils from ``reference_logits``: shipped student pulled towards
    ``z_shipped + diff`` on the reference set (temperature 1, KL only)."""
    diff = _dense_reference_diff(payload, len(reference_x))
    if diff is None:
        return None
    target = predict_logits(shipped, reference_x) + diff
    model = copy.deepcopy(shipped)
    kd_train(model, reference_x, -np.ones(len(reference_x), np.int64), target,
             KDConfig(temperature=1.0, alpha=1.0, epochs=epochs, lr=0.005, batch_size=64),
             seed=seed)
    return model.eval()


def _channels(shipped: nn.Module, result: RDResult, payload: KnowledgePayload,
              reference_x: np.ndarray, profile: AuditProfile, seed: int) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    wd = adapted_model(shipped, payload)
    if wd is not None:
        out["packet:weight_delta"] = wd
    sur = _surrogate(shipped, payload, reference_x, profile.surrogate_epochs, seed)
    if sur is not None:
        out["packet:reference_logits"] = sur
    out["whitebox:adapted"] = result.adapted
    return out


def decide_verdict(
    claimed_epsilon: float,
    dp: DPParameters,
    acct: accounting.PacketAccountingCheck | None,
    insp: inspection.InspectionResult,
    mechanisms: tuple[MechanismAudit, ...],
    *,
    tolerance: float = 1e-9,
) -> tuple[Verdict, tuple[tuple[str, bool, str], ...]]:
    """``fail`` if any criterion fails, ``inconclusive`` if none fails but some mechanism's claim
    is above the ceiling of its attack, ``pass`` only if all hold and every mechanism passed:

    1. the packet is differentially private at all (noise multiplier > 0, finite epsilon, Poisson);
    2. its declared total epsilon is at most the claimed total (``tolerance``: float rounding);
    3. ``privacy.account_packet`` accepts the header and entries (bounds, no seeded noise,
       nothing unaccounted, no understated epsilon);
    4. packet inspection finds the payload exactly as declared, noised entries noised, no copy of
       a user sample;
    5. per mechanism (DP-SGD, label histogram, prototypes; :func:`.mechanisms.judge_mechanism`):
       its one-run bound and every ROC curve of its attacks within its own claimed epsilon at the
       policy's delta, and for DP-SGD the noise floor.
    """
    crit: list[tuple[str, bool, str]] = []
    is_dp = dp.noise_multiplier > 0 and math.isfinite(dp.epsilon) and dp.poisson_sampling
    crit.append(("packet is DP", is_dp,
                 f"noise_multiplier={dp.noise_multiplier:g}, declared epsilon={dp.epsilon:g}, "
                 f"poisson={dp.poisson_sampling}"))
    declared = dp.composed_epsilon
    crit.append(("declared epsilon <= claimed", declared <= claimed_epsilon + tolerance,
                 f"declared {declared:.6g} vs claimed {claimed_epsilon:g}"))
    crit.append(("accounting recomputation", acct is not None and acct.ok,
                 "account_packet accepts it" if acct is not None and acct.ok else
                 "; ".join(acct.findings) if acct is not None else "not DP: nothing to account"))
    crit.append(("packet inspection", insp.ok,
                 "payload as declared, no user sample in it" if insp.ok
                 else "; ".join(insp.findings)))
    for m in mechanisms:
        crit.append((f"mechanism {m.mechanism}", m.verdict != "fail", f"{m.verdict}: {m.detail}"))
    verdict: Verdict
    if not all(ok for _, ok, _ in crit):
        verdict = "fail"
    elif not mechanisms or any(m.verdict == "inconclusive" for m in mechanisms):
        verdict = "inconclusive"
    else:
        verdict = "pass"
    return verdict, tuple(crit)


def run_audit(
    config: AuditConfig,
    *,
    scenario: Scenario | None = None,
    progress: Callable[[str], None] | None = None,
) -> AuditResult:
    """Run the whole audit (deterministic for ``config.seed`` on CPU). Raises :class:`ConfigError`
    on a bad configuration; never raises for a failing verdict (it is in the result). Torch's
    thread count is set to ``config.threads`` for the run and restored afterwards."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run_audit(config, scenario, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _flat_delta(model: nn.Module, shipped: nn.Module) -> np.ndarray:
    out: np.ndarray = flat_parameters(model) - flat_parameters(shipped)
    return out


def _release_mechanism(
    name: str, scores: np.ndarray, included: np.ndarray, *, claimed: float, delta: float,
    confidence: float, covers: tuple[str, ...],
) -> tuple[MechanismAudit, metrics.AttackMetrics, canary.CanaryAudit]:
    am = metrics.attack_metrics(f"{name}/neighbouring_trials", scores, included, epsilon=claimed,
                                delta=delta, confidence=confidence)
    ca = canary.audit_canary_scores(scores, included, delta=delta, confidence=confidence)
    ceiling = mechanisms.detection_ceiling(included, delta=delta, canary_confidence=confidence,
                                           roc_confidence=confidence)
    audit = mechanisms.judge_mechanism(
        name, claimed_epsilon=claimed, delta=delta, ceiling=ceiling,
        eps_lower_bound=ca.epsilon_lower_bound, consistency=((am.name, am.consistency),),
        covers=covers)
    return audit, am, ca


def _run_audit(
    config: AuditConfig,
    scenario: Scenario | None,
    progress: Callable[[str], None] | None,
) -> AuditResult:
    say = progress or (lambda _msg: None)
    secs: dict[str, float] = {}
    prof = config.profile
    impl = LyingDevice(config.implementation)
    rd = config.device_config
    rng = np.random.default_rng(config.seed)
    t0 = time.perf_counter()
    scenario = scenario if scenario is not None else make_scenario(config.seed)
    user = scenario.user(config.user)
    shipped = build_model(student_spec(), seed=config.seed)
    train_classifier(shipped, scenario.presumed_train, TrainConfig(epochs=prof.shipped_epochs),
                     seed=config.seed)
    canaries = _make_canaries(prof.canaries, rng)
    included = canary.sample_inclusion(prof.canaries, rng)
    train = Dataset.concat([user.train, canaries.subset(np.nonzero(included)[0])])
    secs["setup"] = time.perf_counter() - t0
    say(f"setup: {len(train)} training examples ({int(included.sum())} canaries), "
        f"implementation {impl.value}")

    # the device's run: its implementation, the header the honest configuration declares
    t0 = time.perf_counter()
    run_cfg = mechanisms.device_rd_config(rd, impl)
    result = reverse_distill(shipped, train, scenario.reference_x, run_cfg,
                             noise=mechanisms.device_noise(impl))
    header = dp_parameters_for(rd, seeded=False) if rd.private else result.dp
    wire, descriptor = encode_payload(result.payload)
    seen = decode_payload(wire, descriptor)  # exactly what the cloud holds
    secs["rd"] = time.perf_counter() - t0
    delta = rd.policy.delta
    say(f"rd: declared epsilon={header.epsilon:.3g} total={header.total_epsilon:.3g} "
        f"sigma={header.noise_multiplier:.3g} (run with {result.dp.noise_multiplier:.3g}) "
        f"steps={header.steps}")

    acct: accounting.PacketAccountingCheck | None = None
    claims: dict[MechanismKind, accounting.MechanismClaim] = {}
    if rd.private:
        acct = accounting.check_packet_accounting(header, seen.tensors, policy=rd.policy)
        claims = {c.kind: c for c in acct.claims}

    def claim(*kinds: MechanismKind) -> float:
        if not all(k in claims for k in kinds):
            return math.inf
        return accounting.composed_epsilon([claims[k] for k in kinds], delta)

    t0 = time.perf_counter()
    chans = _channels(shipped, result, seen, scenario.reference_x, prof, config.seed)
    shadow_stats: dict[str, list[np.ndarray]] = {name: [] for name in chans}
    device_deltas: list[np.ndarray] = []
    # Offline LiRA shadows: the device's implementation on the user's data without any canary
    # (OUT for every canary). Their weight deltas also give the DP-SGD noise floor.
    for s in range(prof.shadows):
        sres = reverse_distill(shipped, user.train, scenario.reference_x, run_cfg,
                               noise=mechanisms.device_noise(impl))
        sseen = decode_payload(*encode_payload(sres.payload))
        schans = _channels(shipped, sres, sseen, scenario.reference_x, prof, config.seed + 300 + s)
        device_deltas.append(_flat_delta(sres.adapted, shipped))
        for name in chans:
            shadow_stats[name].append(
                membership.logit_confidence(predict_logits(schans[name], canaries.x), canaries.y))
    floor: NoiseFloor | None = None
    if rd.private:
        # the auditor's own honest runs of the published algorithm, same data and configuration
        reference = [_flat_delta(reverse_distill(shipped, user.train, scenario.reference_x, rd,
                                                 noise=NoiseSource.secure()).adapted, shipped)
                     for _ in range(prof.shadows)]
        floor = mechanisms.noise_floor(device_deltas, reference)
    secs["shadows"] = time.perf_counter() - t0
    say(f"shadows: {prof.shadows} device runs" + ("" if floor is None else
        f", {prof.shadows} reference runs, noise-floor ratio {floor.ratio:.3g}"))

    # the confidence is split over the mechanisms attacked, then (DP-SGD) over channels x tests
    t0 = time.perf_counter()
    n_mech = 3 if PayloadKind.DP_PROTOTYPES in rd.kinds else (
        2 if PayloadKind.LABEL_HISTOGRAM in rd.kinds else 1)
    mech_conf = 1.0 - (1.0 - config.confidence) / n_mech
    base_logits = predict_logits(shipped, canaries.x)
    n_tests = 2 * len(chans)
    per_conf = 1.0 - (1.0 - mech_conf) / n_tests
    canary_conf = 1.0 - (1.0 - mech_conf) / len(chans)
    sgd_claim = claim(MechanismKind.DP_SGD)
    attacks: list[ChannelAttack] = []
    for name, model in chans.items():
        logits = predict_logits(model, canaries.x)
        scored = {
            "loss_threshold": membership.loss_threshold_scores(logits, base_logits, canaries.y),
            "lira_offline": membership.lira_offline_scores(
                membership.logit_confidence(logits, canaries.y), np.stack(shadow_stats[name])),
        }
        for attack, sc in scored.items():
            am = metrics.attack_metrics(f"{name}/{attack}", sc, included, epsilon=sgd_claim,
                                        delta=delta, confidence=per_conf)
            # the one-run bound uses one pre-registered attack per channel (LiRA), so its
            # confidence is split over channels only; the loss attack reports the same numbers
            ca = canary.audit_canary_scores(sc, included, delta=delta, confidence=canary_conf)
            attacks.append(ChannelAttack(name, attack, sc, am, metrics.roc_curve(sc, included),
                                         ca))
    natural: list[metrics.AttackMetrics] = []
    natural_rocs: list[tuple[str, metrics.Roc]] = []
    nat = Dataset.concat([user.train, user.test])
    nat_member = np.concatenate([np.ones(len(user.train), bool), np.zeros(len(user.test), bool)])
    nat_base = predict_logits(shipped, nat.x)
    for name, model in chans.items():
        sc = membership.loss_threshold_scores(predict_logits(model, nat.x), nat_base, nat.y)
        natural.append(metrics.attack_metrics(f"{name}/loss_threshold (natural)", sc, nat_member,
                                              confidence=config.confidence))
        natural_rocs.append((f"{name} (natural)", metrics.roc_curve(sc, nat_member)))
    registered = [a for a in attacks if a.attack == "lira_offline"]
    eps_lb = max(a.canary_audit.epsilon_lower_bound for a in registered)
    best = max(registered, key=lambda a: (a.canary_audit.epsilon_lower_bound, a.metrics.auc))
    sgd_ceiling = mechanisms.detection_ceiling(included, delta=delta,
                                               canary_confidence=canary_conf,
                                               roc_confidence=per_conf)
    mech_audits = [mechanisms.judge_mechanism(
        MechanismKind.DP_SGD.value, claimed_epsilon=sgd_claim, delta=delta, ceiling=sgd_ceiling,
        eps_lower_bound=eps_lb,
        consistency=tuple((f"{a.channel}/{a.attack}", a.metrics.consistency) for a in attacks),
        extra_failure=None if floor is None or floor.ok else
        f"noise floor: the device's runs vary {floor.ratio:.3g} times as much as honest ones "
        f"(< {floor.threshold:g})")]
    secs["attacks"] = time.perf_counter() - t0

    # the histogram and the prototypes: neighbouring-dataset trials of the device's release code
    t0 = time.perf_counter()
    release: list[tuple[str, metrics.AttackMetrics, canary.CanaryAudit]] = []
    if PayloadKind.LABEL_HISTOGRAM in rd.kinds or PayloadKind.DP_PROTOTYPES in rd.kinds:
        trials = mechanisms.run_release_trials(shipped, user.train, rd, trials=prof.trials,
                                               implementation=impl, rng=rng)
        hist, protos = MechanismKind.LABEL_HISTOGRAM, MechanismKind.DP_PROTOTYPES
        wanted: list[tuple[str, np.ndarray, tuple[MechanismKind, ...]]] = [
            (hist.value, trials.histogram_scores, (hist,))]
        if PayloadKind.DP_PROTOTYPES in rd.kinds:
            # the released prototypes are divided by the released counts: the attack sees both,
            # so it is tested against their composition
            wanted.append((protos.value, trials.prototype_scores, (hist, protos)))
        for name, sc, kinds in wanted:
            audit, am, ca = _release_mechanism(
                name, sc, trials.included, claimed=claim(*kinds), delta=delta,
                confidence=mech_conf, covers=tuple(k.value for k in kinds))
            mech_audits.append(audit)
            release.append((name, am, ca))
    secs["release_trials"] = time.perf_counter() - t0
    say("mechanisms: " + "; ".join(m.line() for m in mech_audits))

    t0 = time.perf_counter()
    insp = inspection.inspect_payload(seen, descriptor, wire, private=train,
                                      reference_x=scenario.reference_x,
                                      prototype_clip=rd.policy.prototype_clip)
    batch = max(1, round(rd.policy.sample_rate * len(train)))
    recon = reconstruction.run_reconstruction(
        shipped, seen, train, scenario.reference_x, batch_size=batch,
        lr=result.lr, steps=result.dp.steps, iterations=prof.reconstruction_iterations,
        trials=prof.reconstruction_trials, seed=config.seed)
    secs["inspect_reconstruct"] = time.perf_counter() - t0

    verdict, criteria = decide_verdict(config.epsilon, header, acct, insp, tuple(mech_audits))
    # power: the audit sees a leak if some bound is clearly above 0 or some AUC is significantly
    # above 1/2 (its lower interval end)
    leak = (any(m.eps_lower_bound > 0.0 for m in mech_audits)
            or any(a.metrics.auc_interval[0] > 0.5 for a in attacks)
            or any(am.auc_interval[0] > 0.5 for _, am, _ in release))
    utility = {
        "shipped_user_test_acc": accuracy(shipped, user.test),
        "adapted_user_test_acc": accuracy(result.adapted, user.test),
    }
    settings: dict[str, object] = {
        "profile": prof.name, "canaries": prof.canaries, "shadows": prof.shadows,
        "release_trials": prof.trials, "steps": header.steps,
        "sample_rate": header.sample_rate, "expected_batch": batch, "user": config.user,
        "seed": config.seed, "training_examples": len(train), "dp": rd.private,
        "implementation": impl.value, "kinds": [k.value for k in rd.kinds],
        "payload_bytes": len(wire), "confidence": config.confidence,
        "mechanism_confidence": mech_conf, "per_test_confidence": per_conf,
        "tests_bonferroni": n_tests,
    }
    return AuditResult(
        config=config, claimed_epsilon=config.epsilon, delta=delta, dp=header, accounting=acct,
        attacks=tuple(attacks), natural=tuple(natural), natural_rocs=tuple(natural_rocs),
        inspection=insp, reconstruction=recon, eps_lower_bound=eps_lb, best_attack=best,
        mechanisms=tuple(mech_audits), noise_floor=floor, release_attacks=tuple(release),
        verdict=verdict, criteria=criteria, leak_detected=leak, utility=utility, seconds=secs,
        settings=settings,
    )

"""Accounting checks: recompute the epsilon a packet declares, and compose a device's lifetime.

What is trusted: nothing the packet header says. The declared noise multiplier, sample rate, steps
and delta are taken as the *inputs* of the mechanism (they are what the device says it did), and the
epsilon is recomputed from them with two independent accountants:

* RDP (Mironov 2017; Mironov, Talwar & Zhang 2019), the upper bound Opacus uses by default;
* PRV (Gopi, Lee & Wutschitz 2021), a numerically tight upper bound (Opacus' ``PRVAccountant``,
  upper end of its error interval).

Both are upper bounds on the true epsilon of the Poisson-subsampled Gaussian mechanism, so PRV must
not exceed RDP by more than PRV's own discretisation error; if it does, one of the two is wrong (or
the inputs are out of the range where the numerics hold) and the audit says so. A packet whose
declared epsilon is below what its declared accountant gives for its declared parameters
under-reports its privacy loss and is flagged.

Composition across packets (and across the Gaussian mechanisms inside one packet: DP-SGD training,
a noisy label histogram, noisy prototypes) is done by summing RDP curves order by order, which is
exact for RDP, and by composing the PRVs numerically; the lifetime epsilon is then read off at the
ledger's delta. This is torch-free: numpy, scipy and ``opacus.accountants`` only.

Raises :class:`AccountingError` (a :class:`~diredi_secure.errors.PolicyViolation`) from the
``verify_*`` functions; the ``check_*`` functions return findings for the report instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from diredi_secure.errors import ConfigError, PolicyViolation

__all__ = [
    "DEFAULT_RDP_ORDERS",
    "AccountingError",
    "DPParametersLike",
    "EpsilonRecomputation",
    "GaussianMechanism",
    "LifetimeEpsilon",
    "PacketAccountingCheck",
    "PayloadTensorLike",
    "check_packet_accounting",
    "compose_lifetime_epsilon",
    "mechanisms_of_packet",
    "prv_epsilon",
    "rdp_epsilon",
    "recompute_epsilon",
    "verify_packet_accounting",
]

#: RDP orders searched for the RDP -> (epsilon, delta) conversion: Opacus' defaults plus a few large
#: orders, which matter for small noise multipliers (large epsilon).
DEFAULT_RDP_ORDERS: tuple[float, ...] = (
    *(1.0 + x / 10.0 for x in range(1, 100)),
    *(float(a) for a in range(12, 64)),
    128.0,
    256.0,
    512.0,
)

#: Absolute slack for comparisons between accountants and declared values. PRV is computed with
#: eps_error=0.01 (its upper end already includes that error); the rest absorbs float rounding and
#: different RDP order grids on the device and here.
DEFAULT_TOLERANCE = 0.02
#: Relative slack added to :data:`DEFAULT_TOLERANCE` (1 %).
DEFAULT_RELATIVE_TOLERANCE = 0.01

_PRV_EPS_ERROR = 0.01


class AccountingError(PolicyViolation):
    """A packet's declared DP parameters do not add up (under-reported epsilon, bad sampling...)."""

    reason = "accounting_mismatch"


class DPParametersLike(Protocol):
    """The DP block of a packet header (``diredi_secure.knowledge.DPParameters`` satisfies it)."""

    @property
    def noise_multiplier(self) -> float: ...
    @property
    def clip_norm(self) -> float: ...
    @property
    def sample_rate(self) -> float: ...
    @property
    def steps(self) -> int: ...
    @property
    def accountant(self) -> str: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def delta(self) -> float: ...
    @property
    def poisson_sampling(self) -> bool: ...
    @property
    def total_epsilon(self) -> float: ...


class PayloadTensorLike(Protocol):
    """A payload entry (``diredi_secure.knowledge.PayloadTensor`` satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def noise_multiplier(self) -> float: ...
    @property
    def epsilon(self) -> float: ...


@dataclass(frozen=True)
class GaussianMechanism:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism.

    ``noise_multiplier`` is sigma divided by the L2 sensitivity (the clip norm for DP-SGD, the
    per-record contribution bound for a histogram). ``sample_rate`` 1.0 is the plain (not
    subsampled) Gaussian mechanism, which is how a noisy histogram or noisy prototypes are released.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    name: str = "dp_sgd"

    def __post_init__(self) -> None:
        if not math.isfinite(self.noise_multiplier) or self.noise_multiplier <= 0.0:
            raise ConfigError(
                f"mechanism {self.name!r}: noise multiplier must be finite and > 0, "
                f"got {self.noise_multiplier}"
            )
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(
                f"mechanism {self.name!r}: sample rate must be in (0, 1], got {self.sample_rate}"
            )
        if self.steps < 1:
            raise ConfigError(f"mechanism {self.name!r}: steps must be >= 1, got {self.steps}")

    def history_entry(self) -> tuple[float, float, int]:
        """The ``(noise_multiplier, sample_rate, steps)`` triple Opacus accountants keep."""
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))


@dataclass(frozen=True)
class EpsilonRecomputation:
    """Epsilon of a composition of mechanisms at one delta, by two accountants."""

    delta: float
    rdp_epsilon: float
    prv_epsilon: float
    rdp_best_order: float
    mechanisms: tuple[GaussianMechanism, ...]

    @property
    def prv_within_rdp(self) -> bool:
        """PRV (tight) must not exceed RDP (loose) beyond PRV's discretisation error."""
        return self.prv_epsilon <= self.rdp_epsilon + _tolerance(self.rdp_epsilon)


@dataclass(frozen=True)
class PacketAccountingCheck:
    """What the accounting audit found for one packet. ``ok`` is False when any finding is fatal."""

    declared_epsilon: float
    declared_total_epsilon: float
    declared_delta: float
    declared_accountant: str
    recomputed: EpsilonRecomputation | None
    training_only: EpsilonRecomputation | None
    findings: tuple[str, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, object]:
        def rec(r: EpsilonRecomputation | None) -> dict[str, object] | None:
            if r is None:
                return None
            return {
                "delta": r.delta,
                "rdp_epsilon": r.rdp_epsilon,
                "prv_epsilon": r.prv_epsilon,
                "rdp_best_order": r.rdp_best_order,
                "prv_within_rdp": r.prv_within_rdp,
                "mechanisms": [
                    {
                        "name": m.name,
                        "noise_multiplier": m.noise_multiplier,
                        "sample_rate": m.sample_rate,
                        "steps": m.steps,
                    }
                    for m in r.mechanisms
                ],
            }

        return {
            "declared_epsilon": self.declared_epsilon,
            "declared_total_epsilon": self.declared_total_epsilon,
            "declared_delta": self.declared_delta,
            "declared_accountant": self.declared_accountant,
            "training": rec(self.training_only),
            "packet": rec(self.recomputed),
            "findings": list(self.findings),
            "warnings": list(self.warnings),
            "ok": self.ok,
        }


@dataclass(frozen=True)
class LifetimeEpsilon:
    """A device's lifetime privacy loss over all its accepted packets."""

    delta: float
    packets: int
    rdp_epsilon: float
    prv_epsilon: float
    sum_of_declared: float
    mechanisms: tuple[GaussianMechanism, ...]

    @property
    def tightest(self) -> float:
        """The smaller of the two valid upper bounds."""
        return min(self.rdp_epsilon, self.prv_epsilon)


def _tolerance(reference: float) -> float:
    return DEFAULT_TOLERANCE + DEFAULT_RELATIVE_TOLERANCE * abs(reference)


def _declared_floor(rec: EpsilonRecomputation, accountant: str) -> float:
    """What the declared accountant must report at least: its own recomputation, or the tighter
    valid bound (PRV's upper end, or RDP) for an accountant we do not implement."""
    if accountant == "rdp":
        return rec.rdp_epsilon
    if accountant == "prv":
        return rec.prv_epsilon
    return min(rec.rdp_epsilon, rec.prv_epsilon)


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")


def rdp_epsilon(
    mechanisms: Sequence[GaussianMechanism],
    *,
    delta: float,
    orders: Sequence[float] = DEFAULT_RDP_ORDERS,
) -> tuple[float, float]:
    """RDP epsilon of the composition (sum of RDP curves, exact) and the best order.

    Uses Opacus' ``compute_rdp`` / ``get_privacy_spent`` (the conversion of Balle et al. 2020).
    Raises :class:`ConfigError` for an empty composition or a delta outside (0, 1).
    """
    _check_delta(delta)
    if not mechanisms:
        raise ConfigError("no mechanisms to account for")
    orders_list = [float(a) for a in orders]
    total = np.zeros(len(orders_list))
    for mech in mechanisms:
        total = total + np.asarray(
            rdp_analysis.compute_rdp(
                q=mech.sample_rate,
                noise_multiplier=mech.noise_multiplier,
                steps=mech.steps,
                orders=orders_list,
            ),
            dtype=np.float64,
        )
    eps, best = rdp_analysis.get_privacy_spent(orders=orders_list, rdp=total, delta=delta)
    return float(eps), float(best)


def prv_epsilon(mechanisms: Sequence[GaussianMechanism], *, delta: float) -> float:
    """PRV epsilon (upper end of Opacus' error interval) of the heterogeneous composition."""
    _check_delta(delta)
    if not mechanisms:
        raise ConfigError("no mechanisms to account for")
    acc = PRVAccountant()
    acc.history = [m.history_entry() for m in mechanisms]
    with warnings.catch_warnings():
        # q = 1 makes log(1 - q) = -inf inside Opacus' PRV; the result is still right.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(acc.get_epsilon(delta, eps_error=_PRV_EPS_ERROR))


def recompute_epsilon(
    mechanisms: Sequence[GaussianMechanism], *, delta: float
) -> EpsilonRecomputation:
    """Epsilon of a composition at ``delta`` by both accountants."""
    rdp_eps, best = rdp_epsilon(mechanisms, delta=delta)
    prv_eps = prv_epsilon(mechanisms, delta=delta)
    return EpsilonRecomputation(
        delta=delta,
        rdp_epsilon=rdp_eps,
        prv_epsilon=prv_eps,
        rdp_best_order=best,
        mechanisms=tuple(mechanisms),
    )


def _opacus_rdp_cross_check(mechanisms: Sequence[GaussianMechanism], delta: float) -> float:
    """Opacus' own stateful RDPAccountant on the same history (guards our order grid)."""
    acc = RDPAccountant()
    acc.history = [m.history_entry() for m in mechanisms]
    return float(acc.get_epsilon(delta))


def mechanisms_of_packet(
    dp: DPParametersLike, tensors: Iterable[PayloadTensorLike] = ()
) -> tuple[GaussianMechanism, ...]:
    """The Gaussian mechanisms a packet declares: DP-SGD training plus noisy payload entries.

    Entries with ``noise_multiplier == 0`` are post-processing of the trained model and add nothing.
    Raises :class:`ConfigError` if the declared training parameters cannot describe a mechanism.
    """
    mechs = [
        GaussianMechanism(
            noise_multiplier=float(dp.noise_multiplier),
            sample_rate=float(dp.sample_rate),
            steps=int(dp.steps),
            name="dp_sgd",
        )
    ]
    for t in tensors:
        if t.noise_multiplier > 0.0:
            mechs.append(
                GaussianMechanism(
                    noise_multiplier=float(t.noise_multiplier),
                    sample_rate=1.0,
                    steps=1,
                    name=t.name,
                )
            )
    return tuple(mechs)


def check_packet_accounting(
    dp: DPParametersLike,
    tensors: Sequence[PayloadTensorLike] = (),
    *,
    dataset_size: int | None = None,
    batch_size: float | None = None,
    max_epochs: float = 1000.0,
) -> PacketAccountingCheck:
    """Recompute a packet's epsilon from its declared parameters and list what does not add up.

    ``dataset_size`` and ``batch_size`` (expected Poisson batch) are what the auditor knows of the
    device's run (in an audit scenario it knows both); when given, the declared sample rate must be
    ``batch_size / dataset_size`` and delta must be below ``1 / dataset_size``.

    Fatal findings (``ok`` False): declared epsilon below the recomputed one (by the declared
    accountant, or by PRV for an accountant we do not know), PRV above RDP, no Poisson sampling (the
    accountants assume it), impossible parameters, a sample rate inconsistent with the run, a
    declared total below the composition of all mechanisms in the packet. Warnings do not fail.
    """
    findings: list[str] = []
    notes: list[str] = []
    accountant = str(dp.accountant).lower()
    delta = float(dp.delta)

    if not dp.poisson_sampling:
        findings.append(
            "poisson_sampling is false: the RDP/PRV analysis of DP-SGD assumes Poisson "
            "subsampling; shuffled fixed-size batches are not covered by the declared epsilon"
        )
    if not math.isfinite(dp.clip_norm) or dp.clip_norm <= 0.0:
        findings.append(f"clip norm must be finite and > 0, got {dp.clip_norm}")
    if not 0.0 < delta < 1.0:
        findings.append(f"delta must be in (0, 1), got {delta}")
    if dataset_size is not None:
        if dataset_size < 1:
            findings.append(f"dataset size must be >= 1, got {dataset_size}")
        else:
            if delta >= 1.0 / dataset_size:
                findings.append(
                    f"delta {delta:g} is not below 1/n = {1.0 / dataset_size:g}: a mechanism "
                    "that publishes one random record satisfies it"
                )
            if dp.sample_rate * dataset_size < 1.0:
                notes.append(
                    f"expected batch q*n = {dp.sample_rate * dataset_size:.3g} is below 1 record"
                )
            if batch_size is not None:
                expected_q = batch_size / dataset_size
                if not math.isclose(dp.sample_rate, expected_q, rel_tol=0.05, abs_tol=1e-9):
                    findings.append(
                        f"declared sample rate {dp.sample_rate:g} differs from batch/n = "
                        f"{expected_q:g} of the run"
                    )
    if dp.steps >= 1 and 0.0 < dp.sample_rate <= 1.0 and dp.steps * dp.sample_rate > max_epochs:
        notes.append(f"{dp.steps * dp.sample_rate:.3g} epochs is implausibly many")

    try:
        train = (
            GaussianMechanism(
                noise_multiplier=float(dp.noise_multiplier),
                sample_rate=float(dp.sample_rate),
                steps=int(dp.steps),
            ),
        )
        all_mechs = mechanisms_of_packet(dp, tensors)
    except ConfigError as exc:
        findings.append(f"declared parameters describe no Gaussian mechanism: {exc.message}")
        return PacketAccountingCheck(
            declared_epsilon=float(dp.epsilon),
            declared_total_epsilon=float(dp.total_epsilon),
            declared_delta=delta,
            declared_accountant=accountant,
            recomputed=None,
            training_only=None,
            findings=tuple(findings),
            warnings=tuple(notes),
        )
    if not 0.0 < delta < 1.0:
        return PacketAccountingCheck(
            declared_epsilon=float(dp.epsilon),
            declared_total_epsilon=float(dp.total_epsilon),
            declared_delta=delta,
            declared_accountant=accountant,
            recomputed=None,
            training_only=None,
            findings=tuple(findings),
            warnings=tuple(notes),
        )

    training = recompute_epsilon(train, delta=delta)
    packet = recompute_epsilon(all_mechs, delta=delta) if len(all_mechs) > 1 else training

    opacus_rdp = _opacus_rdp_cross_check(train, delta)
    if opacus_rdp + _tolerance(opacus_rdp) < training.rdp_epsilon:
        findings.append(
            f"RDP recomputation {training.rdp_epsilon:.4g} exceeds Opacus' own RDPAccountant "
            f"{opacus_rdp:.4g}: the order grid is wrong"
        )
    checked = ((training, "training"), (packet, "packet")) if packet is not training else (
        (training, "training"),
    )
    for rec, what in checked:
        if not rec.prv_within_rdp:
            findings.append(
                f"{what}: PRV epsilon {rec.prv_epsilon:.4g} exceeds RDP epsilon "
                f"{rec.rdp_epsilon:.4g}; one accountant is wrong for these parameters"
            )

    if accountant not in ("rdp", "prv"):
        notes.append(
            f"accountant {accountant!r} is neither 'rdp' nor 'prv'; compared with the tighter of both"
        )
    floor = _declared_floor(training, accountant)
    if float(dp.epsilon) + _tolerance(floor) < floor:
        findings.append(
            f"declared epsilon {dp.epsilon:.4g} is below the recomputed {accountant} epsilon "
            f"{floor:.4g} for sigma={dp.noise_multiplier:g}, q={dp.sample_rate:g}, "
            f"steps={dp.steps}, delta={delta:g}"
        )

    for t in tensors:
        if t.noise_multiplier > 0.0:
            own = recompute_epsilon(
                (GaussianMechanism(float(t.noise_multiplier), 1.0, 1, name=t.name),), delta=delta
            )
            own_floor = _declared_floor(own, accountant)
            if float(t.epsilon) + _tolerance(own_floor) < own_floor:
                findings.append(
                    f"entry {t.name!r}: declared epsilon {t.epsilon:.4g} is below the "
                    f"recomputed {own_floor:.4g} for its noise multiplier {t.noise_multiplier:g}"
                )
        elif t.epsilon > 0.0:
            notes.append(f"entry {t.name!r} declares epsilon {t.epsilon:g} but no noise")

    if len(all_mechs) > 1:
        packet_floor = _declared_floor(packet, accountant)
        if float(dp.total_epsilon) + _tolerance(packet_floor) < packet_floor:
            findings.append(
                f"declared total epsilon {dp.total_epsilon:.4g} is below the composition of "
                f"the packet's {len(all_mechs)} mechanisms, {packet_floor:.4g}"
            )

    return PacketAccountingCheck(
        declared_epsilon=float(dp.epsilon),
        declared_total_epsilon=float(dp.total_epsilon),
        declared_delta=delta,
        declared_accountant=accountant,
        recomputed=packet,
        training_only=training,
        findings=tuple(findings),
        warnings=tuple(notes),
    )


def verify_packet_accounting(
    dp: DPParametersLike,
    tensors: Sequence[PayloadTensorLike] = (),
    *,
    dataset_size: int | None = None,
    batch_size: float | None = None,
) -> PacketAccountingCheck:
    """Like :func:`check_packet_accounting` but raises :class:`AccountingError` on any finding."""
    check = check_packet_accounting(
        dp, tensors, dataset_size=dataset_size, batch_size=batch_size
    )
    if not check.ok:
        raise AccountingError("; ".join(check.findings))
    return check


def compose_lifetime_epsilon(
    packets: Sequence[tuple[DPParametersLike, Sequence[PayloadTensorLike]]],
    *,
    delta: float,
) -> LifetimeEpsilon:
    """Lifetime epsilon of one device: every Gaussian mechanism of every packet, composed.

    ``delta`` is the ledger's lifetime delta (not each packet's). The RDP curves of all mechanisms
    (training runs with different q, sigma, steps; noisy histograms; prototypes) are summed order by
    order, which is RDP's exact composition; PRV composes the same list numerically. Both are upper
    bounds, normally well below the sum of per-packet epsilons (basic composition), which is
    reported for comparison. Raises :class:`ConfigError` for no packets.
    """
    if not packets:
        raise ConfigError("device has no packets to compose")
    mechs: list[GaussianMechanism] = []
    declared = 0.0
    for dp, tensors in packets:
        mechs.extend(mechanisms_of_packet(dp, tensors))
        declared += float(dp.total_epsilon) if dp.total_epsilon > 0 else float(dp.epsilon)
    rec = recompute_epsilon(mechs, delta=delta)
    return LifetimeEpsilon(
        delta=delta,
        packets=len(packets),
        rdp_epsilon=rec.rdp_epsilon,
        prv_epsilon=rec.prv_epsilon,
        sum_of_declared=declared,
        mechanisms=tuple(mechs),
    )

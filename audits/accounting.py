"""Accounting checks: what the audit (and the cloud's accounting gate) say about a packet's header.

Every epsilon here comes from :mod:`diredi_secure.privacy` (``account_packet``, the one RDP
accountant, ``lifetime_epsilon``): this module computes none itself, so the audit judges a packet
by the very figures ingest and the ledger charge. What it adds is the report form: a check that
*returns* its findings (``check_packet_accounting``) instead of raising, the per-mechanism
epsilons the audit attacks (``mechanism_claims``), and a device's lifetime composition.

What is trusted: nothing the header says. Its noise multipliers, sample rate, steps and delta are
the *inputs* of the mechanisms (what the device says it did); ``account_packet`` bounds them by the
policy and recomputes every epsilon from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from diredi_secure.errors import ConfigError, PolicyViolation
from diredi_secure.privacy import (
    DEFAULT_DP_POLICY,
    DPDeclaration,
    DPPolicy,
    EntryDeclaration,
    Mechanism,
    MechanismKind,
    PacketCharge,
    account_packet,
    compose,
    epsilon_from_curve,
    lifetime_epsilon,
)

__all__ = [
    "LifetimeEpsilon",
    "MechanismClaim",
    "PacketAccountingCheck",
    "check_packet_accounting",
    "compose_lifetime_epsilon",
    "composed_epsilon",
    "mechanism_claims",
    "verify_packet_accounting",
]


@dataclass(frozen=True)
class MechanismClaim:
    """One mechanism of a packet and the epsilon (at ``delta``) its declared parameters give."""

    kind: MechanismKind
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float
    delta: float

    def to_json(self) -> dict[str, object]:
        return {"mechanism": self.kind.value, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": self.steps, "epsilon": self.epsilon,
                "delta": self.delta}


@dataclass(frozen=True)
class PacketAccountingCheck:
    """What the accounting check found for one packet. ``ok`` is False when any finding is fatal.

    ``findings`` holds the refusal of :func:`~diredi_secure.privacy.account_packet` (message and
    ``reason``), ``charge`` its result when it accepted the packet."""

    declared_epsilon: float
    declared_total_epsilon: float
    declared_delta: float
    declared_accountant: str
    charge: PacketCharge | None
    claims: tuple[MechanismClaim, ...] = ()
    findings: tuple[str, ...] = field(default=())
    reasons: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def recomputed_epsilon(self) -> float | None:
        """The packet's composed epsilon as the cloud recomputes it (``None`` if refused)."""
        return None if self.charge is None else self.charge.epsilon

    def to_json(self) -> dict[str, object]:
        c = self.charge
        return {
            "declared_epsilon": self.declared_epsilon,
            "declared_total_epsilon": self.declared_total_epsilon,
            "declared_delta": self.declared_delta,
            "declared_accountant": self.declared_accountant,
            "recomputed_total_epsilon": None if c is None else c.epsilon,
            "recomputed_training_epsilon": None if c is None else c.training_epsilon,
            "mechanisms": [m.to_json() for m in self.claims],
            "findings": list(self.findings),
            "reasons": list(self.reasons),
            "ok": self.ok,
        }


def _claims(charge: PacketCharge) -> tuple[MechanismClaim, ...]:
    return tuple(
        MechanismClaim(m.kind, m.noise_multiplier, m.sample_rate, m.steps,
                       epsilon_from_curve(m.curve(), charge.delta)[0], charge.delta)
        for m in charge.mechanisms)


def check_packet_accounting(
    dp: DPDeclaration,
    tensors: Sequence[EntryDeclaration] = (),
    *,
    policy: DPPolicy = DEFAULT_DP_POLICY,
) -> PacketAccountingCheck:
    """Run ``account_packet`` on a packet's header and entries and report instead of raising.

    A refusal (any :class:`~diredi_secure.errors.PolicyViolation`: seeded noise, an unaccounted
    entry, a parameter out of bounds, an understated epsilon, no DP, a delta above policy...) is
    one finding with its ``reason``; nothing else is caught.
    """
    common = {"declared_epsilon": float(dp.epsilon),
              "declared_total_epsilon": float(dp.total_epsilon),
              "declared_delta": float(dp.delta), "declared_accountant": str(dp.accountant)}
    try:
        charge = account_packet(dp, tensors, policy)
    except PolicyViolation as exc:
        return PacketAccountingCheck(**common, charge=None,  # type: ignore[arg-type]
                                     findings=(exc.message,), reasons=(exc.reason,))
    return PacketAccountingCheck(**common, charge=charge,  # type: ignore[arg-type]
                                 claims=_claims(charge))


def verify_packet_accounting(
    dp: DPDeclaration,
    tensors: Sequence[EntryDeclaration] = (),
    *,
    policy: DPPolicy = DEFAULT_DP_POLICY,
) -> PacketAccountingCheck:
    """Like :func:`check_packet_accounting` but raises ``account_packet``'s own
    :class:`~diredi_secure.errors.PolicyViolation` (its ``reason`` intact) on a refusal."""
    charge = account_packet(dp, tensors, policy)
    return PacketAccountingCheck(float(dp.epsilon), float(dp.total_epsilon), float(dp.delta),
                                 str(dp.accountant), charge, _claims(charge))


def mechanism_claims(
    dp: DPDeclaration,
    tensors: Sequence[EntryDeclaration] = (),
    *,
    policy: DPPolicy = DEFAULT_DP_POLICY,
) -> dict[MechanismKind, MechanismClaim]:
    """The standalone epsilon of every mechanism a packet declares, keyed by kind: what the audit
    tests each attack against. Raises ``account_packet``'s refusal."""
    return {c.kind: c for c in verify_packet_accounting(dp, tensors, policy=policy).claims}


def composed_epsilon(claims: Sequence[MechanismClaim], delta: float) -> float:
    """Epsilon at ``delta`` of the composition of some of a packet's mechanisms."""
    return epsilon_from_curve(
        compose(Mechanism(c.kind, c.noise_multiplier, c.sample_rate, c.steps).curve()
                for c in claims), delta)[0]


@dataclass(frozen=True)
class LifetimeEpsilon:
    """A device's lifetime privacy loss over its packets, at the policy's delta."""

    delta: float
    packets: int
    epsilon: float
    sum_of_declared: float
    mechanisms: tuple[Mechanism, ...]


def compose_lifetime_epsilon(
    packets: Sequence[tuple[DPDeclaration, Sequence[EntryDeclaration]]],
    *,
    policy: DPPolicy = DEFAULT_DP_POLICY,
) -> LifetimeEpsilon:
    """Every mechanism of every packet composed (RDP curves summed, as the ledger does), read off at
    the policy's delta; ``sum_of_declared`` (basic composition) is reported for comparison.
    Raises :class:`ConfigError` for no packets and ``account_packet``'s refusal for a bad one."""
    if not packets:
        raise ConfigError("device has no packets to compose")
    charges = [account_packet(dp, tensors, policy) for dp, tensors in packets]
    return LifetimeEpsilon(
        delta=policy.delta,
        packets=len(packets),
        epsilon=lifetime_epsilon(compose(c.curve for c in charges), policy),
        sum_of_declared=sum(max(float(dp.epsilon), float(dp.total_epsilon)) for dp, _ in packets),
        mechanisms=tuple(m for c in charges for m in c.mechanisms),
    )

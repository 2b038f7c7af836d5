"""Accounting a packet and a device's lifetime: what ingest, the store and the audits call.

:func:`account_packet` turns a packet header's DP declaration into the mechanisms it claims, bounds
every parameter by the policy, refuses what cannot be accounted for, recomputes the epsilon with the
one accountant and refuses an understatement. :func:`charge` adds the packet's RDP curve to the
device's stored curve and refuses the packet if the composed lifetime epsilon (at the policy's one
delta) would exceed the device's budget. Nothing here trusts the header: it is what a device claims.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import BudgetExceeded, EpsilonUnderstated, PolicyViolation
from ._accountant import ACCOUNTANT, RDP_ORDERS, compose, epsilon_from_curve, zero_curve
from ._mechanisms import Mechanism, MechanismKind, check_mechanism, mechanisms_epsilon
from ._policy import DEFAULT_DP_POLICY, DPPolicy

__all__ = [
    "DPDeclaration",
    "EntryDeclaration",
    "NoiseSeeded",
    "PacketCharge",
    "UnaccountedRelease",
    "account_packet",
    "charge",
    "curve_from_json",
    "curve_to_json",
    "lifetime_epsilon",
]

#: Payload kinds that are post-processing of the DP-trained model (no noise of their own).
POST_PROCESSING_KINDS = frozenset({"reference_logits", "weight_delta"})
#: Payload kinds computed from private data directly: each must carry its own noise.
NOISED_KINDS = {"label_histogram": MechanismKind.LABEL_HISTOGRAM,
                "dp_prototypes": MechanismKind.DP_PROTOTYPES}


class NoiseSeeded(PolicyViolation):
    """The packet's noise came from a fixed research seed: predictable, so not private."""

    reason = "seeded_noise"


class UnaccountedRelease(PolicyViolation):
    """A payload entry computed from private data declares no noise (or a post-processing entry
    declares a mechanism of its own): the cloud cannot account for it."""

    reason = "unaccounted_release"


class DPDeclaration(Protocol):
    """The header's DP block (``diredi_secure.knowledge.DPParameters``)."""

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
    @property
    def noise_seeded(self) -> bool: ...


class EntryDeclaration(Protocol):
    """What the header declares about one payload entry."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> object: ...  # PayloadKind (a str enum) or its value
    @property
    def noise_multiplier(self) -> float: ...
    @property
    def epsilon(self) -> float: ...


@dataclass(frozen=True)
class PacketCharge:
    """What one packet costs: its mechanisms, their composed curve, epsilon at ``delta``."""

    mechanisms: tuple[Mechanism, ...]
    curve: np.ndarray = field(compare=False)
    epsilon: float
    training_epsilon: float
    delta: float


def _kind(entry: EntryDeclaration) -> str:
    k = entry.kind
    return str(getattr(k, "value", k))


def _check_declared(what: str, declared: float, recomputed: float, policy: DPPolicy) -> None:
    """A declared epsilon must equal the recomputation within the accountant's numerical error.

    Below it the device under-reports its loss (:class:`EpsilonUnderstated`); above it the header
    is inconsistent with the mechanisms it declares (the cloud charges what it recomputes, and
    refuses a header it cannot reconcile rather than let two figures circulate)."""
    if not (isinstance(declared, int | float) and math.isfinite(declared)):
        raise PolicyViolation(f"declared {what} epsilon {declared!r} is not a finite number",
                              reason="epsilon_mismatch")
    slack = recomputed * policy.epsilon_rel_tolerance + 1e-12
    if declared < recomputed - slack:
        raise EpsilonUnderstated(
            f"declared {what} epsilon {declared:.6g} is below the recomputed {recomputed:.6g}")
    if declared > recomputed + slack:
        raise PolicyViolation(
            f"declared {what} epsilon {declared:.6g} is not what its mechanisms spend "
            f"({recomputed:.6g})", reason="epsilon_mismatch")


def account_packet(
    dp: DPDeclaration, entries: Sequence[EntryDeclaration], policy: DPPolicy = DEFAULT_DP_POLICY
) -> PacketCharge:
    """Bound, recompute and check a packet's privacy declaration; return its charge.

    Raises (each a :class:`~diredi_secure.errors.PolicyViolation` with its own ``reason``):
    :class:`NoiseSeeded`, :class:`UnaccountedRelease`, ``ParameterOutOfBounds``,
    :class:`~diredi_secure.errors.EpsilonUnderstated`, and ``PolicyViolation`` for no DP, another
    accountant, a delta above policy or an epsilon over the per-packet cap. Cheap: the bounds are
    checked before the accountant runs, so no declaration can make it work long.
    """
    if dp.noise_seeded and not policy.allow_seeded_noise:
        raise NoiseSeeded("packet noise came from a fixed research seed; policy refuses it")
    if dp.accountant != ACCOUNTANT:
        if dp.accountant == "none" or dp.noise_multiplier == 0 or not math.isfinite(dp.epsilon):
            raise PolicyViolation("packet declares no differential privacy", reason="no_dp")
        raise PolicyViolation(f"accountant {dp.accountant[:16]!r} is not {ACCOUNTANT!r}",
                              reason="accountant_unsupported")
    if not dp.poisson_sampling:
        raise PolicyViolation("DP-SGD without Poisson sampling is not accounted for",
                              reason="no_poisson_sampling")
    if not (0 < dp.delta <= policy.delta):
        raise PolicyViolation(f"packet delta {dp.delta:.3g} outside (0, {policy.delta:.3g}]",
                              reason="delta_over_policy")
    if not (0 < dp.clip_norm <= policy.bounds.max_clip_norm):
        raise PolicyViolation(f"clip norm {dp.clip_norm!r} outside (0, "
                              f"{policy.bounds.max_clip_norm:g}]", reason="dp_parameter_out_of_bounds")
    if isinstance(dp.steps, bool) or not isinstance(dp.steps, int):
        raise PolicyViolation(f"steps {dp.steps!r} is not an integer",
                              reason="dp_parameter_out_of_bounds")
    train = Mechanism(MechanismKind.DP_SGD, float(dp.noise_multiplier), float(dp.sample_rate),
                      dp.steps)
    check_mechanism(train, policy.bounds)
    mechanisms = [train]
    entry_checks: list[tuple[str, float, Mechanism]] = []
    for e in entries:
        kind = _kind(e)
        if kind in NOISED_KINDS:
            if not (e.noise_multiplier > 0):
                raise UnaccountedRelease(
                    f"entry {e.name!r} ({kind}) is computed from private data but declares no noise")
            m = Mechanism(NOISED_KINDS[kind], float(e.noise_multiplier))
            check_mechanism(m, policy.bounds)
            mechanisms.append(m)
            entry_checks.append((e.name, float(e.epsilon), m))
        elif kind in POST_PROCESSING_KINDS:
            if e.noise_multiplier != 0 or e.epsilon != 0:
                raise UnaccountedRelease(
                    f"entry {e.name!r} ({kind}) is post-processing and may declare no mechanism")
        else:
            raise UnaccountedRelease(f"entry {e.name!r} has kind {kind[:32]!r}, not accounted for")
    # The epsilons come from the accountant's per-parameter-set caches (a fleet declares a
    # handful of settings): the same floats as converting the curves here, without the work.
    total_curve = compose(m.curve() for m in mechanisms)
    training_eps = mechanisms_epsilon(mechanisms[:1], dp.delta)
    total_eps = mechanisms_epsilon(mechanisms, dp.delta)
    _check_declared("training", dp.epsilon, training_eps, policy)
    for name, declared, m in entry_checks:
        _check_declared(f"entry {name!r}", declared, mechanisms_epsilon((m,), dp.delta), policy)
    _check_declared(f"total (delta {dp.delta:.3g})", dp.total_epsilon, total_eps, policy)
    if total_eps > policy.max_epsilon_per_packet:
        raise PolicyViolation(
            f"packet epsilon {total_eps:.4g} over the per-packet cap "
            f"{policy.max_epsilon_per_packet:.4g}", reason="packet_epsilon_cap")
    return PacketCharge(tuple(mechanisms), total_curve, total_eps, training_eps, dp.delta)


def lifetime_epsilon(curve: np.ndarray, policy: DPPolicy = DEFAULT_DP_POLICY) -> float:
    """A device's composed lifetime epsilon at the policy's delta."""
    return epsilon_from_curve(curve, policy.delta)[0]


def charge(
    *, device_id: str, spent_curve: np.ndarray, packet_curve: np.ndarray, budget: float,
    policy: DPPolicy = DEFAULT_DP_POLICY, floor: float = 0.0,
) -> tuple[np.ndarray, float]:
    """Compose a packet into a device's ledger. Returns (new curve, new lifetime epsilon) or
    raises :class:`~diredi_secure.errors.BudgetExceeded`; changes nothing itself.

    ``floor`` is epsilon spent before the ledger kept curves (a store migrated from schema v1,
    which summed epsilons): it is added on top of the composed curve (basic composition of the two
    parts, a valid upper bound), so a migration never resets a budget."""
    if not (math.isfinite(floor) and floor >= 0):
        raise ValueError(f"ledger floor must be finite and >= 0, got {floor!r}")
    new = compose([spent_curve, packet_curve])
    eps = floor + lifetime_epsilon(new, policy)
    if eps > budget * (1.0 + 1e-12):
        spent = floor + lifetime_epsilon(spent_curve, policy)
        raise BudgetExceeded(
            f"device {device_id} has spent epsilon {spent:.4g} of {budget:.4g} "
            f"(delta {policy.delta:.0e}); with this packet it would be {eps:.4g}")
    return new, eps


def _curve_prefix() -> str:
    head = json.dumps({"accountant": ACCOUNTANT, "orders": list(RDP_ORDERS), "rdp_f64le": ""})
    return head[: -len('""}')]


# Every curve's text starts with the same accountant and order grid, encoded once. The values are
# the float64 bytes (little-endian) in hex: exact like repr, and some 30x cheaper than JSON floats
# (json.dumps of 72 floats twice per packet was a tenth of the ingest server's Python time).
_CURVE_PREFIX = _curve_prefix()


def curve_to_json(curve: np.ndarray) -> str:
    """Storage form of a ledger curve: a JSON object with the accountant, its orders and the
    values as hex of their float64 little-endian bytes (``rdp_f64le``)."""
    values = np.ascontiguousarray(curve, dtype="<f8")
    return f'{_CURVE_PREFIX}"{values.tobytes().hex()}"}}'


def curve_from_json(text: str | None) -> np.ndarray:
    """Inverse of :func:`curve_to_json` (and of the earlier form, values as a JSON list under
    ``rdp``); ``None`` or empty is an empty ledger. Raises ValueError on a curve stored with other
    orders (stored state is ours: this is corruption, not input)."""
    if not text:
        return zero_curve()
    rest = text[len(_CURVE_PREFIX):] if text.startswith(_CURVE_PREFIX) else ""
    hexed: object
    raw: object = None
    if rest.startswith('"') and rest.endswith('"}'):
        hexed = rest[1:-2]  # the common case: our own prefix verbatim (accountant, orders)
    else:
        obj = json.loads(text)
        if not isinstance(obj, dict) or obj.get("accountant") != ACCOUNTANT or tuple(
                obj.get("orders", ())) != RDP_ORDERS:
            raise ValueError("stored ledger curve uses another accountant or order grid")
        hexed, raw = obj.get("rdp_f64le"), obj.get("rdp")
    if isinstance(hexed, str):
        if len(hexed) != 16 * len(RDP_ORDERS):
            raise ValueError("stored ledger curve is malformed")
        values = np.frombuffer(bytes.fromhex(hexed), dtype="<f8").astype(np.float64)
    else:
        values = np.asarray(raw, dtype=np.float64)
    if values.shape != (len(RDP_ORDERS),) or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("stored ledger curve is malformed")
    return values

"""The release gate: run the privacy audit before a release and say whether it may ship.

The cloud's release step (``diredi cloud merge``) calls :func:`run_release_gate` with the total
epsilon the round's packets claim. The gate reruns reverse distillation on the scenario with the
exact configuration devices run at that epsilon (``rd``, default the shipped device
configuration), attacks every mechanism of its packet (:func:`.suite.run_audit`), writes
``audit.json`` and ``audit.html`` into ``out_dir`` and returns the verdict with the SHA-256 of
``audit.json``: the digest and the verdict go into the release attestation.

Verdicts: ``pass``; ``fail``; ``inconclusive`` (nothing failed, but some mechanism's claim is above
the ceiling of what its attack can detect; the ceilings are in the report). A failing or
inconclusive verdict is a result, not an error: the gate never raises for it. The caller blocks the
release unless ``force`` is set; a forced release is marked in the report itself (its
``release_gate`` section is covered by the digest) and in :attr:`GateOutcome.forced`, which the
caller records in the attestation. ``forced`` is true only when a verdict other than ``pass`` was
overridden (forcing a passing audit overrides nothing).

Trust: the gate trusts the scenario it is given (the cloud's own presumed data, reference set and
the users' data it audits with); it reads nothing from packets. Raised:
:class:`~diredi_secure.errors.ConfigError` for a bad epsilon, profile or implementation name, or
an ``rd`` whose epsilon is not the claim,
:class:`~diredi_secure.errors.LocalError` when the report cannot be written.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from diredi_secure.errors import ConfigError, LocalError

from .profiles import PROFILES

if TYPE_CHECKING:
    from diredi_secure.ml.data import Scenario
    from diredi_secure.ml.reverse import RDConfig

    from .mechanisms import LyingDevice
    from .report import ReportScope

__all__ = ["GATE_FORMAT", "GateOutcome", "run_release_gate"]

#: Identifies the ``release_gate`` section written into the audit report.
GATE_FORMAT = "diredi-release-gate/1"

Verdict = Literal["pass", "fail", "inconclusive"]
"""``inconclusive``: nothing failed, but some mechanism's claimed epsilon is at or above what its
attack can detect (the ceiling, in the report); it blocks a release like ``fail`` unless forced."""


@dataclass(frozen=True)
class GateOutcome:
    """What the release step records.

    ``verdict`` is the audit's own verdict (``forced`` does not turn a ``fail`` into a ``pass``);
    ``report_sha256`` is the hex SHA-256 of the bytes of ``report_path`` (``audit.json``);
    ``summary_line`` is the audit's one line
    (``audit: verdict=... eps_lb=... claimed_eps=... auc=... tpr_at_1pct_fpr=...``).
    """

    verdict: Verdict
    report_sha256: str
    report_path: Path
    forced: bool
    summary_line: str
    html_path: Path

    @property
    def may_release(self) -> bool:
        """True when the release may go ahead: the audit passed, or a failing or inconclusive
        verdict was forced."""
        return self.verdict == "pass" or self.forced


def run_release_gate(
    *,
    epsilon: float,
    out_dir: Path,
    profile: str = "fast",
    seed: int = 0,
    scenario: Scenario | None = None,
    force: bool = False,
    user: str = "A",
    progress: Callable[[str], None] | None = None,
    rd: RDConfig | None = None,
    implementation: LyingDevice | str = "honest",
    scope: ReportScope | None = None,
) -> GateOutcome:
    """Audit RD at the claimed ``epsilon`` and write the report into ``out_dir``.

    ``epsilon`` is the largest *total* epsilon the released knowledge claims; ``math.inf`` (a
    packet without DP) runs the audit without DP, which always fails (criterion "packet is DP").
    ``rd`` is the RD configuration the devices run (default: the shipped device configuration at
    ``epsilon``, :func:`.mechanisms.shipped_device_config`); its ``epsilon`` must be the claim.
    ``implementation`` (a :class:`~.mechanisms.LyingDevice` or its value) picks the device
    implementation under attack: ``"honest"``, or a positive control. Verdicts: ``pass``,
    ``fail``, ``inconclusive`` (a claim above its attack's ceiling; never ``pass``).
    ``scenario`` defaults to the one built from ``seed``; ``user`` picks the device whose data the
    audit trains on. ``scope`` (release, devices, packets, date) heads the report; default: now,
    no release named. Never raises on a failing verdict. Raises :class:`ConfigError` for an
    epsilon that is not > 0 or an unknown profile, :class:`~diredi_secure.errors.LocalError`
    if the report cannot be written (checked for the directory before the audit runs).
    """
    if math.isnan(epsilon) or not epsilon > 0:
        raise ConfigError(f"the release gate needs a claimed epsilon > 0, got {epsilon}")
    if profile not in PROFILES:
        raise ConfigError(f"unknown audit profile {profile!r}; choose one of {sorted(PROFILES)}")
    try:  # fail before minutes of work, not after
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalError(f"cannot create the audit report directory {out_dir}: "
                         f"{exc.strerror}") from exc
    from .mechanisms import LyingDevice  # torch is imported on use only
    from .report import write_report
    from .suite import AuditConfig, run_audit

    try:
        impl = LyingDevice(implementation)
    except ValueError as exc:
        raise ConfigError(f"unknown device implementation {implementation!r}; choose one of "
                          f"{[v.value for v in LyingDevice]}") from exc
    config = AuditConfig(epsilon=epsilon, rd=rd, implementation=impl, profile=PROFILES[profile],
                         seed=seed, user=user)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' advisory warnings, not findings
        result = run_audit(config, scenario=scenario, progress=progress)
    verdict: Verdict = result.verdict
    forced = force and verdict != "pass"
    section: dict[str, object] = {
        "format": GATE_FORMAT,
        "profile": profile,
        "claimed_epsilon": epsilon,
        "seed": seed,
        "user": user,
        "implementation": impl.value,
        "verdict": verdict,
        "mechanisms": {m.mechanism: {"verdict": m.verdict, "claimed_epsilon": m.claimed_epsilon,
                                     "ceiling": m.ceiling} for m in result.mechanisms},
        "force_requested": force,
        "forced": forced,
    }
    json_path, html_path, digest = write_report(result, out_dir, release_gate=section,
                                                scope=scope)
    return GateOutcome(
        verdict=verdict,
        report_sha256=digest,
        report_path=json_path,
        forced=forced,
        summary_line=result.summary_line(),
        html_path=html_path,
    )

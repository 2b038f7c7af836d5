"""The learning loop as cloud and device jobs over workspaces: KD + release, RD + seal, merge + release.

Cloud (a :class:`~.workspace.CloudWorkspace`):

* :func:`distill_and_release` -- build (or load) the scenario, train the teacher on the presumed
  data, distil the edge student (KD) and publish it as release v1 through the TUF
  :class:`~diredi_secure.release.ReleaseRepository`: weights (safetensors), architecture JSON, the
  public reference set, the inbox public key, and an in-toto attestation (no parent, 0 packets).
* :func:`merge_and_release` -- open every unmerged stored packet again with the inbox key (packets
  are stored as received, still encrypted), merge them into the teacher, re-distil a fleet model
  and one model per contributing device (weighted by that device's noised class histogram), run
  the audit gate, and publish release N+1: the fleet model at the top level and each device's
  model under ``devices/<id>/`` signed by a delegated role of its own. The merged packets are
  marked in the store in the same transaction that records the release.

Device (an :class:`~.edge.EdgeAgent`):

* :func:`update_device` -- install the newest release meant for this device: its own delegated
  release when one is published, else the fleet release.
* :func:`reverse_on_device` -- load the INSTALLED model and the reference set of its release, run
  reverse distillation with DP (Opacus) on the user's data, and seal the packet (queued in the
  outbox; :meth:`EdgeAgent.submit` sends it).

Extra cloud workspace files: ``scenario/`` (the split every job shares), ``models/teacher.safetensors``
(the current cloud model), ``models/teacher-v1.safetensors`` (the teacher of release v1: every merge
keeps its presumed knowledge), ``models/<sha256>.safetensors`` (every edge model released: the base a
packet names), ``audits/release-v<N>.json`` (the gate's report), ``releases.json`` (index).

Crash ordering: a release is published (TUF metadata written atomically) before the store records it
and marks its packets merged. A crash in between leaves the packets unmerged; the next merge uses
them again in a higher version, which is safe (a release never claims packets it did not use).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diredi_secure import privacy
from diredi_secure.checkpoint import atomic_write_bytes, checkpoint_bytes, load_checkpoint_bytes
from diredi_secure.errors import (
    CertificateRevoked,
    ConfigError,
    DirediError,
    ModelFormatError,
    PayloadInvalid,
    ReleaseRefused,
    StoreError,
    UnknownDevice,
)
from diredi_secure.knowledge import DPParameters, PayloadKind, encode_payload
from diredi_secure.ml.data import Dataset, Scenario, load_scenario, make_scenario, save_scenario
from diredi_secure.ml.distill import KDConfig, TrainConfig, distill_student, train_classifier
from diredi_secure.ml.evaluate import accuracy
from diredi_secure.ml.executor import JobExecutor
from diredi_secure.ml.merge import (
    DeviceKnowledge,
    MergeConfig,
    MergeGroup,
    check_payload_fits,
    merge_groups_streamed,
)
from diredi_secure.ml.models import (
    build_model,
    load_model_bytes,
    model_bytes,
    student_spec,
    teacher_spec,
)
from diredi_secure.ml.rekd import (
    ReKDConfig,
    UserReKD,
    UserReKDShared,
    rekd_student,
    rekd_user_task,
)
from diredi_secure.ml.reverse import DEFAULT_PAYLOAD_KINDS, RDConfig, reverse_distill
from diredi_secure.packet import (
    DeviceRecord,
    MemoryReplayState,
    OpenedPacket,
    SealedPacket,
    open_packet,
)
from diredi_secure.policy import DEFAULT_POLICY, PacketPolicy
from diredi_secure.release import (
    AuditVerdict,
    DeviceEpsilon,
    ReleaseBundle,
    ReleasePredicate,
    ReleaseRepository,
)
from diredi_secure.release.repository import (
    ATTESTATION_TARGET,
    MODEL_TARGET,
    REFERENCE_SET_TARGET,
)
from diredi_secure.store import Store, StoredPacket

# The device's update path lives in .edge (no torch on it); re-exported here for callers.
from .edge import EdgeAgent, device_prefix, device_role, update_device
from .workspace import CloudWorkspace, _read, _read_json, _write_json

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "AuditGate",
    "DeviceRound",
    "GateInput",
    "GateOutcome",
    "JobSettings",
    "ReleaseOutcome",
    "accounting_gate",
    "default_audit_gate",
    "device_prefix",
    "device_role",
    "distill_and_release",
    "export_user_data",
    "merge_and_release",
    "reverse_on_device",
    "update_device",
]

log = logging.getLogger("diredi.jobs")

REFERENCE_TENSOR = "reference_x"
REFERENCE_FORMAT = "diredi-reference-set-v1"
AUDIT_REPORT_FORMAT = "diredi-release-audit-v1"
_MAX_MODEL_BYTES = 64 * 1024 * 1024
ORIGINAL_TEACHER = "teacher-v1.safetensors"
"""The teacher release v1 was distilled from (``models/``): the presumed anchor of every merge."""


# ------------------------------------------------------------------------------------------------
# Names and settings
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSettings:
    """Training settings of the cloud jobs (defaults: ``diredi_secure.ml``'s documented ones)."""

    teacher: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    rekd: ReKDConfig = field(default_factory=ReKDConfig)
    # The presumed guard of every merge's release: a model whose accuracy on the manufacturer's
    # presumed validation split falls more than this below release v1's is not released. A
    # per-user model that fails leaves its device on what it has (its own earlier per-user release,
    # else the fleet model); a fleet model that fails is
    # replaced by the current fleet model, released again. None: no guard. 0.02: the fleet goal
    # (D <= 2 points over five rounds, issue 17), applied to the validation split, never the test
    # set.
    presumed_guard: float | None = 0.02
    # The same guard for a per-user model, looser: that model is for a user whose own classes it
    # learnt, and learning them costs some presumed accuracy (the loop's per-user models give up
    # 2.4 presumed points at epsilon 8, docs/RESULTS.md). Held to 0.02, the typical per-user model
    # was not released and its user got nothing: in the demo, device-A at 0.947 and device-C at
    # 0.920 against a floor of 0.953 (v1 0.973), mean user gain +0.0 on one run of two. 0.05
    # still stops a merge that wrecked the presumed classes. None: no guard on per-user models.
    user_presumed_guard: float | None = 0.05
    # The fleet model's presumed rows carry at least this share of its re-KD's sample weight
    # (``rekd.fleet_weights``). Uniform weights drowned them as the transfer set grew with the
    # fleet (11% at N = 200), and the guard above then held the fleet model back in every round
    # after the first (issue 17, N = 50 to 10,000). 0.5: the presumed data and the fleet's
    # transfer rows weigh the same, not tuned. None: uniform.
    fleet_presumed_share: float | None = 0.5

    @classmethod
    def tiny(cls) -> JobSettings:
        """One or two epochs everywhere: for tests and smoke runs, not for accuracy (so no presumed
        guard either: models trained for two epochs are held to nothing)."""
        kd = KDConfig(epochs=2)
        return cls(
            teacher=TrainConfig(epochs=2),
            kd=kd,
            merge=replace(MergeConfig(), epochs=2, synth_steps=2, jitter_per_class=4),
            rekd=ReKDConfig(kd=kd),
            presumed_guard=None,
            user_presumed_guard=None,
        )

    def __post_init__(self) -> None:
        for name in ("presumed_guard", "user_presumed_guard"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ConfigError(f"{name} must lie in [0, 1) (or None)")
        share = self.fleet_presumed_share
        if share is not None and not 0 < share < 1:
            raise ConfigError("fleet_presumed_share must lie in (0, 1) (or None)")

    def digest(self) -> str:
        """SHA-256 of the settings as canonical JSON (the attestation's trainingConfig)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class ReleaseOutcome:
    """What a cloud job published."""

    version: int
    model_sha256: str
    audit_verdict: str
    audit_forced: bool
    packet_count: int
    device_models: dict[str, str]
    """Device id -> SHA-256 of its own model in this release (empty for v1)."""
    skipped_packets: dict[str, str]
    """Packet id (hex) -> why it was left unmerged."""
    metrics: dict[str, float]
    seconds: float


# ------------------------------------------------------------------------------------------------
# The audit gate (a hook: diredi_secure.audits provides the checks)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateInput:
    """What the audit gate sees: the opened packets of the round and the scenario."""

    release_version: int
    packets: Iterable[OpenedPacket]
    """The round's packets, opened; streamed from the store on each iteration (iterate it as often
    as needed, never hold it whole: a fleet's round does not fit in memory)."""
    scenario: Scenario
    seed: int
    out_dir: Path | None = None
    """Where the audit suite writes its HTML/JSON report (None: a folder is not kept)."""


@dataclass(frozen=True)
class GateOutcome:
    """The gate's verdict and its report (bytes, stored and digested into the attestation)."""

    verdict: AuditVerdict
    report: bytes


AuditGate = Callable[[GateInput], GateOutcome]
"""The release gate: a failing verdict blocks the release unless it is forced (and recorded)."""


def _report(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode() + b"\n"


def accounting_gate(gate: GateInput) -> GateOutcome:
    """Fast gate: recompute every packet's epsilon from its declared DP parameters.

    Uses ``diredi_secure.audits.accounting.check_packet_accounting``; any fatal finding fails.
    """
    from diredi_secure.audits.accounting import check_packet_accounting

    checks = []
    for opened in gate.packets:
        check = check_packet_accounting(opened.header.dp, opened.payload.tensors)
        checks.append({"packet": opened.header.packet_id.hex(), "device": opened.header.device_id,
                       **check.to_json()})
    ok = all(c["ok"] for c in checks)
    return GateOutcome(
        AuditVerdict.PASS if ok else AuditVerdict.FAIL,
        _report({"format": AUDIT_REPORT_FORMAT, "release": gate.release_version,
                 "profile": "accounting", "verdict": "pass" if ok else "fail",
                 "packets": checks}),
    )


def default_audit_gate(profile: str = "fast") -> AuditGate:
    """The accounting gate, plus (``fast``/``full``) the privacy-leakage audit suite run on the
    scenario at the largest epsilon the round's packets claim (``audits.suite.run_audit``).

    ``profile="accounting"`` runs the accounting checks only (seconds, for tests).
    """

    def gate(inputs: GateInput) -> GateOutcome:
        base = accounting_gate(inputs)
        if profile == "accounting":
            return base
        import tempfile

        from diredi_secure.audits.gate import run_release_gate
        from diredi_secure.audits.profiles import PROFILES

        if profile not in PROFILES:
            raise ConfigError(f"unknown audit profile {profile!r} (accounting, {', '.join(PROFILES)})")
        worst = None
        devices: set[str] = set()
        count = 0
        for opened in inputs.packets:  # one pass: the costliest packet, and what the round holds
            count += 1
            devices.add(opened.header.device_id)
            if worst is None or opened.epsilon > worst.epsilon:
                worst = opened
        claimed = worst.epsilon if worst is not None else 8.0
        if not math.isfinite(claimed):
            return GateOutcome(AuditVerdict.FAIL, _report({
                "format": AUDIT_REPORT_FORMAT, "release": inputs.release_version, "profile": profile,
                "verdict": "fail", "reason": "a packet declares no DP (epsilon infinite)"}))
        out_dir = inputs.out_dir or Path(tempfile.mkdtemp(prefix="diredi-audit-"))
        # The suite attacks the configuration devices ship: the round's costliest packet's payload
        # kinds at its total epsilon, with the schedule's N-independent parameters and delta, on a
        # stand-in user the cloud controls (it never sees private data).
        kinds = (tuple(e.kind for e in worst.header.payload.entries) if worst is not None
                 else DEFAULT_PAYLOAD_KINDS)
        from datetime import UTC, datetime

        from diredi_secure.audits.report import ReportScope

        scope = ReportScope(created_at=datetime.now(UTC), release=str(inputs.release_version),
                            devices=sorted(devices), packets=count)
        outcome = run_release_gate(epsilon=claimed, out_dir=out_dir, profile=profile,
                                   seed=inputs.seed, scenario=inputs.scenario,
                                   rd=RDConfig(epsilon=claimed, kinds=kinds), scope=scope)
        if base.verdict is not AuditVerdict.PASS or outcome.verdict == "fail":
            verdict = AuditVerdict.FAIL
        elif outcome.verdict == "inconclusive":
            verdict = AuditVerdict.INCONCLUSIVE  # releasable; the report shows each ceiling
        else:
            verdict = AuditVerdict.PASS
        return GateOutcome(
            verdict,
            _report({"format": AUDIT_REPORT_FORMAT, "release": inputs.release_version,
                     "profile": profile, "verdict": verdict.value,
                     "accounting": json.loads(base.report),
                     "suite": {"verdict": outcome.verdict, "summary": outcome.summary_line,
                               "report_sha256": outcome.report_sha256,
                               "report_json": str(outcome.report_path),
                               "html": str(outcome.html_path)}}),
        )

    return gate


# ------------------------------------------------------------------------------------------------
# Cloud workspace state used by the jobs
# ------------------------------------------------------------------------------------------------
def _scenario_dir(ws: CloudWorkspace) -> Path:
    return ws.root / "scenario"


def _models_dir(ws: CloudWorkspace) -> Path:
    return ws.root / "models"


def _index_path(ws: CloudWorkspace) -> Path:
    return ws.root / "releases.json"


def _index(ws: CloudWorkspace) -> dict[str, Any]:
    path = _index_path(ws)
    if not path.is_file():
        return {"format": 1, "models": {}, "fleet": []}
    return _read_json(path, "release index")


def _save_model(ws: CloudWorkspace, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(_models_dir(ws) / f"{digest}.safetensors", data)
    return digest


def _load_model(path: Path, what: str) -> nn.Module:
    model, _, _ = load_model_bytes(_read(path, what, _MAX_MODEL_BYTES))
    return model


def _scenario(ws: CloudWorkspace) -> Scenario:
    if not (_scenario_dir(ws) / "scenario.json").is_file():
        raise ConfigError(f"{ws.root} has no scenario yet: run `diredi cloud distill` first")
    return load_scenario(_scenario_dir(ws))


def reference_set_bytes(reference_x: np.ndarray) -> bytes:
    """The public reference set as it ships in a release (safetensors, one float32 tensor)."""
    return checkpoint_bytes({REFERENCE_TENSOR: np.asarray(reference_x, np.float32)},
                            {"format": REFERENCE_FORMAT})


def load_reference_set(data: bytes) -> np.ndarray:
    """Parse a release's reference set; raises :class:`ModelFormatError`."""
    tensors, meta = load_checkpoint_bytes(data, max_bytes=_MAX_MODEL_BYTES)
    if meta.get("format") != REFERENCE_FORMAT or REFERENCE_TENSOR not in tensors:
        raise ModelFormatError("the release's reference set is not a diredi reference set")
    x = tensors[REFERENCE_TENSOR].astype(np.float32)
    if x.ndim != 4 or x.shape[1:] != (1, 8, 8) or not np.all(np.isfinite(x)):
        raise ModelFormatError(f"reference set has shape {list(x.shape)}, expected [N, 1, 8, 8]")
    return x


def _repository(ws: CloudWorkspace, passphrase: bytes | None) -> ReleaseRepository:
    if not (ws.repository_dir / "metadata" / "1.root.json").is_file():
        raise ConfigError(f"{ws.repository_dir} holds no release repository (made by `cloud init`)")
    return ReleaseRepository(ws.repository_dir, passphrase=passphrase)


def _attestation_sha(published: Any, prefix: str) -> str:
    return str(published.targets[prefix + ATTESTATION_TARGET])


# ------------------------------------------------------------------------------------------------
# Cloud: KD and release v1
# ------------------------------------------------------------------------------------------------
def distill_and_release(
    workspace: CloudWorkspace,
    *,
    now: datetime,
    seed: int = 0,
    scenario_dir: Path | None = None,
    settings: JobSettings | None = None,
    passphrase: bytes | None = None,
    progress: Callable[[str], None] | None = None,
) -> ReleaseOutcome:
    """Scenario, teacher, KD student, release v1 (published through TUF, recorded in the store).

    Refuses (:class:`ConfigError`) when a fleet release is already published: v1 is made once.
    The attestation records no parent and no packets; no packet was merged, so the privacy
    audit has nothing to audit: the verdict field says ``pass`` (the only values a device knows
    are pass/fail) and the audit report it digests says ``not_applicable`` and why.
    """
    settings = settings or JobSettings()
    t0 = time.perf_counter()
    repo = _repository(workspace, passphrase)
    if repo.current_release("") is not None:
        raise ConfigError(f"{workspace.root} already published v{repo.current_release('')}: "
                          "use `diredi cloud merge` for the next release")
    scenario = load_scenario(scenario_dir) if scenario_dir is not None else make_scenario(seed)
    save_scenario(scenario, _scenario_dir(workspace))

    say = progress or (lambda _m: None)
    say(f"distill: training the cloud model on {len(scenario.presumed_train)} presumed examples")
    teacher = build_model(teacher_spec(), seed=seed)
    train_classifier(teacher, scenario.presumed_train, settings.teacher, seed=seed)
    say("distill: distilling the edge student (KD) on the presumed data and the reference set")
    student = build_model(student_spec(), seed=seed + 1)
    distill_student(student, teacher, scenario.presumed_train, scenario.reference_x, settings.kd,
                    seed=seed)
    teacher_file = model_bytes(teacher, teacher_spec())
    atomic_write_bytes(_models_dir(workspace) / "teacher.safetensors", teacher_file)
    # The manufacturer's original teacher, kept: every later merge holds its presumed knowledge.
    atomic_write_bytes(_models_dir(workspace) / ORIGINAL_TEACHER, teacher_file)
    model = model_bytes(student, student_spec())
    sha = _save_model(workspace, model)

    report = _report({
        "format": AUDIT_REPORT_FORMAT, "release": 1, "verdict": "not_applicable",
        "recorded_verdict": "pass",
        "reason": "no knowledge packet was merged: the model is distilled from the manufacturer's "
                  "presumed data and the public reference set only; no user data to audit",
    })
    report_sha = _write_audit_report(workspace, 1, report)
    predicate = ReleasePredicate.build(
        release_version=1, parent_digest=None, parent_version=None, packet_digests=[], epsilon=[],
        accountant="none", audit_report_digest=report_sha, audit_verdict=AuditVerdict.PASS,
        training_config_digest=settings.digest(),
    )
    published = repo.publish(
        ReleaseBundle(
            version=1, model=model, architecture=student_spec().to_json().encode(),
            predicate=predicate, reference_set=reference_set_bytes(scenario.reference_x),
            inbox_public_key=_read(workspace.root / "inbox.pub", "inbox public key"),
        ),
        now=now,
    )
    index = _index(workspace)
    index["models"][sha] = {"version": 1, "prefix": "", "device": None}
    index["fleet"].append({"version": 1, "sha256": sha})
    _write_json(_index_path(workspace), index)
    with workspace.open_store() as store:
        store.record_release("1", sha, _attestation_sha(published, ""), int(now.timestamp() * 1000))
    metrics = {
        "teacher_presumed_acc": accuracy(teacher, scenario.presumed_test),
        "student_presumed_acc": accuracy(student, scenario.presumed_test),
        **{f"student_user_{u.name}_acc": accuracy(student, u.test) for u in scenario.users},
    }
    log.info("release v1 published (%s)", sha[:16])
    return ReleaseOutcome(1, sha, "not_applicable", False, 0, {}, {}, metrics,
                          time.perf_counter() - t0)


def _write_audit_report(ws: CloudWorkspace, version: int, report: bytes) -> str:
    atomic_write_bytes(ws.root / "audits" / f"release-v{version}.json", report)
    return hashlib.sha256(report).hexdigest()


def export_user_data(workspace: CloudWorkspace, user: str, out: Path, *, part: str = "train") -> int:
    """Write one scenario user's split as ``npz`` (``x``, ``y``): a lab device's private data.

    Returns the number of examples. Raises :class:`ConfigError` for an unknown user or part.
    """
    scenario = _scenario(workspace)
    try:
        split = scenario.user(user)
    except (KeyError, ValueError, DirediError) as exc:
        names = ", ".join(u.name for u in scenario.users)
        raise ConfigError(f"no user {user!r} in the scenario ({names})") from exc
    if part not in ("train", "val", "test"):
        raise ConfigError(f"part must be train, val or test, not {part!r}")
    data: Dataset = getattr(split, part)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as handle:
        np.savez(handle, x=data.x, y=data.y)
    return len(data)


# ------------------------------------------------------------------------------------------------
# Cloud: merge, re-KD, gate, release N+1
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Used:
    """What the release needs of one merged packet once its payload is gone (the stream moved on)."""

    packet_id: bytes
    device_id: str
    counter: int
    base: str
    packet_sha256: bytes
    curve: np.ndarray
    accountant: str


class _ChargedDevices:
    """The store's device directory without the ledger: a stored packet is already charged, so
    opening it again must not check it against a ledger that includes it (``open_packet`` refuses
    early on a record's budget; with the packet counted twice a device at half its budget failed
    the merge with ``budget_exceeded``). Revocation still counts: status comes from the store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def device_record(self, device_id: str) -> DeviceRecord | None:
        record = self._store.device_record(device_id)
        return None if record is None else replace(record, rdp_spent=None, epsilon_budget=None)


def _open_one(
    stored: StoredPacket, keys: Any, store: Store, policy: PacketPolicy
) -> OpenedPacket:
    """Open a stored packet again (decrypt + verify) at the time it was received."""
    result = open_packet(
        stored.packet_bytes, inbox_key=keys.inbox_key, device_ca=keys.device_ca_der,
        devices=_ChargedDevices(store), replay=MemoryReplayState(), now_ms=stored.received_at_ms,
        policy=policy,
    )
    if result.packet_sha256 != stored.packet_sha256:
        raise StoreError(f"stored packet {stored.packet_id.hex()} does not match its digest")
    return result


class _StoredStream:
    """The round's packets, streamed from the store and opened again on each pass (re-iterable).

    Only the packets chosen in the first pass (``ids``) come out, in arrival order: packets that
    arrive while the job runs wait for the next release."""

    def __init__(self, store: Store, keys: Any, policy: PacketPolicy, ids: set[bytes]) -> None:
        self._store, self._keys, self._policy, self._ids = store, keys, policy, ids

    def __iter__(self) -> Iterator[OpenedPacket]:
        seen = 0
        for stored in self._store.iter_packets(unmerged_only=True):
            if stored.packet_id in self._ids:
                seen += 1
                try:
                    yield _open_one(stored, self._keys, self._store, self._policy)
                except (CertificateRevoked, UnknownDevice) as exc:
                    raise ConfigError(f"packet {stored.packet_id.hex()} cannot be opened any more "
                                      f"({exc.one_line()}); run the merge again") from exc
        if seen != len(self._ids):
            raise ConfigError("packets of this round were merged by another job meanwhile; "
                              "run the merge again")


def merge_and_release(
    workspace: CloudWorkspace,
    store: Store,
    *,
    now: datetime,
    seed: int = 0,
    settings: JobSettings | None = None,
    audit_gate: AuditGate | None = None,
    force_release: bool = False,
    policy: PacketPolicy = DEFAULT_POLICY,
    passphrase: bytes | None = None,
    executor: JobExecutor | None = None,
    rekd_sample: int | None = None,
    chunk_size: int = 64,
    progress: Callable[[str], None] | None = None,
) -> ReleaseOutcome:
    """Merge every unmerged stored packet and publish the next release (fleet + per device).

    The packets stream from the store (:meth:`Store.iter_packets`): a first pass opens each one
    and keeps what the release needs (ids, digests, ledger curves; no payload); one merge
    (:func:`~diredi_secure.ml.merge.merge_groups_streamed`) streams them again, base model by base
    model, each device against the model it ran, and fine-tunes the teacher once. The
    merge's chunks, the teacher's fine-tuning, the fleet re-KD and each per-user re-KD run on
    ``executor`` (default in-process; the same seeds give the same release on every executor).

    ``rekd_sample``: at most this many contributing devices (a seeded choice) get a model of
    their own in this release; the others keep what they install now: their own newest per-user
    release if an earlier one made one (``update_device`` tries its own role first), else the
    fleet model (None: every contributor). For
    fleets whose per-user re-KD does not fit one release window; the outcome lists who got one.

    ``audit_gate`` defaults to :func:`default_audit_gate` (``fast``). A failing verdict raises
    :class:`ReleaseRefused` (reason ``audit_failed``) before anything is published, unless
    ``force_release``; then the attestations record ``verdict: fail, forced: true``.
    The presumed guards hold the release's models to release v1's accuracy on the presumed
    validation split: a per-user model more than ``settings.user_presumed_guard`` below it is not
    released (its device keeps its own earlier per-user release if it has one, else the fleet
    model; ``metrics["guarded_user_models"]``); a fleet
    model more than ``settings.presumed_guard`` below it is not either: the release ships the
    current fleet model again
    (``metrics["fleet_model_held_back"]``), with the merged teacher and the per-user models that
    pass.
    Packets of revoked or unknown devices, or computed against a model this cloud never released,
    are left unmerged (listed in ``skipped_packets``). Raises :class:`ConfigError` when there is
    nothing to merge.
    """
    from diredi_secure.ml.executor import InProcessExecutor

    settings = settings or JobSettings()
    gate = audit_gate or default_audit_gate("fast")
    executor = executor if executor is not None else InProcessExecutor()
    if rekd_sample is not None and rekd_sample < 0:
        raise ConfigError(f"rekd_sample must be >= 0, got {rekd_sample}")
    t0 = time.perf_counter()
    repo = _repository(workspace, passphrase)
    fleet_version = repo.current_release("")
    if fleet_version is None:
        raise ConfigError("no release is published yet: run `diredi cloud distill` first")
    version = fleet_version + 1
    index = _index(workspace)
    scenario = _scenario(workspace)
    keys = workspace.keys(passphrase)
    n_ref = len(scenario.reference_x)

    # Pass 1: open every unmerged packet once; keep what the release needs, not the payloads.
    skipped: dict[str, str] = {}
    groups: dict[str, list[_Used]] = {}
    base_models: dict[str, nn.Module] = {}
    pending = 0
    for stored in store.iter_packets(unmerged_only=True):
        pending += 1
        pid = stored.packet_id.hex()
        try:
            opened = _open_one(stored, keys, store, policy)
        except (CertificateRevoked, UnknownDevice) as exc:
            skipped[pid] = exc.one_line()
            log.warning("packet %s left unmerged: %s", pid, exc.one_line())
            continue
        base = opened.header.base_model_version
        if base not in index["models"]:
            skipped[pid] = f"base model {base[:16]} was never released here"
            continue
        # One packet that does not fit its model or the reference set must not stop the round for
        # everyone (issue 14 finding 7): skip it, record why, merge the rest.
        if base not in base_models:
            base_models[base] = _load_model(_models_dir(workspace) / f"{base}.safetensors",
                                            "released model")
        try:
            check_payload_fits(opened.payload, base_models[base], n_ref,
                               image_shape=tuple(scenario.reference_x.shape[1:]))
        except PayloadInvalid as exc:
            skipped[pid] = f"payload does not fit its model: {exc.message}"
            continue
        groups.setdefault(base, []).append(_Used(
            stored.packet_id, opened.header.device_id, opened.header.counter, base,
            opened.packet_sha256, opened.charge.curve, opened.header.dp.accountant))
    if not pending:
        raise ConfigError("there are no unmerged packets in the store")
    used = [u for group in groups.values() for u in group]
    if not used:
        raise ConfigError(f"no packet can be merged ({len(skipped)} skipped: {skipped})")

    say = progress or (lambda _m: None)
    say(f"merge: {len(used)} packets from {len({u.device_id for u in used})} devices against "
        f"{len(groups)} base models ({len(skipped)} skipped); merging into the cloud model")
    teacher_bytes = _read(_models_dir(workspace) / "teacher.safetensors", "cloud model",
                          _MAX_MODEL_BYTES)
    supports: dict[str, list[np.ndarray]] = {}
    weights: dict[str, float] = {}
    kernels: dict[str, np.ndarray] = {}  # per device: its sensor, fitted from its DP prototypes
    # Per device: its own claims (sparse, rows in the transfer set) and own rows.
    claims: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    own_rows: dict[str, list[tuple[int, int]]] = {}
    rng = np.random.default_rng(seed + version)
    merge_groups: list[MergeGroup] = []
    for base_sha in sorted(groups):
        ids = {u.packet_id for u in groups[base_sha]}
        stream = _StoredStream(store, keys, policy, ids)

        def devices(stream: _StoredStream = stream) -> Iterator[DeviceKnowledge]:
            for o in stream:
                yield DeviceKnowledge(f"{o.header.device_id}#{o.header.counter}", o.payload)

        merge_groups.append(MergeGroup(
            _read(_models_dir(workspace) / f"{base_sha}.safetensors", "released model",
                  _MAX_MODEL_BYTES), devices))
    # One merge for every base model (stale bases and per-user models included): each device's
    # difference against the model it ran, one fine-tuning of the teacher, its presumed knowledge
    # held to the manufacturer's original teacher (docs/FLEET.md, Limits).
    anchor_path = _models_dir(workspace) / ORIGINAL_TEACHER
    anchor_bytes = (_read(anchor_path, "original cloud model", _MAX_MODEL_BYTES)
                    if anchor_path.is_file() else None)
    merged = merge_groups_streamed(teacher_bytes, merge_groups, scenario.reference_x,
                                   scenario.presumed_train, settings.merge, seed=seed + version,
                                   rng=rng, presumed_val=scenario.presumed_val, executor=executor,
                                   chunk_size=chunk_size, presumed_anchor=anchor_bytes)
    teacher_bytes = model_bytes(merged.teacher, teacher_spec())
    for u in used:
        name = f"{u.device_id}#{u.counter}"
        supports.setdefault(u.device_id, []).append(merged.supports[name])
        sparse = merged.own_claim_rows.get(name)
        if sparse is not None:
            claims.setdefault(u.device_id, []).append(sparse)
        start_stop = merged.owner_rows.get(name)
        if start_stop is not None:
            own_rows.setdefault(u.device_id, []).append(start_stop)
        weights[name] = float(merged.weights[name])
        kernel = merged.sensor_kernels.get(name)
        if kernel is not None:
            kernels[u.device_id] = kernel
    transfer_x = merged.transfer_x
    teacher = merged.teacher

    used_ids = {u.packet_id for u in used}
    say(f"merge: audit gate on release v{version}")
    gate_outcome = gate(GateInput(version, _StoredStream(store, keys, policy, used_ids), scenario,
                                  seed, out_dir=workspace.root / "audits" / f"release-v{version}"))
    forced = False
    if gate_outcome.verdict is AuditVerdict.FAIL:
        _write_audit_report(workspace, version, gate_outcome.report)
        if not force_release:
            raise ReleaseRefused(
                f"release v{version} failed the audit gate (report in audits/release-v{version}.json);"
                " pass --force-release to publish it anyway (recorded in the attestation)",
                reason="audit_failed",
            )
        forced = True
        log.warning("release v%d FORCED despite a failed audit", version)
    report_sha = _write_audit_report(workspace, version, gate_outcome.report)

    say(f"merge: audit verdict {gate_outcome.verdict.value}; fleet re-KD")
    t_fleet = time.perf_counter()
    fleet_shared = UserReKDShared(teacher_bytes, student_spec(), scenario.presumed_train,
                                  transfer_x, n_ref, settings.rekd, seed + 2)
    fleet_bytes = executor.run(_fleet_rekd_task, fleet_shared, settings.fleet_presumed_share)
    fleet = load_model_bytes(fleet_bytes)[0]
    v1_presumed = _v1_presumed(workspace, index, scenario, settings)
    floor = None if v1_presumed is None or settings.presumed_guard is None \
        else v1_presumed - settings.presumed_guard
    user_floor = None if v1_presumed is None or settings.user_presumed_guard is None \
        else v1_presumed - settings.user_presumed_guard
    fleet_held = False
    if floor is not None and accuracy(fleet, scenario.presumed_val) < floor:
        # The new fleet model lost the presumed classes: the release ships the current fleet
        # model again (the devices on it download nothing); the teacher keeps what it merged and
        # the per-user models that pass the guard are released.
        log.warning("release v%d: the fleet model is below the presumed guard (%.3f); the "
                    "current fleet model is released again", version, floor)
        fleet_bytes = _read(_models_dir(workspace) / f"{index['fleet'][-1]['sha256']}.safetensors",
                            "released model", _MAX_MODEL_BYTES)
        fleet = load_model_bytes(fleet_bytes)[0]
        fleet_held = True
    fleet_seconds = time.perf_counter() - t_fleet
    contributors = sorted(supports)
    chosen = contributors
    if rekd_sample is not None and rekd_sample < len(contributors):
        pick = np.random.default_rng(seed + version + 3).choice(len(contributors), rekd_sample,
                                                                replace=False)
        chosen = [contributors[i] for i in sorted(pick)]
    users = [UserReKD(d, np.mean(np.stack(supports[d]), axis=0), kernels.get(d),
                      tuple(claims.get(d, ())), tuple(own_rows.get(d, ())), d in claims)
             for d in chosen]
    say(f"merge: per-user re-KD for {len(chosen)} devices")
    t_users = time.perf_counter()
    per_device = dict(zip(chosen, executor.map(rekd_user_task, fleet_shared, users), strict=True))
    guarded: list[str] = []
    if user_floor is not None:
        # A per-user model that lost the presumed classes is not released: its device keeps
        # installing what it has (its own earlier per-user release, else the fleet model).
        presumed = {d: accuracy(load_model_bytes(data)[0], scenario.presumed_val)
                    for d, data in per_device.items()}
        guarded = [d for d, acc in presumed.items() if acc < user_floor]
        for d in guarded:
            del per_device[d]
        if guarded:
            log.warning("release v%d: %d per-user models below the presumed guard (%.3f), not "
                     "released: %s", version, len(guarded), user_floor,
                     ", ".join(f"{d} {presumed[d]:.3f}" for d in guarded[:20]))
    user_seconds = time.perf_counter() - t_users

    ledger = {d.device_id: d.epsilon_spent for d in store.list_devices()}

    def predicate(items: list[_Used], parent_sha: str | None) -> ReleasePredicate:
        # A device's packets in this round compose (RDP curves), like its lifetime ledger.
        curves: dict[str, np.ndarray] = {}
        for i in items:
            curves[i.device_id] = privacy.compose([curves.get(i.device_id, privacy.zero_curve()),
                                                   i.curve])
        rounds = {d: privacy.lifetime_epsilon(c) for d, c in curves.items()}
        parent_version = None if parent_sha is None else int(index["models"][parent_sha]["version"])
        return ReleasePredicate.build(
            release_version=version, parent_digest=parent_sha, parent_version=parent_version,
            packet_digests=[i.packet_sha256 for i in items],
            epsilon=[DeviceEpsilon(d, e, max(e, ledger.get(d, e))) for d, e in rounds.items()],
            accountant=",".join(sorted({i.accountant for i in items})),
            audit_report_digest=report_sha, audit_verdict=gate_outcome.verdict,
            audit_forced=forced, training_config_digest=settings.digest(),
        )

    say(f"merge: publishing release v{version} through TUF")
    t_publish = time.perf_counter()
    architecture = student_spec().to_json().encode()
    reference = reference_set_bytes(scenario.reference_x)
    inbox_pem = _read(workspace.root / "inbox.pub", "inbox public key")
    fleet_parent = str(index["fleet"][-1]["sha256"])
    published = repo.publish(
        ReleaseBundle(version=version, model=fleet_bytes, architecture=architecture,
                      predicate=predicate(used, fleet_parent), reference_set=reference,
                      inbox_public_key=inbox_pem),
        now=now,
    )
    fleet_sha = _save_model(workspace, fleet_bytes)
    # A fleet model released again (presumed guard) keeps the version it was first released in.
    index["models"].setdefault(fleet_sha, {"version": version, "prefix": "", "device": None})
    index["fleet"].append({"version": version, "sha256": fleet_sha})
    device_records: list[tuple[str, str, str]] = []
    delegated = repo.targets().signed.delegations
    roles = set(delegated.roles or {}) if delegated is not None else set()
    by_device: dict[str, list[_Used]] = {}
    for u in used:
        by_device.setdefault(u.device_id, []).append(u)
    for device_id, data in per_device.items():
        prefix, role = device_prefix(device_id), device_role(device_id)
        if role not in roles:
            repo.add_delegation(role, paths=[prefix + "*"], now=now)
        items = by_device[device_id]
        # The device runs the model its newest packet was computed against: that is the parent.
        parent_sha = max(items, key=lambda i: i.counter).base
        dev_published = repo.publish(
            ReleaseBundle(version=version, model=data, architecture=architecture,
                          predicate=predicate(items, parent_sha), reference_set=reference,
                          inbox_public_key=inbox_pem),
            now=now, role=role, prefix=prefix,
        )
        sha = _save_model(workspace, data)
        index["models"][sha] = {"version": version, "prefix": prefix, "device": device_id}
        device_records.append((device_id, sha, _attestation_sha(dev_published, prefix)))
    atomic_write_bytes(_models_dir(workspace) / f"teacher-v{version}.safetensors", teacher_bytes)
    atomic_write_bytes(_models_dir(workspace) / "teacher.safetensors", teacher_bytes)
    _write_json(_index_path(workspace), index)
    now_ms = int(now.timestamp() * 1000)
    for device_id, sha, att in device_records:
        store.record_release(f"{version}/{device_id}", sha, att, now_ms)
    store.record_release(str(version), fleet_sha, _attestation_sha(published, ""), now_ms,
                         merged_packet_ids=[u.packet_id for u in used])
    publish_seconds = time.perf_counter() - t_publish
    metrics = {
        "fleet_presumed_acc": accuracy(fleet, scenario.presumed_test),
        "teacher_presumed_acc": accuracy(teacher, scenario.presumed_test),
        "seconds_fleet_rekd": fleet_seconds,
        "seconds_user_rekd": user_seconds,
        "seconds_publish": publish_seconds,
        "user_models": float(len(per_device)),
        "transfer_rows": float(len(transfer_x)),
        "merge_groups": float(len(merge_groups)),
        "presumed_guard_floor": math.nan if floor is None else floor,
        "user_presumed_guard_floor": math.nan if user_floor is None else user_floor,
        "guarded_user_models": float(len(guarded)),
        "fleet_model_held_back": float(fleet_held),
        **{f"merge_weight[{k}]": v for k, v in weights.items()},
    }
    log.info("release v%d published: fleet %s + %d device models", version, fleet_sha[:16],
             len(device_records))
    return ReleaseOutcome(
        version=version, model_sha256=fleet_sha, audit_verdict=gate_outcome.verdict.value,
        audit_forced=forced, packet_count=len(used),
        device_models={d: s for d, s, _ in device_records}, skipped_packets=skipped,
        metrics=metrics, seconds=time.perf_counter() - t0,
    )


def _v1_presumed(workspace: CloudWorkspace, index: dict[str, Any], scenario: Scenario,
                 settings: JobSettings) -> float | None:
    """Release v1's accuracy on the presumed validation split: what the presumed guards' floors
    are measured from (None without a guard or a validation split)."""
    if (settings.presumed_guard is None and settings.user_presumed_guard is None) \
            or not len(scenario.presumed_val) or not index["fleet"]:
        return None
    first = str(index["fleet"][0]["sha256"])
    v1 = _load_model(_models_dir(workspace) / f"{first}.safetensors", "release v1 model")
    return accuracy(v1, scenario.presumed_val)


def _fleet_rekd_task(shared: UserReKDShared, presumed_share: float | None) -> bytes:
    """The fleet model (every transfer row; the presumed rows weighted to ``presumed_share`` of
    the total, :func:`~diredi_secure.ml.rekd.fleet_weights`): an executor task."""
    teacher = load_model_bytes(shared.teacher)[0]
    model = rekd_student(teacher, shared.spec, shared.presumed, shared.transfer_x, shared.config,
                         seed=shared.seed, presumed_share=presumed_share)
    return model_bytes(model, shared.spec)


# ------------------------------------------------------------------------------------------------
# Device: update, reverse distillation, seal
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceRound:
    """What one RD run on the device produced (the sealed packet waits in the outbox)."""

    sealed: SealedPacket
    dp: DPParameters
    payload_bytes: int
    packet_bytes: int
    base_model_sha256: str
    base_version: int
    seconds: float


def reverse_on_device(
    agent: EdgeAgent,
    data: Dataset,
    *,
    epsilon: float,
    kinds: Sequence[PayloadKind] = DEFAULT_PAYLOAD_KINDS,
    rd: RDConfig | None = None,
) -> DeviceRound:
    """Run DP reverse distillation against the INSTALLED model and seal the packet.

    Loads the installed release (verified safetensors; its sha256 names the base model in the
    packet header), its reference set, fine-tunes with Opacus at a total ``epsilon`` (DP-SGD and
    every noised entry composed; ``math.inf``: the non-private baseline, which the cloud's default
    policy refuses) and seals with the device key (the counter is reserved and the device's own
    ledger charged first; ``BudgetExceeded``). ``rd`` supplies the other RD settings (epochs...).
    Private noise is CSPRNG-seeded per run unless ``rd.research_seed`` is set (then the header
    says so and the cloud refuses the packet by default).
    """
    t0 = time.perf_counter()
    updater = agent.updater()
    installed = updater.current_model()  # checks the slot still holds the verified bytes
    slot = installed.slot_dir
    model_data = _read(slot / MODEL_TARGET, "installed model", _MAX_MODEL_BYTES)
    # Read once, check these bytes, parse these bytes: the packet names this digest as its base.
    if hashlib.sha256(model_data).hexdigest() != installed.release.model_sha256:
        raise ModelFormatError(f"installed model in {slot} changed since it was verified")
    model, _, _ = load_model_bytes(model_data)
    ref_path = slot / REFERENCE_SET_TARGET
    if not ref_path.is_file():
        raise ConfigError(f"release v{installed.release.version} carries no reference set")
    reference_x = load_reference_set(_read(ref_path, "reference set", _MAX_MODEL_BYTES))
    config = replace(rd or RDConfig(), epsilon=epsilon, kinds=tuple(kinds))
    result = reverse_distill(model, data, reference_x, config)
    payload, _ = encode_payload(result.payload)
    sealed = agent.seal(result.payload, dp=result.dp,
                        base_model_version=installed.release.model_sha256)
    return DeviceRound(sealed, result.dp, len(payload), len(sealed.data),
                       installed.release.model_sha256, installed.release.version,
                       time.perf_counter() - t0)

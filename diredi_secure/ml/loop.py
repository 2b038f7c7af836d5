"""The whole DiReDi loop in one process: KD -> RD per user -> merge -> re-KD, with its figures."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from ..knowledge import DPParameters, PayloadKind, encode_payload
from .data import Scenario
from .distill import KDConfig, TrainConfig, distill_student, train_classifier
from .evaluate import accuracy
from .merge import DeviceKnowledge, MergeConfig, merge_into_teacher
from .models import build_model, student_spec, teacher_spec
from .rekd import ReKDConfig, rekd_student
from .reverse import RDConfig, reverse_distill, select_rd_config, trials_epsilon

__all__ = ["LoopConfig", "LoopResult", "UserOutcome", "run_loop"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    teacher: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    # The merge reads each device's reference-set logit differences from shipped + weight delta,
    # so reference logits alongside a delta are dead weight (docs/PAYLOAD-SIZE.md): not sent.
    rd: RDConfig = field(default_factory=lambda: RDConfig(kinds=(
        PayloadKind.WEIGHT_DELTA, PayloadKind.DP_PROTOTYPES)))
    merge: MergeConfig = field(default_factory=MergeConfig)
    rekd: ReKDConfig = field(default_factory=ReKDConfig)
    # Choose lr / pull weight per user on their validation split (``select_rd_config``) before RD.
    # Off by default: it runs one extra DP training per candidate (3x the RD time) and the trials
    # cost privacy (``trials_epsilon``; charged in ``UserOutcome.spent_epsilon``); the fixed
    # per-noise-level lr (``default_learning_rate``) is what the validation runs chose.
    select_rd: bool = False
    # Research reproducibility: every RD noise draw from a seed derived from ``run_loop``'s seed
    # (packets then say ``noise_seeded``). False: the OS CSPRNG, as on a real device.
    seeded_noise: bool = True


@dataclass(frozen=True)
class UserOutcome:
    name: str
    shifted: bool
    before: float          # shipped student on the user's test set
    after: float           # the user's re-KD edge model on the user's test set
    fleet_after: float     # the fleet edge model on the user's test set
    local_dp: float        # the DP-adapted model itself (never leaves the device): reference
    presumed_after: float  # the user's re-KD model on the presumed test set
    dp: DPParameters
    payload_bytes: int
    tuning_epsilon: float = 0.0  # what select_rd_config's trials spent before the released run

    @property
    def spent_epsilon(self) -> float:
        """The packet's total composed with the tuning trials (basic composition: an upper bound,
        since the trials and the released run are separate mechanisms on the same data)."""
        return self.dp.total_epsilon + self.tuning_epsilon


@dataclass(frozen=True)
class LoopResult:
    users: tuple[UserOutcome, ...]
    teacher_presumed_before: float
    teacher_presumed_after: float
    teacher_user_before: tuple[float, ...]
    teacher_user_after: tuple[float, ...]
    presumed_before: float       # shipped student
    presumed_after_fleet: float  # fleet re-KD student
    seconds: dict[str, float]
    merge_weights: dict[str, float]

    @property
    def user_gain_pts(self) -> float:
        return 100.0 * float(np.mean([u.after - u.before for u in self.users]))

    @property
    def presumed_drop_pts(self) -> float:
        """Mean over users of the drop of their re-KD model on the presumed test set."""
        return 100.0 * float(np.mean([self.presumed_before - u.presumed_after for u in self.users]))

    @property
    def epsilon(self) -> float:
        return max(u.spent_epsilon for u in self.users)

    @property
    def payload_bytes(self) -> int:
        return int(np.mean([u.payload_bytes for u in self.users]))

    def summary_line(self) -> str:
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:.2f}"
        return (f"loop: user_gain={self.user_gain_pts:+.1f} pts presumed_drop="
                f"{self.presumed_drop_pts:.1f} pts epsilon={eps} payload_bytes={self.payload_bytes}")


def run_loop(
    scenario: Scenario, config: LoopConfig, seed: int, *, epsilon: float | None = None,
    progress: bool = False,
) -> LoopResult:
    """Run KD, RD on every user, the merge and re-KD; deterministic for a seed on CPU.

    ``epsilon`` overrides ``config.rd.epsilon``, the packet's total target (``math.inf``: the
    non-private baseline). With ``config.select_rd`` the tuning trials' epsilon is charged on top
    (``UserOutcome.spent_epsilon``).
    ``progress`` shows a rich progress bar on stderr (one step per phase and user).
    """
    with _Steps(2 + 2 * len(scenario.users) + 1, enabled=progress) as steps:
        return _run_loop(scenario, config, seed, epsilon, steps)


class _Steps:
    """A rich progress bar over the loop's steps, or nothing when disabled."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if enabled:
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      console=Console(stderr=True), transient=True)
            self._task = self._progress.add_task("loop", total=total)

    def __enter__(self) -> _Steps:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, what: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=what)

    def done(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)


def _run_loop(
    scenario: Scenario, config: LoopConfig, seed: int, epsilon: float | None, steps: _Steps
) -> LoopResult:
    rd_cfg = config.rd if epsilon is None else replace(config.rd, epsilon=epsilon)
    rng = np.random.default_rng(seed)
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    steps.start("KD: teacher and edge student")
    teacher = build_model(teacher_spec(), seed=seed)
    train_classifier(teacher, scenario.presumed_train, config.teacher, seed=seed)
    shipped = build_model(student_spec(), seed=seed + 1)
    distill_student(shipped, teacher, scenario.presumed_train, scenario.reference_x, config.kd,
                    seed=seed)
    secs["kd"] = time.perf_counter() - t0
    steps.done()
    log.info("KD done in %.1f s", secs["kd"])

    t0 = time.perf_counter()
    devices, results, tuning = [], [], []
    for i, user in enumerate(scenario.users):
        steps.start(f"RD on device {user.name}")
        user_cfg = rd_cfg
        if config.seeded_noise:
            user_cfg = replace(user_cfg, research_seed=_noise_seed(seed, i, 0))
        tuning_eps = 0.0
        if config.select_rd and len(user.val):
            lrs = (0.02, 0.05, 0.1)
            trials_cfg = (replace(user_cfg, research_seed=_noise_seed(seed, i, 1))
                          if config.seeded_noise else user_cfg)
            chosen, _ = select_rd_config(shipped, user.train, user.val, scenario.reference_x,
                                         trials_cfg, lrs=lrs, pull_weights=(user_cfg.pull_weight,))
            user_cfg = replace(user_cfg, lr=chosen.lr, pull_weight=chosen.pull_weight)
            tuning_eps = trials_epsilon(user_cfg, len(lrs)) if user_cfg.private else 0.0
        res = reverse_distill(shipped, user.train, scenario.reference_x, user_cfg)
        tuning.append(tuning_eps)
        results.append(res)
        devices.append(DeviceKnowledge(user.name, res.payload))
        steps.done()
    secs["rd"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    steps.start("merge into the teacher")
    merged = merge_into_teacher(teacher, shipped, devices, scenario.reference_x,
                                scenario.presumed_train, config.merge, seed=seed,
                                rng=np.random.default_rng(rng.integers(2**32)),
                                presumed_val=scenario.presumed_val,
                                prototype_clip=rd_cfg.policy.prototype_clip)
    secs["merge"] = time.perf_counter() - t0
    steps.done()

    t0 = time.perf_counter()
    steps.start("re-KD: fleet model")
    fleet = rekd_student(merged.teacher, student_spec(), scenario.presumed_train, merged.transfer_x,
                         config.rekd, seed=seed + 2)
    steps.done()
    outcomes = []
    for user, res, tuning_eps in zip(scenario.users, results, tuning, strict=True):
        steps.start(f"re-KD: model for {user.name}")
        support = merged.supports[user.name]
        per_user = rekd_student(merged.teacher, student_spec(), scenario.presumed_train,
                                merged.transfer_x, config.rekd, seed=seed + 2, support=support,
                                domain_kernel=merged.sensor_kernels.get(user.name),
                                own_claims=merged.own_claims.get(user.name))
        steps.done()
        data, _ = encode_payload(res.payload)
        outcomes.append(UserOutcome(
            name=user.name, shifted=user.shifted,
            before=accuracy(shipped, user.test), after=accuracy(per_user, user.test),
            fleet_after=accuracy(fleet, user.test), local_dp=accuracy(res.adapted, user.test),
            presumed_after=accuracy(per_user, scenario.presumed_test), dp=res.dp,
            payload_bytes=len(data), tuning_epsilon=tuning_eps))
    secs["rekd"] = time.perf_counter() - t0
    return LoopResult(
        users=tuple(outcomes),
        teacher_presumed_before=accuracy(teacher, scenario.presumed_test),
        teacher_presumed_after=accuracy(merged.teacher, scenario.presumed_test),
        teacher_user_before=tuple(accuracy(teacher, u.test) for u in scenario.users),
        teacher_user_after=tuple(accuracy(merged.teacher, u.test) for u in scenario.users),
        presumed_before=accuracy(shipped, scenario.presumed_test),
        presumed_after_fleet=accuracy(fleet, scenario.presumed_test),
        seconds=secs,
        merge_weights=merged.weights,
    )


def _noise_seed(seed: int, user: int, role: int) -> int:
    """A research noise seed per (loop seed, user, run): repeatable, distinct per RD run."""
    state = np.random.SeedSequence([seed, user, role]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def _torch_threads() -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

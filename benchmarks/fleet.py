"""``diredi bench fleet``: a fleet of N devices over R rounds against the real cloud.

What is real: the cloud workspace and its store (SQLite, or PostgreSQL with ``--postgres``), the
ingest path (:class:`services.cloud.Ingest`: open, verify, replay, the composed epsilon ledger,
refusals), the merge and release job (:func:`services.jobs.merge_and_release`: streamed merge,
fleet and per-user re-KD, TUF publication, per-device delegated releases) on the chosen executor,
each device's DP reverse distillation (Opacus) and sealing (``packet.seal_packet``: HPKE + Ed25519,
its own key and CA-issued certificate). What is simulated: the devices themselves (one process),
their data (each device draws ``samples`` examples of one of the digits scenario's users), the
update download (a device "installs" the model file its release names instead of running the TUF
client: that path has its own tests and benchmark) and the clock (one hour per round).

The fleet's life, fixed before any run (module constants and :class:`FleetConfig`):

* devices enrol in round 1, except ``late`` of them who join in a later round;
* at each round start, a device installs the newest release meant for it (its own model if the
  last release made one, else the fleet model) unless it is one of the ``stale`` share that round:
  those report against the model they already have (a stale base, which the cloud merges against
  that base);
* a share ``revoke`` of the devices is revoked after round 1; they keep sending and are refused;
* budgets: half the devices get ``small_budget``, half the policy's lifetime budget; a device sends
  whatever its state, so once its ledger is full the cloud refuses it (``budget_exceeded``).

Per round it reports: user and presumed accuracy on a fixed sample of users (of the model each
would install after the round), the composed epsilon spent per device (median, max; with the
ledger's delta), payload and packet bytes in, model bytes out, and the cloud's CPU seconds per
accepted packet (ingest) and per released model (merge job), plus the job's wall time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from diredi_secure import _crypto
from diredi_secure.errors import ConfigError, DirediError
from diredi_secure.knowledge import encode_payload
from diredi_secure.ml.data import Dataset
from diredi_secure.ml.distill import KDConfig
from diredi_secure.ml.evaluate import accuracy
from diredi_secure.ml.executor import make_executor
from diredi_secure.ml.merge import MergeConfig
from diredi_secure.ml.models import load_model_bytes
from diredi_secure.ml.rekd import ReKDConfig
from diredi_secure.ml.reverse import DEFAULT_PAYLOAD_KINDS, RDConfig, reverse_distill
from diredi_secure.packet import seal_packet
from diredi_secure.policy import DEFAULT_POLICY

__all__ = ["FleetConfig", "FleetResult", "RoundFigures", "fleet_settings", "run_fleet"]

ROUND_MS = 3_600_000
"""One simulated hour between rounds (the clock of the devices and of the cloud)."""


@dataclass(frozen=True)
class FleetConfig:
    """One fleet run. Shares are fractions of the ``devices``."""

    devices: int = 200
    rounds: int = 3
    seed: int = 0
    samples: int = 40
    """Examples per device, drawn from its user's training split."""
    epsilon: float = 4.0
    """Each packet's total epsilon (at the policy's delta)."""
    small_budget: float = 6.0
    """Lifetime budget of half the devices (the others get the policy's): at epsilon 4 per packet
    two packets compose to 5.46 and a third would reach 6.65, so their third packet is refused."""
    late: float = 0.2
    stale: float = 0.25
    revoke: float = 0.05
    eval_users: int = 30
    rd_epochs: int = 2
    rekd_sample: int | None = None
    """At most this many devices get a per-user model per release (None: all)."""
    executor: str = "inprocess"
    address: str = "local"
    workers: int | None = None
    postgres: str | None = None
    """A PostgreSQL DSN: the store lives there (a fresh schema, dropped afterwards)."""
    tiny: bool = False
    """Smoke settings: 1-2 epochs everywhere (CI), not for accuracy."""

    def __post_init__(self) -> None:
        if not 2 <= self.devices <= 100_000 or not 1 <= self.rounds <= 50:
            raise ConfigError("devices must lie in [2, 100000] and rounds in [1, 50]")
        for name in ("late", "stale", "revoke"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1)")
        if not (0 < self.epsilon <= DEFAULT_POLICY.max_epsilon_per_packet):
            raise ConfigError(f"epsilon must lie in (0, {DEFAULT_POLICY.max_epsilon_per_packet}]")
        if not (math.isfinite(self.small_budget) and self.small_budget > 0):
            raise ConfigError("small_budget must be finite and > 0")
        if self.samples < 4 or self.eval_users < 1 or self.rd_epochs < 1:
            raise ConfigError("samples >= 4, eval_users >= 1, rd_epochs >= 1")


def fleet_settings(tiny: bool = False) -> Any:
    """The cloud's training settings for fleet runs: the job's defaults for release v1 (and its
    presumed guard); per round a shorter merge (12 epochs, 2 jittered prototypes per class, 5
    synthesis steps) and re-KD of the job's default 40 epochs (a user learns from at most 1,500
    transfer rows: the reference set, its own rows and a sample of the others'). Until issue 17's
    presumed erosion they were 3 and 8 epochs, chosen for cost: on the validation splits of an
    N = 40 fleet's round 2, per-user models at 8 / 16 / 40 re-KD epochs scored 0.933 / 0.944 /
    0.962 presumed and 0.353 / 0.368 / 0.405 user accuracy, and 12 merge epochs against 3 gave
    the teacher 1.000 against 0.982 presumed, the fleet model 0.982 against 0.956 (docs/FLEET.md).
    """
    from diredi_secure.services.jobs import JobSettings

    base = JobSettings.tiny() if tiny else JobSettings()
    merge = replace(MergeConfig(), epochs=2 if tiny else 12, jitter_per_class=2, synth_steps=5)
    kd = KDConfig(epochs=2) if tiny else KDConfig()
    return replace(base, merge=merge, rekd=ReKDConfig(kd=kd, max_transfer_rows=1500))


@dataclass
class _Device:
    device_id: str
    user: int
    data: Dataset
    key: Any
    certificate: bytes
    budget: float
    join_round: int
    revoked_after: int | None
    model_sha: str = ""
    counter: int = 0


@dataclass(frozen=True)
class RoundFigures:
    """What one round measured (accuracies on the sample of users; bytes summed over the fleet)."""

    round: int
    release: int
    active: int
    sent: int
    accepted: int
    refused: dict[str, int]
    stale_bases: int
    payload_bytes_in: int
    packet_bytes_in: int
    model_bytes_out: int
    epsilon_median: float
    epsilon_max: float
    delta: float
    exhausted: int
    """Devices the ledger has refused for budget so far."""
    user_acc: float
    user_acc_with_budget: float
    """Mean user accuracy of the sampled users who still have budget and are not revoked."""
    presumed_acc: float
    fleet_presumed_acc: float
    ingest_cpu_s_per_packet: float
    merge_cpu_s: float
    merge_wall_s: float
    released_models: int
    merge_cpu_s_per_model: float
    device_rd_s: float
    seconds: dict[str, float] = field(default_factory=dict)
    teacher_presumed_acc: float = math.nan
    """The merged teacher's (the cloud model's) presumed accuracy after the round."""
    merge_groups: int = 0
    """Base models the round's packets were computed against (one merge covers them all)."""
    guarded_user_models: int = 0
    """Per-user models the presumed guard did not release (their devices got the fleet model)."""
    fleet_held_back: bool = False
    """The new fleet model failed the presumed guard: the release shipped the previous one."""


@dataclass(frozen=True)
class FleetResult:
    config: FleetConfig
    start_user_acc: float
    start_presumed_acc: float
    rounds: tuple[RoundFigures, ...]
    seconds: float

    @property
    def presumed_drop_points(self) -> float:
        """D: presumed accuracy lost from release v1 to the last round, in points (sample)."""
        return 100.0 * (self.start_presumed_acc - self.rounds[-1].presumed_acc)

    def summary_line(self) -> str:
        per_round = "; ".join(
            f"r{r.round} v{r.release} acc user {r.user_acc:.3f} presumed {r.presumed_acc:.3f} "
            f"eps med {r.epsilon_median:.2f} max {r.epsilon_max:.2f} (delta {r.delta:.0e}) "
            f"in {r.payload_bytes_in}B payload/{r.packet_bytes_in}B packets out "
            f"{r.model_bytes_out}B models accepted {r.accepted}/{r.sent} "
            f"refused {dict(sorted(r.refused.items()))} "
            f"cpu {r.ingest_cpu_s_per_packet * 1000:.1f}ms/packet "
            f"{r.merge_cpu_s_per_model:.2f}s/model wall {r.merge_wall_s:.1f}s"
            for r in self.rounds)
        return (f"fleet: N={self.config.devices} R={self.config.rounds} "
                f"executor={self.config.executor} start user {self.start_user_acc:.3f} "
                f"presumed {self.start_presumed_acc:.3f}; {per_round}; "
                f"D={self.presumed_drop_points:.1f} points; {self.seconds:.0f} s")

    def to_json(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "start_user_acc": self.start_user_acc,
                "start_presumed_acc": self.start_presumed_acc,
                "presumed_drop_points": self.presumed_drop_points,
                "rounds": [asdict(r) for r in self.rounds], "seconds": self.seconds}


def _descendants_cpu(root: int) -> float:
    """CPU seconds (user + system, their own and their reaped children's) of the live processes
    descending from ``root``, read from /proc (0 where there is none: not Linux)."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we read
        pid = int(stat.parent.name)
        parent[pid] = int(fields[1])
        ticks[pid] = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    tree, todo = set(), [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        todo.extend(kids)
    return sum(ticks[c] for c in tree) / os.sysconf("SC_CLK_TCK")


def _cpu(*, tree: bool = False) -> float:
    """CPU seconds of this process (user + system): ingest runs here. ``tree``: also the children
    it reaped and its live descendants, where a local Ray instance's raylet and workers run the
    merge job's tasks (a scan of /proc, about 10 ms: for the merge job, not per packet)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    if not tree:
        return own.ru_utime + own.ru_stime
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
            + _descendants_cpu(os.getpid()))


def _drop_schema(dsn: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def run_fleet(config: FleetConfig, *, workdir: Path | None = None,
              progress: Callable[[str], None] | None = None,
              settings: Any | None = None) -> FleetResult:
    """Run the fleet (module docstring). ``settings``: the cloud's ``JobSettings`` (default
    :func:`fleet_settings`). Raises :class:`ConfigError` for impossible settings and what the
    jobs raise; a refused packet is a figure, not an error."""
    from diredi_secure.services.cloud import Ingest
    from diredi_secure.services.jobs import accounting_gate, distill_and_release, merge_and_release
    from diredi_secure.services.workspace import CloudWorkspace

    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    settings = settings if settings is not None else fleet_settings(config.tiny)
    clock = {"ms": 1_800_000_000_000}
    schema = f"diredi_fleet_{uuid.uuid4().hex[:12]}" if config.postgres else None
    with tempfile.TemporaryDirectory(prefix="diredi-fleet-", dir=workdir) as tmp:
        root = Path(tmp) / "cloud"
        ws = CloudWorkspace.init(root, now_ms=clock["ms"], store=config.postgres,
                                 store_schema=schema)
        try:
            return _run(config, ws, rng, settings, clock, say, t_start, Ingest,
                        accounting_gate, distill_and_release, merge_and_release)
        finally:
            if config.postgres and schema:
                _drop_schema(config.postgres, schema)


def _run(config: FleetConfig, ws: Any, rng: np.random.Generator, settings: Any,
         clock: dict[str, int], say: Callable[[str], None], t_start: float, ingest_cls: Any,
         gate: Any, distill_and_release: Any, merge_and_release: Any) -> FleetResult:
    def now() -> datetime:
        return datetime.fromtimestamp(clock["ms"] / 1000, UTC)

    say("release v1: teacher, KD, publish")
    distill_and_release(ws, now=now(), seed=config.seed, settings=settings)
    from diredi_secure.services.jobs import _index, _scenario

    scenario = _scenario(ws)
    keys = ws.keys()
    ca_key, ca_cert = ws.ca()
    inbox = _crypto.load_inbox_public_key((ws.root / "inbox.pub").read_bytes())
    models_dir = ws.root / "models"
    index = _index(ws)
    fleet_sha = str(index["fleet"][-1]["sha256"])
    model_cache: dict[str, Any] = {}

    def model(sha: str) -> Any:
        if sha not in model_cache:
            if len(model_cache) > 4096:
                model_cache.clear()
            model_cache[sha] = load_model_bytes((models_dir / f"{sha}.safetensors").read_bytes())[0]
        return model_cache[sha]

    n = config.devices
    order = rng.permutation(n)
    late = set(order[: round(config.late * n)].tolist())
    revoked = set(order[round(config.late * n):][: round(config.revoke * n)].tolist())
    devices: list[_Device] = []
    say(f"{n} devices: keys, certificates, data")
    for i in range(n):
        user = i % len(scenario.users)
        train = scenario.users[user].train
        pick = rng.choice(len(train), min(config.samples, len(train)), replace=False)
        key = _crypto.generate_signing_key()
        device_id = f"fleet-{i:06d}"
        cert = _crypto.issue_device_certificate(ca_key, ca_cert, device_id=device_id,
                                                device_public_key=key.public_key, serial=i + 10,
                                                now_ms=clock["ms"] - 60_000)
        budget = (config.small_budget if i % 2 else DEFAULT_POLICY.lifetime_epsilon_budget)
        join = 1 if i not in late or config.rounds < 2 else int(rng.integers(2, config.rounds + 1))
        devices.append(_Device(device_id, user, Dataset(train.x[pick], train.y[pick]), key, cert,
                               budget, join, 1 if i in revoked else None, fleet_sha))
    eval_ids = sorted(rng.choice(n, min(config.eval_users, n), replace=False).tolist())

    out_of_budget: set[str] = set()  # devices the ledger refused for budget (they stay refused)

    def frozen(d: _Device, r: int) -> bool:
        """Revoked before it could install round ``r``'s release: the transport refuses a revoked
        device every call, so it keeps the model it has (review finding F6: it was moved on)."""
        return d.revoked_after is not None and r >= d.revoked_after

    def evaluate(own: dict[str, str], fleet: str, r: int) -> tuple[float, float, float, float]:
        user_acc, presumed, with_budget = [], [], []
        for i in eval_ids:
            d = devices[i]
            m = model(d.model_sha if frozen(d, r) else own.get(d.device_id, fleet))
            acc = accuracy(m, scenario.users[d.user].test)
            user_acc.append(acc)
            presumed.append(accuracy(m, scenario.presumed_test))
            if d.device_id not in out_of_budget and d.revoked_after is None:
                with_budget.append(acc)
        fleet_acc = accuracy(model(fleet), scenario.presumed_test)
        return (float(np.mean(user_acc)), float(np.mean(presumed)),
                float(np.mean(with_budget)) if with_budget else math.nan, fleet_acc)

    rounds: list[RoundFigures] = []
    own_models: dict[str, str] = {}
    rd_base = RDConfig(epsilon=config.epsilon, epochs=config.rd_epochs,
                       kinds=tuple(DEFAULT_PAYLOAD_KINDS))
    with ws.open_store() as store, make_executor(config.executor, address=config.address,
                                                 workers=config.workers) as executor:
        start_user, start_presumed, _, _ = evaluate({}, fleet_sha, 0)
        say(f"v1: user acc {start_user:.3f}, presumed {start_presumed:.3f} (sample)")
        ingest = ingest_cls(store, keys, clock=lambda: clock["ms"])
        ingest.released_models = ws.released_models()
        enrolled: set[str] = set()
        for r in range(1, config.rounds + 1):
            clock["ms"] += ROUND_MS
            t_round = time.perf_counter()
            for d in devices:
                if d.join_round == r and d.device_id not in enrolled:
                    store.register_device(d.device_id, d.certificate, d.key.key_id,
                                          enrolled_at_ms=clock["ms"], epsilon_budget=d.budget)
                    enrolled.add(d.device_id)
                if d.revoked_after is not None and r == d.revoked_after + 1:
                    store.revoke_device(d.device_id, revoked_at_ms=clock["ms"], reason="fleet test")
            active = [d for d in devices if d.join_round <= r]
            stale_now = set(rng.choice(len(active), round(config.stale * len(active)),
                                       replace=False).tolist()) if r > 1 else set()
            refused: Counter[str] = Counter()
            accepted = stale = payload_in = packet_in = model_out = 0
            rd_seconds = ingest_cpu = 0.0
            for k, d in enumerate(active):
                newest = own_models.get(d.device_id, fleet_sha)
                if k not in stale_now and d.model_sha != newest and not frozen(d, r - 1):
                    d.model_sha = newest
                    model_out += (models_dir / f"{newest}.safetensors").stat().st_size
                t = time.perf_counter()
                result = reverse_distill(model(d.model_sha), d.data, scenario.reference_x, rd_base)
                d.counter += 1
                sealed = seal_packet(result.payload, device_key=d.key, device_id=d.device_id,
                                     counter=d.counter, base_model_version=d.model_sha,
                                     dp=result.dp, inbox=inbox, now_ms=clock["ms"],
                                     random_bytes=os.urandom, device_certificate=d.certificate)
                rd_seconds += time.perf_counter() - t
                c0 = _cpu()
                try:
                    ingest.submit(sealed.data)
                except DirediError as exc:
                    refused[exc.reason] += 1
                    if exc.reason == "budget_exceeded":
                        out_of_budget.add(d.device_id)
                else:
                    accepted += 1
                    stale += d.model_sha != newest
                    payload_in += len(encode_payload(result.payload)[0])
                    packet_in += len(sealed.data)
                finally:
                    ingest_cpu += _cpu() - c0
            say(f"round {r}: {accepted}/{len(active)} packets accepted, refused {dict(refused)}")
            c0, w0 = _cpu(tree=True), time.perf_counter()
            try:
                out = merge_and_release(ws, store, now=now(), seed=config.seed + r,
                                        settings=settings, audit_gate=gate, executor=executor,
                                        rekd_sample=config.rekd_sample)
            except ConfigError as exc:
                raise ConfigError(f"round {r}: the merge had nothing to release ({exc.message})"
                                  ) from exc
            merge_cpu, merge_wall = _cpu(tree=True) - c0, time.perf_counter() - w0
            fleet_sha = out.model_sha256
            # A device installs its own newest per-user release while the cloud has published one
            # (services.edge.update_device tries its own role first), so a device this release
            # made no model for keeps its earlier one. This used to move it to the fleet model.
            own_models.update(out.device_models)
            metrics = out.metrics
            released = 1 + len(out.device_models)
            user_acc, presumed, with_budget, fleet_acc = evaluate(own_models, fleet_sha, r)
            spent = [d.epsilon_spent for d in store.list_devices()]
            exhausted = len(out_of_budget)
            rounds.append(RoundFigures(
                round=r, release=out.version, active=len(active), sent=len(active),
                accepted=accepted, refused=dict(refused), stale_bases=stale,
                payload_bytes_in=payload_in, packet_bytes_in=packet_in, model_bytes_out=model_out,
                epsilon_median=float(statistics.median(spent)), epsilon_max=float(max(spent)),
                delta=DEFAULT_POLICY.dp.delta, exhausted=exhausted, user_acc=user_acc,
                user_acc_with_budget=with_budget, presumed_acc=presumed,
                fleet_presumed_acc=fleet_acc,
                ingest_cpu_s_per_packet=ingest_cpu / max(len(active), 1),
                merge_cpu_s=merge_cpu, merge_wall_s=merge_wall, released_models=released,
                merge_cpu_s_per_model=merge_cpu / max(released, 1), device_rd_s=rd_seconds,
                seconds={k.removeprefix("seconds_"): v for k, v in metrics.items()
                         if k.startswith("seconds_")} | {"round": time.perf_counter() - t_round},
                teacher_presumed_acc=float(metrics["teacher_presumed_acc"]),
                merge_groups=int(metrics["merge_groups"]),
                guarded_user_models=int(metrics.get("guarded_user_models", 0)),
                fleet_held_back=bool(metrics.get("fleet_model_held_back", 0.0)),
            ))
            say(f"round {r}: v{out.version}, user acc {user_acc:.3f}, presumed {presumed:.3f} "
                f"(teacher {metrics['teacher_presumed_acc']:.3f}, "
                f"{int(metrics['merge_groups'])} base models, "
                f"{int(metrics.get('guarded_user_models', 0))} per-user models held back by the "
                f"presumed guard{', fleet model held back' if metrics.get('fleet_model_held_back') else ''}"
                f"), merge {merge_wall:.1f} s wall")
    return FleetResult(config, start_user, start_presumed, tuple(rounds),
                       time.perf_counter() - t_start)


def result_digest(result: FleetResult) -> str:
    """SHA-256 of the run's JSON (names the generated table)."""
    return hashlib.sha256(json.dumps(result.to_json(), sort_keys=True, default=str).encode()
                          ).hexdigest()


def load_result(path: Path) -> dict[str, Any]:
    """A saved run (``bench fleet --json``) as plain JSON; raises :class:`ConfigError`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read fleet results {path}: {exc}") from exc
    if not isinstance(data, dict) or "rounds" not in data or "config" not in data:
        raise ConfigError(f"{path} is not a `bench fleet --json` result")
    return data


def _command(c: dict[str, Any]) -> str:
    """The `diredi bench fleet` command line that reproduces a saved run's configuration."""
    parts = ["diredi bench fleet", f"--devices {c['devices']}", f"--rounds {c['rounds']}"]
    defaults = FleetConfig()
    for name in ("seed", "epsilon", "eval_users", "small_budget", "late", "stale", "revoke",
                 "rekd_sample", "workers"):
        if c.get(name) is not None and c.get(name) != getattr(defaults, name):
            parts.append(f"--{name.replace('_', '-')} {c[name]}")
    if c.get("executor", "inprocess") != "inprocess":
        parts.append(f"--executor {c['executor']}")
    if c.get("postgres"):
        parts.append("--postgres DSN")
    if c.get("tiny"):
        parts.append("--tiny")
    parts.append(f"--json docs/fleet/{run_name(c)}.json")
    return " ".join(parts)


def run_name(c: dict[str, Any]) -> str:
    """A saved run's file name under docs/fleet/ (no suffix): N, rounds, executor, Ray workers and
    the per-user re-KD sample where set, so that runs differing in them do not overwrite each other."""
    name = f"fleet-n{c['devices']}-r{c['rounds']}-{c.get('executor', 'inprocess')}"
    if c.get("executor") == "ray" and c.get("workers"):
        name += f"-w{c['workers']}"
    if c.get("rekd_sample"):
        name += f"-rekd{c['rekd_sample']}"
    return name


def _acc(value: Any) -> str:
    """An accuracy for the table; runs saved before the figure existed have none ("-")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.3f}"


SECTION_BEGIN = "<!-- fleet-results:begin (generated by `diredi bench fleet-render`) -->"
SECTION_END = "<!-- fleet-results:end -->"


def render_section(runs: list[dict[str, Any]]) -> str:
    """The docs/RESULTS.md section for saved runs: one table per run, one row per round."""
    lines = [SECTION_BEGIN, "## A fleet over time (`diredi bench fleet`)", "",
             "Generated from the runs' JSON; each row is one round: accuracies on the sampled users"
             " (the model each would install after the round), composed epsilon per device at the"
             " ledger's delta, bytes summed over the fleet, the cloud's CPU seconds per accepted"
             " packet (ingest) and per released model (merge job: merge, fleet and per-user re-KD,"
             " TUF publication), and the merge job's wall time. See docs/FLEET.md.", ""]
    lines += ["### Cloud time per round against N, by executor", "",
              "Mean over a run's rounds of the merge job's wall time (merge, fleet and per-user"
              " re-KD, TUF publication) on this machine, and round 1's alone (at one N, seed and number"
              " of rounds, round 1 has the same packets and seeds on every executor; a one-round run"
              " has no late joiners, so its round 1 has more packets than a longer run's); the"
              " merge job's CPU seconds in round 1 (on Ray: the driver, the raylet and its"
              " workers); per-user re-KD seconds per per-user model trained (released or held back by"
              " the presumed guard; mean over rounds; with a sample, its cost per device); the speed-up is round 1's wall time on Ray with one"
              " worker over this run's, at the same N and number of rounds, where both ran.", "",
              "| executor | workers | N | rounds | per-user re-KD sample | merge job wall s / round | round 1 wall s | round 1 CPU s | per-user models / round | per-user re-KD s / model | speed-up vs 1 Ray worker (round 1) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    first: dict[tuple[str, int, int, int], float] = {}
    for run in runs:
        c = run["config"]
        first[(c["executor"], int(c.get("workers") or 1), c["devices"], c["rounds"])] = float(
            run["rounds"][0]["merge_wall_s"])
    for run in sorted(runs, key=lambda r: (r["config"]["executor"], r["config"].get("workers") or 1,
                                          r["config"]["devices"], r["config"]["rounds"])):
        c = run["config"]
        w = int(c.get("workers") or 1)
        wall = float(np.mean([r["merge_wall_s"] for r in run["rounds"]]))
        r1 = first[(c["executor"], w, c["devices"], c["rounds"])]
        one = first.get(("ray", 1, c["devices"], c["rounds"]))
        speed = f"{one / r1:.2f}x" if one is not None and c["executor"] == "ray" else "-"
        models = float(np.mean([r["released_models"] - 1 for r in run["rounds"]]))
        trained = [(r, r["released_models"] - 1 + r.get("guarded_user_models", 0))
                   for r in run["rounds"]]  # the guard's held-back models were trained too
        per_model = [r["seconds"]["user_rekd"] / k for r, k in trained
                     if k > 0 and "user_rekd" in r.get("seconds", {})]
        lines.append(f"| {c['executor']} | {w if c['executor'] == 'ray' else '-'} | {c['devices']} "
                     f"| {c['rounds']} | {c.get('rekd_sample') or 'all'} | {wall:.1f} | {r1:.1f} "
                     f"| {run['rounds'][0]['merge_cpu_s']:.1f} | {models:.0f} "
                     f"| {float(np.mean(per_model)) if per_model else math.nan:.2f} | {speed} |")
    lines.append("")
    for run in sorted(runs, key=lambda r: (r["config"]["executor"], r["config"].get("workers") or 1,
                                          r["config"]["devices"])):
        c = run["config"]
        lines += [f"### N = {c['devices']}, {c['rounds']} round{'s' if c['rounds'] != 1 else ''},"
                  f" executor {c['executor']}"
                  f"{' (workers ' + str(c['workers']) + ')' if c.get('workers') else ''}"
                  f"{', per-user re-KD for ' + str(c['rekd_sample']) + ' sampled devices' if c.get('rekd_sample') else ''}"
                  f"{', PostgreSQL' if c.get('postgres') else ', SQLite'}{', TINY settings' if c.get('tiny') else ''}",
                  "",
                  f"Command: `{_command(c)}`.", "",
                  f"Release v1: user acc {run['start_user_acc']:.3f}, presumed "
                  f"{run['start_presumed_acc']:.3f}. D (presumed points lost by the last round) = "
                  f"{run['presumed_drop_points']:.1f}. Run: {run['seconds']:.0f} s.", "",
                  "| round | release | per-user models (held back) | accepted/sent | refused | stale bases (base models) | user acc | user acc (budget left) | presumed acc | fleet presumed | teacher presumed | eps median / max (delta) | payload B in | packet B in | model B out | CPU ms/packet | CPU s/model | merge wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in run["rounds"]:
            refused = ", ".join(f"{k} {v}" for k, v in sorted(r["refused"].items())) or "-"
            lines.append(
                f"| {r['round']} | v{r['release']}"
                f"{' (fleet model held back)' if r.get('fleet_held_back') else ''} | "
                f"{max(r['released_models'] - 1, 0)} ({r.get('guarded_user_models', 0)}) | "
                f"{r['accepted']}/{r['sent']} | {refused} | "
                f"{r['stale_bases']} ({r.get('merge_groups') or '-'}) | {r['user_acc']:.3f} | "
                f"{r['user_acc_with_budget']:.3f} | {r['presumed_acc']:.3f} | "
                f"{r['fleet_presumed_acc']:.3f} | {_acc(r.get('teacher_presumed_acc'))} | "
                f"{r['epsilon_median']:.2f} / {r['epsilon_max']:.2f} ({r['delta']:.0e}) | "
                f"{r['payload_bytes_in']} | {r['packet_bytes_in']} | {r['model_bytes_out']} | "
                f"{1000 * r['ingest_cpu_s_per_packet']:.1f} | {r['merge_cpu_s_per_model']:.2f} | "
                f"{r['merge_wall_s']:.1f} |")
        lines.append("")
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def update_results_md(path: Path, section: str) -> None:
    """Replace (or append) the generated fleet section of ``path``; the rest stays as it is."""
    text = Path(path).read_text() if Path(path).is_file() else ""
    if SECTION_BEGIN in text and SECTION_END in text:
        head, rest = text.split(SECTION_BEGIN, 1)
        tail = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    Path(path).write_text(text)

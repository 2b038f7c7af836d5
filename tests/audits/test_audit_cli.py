"""``diredi audit``: the sub-app imports no torch until ``run`` runs, and rejects bad options
before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from diredi_secure.audits.cli import app
from typer.testing import CliRunner

from diredi_secure.errors import ConfigError


def test_importing_the_audit_cli_does_not_import_torch() -> None:
    code = ("import sys, diredi_secure.audits.cli, diredi_secure.audits.gate; "
            "heavy = sorted(m for m in ('torch', 'opacus', 'matplotlib', "
            "'diredi_secure.audits.suite') if m in sys.modules); "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "", f"imported at module level: {out.stdout.strip()}"


def test_help_lists_the_options() -> None:
    res = CliRunner().invoke(app, ["run", "--help"])
    assert res.exit_code == 0
    for opt in ("--epsilon", "--no-dp", "--profile", "--out", "--scenario", "--implementation"):
        assert opt in res.output


def test_unknown_profile_is_a_config_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["run", "--epsilon", "1", "--profile", "huge",
                                   "--out", str(tmp_path)])
    assert isinstance(res.exception, ConfigError)
    assert not any(tmp_path.iterdir())


def test_non_positive_epsilon_is_a_config_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["run", "--epsilon", "0", "--out", str(tmp_path)])
    assert isinstance(res.exception, ConfigError)
    assert "epsilon" in str(res.exception)
    assert not any(tmp_path.iterdir())

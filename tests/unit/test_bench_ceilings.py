"""`diredi bench ceilings --quick` runs end to end: the line's shape and finite positive figures,
never a speed threshold (speed is reported, not asserted)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
from diredi_secure.benchmarks import ceilings
from diredi_secure.benchmarks.cli import app
from typer.testing import CliRunner

from diredi_secure.errors import ConfigError

KEYS = ("ingest_vs_grpc_floor", "ingest_vs_crypto", "p99_half_ms", "update_vs_sha256",
        "update_rss_over_model_mb", "rd_dp_overhead")
LINE = re.compile(r"^ceilings: " + " ".join(rf"{k}=(\S+)" for k in KEYS) + "$")


def _check_last_line(output: str) -> dict[str, float]:
    last = output.strip().splitlines()[-1]
    match = LINE.match(last)
    assert match, last
    values = {k: float(v) for k, v in zip(KEYS, match.groups(), strict=True)}
    for key, value in values.items():
        if key == "update_rss_over_model_mb":
            assert math.isfinite(value), (key, value)  # a difference: may be below zero
        else:
            assert math.isfinite(value) and value > 0, (key, value)
    return values


def test_quick_run_ends_with_the_ceilings_line_and_writes_the_readme(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{ceilings.README_START}\nold\n{ceilings.README_END}\nafter\n")
    result = CliRunner().invoke(app, ["ceilings", "--quick", "--write-readme", str(readme)])
    assert result.exit_code == 0, result.output
    _check_last_line(result.stdout)
    for name in ("crypto 1 core", "crypto 2 cores", "bare grpc mTLS echo", "bare verify+open",
                 "raw sqlite 1/commit", "raw sqlite 32/commit", "sha256", "ingest sqlite 1 KiB",
                 "half load p99", "update", "DP RD per epoch"):
        assert name in result.stdout, name
    text = readme.read_text()
    assert "old" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "| crypto 1 core |" in text and "`ceilings: ingest_vs_grpc_floor=" in text


@pytest.mark.slow
@pytest.mark.postgres
def test_quick_run_on_postgres() -> None:
    dsn = os.environ.get("DIREDI_TEST_POSTGRES_DSN")
    if not dsn:
        pytest.skip("DIREDI_TEST_POSTGRES_DSN not set")
    lines: list[str] = []
    ceilings.run(quick=True, postgres=dsn, out=lines.append)
    _check_last_line("\n".join(lines))
    assert lines[-2].startswith("ceilings[sqlite]: ")
    assert any(line.startswith("ingest postgres 1 KiB") for line in lines)
    assert any(line.startswith("raw postgres 32/commit") for line in lines)


def test_readme_without_markers_is_refused(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("no block here\n")
    report = ceilings.Report(out=lambda _line: None)
    report.add("sha256", 1.0, "MB/s")
    report.rows.append(("_line", "x=1", ""))
    with pytest.raises(ConfigError):
        ceilings.write_readme(readme, report, "diredi bench ceilings")
    assert readme.read_text() == "no block here\n"


def test_workers_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        ceilings.run(workers=0, out=lambda _line: None)

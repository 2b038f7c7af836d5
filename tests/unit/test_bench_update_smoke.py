"""`diredi bench update --quick`: a 4 MiB release through the real `diredi edge update` in a child
(figures are printed, never asserted on time; memory and torch are properties, not speed)."""

from __future__ import annotations

from diredi_secure.benchmarks.cli import app
from typer.testing import CliRunner


def test_bench_update_quick_ends_with_its_line() -> None:
    result = CliRunner().invoke(app, ["update", "--quick"])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("update: mb_per_s=")
    fields = dict(item.split("=") for item in last.split()[1:])
    assert set(fields) == {"mb_per_s", "vs_sha256", "peak_rss_mb", "rss_over_model_mb",
                           "startup_s", "vs_fetch_only"}  # fmt: skip
    assert all(float(v) == float(v) for v in fields.values())  # numbers, not nan
    assert "torch loaded: False" in result.output

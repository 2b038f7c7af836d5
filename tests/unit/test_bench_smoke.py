"""The throughput and ingest benchmarks run (figures are printed, never asserted on time)."""

from __future__ import annotations

import os

import psycopg
import pytest
from diredi_secure.benchmarks import bench_ingest
from diredi_secure.benchmarks.packet_throughput import run


def test_benchmark_produces_rows() -> None:
    rows = run(0.01, [1024])
    assert len(rows) == 3
    assert all(float(r["open_per_s"]) > 0 and float(r["seal_vs_raw_hpke"]) > 0 for r in rows)  # type: ignore[arg-type]


def _ingest_rows(capsys: pytest.CaptureFixture[str], *extra: str) -> list[str]:
    bench_ingest.main(["--count", "3", "--big-count", "1", "--devices", "2", "--fleet", "4", *extra])
    return capsys.readouterr().out.splitlines()


def test_ingest_benchmark_runs_over_grpc_and_sqlite(capsys: pytest.CaptureFixture[str]) -> None:
    out = _ingest_rows(capsys)
    assert "SQLite" in out[0]
    assert any(line.split()[:2] == ["1", "KiB"] for line in out)
    assert any(line.split()[:2] == ["1", "MiB"] for line in out)
    assert out[-1].startswith("fleet: 4 packets (1 KiB) from 2 concurrent devices")


@pytest.mark.postgres
def test_ingest_benchmark_runs_on_postgres_and_drops_its_schema(
    capsys: pytest.CaptureFixture[str],
) -> None:
    dsn = os.environ.get("DIREDI_TEST_POSTGRES_DSN")
    if not dsn:
        pytest.skip("DIREDI_TEST_POSTGRES_DSN not set")
    out = _ingest_rows(capsys, "--postgres", dsn)
    assert "PostgreSQL" in out[0] and out[-1].startswith("fleet: 4 packets")
    with psycopg.connect(dsn) as conn:
        left = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bench_ingest_%'").fetchone()
    assert left == (0,)


def test_bench_rd_quick_ends_with_its_line() -> None:
    """``diredi bench rd --quick``: every grad-sample mode trains to the same parameters (float
    rounding) and the summary line parses; the figures are printed, not asserted."""
    import math
    import re

    from diredi_secure.benchmarks.bench_rd import MODES
    from diredi_secure.benchmarks.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["rd", "--quick"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    got = re.fullmatch(r"rd: dp_per_epoch_x=(\S+) dp_end_to_end_x=(\S+) noise_search_s=(\S+) "
                       r"grad_sample_mode=(\w+)", lines[-1])
    assert got is not None, lines[-1]
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in got.groups()[:3])
    assert got.group(4) in MODES
    rows = [line.split() for line in lines if line.startswith("  digits")]
    assert sorted(r[1] for r in rows) == sorted(MODES)
    for row in rows:  # "... max |param - hooks| 1.5e-08 [<- default]"
        diff = float(row[row.index("hooks|") + 1])
        assert diff < 1e-4, row

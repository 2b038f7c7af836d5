"""The throughput benchmark runs (figures are printed by `make bench`, never asserted on time)."""

from __future__ import annotations

from diredi_secure.benchmarks.packet_throughput import run


def test_benchmark_produces_rows() -> None:
    rows = run(0.01, [1024])
    assert len(rows) == 3
    assert all(float(r["open_per_s"]) > 0 and float(r["seal_vs_raw_hpke"]) > 0 for r in rows)  # type: ignore[arg-type]

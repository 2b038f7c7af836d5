"""`diredi bench fleet` smoke run (CI-sized): six devices, two rounds, the real store and jobs.

One device joins late, one is revoked after round 1, the small budget admits one packet only, so
round 2 shows each kind of refusal coming from the real ingest and ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diredi_secure.cli import main


def test_fleet_smoke_reports_every_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fleet.json"
    code = main(
        [
            "bench",
            "fleet",
            "--devices",
            "6",
            "--rounds",
            "2",
            "--tiny",
            "--quiet",
            "--eval-users",
            "4",
            "--small-budget",
            "5",
            "--revoke",
            "0.2",
            "--late",
            "0.2",
            "--stale",
            "0.5",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("fleet: N=6 R=2 executor=inprocess")
    assert " r1 v2 " in lines[-1] and " r2 v3 " in lines[-1]
    doc = json.loads(out.read_text())
    r1, r2 = doc["rounds"]
    assert (r1["active"], r2["active"]) == (5, 6)  # the late device joins in round 2
    assert r1["refused"] == {} and r1["accepted"] == 5
    # Round 2: the revoked device and the small-budget devices (a second packet composes past
    # 5) are refused by the real ingest; every packet is either accepted or refused.
    assert r2["refused"].get("certificate_revoked") == 1
    assert r2["refused"].get("budget_exceeded", 0) >= 2
    assert r2["accepted"] + sum(r2["refused"].values()) == r2["sent"] == 6
    assert r2["exhausted"] == r2["refused"]["budget_exceeded"]
    for r in (r1, r2):
        assert 0 < r["payload_bytes_in"] < r["packet_bytes_in"]
        assert r["delta"] == 1e-5 and 0 < r["epsilon_median"] <= r["epsilon_max"] <= 40
        assert 0.0 <= r["user_acc"] <= 1.0 and 0.0 <= r["presumed_acc"] <= 1.0
        assert r["released_models"] >= 2 and r["merge_cpu_s_per_model"] > 0
    assert r2["model_bytes_out"] > 0  # devices that updated downloaded a model of release v2
    assert r2["stale_bases"] >= 1  # half the fleet stayed on release v1's model
    # One merge per round covers every base model: v1's (stale) and the per-user models of v2.
    assert r1["merge_groups"] == 1
    assert r2["merge_groups"] >= (2 if r2["stale_bases"] < r2["accepted"] else 1)
    for r in (r1, r2):
        assert 0.0 <= r["teacher_presumed_acc"] <= 1.0
        assert r["guarded_user_models"] == 0 and not r["fleet_held_back"]  # --tiny: no guard

    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nkept text\n")
    for _ in range(2):  # the section is replaced, not appended twice
        assert main(["bench", "fleet-render", str(out), "--results-md", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# Results\n\nkept text\n") and text.count("### N = 6, 2 rounds") == 1
    assert "| teacher presumed |" in text and "per-user models (held back)" in text


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--devices", "1"], "devices must lie"),
        (["--epsilon", "50"], "epsilon must lie"),
        (["--executor", "spark"], "unknown executor"),
    ],
)
def test_fleet_bad_settings_exit_2_in_one_line(
    args: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "fleet", "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0], err


@pytest.mark.postgres
def test_fleet_on_postgres_one_round(capsys: pytest.CaptureFixture[str]) -> None:
    import os

    import psycopg

    dsn = os.environ.get("DIREDI_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.Error as exc:
        pytest.skip(f"no PostgreSQL server answers at {dsn}: {exc}")
    code = main(
        [
            "bench",
            "fleet",
            "--devices",
            "4",
            "--rounds",
            "1",
            "--tiny",
            "--quiet",
            "--eval-users",
            "2",
            "--late",
            "0",
            "--postgres",
            dsn,
        ]
    )
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("fleet: N=4 R=1") and "accepted 4/4" in line
    with psycopg.connect(dsn) as conn:  # the run's schema is dropped afterwards
        left = conn.execute(
            "SELECT count(*) FROM information_schema.schemata "
            "WHERE schema_name LIKE 'diredi_fleet_%'"
        ).fetchone()
    assert left is not None and left[0] == 0


@pytest.mark.slow
def test_presumed_guard_holds_back_models_that_lost_the_presumed_classes() -> None:
    """A merge that wrecks the teacher (Adam at lr 5) yields a fleet model and per-user models
    far below release v1 on the presumed validation split: with the guard none is shipped, the
    release carries v1's fleet model again and every device stays on it."""
    from dataclasses import replace

    from diredi_secure.benchmarks.fleet import FleetConfig, fleet_settings, run_fleet

    tiny = fleet_settings(tiny=True)
    wreck = replace(tiny, presumed_guard=0.0, user_presumed_guard=0.0,
                    merge=replace(tiny.merge, lr=5.0))
    config = FleetConfig(devices=4, rounds=1, tiny=True, eval_users=4, late=0.0, revoke=0.0,
                         stale=0.0)
    (r1,) = run_fleet(config, settings=wreck).rounds
    assert r1.accepted == 4 and r1.fleet_held_back
    assert r1.released_models == 1 and r1.guarded_user_models == 4
    assert 0.0 <= r1.teacher_presumed_acc < r1.presumed_acc  # the teacher did break


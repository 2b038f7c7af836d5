"""The reproduction benchmark: a smoke run of ``diredi bench reproduce`` and its output machinery.

The smoke run (``--smoke``: tiny scenario, one or two epochs per stage) takes about 10 s on two
busy cores; its accuracies mean little, but the orderings asserted here hold
even so (measured: oracle 0.45 vs no update 0.17 on user-test accuracy).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diredi_secure.benchmarks import baselines
from diredi_secure.benchmarks import reproduce as rp
from diredi_secure.benchmarks.cli import app
from typer.testing import CliRunner

from diredi_secure.errors import ConfigError
from diredi_secure.ml import ScenarioConfig, build_model
from diredi_secure.ml.models import student_spec

QUICK_LINE = re.compile(
    r"^reproduce: spent_eps=(?P<spent>\d+\.\d\d) recovery_eps8=(-?\d+\.\d\d|nan) "
    r"presumed_drop_eps8=-?\d+\.\d "
    r"upload_vs_fedavg=\d+\.\d\d$"
)
LOOP_LINE = re.compile(
    r"^loop: user_gain=[+-]\d+\.\d pts presumed_drop=-?\d+\.\d pts epsilon=(\d+\.\d\d|inf) "
    r"payload_bytes=\d+$"
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("reproduce")
    result = CliRunner().invoke(app, ["reproduce", "--smoke", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result.stdout, out


def _mean_user(doc: dict[str, object], method: str) -> float:
    rows = [r for r in doc["summary"] if r["method"] == method]  # type: ignore[attr-defined]
    assert len(rows) == 1, method
    return float(rows[0]["user_mean"])


def test_smoke_run_ends_with_the_summary_line(smoke: tuple[str, Path]) -> None:
    stdout, _ = smoke
    last = stdout.rstrip("\n").splitlines()[-1]
    match = QUICK_LINE.match(last)
    assert match, last
    assert match["spent"] == "8.00"  # the total every compared method spent
    assert sum(1 for line in stdout.splitlines() if line.startswith("reproduce: ")) == 1


def test_smoke_run_writes_json_markdown_and_plot(smoke: tuple[str, Path]) -> None:
    _, out = smoke
    doc = json.loads((out / "results.json").read_text())
    assert doc["format"] == "diredi-reproduce/1"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "RESULTS.md").read_text()
    assert "| DiReDi, full payload (default) | 8 |" in md
    assert "![accuracy against epsilon](results.png)" in md
    assert doc["quick_line"] == md.split("```\n")[1].strip()
    methods = {r["method"] for r in doc["runs"]}
    assert methods == set(rp.QUICK_METHODS)
    for run in doc["runs"]:
        assert all(0.0 <= a <= 1.0 for a in run["user_acc"].values())
        assert 0.0 <= run["presumed_acc"] <= 1.0


def test_smoke_run_orderings_that_must_hold(smoke: tuple[str, Path]) -> None:
    _, out = smoke
    doc = json.loads((out / "results.json").read_text())
    # The oracle saw every user's raw data: it must at least match the shipped student.
    assert _mean_user(doc, "oracle") >= _mean_user(doc, "no_update")
    by = {r["method"]: r for r in doc["summary"]}
    assert by["no_update"]["upload_bytes"] == 0 and by["local_ft"]["upload_bytes"] == 0
    # FedAvg sends a float32 weight delta of the 2,410-parameter student, plus a small header.
    assert 2410 * 4 < by["fedavg"]["upload_bytes"] < 2410 * 4 + 1024
    # Every method with a DP setting spent the same total: training alone (local, FedAvg) and
    # DP-SGD + histogram + prototypes (DiReDi) both come to the target.
    for method in ("local_ft", "fedavg", "diredi_full", "diredi_generic"):
        assert by[method]["epsilon_spent"] == pytest.approx(8.0, rel=1e-6), method
    assert by["oracle"]["epsilon_spent"] == "inf"
    (sched,) = [c for c in doc["choices"] if c["method"] == "rd_schedule"]
    spent = [v for vs in sched["spent_epsilon"].values() for v in vs]
    assert set(sched["spent_epsilon"]) == {"local", "full"} and len(spent) == 6
    assert max(spent) - min(spent) <= 1e-6 * max(spent)
    # The full payload's DP-SGD shares the total with the noised entries: more noise.
    assert sched["full_noise_multiplier"] > sched["local_noise_multiplier"]
    # FedAvg's server step was chosen on validation splits, from the two candidates; the oracle's
    # presumed floor from the one candidate the smoke profile gives it (the loop's own).
    assert {c["method"] for c in doc["choices"]} == {"fedavg", "oracle", "rd_schedule"}
    fed = [c for c in doc["choices"] if c["method"] == "fedavg"]
    assert fed and all(c["chosen"] in (1.0, 3.0) for c in fed)
    oracle = [c for c in doc["choices"] if c["method"] == "oracle"]
    assert [c["chosen"] for c in oracle] == [5.0] and list(oracle[0]["val"]) == ["5.0"]


def test_render_rebuilds_markdown_and_readme_from_the_json(
    smoke: tuple[str, Path], tmp_path: Path
) -> None:
    _, out = smoke
    doc = json.loads((out / "results.json").read_text())
    loaded = rp.load_result(out / "results.json")
    assert [r.user_mean for r in loaded.summary()] == pytest.approx(
        [r["user_mean"] for r in doc["summary"]])
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- results:start -->\n<!-- results:end -->\ny\n")
    result = CliRunner().invoke(app, ["render", "--results", str(out / "results.json"),
                                      "--update-readme", str(readme)])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n").splitlines()[-1] == doc["quick_line"]
    assert "| centralised oracle (raw data + per-user re-KD) | - | inf |" in readme.read_text()
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="not a diredi-reproduce/1"):
        rp.load_result(bad)


def _run(method: str, seed: int, eps: float | None, user: float, presumed: float,
         nbytes: int) -> rp.MethodRun:
    return rp.MethodRun(method, seed, eps, 0.0 if eps is None else eps,
                        {"A": user, "B": user}, presumed, nbytes, 1.0)


def _synthetic() -> rp.ReproduceResult:
    runs = []
    for seed, jitter in ((0, 0.0), (1, 0.02)):
        runs += [
            _run("no_update", seed, None, 0.2 + jitter, 0.98, 0),
            _run("oracle", seed, None, 0.9 + jitter, 0.97, 30000),
            _run("fedavg", seed, 8.0, 0.3, 0.95, 10000),
            _run("diredi_full", seed, 8.0, 0.55 + jitter, 0.96, 2000),
            _run("diredi_generic", seed, 8.0, 0.5, 0.97, 2000),
            _run("local_ft", seed, 8.0, 0.6 + 2 * jitter, 0.8, 0),
        ]
    cfg = rp.ReproduceConfig(seeds=(0, 1), epsilons=(8.0,),
                             methods=("no_update", "oracle", "fedavg", "local_ft", "diredi_full",
                                      "diredi_generic"))
    return rp.ReproduceResult(cfg, tuple(runs), (), ("A", "B"))


def test_quick_figures_are_ratios_of_gains_and_bytes() -> None:
    fig = rp.quick_figures(_synthetic())
    assert fig["recovery"] == pytest.approx((0.56 - 0.21) / (0.91 - 0.21))
    assert fig["presumed_drop_pts"] == pytest.approx(2.0)
    assert fig["upload_vs_fedavg"] == pytest.approx(0.2)
    assert fig["spent_epsilon"] == 8.0
    assert rp.quick_line(fig) == ("reproduce: spent_eps=8.00 recovery_eps8=0.50 "
                                  "presumed_drop_eps8=2.0 upload_vs_fedavg=0.20")
    red = _synthetic().redundant_knowledge()
    assert red[0]["difference"] == pytest.approx(0.06) and red[0]["n"] == 2


def _three_seeds(gains: list[tuple[float, float]]) -> rp.ReproduceResult:
    """Per seed (DiReDi's user gain, the oracle's), both over a shipped model at 0.2."""
    runs = []
    for seed, (ours, oracle) in enumerate(gains):
        runs += [_run("no_update", seed, None, 0.2, 0.98, 0),
                 _run("oracle", seed, None, 0.2 + oracle, 0.97, 30000),
                 _run("fedavg", seed, 8.0, 0.3, 0.95, 10000),
                 _run("diredi_full", seed, 8.0, 0.2 + ours, 0.96, 2000)]
    cfg = rp.ReproduceConfig(seeds=tuple(range(len(gains))), epsilons=(8.0,),
                             methods=("no_update", "oracle", "fedavg", "diredi_full"))
    return rp.ReproduceResult(cfg, tuple(runs), (), ("A", "B"))


def test_recovery_interval_is_a_paired_seed_bootstrap_of_the_ratio() -> None:
    assert all(math.isnan(v) for v in rp.recovery_interval(_synthetic()))  # 2 seeds: none
    gains = [(0.50, 0.60), (0.60, 0.70), (0.55, 0.62), (0.40, 0.55), (0.58, 0.66)]
    res = _three_seeds(gains)
    fig = rp.quick_figures(res)
    low, high = rp.recovery_interval(res)
    assert low < fig["recovery"] < high
    # Undefined where the oracle gains nothing on the mean, or on some resample of the seeds.
    for bad in ([(0.1, 0.0), (0.2, 0.0), (0.3, 0.0)], [(0.1, -0.1)] * 3,
                [(0.1, 0.3), (0.1, -0.2), (0.2, 0.1)]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # scipy on a NaN statistic
            assert all(math.isnan(v) for v in rp.recovery_interval(_three_seeds(bad))), bad
    assert (fig["recovery_ci_low"], fig["recovery_ci_high"]) == (low, high)
    assert rp.recovery_interval(res) == (low, high)  # a fixed generator: reproducible
    # Paired: when DiReDi's gain tracks the oracle's seed by seed, the interval is far narrower
    # than for the same gains shuffled across seeds.
    shuffled = _three_seeds([(a, b) for (a, _), (_, b) in zip(gains, gains[2:] + gains[:2],
                                                               strict=True)])
    s_low, s_high = rp.recovery_interval(shuffled)
    assert high - low < s_high - s_low
    assert "95% seed-bootstrap interval" in rp.results_markdown(res, "results.png", "x")
    same = _three_seeds([(0.5, 0.6)] * 3)
    assert rp.recovery_interval(same) == pytest.approx((0.5 / 0.6, 0.5 / 0.6))


def test_against_local_dp_pairs_by_seed() -> None:
    (row,) = _synthetic().against_local_dp()
    # seed 0: 0.55 - 0.60, seed 1: 0.57 - 0.64 (user); presumed 0.96 - 0.80 on both
    assert row["n"] == 2 and row["epsilon"] == 8.0
    assert row["difference"] == pytest.approx(-0.06)
    assert row["difference_ci"] == pytest.approx(12.706204736174698 * 0.01)  # t(1) x sd / sqrt(2)
    assert row["presumed_difference"] == pytest.approx(0.16)
    md = rp.results_markdown(_synthetic(), "results.png", "x")
    assert "| 8 | 2 | 0.560 | 0.620 | -0.060 ± 0.127 | +0.160 ± 0.000 |" in md
    # Where a baseline beats DiReDi it is said, with its interval.
    assert ("- ε 8: local fine-tuning on the device is ahead on user-test accuracy by 0.060 ± "
            "0.127 (within the 95% interval of zero), over 2 seed(s).") in md
    assert "FedAvg, weight deltas (one round) is ahead" not in md


def test_quick_figures_refuse_missing_methods() -> None:
    res = _synthetic()
    partial = rp.ReproduceResult(res.config, tuple(r for r in res.runs if r.method != "fedavg"),
                                 (), res.users)
    with pytest.raises(ConfigError, match="fedavg"):
        rp.quick_figures(partial)


def test_mean_ci_is_a_student_t_interval() -> None:
    mean, half = rp.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert math.isnan(rp.mean_ci([0.5])[1])


def test_update_readme_rewrites_only_the_results_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    before = "# Title\n\nintro\n\n<!-- results:start -->\nold table\n<!-- results:end -->\n\nafter\n"
    readme.write_text(before)
    plot = tmp_path / "docs" / "results.png"
    rp.update_readme(readme, _synthetic(), plot)
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n<!-- results:start -->\n")
    assert text.endswith("<!-- results:end -->\n\nafter\n")
    assert "old table" not in text
    assert "| DiReDi, full payload (default) | 8 | 8.00 | 0.560 ± 0.127 |" in text
    assert "![accuracy against epsilon](docs/results.png)" in text


@pytest.mark.parametrize("body", ["no markers\n", "<!-- results:end -->\n<!-- results:start -->\n",
                                  "<!-- results:start -->\n<!-- results:start -->\n"
                                  "<!-- results:end -->\n"])
def test_update_readme_refuses_a_readme_without_one_block(tmp_path: Path, body: str) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(body)
    with pytest.raises(ConfigError, match="results:start"):
        rp.update_readme(readme, _synthetic(), tmp_path / "results.png")
    assert readme.read_text() == body


def test_fedavg_is_the_mean_of_the_deltas_and_the_sum_with_server_step_n() -> None:
    shipped = build_model(student_spec(), seed=0)
    a, b = build_model(student_spec(), seed=1), build_model(student_spec(), seed=2)
    da, db = baselines.weight_delta(a, shipped), baselines.weight_delta(b, shipped)
    base = baselines.weight_delta(shipped, build_model(student_spec(), seed=3))
    mean = baselines.fedavg_model(shipped, [a, b])
    summed = baselines.fedavg_model(shipped, [a, b], server_lr=2.0)
    ref = build_model(student_spec(), seed=3)
    np.testing.assert_allclose(baselines.weight_delta(mean, ref), base + (da + db) / 2, atol=1e-6)
    np.testing.assert_allclose(baselines.weight_delta(summed, ref), base + da + db, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(next(shipped.parameters()), next(build_model(student_spec(),
                                                                        seed=0).parameters()))
    with pytest.raises(ConfigError):
        baselines.fedavg_model(shipped, [])


def test_config_refuses_unknown_methods_and_an_orphan_generic_model() -> None:
    with pytest.raises(ConfigError, match="unknown methods"):
        rp.ReproduceConfig(methods=("no_update", "magic"))
    with pytest.raises(ConfigError, match="diredi_generic"):
        rp.ReproduceConfig(methods=("diredi_generic",))
    with pytest.raises(ConfigError):
        rp.ReproduceConfig(epsilons=(0.0,))
    with pytest.raises(ConfigError, match="oracle_presumed_floors"):
        rp.ReproduceConfig(oracle_presumed_floors=())
    with pytest.raises(ConfigError, match="oracle_presumed_floors"):
        rp.ReproduceConfig(oracle_presumed_floors=(-1.0,))


def test_explicit_seeds_and_a_scenario_file_rerun_elsewhere(tmp_path: Path) -> None:
    scenario = {"reference_size": 100, "user_train_size": 50, "user_test_size": 40}
    sc_file = tmp_path / "scenario.json"
    sc_file.write_text(json.dumps(scenario))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["reproduce", "--smoke", "--quiet", "--seeds", "3", "4",
                                      "--scenario-file", str(sc_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["seeds"] == [3, 4]
    assert sorted({r["seed"] for r in doc["runs"]}) == [3, 4]
    assert {k: doc["config"]["scenario"][k] for k in scenario} == scenario
    assert f"--seeds 3 4 --out {out} --scenario-file {sc_file}" in doc["command"]
    assert "Scenario from `--scenario-file`" in (out / "RESULTS.md").read_text()
    # The results file itself is a scenario file: the same scenario, field for field.
    assert rp.load_scenario_config(out / "results.json") == rp.load_scenario_config(sc_file)
    assert QUICK_LINE.match(result.stdout.rstrip("\n").splitlines()[-1])


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "1", "x"], "integers"),
    (["--seeds", "2", "2"], "distinct"),
    (["7"], "after --seeds"),
    (["--n-seeds", "0"], "--n-seeds"),
])
def test_reproduce_refuses_bad_seeds(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["reproduce", "--smoke", "--quiet", *args])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError) and message in str(result.exception)


def test_scenario_files_are_checked(tmp_path: Path) -> None:
    assert rp.scenario_config_from_json({}) == ScenarioConfig()
    assert rp.scenario_config_from_json({"config": {"shift": 2}}).shift == 2  # ml scenario.json
    with pytest.raises(ConfigError, match="unknown scenario fields"):
        rp.scenario_config_from_json({"user_trian_size": 10})
    with pytest.raises(ConfigError, match="malformed"):
        rp.scenario_config_from_json({"user_train_size": 1.5})
    bad = tmp_path / "s.json"
    bad.write_text("[1]")
    with pytest.raises(ConfigError, match="JSON object"):
        rp.load_scenario_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        rp.load_scenario_config(tmp_path / "missing.json")


def test_quick_figures_refuse_unequal_spend() -> None:
    res = _synthetic()
    skewed = tuple(replace(r, epsilon_spent=8.5) if r.method == "diredi_full" else r
                   for r in res.runs)
    with pytest.raises(rp.UnequalSpend, match="equal spend"):
        rp.quick_figures(rp.ReproduceResult(res.config, skewed, (), res.users))


def test_check_equal_spend_fails_loudly_beyond_one_in_a_million() -> None:
    assert rp.check_equal_spend({"local": [8.0, 8.0], "full": [8.0 * (1 - 5e-7)]}, 8.0) \
        == pytest.approx(8.0)
    with pytest.raises(rp.UnequalSpend, match="full run spent"):
        rp.check_equal_spend({"local": [8.0], "full": [8.0 * (1 - 2e-6)]}, 8.0)
    # The old accounting: DiReDi's entries composed on top of a DP-SGD run at the target.
    with pytest.raises(rp.UnequalSpend):
        rp.check_equal_spend({"local": [8.0], "full": [9.1]}, 8.0)
    assert math.isinf(rp.check_equal_spend({"local": [math.inf]}, math.inf))
    with pytest.raises(rp.UnequalSpend):
        rp.check_equal_spend({"local": [math.inf], "full": [3.0]}, math.inf)


def test_local_and_full_schedules_spend_the_target_with_monotone_learning_rates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = rp.ReproduceConfig(epsilons=(0.5, 1.0, 2.0, 4.0, 8.0, math.inf))
    rp.check_monotone_learning_rates(cfg)
    rows = rp.rd_schedules(cfg)
    for row in rows[:-1]:
        assert row["full_noise_multiplier"] > row["local_noise_multiplier"] > 0
    sigmas = [r["local_noise_multiplier"] for r in rows[:-1]]
    assert sigmas == sorted(sigmas, reverse=True)
    assert [r["local_lr"] for r in rows] == [0.02, 0.02, 0.02, 0.05, 0.1, 0.1]
    # A rule whose step falls as the budget grows is refused before any training.
    monkeypatch.setattr(rp, "default_learning_rate", lambda sigma: 0.2 if sigma > 5 else 0.1)
    with pytest.raises(ConfigError, match="not monotone"):
        rp.check_monotone_learning_rates(cfg)


@pytest.mark.slow
def test_ml_loop_prints_the_table_and_ends_with_the_loop_line() -> None:
    # `diredi ml loop` is the one command that runs the loop once (`bench loop` was its twin).
    from diredi_secure.ml.cli import app as ml_app

    result = CliRunner().invoke(ml_app, ["loop", "--epsilon", "8", "--seed", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.rstrip("\n").splitlines()
    assert LOOP_LINE.match(lines[-1]), lines[-1]
    assert "seconds: " in result.stdout
    assert sum(1 for line in lines if line.startswith("loop: ")) == 1

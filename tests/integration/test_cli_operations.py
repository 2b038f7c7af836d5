"""Issue 16: the CLI keeps its promise (one line, exit 2, no state changed), cloud.toml, and what an
operator sees (logs, metrics, health without a device certificate, devices/ledger/packets).

CLI cases run ``diredi`` as a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from diredi_secure.services.cloud import CloudServer
from diredi_secure.services.config import CloudConfig, parse_config
from diredi_secure.services.workspace import CloudWorkspace

from diredi_secure.errors import ConfigError

from ..conftest import honest_dp
from .services_harness import payload, running_cloud

pytestmark = pytest.mark.timeout(240)


def diredi(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "diredi_secure.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("diredi: ")
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cloud_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ops") / "cloud"
    assert diredi("cloud", "init", str(root)).returncode == 0
    return root


def test_version_and_short_help() -> None:
    version = diredi("--version")
    assert version.returncode == 0 and version.stdout.startswith("diredi ")
    short = diredi("cloud", "serve", "-h")
    assert short.returncode == 0 and "--ops-listen" in short.stdout


def test_the_tracebacks_of_issue_16_are_one_line(tmp_path: Path, cloud_ws: Path) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    before = tree(tmp_path)
    line = one_line_failure(diredi("keys", "device-ca", "--out", str(tmp_path / "afile")))
    assert "afile" in line
    one_line_failure(diredi("cloud", "serve", "-w", str(cloud_ws), "--listen", "not-an-address"))
    one_line_failure(diredi("cloud", "serve", "-w", str(cloud_ws), "--listen", "203.0.113.7:50999"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_failure(diredi("cloud", "serve", "-w", str(cloud_ws), "--listen", f"127.0.0.1:{port}"))
        assert "listen" in line
    assert tree(tmp_path) == before


def test_a_failed_init_leaves_nothing_and_can_be_retried(tmp_path: Path) -> None:
    target = tmp_path / "w"
    # A store that refuses (no server on this port) fails the init after the keys were made.
    bad = diredi("cloud", "init", str(target), "--store", f"postgresql://nobody@127.0.0.1:{free_port()}/x")
    one_line_failure(bad)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == []
    assert diredi("cloud", "init", str(target)).returncode == 0
    one_line_failure(diredi("cloud", "init", str(target)))  # already a workspace


def test_the_workspace_works_from_any_folder(tmp_path: Path) -> None:
    work = tmp_path / "here"
    work.mkdir()
    assert diredi("cloud", "init", "w", cwd=work).returncode == 0
    assert 'url = "cloud.db"' in (work / "w" / "cloud.toml").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = diredi("cloud", "devices", "-w", str(work / "w"), cwd=elsewhere)
    assert result.returncode == 0 and "no device enrolled" in result.stdout
    assert list(elsewhere.iterdir()) == []  # no stray database made where it was run


def test_config_show_is_the_effective_configuration_and_bad_values_name_their_key(cloud_ws: Path) -> None:
    shown = diredi("cloud", "config", "show", "-w", str(cloud_ws))
    assert shown.returncode == 0
    assert parse_config(shown.stdout) == CloudWorkspace.open(cloud_ws).settings()
    original = (cloud_ws / "cloud.toml").read_text()
    try:
        for text, needle in (
            ('[privacy]\nlifetime_epsilon_budget = -1\n', "lifetime_epsilon_budget"),
            ('[limits]\nmax_entries = "8"\n', "limits.max_entries"),
            ('[server]\nlisten_on = "x"\n', "server.listen_on"),
            ('[store]\nurl = "postgresql://u:hunter2@h/db"\n', "password"),
        ):
            (cloud_ws / "cloud.toml").write_text(_merge(original, text))
            line = one_line_failure(diredi("cloud", "serve", "-w", str(cloud_ws), "--listen", "127.0.0.1:0"))
            assert needle in line and "hunter2" not in line, line
    finally:
        (cloud_ws / "cloud.toml").write_text(original)


def _merge(original: str, extra: str) -> str:
    """``original`` with the keys of ``extra`` added to (or replacing) its sections."""
    import tomllib

    import tomli_w

    doc = tomllib.loads(original)
    for section, values in tomllib.loads(extra).items():
        doc.setdefault(section, {}).update(values)
    return tomli_w.dumps(doc)


def test_the_privacy_policy_comes_from_the_file() -> None:
    cfg = parse_config("[privacy]\nlifetime_epsilon_budget = 12.5\nmax_epsilon_per_packet = 2\n")
    assert cfg.policy.lifetime_epsilon_budget == 12.5 and cfg.policy.max_epsilon_per_packet == 2.0
    assert CloudConfig().policy.lifetime_epsilon_budget != 12.5
    with pytest.raises(ConfigError, match="secrets never"):
        parse_config('[server]\ntls_private_key = "x"\n')


def test_ops_endpoint_needs_no_certificate_and_counts_and_logs_each_packet(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ops_port = free_port()
    with running_cloud(tmp_path) as cloud:
        server = CloudServer(store=cloud.store, keys=cloud.workspace.keys(),
                             tls=cloud.workspace.server_tls(mtls=True),
                             repository_dir=cloud.workspace.repository_dir, max_workers=4,
                             ops_listen=f"127.0.0.1:{ops_port}")
        port = server.start()
        try:
            cloud.port = port
            agent = cloud.device("dev-ops")
            caplog.set_level("INFO", logger="diredi.ingest")
            packet = agent.seal(payload(1), dp=honest_dp(), base_model_version="v1").data
            agent.submit(packet)
            agent.submit(packet)  # a retry: its first receipt, no second charge
            with pytest.raises(grpc.RpcError):  # a refusal on the server: bytes that are no packet
                agent._submit(b"\x0a\x03abc", timeout=10)
            health = urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/healthz", timeout=5)
            assert health.status == 200 and health.read() == b"SERVING\n"
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/metrics", timeout=5).read().decode()
        finally:
            server.stop(grace_s=0.5)
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/healthz", timeout=2)
    assert 'diredi_submits_total{method="Submit",outcome="accepted",reason=""} 2.0' in metrics
    assert 'outcome="refused"' in metrics
    assert "diredi_ingest_seconds_bucket" in metrics and "diredi_devices_active 1.0" in metrics
    accepted = [r for r in caplog.records if getattr(r, "event", None) == "packet_accepted"]
    refused = [r for r in caplog.records if getattr(r, "event", None) == "packet_refused"]
    assert len(accepted) == 2 and len(refused) == 1
    a, retry = accepted
    assert not a.duplicate and retry.duplicate and retry.packet_id == a.packet_id
    charged = [line for line in metrics.splitlines() if line.startswith("diredi_epsilon_charged_total ")]
    assert charged and float(charged[0].split()[1]) == pytest.approx(a.epsilon)  # counted once
    assert a.device == "dev-ops" and a.counter >= 1 and a.epsilon > 0 and a.delta > 0
    assert a.packet_bytes == len(packet) and a.peer == "dev-ops"
    # The line's fields come from the verified header ingest had (nothing parsed again): the
    # same as what the packet's own header says.
    from diredi_secure.packet import inspect_packet

    claimed = inspect_packet(packet)
    assert (a.device, a.counter, a.packet_id, a.base_model, a.payload_bytes) == (
        claimed.device_id, claimed.counter, claimed.packet_id.hex(), claimed.base_model_version[:16],
        claimed.payload.length)
    assert a.epsilon == float(claimed.dp.composed_epsilon) and a.delta == float(claimed.dp.delta)
    assert refused[0].reason and refused[0].reason != "internal"


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    code = (
        "import logging,sys\n"
        "from diredi_secure.services.observe import configure_logging\n"
        "configure_logging('info','json')\n"
        "logging.getLogger('diredi.ingest').info('packet accepted', extra={'device':'d','counter':3})\n"
        "logging.getLogger('diredi.ingest').debug('hidden')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["msg"] == "packet accepted" and doc["device"] == "d" and doc["counter"] == 3
    assert doc["level"] == "info" and doc["ts"].endswith("Z")


def test_devices_ledger_and_packets_commands(tmp_path: Path) -> None:
    with running_cloud(tmp_path) as cloud:
        agent = cloud.device("dev-l")
        agent.submit(agent.seal(payload(2), dp=honest_dp(), base_model_version="v1").data)
        root = str(cloud.workspace.root)
        devices = diredi("cloud", "devices", "-w", root, "--json")
        ledger = diredi("cloud", "ledger", "dev-l", "-w", root)
        packets = diredi("cloud", "packets", "-w", root, "--json")
        unknown = diredi("cloud", "ledger", "nobody", "-w", root)
    row = json.loads(devices.stdout.splitlines()[0])
    assert row["device_id"] == "dev-l" and row["epsilon_spent"] > 0 and row["delta"] == 1e-5
    assert "dev-l: active" in ledger.stdout and "counter" in ledger.stdout and "delta" in ledger.stdout
    assert len(ledger.stdout.strip().splitlines()) == 2  # the device, then its one packet
    p = json.loads(packets.stdout.splitlines()[0])
    assert p["device_id"] == "dev-l" and p["packet_bytes"] > 0 and p["delta"] == 1e-5
    assert "unknown_device" in one_line_failure(unknown) or "not enrolled" in unknown.stderr


def test_a_failed_status_call_does_not_save_the_server(tmp_path: Path) -> None:
    with running_cloud(tmp_path) as cloud:
        agent = cloud.device("dev-s")
        ws = agent.workspace.root
        agent.close()
    before = (ws / "device.json").read_bytes()
    result = diredi("edge", "status", "-w", str(ws), "--server", "nohost.invalid:1")
    assert result.returncode == 2
    assert (ws / "device.json").read_bytes() == before


def test_serve_reads_its_settings_from_cloud_toml(tmp_path: Path) -> None:
    assert diredi("cloud", "init", str(tmp_path / "w")).returncode == 0
    port, ops_port = free_port(), free_port()
    toml = (tmp_path / "w" / "cloud.toml")
    toml.write_text(_merge(toml.read_text(), f'[server]\nlisten = "127.0.0.1:{port}"\n'
                                             f'ops_listen = "127.0.0.1:{ops_port}"\nlog_format = "json"\n'))
    proc = subprocess.Popen([sys.executable, "-m", "diredi_secure.cli", "cloud", "serve", "-w", str(tmp_path / "w")],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/healthz", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert body == b"SERVING\n"
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert any(line.startswith("{") and json.loads(line)["logger"].startswith("diredi") for line in err.splitlines())

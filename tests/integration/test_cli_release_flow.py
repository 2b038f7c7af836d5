"""Issue 4's done-when, through the real `diredi` command in subprocesses, in an empty folder:
init, publish v1, the device installs v1, publish v2, it installs v2, and each attack leaves the
device on v2 with a one-line reason and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diredi_secure.checkpoint import checkpoint_bytes


def diredi(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diredi_secure.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=dict(os.environ),
    )


def ok(*args: str, cwd: Path) -> str:
    r = diredi(*args, cwd=cwd)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def publish(cwd: Path, version: int) -> None:
    """Publish a tiny model whose weights are all ``version`` (the next release version)."""
    (cwd / "m.safetensors").write_bytes(
        checkpoint_bytes({"w": np.full(3, version, np.float32)}, {})
    )
    (cwd / "audit.json").write_text('{"verdict": "pass"}')  # audited: devices refuse not_audited
    ok("release", "publish", "repo", "--model", "m.safetensors", "--architecture", "arch.json",
       "--epsilon", "dev-1=0.5:1.5", "--audit-report", "audit.json", cwd=cwd)  # fmt: skip


@pytest.fixture
def flow(tmp_path: Path) -> Path:
    (tmp_path / "arch.json").write_text(json.dumps({"layers": [3]}))
    ok("release", "init", "repo", cwd=tmp_path)
    for version in (1, 2):
        publish(tmp_path, version)
        out = ok(
            "edge",
            "update",
            "--from",
            "repo",
            "--state",
            "dev",
            "--root",
            "repo/metadata/1.root.json",
            cwd=tmp_path,
        )
        assert f"v{version}" in out
    return tmp_path


def refused(flow: Path, reason: str) -> None:
    r = diredi("edge", "update", "--from", "repo", "--state", "dev", cwd=flow)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert reason in lines[0] and "device stays on v2" in lines[0], lines[0]


def test_tampered_model_bytes_leave_the_device_on_v2(flow: Path) -> None:
    publish(flow, 3)
    target = max(
        (flow / "repo" / "targets").glob("*.model.safetensors"), key=lambda p: p.stat().st_mtime
    )
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    refused(flow, "target")


def test_rollback_of_the_timestamp_leaves_the_device_on_v2(flow: Path) -> None:
    ts = flow / "repo" / "metadata" / "timestamp.json"
    old = json.loads(ts.read_text())
    old["signed"]["version"] = 1
    ts.write_text(json.dumps(old))  # an older (and now unsigned) timestamp
    refused(flow, "")


def test_up_to_date_is_reported(flow: Path) -> None:
    assert "up to date" in ok("edge", "update", "--from", "repo", "--state", "dev", cwd=flow)


def test_rotating_the_timestamp_key_keeps_devices_updating(flow: Path) -> None:
    out = ok("release", "rotate-key", "repo", "--role", "timestamp", cwd=flow)
    assert out.strip() == "timestamp keys rotated; root v2"
    publish(flow, 3)
    assert "v3" in ok("edge", "update", "--from", "repo", "--state", "dev", cwd=flow)
    r = diredi("release", "rotate-key", "repo", "--role", "root", cwd=flow)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "online roles" in r.stderr

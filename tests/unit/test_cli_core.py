"""The `diredi` command end to end in a subprocess: keys, seal, inspect, open, and exit-2 failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DIREDI = [sys.executable, "-m", "diredi_secure.cli"]


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [*DIREDI, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    env = {"CA_PASS": "s3cret"}
    assert (
        run(
            "keys", "device-ca", "--out", "ca", "--passphrase-env", "CA_PASS", cwd=d, env=env
        ).returncode
        == 0
    )
    assert (
        run(
            "keys",
            "device",
            "--id",
            "dev-1",
            "--ca",
            "ca",
            "--out",
            "dev",
            "--ca-passphrase-env",
            "CA_PASS",
            cwd=d,
            env=env,
        ).returncode
        == 0
    )
    assert run("keys", "inbox", "--out", "inbox", cwd=d).returncode == 0
    np.savez(d / "payload.npz", reference_logits=np.ones((8, 10), np.float32))
    from dataclasses import asdict

    from ..conftest import honest_dp

    (d / "dp.json").write_text(json.dumps(asdict(honest_dp())))
    r = run(
        "packet",
        "seal",
        "--payload",
        "payload.npz",
        "--dp",
        "dp.json",
        "--device",
        "dev",
        "--inbox",
        "inbox/inbox.pub",
        "--counter",
        "1",
        "--base-model",
        "v1",
        "--out",
        "p.bin",
        cwd=d,
    )
    assert r.returncode == 0, r.stderr
    return d


def test_seal_inspect_open(workdir: Path) -> None:
    r = run("packet", "inspect", "p.bin", cwd=workdir)
    assert (
        r.returncode == 0 and '"verified": false' in r.stdout and '"device_id": "dev-1"' in r.stdout
    )
    r = run(
        "packet",
        "open",
        "p.bin",
        "--inbox",
        "inbox",
        "--ca-cert",
        "ca/ca.crt",
        "--device-cert",
        "dev/device.crt",
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    assert '"verified": true' in r.stdout and '"kind": "reference_logits"' in r.stdout


@pytest.mark.parametrize(
    "args, reason",
    [
        (("packet", "inspect", "missing.bin"), "file"),
        (("packet", "inspect", "dp.json"), "malformed"),
        (
            ("keys", "device", "--id", "dev-2", "--ca", "ca", "--out", "dev2"),
            "key_file",
        ),  # encrypted CA key, no passphrase
        (("keys", "device", "--id", "bad id!", "--ca", "ca"), "config"),
        (("packet", "inspect", "--no-such-flag"), "No such option"),
    ],
)
def test_expected_failures_exit_2_with_one_line(
    workdir: Path, args: tuple[str, ...], reason: str
) -> None:
    r = run(*args, cwd=workdir)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_tampered_packet_refused_at_cli(workdir: Path) -> None:
    data = bytearray((workdir / "p.bin").read_bytes())
    data[len(data) // 2] ^= 1
    (workdir / "bad.bin").write_bytes(bytes(data))
    r = run(
        "packet",
        "open",
        "bad.bin",
        "--inbox",
        "inbox",
        "--ca-cert",
        "ca/ca.crt",
        "--device-cert",
        "dev/device.crt",
        cwd=workdir,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "signature_invalid" in r.stderr

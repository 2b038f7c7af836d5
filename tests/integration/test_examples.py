"""The README's library section is examples/library_quickstart.py; CI runs it as written, against
key files made by the CLI (issue 16 item 7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_library_quickstart_runs_on_cli_key_files(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "diredi_secure.cli"]
    for args in (["keys", "device-ca", "--out", "keys/ca"],
                 ["keys", "device", "--id", "dev-1", "--ca", "keys/ca", "--out", "keys/dev-1"],
                 ["keys", "inbox", "--out", "keys/inbox"]):
        made = run(*cli, *args, cwd=tmp_path)
        assert made.returncode == 0, made.stderr
    result = run(sys.executable, str(ROOT / "examples" / "library_quickstart.py"), "keys", "dev-1",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sealed packet ") and "at delta 1e-05" in lines[0]
    assert lines[1].startswith("opened: device dev-1, counter 1")
    assert lines[2].startswith("receipt verified: packet ")


def test_library_quickstart_refuses_a_world_readable_key_in_one_line(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "diredi_secure.cli"]
    for args in (["keys", "device-ca", "--out", "keys/ca"],
                 ["keys", "device", "--id", "dev-1", "--ca", "keys/ca", "--out", "keys/dev-1"],
                 ["keys", "inbox", "--out", "keys/inbox"]):
        assert run(*cli, *args, cwd=tmp_path).returncode == 0
    (tmp_path / "keys" / "dev-1" / "device.key").chmod(0o644)
    result = run(sys.executable, str(ROOT / "examples" / "library_quickstart.py"), "keys", "dev-1",
                 cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_public_key_api_round_trips(tmp_path: Path) -> None:
    import diredi_secure as dr

    key = dr.generate_signing_key()
    dr.save_signing_key(key, tmp_path / "k.key", b"pass phrase")
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    again = dr.load_signing_key(tmp_path / "k.key", b"pass phrase")
    assert again.public_key.raw == key.public_key.raw
    with pytest.raises(dr.errors.KeyFileError):
        dr.load_signing_key(tmp_path / "k.key", b"wrong")
    inbox = dr.generate_inbox_key()
    dr.save_inbox_key(inbox, tmp_path / "inbox.key")
    dr.save_inbox_public_key(inbox.public_key, tmp_path / "inbox.pub")
    assert dr.load_inbox_public_key(tmp_path / "inbox.pub").pem == inbox.public_key.pem
    assert dr.load_inbox_key(tmp_path / "inbox.key").public_key.pem == inbox.public_key.pem
    dr.save_verify_key(key.public_key, tmp_path / "k.pub")
    assert dr.load_verify_key(tmp_path / "k.pub").raw == key.public_key.raw
    (tmp_path / "hex.pub").write_text(key.public_key.raw.hex() + "\n")
    assert dr.load_verify_key(tmp_path / "hex.pub").raw == key.public_key.raw
    (tmp_path / "big.crt").write_bytes(b"0" * (dr.keys.MAX_PUBLIC_FILE_BYTES + 1))
    with pytest.raises(dr.errors.TooLarge):
        dr.load_certificate(tmp_path / "big.crt")
    (tmp_path / "junk.crt").write_bytes(b"not a certificate")
    with pytest.raises(dr.errors.CertificateInvalid):
        dr.load_certificate(tmp_path / "junk.crt")

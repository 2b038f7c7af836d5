"""The committed generated code matches what `make protos` would write now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_detects_a_stale_file(tmp_path: Path) -> None:
    target = ROOT / "diredi_secure" / "_proto" / "diredi" / "v1" / "packet_pb2.pyi"
    original = target.read_bytes()
    try:
        target.write_bytes(original + b"\n# edited by hand\n")
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 1 and "packet_pb2.pyi" in result.stdout
    finally:
        target.write_bytes(original)


def test_wire_package_and_services() -> None:
    from diredi_secure._proto.diredi.v1 import services_pb2

    names = {s.full_name for s in services_pb2.DESCRIPTOR.services_by_name.values()}
    assert names == {
        "diredi.v1.KnowledgeService",
        "diredi.v1.UpdateService",
        "diredi.v1.EnrollmentService",
    }

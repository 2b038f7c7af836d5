"""The wire contract as other languages see it: buf lint and buf breaking, with real buf.

buf is pinned in tools/buf/package-lock.json; `make test` (via `make proto-check`) installs it
before pytest runs. Each check is also run on a deliberately broken copy, so a check that passes
everything (a blanket lint exception, a breaking check against the wrong baseline) fails here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "tools" / "buf" / "node_modules" / ".bin" / "buf"
BASELINE = ROOT / "tools" / "buf" / "released-wire-v1.json"
pytestmark = pytest.mark.skipif(
    not BUF.exists(), reason="buf is not installed: run `make proto-check` (needs node and npm)"
)


def _buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _copy(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


def _edit(root: Path, name: str, old: str, new: str) -> None:
    path = root / "protos" / "diredi" / "v1" / name
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_lint_passes_and_still_catches_new_findings(tmp_path: Path) -> None:
    ok = _buf("lint")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    root = _copy(tmp_path)
    # A new enum beside the excepted DType, and a new RPC beside the excepted ones: both linted.
    _edit(
        root,
        "packet.proto",
        "enum Suite {",
        "enum Colour {\n  COLOUR_UNSPECIFIED = 0;\n  RED = 1;\n}\n\nenum Suite {",
    )
    _edit(
        root,
        "services.proto",
        "  rpc Enroll(",
        "  rpc Fetch(Receipt) returns (Receipt);\n  rpc Enroll(",
    )
    bad = _buf("lint", cwd=root)
    assert bad.returncode != 0
    assert 'Enum value name "RED" should be prefixed with "COLOUR_"' in bad.stdout
    assert 'RPC request type "Receipt" should be named "FetchRequest"' in bad.stdout


def test_wire_matches_the_released_contract() -> None:
    result = _buf("breaking", "--against", str(BASELINE))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("file", "old", "new", "finding"),
    [
        ("packet.proto", "uint64 counter = 5;", "uint64 counter = 12;", "deleted"),
        ("packet.proto", "uint64 counter = 5;", "int32 counter = 5;", "changed type"),
        ("packet.proto", "bytes enc = 3;", "bytes encapsulated_key = 3;", "changed name"),
        ("services.proto", "rpc Submit(", "rpc SubmitPacket(", "deleted"),
        ("services.proto", "service UpdateService", "service ReleaseService", "deleted"),
        (
            "services.proto",
            "rpc GetStatus(DeviceStatusRequest)",
            "rpc GetStatus(TargetRequest)",
            "changed request type",
        ),
    ],
)
def test_breaking_check_refuses_a_wire_change(
    tmp_path: Path, file: str, old: str, new: str, finding: str
) -> None:
    root = _copy(tmp_path)
    _edit(root, file, old, new)
    result = _buf("breaking", "--against", str(BASELINE), cwd=root)
    assert result.returncode != 0, f"{old!r} -> {new!r} passed the breaking check"
    assert finding in result.stdout

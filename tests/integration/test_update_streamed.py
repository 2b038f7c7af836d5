"""The streamed install (issue 15 item 5): ``diredi edge update`` over real gRPC on loopback.

What is pinned here: the update path never imports torch (a subprocess runs the real CLI command
and reports ``sys.modules``); targets land in the slot as 0600 files without a download folder;
a tampered or over-long model leaves no staging folder and the running slot unchanged; a crash
between the slot rename and the commit leaves a state the next run repairs.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diredi_secure.checkpoint import checkpoint_bytes
from diredi_secure.errors import ModelFormatError
from diredi_secure.release import sign_attestation
from diredi_secure.release.errors import TargetMismatch, TargetTooLong
from diredi_secure.release.repository import MODEL_TARGET
from tests.security.release_fixtures import predicate
from tests.security.test_services_release_cases import Scene, make_scene

_PROBE = """
import json, sys
from diredi_secure.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
heavy = sorted(m for m in ("torch", "opacus", "functorch", "ray") if m in sys.modules)
print("PROBE " + json.dumps({"rc": rc, "heavy": heavy}))
"""


@pytest.fixture
def scene(tmp_path: Path):  # type: ignore[no-untyped-def]
    with make_scene(tmp_path) as scene:
        yield scene


def _staging_dirs(scene: Scene) -> list[Path]:
    return sorted((scene.agent.workspace.release_dir / "slots").glob(".incoming-*"))


def test_edge_update_cli_does_not_import_torch(scene: Scene) -> None:
    scene.publish(2)
    ws = scene.agent.workspace.root
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, "edge", "update", "--workspace", str(ws),
         "--server", scene.cloud.target],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, proc.stdout + proc.stderr
    probe = json.loads(lines[-1][len("PROBE ") :])
    assert probe["rc"] in (0, None), proc.stdout + proc.stderr
    assert "installed: release v2" in proc.stdout
    assert probe["heavy"] == [], f"the update path imported {probe['heavy']}"
    scene.assert_running(2)


def test_installed_files_are_private_and_no_download_folder_is_left(scene: Scene) -> None:
    scene.publish(2)
    result = scene.update()
    release_dir = scene.agent.workspace.release_dir
    slot = release_dir / "slots" / result.release.slot
    for name in result.release.files:
        assert stat.S_IMODE((slot / name).stat().st_mode) == 0o600, name
    assert not (release_dir / "download").exists()
    assert _staging_dirs(scene) == []
    # the fallback slot still holds v1, and revert finds it
    assert scene.updater().slots.revert().version == 1
    scene.assert_running(1)


def test_tampered_model_leaves_no_partial_file(scene: Scene) -> None:
    scene.publish(2)
    path = scene.model_path()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # same length, one bit off: only the hash can tell
    path.write_bytes(bytes(data))
    scene.refused(TargetMismatch)
    scene.assert_running(1)
    assert _staging_dirs(scene) == []
    assert scene.updater().slots.previous() is None  # nothing was half-installed in slot b


def test_endless_model_stops_at_the_declared_length(scene: Scene) -> None:
    scene.publish(2)
    path = scene.model_path()
    path.write_bytes(path.read_bytes() + b"\0" * (3 << 20))
    scene.refused(TargetTooLong)
    scene.assert_running(1)
    assert _staging_dirs(scene) == []


def test_signed_model_with_an_inconsistent_header_is_refused_before_the_switch(
    scene: Scene,
) -> None:
    """A release whose TUF hashes match but whose safetensors offsets lie (a buggy or hostile
    publisher) is refused by the header check, which reads no tensor."""
    good = checkpoint_bytes({"w": np.full((4, 3), 2.0, np.float32)}, {})
    header_len = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + header_len])
    header["w"]["shape"] = [4, 4]  # 64 bytes declared, 48 stored
    raw = json.dumps(header).encode()
    bad = len(raw).to_bytes(8, "little") + raw + good[8 + header_len :]
    attestation = sign_attestation(
        MODEL_TARGET, bad, predicate(2, scene.models[1]), scene.repo.signers("targets")
    )
    scene.publish_raw(2, bad, attestation)  # no publisher-side checks
    scene.refused(ModelFormatError, match="does not fill its span")
    scene.assert_running(1)
    assert _staging_dirs(scene) == []


def test_crash_after_the_slot_rename_is_repaired_by_the_next_run(scene: Scene) -> None:
    scene.publish(2)
    assert scene.update().release.slot == "b"
    scene.publish(3)

    def crash() -> None:
        raise KeyboardInterrupt("power lost")

    with pytest.raises(KeyboardInterrupt):
        scene.update(before_commit=crash)  # slot a now holds v3's files, active.json says v2
    scene.assert_running(2)
    assert scene.updater().slots.previous() is None  # v1's slot was being replaced: forgotten
    assert scene.update().release.version == 3
    scene.assert_running(3)
    assert scene.updater().slots.revert().version == 2

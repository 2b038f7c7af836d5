"""The Node.js client (examples/node, grpc-js + protobufjs) against a real ``diredi cloud serve``.

A second implementation of the wire (docs/WIRE.md): Python provisions the device and seals the
packet; Node checks the server's health, enrols the device over mTLS, submits the sealed bytes and
verifies the signed receipt itself (Ed25519 in ``node:crypto`` over the receipt's signing input,
and the digest it computes of the packet). Python then finds the packet in the store, and checks
the receipt Node kept. A tampered packet is refused with the server's typed reason, which Node
prints as its one line.

Needs ``node`` and ``make node-deps`` (``npm ci`` in examples/node); skipped, saying so, without
node. CI has node (tools/ensure_node.sh). The last test, which needs no node, checks that
docs/WIRE.md names every reason string the code defines with its status code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from diredi_secure.services.workspace import CloudWorkspace, DeviceWorkspace

from diredi_secure.packet import inspect_packet, packet_digest, seal_packet, verify_receipt
from diredi_secure.serde import ciphertext_span, envelope_from_bytes
from diredi_secure.store import open_store

from .services_harness import DP, payload

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "examples" / "node" / "client.js"
NODE = shutil.which("node")


def _node_missing() -> str | None:
    if NODE is None:
        return "node is not on PATH: install it with tools/ensure_node.sh (CI has it)"
    if not (REPO / "examples" / "node" / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return "examples/node has no node_modules: run `make node-deps` (npm ci in examples/node)"
    return None


needs_node = pytest.mark.skipif(_node_missing() is not None, reason=str(_node_missing()))


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Served:
    cloud: CloudWorkspace
    device: DeviceWorkspace
    target: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``diredi cloud serve`` (mTLS, SQLite) in a subprocess, and one provisioned, unenrolled device."""
    root = tmp_path_factory.mktemp("node")
    init = subprocess.run([sys.executable, "-m", "diredi_secure.cli", "cloud", "init", str(root / "cloud")],
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    cloud = CloudWorkspace.open(root / "cloud")
    # The server accepts packets only against a model it released: record one named "v1" (this
    # test is about the wire, so no model is trained; test_roundtrip_grpc.py does the same).
    (cloud.root / "releases.json").write_text(
        '{"format": 1, "models": {"v1": {"version": 1, "prefix": "", "device": null}}, "fleet": []}')
    port_file = root / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "diredi_secure.cli", "cloud", "serve", "--workspace", str(cloud.root),
         "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--log-file", str(root / "cloud.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None, f"cloud serve exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            assert time.monotonic() < deadline, "cloud serve wrote no port file in 60 s"
            time.sleep(0.05)
        target = f"127.0.0.1:{int(port_file.read_text())}"
        device = cloud.provision_device(root / "device", "node-dev-1", target=target, now_ms=_now_ms())
        yield Served(cloud, device, target)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def _seal(device: DeviceWorkspace, counter: int, *, wire_version: int = 2) -> bytes:
    return seal_packet(
        payload(counter), device_key=device.signing_key(), device_id=device.device_id, counter=counter,
        base_model_version="v1", dp=DP, inbox=device.inbox_public_key(), now_ms=_now_ms(),
        random_bytes=os.urandom, device_certificate=device.certificate(), wire_version=wire_version,
    ).data


def _node(served: Served, packet: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run(
        [NODE, str(CLIENT), "--target", served.target, "--device", str(served.device.root),
         "--packet", str(packet), *extra],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@needs_node
@pytest.mark.parametrize("wire_version", [1, 2])  # in counter order
def test_node_enrols_submits_a_python_sealed_packet_and_verifies_its_receipt(
        served: Served, tmp_path: Path, wire_version: int) -> None:
    counter = 10 + wire_version  # each case its own, rising: they share the device
    data = _seal(served.device, counter, wire_version=wire_version)
    packet, receipt_file = tmp_path / "packet.bin", tmp_path / "receipt.bin"
    packet.write_bytes(data)
    result = _node(served, packet, "--receipt-out", str(receipt_file))
    assert result.returncode == 0, (result.stdout, result.stderr)
    line = _one_line(result.stdout)
    assert result.stderr == ""
    assert line.startswith("ok: health SERVING; enrolled node-dev-1; packet ")
    assert f"wire v{wire_version}, counter {counter}," in line
    assert f"digest {packet_digest(data).hex()[:16]}" in line

    # The store holds exactly these bytes, and the receipt Node verified is the stored one.
    store = open_store(served.cloud.store_url())
    try:
        stored = store.get_packet(inspect_packet(data).packet_id)
    finally:
        store.close()
    assert stored is not None and stored.packet_bytes == data and stored.device_id == "node-dev-1"
    assert stored.packet_sha256 == packet_digest(data)
    receipt = receipt_file.read_bytes()
    assert receipt == stored.receipt_bytes
    keys = served.cloud.keys()
    body = verify_receipt(receipt, keys.receipt_key.public_key, data)  # Python agrees with Node
    assert body.counter == counter

    # Resubmitting the same bytes is idempotent: the first receipt again, byte for byte.
    again = _node(served, packet, "--receipt-out", str(tmp_path / "again.bin"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.bin").read_bytes() == receipt


@needs_node
def test_a_tampered_packet_gets_the_servers_typed_reason_as_one_line(served: Served, tmp_path: Path) -> None:
    data = bytearray(_seal(served.device, 40))
    offset, length = ciphertext_span(envelope_from_bytes(bytes(data)))
    data[offset + length // 2] ^= 0x01  # one ciphertext bit: the device's signature no longer holds
    packet = tmp_path / "tampered.bin"
    packet.write_bytes(bytes(data))
    result = _node(served, packet)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    line = _one_line(result.stderr)
    assert line.startswith("diredi-node: Submit refused: UNAUTHENTICATED signature_invalid: "), line


@needs_node
def test_a_packet_from_another_device_is_refused_before_any_call(served: Served, tmp_path: Path) -> None:
    other = served.cloud.provision_device(tmp_path / "other", "node-dev-2", target=served.target, now_ms=_now_ms())
    packet = tmp_path / "other.bin"
    packet.write_bytes(_seal(other, 1))
    result = _node(served, packet)
    assert result.returncode == 1
    assert _one_line(result.stderr) == "diredi-node: packet is device node-dev-2's, the workspace is node-dev-1's"


@needs_node
def test_bad_usage_is_one_line_and_exit_2(served: Served, tmp_path: Path) -> None:
    result = _node(served, tmp_path / "missing.bin")
    assert result.returncode == 2
    assert _one_line(result.stderr).startswith("diredi-node: cannot read packet ")


@needs_node
def test_node_computes_the_packet_digest_of_every_known_answer_vector() -> None:
    """wire.js alone (no server): the transcript and digest of wire v1 and v2, all three suites."""
    assert NODE is not None
    files = sorted((REPO / "tests" / "vectors").glob("packet_v*_suite*.bin"))
    assert len(files) == 6
    result = subprocess.run([NODE, str(REPO / "examples" / "node" / "digest.js"), *map(str, files)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    vectors = {v["file"]: v for v in json.loads((REPO / "tests" / "vectors" / "packets.json").read_text())["vectors"]}
    lines = result.stdout.splitlines()
    assert len(lines) == len(files)
    for line, file in zip(lines, files, strict=True):
        digest, version, name = line.split(" ")
        data = file.read_bytes()
        assert name == str(file) and int(version) == envelope_from_bytes(data).envelope_version
        assert digest == packet_digest(data).hex()
        if "packet_digest" in vectors[file.name]:  # the version-2 entries pin it
            assert digest == vectors[file.name]["packet_digest"]


_REASON_LITERAL = re.compile(r'(?:\breason\s*(?::\s*str\s*)?=\s*|RATE_LIMITED\s*=\s*)"([a-z_]+)"')


def test_wire_md_names_every_reason_with_its_status_code() -> None:
    """docs/WIRE.md section 14 against the code: every reason literal (class attributes and
    ``reason="..."`` at raise sites, in diredi_secure/ and services/) is named there, and each row
    of its table gives the status ``services/status.py`` maps that row's class to."""
    import grpc
    from diredi_secure.services import ratelimit, status  # noqa: F401 - defines error classes
    from diredi_secure.services.status import status_for

    from diredi_secure import errors, privacy, store  # noqa: F401 - define error classes
    from diredi_secure.release import errors as release_errors  # noqa: F401

    doc = (REPO / "docs" / "WIRE.md").read_text()
    section = doc[doc.index("## 14. Errors"):]
    sources = [p for root in ("diredi_secure", "services") for p in (REPO / root).rglob("*.py")
               if "_proto" not in p.parts]
    literals = {m.group(1) for p in sources for m in _REASON_LITERAL.finditer(p.read_text())}
    assert {"malformed", "unknown_base_model", "rate_limited", "wire_version_retired"} <= literals
    missing = sorted(r for r in literals if f"`{r}`" not in section)
    assert not missing, f"docs/WIRE.md section 14 does not name {missing}"

    def subclasses(cls: type) -> list[type]:
        return [c for s in cls.__subclasses__() for c in (s, *subclasses(s))]

    by_name = {c.__name__: c for c in subclasses(errors.DirediError)}
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 30
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        code = cells[1].strip("`")
        assert code in grpc.StatusCode.__members__, row
        names = re.findall(r"`(\w+)`", cells[2])
        if not names:  # "(none)": `internal`, an exception nobody typed
            assert code == "INTERNAL"
            continue
        cls = by_name[names[0]]
        assert status_for(cls.__new__(cls)).name == code, row

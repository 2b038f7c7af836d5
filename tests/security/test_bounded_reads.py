"""Key, certificate, checkpoint and kit files are read through one bounded reader (attack F5).

Before, each reader did ``stat()`` then an unbounded ``read_bytes()``: a symlink to ``/dev/zero``
(``st_size`` 0) ran the process out of memory, and a FIFO hung it forever (a 0600 FIFO even passed
the key-mode check). Each case here runs in a thread with a deadline, so a regression fails the
test instead of hanging the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from diredi_secure.services.provision import (
    CloudPublic,
    KitInvalid,
    build_kit,
    install_kit,
    load_ca,
)
from diredi_secure.services.workspace import CloudWorkspace

from diredi_secure import keys
from diredi_secure._crypto import SigningKey
from diredi_secure.checkpoint import load_checkpoint, read_regular_file
from diredi_secure.errors import DirediError, KeyFileError, ModelFormatError, TooLarge

DEADLINE_S = 5.0


def within_deadline(fn: Callable[[], object]) -> object:
    """``fn()``'s result or its exception, or a test failure if it does not return in time."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(("ok", fn()))
        except BaseException as exc:  # handed back to the test to assert on
            out.append(("raised", exc))

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(DEADLINE_S)
    assert out, f"still reading after {DEADLINE_S} s (a FIFO or endless device was read)"
    assert time.monotonic() - start < DEADLINE_S
    return out[0]


def refused_with(fn: Callable[[], object], error: type[DirediError]) -> DirediError:
    kind, value = within_deadline(fn)  # type: ignore[misc]
    assert kind == "raised", f"accepted: {value!r}"
    assert isinstance(value, error), repr(value)
    return value


@pytest.fixture
def zero_link(tmp_path: Path) -> Path:
    link = tmp_path / "zero.crt"
    link.symlink_to("/dev/zero")
    return link


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "device.key"
    os.mkfifo(path, 0o600)  # 0600: passes the key-mode check, so only the type check stops it
    return path


@pytest.fixture
def signing_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "real.key"
    keys.save_signing_key(SigningKey.from_seed(b"\x07" * 32), path)
    return path


# -- the key API ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "load",
    [keys.load_certificate, keys.load_verify_key, keys.load_inbox_public_key,
     keys.load_signing_key, keys.load_tls_key, keys.load_inbox_key],
    ids=lambda f: f.__name__,
)  # fmt: skip
def test_a_link_to_dev_zero_is_refused_quickly(zero_link: Path, load: Callable[[Path], object]) -> None:
    exc = refused_with(lambda: load(zero_link), KeyFileError)
    assert exc.reason == "not_regular_file"


@pytest.mark.parametrize(
    "load",
    [keys.load_certificate, keys.load_verify_key, keys.load_signing_key, keys.load_tls_key],
    ids=lambda f: f.__name__,
)
def test_a_fifo_is_refused_without_hanging(fifo: Path, load: Callable[[Path], object]) -> None:
    exc = refused_with(lambda: load(fifo), KeyFileError)
    assert exc.reason == "not_regular_file"


def test_a_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "dir.key"
    folder.mkdir(mode=0o700)
    refused_with(lambda: keys.load_signing_key(folder), KeyFileError)
    refused_with(lambda: keys.load_certificate(folder), KeyFileError)


def test_a_file_over_the_cap_is_too_large(tmp_path: Path) -> None:
    big = tmp_path / "big.crt"
    big.write_bytes(b"0" * (keys.MAX_PUBLIC_FILE_BYTES + 1))
    exc = refused_with(lambda: keys.load_certificate(big), TooLarge)
    assert isinstance(exc, TooLarge) and exc.limit == keys.MAX_PUBLIC_FILE_BYTES


def test_the_reader_never_reads_past_the_cap(tmp_path: Path) -> None:
    """A file exactly at the cap is read whole; one byte more is refused (the read is bounded by
    the cap, not by ``st_size``, which a growing file or a device would get wrong)."""
    at_cap = tmp_path / "at-cap"
    at_cap.write_bytes(b"x" * 1000)
    assert read_regular_file(at_cap, "file", 1000) == b"x" * 1000
    at_cap.write_bytes(b"x" * 1001)
    with pytest.raises(TooLarge):
        read_regular_file(at_cap, "file", 1000)


def test_a_missing_file_is_a_key_file_error(tmp_path: Path) -> None:
    exc = refused_with(lambda: keys.load_certificate(tmp_path / "absent.crt"), KeyFileError)
    assert isinstance(exc.__cause__, FileNotFoundError)


def test_a_regular_0600_key_still_loads(signing_key_file: Path) -> None:
    kind, key = within_deadline(lambda: keys.load_signing_key(signing_key_file))  # type: ignore[misc]
    assert kind == "ok" and isinstance(key, SigningKey)


def test_a_symlink_to_a_0600_key_still_loads(tmp_path: Path, signing_key_file: Path) -> None:
    """As ssh does: the mode checked is the target's (fstat of the opened file)."""
    link = tmp_path / "link.key"
    link.symlink_to(signing_key_file)
    kind, key = within_deadline(lambda: keys.load_signing_key(link))  # type: ignore[misc]
    assert kind == "ok" and isinstance(key, SigningKey)
    signing_key_file.chmod(0o644)
    exc = refused_with(lambda: keys.load_signing_key(link), KeyFileError)
    assert exc.reason == "key_file_permissions"


def test_a_checkpoint_fifo_or_device_is_a_model_format_error(fifo: Path, zero_link: Path) -> None:
    refused_with(lambda: load_checkpoint(fifo), ModelFormatError)
    refused_with(lambda: load_checkpoint(zero_link), ModelFormatError)


# -- device kits ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cloud (in-process, no store) whose CA and public export make kits; only the refusal
    itself goes through the real `diredi` command."""
    root = tmp_path_factory.mktemp("bounded-kits")
    ws = CloudWorkspace.init(root / "cloud", now_ms=int(time.time() * 1000), create_store=False)
    public = CloudPublic.from_cloud(ws)
    ca_key, ca_cert = load_ca(ws.ca_dir)
    (root / "factory").mkdir()
    for name in ("k-zero-ca", "k-zero-manifest", "k-fifo-tls", "k-fifo-key", "k-lib"):
        build_kit(root / "factory" / name, ca_key=ca_key, ca_cert=ca_cert, device_id=name,
                  public=public, target="127.0.0.1:50999", now_ms=int(time.time() * 1000))  # fmt: skip
    return root / "factory"


def _link_to_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _fifo(path: Path, mode: int) -> None:
    path.unlink()
    os.mkfifo(path, mode)


@pytest.mark.parametrize(
    ("kit", "plant"),
    [
        ("k-zero-ca", lambda k: _link_to_zero(k / "ca.crt")),
        ("k-zero-manifest", lambda k: _link_to_zero(k / "kit.json")),
        ("k-fifo-tls", lambda k: _fifo(k / "tls.crt", 0o644)),
        ("k-fifo-key", lambda k: _fifo(k / "device.key", 0o600)),
    ],
)
def test_edge_init_refuses_a_planted_kit_file_in_one_line(
    factory: Path, kit: str, plant: Callable[[Path], None]
) -> None:
    plant(factory / kit)
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "diredi_secure.cli", "edge", "init", f"dev-{kit}",
                        "--kit", kit], cwd=factory, capture_output=True, text=True, check=False,
                       timeout=60, env=dict(os.environ))  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "kit_invalid" in lines[0] and "not a regular file" in lines[0], lines[0]
    assert not (factory / f"dev-{kit}").exists()
    assert time.monotonic() - start < 30


def test_install_kit_refuses_a_fifo_without_hanging(factory: Path, tmp_path: Path) -> None:
    kit = factory / "k-lib"
    _fifo(kit / "inbox.pub", 0o644)
    exc = refused_with(
        lambda: install_kit(kit, tmp_path / "dev", now_ms=int(time.time() * 1000)), KitInvalid
    )
    assert "not a regular file" in exc.message

"""SlotStore.staging: what a failed receive leaves behind (nothing), and the writer thread's errors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.exceptions import DownloadError

from diredi_secure.release.errors import InstallFailed
from diredi_secure.release.updater import InstalledRelease, SlotStore, _ChunkSink


def _release(version: int, slot: str) -> InstalledRelease:
    return InstalledRelease(version=version, model_sha256="0" * 64, role="targets", prefix="",
                            slot=slot, files=("model.safetensors",), parent_sha256=None,
                            audit_verdict="pass", audit_forced=False, installed_at="now")  # fmt: skip


def _leftovers(store: SlotStore) -> list[Path]:
    return sorted((store.folder / "slots").glob(".incoming-*"))


def test_receive_hashes_what_it_writes(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    data = [bytes([i]) * 100_000 for i in range(7)]
    with store.staging() as staged:
        got = staged.receive("model.safetensors", iter(data), max_bytes=700_000,
                             hash_algorithms=["sha256", "sha512"])  # fmt: skip
        assert got.path.read_bytes() == b"".join(data)
        assert got.digests["sha256"] == hashlib.sha256(b"".join(data)).hexdigest()
        assert got.digests["sha512"] == hashlib.sha512(b"".join(data)).hexdigest()
        staged.commit(_release(1, "a"))
    assert (store.slot_dir("a") / "model.safetensors").read_bytes() == b"".join(data)
    assert _leftovers(store) == []


def test_a_stream_that_breaks_leaves_nothing(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    store.install({"model.safetensors": b"v1"}, _release(1, "a"))

    def broken() -> Iterator[bytes]:
        yield b"x" * 1000
        raise DownloadError("connection reset")

    with pytest.raises(DownloadError), store.staging() as staged:
        staged.receive("model.safetensors", broken(), max_bytes=10_000)
    assert _leftovers(store) == []
    active = store.active()
    assert active is not None and active.version == 1
    assert not store.slot_dir("b").exists()


def test_over_the_declared_length_stops_the_stream(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    pulled: list[int] = []

    def endless() -> Iterator[bytes]:
        while True:
            pulled.append(1)
            yield b"y" * 4096

    with pytest.raises(tuf_exc.DownloadLengthMismatchError), store.staging() as staged:
        staged.receive("model.safetensors", endless(), max_bytes=10_000)
    assert len(pulled) == 3  # the third chunk crosses 10,000 bytes: nothing more is read
    assert _leftovers(store) == []


def test_unknown_hash_algorithm_is_tufs_mismatch(tmp_path: Path) -> None:
    with pytest.raises(tuf_exc.LengthOrHashMismatchError), SlotStore(tmp_path).staging() as st:
        st.receive("model.safetensors", iter([b"a"]), max_bytes=1, hash_algorithms=["nope"])


def test_a_failing_write_is_raised_to_the_producer() -> None:
    class Full:
        def write(self, data: memoryview) -> int:
            raise OSError(28, "No space left on device")

    sink = _ChunkSink(Full(), [])
    with pytest.raises(OSError, match="No space"):
        for _ in range(100):  # the error surfaces at a later put or at close
            sink.put(b"z" * 10)
        sink.close()


def test_a_failing_write_in_the_slot_is_install_failed(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    store = SlotStore(tmp_path)
    import diredi_secure.release.updater as updater

    real = updater._ChunkSink

    class Failing(real):  # type: ignore[misc, valid-type]
        def __init__(self, handle, hashers):  # type: ignore[no-untyped-def]
            class Full:
                def write(self, data: memoryview) -> int:
                    raise OSError(28, "No space left on device")

            super().__init__(Full(), hashers)

    monkeypatch.setattr(updater, "_ChunkSink", Failing)
    with pytest.raises(InstallFailed, match="No space"), store.staging() as staged:
        staged.receive("model.safetensors", iter([b"a" * 10] * 5), max_bytes=100)
    assert _leftovers(store) == []
    assert store.active() is None

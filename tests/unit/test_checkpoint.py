from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from diredi_secure.checkpoint import load_checkpoint, load_checkpoint_bytes, save_checkpoint
from diredi_secure.errors import ModelFormatError, TooLarge


def test_round_trip(tmp_path: Path) -> None:
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float16)}
    save_checkpoint(tmp_path / "m.safetensors", tensors, {"arch": "mlp"})
    loaded, meta = load_checkpoint(tmp_path / "m.safetensors")
    assert meta == {"arch": "mlp"}
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())


def test_refuses_pickle_and_zip() -> None:
    with pytest.raises(ModelFormatError, match="pickle"):
        load_checkpoint_bytes(pickle.dumps({"w": np.ones(3)}, protocol=4))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"x")
    with pytest.raises(ModelFormatError, match="zip"):
        load_checkpoint_bytes(buf.getvalue())


@pytest.mark.parametrize(
    "data", [b"", b"1234567", b"\x10\0\0\0\0\0\0\0{not json}     ", b"\x02\0\0\0\0\0\0\0[]"]
)
def test_refuses_malformed(data: bytes) -> None:
    with pytest.raises(ModelFormatError):
        load_checkpoint_bytes(data)


def test_size_cap() -> None:
    with pytest.raises(TooLarge):
        load_checkpoint_bytes(b"\0" * 100, max_bytes=10)

"""check_checkpoint_header: the install-time safetensors check that reads no tensor.

Checked against the slow reference (safetensors' own parser, through load_checkpoint_bytes): a
header the check accepts must load, and a file the check refuses must not load (or break a rule
the parser does not know: duplicate keys, a dtype numpy cannot hold, expected names).
"""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diredi_secure.checkpoint import (
    check_checkpoint_header,
    checkpoint_bytes,
    load_checkpoint_bytes,
)
from diredi_secure.errors import ModelFormatError, TooLarge

_DTYPES = [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int64, np.bool_]


def _check(data: bytes, **kw):  # type: ignore[no-untyped-def]
    return check_checkpoint_header(io.BytesIO(data), len(data), **kw)


def _split(data: bytes) -> tuple[dict, bytes]:  # type: ignore[type-arg]
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: object, body: bytes) -> bytes:
    return _join_raw(json.dumps(header).encode(), body)


def _join_raw(raw: bytes, body: bytes) -> bytes:
    return len(raw).to_bytes(8, "little") + raw + body


tensors_st = st.dictionaries(
    st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=8),
    st.tuples(
        st.sampled_from(range(len(_DTYPES))),
        st.lists(st.integers(0, 4), max_size=3),
    ),
    max_size=4,
)


def _build(spec: dict[str, tuple[int, list[int]]]) -> bytes:
    arrays = {
        name: np.zeros(tuple(shape), dtype=_DTYPES[d]) + (1 if _DTYPES[d] is not np.bool_ else 0)
        for name, (d, shape) in spec.items()
    }
    return checkpoint_bytes(arrays, {"k": "v"})


@settings(max_examples=60, deadline=None)
@given(tensors_st)
def test_accepts_what_the_serialiser_writes(spec: dict[str, tuple[int, list[int]]]) -> None:
    data = _build(spec)
    header = _check(data)
    loaded, meta = load_checkpoint_bytes(data)
    assert set(header.tensors) == set(loaded) and header.metadata == meta == {"k": "v"}
    for name, (_dtype, shape) in header.tensors.items():
        assert tuple(loaded[name].shape) == shape
    _check(data, expected_names=set(spec))


_MUTATIONS = ["shape", "offset_end", "offset_start", "dtype", "extra_key", "truncate", "append"]


@settings(max_examples=80, deadline=None)
@given(tensors_st.filter(bool), st.sampled_from(_MUTATIONS), st.integers(0, 3))
def test_refuses_inconsistent_headers_the_parser_also_refuses(
    spec: dict[str, tuple[int, list[int]]], mutation: str, pick: int
) -> None:
    header, body = _split(_build(spec))
    names = sorted(k for k in header if k != "__metadata__")
    entry = header[names[pick % len(names)]]
    if mutation == "shape":
        entry["shape"] = [*entry["shape"], 2] if entry["shape"] else [2]
        if entry["data_offsets"][0] == entry["data_offsets"][1]:
            entry["shape"] = [1]  # a zero-size tensor grows to one element
    elif mutation == "offset_end":
        entry["data_offsets"][1] += 1
    elif mutation == "offset_start":
        entry["data_offsets"][0] += 1
    elif mutation == "dtype":
        entry["dtype"] = "F8_E4M3"
    elif mutation == "extra_key":
        entry["name"] = "x"
    data = _join(header, body)
    if mutation == "truncate":
        if not body:
            return  # nothing to cut
        data = data[:-1]
    elif mutation == "append":
        data += b"\0"
    with pytest.raises(ModelFormatError):
        _check(data)
    if mutation not in ("dtype", "extra_key"):
        with pytest.raises(ModelFormatError):
            load_checkpoint_bytes(data)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: pickle.dumps({"w": 1}, protocol=4), "pickle"),
        (lambda d: b"PK\x03\x04" + b"\0" * 60, "zip"),
        (lambda d: b"\x05\0\0\0\0\0\0\0", "out of bounds"),
        (lambda d: b"short", "shorter"),
        (lambda d: (1 << 40).to_bytes(8, "little") + b"{}", "out of bounds"),
        (lambda d: _join(["not", "an", "object"], b""), "bounds"),  # must start with "{"
        (lambda d: _join_raw(b"{1: 2}", b""), "not JSON"),
        (lambda d: _join({"__metadata__": {"a": 1}}, b""), "strings"),
        (lambda d: _join_raw(
            b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4), "twice"),
    ],
)  # fmt: skip
def test_named_refusals(make, match) -> None:  # type: ignore[no-untyped-def]
    good = checkpoint_bytes({"w": np.ones(3, np.float32)}, {})
    data = make(good)
    with pytest.raises(ModelFormatError, match=match):
        _check(data)


def test_expected_names_and_size_cap() -> None:
    data = checkpoint_bytes({"w": np.ones(3, np.float32)}, {})
    with pytest.raises(ModelFormatError, match="missing \\['b'\\], unexpected \\['w'\\]"):
        _check(data, expected_names={"b"})
    with pytest.raises(TooLarge):
        _check(data, max_bytes=len(data) - 1)


def test_reads_only_the_header() -> None:
    """The check reads 9 + header bytes however large the tensors are."""
    data = checkpoint_bytes({"w": np.ones(1 << 18, np.float32)}, {})

    class Counting(io.BytesIO):
        read_bytes = 0

        def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
            out = super().read(n)
            Counting.read_bytes += len(out)
            return out

    handle = Counting(data)
    header = check_checkpoint_header(handle, len(data))
    assert Counting.read_bytes == 9 + header.header_bytes
    assert Counting.read_bytes < 1024 < len(data)

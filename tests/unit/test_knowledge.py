from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from diredi_secure.errors import PayloadInvalid, TooLarge
from diredi_secure.knowledge import (
    KnowledgePayload,
    PayloadKind,
    PayloadTensor,
    decode_payload,
    dequantize_int8,
    encode_payload,
    quantize_int8,
)
from diredi_secure.policy import Limits

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=16), elements=finite)
)
@settings(max_examples=60, deadline=None)
def test_int8_quantisation_error_is_bounded(values: np.ndarray) -> None:
    q, scale = quantize_int8(values)
    assert q.dtype == np.int8 and np.all(np.abs(q.astype(int)) <= 127)
    # symmetric rounding: error at most half a step
    assert np.all(np.abs(dequantize_int8(q, scale) - values) <= scale / 2 + 1e-3 * scale + 1e-6)


@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12), elements=finite),
    st.sampled_from(["float32", "float16", "int8"]),
    st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_encode_decode_round_trip(values: np.ndarray, dtype: str, with_index: bool) -> None:
    index = np.arange(values.shape[0]) * 3 if with_index else None
    t = PayloadTensor("reference_logits", PayloadKind.REFERENCE_LOGITS, values, dtype, index=index)  # type: ignore[arg-type]
    data, desc = encode_payload(KnowledgePayload((t,)))
    decoded = decode_payload(data, desc).tensors[0]
    if dtype == "float32":
        assert np.array_equal(decoded.values, values)
    elif dtype == "float16":
        assert np.array_equal(decoded.values, values.astype(np.float16).astype(np.float32))
    else:
        q, scale = quantize_int8(values)
        assert np.array_equal(decoded.values, dequantize_int8(q, scale))
    assert (decoded.index is None) == (index is None)
    # encoding is deterministic (what the known-answer vectors rely on)
    assert encode_payload(KnowledgePayload((t,)))[0] == data


def test_construction_refuses_bad_values() -> None:
    with pytest.raises(PayloadInvalid, match="NaN"):
        PayloadTensor("x", PayloadKind.WEIGHT_DELTA, np.array([1.0, np.nan]))
    with pytest.raises(PayloadInvalid, match="float16"):
        PayloadTensor("x", PayloadKind.WEIGHT_DELTA, np.array([1e6]), "float16")
    with pytest.raises(PayloadInvalid, match="index"):
        PayloadTensor("x", PayloadKind.WEIGHT_DELTA, np.ones(3), index=np.array([0, 0, 1]))
    with pytest.raises(PayloadInvalid, match="takes no index"):
        PayloadTensor("x", PayloadKind.LABEL_HISTOGRAM, np.ones(3), index=np.array([0, 1, 2]))
    with pytest.raises(PayloadInvalid, match="duplicate"):
        t = PayloadTensor("x", PayloadKind.WEIGHT_DELTA, np.ones(3))
        KnowledgePayload((t, t))
    with pytest.raises(PayloadInvalid):
        KnowledgePayload(())


def test_decode_refuses_disagreement() -> None:
    t = PayloadTensor("w", PayloadKind.WEIGHT_DELTA, np.ones(8), "float32")
    data, desc = encode_payload(KnowledgePayload((t,)))
    with pytest.raises(PayloadInvalid, match="SHA-256"):
        decode_payload(data[:-1] + bytes([data[-1] ^ 1]), desc)
    with pytest.raises(PayloadInvalid, match="bytes"):
        decode_payload(data + b"\0", desc)
    with pytest.raises(TooLarge):
        decode_payload(data, desc, Limits(max_payload_bytes=16))
    with pytest.raises(PayloadInvalid, match="norm"):
        decode_payload(data, desc, max_l2_norm=1.0)


@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=9), elements=finite)
)
@settings(max_examples=60, deadline=None)
def test_int4_round_trip_error_is_bounded(values: np.ndarray) -> None:
    from diredi_secure.knowledge import dequantize_int4, quantize_int4

    packed, scale = quantize_int4(values)
    assert packed.dtype == np.uint8 and packed.size == (values.size + 1) // 2
    back = dequantize_int4(packed, scale, values.size).reshape(values.shape)
    assert np.all(np.abs(back - values) <= scale / 2 + 1e-3 * scale + 1e-6)
    t = PayloadTensor("w", PayloadKind.WEIGHT_DELTA, values, "int4")
    data, desc = encode_payload(KnowledgePayload((t,)))
    decoded = decode_payload(data, desc).tensors[0]
    assert decoded.values.shape == values.shape and np.array_equal(decoded.values, back)


def test_int4_packing_is_pinned() -> None:
    from diredi_secure.knowledge import quantize_int4

    packed, scale = quantize_int4(np.array([-7.0, 0.0, 7.0], np.float32))
    assert scale == 1.0
    # codes 1, 8, 15 (+ pad 8): low nibble first
    assert packed.tolist() == [1 | (8 << 4), 15 | (8 << 4)]


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda b: b[:-1], "packed bytes"),  # wrong length
        (lambda b: np.concatenate([[0x80], b[1:]]).astype(np.uint8), "code 0"),  # low nibble 0
        (
            lambda b: np.concatenate([b[:-1], [(b[-1] & 0x0F) | 0x30]]).astype(np.uint8),
            "pad nibble",
        ),
    ],
)
def test_int4_decode_refuses_bad_codes(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    from diredi_secure.checkpoint import checkpoint_bytes, load_checkpoint_bytes
    from diredi_secure.knowledge import PayloadDescriptor

    t = PayloadTensor("w", PayloadKind.WEIGHT_DELTA, np.array([1.0, -2.0, 3.0], np.float32), "int4")
    data, desc = encode_payload(KnowledgePayload((t,)))
    raw, meta = load_checkpoint_bytes(data)
    bad = checkpoint_bytes({"w": mutate(raw["w"]), "w.scale": raw["w.scale"]}, meta)
    desc2 = PayloadDescriptor(desc.entries, len(bad), hashlib.sha256(bad).digest())
    with pytest.raises(PayloadInvalid, match=reason):
        decode_payload(bad, desc2)


def test_quantisation_scale_is_not_in_the_plaintext_header() -> None:
    """Review finding: the int4 scale (max|delta| / 7) sat in the header and fell with N."""
    import hashlib

    from diredi_secure.checkpoint import checkpoint_bytes, load_checkpoint_bytes
    from diredi_secure.knowledge import HEADER_SCALE_PLACEHOLDER, PayloadDescriptor

    small = PayloadTensor("w", PayloadKind.WEIGHT_DELTA, np.array([0.001, -0.002], np.float32), "int4")
    large = PayloadTensor("w", PayloadKind.WEIGHT_DELTA, np.array([10.0, -20.0], np.float32), "int4")
    d1 = encode_payload(KnowledgePayload((small,)))[1]
    d2 = encode_payload(KnowledgePayload((large,)))[1]
    assert d1.entries == d2.entries and d1.entries[0].scale == HEADER_SCALE_PLACEHOLDER
    data, desc = encode_payload(KnowledgePayload((large,)))
    assert np.allclose(decode_payload(data, desc).tensors[0].values, [10.0, -20.0], atol=20 / 7)
    raw, meta = load_checkpoint_bytes(data)
    for bad_scale in (np.array([0.0]), np.array([np.nan]), np.array([1.0, 2.0]), np.array([1.0], np.float32)):
        bad = checkpoint_bytes({"w": raw["w"], "w.scale": bad_scale}, meta)
        desc2 = PayloadDescriptor(desc.entries, len(bad), hashlib.sha256(bad).digest())
        with pytest.raises(PayloadInvalid, match="scale"):
            decode_payload(bad, desc2)

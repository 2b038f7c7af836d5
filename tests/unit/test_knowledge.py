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

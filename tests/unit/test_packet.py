from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from diredi_secure import _crypto
from diredi_secure.errors import DirediError, HeaderMismatch, SignatureInvalid
from diredi_secure.knowledge import DPParameters, KnowledgePayload, PayloadKind, PayloadTensor
from diredi_secure.packet import inspect_packet, make_receipt, open_packet, verify_receipt

from ..conftest import DEFAULT_DP, NOW_MS, Pki, build_pki

finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=32)


@pytest.mark.parametrize("suite", list(_crypto.HpkeSuite))
def test_round_trip_each_suite(pki: Pki, suite: _crypto.HpkeSuite) -> None:
    sealed = pki.seal(suite=suite)
    opened = open_packet(sealed.data, **pki.open_kwargs())  # type: ignore[arg-type]
    assert opened.header == sealed.header
    assert opened.payload.tensors[0].values.shape == (64, 10)
    assert opened.device.device_id == "device-a"
    assert opened.epsilon == pytest.approx(DEFAULT_DP.total_epsilon, rel=1e-9)


def test_open_does_not_change_state(pki: Pki) -> None:
    data = pki.seal().data
    open_packet(data, **pki.open_kwargs())  # type: ignore[arg-type]
    open_packet(data, **pki.open_kwargs())  # type: ignore[arg-type]  # still fresh: open only checks
    assert not pki.replay.seen


def test_inspect_needs_no_key(pki: Pki) -> None:
    sealed = pki.seal()
    assert inspect_packet(sealed.data) == sealed.header


def test_receipt_round_trip_and_binding(pki: Pki) -> None:
    data = pki.seal().data
    opened = open_packet(data, **pki.open_kwargs())  # type: ignore[arg-type]
    receipt = make_receipt(pki.receipt_key, opened, stored_at_ms=NOW_MS)
    assert make_receipt(pki.receipt_key, opened, stored_at_ms=NOW_MS) == receipt  # deterministic
    body = verify_receipt(receipt, pki.receipt_key.public_key, data)
    assert body.packet_id == opened.header.packet_id and body.counter == 1
    with pytest.raises(HeaderMismatch):
        verify_receipt(receipt, pki.receipt_key.public_key, pki.seal(counter=2).data)
    with pytest.raises(SignatureInvalid):
        verify_receipt(receipt, pki.ca_key.public_key, data)


payload_strategy = st.lists(
    st.tuples(
        st.sampled_from(list(PayloadKind)),
        hnp.arrays(
            np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=8), elements=finite
        ),
        st.sampled_from(["float32", "float16", "int8", "int4"]),
    ),
    min_size=1,
    max_size=3,
)


@given(
    entries=payload_strategy,
    counter=st.integers(1, 2**63 - 1),
    model=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,20}", fullmatch=True),
    epsilon=st.floats(0.05, 4),
    suite=st.sampled_from(list(_crypto.HpkeSuite)),
)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_property_open_of_seal_is_identity(
    pki: Pki, entries, counter: int, model: str, epsilon: float, suite
) -> None:  # type: ignore[no-untyped-def]
    from diredi_secure import privacy

    noised = {PayloadKind.LABEL_HISTOGRAM, PayloadKind.DP_PROTOTYPES}
    sigma = privacy.noise_for_epsilon(epsilon, delta=1e-5, sample_rate=1.0, steps=1)
    tensors = tuple(
        PayloadTensor(f"e{i}", kind, values, dtype,
                      noise_multiplier=sigma if kind in noised else 0.0,
                      epsilon=privacy.gaussian_epsilon(sigma, 1e-5) if kind in noised else 0.0)
        for i, (kind, values, dtype) in enumerate(entries)
    )
    train = privacy.Mechanism(privacy.MechanismKind.DP_SGD, 1.0, 0.1, 10)
    mechs = [train, *(privacy.Mechanism(privacy.MechanismKind.LABEL_HISTOGRAM, sigma)
                      for t in tensors if t.kind in noised)]
    dp = DPParameters(
        noise_multiplier=1.0,
        clip_norm=1.0,
        sample_rate=0.1,
        steps=10,
        accountant="rdp",
        epsilon=privacy.mechanisms_epsilon([train], 1e-5),
        delta=1e-5,
        total_epsilon=privacy.mechanisms_epsilon(mechs, 1e-5),
    )
    sealed = pki.seal(
        payload=KnowledgePayload(tensors),
        counter=counter,
        base_model_version=model,
        dp=dp,
        suite=suite,
    )
    opened = open_packet(sealed.data, **pki.open_kwargs())  # type: ignore[arg-type]
    assert opened.header == sealed.header
    for sent, got in zip(tensors, opened.payload.tensors, strict=True):
        if sent.dtype == "float32":
            assert np.array_equal(got.values, sent.values)
        elif sent.dtype == "float16":
            assert np.array_equal(got.values, sent.values.astype(np.float16).astype(np.float32))
        elif sent.dtype == "int4":
            assert np.allclose(got.values, sent.values, atol=float(np.abs(sent.values).max(initial=0)) / 7 + 1e-6)
        else:
            assert np.allclose(
                got.values, sent.values, atol=float(np.abs(sent.values).max(initial=0)) / 127 + 1e-6
            )


_PKI = build_pki()
_PACKET = _PKI.seal().data


@given(pos=st.integers(0, len(_PACKET) - 1), delta=st.integers(1, 255))
@settings(max_examples=300, deadline=None)
def test_property_every_single_byte_mutation_is_refused(pos: int, delta: int) -> None:
    mutated = bytearray(_PACKET)
    mutated[pos] = (mutated[pos] + delta) % 256
    before = (set(_PKI.replay.seen), dict(_PKI.replay.counters))
    with pytest.raises(DirediError):
        open_packet(bytes(mutated), **_PKI.open_kwargs())  # type: ignore[arg-type]
    assert (_PKI.replay.seen, _PKI.replay.counters) == before


def test_dp_parameters_validation() -> None:
    with pytest.raises(DirediError):
        DPParameters(
            noise_multiplier=-1,
            clip_norm=1,
            sample_rate=0.1,
            steps=1,
            accountant="prv",
            epsilon=1,
            delta=1e-5,
        )
    with pytest.raises(DirediError):
        DPParameters(
            noise_multiplier=1,
            clip_norm=1,
            sample_rate=1.5,
            steps=1,
            accountant="prv",
            epsilon=1,
            delta=1e-5,
        )
    assert DEFAULT_DP.composed_epsilon == pytest.approx(8.0, rel=1e-5)

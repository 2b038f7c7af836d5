"""Issue 13: what a curious cloud, another device or the network learns from the shipped device path.

Each test names the attack. The old path seeded every private draw from ``seed`` (default 0) and
derived delta, q and steps from N; these tests fail there."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from diredi_secure import privacy
from diredi_secure.knowledge import KnowledgePayload, PayloadKind, PayloadTensor
from diredi_secure.ml.data import NUM_CLASSES, Dataset
from diredi_secure.ml.models import build_model, student_spec
from diredi_secure.ml.reverse import RDConfig, reverse_distill
from diredi_secure.packet import open_packet

from ..conftest import Pki, honest_dp

KINDS = (PayloadKind.REFERENCE_LOGITS, PayloadKind.WEIGHT_DELTA, PayloadKind.DP_PROTOTYPES)
FAST = RDConfig(epsilon=8.0, epochs=1, kinds=KINDS)


def _data(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n)
    x = (rng.random((n, 1, 8, 8)) * 0.3).astype(np.float32)
    return Dataset(x, y)


REF = np.random.default_rng(9).random((16, 1, 8, 8)).astype(np.float32)


def _hist(res) -> np.ndarray:  # type: ignore[no-untyped-def]
    h = res.payload.get(PayloadKind.LABEL_HISTOGRAM)
    assert h is not None
    return np.asarray(h.values, dtype=np.float64)


def test_predictable_seed_recovery_of_the_histogram_fails() -> None:
    """Knowing the old default seed (0) gave the exact counts back (max error 1e-6)."""
    data = _data(120, 1)
    truth = np.bincount(data.y, minlength=NUM_CLASSES)
    res = reverse_distill(build_model(student_spec(), seed=0), data, REF, FAST)
    released = _hist(res)
    sigma = res.payload.get(PayloadKind.LABEL_HISTOGRAM).noise_multiplier  # type: ignore[union-attr]
    best = np.inf
    for guess in range(64):  # the attacker replays the noise of every small seed
        noise = privacy.NoiseSource.seeded(guess).discrete_gaussian(np.zeros(NUM_CLASSES), sigma)
        best = min(best, float(np.abs(released - noise - truth).max()))
    assert best >= 1.0, "some seed reproduces the device's histogram noise"


def test_two_devices_histogram_noise_does_not_cancel() -> None:
    """Same N, different data: their histograms' difference used to be their true difference."""
    a, b = _data(120, 2), _data(120, 3)
    ra = reverse_distill(build_model(student_spec(), seed=0), a, REF, FAST)
    rb = reverse_distill(build_model(student_spec(), seed=0), b, REF, FAST)
    true_diff = np.bincount(a.y, minlength=10) - np.bincount(b.y, minlength=10)
    assert np.abs((_hist(ra) - _hist(rb)) - true_diff).max() >= 1.0


def test_rerun_on_the_same_data_gives_fresh_noise() -> None:
    data = _data(60, 4)
    r1 = reverse_distill(build_model(student_spec(), seed=0), data, REF, FAST)
    r2 = reverse_distill(build_model(student_spec(), seed=0), data, REF, FAST)
    assert not np.array_equal(_hist(r1), _hist(r2))
    w1 = r1.payload.get(PayloadKind.WEIGHT_DELTA).values  # type: ignore[union-attr]
    w2 = r2.payload.get(PayloadKind.WEIGHT_DELTA).values  # type: ignore[union-attr]
    assert not np.array_equal(w1, w2)
    assert not r1.dp.noise_seeded


def test_research_seed_is_deterministic_and_declared() -> None:
    data = _data(60, 5)
    cfg = replace(FAST, research_seed=7)
    r1 = reverse_distill(build_model(student_spec(), seed=0), data, REF, cfg)
    r2 = reverse_distill(build_model(student_spec(), seed=0), data, REF, cfg)
    assert np.array_equal(_hist(r1), _hist(r2)) and r1.dp.noise_seeded


def test_headers_of_different_n_are_identical(pki: Pki) -> None:
    """The DP fields on the wire (and every entry's noise) are the same for N = 60, 118, 400."""
    headers = []
    for counter, n in enumerate((60, 118, 400), start=1):
        res = reverse_distill(build_model(student_spec(), seed=0), _data(n, n), REF, FAST)
        sealed = pki.seal(payload=res.payload, dp=res.dp, counter=counter)
        h = sealed.header
        entries = [(e.name, e.kind, e.dtype, e.shape, e.scale, e.index_length, e.noise_multiplier,
                    e.epsilon) for e in h.payload.entries]
        headers.append((h.dp, entries))
        # and the cloud accepts it as accounted
        opened = open_packet(sealed.data, **pki.open_kwargs())  # type: ignore[arg-type]
        assert opened.epsilon == pytest.approx(8.0, rel=1e-5)
        pki.replay.record(h.device_id, h.packet_id, h.counter)
    assert headers[0] == headers[1] == headers[2]
    assert headers[0][0].delta == privacy.DEFAULT_DP_POLICY.delta


@pytest.mark.parametrize("kind, shape", [(PayloadKind.LABEL_HISTOGRAM, (10,)),
                                          (PayloadKind.DP_PROTOTYPES, (10, 64))])
def test_noise_free_side_channel_is_refused_at_ingest(pki: Pki, kind: PayloadKind,
                                                      shape: tuple[int, ...]) -> None:
    """Exact private statistics declared with noise 0 were charged only the DP-SGD epsilon."""
    exact = PayloadTensor(kind.value, kind, np.ones(shape, np.float32), "float32")
    logits = PayloadTensor("reference_logits", PayloadKind.REFERENCE_LOGITS,
                           np.zeros((4, 10), np.float32), "float16")
    sealed = pki.seal(payload=KnowledgePayload((logits, exact)), dp=honest_dp())
    with pytest.raises(privacy.UnaccountedRelease) as info:
        open_packet(sealed.data, **pki.open_kwargs())  # type: ignore[arg-type]
    assert info.value.reason == "unaccounted_release"
    assert not pki.replay.seen


def test_seeded_packet_is_refused_at_ingest(pki: Pki) -> None:
    sealed = pki.seal(dp=replace(honest_dp(), noise_seeded=True))
    with pytest.raises(privacy.NoiseSeeded):
        open_packet(sealed.data, **pki.open_kwargs())  # type: ignore[arg-type]


def test_policy_is_checked_before_decryption(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    import diredi_secure.packet as packet_mod

    def boom(*a: object, **k: object) -> bytes:
        raise AssertionError("decrypted a packet the header already condemns")

    monkeypatch.setattr(packet_mod, "hpke_open", boom)
    with pytest.raises(privacy.NoiseSeeded):
        open_packet(pki.seal(dp=replace(honest_dp(), noise_seeded=True)).data,
                    **pki.open_kwargs())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field, value",
    [("noise_multiplier", 0.01), ("noise_multiplier", 1e-300), ("noise_multiplier", 1e300),
     ("steps", 2**64 - 1), ("sample_rate", 1e-300)],
    ids=["noise_0.01", "noise_1e-300", "noise_1e300", "steps_2^64-1", "rate_1e-300"],
)
def test_declared_dp_parameters_cannot_exhaust_the_accountant(pki: Pki, field: str,
                                                              value: float) -> None:
    """Issue 14 finding 1: these drove the PRV accountant to 7 GB, division by zero, overflow."""
    import time

    sealed = pki.seal(dp=replace(honest_dp(), **{field: value}))
    t0 = time.perf_counter()
    with pytest.raises(privacy.ParameterOutOfBounds) as info:
        open_packet(sealed.data, **pki.open_kwargs())  # type: ignore[arg-type]
    assert time.perf_counter() - t0 < 1.0 and field.split("_")[0] in str(info.value)
    assert not pki.replay.seen


def test_private_keys_are_never_readable_by_others_while_written(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Issue 14 finding 3: the temporary file had the default mode and a predictable name."""
    import os
    import stat

    from diredi_secure import _crypto
    from diredi_secure import checkpoint as ck
    from diredi_secure.errors import KeyFileError

    seen: list[int] = []
    real_replace = os.replace

    def spy(src, dst):  # type: ignore[no-untyped-def]
        seen.append(stat.S_IMODE(os.stat(src).st_mode))  # the temporary file, before the rename
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", spy)
    path = tmp_path / "keys" / "device.key"
    _crypto.save_signing_key(_crypto.generate_signing_key(), path)
    assert seen == [0o600] and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # A planted link at a predictable temporary name is not followed: the name is random now.
    assert not list(path.parent.glob(".device.key.tmp-*"))
    # A key file others can read is refused on load, with a reason.
    path.chmod(0o644)
    with pytest.raises(KeyFileError) as info:
        _crypto.load_signing_key(path)
    assert info.value.reason == "key_file_permissions"


@pytest.mark.parametrize("device_id", ["device-a\n", "device-a\r", "dev\n-a"])
def test_validators_refuse_a_trailing_newline(device_id: str) -> None:
    """Issue 14 finding 6: `^...$` with `match` accepted "dev-a\\n"."""
    from diredi_secure import _crypto
    from diredi_secure.envelope import PacketHeader
    from diredi_secure.errors import ConfigError

    with pytest.raises(ConfigError):
        _crypto.validate_device_id(device_id)
    assert PacketHeader  # the header validator uses the same fullmatch rule (envelope.py)


def test_entry_shape_with_a_huge_dimension_is_a_typed_error() -> None:
    """Issue 14 finding 4: an int4 entry of shape [2^63, 0] raised a bare ValueError."""
    from diredi_secure.errors import PayloadInvalid
    from diredi_secure.knowledge import PayloadDescriptor, PayloadEntry, check_descriptor

    desc = PayloadDescriptor((PayloadEntry("weight_delta", PayloadKind.WEIGHT_DELTA, "int4",
                                           (2**63, 0), scale=1.0),), 16, bytes(32))
    with pytest.raises(PayloadInvalid):
        check_descriptor(desc)


def test_counter_above_int64_is_malformed(pki: Pki) -> None:
    from diredi_secure.errors import DirediError

    with pytest.raises(DirediError) as info:
        pki.seal(counter=2**63)
    assert "2^63-1" in str(info.value)


def test_npz_bomb_and_out_of_range_pixels_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 14 finding 6: the npz loader capped only the compressed size; values 0..16 passed."""
    import zipfile

    from diredi_secure.errors import DatasetError
    from diredi_secure.ml.data import load_npz_dataset

    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", b"\0" * (300 * 1024 * 1024))  # compresses to well under a MiB
    assert bomb.stat().st_size < 2 * 1024 * 1024
    with pytest.raises(DatasetError, match="inflates"):
        load_npz_dataset(bomb)
    raw = tmp_path / "raw.npz"
    np.savez(raw, x=np.full((4, 64), 16.0, np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(DatasetError, match=r"\[0, 1\]"):
        load_npz_dataset(raw)


def test_deeply_nested_attestation_is_a_typed_error() -> None:
    """Issue 14 finding 6: attestation JSON nested deeply raised RecursionError."""
    from diredi_secure.errors import AttestationInvalid
    from diredi_secure.release.attest import verify_attestation

    nested = b"[" * 100_000 + b"]" * 100_000  # parsed before any key is used
    with pytest.raises(AttestationInvalid):
        verify_attestation(nested, [object()], "0" * 64)  # type: ignore[list-item]

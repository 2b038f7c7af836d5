"""Fuzz targets (issue 14): each takes untrusted bytes and may raise only a ``DirediError``.

* ``open_packet``: raw bytes through the whole ingest core (envelope, header, signature, policy,
  privacy accounting, HPKE, payload decode), against an enrolled device directory.
* ``signed_header``: an enrolled *malicious* device: the bytes become a header the device
  signs and seals validly, so the checks behind the signature are reached.
* ``decode_payload``: bytes as the decrypted payload against a fixed descriptor.
* ``account_packet``: bytes turned into a DP declaration for the privacy accountant.

``python -m tests.fuzz.run TARGET`` drives one with atheris (``make fuzz``); the default suite
replays the regression corpus and a fixed set of mutations (``test_fuzz_smoke.py``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import struct
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace

from diredi_secure import privacy
from diredi_secure.errors import DirediError
from diredi_secure.knowledge import decode_payload, encode_payload
from diredi_secure.packet import open_packet

from ..conftest import Pki, build_pki, honest_dp, make_payload


@functools.lru_cache(maxsize=1)
def _pki() -> Pki:
    return build_pki()


@functools.lru_cache(maxsize=1)
def valid_packet() -> bytes:
    return _pki().seal(dp=honest_dp()).data


def target_open_packet(data: bytes) -> None:
    pki = _pki()
    with contextlib.suppress(DirediError):
        open_packet(data, **pki.open_kwargs())  # type: ignore[arg-type]


def target_signed_header(data: bytes) -> None:
    from diredi_secure._proto.diredi.v1 import packet_pb2 as pb
    from diredi_secure.serde import envelope_from_bytes

    from ..security.test_packet_attacks import reseal_with_header

    pki = _pki()

    def mutate(h: pb.PacketHeader) -> None:
        try:
            h.MergeFromString(data)
        except Exception:
            return

    try:
        packet = reseal_with_header(pki, mutate)
    except (DirediError, ValueError, OverflowError):
        return  # a header even a malicious device cannot seal (unknown suite...): not an input
    with contextlib.suppress(DirediError):
        envelope_from_bytes(packet)
        open_packet(packet, **pki.open_kwargs())  # type: ignore[arg-type]


@functools.lru_cache(maxsize=1)
def _descriptor():  # type: ignore[no-untyped-def]
    return encode_payload(make_payload())[1]


def target_decode_payload(data: bytes) -> None:
    desc = _descriptor()
    desc = replace(desc, length=len(data))
    import hashlib

    desc = replace(desc, sha256=hashlib.sha256(data).digest())
    with contextlib.suppress(DirediError):
        decode_payload(data, desc)


def target_account_packet(data: bytes) -> None:
    data = (data + b"\0" * 64)[:64]
    sigma, q, steps_f, delta, eps, tot, hist_sigma, hist_eps = struct.unpack("<8d", data)
    steps = int(steps_f) if math.isfinite(steps_f) and abs(steps_f) < 2**64 else 1
    dp = SimpleNamespace(**{**honest_dp().__dict__, "noise_multiplier": sigma, "sample_rate": q,
                            "steps": steps, "delta": delta, "epsilon": eps, "total_epsilon": tot})
    entry = SimpleNamespace(name="label_histogram", kind="label_histogram",
                            noise_multiplier=hist_sigma, epsilon=hist_eps)
    with contextlib.suppress(DirediError):
        privacy.account_packet(dp, [entry])


TARGETS: dict[str, Callable[[bytes], None]] = {
    "open_packet": target_open_packet,
    "signed_header": target_signed_header,
    "decode_payload": target_decode_payload,
    "account_packet": target_account_packet,
}

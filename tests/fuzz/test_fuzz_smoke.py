"""The fuzz smoke run of ``make test`` (seconds): every target over its regression corpus, plus a
fixed set of mutations of a valid input. A crash is any exception other than ``DirediError``."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from .harnesses import TARGETS, valid_packet

CORPUS = Path(__file__).parent / "corpus"


def _mutations(seed: bytes, n: int, rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(n):
        b = bytearray(seed)
        for _ in range(rng.randint(1, 8)):
            op = rng.randrange(4)
            if op == 0 and b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif op == 1 and b:
                del b[rng.randrange(len(b)):][: rng.randint(1, 64)]
            elif op == 2:
                i = rng.randrange(len(b) + 1)
                b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            elif b:
                i = rng.randrange(len(b))
                b[i : i + 8] = rng.choice([b"\xff" * 8, b"\0" * 8, b"\x7f\xf0" + b"\0" * 6])
        out.append(bytes(b))
    return out


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_raises_only_typed_errors(name: str) -> None:
    target = TARGETS[name]
    rng = random.Random(f"fuzz-{name}")  # fixed: the smoke run is reproducible
    inputs = [p.read_bytes() for p in sorted((CORPUS / name).glob("*"))]
    seed = valid_packet() if name == "open_packet" else bytes(rng.randrange(256) for _ in range(96))
    inputs += _mutations(seed, 2000, rng)
    for data in inputs:
        target(data)  # raises (and fails the test) on anything but a DirediError

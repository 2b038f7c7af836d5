"""Shared fixtures: a fixed clock, deterministic keys, a device CA with enrolled devices, an inbox."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from diredi_secure import _crypto
from diredi_secure.envelope import ENVELOPE_VERSION
from diredi_secure.knowledge import DPParameters, KnowledgePayload, PayloadKind, PayloadTensor
from diredi_secure.packet import MemoryDeviceDirectory, MemoryReplayState, SealedPacket, seal_packet
from diredi_secure.privacy import ACCOUNTANT, epsilon_from_curve, gaussian_curve, schedule_for

NOW_MS = 1_790_000_000_000  # 2026-09-21, fixed: the core never reads the clock itself


# The suite never writes the user's noise-search cache (~/.cache/diredi); subprocesses inherit it.
os.environ.setdefault("DIREDI_NOISE_CACHE", "off")


def seeded(label: str, n: int = 32) -> bytes:
    """Deterministic bytes for keys in tests (never for production)."""
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}/{counter}".encode()).digest()
        counter += 1
    return out[:n]


class CountingRandom:
    """A deterministic ``random_bytes`` for packet ids."""

    def __init__(self, label: str = "rng") -> None:
        self.label = label
        self.calls = 0

    def __call__(self, n: int) -> bytes:
        self.calls += 1
        return seeded(f"{self.label}/{self.calls}", n)


def honest_dp(total_epsilon: float = 8.0, *, histogram: bool = False,
              prototypes: bool = False) -> DPParameters:
    """The header DP block an honest device declares under the default policy (the schedule)."""
    sched = schedule_for(total_epsilon, histogram=histogram, prototypes=prototypes)
    training = epsilon_from_curve(
        gaussian_curve(sched.noise_multiplier, sched.sample_rate, sched.steps), sched.delta)[0]
    return DPParameters(
        noise_multiplier=sched.noise_multiplier, clip_norm=sched.clip_norm,
        sample_rate=sched.sample_rate, steps=sched.steps, accountant=ACCOUNTANT,
        epsilon=training, delta=sched.delta, poisson_sampling=True,
        total_epsilon=sched.total_epsilon,
    )


DEFAULT_DP = honest_dp()


def make_payload(seed: int = 0, n_ref: int = 64, classes: int = 10) -> KnowledgePayload:
    rng = np.random.default_rng(seed)
    return KnowledgePayload(
        (
            PayloadTensor(
                "reference_logits",
                PayloadKind.REFERENCE_LOGITS,
                rng.normal(size=(n_ref, classes)),
                "float16",
            ),
        )
    )


@dataclass
class Pki:
    """A device CA, an inbox, a receipt key and enrolled devices, all from fixed seeds."""

    ca_key: _crypto.SigningKey
    ca_cert: bytes
    inbox: _crypto.InboxKey
    receipt_key: _crypto.SigningKey
    devices: MemoryDeviceDirectory = field(default_factory=MemoryDeviceDirectory)
    replay: MemoryReplayState = field(default_factory=MemoryReplayState)
    device_keys: dict[str, tuple[_crypto.SigningKey, bytes]] = field(default_factory=dict)
    rng: CountingRandom = field(default_factory=CountingRandom)

    def add_device(
        self, device_id: str, *, enroll: bool = True, serial: int | None = None
    ) -> tuple[_crypto.SigningKey, bytes]:
        key = _crypto.SigningKey.from_seed(seeded(f"device/{device_id}"))
        cert = _crypto.issue_device_certificate(
            self.ca_key,
            self.ca_cert,
            device_id=device_id,
            device_public_key=key.public_key,
            serial=serial or (100 + len(self.device_keys)),
            now_ms=NOW_MS - 86_400_000,
        )
        self.device_keys[device_id] = (key, cert)
        if enroll:
            self.devices.enroll(device_id, cert)
        return key, cert

    def seal(
        self,
        device_id: str = "device-a",
        counter: int = 1,
        *,
        payload: KnowledgePayload | None = None,
        now_ms: int = NOW_MS,
        dp: DPParameters = DEFAULT_DP,
        suite: _crypto.HpkeSuite = _crypto.HpkeSuite.X25519_SHA256_AES128GCM,
        inbox: _crypto.InboxPublicKey | None = None,
        base_model_version: str = "v1",
        random_bytes: Callable[[int], bytes] | None = None,
        wire_version: int = ENVELOPE_VERSION,
    ) -> SealedPacket:
        key, cert = self.device_keys[device_id]
        return seal_packet(
            payload or make_payload(),
            device_key=key,
            device_id=device_id,
            counter=counter,
            base_model_version=base_model_version,
            dp=dp,
            inbox=inbox or self.inbox.public_key,
            now_ms=now_ms,
            random_bytes=random_bytes or self.rng,
            suite=suite,
            device_certificate=cert,
            wire_version=wire_version,
        )

    def open_kwargs(self, now_ms: int = NOW_MS) -> dict[str, object]:
        return {
            "inbox_key": self.inbox,
            "device_ca": self.ca_cert,
            "devices": self.devices,
            "replay": self.replay,
            "now_ms": now_ms,
        }


def build_pki() -> Pki:
    ca_key = _crypto.SigningKey.from_seed(seeded("device-ca"))
    ca_cert = _crypto.create_ca_certificate(
        ca_key, common_name="test device CA", now_ms=NOW_MS - 86_400_000, valid_days=3650, serial=1
    )
    inbox = _crypto.InboxKey.from_seeds(seeded("inbox/x25519"), seeded("inbox/mlkem", 64))
    pki = Pki(ca_key, ca_cert, inbox, _crypto.SigningKey.from_seed(seeded("receipt")))
    pki.add_device("device-a")
    pki.add_device("device-b")
    return pki


@pytest.fixture(scope="session")
def _pki_template() -> Pki:
    return build_pki()


@pytest.fixture
def pki(_pki_template: Pki) -> Pki:
    """A fresh copy per test (fresh replay state and directory; keys reused: they are immutable)."""
    t = _pki_template
    fresh = Pki(t.ca_key, t.ca_cert, t.inbox, t.receipt_key, device_keys=dict(t.device_keys))
    for device_id, (_, cert) in t.device_keys.items():
        fresh.devices.enroll(device_id, cert)
    return fresh

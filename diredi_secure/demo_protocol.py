"""The protocol demo: one device seals a packet, the cloud opens it, and three bad packets are refused.

Everything runs in memory with real keys, real HPKE and real signatures; the refusals are the
library's own typed errors, printed with their reasons.
"""

from __future__ import annotations

import os
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from . import _crypto
from .errors import DirediError
from .knowledge import DPParameters, KnowledgePayload, PayloadKind, PayloadTensor
from .packet import MemoryDeviceDirectory, MemoryReplayState, open_packet, seal_packet
from .privacy import ACCOUNTANT, schedule_for

__all__ = ["run_protocol_demo"]


def run_protocol_demo(console: Console) -> None:
    now = int(time.time() * 1000)
    ca_key = _crypto.generate_signing_key()
    ca = _crypto.create_ca_certificate(
        ca_key, common_name="demo device CA", now_ms=now, valid_days=1, serial=1
    )
    inbox = _crypto.generate_inbox_key()
    devices = MemoryDeviceDirectory()
    keys: dict[str, tuple[_crypto.SigningKey, bytes]] = {}
    for serial, device_id in enumerate(("device-a", "device-b"), start=2):
        key = _crypto.generate_signing_key()
        cert = _crypto.issue_device_certificate(
            ca_key,
            ca,
            device_id=device_id,
            device_public_key=key.public_key,
            serial=serial,
            now_ms=now,
        )
        devices.enroll(device_id, cert)
        keys[device_id] = (key, cert)
    replay = MemoryReplayState()
    rng = np.random.default_rng(0)
    sched = schedule_for(8.0, histogram=False, prototypes=False)  # DP-SGD only: logits
    dp = DPParameters(
        noise_multiplier=sched.noise_multiplier,
        clip_norm=sched.clip_norm,
        sample_rate=sched.sample_rate,
        steps=sched.steps,
        accountant=ACCOUNTANT,
        epsilon=sched.training_epsilon,
        delta=sched.delta,
        total_epsilon=sched.total_epsilon,
    )
    payload = KnowledgePayload(
        (
            PayloadTensor(
                "reference_logits",
                PayloadKind.REFERENCE_LOGITS,
                rng.normal(size=(300, 10)),
                "float16",
            ),
        )
    )

    def seal(device_id: str, counter: int) -> bytes:
        key, cert = keys[device_id]
        return seal_packet(
            payload,
            device_key=key,
            device_id=device_id,
            counter=counter,
            base_model_version="v1",
            dp=dp,
            inbox=inbox.public_key,
            now_ms=now,
            random_bytes=os.urandom,
            device_certificate=cert,
        ).data

    def cloud_open(data: bytes) -> str:
        try:
            opened = open_packet(
                data, inbox_key=inbox, device_ca=ca, devices=devices, replay=replay, now_ms=now
            )
        except DirediError as exc:
            return f"[red]refused[/red] {exc.one_line()}"
        replay.record(opened.header.device_id, opened.header.packet_id, opened.header.counter)
        shape = opened.payload.tensors[0].values.shape
        return f"[green]accepted[/green] counter={opened.header.counter} payload={shape} epsilon {opened.epsilon:.2f} at delta {opened.header.dp.delta:.0e}"

    good = seal("device-a", 1)
    tampered = bytearray(seal("device-a", 2))
    tampered[len(tampered) // 2] ^= 0x01  # inside the ciphertext
    rows = [
        ("device-a seals a packet; the cloud opens it", cloud_open(good)),
        ("a copy with one bit flipped", cloud_open(bytes(tampered))),
        ("the first packet again (replay)", cloud_open(good)),
    ]
    revoked = seal("device-b", 1)
    devices.revoke("device-b")
    rows.append(("device-b after its revocation", cloud_open(revoked)))
    table = Table(
        title=f"DiReDi packet protocol ({len(good):,} packet bytes each, HPKE X25519/AES-128-GCM, Ed25519)"
    )
    table.add_column("what happens")
    table.add_column("cloud's verdict")
    for what, verdict in rows:
        table.add_row(what, verdict)
    console.print(table)
    refused = sum("refused" in v for _, v in rows)
    console.print(
        f"demo-protocol: ok accepted={len(rows) - refused} refused={refused}", markup=False
    )

"""Seal, open and acknowledge one knowledge packet with the library alone, from the key files the
CLI writes. CI runs this file (tests/integration/test_examples.py); README.md shows it.

    diredi keys device-ca --out keys/ca
    diredi keys device --id dev-1 --ca keys/ca --out keys/dev-1
    diredi keys inbox --out keys/inbox
    python examples/library_quickstart.py keys dev-1

Everything comes from the public package `diredi_secure` (no private module): the key and
certificate files are loaded with its load_* functions, the receipt key is made and saved here.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import diredi_secure as dr
from diredi_secure import privacy


def main(keys: Path, device_id: str) -> None:
    # Device side: its signing key and certificate, and the cloud's inbox public key.
    device_key = dr.load_signing_key(keys / device_id / "device.key")
    device_cert = dr.load_certificate(keys / device_id / "device.crt")  # DER
    inbox_public = dr.load_inbox_public_key(keys / "inbox" / "inbox.pub")

    # What DP-SGD spent, from the privacy package (never typed in), with its delta beside it.
    delta = 1e-5
    training = privacy.Mechanism(privacy.MechanismKind.DP_SGD, 1.1, 0.05, 200)
    epsilon = privacy.mechanisms_epsilon([training], delta)
    dp = dr.DPParameters(noise_multiplier=1.1, clip_norm=1.0, sample_rate=0.05, steps=200,
                         accountant="rdp", epsilon=epsilon, delta=delta, total_epsilon=epsilon)
    logits = np.random.default_rng(0).normal(size=(8, 10)).astype(np.float32)
    payload = dr.KnowledgePayload((dr.PayloadTensor("logits", dr.PayloadKind.REFERENCE_LOGITS,
                                                    logits),))
    now_ms = int(time.time() * 1000)
    sealed = dr.seal_packet(payload, device_key=device_key, device_id=device_id, counter=1,
                            base_model_version="v1", dp=dp, inbox=inbox_public, now_ms=now_ms,
                            random_bytes=os.urandom, device_certificate=device_cert)
    print(f"sealed packet {sealed.packet_id.hex()}: {len(sealed.data)} packet bytes, "
          f"epsilon {epsilon:.3f} at delta {delta:g}")

    # Cloud side: the inbox private key and the device CA certificate; in-memory device
    # directory and replay state (a store implements the same two interfaces).
    inbox_key = dr.load_inbox_key(keys / "inbox" / "inbox.key")
    device_ca = dr.load_certificate(keys / "ca" / "ca.crt")
    devices, replay = dr.MemoryDeviceDirectory(), dr.MemoryReplayState()
    devices.enroll(device_id, device_cert)
    # Raises a typed DirediError naming what failed, and changes nothing, for any bad packet.
    opened = dr.open_packet(sealed.data, inbox_key=inbox_key, device_ca=device_ca, devices=devices,
                            replay=replay, now_ms=now_ms)
    replay.record(device_id, opened.header.packet_id, opened.header.counter)
    print(f"opened: device {opened.device.device_id}, counter {opened.header.counter}, "
          f"epsilon {opened.epsilon:.3f} at delta {opened.charge.delta:g} (recomputed by the cloud)")

    # The receipt: signed by the cloud's receipt key, checked by the device with the public key.
    with tempfile.TemporaryDirectory() as tmp:
        receipt_key = dr.generate_signing_key()
        dr.save_signing_key(receipt_key, Path(tmp) / "receipt.key")  # 0600, as the CLI writes it
        dr.save_verify_key(receipt_key.public_key, Path(tmp) / "receipt.pub")
        receipt = dr.make_receipt(dr.load_signing_key(Path(tmp) / "receipt.key"), opened,
                                  stored_at_ms=now_ms)
        body = dr.verify_receipt(receipt, dr.load_verify_key(Path(tmp) / "receipt.pub"),
                                 sealed.data)
    print(f"receipt verified: packet {body.packet_id.hex()} acknowledged, "
          f"digest {body.packet_sha256.hex()[:16]}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: library_quickstart.py KEYS_FOLDER DEVICE_ID (see the docstring)")
    try:
        main(Path(sys.argv[1]), sys.argv[2])
    except dr.errors.DirediError as exc:
        sys.exit(f"error: {exc}")

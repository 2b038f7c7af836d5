"""Seal and open throughput of knowledge packets, against raw HPKE on the same bytes.

    python -m diredi_secure.benchmarks.packet_throughput [--seconds S] [--quick]

For 1 KiB and 1 MiB float32 payloads and each HPKE suite it measures packets/s for
``seal_packet`` and ``open_packet`` (full verification: certificate, signature, policy, replay
check, HPKE, safetensors decode and validation), and the same for a bare HPKE seal/open of the
payload bytes measured in the same run. The ratio (protocol / raw HPKE) is the figure to compare
across machines; absolute rates depend on the (shared, noisy) CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from diredi_secure.benchmarks._dp import training_only_dp
from rich.console import Console
from rich.table import Table

from diredi_secure import _crypto
from diredi_secure.knowledge import (
    KnowledgePayload,
    PayloadKind,
    PayloadTensor,
    encode_payload,
)
from diredi_secure.packet import MemoryDeviceDirectory, MemoryReplayState, open_packet, seal_packet

NOW = 1_790_000_000_000


def _rate(fn: Callable[[], object], seconds: float) -> float:
    fn()  # warm up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 3:
        fn()
        n += 1
    return n / elapsed


def run(seconds: float, sizes: list[int]) -> list[dict[str, object]]:
    ca_key = _crypto.generate_signing_key()
    ca = _crypto.create_ca_certificate(ca_key, common_name="bench", now_ms=NOW, valid_days=10, serial=1)
    dev = _crypto.generate_signing_key()
    cert = _crypto.issue_device_certificate(
        ca_key, ca, device_id="bench", device_public_key=dev.public_key, serial=2, now_ms=NOW
    )
    inbox = _crypto.generate_inbox_key()
    devices = MemoryDeviceDirectory()
    devices.enroll("bench", cert)
    dp = training_only_dp(1.0)
    rows: list[dict[str, object]] = []
    for size in sizes:
        values = np.random.default_rng(0).normal(size=size // 4).astype(np.float32)
        payload = KnowledgePayload((PayloadTensor("weight_delta", PayloadKind.WEIGHT_DELTA, values, "float32"),))
        plaintext, _ = encode_payload(payload)
        for suite in _crypto.HpkeSuite:
            counter = iter(range(1, 10**9))
            seal = partial(
                seal_packet, payload, device_key=dev, device_id="bench", base_model_version="v1",
                dp=dp, inbox=inbox.public_key, now_ms=NOW, random_bytes=os.urandom, suite=suite,
                device_certificate=cert,
            )
            packet = seal(counter=next(counter)).data
            open_ = partial(
                open_packet, packet, inbox_key=inbox, device_ca=ca, devices=devices,
                replay=MemoryReplayState(), now_ms=NOW,
            )
            enc, ct = _crypto.hpke_seal(suite, inbox.public_key, plaintext, b"info")
            raw_seal = _rate(partial(_crypto.hpke_seal, suite, inbox.public_key, plaintext, b"info"), seconds)
            raw_open = _rate(partial(_crypto.hpke_open, suite, inbox, enc, ct, b"info"), seconds)
            seal_rate = _rate(lambda: seal(counter=next(counter)), seconds)  # noqa: B023  # called in this iteration only
            open_rate = _rate(open_, seconds)
            rows.append({
                "payload_bytes": size, "suite": suite.name, "packet_bytes": len(packet),
                "seal_per_s": seal_rate, "open_per_s": open_rate,
                "seal_vs_raw_hpke": seal_rate / raw_seal, "open_vs_raw_hpke": open_rate / raw_open,
                "sha": hashlib.sha256(packet).hexdigest()[:8],
            })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="measuring time per cell")
    parser.add_argument("--quick", action="store_true", help="0.05 s per cell (a smoke run)")
    opts = parser.parse_args(argv)
    rows = run(0.05 if opts.quick else opts.seconds, [1024, 1024 * 1024])
    table = Table(title="packet throughput (ratios against raw HPKE measured in the same run)")
    for col in ("payload", "suite", "packet bytes", "seal/s", "open/s", "seal vs HPKE", "open vs HPKE"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['payload_bytes']:,}", str(r["suite"]), f"{r['packet_bytes']:,}",
            f"{r['seal_per_s']:.0f}", f"{r['open_per_s']:.0f}",
            f"{r['seal_vs_raw_hpke']:.2f}", f"{r['open_vs_raw_hpke']:.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()

"""Regenerate the known-answer vectors in this folder (run by hand, then commit the files):

    .venv/bin/python -m tests.vectors.make_vectors

Fixed keys (from labelled seeds), fixed randomness and a fixed clock. HPKE's ephemeral key comes from
OpenSSL's CSPRNG (cryptography's HPKE API takes none), so ``enc`` and the ciphertext of a new seal
differ each time; the vector therefore pins the exact header bytes, the exact payload bytes and the
packet file as sealed once, which must keep opening to exactly this header and payload.

A packet file already here is kept, never resealed (so the wire-version-1 files stay byte-identical
for as long as they open to their header); only a missing one is written. Each wire version has
its own files (``packet_v<wire>_suite<suite>.bin``); the version-2 entries also pin the packet's
``packet_digest`` and the SHA-256 of its ciphertext, which are deterministic given the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from diredi_secure._crypto import HpkeSuite
from diredi_secure.knowledge import encode_payload
from diredi_secure.packet import open_packet, packet_digest
from diredi_secure.serde import envelope_from_bytes

from ..conftest import NOW_MS, build_pki, make_payload

HERE = Path(__file__).parent


def main() -> None:
    pki = build_pki()
    vectors: list[dict[str, Any]] = []
    written = 0
    for wire_version in (1, 2):
        for suite in (1, 2, 3):
            # Counters 1..3 for version 1 (as first generated), 11..13 for version 2.
            counter = suite if wire_version == 1 else 10 + suite
            sealed = pki.seal(
                "device-a", counter=counter, suite=HpkeSuite(suite), wire_version=wire_version
            )
            name = f"packet_v{wire_version}_suite{suite}.bin"
            path = HERE / name
            if path.exists():
                data = path.read_bytes()
                opened = open_packet(data, **pki.open_kwargs(now_ms=NOW_MS))  # type: ignore[arg-type]
                if opened.header != sealed.header:
                    raise SystemExit(
                        f"{name} no longer opens to the header the seeds give: "
                        "delete it deliberately to reseal"
                    )
            else:
                data = sealed.data
                path.write_bytes(data)
                written += 1
            env = envelope_from_bytes(data)
            entry: dict[str, Any] = {
                "file": name,
                "suite": suite,
                "device_id": "device-a",
                "counter": counter,
                "now_ms": NOW_MS,
                "rng_label": "rng",
                "rng_call": pki.rng.calls,
                "packet_id": sealed.header.packet_id.hex(),
                "header_hex": env.header.hex(),
                "payload_sha256": encode_payload(make_payload())[1].sha256.hex(),
                "payload_plaintext_sha256": hashlib.sha256(
                    encode_payload(make_payload())[0]
                ).hexdigest(),
                "signer_key_id": sealed.header.signer_key_id.hex(),
                "recipient_key_id": sealed.header.recipient_key_id.hex(),
            }
            if wire_version != 1:  # version-1 entries keep their first form (no such keys)
                entry["wire_version"] = wire_version
                entry["ciphertext_sha256"] = hashlib.sha256(env.ciphertext).hexdigest()
                entry["packet_digest"] = packet_digest(data).hex()
            vectors.append(entry)
    (HERE / "packets.json").write_text(
        json.dumps({"version": 1, "vectors": vectors}, indent=2) + "\n"
    )
    print(f"{len(vectors)} packet vectors, {written} packet files written")


if __name__ == "__main__":
    main()

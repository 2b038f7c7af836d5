"""Regenerate the known-answer vectors in this folder (run by hand, then commit the files):

    .venv/bin/python -m tests.vectors.make_vectors

Fixed keys (from labelled seeds), fixed randomness and a fixed clock. HPKE's ephemeral key comes from
OpenSSL's CSPRNG (cryptography's HPKE API takes none), so ``enc`` and the ciphertext of a new seal
differ each time; the vector therefore pins the exact header bytes, the exact payload bytes and the
packet file as sealed once, which must keep opening to exactly this header and payload.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from diredi_secure.knowledge import encode_payload
from diredi_secure.serde import envelope_from_bytes

from ..conftest import NOW_MS, build_pki, make_payload

HERE = Path(__file__).parent


def main() -> None:
    pki = build_pki()
    vectors = []
    for suite in (1, 2, 3):
        from diredi_secure._crypto import HpkeSuite

        sealed = pki.seal("device-a", counter=suite, suite=HpkeSuite(suite))
        env = envelope_from_bytes(sealed.data)
        name = f"packet_v1_suite{suite}.bin"
        (HERE / name).write_bytes(sealed.data)
        vectors.append(
            {
                "file": name,
                "suite": suite,
                "device_id": "device-a",
                "counter": suite,
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
        )
    (HERE / "packets.json").write_text(
        json.dumps({"version": 1, "vectors": vectors}, indent=2) + "\n"
    )
    print(f"wrote {len(vectors)} packet vectors")


if __name__ == "__main__":
    main()

"""What both release attack suites (local fetcher and through gRPC) build: tiny model bytes, a
release predicate, forged TUF metadata."""

from __future__ import annotations

import hashlib

import numpy as np
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from diredi_secure.checkpoint import checkpoint_bytes
from diredi_secure.release import AuditVerdict, ReleasePredicate


def model_bytes(version: int) -> bytes:
    """A tiny safetensors "model" whose weights are all ``version``."""
    return checkpoint_bytes({"w": np.full((4, 3), float(version), np.float32)}, {"v": str(version)})


def predicate(
    version: int, parent: bytes | None, verdict: AuditVerdict = AuditVerdict.PASS, **kw: object
) -> ReleasePredicate:
    """A release predicate for ``version`` whose parent is the model bytes ``parent``."""
    return ReleasePredicate.build(
        release_version=version,
        parent_digest=None if parent is None else hashlib.sha256(parent).hexdigest(),
        parent_version=None if parent is None else version - 1,
        packet_digests=[hashlib.sha256(b"packet%d" % version).digest()],
        epsilon=[],
        accountant="rdp",
        audit_report_digest=hashlib.sha256(b"report").hexdigest(),
        audit_verdict=verdict,
        training_config_digest=hashlib.sha256(b"{}").hexdigest(),
        version="test",
        **kw,  # type: ignore[arg-type]
    )


def attacker_root(previous_root: bytes, version: int) -> bytes:
    """Root ``version`` that replaces every root key with the attacker's, signed only by the
    attacker: what a bad root rotation looks like to a device that trusts ``previous_root``."""
    root = Metadata[Root].from_bytes(previous_root).signed
    attacker = CryptoSigner.generate_ed25519()
    for keyid in list(root.roles["root"].keyids):
        root.revoke_key(keyid, "root")
    root.add_key(attacker.public_key, "root")
    root.roles["root"].threshold = 1
    root.version = version
    md = Metadata(root)
    md.sign(attacker)
    return md.to_bytes()

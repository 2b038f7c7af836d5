"""Forged TUF metadata shared by the release attack tests (local fetcher and through gRPC)."""

from __future__ import annotations

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root


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

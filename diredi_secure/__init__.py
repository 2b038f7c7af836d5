"""DiReDi-secure: distillation and reverse distillation for edge AI, with signed, encrypted,
differentially private knowledge packets.

The public surface of the protocol core is re-exported here; the learning loop lives in
:mod:`diredi_secure.ml`, releases in :mod:`diredi_secure.release`, storage in
:mod:`diredi_secure.store`, services in :mod:`diredi_secure.services` and the privacy audit in
:mod:`diredi_secure.audits`.
"""

from __future__ import annotations

from . import errors, keys
from ._crypto import (
    HpkeSuite,
    InboxKey,
    InboxPublicKey,
    SigningKey,
    TlsKey,
    VerifyKey,
    generate_inbox_key,
    generate_signing_key,
)
from .envelope import PacketHeader
from .keys import (
    generate_tls_key,
    load_certificate,
    load_inbox_key,
    load_inbox_public_key,
    load_signing_key,
    load_tls_key,
    load_verify_key,
    save_certificate,
    save_inbox_key,
    save_inbox_public_key,
    save_signing_key,
    save_tls_key,
    save_verify_key,
)
from .knowledge import DPParameters, KnowledgePayload, PayloadKind, PayloadTensor
from .packet import (
    MemoryDeviceDirectory,
    MemoryReplayState,
    OpenedPacket,
    inspect_packet,
    make_receipt,
    open_packet,
    seal_packet,
    verify_receipt,
)
from .policy import Limits, PacketPolicy

__version__ = "0.1.0"

__all__ = [
    "DPParameters",
    "HpkeSuite",
    "InboxKey",
    "InboxPublicKey",
    "KnowledgePayload",
    "Limits",
    "MemoryDeviceDirectory",
    "MemoryReplayState",
    "OpenedPacket",
    "PacketHeader",
    "PacketPolicy",
    "PayloadKind",
    "PayloadTensor",
    "SigningKey",
    "TlsKey",
    "VerifyKey",
    "__version__",
    "errors",
    "generate_inbox_key",
    "generate_signing_key",
    "generate_tls_key",
    "inspect_packet",
    "keys",
    "load_certificate",
    "load_inbox_key",
    "load_inbox_public_key",
    "load_signing_key",
    "load_tls_key",
    "load_verify_key",
    "make_receipt",
    "open_packet",
    "save_certificate",
    "save_inbox_key",
    "save_inbox_public_key",
    "save_signing_key",
    "save_tls_key",
    "save_verify_key",
    "seal_packet",
    "verify_receipt",
]

"""DiReDi-secure: distillation and reverse distillation for edge AI, with signed, encrypted,
differentially private knowledge packets.

The public surface of the protocol core is re-exported here; the learning loop lives in
:mod:`diredi_secure.ml`, releases in :mod:`diredi_secure.release`, storage in
:mod:`diredi_secure.store`, services in :mod:`diredi_secure.services` and the privacy audit in
:mod:`diredi_secure.audits`.
"""

from __future__ import annotations

from . import errors
from ._crypto import (
    HpkeSuite,
    InboxKey,
    InboxPublicKey,
    SigningKey,
    VerifyKey,
    generate_inbox_key,
    generate_signing_key,
)
from .envelope import PacketHeader
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
    "VerifyKey",
    "__version__",
    "errors",
    "generate_inbox_key",
    "generate_signing_key",
    "inspect_packet",
    "make_receipt",
    "open_packet",
    "seal_packet",
    "verify_receipt",
]

"""The device agent: enrol, seal and submit packets with retries, verify receipts, update.

:class:`EdgeAgent` works over a :class:`~.workspace.DeviceWorkspace` (keys, certificates, CA,
inbox and receipt public keys, counter, its own epsilon ledger, outbox of unacknowledged packets).

Sealing reserves the counter (persisted before use) and charges the device's own ledger, then
writes the sealed bytes to the outbox; :meth:`EdgeAgent.submit` sends exactly those bytes until a
receipt that verifies under the cloud's receipt key arrives, retrying transport failures with
exponential backoff and full jitter (safe: the cloud answers a resent packet with its first
receipt). The clock, sleep and random source are injectable, so tests run without waiting.

:func:`update_device` is the device's whole update path (``diredi edge update``): TUF over gRPC,
streamed into the inactive slot. Nothing imported here loads torch (a test pins it): a device
that only verifies and installs does not pay torch's start-up time and memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import grpc

from diredi_secure._crypto import sign
from diredi_secure._proto.diredi.v1 import services_pb2 as spb
from diredi_secure._proto.diredi.v1 import services_pb2_grpc as sgrpc
from diredi_secure.envelope import ReceiptBody
from diredi_secure.errors import ConfigError, DirediError, HeaderMismatch
from diredi_secure.knowledge import DPParameters, KnowledgePayload
from diredi_secure.packet import SealedPacket, inspect_packet, seal_packet, verify_receipt
from diredi_secure.privacy import DEFAULT_DP_POLICY, account_packet

from .cloud import KNOWLEDGE_SERVICE, enroll_proof_message
from .status import ServiceUnavailable, error_from_rpc
from .transport import TransportConfig, open_channel
from .workspace import DeviceWorkspace

if TYPE_CHECKING:
    from diredi_secure.release.updater import InstalledRelease, UpdateResult

__all__ = [
    "DeviceStatusInfo",
    "EdgeAgent",
    "RetryPolicy",
    "adopt_inbox_key",
    "device_prefix",
    "device_role",
    "update_device",
]

_DEVICE_DP_POLICY = replace(DEFAULT_DP_POLICY, allow_seeded_noise=True)

log = logging.getLogger("diredi.edge")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt k waits U(0, min(cap, base * factor**k))."""

    attempts: int = 6
    base_delay_s: float = 0.2
    factor: float = 2.0
    max_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay_s < 0 or self.factor < 1 or self.max_delay_s < 0:
            raise ConfigError("retry policy: attempts >= 1, delays >= 0, factor >= 1")

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * self.factor**attempt))


@dataclass(frozen=True)
class DeviceStatusInfo:
    device_id: str
    status: str
    epsilon_spent: float
    epsilon_budget: float
    highest_counter: int
    epsilon_delta: float = 0.0
    """The one delta the cloud's ledger states both epsilons at (0: an older server)."""


def _wall_ms() -> int:
    return int(time.time() * 1000)


class EdgeAgent:
    """A device talking to the cloud. Close it (or use ``with``) to release the channel.

    ``channel``: an open channel (tests); otherwise one is opened to the workspace's target with
    mTLS (``mtls=False``: TLS only; ``insecure=True``: plaintext, logged).
    """

    def __init__(
        self,
        workspace: DeviceWorkspace,
        *,
        channel: grpc.Channel | None = None,
        mtls: bool = True,
        insecure: bool = False,
        config: TransportConfig | None = None,
        retry: RetryPolicy | None = None,
        clock_ms: Callable[[], int] = _wall_ms,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        passphrase: bytes | None = None,
        target: str | None = None,
    ) -> None:
        self.workspace = workspace
        self.config = config or TransportConfig()
        self.retry = retry or RetryPolicy()
        self.clock_ms = clock_ms
        self.sleep = sleep
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.random_bytes = random_bytes
        self._passphrase = passphrase
        if channel is None:
            target = target or str(workspace.config()["target"])
            channel = open_channel(
                target, None if insecure else workspace.client_tls(mtls=mtls),
                config=self.config, insecure=insecure,
            )
        self.channel = channel
        self._enrollment: Any = sgrpc.EnrollmentServiceStub(channel)
        self._submit = channel.unary_unary(f"/{KNOWLEDGE_SERVICE}/Submit")  # raw bytes both ways
        self._submit_stream = channel.stream_unary(
            f"/{KNOWLEDGE_SERVICE}/SubmitStream", request_serializer=spb.Chunk.SerializeToString
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> EdgeAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls with retries -----------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (one RPC), retrying only :class:`ServiceUnavailable`; raise typed errors."""
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, what)
                if not isinstance(error, ServiceUnavailable) or attempt + 1 == self.retry.attempts:
                    raise error from exc
                delay = self.retry.delay(attempt, self.rng)
                log.warning("%s failed (%s); retry %d in %.2f s", what, error.one_line(), attempt + 1, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- enrolment ------------------------------------------------------------------------------
    def enroll(self) -> str:
        """Register this device with the cloud; store the cloud's receipt key. Returns the id."""
        cert = self.workspace.certificate()
        proof = sign(self.workspace.signing_key(self._passphrase), enroll_proof_message(cert))
        response = self._call(
            "enroll",
            lambda: self._enrollment.Enroll(
                spb.EnrollRequest(certificate=cert, proof=proof), timeout=self.config.deadline_for("Enroll")
            ),
        )
        if response.device_id != self.workspace.device_id:
            raise HeaderMismatch(f"the cloud enrolled {response.device_id}, not {self.workspace.device_id}")
        self.workspace.update_config(
            receipt_public_key=bytes(response.receipt_public_key).hex(),
            inbox_key_id=bytes(response.inbox_key_id).hex(),
        )
        return str(response.device_id)

    def status(self) -> DeviceStatusInfo:
        device_id = self.workspace.device_id
        r = self._call(
            "status",
            lambda: self._enrollment.GetStatus(
                spb.DeviceStatusRequest(device_id=device_id), timeout=self.config.deadline_for("GetStatus")
            ),
        )
        return DeviceStatusInfo(r.device_id, r.status, r.epsilon_spent, r.epsilon_budget,
                                int(r.highest_counter), r.epsilon_delta)

    # -- packets ----------------------------------------------------------------------------------
    def seal(self, payload: KnowledgePayload, *, dp: DPParameters, base_model_version: str) -> SealedPacket:
        """Seal a payload (counter reserved and epsilon charged first) and queue it in the outbox.

        Raises ``BudgetExceeded`` if the device's own ledger would go over its budget.
        """
        ws = self.workspace
        # The device's own ledger composes with the cloud's accountant; a research-seeded packet
        # still costs the device what it declares (the cloud will refuse it by default).
        cost = account_packet(dp, payload.tensors, _DEVICE_DP_POLICY)
        ws.check_epsilon(cost.curve)
        counter = ws.reserve_counter()
        sealed = seal_packet(
            payload,
            device_key=ws.signing_key(self._passphrase),
            device_id=ws.device_id,
            counter=counter,
            base_model_version=base_model_version,
            dp=dp,
            inbox=ws.inbox_public_key(),
            now_ms=self.clock_ms(),
            random_bytes=self.random_bytes,
            device_certificate=ws.certificate(),
            limits=self.config.limits,
        )
        ws.put_outbox(sealed.packet_id, sealed.data)
        ws.charge_epsilon(sealed.packet_id, cost.curve, cost.epsilon)
        return sealed

    def submit(self, data: bytes) -> ReceiptBody:
        """Send packet bytes (unary, or streamed above the unary cap) until acknowledged.

        Verifies the receipt under the cloud's receipt key and that it acknowledges exactly these
        bytes, then files it and drops the packet from the outbox. Raises the cloud's refusal as
        its typed error, :class:`ServiceUnavailable` once retries are spent, or ``SignatureInvalid``
        / ``HeaderMismatch`` for a receipt that does not verify.
        """
        receipt_key = self.workspace.receipt_public_key()
        header = inspect_packet(data, self.config.limits)
        if len(data) <= self.config.limits.max_unary_bytes:
            receipt = self._call(
                "submit", lambda: self._submit(data, timeout=self.config.deadline_for("Submit"))
            )
        else:
            receipt = self._call(
                "submit (streamed)",
                lambda: self._submit_stream(
                    self._chunks(data), timeout=self.config.deadline_for("SubmitStream", streaming=True)
                ),
            )
        body = verify_receipt(bytes(receipt), receipt_key, data)
        if body.packet_id != header.packet_id:
            raise HeaderMismatch("the receipt names another packet id")
        self.workspace.acknowledge(header.packet_id, bytes(receipt))
        return body

    def _chunks(self, data: bytes) -> Iterator[Any]:
        step = self.config.chunk_bytes
        for offset in range(0, len(data), step):
            yield spb.Chunk(
                data=data[offset : offset + step], offset=offset, total_length=len(data) if offset == 0 else 0
            )

    def submit_payload(self, payload: KnowledgePayload, *, dp: DPParameters, base_model_version: str) -> ReceiptBody:
        """Seal then submit (the sealed packet stays in the outbox until its receipt verifies)."""
        return self.submit(self.seal(payload, dp=dp, base_model_version=base_model_version).data)

    def flush_outbox(self) -> list[ReceiptBody]:
        """Resend every unacknowledged packet (after a crash or an outage), oldest first."""
        bodies = []
        for _, data in self.workspace.pending():
            try:
                bodies.append(self.submit(data))
            except ServiceUnavailable:
                raise
            except DirediError as exc:
                log.error("packet refused by the cloud, left in the outbox: %s", exc.one_line())
                raise
        return bodies

    # -- updates ----------------------------------------------------------------------------------
    def updater(
        self,
        *,
        trusted_root: bytes | None = None,
        clock: Callable[[], Any] | None = None,
        policy: Any = None,
    ) -> Any:
        """A :class:`~diredi_secure.release.updater.DeviceUpdater` fetching over this channel.

        ``trusted_root`` defaults to the root the workspace was provisioned with (used only on
        the first update; afterwards the updater keeps its own verified copy). ``policy``: an
        :class:`~diredi_secure.release.updater.UpdatePolicy` (prefix and role of the release).
        Whether a ``not_audited`` release is accepted is the device's own policy (``device.json``
        ``allow_unaudited``, set at ``edge init``), applied to whatever policy is passed.
        """
        from dataclasses import replace
        from datetime import UTC, datetime

        from diredi_secure.release.updater import DeviceUpdater, UpdatePolicy

        from .fetcher import GrpcReleaseFetcher

        policy = policy if policy is not None else UpdatePolicy()
        if self.workspace.allows_unaudited() and not policy.accept_unaudited:
            policy = replace(policy, accept_unaudited=True)

        if trusted_root is None and not (self.workspace.release_dir / "trusted_root.json").exists():
            trusted_root = self.workspace.trusted_root()
        return DeviceUpdater(
            self.workspace.release_dir,
            GrpcReleaseFetcher(self.channel, config=self.config),
            clock=clock or (lambda: datetime.now(UTC)),
            trusted_root=trusted_root,
            policy=policy,
        )


# ------------------------------------------------------------------------------------------------
# The device's update path (no torch: see the module docstring)
# ------------------------------------------------------------------------------------------------
def device_prefix(device_id: str) -> str:
    """Where a device's own release lives in the repository: ``devices/<id>/``."""
    return f"devices/{device_id}/"


def device_role(device_id: str) -> str:
    """The delegated TUF role that signs a device's release.

    Device ids allow upper case and dots, role names do not; a hash keeps the mapping one-to-one.
    """
    return "device-" + hashlib.sha256(device_id.encode()).hexdigest()[:24]


def update_device(agent: EdgeAgent, *, trusted_root: bytes | None = None) -> UpdateResult:
    """Install the newest release for this device: its own (``devices/<id>/``, its delegated
    role) if the cloud published one, else the fleet release. Then adopt the release's inbox key.

    Raises what :meth:`DeviceUpdater.update` raises (rollback, freeze, bad attestation, parent mismatch...).
    The running model is kept on any error. Then what :func:`adopt_inbox_key` raises.
    """
    from diredi_secure.release.errors import ReleaseUnavailable
    from diredi_secure.release.updater import UpdatePolicy

    device_id = agent.workspace.device_id
    own = UpdatePolicy(prefix=device_prefix(device_id), role=device_role(device_id))
    try:
        result: UpdateResult = agent.updater(trusted_root=trusted_root, policy=own).update()
    except ReleaseUnavailable:
        result = agent.updater(trusted_root=trusted_root).update()
    adopt_inbox_key(agent.workspace, result.release)
    return result


def adopt_inbox_key(workspace: DeviceWorkspace, release: InstalledRelease) -> bool:
    """Make the inbox key installed with ``release`` the device's inbox key; False if the release
    carries none.

    Trusted: the slot (the file was length- and hash-checked against signed metadata at
    install). It is still read bounded, in one open (:func:`read_regular_file`, at most
    :data:`~diredi_secure.keys.MAX_PUBLIC_FILE_BYTES`, the cap on every public key file): a FIFO
    or device swapped in after the install cannot hang the device or exhaust its memory. Raises
    :class:`KeyFileError` (unreadable; reason ``not_regular_file`` for a FIFO or device; or not a
    valid inbox key) or :class:`TooLarge`.
    """
    from diredi_secure.checkpoint import read_regular_file
    from diredi_secure.keys import MAX_PUBLIC_FILE_BYTES
    from diredi_secure.release.repository import INBOX_KEY_TARGET

    if INBOX_KEY_TARGET not in release.files:
        return False
    inbox = workspace.release_dir / "slots" / release.slot / INBOX_KEY_TARGET
    workspace.set_inbox_public_key(
        read_regular_file(inbox, "release inbox key", MAX_PUBLIC_FILE_BYTES))
    return True

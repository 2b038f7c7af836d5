"""Verified device identities, cached per enrolled certificate (no I/O, no clock of its own).

Checking a device certificate against the CA (parse the DER, verify the CA's signature, the
validity window, the naming) costs about as much as verifying and opening a whole small packet.
The enrolled certificate of a device changes only on renewal, so the ingest path checks each one
once and keeps what it asserted, keyed by the SHA-256 of its DER bytes: a renewed certificate has
another key and is checked afresh. What the cache does NOT decide is whether the device may still
submit: revocation and the enrolled certificate are read in the store's write transaction for
every packet (``store_packet`` refuses a revoked device, and a packet verified under a certificate
that is no longer enrolled), and the caller :meth:`forgets <VerifiedIdentities.forget>` a
certificate when the store refuses its device.

A cached identity is used only while ``now_ms`` lies between the time it was checked and the
certificate's ``not_after``; outside that (expiry, a clock set back) it is checked again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from ._crypto import DeviceIdentity, check_device_certificate, sha256

__all__ = ["VerifiedIdentities"]


class VerifiedIdentities:
    """A bounded cache of :func:`~diredi_secure._crypto.check_device_certificate` results for one
    device CA. Thread-safe. Raises what ``check_device_certificate`` raises on a miss."""

    def __init__(self, device_ca_der: bytes, *, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self._ca = bytes(device_ca_der)
        self._max = max_entries
        self._entries: OrderedDict[bytes, tuple[DeviceIdentity, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.checks = 0
        """Certificates actually checked against the CA (misses), for tests and metrics."""

    @property
    def device_ca_der(self) -> bytes:
        return self._ca

    def check(
        self, cert_der: bytes, device_ca_der: bytes, *, now_ms: int, max_bytes: int
    ) -> DeviceIdentity:
        """The identity ``cert_der`` asserts, verified against ``device_ca_der`` at ``now_ms``."""
        if device_ca_der != self._ca:  # another CA: nothing cached applies
            return check_device_certificate(
                cert_der, device_ca_der, now_ms=now_ms, max_bytes=max_bytes
            )
        key = sha256(cert_der)
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None:
            identity, checked_at_ms = hit
            if checked_at_ms <= now_ms <= identity.not_after_ms:
                return identity
        identity = check_device_certificate(cert_der, self._ca, now_ms=now_ms, max_bytes=max_bytes)
        with self._lock:
            self.checks += 1
            self._entries[key] = (identity, now_ms)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return identity

    def forget(self, cert_der: bytes) -> None:
        """Drop what was cached for ``cert_der`` (its device was revoked or renewed)."""
        with self._lock:
            self._entries.pop(sha256(cert_der), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

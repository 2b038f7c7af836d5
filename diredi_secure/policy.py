"""Limits on untrusted input and the cloud's DP policy, in one place.

``Limits`` is the single config dataclass holding every size cap (as python-tuf's
``UpdaterConfig`` does): parsers take it as a parameter and refuse oversize input *before* doing
expensive work. ``PacketPolicy`` holds what the cloud accepts: clock window, norm bound on payloads, allowed base
models, and its DP policy (``diredi_secure.privacy.DPPolicy``: delta, epsilon caps, bounds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .privacy import DEFAULT_DP_POLICY, DPPolicy

__all__ = ["DEFAULT_LIMITS", "DEFAULT_POLICY", "WIRE_VERSIONS", "Limits", "PacketPolicy"]

WIRE_VERSIONS: frozenset[int] = frozenset({1, 2})
"""Every packet wire version (``SignedPacket.envelope_version``) this build can parse. 1: the device
signs the whole transcript, ciphertext included; 2: it signs the header, ``enc`` and a SHA-256 of
the ciphertext (docs/PROTOCOL.md, "Wire versions"). Here rather than in ``envelope`` so that the
policy below can be checked against it without an import cycle (``envelope`` re-exports it)."""


@dataclass(frozen=True)
class Limits:
    """Size caps on everything that arrives from outside. All sizes in bytes unless named."""

    max_packet_bytes: int = 64 * 1024 * 1024
    """Whole SignedPacket (streamed submissions); unary submissions use ``max_unary_bytes``."""
    max_unary_bytes: int = 4 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    max_payload_bytes: int = 48 * 1024 * 1024
    max_certificate_bytes: int = 8 * 1024
    max_signature_bytes: int = 64
    max_enc_bytes: int = 1200  # X25519: 32; ML-KEM-768+X25519: 1120
    max_entries: int = 8
    max_tensor_rank: int = 4
    max_tensor_elements: int = 16 * 1024 * 1024
    max_device_id_chars: int = 128
    max_model_version_chars: int = 128

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"limit {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class PacketPolicy:
    """What the cloud accepts from devices (checked after the packet authenticates).

    Every DP limit (the one delta, per-packet and lifetime epsilon, parameter bounds, research
    seeds) lives in ``dp``, a :class:`diredi_secure.privacy.DPPolicy`.
    """

    max_future_skew_ms: int = 5 * 60 * 1000
    """A packet created further in the future than this is refused (device clock ahead)."""
    max_age_ms: int = 7 * 24 * 3600 * 1000
    """A packet created longer ago than this is refused (stale or replayed from a capture)."""
    dp: DPPolicy = field(default_factory=lambda: DEFAULT_DP_POLICY)
    max_entry_l2_norm: float = 1e6
    """Bound on the L2 norm of every payload tensor (post-dequantisation)."""
    allowed_base_models: frozenset[str] | None = None
    """If set, the base model versions a packet may be computed against."""
    accepted_suites: frozenset[int] = field(default_factory=lambda: frozenset({1, 2, 3}))
    accepted_wire_versions: frozenset[int] = field(default_factory=lambda: WIRE_VERSIONS)
    """Packet wire versions accepted; a version left out is retired and refused
    (``PolicyViolation``, reason ``wire_version_retired``) before any signature or decryption work,
    so a device cannot downgrade to it. Default: both."""

    def __post_init__(self) -> None:
        if not self.accepted_wire_versions or not self.accepted_wire_versions <= WIRE_VERSIONS:
            raise ConfigError(
                f"accepted_wire_versions must be a non-empty subset of {sorted(WIRE_VERSIONS)}, "
                f"got {sorted(self.accepted_wire_versions)!r}"
            )
        if self.max_future_skew_ms < 0 or self.max_age_ms <= 0:
            raise ConfigError("clock window must be non-negative with a positive max age")
        if not (self.max_entry_l2_norm > 0):
            raise ConfigError(f"max_entry_l2_norm must be positive, got {self.max_entry_l2_norm!r}")

    @property
    def lifetime_epsilon_budget(self) -> float:
        return self.dp.lifetime_epsilon_budget

    @property
    def max_epsilon_per_packet(self) -> float:
        return self.dp.max_epsilon_per_packet


DEFAULT_LIMITS = Limits()
DEFAULT_POLICY = PacketPolicy()

"""Release attestations: an in-toto Statement v1 in a DSSE envelope.

The statement's subject is the model file (name + SHA-256); its predicate records how the model
was made: the parent model, the knowledge packets merged into it (count + Merkle root of their
digests), the epsilon each contributing device spent, the privacy-audit verdict and the training
configuration. The envelope is signed with securesystemslib's DSSE implementation by the key(s)
of the TUF role that publishes the release, so the device checks it with keys its trusted root
(or a delegation) names -- there is no separate trust anchor for attestations.

Format identifiers (versioned, rule 11): ``_type`` is ``https://in-toto.io/Statement/v1``, the
DSSE ``payloadType`` is ``application/vnd.in-toto+json`` and the predicate type is
``https://diredi.dev/release/v1``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import metadata as _pkg_metadata
from typing import Any, TypeVar

from securesystemslib import exceptions as sslib_exceptions
from securesystemslib.dsse import Envelope
from securesystemslib.signer import Key, Signer

from diredi_secure.errors import AttestationInvalid, ReleaseRefused, TooLarge

__all__ = [
    "DSSE_PAYLOAD_TYPE",
    "MAX_ATTESTATION_BYTES",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "Attestation",
    "AuditVerdict",
    "DeviceEpsilon",
    "ReleasePredicate",
    "build_statement",
    "merkle_root",
    "package_version",
    "sign_attestation",
    "verify_attestation",
]

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://diredi.dev/release/v1"
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"
MAX_ATTESTATION_BYTES = 1024 * 1024

_T = TypeVar("_T")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AuditVerdict(StrEnum):
    """Outcome of the privacy-leakage audit gate for a release."""

    PASS = "pass"  # noqa: S105 - an audit verdict, not a password
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    """No attack failed, but some mechanism's claimed epsilon is above what the audit can detect
    (its ceiling, in the report): releasable, and the attestation says so (docs/AUDIT.md)."""
    NOT_AUDITED = "not_audited"
    """Published without an audit report. Every other verdict names the report it comes from (its
    digest); this one has none, and devices refuse it unless their own policy allows unaudited
    releases (``UpdatePolicy.accept_unaudited``, ``edge init --allow-unaudited``)."""


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Merkle tree hash of ``leaves`` in the given order (RFC 6962 / RFC 9162 section 2.1).

    Leaves are hashed as ``SHA-256(0x00 || leaf)`` and inner nodes as ``SHA-256(0x01 || l || r)``
    (domain separation stops a leaf posing as a node); the split is at the largest power of two
    below ``n``; the empty tree hashes to ``SHA-256(b"")``. Callers that mean a *set* of digests
    sort them first (as :meth:`ReleasePredicate.build` does).
    """
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + bytes(leaves[0])).digest()
    k = 1 << ((n - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + merkle_root(leaves[:k]) + merkle_root(leaves[k:])).digest()


def package_version() -> str:
    """The installed diredi-secure version (``0+unknown`` when run from an uninstalled tree)."""
    try:
        return _pkg_metadata.version("diredi-secure")
    except _pkg_metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class DeviceEpsilon:
    """Privacy budget one device spent: in the packets merged this round, and over its lifetime."""

    device_id: str
    round: float
    total: float

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ValueError("device_id must not be empty")
        for name, value in (("round", self.round), ("total", self.total)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"epsilon {name} for {self.device_id!r} must be finite and >= 0")
        if self.total < self.round:
            raise ValueError(f"epsilon total for {self.device_id!r} is below this round's")


def _check_digest(name: str, value: str | None, *, optional: bool) -> None:
    if value is None:
        if not optional:
            raise ValueError(f"{name} is required")
        return
    if not _HEX64.fullmatch(value):
        raise ValueError(f"{name} must be a lowercase hex SHA-256, got {value!r}")


@dataclass(frozen=True)
class ReleasePredicate:
    """The lineage a release attestation records (the in-toto predicate, typed).

    Digests are lowercase hex SHA-256. ``parent_digest`` is ``None`` only for a first release.
    ``audit_forced`` marks a release an operator pushed out despite a failed audit.
    ``audit_report_digest`` is ``None`` exactly when the verdict is ``not_audited``: a verdict
    of pass, fail or inconclusive without the report it came from is a claim nobody can check,
    so it is refused here (and, parsed from a device's download, as :class:`AttestationInvalid`).
    """

    release_version: int
    parent_digest: str | None
    parent_version: int | None
    packet_count: int
    packet_merkle_root: str
    epsilon: tuple[DeviceEpsilon, ...]
    accountant: str
    audit_report_digest: str | None
    audit_verdict: AuditVerdict
    audit_forced: bool
    training_config_digest: str
    package_version: str

    def __post_init__(self) -> None:
        if self.release_version < 1:
            raise ValueError("release_version must be >= 1")
        if (self.parent_digest is None) != (self.parent_version is None):
            raise ValueError("parent_digest and parent_version go together")
        if self.parent_version is not None and self.parent_version >= self.release_version:
            raise ValueError("parent_version must be below release_version")
        _check_digest("parent_digest", self.parent_digest, optional=True)
        _check_digest("packet_merkle_root", self.packet_merkle_root, optional=False)
        _check_digest("audit_report_digest", self.audit_report_digest, optional=True)
        _check_digest("training_config_digest", self.training_config_digest, optional=False)
        if self.packet_count < 0:
            raise ValueError("packet_count must be >= 0")
        ids = [e.device_id for e in self.epsilon]
        if len(ids) != len(set(ids)):
            raise ValueError("a device appears twice in the epsilon list")
        if self.audit_forced and self.audit_verdict is not AuditVerdict.FAIL:
            raise ValueError("audit_forced only makes sense with a failed verdict")
        unaudited = self.audit_verdict is AuditVerdict.NOT_AUDITED
        if unaudited and self.audit_report_digest is not None:
            raise ValueError("a not_audited release names no audit report")
        if not unaudited and self.audit_report_digest is None:
            raise ValueError(
                f"audit verdict {self.audit_verdict.value!r} without an audit report digest "
                "(a release with no report is not_audited)"
            )

    @classmethod
    def build(
        cls,
        *,
        release_version: int,
        parent_digest: str | None,
        parent_version: int | None,
        packet_digests: Sequence[bytes],
        epsilon: Sequence[DeviceEpsilon],
        accountant: str,
        audit_report_digest: str | None,
        audit_verdict: AuditVerdict,
        training_config_digest: str,
        audit_forced: bool = False,
        version: str | None = None,
    ) -> ReleasePredicate:
        """Build a predicate from the raw merged packet digests (sorted, then Merkle-hashed)."""
        leaves = sorted(bytes(d) for d in packet_digests)
        return cls(
            release_version=release_version,
            parent_digest=parent_digest,
            parent_version=parent_version,
            packet_count=len(leaves),
            packet_merkle_root=merkle_root(leaves).hex(),
            epsilon=tuple(sorted(epsilon, key=lambda e: e.device_id)),
            accountant=accountant,
            audit_report_digest=audit_report_digest,
            audit_verdict=audit_verdict,
            audit_forced=audit_forced,
            training_config_digest=training_config_digest,
            package_version=version if version is not None else package_version(),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used as the in-toto ``predicate``."""

        def digest(value: str | None) -> dict[str, str] | None:
            return None if value is None else {"sha256": value}

        return {
            "release": {"version": self.release_version},
            "parent": {"digest": digest(self.parent_digest), "version": self.parent_version},
            "packets": {"count": self.packet_count, "merkleRoot": self.packet_merkle_root},
            "privacy": {
                "accountant": self.accountant,
                "epsilon": [
                    {"device": e.device_id, "round": e.round, "total": e.total}
                    for e in self.epsilon
                ],
            },
            "audit": {
                "reportDigest": digest(self.audit_report_digest),
                "verdict": self.audit_verdict.value,
                "forced": self.audit_forced,
            },
            "trainingConfig": {"digest": {"sha256": self.training_config_digest}},
            "builder": {"package": "diredi-secure", "version": self.package_version},
        }

    @classmethod
    def from_dict(cls, data: Any) -> ReleasePredicate:
        """Parse an untrusted predicate; raises :class:`AttestationInvalid` on any deviation."""
        try:
            release = _obj(data, "predicate")["release"]
            parent = _obj(data["parent"], "parent")
            packets = _obj(data["packets"], "packets")
            privacy = _obj(data["privacy"], "privacy")
            audit = _obj(data["audit"], "audit")
            training = _obj(data["trainingConfig"], "trainingConfig")
            builder = _obj(data["builder"], "builder")
            epsilon = []
            raw_eps = privacy["epsilon"]
            if not isinstance(raw_eps, list):
                raise AttestationInvalid("predicate privacy.epsilon must be a list")
            for item in raw_eps:
                entry = _obj(item, "epsilon entry")
                epsilon.append(
                    DeviceEpsilon(
                        device_id=_typed(entry["device"], str, "device"),
                        round=_number(entry["round"], "round"),
                        total=_number(entry["total"], "total"),
                    )
                )
            return cls(
                release_version=_typed(_obj(release, "release")["version"], int, "version"),
                parent_digest=_sha256_or_none(parent["digest"], "parent.digest"),
                parent_version=_int_or_none(parent["version"], "parent.version"),
                packet_count=_typed(packets["count"], int, "packets.count"),
                packet_merkle_root=_typed(packets["merkleRoot"], str, "packets.merkleRoot"),
                epsilon=tuple(epsilon),
                accountant=_typed(privacy["accountant"], str, "accountant"),
                audit_report_digest=_sha256_or_none(audit["reportDigest"], "audit.reportDigest"),
                audit_verdict=AuditVerdict(_typed(audit["verdict"], str, "audit.verdict")),
                audit_forced=_typed(audit["forced"], bool, "audit.forced"),
                training_config_digest=_typed(
                    _obj(training["digest"], "trainingConfig.digest")["sha256"], str, "sha256"
                ),
                package_version=_typed(builder["version"], str, "builder.version"),
            )
        except AttestationInvalid:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            raise AttestationInvalid(f"release predicate is malformed: {exc!r}") from exc


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise AttestationInvalid(f"{what} must be a JSON object")
    return value


def _typed(value: Any, typ: type[_T], what: str) -> _T:
    # bool is an int subclass: refuse True where an integer is expected.
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise AttestationInvalid(f"{what} must be {typ.__name__}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AttestationInvalid(f"{what} must be a number")
    return float(value)


def _int_or_none(value: Any, what: str) -> int | None:
    return None if value is None else _typed(value, int, what)


def _sha256_or_none(value: Any, what: str) -> str | None:
    if value is None:
        return None
    return _typed(_obj(value, what)["sha256"], str, what)


@dataclass(frozen=True)
class Attestation:
    """A verified attestation: what it attests and which trusted keys signed it."""

    subject_name: str
    subject_digest: str
    predicate: ReleasePredicate
    signer_keyids: tuple[str, ...]


def build_statement(subject_name: str, subject_digest: str, predicate: ReleasePredicate) -> bytes:
    """The in-toto Statement v1 JSON bytes (sorted keys, compact) for one model file."""
    _check_digest("subject_digest", subject_digest, optional=False)
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": subject_digest}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate.to_dict(),
    }
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


def sign_attestation(
    subject_name: str,
    model: bytes,
    predicate: ReleasePredicate,
    signers: Sequence[Signer],
) -> bytes:
    """Sign a statement about ``model`` with every signer; return the DSSE envelope JSON bytes."""
    if not signers:
        raise ValueError("at least one signer is needed")
    digest = hashlib.sha256(model).hexdigest()
    envelope = Envelope(build_statement(subject_name, digest, predicate), DSSE_PAYLOAD_TYPE, {})
    for signer in signers:
        envelope.sign(signer)
    return json.dumps(envelope.to_dict(), sort_keys=True).encode()


def verify_attestation(
    envelope_bytes: bytes,
    trusted_keys: Sequence[Key] | Mapping[str, Key],
    expected_digest: str,
    *,
    threshold: int = 1,
    expected_name: str | None = None,
    accept_forced: bool = True,
    accept_unaudited: bool = False,
    max_bytes: int = MAX_ATTESTATION_BYTES,
) -> Attestation:
    """Verify a DSSE release attestation; return it parsed, or raise.

    Trusted: ``trusted_keys`` (from verified TUF metadata), ``threshold`` and ``expected_digest``
    (the SHA-256 the signed targets metadata pins for the model). Untrusted: ``envelope_bytes``.

    Raises :class:`TooLarge` over ``max_bytes``; :class:`AttestationInvalid` when the envelope is
    malformed, not signed by ``threshold`` of ``trusted_keys`` (an unknown key counts for nothing),
    not an in-toto v1 statement of our predicate type, its subject is not the expected model, or
    its audit verdict does not match its report digest (a pass, fail or inconclusive verdict with
    no report); :class:`ReleaseRefused` when the audit verdict failed and was not forced (or was
    forced and ``accept_forced`` is false), or the release is ``not_audited`` and
    ``accept_unaudited`` is false (reason ``not_audited``).
    """
    if len(envelope_bytes) > max_bytes:
        raise TooLarge("attestation", len(envelope_bytes), max_bytes)
    keys = list(trusted_keys.values()) if isinstance(trusted_keys, Mapping) else list(trusted_keys)
    if threshold < 1 or len(keys) < threshold:
        raise AttestationInvalid(
            f"cannot verify: {len(keys)} trusted key(s) for a threshold of {threshold}"
        )
    try:
        envelope = Envelope.from_dict(json.loads(envelope_bytes))
    except (ValueError, KeyError, TypeError, RecursionError, sslib_exceptions.FormatError) as exc:
        raise AttestationInvalid(f"attestation is not a DSSE envelope: {exc!r}") from exc
    if envelope.payload_type != DSSE_PAYLOAD_TYPE:
        raise AttestationInvalid(f"DSSE payloadType {envelope.payload_type!r} is not in-toto")
    try:
        accepted = envelope.verify(keys, threshold)
    except sslib_exceptions.VerificationError as exc:
        raise AttestationInvalid(
            f"attestation is not signed by {threshold} trusted key(s): {exc}"
        ) from exc
    try:
        statement = json.loads(envelope.payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise AttestationInvalid("attestation payload is not JSON") from exc
    statement = _obj(statement, "statement")
    if statement.get("_type") != STATEMENT_TYPE:
        raise AttestationInvalid(f"statement _type {statement.get('_type')!r} is not in-toto v1")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise AttestationInvalid(f"predicateType {statement.get('predicateType')!r} is unknown")
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise AttestationInvalid("a release statement has exactly one subject")
    subject = _obj(subjects[0], "subject")
    name = _typed(subject.get("name"), str, "subject.name")
    digest = _typed(_obj(subject.get("digest"), "subject.digest").get("sha256"), str, "sha256")
    if digest != expected_digest:
        raise AttestationInvalid(
            f"attestation subject digest {digest[:16]}... is not the model's "
            f"{expected_digest[:16]}..."
        )
    if expected_name is not None and name != expected_name:
        raise AttestationInvalid(f"attestation subject {name!r} is not {expected_name!r}")
    predicate = ReleasePredicate.from_dict(statement.get("predicate"))
    if predicate.audit_verdict is AuditVerdict.FAIL and not (
        predicate.audit_forced and accept_forced
    ):
        what = "forced past a failed audit" if predicate.audit_forced else "failed its audit"
        raise ReleaseRefused(f"release v{predicate.release_version} {what}", reason="audit_failed")
    if predicate.audit_verdict is AuditVerdict.NOT_AUDITED and not accept_unaudited:
        raise ReleaseRefused(
            f"release v{predicate.release_version} was published without a privacy audit "
            "(not_audited) and this device's policy does not allow unaudited releases",
            reason="not_audited",
        )
    return Attestation(
        subject_name=name,
        subject_digest=digest,
        predicate=predicate,
        signer_keyids=tuple(sorted(accepted)),
    )

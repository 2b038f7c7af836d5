"""Certificate renewal and the mTLS certificate check (the recipes provisioning uses)."""

from __future__ import annotations

import pytest

from diredi_secure import _crypto
from diredi_secure.errors import CertificateInvalid

T0 = 1_780_000_000_000  # ms
DAY = 86_400_000


def _ca() -> tuple[_crypto.SigningKey, bytes]:
    key = _crypto.generate_signing_key()
    return key, _crypto.create_ca_certificate(key, common_name="CA", now_ms=T0, valid_days=3650,
                                              serial=1)  # fmt: skip


def test_renewal_keeps_the_id_and_key_of_an_expired_certificate() -> None:
    ca_key, ca_cert = _ca()
    key = _crypto.generate_signing_key()
    old = _crypto.issue_device_certificate(ca_key, ca_cert, device_id="dev-1",
                                           device_public_key=key.public_key, serial=2, now_ms=T0,
                                           valid_days=1)  # fmt: skip
    later = T0 + 30 * DAY
    with pytest.raises(CertificateInvalid, match="not valid at"):
        _crypto.check_device_certificate(old, ca_cert, now_ms=later)
    new = _crypto.reissue_device_certificate(ca_key, ca_cert, old, serial=3, now_ms=later)
    identity = _crypto.check_device_certificate(new, ca_cert, now_ms=later)
    assert (identity.device_id, identity.public_key, identity.serial) == (
        "dev-1",
        key.public_key,
        3,
    )


def test_renewal_of_a_tls_certificate_keeps_its_p256_key() -> None:
    ca_key, ca_cert = _ca()
    tls = _crypto.generate_tls_key()
    old = _crypto.issue_tls_device_certificate(ca_key, ca_cert, device_id="dev-1", tls_key=tls,
                                               serial=2, now_ms=T0)  # fmt: skip
    new = _crypto.reissue_device_certificate(ca_key, ca_cert, _crypto.certificate_pem(old),
                                             serial=3, now_ms=T0 + DAY)  # fmt: skip
    assert new != old
    assert (
        _crypto.check_tls_device_certificate(new, ca_cert, now_ms=T0 + DAY, tls_key=tls) == "dev-1"
    )
    with pytest.raises(CertificateInvalid, match="not for this TLS key"):
        _crypto.check_tls_device_certificate(new, ca_cert, now_ms=T0 + DAY,
                                             tls_key=_crypto.generate_tls_key())  # fmt: skip


def test_another_cas_certificate_is_not_renewed() -> None:
    ca_key, ca_cert = _ca()
    rogue_key, rogue_cert = _ca()
    key = _crypto.generate_signing_key()
    foreign = _crypto.issue_device_certificate(rogue_key, rogue_cert, device_id="dev-1",
                                               device_public_key=key.public_key, serial=2,
                                               now_ms=T0)  # fmt: skip
    with pytest.raises(CertificateInvalid, match="signature does not verify"):
        _crypto.reissue_device_certificate(ca_key, ca_cert, foreign, serial=3, now_ms=T0)


def test_the_packet_certificate_is_not_a_tls_certificate() -> None:
    ca_key, ca_cert = _ca()
    key = _crypto.generate_signing_key()
    cert = _crypto.issue_device_certificate(ca_key, ca_cert, device_id="dev-1",
                                            device_public_key=key.public_key, serial=2, now_ms=T0)  # fmt: skip
    with pytest.raises(CertificateInvalid, match="not ECDSA P-256"):
        _crypto.check_tls_device_certificate(cert, ca_cert, now_ms=T0)

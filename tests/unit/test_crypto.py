from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from diredi_secure import _crypto
from diredi_secure.errors import (
    CertificateInvalid,
    DecryptionFailed,
    KeyFileError,
    SignatureInvalid,
)

from ..conftest import NOW_MS, Pki, seeded


def test_key_id_is_sha256_of_spki() -> None:
    key = _crypto.SigningKey.from_seed(seeded("k"))
    assert key.key_id == hashlib.sha256(key.public_key.spki_der).digest()
    assert len(key.public_key.spki_der) == 44  # Ed25519 SPKI


def test_sign_verify_raises_on_wrong_data() -> None:
    key = _crypto.SigningKey.from_seed(seeded("k"))
    sig = _crypto.sign(key, b"data")
    assert _crypto.verify_signature(key.public_key, sig, b"data") is None
    with pytest.raises(SignatureInvalid):
        _crypto.verify_signature(key.public_key, sig, b"datA")
    other = _crypto.SigningKey.from_seed(seeded("other"))
    with pytest.raises(SignatureInvalid):
        _crypto.verify_signature(other.public_key, sig, b"data")


@pytest.mark.parametrize("passphrase", [None, b"correct horse"])
def test_signing_key_save_load(tmp_path: Path, passphrase: bytes | None) -> None:
    key = _crypto.generate_signing_key()
    path = tmp_path / "k.pem"
    _crypto.save_signing_key(key, path, passphrase)
    text = path.read_bytes()
    assert (b"ENCRYPTED" in text) == (passphrase is not None)
    assert path.stat().st_mode & 0o777 == 0o600
    assert _crypto.load_signing_key(path, passphrase).public_key == key.public_key


def test_wrong_or_missing_passphrase(tmp_path: Path) -> None:
    key = _crypto.generate_signing_key()
    _crypto.save_signing_key(key, tmp_path / "k.pem", b"right")
    with pytest.raises(KeyFileError):
        _crypto.load_signing_key(tmp_path / "k.pem", b"wrong")
    with pytest.raises(KeyFileError):
        _crypto.load_signing_key(tmp_path / "k.pem", None)
    with pytest.raises(KeyFileError):
        _crypto.load_signing_key(tmp_path / "missing.pem")


@pytest.mark.parametrize("suite", list(_crypto.HpkeSuite))
def test_hpke_round_trip_each_suite(suite: _crypto.HpkeSuite) -> None:
    inbox = _crypto.InboxKey.from_seeds(seeded("x"), seeded("m", 64))
    enc, ct = _crypto.hpke_seal(suite, inbox.public_key, b"knowledge", b"header")
    assert len(enc) == _crypto.enc_length(suite)
    assert _crypto.hpke_open(suite, inbox, enc, ct, b"header") == b"knowledge"
    with pytest.raises(DecryptionFailed):
        _crypto.hpke_open(suite, inbox, enc, ct, b"other header")
    other = _crypto.InboxKey.from_seeds(seeded("x2"), seeded("m2", 64))
    with pytest.raises(DecryptionFailed):
        _crypto.hpke_open(suite, other, enc, ct, b"header")


@pytest.mark.parametrize("passphrase", [None, b"pw"])
def test_inbox_key_save_load(tmp_path: Path, passphrase: bytes | None) -> None:
    key = _crypto.generate_inbox_key()
    _crypto.save_inbox_key(key, tmp_path / "inbox.key", passphrase)
    loaded = _crypto.load_inbox_key(tmp_path / "inbox.key", passphrase)
    assert loaded.key_id == key.key_id
    assert _crypto.load_inbox_public_key(key.public_key.pem).key_id == key.key_id


def test_device_certificate_checks(pki: Pki) -> None:
    _, cert = pki.device_keys["device-a"]
    ident = _crypto.check_device_certificate(cert, pki.ca_cert, now_ms=NOW_MS)
    assert ident.device_id == "device-a"
    with pytest.raises(CertificateInvalid, match="not valid at"):
        _crypto.check_device_certificate(cert, pki.ca_cert, now_ms=NOW_MS + 20 * 365 * 86_400_000)
    with pytest.raises(CertificateInvalid, match="not a DER"):
        _crypto.check_device_certificate(b"junk", pki.ca_cert, now_ms=NOW_MS)
    # a CA certificate is not a device certificate
    with pytest.raises(CertificateInvalid):
        _crypto.check_device_certificate(pki.ca_cert, pki.ca_cert, now_ms=NOW_MS)
    # a server certificate (server auth only) is not a device certificate
    server = _crypto.issue_tls_server_certificate(
        pki.ca_key,
        pki.ca_cert,
        hostnames=["127.0.0.1", "localhost"],
        tls_key=_crypto.generate_tls_key(),
        serial=77,
        now_ms=NOW_MS,
    )
    with pytest.raises(CertificateInvalid):
        _crypto.check_device_certificate(server, pki.ca_cert, now_ms=NOW_MS)


def test_crl_round_trip_and_forgery(pki: Pki) -> None:
    crl = _crypto.build_crl(pki.ca_key, pki.ca_cert, revoked_serials=[100, 7], now_ms=NOW_MS)
    assert _crypto.parse_crl(crl, pki.ca_cert) == {7, 100}
    rogue = _crypto.SigningKey.from_seed(seeded("rogue"))
    forged = _crypto.build_crl(rogue, pki.ca_cert, revoked_serials=[1], now_ms=NOW_MS)
    with pytest.raises(CertificateInvalid):
        _crypto.parse_crl(forged, pki.ca_cert)

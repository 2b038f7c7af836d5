"""Passphrase-protected key files (issue 14 finding 6): a memory-hard KDF in a versioned envelope,
every parameter read back bounded before any derivation, legacy PBKDF2 files still readable.

The envelope (see ``_crypto._wrap_private_pem``):
"DRDK" | version | kdf | log2(n) | r | p | salt_len | salt | aead | nonce_len | nonce | ct || tag.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from diredi_secure import _crypto
from diredi_secure.errors import ConfigError, KeyFileError, TooLarge

from ..conftest import seeded

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
LEGACY_PASSPHRASE = b"legacy passphrase"
# What tests/vectors/legacy_pbkdf2_*.pem hold: written by the PKCS#8 writer this project used
# before the envelope (cryptography's BestAvailableEncryption: PBES2, PBKDF2-SHA256, 2,048 rounds).
LEGACY_SIGNING_PUBLIC = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
LEGACY_INBOX_KEY_ID = "f9959ef5500b9a1f2f5598bf728b12bde79e5cb2b4503a658c6e5190300ced19"
KAT_SHA256 = "946730978d3c333008b1834f71cc1c26be484d1aca7c0b9782a2161ffd19590d"
LABEL = b"-----BEGIN DIREDI ENCRYPTED PRIVATE KEY-----"


def _body(path: Path) -> bytes:
    lines = path.read_bytes().splitlines()
    return base64.b64decode(b"".join(lines[1:-1]))


def _write_body(path: Path, body: bytes) -> None:
    armour = (
        LABEL + b"\n" + base64.encodebytes(body) + b"-----END DIREDI ENCRYPTED PRIVATE KEY-----\n"
    )
    path.write_bytes(armour)
    path.chmod(0o600)


def _fast_wrapped(tmp_path: Path, passphrase: bytes = b"pw") -> tuple[Path, _crypto.SigningKey]:
    """A signing key file in the envelope at the cheapest accepted cost (n = 2^15), so that the
    tamper cases below, each one derivation, stay quick."""
    key = _crypto.SigningKey.from_seed(seeded("wrapped"))
    path = tmp_path / "k.pem"
    data = _crypto._wrap_private_pem(key.private_pem(), passphrase, log2_n=15)
    path.write_bytes(data)
    path.chmod(0o600)
    return path, key


@pytest.fixture
def count_derivations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the real scrypt derivations (the function still runs): proves a refusal did none."""
    calls: list[int] = []
    real = _crypto._scrypt_key

    def counted(passphrase: bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
        calls.append(log2_n)
        return real(passphrase, salt, log2_n, r, p)

    monkeypatch.setattr(_crypto, "_scrypt_key", counted)
    return calls


# ------------------------------------------------------------------------------------------------
# Round trips through the public save/load recipes, at the default cost
# ------------------------------------------------------------------------------------------------
def test_every_key_type_round_trips_in_the_scrypt_envelope(
    tmp_path: Path, count_derivations: list[int]
) -> None:
    signing = _crypto.generate_signing_key()
    inbox = _crypto.generate_inbox_key()
    tls = _crypto.generate_tls_key()
    _crypto.save_signing_key(signing, tmp_path / "s.key", b"correct horse")
    _crypto.save_inbox_key(inbox, tmp_path / "i.key", b"correct horse")
    _crypto.save_tls_key(tls, tmp_path / "t.key", b"correct horse")
    for name in ("s.key", "i.key", "t.key"):
        path = tmp_path / name
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.read_bytes().startswith(LABEL)
        assert b"BEGIN PRIVATE KEY" not in path.read_bytes()  # no clear PKCS#8
        assert b"BEGIN ENCRYPTED PRIVATE KEY" not in path.read_bytes()  # no PBKDF2 PKCS#8
        body = _body(path)
        assert body[:4] == b"DRDK" and body[4] == 1  # magic, version
        assert tuple(body[5:9]) == (1, _crypto.SCRYPT_LOG2_N, 8, 1)  # scrypt, n=2^17, r=8, p=1
    assert _crypto.load_signing_key(tmp_path / "s.key", b"correct horse").key_id == signing.key_id
    assert _crypto.load_inbox_key(tmp_path / "i.key", b"correct horse").key_id == inbox.key_id
    loaded_tls = _crypto.load_tls_key(tmp_path / "t.key", b"correct horse")
    assert loaded_tls.private_pem() == tls.private_pem()
    assert count_derivations == [17] * 6  # one derivation per save and per load, none per block


def test_two_saves_of_one_key_differ_salt_and_nonce_from_the_csprng(tmp_path: Path) -> None:
    key = _crypto.SigningKey.from_seed(seeded("twice"))
    a = _crypto._wrap_private_pem(key.private_pem(), b"pw", log2_n=15)
    b = _crypto._wrap_private_pem(key.private_pem(), b"pw", log2_n=15)
    assert a != b


def test_known_salt_and_nonce_give_known_bytes() -> None:
    """A pinned answer: a change to the envelope's layout or its KDF inputs breaks old files."""
    key = _crypto.SigningKey.from_seed(seeded("kat"))
    wrapped = _crypto._wrap_private_pem(
        key.private_pem(), b"pw", log2_n=15, salt=seeded("salt", 16), nonce=seeded("nonce", 12)
    )
    assert hashlib.sha256(wrapped).hexdigest() == KAT_SHA256


def test_writer_refuses_costs_the_reader_would_refuse() -> None:
    pem = _crypto.SigningKey.from_seed(seeded("w")).private_pem()
    for log2_n in (14, 18):
        with pytest.raises(ConfigError, match="log2"):
            _crypto._wrap_private_pem(pem, b"pw", log2_n=log2_n)
    with pytest.raises(ConfigError, match="empty passphrase"):
        _crypto.save_signing_key(_crypto.generate_signing_key(), Path("/nonexistent/k"), b"")


# ------------------------------------------------------------------------------------------------
# Wrong, missing or unexpected passphrases
# ------------------------------------------------------------------------------------------------
def test_wrong_passphrase_is_a_typed_error(tmp_path: Path) -> None:
    path, _ = _fast_wrapped(tmp_path)
    with pytest.raises(KeyFileError, match="wrong passphrase, or the file was altered"):
        _crypto.load_signing_key(path, b"not it")


def test_missing_passphrase_is_refused_without_work(
    tmp_path: Path, count_derivations: list[int]
) -> None:
    path, _ = _fast_wrapped(tmp_path)
    count_derivations.clear()  # the one that wrote the file
    with pytest.raises(KeyFileError, match="is encrypted: give its passphrase"):
        _crypto.load_signing_key(path, None)
    assert count_derivations == []


def test_passphrase_for_a_clear_key_is_refused(tmp_path: Path) -> None:
    _crypto.save_signing_key(_crypto.generate_signing_key(), tmp_path / "clear.key")
    with pytest.raises(KeyFileError):
        _crypto.load_signing_key(tmp_path / "clear.key", b"pw")


# ------------------------------------------------------------------------------------------------
# Tampering: every region of the envelope is authenticated
# ------------------------------------------------------------------------------------------------
def _flip(at: Callable[[bytes], int]) -> Callable[[bytes], bytes]:
    def flip(body: bytes) -> bytes:
        i = at(body)
        return body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]

    return flip


TAMPERS: dict[str, Callable[[bytes], bytes]] = {
    "salt byte": _flip(lambda b: 10),
    "nonce byte": _flip(lambda b: 10 + b[9] + 2),
    "ciphertext byte": _flip(lambda b: len(b) - 30),
    "tag byte": _flip(lambda b: len(b) - 1),
    "log2 n lowered (in bounds)": lambda b: b[:6] + bytes([16]) + b[7:],
    "r lowered (in bounds)": lambda b: b[:7] + bytes([4]) + b[8:],
    "ciphertext cut short": lambda b: b[:-1],
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_file_is_a_typed_error(tmp_path: Path, case: str) -> None:
    path, _ = _fast_wrapped(tmp_path)
    _write_body(path, TAMPERS[case](_body(path)))
    with pytest.raises(KeyFileError, match="wrong passphrase, or the file was altered"):
        _crypto.load_signing_key(path, b"pw")


def _set(index: int, value: int) -> Callable[[bytes], bytes]:
    return lambda b: b[:index] + bytes([value]) + b[index + 1 :]


# Parameters an attacker writes into the file: each refused before scrypt runs (count == 0).
ABSURD: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "log2 n 40 (a 128 TiB derivation)": (_set(6, 40), "out of bounds"),
    "log2 n 255": (_set(6, 255), "out of bounds"),
    "log2 n 14 (below the floor)": (_set(6, 14), "out of bounds"),
    "r 255": (_set(7, 255), "out of bounds"),
    "r 0": (_set(7, 0), "out of bounds"),
    "p 64": (_set(8, 64), "out of bounds"),
    "p 0": (_set(8, 0), "out of bounds"),
    "salt length 255": (_set(9, 255), "salt of 255 bytes"),
    "salt length 0": (_set(9, 0), "salt of 0 bytes"),
    "nonce length 255": (lambda b: _set(10 + b[9] + 1, 255)(b), "nonce is not supported"),
    "cipher 7": (lambda b: _set(10 + b[9], 7)(b), "cipher 7"),
    "version 2": (_set(4, 2), "version 2 is not supported"),
    "kdf 2": (_set(5, 2), "derivation function 2 is not supported"),
    "wrong magic": (lambda b: b"XXXX" + b[4:], "not a diredi encrypted key"),
    "header only": (lambda b: b[:12], "truncated"),
    "empty body": (lambda b: b"", "malformed encrypted key armour"),
}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_kdf_parameters_are_refused_before_any_work(
    tmp_path: Path, case: str, count_derivations: list[int]
) -> None:
    path, _ = _fast_wrapped(tmp_path)
    count_derivations.clear()  # the one that wrote the file
    change, message = ABSURD[case]
    _write_body(path, change(_body(path)))
    with pytest.raises(KeyFileError, match=message):
        _crypto.load_signing_key(path, b"pw")
    assert count_derivations == []


@pytest.mark.parametrize(
    "armour",
    [
        LABEL + b"\n!!!not base64!!!\n-----END DIREDI ENCRYPTED PRIVATE KEY-----\n",
        LABEL + b"\nRFJESwEBEQgB\n",  # no END line
        LABEL + b"\nRFJ\n-----END DIREDI ENCRYPTED PRIVATE KEY-----\n",  # bad padding
    ],
)
def test_malformed_armour_is_a_typed_error(tmp_path: Path, armour: bytes) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(armour)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=r"armour|not a diredi"):
        _crypto.load_signing_key(path, b"pw")


def test_an_oversized_key_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(LABEL + b"\n" + b"A" * (1 << 20))
    path.chmod(0o600)
    with pytest.raises(TooLarge):
        _crypto.load_signing_key(path, b"pw")


# ------------------------------------------------------------------------------------------------
# Legacy PBKDF2 PKCS#8 files: read-only compatibility
# ------------------------------------------------------------------------------------------------
def _legacy(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copyfile(VECTORS / name, path)
    path.chmod(0o600)  # git stores 0644; a private file must be 0600 to be read at all
    return path


def test_legacy_pbkdf2_files_still_load(tmp_path: Path) -> None:
    signing = _crypto.load_signing_key(
        _legacy(tmp_path, "legacy_pbkdf2_signing_key.pem"), LEGACY_PASSPHRASE
    )
    assert signing.public_key.raw.hex() == LEGACY_SIGNING_PUBLIC
    inbox = _crypto.load_inbox_key(
        _legacy(tmp_path, "legacy_pbkdf2_inbox_key.pem"), LEGACY_PASSPHRASE
    )
    assert inbox.key_id.hex() == LEGACY_INBOX_KEY_ID
    tls = _crypto.load_tls_key(_legacy(tmp_path, "legacy_pbkdf2_tls_key.pem"), LEGACY_PASSPHRASE)
    assert tls.private_pem().startswith(b"-----BEGIN PRIVATE KEY-----")
    with pytest.raises(KeyFileError):
        _crypto.load_signing_key(tmp_path / "legacy_pbkdf2_signing_key.pem", b"wrong")


def test_a_legacy_key_saved_again_is_in_the_new_format(tmp_path: Path) -> None:
    key = _crypto.load_signing_key(
        _legacy(tmp_path, "legacy_pbkdf2_signing_key.pem"), LEGACY_PASSPHRASE
    )
    _crypto.save_signing_key(key, tmp_path / "migrated.key", LEGACY_PASSPHRASE)
    assert (tmp_path / "migrated.key").read_bytes().startswith(LABEL)
    again = _crypto.load_signing_key(tmp_path / "migrated.key", LEGACY_PASSPHRASE)
    assert again.public_key.raw.hex() == LEGACY_SIGNING_PUBLIC

"""Ed25519 checks on the edge (agent.signing): OpenSSL through ctypes agrees with the cryptography package."""

from __future__ import annotations

import ctypes
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from agent import signing
from agent.errors import SignatureError
from agent.signing import PublicKey, load_public_key, signature_matches

ROOT = Path(__file__).resolve().parents[1]


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.fixture(params=["openssl", "cryptography"])
def backend(request, monkeypatch):
    """Each test runs with libcrypto through ctypes, and again with the cryptography fallback."""
    if request.param == "cryptography":
        monkeypatch.setattr(signing, "_BACKEND", (None, "switched off by the test"))
    else:
        assert signing.backend() == "openssl", signing._BACKEND  # Debian and Ubuntu ship libcrypto 3
    assert signing.backend() == request.param
    return request.param


def test_the_check_agrees_with_cryptography(backend):
    rng = random.Random(7)
    for _ in range(40):
        private = Ed25519PrivateKey.generate()
        key = PublicKey(_raw(private))
        message = os.urandom(rng.randrange(0, 3000))
        sig = private.sign(message)
        assert key.matches(sig, message)
        flipped = bytearray(sig)
        flipped[rng.randrange(64)] ^= 1 << rng.randrange(8)
        assert not key.matches(bytes(flipped), message)
        if message:
            other = bytearray(message)
            other[rng.randrange(len(message))] ^= 1
            assert not key.matches(sig, bytes(other))
        assert not key.matches(sig, message + b"\n")
        assert not PublicKey(_raw(Ed25519PrivateKey.generate())).matches(sig, message)  # another key
        assert not key.matches(sig[:63], message) and not key.matches(sig + b"\0", message)
        assert not key.matches(b"\0" * 64, message) and not key.matches(b"\xff" * 64, message)


def test_a_failed_check_leaves_no_openssl_error_behind():
    """Python's ssl module reads the same per-thread error queue: a refusal must not leave an entry in it."""
    assert signing.backend() == "openssl", signing._BACKEND
    peek = ctypes.CDLL(signing._mapped_libcrypto()).ERR_peek_error
    peek.restype = ctypes.c_ulong
    key = PublicKey(bytes(32))  # not a valid point: OpenSSL itself refuses it
    assert not key.matches(b"\1" * 64, b"manifest")
    assert peek() == 0


def test_keys_are_read_as_keygen_writes_them(tmp_path):
    private = Ed25519PrivateKey.generate()
    pem = tmp_path / "signing.pub"
    pem.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    raw = tmp_path / "signing.raw"
    raw.write_bytes(_raw(private))
    assert load_public_key(pem) == load_public_key(raw) == PublicKey(_raw(private))
    assert load_public_key(pem).matches(private.sign(b"m"), b"m")
    # the retrain server checks with its own cryptography key object
    assert signature_matches(private.public_key(), private.sign(b"m"), b"m")
    assert not signature_matches(private.public_key(), private.sign(b"m"), b"n")


@pytest.mark.parametrize("content, message", [
    (b"", "not an Ed25519 public key"),
    (b"x" * 31, "not an Ed25519 public key"),
    (b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n", "bad base64"),
    (b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n", "not an Ed25519 public key"),
    (b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n", "no PEM PUBLIC KEY"),
])
def test_anything_else_is_refused_with_a_clear_error(tmp_path, content, message):
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(SignatureError, match=message):
        load_public_key(path)


def test_an_rsa_key_is_refused(tmp_path):
    path = tmp_path / "rsa.pub"
    path.write_bytes(generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(SignatureError, match="not an Ed25519 public key"):
        load_public_key(path)


def test_an_agent_verifying_a_signed_bundle_loads_no_cryptography(trained):
    """The point of the module: the check costs the agent no extra library (~7 MB resident before)."""
    code = f"""
import sys
from agent import cli, service, registry
from agent.bundle import load_public_key
from agent.signing import backend
snap = registry.load_snapshot({str(trained.parameters)!r}, load_public_key({str(trained.public_key)!r}))
assert snap.version
print(backend(), "cryptography" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["openssl", "False"]

"""Ed25519 signature checks on the edge, by the OpenSSL the interpreter has already loaded.

An agent checks one signature per bundle (``manifest.sig``, :mod:`agent.bundle`). The
``cryptography`` package did it before and cost every agent about 7 MB of resident memory (its
Rust extension alone touched 5.5 MB at import). Python's ``hashlib`` and ``ssl`` already map
OpenSSL's libcrypto, which has Ed25519 since 1.1.1: :class:`PublicKey` calls it through
``ctypes``, five calls of its documented EVP interface, after a known-answer test (RFC 8032,
test 1) has shown that the binding accepts a good signature and refuses a bad one. Where that
library cannot be found or fails the test, ``cryptography`` does the check, as before; keys made
by ``cryptography`` itself (the retrain server passes its own) are checked by it too.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import logging
import threading
from pathlib import Path
from typing import Any

from .errors import SignatureError

_LOG = logging.getLogger(__name__)

__all__ = ["PublicKey", "load_public_key", "signature_matches", "backend"]

#: EVP_PKEY_ED25519 (NID_ED25519) in OpenSSL's headers
_EVP_PKEY_ED25519 = 1087
#: the DER SubjectPublicKeyInfo of an Ed25519 key, up to the 32 key bytes (RFC 8410)
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
#: RFC 8032 section 7.1, test 1: public key, message (empty), signature
_KAT_KEY = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
_KAT_SIG = bytes.fromhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
                         "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


class _LibCrypto:
    """The EVP calls of one libcrypto, typed."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        p, sz, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        self.new_key = lib.EVP_PKEY_new_raw_public_key
        self.new_key.argtypes, self.new_key.restype = [i, p, ctypes.c_char_p, sz], p
        self.free_key = lib.EVP_PKEY_free
        self.free_key.argtypes, self.free_key.restype = [p], None
        self.new_ctx = lib.EVP_MD_CTX_new
        self.new_ctx.argtypes, self.new_ctx.restype = [], p
        self.free_ctx = lib.EVP_MD_CTX_free
        self.free_ctx.argtypes, self.free_ctx.restype = [p], None
        self.init = lib.EVP_DigestVerifyInit
        self.init.argtypes, self.init.restype = [p, p, p, p, p], i
        self.verify = lib.EVP_DigestVerify
        self.verify.argtypes, self.verify.restype = [p, ctypes.c_char_p, sz, ctypes.c_char_p, sz], i
        self.clear_errors = lib.ERR_clear_error
        self.clear_errors.argtypes, self.clear_errors.restype = [], None

    def matches(self, key: bytes, signature: bytes, message: bytes) -> bool:
        pkey = self.new_key(_EVP_PKEY_ED25519, None, key, len(key))
        ctx = self.new_ctx() if pkey else None
        try:
            ok = bool(ctx) and self.init(ctx, None, None, None, pkey) == 1 and \
                self.verify(ctx, signature, len(signature), message, len(message)) == 1
        finally:
            if ctx:
                self.free_ctx(ctx)
            if pkey:
                self.free_key(pkey)
        if not ok:
            self.clear_errors()  # the thread's OpenSSL error queue is shared with Python's ssl module
        return ok


def _mapped_libcrypto() -> str | None:
    """The libcrypto this process has mapped already (hashlib's), by its path in /proc/self/maps."""
    import _hashlib  # noqa: F401  (maps OpenSSL's libcrypto)

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if "/libcrypto." in path and path.startswith("/"):
                    return path
    except OSError:
        pass
    return None


_LOCK = threading.Lock()
_BACKEND: tuple[_LibCrypto | None, str] | None = None


def _libcrypto() -> _LibCrypto | None:
    """OpenSSL's EVP calls when they pass the known-answer test, else None (``cryptography`` checks)."""
    global _BACKEND
    with _LOCK:
        if _BACKEND is None:
            lib, why = None, ""
            try:
                path = _mapped_libcrypto() or ctypes.util.find_library("crypto")
                if path is None:
                    why = "no libcrypto found"
                else:
                    candidate = _LibCrypto(path)
                    if candidate.matches(_KAT_KEY, _KAT_SIG, b"") and \
                            not candidate.matches(_KAT_KEY, _KAT_SIG[:-1] + b"\x0c", b""):
                        lib, why = candidate, path
                    else:
                        why = f"{path} failed the Ed25519 known-answer test"
            except (OSError, AttributeError, ImportError) as exc:  # no such library, or no Ed25519 in it
                why = f"libcrypto unusable: {exc}"
            if lib is None:
                _LOG.info("Ed25519 signatures are checked by the cryptography package (%s)", why)
            _BACKEND = (lib, why)
        return _BACKEND[0]


def backend() -> str:
    """What checks signatures: ``"openssl"`` (libcrypto through ctypes) or ``"cryptography"``."""
    return "openssl" if _libcrypto() is not None else "cryptography"


class PublicKey:
    """An Ed25519 public key (its 32 bytes). :meth:`matches` is the check."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise SignatureError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
        self.raw = bytes(raw)

    def matches(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is this key's Ed25519 signature of ``message``."""
        if len(signature) != 64:
            return False
        lib = _libcrypto()
        if lib is not None:
            return lib.matches(self.raw, signature, message)
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.raw.hex()[:16]}...)"


def load_public_key(path: str | Path) -> PublicKey:
    """Read an Ed25519 public key: PEM (SubjectPublicKeyInfo, as ``retrain-server keygen`` writes it)
    or the 32 raw bytes. Raises :class:`SignatureError` for anything else."""
    data = Path(path).read_bytes()
    if len(data) == 32:
        return PublicKey(data)
    text = data.decode("ascii", errors="replace")
    begin, end = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
    start = text.find(begin)
    stop = text.find(end, start + len(begin)) if start >= 0 else -1
    if start < 0 or stop < 0:
        raise SignatureError(f"{path}: not an Ed25519 public key (no PEM PUBLIC KEY block and not 32 raw bytes)")
    try:
        der = base64.b64decode("".join(text[start + len(begin):stop].split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{path}: not an Ed25519 public key (bad base64: {exc})") from exc
    if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return PublicKey(der[len(_SPKI_PREFIX):])


def signature_matches(public_key: Any, signature: bytes, message: bytes) -> bool:
    """Check with a :class:`PublicKey`, or with a key object of the ``cryptography`` package (the
    retrain server's own, which verifies what it just signed)."""
    if isinstance(public_key, PublicKey):
        return public_key.matches(signature, message)
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True

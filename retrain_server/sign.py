"""Ed25519 keys and manifest signatures (contract §6)."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_LOG = logging.getLogger(__name__)

__all__ = ["keygen", "load_private_key", "sign_bytes"]


def keygen(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``signing.key`` (PEM, mode 600) and ``signing.pub`` (PEM) into ``out_dir``.

    Refuses to overwrite an existing private key: losing it orphans every basket.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / "signing.key", out / "signing.pub"
    if key_path.exists():
        raise FileExistsError(f"{key_path} exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    _LOG.info("wrote %s and %s", key_path, pub_path)
    return key_path, pub_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read Ed25519 private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def sign_bytes(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Signature as base64 text (what ``manifest.sig`` holds)."""
    return base64.b64encode(key.sign(data)) + b"\n"

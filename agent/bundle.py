"""Verify a parameters directory before anything in it is opened.

Layout (contract §2): ``manifest.json`` lists every file with its sha256 and
size; ``manifest.sig`` is an Ed25519 signature of the exact bytes of
``manifest.json`` (base64 text, or 64 raw bytes). Only after the signature
and every hash check out are arrays loaded, with ``allow_pickle=False``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError, SignatureError

_LOG = logging.getLogger(__name__)

__all__ = ["Manifest", "verify_parameters", "load_public_key", "file_sha256", "load_array"]

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"


@dataclass(frozen=True)
class Manifest:
    """The parsed, verified ``manifest.json``."""

    root: Path
    version: str
    created_at: str
    files: Mapping[str, Mapping[str, Any]]
    metrics: Mapping[str, Any]
    models: Mapping[str, Any]
    signed: bool

    def has(self, relpath: str) -> bool:
        return relpath in self.files

    def path(self, relpath: str) -> Path:
        """Path of a file the manifest lists (refuses anything it does not)."""
        if relpath not in self.files:
            raise BundleError(f"{relpath} is not listed in {self.root / MANIFEST}")
        return self.root / relpath

    def array(self, relpath: str) -> np.ndarray:
        """A verified ``.npy`` file, loaded without pickle (an :class:`agent.layout.Source`)."""
        return load_array(self, relpath)

    def read_bytes(self, relpath: str) -> bytes:
        return self.path(relpath).read_bytes()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_public_key(path: str | Path) -> Any:
    """Read an Ed25519 public key (PEM or 32 raw bytes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = Path(path).read_bytes()
    try:
        if len(data) == 32:
            return Ed25519PublicKey.from_public_bytes(data)
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SignatureError(f"{path}: not an Ed25519 public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return key


def _decode_signature(raw: bytes) -> bytes:
    if len(raw) == 64:
        return raw
    try:
        sig = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        sig = b""
    if len(sig) != 64:
        raise SignatureError("manifest.sig is not a 64-byte Ed25519 signature")
    return sig


def verify_parameters(root: str | Path, public_key: Any | None, *,
                      allow_unsigned: bool = False) -> Manifest:
    """Check signature, then every listed file's size and sha256.

    ``public_key`` None is only accepted with ``allow_unsigned`` (development);
    a present but wrong signature is refused even then.
    """
    from cryptography.exceptions import InvalidSignature

    root = Path(root)
    manifest_path = root / MANIFEST
    try:
        raw = manifest_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc.strerror or exc}") from exc
    sig_path = root / SIGNATURE
    signed = False
    if public_key is not None and sig_path.exists():
        try:
            public_key.verify(_decode_signature(sig_path.read_bytes()), raw)
        except InvalidSignature:
            raise SignatureError(f"{sig_path}: signature does not match the public key") from None
        signed = True
    elif not allow_unsigned:
        if public_key is None:
            raise SignatureError("no public key configured (use --allow-unsigned for development)")
        raise SignatureError(f"{sig_path} is missing: parameters are unsigned")
    else:
        _LOG.warning("loading UNSIGNED parameters from %s (--allow-unsigned)", root)
    try:
        doc = json.loads(raw)
        files = doc["files"]
        version = str(doc["version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{manifest_path}: malformed manifest ({exc})") from exc
    if not isinstance(files, dict):
        raise BundleError(f"{manifest_path}: 'files' must be an object")
    for rel, info in files.items():
        if not isinstance(info, dict):
            raise BundleError(f"{manifest_path}: entry for {rel!r} must be an object")
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise BundleError(f"manifest lists a path outside the bundle: {rel}")
        if not path.is_file():
            raise BundleError(f"{rel}: listed in the manifest but missing")
        if path.stat().st_size != info.get("size"):
            raise BundleError(f"{rel}: size {path.stat().st_size} != manifest {info.get('size')}")
        if file_sha256(path) != info.get("sha256"):
            raise BundleError(f"{rel}: sha256 does not match the manifest")
    return Manifest(root=root, version=version, created_at=str(doc.get("created_at", "")),
                    files=files, metrics=doc.get("metrics") or {}, models=doc.get("models") or {},
                    signed=signed)


def load_array(manifest: Manifest, relpath: str, mmap: bool = False) -> np.ndarray:
    """np.load a verified file, never unpickling."""
    try:
        return np.load(manifest.path(relpath), allow_pickle=False,
                       mmap_mode="r" if mmap else None)
    except ValueError as exc:
        raise BundleError(f"{relpath}: cannot load without pickle ({exc})") from exc

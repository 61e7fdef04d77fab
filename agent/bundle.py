"""Verify a parameters directory before anything in it is opened.

Layout (contract §2): ``manifest.json`` lists every file with its sha256 and
size; ``manifest.sig`` is an Ed25519 signature of the exact bytes of
``manifest.json`` (base64 text, or 64 raw bytes). Only after the signature
and every hash check out are arrays loaded, never unpickled.

What is loaded is exactly what was hashed: each file the edge loads is opened
once, hashed, and later parsed from those same bytes (arrays are zero-copy
views of them), so a file swapped on disk after verification is never served.
An ``.npy`` header is checked against the bytes that follow it before anything
is allocated: a header claiming four billion rows is a one-line
:class:`BundleError`, not a crash.

Versions the agent installed itself are memory-mapped instead of read
(``map_files=True``, which the agent passes for directories under its store's
``versions/``): each file without write permission bits (the store writes every
installed file 0444, see :func:`agent.store.safe_unpack`, and never changes it
again) is mapped, hashed through the mapping and served from it, so start-up and
swaps copy nothing, resident memory counts only the pages requests touch, and
agents on one machine share the page cache. Anything else, such as a seed
directory an operator may copy into (root ignores write bits), is read into
private memory: a mapping would see a later in-place write that the hash never
checked, and a truncation would crash the process (SIGBUS).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import mmap
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError, SignatureError
from .layout import is_edge_file
from .signing import load_public_key, signature_matches

_LOG = logging.getLogger(__name__)

__all__ = ["Manifest", "verify_parameters", "load_public_key", "file_sha256", "load_array", "array_from_bytes"]

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
    #: the verified bytes of every file the edge loads (relpath -> bytes, or a read-only mmap)
    blobs: Mapping[str, bytes | mmap.mmap] = field(default_factory=dict, repr=False, compare=False)

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
        """The verified bytes of a file the edge loads (never re-read from disk)."""
        return bytes(self._blob(relpath))

    @property
    def mapped(self) -> list[str]:
        """The files served from a memory mapping (read-only on disk)."""
        return sorted(rel for rel, blob in self.blobs.items() if isinstance(blob, mmap.mmap))

    def forget_pages(self) -> None:
        """Let go of the mapped pages touched so far (verifying, checking, the smoke test): RSS then
        counts what serving touches. The pages stay in the page cache; the files never change."""
        for blob in self.blobs.values():
            if isinstance(blob, mmap.mmap):
                _forget_pages(blob)

    def _blob(self, relpath: str) -> bytes | mmap.mmap:
        self.path(relpath)  # refuses unlisted files
        try:
            return self.blobs[relpath]
        except KeyError:
            raise BundleError(f"{relpath} is not a file the edge loads") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
                      allow_unsigned: bool = False, map_files: bool = False) -> Manifest:
    """Check signature, then every listed file's size and sha256.

    ``public_key`` None is only accepted with ``allow_unsigned`` (development);
    a present but wrong signature is refused even then. ``map_files``: ``root`` is a
    version nobody rewrites (the agent's own store): its read-only files are mapped.
    """
    root = Path(root)
    manifest_path = root / MANIFEST
    try:
        raw = manifest_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc.strerror or exc}") from exc
    sig_path = root / SIGNATURE
    signed = False
    if public_key is not None and sig_path.exists():
        if not signature_matches(public_key, _decode_signature(sig_path.read_bytes()), raw):
            raise SignatureError(f"{sig_path}: signature does not match the public key")
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
    blobs: dict[str, bytes] = {}
    for rel, info in files.items():
        if not isinstance(info, dict):
            raise BundleError(f"{manifest_path}: entry for {rel!r} must be an object")
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise BundleError(f"manifest lists a path outside the bundle: {rel}")
        if not path.is_file():
            raise BundleError(f"{rel}: listed in the manifest but missing")
        size = info.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BundleError(f"{manifest_path}: entry for {rel!r} has no valid size")
        if not is_edge_file(rel):  # server-side files: checked, never loaded here
            if path.stat().st_size != size:
                raise BundleError(f"{rel}: size {path.stat().st_size} != manifest {size}")
            if file_sha256(path) != info.get("sha256"):
                raise BundleError(f"{rel}: sha256 does not match the manifest")
            continue
        data = _open_verified(path, rel, size, map_files)
        if hashlib.sha256(data).hexdigest() != info.get("sha256"):
            raise BundleError(f"{rel}: sha256 does not match the manifest")
        if isinstance(data, mmap.mmap):
            _forget_pages(data)
        blobs[rel] = data
    return Manifest(root=root, version=version, created_at=str(doc.get("created_at", "")),
                    files=files, metrics=doc.get("metrics") or {}, models=doc.get("models") or {},
                    signed=signed, blobs=blobs)


_WRITABLE = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


def _open_verified(path: Path, rel: str, size: int, map_file: bool) -> bytes | mmap.mmap:
    """The file's bytes to hash and serve: with ``map_file``, a read-only mapping of a file without
    write bits, else a private copy. Raises BundleError on a size mismatch."""
    try:
        with path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            if map_file and size and not st.st_mode & _WRITABLE and stat.S_ISREG(st.st_mode):
                if st.st_size != size:
                    raise BundleError(f"{rel}: size {st.st_size} != manifest {size}")
                return mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ)
            data = fh.read(size + 1)
    except OSError as exc:
        raise BundleError(f"cannot read {rel}: {exc.strerror or exc}") from exc
    if len(data) != size:
        raise BundleError(f"{rel}: size {len(data) if len(data) <= size else 'over'} != manifest {size}")
    return data


def _forget_pages(mapping: mmap.mmap) -> None:
    """Drop this process's page-table entries for the pages touched so far (the mapping stays): the
    pages stay in the page cache (the file cannot change, see :func:`_open_verified`) and come back on
    first use, so the process's RSS counts only the pages its traffic touches, not every byte it once
    verified or checked."""
    if hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except OSError:  # an unusual filesystem: the pages simply stay counted
            pass


def load_array(manifest: Manifest, relpath: str) -> np.ndarray:
    """A verified ``.npy`` file as an array over its verified bytes (or mapping), never unpickling."""
    return array_from_bytes(manifest._blob(relpath), relpath)


def array_from_bytes(data: bytes | mmap.mmap, what: str = "array") -> np.ndarray:
    """Parse ``.npy`` bytes without pickle, checking the header against the data before allocating.

    The result is a read-only view of ``data`` (no copy; over a mapping it stays mapped).
    """
    from numpy.lib import format as npy

    # only the header is copied: 10 bytes of preamble, then at most 2**32 of header (v2)
    pre = bytes(data[:12])
    hlen = int.from_bytes(pre[8:10], "little") + 10 if pre[6:7] == b"\x01" else int.from_bytes(
        pre[8:12], "little") + 12
    fh = io.BytesIO(bytes(data[:hlen]))
    try:
        major, _minor = npy.read_magic(fh)
        if major == 1:
            shape, fortran, dtype = npy.read_array_header_1_0(fh)
        elif major == 2:
            shape, fortran, dtype = npy.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy format version {major}")
    except ValueError as exc:
        raise BundleError(f"{what}: not a valid .npy file ({exc})") from exc
    if dtype.hasobject:
        raise BundleError(f"{what}: object arrays are refused (they would need pickle)")
    count = 1
    for dim in shape:
        count *= int(dim)
    body = len(data) - fh.tell()
    if count * dtype.itemsize != body:
        raise BundleError(f"{what}: header claims shape {shape} of {dtype} ({count * dtype.itemsize} bytes) "
                          f"but the file holds {body}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=fh.tell())
    return arr.reshape(shape, order="F" if fortran else "C")

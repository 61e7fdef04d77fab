"""Bundles: what a basket downloads — the edge's files, signed, packed as ``<version>.tar.gz``.

A server parameters directory (the seed's full layout) is packed into a
gzip tar whose members sit at top level: ``manifest.json``, ``manifest.sig``
and the :data:`agent.layout.EDGE_FILES` it holds. The bundle's manifest is
signed anew (it lists only the shipped files) but keeps the version,
``created_at`` and metrics of the parameters it came from, and only after
every shipped file was checked against the sha256 the parameters' manifest
recorded. The file is written under a temporary name and renamed, so a URL
never serves half a bundle; the same parameters always give the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent import layout
from agent.bundle import MANIFEST, SIGNATURE

from .export import sync_dir, write_manifest

_LOG = logging.getLogger(__name__)

__all__ = ["BundleInfo", "pack_bundle", "bundle_path", "BUNDLE_SUFFIX", "VERSION_PATTERN"]

BUNDLE_SUFFIX = ".tar.gz"
#: Versions become file and directory names on servers and baskets.
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class BundleInfo:
    """A packed bundle: where it is, what it weighs, its digest (the update message's ``sha256``)."""

    version: str
    path: Path
    sha256: str
    bytes: int
    created_at: str
    files: int


def bundle_path(bundle_dir: Path, version: str) -> Path:
    if not VERSION_PATTERN.match(version):
        raise ValueError(f"version {version!r} is not usable as a file name")
    return Path(bundle_dir) / f"{version}{BUNDLE_SUFFIX}"


def pack_bundle(parameters: Path, bundle_dir: Path, signing_key: Path | None) -> BundleInfo:
    """Pack the edge files of ``parameters`` into ``bundle_dir/<version>.tar.gz``."""
    parameters, bundle_dir = Path(parameters), Path(bundle_dir)
    doc = json.loads((parameters / MANIFEST).read_text(encoding="utf-8"))
    version = str(doc["version"])
    out = bundle_path(bundle_dir, version)
    shipped = sorted(rel for rel in doc["files"] if layout.is_edge_file(rel))
    if not any(rel.startswith(layout.GUEST_DIR + "/") for rel in shipped):
        raise ValueError(f"{parameters} holds no guest model: nothing to ship")
    bundle_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pack-", dir=bundle_dir) as tmp:
        stage = Path(tmp) / "bundle"
        for rel in shipped:
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(parameters / rel, dst)  # same file system: no copy
            except OSError:
                shutil.copy2(parameters / rel, dst)
        created = datetime.fromisoformat(doc["created_at"])
        signed = write_manifest(stage, metrics=doc.get("metrics"), models=doc.get("models"),
                                signing_key=signing_key, created_at=created, version=version,
                                extra={"kind": "bundle"})
        changed = [rel for rel in shipped if signed["files"][rel] != doc["files"][rel]]
        if changed:  # signing them would vouch for whatever is on disk now (a crash, an edit)
            raise ValueError(f"{parameters}: {', '.join(changed[:5])} differ from the sha256 its manifest "
                             f"recorded when it was written: not shipped (train again, or restore the files)")
        partial = Path(tmp) / (out.name + ".partial")
        stamp = int(created.timestamp())
        # The same parameters always give the same bytes (fixed times in the gzip and tar headers), so a
        # version packed again after a crash keeps the sha256 an earlier update message may already carry.
        with partial.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=stamp,
                                                     filename="") as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel in [MANIFEST, SIGNATURE, *shipped]:
                if (stage / rel).exists():
                    tar.add(stage / rel, arcname=rel, recursive=False, filter=lambda i: _plain(i, stamp))
        with partial.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256") if hasattr(hashlib, "file_digest") else None
            if digest is None:
                fh.seek(0)
                digest = hashlib.sha256(fh.read())
            os.fsync(fh.fileno())
        size = partial.stat().st_size
        partial.chmod(0o644)
        os.replace(partial, out)
        sync_dir(bundle_dir)  # the name, before an update message points agents at it
    _LOG.info("packed bundle %s: %d files, %.1f MB", out, len(shipped), size / 1e6)
    return BundleInfo(version=version, path=out, sha256=digest.hexdigest(), bytes=size,
                      created_at=str(doc["created_at"]), files=len(shipped))


def _plain(info: tarfile.TarInfo, mtime: int) -> tarfile.TarInfo:
    """No owner names or ids, fixed modes and times: a bundle says nothing about the build machine, and
    packing the same files again gives the same bytes."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    info.mtime = mtime
    info.pax_headers = {}
    return info

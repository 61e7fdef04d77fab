"""The agent's parameters directory as a store of model versions.

Layout::

    parameters/
    ├── manifest.json, manifest.sig, guest_model/, member_model/   the first version (optional;
    │                                                              what ``retrain-server train`` writes)
    └── versions/
        ├── 20261124T030000Z-9f1c2a/     one directory per installed bundle (same layout)
        ├── 20261125T030000Z-0b77de/
        ├── .incoming-<random>/          a bundle being unpacked (deleted at start-up)
        ├── .download-<random>.tar.gz    a bundle being downloaded (deleted at start-up)
        └── .rejected-<version>/         the last directory found corrupt, kept for inspection

Why a store and not one directory: a download must never touch what is
serving, a crash must never leave a half-written version under its final name
(unpack into ``.incoming-*``, then one ``os.rename``), and the previous
version stays on disk so a restart after a bad night still has something
verified to serve. At start-up the newest verified version wins (by the
manifest's ``created_at``, then version string); a corrupt newest one is
skipped, moved aside, logged and reported.

Bundles come from the network before anything in them is verified, so
:func:`safe_unpack` trusts nothing: regular files and directories only,
normalised relative names, no links or devices, size limits enforced while
reading, file modes chosen here rather than taken from the archive.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from .bundle import MANIFEST
from .errors import BundleError, StorageError

_LOG = logging.getLogger(__name__)

__all__ = ["remove_path", "VersionStore", "Candidate", "StartupResult", "UnsafeBundle", "safe_unpack", "one_line",
           "validate_version", "VERSION_RE"]

#: what a version string may look like (it becomes a directory name)
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

VERSIONS_DIR = "versions"
INCOMING_PREFIX = ".incoming-"
DOWNLOAD_PREFIX = ".download-"
REJECTED_PREFIX = ".rejected-"

_MIN_TIME = datetime.min.replace(tzinfo=timezone.utc)
_CHUNK = 1 << 18
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class UnsafeBundle(BundleError):
    """Raised when an archive holds something that must never be written to disk."""


def validate_version(version: object) -> str:
    """Return ``version`` when it is safe as a directory name; raises ValueError otherwise."""
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ValueError(f"version must match {VERSION_RE.pattern}, got {version!r}")
    return version


def _parse_time(value: object) -> datetime:
    """ISO 8601 -> aware datetime; unreadable values sort as oldest (never win by accident)."""
    if not isinstance(value, str) or not value:
        return _MIN_TIME
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return _MIN_TIME
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Candidate:
    """A directory that claims to hold a version (its manifest is read, not yet verified)."""

    path: Path
    version: str
    created_at: datetime
    seed: bool  # the top-level (first) version, never deleted by the store

    @property
    def sort_key(self) -> tuple[datetime, str, int]:
        return (self.created_at, self.version, 0 if self.seed else 1)


@dataclass
class StartupResult:
    """What :meth:`VersionStore.load_newest` chose, and what it had to skip on the way."""

    snapshot: Any
    candidate: Candidate
    rejected: list[tuple[Candidate, str]] = field(default_factory=list)  # newest first


def _check_member(member: tarfile.TarInfo) -> str:
    """The member's name when it may be written; raises UnsafeBundle otherwise."""
    name = member.name
    if not member.isdir() and member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = ("symlink" if member.issym() else "hard link" if member.islnk() else
                "device" if member.isdev() else "sparse file" if member.issparse() else
                f"type {member.type!r}")
        raise UnsafeBundle(f"unsafe tar member {name!r}: {kind}")
    if (not name or name.startswith("/") or _BAD_CHARS.search(name) or posixpath.normpath(name) != name
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise UnsafeBundle(f"unsafe tar member {name!r}")
    return name


class _CappedReader:
    """Counts decompressed bytes so a small gzip cannot expand into an endless tar stream."""

    def __init__(self, raw: IO[bytes], cap: int) -> None:
        self.raw, self.cap, self.count = raw, cap, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        if self.count > self.cap:
            raise UnsafeBundle(f"bundle expands beyond {self.cap} bytes")
        return data


def safe_unpack(archive: Path, dest: Path, *, max_file_bytes: int, max_total_bytes: int,
                max_members: int = 10000) -> int:
    """Unpack a ``.tar.gz`` into the empty directory ``dest``; returns the bytes written.

    Does not use ``tarfile.extractall`` (its ``filter=`` needs Python 3.12):
    every member is checked here and written with ``O_EXCL | O_NOFOLLOW`` and
    modes 0444 (files: never changed again, so :mod:`agent.bundle` maps them) and
    0755 (directories). Raises UnsafeBundle (or BundleError for a broken archive).
    """
    import gzip
    import zlib

    written = 0
    seen: set[str] = set()
    # tar headers and padding add at most a few KiB per member on top of the contents
    cap = max_total_bytes + (max_members + 16) * 3 * 512
    try:
        with gzip.open(archive, "rb") as gz:
            reader = _CappedReader(gz, cap)
            with tarfile.open(fileobj=reader, mode="r|") as tf:  # type: ignore[call-overload]
                for count, member in enumerate(tf, 1):
                    if count > max_members:
                        raise UnsafeBundle(f"bundle has more than {max_members} members")
                    name = _check_member(member)
                    if name in seen:
                        raise UnsafeBundle(f"unsafe tar member {name!r}: listed twice")
                    seen.add(name)
                    target = dest / name
                    if member.isdir():
                        target.mkdir(mode=0o755, parents=True, exist_ok=True)
                        continue
                    if member.size > max_file_bytes:
                        raise UnsafeBundle(f"tar member {name!r} is {member.size} bytes "
                                           f"(limit {max_file_bytes})")
                    written += member.size
                    if written > max_total_bytes:
                        raise UnsafeBundle(f"bundle contents exceed {max_total_bytes} bytes")
                    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                    src = tf.extractfile(member)
                    if src is None:  # cannot happen for a regular file
                        raise UnsafeBundle(f"tar member {name!r} has no data")
                    # read-only from birth: a version is never changed once written, and files
                    # without write bits are what agent.bundle memory-maps
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
                    with os.fdopen(fd, "wb") as out:
                        left = member.size
                        while left > 0:
                            chunk = src.read(min(_CHUNK, left))
                            if not chunk:
                                raise BundleError(f"tar member {name!r} is truncated")
                            out.write(chunk)
                            left -= len(chunk)
                        out.flush()
                        os.fsync(out.fileno())  # on disk before the rename that makes it a version
    except BundleError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BundleError(f"bundle is not a valid tar.gz ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:  # e.g. a file where the archive wants a directory, or disk full
        raise _disk_error(exc, "cannot unpack bundle") from exc
    return written


#: errno values that say the agent's own disk failed, not the bundle
_LOCAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.ENOMEM,
                           errno.EMFILE, errno.ENFILE, errno.EACCES, errno.EPERM})


def _disk_error(exc: OSError, doing: str) -> BundleError:
    """A StorageError (tried again on the next delivery) when the disk failed, else a BundleError (remembered
    as rejected: the same bytes would fail again)."""
    kind = StorageError if exc.errno in _LOCAL_ERRNOS else BundleError
    return kind(f"{doing}: {exc.strerror or exc}")


class VersionStore:
    """Versions under one parameters directory: listing, start-up choice, install, prune."""

    def __init__(self, parameters_dir: str | Path, *, keep_versions: int = 3,
                 max_file_bytes: int = 512 << 20, max_total_bytes: int = 1 << 30) -> None:
        self.root = Path(parameters_dir)
        self.versions = self.root / VERSIONS_DIR
        self.keep_versions = max(1, keep_versions)
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes

    # -- listing -----------------------------------------------------------------------------
    def _candidate(self, path: Path, seed: bool) -> Candidate | None:
        manifest = path / MANIFEST
        if not manifest.is_file():
            return None
        try:
            doc = json.loads(manifest.read_bytes())
            version = str(doc["version"]) if isinstance(doc, dict) else ""
            created = doc.get("created_at") if isinstance(doc, dict) else None
        except (OSError, ValueError, KeyError):
            version, created = "", None
        # an unreadable manifest is still a candidate: loading it says what is wrong
        return Candidate(path, version or path.name, _parse_time(created), seed)

    def candidates(self) -> list[Candidate]:
        """Every directory that may hold a version, newest first (manifests unverified)."""
        found: list[Candidate] = []
        seed = self._candidate(self.root, True)
        if seed is not None:
            found.append(seed)
        if self.versions.is_dir():
            for path in self.versions.iterdir():
                if path.name.startswith(".") or not path.is_dir():
                    continue
                cand = self._candidate(path, False)
                if cand is not None:
                    found.append(cand)
        return sorted(found, key=lambda c: c.sort_key, reverse=True)

    def owns(self, path: str | Path) -> bool:
        """True for a directory under ``versions/``: written by this store, read-only, never rewritten
        (so its files may be memory-mapped; a seed directory may be copied over in place)."""
        return self.versions.resolve() in Path(path).resolve().parents

    def path_of(self, version: str) -> Path:
        return self.versions / validate_version(version)

    def has(self, version: str) -> bool:
        try:
            return (self.path_of(version) / MANIFEST).is_file()
        except ValueError:
            return False

    # -- start-up ----------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Delete what a crash may have left half-written (``.incoming-*``, ``.download-*``)."""
        if not self.versions.is_dir():
            return
        for path in self.versions.iterdir():
            if path.name.startswith((INCOMING_PREFIX, DOWNLOAD_PREFIX)):
                _LOG.info("removing leftover %s", path)
                remove_path(path)

    def load_newest(self, loader: Callable[[Path], Any]) -> StartupResult:
        """Load the newest version that verifies, falling back to older ones.

        ``loader(path)`` verifies and loads (``load_snapshot``) and raises on failure.
        A versions/ directory that fails is moved to ``.rejected-<name>``. Raises
        BundleError when nothing loads (with the newest candidate's reason first).
        """
        candidates = self.candidates()
        if not candidates:
            loader(self.root)  # raises with the usual message ("cannot read .../manifest.json")
            raise BundleError(f"no parameters found in {self.root}")
        rejected: list[tuple[Candidate, str]] = []
        last_error = ""
        for cand in candidates:
            t0 = time.perf_counter()
            try:
                if not cand.seed and cand.version != cand.path.name:
                    raise BundleError(f"directory name differs from the manifest version {cand.version!r}")
                snapshot = loader(cand.path)
            except Exception as exc:
                rejected.append((cand, one_line(exc, cand.path)))
                last_error = one_line(exc)
                continue
            for bad, reason in rejected:  # logged only now: when nothing loads, the caller says it once
                _LOG.error("version %s (%s) cannot be served, skipped: %s", bad.version, bad.path, reason)
                if not bad.seed:
                    self.set_aside(bad.path)
            _LOG.info("start-up: serving version %s from %s (loaded in %.0f ms)%s", cand.version, cand.path,
                      (time.perf_counter() - t0) * 1000,
                      f", {len(rejected)} newer version(s) skipped" if rejected else "")
            return StartupResult(snapshot, cand, rejected)
        if len(rejected) == 1:
            raise BundleError(last_error)
        raise BundleError("no version loads: " + "; ".join(f"{c.version}: {r}" for c, r in rejected))

    # -- installing --------------------------------------------------------------------------
    def _ensure_versions(self) -> None:
        try:
            self.versions.mkdir(mode=0o755, parents=False, exist_ok=True)
        except OSError as exc:
            raise BundleError(f"cannot create {self.versions}: {exc.strerror or exc}") from exc

    def new_download(self) -> Path:
        """A fresh temp file path inside the store (same file system as the versions)."""
        self._ensure_versions()
        return self.versions / f"{DOWNLOAD_PREFIX}{uuid.uuid4().hex[:12]}.tar.gz"

    def new_incoming(self) -> Path:
        """A fresh, empty ``versions/.incoming-<random>/`` directory."""
        self._ensure_versions()
        path = self.versions / f"{INCOMING_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            path.mkdir(mode=0o755)
        except OSError as exc:
            raise _disk_error(exc, f"cannot create {path}") from exc
        return path

    def unpack(self, archive: Path, dest: Path) -> int:
        return safe_unpack(archive, dest, max_file_bytes=self.max_file_bytes,
                           max_total_bytes=self.max_total_bytes)

    def install(self, incoming: Path, version: str) -> Path:
        """Give a verified incoming directory its final name in one ``os.rename``."""
        final = self.path_of(version)
        if final.exists():  # an older, broken copy of the same version
            self.set_aside(final)
        try:
            _fsync_tree(incoming)  # a power cut after the rename must find complete files under the name
            os.rename(incoming, final)
            _fsync_dir(self.versions)  # ... and the rename itself
        except OSError as exc:
            raise _disk_error(exc, f"cannot install {version}") from exc
        return final

    def set_aside(self, path: Path) -> None:
        """Move a corrupt version out of the way (kept once, for inspection)."""
        target = self.versions / f"{REJECTED_PREFIX}{path.name}"
        try:
            if target.exists():
                remove_path(target)
            os.rename(path, target)
            _LOG.warning("moved %s aside to %s", path, target)
        except OSError as exc:
            _LOG.warning("could not move %s aside: %s", path, exc)

    def discard(self, path: Path | None) -> None:
        """Delete a temp file or directory of a failed install; never raises."""
        if path is not None and path.exists():
            remove_path(path)

    def prune(self, serving: str | None) -> list[str]:
        """Keep ``keep_versions`` versions under versions/ (the serving one always); returns removed."""
        if not self.versions.is_dir():
            return []
        installed = [c for c in self.candidates() if not c.seed]
        keep: set[str] = {serving} if serving else set()
        for cand in installed:
            if len(keep) >= self.keep_versions:
                break
            keep.add(cand.version)
        removed = []
        for cand in installed:
            if cand.version not in keep and cand.path.name not in keep:
                _LOG.info("pruning old version %s", cand.version)
                # Renamed first, so a power cut mid-delete leaves a leftover cleanup() removes,
                # never a half-deleted directory under a version's name.
                doomed = self.versions / f"{INCOMING_PREFIX}pruned-{uuid.uuid4().hex[:12]}"
                try:
                    cand.path.rename(doomed)
                except OSError:
                    doomed = cand.path
                remove_path(doomed)
                removed.append(cand.version)
        rejected = sorted((p for p in self.versions.iterdir() if p.name.startswith(REJECTED_PREFIX)),
                          key=lambda p: p.stat().st_mtime, reverse=True)
        for path in rejected[1:]:
            remove_path(path)
        return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Directory entries of an unpacked version (its files were synced as they were written)."""
    for dirpath, _dirs, _files in os.walk(root):
        _fsync_dir(Path(dirpath))


def one_line(exc: BaseException, *roots: Path) -> str:
    """An exception as one short line, without the temp paths it may name."""
    text = str(exc) or type(exc).__name__
    for root in roots:
        text = text.replace(f"{root}/", "").replace(str(root), ".")
    return " ".join(text.split())


def remove_path(path: Path) -> bool:
    """Delete a file or a directory tree (never following a symlink); False when nothing was removed."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        _LOG.warning("could not remove %s: %s", path, exc)
        return False
    return True

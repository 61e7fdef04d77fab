"""Model updates (contract §5): download, verify, load beside, smoke-test, swap.

The retrain server announces a bundle with a retained QoS 1 message on
``PREFIX/models/updated``::

    {"version": "...", "url": "http://.../<version>.tar.gz", "sha256": "<of the file>",
     "created_at": "...", "metrics": {...}}

:meth:`Updater.submit` is called by the service's worker for each such message
(the retained one on every connect included). It only parses and queues: a
download must never hold up cart events. The queue holds one message (the
latest wins). The updater's own thread then

1. waits a random jitter in [0, ``jitter_s``] (so a store's baskets do not all
   download at the same second; interrupted by :meth:`stop`),
2. downloads with urllib (http/https only, redirects too; connect/read timeout;
   the size limit enforced while streaming into a temp file inside the store,
   hashing as it goes) and compares the sha256 with the message,
3. unpacks safely into ``versions/.incoming-*`` (:func:`agent.store.safe_unpack`),
4. checks that the manifest's version is the message's, verifies the signature
   and every file hash, loads the models beside the serving ones and runs a
   smoke recommendation (``loader`` = :func:`agent.registry.load_snapshot`),
5. renames the directory to ``versions/<version>``, swaps the registry's one
   reference, prunes old versions and reports ``applied``.

Any failure keeps the old models serving, deletes the temp files and reports
``rejected`` with a one-line reason. A version already serving is not applied
again, nor one already rejected for the same bundle sha256 (a failed
*download* is not remembered: the next delivery of the message retries it).
Nothing is ever unpickled.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import http.client
import json
import logging
import random
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .bundle import MANIFEST
from .errors import BundleError, StorageError
from .registry import ModelRegistry, ModelSnapshot
from .store import VERSION_RE, VersionStore, one_line

_LOG = logging.getLogger(__name__)

__all__ = ["UpdateMessage", "InvalidUpdate", "parse_update", "Updater", "ReportFn", "MAX_MESSAGE_BYTES"]

#: an update message is a few hundred bytes; anything much larger is not one
MAX_MESSAGE_BYTES = 16384
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_CHUNK = 1 << 18
_REMEMBER_REJECTED = 64

#: ``report(version, result, reason)``; result is "applied" or "rejected"
ReportFn = Callable[[Any, str, Any], None]


@dataclass(frozen=True)
class UpdateMessage:
    """A validated model update message."""

    version: str
    url: str
    sha256: str  # lower-case hex
    created_at: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    size: int | None = None  # the server's optional "bytes": lets an oversized bundle be refused unfetched


class InvalidUpdate(ValueError):
    """Raised for a message that is not a usable update; ``version`` when it could be read."""

    def __init__(self, reason: str, version: str | None = None) -> None:
        self.reason, self.version = reason, version
        super().__init__(reason)


class _Failed(Exception):
    """An update step failed; ``transient`` failures (network) are not remembered."""

    def __init__(self, reason: str, transient: bool = False) -> None:
        self.reason, self.transient = reason, transient
        super().__init__(reason)


def parse_update(payload: bytes) -> UpdateMessage:
    """Validate an update message; raises InvalidUpdate naming every problem."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise InvalidUpdate(f"malformed update message: larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidUpdate("malformed update message: not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidUpdate("malformed update message: not a JSON object")
    problems = []
    version, url, sha, created, metrics, size = (doc.get(k) for k in ("version", "url", "sha256", "created_at",
                                                                      "metrics", "bytes"))
    if not isinstance(version, str) or not VERSION_RE.match(version):
        problems.append(f"version must match {VERSION_RE.pattern}, got {_short(version)}")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        problems.append(f"url must be an http(s) URL, got {_short(url)}")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        problems.append(f"sha256 must be 64 hex digits, got {_short(sha)}")
    if created is not None and not isinstance(created, str):
        problems.append(f"created_at must be a string, got {_short(created)}")
    if metrics is not None and not isinstance(metrics, dict):
        problems.append(f"metrics must be an object, got {_short(metrics)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        problems.append(f"bytes must be a non-negative integer, got {_short(size)}")
    readable = version[:128] if isinstance(version, str) and version else None
    if problems:
        raise InvalidUpdate("malformed update message: " + "; ".join(problems), readable)
    return UpdateMessage(version=version, url=url, sha256=sha.lower(), created_at=created,  # type: ignore[arg-type]
                         metrics=metrics or {}, size=size)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib alone would also follow ftp:)."""

    max_redirections = 5

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> Any:
        scheme = urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise _Failed(f"download failed: redirect to a {scheme!r} URL refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    """http, https (certificates checked), proxies from the environment; no file:, ftp:, data:."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(context=ssl.create_default_context()),
                    _HttpOnlyRedirects(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


@dataclass
class _Job:
    message: UpdateMessage
    received: float  # time.perf_counter() when the message arrived


class Updater:
    """Applies announced bundles on its own thread; see the module docstring."""

    def __init__(self, store: VersionStore, registry: ModelRegistry, loader: Callable[[Path], ModelSnapshot],
                 report: ReportFn | None = None, *, jitter_s: float = 30.0,
                 max_bundle_bytes: int = 64 << 20, timeout_s: float = 30.0,
                 max_download_s: float = 900.0, rng: random.Random | None = None) -> None:
        self.store = store
        self.registry = registry
        self.loader = loader
        self.report = report
        self.jitter_s = max(0.0, jitter_s)
        self.max_bundle_bytes = max_bundle_bytes
        self.timeout_s = timeout_s
        self.max_download_s = max_download_s
        self.rng = rng or random.Random()
        #: seconds of each step of the last attempt (jitter, download, unpack, load, total)
        self.last_timings: dict[str, float] = {}
        self._rejected: dict[tuple[str, str], str] = {}  # (version, sha256) -> reason
        self._pending: _Job | None = None
        self._busy = False
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="model-updater", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop waiting/downloading; an update in flight is abandoned (temp files removed)."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            _LOG.warning("model updater did not stop within %.1f s", timeout)
        self._thread = None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once nothing is queued or being applied (for tests and orderly shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout)

    # -- intake (service worker thread) ----------------------------------------------------
    def submit(self, payload: bytes, received: float | None = None) -> None:
        """Parse an update message and queue it (latest wins); never blocks."""
        received = time.perf_counter() if received is None else received
        if not payload:
            _LOG.debug("empty message on models/updated (retained message cleared): ignored")
            return
        try:
            msg = parse_update(payload)
        except InvalidUpdate as exc:
            _LOG.warning("update message rejected: %s", exc.reason)
            self._report(exc.version, "rejected", exc.reason)
            return
        if self._skip(msg):
            return
        with self._cond:
            replaced, self._pending = self._pending, _Job(msg, received)
            self._wake.set()
        if replaced is not None and replaced.message.version != msg.version:
            _LOG.info("update %s superseded by %s before it started", replaced.message.version, msg.version)
        _LOG.info("update %s announced (%s): queued", msg.version, msg.url)

    def _skip(self, msg: UpdateMessage) -> bool:
        current = self.registry.current
        if current is not None and current.version == msg.version:
            _LOG.info("update %s: already serving it, not applied again", msg.version)
            return True
        reason = self._rejected.get((msg.version, msg.sha256))
        if reason is not None:
            _LOG.info("update %s: this bundle was already rejected (%s), not tried again", msg.version, reason)
            return True
        return False

    def _report(self, version: str | None, result: str, reason: str | None) -> None:
        if self.report is None:
            return
        try:
            self.report(version, result, reason)
        except Exception:
            _LOG.exception("update report callback failed")

    # -- the updater thread ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.is_set():
                break
            delay = self.rng.uniform(0.0, self.jitter_s) if self.jitter_s > 0 else 0.0
            if delay > 0:
                with self._cond:
                    version = self._pending.message.version if self._pending else "?"
                _LOG.info("update %s: waiting %.3f s before downloading (jitter up to %g s)", version, delay,
                          self.jitter_s)
                if self._stop.wait(delay):
                    break
            with self._cond:
                job, self._pending = self._pending, None
                self._wake.clear()
                self._busy = job is not None
            if job is None:
                continue
            try:
                self._apply(job, delay)
            except Exception:  # never let the thread die: the next message must still work
                _LOG.exception("update %s: unexpected failure", job.message.version)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        with self._cond:
            self._pending, self._busy = None, False
            self._cond.notify_all()

    def _apply(self, job: _Job, jitter: float) -> None:
        msg = job.message
        if self._skip(msg):  # something else applied it meanwhile
            return
        self.last_timings = {"jitter_s": jitter}
        t0 = time.perf_counter()
        try:
            snapshot = self._obtain(msg)
        except _Failed as exc:
            self._rejected_with(msg, exc.reason, exc.transient)
            return
        except StorageError as exc:  # this agent's disk (full, read-only): the same bundle may well work later
            self._rejected_with(msg, one_line(exc), True)
            return
        except BundleError as exc:
            self._rejected_with(msg, one_line(exc), False)
            return
        except Exception as exc:  # a loader/numpy/onnxruntime surprise: still a rejection
            _LOG.exception("update %s: failed", msg.version)
            self._rejected_with(msg, f"{type(exc).__name__}: {one_line(exc)}", False)
            return
        if self._stop.is_set():
            _LOG.info("update %s: stopping, not swapped in", msg.version)
            return
        old = self.registry.swap(snapshot)
        now = time.perf_counter()
        self.last_timings.update(apply_s=now - t0, total_s=now - job.received)
        _LOG.info("update %s: applied (was %s); %.0f ms after the message (jitter %.0f ms, work %.0f ms)",
                  msg.version, old.version if old else None, (now - job.received) * 1000, jitter * 1000,
                  (now - t0) * 1000)
        try:
            removed = self.store.prune(snapshot.version)
            if removed:
                _LOG.info("pruned old versions: %s", ", ".join(removed))
        except OSError as exc:
            _LOG.warning("pruning old versions failed: %s", exc)
        self._report(msg.version, "applied", None)
        del old, snapshot
        _release_freed_memory()

    def _rejected_with(self, msg: UpdateMessage, reason: str, transient: bool) -> None:
        current = self.registry.current
        _LOG.error("update %s rejected: %s (still serving %s)", msg.version, reason,
                   current.version if current else None)
        if not transient:
            if len(self._rejected) >= _REMEMBER_REJECTED:
                self._rejected.pop(next(iter(self._rejected)))
            self._rejected[(msg.version, msg.sha256)] = reason
        self._report(msg.version, "rejected", reason)

    def _obtain(self, msg: UpdateMessage) -> ModelSnapshot:
        """A verified, loaded, smoke-tested snapshot of ``msg.version``, installed in the store."""
        if self.store.has(msg.version):  # e.g. a rollback to a version kept on disk
            path = self.store.path_of(msg.version)
            t = time.perf_counter()
            try:
                snap = self.loader(path)
                if snap.version != msg.version:
                    raise BundleError(f"manifest version {snap.version!r} differs from the directory name")
            except Exception as exc:
                _LOG.warning("update %s: the copy on disk does not load (%s); downloading it again",
                             msg.version, one_line(exc, path))
                self.store.set_aside(path)
            else:
                self.last_timings["load_s"] = time.perf_counter() - t
                _LOG.info("update %s: loaded the copy already on disk in %.0f ms", msg.version,
                          self.last_timings["load_s"] * 1000)
                return snap
        download: Path | None = None
        incoming: Path | None = None
        try:
            download = self.store.new_download()
            t = time.perf_counter()
            size = self._download(msg, download)
            self.last_timings["download_s"] = time.perf_counter() - t
            _LOG.info("update %s: downloaded %d bytes in %.0f ms, sha256 matches", msg.version, size,
                      self.last_timings["download_s"] * 1000)
            t = time.perf_counter()
            incoming = self.store.new_incoming()
            unpacked = self.store.unpack(download, incoming)
            self.store.discard(download)
            download = None
            self.last_timings["unpack_s"] = time.perf_counter() - t
            _LOG.info("update %s: unpacked %d bytes in %.0f ms", msg.version, unpacked,
                      self.last_timings["unpack_s"] * 1000)
            self._check_manifest_version(incoming, msg.version)
            t = time.perf_counter()
            try:
                snap = self.loader(incoming)
            except Exception as exc:
                raise _Failed(one_line(exc, incoming)) from exc
            if snap.version != msg.version:  # the verified value this time
                raise _Failed(f"manifest version {snap.version!r} differs from the message's {msg.version!r}")
            self.last_timings["load_s"] = time.perf_counter() - t
            _LOG.info("update %s: signature, hashes, load and smoke test passed in %.0f ms", msg.version,
                      self.last_timings["load_s"] * 1000)
            if self._stop.is_set():
                raise _Failed("agent stopping", transient=True)
            self.store.install(incoming, msg.version)
            incoming = None
            return snap
        finally:
            self.store.discard(download)
            self.store.discard(incoming)

    @staticmethod
    def _check_manifest_version(root: Path, expected: str) -> None:
        """Cheap early check (unverified read; the verified version is compared again after loading)."""
        try:
            doc = json.loads((root / MANIFEST).read_bytes())
            version = doc.get("version") if isinstance(doc, dict) else None
        except FileNotFoundError:
            raise _Failed(f"bundle has no {MANIFEST}") from None
        except (OSError, ValueError) as exc:
            raise _Failed(f"bundle {MANIFEST} is unreadable: {exc}") from None
        if version != expected:
            raise _Failed(f"manifest version {version!r} differs from the message's {expected!r}")

    def _download(self, msg: UpdateMessage, dest: Path) -> int:
        """Stream ``msg.url`` into ``dest`` (size-limited, hashed); returns its size."""
        limit = self.max_bundle_bytes
        if msg.size is not None and msg.size > limit:
            raise _Failed(f"bundle too large: {msg.size} bytes (limit {limit})")
        deadline = time.monotonic() + self.max_download_s
        digest = hashlib.sha256()
        size = 0
        req = urllib.request.Request(msg.url, headers={"User-Agent": "smartbasket-agent",
                                                       "Accept-Encoding": "identity"})
        try:
            with _opener().open(req, timeout=self.timeout_s) as resp, dest.open("xb") as out:
                length_header = resp.headers.get("Content-Length")
                length = int(length_header) if length_header and length_header.isdigit() else None
                if length is not None and length > limit:
                    raise _Failed(f"bundle too large: {length} bytes (limit {limit})")
                while True:
                    # read1: what one read of the socket gives (each bounded by timeout_s), so the deadline
                    # and stop() are checked between reads; read(_CHUNK) waited for the whole chunk, and a
                    # server sending a byte at a time within timeout_s held the updater for as long as it liked
                    chunk = resp.read1(_CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > limit:
                        raise _Failed(f"bundle too large: more than {limit} bytes (limit {limit})")
                    digest.update(chunk)
                    out.write(chunk)
                    if self._stop.is_set():
                        raise _Failed("download abandoned: agent stopping", transient=True)
                    if time.monotonic() > deadline:
                        raise _Failed(f"download failed: took longer than {self.max_download_s:g} s",
                                      transient=True)
        except _Failed:
            raise
        except urllib.error.HTTPError as exc:
            exc.close()
            raise _Failed(f"download failed: HTTP {exc.code}", transient=exc.code >= 500) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
            raise _Failed(f"download failed: {text}", transient=True) from None
        except TimeoutError:
            raise _Failed("download failed: timed out", transient=True) from None
        except http.client.IncompleteRead as exc:
            raise _Failed(f"download truncated: got {size + len(exc.partial)} bytes", transient=True) from None
        except (http.client.HTTPException, ValueError) as exc:
            raise _Failed(f"download failed: {type(exc).__name__}: {exc}", transient=True) from None
        except OSError as exc:
            raise _Failed(f"download failed: {exc.strerror or exc}", transient=True) from None
        if length is not None and size != length:
            raise _Failed(f"download truncated: got {size} of {length} bytes", transient=True)
        got = digest.hexdigest()
        if got != msg.sha256:
            raise _Failed(f"sha256 mismatch: the bundle's is {got[:16]}..., the message says {msg.sha256[:16]}...")
        return size


def _release_freed_memory() -> None:
    """Hand the previous version's freed heap back to the OS after a swap.

    glibc keeps freed memory in its arenas: without this an agent's RSS settled
    ~130 MB above its start after a few swaps of a 50,000-product bundle
    (bench/bench_nightly.py), although nothing leaked.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


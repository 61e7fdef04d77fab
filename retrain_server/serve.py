"""The long-running side of ``retrain-server serve``: bundle HTTP server, nightly schedule, bundle pruning.

Plain pieces the lead's ``serve`` command wires together; none of them reads
the configuration or knows the nightly job:

* :func:`create_app` — ``GET``/``HEAD /bundles/{name}`` (only ``<version>.tar.gz``
  inside the bundle directory) and ``GET /health`` (200 when ``status`` is ``ok``,
  503 otherwise, so a load balancer or monitor needs no JSON parsing).
* :class:`BundleServer` — uvicorn in a background thread, like the agent's HttpBridge.
* :func:`next_run` / :class:`Scheduler` — "03:00 Asia/Seoul" every day, DST-safe.
* :func:`prune_bundles` — keeps the newest bundles and never the published one.
"""

from __future__ import annotations

import logging
import re
import threading
import time as _time
from collections.abc import Callable, Collection
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, JSONResponse, Response

from agent.config import HttpConfig
from agent.http import make_server, server_config
from agent.store import remove_path

from .errors import ConfigError, PublishError, RetrainError
from .publish import BUNDLE_NAME_RE, BUNDLE_SUFFIX

T = TypeVar("T")

_LOG = logging.getLogger(__name__)

__all__ = ["create_app", "BundleServer", "next_run", "Scheduler", "prune_bundles", "parse_time_of_day", "ttl_cached",
           "STALE_SUFFIXES"]

_AT_RE = re.compile(r"^(\d{2}):(\d{2})$")
#: leftovers of an interrupted write (temp file, partial download) that pruning may remove
STALE_SUFFIXES = (".tmp", ".partial")


# -- HTTP -----------------------------------------------------------------------------------
def _not_found() -> JSONResponse:
    return JSONResponse({"error": "not found"}, status_code=404)


def create_app(bundle_dir: Path, health: Callable[[], dict[str, Any]]) -> FastAPI:
    """The bundle server app: bundles by name and ``/health`` from the caller's ``health()``.

    No OpenAPI/docs pages: the port may be reachable by every basket, so it
    exposes nothing but what agents and monitors need. Further routes (the
    operations console) can be added to the returned app.
    """
    root = Path(bundle_dir).resolve()
    app = FastAPI(title="Smart Basket retrain server", docs_url=None, redoc_url=None, openapi_url=None)

    @app.api_route("/bundles/{name}", methods=["GET", "HEAD"])
    def bundle(name: str) -> Response:  # sync: stat/resolve run in the threadpool
        if not BUNDLE_NAME_RE.match(name):
            return _not_found()
        try:
            path = (root / name).resolve()
        except (OSError, RuntimeError):  # symlink loop
            return _not_found()
        # A symlink may point anywhere: the resolved file must still be directly inside the directory.
        if path.parent != root or not path.is_file():
            return _not_found()
        return FileResponse(path, media_type="application/gzip")

    @app.api_route("/health", methods=["GET", "HEAD"])
    def health_route() -> JSONResponse:
        try:
            doc = health()
        except Exception as exc:  # a broken health hook must still answer, and say so
            _LOG.exception("health() failed")
            return JSONResponse({"status": "error", "error": f"{type(exc).__name__}: {exc}"[:300]},
                                status_code=503)
        ok = isinstance(doc, dict) and doc.get("status") == "ok"
        return JSONResponse(jsonable_encoder(doc), status_code=200 if ok else 503)

    return app


def ttl_cached(fn: Callable[[], T], ttl_s: float, clock: Callable[[], float] = _time.monotonic) -> Callable[[], T]:
    """``fn()``'s result, computed at most once every ``ttl_s`` and by one caller at a time (the others wait and
    share it): ``/health`` and ``/api/models`` open a PostgreSQL connection each, and anyone may ask for them."""
    lock = threading.Lock()
    last: list[tuple[float, T]] = []

    def call() -> T:
        with lock:
            if last and clock() - last[0][0] < ttl_s:
                return last[0][1]
            value = fn()  # an exception is not cached: the next caller tries again
            last[:] = [(clock(), value)]
            return value

    return call


class BundleServer:
    """Runs the app with uvicorn in a background thread (inside ``retrain-server serve``).

    ``port`` 0 picks a free port; :attr:`url` tells which one after :meth:`start`.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8700, http: HttpConfig | None = None) -> None:
        # Every basket must reach this port: the agent bridge's limits (connections in all and per client,
        # a deadline for each request head, one throttled log line per kind of bad request), from ``http``
        # (the bridge's defaults when None). Plain uvicorn kept any number of silent connections open.
        self.host, self.port = host, port
        self.server = make_server(server_config(app, host, port, http or HttpConfig()))
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._serve, name="bundle-server", daemon=True)

    def _serve(self) -> None:
        try:
            self.server.run()
        except SystemExit:  # uvicorn exits when it cannot bind; start() reports it
            _LOG.debug("uvicorn exited during start-up")

    @property
    def url(self) -> str:
        """``http://host:port`` as bound (IPv6 hosts bracketed); the real port once started."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; PublishError when the port cannot be opened within ``timeout``."""
        if self._thread.is_alive():
            return
        self._thread.start()
        deadline = _time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or _time.monotonic() > deadline:
                if self._thread.is_alive():
                    self.stop()
                raise PublishError(f"bundle server could not listen on {self.host}:{self.port} (port in use?)")
            _time.sleep(0.02)
        if self.port == 0:
            for server in getattr(self.server, "servers", []):
                for sock in server.sockets:
                    self.port = sock.getsockname()[1]
                    break
        _LOG.info("serving bundles on %s", self.url)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let running downloads finish (at most 2 s), join the thread."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)


# -- schedule -------------------------------------------------------------------------------
def parse_time_of_day(at: str) -> time:
    """``"HH:MM"`` (24 h) -> time; ConfigError otherwise."""
    m = _AT_RE.match(at) if isinstance(at, str) else None
    if m is None or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise ConfigError(f"time of day must be HH:MM (00:00..23:59), got {at!r}")
    return time(int(m.group(1)), int(m.group(2)))


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ConfigError(f"unknown time zone {tz!r}") from None


def next_run(now: datetime, at: str = "03:00", tz: str = "Asia/Seoul") -> datetime:
    """The first wall-clock ``at`` in zone ``tz`` strictly after ``now``, as an aware datetime in ``tz``.

    Compared in UTC, since aware datetimes sharing a tzinfo compare by wall time
    and would get DST folds wrong. A time skipped by a spring-forward gap runs once,
    just after the gap; a time repeated by a fall-back runs once, at its first occurrence.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    tod, zone = parse_time_of_day(at), _zone(tz)
    now_utc = now.astimezone(timezone.utc)
    day: date = now_utc.astimezone(zone).date()
    for offset in range(3):
        candidate = datetime.combine(day + timedelta(days=offset), tod, tzinfo=zone)
        candidate_utc = candidate.astimezone(timezone.utc)
        if candidate_utc > now_utc:
            return candidate_utc.astimezone(zone)
    raise AssertionError("unreachable: a day later is always after now")  # pragma: no cover


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Scheduler:
    """Runs ``job`` every day at ``at`` in ``tz`` in one background thread; runs never overlap.

    The wait is cut into slices of at most ``poll_s`` and re-reads ``clock`` each
    time, so a wall-clock step (NTP, suspend) or a fake clock in tests is noticed.
    :meth:`run_now` asks for a run as soon as possible; requests made while a run
    is in progress are merged into one run after it.
    """

    def __init__(self, job: Callable[[], Any], at: str = "03:00", tz: str = "Asia/Seoul", *,
                 clock: Callable[[], datetime] = _utc_now, poll_s: float = 30.0, name: str = "nightly") -> None:
        parse_time_of_day(at)
        _zone(tz)
        self.job, self.at, self.tz, self.clock, self.poll_s, self.name = job, at, tz, clock, poll_s, name
        self.next_run_at: datetime | None = None
        self.last_started_at: datetime | None = None
        self.last_finished_at: datetime | None = None
        self.last_error: str | None = None
        self.runs = 0
        self._cond = threading.Condition()
        self._stop = False
        self._requested = 0  # run_now() requests so far
        self._done = 0  # requests satisfied by a finished run
        self._running = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """True while the job runs."""
        return self._running

    def start(self) -> None:
        """Start the scheduler thread (idempotent)."""
        with self._cond:
            if self._thread is not None:
                return
            self._stop = False
            self.next_run_at = next_run(self.clock(), self.at, self.tz)
            self._thread = threading.Thread(target=self._loop, name=f"{self.name}-scheduler", daemon=True)
            self._thread.start()
        _LOG.info("%s runs daily at %s %s; next at %s", self.name, self.at, self.tz,
                  self.next_run_at.isoformat(timespec="seconds"))

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop waiting at once; a run in progress is let finish (up to ``timeout``). True when stopped."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            _LOG.warning("%s run still in progress after %.1f s; leaving it to finish", self.name, timeout)
            return False
        with self._cond:
            self._thread = None
        return True

    def run_now(self, wait: bool = False, timeout: float | None = None) -> bool:
        """Ask for a run now; with ``wait``, block until a run started after this request finished.

        Returns True when that run finished (always False without ``wait``).
        """
        with self._cond:
            if self._thread is None or self._stop:
                raise RuntimeError(f"{self.name} scheduler is not running")
            self._requested += 1
            ticket = self._requested
            self._cond.notify_all()
            if not wait:
                return False
            return self._cond.wait_for(lambda: self._done >= ticket or self._stop, timeout) and \
                self._done >= ticket

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        return
                    if self._requested > self._done:
                        reason = "requested"
                        break
                    assert self.next_run_at is not None
                    remaining = (self.next_run_at - self.clock()).total_seconds()
                    if remaining <= 0:
                        reason = "scheduled"
                        break
                    self._cond.wait(min(remaining, self.poll_s))
                ticket = self._requested
                self._running = True
            self._run(reason)
            with self._cond:
                self._running = False
                self._done = ticket
                self.next_run_at = next_run(self.clock(), self.at, self.tz)
                self._cond.notify_all()

    def _run(self, reason: str) -> None:
        self.last_started_at = self.clock()
        t0 = _time.monotonic()
        _LOG.info("%s run starting (%s)", self.name, reason)
        try:
            self.job()
        except RetrainError as exc:  # expected failures (gate refusal, database down): one line
            self.last_error = f"{type(exc).__name__}: {exc}"
            _LOG.error("%s run failed after %.1f s: %s: %s", self.name, _time.monotonic() - t0,
                       type(exc).__name__, exc)
        except Exception as exc:  # a bug: keep the traceback, keep the schedule
            self.last_error = f"{type(exc).__name__}: {exc}"
            _LOG.exception("%s run crashed after %.1f s", self.name, _time.monotonic() - t0)
        else:
            self.last_error = None
            _LOG.info("%s run finished in %.1f s", self.name, _time.monotonic() - t0)
        finally:
            self.runs += 1
            self.last_finished_at = self.clock()


# -- pruning --------------------------------------------------------------------------------
def prune_bundles(bundle_dir: Path, keep: int, protect: Collection[str] = (), *,
                  stale_after_s: float = 3600.0, now: float | None = None) -> list[Path]:
    """Delete the oldest ``<version>.tar.gz`` beyond the newest ``keep``, and stale ``*.tmp``/``*.partial`` files
    and ``.pack-*`` staging directories.

    Age is mtime, then name. Versions in ``protect`` (the published one: agents
    may still be downloading it) are never deleted, nor anything whose name is
    not a bundle name; leftovers of interrupted writes go once older than
    ``stale_after_s``. Returns the removed paths.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ConfigError(f"number of bundles to keep must be an int >= 0, got {keep!r}")
    root = Path(bundle_dir)
    protected = {p[:-len(BUNDLE_SUFFIX)] if p.endswith(BUNDLE_SUFFIX) else p for p in protect}
    now = _time.time() if now is None else now
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return []
    bundles: list[tuple[float, str, Path]] = []
    removed: list[Path] = []
    for entry in entries:
        try:
            st = entry.lstat()
        except FileNotFoundError:
            continue
        name = entry.name
        if BUNDLE_NAME_RE.match(name) and entry.is_file() and not entry.is_symlink():
            bundles.append((st.st_mtime, name, entry))
        elif (name.endswith(STALE_SUFFIXES) or (name.startswith(".pack-") and entry.is_dir())) \
                and now - st.st_mtime > stale_after_s:  # .pack-*: the packer's staging, left by a kill
            if remove_path(entry):
                removed.append(entry)
    bundles.sort(key=lambda b: (b[0], b[1]), reverse=True)  # newest first
    for _mtime, name, path in bundles[keep:]:
        if name[:-len(BUNDLE_SUFFIX)] in protected:
            continue
        if remove_path(path):
            removed.append(path)
    if removed:
        _LOG.info("pruned %d file(s) from %s: %s", len(removed), root, ", ".join(p.name for p in removed))
    return removed

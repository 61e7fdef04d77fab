"""The HTTP bridge (contract §4): ``POST /recommend``, ``GET /health``, ``GET /metrics``, ``GET /display/...``.

A FastAPI app over the same :class:`~agent.registry.ModelRegistry` the MQTT
agent serves from, so both see a model swap at the same moment. Request
bodies are validated by the same code as MQTT cart events
(:func:`agent.events.parse_cart_event` with ``source="http"``), so the two entry points accept and
refuse exactly the same things. Given a :class:`~agent.display.DisplayHub` fed
by the MQTT agent's answers, it also serves the basket display page and its
event stream (:mod:`agent.display`).

The bridge runs inside the MQTT agent, so nothing a client sends may cost the
agent its memory, its file handles or its log (README "Security"; issue 8):

* bodies: refused by ``Content-Length`` and, when streamed, at the limit
  (413, nothing buffered beyond it); a body must arrive within ``body_timeout_s`` (408);
* connections: at most ``max_connections`` (and ``max_connections_per_client`` from
  one address; 16 more from the machine itself, for its health checks), refused at
  accept with a canned 503 (:func:`_protocol_class`); a request
  head must be complete within ``header_timeout_s`` of the connection (or of the
  previous response), else the connection is closed; headers at most 16 KiB;
* errors: a client that goes away, a malformed request or an unexpected exception is
  one log line (repeats summarised, :class:`_Throttle`), never a traceback in the log
  or in a response; the 500 says "internal error";
* ``/docs``, ``/redoc``, ``/openapi.json`` are off unless asked for; ``HEAD`` works
  wherever ``GET`` does; an optional bearer token guards everything but ``/health``
  and the display page; the ``Host`` header is checked against the names the
  bridge is reached by (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import resource
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from .config import HttpConfig
from .errors import AgentError, ConfigError
from .events import EventLimits, InvalidEvent, parse_cart_event
from .metrics import Metrics
from .recommenders.base import RecommendRequest
from .registry import ModelRegistry

if TYPE_CHECKING:
    import uvicorn

    from .display import DisplayHub

_LOG = logging.getLogger(__name__)

__all__ = ["create_app", "HttpBridge", "allowed_hosts_for", "server_config", "make_server",
           "quiet_server_logs", "LOOPBACK_NAMES", "Readiness"]

GUEST = "guest"
#: Host names a loopback-bound bridge is reached by (and always accepted, for local health checks)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: ``readiness()`` -> ``{"ready": bool, ...}``; the other keys are shown by /health
Readiness = Callable[[], dict[str, Any]]

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# The bridge must never hold so many sockets that the agent runs out of file handles (a reconnecting
# MQTT client, a bundle download, a model file to map need one; README "Security").
_NO_LIMIT_FDS = 65536  # what "no limit" counts as
_FD_RESERVE = 160  # the agent's own files, threads, MQTT sockets, a bundle download, ~15 mapped files per version
# listen() backlog, and also how many connections asyncio accepts in one go before any of them
# reaches _GuardedH11's cap (uvicorn's default, 2048, exhausted 1,024 file handles in one burst)
_BACKLOG = 64
#: connections beyond max_connections that only 127.0.0.1 / ::1 may open (local health checks)
_LOCAL_RESERVE = 16
_LOCAL_ADDRESSES = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


def allowed_hosts_for(bind_host: str, configured: Iterable[str] = ()) -> tuple[str, ...]:
    """The ``Host`` names to accept for a bridge bound to ``bind_host``.

    Loopback names are always accepted (local health checks); a specific bind
    address is accepted as itself. A wildcard bind (``0.0.0.0``, ``::``) answers
    on every interface, so the names clients use must be configured: ConfigError otherwise.
    """
    names = [h.strip().lower().rstrip(".") for h in configured if h and h.strip()]
    host = bind_host.strip().strip("[]").lower()
    wildcard = host in ("", "0.0.0.0", "::", "*")
    if wildcard and not names:
        raise ConfigError(f"http.host {bind_host or '*'} answers on every interface: set http.allowed_hosts to "
                          "the names and addresses clients use (env BASKET_HTTP_ALLOWED_HOSTS, comma-separated)")
    if not wildcard:
        names.append(host)
    return tuple(dict.fromkeys([*names, *LOOPBACK_NAMES]))


class _Throttle:
    """One log line per kind of event, then at most one per ``interval`` s saying how many were left out.

    A client can cause as many refusals or disconnects as it likes; the log must not grow with them.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger, self.interval = logger, interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return
            skipped = self._skipped.pop(key, 0)
            self._last[key] = now
            if len(self._last) > 256:  # keys come from a fixed set, but stay bounded anyway
                self._last = {key: now}
        if skipped:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, skipped, now - last) if last is not None else (*args, skipped, 0.0)
        self.logger.log(level, msg, *args)


_THROTTLE = _Throttle(_LOG)


class _Refused(Exception):
    """A request refused before it reached a route (body too large or too slow); closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def create_app(registry: ModelRegistry, metrics: Metrics | None = None,
               limits: EventLimits | None = None, display: DisplayHub | None = None, *,
               readiness: Readiness | None = None, settings: HttpConfig | None = None) -> FastAPI:
    """The bridge app; models always come from ``registry.current``.

    With ``display`` (a hub the agent's answers feed) the basket display routes are
    added; without it (nothing feeds answers) there is no display to show.
    ``readiness`` (the agent's MQTT state) makes ``/health`` answer 503 when it says
    not ready: a bridge that answers while its agent cannot serve baskets is not healthy.
    """
    metrics = metrics or Metrics()
    limits = limits or EventLimits()
    settings = settings or HttpConfig()
    docs = settings.docs
    app = FastAPI(title="Smart Basket recommendation bridge", version="1", docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.http_settings = settings
    if display is not None:
        from .display import add_display_routes

        add_display_routes(app, display)

    @app.exception_handler(_Refused)
    async def refused(_request: Request, exc: _Refused) -> JSONResponse:
        _THROTTLE.log(logging.INFO, f"refused-{exc.status}", "HTTP request refused: %s", exc.message)
        return _error(exc.status, exc.message, close=True)

    body_limit = limits.max_payload_bytes

    async def read_body(request: Request) -> bytes:
        return await _read_body(request, body_limit, settings.body_timeout_s)

    from fastapi import Depends

    @app.post("/recommend")
    def recommend(raw: bytes = Depends(read_body)) -> JSONResponse:  # sync: runs in the threadpool
        t0 = time.perf_counter()
        try:  # the same rules as MQTT cart events, in one place (agent.events); a whole cart is required
            event = parse_cart_event(raw, limits, source="http")
        except InvalidEvent as exc:
            metrics.error(exc.kind)
            return _error(422, str(exc))
        snap = registry.current
        if snap is None:
            return _error(503, "no model loaded")
        user = event.user
        req = RecommendRequest(cart=event.cart or (), wishlist=event.wishlist or (),
                               top_k=event.top_k, user_id=user.user_id, gender=user.gender,
                               age=user.age)
        rec = snap.recommend(req)
        if rec.unknown:
            metrics.unknown_ids(len(rec.unknown))
            _LOG.debug("http: unknown product ids ignored: %s", rec.unknown[:10])
        metrics.answer(rec.model, time.perf_counter() - t0)
        return JSONResponse({
            "user_id": user.user_id if user.user_id is not None else GUEST,
            "recommendations": rec.ids,
            "items": [{"id": p, "name": name} for p, name in zip(rec.ids, snap.names_for(rec))],
            "model": rec.model,
            "model_version": rec.version,
        })

    @app.get("/health")
    def health() -> JSONResponse:
        snap = registry.current
        body: dict[str, Any] = {"status": "ok", "models": snap.model_versions if snap is not None else {}}
        ready = snap is not None
        if readiness is not None:
            try:
                state = dict(readiness())
            except Exception as exc:  # a broken probe says "not ready", in one line
                _THROTTLE.log(logging.ERROR, "readiness", "readiness check failed: %s: %s", type(exc).__name__,
                              _one_line(exc))
                state = {"ready": False, "error": "readiness check failed"}
            ready = ready and bool(state.pop("ready", False))
            body.update(state)
        if not ready:
            body["status"] = "unavailable"
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse(body)

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # outermost of the user middlewares, inside Starlette's ServerErrorMiddleware, which would log a
    # traceback and re-raise: _Guard catches everything first.
    app.add_middleware(_Guard, token=settings.token, allowed_hosts=settings.allowed_hosts,  # type: ignore[arg-type]
                       max_body=body_limit)
    return app


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, at most ``limit`` bytes, within ``timeout_s``; raises _Refused (413/408).

    Read from ``request.stream()`` and stopped at the limit: ``request.body()`` would
    hold the whole upload in memory first (a 300 MB POST peaked at 674 MB of RSS).
    """
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise _Refused(413, f"body of {int(length)} bytes exceeds {limit}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks: list[bytes] = []
    size = 0
    stream = request.stream().__aiter__()
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _Refused(408, f"request body not received within {timeout_s:g} s")
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), remaining)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise _Refused(408, f"request body not received within {timeout_s:g} s") from None
            size += len(chunk)
            if size > limit:
                raise _Refused(413, f"body exceeds {limit} bytes")
            chunks.append(chunk)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    return b"".join(chunks)


def _error(status: int, message: str, *, close: bool = False) -> JSONResponse:
    headers = {"Connection": "close"} if close else None  # the rest of a refused body is never read
    return JSONResponse({"error": message, "detail": message}, status_code=status, headers=headers)


def _one_line(text: object, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def _host_of(value: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8080`` -> ``::1``), lower case, no trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    for pattern in allowed:
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


def _is_public(path: str) -> bool:
    """Routes open without the token: /health and a basket's display page and its event stream."""
    if path == "/health":
        return True
    parts = path.split("/")  # "", "display", basket id[, "events"]
    return (len(parts) in (3, 4) and parts[1] == "display" and parts[2] != ""
            and (len(parts) == 3 or parts[3] == "events"))


class _Guard:
    """Pure ASGI middleware: Host check, token, HEAD for GET routes, one-line errors (module docstring)."""

    def __init__(self, app: Callable[[_Scope, _Receive, _Send], Awaitable[None]], *, token: str | None,
                 allowed_hosts: tuple[str, ...] | None, max_body: int) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.allowed_hosts = allowed_hosts
        self.max_body = max_body

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        if self.allowed_hosts is not None and not _host_allowed(_host_of(headers.get("host", "")),
                                                                self.allowed_hosts):
            _THROTTLE.log(logging.INFO, "host", "HTTP request refused: Host %r is not one of http.allowed_hosts",
                          headers.get("host", "")[:100])
            await _respond(send, 400, "invalid Host header", close=True)
            return
        length = headers.get("content-length", "").strip()
        if length.isdigit() and int(length) > self.max_body:  # for every route, before anything is read
            _THROTTLE.log(logging.INFO, "refused-413", "HTTP request refused: body of %s bytes exceeds %d",
                          length, self.max_body)
            await _respond(send, 413, f"body of {int(length)} bytes exceeds {self.max_body}", close=True)
            return
        if self.token is not None and not _is_public(path):
            auth = headers.get("authorization", "")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                _THROTTLE.log(logging.INFO, "auth", "HTTP request refused: missing or wrong bearer token (%s %s)",
                              method, path[:100])
                await _respond(send, 401, "missing or wrong bearer token",
                               extra=[(b"www-authenticate", b'Bearer realm="smartbasket"')])
                return
        if method == "HEAD":
            if path.endswith("/events"):  # an event stream never ends: nothing to describe
                await _respond(send, 405, "method not allowed", extra=[(b"allow", b"GET")])
                return
            scope = dict(scope, method="GET")
            send = _head_send(send)
        started = False

        async def tracked(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            _THROTTLE.log(logging.INFO, "gone", "HTTP %s %s: the client went away before its request was read",
                          method, path[:100])
        except (ConnectionError, asyncio.CancelledError) as exc:
            _THROTTLE.log(logging.INFO, "gone", "HTTP %s %s: connection lost (%s)", method, path[:100],
                          type(exc).__name__)
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception as exc:  # a bug: one line (traceback at DEBUG), a 500 without details
            _THROTTLE.log(logging.ERROR, "internal", "HTTP %s %s failed: %s: %s", method, path[:100],
                          type(exc).__name__, _one_line(exc))
            _LOG.debug("traceback of the failed request", exc_info=True)
            if not started:
                await _respond(send, 500, "internal error")


def _head_send(send: _Send) -> _Send:
    """Forward the response head of a GET, then one empty final body: the answer to a HEAD."""
    done = False

    async def head(message: MutableMapping[str, Any]) -> None:
        nonlocal done
        if done:
            return
        if message["type"] == "http.response.body":
            done = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await send(message)

    return head


async def _respond(send: _Send, status: int, message: str, *, close: bool = False,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": message, "detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(extra or [])]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# -- the server -------------------------------------------------------------------------------
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 33\r\n"
         b"Retry-After: 5\r\nConnection: close\r\n\r\n{\"error\": \"too many connections\"}")


def _protocol_class(settings: HttpConfig, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a connection cap at accept and a deadline for each request head.

    uvicorn's own ``limit_concurrency`` answers 503 only once a request head is complete,
    and its keep-alive timer restarts on every byte: neither stops connections that send
    slowly or nothing at all, and every such connection holds a file handle.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    per_client = settings.max_connections_per_client
    head_timeout = settings.header_timeout_s

    class _GuardedH11(H11Protocol):
        _refused = False
        _head_timer: asyncio.TimerHandle | None = None
        _head_cycle: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            peer = transport.get_extra_info("peername")
            host = peer[0] if isinstance(peer, tuple) and peer else None
            # a few slots only the machine itself can use: its health checks get through a flood from the network
            limit = max_connections + (_LOCAL_RESERVE if host in _LOCAL_ADDRESSES else 0)
            full = len(self.connections) >= limit
            if not full and per_client and host is not None:
                full = sum(1 for c in self.connections if c.client and c.client[0] == host) >= per_client
            if full:
                self._refused = True
                self.transport = transport
                _THROTTLE.log(logging.WARNING, "busy", "HTTP connection from %s refused: %d connections open "
                              "(limits: %d, %d per client)", host, len(self.connections), max_connections,
                              per_client)
                transport.write(_BUSY)
                transport.close()
                return
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request head has the same deadline

        def _arm(self) -> None:
            self._disarm()
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(head_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.cycle is not self._head_cycle:
                return  # a new request arrived meanwhile
            if self.cycle is not None and not self.cycle.response_complete:
                return  # still answering (an event stream never completes): not idle
            _THROTTLE.log(logging.INFO, "head-timeout", "HTTP connection from %s closed: no complete request "
                          "within %g s", self.client[0] if self.client else "?", head_timeout)
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
            self.transport.close()

    return _GuardedH11


def _effective_max_connections(settings: HttpConfig) -> int:
    """``max_connections``, lowered so that HTTP sockets can never exhaust the process's file handles."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = ((soft if soft != resource.RLIM_INFINITY else _NO_LIMIT_FDS)
            - _FD_RESERVE - _LOCAL_RESERVE - 3 * _BACKLOG)  # accepted, not yet refused and closed
    cap = max(8, min(settings.max_connections, room))
    if cap < settings.max_connections:
        _LOG.warning("http.max_connections %d lowered to %d (file-handle limit %d, of which %d are kept for the "
                     "agent itself)", settings.max_connections, cap, soft, _FD_RESERVE)
    return cap


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's handler, in one throttled line: out of file handles it logs a traceback per accept try."""
    exc = context.get("exception")
    message = str(context.get("message") or "event loop error")
    _THROTTLE.log(logging.ERROR, "loop:" + message[:60], "HTTP server: %s%s", message,
                  f": {type(exc).__name__}: {_one_line(exc)}" if exc is not None else "")


class _QuietUvicorn(logging.Filter):
    """uvicorn's error log for client errors (bad requests, disconnects, 503s): one throttled line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = record.getMessage().strip().splitlines()[0] if record.getMessage().strip() else "uvicorn"
        exc = record.exc_info[1] if record.exc_info else None
        detail = f": {type(exc).__name__}: {_one_line(exc)}" if exc is not None else ""
        _THROTTLE.log(record.levelno, "uvicorn:" + text[:60], "HTTP server: %s%s", text, detail)
        return False


_QUIET = _QuietUvicorn()


def quiet_server_logs() -> None:
    """Route uvicorn's error log through :class:`_QuietUvicorn` (idempotent)."""
    logger = logging.getLogger("uvicorn.error")
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)


def server_config(app: FastAPI, host: str, port: int, settings: HttpConfig | None = None) -> uvicorn.Config:
    """The uvicorn configuration of a hardened bridge (limits from ``settings``)."""
    import uvicorn

    settings = settings or HttpConfig()
    cap = _effective_max_connections(settings)
    quiet_server_logs()
    # Open display streams would hold a graceful shutdown forever: bounded, and HttpBridge.stop() ends them first.
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                          timeout_graceful_shutdown=2, http=_protocol_class(settings, cap),
                          backlog=_BACKLOG,
                          # tasks too (connections are capped at accept): never below the accept cap
                          limit_concurrency=cap + _LOCAL_RESERVE + 1,
                          timeout_keep_alive=settings.keepalive_timeout_s,  # type: ignore[arg-type]
                          h11_max_incomplete_event_size=settings.max_header_bytes,
                          server_header=False, proxy_headers=False)


def make_server(config: uvicorn.Config) -> uvicorn.Server:
    """A uvicorn server whose event loop logs its own errors in one throttled line."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def serve(self, sockets: Any = None) -> None:
            asyncio.get_running_loop().set_exception_handler(_loop_exception)
            await super().serve(sockets)

    return _Server(config)


class HttpBridge:
    """Runs the app with uvicorn in a background thread (inside ``basket-agent run``)."""

    def __init__(self, app: FastAPI, host: str, port: int, settings: HttpConfig | None = None) -> None:
        self.app = app
        self.host, self.port = host, port
        self.server = make_server(server_config(app, host, port, settings))
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self.server.run, name="http-bridge", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise AgentError(f"HTTP bridge could not listen on {self.host}:{self.port} (port in use?)")
            time.sleep(0.02)

    def stop(self) -> None:
        hub = getattr(self.app.state, "display_hub", None)
        if hub is not None:
            hub.close()  # ends the display streams, so the server stops at once
        self.server.should_exit = True
        self._thread.join(timeout=5)

"""The HTTP bridge (contract §4): ``POST /recommend``, ``GET /health``, ``GET /metrics``, ``GET /display/...``.

A FastAPI app over the same :class:`~agent.registry.ModelRegistry` the MQTT
agent serves from, so both see a model swap at the same moment. Request
bodies are validated by the same code as MQTT cart events
(:func:`agent.events.parse_cart_event` with ``source="http"``), so the two entry points accept and
refuse exactly the same things. Given a :class:`~agent.display.DisplayHub` fed
by the MQTT agent's answers, it also serves the basket display page and its
event stream (:mod:`agent.display`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .errors import AgentError
from .events import EventLimits, InvalidEvent, parse_cart_event
from .metrics import Metrics
from .recommenders.base import RecommendRequest
from .registry import ModelRegistry

if TYPE_CHECKING:
    from .display import DisplayHub

_LOG = logging.getLogger(__name__)

__all__ = ["create_app", "HttpBridge"]

GUEST = "guest"


def create_app(registry: ModelRegistry, metrics: Metrics | None = None,
               limits: EventLimits | None = None, display: DisplayHub | None = None) -> FastAPI:
    """The bridge app; models always come from ``registry.current``.

    With ``display`` (a hub the agent's answers feed) the basket display routes are
    added; without it (nothing feeds answers) there is no display to show.
    """
    metrics = metrics or Metrics()
    limits = limits or EventLimits()
    app = FastAPI(title="Smart Basket recommendation bridge", version="1")
    if display is not None:
        from .display import add_display_routes

        add_display_routes(app, display)

    @app.post("/recommend")
    def recommend(raw: bytes = _raw_body()) -> JSONResponse:  # sync: runs in the threadpool
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
            "items": [{"id": p, "name": snap.name(p)} for p in rec.ids],
            "model": rec.model,
            "model_version": rec.version,
        })

    @app.get("/health")
    def health() -> JSONResponse:
        snap = registry.current
        if snap is None:
            return JSONResponse({"status": "unavailable", "models": {}}, status_code=503)
        return JSONResponse({"status": "ok", "models": snap.model_versions})

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render_prometheus(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _raw_body() -> Any:
    from fastapi import Depends

    async def read(request: Request) -> bytes:
        return await request.body()

    return Depends(read)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "detail": message}, status_code=status)


class HttpBridge:
    """Runs the app with uvicorn in a background thread (inside ``basket-agent run``)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        import uvicorn

        # Open display streams would hold a graceful shutdown forever: bounded, and stop() ends them first.
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2)
        self.app = app
        self.host, self.port = host, port
        self.server = uvicorn.Server(config)
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

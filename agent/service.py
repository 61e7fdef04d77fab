"""The MQTT agent: cart events in, recommendations out (contract §3).

Threads:

* paho's network thread (:mod:`agent.mqtt`) only queues incoming messages;
* one worker thread (:meth:`AgentService._work`) drains the queue in order:
  parse -> :class:`~agent.events.BasketStates` -> ``registry.current.recommend`` ->
  publish. It also expires idle baskets, republishes the status and logs a
  summary periodically.

A bad event costs one message on ``PREFIX/basket/{id}/errors`` and a log
line; the agent carries on.

Model updates: messages on ``PREFIX/models/updated`` (retained; the one held
by the broker arrives on every connect) go to the attached
:class:`~agent.updater.Updater`, which downloads and loads on its own thread
and swaps the registry's one reference; the worker keeps answering with
whichever snapshot is current when an event is handled, so no event is lost to
a swap. Its outcome comes back through :meth:`AgentService.report_update` into
the retained status (§3.3 ``last_update``).

Use from code::

    registry = ModelRegistry(load_snapshot(...))
    service = AgentService(registry, AgentSettings(host="localhost", agent_id="jetson-07"))
    service.attach_updater(Updater(store, registry, loader, service.report_update))  # optional
    service.run_forever()          # until SIGTERM/SIGINT; or start() ... stop()
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from .errors import AgentError, EventError
from .events import BasketStates, CartEvent, EventLimits, InvalidEvent, Limits, parse_cart_event
from .metrics import Metrics
from .mqtt import Message, MqttClient, MqttError, TLSSettings, Will
from .recommenders.base import RecommendRequest
from .registry import ModelRegistry
from .sdnotify import Notifier
from .topics import Topics, validate_id

_LOG = logging.getLogger(__name__)

__all__ = ["AgentSettings", "AgentService", "UpdateSink"]

_WAKE = Message("", b"")  # queued to wake the worker (status due, stop)


class UpdateSink(Protocol):
    """What the service needs of an updater (:class:`agent.updater.Updater`)."""

    def submit(self, payload: bytes, received: float | None = None) -> None: ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...


@dataclass
class AgentSettings:
    """Everything the MQTT agent needs besides the models. See :meth:`from_config`."""

    host: str
    agent_id: str
    port: int = 1883
    protocol: str = "5"  # "5" | "3.1.1"
    keepalive: int = 30
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TLSSettings | None = None  # None = plain TCP
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    client_id: str | None = None  # default "smartbasket-agent-{agent_id}"
    prefix: str = "smartbasket"
    limits: Limits = field(default_factory=EventLimits)
    idle_ttl_s: float = 1800.0
    max_baskets: int = 10000
    recent_event_ids: int = 256  # per basket, for de-duplication
    status_interval_s: float = 30.0
    summary_interval_s: float = 60.0
    queue_size: int = 10000

    def __post_init__(self) -> None:
        self.prefix = Topics(self.prefix).prefix  # validates and normalises
        validate_id("agent_id", self.agent_id)
        if not self.host:
            raise ValueError("MQTT host is required")

    @classmethod
    def from_config(cls, config: Any) -> AgentSettings:
        """From an :class:`agent.config.AgentConfig`."""
        b = config.broker
        return cls(host=b.host, port=b.port, protocol=b.protocol, keepalive=b.keepalive,
                   username=b.username, password=b.password, tls=b.tls,
                   reconnect_min_s=b.reconnect_min_s, reconnect_max_s=b.reconnect_max_s,
                   agent_id=config.agent_id, prefix=config.prefix, limits=config.limits,
                   idle_ttl_s=config.idle_ttl_s, max_baskets=config.max_baskets,
                   status_interval_s=config.status_interval_s)


def _now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class AgentService:
    """Serves cart events from MQTT with the registry's current snapshot."""

    def __init__(self, registry: ModelRegistry, settings: AgentSettings, *,
                 metrics: Metrics | None = None) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.topics = Topics(settings.prefix)
        self.status_topic = self.topics.status(settings.agent_id)
        self.states = BasketStates(idle_ttl_s=settings.idle_ttl_s, max_baskets=settings.max_baskets,
                                   recent_ids=settings.recent_event_ids,
                                   max_items=settings.limits.max_items)
        self.last_update: dict[str, Any] | None = None
        self.updater: UpdateSink | None = None
        self._status_due = threading.Event()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._answer_listeners: list[Callable[[str, bytes], None]] = []
        self.notifier = Notifier()  # systemd Type=notify + WatchdogSec; a no-op outside systemd
        self.mqtt = MqttClient(
            settings.host, settings.port,
            client_id=settings.client_id or f"smartbasket-agent-{settings.agent_id}",
            protocol=settings.protocol, keepalive=settings.keepalive, username=settings.username,
            password=settings.password, tls=settings.tls, reconnect_min_s=settings.reconnect_min_s,
            reconnect_max_s=settings.reconnect_max_s,
            subscriptions=[(self.topics.cart_subscription, 1), (self.topics.models_updated, 1)],
            will=Will(self.status_topic, _dumps({"state": "offline", "agent_id": settings.agent_id})),
            queue_size=settings.queue_size, on_connected=self._on_connected,
            on_drop=lambda _msg: self.metrics.drop())

    # -- lifecycle -------------------------------------------------------------------------
    def attach_updater(self, updater: UpdateSink | None) -> None:
        """Route ``models/updated`` messages to ``updater``; started and stopped with the service."""
        self.updater = updater

    def start(self) -> None:
        """Connect (in the background) and start the worker; returns at once."""
        if self._worker is not None:
            return
        self._stopping.clear()
        if self.updater is not None:
            self.updater.start()
        self._worker = threading.Thread(target=self._work, name="agent-worker", daemon=True)
        self._worker.start()
        self.mqtt.start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self.mqtt.wait_connected(timeout)

    def stop(self, timeout: float = 2.0) -> None:
        """Publish the offline status, finish the worker and disconnect cleanly."""
        if self._worker is None:
            return
        self._stopping.set()
        self._wake()
        self._worker.join(timeout)
        self._worker = None
        if self.updater is not None:
            self.updater.stop(timeout)
        if self.mqtt.connected:
            try:
                self.mqtt.publish_and_wait(self.status_topic, _dumps(
                    {"state": "offline", "agent_id": self.settings.agent_id}), 1, True, timeout)
            except MqttError as exc:
                _LOG.warning("could not publish offline status: %s", exc)
        self.mqtt.stop()
        _LOG.info("agent %s stopped", self.settings.agent_id)

    def run_forever(self) -> None:
        """start(), then serve until SIGTERM or SIGINT; then stop(). Call from the main thread."""
        done = threading.Event()

        def handler(signum: int, _frame: Any) -> None:
            _LOG.info("received %s, stopping", signal.Signals(signum).name)
            done.set()

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            self.notifier.ready(self._sd_status())
            while not done.wait(1.0):
                pass
        finally:
            self.notifier.stopping()
            self.stop()
            for s, h in previous.items():
                signal.signal(s, h)

    def _sd_status(self) -> str:
        """One line for ``systemctl status`` (sd_notify STATUS=)."""
        snap = self.registry.current
        models = snap.model_versions if snap is not None else {}
        link = "connected" if self.mqtt.connected else "not connected"
        return (f"broker {self.settings.host}:{self.settings.port} {link}; "
                f"models {', '.join(f'{k} {v}' for k, v in models.items() if v) or 'none'}; "
                f"{len(self.states)} baskets")

    def report_update(self, version: str | None, result: str, reason: str | None = None) -> None:
        """Record a model update outcome (§3.3 ``last_update``) and republish the status soon.

        Thread-safe (called from the updater's thread): one reference assignment, then flags.
        """
        self.last_update = {"version": version, "result": result, "reason": reason, "at": _now_iso()}
        self._status_due.set()
        self._wake()

    # -- status ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        snap = self.registry.current
        return {"state": "online", "agent_id": self.settings.agent_id,
                "models": snap.model_versions if snap is not None else {"guest": None, "member": None},
                "last_update": self.last_update, "stats": self.metrics.snapshot(), "ts": _now_iso()}

    def _on_connected(self, first: bool) -> None:  # paho thread: flag only
        if not first:
            self.metrics.reconnect()
        self._status_due.set()
        self._wake()

    def _wake(self) -> None:
        try:
            self.mqtt.messages.put_nowait(_WAKE)
        except queue.Full:
            pass  # the worker is busy and will see the flags soon

    def _publish_status(self) -> None:
        try:
            self.mqtt.publish(self.status_topic, _dumps(self.status()), 1, True)
        except MqttError as exc:
            _LOG.warning("could not publish status: %s", exc)

    # -- worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        s = self.settings
        next_status = next_summary = next_expire = time.monotonic()
        next_summary += s.summary_interval_s
        while not self._stopping.is_set():
            try:
                msg = self.mqtt.messages.get(timeout=0.5)
            except queue.Empty:
                msg = None
            if msg is not None and msg is not _WAKE:
                try:
                    self.handle(msg)
                except Exception:
                    _LOG.exception("unexpected failure handling a message on %s", msg.topic)
                    self.metrics.error("internal")
            now = time.monotonic()
            self.notifier.ping(now)  # here, not in a thread of its own: a hung worker must stop the pings
            if self._status_due.is_set() or now >= next_status:
                self._status_due.clear()
                if self.mqtt.connected:
                    self._publish_status()
                self.notifier.status(self._sd_status())
                next_status = now + s.status_interval_s
            if now >= next_expire:
                expired = self.states.expire(now)
                for basket_id in expired:  # a basket abandoned without checkout
                    self._publish_recommendations(basket_id, b"")
                if expired:
                    _LOG.debug("forgot %d idle baskets (retained recommendations cleared)", len(expired))
                next_expire = now + 1.0
            if now >= next_summary:
                st = self.metrics.snapshot()
                _LOG.info("events %d, answered %d, errors %d, baskets %d, p50 %s ms, p99 %s ms",
                          st["events"], st["answered"], st["errors"], len(self.states),
                          st["p50_ms"], st["p99_ms"])
                next_summary = now + s.summary_interval_s

    def handle(self, msg: Message) -> None:
        """Process one message (worker thread): a model update or a cart event."""
        if msg.topic == self.topics.models_updated:
            if self.updater is not None:
                self.updater.submit(msg.payload, msg.received)  # only parses and queues
            elif msg.payload:
                _LOG.info("model update message ignored: updates are disabled")
            return
        try:
            basket_id = self.topics.parse_cart(msg.topic)
        except EventError as exc:
            self.metrics.error("topic")
            _LOG.warning("ignored message: %s", exc)
            return
        self.metrics.event()
        try:
            event = parse_cart_event(msg.payload, self.settings.limits)
        except InvalidEvent as exc:
            self._reject(basket_id, exc.kind, str(exc), exc.event_id)
            return
        try:
            outcome = self.states.apply(basket_id, event, time.monotonic())
        except InvalidEvent as exc:  # e.g. an add past limits.max_items
            self._reject(basket_id, exc.kind, str(exc), exc.event_id)
            return
        if outcome.kind == "duplicate":
            self.metrics.duplicate()
            _LOG.debug("basket %s: duplicate event %r ignored", basket_id, event.event_id)
            return
        if outcome.kind == "stale":
            self.metrics.stale_event()
            _LOG.debug("basket %s: stale event %r (seq %s) ignored", basket_id, event.event_id, event.seq)
            return
        if outcome.kind == "checkout":
            self.metrics.checkout()
            self._publish_recommendations(basket_id, b"")
            _LOG.debug("basket %s: checkout, recommendations cleared", basket_id)
            return
        self._answer(basket_id, event, outcome.cart, outcome.wishlist, msg.received)

    def _answer(self, basket_id: str, event: CartEvent, cart: tuple[str, ...],
                wishlist: tuple[str, ...], received: float) -> None:
        snap = self.registry.current
        if snap is None:
            self._reject(basket_id, "no_model", "no model loaded", event.event_id)
            return
        user = event.user
        request = RecommendRequest(cart=cart, wishlist=wishlist, top_k=event.top_k,
                                   user_id=user.user_id, gender=user.gender, age=user.age)
        try:
            rec = snap.recommend(request)
        except Exception as exc:
            _LOG.exception("basket %s: recommendation failed", basket_id)
            self._reject(basket_id, "internal", f"recommendation failed: {type(exc).__name__}",
                         event.event_id)
            return
        if rec.unknown:
            self.metrics.unknown_ids(len(rec.unknown))
            _LOG.debug("basket %s: unknown product ids ignored: %s", basket_id, rec.unknown[:10])
        payload = _dumps({
            "basket_id": basket_id,
            "user_id": user.user_id if user.user_id is not None else "guest",
            "recommendations": rec.ids,
            "items": [{"id": pid, "name": snap.name(pid)} for pid in rec.ids],
            "model": rec.model, "model_version": rec.version,
            "event_id": event.event_id, "seq": event.seq, "ts": _now_iso()})
        if self._publish_recommendations(basket_id, payload):
            latency = time.perf_counter() - received
            self.metrics.answer(rec.model, latency)
            _LOG.debug("basket %s: event %r -> %s %s (%.3f ms)", basket_id, event.event_id, rec.model,
                       rec.ids, latency * 1000)

    def _reject(self, basket_id: str, kind: str, message: str, event_id: object) -> None:
        self.metrics.error(kind)
        _LOG.warning("basket %s: event %r rejected: %s", basket_id, event_id, message)
        self._publish(self.topics.errors(basket_id), _dumps({"error": message, "event_id": event_id}))

    def add_answer_listener(self, listener: Callable[[str, bytes], None]) -> None:
        """Call ``listener(basket_id, payload)`` with every recommendation published (b"" = cleared).

        Runs in the worker thread right after the MQTT publish: keep it short and
        non-blocking (the display page's hub only enqueues).
        """
        self._answer_listeners.append(listener)

    def _publish_recommendations(self, basket_id: str, payload: bytes) -> bool:
        ok = self._publish(self.topics.recommendations(basket_id), payload, retain=True)
        for listener in self._answer_listeners:
            try:
                listener(basket_id, payload)
            except Exception:
                _LOG.exception("answer listener failed")
        return ok

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        try:
            self.mqtt.publish(topic, payload, 1, retain)
            return True
        except AgentError as exc:
            _LOG.error("publish to %s failed: %s", topic, exc)
            return False

"""The MQTT agent: cart events in, recommendations out (contract §3).

Threads:

* one worker thread (:meth:`AgentService._work`) runs the network loop
  (:class:`agent.mqtt.NetworkLoop`, without a thread of its own) of two MQTT connections,
  events in (persistent session, the status, the Last Will) and answers out (so their
  PUBACKs never wait behind unread events), and between its passes drains the messages
  read, in order: parse -> :class:`~agent.events.BasketStates` ->
  ``registry.current.recommend`` -> publish -> acknowledge. It also expires idle baskets,
  republishes the status and logs a summary periodically. (Until 2026-11-25 a network
  thread of its own did the I/O; each event then crossed between two threads twice.)

A bad event costs one message on ``PREFIX/basket/{id}/errors`` and a log
line; the agent carries on.

At least once (README "Reliability"): the MQTT session is persistent and an event
is acknowledged to the broker only after it was handled and its answer (or error)
was acknowledged by the broker, so an event is never lost with this process:
whatever was not acknowledged is redelivered, to this connection or the next
session. Redelivered copies are answered once (``event_id`` de-duplication in
:class:`~agent.events.BasketStates`). On SIGTERM the worker handles what had
arrived, for at most ``drain_timeout_s``, and leaves the rest unacknowledged.
Retained messages on cart topics are replays of old state and ignored; a
snapshot whose ``ts`` is older than ``max_event_age_s`` is applied, not answered.

Model updates: messages on ``PREFIX/models/updated`` (retained; the one held
by the broker arrives on every connect) go to the attached
:class:`~agent.updater.Updater`, which downloads and loads on its own thread
and swaps the registry's one reference; the worker keeps answering with
whichever snapshot is current when an event is handled, so no event is lost to
a swap. Its outcome comes back through :meth:`AgentService.report_update` into
the retained status (§3.3 ``last_update``).

Use from code::

    registry = ModelRegistry(load_snapshot(...))
    service = AgentService(registry, ServiceConfig(BrokerConfig("localhost"), agent_id="jetson-07"))
    service.attach_updater(Updater(store, registry, loader, service.report_update))  # optional
    service.run_forever()          # until SIGTERM/SIGINT; or start() ... stop()
"""

from __future__ import annotations

import json
import logging
import queue
import re
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Protocol

import orjson

from .config import ServiceConfig
from .errors import AgentError, EventError
from .events import BasketStates, CartEvent, InvalidEvent, parse_cart_event
from .metrics import Metrics
from .mqtt import Message, MqttClient, MqttError, NetworkLoop, Will
from .recommenders.base import RecommendRequest
from .registry import ModelRegistry
from .sdnotify import Notifier
from .topics import Topics

_LOG = logging.getLogger(__name__)

__all__ = ["AgentService", "UpdateSink", "parse_ts"]

_WAKE = Message("", b"")  # queued to wake the worker (status due, stop)
#: with a backlog the worker runs a network pass every this many messages (answers and acks out,
#: events in); far below the broker's inflight window (broker.receive_maximum, 100)
_WRITE_EVERY = 16
_FRACTION = re.compile(r"\.(\d+)")
_COMPACT_OFFSET = re.compile(r"([+-]\d\d)(\d\d)$")


class UpdateSink(Protocol):
    """What the service needs of an updater (:class:`agent.updater.Updater`)."""

    def submit(self, payload: bytes, received: float | None = None) -> None: ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...


_local_zone: list[Any] = [float("-inf"), None]  # [refresh after (time.time()), this machine's UTC offset]
#: (the second, its text to the second, its UTC offset text): an answer's timestamp formats only milliseconds
_this_second: list[tuple[int, str, str]] = [(-1, "", "")]


def _now_iso() -> str:
    """Local time with offset, to the millisecond, as ``datetime.isoformat(timespec="milliseconds")``.

    The offset is looked up once a minute: ``astimezone()`` asks the C library, which re-reads
    /etc/localtime's metadata each time (3 % of the agent's CPU at saturation); the text up to the
    second once a second (formatting a datetime per answer was another 2.7 %: 5 µs, now ~0.6)."""
    now = time.time()
    second = int(now)
    micros = round((now - second) * 1e6)  # as datetime.fromtimestamp rounds (half to even)
    cached = _this_second[0]
    if cached[0] == second and micros < 1_000_000 and now < _local_zone[0]:
        return f"{cached[1]}.{micros // 1000:03d}{cached[2]}"
    if now >= _local_zone[0]:
        _local_zone[1] = datetime.fromtimestamp(now).astimezone().tzinfo
        _local_zone[0] = now + 60.0
    text = datetime.fromtimestamp(now, _local_zone[1]).isoformat(timespec="milliseconds")
    if micros < 1_000_000:
        _this_second[0] = (second, text[:19], text[23:])  # "YYYY-MM-DDTHH:MM:SS" ".mmm" "+HH:MM"
    return text


def _dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON. orjson (one C pass, ~15x faster than ``json`` for an answer) writes the
    same bytes as ``json.dumps(ensure_ascii=False, separators=(",", ":"))`` for strings, integers,
    lists and objects (floats may differ in form, e.g. ``1e-07`` / ``1e-7``; NaN becomes null);
    what it refuses (integers beyond 64 bits, non-string keys) goes through ``json``. Lone
    surrogates never get here: the parser refuses them in every echoed field."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def parse_ts(value: object) -> datetime | None:
    """An event's ``ts`` as an aware datetime, leniently (``Z``, any fraction length, ``+0900``,
    a space for ``T``; no offset = this machine's time zone); None when it cannot be read.

    Only used to skip answering very old snapshots: anything unreadable is answered.
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    if len(text) < 10:
        return None
    if text[-1] in "zZ":
        text = text[:-1] + "+00:00"
    if len(text) > 10 and text[10] == " ":
        text = text[:10] + "T" + text[11:]
    text = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], text, count=1)
    text = _COMPACT_OFFSET.sub(r"\1:\2", text) if "T" in text else text
    try:
        ts = datetime.fromisoformat(text)
        # local time for a ts without an offset: out of range near year 1 or 9999 (ValueError, OverflowError)
        return ts if ts.tzinfo is not None else ts.astimezone()
    except (ValueError, OverflowError, OSError):
        return None


class AgentService:
    """Serves cart events from MQTT with the registry's current snapshot."""

    def __init__(self, registry: ModelRegistry, config: ServiceConfig, *,
                 metrics: Metrics | None = None) -> None:
        self.registry = registry
        self.config = config
        self.metrics = metrics or Metrics()
        self.topics = Topics(config.prefix)
        self.status_topic = self.topics.status(config.agent_id)
        b = config.baskets
        self.states = BasketStates(idle_ttl_s=b.idle_ttl_s, max_baskets=b.max_baskets, recent_ids=b.recent_event_ids,
                                   max_items=config.limits.max_items, max_bytes=b.max_bytes,
                                   shared=config.shared_group is not None)
        self._quiet_until: dict[str, float] = {}  # rate-limited log lines (_log_due)
        self._quiet_count: dict[str, int] = {}
        self.last_update: dict[str, Any] | None = None
        self.updater: UpdateSink | None = None
        self._status_due = threading.Event()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._stop_requested = 0.0  # time.perf_counter() of stop(): what arrived later is left unacked
        self._last_publish: Any = None  # MQTTMessageInfo of the worker's latest publish
        self._answer_listeners: list[Callable[[str, bytes], None]] = []
        self.notifier = Notifier()  # systemd Type=notify + WatchdogSec; a no-op outside systemd
        # stable: the broker keeps this agent's session (and the events queued for it) under it
        client_id = config.client_id or f"smartbasket-agent-{config.agent_id}"
        # one loop for both connections, run by the worker between messages (no network thread: see
        # NetworkLoop; every event crossing between two threads cost more than its own Python)
        broker = config.broker
        self._loop = loop = NetworkLoop(threaded=False)
        # events in (and the status, and the Last Will): persistent session, acknowledged when handled
        self.mqtt = MqttClient.for_broker(
            broker, client_id=client_id, loop=loop,
            # with broker.shared_group the carts are shared with the group's other agents ($share/...);
            # models/updated stays a plain subscription: every agent must get it
            subscriptions=[(self.topics.cart_subscription_for(config.shared_group), 1),
                           (self.topics.models_updated, 1)],
            will=Will(self.status_topic, _dumps({"state": "offline", "agent_id": config.agent_id})),
            queue_size=config.queue_size, session_expiry_s=broker.session_expiry_s,
            receive_maximum=broker.receive_maximum, manual_ack=True,
            watch_broker_drops=config.watch_broker_drops, on_connected=self._on_connected,
            on_drop=lambda _msg: self.metrics.drop())
        # answers out, on a connection of their own: their PUBACKs (which release the events'
        # acknowledgements) must not wait behind a backlog of unread events (README "Reliability")
        # Its user is "<username>-out" (same password): a broker that binds client ids to users
        # (use_username_as_clientid, config/mosquitto-secure.conf) would otherwise give both
        # connections one client id, each knocking the other off.
        self.out = MqttClient.for_broker(
            broker, client_id=f"{client_id}-out", loop=loop, max_queued_out=0, track_published=True,
            on_connected=self._on_connected,
            **({"username": f"{broker.username}-out"} if broker.username else {}))
        self.metrics.set_gauges(self._gauges)

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
        if self.config.shared_group is not None:
            _LOG.info("agent %s is in shared group %r: it gets a share of the carts (%s); snapshot events "
                      "only, and while it is away the broker queues its share for broker.session_expiry_s %d s",
                      self.config.agent_id, self.config.shared_group,
                      self.topics.cart_subscription_for(self.config.shared_group),
                      self.config.broker.session_expiry_s)
        self.out.start()
        self.mqtt.start()

    @property
    def connected(self) -> bool:
        """Both connections up (events in, answers out)."""
        return self.mqtt.connected and self.out.connected

    def wait_connected(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.mqtt.wait_connected(timeout):
            return False
        return self.out.wait_connected(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def stop(self, timeout: float = 2.0) -> None:
        """Drain, publish the offline status and disconnect cleanly.

        The worker handles the events that had arrived (at most ``drain_timeout_s``) and
        acknowledges them once their answers are acknowledged; later or unhandled events
        stay unacknowledged, so the broker gives them to the next session.
        """
        if self._worker is None:
            return
        self._stop_requested = time.perf_counter()
        self.mqtt.discard_incoming()  # what arrives from now on is the next session's
        self._stopping.set()
        self._wake()
        self._worker.join(self.config.drain_timeout_s + timeout)
        if self._worker.is_alive():
            _LOG.warning("worker still busy after the %.1f s drain", self.config.drain_timeout_s)
        self._worker = None
        if self.updater is not None:
            self.updater.stop(timeout)
        if self.mqtt.connected:
            try:
                self.mqtt.publish_and_wait(self.status_topic, _dumps(
                    {"state": "offline", "agent_id": self.config.agent_id}), 1, True, timeout)
            except MqttError as exc:
                _LOG.warning("could not publish offline status: %s", exc)
        self.mqtt.stop()
        self.out.stop()
        _LOG.info("agent %s stopped", self.config.agent_id)

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
        link = "connected" if self.connected else "not connected"
        return (f"broker {self.config.broker.host}:{self.config.broker.port} {link}; "
                f"models {', '.join(f'{k} {v}' for k, v in models.items() if v) or 'none'}; "
                f"{len(self.states)} baskets; {self.mqtt.queue_depth} queued")

    def _gauges(self) -> dict[str, int | None]:
        """What /metrics and the status report of the MQTT link (Metrics.set_gauges)."""
        return {"connected": int(self.connected), "queue_depth": self.mqtt.queue_depth,
                "unacked": self.mqtt.unacked, "broker_dropped": self.mqtt.broker_dropped,
                "baskets": len(self.states), "basket_bytes": self.states.nbytes}

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
        return {"state": "online", "agent_id": self.config.agent_id,
                "models": snap.model_versions if snap is not None else {"guest": None, "member": None},
                "last_update": self.last_update, "stats": self.metrics.snapshot(), "ts": _now_iso()}

    def _on_connected(self, first: bool) -> None:  # the network loop (either connection): flags only
        if not first:
            self.metrics.reconnect()
        self._status_due.set()
        self._wake()

    def _wake(self) -> None:
        """Make the worker look (status due, stop): it may be waiting in the network loop's poll."""
        self.mqtt.messages.put_nowait(_WAKE)  # unbounded: never blocks
        self._loop.wake()

    def _publish_status(self) -> None:
        try:
            self.mqtt.publish(self.status_topic, _dumps(self.status()), 1, True)
        except MqttError as exc:
            _LOG.warning("could not publish status: %s", exc)

    # -- worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        s = self.config
        next_status = next_summary = next_expire = time.monotonic()
        next_summary += s.summary_interval_s
        messages, loop = self.mqtt.messages, self._loop
        unwritten = 0  # messages handled since the last network pass
        while not self._stopping.is_set():
            try:
                msg = messages.get_nowait()
            except queue.Empty:
                # nothing read is waiting: write the answers and acknowledgements, then wait for input
                # (a message, a PUBACK, a wake-up) at most 0.5 s
                loop.run_once(0.5)
                unwritten = 0
                msg = None
            if msg is not None and msg is not _WAKE:
                self._take(msg)
                unwritten += 1
                if unwritten >= _WRITE_EVERY:  # a backlog: answers go out in batches, new events come in
                    loop.run_once(0.0)
                    unwritten = 0
            self.mqtt.settle(self.out)
            now = time.monotonic()
            self.notifier.ping(now)  # here, not in a thread of its own: a hung worker must stop the pings
            if self._status_due.is_set() or now >= next_status:
                self._status_due.clear()
                if self.connected:  # "online" once answers can go out too
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
                _LOG.info("events %d, answered %d, errors %d, baskets %d, p50 %s ms, p99 %s ms, queued %d, "
                          "broker dropped %s", st["events"], st["answered"], st["errors"], len(self.states),
                          st["p50_ms"], st["p99_ms"], self.mqtt.queue_depth, self.mqtt.broker_dropped)
                next_summary = now + s.summary_interval_s
        self._drain()

    def _take(self, msg: Message) -> None:
        """Handle one message and acknowledge it once what it caused is with the broker."""
        if self.mqtt.redelivered(msg):
            self.metrics.redelivered()  # the broker resends it on the current connection
            return
        self._last_publish = None
        try:
            self.handle(msg)
        except Exception:  # acknowledged anyway: a message that breaks the agent must not come back forever
            _LOG.exception("unexpected failure handling a message on %s", msg.topic)
            self.metrics.error("internal")
        try:
            self.mqtt.ack_after(msg, self._last_publish)
        except Exception:  # never let the worker die: unacknowledged means redelivered
            _LOG.exception("acknowledging a message on %s failed", msg.topic)

    def _drain(self) -> None:
        """At stop: handle what had arrived before stop() (bounded), wait for the answers' PUBACKs."""
        deadline = time.monotonic() + self.config.drain_timeout_s
        handled = left = 0
        while time.monotonic() < deadline:
            try:
                msg = self.mqtt.messages.get_nowait()
            except queue.Empty:
                break
            if msg is _WAKE:
                continue
            if msg.received > self._stop_requested:
                left = 1  # arrived after stop(): the next session gets it
                break
            self._take(msg)
            self.notifier.ping(time.monotonic())
            handled += 1
        while self.mqtt.unacked and time.monotonic() < deadline:
            self.mqtt.settle(self.out)
            self._loop.run_once(0.005)  # writes the answers, reads their PUBACKs
        self.mqtt.settle(self.out)
        left += sum(1 for m in self._queued() if m is not _WAKE) + self.mqtt.discarded
        self.metrics.left(left)
        _LOG.info("stopping: handled %d queued events in the drain; %d left unacknowledged for the next session"
                  "%s", handled, left, f", {self.mqtt.unacked} answers unconfirmed" if self.mqtt.unacked else "")

    def _queued(self) -> list[Message]:
        out = []
        while True:
            try:
                out.append(self.mqtt.messages.get_nowait())
            except queue.Empty:
                return out

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
        if msg.retain:  # the broker replays a retained cart message on every subscribe: old state
            self.metrics.retained()
            _LOG.warning("basket %s: retained cart message ignored (sensors must not retain)", basket_id)
            return
        self.metrics.event()
        try:
            event = parse_cart_event(msg.payload, self.config.limits)
        except InvalidEvent as exc:
            self._reject(basket_id, exc.kind, str(exc), exc.event_id)
            return
        if self.config.shared_group is not None and not event.is_snapshot and event.action != "checkout":
            # another agent of the group may hold this basket's earlier events: a delta here would be
            # answered from a partial cart
            self._reject(basket_id, "snapshot_needed",
                         f"this agent shares the store's carts with others (broker.shared_group "
                         f"{self.config.shared_group!r}) and cannot follow deltas: send snapshots "
                         f"(\"cart\": [...]); deltas need one agent per basket", event.event_id)
            return
        try:
            outcome = self.states.apply(basket_id, event, time.monotonic())
        except InvalidEvent as exc:  # e.g. an add past limits.max_items, or a delta to an evicted basket
            self._reject(basket_id, exc.kind, str(exc), exc.event_id)
            return
        if outcome.evicted:
            self._evicted(outcome.evicted)
        if event.unknown_fields:
            self.metrics.unknown_field(len(event.unknown_fields))
        if outcome.unknown_fields:  # set once per basket
            _LOG.info("basket %s: ignoring fields the agent does not read: %s (logged once per basket)",
                      basket_id, ", ".join(outcome.unknown_fields))
        if outcome.kind == "duplicate":
            self.metrics.duplicate()
            if outcome.id_reused:
                self.metrics.reused_id()
                n = self._log_due("reused_id")
                if n:
                    _LOG.warning("basket %s: event_id %r reused with other content in the same trip: ignored as a "
                                 "duplicate (a sensor bug; %d such events since the last line)", basket_id,
                                 event.event_id, n)
            else:
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
        if self._too_old(event):
            self.metrics.aged_event()
            _LOG.debug("basket %s: snapshot %r from %s applied, not answered (older than %g s)", basket_id,
                       event.event_id, event.ts, self.config.max_event_age_s)
            return
        self._answer(basket_id, event, outcome.cart, outcome.wishlist, msg.received)

    def _too_old(self, event: CartEvent) -> bool:
        """A snapshot older than max_event_age_s (e.g. queued through a long outage): a newer one
        replaces it anyway. Deltas are always answered; a missing or unreadable ts is answered."""
        limit = self.config.max_event_age_s
        if limit <= 0 or not event.is_snapshot or event.ts is None:
            return False
        ts = parse_ts(event.ts)
        return ts is not None and (datetime.now(timezone.utc) - ts).total_seconds() > limit

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
            "items": [{"id": pid, "name": name} for pid, name in zip(rec.ids, snap.names_for(rec))],
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

    def _evicted(self, basket_ids: tuple[str, ...]) -> None:
        """Baskets dropped to stay within baskets.max_bytes / max_baskets: clear their displays, count, log."""
        for gone in basket_ids:
            self._publish_recommendations(gone, b"")
        self.metrics.evicted_baskets(len(basket_ids))
        n = self._log_due("evicted", len(basket_ids))
        if n:
            _LOG.warning("basket memory full (%d of %d bytes, %d baskets): evicted %d least recently used baskets "
                         "since the last such line (e.g. %s); their next delta is refused until a snapshot comes",
                         self.states.nbytes, self.states.max_bytes, len(self.states), n, basket_ids[0])

    def _log_due(self, key: str, n: int = 1, every_s: float = 60.0) -> int:
        """Rate limit for a noisy log line: 0 while it is quiet, else how many occurrences it reports."""
        self._quiet_count[key] = self._quiet_count.get(key, 0) + n
        now = time.monotonic()
        if now < self._quiet_until.get(key, 0.0):
            return 0
        self._quiet_until[key] = now + every_s
        return self._quiet_count.pop(key)

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
            # the event being handled is acknowledged once this publish is (ack_after)
            self._last_publish = self.out.publish(topic, payload, 1, retain)
            return True
        except AgentError as exc:
            _LOG.error("publish to %s failed: %s", topic, exc)
            return False

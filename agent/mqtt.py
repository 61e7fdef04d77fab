"""The paho-mqtt adapter: one connection, automatic reconnect, messages handed to a queue.

Everything paho-specific lives here. paho's network thread only copies each
incoming message into a bounded :class:`queue.Queue` (``MqttClient.messages``);
the service's worker thread does the real work. paho errors are mapped to
:class:`MqttError` (an :class:`~agent.errors.AgentError`) at this boundary.

Latency matters (an answer is expected within milliseconds): Nagle's algorithm
is switched off on the client socket (``TCP_NODELAY`` in ``on_socket_open``);
without it each round trip costs 40-90 ms on Linux. The broker needs
``set_tcp_nodelay true`` as well.

Sessions are clean (MQTT 3.1.1 ``clean_session``, MQTT 5 ``clean_start``), so
subscriptions are (re)made in ``on_connect`` every time the client connects.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from .errors import ConfigError, MqttError

_LOG = logging.getLogger(__name__)

__all__ = ["MqttError", "TLSSettings", "Will", "Message", "MqttClient", "PROTOCOLS"]

PROTOCOLS = {"3.1.1": MQTTProtocolVersion.MQTTv311, "5": MQTTProtocolVersion.MQTTv5}



@dataclass(frozen=True)
class TLSSettings:
    """TLS towards the broker; files are PEM paths. ``insecure`` skips the host name check."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class Will:
    """Last Will: published by the broker when the connection dies without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Message:
    """One received message; ``received`` is ``time.perf_counter()`` at arrival."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    received: float = field(default_factory=time.perf_counter)


class MqttClient:
    """A paho client (callback API v2) with reconnect, subscribe-on-connect and a message queue.

    ``on_connected(first: bool)`` and ``on_disconnected()`` run in paho's network
    thread: keep them short and non-blocking.
    """

    def __init__(self, host: str, port: int = 1883, *, client_id: str, protocol: str = "5",
                 keepalive: int = 30, username: str | None = None, password: str | None = None,
                 tls: TLSSettings | None = None, reconnect_min_s: float = 0.5,
                 reconnect_max_s: float = 30.0, subscriptions: Sequence[tuple[str, int]] = (),
                 will: Will | None = None, queue_size: int = 10000, max_queued_out: int = 10000,
                 on_connected: Callable[[bool], None] | None = None,
                 on_disconnected: Callable[[], None] | None = None,
                 on_drop: Callable[[Message], None] | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"MQTT protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.host, self.port, self.protocol, self.keepalive = host, port, protocol, keepalive
        self.subscriptions = list(subscriptions)
        self.messages: queue.Queue[Message] = queue.Queue(maxsize=queue_size)
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.on_drop = on_drop
        self._connected = threading.Event()
        self._ever_connected = False
        self._pending_subscribe: tuple[int, bool] | None = None  # (mid, first connect)
        self._started = False
        self._dropped_logged = 0.0
        kwargs: dict[str, Any] = {}
        if protocol == "3.1.1":
            kwargs["clean_session"] = True
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=PROTOCOLS[protocol], **kwargs)
        self._client.enable_logger(logging.getLogger(__name__ + ".paho"))
        # paho documents whole seconds but computes with floats: sub-second minimums work.
        self._client.reconnect_delay_set(min_delay=reconnect_min_s,  # type: ignore[arg-type]
                                         max_delay=max(reconnect_min_s, reconnect_max_s))  # type: ignore[arg-type]
        self._client.max_queued_messages_set(max_queued_out)
        self._client.max_inflight_messages_set(100)
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls is not None:
            try:
                self._client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                                     cert_reqs=ssl.CERT_REQUIRED)
                self._client.tls_insecure_set(tls.insecure)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"MQTT TLS set-up failed: {exc}") from exc
        if will is not None:
            try:
                self._client.will_set(will.topic, will.payload, will.qos, will.retain)
            except ValueError as exc:
                raise ConfigError(f"bad Last Will: {exc}") from exc
        c = self._client
        c.on_socket_open = self._on_socket_open
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Start connecting in the background; paho keeps reconnecting with back-off."""
        if self._started:
            return
        try:
            self._client.connect_async(self.host, self.port, self.keepalive)
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to MQTT broker {self.host}:{self.port}: {exc}") from exc
        if self._client.loop_start() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttError("paho network loop did not start")
        self._started = True
        _LOG.info("connecting to MQTT broker %s:%d (MQTT %s)", self.host, self.port, self.protocol)

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 2.0) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread."""
        if not self._started:
            return
        self._started = False
        try:
            self._client.disconnect()
        except Exception:  # paho may raise on an already broken socket
            _LOG.debug("disconnect failed", exc_info=True)
        self._client.loop_stop()
        self._connected.clear()

    # -- publishing ------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes | str | None, qos: int = 1,
                retain: bool = False) -> paho.MQTTMessageInfo:
        """Queue a message; QoS > 0 messages survive a reconnect. Raises MqttError when refused."""
        try:
            info = self._client.publish(topic, payload, qos, retain)
        except ValueError as exc:
            raise MqttError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttError(f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            raise MqttError(f"cannot publish to {topic!r}: not connected")
        return info

    def publish_and_wait(self, topic: str, payload: bytes | str | None, qos: int = 1,
                         retain: bool = False, timeout: float = 2.0) -> bool:
        """Publish and wait (at most ``timeout``) until the broker acknowledged it."""
        info = self.publish(topic, payload, qos, retain)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise MqttError(f"publish to {topic!r} failed: {exc}") from exc
        return info.is_published()

    # -- paho callbacks (network thread: never block here) ---------------------------------
    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            _LOG.debug("could not set TCP_NODELAY", exc_info=True)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            _LOG.error("MQTT broker %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        first = not self._ever_connected
        self._ever_connected = True
        _LOG.info("%s to MQTT broker %s:%d", "connected" if first else "reconnected", self.host, self.port)
        if self.subscriptions:
            # "connected" (and the agent's online status) waits for the SUBACK:
            # an event published before it would find nobody subscribed.
            rc, mid = client.subscribe(self.subscriptions)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                _LOG.error("subscribe failed: %s", paho.error_string(rc))
            self._pending_subscribe = (mid, first)
            return
        self._ready(first)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        pending = self._pending_subscribe
        if pending is None or pending[0] != mid:
            return
        self._pending_subscribe = None
        failed = [rc for rc in reason_codes if getattr(rc, "is_failure", False)]
        if failed:
            _LOG.error("broker refused subscriptions %s: %s", self.subscriptions, failed)
        self._ready(pending[1])

    def _ready(self, first: bool) -> None:
        self._connected.set()
        if self.on_connected is not None:
            try:
                self.on_connected(first)
            except Exception:
                _LOG.exception("on_connected hook failed")

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        _LOG.warning("cannot reach MQTT broker %s:%d; retrying", self.host, self.port)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._started and was:
            _LOG.warning("disconnected from MQTT broker (%s); reconnecting", reason_code)
        if self.on_disconnected is not None:
            try:
                self.on_disconnected()
            except Exception:
                _LOG.exception("on_disconnected hook failed")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            _LOG.warning("dropped a message whose topic is not UTF-8")
            return
        item = Message(topic, msg.payload, msg.qos, bool(msg.retain))
        try:
            self.messages.put_nowait(item)
        except queue.Full:
            if self.on_drop is not None:
                self.on_drop(item)
            now = time.monotonic()
            if now - self._dropped_logged > 5.0:
                self._dropped_logged = now
                _LOG.warning("work queue full (%d): dropping messages", self.messages.maxsize)

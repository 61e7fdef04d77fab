"""The paho-mqtt adapter: a connection with automatic reconnect, messages handed to a queue.

Everything paho-specific lives here. A network loop (:class:`NetworkLoop`, which may
serve several connections; run by a thread of its own, or by the agent's worker between
messages) only copies each incoming message into :attr:`MqttClient.messages`; the
service's worker does the real work. paho errors are mapped to :class:`MqttError` (an
:class:`~agent.errors.AgentError`) at this boundary.

Speed: paho's Python reading of one PUBLISH cost ~80 us and of one PUBACK ~30 us, more
than the guest model's answer. Complete PUBLISH (QoS 0/1) and successful PUBACK packets
in the read-ahead are therefore read here (:meth:`MqttClient._read_fast`, "the fast
lane"); paho reads everything else, and still owns the connection, the session, the
outgoing messages and keepalive.

Latency matters (an answer is expected within milliseconds): Nagle's algorithm
is switched off on the client socket (``TCP_NODELAY`` in ``on_socket_open``);
without it each round trip costs 40-90 ms on Linux. The broker needs
``set_tcp_nodelay true`` as well.

At-least-once delivery (``manual_ack=True``, ``session_expiry_s > 0``, the agent's
settings): the session is persistent (MQTT 3.1.1 ``clean_session=False``; MQTT 5
``clean_start=False`` and a Session Expiry Interval) under a stable client id, so
the broker queues QoS 1 events while the agent is away. paho acknowledges
nothing by itself; the worker calls :meth:`MqttClient.ack` /
:meth:`MqttClient.ack_after` once an event is handled (after its answer reached
the broker). Unacknowledged events are redelivered by the broker on the next
connection, also to the next process.

Flow control: nothing is dropped here. The broker should send at most its
inflight window of unacknowledged messages (MQTT 5: our Receive Maximum; 3.1.1:
its ``max_inflight_messages``), but Mosquitto 2.0.11 does not hold to it when the
client acknowledges more slowly than events arrive (measured: thousands in
flight with a window of 20). So the network loop is our own (paho's
``loop_read``/``loop_write``/``loop_misc`` around ``poll``, with paho's
back-off behaviour) and simply stops reading the socket while ``queue_size``
messages wait for the worker; the backlog stays in TCP buffers and at the broker
(whose drops, e.g. of a full ``max_queued_messages`` queue for an absent client,
are counted in ``$SYS/broker/publish/messages/dropped``:
:attr:`MqttClient.broker_dropped`). A pause lasts until the worker has taken one
message, far below the keepalive. The answers the worker publishes go out on a
connection of their own (the agent's ``-out`` client): their PUBACKs would
otherwise queue behind the unread events.

An acknowledgement is only valid on the connection the message arrived on: each
connection has a number (:attr:`Message.link`), an ack for an older one is not
sent, and a message of an older connection of the same session is not handled
(:meth:`MqttClient.redelivered`: the broker resends it). Subscriptions are
(re)made in ``on_connect`` every time (the session may be new).
"""

from __future__ import annotations

import collections
import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .errors import ConfigError, MqttError

if TYPE_CHECKING:
    from .config import BrokerConfig  # agent.config imports this module

_LOG = logging.getLogger(__name__)

__all__ = ["MqttError", "TLSSettings", "Will", "Message", "MqttClient", "NetworkLoop", "BufferedSocket", "PROTOCOLS",
           "SYS_DROPPED"]

_CONNECTED = getattr(getattr(paho, "_ConnectionState", None), "MQTT_CS_CONNECTED", None)
PROTOCOLS = {"3.1.1": MQTTProtocolVersion.MQTTv311, "5": MQTTProtocolVersion.MQTTv5}

#: Mosquitto's count of messages it dropped (full per-client queues); absent when ACLs forbid $SYS
SYS_DROPPED = "$SYS/broker/publish/messages/dropped"
_MAX_SESSION_EXPIRY = 0xFFFFFFFF
_FORGET_S = 1.0
_READ_AHEAD = 65536  # BufferedSocket: bytes asked of the kernel per recv
_WRITE_HIGH_WATER = 262144  # BufferedSocket: flush early beyond this many buffered bytes
_READ_BURST = 64  # packets read per pass while more are already buffered
_PUBLISH, _PUBACK = 3, 4  # MQTT packet types the fast lane reads (see MqttClient._read_fast)
_PUBACK_SUCCESS = (0x00, 0x10)  # MQTT 5's success reason codes for a PUBACK: success, no matching subscribers
#: what paho's client must have for the fast lane (a test fails when paho renames them)
FAST_LANE_NEEDS = ("_in_packet", "_state", "_out_message_mutex", "_out_messages", "_do_on_publish",
                   "_last_bytes_received", "_msgtime_mutex", "_out_packet", "_mid_generate", "_inflight_messages",
                   "_max_inflight_messages", "_max_queued_messages", "_raise_for_invalid_topic", "_sock",
                   "_pack_remaining_length")
_WAIT_FOR_PUBACK = getattr(paho, "mqtt_ms_wait_for_puback", None)
_TOPIC_HEADS_MAX = 4096  # MqttClient._publish_fast: encoded topics kept (answers go to one topic per basket)


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


class Message:
    """One received message; ``received`` is ``time.perf_counter()`` at arrival.

    ``mid`` (the broker's packet id) and ``link`` (the connection it came on) are what
    acknowledging it needs; ``retain`` is set when the broker replays a retained message.
    A plain class with slots, not a dataclass: one is made per event, and a frozen
    dataclass's ``__init__`` costs several times as much.
    """

    __slots__ = ("topic", "payload", "qos", "retain", "received", "mid", "link")

    def __init__(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                 received: float | None = None, mid: int = 0, link: int = 0) -> None:
        self.topic, self.payload, self.qos, self.retain = topic, payload, qos, retain
        self.received = time.perf_counter() if received is None else received
        self.mid, self.link = mid, link

    def __repr__(self) -> str:
        return (f"Message(topic={self.topic!r}, payload={self.payload[:40]!r}, qos={self.qos}, "
                f"retain={self.retain}, mid={self.mid}, link={self.link})")


class MqttClient:
    """A paho client (callback API v2) with reconnect, subscribe-on-connect and a message queue.

    ``on_connected(first: bool)``, ``on_disconnected()`` and ``on_published()`` run where the
    network loop runs (where paho's callbacks run): keep them short and non-blocking.
    ``loop``: share one :class:`NetworkLoop` between clients (default: its own, with a thread).
    ``on_drop`` is kept for callers; nothing is dropped any more. See the module docstring for
    ``manual_ack`` / ``session_expiry_s`` / ``receive_maximum``; ``watch_broker_drops``
    subscribes to :data:`SYS_DROPPED` (kept in :attr:`broker_dropped`, never queued).
    """

    @classmethod
    def for_broker(cls, broker: BrokerConfig, *, client_id: str, **kwargs: Any) -> MqttClient:
        """A client of a configured broker: its address, protocol, keepalive, credentials, TLS and
        reconnect back-off come from ``broker``; ``kwargs`` are the other keywords (or override those).

        ``broker.session_expiry_s`` / ``receive_maximum`` are the agent's events connection's: pass
        them explicitly where they apply.
        """
        link: dict[str, Any] = dict(
            protocol=broker.protocol, keepalive=broker.keepalive, username=broker.username,
            password=broker.password, tls=broker.tls, reconnect_min_s=broker.reconnect_min_s,
            reconnect_max_s=broker.reconnect_max_s)
        return cls(broker.host, broker.port, client_id=client_id, **{**link, **kwargs})

    def __init__(self, host: str, port: int = 1883, *, client_id: str, protocol: str = "5",
                 keepalive: int = 30, username: str | None = None, password: str | None = None,
                 tls: TLSSettings | None = None, reconnect_min_s: float = 0.5,
                 reconnect_max_s: float = 30.0, subscriptions: Sequence[tuple[str, int]] = (),
                 will: Will | None = None, queue_size: int = 10000, max_queued_out: int = 10000,
                 session_expiry_s: int = 0, receive_maximum: int = 0, manual_ack: bool = False,
                 watch_broker_drops: bool = False, track_published: bool = False,
                 on_connected: Callable[[bool], None] | None = None,
                 on_disconnected: Callable[[], None] | None = None,
                 on_drop: Callable[[Message], None] | None = None,
                 on_published: Callable[[], None] | None = None, loop: NetworkLoop | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"MQTT protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if not 0 <= receive_maximum <= 65535:
            raise ConfigError(f"MQTT receive maximum must be 0..65535, got {receive_maximum}")
        self.host, self.port, self.protocol, self.keepalive = host, port, protocol, keepalive
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.queue_size = queue_size
        # no maxsize: the network thread stops reading at queue_size instead (nothing is ever dropped).
        # SimpleQueue (C, one lock): a hand-off to the worker costs ~0.1 us instead of ~1.8, and a waiting
        # worker wakes ~5 us sooner than with Queue's condition variable
        self.messages: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.on_drop = on_drop
        self.manual_ack = manual_ack
        self.persistent = session_expiry_s > 0
        self.watch_broker_drops = watch_broker_drops
        self.refused: list[str] = []  # see _on_subscribe
        #: the broker's $SYS/broker/publish/messages/dropped; None until read (or when refused)
        self.broker_dropped: int | None = None
        #: acknowledgements sent, and not sent because their connection was gone (redelivered instead)
        self.acks_sent = 0
        self.acks_lost = 0
        #: QoS 1 publishes the broker acknowledged with a failure code (MQTT 5), see _on_publish
        self.publishes_refused = 0
        self._next_refusal_log = 0.0
        self._connected = threading.Event()
        self._ever_connected = False
        self._loop = loop or NetworkLoop()
        self._closing = False  # stop(): write DISCONNECT, then leave the loop
        self._done = threading.Event()  # the loop is finished with this client
        self._reconnect_min = reconnect_min_s
        self._reconnect_max = max(reconnect_min_s, reconnect_max_s)
        self._reconnect_reset = False  # set on CONNACK: the next outage starts at the minimum delay
        self._delay: float | None = None  # back-off in effect
        self._next_attempt: float | None = 0.0  # monotonic time of the next connection attempt
        self._paused = False
        self._discarding = False
        #: how often reading paused because the queue held queue_size messages
        self.pauses = 0
        #: messages not queued after discard_incoming() (unacknowledged: the broker redelivers them)
        self.discarded = 0
        self._pending_subscribe: tuple[int, bool] | None = None  # (mid, first connect)
        self._started = False
        # connection numbers: ``_link`` counts CONNACKs; ``_session_link`` is the first link of the
        # broker session in use. Guarded by _link_lock, which is held across ``client.ack`` so no
        # PUBACK is queued between a disconnect and the next CONNECT (paho clears its queue there).
        self._link_lock = threading.Lock()
        self._link = 0
        self._link_up = False
        self._session_link = 0
        # worker thread only: outgoing mid -> the event to acknowledge when that publish is acknowledged
        self._after: dict[int, Message] = {}
        #: with track_published: outgoing mids the broker acknowledged, appended by the network thread
        #: (on_publish) and consumed by settle() in the worker; registration and matching happen in one
        #: thread, so a PUBACK that overtakes the registration is never missed
        self.published_mids: collections.deque[int] = collections.deque()
        self.track_published = track_published
        self.on_published = on_published  # network thread, after each PUBACK: e.g. wake the worker
        self._next_forget = 0.0
        kwargs: dict[str, Any] = {}
        if protocol == "3.1.1":
            kwargs["clean_session"] = not self.persistent
        self._clean_start = not self.persistent
        self._connect_properties: Properties | None = None
        if protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            if self.persistent:
                props.SessionExpiryInterval = min(int(session_expiry_s), _MAX_SESSION_EXPIRY)
            if receive_maximum:
                props.ReceiveMaximum = receive_maximum
            self._connect_properties = props
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=PROTOCOLS[protocol], manual_ack=manual_ack, **kwargs)
        self._client.enable_logger(logging.getLogger(__name__ + ".paho"))
        self._client.max_queued_messages_set(max_queued_out)
        # no outgoing window: answers must not wait for PUBACKs that queue behind unread events
        # while reading is paused (Mosquitto 2.0.11 does not enforce its own Receive Maximum)
        self._client.max_inflight_messages_set(0)
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
        c.on_publish = self._on_publish
        c.on_socket_register_write = self._on_register_write
        if watch_broker_drops:
            c.message_callback_add(SYS_DROPPED, self._on_sys_dropped)
        #: PUBLISH and PUBACK packets read here instead of by paho (see _read_fast); off when this paho
        #: lacks what it needs
        self.fast_lane = (all(hasattr(c, name) for name in FAST_LANE_NEEDS) and _CONNECTED is not None
                          and _WAIT_FOR_PUBACK is not None and hasattr(paho, "time_func"))
        if not self.fast_lane:
            _LOG.info("paho-mqtt %s: its internals differ from 2.x; every packet goes through paho",
                      getattr(paho, "__version__", "?"))
        #: packets the fast lane took (the rest went through paho)
        self.fast_read = 0
        #: QoS 1 publishes and PUBACKs the fast lane wrote (the rest went through paho)
        self.fast_written = 0
        self._topic_heads: dict[tuple[str, bool], tuple[bytes, bytes]] = {}  # see _publish_fast
        self._puback_codes: dict[int, ReasonCode] = {}  # PUBACK reason codes, made once each
        self._no_properties = Properties(PacketTypes.PUBACK)
        self._v5 = protocol == "5"

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def queue_depth(self) -> int:
        """Messages received and not yet taken by the worker."""
        return self.messages.qsize()

    @property
    def unacked(self) -> int:
        """Handled events whose acknowledgement waits for their answer's PUBACK."""
        return len(self._after)

    @property
    def paused(self) -> bool:
        """True while the network thread does not read (the queue holds ``queue_size`` messages)."""
        return self._paused

    def start(self) -> None:
        """Start connecting in the background; the network loop keeps reconnecting with back-off."""
        if self._started:
            return
        try:
            self._client.connect_async(self.host, self.port, self.keepalive, clean_start=self._clean_start,
                                       properties=self._connect_properties)
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to MQTT broker {self.host}:{self.port}: {exc}") from exc
        self._closing = False
        self._done.clear()
        self._discarding = False
        self.discarded = 0
        self._delay, self._next_attempt = None, 0.0
        self._started = True
        self._loop.add(self)
        _LOG.info("connecting to MQTT broker %s:%d (MQTT %s)", self.host, self.port, self.protocol)

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 2.0) -> None:
        """Disconnect cleanly (no Last Will: DISCONNECT is written before the loop lets go) and stop."""
        if not self._started:
            return
        self._started = False
        self._closing = True
        try:
            self._client.disconnect()
        except Exception:  # paho may raise on an already broken socket
            _LOG.debug("disconnect failed", exc_info=True)
        self._loop.wake()
        if not self._loop.run_until(self._done.is_set, timeout):
            _LOG.warning("MQTT connection to %s:%d did not close within %.1f s", self.host, self.port, timeout)
        self._loop.remove(self)
        self._connected.clear()

    def discard_incoming(self) -> None:
        """From now on leave new messages unacknowledged instead of queueing them (shutting down).

        Reading goes on, without pausing; the broker redelivers the discarded messages to the
        next session.
        """
        self._discarding = True
        self._loop.wake()

    # -- driven by the NetworkLoop's thread --------------------------------------------------
    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # set so that paho never writes the socket from the worker thread itself
        self._loop.wake()

    def _prepare(self, now: float) -> tuple[Any, int, float | None]:
        """Before poll(): (socket or None, 0 = do not read / 1 = read when readable / 2 = read now,
        seconds until this client needs the loop again or None)."""
        c = self._client
        sock = c.socket()
        if sock is None:
            if self._closing:
                self._done.set()
                return None, 0, None
            if self._next_attempt is None:  # just lost (or failed): back off
                self._delay = self._reconnect_min if self._reconnect_reset or self._delay is None else min(
                    self._delay * 2, self._reconnect_max)
                self._reconnect_reset = False
                self._next_attempt = now + self._delay
            if now < self._next_attempt:
                return None, 0, self._next_attempt - now
            self._next_attempt = None
            try:
                c.reconnect()  # blocking TCP (and TLS) connect, then CONNECT is queued
            except (OSError, ValueError) as exc:
                _LOG.debug("connect failed: %s", exc)
                self._on_connect_fail(c, None)
                return None, 0, 0.0
            sock = c.socket()
            if sock is None:
                return None, 0, 0.0
        paused = not self._discarding and self.messages.qsize() >= self.queue_size
        if paused != self._paused:
            self._paused = paused
            if paused:
                self.pauses += 1
                _LOG.debug("work queue holds %d messages: not reading until the worker catches up",
                           self.queue_size)
        if paused:
            return sock, 0, 0.02  # look again soon: the worker is taking messages
        pending = getattr(sock, "pending", None)  # bytes already read or decrypted: poll would not see them
        if pending is not None and pending():
            return sock, 2, 0.0
        return sock, 1, None

    def _service(self, sock: Any, readable: bool, writable: bool) -> None:
        """After poll(): read, write and keep alive this client's connection.

        Reads every packet already received (up to a bound, and not past ``queue_size``
        waiting messages); what paho wrote meanwhile leaves in one ``send``.
        """
        c = self._client
        if readable and c.socket() is sock:
            fast = self.fast_lane and isinstance(sock, BufferedSocket)
            for _ in range(_READ_BURST):
                if fast and not c._in_packet["command"] and c._state is _CONNECTED:
                    if sock.fill():
                        self._read_fast(sock)
                        if self._full():
                            break
                        if not sock.buffered:  # all taken
                            if sock.pending():
                                continue  # TLS holds more decrypted bytes
                            break
                        # else the next packet is one for paho
                    elif not sock.failed:
                        break  # nothing more to read now
                    # else paho's read meets the error or the end of the connection
                c.loop_read()  # one packet (or the rest of one) the slow way
                if c.socket() is not sock or not sock.pending() or self._full():
                    break
        if c.socket() is sock and (writable or c.want_write()):
            c.loop_write()
        if c.socket() is sock:
            c.loop_misc()
        if c.socket() is sock and isinstance(sock, BufferedSocket):
            sock.flush()

    def _write_ahead(self, sock: BufferedSocket) -> None:
        """Before poll(): write what paho has queued (answers, acknowledgements) now, so the poll waits
        only for input instead of returning at once for a writable socket and costing a second pass
        (an idle agent made four passes per event, two of them only to write)."""
        c = self._client
        if c.socket() is sock:
            c.loop_write()
        if c.socket() is sock:
            sock.flush()

    def _full(self) -> bool:
        return not self._discarding and self.messages.qsize() >= self.queue_size

    def _read_fast(self, sock: BufferedSocket) -> None:
        """Take the PUBLISH (QoS 0 and 1) and plain PUBACK packets that lie complete in the read-ahead.

        paho's reading of one PUBLISH costs ~80 us of Python (a packet dictionary, three reads,
        a Properties object, an MQTTMessage, log formatting) and of one PUBACK ~30 us: at a few
        thousand events a second that was a quarter of the agent's CPU. Here a packet costs a
        few microseconds and has the same effect: a PUBLISH is queued as paho's ``on_message``
        would (:meth:`_on_message`), a PUBACK of one of our publishes completes it as paho's
        ``_handle_pubackcomp`` does. Everything else (CONNACK, SUBACK, PINGRESP, QoS 2, QoS 1 for a
        client that does not acknowledge by hand (paho acknowledges those), ``$`` topics, PUBACKs with a
        failure code, a code MQTT 5 does not define or properties, a packet cut by the end of the read-ahead,
        anything malformed) stops the lane and is left to paho, which reads it next.
        """
        c = self._client
        buf, pos, end = sock._rbuf, sock._rpos, len(sock._rbuf)
        put, received, link, v5 = self.messages.put_nowait, time.perf_counter(), self._link, self._v5
        taken = 0
        while pos < end:
            first = buf[pos]
            kind = first >> 4
            if kind != _PUBLISH and kind != _PUBACK:
                break
            # remaining length: 1 to 4 bytes of 7 bits
            i, length, shift = pos + 1, 0, 0
            while i < end and i < pos + 5:
                byte = buf[i]
                length |= (byte & 127) << shift
                i += 1
                if byte < 128:
                    break
                shift += 7
            else:
                break  # cut, or longer than 4 bytes (paho reports the protocol error)
            stop = i + length
            if stop > end:
                break  # the rest is still in the socket: paho reads it
            if kind == _PUBACK:
                # no reason code (2 bytes: success), or an MQTT 5 reason code below 0x80 (success, e.g.
                # 0x10 "no matching subscribers") without properties (3 bytes, or 4 with a zero length)
                code = buf[i + 2] if length > 2 else 0
                if length > 2 and (code not in _PUBACK_SUCCESS or length > 4 or (length == 4 and buf[i + 3])):
                    break  # a failure, a code MQTT 5 does not define, or properties: paho's decoder
                mid = (buf[i] << 8) | buf[i + 1]
                reason = self._puback_codes.get(code)
                if reason is None:
                    reason = self._puback_codes[code] = ReasonCode(PacketTypes.PUBACK, identifier=code)
                with c._out_message_mutex:
                    if mid in c._out_messages:
                        c._do_on_publish(mid, reason, self._no_properties)
            else:
                qos = (first >> 1) & 3
                if qos > 1 or length < 2 or (qos and not self.manual_ack):
                    break  # QoS 2; or QoS 1 that paho acknowledges itself (a client not acknowledging by hand)
                n = (buf[i] << 8) | buf[i + 1]
                p = i + 2 + n
                if n == 0 or p + (2 if qos else 0) > stop or buf[i + 2] == 0x24:  # an alias, short, or "$"
                    break
                try:
                    topic = buf[i + 2:p].decode()
                except UnicodeDecodeError:
                    break  # paho's handling (logged, acknowledged)
                mid = 0
                if qos:
                    mid = (buf[p] << 8) | buf[p + 1]
                    p += 2
                if v5:  # properties: a length (1 to 4 bytes), then skipped
                    plen, shift = 0, 0
                    while True:
                        if p >= stop or shift > 21:
                            plen = -1
                            break
                        byte = buf[p]
                        p += 1
                        plen |= (byte & 127) << shift
                        if byte < 128:
                            break
                        shift += 7
                    if plen < 0 or p + plen > stop:
                        break
                    p += plen
                if self._discarding:
                    self.discarded += 1
                else:
                    put(Message(topic, buf[p:stop], qos, bool(first & 1), received, mid, link))
            pos = stop
            taken += 1
            if kind == _PUBLISH and self._full():
                break
        sock._rpos = pos
        if taken:
            self.fast_read += taken
            with c._msgtime_mutex:
                c._last_bytes_received = time.monotonic()  # paho's keepalive: the broker is alive

    # -- acknowledging (worker thread) -----------------------------------------------------
    def ack(self, msg: Message) -> bool:
        """Acknowledge a handled QoS 1 message (manual_ack); False when its connection is gone.

        Not sent on a later connection: the broker redelivers the message there, and a new
        session may have given its packet id to another message.
        """
        if not self.manual_ack or msg.qos == 0 or not msg.mid:
            return True
        with self._link_lock:  # the network thread changes the link under this lock
            ok = (self._link_up and msg.link == self._link
                  and (msg.qos == 1 and self._write_fast(b"\x40\x02" + msg.mid.to_bytes(2, "big"))
                       or self._client.ack(msg.mid, msg.qos) == MQTTErrorCode.MQTT_ERR_SUCCESS))
            if ok:
                self.acks_sent += 1
            else:
                self.acks_lost += 1
        return ok

    def ack_after(self, msg: Message, info: paho.MQTTMessageInfo | None) -> None:
        """Acknowledge ``msg`` once ``info`` (the answer it caused) is acknowledged by the broker.

        So an event is never acknowledged while its answer could still be lost with this
        process. ``info`` None: acknowledge now. ``info`` comes from the client given to
        :meth:`settle` (a publish made while that client is offline is sent, and acknowledged,
        later). Worker thread only.
        """
        if not self.manual_ack or msg.qos == 0 or not msg.mid:
            return
        if info is None:
            self.ack(msg)
            return
        self._after[info.mid] = msg

    def settle(self, source: MqttClient) -> None:
        """Acknowledge the events whose answers ``source`` (``track_published``) saw acknowledged.

        Worker thread, often. Events whose connection is gone are forgotten (the broker
        redelivers them; their answers are still delivered by ``source``).
        """
        published = source.published_mids
        while True:
            try:
                mid = published.popleft()
            except IndexError:
                break
            msg = self._after.pop(mid, None)
            if msg is not None:
                self.ack(msg)
        now = time.monotonic()
        if self._after and now >= self._next_forget:
            self._next_forget = now + _FORGET_S
            stale = [mid for mid, msg in self._after.items() if msg.link != self._link]
            for mid in stale:
                del self._after[mid]
            if stale:
                with self._link_lock:
                    self.acks_lost += len(stale)

    def redelivered(self, msg: Message) -> bool:
        """True when the broker holds ``msg`` unacknowledged in the current session and resends it
        on the current connection (it came on an earlier one): handling this copy only duplicates."""
        if not self.manual_ack or msg.qos == 0 or not self.persistent:
            return False
        with self._link_lock:
            return self._session_link <= msg.link < self._link

    # -- publishing ------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes | str | None, qos: int = 1,
                retain: bool = False) -> paho.MQTTMessageInfo:
        """Queue a message; QoS > 0 messages survive a reconnect. Raises MqttError when refused."""
        if qos == 1 and type(payload) is bytes:
            info = self._publish_fast(topic, payload, retain)
            if info is not None:
                return info
        try:
            info = self._client.publish(topic, payload, qos, retain)
        except ValueError as exc:
            raise MqttError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttError(f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            raise MqttError(f"cannot publish to {topic!r}: not connected")
        return info

    def _writable_now(self) -> BufferedSocket | None:
        """The socket the fast lane may append packets to now, or None (then paho writes).

        Only from the thread that runs the network loop's passes (the agent's worker: it is
        the only one that writes the socket then), while connected, and while paho has
        nothing queued (what it queued must go first)."""
        c = self._client
        sock = c._sock
        if (not self.fast_lane or type(sock) is not BufferedSocket or c._out_packet or c._state is not _CONNECTED
                or sock.failed or self._loop.threaded or self._loop._runner != threading.get_ident()):
            return None
        return sock

    def _write_fast(self, packet: bytes) -> bool:
        """Append a complete packet that needs no bookkeeping (a PUBACK); False: paho must send it."""
        sock = self._writable_now()
        if sock is None:
            return False
        sock.send(packet)
        self.fast_written += 1
        return True

    def _publish_fast(self, topic: str, payload: bytes, retain: bool) -> paho.MQTTMessageInfo | None:
        """A QoS 1 publish as paho's ``publish()`` makes it, without its costs (~25 us: a debug log line
        formatted per packet, a packet dictionary, the write queue); None: paho publishes it.

        The same message object goes into paho's outgoing table in the same state, so its
        PUBACK, a reconnect's resend and ``info`` behave exactly as for paho's own; only the
        bytes are written straight into the buffered socket (:meth:`_writable_now`).
        """
        c = self._client
        sock = self._writable_now()
        if sock is None or (c._max_inflight_messages and c._inflight_messages >= c._max_inflight_messages) or (
                c._max_queued_messages and len(c._out_messages) >= c._max_queued_messages):
            return None
        key = (topic, retain)
        head = self._topic_heads.get(key)
        if head is None:
            topic_bytes = topic.encode("utf-8")
            if not topic_bytes:
                return None  # paho decides (an alias needs properties)
            try:
                c._raise_for_invalid_topic(topic_bytes)
            except ValueError as exc:
                raise MqttError(f"cannot publish to {topic!r}: {exc}") from exc
            if len(self._topic_heads) >= _TOPIC_HEADS_MAX:
                self._topic_heads.clear()
            head = self._topic_heads[key] = (b"\x33" if retain else b"\x32",  # PUBLISH, QoS 1
                                             len(topic_bytes).to_bytes(2, "big") + topic_bytes)
        first, topic_field = head
        # remaining length: topic, packet id, (MQTT 5) an empty property list, payload
        n = len(topic_field) + 2 + (1 if self._v5 else 0) + len(payload)
        if n > 268_435_455:
            return None  # paho raises its error
        packet = bytearray(first)
        c._pack_remaining_length(packet, n)
        mid = c._mid_generate()
        message = paho.MQTTMessage(mid, topic_field[2:])
        message.timestamp = paho.time_func()
        message.payload = payload
        message.qos = 1
        message.retain = retain
        with c._out_message_mutex:
            if mid in c._out_messages:
                return None  # every packet id in use: paho reports it
            c._out_messages[mid] = message
            c._inflight_messages += 1
            message.state = _WAIT_FOR_PUBACK
            packet += topic_field + mid.to_bytes(2, "big") + (b"\x00" if self._v5 else b"")
            sock.send(packet + payload)
        message.info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        self.fast_written += 1
        return message.info

    def publish_and_wait(self, topic: str, payload: bytes | str | None, qos: int = 1,
                         retain: bool = False, timeout: float = 2.0) -> bool:
        """Publish and wait (at most ``timeout``) until the broker acknowledged it."""
        info = self.publish(topic, payload, qos, retain)
        if not self._loop.threaded:  # nobody else runs the loop: run it here until the PUBACK
            if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                raise MqttError(f"publish to {topic!r} failed: the message queue is full")
            return self._loop.run_until(info.is_published, timeout)
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
        # paho assigned client._sock just before this callback and uses it from now on
        client._sock = BufferedSocket(sock)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            _LOG.error("MQTT broker %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        first = not self._ever_connected
        self._ever_connected = True
        resumed = bool(getattr(flags, "session_present", False)) and self.persistent
        with self._link_lock:
            self._link += 1
            if not resumed:
                self._session_link = self._link
            self._link_up = True
        self._reconnect_reset = True
        _LOG.info("%s to MQTT broker %s:%d (%s session)", "connected" if first else "reconnected", self.host,
                  self.port, "resumed" if resumed else "new persistent" if self.persistent else "clean")
        subscriptions = self.subscriptions + ([(SYS_DROPPED, 0)] if self.watch_broker_drops else [])
        if subscriptions:
            # "connected" (and the agent's online status) waits for the SUBACK:
            # an event published before it would find nobody subscribed.
            rc, mid = client.subscribe(subscriptions)
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
        codes = list(reason_codes)
        failed = [(topic, rc) for (topic, _), rc in zip(self.subscriptions, codes)
                  if getattr(rc, "is_failure", False)]
        #: topic filters the broker refused on the last connect (e.g. an ACL, or no $share support)
        self.refused = [topic for topic, _ in failed]
        if failed:
            _LOG.error("broker refused subscriptions: %s", ", ".join(f"{t} ({rc})" for t, rc in failed))
        if self.watch_broker_drops and len(codes) > len(self.subscriptions):
            rc = codes[len(self.subscriptions)]
            if getattr(rc, "is_failure", False):
                self.broker_dropped = None
                _LOG.info("broker refused %s (%s): its drops are not reported", SYS_DROPPED, rc)
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
        with self._link_lock:
            self._link_up = False
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
            _LOG.warning("ignored a message whose topic is not UTF-8")
            if self.manual_ack and msg.qos:
                client.ack(msg.mid, msg.qos)  # this thread, this connection
            return
        if self._discarding:
            self.discarded += 1
            return
        # never dropped: the network thread stops reading at queue_size (one read may overshoot a little)
        self.messages.put_nowait(Message(topic, msg.payload, msg.qos, bool(msg.retain), None, msg.mid,
                                         self._link))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            # MQTT 5: the broker took the message and dropped it (not authorized, quota exceeded, ...). The
            # event that caused it is acknowledged all the same (a redelivery would be refused again), so
            # this is the place the loss shows: counted, and logged at most once a minute.
            self.publishes_refused += 1
            now = time.monotonic()
            if now >= self._next_refusal_log:
                self._next_refusal_log = now + 60.0
                _LOG.warning("the broker refused a publish from %s: %s (%d refused so far; check this user's "
                             "ACL and the broker's limits)", self.client_id, reason_code, self.publishes_refused)
        if self.track_published:
            self.published_mids.append(mid)  # matched by settle() in the worker
        if self.on_published is not None:
            self.on_published()

    def _on_sys_dropped(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self.manual_ack and msg.qos:
            client.ack(msg.mid, msg.qos)
        try:
            self.broker_dropped = int(msg.payload)
        except ValueError:
            _LOG.debug("unreadable %s: %r", SYS_DROPPED, msg.payload[:40])

class BufferedSocket:
    """paho's socket, read in large chunks and written once per network-loop pass.

    paho reads a packet with three or more ``recv`` calls (type byte, each length byte,
    body) and sends every packet with its own ``send``; at a thousand events a second
    those system calls were a quarter of the agent's CPU. Here ``recv`` serves from a
    64 KiB read-ahead, and ``send`` only appends: :meth:`flush` (called by the network
    loop after each pass, and by :meth:`close`) writes everything in one call. Bytes
    read ahead are reported by :meth:`pending` (as an SSL socket reports decrypted
    bytes), so the loop reads them without waiting for ``poll``. Network thread only.
    """

    __slots__ = ("_sock", "_rbuf", "_rpos", "_wbuf", "_failed", "_read_failed", "_eof", "_write_waits_for_read")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._rbuf = b""
        self._rpos = 0
        self._wbuf = bytearray()
        self._failed: OSError | None = None
        self._read_failed: OSError | None = None  # met by fill(): raised to paho's next recv
        self._eof = False  # met by fill(): paho's next recv returns b""
        self._write_waits_for_read = False  # TLS wants to read (renegotiation) before it can write

    def recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            if self._failed is not None:
                raise self._failed
            if self._read_failed is not None:
                raise self._read_failed
            if self._eof:
                return b""
            self._write_waits_for_read = False
            self._rbuf = self._sock.recv(max(bufsize, _READ_AHEAD))  # BlockingIOError etc. go to paho
            self._rpos = 0
        end = self._rpos + bufsize
        out = self._rbuf[self._rpos:end]
        self._rpos = min(end, len(self._rbuf))
        return out

    def fill(self) -> bool:
        """Read ahead if nothing is buffered; True when bytes are buffered now.

        For :meth:`MqttClient._read_fast`. Nothing to read now is False; an error or the end
        of the connection is False too, and kept for paho's next ``recv`` (:attr:`failed`).
        """
        if self._rpos < len(self._rbuf):
            return True
        if self.failed:
            return False
        try:
            data = self._sock.recv(_READ_AHEAD)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError as exc:
            self._read_failed = exc
            return False
        if not data:
            self._eof = True
            return False
        self._write_waits_for_read = False
        self._rbuf, self._rpos = data, 0
        return True

    @property
    def buffered(self) -> int:
        """Bytes read ahead and not yet taken."""
        return len(self._rbuf) - self._rpos

    @property
    def failed(self) -> bool:
        """The connection failed or ended: paho learns it at its next ``recv``."""
        return self._failed is not None or self._read_failed is not None or self._eof

    def send(self, data: bytes | bytearray | memoryview) -> int:
        if self._failed is not None:
            raise self._failed
        self._wbuf += data
        if len(self._wbuf) >= _WRITE_HIGH_WATER:
            self.flush()
        return len(data)

    @property
    def unsent(self) -> int:
        """Bytes waiting for the socket to become writable (0 while TLS first waits to read)."""
        return 0 if self._write_waits_for_read else len(self._wbuf)

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._rbuf) - self._rpos + (inner() if inner is not None else 0)

    def flush(self) -> None:
        """Write what is buffered, as far as the socket takes it now (never blocks)."""
        while self._wbuf and self._failed is None:
            try:
                n = self._sock.send(self._wbuf)
            except ssl.SSLWantReadError:  # polling for writing would spin: wait for the next read
                self._write_waits_for_read = True
                return
            except (BlockingIOError, ssl.SSLWantWriteError, InterruptedError):
                return  # the loop polls for writing while unsent > 0
            except OSError as exc:  # the connection is gone: paho notices at its next recv
                self._failed = exc
                self._wbuf.clear()
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            del self._wbuf[:n]

    def close(self) -> None:
        """Flush what the socket takes now (a DISCONNECT must reach the broker, or it publishes our
        Will; it fits in any send buffer), then close. Never blocks the shared network thread."""
        self.flush()
        self._wbuf.clear()
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:  # setblocking, getpeercert, ... of the real socket
        return getattr(self._sock, name)


class NetworkLoop:
    """The network work of one or more :class:`MqttClient` s (paho's ``loop_read``, ``loop_write``,
    ``loop_misc`` around one ``poll``), in place of paho's ``loop_start``.

    Why not paho's thread: a client must be able to stop reading while its queue is full
    (module docstring), and the agent's two connections share one loop. Reconnecting
    follows paho's back-off: the minimum delay after a lost connection, doubling up to the
    maximum while attempts fail. Callbacks of the clients run in the thread that runs it.

    ``threaded`` (the default): a thread of its own runs it. Otherwise the caller does, with
    :meth:`run_once` (the agent's worker, between messages: see ``AgentService._work``):
    with two threads every event crossed between them twice, and the hand-overs of the GIL
    (futex calls, context switches, a ``poll`` and a ``send`` pass per answer) cost more
    CPU than the event's Python. :meth:`MqttClient.stop` and ``publish_and_wait`` run the
    loop themselves when nobody else does (:meth:`run_until`).
    """

    def __init__(self, name: str = "mqtt-network", *, threaded: bool = True) -> None:
        self.name = name
        self.threaded = threaded
        self._clients: list[MqttClient] = []
        self._lock = threading.Lock()
        self._pass_lock = threading.Lock()  # one pass at a time (run_once from several threads)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        # without a thread: the thread that ran the last pass, and the one inside a pass now (see wake)
        self._runner: int | None = None
        self._in_pass: int | None = None
        #: wake-ups written to the wake socket, and wake-ups not needed (the caller runs the next pass)
        self.wakes = self.wakes_skipped = 0

    def add(self, client: MqttClient) -> None:
        with self._lock:
            if client not in self._clients:
                self._clients.append(client)
            if self._wake_r is None:
                self._wake_r, self._wake_w = socket.socketpair()
                self._wake_r.setblocking(False)
                self._wake_w.setblocking(False)
            if self.threaded and self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self.wake()

    def remove(self, client: MqttClient) -> None:
        """Forget ``client``; the thread ends with the last one."""
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
            last = not self._clients
            thread = self._thread if last else None
            if thread is not None:
                self._stop.set()
        if thread is not None:
            self.wake()
            if thread is not threading.current_thread():
                thread.join(2.0)
        if last:
            with self._lock:
                if self._thread is thread and not self._clients:
                    self._thread = None
                    for s in (self._wake_r, self._wake_w):
                        if s is not None:
                            s.close()
                    self._wake_r = self._wake_w = None

    def wake(self) -> None:
        """Make the loop look again (something to write, a client added or stopping).

        Without a thread, a wake-up from the thread that runs the passes, while no other
        thread is inside one, is not written: its next pass looks anyway (and polls for
        writing while paho has something to write). The agent's worker queues two packets
        per event (the answer, then the event's PUBACK); each wake-up cost a ``send``, a
        ``recv`` and a ``poll`` that returned at once.
        """
        if not self.threaded:
            me = threading.get_ident()
            if self._runner == me and self._in_pass in (None, me):
                self.wakes_skipped += 1
                return
        w = self._wake_w
        if w is not None:
            self.wakes += 1
            try:
                w.send(b"\0")
            except OSError:  # full (already woken) or closed
                pass

    def run_once(self, timeout: float = 0.0) -> None:
        """One pass (without a thread of its own): wait at most ``timeout`` s for something to do,
        then read, write and keep alive every client. Never raises."""
        wake_r = self._wake_r
        if wake_r is None:
            if timeout > 0:
                time.sleep(min(timeout, 0.05))  # no client yet
            return
        with self._pass_lock:
            self._runner = self._in_pass = threading.get_ident()
            try:
                self._once(wake_r, timeout)
            except Exception:  # paho re-raises callback errors; the caller must go on
                _LOG.exception("MQTT network loop failed; continuing")
            finally:
                self._in_pass = None

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``done()`` (at most ``timeout`` s), running the loop if it has no thread."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.threaded:
                time.sleep(min(left, 0.005))
            else:
                self.run_once(min(left, 0.02))
        return True

    def _run(self) -> None:
        wake_r = self._wake_r
        assert wake_r is not None
        while not self._stop.is_set():
            try:
                self._once(wake_r, 1.0)
            except Exception:  # never let the network thread die; paho re-raises callback errors
                _LOG.exception("MQTT network loop failed; continuing")
                self._stop.wait(0.1)
        _LOG.debug("MQTT network thread ends")

    def _once(self, wake_r: socket.socket, timeout: float) -> None:
        with self._lock:
            clients = list(self._clients)
        now = time.monotonic()
        # poll(), not select(): select() cannot watch a descriptor numbered 1024 or more, and the
        # HTTP bridge in the same process may hold that many connections
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        ready: list[tuple[MqttClient, Any, int, int]] = []
        for cl in clients:
            sock, read, due = cl._prepare(now)
            if due is not None:
                timeout = min(timeout, max(0.0, due))
            if sock is None:
                continue
            try:
                fd = sock.fileno()
            except (OSError, ValueError):  # closed meanwhile
                continue
            if isinstance(sock, BufferedSocket) and (cl._client.want_write() or sock.unsent):
                cl._write_ahead(sock)
            mask = (select.POLLIN if read else 0) | (
                select.POLLOUT if cl._client.want_write() or getattr(sock, "unsent", 0) else 0)
            ready.append((cl, sock, read, fd))
            if mask and fd >= 0:
                poller.register(fd, mask)
        try:
            events = dict(poller.poll(timeout * 1000))
        except (OSError, ValueError, TypeError):  # a socket was closed meanwhile
            return
        if events.get(wake_r.fileno()):
            try:
                wake_r.recv(4096)
            except OSError:
                pass
        for cl, sock, read, fd in ready:
            ev = events.get(fd, 0)
            # errors and hang-ups count as readable: paho's read then sees the closed connection
            readable = bool(ev & (select.POLLIN | select.POLLERR | select.POLLHUP))
            cl._service(sock, read == 2 or (read == 1 and readable), bool(ev & select.POLLOUT))

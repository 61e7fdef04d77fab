"""The MQTT fast lane (``MqttClient._read_fast``): PUBLISH and PUBACK packets read without paho; and the
network loop without a thread of its own (``NetworkLoop(threaded=False)``), which the agent's worker runs.

It must deliver exactly what paho would (topic, payload, QoS, retain flag, packet id), over
both protocols, through a real Mosquitto, with MQTT 5 properties skipped correctly; and it
must leave every packet it does not fully understand to paho, untouched.
"""

from __future__ import annotations

import queue
import struct
import threading
import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt import _CONNECTED, FAST_LANE_NEEDS, BufferedSocket, Message, MqttClient, NetworkLoop, Will
from scripts.brokers import Broker

PAHO_PROTOCOLS = {"3.1.1": paho.MQTTv311, "5": paho.MQTTv5}


def _publisher(broker: Broker, protocol: str) -> paho.Client:
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                      protocol=PAHO_PROTOCOLS[protocol])
    pub.max_inflight_messages_set(0)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    return pub


def _drain(client: MqttClient, n: int, timeout: float = 10.0) -> list[Message]:
    """Take n messages, acknowledging each (the broker holds QoS 1 messages past its inflight window)."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        try:
            msg = client.messages.get(timeout=0.2)
        except queue.Empty:
            continue
        assert client.ack(msg)
        got.append(msg)
    return got


def test_paho_has_what_the_fast_lane_needs() -> None:
    """A paho release that renames these fails here, not silently in the field (the lane would be off)."""
    client = MqttClient("127.0.0.1", 1, client_id="needs")
    assert client.fast_lane, [name for name in FAST_LANE_NEEDS if not hasattr(client._client, name)]
    assert _CONNECTED is not None


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_messages_read_by_the_fast_lane_are_what_paho_delivers(mqtt_broker: Broker, protocol: str) -> None:
    prefix = f"fast/{uuid.uuid4().hex[:8]}"
    sub = MqttClient(mqtt_broker.host, mqtt_broker.port, client_id=f"fast-{uuid.uuid4().hex[:8]}",
                     protocol=protocol, subscriptions=[(f"{prefix}/#", 1)], manual_ack=True,
                     session_expiry_s=60)
    # the reference: paho itself, subscribed to the same topics
    seen: queue.Queue[paho.MQTTMessage] = queue.Queue()
    ref = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"ref-{uuid.uuid4().hex[:8]}",
                      protocol=PAHO_PROTOCOLS[protocol])
    ref.on_message = lambda c, u, m: seen.put(m)
    ref.connect(mqtt_broker.host, mqtt_broker.port)
    ref.subscribe(f"{prefix}/#", 1)
    ref.loop_start()
    pub = _publisher(mqtt_broker, protocol)
    try:
        sub.start()
        assert sub.wait_connected(10)
        time.sleep(0.2)  # the reference's SUBACK
        sent = []
        sizes = [0, 1, 2, 127, 128, 300, 16383, 16384, 70_000, 200_000]  # length bytes 1..3; past the read-ahead
        for i in range(120):
            topic = f"{prefix}/basket/장바구니-{i % 7}/cart"
            payload = bytes((i + j) % 251 for j in range(sizes[i % len(sizes)]))
            qos = i % 2
            props = None
            if protocol == "5" and i % 3 == 0:  # properties the lane must skip, of several lengths
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = [("k", "v" * (i * 3))]
                props.ContentType = "application/json"
            pub.publish(topic, payload, qos, properties=props)
            sent.append((topic, payload, qos))
        got = _drain(sub, len(sent))
        for qos in (0, 1):  # in order within a QoS (the broker may hold QoS 1 back behind its window)
            assert [(m.topic, m.payload, m.qos) for m in got if m.qos == qos] == [x for x in sent if x[2] == qos]
        assert all(m.retain is False for m in got)
        assert all((m.mid > 0) == (m.qos == 1) for m in got)
        assert len({m.mid for m in got if m.qos}) == sum(1 for _, _, q in sent if q)
        reference = [seen.get(timeout=5) for _ in sent]
        assert sorted((m.topic, m.payload, m.qos) for m in reference) == sorted(sent)
        assert sub.fast_read >= len(sent) // 2, "the fast lane took (almost) nothing"
        assert sub.acks_sent == sum(1 for _, _, q in sent if q)

        # a retained message replayed on subscribe carries the retain flag
        pub.publish(f"{prefix}/kept", b"old", 1, retain=True).wait_for_publish(5)
        sub.stop()
        sub2 = MqttClient(mqtt_broker.host, mqtt_broker.port, client_id=f"fast2-{uuid.uuid4().hex[:8]}",
                          protocol=protocol, subscriptions=[(f"{prefix}/kept", 1)])
        sub2.start()
        try:
            kept = _drain(sub2, 1)
            assert [(m.topic, m.payload, m.retain) for m in kept] == [(f"{prefix}/kept", b"old", True)]
        finally:
            sub2.stop()
    finally:
        pub.publish(f"{prefix}/kept", b"", 1, retain=True).wait_for_publish(5)
        sub.stop()
        for c in (ref, pub):
            c.loop_stop()
            c.disconnect()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_pubacks_read_by_the_fast_lane_complete_publishes(mqtt_broker: Broker, protocol: str) -> None:
    out = MqttClient(mqtt_broker.host, mqtt_broker.port, client_id=f"out-{uuid.uuid4().hex[:8]}",
                     protocol=protocol, track_published=True)
    acked = threading.Event()
    out.on_published = acked.set
    out.start()
    try:
        assert out.wait_connected(10)
        infos = [out.publish(f"fast/{uuid.uuid4().hex[:6]}/out", b"x" * (i % 50), 1) for i in range(500)]
        assert out._loop.run_until(lambda: len(out.published_mids) == 500, 10)  # its own thread runs it
        assert sorted(out.published_mids) == sorted(info.mid for info in infos)
        assert all(info.is_published() for info in infos)
        assert not out._client._out_messages  # paho forgot them: nothing is resent on a reconnect
        assert out.fast_read >= 250
        assert acked.is_set()  # on_published is called for PUBACKs the lane read
    finally:
        out.stop()


class _Bytes:
    """A socket that returns prepared bytes once."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def recv(self, n: int) -> bytes:
        if not self.data:
            raise BlockingIOError
        out, self.data = self.data[:n], self.data[n:]
        return out

    def close(self) -> None:
        pass


def _publish_packet(topic: bytes, payload: bytes, qos: int = 1, mid: int = 7, props: bytes = b"") -> bytes:
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + props + payload
    return bytes([0x30 | qos << 1]) + _varint(len(body)) + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, b = divmod(n, 128)
        out.append(b | (128 if n else 0))
        if not n:
            return bytes(out)


GOOD = _publish_packet(b"s/basket/b1/cart", b'{"a":1}', props=b"\x00")
LEFT_FOR_PAHO = {
    "QoS 2": _publish_packet(b"s/basket/b1/cart", b"x", qos=2, props=b"\x00"),
    "a $ topic": _publish_packet(b"$SYS/broker/publish/messages/dropped", b"3", qos=0, props=b"\x00"),
    "an empty topic (an alias)": _publish_packet(b"", b"x", props=b"\x03\x23\x00\x01"),
    "a topic that is not UTF-8": _publish_packet(b"s/\xff\xfe", b"x", props=b"\x00"),
    "properties longer than the packet": _publish_packet(b"s/t", b"", props=b"\x05\x01"),
    "a length of five bytes": b"\x32\xff\xff\xff\xff\x01" + b"\x00" * 8,
    "a packet cut by the end of the read": GOOD[:-3],
    "a PUBACK with a failure": b"\x40\x03\x00\x07\x80",
    "a PUBACK with a success code MQTT 5 does not define": b"\x40\x03\x00\x07\x05",
    "a PUBACK with properties": b"\x40\x08\x00\x07\x00\x04\x1f\x00\x01x",
    "a SUBACK": b"\x90\x03\x00\x01\x01",
    "a PINGRESP": b"\xd0\x00",
    "a packet id past the packet": b"\x32\x03\x00\x01s",
}


@pytest.mark.parametrize("what", list(LEFT_FOR_PAHO))
def test_what_the_fast_lane_does_not_read_is_left_to_paho(what: str) -> None:
    """Two good packets are taken; the one after them is left, byte for byte, for paho."""
    client = MqttClient("127.0.0.1", 1, client_id="parse", protocol="5", manual_ack=True)
    client._client._state = _CONNECTED
    tail = LEFT_FOR_PAHO[what] + (b"" if "cut" in what else GOOD)
    sock = BufferedSocket(_Bytes(GOOD + GOOD + tail))
    assert sock.fill()
    client._read_fast(sock)
    got = [client.messages.get_nowait() for _ in range(client.messages.qsize())]
    assert [(m.topic, m.payload, m.mid, m.qos) for m in got] == [("s/basket/b1/cart", b'{"a":1}', 7, 1)] * 2
    assert sock.buffered == len(tail)
    assert sock.recv(len(tail)) == tail  # paho reads exactly what was left


def test_a_qos1_message_for_a_client_that_does_not_acknowledge_by_hand_is_left_to_paho() -> None:
    """paho acknowledges those itself (the bridge's and the console's subscriptions); read by the lane they
    were never acknowledged, and the broker stopped delivering after its inflight window (20 messages)."""
    client = MqttClient("127.0.0.1", 1, client_id="auto", protocol="5")
    client._client._state = _CONNECTED
    at_most_once = _publish_packet(b"s/t", b"x", qos=0, props=b"\x00")
    sock = BufferedSocket(_Bytes(at_most_once + GOOD))
    assert sock.fill()
    client._read_fast(sock)
    assert client.messages.qsize() == 1 and sock.buffered == len(GOOD)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_client_that_does_not_acknowledge_by_hand_gets_every_qos1_message(mqtt_broker: Broker,
                                                                           protocol: str) -> None:
    client = MqttClient(mqtt_broker.host, mqtt_broker.port, client_id=f"auto-{uuid.uuid4().hex[:8]}",
                        protocol=protocol, subscriptions=[("auto/#", 1)])
    client.start()
    pub = _publisher(mqtt_broker, protocol)
    try:
        deadline = time.monotonic() + 10
        while not client.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # subscribed
        for i in range(60):  # three times Mosquitto's inflight window
            assert pub.publish(f"auto/{i}", b"x", qos=1).wait_for_publish(5) is None
        got: list[Message] = []
        while len(got) < 60 and time.monotonic() < deadline + 10:
            try:
                got.append(client.messages.get(timeout=0.2))  # not acknowledged by hand: paho does it
            except queue.Empty:
                continue
        assert sorted(int(m.topic.split("/")[1]) for m in got) == list(range(60))
    finally:
        pub.loop_stop()
        pub.disconnect()
        client.stop()


def test_successful_pubacks_complete_the_publish_whatever_their_reason_code() -> None:
    """MQTT 5 success codes below 0x80 (Mosquitto sends 0x10 "no matching subscribers") are successes."""
    client = MqttClient("127.0.0.1", 1, client_id="acks", protocol="5", track_published=True)
    c = client._client
    c._state = _CONNECTED
    c._sock = BufferedSocket(_Bytes(b""))
    infos = [client.publish("s/out", b"x", 1) for _ in range(4)]
    acks = b"".join([b"\x40\x02" + struct.pack("!H", infos[0].mid),
                     b"\x40\x03" + struct.pack("!H", infos[1].mid) + b"\x10",
                     b"\x40\x04" + struct.pack("!H", infos[2].mid) + b"\x00\x00",
                     b"\x40\x03" + struct.pack("!H", infos[3].mid) + b"\x00"])
    sock = BufferedSocket(_Bytes(acks))
    assert sock.fill()
    client._read_fast(sock)
    assert list(client.published_mids) == [info.mid for info in infos]
    assert all(info.is_published() for info in infos) and not c._out_messages and sock.buffered == 0


def test_a_publish_the_broker_refuses_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """An MQTT 5 PUBACK with a failure code (paho reads it: the lane leaves failures to paho) still completes
    the publish, so the event behind it is acknowledged; the loss is counted and logged, at most once a minute."""
    client = MqttClient("127.0.0.1", 1, client_id="refused", protocol="5", track_published=True)
    c = client._client
    c._state = _CONNECTED
    c._sock = BufferedSocket(_Bytes(b""))
    infos = [client.publish("s/out", b"x", 1) for _ in range(3)]
    acks = b"".join(b"\x40\x03" + struct.pack("!H", info.mid) + code
                    for info, code in zip(infos, (b"\x87", b"\x00", b"\x97")))
    sock = BufferedSocket(_Bytes(acks))
    assert sock.fill()
    c._sock = sock
    with caplog.at_level("WARNING", logger="agent.mqtt"):
        while sock.buffered:
            client._read_fast(sock)
            if sock.buffered:
                assert c._packet_read() == paho.MQTT_ERR_SUCCESS
    assert list(client.published_mids) == [info.mid for info in infos]
    assert client.publishes_refused == 2
    refusals = [r.getMessage() for r in caplog.records if "refused a publish" in r.getMessage()]
    assert len(refusals) == 1 and "Not authorized" in refusals[0] and "refused" in refusals[0]


def test_the_fast_lane_stops_at_a_full_queue() -> None:
    client = MqttClient("127.0.0.1", 1, client_id="full", protocol="3.1.1", queue_size=3)
    client._client._state = _CONNECTED
    one = _publish_packet(b"s/t", b"x", qos=0)
    sock = BufferedSocket(_Bytes(one * 10))
    assert sock.fill()
    client._read_fast(sock)
    assert client.messages.qsize() == 3
    assert sock.buffered == len(one) * 7
    client.discard_incoming()  # shutting down: read on, queue nothing
    client._read_fast(sock)
    assert client.messages.qsize() == 3 and client.discarded == 7 and sock.buffered == 0


def test_fill_keeps_the_end_of_the_connection_for_paho() -> None:
    class Closed:
        def recv(self, n: int) -> bytes:
            return b""

    sock = BufferedSocket(Closed())
    assert not sock.fill() and sock.failed
    assert sock.recv(1) == b""  # paho sees the end and reconnects

    class Broken:
        def recv(self, n: int) -> bytes:
            raise ConnectionResetError("reset")

    sock = BufferedSocket(Broken())
    assert not sock.fill() and sock.failed
    with pytest.raises(ConnectionResetError):
        sock.recv(1)


# --- the loop without a thread of its own (the agent's: its worker runs it) -------------------------
def test_a_loop_without_a_thread_runs_only_where_it_is_called(mqtt_broker: Broker) -> None:
    """Connecting, reading, publish_and_wait and a clean stop (no Last Will) all happen in the passes of
    whoever calls run_once: here the test itself."""
    prefix = f"inline/{uuid.uuid4().hex[:8]}"
    will_topic = f"{prefix}/status"
    watched: queue.Queue[bytes] = queue.Queue()
    watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"w-{uuid.uuid4().hex[:8]}",
                          protocol=paho.MQTTv5)
    watcher.on_message = lambda c, u, m: watched.put(m.payload)
    watcher.connect(mqtt_broker.host, mqtt_broker.port)
    watcher.subscribe(will_topic, 1)
    watcher.loop_start()
    loop = NetworkLoop(threaded=False)
    client = MqttClient(mqtt_broker.host, mqtt_broker.port, client_id=f"inline-{uuid.uuid4().hex[:8]}",
                        subscriptions=[(f"{prefix}/in", 1)], will=Will(will_topic, b"gone", 1, False), loop=loop)
    pub = _publisher(mqtt_broker, "5")
    try:
        client.start()
        time.sleep(0.3)
        assert not client.connected  # nobody ran the loop
        assert "mqtt-network" not in {t.name for t in threading.enumerate()}
        assert loop.run_until(lambda: client.connected, 10)
        pub.publish(f"{prefix}/in", b"hello", 1)
        assert loop.run_until(lambda: client.messages.qsize() > 0, 10)
        assert client.messages.get_nowait().payload == b"hello"
        assert client.publish_and_wait(f"{prefix}/out", b"x", 1, timeout=5)  # runs the loop itself
        client.stop()
        assert not client.connected
        with pytest.raises(queue.Empty):  # a clean DISCONNECT: the broker keeps the Will to itself
            watched.get(timeout=1.0)
    finally:
        client.stop()
        for c in (pub, watcher):
            c.loop_stop()
            c.disconnect()


@pytest.mark.parametrize("fast_lane", [True, False])
def test_the_thread_running_the_loop_writes_before_it_waits_and_never_wakes_itself(mqtt_broker: Broker,
                                                                                    fast_lane: bool) -> None:
    """An idle agent's worker publishes an answer, then runs a pass: the answer is written before the
    pass polls, so that one pass also reads the broker's PUBACK (before, the first pass returned at once
    for a writable socket and a second one waited). A wake-up from the thread that runs the passes is not
    written to the wake socket; one from another thread still interrupts a pass waiting in poll.
    With the fast lane the answer goes straight into the buffered socket (no wake-up to skip); without
    it paho queues it and asks for a wake-up, which is skipped."""
    loop = NetworkLoop(threaded=False)
    client = MqttClient(mqtt_broker.host, mqtt_broker.port, client_id=f"ahead-{uuid.uuid4().hex[:8]}", loop=loop)
    client.fast_lane = fast_lane
    prefix = f"ahead/{uuid.uuid4().hex[:8]}"
    try:
        client.start()
        assert loop.run_until(lambda: client.connected, 10)
        loop.run_once(0.0)  # the SUBACK-less start settles: nothing left to write
        skipped = loop.wakes_skipped
        for i in range(20):
            written = loop.wakes
            info = client.publish(f"{prefix}/answer", b"a%d" % i, 1)
            assert loop.wakes == written  # this thread runs the next pass: no wake-up written
            loop.run_once(5.0)  # writes, then waits for input: the PUBACK
            assert info.is_published(), f"publish {i} needed a second pass"
        if fast_lane:
            assert client.fast_written == 20 and loop.wakes_skipped == skipped
        else:
            assert client.fast_written == 0 and loop.wakes_skipped >= skipped + 20

        woken = threading.Event()

        def publish_from_elsewhere() -> None:
            time.sleep(0.3)
            client.publish(f"{prefix}/other", b"o", 1)  # e.g. the updater's status
            woken.set()

        other = threading.Thread(target=publish_from_elsewhere)
        written = loop.wakes
        other.start()
        t0 = time.monotonic()
        loop.run_once(30.0)  # interrupted by the other thread's wake-up, not ended by the timeout
        other.join()
        assert woken.is_set() and time.monotonic() - t0 < 15.0
        assert loop.wakes == written + 1
        assert loop.run_until(lambda: not client._client.want_write() and client.unacked == 0, 5)
    finally:
        client.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_write_lane_writes_what_paho_writes_and_its_publishes_complete_like_paho_s(
        mqtt_broker: Broker, protocol: str) -> None:
    """A QoS 1 publish written by the fast lane is byte for byte paho's packet (but its packet id),
    for remaining lengths of 1 to 3 bytes, retained or not; it sits in paho's outgoing table in the
    same state, so the broker's PUBACK completes it and a subscriber receives exactly the payload.
    PUBACKs of received events take the lane too. Another thread, or anything paho has queued
    first, sends the packet through paho instead (in order)."""
    prefix = f"lane/{uuid.uuid4().hex[:8]}"
    loop = NetworkLoop(threaded=False)
    client = MqttClient(mqtt_broker.host, mqtt_broker.port, client_id=f"lane-{uuid.uuid4().hex[:8]}", loop=loop,
                        protocol=protocol, subscriptions=[(f"{prefix}/in", 1)], manual_ack=True)
    got: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}",
                      protocol=PAHO_PROTOCOLS[protocol])
    sub.on_message = lambda c, u, m: got.put((m.topic, m.payload, m.retain))
    sub.connect(mqtt_broker.host, mqtt_broker.port)
    sub.subscribe(f"{prefix}/#", 1)
    sub.loop_start()
    pub = _publisher(mqtt_broker, protocol)
    try:
        client.start()
        assert loop.run_until(lambda: client.connected, 10)
        time.sleep(0.3)  # the subscriber's SUBACK
        loop.run_once(0.0)
        sock = client._client._sock
        assert isinstance(sock, BufferedSocket)
        cases = [("a", 0, False), ("a", 100, True), (f"ü/{'t' * 60}", 120, False), ("b", 200, False),
                 ("b", 16_370, False), ("b", 16_390, True), ("c", 70_000, False)]
        for i, (leaf, size, retain) in enumerate(cases):
            topic, payload = f"{prefix}/out/{leaf}", bytes([65 + i % 26]) * size
            packets = []
            for fast in (True, False):
                client.fast_lane = fast
                before = client.fast_written
                info = client.publish(topic, payload, 1, retain)
                client._client.loop_write()  # paho's queue into the buffered socket (no-op for the lane)
                packets.append((bytes(sock._wbuf), info))
                assert client.fast_written == before + fast
                loop.run_once(0.0)  # written
                assert loop.run_until(info.is_published, 5)
                assert info.mid not in client._client._out_messages
            (lane, lane_info), (theirs, their_info) = packets
            assert lane_info.mid != their_info.mid
            id_at = lane.index(topic.encode()) + len(topic.encode())
            assert lane[:id_at] == theirs[:id_at] and lane[id_at + 2:] == theirs[id_at + 2:]
            assert int.from_bytes(lane[id_at:id_at + 2], "big") == lane_info.mid
            for _ in range(2):
                assert got.get(timeout=5) == (topic, payload, False)  # a live message is not flagged retained
        client.fast_lane = True

        # another thread: paho's way (the lane belongs to the thread that runs the passes)
        before = client.fast_written
        other = []
        t = threading.Thread(target=lambda: other.append(client.publish(f"{prefix}/out/o", b"o", 1)))
        t.start()
        t.join()
        assert client.fast_written == before and client._client.want_write()
        # what paho queued goes first: this thread's next publish waits behind it
        info = client.publish(f"{prefix}/out/o", b"p", 1)
        assert client.fast_written == before
        assert loop.run_until(lambda: other[0].is_published() and info.is_published(), 5)
        assert [got.get(timeout=5)[1] for _ in range(2)] == [b"o", b"p"]

        # the PUBACK of a received event
        pub.publish(f"{prefix}/in", b"event", 1)
        assert loop.run_until(lambda: client.messages.qsize() > 0, 10)
        msg = client.messages.get_nowait()
        before = client.fast_written
        assert client.ack(msg)
        assert client.fast_written == before + 1
        assert sock._wbuf[-4:] == b"\x40\x02" + msg.mid.to_bytes(2, "big")
        loop.run_once(0.0)
        assert not sock.unsent
    finally:
        client.stop()
        for c in (pub, sub):
            c.loop_stop()
            c.disconnect()

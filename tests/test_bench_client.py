"""The end-to-end benchmark's own MQTT client (bench/bench_e2e.py: LeanClient) against a real Mosquitto.

Its figures are only as good as this client: every message published must come back
once, whole, in order per topic, whatever its size, and QoS 1 must be acknowledged both
ways (or the broker stops sending after its in-flight window). A first version shared one
connection between publisher and reader and deadlocked after ~2,000 large messages: this
test caught it.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_e2e import LeanClient, _remaining


@pytest.mark.parametrize("n", [0, 127, 128, 16383, 16384, 2_097_151, 2_097_152])
def test_remaining_length_encoding(n: int) -> None:
    """MQTT's variable-length integer: 7 bits a byte, low bits first, high bit = more follows."""
    encoded = _remaining(n)
    value = sum((b & 127) << (7 * i) for i, b in enumerate(encoded))
    assert value == n
    assert all(b & 128 for b in encoded[:-1]) and not encoded[-1] & 128
    assert len(encoded) == 1 + (n > 127) + (n > 16383) + (n > 2_097_151)


def test_every_publish_comes_back_once_and_whole(mqtt_broker, topic_prefix: str) -> None:
    got: list[bytes] = []
    lock = threading.Lock()

    def on_message(client, userdata, msg) -> None:
        with lock:
            got.append(msg.payload)

    display = LeanClient("display", mqtt_broker.port, on_message, f"{topic_prefix}/+/x", host=mqtt_broker.host)
    client = LeanClient("sensor", mqtt_broker.port, host=mqtt_broker.host)
    try:
        sizes = [0, 1, 100, 200, 5_000, 70_000, 300_000]  # 1-, 2- and 3-byte remaining lengths; beyond one recv
        sent = []
        for i in range(3000):  # far beyond the broker's in-flight window: acknowledgements must flow
            payload = f"{i}:".encode() + b"x" * sizes[i % len(sizes)]
            sent.append(payload)
            client.publish(f"{topic_prefix}/{i % 7}/x", payload, 1)
        deadline = time.monotonic() + 30
        while len(got) < len(sent) and time.monotonic() < deadline and not (client.error or display.error):
            time.sleep(0.01)
        time.sleep(0.2)  # nothing more may come
        assert client.error is None and display.error is None
        missing = sorted(set(sent) - set(got), key=lambda p: int(p.split(b":")[0]))
        assert not missing, (len(got), [(p[:12], len(p)) for p in missing[:10]])
        assert sorted(got) == sorted(sent)
        for topic in range(7):  # per topic in publishing order
            mine = [p for p in sent if int(p.split(b":")[0]) % 7 == topic]
            assert [p for p in got if int(p.split(b":")[0]) % 7 == topic] == mine
    finally:
        client.disconnect()
        display.disconnect()
    assert not client.reader.is_alive() and not display.reader.is_alive()
    with pytest.raises(RuntimeError, match="does not publish"):
        display.publish(f"{topic_prefix}/0/x", b"", 1)


def test_a_refused_subscription_is_an_error(mqtt_broker) -> None:
    with pytest.raises(RuntimeError, match="subscription refused"):  # 3.1.1: Mosquitto closes the connection
        LeanClient("bad", mqtt_broker.port, lambda *a: None, f"x/#/y-{uuid.uuid4().hex}", host=mqtt_broker.host)

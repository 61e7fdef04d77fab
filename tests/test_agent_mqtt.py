"""The agent against a real Mosquitto with real paho clients (MQTT 3.1.1 and 5).

The model is the tiny catalogue of ``tests/_agent_proc.py`` whose right answers
are known: a guest with cart [A] gets [B, C]; cart [A, B] (top_k 2) gets [C, D].
"""

from __future__ import annotations

import gc
import json
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from _agent_proc import NAMES, VERSION, service_config, tiny_snapshot
from paho.mqtt.enums import CallbackAPIVersion

from agent.registry import ModelRegistry
from agent.service import AgentService
from scripts.brokers import Broker, MosquittoBroker, free_port

ROOT = Path(__file__).resolve().parents[1]
TS_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}([+-]\d\d:\d\d|Z)$")
PROTOCOLS = {"3.1.1": paho.MQTTv311, "5": paho.MQTTv5}


@pytest.fixture(params=["3.1.1", "5"])
def protocol(request: pytest.FixtureRequest) -> str:
    return request.param


class Probe:
    """A sensor + display + ops console: publishes cart events, collects everything the agent says."""

    def __init__(self, broker: Broker, prefix: str, protocol: str) -> None:
        self.prefix = prefix
        self.queues: dict[str, queue.Queue[paho.MQTTMessage]] = {
            k: queue.Queue() for k in ("recommendations", "errors", "status")}
        self.connected = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}",
                                  protocol=PROTOCOLS[protocol])
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self.client.on_socket_open = lambda c, u, s: s.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, 30)
        self.client.loop_start()
        deadline = time.monotonic() + 5
        while not self.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.connected, "probe could not connect"

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe([(f"{self.prefix}/basket/+/recommendations", 1),
                          (f"{self.prefix}/basket/+/errors", 1), (f"{self.prefix}/agent/+/status", 1)])
        self.connected += 1

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.queues[msg.topic.rsplit("/", 1)[1]].put(msg)

    def send(self, basket: str, payload: bytes | dict[str, Any]) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        self.client.publish(f"{self.prefix}/basket/{basket}/cart", payload, qos=1)

    def get(self, kind: str, timeout: float = 5.0) -> paho.MQTTMessage:
        try:
            return self.queues[kind].get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {kind} message within {timeout}s") from None

    def get_json(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        return json.loads(self.get(kind, timeout).payload)

    def wait_status(self, state: str, agent_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.get("status", max(0.01, deadline - time.monotonic()))
            body = json.loads(msg.payload)
            if body.get("state") == state and body.get("agent_id") == agent_id:
                return body

    def drain(self, kind: str, wait: float = 0.3) -> list[paho.MQTTMessage]:
        out = []
        deadline = time.monotonic() + wait
        while True:
            try:
                out.append(self.queues[kind].get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(broker: Broker, topic: str, protocol: str, wait: float = 0.5) -> list[bytes]:
    """What a fresh subscriber gets on ``topic`` within ``wait`` seconds (retained messages)."""
    got: list[bytes] = []
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=PROTOCOLS[protocol])
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, 1)
    c.on_message = lambda cl, u, m: got.append(m.payload)
    c.connect(broker.host, broker.port)
    c.loop_start()
    time.sleep(wait)
    c.disconnect()
    c.loop_stop()
    return got


@pytest.fixture
def make_agent(topic_prefix: str) -> Iterator[Callable[..., tuple[AgentService, Probe]]]:
    started: list[tuple[AgentService, Probe]] = []

    def make(broker: Broker, protocol: str, registry: ModelRegistry | None = None,
             probe_broker: Broker | None = None, **settings: Any) -> tuple[AgentService, Probe]:
        probe = Probe(probe_broker or broker, topic_prefix, protocol)
        agent_id = f"agent-{uuid.uuid4().hex[:6]}"
        svc = AgentService(
            registry if registry is not None else ModelRegistry(tiny_snapshot()),
            service_config(host=broker.host, port=broker.port, protocol=protocol, prefix=topic_prefix,
                          agent_id=agent_id, reconnect_min_s=0.1, reconnect_max_s=0.5, **settings))
        svc.start()
        started.append((svc, probe))
        assert svc.wait_connected(5)
        # The status follows the SUBSCRIBE on the same connection: once seen, we are subscribed.
        status = probe.wait_status("online", agent_id)
        assert status["models"] == ({"guest": VERSION, "member": None} if svc.registry.current
                                    else {"guest": None, "member": None})
        assert status["last_update"] is None
        assert set(status["stats"]) >= {"events", "errors", "p99_ms"}
        return svc, probe

    yield make
    for svc, probe in started:
        svc.stop()
        probe.close()


def test_guest_cart_answer(mqtt_broker: Broker, protocol: str, make_agent: Any) -> None:
    svc, probe = make_agent(mqtt_broker, protocol)
    probe.send("b-17", {"event_id": "e-0001", "seq": 17, "ts": "2026-11-23T14:03:11+09:00",
                        "cart": ["A"], "top_k": 2})
    msg = probe.get("recommendations")
    assert msg.topic == f"{probe.prefix}/basket/b-17/recommendations"
    rec = json.loads(msg.payload)
    ts = rec.pop("ts")
    assert TS_MS.match(ts), ts
    assert rec == {"basket_id": "b-17", "user_id": "guest", "recommendations": ["B", "C"],
                   "items": [{"id": "B", "name": NAMES["B"]}, {"id": "C", "name": NAMES["C"]}],
                   "model": "guest", "model_version": VERSION, "event_id": "e-0001", "seq": 17}
    assert "바나나".encode() in msg.payload  # UTF-8, not \u escapes
    # the worker ran the network loop: there is no network thread (NetworkLoop(threaded=False))
    assert not svc._loop.threaded and svc._loop._thread is None
    deadline = time.monotonic() + 5  # the event by the fast lane; then the answer's PUBACK too
    while svc.out.fast_read == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert svc.mqtt.fast_read > 0 and svc.out.fast_read > 0
    # retained: a display that starts later still gets it
    assert [json.loads(p)["event_id"] for p in retained(mqtt_broker, msg.topic, protocol)] == ["e-0001"]

    # member without a member model: served by the guest model, user_id echoed; wishlist excluded
    probe.send("b-18", {"user": {"user_id": "12345", "gender": 1, "age": 34}, "cart": ["A"],
                        "wishlist": ["C"], "top_k": 2})
    rec = probe.get_json("recommendations")
    assert (rec["user_id"], rec["model"], rec["recommendations"]) == ("12345", "guest", ["B", "F"])
    assert rec["event_id"] is None and rec["seq"] is None

    # unknown product ids: ignored by the model, counted, no error
    probe.send("b-19", {"event_id": "u1", "cart": ["A", "nope-1", "nope-2"], "top_k": 2})
    assert probe.get_json("recommendations")["recommendations"] == ["B", "C"]
    assert probe.drain("errors", 0.2) == []
    assert svc.metrics.unknown_product_ids == 2
    assert svc.metrics.snapshot()["events"] == 3


def test_delta_events_match_snapshot(mqtt_broker: Broker, protocol: str, make_agent: Any) -> None:
    _, probe = make_agent(mqtt_broker, protocol)
    probe.send("snap", {"cart": ["A", "B"], "top_k": 2})
    snap = probe.get_json("recommendations")
    for i, delta in enumerate([{"action": "add", "product_id": "A"}, {"action": "add", "product_id": "E"},
                               {"action": "add", "product_id": "B"},
                               {"action": "remove", "product_id": "E"}]):
        probe.send("delta", {**delta, "seq": i, "top_k": 2})
    answers = [probe.get_json("recommendations") for _ in range(4)]
    assert answers[0]["recommendations"] == ["B", "C"]
    assert answers[-1]["recommendations"] == snap["recommendations"] == ["C", "D"]
    assert answers[-1]["basket_id"] == "delta" and answers[-1]["seq"] == 3


def test_duplicate_and_stale(mqtt_broker: Broker, protocol: str, make_agent: Any) -> None:
    svc, probe = make_agent(mqtt_broker, protocol)
    probe.send("b", {"event_id": "e1", "seq": 5, "cart": ["A"]})
    probe.send("b", {"event_id": "e1", "seq": 5, "cart": ["A"]})   # QoS 1 redelivery
    probe.send("b", {"event_id": "e0", "seq": 4, "cart": ["B"]})   # older seq: ignored
    probe.send("b", {"event_id": "e2", "seq": 6, "cart": ["A", "B"], "top_k": 2})
    answers = [probe.get_json("recommendations") for _ in range(2)]
    assert [a["event_id"] for a in answers] == ["e1", "e2"]
    assert answers[1]["recommendations"] == ["C", "D"]
    assert probe.drain("recommendations", 0.3) == [] and probe.drain("errors", 0) == []
    assert (svc.metrics.duplicates, svc.metrics.stale) == (1, 1)


def test_checkout_clears_retained(mqtt_broker: Broker, protocol: str, make_agent: Any) -> None:
    _, probe = make_agent(mqtt_broker, protocol)
    probe.send("keep", {"cart": ["A"]})
    probe.send("gone", {"event_id": "g1", "seq": 1, "cart": ["A"]})
    probe.get("recommendations")
    probe.get("recommendations")
    probe.send("gone", {"event_id": "g2", "seq": 2, "action": "checkout"})
    cleared = probe.get("recommendations")
    assert cleared.topic.endswith("/gone/recommendations") and cleared.payload == b""
    # a QoS 1 redelivery of an event from before the checkout must not reopen the basket
    probe.send("gone", {"event_id": "g1", "seq": 1, "cart": ["A"]})
    assert probe.drain("recommendations", 0.3) == []
    assert retained(mqtt_broker, f"{probe.prefix}/basket/gone/recommendations", protocol) == []
    assert len(retained(mqtt_broker, f"{probe.prefix}/basket/keep/recommendations", protocol)) == 1
    # state dropped: a new delta starts from an empty cart
    probe.send("gone", {"action": "add", "product_id": "B", "top_k": 2})
    assert probe.get_json("recommendations")["recommendations"] == ["A", "D"]


BAD_INPUTS = [
    (b"this is not json", "not JSON", None),
    (b'["A"]', "must be a JSON object", None),
    (json.dumps({"event_id": "w1", "cart": "A"}).encode(), "'cart' must be a list", "w1"),
    (json.dumps({"event_id": "w2", "cart": [1024]}).encode(), "'cart[0]'", "w2"),
    (json.dumps({"event_id": "w3", "action": "steal", "product_id": "A"}).encode(), "unknown action", "w3"),
    (json.dumps({"event_id": "w4", "user": {"gender": 1}, "cart": ["A"]}).encode(), "user_id", "w4"),
    (json.dumps({"event_id": "w5", "top_k": 0, "cart": ["A"]}).encode(), "top_k", "w5"),
    (json.dumps({"event_id": "w6", "seq": 1}).encode(), "missing cart content", "w6"),
    (json.dumps({"cart": [f"p{i}" for i in range(10_000)]}).encode(), "over the limit", None),
    (json.dumps({"cart": [f"p{i}" for i in range(300)]}).encode(), "more than the limit of 200", None),
    (b"{" + b" " * 1_000_000 + b"}", "over the limit of 65536 bytes", None),
    (b'{"cart": ["\xff\xfe"]}', "not valid UTF-8", None),
]


def test_bad_inputs_one_error_each(mqtt_broker: Broker, protocol: str, make_agent: Any) -> None:
    svc, probe = make_agent(mqtt_broker, protocol)
    for payload, _, _ in BAD_INPUTS:
        probe.send("bad", payload)
    errors = [probe.get("errors") for _ in BAD_INPUTS]
    for msg, (_, fragment, event_id) in zip(errors, BAD_INPUTS):
        body = json.loads(msg.payload)
        assert msg.topic == f"{probe.prefix}/basket/bad/errors"
        assert fragment in body["error"] and body["event_id"] == event_id, body
    # and a burst: the agent keeps serving
    for i in range(200):
        probe.send(f"burst-{i % 7}", b"\x00garbage" if i % 2 else b'{"cart": 5}')
    probe.send("good", {"event_id": "ok", "cart": ["A"], "top_k": 2})
    assert probe.get_json("recommendations", 10)["recommendations"] == ["B", "C"]
    extra = probe.drain("errors", 0.5)
    assert len(extra) == 200  # one error per bad event, no more
    assert probe.drain("recommendations", 0) == []
    assert svc.metrics.snapshot()["errors"] == len(BAD_INPUTS) + 200


def test_no_model_loaded(mqtt_broker: Broker, protocol: str, make_agent: Any) -> None:
    registry = ModelRegistry()
    _, probe = make_agent(mqtt_broker, protocol, registry=registry)
    probe.send("b", {"event_id": "n1", "cart": ["A"]})
    assert probe.get_json("errors") == {"error": "no model loaded", "event_id": "n1"}
    registry.swap(tiny_snapshot())
    probe.send("b", {"event_id": "n2", "cart": ["A"], "top_k": 2})
    assert probe.get_json("recommendations")["recommendations"] == ["B", "C"]


def test_round_trip_latency(mqtt_broker: Broker, make_agent: Any, topic_prefix: str) -> None:
    """Measured, not asserted: in-process agent (shares the GIL with the probe) and a real process."""

    def measure(probe: Probe, n: int = 300, warmup: int = 30) -> tuple[float, float]:
        samples = []
        for i in range(n + warmup):
            t0 = time.perf_counter()
            probe.send(f"b{i % 10}", {"event_id": f"l{i}", "cart": ["A", "B"], "top_k": 3})
            probe.get("recommendations")
            samples.append((time.perf_counter() - t0) * 1000)
        samples = sorted(samples[warmup:])
        return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]

    svc, probe = make_agent(mqtt_broker, "5")
    p50, p99 = measure(probe)
    deadline = time.monotonic() + 5  # the answer can reach the probe before the counter moves
    while svc.metrics.answered < 330 and time.monotonic() < deadline:
        time.sleep(0.01)
    st = svc.metrics.snapshot()
    assert svc.metrics.answered == 330
    svc.stop()
    proc = _spawn(mqtt_broker, topic_prefix, "latency-proc", "5")
    try:
        probe.wait_status("online", "latency-proc", timeout=20)
        q50, q99 = measure(probe)
    finally:
        proc.terminate()
        proc.wait(10)
        _log_of(proc)
    print(f"\nloopback cart event -> recommendation round trip, MQTT 5, 300 events:\n"
          f"  agent in-process: p50 {p50:.3f} ms, p99 {p99:.3f} ms "
          f"(agent-side receive->publish p50 {st['p50_ms']} ms, p99 {st['p99_ms']} ms)\n"
          f"  agent as its own process: p50 {q50:.3f} ms, p99 {q99:.3f} ms")


def test_broker_restart_reconnects(restartable_broker: MosquittoBroker, protocol: str,
                                   make_agent: Any) -> None:
    broker = restartable_broker.broker
    svc, probe = make_agent(broker, protocol)
    probe.send("b", {"cart": ["A"], "top_k": 2})
    assert probe.get_json("recommendations")["recommendations"] == ["B", "C"]
    restartable_broker.restart(downtime=0.3)
    # the agent reconnects, resubscribes and announces itself again (the restarted broker
    # lost all retained messages: this status is a fresh one)
    probe.wait_status("online", svc.config.agent_id, timeout=10)
    deadline = time.monotonic() + 5
    while probe.connected < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # the probe's own resubscription
    probe.send("b", {"cart": ["A", "B"], "top_k": 2, "event_id": "after-restart"})
    got = probe.get_json("recommendations")
    while got.get("event_id") != "after-restart":
        # QoS 1 is at least once: when the first answer's PUBACK was lost in the restart (seen under
        # load), the agent resends it on the new connection, before the new answer
        assert got["recommendations"] == ["B", "C"], got
        got = probe.get_json("recommendations")
    assert got["recommendations"] == ["C", "D"]
    assert svc.metrics.reconnects >= 1


def _spawn(broker: Broker, prefix: str, agent_id: str, protocol: str) -> subprocess.Popen[bytes]:
    """The agent as a real process (``tests/_agent_proc.py``); its log goes to a temp file."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.NamedTemporaryFile("wb", prefix=f"{agent_id}-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "_agent_proc.py"), "--host", broker.host, "--port",
             str(broker.port), "--prefix", prefix, "--agent-id", agent_id, "--protocol", protocol],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc


def _log_of(proc: subprocess.Popen[bytes]) -> str:
    path = Path(proc.log_path)  # type: ignore[attr-defined]
    text = path.read_text(errors="replace") if path.exists() else ""
    path.unlink(missing_ok=True)
    return text


def test_last_will_on_kill_and_clean_stop(mqtt_broker: Broker, protocol: str, topic_prefix: str) -> None:
    probe = Probe(mqtt_broker, topic_prefix, protocol)
    status_topic = f"{topic_prefix}/agent/%s/status"
    try:
        for how in ("SIGKILL", "SIGTERM"):
            agent_id = f"proc-{how.lower()}"
            proc = _spawn(mqtt_broker, topic_prefix, agent_id, protocol)
            try:
                probe.wait_status("online", agent_id, timeout=20)
                probe.send("p", {"cart": ["A"], "top_k": 2})
                assert probe.get_json("recommendations")["recommendations"] == ["B", "C"]
                proc.send_signal(getattr(signal, how))
                proc.wait(10)
                offline = probe.wait_status("offline", agent_id, timeout=10)
                assert offline == {"state": "offline", "agent_id": agent_id}
                held = retained(mqtt_broker, status_topic % agent_id, protocol)
                assert [json.loads(p)["state"] for p in held] == ["offline"]
                if how == "SIGTERM":
                    assert proc.returncode == 0
                    assert "stopped" in Path(proc.log_path).read_text()  # type: ignore[attr-defined]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
                print(_log_of(proc)[-3000:])  # shown by pytest when the test fails
    finally:
        probe.close()


def test_periodic_status_and_metrics(mqtt_broker: Broker, make_agent: Any) -> None:
    svc, probe = make_agent(mqtt_broker, "5", status_interval_s=0.3)
    probe.send("b", {"cart": ["A"]})
    probe.get("recommendations")
    probe.send("b", b"nope")
    probe.get("errors")
    status = probe.wait_status("online", svc.config.agent_id, timeout=3)
    while status["stats"]["events"] < 2:
        status = probe.wait_status("online", svc.config.agent_id, timeout=3)
    assert status["stats"]["errors"] == 1 and status["stats"]["p99_ms"] > 0
    text = svc.metrics.render_prometheus()
    assert 'smartbasket_agent_answered_total{model="guest"} 1' in text
    assert 'smartbasket_agent_errors_total{kind="json"} 1' in text


def test_service_config_from_the_config_file(tmp_path: Path) -> None:
    from agent.config import BrokerConfig, ServiceConfig, parse_config
    from agent.events import parse_cart_event

    cfg = parse_config({"broker": {"host": "mqtt.local", "port": 1884, "protocol": "3.1.1",
                                   "username": "u", "password": "secret"},
                        "agent_id": "jetson-07", "prefix": "smartbasket/store-17/",
                        "parameters": str(tmp_path), "allow_unsigned": True,
                        "limits": {"max_items": 3}, "baskets": {"idle_ttl_s": 60}}, env={})
    s = cfg.service
    assert s is not None and s.broker is cfg.broker
    b = s.broker
    assert (b.host, b.port, b.protocol, b.username, b.password) == ("mqtt.local", 1884, "3.1.1", "u", "secret")
    assert (s.prefix, s.agent_id, s.baskets.idle_ttl_s, b.tls) == ("smartbasket/store-17", "jetson-07", 60.0, None)
    assert "secret" not in repr(s) and "secret" not in repr(cfg)
    with pytest.raises(Exception, match="limit of 3"):
        parse_cart_event(b'{"cart": ["a", "b", "c", "d"]}', s.limits)
    with pytest.raises(ValueError):
        ServiceConfig(BrokerConfig("h"), agent_id="a/b")
    with pytest.raises(ValueError, match="host"):
        ServiceConfig(BrokerConfig(""), agent_id="a")
    assert ServiceConfig(BrokerConfig("h"), agent_id="a", prefix="/x/y/").prefix == "x/y"


def _make_tls_files(d: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("test-ca", ca_key, "test-ca", ca_key, True)
    srv_cert = cert("localhost", srv_key, "test-ca", ca_key, False)
    d.mkdir(parents=True, exist_ok=True)
    ca, crt, key = d / "ca.crt", d / "server.crt", d / "server.key"
    ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    crt.write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    for f in (ca, crt, key):
        f.chmod(0o644)
    return ca, crt, key


def test_tls_connection(tmp_path: Path, make_agent: Any) -> None:
    """The agent over TLS (CA-verified), the probe on a plain listener of the same broker."""
    from agent.mqtt import MqttClient, TLSSettings

    ca, crt, key = _make_tls_files(tmp_path / "tls")
    tls_port = free_port()
    broker = MosquittoBroker(tmp_path / "mosquitto", extra_config=(
        f"listener {tls_port} 127.0.0.1", f"cafile {ca}", f"certfile {crt}", f"keyfile {key}"))
    broker.start()
    try:
        plain = broker.broker
        probe = Probe(plain, "tls-probe-unused", "5")  # proves the plain listener is up
        probe.close()
        _, probe = make_agent(Broker(plain.host, tls_port), "5", tls=TLSSettings(ca_file=str(ca)),
                                probe_broker=plain)
        probe.send("t", {"cart": ["A"], "top_k": 2})
        assert probe.get_json("recommendations")["recommendations"] == ["B", "C"]
        # without TLS the same port does not work: the test really went through TLS
        bare = MqttClient(plain.host, tls_port, client_id="no-tls", reconnect_min_s=5)
        bare.start()
        try:
            assert not bare.wait_connected(1.0)
        finally:
            bare.stop()
    finally:
        broker.stop()


def test_idle_basket_expiry_clears_its_retained_recommendation(mqtt_broker: Broker, make_agent: Any) -> None:
    svc, probe = make_agent(mqtt_broker, "5", idle_ttl_s=1.0)
    probe.send("idle", {"cart": ["A"]})
    assert probe.get_json("recommendations")["basket_id"] == "idle"
    cleared = probe.get("recommendations", timeout=5)  # expiry runs about once a second
    assert cleared.topic.endswith("/idle/recommendations") and cleared.payload == b""
    assert "idle" not in svc.states
    assert retained(mqtt_broker, f"{probe.prefix}/basket/idle/recommendations", "5") == []


def test_agent_serves_with_more_than_1024_descriptors_open(mqtt_broker: Broker, topic_prefix: str) -> None:
    """The network loop polls: its sockets may be numbered beyond select()'s 1,024 (an HTTP bridge
    holding many connections in the same process)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard open-files limit ({hard}) is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if hard == resource.RLIM_INFINITY
                                                else min(max(soft, 1200), hard), hard))
    probe = Probe(mqtt_broker, topic_prefix, "5")  # paho's own loop selects: keep its socket low
    held: list[int] = []
    svc = None
    # objects of earlier tests that hold descriptors (sockets, mapped files) must not free low numbers while
    # the agent connects: collect them now, and no cyclic collection until the test ends
    gc.collect()
    gc.disable()
    try:
        while not held or held[-1] < 1030:  # fill the low numbers: the agent's sockets get high ones
            held.append(os.open(os.devnull, os.O_RDONLY))
        svc = AgentService(ModelRegistry(tiny_snapshot()), service_config(
            host=mqtt_broker.host, port=mqtt_broker.port, prefix=topic_prefix, agent_id="many-fds",
            reconnect_min_s=0.1, reconnect_max_s=0.5))
        svc.start()
        assert svc.wait_connected(5)
        assert svc.mqtt._client.socket().fileno() > 1024
        probe.wait_status("online", "many-fds")
        probe.send("b-1", {"event_id": "fd-1", "cart": ["A"], "top_k": 2})
        assert probe.get_json("recommendations")["recommendations"] == ["B", "C"]
    finally:
        if svc is not None:
            svc.stop()
        probe.close()
        for fd in held:
            os.close(fd)
        gc.enable()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

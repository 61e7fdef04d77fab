"""The basket display (contract §4): the hub, the event stream, and the page in a real browser.

The browser is headless Chromium from the system's packages driven by Playwright
(``apt-get install chromium fonts-noto-cjk``; ``scripts/bootstrap.sh`` installs
them). The agent is ``basket-agent run`` as a process with its HTTP bridge, fed
cart events over a real Mosquitto. Screenshots go to ``$SCREENSHOT_DIR`` (default:
the test's temp dir); ``SCREENSHOT_DIR=docs`` refreshes the README's.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from fastapi import FastAPI
from paho.mqtt.enums import CallbackAPIVersion

from agent.display import CLOSED, DISPLAY_HTML, DisplayHub, Subscriber, add_display_routes
from agent.http import HttpBridge, create_app
from agent.registry import ModelRegistry
from scripts.brokers import free_port

ROOT = Path(__file__).resolve().parents[1]
# --- the hub, without HTTP -------------------------------------------------------------------
class _FakeLoop:
    """Counts wake-ups instead of running them: a browser that never reads."""

    def __init__(self, closed: bool = False) -> None:
        self.calls: list[Any] = []
        self.closed = closed

    def call_soon_threadsafe(self, fn: Any, *args: Any) -> None:
        if self.closed:
            raise RuntimeError("Event loop is closed")
        self.calls.append(fn)


def test_a_browser_that_never_reads_costs_one_slot_and_one_wakeup():
    hub = DisplayHub()
    loop = _FakeLoop()
    sub = hub.subscribe("b-1", loop)  # type: ignore[arg-type]
    assert sub is not None
    t0 = time.perf_counter()
    for i in range(20000):
        hub.publish("b-1", f'{{"n": {i}}}'.encode())
    per_call_us = (time.perf_counter() - t0) / 20000 * 1e6
    assert len(loop.calls) == 1  # one pending wake-up, however many answers
    assert sub.dropped == 20000  # the initial state and every answer but the newest were overwritten
    assert per_call_us < 50, per_call_us
    loop.calls[0]()  # the loop runs the wake-up: the browser gets the newest answer only
    assert asyncio.run(sub.get(0.1)) == b'{"n": 19999}'
    assert asyncio.run(sub.get(0.01)) is None  # nothing new: time for a heartbeat


def test_a_closed_event_loop_never_reaches_the_worker():
    hub = DisplayHub()
    hub.subscribe("b-1", _FakeLoop(closed=True))  # type: ignore[arg-type]
    hub.publish("b-1", b'{"x": 1}')  # must not raise into the agent's worker thread
    assert hub.latest("b-1") == b'{"x": 1}'


def test_latest_state_is_bounded_and_cleared_on_checkout():
    hub = DisplayHub(max_baskets=3)
    for i in range(5):
        hub.publish(f"b-{i}", b"{}")
    assert hub.baskets() == ["b-4", "b-3", "b-2"]
    hub.publish("b-3", b"")
    assert hub.latest("b-3") is None and hub.baskets() == ["b-4", "b-2"]
    sub = hub.subscribe("b-3", _FakeLoop())  # type: ignore[arg-type]
    assert sub is not None and asyncio.run(sub.get(0.01)) == b""  # a new browser: nothing known yet


def test_subscribers_are_bounded_and_close_ends_them():
    hub = DisplayHub(max_subscribers=2)
    loop = _FakeLoop()
    a, b = hub.subscribe("b", loop), hub.subscribe("c", loop)  # type: ignore[arg-type]
    assert a is not None and b is not None and hub.subscribe("d", loop) is None  # type: ignore[arg-type]
    hub.unsubscribe(a)
    assert hub.subscribers == 1
    hub.close()
    assert asyncio.run(b.get(0.01)) is CLOSED
    b.offer(b'{"late": 1}')
    assert asyncio.run(b.get(0.01)) is CLOSED  # a closed stream stays closed
    assert hub.subscribe("e", loop) is None  # type: ignore[arg-type]


def test_subscriber_wakes_a_running_loop_from_another_thread():
    async def main() -> list[Any]:
        sub = Subscriber("b", asyncio.get_running_loop(), b"")
        got = [await sub.get(1.0)]
        threading.Timer(0.05, sub.offer, args=(b'{"a": 1}',)).start()
        got.append(await sub.get(2.0))
        return got

    assert asyncio.run(main()) == [b"", b'{"a": 1}']


# --- the event stream over real HTTP ---------------------------------------------------------
def _tiny_registry() -> ModelRegistry:
    sys.path.insert(0, str(ROOT / "tests"))
    from _agent_proc import tiny_snapshot

    return ModelRegistry(tiny_snapshot())


class SseReader:
    """A raw ``text/event-stream`` client: (event, data) pairs and comment lines, in order."""

    def __init__(self, port: int, path: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()
        self.buf = b""

    def next(self, timeout: float = 5.0) -> dict[str, str]:
        """The next block: {"event": ..., "data": ..., "retry": ..., "comment": ...}."""
        deadline = time.monotonic() + timeout
        while b"\n\n" not in self.buf:
            assert time.monotonic() < deadline, f"no SSE block in {timeout} s; got {self.buf!r}"
            chunk = self.resp.read1(65536)
            if not chunk:
                raise EOFError("stream ended")
            self.buf += chunk
        block, self.buf = self.buf.split(b"\n\n", 1)
        out: dict[str, str] = {}
        for line in block.decode().split("\n"):
            key, _, value = line.partition(":")
            key = key or "comment"
            value = value[1:] if value.startswith(" ") else value
            out[key] = out[key] + "\n" + value if key in out else value
        return out

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def bridge_with_hub() -> Iterator[tuple[DisplayHub, int, HttpBridge]]:
    hub = DisplayHub()
    port = free_port()
    bridge = HttpBridge(create_app(_tiny_registry(), display=hub), "127.0.0.1", port)
    bridge.start()
    try:
        yield hub, port, bridge
    finally:
        bridge.stop()


def test_stream_sends_retry_hint_current_state_changes_and_clear(bridge_with_hub):
    hub, port, _ = bridge_with_hub
    payload = json.dumps({"basket_id": "b-1", "user_id": "member-42", "recommendations": ["A"],
                          "items": [{"id": "A", "name": "사과"}], "model": "member", "model_version": "v1",
                          "event_id": "e1", "seq": 3, "ts": "2026-11-25T10:00:00.000+09:00"},
                         ensure_ascii=False).encode()
    hub.publish("b-1", payload)
    r = SseReader(port, "/display/b-1/events")
    try:
        assert r.resp.status == 200 and r.resp.getheader("content-type").startswith("text/event-stream")
        assert r.resp.getheader("cache-control").startswith("no-cache")
        assert r.next() == {"retry": "1000"}
        first = r.next()
        assert first["event"] == "recommendations" and json.loads(first["data"])["items"][0]["name"] == "사과"
        # what the page shows, and nothing else: no member id on a stream anyone on the network may open
        assert json.loads(first["data"]) == {"recommendations": ["A"], "items": [{"id": "A", "name": "사과"}],
                                             "model": "member", "model_version": "v1", "event_id": "e1"}
        hub.publish("b-2", b'{"other": 1}')  # another basket's answer is not this page's business
        hub.publish("b-1", b'{"event_id": "e2", "user_id": "member-42"}')
        assert r.next() == {"event": "recommendations", "data": '{"event_id":"e2"}'}
        # characters Python's splitlines() breaks at but SSE does not (U+2028, U+2029, U+0085), as orjson
        # writes them: the page must get the JSON whole
        odd = {"items": [{"id": "A", "name": "사과\u2029\x85"}], "event_id": "e\u2028x"}
        hub.publish("b-1", json.dumps(odd, ensure_ascii=False).encode())
        got = r.next()
        assert got["event"] == "recommendations" and json.loads(got["data"]) == odd
        hub.publish("b-1", b"")
        assert r.next() == {"event": "cleared", "data": "{}"}
    finally:
        r.close()
    fresh = SseReader(port, "/display/b-1/events")  # after checkout a new page is told to wait
    try:
        fresh.next()
        assert fresh.next() == {"event": "waiting", "data": "{}"}
    finally:
        fresh.close()


def test_stream_heartbeats_and_browser_disconnect_unsubscribes():
    hub = DisplayHub()
    app = FastAPI()
    add_display_routes(app, hub, heartbeat_s=0.2, retry_ms=250)
    port = free_port()
    bridge = HttpBridge(app, "127.0.0.1", port)
    bridge.start()
    try:
        r = SseReader(port, "/display/b-9/events")
        assert r.next() == {"retry": "250"}
        assert r.next()["event"] == "waiting"
        assert r.next(2.0) == {"comment": "ping"}
        assert hub.subscribers == 1
        r.close()
        deadline = time.monotonic() + 5
        while hub.subscribers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hub.subscribers == 0
    finally:
        bridge.stop()


def test_bad_basket_ids_and_index_page_and_other_routes_unchanged(bridge_with_hub):
    hub, port, _ = bridge_with_hub
    hub.publish("b-<7>", b'{"x": 1}')

    def get(path: str, method: str = "GET", body: bytes | None = None) -> tuple[int, str, str]:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request(method, path, body=body, headers={"content-type": "application/json"})
        resp = c.getresponse()
        out = resp.status, resp.getheader("content-type") or "", resp.read().decode()
        c.close()
        return out

    status, ctype, page = get("/display/b-1")
    assert status == 200 and ctype.startswith("text/html") and '<meta charset="utf-8">' in page
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # nothing fetched
    assert get("/display/a+b")[0] == 404 and get("/display/a%23b/events")[0] == 404
    status, _, index = get("/display")
    assert status == 200 and "b-&lt;7&gt;" in index and "<7>" not in index
    assert get("/health")[0] == 200
    status, _, body = get("/recommend", "POST", b'{"cart": ["A"], "top_k": 2}')
    assert status == 200 and json.loads(body)["recommendations"] == ["B", "C"]


def test_bridge_stops_at_once_with_displays_open(bridge_with_hub):
    hub, port, bridge = bridge_with_hub
    readers = [SseReader(port, f"/display/b-{i}/events") for i in range(3)]
    for r in readers:
        r.next()
    t0 = time.monotonic()
    bridge.stop()
    assert time.monotonic() - t0 < 1.5
    for r in readers:
        with pytest.raises((EOFError, OSError, http.client.HTTPException)):
            for _ in range(3):
                r.next(2.0)
        r.close()


def test_page_escapes_product_names(browser, bridge_with_hub):
    hub, port, _ = bridge_with_hub
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/display/x-1")
        page.wait_for_function("document.body.dataset.state === 'waiting'", timeout=5000)
        evil = '<img src=x onerror="document.body.dataset.pwned=1">&amp;'
        hub.publish("x-1", json.dumps({"items": [{"id": "Z", "name": evil}], "event_id": "e"}).encode())
        page.wait_for_function("document.querySelectorAll('li.item').length === 1", timeout=5000)
        assert page.inner_text("li.item .name") == evil
        assert page.query_selector("li.item img") is None and page.evaluate("document.body.dataset.pwned") is None
    finally:
        page.close()


# --- the page in a browser, fed by a real agent over MQTT ------------------------------------
class GuestStore:
    """A small signed guest-only parameters dir (the display needs names, not the member model)."""

    def __init__(self, root: Path) -> None:
        from retrain_server.data import write_products, write_purchases
        from retrain_server.sign import keygen
        from retrain_server.synth import make_store
        from retrain_server.train import train_bundle

        self.store = make_store(n_products=300, n_rows=6000, n_users=50, n_families=20, seed=21)
        data = root / "data"
        data.mkdir(parents=True)
        write_products(data / "products.csv", self.store.catalog)
        write_purchases(data / "purchase_history.jsonl", self.store.purchases)
        key, self.public_key = keygen(root / "keys")
        self.parameters = root / "parameters"
        train_bundle(data / "products.csv", data / "purchase_history.jsonl", self.parameters, key, member=False)

    def family(self, f: int) -> list[str]:
        return self.store.catalog.ids[f::self.store.n_families].tolist()


@pytest.fixture(scope="module")
def guest_store(tmp_path_factory: pytest.TempPathFactory) -> GuestStore:
    return GuestStore(tmp_path_factory.mktemp("display-store"))


class Agent:
    """``basket-agent run`` with the HTTP bridge on a fixed port (so a restart comes back on it)."""

    def __init__(self, broker: Any, prefix: str, store: GuestStore, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.cmd = [sys.executable, "-m", "agent.cli", "run", "--broker", f"{broker.host}:{broker.port}",
                    "--prefix", prefix, "--agent-id", "display-test", "--parameters", str(store.parameters),
                    "--public-key", str(store.public_key), "--http-port", str(self.port),
                    "--update-jitter-s", "0"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


class Sensor:
    """Publishes cart events and watches the agent's answers and status, as the basket and ops would."""

    def __init__(self, broker: Any, prefix: str) -> None:
        self.prefix = prefix
        self.recs: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.status: queue.Queue[dict[str, Any]] = queue.Queue()
        ready = threading.Event()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"disp-{uuid.uuid4().hex[:8]}",
                             protocol=paho.MQTTv5)
        self.c.on_socket_open = lambda client, userdata, sock: sock.setsockopt(6, 1, 1)  # TCP_NODELAY

        def on_connect(client: Any, *_: Any) -> None:
            client.subscribe([(f"{prefix}/basket/+/recommendations", 1), (f"{prefix}/agent/+/status", 1)])

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            if msg.topic.endswith("/status"):
                if msg.payload:
                    self.status.put(json.loads(msg.payload))
            else:
                self.recs.put((msg.topic, msg.payload))

        self.c.on_connect = on_connect
        self.c.on_subscribe = lambda *_: ready.set()
        self.c.on_message = on_message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert ready.wait(10)

    def send(self, basket: str, event: dict[str, Any]) -> float:
        t0 = time.monotonic()
        self.c.publish(f"{self.prefix}/basket/{basket}/cart", json.dumps(event), qos=1)
        return t0

    def answer(self, basket: str, event_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            topic, payload = self.recs.get(timeout=max(0.01, deadline - time.monotonic()))
            if f"/basket/{basket}/" in topic and payload and json.loads(payload).get("event_id") == event_id:
                return json.loads(payload)

    def wait_online(self, agent: Agent, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert agent.proc is not None and agent.proc.poll() is None, agent.log_tail()
            try:
                if self.status.get(timeout=0.5).get("state") == "online":
                    return
            except queue.Empty:
                assert time.monotonic() < deadline, "agent never online:\n" + agent.log_tail()

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def live(mqtt_broker: Any, topic_prefix: str, guest_store: GuestStore, tmp_path: Path) -> Iterator[tuple]:
    sensor = Sensor(mqtt_broker, topic_prefix)
    agent = Agent(mqtt_broker, topic_prefix, guest_store, tmp_path / "agent.log")
    agent.start()
    try:
        sensor.wait_online(agent)
        yield agent, sensor
    finally:
        agent.stop()
        sensor.close()


def _names(page: Any) -> list[str]:
    return page.eval_on_selector_all("li.item .name", "els => els.map(e => e.textContent)")


def _wait_event(page: Any, event_id: str, timeout_s: float) -> None:
    page.wait_for_function(
        "id => document.getElementById('items').dataset.event === id && document.querySelector('li.item')",
        arg=event_id, timeout=timeout_s * 1000, polling="raf")


def test_display_follows_the_cart_live_and_empties_on_checkout(browser, live, guest_store, tmp_path,
                                                               screenshot_path):
    agent, sensor = live
    page = browser.new_page(viewport={"width": 1024, "height": 600})
    try:
        page.goto(f"http://127.0.0.1:{agent.port}/display/b-1")
        page.wait_for_function("document.body.dataset.state === 'waiting' && "
                               "document.getElementById('link').classList.contains('live')", timeout=10000)
        fam = guest_store.family(3)
        t0 = sensor.send("b-1", {"event_id": "e1", "seq": 1, "action": "add", "product_id": fam[0], "top_k": 6})
        _wait_event(page, "e1", 1.0)
        shown_after = time.monotonic() - t0
        first = sensor.answer("b-1", "e1")
        assert _names(page) == [i["name"] for i in first["items"]] and len(first["items"]) == 6
        assert all(n and not n.isascii() for n in _names(page))  # Korean product names, not ids
        assert page.inner_text("#model").endswith("guest") and first["model_version"] in page.inner_text("#version")

        t1 = sensor.send("b-1", {"event_id": "e2", "seq": 2, "action": "add", "product_id": fam[1], "top_k": 6})
        _wait_event(page, "e2", 1.0)
        assert time.monotonic() - t1 < 1.0
        second = sensor.answer("b-1", "e2")
        assert _names(page) == [i["name"] for i in second["items"]]
        assert fam[1] not in [i["id"] for i in second["items"]]  # the cart is never recommended
        page.screenshot(path=str(screenshot_path("display.png")))

        t2 = sensor.send("b-1", {"event_id": "e3", "seq": 3, "action": "checkout"})
        page.wait_for_function("document.body.dataset.state === 'cleared' && !document.querySelector('li.item')",
                               timeout=1000, polling="raf")
        assert time.monotonic() - t2 < 1.0
        assert page.is_visible("#cleared") and not page.is_visible("#items")
        print(f"display showed the first answer {shown_after * 1000:.0f} ms after the cart event")
    finally:
        page.close()


def test_display_recovers_after_the_agent_restarts(browser, live, guest_store, tmp_path, screenshot_path):
    agent, sensor = live
    page = browser.new_page(viewport={"width": 800, "height": 480})
    try:
        page.goto(f"http://127.0.0.1:{agent.port}/display/b-2")
        page.wait_for_function("document.body.dataset.state === 'waiting'", timeout=10000)
        fam = guest_store.family(5)
        sensor.send("b-2", {"event_id": "r1", "cart": fam[:2], "top_k": 4})
        _wait_event(page, "r1", 1.0)
        before = _names(page)

        agent.stop(signal.SIGKILL)  # no goodbye: the stream just breaks
        page.wait_for_function("!document.getElementById('link').classList.contains('live')", timeout=10000)
        assert page.evaluate("document.body.classList.contains('stale')")  # the old list is marked as stale
        agent.start()
        sensor.wait_online(agent)
        # Reconnected by itself; the restarted agent knows nothing of b-2 yet: nothing stale is shown.
        page.wait_for_function("document.getElementById('link').classList.contains('live') && "
                               "document.body.dataset.state === 'waiting' && !document.querySelector('li.item')",
                               timeout=30000)
        page.screenshot(path=str(screenshot_path("display-after-restart.png")))
        t0 = sensor.send("b-2", {"event_id": "r2", "cart": fam[:2], "top_k": 4})
        _wait_event(page, "r2", 1.0)
        assert time.monotonic() - t0 < 1.0
        assert _names(page) == before  # same cart, same model: the same answer as before the restart
    finally:
        page.close()


def test_display_page_has_no_external_resources():
    assert '<meta charset="utf-8">' in DISPLAY_HTML
    assert "http://" not in DISPLAY_HTML and "https://" not in DISPLAY_HTML and "@import" not in DISPLAY_HTML
    assert "innerHTML" not in DISPLAY_HTML and "Noto Sans CJK KR" in DISPLAY_HTML


"""Outages, bursts and crashes (issue 7): every cart event sent is answered, nothing acknowledged is lost.

The agent runs as a real process (this file, ``python tests/test_reliability.py SETTINGS_JSON``,
serving the tiny catalogue of ``tests/_agent_proc.py``) against a private Mosquitto; a
*console* client plays the baskets' sensors and displays: it sends events with unique
``event_id`` s and counts the recommendations that come back for each.

Each test says what it sends and how many answers it expects; they print the
figures (``pytest -s``) for the README.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from scripts.brokers import Broker, MosquittoBroker, store_settings

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = {"3.1.1": paho.MQTTv311, "5": paho.MQTTv5}
SYS_DROPPED = "$SYS/broker/publish/messages/dropped"


# --- the console: sensors + displays + ops in one client ---------------------------------------
class Console:
    """Publishes cart events and counts what comes back, by ``event_id``."""

    def __init__(self, broker: Broker, prefix: str, protocol: str = "5", sys_topics: bool = False) -> None:
        self.prefix = prefix
        self.answers: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.last: dict[str, dict[str, Any]] = {}  # the latest answer per event_id
        self.status: queue.Queue[dict[str, Any]] = queue.Queue()
        self.broker_dropped: int | None = None
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"console-{uuid.uuid4().hex[:8]}",
                                  protocol=PROTOCOLS[protocol])
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_socket_open = lambda c, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        subs = [(f"{prefix}/basket/+/recommendations", 1), (f"{prefix}/basket/+/errors", 1),
                (f"{prefix}/agent/+/status", 1)] + ([(SYS_DROPPED, 0)] if sys_topics else [])
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(subs)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, 30)
        self.client.loop_start()
        assert self._subscribed.wait(5), "console could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == SYS_DROPPED:
            self.broker_dropped = int(msg.payload)
            return
        if not msg.payload:
            return  # a cleared recommendation
        body = json.loads(msg.payload)
        kind = msg.topic.rsplit("/", 1)[1]
        if kind == "status":
            self.status.put(body)
            return
        if kind == "recommendations" and msg.retain:
            return  # a retained answer of earlier events, replayed to this new subscriber
        with self._lock:
            (self.answers if kind == "recommendations" else self.errors)[str(body.get("event_id"))] += 1
            if kind == "recommendations":
                self.last[str(body.get("event_id"))] = body

    def send(self, basket: str, event: dict[str, Any] | bytes, retain: bool = False) -> paho.MQTTMessageInfo:
        payload = event if isinstance(event, bytes) else json.dumps(event, separators=(",", ":"))
        return self.client.publish(f"{self.prefix}/basket/{basket}/cart", payload, qos=1, retain=retain)

    def burst(self, tag: str, n: int, baskets: int = 20, pace_s: float = 0.0) -> list[str]:
        """``n`` snapshot events ``{tag}{i}`` over ``baskets`` baskets; returns their event ids."""
        ids = []
        for i in range(n):
            eid = f"{tag}{i}"
            self.send(f"b{i % baskets}", {"event_id": eid, "cart": ["A"], "top_k": 2})
            ids.append(eid)
            if pace_s:
                time.sleep(pace_s)
        return ids

    def answered(self, ids: list[str]) -> int:
        with self._lock:
            return sum(1 for i in ids if self.answers[i] > 0)

    def wait_answered(self, ids: list[str], timeout: float) -> int:
        """How many of ``ids`` got an answer, waiting up to ``timeout`` for all of them."""
        deadline = time.monotonic() + timeout
        while self.answered(ids) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.answered(ids)

    def settle(self, ids: list[str], quiet_s: float = 1.0, timeout: float = 15.0) -> int:
        """Wait until answers stop coming (``quiet_s`` without a new one) or all are in."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.answered(ids)
            if n == len(ids):
                return n
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since > quiet_s:
                return n
            time.sleep(0.05)
        return self.answered(ids)

    def wait_status(self, state: str, agent_id: str, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                body = self.status.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {state!r} status from {agent_id} within {timeout}s") from None
            if body.get("state") == state and body.get("agent_id") == agent_id:
                return body

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- the agent as a process ------------------------------------------------------------------
class AgentProc:
    """``AgentService`` on the tiny catalogue in its own process; settings as ``service_config`` keywords."""

    def __init__(self, broker: Broker, prefix: str, workdir: Path, **settings: Any) -> None:
        self.agent_id = settings.pop("agent_id", f"rel-{uuid.uuid4().hex[:6]}")
        self.settings = {"host": broker.host, "port": broker.port, "prefix": prefix, "agent_id": self.agent_id,
                         "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, **settings}
        self.log = workdir / f"{self.agent_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__)), json.dumps(self.settings)],
                                         env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> float:
        """SIGTERM and wait; returns how long the agent took to exit."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"agent did not stop within {timeout}s:\n{self.tail()}") from None
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.kill()
        print(f"--- {a.agent_id} log ---\n{a.tail()}")


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private Mosquitto with the store's queue limits and persistence (restartable)."""
    broker = MosquittoBroker(tmp_path / "mosquitto", extra_config=store_settings(), persistence=True,
                             sys_interval=1)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def launch(agents: list[AgentProc], broker: Broker, prefix: str, tmp_path: Path, console: Console,
           **settings: Any) -> AgentProc:
    agent = AgentProc(broker, prefix, tmp_path, **settings)
    agents.append(agent)
    agent.start()
    console.wait_status("online", agent.agent_id, timeout=20)
    return agent


def report(what: str, sent: int, answered: int, **extra: Any) -> None:
    more = "".join(f", {k} {v}" for k, v in extra.items())
    print(f"\n[{what}] sent {sent}, answered {answered}{more}")


# --- outages ---------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_events_sent_while_the_agent_is_stopped_are_answered_after_start(
        persistent_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path, agents: list[AgentProc],
        protocol: str) -> None:
    broker = persistent_broker.broker
    console = Console(broker, topic_prefix, protocol)
    try:
        agent = launch(agents, broker, topic_prefix, tmp_path, console, protocol=protocol)
        warm = console.burst("warm-", 5)
        assert console.wait_answered(warm, 5) == 5
        agent.stop()
        console.wait_status("offline", agent.agent_id)
        ids = console.burst("down-", 100)
        deltas = [{"action": "add", "product_id": "A"}, {"action": "add", "product_id": "E"},
                  {"action": "add", "product_id": "B"}, {"action": "remove", "product_id": "E"}]
        for i, delta in enumerate(deltas):  # deltas still apply in order: cart [A, B] -> [C, D]
            console.send("d", {**delta, "event_id": f"delta-{i}", "seq": i, "top_k": 2})
        ids += [f"delta-{i}" for i in range(len(deltas))]
        time.sleep(0.5)
        agent.start()
        console.wait_status("online", agent.agent_id, timeout=20)
        answered = console.settle(ids)
        report(f"agent stopped, MQTT {protocol}", len(ids), answered)
        assert answered == len(ids)
        assert console.last["delta-3"]["recommendations"] == ["C", "D"]
    finally:
        console.close()


def test_events_sent_while_the_agent_is_paused_past_its_last_will_are_answered(
        persistent_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path, agents: list[AgentProc]) -> None:
    """SIGSTOP for longer than keepalive x 1.5: the broker declares the agent dead (Last Will)."""
    broker = persistent_broker.broker
    console = Console(broker, topic_prefix)
    try:
        agent = launch(agents, broker, topic_prefix, tmp_path, console, keepalive=2)
        agent.signal(signal.SIGSTOP)
        t0 = time.monotonic()
        ids: list[str] = []
        will_at = None
        while will_at is None or time.monotonic() - will_at < 1.0:  # and 1 s more after the Will
            ids += console.burst(f"p{len(ids)}-", 10)
            time.sleep(0.05)
            while will_at is None and not console.status.empty():
                body = console.status.get_nowait()
                if body.get("agent_id") == agent.agent_id and body.get("state") == "offline":
                    assert body == {"state": "offline", "agent_id": agent.agent_id}  # the Last Will
                    will_at = time.monotonic()
            assert time.monotonic() - t0 < 15, "the broker never declared the paused agent dead"
        paused_s = time.monotonic() - t0
        agent.signal(signal.SIGCONT)
        console.wait_status("online", agent.agent_id, timeout=10)
        answered = console.settle(ids)
        report(f"agent paused {paused_s:.1f} s, Last Will at {will_at - t0:.1f} s", len(ids), answered)
        assert answered == len(ids)
    finally:
        console.close()


def test_events_survive_a_broker_restart_with_persistence(
        persistent_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path, agents: list[AgentProc]) -> None:
    """Queued for a paused agent across a broker restart, and sent before the agent is back."""
    broker = persistent_broker.broker
    console = Console(broker, topic_prefix)
    try:
        agent = launch(agents, broker, topic_prefix, tmp_path, console)
        # (a) held by the broker for a paused agent while the broker restarts
        agent.signal(signal.SIGSTOP)
        held = console.burst("held-", 50)
        time.sleep(0.3)
        persistent_broker.restart(downtime=0.5, graceful=True)
        # (b) sent right after the broker is back, before the (still paused) agent reconnects
        console._subscribed.clear()
        deadline = time.monotonic() + 5
        while not console.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        after = console.burst("after-", 50)
        time.sleep(0.3)
        agent.signal(signal.SIGCONT)
        console.wait_status("online", agent.agent_id, timeout=10)
        ids = held + after
        answered = console.settle(ids)
        report("broker restarted (persistence on)", len(ids), answered,
               held=console.answered(held), after=console.answered(after))
        assert answered == len(ids)
    finally:
        console.close()


def test_sigterm_during_a_burst_loses_nothing(
        persistent_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path, agents: list[AgentProc]) -> None:
    """Every event is either answered before the agent exits or redelivered to its next session."""
    broker = persistent_broker.broker
    console = Console(broker, topic_prefix)
    try:
        agent = launch(agents, broker, topic_prefix, tmp_path, console, drain_timeout_s=2.0)
        ids: list[str] = []
        exit_s: list[float] = []
        stopper = threading.Timer(1.0, lambda: exit_s.append(agent.stop()))
        stopper.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:  # ~5,000 events/s, twice what the agent handles
            ids += console.burst(f"t{len(ids)}-", 50, baskets=50)
            time.sleep(0.01)
        stopper.join(20)
        before_restart = console.answered(ids)
        agent.start()
        console.wait_status("online", agent.agent_id, timeout=20)
        answered = console.settle(ids, quiet_s=2.0, timeout=30)
        report("SIGTERM during a burst", len(ids), answered, answered_before_exit=before_restart,
               exit_s=[round(x, 2) for x in exit_s])
        assert answered == len(ids)
        assert exit_s and exit_s[0] < 2.0 + 3.0  # drain_timeout_s + offline status + disconnect
    finally:
        console.close()


def test_a_burst_beyond_the_default_broker_queue_is_held_by_the_store_config(
        persistent_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path, agents: list[AgentProc]) -> None:
    """4 sensors at full speed: the store config's per-client queue holds the burst; nothing dropped."""
    broker = persistent_broker.broker
    console = Console(broker, topic_prefix, sys_topics=True)
    sensors = [Console(broker, topic_prefix) for _ in range(4)]
    try:
        launch(agents, broker, topic_prefix, tmp_path, console)
        time.sleep(1.2)
        dropped_before = console.broker_dropped or 0
        ids: list[list[str]] = [[] for _ in sensors]
        threads = [threading.Thread(target=lambda k=k: ids[k].extend(sensors[k].burst(f"s{k}-", 2500, 50)))
                   for k in range(len(sensors))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        every = [i for chunk in ids for i in chunk]
        answered = console.settle(every, quiet_s=2.0, timeout=40)
        time.sleep(1.2)  # $SYS every second
        dropped = (console.broker_dropped or 0) - dropped_before
        report("4 sensors x 2,500 at full speed", len(every), answered, broker_dropped=dropped)
        assert answered == len(every)
        assert dropped == 0
    finally:
        for s in sensors:
            s.close()
        console.close()


# --- stale replays ---------------------------------------------------------------------------
def test_a_retained_cart_message_is_never_replayed(
        persistent_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path, agents: list[AgentProc]) -> None:
    """A sensor (wrongly) retained a cart event: at agent start and at every reconnect the broker replays it.
    The agent must not answer it (a checked-out member's recommendations would come back)."""
    broker = persistent_broker.broker
    console = Console(broker, topic_prefix)
    answer_topic = f"{topic_prefix}/basket/r1/recommendations"
    try:
        console.send("r1", {"event_id": "old", "user": {"user_id": "u1"}, "cart": ["A"]},
                     retain=True).wait_for_publish(5)
        agent = launch(agents, broker, topic_prefix, tmp_path, console, protocol="3.1.1", status_interval_s=0.5)
        time.sleep(0.5)
        at_start = [json.loads(p).get("event_id") for p in retained_payloads(broker, answer_topic)]
        persistent_broker.restart(downtime=0.2, graceful=True)  # keeps the retained message: replayed again
        console.wait_status("online", agent.agent_id, timeout=10)
        time.sleep(0.5)
        after_reconnect = [json.loads(p).get("event_id") for p in retained_payloads(broker, answer_topic)]
        live = console.burst("live-", 3)  # live events are still answered
        assert console.wait_answered(live, 5) == 3
        deadline = time.monotonic() + 5
        stats = console.wait_status("online", agent.agent_id, timeout=5)["stats"]
        while stats.get("retained_ignored", 0) < 2 and time.monotonic() < deadline:  # a fresh status
            stats = console.wait_status("online", agent.agent_id, timeout=5)["stats"]
        report("retained cart message, agent start + reconnect", 2,
               int(bool(at_start)) + int(bool(after_reconnect)), ignored=stats.get("retained_ignored"))
        assert at_start == [] and after_reconnect == []
        assert stats["retained_ignored"] == 2
    finally:
        console.send("r1", b"", retain=True).wait_for_publish(5)
        console.close()


def retained_payloads(broker: Broker, topic: str, wait: float = 0.5) -> list[bytes]:
    """What a new subscriber gets on ``topic`` within ``wait`` seconds: the retained message, if any."""
    got: list[bytes] = []
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"peek-{uuid.uuid4().hex[:8]}")
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, 1)
    c.on_message = lambda cl, u, m: got.append(m.payload) if m.payload else None
    c.connect(broker.host, broker.port)
    c.loop_start()
    time.sleep(wait)
    c.disconnect()
    c.loop_stop()
    return got


# --- reconnecting ----------------------------------------------------------------------------
def test_reconnect_after_broker_outage_is_prompt_with_default_backoff(
        persistent_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path, agents: list[AgentProc]) -> None:
    """Broker down for 1 s and 6 s; default back-off (0.5 s doubling to 30 s): time from the broker
    accepting connections again to the agent's online status."""
    broker = persistent_broker.broker
    console = Console(broker, topic_prefix)
    try:
        agent = launch(agents, broker, topic_prefix, tmp_path, console, reconnect_min_s=0.5, reconnect_max_s=30.0)
        gaps = {}
        for down in (1.0, 6.0):
            persistent_broker.stop()
            time.sleep(down)
            persistent_broker.start()
            up = time.monotonic()
            console.wait_status("online", agent.agent_id, timeout=35)
            gaps[down] = round(time.monotonic() - up, 2)
        print("\n[reconnect] broker down -> agent online after broker up: "
              + ", ".join(f"{d:g} s down: {g:.2f} s" for d, g in gaps.items()))
        assert gaps[1.0] < 2.0
    finally:
        console.close()


# --- old snapshots, exports, configuration -----------------------------------------------------
@pytest.fixture
def in_process(persistent_broker: MosquittoBroker, topic_prefix: str) -> Iterator[Any]:
    """``make(**settings)`` -> (AgentService, Console) on the persistent broker, stopped afterwards."""
    from _agent_proc import service_config, tiny_snapshot

    from agent.registry import ModelRegistry
    from agent.service import AgentService

    made: list[tuple[Any, Console]] = []

    def make(**settings: Any) -> tuple[Any, Console]:
        broker = persistent_broker.broker
        console = Console(broker, topic_prefix)
        svc = AgentService(ModelRegistry(tiny_snapshot()), service_config(
            host=broker.host, port=broker.port, prefix=topic_prefix, agent_id=f"ip-{uuid.uuid4().hex[:6]}",
            reconnect_min_s=0.1, reconnect_max_s=0.5, **settings))
        made.append((svc, console))
        svc.start()
        assert svc.wait_connected(10)
        console.wait_status("online", svc.config.agent_id)
        return svc, console

    yield make
    for svc, console in made:
        svc.stop()
        console.close()


def _iso(delta_s: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=delta_s)).isoformat()


def test_old_snapshots_are_applied_but_not_answered(in_process: Any) -> None:
    svc, console = in_process(max_event_age_s=300)
    console.send("o", {"event_id": "old-snap", "seq": 1, "ts": _iso(-600), "cart": ["A", "B"], "top_k": 2})
    console.send("o", {"event_id": "old-delta", "seq": 2, "ts": _iso(-600), "action": "add", "product_id": "C"})
    console.send("o", {"event_id": "no-ts", "seq": 3, "cart": ["A", "B"], "top_k": 2})
    console.send("o", {"event_id": "bad-ts", "seq": 4, "ts": "yesterday-ish", "cart": ["A", "B"], "top_k": 2})
    console.send("o", {"event_id": "year-1", "seq": 5, "ts": "0001-01-01T00:00:00", "cart": ["A", "B"], "top_k": 2})
    console.send("o", {"event_id": "fresh", "seq": 6, "ts": _iso(-1), "cart": ["A", "B"], "top_k": 2})
    assert console.wait_answered(["old-delta", "no-ts", "bad-ts", "year-1", "fresh"], 5) == 5
    time.sleep(0.2)
    assert console.answers["old-snap"] == 0
    assert svc.metrics.aged == 1 and svc.metrics.snapshot()["aged"] == 1
    assert "smartbasket_agent_aged_total 1" in svc.metrics.render_prometheus()


def test_event_age_is_off_by_default(in_process: Any) -> None:
    _, console = in_process()
    console.send("o", {"event_id": "contract-example", "ts": "2026-11-23T14:03:11+09:00", "cart": ["A"]})
    assert console.wait_answered(["contract-example"], 5) == 1


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-23T14:03:11+09:00", datetime(2026, 11, 23, 5, 3, 11, tzinfo=timezone.utc)),
    ("2026-11-23T05:03:11Z", datetime(2026, 11, 23, 5, 3, 11, tzinfo=timezone.utc)),
    ("2026-11-23T05:03:11.1234567z", datetime(2026, 11, 23, 5, 3, 11, 123456, tzinfo=timezone.utc)),
    ("2026-11-23 14:03:11.5+0900", datetime(2026, 11, 23, 5, 3, 11, 500000, tzinfo=timezone.utc)),
    ("2026-11-23T14:03:11", "local"), ("", None), ("tomorrow", None), ("1700000000", None), (17, None),
    # local time at the ends of datetime's range: unreadable (it raised, and the event went unanswered)
    ("0001-01-01T00:00:00", None),
])
def test_event_ts_is_read_leniently(text: Any, expected: Any) -> None:
    from agent.service import parse_ts

    got = parse_ts(text)
    if expected == "local":
        assert got is not None and got.utcoffset() == datetime(2026, 11, 23, 14).astimezone().utcoffset()
    else:
        assert got == expected


def test_the_agent_reports_what_the_broker_dropped_for_it(tmp_path: Path, topic_prefix: str) -> None:
    """A broker whose per-client queue is too small (10) for what arrives while the agent is away: the
    agent cannot see those events, but reports the broker's count in its status and /metrics."""
    from _agent_proc import service_config, tiny_snapshot

    from agent.registry import ModelRegistry
    from agent.service import AgentService

    broker = MosquittoBroker(tmp_path / "small-queue", extra_config=("max_queued_messages 10",), sys_interval=1)
    broker.start()
    console = Console(broker.broker, topic_prefix)
    settings = service_config(host=broker.host, port=broker.port, prefix=topic_prefix, agent_id="drops",
                              reconnect_min_s=0.1, reconnect_max_s=0.5, status_interval_s=0.5)
    svc = AgentService(ModelRegistry(tiny_snapshot()), settings)
    try:
        svc.start()
        console.wait_status("online", "drops")
        svc.stop()
        ids = console.burst("away-", 50)
        time.sleep(0.5)
        svc = AgentService(ModelRegistry(tiny_snapshot()), settings)
        svc.start()
        answered = console.settle(ids, quiet_s=1.5)
        deadline = time.monotonic() + 5
        while (svc.mqtt.broker_dropped or 0) < 40 and time.monotonic() < deadline:
            time.sleep(0.1)
        status = console.wait_status("online", "drops", timeout=5)
        while status["stats"].get("broker_dropped", 0) < 40 and time.monotonic() < deadline:
            status = console.wait_status("online", "drops", timeout=5)
        text = svc.metrics.render_prometheus()
        report("broker queue of 10, 50 events while away", len(ids), answered,
               broker_dropped=status["stats"].get("broker_dropped"))
        assert answered == 10
        assert status["stats"]["broker_dropped"] >= 40 and status["stats"]["dropped"] == 0
        assert status["stats"]["connected"] == 1 and "queue_depth" in status["stats"]
        for name in ("broker_dropped", "queue_depth", "connected", "unacked"):
            assert f"# TYPE smartbasket_agent_{name} gauge" in text
        assert "smartbasket_agent_connected 1" in text and "smartbasket_agent_dropped_total 0" in text
    finally:
        svc.stop()
        console.close()
        broker.stop()


def test_broker_drops_are_absent_when_sys_is_forbidden(tmp_path: Path, topic_prefix: str) -> None:
    from agent.mqtt import MqttClient

    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {topic_prefix}/#\n")
    acl.chmod(0o644)
    broker = MosquittoBroker(tmp_path / "acl-broker", extra_config=(f"acl_file {acl}",), sys_interval=1)
    broker.start()
    client = MqttClient(broker.host, broker.port, client_id="no-sys", subscriptions=[(f"{topic_prefix}/x", 1)],
                        watch_broker_drops=True)
    try:
        client.start()
        assert client.wait_connected(5)
        time.sleep(1.5)
        assert client.broker_dropped is None
    finally:
        client.stop()
        broker.stop()


def test_reliability_config_keys(tmp_path: Path) -> None:
    from agent.config import parse_config
    from agent.errors import ConfigError

    base = {"broker": {"host": "h"}, "agent_id": "j-1", "parameters": str(tmp_path), "allow_unsigned": True}
    cfg = parse_config(base, env={})
    assert cfg.service is not None
    assert (cfg.broker.session_expiry_s, cfg.broker.receive_maximum, cfg.service.drain_timeout_s,
            cfg.service.max_event_age_s) == (86400, 100, 5.0, 0.0)
    cfg = parse_config({**base, "broker": {"host": "h", "session_expiry_s": 0, "receive_maximum": 20},
                        "drain_timeout_s": 1.5, "limits": {"max_event_age_s": 300}}, env={})
    s = cfg.service
    assert s is not None
    assert (s.broker.session_expiry_s, s.broker.receive_maximum, s.drain_timeout_s, s.max_event_age_s) == (
        0, 20, 1.5, 300.0)
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "broker": {"host": "h", "session_expiry_s": -1, "receive_maximum": 70000},
                      "drain_timeout_s": -2, "limits": {"max_event_age_s": "old"}}, env={})
    for needle in ("broker.session_expiry_s must be >= 0", "broker.receive_maximum must be <= 65535",
                   "drain_timeout_s must be >= 0", "limits.max_event_age_s must be a number"):
        assert needle in str(err.value)
    import yaml

    shipped = yaml.safe_load((ROOT / "config" / "agent.yaml").read_text(encoding="utf-8"))
    assert shipped["drain_timeout_s"] == 5 and shipped["limits"]["max_event_age_s"] == 300
    assert shipped["broker"]["session_expiry_s"] == 86400


def test_shipped_mosquitto_conf_runs_as_the_mosquitto_user(tmp_path: Path) -> None:
    """config/mosquitto.conf as installed (only port and paths changed): mosquitto starts as root, drops to
    the 'mosquitto' user, keeps a session with its queued event across a restart."""
    import pwd
    import re
    import shutil
    import stat
    import tempfile

    from scripts.brokers import STORE_CONFIG, find_mosquitto, free_port

    assert STORE_CONFIG.stat().st_mode & stat.S_IROTH, "mosquitto reads its config after dropping to its user"
    if os.geteuid() != 0:
        pytest.skip("needs root to start mosquitto as its own user (CI runs as root)")
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.fail("no 'mosquitto' user: the package creates it")
    root = Path(tempfile.mkdtemp(prefix="store-broker-"))  # not under pytest's 0700 tmp dir
    os.chmod(root, 0o755)
    data = root / "data"
    data.mkdir()
    os.chown(data, user.pw_uid, user.pw_gid)
    port = free_port()
    text = STORE_CONFIG.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^listener 1883 localhost$", f"listener {port} 127.0.0.1", text)
    text = re.sub(r"(?m)^persistence_location .*$", f"persistence_location {data}/", text)
    text = re.sub(r"(?m)^pid_file .*$", "", text)
    text = re.sub(r"(?m)^log_dest .*$", "log_dest stderr", text)
    conf = root / "mosquitto.conf"
    conf.write_text(text)
    conf.chmod(0o644)
    log = root / "log"

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=out, stderr=out)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return proc
            except OSError:
                time.sleep(0.05)
        raise AssertionError(log.read_text())

    def stop(proc: subprocess.Popen[bytes]) -> None:
        proc.terminate()
        proc.wait(10)

    proc = start()
    try:
        owner = Path(f"/proc/{proc.pid}/status").read_text()
        assert f"Uid:\t{user.pw_uid}" in owner, "mosquitto did not drop to its user"
        sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="store-agent", clean_session=False)
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        sub.subscribe("s/basket/+/cart", 1)
        time.sleep(0.3)
        sub.disconnect()
        sub.loop_stop()
        pub = paho.Client(CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        pub.publish("s/basket/b1/cart", b'{"cart": ["A"]}', 1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        stop(proc)
        assert (data / "mosquitto.db").exists()
        proc = start()
        got: list[bytes] = []
        sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="store-agent", clean_session=False)
        sub.on_message = lambda c, u, m: got.append(m.payload)
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        sub.disconnect()
        sub.loop_stop()
        assert got == [b'{"cart": ["A"]}'], log.read_text()
    finally:
        stop(proc)
        shutil.rmtree(root, ignore_errors=True)


# --- soak (short) ------------------------------------------------------------------------------
def test_soak_short(persistent_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path,
                    agents: list[AgentProc]) -> None:
    """bench/bench_soak.py for 5 s at 300 events/s: 200 baskets, members and guests, snapshots and
    deltas, 1 % malformed. Every good event answered exactly once; each malformed one gets one error."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_soak import run_soak

    broker = persistent_broker.broker
    console = Console(broker, topic_prefix)
    agent = launch(agents, broker, topic_prefix, tmp_path, console, status_interval_s=1.0)
    console.close()
    assert agent.proc is not None
    r = run_soak(broker, topic_prefix, agent.proc.pid, rate=300, seconds=5, baskets=200,
                 products=["A", "B", "C", "D", "E", "F"], members=[f"u{i}" for i in range(40)],
                 malformed_pct=1.0, drain_s=20, rss_every_s=1.0)
    print(f"\n[soak 5 s at 300/s] sent {r['sent']}, good {r['good']}, answered once {r['answered_once']}, "
          f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, RSS {r['rss_start_mb']} -> {r['rss_end_mb']} MB")
    assert r["good"] + r["malformed"] == r["sent"] == 1500 and r["malformed"] > 0
    assert r["answered_once"] == r["good"], r
    assert r["malformed_with_one_error"] == r["malformed"] and r["malformed_answered"] == 0
    assert r["broker_dropped"] == 0
    assert r["rss_end_mb"] - r["rss_start_mb"] < 15, r["rss_samples"]


# --- power loss during a model update -----------------------------------------------------------
class _SlowBundles:
    """Serves bundle files over HTTP at a throttled pace (~0.3 s each), so a kill can land mid-download."""

    def __init__(self, root: Path, seconds: float = 0.3) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        served = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = root / self.path.rsplit("/", 1)[-1]
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                step = max(1, len(data) // 20)
                try:
                    for i in range(0, len(data), step):
                        self.wfile.write(data[i:i + step])
                        self.wfile.flush()
                        time.sleep(served.seconds / 20)
                except OSError:
                    pass  # the agent was killed mid-download

        self.seconds = seconds
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/bundles/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _kill_phase(params: Path, version: str) -> str:
    """Where an update was when the agent died, from what it left on disk."""
    names = [p.name for p in (params / "versions").iterdir()] if (params / "versions").is_dir() else []
    if version in names:
        return "installed (renamed, swap/report pending or done)"
    if any(n.startswith(".incoming-") for n in names):
        return "unpack/verify/load"
    if any(n.startswith(".download-") for n in names):
        return "download"
    return "before the download"


def test_power_loss_during_an_update_never_leaves_a_half_written_version(
        persistent_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path, trained: Any) -> None:
    """SIGKILL at random moments after an update is announced (download, unpack, verify, load, swap), 20
    times: every directory under a version's name verifies, and every restart serves a complete, verified
    version (the newest one on disk) and answers with it."""
    import shutil

    from _bundles import make_version, pack, update_message

    from agent.bundle import load_public_key
    from agent.registry import load_snapshot

    runs = 20
    key = load_public_key(trained.public_key)
    t0 = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=2)
    bundles = tmp_path / "bundles"
    # 8 MB of incompressible padding (signed like every file) stretches unpack + verify to ~50 ms, so
    # the kills can land there too; hard links keep the 21 version directories small
    padding = tmp_path / "padding.bin"
    padding.write_bytes(random.Random(1).randbytes(8 << 20))

    def pad(d: Path) -> None:
        (d / "padding").mkdir()
        os.link(padding, d / "padding" / "blob.bin")

    def version_k(k: int) -> str:
        version = make_version(trained.parameters, tmp_path / f"v{k}", trained.signing_key,
                               created_at=t0 + timedelta(hours=k), mutate=pad if k else None)
        if k:
            pack(tmp_path / f"v{k}", bundles / f"{version}.tar.gz")
        return version

    versions = [version_k(0)]
    params = tmp_path / "agent-params"
    shutil.copytree(tmp_path / "v0", params)
    server = _SlowBundles(bundles)
    broker = persistent_broker.broker
    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps({
        "broker": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1}, "prefix": topic_prefix,
        "agent_id": "power", "parameters": str(params), "public_key": str(trained.public_key),
        "http": {"port": 0}, "updates": {"jitter_s": 0}, "status_interval_s": 0.5}))
    console = Console(broker, topic_prefix)
    log = tmp_path / "agent.log"
    rng = random.Random(7)
    cart = trained.family_items(3)[:2]
    phases: Counter[str] = Counter()
    half_pruned: set[str] = set()  # older versions a kill caught while pruning deleted them
    proc: subprocess.Popen[bytes] | None = None

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                    cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                    stdout=subprocess.DEVNULL, stderr=out)

    def serving(expected: set[str], timeout: float = 20.0, since: datetime | None = None) -> str:
        """The version the restarted agent serves once online (checked against `expected`), by status
        and by an answer. ``since``: statuses stamped earlier (the killed process's, still queued) are
        skipped."""
        deadline = time.monotonic() + timeout
        while True:
            body = console.wait_status("online", "power", timeout=max(0.1, deadline - time.monotonic()))
            if since is not None and datetime.fromisoformat(body["ts"]) < since:
                continue
            version = body["models"]["guest"]
            if version in expected:
                break
        eid = f"ask-{uuid.uuid4().hex[:6]}"
        console.send("pw", {"event_id": eid, "cart": cart})
        assert console.wait_answered([eid], 10) == 1, log.read_text()[-3000:]
        return version

    started = time.monotonic()
    try:
        proc = start()
        current = serving({versions[0]})
        for k in range(1, runs + 1):
            new = version_k(k)
            versions.append(new)
            msg = update_message(new, server.url(f"{new}.tar.gz"), bundles / f"{new}.tar.gz")
            console.client.publish(f"{topic_prefix}/models/updated", json.dumps(msg), qos=1,
                                   retain=True).wait_for_publish(5)
            # anywhere in the update, or (every other run) near the end of the ~0.3 s download
            time.sleep(rng.uniform(0.0, 1.0) if k % 2 else rng.uniform(0.3, 0.5))
            proc.kill()
            proc.wait(10)
            phases[_kill_phase(params, new)] += 1
            # what a power loss would leave: the new version is under its name only complete and verified;
            # an older one may be half-deleted (pruning deletes in place), never the newest
            for d in sorted((params / "versions").iterdir()) if (params / "versions").is_dir() else []:
                if d.name.startswith("."):
                    continue
                try:
                    assert load_snapshot(d, key).version == d.name
                except Exception as exc:
                    assert d.name not in (new, current), f"{d.name}: {exc}"
                    half_pruned.add(d.name)
            newest_on_disk = new if (params / "versions" / new).is_dir() else current
            restarted = datetime.now(timezone.utc)
            proc = start()
            # first what start-up chose (the newest complete version), then the retained message applies `new`
            first = serving({current, new}, since=restarted)
            assert first == newest_on_disk, (first, newest_on_disk)
            current = serving({new})
            (bundles / f"{new}.tar.gz").unlink()  # applied: 8 MB less on disk
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        console.client.publish(f"{topic_prefix}/models/updated", b"", qos=1, retain=True).wait_for_publish(5)
        console.close()
        server.close()
    took = time.monotonic() - started
    print(f"\n[power loss during updates] {runs} kills in {took:.0f} s, where: {dict(phases)}; "
          f"every restart served the newest verified version; half-pruned old versions left: {len(half_pruned)}")
    assert current == versions[-1]
    assert len(phases) >= 2, phases  # the kills did land in different steps


# --- the agent as a process (run by AgentProc) -------------------------------------------------
def _serve(settings_json: str) -> None:
    """Run AgentService on the tiny catalogue with these ``service_config`` keywords (unknown ones ignored)."""
    import logging

    from _agent_proc import CONFIG_FIELDS, service_config, tiny_snapshot

    from agent.registry import ModelRegistry
    from agent.service import AgentService

    sys.setswitchinterval(0.0005)  # as basket-agent run does
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    wanted = json.loads(settings_json)
    ignored = sorted(set(wanted) - CONFIG_FIELDS)
    if ignored:
        logging.getLogger("reliability").warning("settings this agent does not know: %s", ignored)
    settings = service_config(**{k: v for k, v in wanted.items() if k in CONFIG_FIELDS})
    AgentService(ModelRegistry(tiny_snapshot()), settings).run_forever()


if __name__ == "__main__":
    _serve(sys.argv[1])

"""Several agent processes share one store's load (issue 8 item 7): ``broker.shared_group``.

Two agents run as separate processes (``tests/test_reliability.py``'s :class:`AgentProc`, the tiny
catalogue) on one prefix with distinct agent ids against a real Mosquitto; a console client plays the
sensors (snapshot events, QoS 1) and the displays (answers counted by ``event_id``). With a shared
group every event is answered exactly once and both agents take a real share; without one, both
answer everything (so the first test would notice a plain subscription). ``pytest -s`` prints the split.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_reliability import AgentProc, Console, launch

from scripts.brokers import Broker

N_EVENTS = 400
N_BASKETS = 40


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.kill()
        print(f"--- {a.agent_id} log ---\n{a.tail(1500)}")


def _start_two(agents: list[AgentProc], broker: Broker, prefix: str, tmp_path: Path, console: Console,
               **settings: Any) -> list[str]:
    """Two agents with distinct ids (and client ids, status topics) and the same ``settings``."""
    tag = uuid.uuid4().hex[:6]
    return [launch(agents, broker, prefix, tmp_path, console, agent_id=f"scale-{tag}-{i}", status_interval_s=0.3,
                   **settings).agent_id for i in (1, 2)]


def _answered_by(console: Console, agent_ids: list[str], total: int, timeout: float = 10.0) -> dict[str, int]:
    """Each agent's ``stats.answered`` from its retained/periodic status, once they add up to ``total``."""
    latest: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = console.status.get(timeout=0.2)
        except queue.Empty:
            continue
        if body.get("agent_id") in agent_ids and body.get("state") == "online":
            latest[body["agent_id"]] = int(body["stats"]["answered"])
        if len(latest) == len(agent_ids) and sum(latest.values()) >= total:
            break
    return latest


def _send(console: Console, tag: str) -> list[str]:
    ids = console.burst(tag, N_EVENTS, baskets=N_BASKETS)  # snapshots {"cart": ["A"], "top_k": 2}, QoS 1
    console.settle(ids, quiet_s=1.0, timeout=20)
    time.sleep(0.5)  # a late second answer would show up here
    return ids


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_shared_group_answers_every_event_once_and_both_agents_work(
        mqtt_broker: Broker, topic_prefix: str, tmp_path: Path, agents: list[AgentProc], protocol: str) -> None:
    console = Console(mqtt_broker, topic_prefix)
    try:
        ids_of_agents = _start_two(agents, mqtt_broker, topic_prefix, tmp_path, console, protocol=protocol,
                                   shared_group=f"store-{uuid.uuid4().hex[:8]}")
        ids = _send(console, "sh-")
        missing = [i for i in ids if console.answers[i] == 0]
        twice = {i: n for i, n in console.answers.items() if n > 1}
        assert not missing, f"{len(missing)} events never answered, e.g. {missing[:5]}"
        assert not twice, f"{len(twice)} events answered more than once, e.g. {list(twice.items())[:5]}"
        assert set(console.answers) == set(ids)
        assert not console.errors, dict(console.errors)
        # the shared subscription delivers under the real topic: each answer is for its own basket
        assert all(console.last[f"sh-{i}"]["basket_id"] == f"b{i % N_BASKETS}" for i in range(N_EVENTS))
        split = _answered_by(console, ids_of_agents, N_EVENTS)
        print(f"\n[shared group, MQTT {protocol}] sent {N_EVENTS} snapshots over {N_BASKETS} baskets, "
              f"answered {sum(console.answers.values())} (each once); per agent: {split}")
        assert sum(split.values()) == N_EVENTS, split
        assert all(n > N_EVENTS // 10 for n in split.values()), split
    finally:
        console.close()


def test_without_a_shared_group_both_agents_answer_every_event(
        mqtt_broker: Broker, topic_prefix: str, tmp_path: Path, agents: list[AgentProc]) -> None:
    console = Console(mqtt_broker, topic_prefix)
    try:
        ids_of_agents = _start_two(agents, mqtt_broker, topic_prefix, tmp_path, console)
        ids = _send(console, "plain-")
        deadline = time.monotonic() + 10
        while sum(console.answers.values()) < 2 * N_EVENTS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(set(console.answers.values())) == [2], "every event answered by both agents"
        assert set(console.answers) == set(ids)
        split = _answered_by(console, ids_of_agents, 2 * N_EVENTS)
        print(f"\n[no shared group] sent {N_EVENTS}, answered {sum(console.answers.values())}; per agent: {split}")
        assert split == {a: N_EVENTS for a in ids_of_agents}
    finally:
        console.close()


def test_a_shared_group_refuses_deltas_with_one_error_each(
        mqtt_broker: Broker, topic_prefix: str, tmp_path: Path, agents: list[AgentProc]) -> None:
    """A delta could reach an agent that never saw the basket's earlier events: refused, never answered."""
    console = Console(mqtt_broker, topic_prefix)
    try:
        _start_two(agents, mqtt_broker, topic_prefix, tmp_path, console, shared_group=f"g-{uuid.uuid4().hex[:8]}")
        deltas = [f"d-{i}" for i in range(10)]
        for i, eid in enumerate(deltas):
            console.send(f"b{i}", {"event_id": eid, "action": "add", "product_id": "A"})
        console.send("b0", {"event_id": "snap-0", "cart": ["A"], "top_k": 2})  # snapshots still answered
        assert console.wait_answered(["snap-0"], 10) == 1
        deadline = time.monotonic() + 10
        while sum(console.errors[e] for e in deltas) < len(deltas) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert {e: console.errors[e] for e in deltas} == {e: 1 for e in deltas}
        assert not any(console.answers[e] for e in deltas)
    finally:
        console.close()

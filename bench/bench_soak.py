"""Soak: many baskets at a steady rate through a real Mosquitto; every good event answered exactly once.

A private Mosquitto with the store's settings (``config/mosquitto.conf``: queues, inflight,
persistence) and the real agent process (``python -m agent.cli run``) on a small trained
store (2,000 products, guest + member models; trained once, cached in ``bench/data/``;
``--store tiny`` uses the 6-product catalogue of ``tests/_agent_proc.py`` instead).

In this process a *sensor* client publishes, on an absolute schedule, cart events for
``--baskets`` baskets: half of the baskets belong to members (``user``), half to guests;
snapshots (30 %), ``add`` (50 %) and ``remove`` (20 %) deltas with a per-basket ``seq``;
``--malformed`` percent of the events are broken (not JSON, a wrong type, an unknown
action). A *display* client notes every recommendation and error by ``event_id``.

Checked: every good event answered exactly once, every malformed one answered by exactly
one error and never by a recommendation; agent resident memory at the start and the end
(flat = no leak); latency publish -> answer received (p50/p99); what the broker dropped
(``$SYS/broker/publish/messages/dropped``). Prints a table, writes ``bench/results/soak.json``.

Run: ``.venv/bin/python bench/bench_soak.py`` (defaults: 200 baskets, 1,000 events/s, 60 s).
The CI test ``tests/test_reliability.py::test_soak_short`` runs :func:`run_soak` for 5 s at 300/s.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.brokers import Broker, MosquittoBroker, store_settings

__all__ = ["SoakLoad", "run_soak", "agent_rss_mb", "cpu_seconds", "main"]

SYS_DROPPED = "$SYS/broker/publish/messages/dropped"
_EID = b'"event_id":'


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


@dataclass
class SoakLoad:
    """Cart events for ``baskets`` baskets: members and guests, snapshots and deltas, some malformed."""

    baskets: int
    products: list[str]
    members: list[str]
    malformed_pct: float = 1.0
    seed: int = 7
    tag: str = field(default_factory=lambda: f"k{uuid.uuid4().hex[:4]}-")

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.ids = [f"soak-{i:03d}" for i in range(self.baskets)]
        self.user = {b: ({"user_id": self.rng.choice(self.members), "gender": self.rng.randint(0, 1),
                          "age": self.rng.randint(18, 80)} if self.members and i % 2 else None)
                     for i, b in enumerate(self.ids)}
        self.cart: dict[str, list[str]] = {b: [] for b in self.ids}
        self.seq = Counter[str]()
        self.n = 0

    def next(self) -> tuple[str, bytes, str | None, bool]:
        """(basket, payload, event_id, good) of the next event."""
        rng = self.rng
        basket = self.ids[self.n % self.baskets]
        eid = f"{self.tag}{self.n}"
        self.n += 1
        if rng.random() * 100 < self.malformed_pct:
            kind = rng.randrange(3)
            if kind == 0:
                return basket, b'{"event_id": "' + eid.encode() + b'", "cart": [', None, False  # not JSON
            bad: dict[str, Any] = ({"event_id": eid, "cart": "A"} if kind == 1 else
                                   {"event_id": eid, "action": "steal", "product_id": "A"})
            return basket, json.dumps(bad).encode(), eid, False
        cart = self.cart[basket]
        self.seq[basket] += 1
        event: dict[str, Any] = {"event_id": eid, "seq": self.seq[basket],
                                 "ts": datetime.now().astimezone().isoformat(timespec="milliseconds"),
                                 "top_k": 10}
        if self.user[basket] is not None:
            event["user"] = self.user[basket]
        r = rng.random()
        if r < 0.3 or not cart:
            cart[:] = rng.sample(self.products, rng.randint(1, min(8, len(self.products))))
            event["cart"] = list(cart)
        elif r < 0.8 and len(cart) < 12:
            pid = rng.choice(self.products)
            if pid not in cart:
                cart.append(pid)
            event.update(action="add", product_id=pid)
        else:
            pid = cart.pop(rng.randrange(len(cart)))
            event.update(action="remove", product_id=pid)
        return basket, json.dumps(event, separators=(",", ":")).encode(), eid, True


class _Display:
    """Every recommendation and error by event_id, with the time of the first one."""

    def __init__(self, broker: Broker, prefix: str) -> None:
        self.lock = threading.Lock()
        self.answers: Counter[str] = Counter()
        self.errors: Counter[str | None] = Counter()
        self.first: dict[str, float] = {}
        self.broker_dropped: int | None = None
        self.status: dict[str, Any] | None = None
        self.prefix = prefix
        ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-display-{uuid.uuid4().hex[:6]}")
        self.client.on_socket_open = lambda c, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(f"{prefix}/basket/+/recommendations", 1), (f"{prefix}/basket/+/errors", 1),
             (f"{prefix}/agent/+/status", 1), (SYS_DROPPED, 0)])
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, 30)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("display client could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        t = time.perf_counter()
        if msg.topic == SYS_DROPPED:
            self.broker_dropped = int(msg.payload)
            return
        if not msg.payload:
            return
        kind = msg.topic.rsplit("/", 1)[1]
        if kind == "status":
            self.status = json.loads(msg.payload)
            return
        if msg.retain:
            return  # an earlier run's retained answer, replayed to this subscriber
        eid = json.loads(msg.payload).get("event_id")
        with self.lock:
            if kind == "recommendations":
                self.answers[eid] += 1
                self.first.setdefault(eid, t)
            else:
                self.errors[eid] += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _percentiles(ms: list[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    ms = sorted(ms)

    def q(p: float) -> float:
        return round(ms[min(len(ms) - 1, max(0, int(round(p * len(ms))) - 1))], 3)

    return {"p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999), "max_ms": round(ms[-1], 3)}


def run_soak(broker: Broker, prefix: str, agent_pid: int, *, rate: float, seconds: float, baskets: int,
             products: list[str], members: list[str], malformed_pct: float = 1.0, seed: int = 7,
             drain_s: float = 30.0, rss_every_s: float = 5.0) -> dict[str, Any]:
    """Send ``rate`` events/s for ``seconds`` to the agent on ``prefix``; returns the figures."""
    load = SoakLoad(baskets, products, members, malformed_pct, seed)
    display = _Display(broker, prefix)
    sensor = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-sensor-{uuid.uuid4().hex[:6]}")
    sensor.on_socket_open = lambda c, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sensor.max_inflight_messages_set(1000)
    sensor.max_queued_messages_set(0)
    sensor.connect(broker.host, broker.port, 30)
    sensor.loop_start()
    time.sleep(1.2)  # a first $SYS reading
    dropped_before = display.broker_dropped or 0
    n = int(rate * seconds)
    sent_at: dict[str, float] = {}
    good: list[str] = []
    bad_ids: list[str] = []
    bad_no_id = 0
    rss = [(0.0, agent_rss_mb(agent_pid))]
    cpu0 = cpu_seconds(agent_pid)
    interval = 1.0 / rate
    clock = time.perf_counter
    t0 = clock() + 0.05
    next_rss = t0 + rss_every_s
    lag_max = 0.0
    for i in range(n):
        basket, payload, eid, ok = load.next()
        due = t0 + i * interval
        now = clock()
        if due > now:
            time.sleep(due - now)
            now = clock()
        lag_max = max(lag_max, now - due)
        sensor.publish(f"{prefix}/basket/{basket}/cart", payload, 1)
        if ok:
            good.append(eid)  # type: ignore[arg-type]
            sent_at[eid] = now  # type: ignore[index]
        elif eid is None:
            bad_no_id += 1
        else:
            bad_ids.append(eid)
        if now >= next_rss:
            rss.append((round(now - t0, 1), agent_rss_mb(agent_pid)))
            next_rss += rss_every_s
    elapsed = clock() - t0
    deadline = clock() + drain_s
    while clock() < deadline:
        with display.lock:
            done = sum(1 for e in good if display.answers[e]) == len(good)
        if done:
            break
        time.sleep(0.1)
    time.sleep(1.5)  # late duplicates, a fresh $SYS value and status
    rss.append((round(clock() - t0, 1), agent_rss_mb(agent_pid)))
    cpu = cpu_seconds(agent_pid) - cpu0
    with display.lock:
        answers, errors = Counter(display.answers), Counter(display.errors)
        first = dict(display.first)
    sensor.disconnect()
    sensor.loop_stop()
    display.close()
    latencies = [(first[e] - sent_at[e]) * 1000 for e in good if e in first]
    once = sum(1 for e in good if answers[e] == 1)
    stats = (display.status or {}).get("stats", {})
    return {
        "rate_target": rate, "seconds": seconds, "baskets": baskets, "sent": n,
        "rate_sent": round(n / elapsed, 1), "sender_lag_max_ms": round(lag_max * 1000, 1),
        "good": len(good), "malformed": len(bad_ids) + bad_no_id,
        "answered_once": once, "unanswered": sum(1 for e in good if not answers[e]),
        "answered_twice_or_more": sum(1 for e in good if answers[e] > 1),
        "malformed_with_one_error": sum(1 for e in bad_ids if errors[e] == 1) + min(errors[None], bad_no_id),
        "malformed_answered": sum(1 for e in bad_ids if answers[e]),
        **_percentiles(latencies),
        "agent_cpu_ms_per_event": round(1000 * cpu / max(1, n), 3),
        "loadavg_1m_after": float(Path("/proc/loadavg").read_text().split()[0]),
        # start, half-way (per-basket state and de-duplication rings have filled by then) and end
        "rss_start_mb": rss[0][1], "rss_mid_mb": min(rss, key=lambda x: abs(x[0] - seconds / 2))[1],
        "rss_end_mb": rss[-1][1], "rss_max_mb": max(r for _, r in rss),
        "rss_samples": rss,
        "broker_dropped": None if display.broker_dropped is None else display.broker_dropped - dropped_before,
        "agent_stats": stats,
    }


# -- the benchmark as a program -------------------------------------------------------------------
def _small_store() -> tuple[Path, list[str], list[str]]:
    """A 2,000-product store with guest + member models (trained once, ~15 s; cached)."""
    import numpy as np

    from retrain_server.data import write_products, write_purchases
    from retrain_server.synth import make_store
    from retrain_server.train import train_bundle

    d = ROOT / "bench" / "data" / "soak-2000"
    params = d / "params"
    if not (params / "manifest.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        store = make_store(2000, 40000, 200, n_families=40, seed=11)
        write_products(d / "products.csv", store.catalog)
        write_purchases(d / "purchase_history.jsonl", store.purchases)
        t = time.perf_counter()
        train_bundle(d / "products.csv", d / "purchase_history.jsonl", params, None, member=True)
        print(f"trained the soak store in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    items = np.load(params / "guest_model" / "item_ids.npy", allow_pickle=False).tolist()
    users = [u for u in np.load(params / "member_model" / "user_lookup.npy", allow_pickle=False).tolist()
             if u != "[UNK]"]
    return params, [str(i) for i in items], [str(u) for u in users]


def _start_agent(args: argparse.Namespace, broker: Broker, prefix: str, workdir: Path,
                 params: Path | None) -> tuple[subprocess.Popen[bytes], Path]:
    log = workdir / "agent.log"
    status: queue.Queue[bytes] = queue.Queue()
    watch = paho.Client(CallbackAPIVersion.VERSION2)
    watch.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{prefix}/agent/soak/status", 1)
    watch.on_message = lambda c, u, m: status.put(m.payload)
    watch.connect(broker.host, broker.port)
    watch.loop_start()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if params is None:  # the tiny catalogue, served by the test helper
        settings = {"host": broker.host, "port": broker.port, "prefix": prefix, "agent_id": "soak",
                    "status_interval_s": 5.0}
        cmd = [sys.executable, str(ROOT / "tests" / "test_reliability.py"), json.dumps(settings)]
    else:
        config = workdir / "agent.yaml"  # the shipped defaults, except where the broker and models are
        config.write_text(json.dumps({
            "broker": {"host": broker.host, "port": broker.port}, "prefix": prefix, "agent_id": "soak",
            "parameters": str(params), "allow_unsigned": True, "http": {"port": 0}, "status_interval_s": 5,
            "log_level": "WARNING"}))  # JSON is YAML
        cmd = [sys.executable, "-m", "agent.cli", "run", "--config", str(config)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                payload = status.get(timeout=0.2)
            except queue.Empty:
                continue
            if payload and json.loads(payload).get("state") == "online":
                return proc, log
        raise RuntimeError(f"agent not online:\n{log.read_text()[-3000:]}")
    finally:
        watch.disconnect()
        watch.loop_stop()


def main() -> None:
    from common import stop_process  # the benchmarks' shared plumbing (tests import run_soak alone)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="events per second")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--baskets", type=int, default=200)
    ap.add_argument("--malformed", type=float, default=1.0, help="percent of malformed events")
    ap.add_argument("--store", choices=("small", "tiny"), default="small")
    args = ap.parse_args()
    sys.setswitchinterval(0.0005)  # the load generator's paho threads, as in bench_e2e.py
    params, products, members = _small_store() if args.store == "small" else (
        None, ["A", "B", "C", "D", "E", "F"], [f"u{i}" for i in range(50)])
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        workdir = Path(tmp)
        broker = MosquittoBroker(workdir / "mosquitto", extra_config=store_settings(), persistence=True,
                                 sys_interval=1)
        broker.start()
        prefix = f"bench-soak/{uuid.uuid4().hex[:6]}"
        proc = None
        try:
            proc, log = _start_agent(args, broker.broker, prefix, workdir, params)
            time.sleep(1.0)
            r = run_soak(broker.broker, prefix, proc.pid, rate=args.rate, seconds=args.seconds,
                         baskets=args.baskets, products=products, members=members, malformed_pct=args.malformed)
        finally:
            stop_process(proc)
            broker.stop()
    r["store"] = args.store
    rows = [("events sent (good + malformed)", f"{r['sent']:,} ({r['good']:,} + {r['malformed']:,})"),
            ("rate sent / target", f"{r['rate_sent']:,.0f} / {r['rate_target']:,.0f} events/s for {r['seconds']:g} s, "
                                   f"{r['baskets']} baskets"),
            ("good events answered exactly once",
             f"{r['answered_once']:,} of {r['good']:,} (unanswered {r['unanswered']}, "
             f"twice+ {r['answered_twice_or_more']})"),
            ("malformed: one error each / answered", f"{r['malformed_with_one_error']} / {r['malformed_answered']}"),
            ("latency p50 / p99 / p99.9 / max", f"{r['p50_ms']} / {r['p99_ms']} / {r['p999_ms']} / {r['max_ms']} ms"),
            ("agent CPU per event (load avg after)",
             f"{r['agent_cpu_ms_per_event']} ms ({r['loadavg_1m_after']})"),
            ("agent RSS start / half-way / end",
             f"{r['rss_start_mb']} / {r['rss_mid_mb']} / {r['rss_end_mb']} MB"),
            ("broker dropped ($SYS)", str(r["broker_dropped"])),
            ("agent dropped / queue at end",
             f"{r['agent_stats'].get('dropped')} / {r['agent_stats'].get('queue_depth')}")]
    width = max(len(k) for k, _ in rows)
    print(f"\nSoak ({args.store} store, Mosquitto with config/mosquitto.conf settings)")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    out = ROOT / "bench" / "results" / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "cpus": os.cpu_count(), **r}, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

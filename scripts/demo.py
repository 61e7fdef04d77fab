"""The demo: a synthetic store, trained models, a broker, the agent, and live baskets.

1. writes a small synthetic store (products.csv with Korean + English tags,
   purchase_history.jsonl with guests and members) into ``.demo/data``;
2. makes an Ed25519 key pair and trains both models into ``.demo/parameters``
   (signed), exactly as ``retrain-server train`` does;
3. starts a private Mosquitto (or, when it is not installed, the embedded
   amqtt broker, MQTT 3.1.1) on a free port;
4. starts the store server's side in this process: a throwaway PostgreSQL
   (when installed), the bundle server and the operations console (``GET /``);
5. starts ``basket-agent run`` as a separate process with the HTTP bridge on,
   whose ``/display/<basket>`` pages show each basket's recommendations live;
6. simulates baskets (guests and members) adding products, one MQTT event at a
   time, and prints each basket's cart and its recommendations with names;
   then asks the HTTP bridge the same question;
7. the nightly loop (when PostgreSQL is installed): loads the store into
   PostgreSQL, writes a new day of purchases, runs the nightly job (count,
   refit, gate, sign, pack, publish) while baskets keep shopping, and shows the
   running agent switch to the new version with every cart event answered;
8. with ``--keep-running``, keeps shopping at a watchable pace until Ctrl-C
   (the display and console URLs keep working); then checks out every basket,
   stops the agent (its status turns ``offline``) and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.brokers import AmqttBroker, MosquittoBroker, free_port, mosquitto_available

WORK = ROOT / ".demo"


def pad(text: str, width: int) -> str:
    """Left-justify by display width: Hangul takes two terminal columns."""
    import unicodedata

    cols = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(0, width - cols)


def step(msg: str) -> None:
    print(f"\n\033[1m== {msg}\033[0m", flush=True)


def prepare_models(retrain: bool) -> tuple[Path, Path, Path]:
    from retrain_server.data import write_products, write_purchases
    from retrain_server.sign import keygen
    from retrain_server.synth import make_store
    from retrain_server.train import train_bundle

    data, keys, params = WORK / "data", WORK / "keys", WORK / "parameters"
    step("1. sample data: a synthetic store (Korean + English tags, guests and members)")
    store = make_store(n_products=400, n_rows=8000, n_users=60, n_families=20, seed=11)
    data.mkdir(parents=True, exist_ok=True)
    write_products(data / "products.csv", store.catalog)
    write_purchases(data / "purchase_history.jsonl", store.purchases)
    print(f"   {len(store.catalog)} products, {len(store.purchases)} purchase rows -> {data}")
    step("2. keys and training (guest: TF-IDF + co-purchase; member: Two-Tower -> int8 ONNX)")
    if not (keys / "signing.key").exists():
        keygen(keys)
    if retrain or not (params / "manifest.json").exists():
        t0 = time.perf_counter()
        doc = train_bundle(data / "products.csv", data / "purchase_history.jsonl", params,
                           keys / "signing.key")
        print(f"   trained {doc['version']} in {time.perf_counter() - t0:.1f} s -> {params}")
    else:
        print(f"   reusing {params} (--retrain to train again)")
    return data, keys / "signing.pub", params


def start_broker() -> tuple[object, int, str]:
    step("3. MQTT broker, and the store server's side (bundles, operations console)")
    if mosquitto_available():
        broker = MosquittoBroker(WORK / "broker")
        broker.start()
        print(f"   Mosquitto on 127.0.0.1:{broker.port} (MQTT 5, TCP_NODELAY)")
        return broker, broker.port, "5"
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    broker = AmqttBroker()
    broker.start()
    print(f"   Mosquitto not installed: embedded amqtt broker on 127.0.0.1:{broker.port} (MQTT 3.1.1)")
    return broker, broker.port, "3.1.1"


class StoreServer:
    """The store server's side, in this process: PostgreSQL (when installed), bundle server, console.

    What ``retrain-server serve`` runs, minus the schedule (step 7 runs the nightly job itself).
    """

    def __init__(self, port: int, protocol: str, prefix: str) -> None:
        from retrain_server.console import AgentDirectory, add_console_routes
        from retrain_server.serve import BundleServer, create_app
        from scripts.postgres import PostgresServer, postgres_available

        self.dir = WORK / "server"
        for sub in ("parameters", "state", "bundles"):
            if (self.dir / sub).exists():
                import shutil

                shutil.rmtree(self.dir / sub)
        (self.dir / "bundles").mkdir(parents=True, exist_ok=True)
        self.pg = PostgresServer(WORK / "postgres") if postgres_available() else None
        app = create_app(self.dir / "bundles", lambda: {"status": "ok"})
        self.directory = AgentDirectory("127.0.0.1", port, prefix=prefix, protocol=protocol)
        add_console_routes(app, self.directory, self.models)
        self.bundles = BundleServer(app, "127.0.0.1", 0)

    def start(self) -> None:
        if self.pg is not None:
            from retrain_server.sources import postgres

            self.pg.start()
            with postgres.connect(self.pg.dsn) as conn:
                # every run starts from an empty store, as the server's state directory does: a
                # database left by an earlier run would point at generations deleted above
                conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
                conn.execute("CREATE SCHEMA public")
                conn.commit()
                postgres.migrate(conn)
        self.bundles.start()
        self.directory.start()

    def models(self) -> list[dict]:
        if self.pg is None:
            return []
        from retrain_server.sources import postgres
        from retrain_server.state import model_history

        with postgres.connect(self.pg.dsn, connect_timeout=3) as conn:
            return model_history(conn)

    def stop(self) -> None:
        self.directory.stop()
        self.bundles.stop()
        if self.pg is not None:
            self.pg.close()


class Display:
    """A stand-in for the basket's display: subscribes to recommendations."""

    def __init__(self, port: int, protocol: str, prefix: str) -> None:
        import paho.mqtt.client as mqtt

        self.inbox: queue.Queue = queue.Queue()
        self.status: queue.Queue = queue.Queue()
        proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"demo-display-{uuid.uuid4().hex[:6]}",
                                  protocol=proto)
        self.client.on_socket_open = lambda c, u, sock: sock.setsockopt(6, 1, 1)  # TCP_NODELAY
        self.prefix = prefix

        def on_connect(client, userdata, flags, rc, props=None):
            client.subscribe([(f"{prefix}/basket/+/recommendations", 1), (f"{prefix}/basket/+/errors", 1),
                              (f"{prefix}/agent/+/status", 1)])

        def on_message(client, userdata, msg):
            if msg.topic.endswith("/status"):
                self.status.put(json.loads(msg.payload) if msg.payload else None)
            else:
                self.inbox.put((time.perf_counter(), msg.topic, msg.payload))

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, basket: str, event: dict) -> float:
        t0 = time.perf_counter()
        self.client.publish(f"{self.prefix}/basket/{basket}/cart", json.dumps(event, ensure_ascii=False), qos=1)
        return t0

    def wait_for(self, basket: str, event_id: str, timeout: float = 10.0) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                t, topic, payload = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if not payload or f"/basket/{basket}/" not in topic:
                continue
            msg = json.loads(payload)
            if topic.endswith("/errors"):
                raise RuntimeError(f"agent reported an error: {msg}")
            if msg.get("event_id") == event_id:
                return t, msg
        raise TimeoutError(f"no recommendation for {basket} event {event_id}")

    def wait_status(self, state: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the agent exited with status {process.returncode}")
            try:
                s = self.status.get(timeout=0.5)
            except queue.Empty:
                continue
            if s and s.get("state") == state:
                return s
        raise TimeoutError(f"agent status never became {state!r}")


def shopping_lists(data: Path, n: int, rng: np.random.Generator) -> list[tuple[dict | None, list[str]]]:
    """Real baskets from the sample history: (user or None, products in order)."""
    from retrain_server.data import load_purchases

    log = load_purchases(data / "purchase_history.jsonl")
    sessions: dict[str, list[int]] = {}
    for i, s in enumerate(log.session_ids.tolist()):
        sessions.setdefault(s, []).append(i)
    keys = list(sessions)
    picks, want_member = [], True
    for s in rng.permutation(keys):
        rows = sessions[s]
        uid = log.user_ids[rows[0]]
        if bool(uid) != want_member or len(rows) < 4:
            continue
        user = ({"user_id": str(uid), "gender": int(log.genders[rows[0]]), "age": int(log.ages[rows[0]])}
                if uid else None)
        picks.append((user, [str(log.product_ids[r]) for r in rows][:5]))
        want_member = not want_member
        if len(picks) == n:
            break
    return picks


def nightly_update(display: "Display", data: Path, keys: Path, port: int, protocol: str, prefix: str,
                   server: StoreServer) -> None:
    """Step 7: a day of purchases in PostgreSQL -> nightly job -> the running agent swaps, baskets served."""
    import threading
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    from retrain_server.config import parse_config
    from retrain_server.nightly import NightlyJob
    from retrain_server.sources import postgres

    step("7. the nightly loop: a day of purchases in PostgreSQL -> retrain -> publish -> hot swap")
    pg, bundles, server_dir = server.pg, server.bundles, server.dir
    if pg is None:
        print("   PostgreSQL is not installed: skipped (as root, bash scripts/demo.sh installs it)")
        return
    stop_shopping = threading.Event()
    try:
        with postgres.connect(pg.dsn) as conn:
            postgres.load_files(conn, data / "products.csv", data / "purchase_history.jsonl")
            _, last = postgres.purchase_days(conn, "Asia/Seoul")
            day = last + timedelta(days=1)
            history = postgres.read_purchases(conn, None, day, "Asia/Seoul")
            # A new day: yesterday's baskets bought again by the same shoppers.
            sessions: dict[str, tuple[str, list[str]]] = {}
            for sid, uid, pid in zip(history.session_ids.tolist(), history.user_ids.tolist(),
                                     history.product_ids.tolist()):
                sessions.setdefault(sid, (uid, []))[1].append(pid)
            noon = datetime.combine(day, datetime.min.time(), ZoneInfo("Asia/Seoul")) + timedelta(hours=9)
            picked = list(sessions.items())[-300:]
            with conn.transaction():
                for n, (sid, (uid, items)) in enumerate(picked):
                    conn.execute("INSERT INTO purchases (session_id, user_id, product_list, purchased_at) "
                                 "VALUES (%s, %s, %s::jsonb, %s)",
                                 (f"{day}-{sid}", uid or None, json.dumps(items), noon + timedelta(minutes=2 * n)))
        print(f"   PostgreSQL {pg.dsn.rsplit('@', 1)[-1]}: store loaded, {len(picked)} baskets written for {day}")
        cfg = parse_config({"database": {"dsn": pg.dsn}, "broker": {"host": "127.0.0.1", "port": port,
                                                                  "protocol": protocol},
                            "prefix": prefix, "parameters": str(server_dir / "parameters"),
                            "state_dir": str(server_dir / "state"), "bundle_dir": str(server_dir / "bundles"),
                            "signing_key": str(keys / "signing.key"), "public_url": bundles.url,
                            "training": {"epochs": 1}}, env={})
        sent, answered, versions = [0], [0], {}
        lock = threading.Lock()

        def shop() -> None:  # a basket adding products all through the update
            ids = list(sessions.values())[0][1] + list(sessions.values())[1][1]
            n = 0
            while not stop_shopping.is_set():
                n += 1
                basket = f"swap-{n // 20}"
                eid = f"{basket}-{n}"
                display.send(basket, {"event_id": eid, "seq": n, "action": "add", "product_id": ids[n % len(ids)]})
                with lock:
                    sent[0] += 1
                try:
                    _, msg = display.wait_for(basket, eid, timeout=5)
                except (TimeoutError, RuntimeError):
                    continue
                with lock:
                    answered[0] += 1
                    versions[msg["model_version"]] = versions.get(msg["model_version"], 0) + 1
                time.sleep(0.02)

        shopper = threading.Thread(target=shop, daemon=True)
        shopper.start()
        t0 = time.perf_counter()
        result = NightlyJob(cfg).run(day)
        print(f"   nightly {day}: {result.summary()}")
        t = result.timings
        print("   steps (s): " + ", ".join(f"{k[:-2]} {v}" for k, v in t.items() if k != "total_s"))
        if result.bundle is not None:
            print(f"   bundle {result.bundle.path.name}: {result.bundle.bytes / 1e6:.1f} MB, edge files only, signed")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status = display.status.get(timeout=0.5)
            except queue.Empty:
                continue
            update = (status or {}).get("last_update") or {}
            if update.get("version") == result.version:
                print(f"   agent: {update['result']} {update['version']} {time.perf_counter() - t0:.1f} s after the "
                      f"job started" + (f" ({update['reason']})" if update.get("reason") else ""))
                break
        time.sleep(1.0)
        stop_shopping.set()
        shopper.join(10)
        with lock:
            print(f"   during the update a basket sent {sent[0]} cart events, {answered[0]} answered; by version: "
                  + ", ".join(f"{v} x{c}" for v, c in versions.items()))
    finally:
        stop_shopping.set()


def who(user: dict | None) -> str:
    return f"member {user['user_id']} ({'F' if user['gender'] == 1 else 'M'}, {user['age']})" if user else "guest"


def shop_round(display: Display, names: dict[str, str], lists: list[tuple[dict | None, list[str]]], round_no: int,
               latencies: list[float], pace: float = 0.0) -> None:
    """One shopping trip per basket ``b-1`` .. ``b-N`` (the same ids every round, so a display URL stays useful).

    ``pace`` 0: basket after basket, as fast as answers come. ``pace`` > 0: every basket adds a product,
    then a pause of ``pace`` seconds, so a person watching ``/display/b-1`` sees the cart change.
    """
    baskets = [(f"b-{b + 1}", user, products) for b, (user, products) in enumerate(lists)]

    def add(basket: str, user: dict | None, seq: int, pid: str) -> str:
        event = {"event_id": f"{basket}-r{round_no}-{seq}", "seq": seq, "action": "add", "product_id": pid,
                 "user": user, "top_k": 5}
        t0 = display.send(basket, event)
        t1, msg = display.wait_for(basket, event["event_id"])
        latencies.append((t1 - t0) * 1000)
        recs = ", ".join(i["name"] for i in msg["items"])
        return f"+ {pad(names.get(pid, pid), 20)} → [{msg['model']:<6} {latencies[-1]:5.1f} ms] {recs}"

    def checkout(basket: str) -> None:
        display.send(basket, {"event_id": f"{basket}-r{round_no}-out", "seq": 99, "action": "checkout"})

    if pace <= 0:
        for basket, user, products in baskets:
            print(f"\n   basket {basket} · {who(user)}")
            for seq, pid in enumerate(products, 1):
                print(f"     {add(basket, user, seq, pid)}")
            checkout(basket)
        return
    print(f"\n   round {round_no}: " + ", ".join(f"{b} {who(u)}" for b, u, _ in baskets))
    for seq in range(1, max(len(p) for _, _, p in baskets) + 1):
        for basket, user, products in baskets:
            if seq <= len(products):
                print(f"   {basket:<5} {add(basket, user, seq, products[seq - 1])}")
        time.sleep(pace)
    time.sleep(2 * pace)
    for basket, _, _ in baskets:
        checkout(basket)
    print("   every basket checked out (the displays empty)")
    time.sleep(2 * pace)


def main(argv: list[str] | None = None) -> int:
    global WORK
    ap = argparse.ArgumentParser(description="Smart Basket demo (see the module docstring).")
    ap.add_argument("--baskets", type=int, default=4, help="baskets to simulate (default 4)")
    ap.add_argument("--keep-running", action="store_true",
                    help="after the nightly update, keep shopping (slowly, to watch the display) until Ctrl-C")
    ap.add_argument("--pace", type=float, default=1.0,
                    help="with --keep-running: seconds between one product and the next (default 1)")
    ap.add_argument("--retrain", action="store_true", help="train again even if .demo/parameters exists")
    ap.add_argument("--workdir", type=Path, default=WORK, help="where data, keys and models go (default .demo)")
    args = ap.parse_args(argv)
    WORK = args.workdir.resolve()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    data, pub, params = prepare_models(args.retrain)
    names = dict(zip(np.load(params / "guest_model" / "item_ids.npy").tolist(),
                     np.load(params / "guest_model" / "item_names.npy").tolist()))
    broker, port, protocol = start_broker()
    prefix = f"smartbasket/demo-{uuid.uuid4().hex[:6]}"
    server = StoreServer(port, protocol, prefix)
    server.start()
    print(f"   store server (in this process): bundles and the operations console on {server.bundles.url}"
          + ("" if server.pg else " (PostgreSQL not installed: no nightly history)"))
    http_port = free_port()
    step("4. the agent (basket-agent run), with the HTTP bridge and the basket display")
    cmd = [sys.executable, "-m", "agent.cli", "run", "--broker", f"127.0.0.1:{port}", "--protocol", protocol,
           "--prefix", prefix, "--agent-id", "demo-jetson", "--parameters", str(params),
           "--public-key", str(pub), "--http-port", str(http_port), "--update-jitter-s", "0"]
    print("   " + " ".join(Path(c).name if c == sys.executable else c for c in cmd))
    log_path = WORK / "agent.log"
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"))
    display = Display(port, protocol, prefix)

    def urls() -> None:
        print(f"   basket display:     http://127.0.0.1:{http_port}/display/b-1   "
              f"(every basket: http://127.0.0.1:{http_port}/display)")
        print(f"   operations console: {server.bundles.url}/")

    code = 1
    lists: list[tuple[dict | None, list[str]]] = []
    try:
        status = display.wait_status("online", process=agent)
        print(f"   agent online: models {status['models']}  (log: {log_path})")
        urls()
        step("5. shoppers fill their baskets (one MQTT cart event per product)")
        rng = np.random.default_rng(5)
        latencies: list[float] = []
        lists = shopping_lists(data, args.baskets, rng)
        shop_round(display, names, lists, 1, latencies)
        step("6. the HTTP bridge answers the same models")
        body = json.dumps({"user_id": None, "cart": list(names)[:2], "top_k": 3}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/recommend", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            print(f"   POST /recommend -> {resp.status} {resp.read().decode()}")
        nightly_update(display, data, pub.parent, port, protocol, prefix, server)
        lat = np.array(latencies)
        print(f"\n   {lat.size} events answered; sensor->display round trip p50 {np.percentile(lat, 50):.2f} ms, "
              f"p99 {np.percentile(lat, 99):.2f} ms")
        if args.keep_running:
            step("8. shopping goes on until Ctrl-C; watch it in a browser")
            urls()
            round_no = 1
            while True:
                round_no += 1
                lists = shopping_lists(data, args.baskets, rng)
                shop_round(display, names, lists, round_no, latencies, pace=max(args.pace, 0.05))
        code = 0
    except KeyboardInterrupt:
        code = 0
    finally:
        step("stopping")
        server.directory.stop()  # Ctrl-C reached the broker too: no reconnect warnings from the console
        for b in range(len(lists)):  # a basket left mid-trip: its display and retained answer are cleared
            display.send(f"b-{b + 1}", {"event_id": f"b-{b + 1}-stop-{uuid.uuid4().hex[:6]}", "action": "checkout"})
        time.sleep(0.2)
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
        try:
            final = display.wait_status("offline", timeout=5)
            print(f"   agent status: {final['state']}")
        except TimeoutError:
            print("   agent status: (offline message not seen)")
        display.client.loop_stop()
        server.stop()
        broker.stop()
        if code != 0:
            print(f"demo failed; agent log: {log_path}", file=sys.stderr)
            print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
    return code


if __name__ == "__main__":
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    raise SystemExit(main())

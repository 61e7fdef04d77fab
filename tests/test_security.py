"""Broker security (issue 8) on a real Mosquitto running the shipped config/mosquitto-secure.conf.

The store's files come from scripts/broker_credentials.py (a CA, server and client
certificates, one user per MQTT connection, a password file made by mosquitto_passwd,
the ACL). The broker runs the shipped config with only ports and paths changed, as
root dropping to the ``mosquitto`` user like a store's broker, so the files' modes are
tested too. Findings reproduced first on an anonymous broker (the old store config):
anyone subscribed to ``#`` sees every member's cart; anyone can publish a basket's
recommendations or a model update; a loop of connections with the agent's client id
knocks the agent off again and again.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt import TLSSettings
from agent.registry import ModelRegistry
from agent.service import AgentService
from retrain_server.errors import PublishError
from retrain_server.publish import Announcer, UpdateMessage
from scripts.broker_credentials import render_acl, store_users, write_store
from scripts.brokers import find_mosquitto, free_port

ROOT = Path(__file__).resolve().parents[1]
SECURE_CONF = ROOT / "config" / "mosquitto-secure.conf"
sys.path.insert(0, str(ROOT / "tests"))


# --- the store: credentials and a broker running the shipped config ----------------------------
@dataclass
class Store:
    root: Path
    creds: Path
    prefix: str
    passwords: dict[str, str]
    local_port: int = 0
    tls_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def tls(self, user: str, *, cert: bool = True) -> TLSSettings:
        d = self.creds / "clients" / user
        return TLSSettings(ca_file=str(d / "ca.crt"), cert_file=str(d / "client.crt") if cert else None,
                           key_file=str(d / "client.key") if cert else None)

    def topic(self, rest: str) -> str:
        return f"{self.prefix}/{rest}"


def render_secure_config(store: Store, *, acl: bool = True, bind_ids: bool = True) -> Path:
    """The shipped config with this test's ports and files (and, when asked, without the ACL or id binding)."""
    out = []
    for line in SECURE_CONF.read_text(encoding="utf-8").splitlines():
        key = line.split("#", 1)[0].split()
        word = key[0] if key else ""
        if word == "pid_file" or (word == "acl_file" and not acl) or (word == "use_username_as_clientid"
                                                                      and not bind_ids):
            continue
        if word == "log_dest":
            line = f"log_dest file {store.root}/data/mosquitto.log"
        elif word == "persistence_location":
            line = f"persistence_location {store.root}/data/"
        elif line.startswith("listener 1883 "):
            line = f"listener {store.local_port} 127.0.0.1"
        elif line.startswith("listener 8883 "):
            line = f"listener {store.tls_port} 127.0.0.1"
        out.append(line.replace("/etc/mosquitto/", f"{store.creds}/broker/"))
    path = store.root / f"mosquitto-{'acl' if acl else 'noacl'}-{'bound' if bind_ids else 'free'}.conf"
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    os.chmod(path, 0o644)
    return path


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def start_broker(store: Store, **options: bool) -> None:
    store.local_port, store.tls_port = free_port(), free_port()
    (store.root / "data").mkdir(exist_ok=True)
    if os.geteuid() == 0:  # the broker writes its database after dropping to 'mosquitto'
        shutil.chown(store.root / "data", "mosquitto")
    conf = render_secure_config(store, **options)
    store.proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not (_accepts(store.local_port) and _accepts(store.tls_port)):
        if store.proc.poll() is not None or time.monotonic() > deadline:
            log_file = store.root / "data" / "mosquitto.log"
            log = log_file.read_text(errors="replace") if log_file.exists() else ""
            raise RuntimeError(f"secure mosquitto did not start: {store.proc.stderr.read()!r} {log[-2000:]}")
        time.sleep(0.05)


def stop_broker(store: Store) -> None:
    if store.proc is not None:
        store.proc.terminate()
        store.proc.wait(10)
        store.proc = None


def _make_store(**options: bool) -> Iterator[Store]:
    root = Path(tempfile.mkdtemp(prefix="smartbasket-security-", dir="/tmp"))
    os.chmod(root, 0o755)  # the broker, as 'mosquitto', must traverse it (pytest's tmp dirs are 0700)
    prefix = f"sec-{uuid.uuid4().hex[:8]}/store"
    users = store_users(prefix, agents=["j1"], baskets=["b-1", "b-2"], displays=["b-1", "b-2"], bridges=["br"])
    creds = root / "creds"
    passwords = write_store(creds, users, prefix)
    os.chmod(creds, 0o711)
    store = Store(root, creds, prefix, passwords)
    start_broker(store, **options)
    try:
        yield store
    finally:
        stop_broker(store)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    """The full secure setup: TLS + client certificates + passwords + ACL + client ids bound to users."""
    yield from _make_store()


# --- MQTT clients ------------------------------------------------------------------------------
class Client:
    """A paho client that records what happens to it: CONNACKs, messages, PUBACK reason codes."""

    def __init__(self, port: int, user: str | None, password: str | None = None, *, tls: TLSSettings | None = None,
                 client_id: str | None = None, clean: bool = True, connect: bool = True) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
                             protocol=paho.MQTTv5)
        self.connacks: list[tuple[str, bool]] = []
        self.messages: list[tuple[str, bytes, bool]] = []
        self.pubacks: dict[int, str] = {}
        self.disconnects = 0
        self.connected = threading.Event()
        if user is not None:
            self.c.username_pw_set(user, password)
        if tls is not None:
            self.c.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                           cert_reqs=ssl.CERT_REQUIRED)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *_: setattr(self, "disconnects", self.disconnects + 1)
        self.c.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload, bool(m.retain)))
        self.c.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, str(rc))
        self.port, self.clean = port, clean
        if connect:
            self.connect()

    def _on_connect(self, _c: Any, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        self.connacks.append((str(rc), bool(getattr(flags, "session_present", False))))
        if not rc.is_failure:
            self.connected.set()

    def connect(self, timeout: float = 5.0) -> bool:
        self.c.connect("127.0.0.1", self.port, clean_start=self.clean)
        self.c.loop_start()
        return self.connected.wait(timeout)

    def subscribe(self, *topics: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *_: done.set()
        self.c.subscribe([(t, 1) for t in topics])
        assert done.wait(5)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> str:
        """Publish QoS 1 and return the broker's PUBACK reason ("Success", "Not authorized", ...)."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        deadline = time.monotonic() + 5
        while info.mid not in self.pubacks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.pubacks.get(info.mid, "no PUBACK")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def publish_once(store: Store, user: str, topic: str, payload: bytes, retain: bool = False) -> str:
    """Connect as ``user``, publish, disconnect: the PUBACK's reason. (A client left connected would
    reconnect by itself and, having the same client id, take the place of the next one of its user.)"""
    client = user_client(store, user)
    try:
        return client.publish(topic, payload, retain=retain)
    finally:
        client.close()


def user_client(store: Store, user: str, **kw: Any) -> Client:
    client = Client(store.tls_port, user, store.passwords[user], tls=store.tls(user), **kw)
    assert client.connected.is_set(), (user, client.connacks)
    return client


def _tiny_registry() -> ModelRegistry:
    from _agent_proc import tiny_snapshot

    return ModelRegistry(tiny_snapshot())


def secure_agent(store: Store, agent_id: str = "j1") -> AgentService:
    """An agent logging in as agent-ID (events, status) and agent-ID-out (answers), over TLS with its certificate."""
    from _agent_proc import service_config

    user = f"agent-{agent_id}"
    service = AgentService(_tiny_registry(), service_config(
        host="127.0.0.1", port=store.tls_port, agent_id=agent_id, prefix=store.prefix, username=user,
        password=store.passwords[user], tls=store.tls(user), reconnect_min_s=0.1, reconnect_max_s=1.0))
    assert getattr(service.out._client, "_username", None) == f"{user}-out".encode()
    return service


def _wait(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def _never_connects(client: Client) -> bool:
    """The TLS handshake or the login fails: no successful CONNACK (with TLS 1.3 the refusal comes after
    the client's side of the handshake, so it may show as a closed connection rather than an error)."""
    try:
        ok = client.connect(3)
    except (ssl.SSLError, OSError):
        ok = False
    client.c.loop_stop()
    return not ok and not client.connected.is_set()


MEMBER_CART = json.dumps({"event_id": "e-1", "user": {"user_id": "m-12345", "gender": 1, "age": 34},
                          "cart": ["A"]}).encode()


# --- the findings, on an anonymous broker (the store's config before issue 8) -------------------
def test_finding_on_an_anonymous_broker_anyone_reads_every_cart_and_forges_answers(mqtt_broker, topic_prefix):
    spy = Client(mqtt_broker.port, None)
    spy.subscribe("#")
    shopper = Client(mqtt_broker.port, None)
    shopper.publish(f"{topic_prefix}/basket/b-1/cart", MEMBER_CART)
    forger = Client(mqtt_broker.port, None)
    assert forger.publish(f"{topic_prefix}/basket/b-1/recommendations", b'{"recommendations": ["x"]}',
                          retain=True) == "Success"
    assert _wait(lambda: any(b"m-12345" in p and b'"age": 34' in p for _, p, _ in spy.messages))
    display = Client(mqtt_broker.port, None)
    display.subscribe(f"{topic_prefix}/basket/b-1/recommendations")
    assert _wait(lambda: display.messages and display.messages[0][1] == b'{"recommendations": ["x"]}')
    forger.publish(f"{topic_prefix}/basket/b-1/recommendations", b"", retain=True)  # clean up the retained one
    for c in (spy, shopper, forger, display):
        c.close()


def test_finding_on_an_anonymous_broker_a_stolen_client_id_knocks_the_agent_off(mqtt_broker, topic_prefix):
    from _agent_proc import service_config

    service = AgentService(_tiny_registry(), service_config(host=mqtt_broker.host, port=mqtt_broker.port,
                                                            agent_id="victim", prefix=topic_prefix,
                                                            reconnect_min_s=0.1, reconnect_max_s=0.5))
    service.start()
    try:
        assert service.wait_connected(5)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:
            thief = Client(mqtt_broker.port, None, client_id="smartbasket-agent-victim", clean=False)
            time.sleep(0.25)
            thief.close()
        assert service.metrics.reconnects >= 3  # knocked off again and again
    finally:
        service.stop()


# --- the secure store ---------------------------------------------------------------------------
def test_no_anonymous_client_no_wrong_password_no_client_without_the_stores_certificate(store, tmp_path):
    anonymous = Client(store.local_port, None, connect=False)
    assert not anonymous.connect(2) and anonymous.connacks and "authorized" in anonymous.connacks[0][0].lower()
    wrong = Client(store.tls_port, "basket-b-1", "guessed", tls=store.tls("basket-b-1"), connect=False)
    assert not wrong.connect(2) and wrong.connacks and wrong.connacks[0][0] != "Success"
    for c in (anonymous, wrong):
        c.close()
    no_cert = Client(store.tls_port, "basket-b-1", store.passwords["basket-b-1"],
                     tls=store.tls("basket-b-1", cert=False), connect=False)
    assert _never_connects(no_cert)
    from scripts.broker_credentials import issue_certificate, make_ca

    other_ca = make_ca(tmp_path / "other-ca")  # a certificate from another CA is not the store's
    crt, key = issue_certificate(other_ca, "basket-b-1")
    (tmp_path / "c.crt").write_bytes(crt)
    (tmp_path / "c.key").write_bytes(key)
    foreign = Client(store.tls_port, "basket-b-1", store.passwords["basket-b-1"], connect=False,
                     tls=TLSSettings(ca_file=store.tls("basket-b-1").ca_file, cert_file=str(tmp_path / "c.crt"),
                                     key_file=str(tmp_path / "c.key")))
    assert _never_connects(foreign)


def test_a_basket_and_a_display_read_nothing_of_another_basket(store):
    spy_basket = user_client(store, "basket-b-2")
    spy_display = user_client(store, "display-b-2")
    for spy in (spy_basket, spy_display):
        spy.subscribe("#", store.topic("basket/+/cart"), store.topic("basket/b-1/recommendations"),
                      store.topic("basket/b-1/errors"), store.topic("agent/+/status"))
    agent_in = user_client(store, "agent-j1")
    agent_in.subscribe(store.topic("basket/+/cart"))
    display = user_client(store, "display-b-1")
    display.subscribe(store.topic("basket/b-1/recommendations"))
    shopper = user_client(store, "basket-b-1")
    assert shopper.publish(store.topic("basket/b-1/cart"), MEMBER_CART) == "Success"
    answers = user_client(store, "agent-j1-out")
    assert answers.publish(store.topic("basket/b-1/recommendations"), b'{"recommendations": ["B"]}',
                           retain=True) == "Success"
    assert _wait(lambda: len(agent_in.messages) == 1 and len(display.messages) == 1)  # the ones allowed get them
    time.sleep(0.3)
    assert spy_basket.messages == [] and spy_display.messages == []
    answers.publish(store.topic("basket/b-1/recommendations"), b"", retain=True)
    for c in (spy_basket, spy_display, agent_in, display, shopper, answers):
        c.close()


def test_forged_model_updates_and_recommendations_never_reach_subscribers(store):
    forged_update = json.dumps({"version": "evil", "url": "http://evil.example/x.tar.gz", "sha256": "0" * 64,
                                "created_at": "2099-01-01T00:00:00+00:00"}).encode()
    forged_answer = b'{"recommendations": ["EVIL"]}'

    def attack(users: tuple[str, ...]) -> None:
        for user in users:
            attacker = user_client(store, user)
            assert attacker.publish(store.topic("models/updated"), forged_update, retain=True) == "Not authorized"
            if user != "agent-j1-out":
                assert attacker.publish(store.topic("basket/b-1/recommendations"), forged_answer,
                                        retain=True) == "Not authorized", user
            attacker.close()

    # a user's second connection replaces its first (one client id per user): the identities that
    # also watch below attack first, and what they tried to retain must not be there later
    attack(("display-b-1", "agent-j1"))
    follower = user_client(store, "bridge-br")  # reads models/updated, as agents do
    follower.subscribe(store.topic("models/updated"))
    display = user_client(store, "display-b-1")
    display.subscribe(store.topic("basket/b-1/recommendations"))
    attack(("basket-b-1", "basket-b-2", "agent-j1-out", "display-b-2"))
    assert publish_once(store, "basket-b-2", store.topic("basket/b-1/cart"), MEMBER_CART) == "Not authorized"
    retrain = user_client(store, "retrain")
    assert retrain.publish(store.topic("basket/b-1/recommendations"), forged_answer) == "Not authorized"
    retrain.close()
    time.sleep(0.3)
    assert follower.messages == [] and display.messages == []
    # the retrain server may: over TLS with its certificate, and on the server's loopback listener
    message = UpdateMessage(version="20990101T000000Z-ok", url="http://127.0.0.1:9/b.tar.gz", sha256="1" * 64,
                            created_at="2099-01-01T03:00:00+09:00")
    Announcer("127.0.0.1", store.tls_port, prefix=store.prefix, username="retrain",
              password=store.passwords["retrain"], tls=store.tls("retrain")).announce(message, verify=False)
    assert _wait(lambda: len(follower.messages) == 1) and b"20990101T000000Z-ok" in follower.messages[0][1]
    Announcer("127.0.0.1", store.local_port, prefix=store.prefix, username="retrain",
              password=store.passwords["retrain"]).announce(message, verify=False)
    assert _wait(lambda: len(follower.messages) == 2)
    with pytest.raises(PublishError, match="refused"):
        Announcer("127.0.0.1", store.tls_port, prefix=store.prefix, username="basket-b-1",
                  password=store.passwords["basket-b-1"], tls=store.tls("basket-b-1"),
                  connect_timeout=3).announce(message, verify=False)
    time.sleep(0.2)
    assert len(follower.messages) == 2
    publish_once(store, "retrain", store.topic("models/updated"), b"", retain=True)
    for c in (follower, display):
        c.close()


def test_a_stolen_client_id_neither_takes_over_nor_knocks_off_the_agent(store, caplog):
    service = secure_agent(store)
    service.start()
    display = user_client(store, "display-b-1")
    display.subscribe(store.topic("basket/b-1/recommendations"))
    shopper = user_client(store, "basket-b-1")
    try:
        assert service.wait_connected(10)
        thieves = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:  # the finding: nine knock-offs in five seconds
            for cid in ("agent-j1", "smartbasket-agent-j1", "agent-j1-out", "smartbasket-agent-j1-out"):
                thief = Client(store.tls_port, "basket-b-2", store.passwords["basket-b-2"],
                               tls=store.tls("basket-b-2"), client_id=cid, clean=False)
                assert thief.connacks == [("Success", False)]  # its own (empty) session, not the agent's
                thief.subscribe(store.topic("basket/+/cart"))
                thieves += 1
                thief.close()
        assert thieves >= 20
        assert service.metrics.reconnects == 0 and service.connected
        assert not [r for r in caplog.records if "disconnected from MQTT broker" in r.getMessage()]
        shopper.publish(store.topic("basket/b-1/cart"), json.dumps({"event_id": "after", "cart": ["A"]}).encode())
        assert _wait(lambda: any(b'"after"' in p for _, p, _ in display.messages), 5)  # still serving
    finally:
        service.stop()
        for c in (display, shopper):
            c.close()
        publish_once(store, "agent-j1-out", store.topic("basket/b-1/recommendations"), b"", retain=True)


def test_the_acl_file_shipped_is_the_example_stores_and_the_configs_agree():
    users = store_users("smartbasket", agents=["jetson-01"], baskets=["b-1", "b-2"], displays=["b-1", "b-2"])
    assert (ROOT / "config" / "mosquitto.acl").read_text(encoding="utf-8") == render_acl(users, "smartbasket")

    def globals_of(path: Path) -> dict[str, str]:
        out: dict[str, str] = {}
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.split("#", 1)[0].strip()
            if line.startswith("listener"):
                break
            if line:
                key, _, value = line.partition(" ")
                out[key] = value.strip()
        return out

    plain, secure = globals_of(ROOT / "config" / "mosquitto.conf"), globals_of(SECURE_CONF)
    plain.pop("allow_anonymous", None)
    assert {k: secure.get(k) for k in plain} == plain  # persistence, queues... as the store's broker config
    assert secure["allow_anonymous"] == "false" and "password_file" in secure and "acl_file" in secure


# --- with the ACL off, the signature still protects the agents -----------------------------------
@pytest.fixture(scope="module")
def open_store() -> Iterator[Store]:
    """TLS + passwords, but no ACL (any user may publish anything) and no client-id binding."""
    yield from _make_store(acl=False, bind_ids=False)


def test_with_the_acl_off_a_forged_update_is_refused_by_the_signature_check(open_store, tmp_path):
    from _bundles import make_version, pack, serve_bundles
    from _http_attacks import CartProbe

    from retrain_server.cli import main as retrain_main
    from retrain_server.data import write_products, write_purchases
    from retrain_server.synth import make_store

    data = tmp_path / "data"
    data.mkdir()
    synth = make_store(n_products=80, n_rows=1200, n_users=10, n_families=8, seed=3)
    write_products(data / "products.csv", synth.catalog)
    write_purchases(data / "purchases.jsonl", synth.purchases)
    for keys in ("keys", "evil-keys"):
        assert retrain_main(["keygen", "--out", str(tmp_path / keys)]) == 0
    assert retrain_main(["--log-level", "WARNING", "train", "--guest-only", "--products", str(data / "products.csv"),
                         "--purchases", str(data / "purchases.jsonl"), "--out", str(tmp_path / "parameters"),
                         "--signing-key", str(tmp_path / "keys" / "signing.key")]) == 0
    s = open_store
    tls = s.tls("agent-j1")
    (tmp_path / "agent.yaml").write_text(json.dumps({  # JSON is YAML
        "broker": {"host": "127.0.0.1", "port": s.tls_port, "tls": {"enabled": True, "ca_file": tls.ca_file,
                                                                     "cert_file": tls.cert_file,
                                                                     "key_file": tls.key_file}},
        "agent_id": "j1", "prefix": s.prefix, "parameters": str(tmp_path / "parameters"),
        "public_key": str(tmp_path / "keys" / "signing.pub"), "updates": {"jitter_s": 0}}), encoding="utf-8")
    env = {**os.environ, "BASKET_MQTT_USERNAME": "agent-j1", "BASKET_MQTT_PASSWORD": s.passwords["agent-j1"],
           "PYTHONPATH": str(ROOT)}
    log = tmp_path / "agent.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(tmp_path / "agent.yaml")],
                                cwd=ROOT, stdout=logf, stderr=logf, env=env)
    bundles = tmp_path / "bundles"
    version = make_version(tmp_path / "parameters", tmp_path / "evil", tmp_path / "evil-keys" / "signing.key",
                           created_at=datetime.now(timezone.utc) + timedelta(days=1))
    bundle = pack(tmp_path / "evil", bundles / f"{version}.tar.gz")
    status = user_client(s, "display-b-1")  # with the ACL off anyone may read anything
    status.subscribe(s.topic("agent/j1/status"))
    probe = CartProbe(("127.0.0.1", s.tls_port), s.prefix, basket="b-1", username="basket-b-1",
                      password=s.passwords["basket-b-1"],
                      tls={"ca_certs": s.tls("basket-b-1").ca_file, "certfile": s.tls("basket-b-1").cert_file,
                           "keyfile": s.tls("basket-b-1").key_file})
    try:
        assert probe.wait_answer(60) < 60, log.read_text()[-3000:]
        with serve_bundles(bundles) as server:
            from agent.bundle import file_sha256

            forged = {"version": version, "url": server.url(bundle.name), "sha256": file_sha256(bundle),
                      "created_at": datetime.now(timezone.utc).isoformat()}
            attacker = user_client(s, "basket-b-2")
            assert attacker.publish(s.topic("models/updated"), json.dumps(forged).encode(), retain=True) == "Success"

            def rejected() -> dict[str, Any] | None:
                for _, payload, _ in reversed(status.messages):
                    last = json.loads(payload).get("last_update") or {}
                    if last.get("version") == version:
                        return last
                return None

            assert _wait(lambda: rejected() is not None, 20), log.read_text()[-3000:]
            assert server.requests  # it was downloaded, then refused by the signature check
        last = rejected()
        assert last is not None and last["result"] == "rejected" and "signature" in last["reason"]
        assert probe.wait_answer(10) < 10  # still serving with the models it had
        assert proc.poll() is None
        attacker.publish(s.topic("models/updated"), b"", retain=True)
        attacker.close()
    finally:
        probe.stop()
        status.close()
        proc.terminate()
        proc.wait(15)

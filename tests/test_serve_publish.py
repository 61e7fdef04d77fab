"""The bundle server, the reachability check, the MQTT announcement, the schedule and pruning, for real.

A real uvicorn serves a real tar.gz on a loopback port; announcements go to the
session's Mosquitto and are read back by a paho client that connects afterwards.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import queue
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import HttpConfig
from agent.topics import Topics
from retrain_server.errors import ConfigError, GateRefused, PublishError
from retrain_server.publish import Announcer, UpdateMessage, bundle_url, check_reachable, publish_update
from retrain_server.serve import BundleServer, Scheduler, create_app, next_run, prune_bundles, ttl_cached
from scripts.brokers import Broker, MosquittoBroker, free_port

VERSION = "20261124T030000Z-9f1c2a"
KST = ZoneInfo("Asia/Seoul")
PROTOCOLS = {"3.1.1": paho.MQTTv311, "5": paho.MQTTv5}


def make_bundle(directory: Path, version: str = VERSION, payload: bytes = b"") -> Path:
    """A real gzip'd tar with a manifest and some bytes, as the nightly job would write."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{version}.tar.gz"
    files = {"manifest.json": json.dumps({"version": version}).encode(),
             "guest/table.npy": payload or os.urandom(50_000)}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{version}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class Served:
    def __init__(self, root: Path, bundle: Path, server: BundleServer, health: dict[str, Any]) -> None:
        self.root, self.bundle, self.server, self.health = root, bundle, server, health
        self.data = bundle.read_bytes()
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    @property
    def url(self) -> str:
        return bundle_url(self.server.url, VERSION)

    def raw(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        """A request whose path goes out byte for byte (urllib would not send every oddity)."""
        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=5)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    root = tmp_path / "bundles"
    bundle = make_bundle(root)
    (tmp_path / "secret.tar.gz").write_bytes(b"outside the bundle dir")
    health: dict[str, Any] = {"status": "ok", "published": VERSION, "last_run": {"result": "published"}}
    server = BundleServer(create_app(root, lambda: dict(health)), "127.0.0.1", free_port())
    server.start()
    try:
        yield Served(root, bundle, server, health)
    finally:
        server.stop()


# -- bundle server ----------------------------------------------------------------------------
def test_get_serves_the_bundle_with_its_length(served: Served) -> None:
    with urllib.request.urlopen(served.url, timeout=5) as resp:
        body = resp.read()
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/gzip"
        assert int(resp.headers["Content-Length"]) == len(served.data)
    assert body == served.data
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        assert f"{VERSION}/manifest.json" in tar.getnames()


def test_head_gives_the_length_without_the_body(served: Served) -> None:
    status, headers, body = served.raw("HEAD", f"/bundles/{VERSION}.tar.gz")
    assert status == 200
    assert int(headers["content-length"]) == len(served.data)
    assert headers["content-type"] == "application/gzip"
    assert body == b""


@pytest.mark.parametrize("path", [
    "/bundles/missing.tar.gz",
    "/bundles/../secret.tar.gz",
    "/bundles/..%2Fsecret.tar.gz",
    "/bundles/%2E%2E%2Fsecret.tar.gz",
    "/bundles/.hidden.tar.gz",
    f"/bundles/{VERSION}.tar",
    f"/bundles/{VERSION}.tar.gz.tmp",
    f"/bundles/{VERSION}",
    "/bundles/" + "a" * 200 + ".tar.gz",
    "/bundles/a%00.tar.gz",
    "/bundles/",
    "/docs",
    "/redoc",
    "/openapi.json",
])
def test_bad_names_and_escapes_are_404(served: Served, path: str) -> None:
    (served.root / ".hidden.tar.gz").write_bytes(b"x")
    (served.root / f"{VERSION}.tar.gz.tmp").write_bytes(b"x")
    for method in ("GET", "HEAD"):
        status, _headers, body = served.raw(method, path)
        assert status == 404, (method, path)
        assert b"outside" not in body


def test_a_symlink_out_of_the_directory_is_404(served: Served) -> None:
    (served.root / "evil.tar.gz").symlink_to(served.root.parent / "secret.tar.gz")
    assert served.raw("GET", "/bundles/evil.tar.gz")[0] == 404
    # A symlink to a bundle inside the directory is still a bundle.
    (served.root / "latest.tar.gz").symlink_to(served.bundle)
    status, _h, body = served.raw("GET", "/bundles/latest.tar.gz")
    assert status == 200 and body == served.data


def test_the_bundle_port_has_the_bridge_s_limits(tmp_path: Path) -> None:
    from _http_attacks import closed_within

    """Every basket reaches this port: silent connections are closed at the head deadline and one address
    cannot hold more than its share (plain uvicorn kept 30 silent connections open indefinitely)."""
    bundle = make_bundle(tmp_path)
    server = BundleServer(create_app(tmp_path, lambda: {"status": "ok"}), "127.0.0.1", 0,
                          HttpConfig(max_connections=8, max_connections_per_client=3, header_timeout_s=0.5))
    server.start()
    try:
        silent = socket.create_connection(("127.0.0.1", server.port))
        t0 = time.monotonic()
        closed, _ = closed_within(silent, 3)
        assert closed and time.monotonic() - t0 < 2
        silent.close()
        held = []
        for _ in range(3):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", server.port))
            held.append(s)
        time.sleep(0.2)
        fourth = socket.socket()
        fourth.bind(("127.0.0.2", 0))
        fourth.connect(("127.0.0.1", server.port))
        closed, data = closed_within(fourth, 2)
        assert closed and data.startswith(b"HTTP/1.1 503 "), data
        fourth.close()
        with urllib.request.urlopen(f"{server.url}/bundles/{bundle.name}", timeout=5) as resp:
            assert resp.read() == bundle.read_bytes()  # another address still gets its bundle
        for s in held:
            s.close()
    finally:
        server.stop()


def test_ttl_cached_asks_once_per_interval_and_never_caches_a_failure() -> None:
    now = [0.0]
    calls: list[float] = []
    failing = [False]

    def health() -> dict[str, Any]:
        calls.append(now[0])
        if failing[0]:
            raise RuntimeError("database down")
        time.sleep(0.05)
        return {"n": len(calls)}

    cached = ttl_cached(health, 1.0, clock=lambda: now[0])
    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda: results.append(cached())) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [0.0] and results == [{"n": 1}] * 20  # twenty at once: one database call
    now[0] = 0.9
    assert cached() == {"n": 1} and len(calls) == 1
    now[0] = 1.0
    failing[0] = True
    with pytest.raises(RuntimeError):
        cached()
    failing[0] = False
    assert cached() == {"n": 3} and calls == [0.0, 1.0, 1.0]


def test_health_is_200_when_ok_and_503_otherwise(served: Served) -> None:
    status, headers, body = served.raw("GET", "/health")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"status": "ok", "published": VERSION, "last_run": {"result": "published"}}
    assert served.raw("HEAD", "/health")[0] == 200
    served.health.update(status="degraded", last_refusal={"version": "v2", "reason": "member_hr@10 fell",
                                                          "at": datetime(2026, 11, 24, 3, 4, tzinfo=KST)})
    status, _h, body = served.raw("GET", "/health")
    doc = json.loads(body)
    assert status == 503 and doc["status"] == "degraded"
    assert doc["last_refusal"]["at"] == "2026-11-24T03:04:00+09:00"  # datetimes are encoded
    assert served.raw("HEAD", "/health")[0] == 503


def test_a_failing_health_hook_is_503(tmp_path: Path) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("database gone")

    server = BundleServer(create_app(tmp_path, broken), "127.0.0.1", 0)
    server.start()
    try:
        assert server.port != 0 and server.url == f"http://127.0.0.1:{server.port}"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url + "/health", timeout=5)
        assert err.value.code == 503
        assert json.loads(err.value.read())["status"] == "error"
    finally:
        server.stop()


def test_a_port_in_use_is_a_publish_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = BundleServer(create_app(tmp_path, lambda: {"status": "ok"}), "127.0.0.1", busy.getsockname()[1])
        t0 = time.monotonic()
        with pytest.raises(PublishError, match="could not listen"):
            server.start(timeout=5)
        assert time.monotonic() - t0 < 5
        server.stop()


# -- check_reachable ---------------------------------------------------------------------------
def test_check_reachable_accepts_the_served_bundle(served: Served) -> None:
    check_reachable(served.url, size=len(served.data), sha256=served.sha256)
    check_reachable(served.url, size=len(served.data))


def test_check_reachable_refuses_404(served: Served) -> None:
    with pytest.raises(PublishError, match="HTTP 404"):
        check_reachable(bundle_url(served.server.url, "nope"), size=len(served.data))


@pytest.mark.parametrize("delta", [-1, 1])
def test_check_reachable_refuses_a_wrong_size(served: Served, delta: int) -> None:
    with pytest.raises(PublishError, match="bytes, expected"):
        check_reachable(served.url, size=len(served.data) + delta)


def test_check_reachable_refuses_a_wrong_sha256(served: Served) -> None:
    with pytest.raises(PublishError, match="sha256"):
        check_reachable(served.url, size=len(served.data), sha256="0" * 64)


def test_check_reachable_refuses_a_closed_port() -> None:
    t0 = time.monotonic()
    with pytest.raises(PublishError, match="unreachable") as err:
        check_reachable(f"http://127.0.0.1:{free_port()}/bundles/{VERSION}.tar.gz", size=10, timeout=2)
    assert "\n" not in str(err.value)
    assert time.monotonic() - t0 < 2


def test_check_reachable_does_not_show_url_credentials() -> None:
    with pytest.raises(PublishError) as err:
        check_reachable(f"http://ops:hunter2@127.0.0.1:{free_port()}/bundles/x.tar.gz", size=1, timeout=2)
    assert "hunter2" not in str(err.value)


# -- the update message ------------------------------------------------------------------------
def test_update_message_has_exactly_the_contract_fields(served: Served) -> None:
    created = datetime(2026, 11, 24, 3, 4, 10, tzinfo=KST)
    msg = UpdateMessage.for_bundle(served.bundle, "http://retrain-host:8700/",
                                   {"guest_hr@10": 0.091, "member_hr@10": float("nan")}, created)
    assert json.loads(replace(msg, metrics={"timings": {"train": float("inf")}}).to_json())["metrics"] == {
        "timings": {"train": None}}
    doc = json.loads(msg.to_json())
    assert doc == {"version": VERSION, "url": f"http://retrain-host:8700/bundles/{VERSION}.tar.gz",
                   "sha256": served.sha256, "created_at": "2026-11-24T03:04:10+09:00",
                   "metrics": {"guest_hr@10": 0.091, "member_hr@10": None}, "bytes": len(served.data)}
    assert UpdateMessage.from_json(msg.to_json()) == replace(msg, metrics={"guest_hr@10": 0.091,
                                                                           "member_hr@10": None})
    assert "bytes" not in json.loads(replace(msg, size=None).to_json())


@pytest.mark.parametrize("change", [{"version": "../x"}, {"version": ""}, {"sha256": "ABC"},
                                    {"url": "ftp://x/y"}, {"created_at": "2026-11-24T03:04:10"},
                                    {"created_at": "yesterday"}, {"size": -1}, {"metrics": {1: 2}}])
def test_update_message_refuses_bad_fields(change: dict[str, Any]) -> None:
    base = dict(version=VERSION, url="http://h/bundles/x.tar.gz", sha256="a" * 64,
                created_at="2026-11-24T03:04:10+09:00", metrics={})
    with pytest.raises(ValueError):
        UpdateMessage(**{**base, **change})


def test_bundle_url() -> None:
    assert bundle_url("http://h:8700", "v1") == "http://h:8700/bundles/v1.tar.gz"
    assert bundle_url("https://h/retrain//", "v1") == "https://h/retrain/bundles/v1.tar.gz"
    with pytest.raises(ConfigError):
        bundle_url("retrain-host:8700", "v1")
    with pytest.raises(ValueError):
        bundle_url("http://h", "a/b")


# -- announcing on MQTT -------------------------------------------------------------------------
def retained(broker: Broker, topic: str, protocol: str, wait: float = 3.0) -> paho.MQTTMessage | None:
    """Connect a fresh subscriber (after the publish) and return the retained message, if any."""
    got: queue.Queue[paho.MQTTMessage] = queue.Queue()
    subscribed = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}",
                         protocol=PROTOCOLS[protocol])
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    client.on_message = lambda c, u, m: got.put(m)
    client.connect(broker.host, broker.port, 30)
    client.loop_start()
    try:
        assert subscribed.wait(5), "probe could not subscribe"
        try:
            return got.get(timeout=wait)
        except queue.Empty:
            return None
    finally:
        client.disconnect()
        client.loop_stop()


def clear_retained(broker: Broker, topic: str) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"clear-{uuid.uuid4().hex[:8]}")
    client.connect(broker.host, broker.port, 30)
    client.loop_start()
    try:
        client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_announcement_is_retained_qos1_for_late_subscribers(served: Served, mqtt_broker: Broker,
                                                            topic_prefix: str, protocol: str) -> None:
    msg = UpdateMessage.for_bundle(served.bundle, served.server.url, {"guest_hr@10": 0.091})
    announcer = Announcer(mqtt_broker.host, mqtt_broker.port, prefix=topic_prefix, protocol=protocol)
    t0 = time.monotonic()
    announcer.announce(msg)  # checks the URL first, then waits for the PUBACK
    assert time.monotonic() - t0 < 5
    topic = Topics(topic_prefix).models_updated
    try:
        got = retained(mqtt_broker, topic, protocol)
        assert got is not None, "no retained update message"
        assert got.retain and got.qos == 1 and got.topic == topic
        assert UpdateMessage.from_json(got.payload) == msg
        assert json.loads(got.payload)["bytes"] == len(served.data)
    finally:
        clear_retained(mqtt_broker, topic)


def test_nothing_is_announced_while_the_bundle_is_unreachable(served: Served, mqtt_broker: Broker,
                                                              topic_prefix: str) -> None:
    msg = UpdateMessage.for_bundle(served.bundle, served.server.url)
    served.bundle.rename(served.bundle.with_suffix(".moved"))
    with pytest.raises(PublishError, match="HTTP 404"):
        publish_update(msg, mqtt_broker.host, mqtt_broker.port, prefix=topic_prefix)
    assert retained(mqtt_broker, Topics(topic_prefix).models_updated, "5", wait=0.5) is None


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_closed_broker_port_fails_fast(protocol: str, topic_prefix: str) -> None:
    msg = UpdateMessage(VERSION, f"http://h/bundles/{VERSION}.tar.gz", "a" * 64, "2026-11-24T03:04:10+09:00")
    announcer = Announcer("127.0.0.1", free_port(), prefix=topic_prefix, protocol=protocol, connect_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(PublishError, match="unreachable"):
        announcer.announce(msg, verify=False)
    assert time.monotonic() - t0 < 2


def test_the_password_is_never_logged(served: Served, mqtt_broker: Broker, topic_prefix: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = f"pw-{uuid.uuid4().hex}"
    msg = UpdateMessage.for_bundle(served.bundle, served.server.url)
    announcer = Announcer(mqtt_broker.host, mqtt_broker.port, prefix=topic_prefix, username="retrain",
                          password=secret)
    announcer.announce(msg)
    clear_retained(mqtt_broker, Topics(topic_prefix).models_updated)
    assert "announced model" in caplog.text
    assert secret not in caplog.text
    assert secret not in repr(announcer)


def test_a_broker_refusing_the_publish_is_a_publish_error(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic read #\n", encoding="utf-8")  # anonymous clients may read, not write
    os.chmod(acl, 0o644)
    broker = MosquittoBroker(tmp_path / "mosquitto", extra_config=(f"acl_file {acl}",))
    broker.start()
    try:
        msg = UpdateMessage(VERSION, f"http://h/bundles/{VERSION}.tar.gz", "a" * 64, "2026-11-24T03:04:10+09:00")
        with pytest.raises(PublishError, match="refused"):
            Announcer(broker.host, broker.port, protocol="5", ack_timeout=3).announce(msg, verify=False)
    finally:
        broker.stop()


def test_bad_announcer_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        Announcer("h", prefix="a/#")
    with pytest.raises(ConfigError):
        Announcer("h", protocol="4")
    with pytest.raises(ConfigError):
        Announcer("h", 0)


# -- next_run -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("now", "at", "tz", "expected"), [
    (datetime(2026, 11, 24, 2, 59, tzinfo=KST), "03:00", "Asia/Seoul", datetime(2026, 11, 24, 3, 0, tzinfo=KST)),
    (datetime(2026, 11, 24, 3, 0, tzinfo=KST), "03:00", "Asia/Seoul", datetime(2026, 11, 25, 3, 0, tzinfo=KST)),
    (datetime(2026, 11, 24, 3, 0, 0, 1, tzinfo=KST), "03:00", "Asia/Seoul",
     datetime(2026, 11, 25, 3, 0, tzinfo=KST)),
    (datetime(2026, 11, 24, 23, 59, tzinfo=KST), "03:00", "Asia/Seoul", datetime(2026, 11, 25, 3, 0, tzinfo=KST)),
    # given in UTC: 18:30Z is 03:30 KST the next day, so the run is the day after
    (datetime(2026, 11, 23, 18, 30, tzinfo=timezone.utc), "03:00", "Asia/Seoul",
     datetime(2026, 11, 25, 3, 0, tzinfo=KST)),
    (datetime(2026, 11, 23, 17, 59, tzinfo=timezone.utc), "03:00", "Asia/Seoul",
     datetime(2026, 11, 24, 3, 0, tzinfo=KST)),
    (datetime(2026, 12, 31, 22, 0, tzinfo=KST), "21:15", "Asia/Seoul", datetime(2027, 1, 1, 21, 15, tzinfo=KST)),
    (datetime(2026, 11, 24, 12, 0, tzinfo=KST), "06:45", "America/New_York",
     datetime(2026, 11, 24, 6, 45, tzinfo=ZoneInfo("America/New_York"))),
])
def test_next_run(now: datetime, at: str, tz: str, expected: datetime) -> None:
    got = next_run(now, at, tz)
    assert got == expected and got > now
    assert got.tzinfo == ZoneInfo(tz)


def test_next_run_across_dst_changes() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    utc = timezone.utc
    # Spring forward (2026-03-29): 02:30 does not exist; the run is once, just after the gap.
    got = next_run(datetime(2026, 3, 29, 0, 0, tzinfo=berlin), "02:30", "Europe/Berlin")
    assert got.astimezone(utc) == datetime(2026, 3, 29, 1, 30, tzinfo=utc)
    after = next_run(got, "02:30", "Europe/Berlin")
    assert after.astimezone(utc) == datetime(2026, 3, 30, 0, 30, tzinfo=utc)
    # Fall back (2026-10-25): 02:30 happens twice; the run is once, at the first.
    first = next_run(datetime(2026, 10, 25, 0, 0, tzinfo=berlin), "02:30", "Europe/Berlin")
    assert first.astimezone(utc) == datetime(2026, 10, 25, 0, 30, tzinfo=utc)
    second = next_run(first, "02:30", "Europe/Berlin")
    assert second.astimezone(utc) == datetime(2026, 10, 26, 1, 30, tzinfo=utc)
    # 03:00 on both change days is a plain 24 h (or 23/25 h) step.
    assert next_run(datetime(2026, 3, 28, 3, 0, tzinfo=berlin), "03:00", "Europe/Berlin").astimezone(utc) == \
        datetime(2026, 3, 29, 1, 0, tzinfo=utc)


@pytest.mark.parametrize("at", ["3:00", "24:00", "12:60", "noon", "", "03:00:00"])
def test_next_run_refuses_bad_times(at: str) -> None:
    with pytest.raises(ConfigError):
        next_run(datetime.now(timezone.utc), at)


def test_next_run_refuses_bad_zones_and_naive_times() -> None:
    with pytest.raises(ConfigError):
        next_run(datetime.now(timezone.utc), "03:00", "Mars/Olympus")
    with pytest.raises(ValueError):
        next_run(datetime(2026, 11, 24, 2, 0), "03:00")


# -- Scheduler ----------------------------------------------------------------------------------
class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now
        self.lock = threading.Lock()

    def __call__(self) -> datetime:
        with self.lock:
            return self.now

    def set(self, now: datetime) -> None:
        with self.lock:
            self.now = now


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_scheduler_runs_at_the_time_of_day() -> None:
    clock = FakeClock(datetime(2026, 11, 24, 2, 59, 59, tzinfo=KST))
    runs: list[datetime] = []
    sched = Scheduler(lambda: runs.append(clock()), "03:00", "Asia/Seoul", clock=clock, poll_s=0.01)
    sched.start()
    try:
        assert sched.next_run_at == datetime(2026, 11, 24, 3, 0, tzinfo=KST)
        time.sleep(0.1)
        assert runs == []
        clock.set(datetime(2026, 11, 24, 3, 0, 0, 5000, tzinfo=KST))
        assert wait_until(lambda: sched.runs == 1)
        assert runs == [datetime(2026, 11, 24, 3, 0, 0, 5000, tzinfo=KST)]
        assert wait_until(lambda: sched.next_run_at == datetime(2026, 11, 25, 3, 0, tzinfo=KST))
        time.sleep(0.1)
        assert sched.runs == 1  # once per day, not once per poll
        clock.set(datetime(2026, 11, 25, 3, 0, tzinfo=KST))
        assert wait_until(lambda: sched.runs == 2)
    finally:
        assert sched.stop()


def test_scheduler_survives_failing_jobs(caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[BaseException | None] = [GateRefused("member_hr@10 fell 0.15 -> 0.11"),
                                            RuntimeError("a bug"), None]
    done: list[str] = []

    def job() -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        done.append("ok")

    sched = Scheduler(job, "03:00", "Asia/Seoul", poll_s=60)
    sched.start()
    try:
        with caplog.at_level(logging.INFO, logger="retrain_server.serve"):
            assert sched.run_now(wait=True, timeout=5)
            assert sched.last_error == "GateRefused: member_hr@10 fell 0.15 -> 0.11"
            assert sched.run_now(wait=True, timeout=5)
            assert sched.last_error == "RuntimeError: a bug"
            assert sched.run_now(wait=True, timeout=5)
            assert sched.last_error is None and done == ["ok"] and sched.runs == 3
        failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(failures) == 2
        assert failures[0].exc_info is None and "GateRefused" in failures[0].getMessage()
        assert failures[1].exc_info is not None  # a bug keeps its traceback
    finally:
        assert sched.stop()


def test_scheduler_runs_never_overlap() -> None:
    active = 0
    peak = 0
    runs = 0
    lock = threading.Lock()

    def job() -> None:
        nonlocal active, peak, runs
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.3)
        with lock:
            active -= 1
            runs += 1

    clock = FakeClock(datetime(2026, 11, 24, 2, 59, 59, tzinfo=KST))
    sched = Scheduler(job, "03:00", "Asia/Seoul", clock=clock, poll_s=0.01)
    sched.start()
    try:
        sched.run_now()
        assert wait_until(lambda: sched.running)
        # While it runs: the scheduled time arrives and eight operators ask for a run at once.
        clock.set(datetime(2026, 11, 24, 3, 0, tzinfo=KST))
        barrier = threading.Barrier(8)

        def operator() -> None:
            barrier.wait(5)
            sched.run_now(wait=True, timeout=5)

        callers = [threading.Thread(target=operator) for _ in range(8)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(6)
        assert wait_until(lambda: not sched.running and sched.runs == runs)
        assert peak == 1
        assert 2 <= runs <= 3  # the first, then one merged run for everything asked meanwhile (+ maybe 03:00)
    finally:
        assert sched.stop()


def test_scheduler_stop_is_prompt() -> None:
    sched = Scheduler(lambda: None, "03:00", "Asia/Seoul")  # real clock, 30 s poll slices
    sched.start()
    t0 = time.monotonic()
    assert sched.stop(timeout=5)
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(RuntimeError):
        sched.run_now()


def test_scheduler_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError):
        Scheduler(lambda: None, "25:00", "Asia/Seoul")
    with pytest.raises(ConfigError):
        Scheduler(lambda: None, "03:00", "Nowhere/Special")


# -- prune_bundles -------------------------------------------------------------------------------
def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    now = time.time()
    names = {f"v{i}.tar.gz": now - 1000 * (10 - i) for i in range(1, 6)}  # v5 newest
    names["v0.tar.gz"] = names["v1.tar.gz"]  # same mtime as v1: the name decides (v0 older)
    for name, mtime in names.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (mtime, mtime))
    old, fresh = now - 7200, now - 60
    for name, mtime in {"v6.tar.gz.tmp": old, ".v7.tar.gz.partial": old, "v8.tar.gz.tmp": fresh,
                        "notes.txt": old, ".hidden.tar.gz": old, "v9.tar": old}.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (mtime, mtime))
    stage = tmp_path / "v10.tmp"
    stage.mkdir()
    (stage / "manifest.json").write_text("{}")
    os.utime(stage, (old, old))
    (tmp_path / "link.tar.gz").symlink_to(tmp_path / "notes.txt")

    removed = prune_bundles(tmp_path, keep=2, protect={"v1"}, now=now)

    assert sorted(p.name for p in removed) == sorted(["v0.tar.gz", "v2.tar.gz", "v3.tar.gz", "v6.tar.gz.tmp",
                                                     ".v7.tar.gz.partial", "v10.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["v1.tar.gz", "v4.tar.gz", "v5.tar.gz", "v8.tar.gz.tmp", "notes.txt", ".hidden.tar.gz", "v9.tar",
         "link.tar.gz"])
    assert prune_bundles(tmp_path, keep=2, protect={"v1.tar.gz"}, now=now) == []


def test_prune_removes_a_killed_packers_staging_once_it_is_stale(tmp_path: Path) -> None:
    old, fresh = tmp_path / ".pack-old1", tmp_path / ".pack-new1"
    for d in (old, fresh):
        (d / "bundle").mkdir(parents=True)
        (d / "bundle" / "manifest.json").write_text("{}")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert prune_bundles(tmp_path, keep=1, protect=()) == [old]  # the fresh one may be a packing in progress
    assert fresh.is_dir() and not old.exists()


def test_prune_edge_cases(tmp_path: Path) -> None:
    assert prune_bundles(tmp_path / "missing", keep=1, protect=()) == []
    (tmp_path / "v1.tar.gz").write_bytes(b"x")
    assert prune_bundles(tmp_path, keep=0, protect=["v1"]) == []
    assert [p.name for p in prune_bundles(tmp_path, keep=0, protect=[])] == ["v1.tar.gz"]
    with pytest.raises(ConfigError):
        prune_bundles(tmp_path, keep=-1, protect=())


"""Model updates end to end: real Mosquitto, a real HTTP server, real signed bundles (contract §5).

An agent serving version V0 is told on ``PREFIX/models/updated`` about a new
bundle; it must download, verify, load beside, smoke-test and swap — or keep
serving V0 and say ``rejected`` with the reason in its retained status.
"""

from __future__ import annotations

import itertools
import json
import queue
import random
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from _agent_proc import service_config
from _bundles import (
    BundleServer,
    flip_byte,
    make_version,
    pack,
    rewrite_array,
    serve_bundles,
    tar_member,
    update_message,
)
from paho.mqtt.enums import CallbackAPIVersion

from agent import layout
from agent.bundle import load_public_key
from agent.config import parse_config
from agent.errors import BundleError, ConfigError
from agent.registry import ModelRegistry, ModelSnapshot, load_snapshot
from agent.service import AgentService
from agent.store import UnsafeBundle, VersionStore, safe_unpack
from agent.updater import InvalidUpdate, Updater, parse_update
from scripts.brokers import Broker, free_port

ROOT = Path(__file__).resolve().parents[1]


# --- versions and bundles ------------------------------------------------------------------------
@dataclass
class Built:
    version: str
    dir: Path
    bundle: Path


class Versions:
    """Makes signed versions of the session's trained parameters, each newer than the last."""

    def __init__(self, trained: Any, root: Path) -> None:
        self.trained = trained
        self.root = root
        self.bundles = root / "bundles"
        self.bundles.mkdir(parents=True)
        self._t0 = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=1)
        self._n = itertools.count()
        self.base = self.make(bundle=False)  # V0: what every agent starts with
        self.good = self.make()  # V1: a valid update

    def make(self, mutate: Callable[[Path], None] | None = None, *, key: Path | None = None,
             bundle: bool = True, tamper: Callable[[Path], None] | None = None) -> Built:
        """A new signed version (``mutate`` before signing, ``tamper`` after) and its .tar.gz."""
        n = next(self._n)
        d = self.root / f"v{n}"
        version = make_version(self.trained.parameters, d, key or self.trained.signing_key,
                               created_at=self._t0 + timedelta(hours=n), mutate=mutate)
        if tamper is not None:
            tamper(d)
        out = pack(d, self.bundles / f"{version}.tar.gz") if bundle else self.bundles / "none"
        return Built(version, d, out)

    def custom_bundle(self, name: str, root: Path | None, **kw: Any) -> Path:
        return pack(root, self.bundles / name, **kw)


@pytest.fixture(scope="session")
def versions(trained: Any, tmp_path_factory: pytest.TempPathFactory) -> Versions:
    return Versions(trained, tmp_path_factory.mktemp("versions"))


@pytest.fixture(scope="session")
def server(versions: Versions) -> Iterator[BundleServer]:
    with serve_bundles(versions.bundles) as s:
        yield s


def loader_for(public_key: Path) -> Callable[[Path], ModelSnapshot]:
    key = load_public_key(public_key)
    return lambda root: load_snapshot(root, key)


def serving_base(params: Path, versions: Versions, **store_kw: Any) -> tuple[VersionStore, Any, ModelRegistry]:
    """``params`` holding the base version V0, its store, a loader for the trained key, and V0 serving."""
    shutil.copytree(versions.base.dir, params)
    store = VersionStore(params, **store_kw)
    loader = loader_for(versions.trained.public_key)
    return store, loader, ModelRegistry(store.load_newest(loader).snapshot)


def leftovers(params: Path) -> list[str]:
    d = params / "versions"
    return sorted(p.name for p in d.iterdir() if p.name.startswith((".incoming-", ".download-"))) \
        if d.is_dir() else []


# --- an MQTT probe: ops console + sensor + display ---------------------------------------------------
class Probe:
    def __init__(self, broker: Broker, prefix: str) -> None:
        self.prefix = prefix
        self.status: queue.Queue[dict[str, Any]] = queue.Queue()
        self.recs: queue.Queue[dict[str, Any]] = queue.Queue()
        self.errors: queue.Queue[dict[str, Any]] = queue.Queue()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(200)
        self.client.on_socket_open = lambda c, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(f"{prefix}/agent/+/status", 1), (f"{prefix}/basket/+/recommendations", 1),
             (f"{prefix}/basket/+/errors", 1)])
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(5), "probe could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        if not msg.payload:
            return
        body = json.loads(msg.payload)
        kind = msg.topic.rsplit("/", 1)[1]
        {"status": self.status, "recommendations": self.recs, "errors": self.errors}[kind].put(body)

    def publish_update(self, message: dict[str, Any] | bytes) -> None:
        payload = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.client.publish(f"{self.prefix}/models/updated", payload, qos=1, retain=True).wait_for_publish(5)

    def send(self, basket: str, event: dict[str, Any]) -> None:
        self.client.publish(f"{self.prefix}/basket/{basket}/cart", json.dumps(event), qos=1)

    def wait_status(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                body = self.status.get(timeout=max(0.01, left))
            except queue.Empty:
                raise AssertionError(f"no matching status within {timeout}s") from None
            if pred(body):
                return body

    def wait_update(self, version: str | None, timeout: float = 15.0) -> dict[str, Any]:
        """The first status whose last_update is about ``version``."""
        return self.wait_status(lambda b: (b.get("last_update") or {}).get("version", "-") == version, timeout)

    def ask(self, basket: str, cart: list[str], timeout: float = 5.0, **extra: Any) -> dict[str, Any]:
        event_id = uuid.uuid4().hex[:8]
        self.send(basket, {"event_id": event_id, "cart": cart, **extra})
        deadline = time.monotonic() + timeout
        while True:
            rec = self.recs.get(timeout=max(0.01, deadline - time.monotonic()))
            if rec.get("event_id") == event_id:
                return rec

    def close(self) -> None:
        self.client.publish(f"{self.prefix}/models/updated", b"", qos=1, retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()


class InProcessAgent:
    """AgentService + Updater on a copy of V0, with a probe on the same prefix."""

    def __init__(self, broker: Broker, prefix: str, workdir: Path, versions: Versions, *,
                 start: bool = True, **updater_kw: Any) -> None:
        self.params = workdir / "parameters"
        shutil.copytree(versions.base.dir, self.params)
        self.loader = loader_for(versions.trained.public_key)
        self.store = VersionStore(self.params, keep_versions=updater_kw.pop("keep_versions", 3))
        self.registry = ModelRegistry(self.store.load_newest(self.loader).snapshot)
        self.agent_id = f"agent-{uuid.uuid4().hex[:6]}"
        self.service = AgentService(self.registry, service_config(
            host=broker.host, port=broker.port, prefix=prefix, agent_id=self.agent_id,
            reconnect_min_s=0.1, reconnect_max_s=0.5))
        updater_kw.setdefault("jitter_s", 0.0)
        self.updater = Updater(self.store, self.registry, self.loader, self.service.report_update, **updater_kw)
        self.service.attach_updater(self.updater)
        self.probe = Probe(broker, prefix)
        self.cart = versions.trained.family_items(3)[:2]
        if start:
            self.start()

    def start(self) -> dict[str, Any]:
        self.service.start()
        assert self.service.wait_connected(5)
        return self.probe.wait_status(lambda b: b["agent_id"] == self.agent_id and b["state"] == "online")

    def stop(self) -> None:
        self.service.stop()
        self.probe.close()


@pytest.fixture
def make_agent(mqtt_broker: Broker, topic_prefix: str, tmp_path: Path,
               versions: Versions) -> Iterator[Callable[..., InProcessAgent]]:
    made: list[InProcessAgent] = []

    def make(**kw: Any) -> InProcessAgent:
        agent = InProcessAgent(mqtt_broker, topic_prefix, tmp_path / f"a{len(made)}", versions, **kw)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop()


# --- applying ----------------------------------------------------------------------------------
def test_agent_applies_an_announced_bundle_once(make_agent: Any, versions: Versions, server: BundleServer,
                                               mqtt_broker: Broker) -> None:
    agent = make_agent()
    v0, v1 = versions.base.version, versions.good.version
    assert agent.probe.ask("b1", agent.cart)["model_version"] == v0
    msg = update_message(v1, server.url(versions.good.bundle.name), versions.good.bundle)
    t0 = time.perf_counter()
    agent.probe.publish_update(msg)
    status = agent.probe.wait_update(v1)
    elapsed = time.perf_counter() - t0
    assert status["last_update"]["result"] == "applied" and status["last_update"]["reason"] is None
    assert status["models"] == {"guest": v1, "member": v1}
    print(f"\nmessage-to-applied (status seen by the probe): {elapsed * 1000:.0f} ms; "
          f"updater timings: { {k: round(v * 1000, 1) for k, v in agent.updater.last_timings.items()} } ms")
    assert elapsed < 5.0
    rec = agent.probe.ask("b1", agent.cart)
    assert rec["model_version"] == v1
    member = agent.probe.ask("m1", agent.cart, user={"user_id": versions.trained.member_id})
    assert member["model"] == "member" and member["model_version"] == v1
    assert (agent.params / "versions" / v1 / "manifest.json").is_file()
    assert leftovers(agent.params) == []

    # the same message again (re-published, or re-delivered on reconnect): not applied again
    at = status["last_update"]["at"]
    submitted: list[bytes] = []
    submit = agent.updater.submit
    agent.updater.submit = lambda payload, received=None: (submitted.append(payload), submit(payload, received))
    agent.probe.publish_update(msg)
    # another client takes the agent's client id over: the agent reconnects, and the broker
    # delivers the retained update message once more
    thief = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"smartbasket-agent-{agent.agent_id}",
                        protocol=paho.MQTTv5)
    thief.connect(mqtt_broker.host, mqtt_broker.port)
    thief.disconnect()
    deadline = time.monotonic() + 5
    while len(submitted) < 2:
        assert time.monotonic() < deadline, f"update message seen {len(submitted)} times, expected 2"
        time.sleep(0.05)
    assert agent.updater.wait_idle(5)
    assert server.requests[f"/bundles/{versions.good.bundle.name}"] == 1
    assert agent.service.last_update["at"] == at
    assert agent.registry.current.version == v1


def test_retained_update_is_applied_on_connect(make_agent: Any, versions: Versions, server: BundleServer) -> None:
    agent = make_agent(start=False)
    b = versions.make()
    agent.probe.publish_update(update_message(b.version, server.url(b.bundle.name), b.bundle))
    agent.start()
    status = agent.probe.wait_update(b.version)
    assert status["last_update"]["result"] == "applied" and status["models"]["guest"] == b.version
    assert agent.probe.ask("b", agent.cart)["model_version"] == b.version


def test_old_versions_are_pruned_but_a_rollback_loads_from_disk(
        tmp_path: Path, versions: Versions, server: BundleServer) -> None:
    params = tmp_path / "parameters"
    store, loader, registry = serving_base(params, versions, keep_versions=2)
    reports: list[tuple[Any, str, Any]] = []
    updater = Updater(store, registry, loader, lambda *r: reports.append(r), jitter_s=0)
    updater.start()
    try:
        built = [versions.make() for _ in range(3)]
        for b in built:
            updater.submit(json.dumps(update_message(b.version, server.url(b.bundle.name), b.bundle)).encode())
            assert updater.wait_idle(15)
        assert [r[1] for r in reports] == ["applied"] * 3
        kept = sorted(p.name for p in (params / "versions").iterdir())
        assert kept == sorted(b.version for b in built[1:])  # serving + the one before; the seed stays
        assert (params / "manifest.json").is_file()
        # the server rolls back to the previous version: it is on disk, no download needed
        prev = built[1]
        updater.submit(json.dumps(update_message(prev.version, server.url(prev.bundle.name), prev.bundle)).encode())
        assert updater.wait_idle(15)
        assert reports[-1] == (prev.version, "applied", None) and registry.current.version == prev.version
        assert server.requests[f"/bundles/{prev.bundle.name}"] == 1
    finally:
        updater.stop()


def test_a_bundle_from_the_servers_packer_is_applied(tmp_path: Path, versions: Versions) -> None:
    """The retrain server's own packer (edge files only, re-signed, same version) and message."""
    from retrain_server.bundles import pack_bundle
    from retrain_server.publish import UpdateMessage

    src = versions.make(bundle=False)
    served = tmp_path / "served"
    info = pack_bundle(src.dir, served, versions.trained.signing_key)
    assert info.version == src.version
    params = tmp_path / "parameters"
    store, loader, registry = serving_base(params, versions)
    reports: list[tuple[Any, str, Any]] = []
    updater = Updater(store, registry, loader, lambda *r: reports.append(r), jitter_s=0)
    updater.start()
    try:
        with serve_bundles(served) as s:
            msg = UpdateMessage.for_bundle(info.path, f"http://127.0.0.1:{s.port}")
            payload = msg.to_json()
            assert json.loads(payload)["url"].endswith(f"/bundles/{info.version}.tar.gz")
            updater.submit(payload)
            assert updater.wait_idle(15)
    finally:
        updater.stop()
    assert reports == [(src.version, "applied", None)] and registry.current.version == src.version
    # a message whose "bytes" already says too much is refused without fetching
    small = Updater(store, registry, loader, lambda *r: reports.append(r), jitter_s=0, max_bundle_bytes=1024)
    small.start()
    try:
        small.submit(json.dumps(update_message("v-next", "http://127.0.0.1:1/x.tar.gz", None,
                                               bytes=info.bytes)).encode())
        assert small.wait_idle(5)
    finally:
        small.stop()
    assert reports[-1] == ("v-next", "rejected", f"bundle too large: {info.bytes} bytes (limit 1024)")


def test_the_packer_gives_the_same_bytes_twice_and_refuses_files_changed_since_they_were_written(
        tmp_path: Path, versions: Versions) -> None:
    """Packing a version again (a crash between announcing and recording it) keeps its sha256, which an update
    message may already carry; a file that no longer matches its manifest (an edit, a power cut) is not signed."""
    from retrain_server.bundles import pack_bundle

    src = versions.make(bundle=False)
    first = pack_bundle(src.dir, tmp_path / "a", versions.trained.signing_key)
    time.sleep(1.1)  # another second: the times in the headers would differ
    again = pack_bundle(src.dir, tmp_path / "b", versions.trained.signing_key)
    assert (again.sha256, again.bytes) == (first.sha256, first.bytes)
    assert first.path.read_bytes() == again.path.read_bytes()
    edge = next(rel for rel in sorted(layout.EDGE_FILES) if rel.endswith(".npy") and (src.dir / rel).is_file())
    path = src.dir / edge
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{re.escape(edge)} differ from the sha256 its manifest recorded"):
        pack_bundle(src.dir, tmp_path / "c", versions.trained.signing_key)
    assert not list((tmp_path / "c").glob("*.tar.gz")) and not list((tmp_path / "c").glob(".pack-*"))


# --- rejections --------------------------------------------------------------------------------
def _not_gzip(v: Versions, s: BundleServer) -> tuple[dict, str]:
    p = v.bundles / "not-gzip.tar.gz"
    p.write_bytes(b"this is not a bundle\n" * 10)
    return update_message(v.good.version, s.url(p.name), p), "not a valid tar.gz"


def _flipped_byte(v: Versions, s: BundleServer) -> tuple[dict, str]:
    b = v.make(tamper=lambda d: flip_byte(d / "guest_model" / "co_scores.npy"))
    return update_message(b.version, s.url(b.bundle.name), b.bundle), \
        "guest_model/co_scores.npy: sha256 does not match the manifest"


def _other_key(v: Versions, s: BundleServer) -> tuple[dict, str]:
    from retrain_server.sign import keygen

    key, _pub = keygen(v.root / f"other-{uuid.uuid4().hex[:6]}")
    b = v.make(key=key)
    return update_message(b.version, s.url(b.bundle.name), b.bundle), \
        "manifest.sig: signature does not match the public key"


def _unsigned(v: Versions, s: BundleServer) -> tuple[dict, str]:
    b = v.make(tamper=lambda d: (d / "manifest.sig").unlink())
    return update_message(b.version, s.url(b.bundle.name), b.bundle), "unsigned"


def _wrong_sha(v: Versions, s: BundleServer) -> tuple[dict, str]:
    return update_message(v.good.version, s.url(v.good.bundle.name), None, sha256="ab" * 32), "sha256 mismatch"


def _unreachable(v: Versions, s: BundleServer) -> tuple[dict, str]:
    url = f"http://127.0.0.1:{free_port()}/bundles/{v.good.bundle.name}"
    return update_message(v.good.version, url, v.good.bundle), "download failed: Connection refused"


def _http_404(v: Versions, s: BundleServer) -> tuple[dict, str]:
    return update_message(v.good.version, s.url("no-such.tar.gz"), v.good.bundle), "download failed: HTTP 404"


def _truncated(v: Versions, s: BundleServer) -> tuple[dict, str]:
    size = v.good.bundle.stat().st_size
    return update_message(v.good.version, s.url(v.good.bundle.name, "truncated"), v.good.bundle), \
        f"download truncated: got {size // 2} of {size} bytes"


def _redirect_to_ftp(v: Versions, s: BundleServer) -> tuple[dict, str]:
    return update_message(v.good.version, s.url(v.good.bundle.name, "redirect/ftp"), v.good.bundle), \
        "redirect to a 'ftp' URL refused"


def _dotdot(v: Versions, s: BundleServer) -> tuple[dict, str]:
    p = v.custom_bundle(f"dotdot-{uuid.uuid4().hex[:6]}.tar.gz", v.good.dir, first=[tar_member("../evil", b"x")])
    return update_message(v.good.version, s.url(p.name), p), "unsafe tar member '../evil'"


def _absolute(v: Versions, s: BundleServer) -> tuple[dict, str]:
    p = v.custom_bundle(f"abs-{uuid.uuid4().hex[:6]}.tar.gz", v.good.dir, extra=[tar_member("/tmp/evil", b"x")])
    return update_message(v.good.version, s.url(p.name), p), "unsafe tar member '/tmp/evil'"


def _symlink(v: Versions, s: BundleServer) -> tuple[dict, str]:
    p = v.custom_bundle(f"sym-{uuid.uuid4().hex[:6]}.tar.gz", v.good.dir,
                        extra=[tar_member("guest_model/link", kind=tarfile.SYMTYPE, linkname="/etc/passwd")])
    return update_message(v.good.version, s.url(p.name), p), "unsafe tar member 'guest_model/link': symlink"


def _hardlink(v: Versions, s: BundleServer) -> tuple[dict, str]:
    p = v.custom_bundle(f"hard-{uuid.uuid4().hex[:6]}.tar.gz", v.good.dir,
                        extra=[tar_member("hard", kind=tarfile.LNKTYPE, linkname="manifest.json")])
    return update_message(v.good.version, s.url(p.name), p), "unsafe tar member 'hard': hard link"


def _version_differs(v: Versions, s: BundleServer) -> tuple[dict, str]:
    return update_message("20990101T000000Z-other", s.url(v.good.bundle.name), v.good.bundle), \
        f"manifest version '{v.good.version}' differs from the message's '20990101T000000Z-other'"


def _out_of_range(v: Versions, s: BundleServer) -> tuple[dict, str]:
    def bad(d: Path) -> None:  # the partners agents serve (the padded pair is for older agents)
        rewrite_array(d / layout.GUEST_CO_PARTNERS["items"], lambda a: a + 10**6)
    b = v.make(bad)
    return update_message(b.version, s.url(b.bundle.name), b.bundle), \
        "guest model invalid: co-purchase partners hold indices outside the catalogue"


def _out_of_range_padded(v: Versions, s: BundleServer) -> tuple[dict, str]:
    def bad(d: Path) -> None:  # a bundle from before the unpadded partners: the padded pair is read
        rewrite_array(d / "guest_model" / "co_neighbors.npy", lambda a: np.where(a >= 0, a + 10**6, a))
        for path in layout.GUEST_CO_PARTNERS.values():
            (d / path).unlink()
    b = v.make(bad)
    return update_message(b.version, s.url(b.bundle.name), b.bundle), \
        "guest model invalid: co_neighbors holds indices outside the catalogue"


def _smoke_fails(v: Versions, s: BundleServer) -> tuple[dict, str]:
    def useless(d: Path) -> None:  # loads fine, answers one product where five are asked for
        g = d / "guest_model"
        for name in ("co_neighbors", "sim_neighbors"):
            rewrite_array(g / f"{name}.npy", lambda a: np.full_like(a, -1))
        p = layout.GUEST_CO_PARTNERS  # no partners at all
        rewrite_array(d / p["indptr"], np.zeros_like)
        rewrite_array(d / p["items"], lambda a: a[:0])
        rewrite_array(d / p["scores"], lambda a: a[:0])
        rewrite_array(g / "popular.npy", lambda a: a[:1])
        for path in layout.GUEST_BASKETS.values():  # the recent baskets would still answer
            (d / path).unlink(missing_ok=True)
    b = v.make(useless)
    return update_message(b.version, s.url(b.bundle.name), b.bundle), "smoke recommendation malformed"


def _no_manifest(v: Versions, s: BundleServer) -> tuple[dict, str]:
    p = v.custom_bundle(f"nomanifest-{uuid.uuid4().hex[:6]}.tar.gz", None,
                        extra=[tar_member("guest_model/", kind=tarfile.DIRTYPE)])
    return update_message(v.good.version, s.url(p.name), p), "bundle has no manifest.json"


def _malformed(v: Versions, s: BundleServer) -> tuple[dict, str]:
    msg = update_message(v.good.version, "ftp://example/x.tar.gz", None, sha256="xyz")
    return msg, "malformed update message: url must be an http(s) URL, got 'ftp://example/x.tar.gz'; " \
                "sha256 must be 64 hex digits, got 'xyz'"


REJECTIONS = {f.__name__.lstrip("_"): f for f in (
    _flipped_byte, _other_key, _unsigned, _wrong_sha, _unreachable, _http_404, _truncated, _redirect_to_ftp,
    _dotdot, _absolute, _symlink, _hardlink, _version_differs, _out_of_range, _out_of_range_padded, _smoke_fails,
    _no_manifest, _not_gzip, _malformed)}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_bad_update_is_rejected_and_the_old_models_keep_serving(
        case: str, make_agent: Any, versions: Versions, server: BundleServer) -> None:
    agent = make_agent()
    msg, reason = REJECTIONS[case](versions, server)
    agent.probe.publish_update(msg)
    status = agent.probe.wait_update(msg["version"])
    last = status["last_update"]
    assert last["result"] == "rejected", last
    assert reason in last["reason"], last["reason"]
    assert "\n" not in last["reason"] and str(agent.params) not in last["reason"]
    assert status["models"]["guest"] == versions.base.version
    assert agent.probe.ask("b", agent.cart)["model_version"] == versions.base.version
    assert leftovers(agent.params) == []
    assert not (agent.params / "versions" / msg["version"]).exists()
    assert not (agent.params.parent / "evil").exists() and not Path("/tmp/evil").exists()


@pytest.mark.parametrize("mode", ["bundles", "nolength"])
def test_bundle_over_the_size_limit_is_rejected_while_streaming(
        mode: str, make_agent: Any, versions: Versions, server: BundleServer) -> None:
    agent = make_agent(max_bundle_bytes=8192)
    assert versions.good.bundle.stat().st_size > 8192
    agent.probe.publish_update(update_message(versions.good.version, server.url(versions.good.bundle.name, mode),
                                              versions.good.bundle))
    last = agent.probe.wait_update(versions.good.version)["last_update"]
    assert last["result"] == "rejected" and "bundle too large" in last["reason"]
    assert (str(versions.good.bundle.stat().st_size) in last["reason"]) == (mode == "bundles")
    assert leftovers(agent.params) == [] and agent.registry.current.version == versions.base.version


def test_a_rejected_bundle_is_not_fetched_again_but_a_failed_download_is(
        make_agent: Any, versions: Versions, server: BundleServer) -> None:
    agent = make_agent()
    msg, _ = _flipped_byte(versions, server)
    agent.probe.publish_update(msg)
    assert agent.probe.wait_update(msg["version"])["last_update"]["result"] == "rejected"
    agent.probe.publish_update(msg)  # again: not downloaded again
    time.sleep(0.5)
    assert agent.updater.wait_idle(10)
    assert server.requests[urlpath(msg["url"])] == 1
    # a download that failed (network) is tried again on the next delivery, and then applied
    b = versions.make()
    bad = update_message(b.version, server.url(b.bundle.name, "truncated"), b.bundle)
    agent.probe.publish_update(bad)
    assert agent.probe.wait_update(b.version)["last_update"]["result"] == "rejected"
    agent.probe.publish_update(update_message(b.version, server.url(b.bundle.name), b.bundle))
    assert agent.probe.wait_status(lambda s: (s["last_update"] or {}).get("result") == "applied")["models"][
        "guest"] == b.version


def urlpath(url: str) -> str:
    return "/" + url.split("/", 3)[3]


# --- under load ----------------------------------------------------------------------------------
def test_every_cart_event_is_answered_while_an_update_is_applied(
        make_agent: Any, versions: Versions, server: BundleServer, mqtt_broker: Broker) -> None:
    agent = make_agent()
    b = versions.make()
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sensor-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5)
    pub.max_inflight_messages_set(500)
    pub.connect(mqtt_broker.host, mqtt_broker.port)
    pub.loop_start()
    items = versions.trained.family_items(5)
    rate, seconds = 300, 3.0
    n = int(rate * seconds)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            if i == n // 3:
                agent.probe.publish_update(update_message(b.version, server.url(b.bundle.name), b.bundle))
            event = {"event_id": f"e{i}", "cart": items[i % 7: i % 7 + 3]}
            pub.publish(f"{agent.probe.prefix}/basket/b{i % 40}/cart", json.dumps(event), qos=1)
            delay = t0 + (i + 1) / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        answers: dict[str, str] = {}
        deadline = time.monotonic() + 10
        while len(answers) < n and time.monotonic() < deadline:
            try:
                rec = agent.probe.recs.get(timeout=0.5)
            except queue.Empty:
                continue
            answers[rec["event_id"]] = rec["model_version"]
    finally:
        pub.disconnect()
        pub.loop_stop()
    assert agent.probe.errors.empty()
    assert len(answers) == n, f"{n - len(answers)} of {n} events unanswered"
    seen = set(answers.values())
    assert seen == {versions.base.version, b.version}, seen
    assert agent.registry.current.version == b.version
    assert agent.service.metrics.snapshot()["errors"] == 0


# --- jitter ------------------------------------------------------------------------------------
class RecordingRandom(random.Random):
    def __init__(self) -> None:
        super().__init__(7)
        self.draws: list[tuple[float, float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        x = super().uniform(a, b)
        self.draws.append((a, b, x))
        return x


def test_jitter_delays_the_download(tmp_path: Path, versions: Versions, server: BundleServer) -> None:
    params = tmp_path / "parameters"
    store, loader, registry = serving_base(params, versions)
    rng = RecordingRandom()
    applied = threading.Event()
    updater = Updater(store, registry, loader, lambda *r: applied.set(), jitter_s=0.6, rng=rng)
    updater.start()
    try:
        b = versions.make()
        t0 = time.perf_counter()
        updater.submit(json.dumps(update_message(b.version, server.url(b.bundle.name), b.bundle)).encode())
        assert applied.wait(10)
        elapsed = time.perf_counter() - t0
    finally:
        updater.stop()
    assert len(rng.draws) == 1
    lo, hi, drawn = rng.draws[0]
    assert (lo, hi) == (0.0, 0.6) and 0 <= drawn <= 0.6
    assert elapsed >= drawn and updater.last_timings["jitter_s"] == drawn


def test_stop_interrupts_the_jitter_wait(tmp_path: Path, versions: Versions, server: BundleServer) -> None:
    params = tmp_path / "parameters"
    store, loader, registry = serving_base(params, versions)
    updater = Updater(store, registry, loader, None, jitter_s=3600)
    updater.start()
    updater.submit(json.dumps(update_message(versions.good.version, server.url(versions.good.bundle.name),
                                             versions.good.bundle)).encode())
    time.sleep(0.1)
    t0 = time.perf_counter()
    updater.stop()
    assert time.perf_counter() - t0 < 1.0
    assert registry.current.version == versions.base.version


def test_a_server_that_drips_bytes_cannot_hold_the_updater(tmp_path: Path, versions: Versions,
                                                          server: BundleServer) -> None:
    """max_download_s bounds the whole download even when every read gets a byte before timeout_s (a slow or
    hostile server), and stop() does not wait for such a download to end."""
    params = tmp_path / "parameters"
    store, loader, registry = serving_base(params, versions)
    reports: list[tuple[Any, str, Any]] = []
    b = versions.make()
    message = json.dumps(update_message(b.version, server.url(b.bundle.name, "drip"), b.bundle)).encode()
    updater = Updater(store, registry, loader, lambda *r: reports.append(r), jitter_s=0, timeout_s=1,
                      max_download_s=1)
    updater.start()
    try:
        t0 = time.perf_counter()
        updater.submit(message)
        assert updater.wait_idle(20)
        elapsed = time.perf_counter() - t0
    finally:
        updater.stop()
    assert reports == [(b.version, "rejected", "download failed: took longer than 1 s")]
    assert elapsed < 1 + 1 + 1.5  # the limit, one read's timeout, slack
    assert registry.current.version == versions.base.version and leftovers(params) == []
    # stop() during such a download: back within one read's timeout
    patient = Updater(store, registry, loader, None, jitter_s=0, timeout_s=1, max_download_s=600)
    patient.start()
    patient.submit(message)
    time.sleep(1.0)
    thread = patient._thread
    assert thread is not None and thread.is_alive()
    t0 = time.perf_counter()
    patient.stop()
    assert time.perf_counter() - t0 < 1 + 1.5 and not thread.is_alive()
    assert registry.current.version == versions.base.version and leftovers(params) == []


def _pages(n: int) -> int:
    return -(-n // 4096) * 4096


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``small_disk(size)``: a tmpfs of ``size`` bytes (root only; skipped elsewhere); resized by calling again."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = False

    def make(size: int) -> Path:
        nonlocal mounted
        cmd = ["mount", "-o", f"remount,size={size}", str(disk)] if mounted else \
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            pytest.skip("mounting a small tmpfs needs root")
        mounted = True
        return disk

    yield make
    if mounted:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_is_not_the_bundles_fault(small_disk: Callable[[int], Path], versions: Versions,
                                              server: BundleServer) -> None:
    """Disk full while unpacking: rejected for now but not remembered (the bundle is fine); once there is room,
    the same message is applied. (It used to be remembered as a bad bundle until the agent restarted.)"""
    b = versions.make()
    base = sum(_pages(f.stat().st_size) for f in versions.base.dir.rglob("*") if f.is_file())
    with tarfile.open(b.bundle) as tar:
        unpacked = sum(_pages(m.size) for m in tar.getmembers() if m.isfile())
    room = base + _pages(b.bundle.stat().st_size) + unpacked // 2  # the download fits, its files do not
    params = small_disk(room) / "parameters"
    store, loader, registry = serving_base(params, versions)
    reports: list[tuple[Any, str, Any]] = []
    updater = Updater(store, registry, loader, lambda *r: reports.append(r), jitter_s=0)
    message = json.dumps(update_message(b.version, server.url(b.bundle.name), b.bundle)).encode()
    updater.start()
    try:
        updater.submit(message)
        assert updater.wait_idle(20)
        assert len(reports) == 1 and reports[0][:2] == (b.version, "rejected")
        assert "cannot unpack bundle: No space left on device" in reports[0][2]
        assert registry.current.version == versions.base.version and leftovers(params) == []
        small_disk(4 * room)
        updater.submit(message)  # e.g. the retained message again after a reconnect
        assert updater.wait_idle(20)
    finally:
        updater.stop()
    assert reports[1:] == [(b.version, "applied", None)] and registry.current.version == b.version


# --- start-up ------------------------------------------------------------------------------------
def _layout(tmp_path: Path, versions: Versions) -> tuple[Path, Built, Built]:
    """Seed V0 at top level, a good newer version, a newest one that is corrupt, and leftovers."""
    params = tmp_path / "parameters"
    shutil.copytree(versions.base.dir, params)
    good = versions.make(bundle=False)
    corrupt = versions.make(bundle=False, tamper=lambda d: flip_byte(d / "guest_model" / "popular.npy"))
    (params / "versions").mkdir()
    shutil.copytree(good.dir, params / "versions" / good.version)
    shutil.copytree(corrupt.dir, params / "versions" / corrupt.version)
    (params / "versions" / ".incoming-deadbeef" / "guest_model").mkdir(parents=True)
    (params / "versions" / ".download-cafe.tar.gz").write_bytes(b"half")
    return params, good, corrupt


def test_startup_serves_the_newest_verified_version_and_falls_back(tmp_path: Path, versions: Versions) -> None:
    params, good, corrupt = _layout(tmp_path, versions)
    store = VersionStore(params)
    assert [c.version for c in store.candidates()] == [corrupt.version, good.version, versions.base.version]
    store.cleanup()
    assert leftovers(params) == []
    result = store.load_newest(loader_for(versions.trained.public_key))
    assert result.snapshot.version == good.version and result.candidate.path == params / "versions" / good.version
    assert [(c.version, r) for c, r in result.rejected] == [
        (corrupt.version, "guest_model/popular.npy: sha256 does not match the manifest")]
    assert not (params / "versions" / corrupt.version).exists()
    assert (params / "versions" / f".rejected-{corrupt.version}").is_dir()  # kept for inspection
    # next start: the corrupt one is out of the way
    assert VersionStore(params).load_newest(loader_for(versions.trained.public_key)).rejected == []


def test_startup_with_nothing_loadable_is_a_bundle_error(tmp_path: Path, versions: Versions) -> None:
    params = tmp_path / "p"
    shutil.copytree(versions.base.dir, params)
    flip_byte(params / "guest_model" / "item_ids.npy")
    with pytest.raises(BundleError, match="item_ids.npy: sha256 does not match"):
        VersionStore(params).load_newest(loader_for(versions.trained.public_key))
    with pytest.raises(BundleError, match="cannot read"):
        VersionStore(tmp_path / "empty").load_newest(loader_for(versions.trained.public_key))


# --- the commands as processes -------------------------------------------------------------------
def _agent_cmd(broker: Broker, prefix: str, params: Path, versions: Versions, *extra: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", "run", "--broker", f"{broker.host}:{broker.port}", "--prefix",
            prefix, "--agent-id", "upd-cli", "--parameters", str(params), "--public-key",
            str(versions.trained.public_key), "--http-port", "0", *extra]


def test_agent_process_starts_on_the_newest_verified_version_and_applies_updates_after_jitter(
        mqtt_broker: Broker, topic_prefix: str, tmp_path: Path, versions: Versions, server: BundleServer) -> None:
    params, good, corrupt = _layout(tmp_path, versions)
    probe = Probe(mqtt_broker, topic_prefix)
    log = tmp_path / "agent.log"
    with log.open("w") as err:
        proc = subprocess.Popen(_agent_cmd(mqtt_broker, topic_prefix, params, versions, "--update-jitter-s", "0.7"),
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        status = probe.wait_status(lambda b: b["state"] == "online", 30)
        assert status["models"]["guest"] == good.version
        last = status["last_update"]
        assert last["version"] == corrupt.version and last["result"] == "rejected"
        assert "at start-up" in last["reason"] and "popular.npy: sha256 does not match" in last["reason"]
        assert leftovers(params) == []

        b = versions.make()
        t0 = time.perf_counter()
        probe.publish_update(update_message(b.version, server.url(b.bundle.name), b.bundle))
        status = probe.wait_update(b.version, 15)
        elapsed = time.perf_counter() - t0
        assert status["last_update"]["result"] == "applied" and status["models"]["member"] == b.version
        assert probe.ask("c1", versions.trained.family_items(2)[:2])["model_version"] == b.version
        waits = re.findall(r"waiting ([0-9.]+) s before downloading \(jitter up to 0.7 s\)", log.read_text())
        assert len(waits) == 1 and 0 <= float(waits[0]) <= 0.7
        assert elapsed >= float(waits[0])
    finally:
        proc.terminate()
        proc.wait(10)
        probe.close()
    assert proc.returncode == 0, log.read_text()[-2000:]


def test_agent_process_exits_3_when_no_version_loads(tmp_path: Path, versions: Versions) -> None:
    params = tmp_path / "p"
    shutil.copytree(versions.base.dir, params)
    flip_byte(params / "guest_model" / "item_ids.npy")
    r = subprocess.run(_agent_cmd(Broker("127.0.0.1", 1), "x", params, versions), cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot load models" in lines[0] and "item_ids.npy" in lines[0]


def test_standalone_bridge_follows_updates(
        mqtt_broker: Broker, topic_prefix: str, tmp_path: Path, versions: Versions, server: BundleServer) -> None:
    import urllib.request

    params = tmp_path / "parameters"
    shutil.copytree(versions.base.dir, params)
    port = free_port()
    probe = Probe(mqtt_broker, topic_prefix)
    log = tmp_path / "bridge.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "bridge", "--parameters", str(params), "--public-key",
             str(versions.trained.public_key), "--port", str(port), "--broker",
             f"{mqtt_broker.host}:{mqtt_broker.port}", "--prefix", topic_prefix, "--update-jitter-s", "0"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)

    def health() -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                return json.loads(resp.read())
        except OSError:
            return None

    try:
        deadline = time.monotonic() + 30
        while (h := health()) is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert h["models"]["guest"] == versions.base.version
        b = versions.make()
        probe.publish_update(update_message(b.version, server.url(b.bundle.name), b.bundle))
        deadline = time.monotonic() + 15
        while (health() or {}).get("models", {}).get("guest") != b.version:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
        probe.close()


# --- safe unpacking (no broker) ------------------------------------------------------------------
def _unpack(tmp_path: Path, entries: list[tuple], **limits: int) -> Path:
    archive = pack(None, tmp_path / f"{uuid.uuid4().hex[:6]}.tar.gz", extra=entries)
    dest = tmp_path / f"out-{uuid.uuid4().hex[:6]}"
    dest.mkdir()
    safe_unpack(archive, dest, max_file_bytes=limits.get("file", 1 << 20), max_total_bytes=limits.get("total", 1 << 20),
                max_members=limits.get("members", 100))
    return dest


@pytest.mark.parametrize("member, reason", [
    (tar_member("../evil", b"x"), "unsafe tar member '../evil'"),
    (tar_member("a/../../evil", b"x"), "unsafe tar member"),
    (tar_member("./manifest.json", b"x"), "unsafe tar member './manifest.json'"),
    (tar_member("a//b", b"x"), "unsafe tar member 'a//b'"),
    (tar_member("/etc/passwd", b"x"), "unsafe tar member '/etc/passwd'"),
    (tar_member("a\\b", b"x"), "unsafe tar member"),
    (tar_member("link", kind=tarfile.SYMTYPE, linkname="../../etc"), "symlink"),
    (tar_member("hard", kind=tarfile.LNKTYPE, linkname="x"), "hard link"),
    (tar_member("fifo", kind=tarfile.FIFOTYPE), "device"),
    (tar_member("dev", kind=tarfile.CHRTYPE), "device"),
    (tar_member("blk", kind=tarfile.BLKTYPE), "device"),
])
def test_unsafe_members_are_refused(tmp_path: Path, member: tuple, reason: str) -> None:
    with pytest.raises(UnsafeBundle, match=re.escape(reason)):
        _unpack(tmp_path, [tar_member("ok", b"fine"), member])
    assert not (tmp_path / "evil").exists()


def test_unpack_limits_and_duplicates(tmp_path: Path) -> None:
    out = _unpack(tmp_path, [tar_member("d/", kind=tarfile.DIRTYPE), tar_member("d/a.npy", b"12345")])
    assert (out / "d" / "a.npy").read_bytes() == b"12345"
    # read-only from birth: an installed version never changes, and agent.bundle maps such files
    assert oct((out / "d" / "a.npy").stat().st_mode & 0o777) == oct(0o444)
    with pytest.raises(UnsafeBundle, match="is 5 bytes"):
        _unpack(tmp_path, [tar_member("a", b"12345")], file=4)
    with pytest.raises(UnsafeBundle, match="contents exceed 8 bytes"):
        _unpack(tmp_path, [tar_member("a", b"12345"), tar_member("b", b"12345")], total=8)
    with pytest.raises(UnsafeBundle, match="listed twice"):
        _unpack(tmp_path, [tar_member("a", b"1"), tar_member("a", b"2")])
    with pytest.raises(UnsafeBundle, match="more than 3 members"):
        _unpack(tmp_path, [tar_member(f"f{i}", b"1") for i in range(4)], members=3)


def test_expansion_is_capped_while_reading(tmp_path: Path) -> None:
    """A small gzip that expands into a huge tar header is stopped before it fills memory."""
    archive = tmp_path / "bomb.tar.gz"
    info, data = tar_member("a", b"1")
    info.pax_headers = {"comment": "x" * (8 << 20)}  # tarfile reads a pax header whole
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info, data)
    assert archive.stat().st_size < 1 << 20
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UnsafeBundle, match="bundle expands beyond"):
        safe_unpack(archive, dest, max_file_bytes=1 << 10, max_total_bytes=1 << 10, max_members=10)
    with pytest.raises(UnsafeBundle, match="is 67108864 bytes"):  # a huge member: refused before reading it
        safe_unpack(pack(None, tmp_path / "big.tar.gz", extra=[tar_member("big", bytes(64 << 20))]), dest,
                    max_file_bytes=1 << 20, max_total_bytes=1 << 30)


# --- messages and configuration ------------------------------------------------------------------
def test_update_message_validation() -> None:
    ok = parse_update(json.dumps({"version": "20261124T030000Z-9f1c2a", "url": "https://h:8700/b.tar.gz",
                                  "sha256": "AB" * 32, "created_at": "2026-11-24T03:04:10+09:00",
                                  "metrics": {"guest_hr@10": 0.09}}).encode())
    assert ok.sha256 == "ab" * 32 and ok.metrics == {"guest_hr@10": 0.09}
    for payload, needle in [
        (b"\xff", "not JSON"), (b"[1]", "not a JSON object"), (b"x" * 20000, "larger than"),
        (json.dumps({"version": "../x", "url": "http://h/x", "sha256": "0" * 64}).encode(), "version must match"),
        (json.dumps({"version": "v1", "url": "file:///etc/passwd", "sha256": "0" * 64}).encode(), "http(s) URL"),
        (json.dumps({"version": "v1", "url": "http://h/x"}).encode(), "sha256 must be 64 hex digits"),
        (json.dumps({"version": "v1", "url": "http://h/x", "sha256": "0" * 64, "metrics": []}).encode(),
         "metrics must be an object"),
    ]:
        with pytest.raises(InvalidUpdate, match=re.escape(needle)):
            parse_update(payload)


def test_updates_config(tmp_path: Path) -> None:
    pub = tmp_path / "k.pub"
    pub.write_text("k")
    base = {"broker": {"host": "h"}, "agent_id": "a", "parameters": "p", "public_key": str(pub)}
    cfg = parse_config(base, env={})
    assert (cfg.updates.enabled, cfg.updates.jitter_s, cfg.updates.max_bundle_bytes,
            cfg.updates.download_timeout_s, cfg.updates.keep_versions) == (True, 30.0, 64 << 20, 30.0, 3)
    cfg = parse_config(base, overrides={"updates.jitter_s": 0}, env={})
    assert cfg.updates.jitter_s == 0.0
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "updates": {"enabled": "yes", "jitter_s": -1, "keep_versions": 1,
                                          "max_bundle_bytes": 10, "download_timeout_s": 0, "jiter": 3}}, env={})
    msg = str(err.value)
    for needle in ("updates.enabled must be true/false", "updates.jitter_s must be >= 0",
                   "updates.keep_versions must be >= 2", "updates.max_bundle_bytes must be >= 1024",
                   "updates.download_timeout_s must be >= 0.1", "unknown key 'updates.jiter'"):
        assert needle in msg


def test_readme_documents_the_config_schema() -> None:
    from agent.config import SCHEMA_DOC

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Configuration"):]
    block = section[section.index("```\n") + 4:]
    assert block[:block.index("```")] == SCHEMA_DOC
    import yaml

    shipped = yaml.safe_load((ROOT / "config" / "agent.yaml").read_text(encoding="utf-8"))
    assert set(shipped["updates"]) == {"enabled", "jitter_s", "max_bundle_bytes", "download_timeout_s",
                                       "keep_versions"}


def test_bad_update_jitter_flag_is_refused(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--update-jitter-s", "-1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--update-jitter-s" in r.stderr

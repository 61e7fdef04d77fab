"""Attacks on the HTTP bridge, and a cart-event probe, for tests/test_bridge_hardening.py (issue 8).

Everything here talks raw sockets, so it does exactly what a hostile or broken
client does (no client library that would fix up a request): a huge body by
``Content-Length`` or chunked, requests held open by sending slowly, requests
aborted half-way. :class:`CartProbe` keeps publishing cart events over MQTT and
records which were answered, so a test can show the agent's MQTT side kept
serving during an attack. :func:`start_agent` runs ``basket-agent run`` as a
process with a file-handle limit, as systemd would.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

_LOG = logging.getLogger(__name__)

__all__ = ["start_agent", "wait_http", "http_request", "vm_kib", "CartProbe", "post_huge", "HeldOpen",
           "abort_many", "raise_own_nofile"]

ROOT = Path(__file__).resolve().parents[1]
_MIB = 1 << 20


def raise_own_nofile(want: int = 8192) -> None:
    """This (test) process holds thousands of sockets: lift its soft file-handle limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def start_agent(*, broker: tuple[str, int], prefix: str, parameters: Path, public_key: Path, http_port: int,
                log: Path, nofile: int | None = 1024, env: dict[str, str] | None = None,
                cwd: Path = ROOT, agent_id: str = "a-1") -> subprocess.Popen[bytes]:
    """``basket-agent run`` with its HTTP bridge; stderr (the log) goes to ``log``."""
    def limits() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    cmd = [sys.executable, "-m", "agent.cli", "run", "--broker", f"{broker[0]}:{broker[1]}", "--prefix", prefix,
           "--agent-id", agent_id, "--parameters", str(parameters), "--public-key", str(public_key),
           "--http-port", str(http_port), "--update-jitter-s", "0"]
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(cwd)
    with open(log, "ab") as logf:
        return subprocess.Popen(cmd, cwd=cwd, stdout=logf, stderr=logf, env=full_env, preexec_fn=limits)


def closed_within(s: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """(closed by the server within ``timeout``, what it sent first)."""
    s.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return True, data
            data += chunk
    except TimeoutError:
        return False, data
    except ConnectionResetError:
        return True, data


def http_request(port: int, method: str = "GET", path: str = "/health", body: bytes = b"", *,
                 headers: dict[str, str] | None = None, timeout: float = 5.0,
                 source: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over a raw socket: (status, headers, body). Raises OSError/TimeoutError."""
    hdrs = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
    if body or method in ("POST", "PUT"):
        hdrs.setdefault("Content-Length", str(len(body)))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    with _connect(port, source, timeout) as s:
        s.sendall(head.encode("latin-1") + body)
        data = b""
        deadline = time.monotonic() + timeout
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head_raw, _, rest = data.partition(b"\r\n\r\n")
    lines = head_raw.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise OSError(f"no HTTP response: {data[:80]!r}")
    status = int(lines[0].split()[1])
    parsed = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, parsed, rest


def wait_http(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60.0,
              want: int | None = 200) -> int:
    """Poll GET /health until it answers (``want``: that status); returns the status."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"agent exited with {proc.returncode}")
        try:
            status = http_request(port, timeout=2)[0]
            if want is None or status == want:
                return status
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"HTTP bridge on {port} did not answer {want} in {timeout} s")
        time.sleep(0.2)


def vm_kib(pid: int, field: str = "VmHWM") -> int:
    """A /proc/PID/status memory field in KiB (VmHWM: the peak resident set)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _connect(port: int, source: str | None, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if source:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
    except BaseException:
        s.close()
        raise
    return s


class CartProbe:
    """Publishes a cart event every ``interval`` s for one basket and records the answers (QoS 1)."""

    def __init__(self, broker: tuple[str, int], prefix: str, basket: str = "probe", interval: float = 0.05,
                 **auth: Any) -> None:
        self.topic = f"{prefix}/basket/{basket}/cart"
        self.answers_topic = f"{prefix}/basket/{basket}/recommendations"
        self.interval = interval
        self.sent: dict[str, float] = {}
        self.answered: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._n = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv311)
        if auth.get("username"):
            self.client.username_pw_set(auth["username"], auth.get("password"))
        if auth.get("tls"):
            self.client.tls_set(**auth["tls"])
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(self.answers_topic, 1)
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.connect(broker[0], broker[1])
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if not msg.payload:
            return
        try:
            event_id = json.loads(msg.payload).get("event_id")
        except ValueError:
            return
        with self._lock:
            if event_id in self.sent and event_id not in self.answered:
                self.answered[event_id] = time.monotonic()

    def start(self) -> CartProbe:
        self._thread = threading.Thread(target=self._run, name="cart-probe", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.send()

    def send(self) -> str:
        self._n += 1
        event_id = f"p-{uuid.uuid4().hex[:6]}-{self._n}"
        with self._lock:
            self.sent[event_id] = time.monotonic()
        self.client.publish(self.topic, json.dumps({"event_id": event_id, "cart": ["1"], "top_k": 3}), qos=1)
        return event_id

    def stats(self, since: float, until: float | None = None) -> tuple[int, int, float]:
        """(sent, answered, worst latency s) of the events sent in [since, until]."""
        until = time.monotonic() if until is None else until
        with self._lock:
            ids = [e for e, t in self.sent.items() if since <= t <= until]
            lat = [self.answered[e] - self.sent[e] for e in ids if e in self.answered]
        return len(ids), len(lat), max(lat, default=0.0)

    def wait_answer(self, timeout: float = 10.0, resend_s: float = 1.0) -> float:
        """Send an event every ``resend_s`` until one is answered; seconds until then. Raises TimeoutError.

        Re-sent because an event published while the agent is not subscribed (it is
        reconnecting to a broker that lost its sessions) reaches nobody.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        mine: list[str] = []
        next_send = t0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_send:
                mine.append(self.send())
                next_send += resend_s
            with self._lock:
                if any(e in self.answered for e in mine):
                    return time.monotonic() - t0
            time.sleep(0.01)
        raise TimeoutError(f"none of {len(mine)} cart events answered in {timeout} s")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self.client.loop_stop()
        self.client.disconnect()


def post_huge(port: int, size: int = 300 * _MIB, *, chunked: bool = False, path: str = "/recommend",
              timeout: float = 30.0) -> tuple[int | None, int, float]:
    """POST ``size`` bytes as fast as the server takes them: (status or None, bytes sent, seconds).

    Stops sending once the server answered or closed. ``chunked``: Transfer-Encoding: chunked
    (no length announced), so only a streaming limit can stop it.
    """
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {size}\r\n") + "\r\n")
    piece = b'{"cart": ["' + b"x" * (_MIB - 11)
    block = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if chunked else piece
    t0 = time.monotonic()
    sent = 0
    response = b""
    with _connect(port, None, 5) as s:
        s.sendall(head.encode())
        s.setblocking(False)
        closed = False
        while time.monotonic() - t0 < timeout and not closed:
            r, w, _ = select.select([s], [s] if sent < size else [], [], 0.5)
            if r:
                try:
                    chunk = s.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                response += chunk
                if b"\r\n\r\n" in response:
                    break
            if w:
                try:
                    n = s.send(block)
                    sent += n if not chunked else max(0, n - 8)
                    if n < len(block):  # the rest of a partial block, blocking briefly
                        s.setblocking(True)
                        s.settimeout(5)
                        s.sendall(block[n:])
                        s.setblocking(False)
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    closed = True
            if sent >= size and not r:
                if chunked:
                    try:
                        s.sendall(b"0\r\n\r\n")
                    except OSError:
                        pass
                s.setblocking(True)
                s.settimeout(max(0.1, timeout - (time.monotonic() - t0)))
                try:
                    response += s.recv(65536)
                except OSError:
                    pass
                break
    status = int(response.split()[1]) if response.startswith(b"HTTP/") else None
    return status, sent, time.monotonic() - t0


class HeldOpen:
    """Up to ``n`` connections that never finish their request, re-opened when the server closes them.

    Runs in a process of its own (``python tests/_http_attacks.py held ...``): it holds
    more sockets than ``select()`` can watch, and the test process's own MQTT clients
    (paho uses ``select()``) must keep low descriptor numbers. Three kinds in turn:
    silent after connecting; a request head sent one byte at a time; a POST whose
    announced body drips one byte at a time. ``sources`` are local addresses to
    connect from (127.0.0.x), in turn. :meth:`stop` returns the attacker's counts.
    """

    def __init__(self, port: int, n: int, *, sources: Sequence[str] = ("127.0.0.2",), drip_s: float = 1.0) -> None:
        self.cmd = [sys.executable, str(Path(__file__).resolve()), "held", str(port), str(n), ",".join(sources),
                    str(drip_s)]
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> HeldOpen:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def stop(self) -> dict[str, int]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=30)
        try:
            return dict(json.loads(out.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            raise RuntimeError(f"held-open attacker failed: {err[-2000:]}") from None


def _held_open_main(port: int, n: int, sources: list[str], drip_s: float) -> None:
    raise_own_nofile(n + 256)
    sel = selectors.DefaultSelector()  # epoll: no limit on descriptor numbers
    socks: dict[socket.socket, list[Any]] = {}
    counts = {"opened": 0, "refused": 0, "closed_by_server": 0, "answered": 0, "max_held": 0}
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    heads = [b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",
             b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             b"Content-Length: 60000\r\n\r\n{"]

    def drop(s: socket.socket) -> None:
        sel.unregister(s)
        socks.pop(s, None)
        s.close()

    i = 0
    while not stop.is_set():
        while len(socks) < n and not stop.is_set():
            kind = i % 3
            source = sources[i % len(sources)]
            i += 1
            try:
                s = _connect(port, source, 2)
                s.setblocking(False)
                s.send(heads[kind])
            except OSError:
                counts["refused"] += 1
                continue
            counts["opened"] += 1
            socks[s] = [kind, time.monotonic()]
            sel.register(s, selectors.EVENT_READ)
        counts["max_held"] = max(counts["max_held"], len(socks))
        for key, _ in sel.select(0.05):
            s = key.fileobj  # type: ignore[assignment]
            try:
                data = s.recv(4096)  # type: ignore[union-attr]
            except OSError:
                data = b""
            counts["answered" if data.startswith(b"HTTP/") else "closed_by_server"] += 1
            drop(s)  # type: ignore[arg-type]
        now = time.monotonic()
        for s, state in list(socks.items()):
            if now - state[1] >= drip_s:
                state[1] = now
                try:
                    s.send(b"a" if state[0] != 2 else b" ")
                except OSError:
                    counts["closed_by_server"] += 1
                    drop(s)
    counts["held_at_end"] = len(socks)
    for s in list(socks):
        drop(s)
    print(json.dumps(counts), flush=True)


def abort_many(port: int, n: int, *, timeout: float = 30.0) -> int:
    """``n`` POSTs that announce a body, send part of it and go away (every other one with a RST)."""
    done = 0
    deadline = time.monotonic() + timeout
    head = (b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"cart\": [\"1\"")
    for i in range(n):
        if time.monotonic() > deadline:
            break
        try:
            with _connect(port, None, 2) as s:
                s.sendall(head)
                time.sleep(0.002)  # let the server start reading the body
                if i % 2:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            done += 1
        except OSError:
            pass
    return done


if __name__ == "__main__":
    if sys.argv[1:2] == ["held"]:
        _held_open_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(","), float(sys.argv[5]))

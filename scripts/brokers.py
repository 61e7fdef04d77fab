"""Private MQTT brokers for the demo, tests and benchmarks.

:class:`MosquittoBroker` runs a real Mosquitto on a free loopback port with its
own config (``set_tcp_nodelay true``) and can be killed and restarted on the
same port; with ``persistence=True`` it keeps sessions and queued messages in
a data directory across restarts (a graceful restart saves them, as a store's
broker does), and :func:`store_settings` gives the queue and inflight limits of
the shipped ``config/mosquitto.conf`` so tests run against the store's values.
:class:`AmqttBroker` embeds the pure-Python amqtt broker (MQTT 3.1.1
only) for machines without Mosquitto. ``MQTT_HOST`` / ``MQTT_PORT`` in the
environment select an external broker instead (:func:`external_broker`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Broker", "MosquittoBroker", "AmqttBroker", "external_broker", "free_port", "find_mosquitto",
           "mosquitto_available", "store_settings", "STORE_CONFIG"]

#: the broker configuration shipped for a store
STORE_CONFIG = Path(__file__).resolve().parents[1] / "config" / "mosquitto.conf"
# set by MosquittoBroker itself (port, files, user): never taken from the store's file
_OWN_KEYS = frozenset({"listener", "port", "user", "pid_file", "persistence", "persistence_location",
                       "log_dest", "include_dir", "per_listener_settings", "allow_anonymous"})

_INSTALL_HINT = ("mosquitto is not installed (looked in PATH, /usr/sbin, /usr/local/sbin). "
                 "Run the project's test command (bash scripts/test.sh), which installs it, "
                 "or `apt-get install mosquitto`; or point MQTT_HOST/MQTT_PORT at a broker.")


@dataclass(frozen=True)
class Broker:
    host: str
    port: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mosquitto() -> str:
    found = shutil.which("mosquitto")
    for candidate in (found, "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(_INSTALL_HINT)


def mosquitto_available() -> bool:
    try:
        find_mosquitto()
    except RuntimeError:
        return False
    return True


def external_broker() -> Broker | None:
    host = os.environ.get("MQTT_HOST")
    port = os.environ.get("MQTT_PORT")
    if not host and not port:
        return None
    return Broker(host or "127.0.0.1", int(port or 1883))


def store_settings(path: Path = STORE_CONFIG) -> tuple[str, ...]:
    """The global settings of a store's mosquitto.conf (queues, inflight, autosave...), without
    what a private broker sets itself (listeners, files, user); lines after the first ``listener``
    belong to listeners and are left out."""
    out: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key = line.split()[0]
        if key == "listener":
            break
        if key not in _OWN_KEYS:
            out.append(line)
    return tuple(out)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class MosquittoBroker:
    """``start()`` / ``stop()`` / ``restart()`` one mosquitto process on a fixed free port.

    ``persistence``: sessions, subscriptions and queued QoS 1 messages are kept in
    ``workdir/data`` and reloaded at start (saved at a graceful stop; a SIGKILL loses
    what changed since the last autosave). ``extra_config`` lines come last (global
    options, e.g. :func:`store_settings`, or more listeners).
    """

    host = "127.0.0.1"

    def __init__(self, workdir: Path, port: int | None = None, extra_config: tuple[str, ...] = (), *,
                 persistence: bool = False, sys_interval: int | None = None) -> None:
        self.binary = find_mosquitto()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        self.data = self.workdir / "data"
        self.persistence = persistence
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "set_tcp_nodelay true",
                 "log_dest stderr", "log_type error", "log_type warning"]
        if persistence:
            self.data.mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {self.data}/"]
        else:
            lines.append("persistence false")
        lines += extra_config
        if sys_interval is not None:  # last: the later of two values wins
            lines.append(f"sys_interval {sys_interval}")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to 'mosquitto' and may not read files
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.chmod(self.config, 0o644)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def broker(self) -> Broker:
        return Broker(self.host, self.port)

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=logf, stderr=logf)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            if _accepts(self.host, self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not accept connections on port {self.port} in {timeout}s")

    def stop(self, kill: bool = False) -> None:
        """Stop the broker (SIGKILL when ``kill``: no goodbye to clients)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, downtime: float = 0.0, graceful: bool = False) -> None:
        """Kill (or, ``graceful``, SIGTERM: a persistent broker then saves its sessions) and start again."""
        self.stop(kill=not graceful)
        if downtime:
            time.sleep(downtime)
        # The port is ours: wait for the kernel to release it if needed.
        deadline = time.monotonic() + 5
        while _accepts(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.start()


class AmqttBroker:
    """The embedded pure-Python broker (amqtt, MQTT 3.1.1 only), run in its own thread."""

    host = "127.0.0.1"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._loop = None
        self._thread = None

    @property
    def broker(self) -> Broker:
        return Broker(self.host, self.port)

    def start(self, timeout: float = 10.0) -> None:
        import asyncio
        import threading

        from amqtt.broker import Broker as _Amqtt

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._broker = _Amqtt(config, loop=self._loop)
            self._loop.run_until_complete(self._broker.start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="amqtt", daemon=True)
        self._thread.start()
        if not started.wait(timeout) or not _accepts(self.host, self.port):
            raise RuntimeError(f"embedded amqtt broker did not start on port {self.port}")

    def stop(self) -> None:
        import asyncio

        if self._loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            fut.result(5)
        except Exception:  # shutting down anyway
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop = None

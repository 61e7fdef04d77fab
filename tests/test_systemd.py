"""The systemd units in systemd/ and the sd_notify client they rely on (agent/sdnotify.py).

``systemd-analyze verify`` checks every unit the way systemd would load it. It
exits 0 on an unknown directive or an unparsable value (it only logs
"ignoring"), so a unit passes here only when verify prints nothing at all; a
negative test proves that a misspelled directive is caught. The installed
``ExecStart`` path (/opt/smartbasket/.venv/bin/...) does not exist on a
development machine, so each unit is verified in a temp copy whose ExecStart
points at the same console script in this checkout's venv: verify then also
proves the command name is a real entry point. No running systemd is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import sdnotify
from agent.sdnotify import Notifier, notify, watchdog_interval
from scripts.brokers import Broker

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
UNITS = sorted(p for p in SYSTEMD.iterdir() if p.suffix in {".service", ".timer", ".socket", ".path"})
SERVICES = [p for p in UNITS if p.suffix == ".service"]
INSTALL_BIN = "/opt/smartbasket/.venv/bin/"
VENV_BIN = Path(sys.executable).parent


# -- helpers -----------------------------------------------------------------------------------
def _systemd_analyze() -> str:
    """The binary, or a failed test with the fix: these checks must not silently go missing."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze not found: install the 'systemd' package (apt-get install systemd; "
                    "scripts/bootstrap.sh does this when run as root)")
    return exe


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}}: keys repeat in units (ExecStart, After)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def load_unit(name: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit((SYSTEMD / name).read_text(encoding="utf-8"))


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    """The effective (last) value of a single-valued setting; fails when absent."""
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def words(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> list[str]:
    """All space-separated words of a list-valued setting over all its lines (an empty line resets)."""
    out: list[str] = []
    for value in unit.get(section, {}).get(key, []):
        out = [] if value == "" else out + value.split()
    return out


def _seconds(value: str) -> float:
    """A systemd time span ("30", "30s", "1min 30s", "3h") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def _bytes(value: str) -> int:
    """A systemd size ("400M", "8G", "1048576") in bytes."""
    if value[-1].upper() in "KMGT":
        return int(float(value[:-1]) * 1024 ** ("KMGT".index(value[-1].upper()) + 1))
    return int(value)


def _writable(unit: dict[str, dict[str, list[str]]]) -> set[str]:
    """Paths the service may write under ProtectSystem=strict: ReadWritePaths= and StateDirectory=."""
    paths = {p.lstrip("-") for p in words(unit, "Service", "ReadWritePaths")}
    paths |= {f"/var/lib/{d}" for d in words(unit, "Service", "StateDirectory")}
    return paths


def verify(units: list[Path], workdir: Path, only: str | None = None) -> list[str]:
    """Run ``systemd-analyze verify`` on copies of ``units`` (or just the one named ``only``).

    Every line it prints is a problem. The copies sit side by side, as once
    installed. ExecStart paths under the install prefix are pointed at this
    checkout's venv, which must have the console script (else verify reports it).
    """
    exe = _systemd_analyze()
    workdir.mkdir(parents=True, exist_ok=True)
    for unit in units:
        text = unit.read_text(encoding="utf-8").replace(INSTALL_BIN, f"{VENV_BIN}/")
        (workdir / unit.name).write_text(text, encoding="utf-8")
    targets = [str(workdir / u.name) for u in units if only is None or u.name == only]
    proc = subprocess.run([exe, "verify", "--man=no", *targets], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""})
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    if proc.returncode != 0 and not problems:
        problems.append(f"systemd-analyze verify exited {proc.returncode}")
    return problems


# -- systemd-analyze verify --------------------------------------------------------------------
def test_units_exist() -> None:
    names = {p.name for p in UNITS}
    assert {"basket-agent.service", "retrain-server.service", "retrain-nightly.service",
            "retrain-nightly.timer"} <= names


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify_is_clean(unit: Path, tmp_path: Path) -> None:
    problems = verify(UNITS, tmp_path, only=unit.name)
    assert problems == [], "systemd-analyze verify:\n" + "\n".join(problems)


@pytest.mark.parametrize("broken, expected", [
    (("NoNewPrivileges=true", "NoNewPrivilege=true"), "Unknown key"),      # misspelled directive
    (("MemoryMax=400M", "MemoryMax=400Q"), "Invalid memory limit"),        # bad value
    (("Type=notify", "Type=notifyy"), "Failed to parse service type"),
    (("ExecStart=/opt/smartbasket/.venv/bin/basket-agent", "ExecStart=/opt/smartbasket/.venv/bin/basket-agentx"),
     "not executable"),                                                     # no such console script
])
def test_verify_catches_a_broken_unit(broken: tuple[str, str], expected: str, tmp_path: Path) -> None:
    """verify exits 0 for most of these, so the check must read its output."""
    old, new = broken
    text = (SYSTEMD / "basket-agent.service").read_text(encoding="utf-8")
    assert old in text
    bad = tmp_path / "src" / "basket-agent.service"
    bad.parent.mkdir()
    bad.write_text(text.replace(old, new, 1), encoding="utf-8")
    problems = verify([bad], tmp_path / "verify")
    assert any(expected in line for line in problems), problems


def test_verify_catches_a_bad_calendar(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("retrain-nightly.service", "retrain-nightly.timer"):
        shutil.copy(SYSTEMD / name, src / name)
    timer = src / "retrain-nightly.timer"
    timer.write_text(timer.read_text(encoding="utf-8").replace("Asia/Seoul", "Asia/Nowhere"), encoding="utf-8")
    problems = verify([src / "retrain-nightly.service", timer], tmp_path / "verify")
    assert any("calendar" in line for line in problems), problems


# -- what the units must keep --------------------------------------------------------------------
HARDENING = {
    "NoNewPrivileges": "true", "ProtectSystem": "strict", "ProtectHome": "true", "PrivateTmp": "true",
    "ProtectKernelTunables": "true", "ProtectKernelModules": "true", "ProtectControlGroups": "true",
    "LockPersonality": "true", "RestrictRealtime": "true", "SystemCallArchitectures": "native",
    "UMask": "0027",
}


@pytest.mark.parametrize("unit", SERVICES, ids=lambda p: p.name)
def test_every_service_is_hardened(unit: Path) -> None:
    u = parse_unit(unit.read_text(encoding="utf-8"))
    for key, value in HARDENING.items():
        assert one(u, "Service", key) == value, key
    assert set(words(u, "Service", "RestrictAddressFamilies")) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert one(u, "Service", "User") not in ("", "root")
    assert "DynamicUser" not in u["Service"]
    assert "MemoryMax" in u["Service"] and "LimitNOFILE" in u["Service"] and "TasksMax" in u["Service"]
    assert _bytes(one(u, "Service", "MemoryHigh")) < _bytes(one(u, "Service", "MemoryMax"))
    assert "ORT_DISABLE_TELEMETRY=1" in words(u, "Service", "Environment")
    exec_start = one(u, "Service", "ExecStart")
    assert exec_start.startswith(INSTALL_BIN), exec_start
    assert (VENV_BIN / exec_start[len(INSTALL_BIN):].split()[0]).exists(), "not a console script of the project"
    secrets = one(u, "Service", "EnvironmentFile")
    assert secrets.startswith("-/etc/smartbasket/") and secrets.endswith(".env"), secrets


def test_agent_unit() -> None:
    u = load_unit("basket-agent.service")
    s = u["Service"]
    assert one(u, "Service", "Type") == "notify"
    assert one(u, "Service", "NotifyAccess") == "main"
    # The worker loop wakes at least every 0.5 s and pings every WatchdogSec/2.
    assert _seconds(one(u, "Service", "WatchdogSec")) >= 10
    assert one(u, "Service", "Restart") == "on-failure"
    assert {"2", "3"} <= set(words(u, "Service", "RestartPreventExitStatus"))
    assert one(u, "Service", "User") == "smartbasket"
    assert _writable(u) == {"/var/lib/smartbasket/parameters"}
    assert one(u, "Service", "MemoryMax") == "400M"
    assert int(one(u, "Service", "LimitNOFILE")) >= 1024
    assert _seconds(one(u, "Service", "TimeoutStopSec")) > 4  # stop(): worker join 2 s + offline status 2 s
    assert one(u, "Service", "EnvironmentFile") == "-/etc/smartbasket/agent.env"
    assert one(u, "Service", "ExecStart") == (INSTALL_BIN + "basket-agent run --config /etc/smartbasket/agent.yaml")
    assert "MemoryDenyWriteExecute" not in s or one(u, "Service", "MemoryDenyWriteExecute") == "false"
    assert "network-online.target" in words(u, "Unit", "After")
    assert one(u, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("name", ["retrain-server.service", "retrain-nightly.service"])
def test_retrain_units(name: str) -> None:
    u = load_unit(name)
    assert one(u, "Service", "User") == "smartbasket-retrain"
    assert _writable(u) == {"/var/lib/smartbasket-retrain"}
    assert {"postgresql.service", "mosquitto.service", "network-online.target"} <= set(words(u, "Unit", "After"))
    assert one(u, "Service", "EnvironmentFile") == "-/etc/smartbasket/retrain.env"
    assert _bytes(one(u, "Service", "MemoryMax")) >= 4 * 1024 ** 3  # TensorFlow training
    assert "MemoryDenyWriteExecute" not in u["Service"]  # TensorFlow's XLA JIT needs W+X memory
    command = "serve" if name == "retrain-server.service" else "nightly"
    expected = f"{INSTALL_BIN}retrain-server {command} --config /etc/smartbasket/retrain.yaml"
    assert one(u, "Service", "ExecStart") == expected


def test_retrain_server_restarts_but_not_on_config_errors() -> None:
    u = load_unit("retrain-server.service")
    assert one(u, "Service", "Restart") == "on-failure"
    assert "2" in words(u, "Service", "RestartPreventExitStatus")
    assert one(u, "Install", "WantedBy") == "multi-user.target"


def test_nightly_timer() -> None:
    service, timer = load_unit("retrain-nightly.service"), load_unit("retrain-nightly.timer")
    assert one(service, "Service", "Type") == "oneshot"
    assert 0 < _seconds(one(service, "Service", "TimeoutStartSec")) < 24 * 3600  # never blocks the next night
    assert "Install" not in service  # started by the timer only
    assert one(timer, "Timer", "OnCalendar") == "*-*-* 03:00:00 Asia/Seoul"
    assert one(timer, "Timer", "Persistent") == "true"
    assert 0 < _seconds(one(timer, "Timer", "RandomizedDelaySec")) <= 3600
    # verify does not check that a timer's unit exists: do it here.
    assert (SYSTEMD / one(timer, "Timer", "Unit")).is_file()
    assert one(timer, "Install", "WantedBy") == "timers.target"


def test_parse_unit_keeps_repeated_keys() -> None:
    u = parse_unit("[Service]\n# c\nSystemCallFilter=@system-service\nSystemCallFilter=~@privileged\n"
                   "After=a b\nAfter=\nAfter=c\n")
    assert u["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert words(u, "Service", "After") == ["c"]
    assert _seconds("1min 30s") == 90 and _bytes("400M") == 400 * 1024 ** 2


# -- agent/sdnotify.py ---------------------------------------------------------------------------
@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: AF_UNIX paths are limited to 108 bytes, pytest's tmp_path can be longer."""
    with tempfile.TemporaryDirectory(prefix="sdn-") as d:
        yield Path(d)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)


def _listener(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return sock


def _received(sock: socket.socket) -> tuple[str, int]:
    """One datagram and the sender's pid (what systemd checks for NotifyAccess=main)."""
    data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    pid = next(int.from_bytes(d[:4], sys.byteorder) for level, kind, d in ancdata
               if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
    return data.decode(), pid


def _nothing_pending(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        sock.recv(4096)
    except TimeoutError:
        return True
    return False


def test_public_names() -> None:
    defined = {n for n, v in vars(sdnotify).items()
               if not n.startswith("_") and getattr(v, "__module__", None) == sdnotify.__name__}
    assert sorted(sdnotify.__all__) == sorted(defined)


def test_ready_reaches_a_path_socket(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = short_dir / "notify"
    with _listener(str(path)) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1") is True
        assert _received(sock) == ("READY=1", os.getpid())


def test_ready_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"smartbasket-test-{uuid.uuid4().hex}"
    with _listener(b"\0" + name.encode()) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1\nSTATUS=serving") is True
        assert _received(sock)[0] == "READY=1\nSTATUS=serving"


def test_no_socket_is_a_quiet_no_op() -> None:
    assert notify("READY=1") is False
    n = Notifier()
    assert not n.enabled and n.interval is None
    assert n.ready("x") is False and n.ping(0.0) is False and n.stopping() is False and n.status("y") is False


@pytest.mark.parametrize("value", ["relative/notify", "/nonexistent-dir/notify", "@nobody-listens-" + uuid.uuid4().hex])
def test_undeliverable_returns_false(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert notify("READY=1") is False


def test_dead_socket_returns_false(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = short_dir / "notify"
    _listener(str(path)).close()  # the file stays, nobody listens: ECONNREFUSED
    assert path.exists()
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert notify("WATCHDOG=1") is False


@pytest.mark.parametrize("usec, pid, expected", [
    (None, None, None),
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "other", None),   # meant for another process (e.g. our parent)
    ("0", None, None),
    ("-5", None, None),
    ("soon", None, None),
    ("30000000", "abc", None),
])
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid))
    assert watchdog_interval() == expected


def test_notifier_from_environment(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = short_dir / "notify"
    with _listener(str(path)) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "20000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        n = Notifier()
        assert n.enabled and n.interval == 10.0
        assert n.ready("connecting") is True
        assert _received(sock)[0] == "READY=1\nSTATUS=connecting"
        assert n.status("connecting") is False  # unchanged: not sent again
        assert n.status("serving") is True
        assert _received(sock)[0] == "STATUS=serving"
        assert n.stopping() is True
        assert _received(sock)[0] == "STOPPING=1\nSTATUS=stopping"


def test_ping_is_rate_limited(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = short_dir / "notify"
    with _listener(str(path)) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        n = Notifier(interval=10.0)
        assert n.ping(100.0) is True
        assert n.ping(105.0) is False
        assert n.ping(109.9) is False
        assert n.ping(110.0) is True
        assert [_received(sock)[0] for _ in range(2)] == ["WATCHDOG=1", "WATCHDOG=1"]
        assert _nothing_pending(sock)
        assert Notifier(interval=None).ping(1000.0) is False  # no watchdog configured


def test_ping_from_a_worker_thread_comes_from_the_main_pid(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NotifyAccess=main accepts the worker thread's pings: the sender pid is the process, not the thread."""
    path = short_dir / "notify"
    with _listener(str(path)) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        n = Notifier(interval=1.0)
        results: list[bool] = []
        worker = threading.Thread(target=lambda: results.append(n.ping(5.0)))
        worker.start()
        worker.join()
        assert results == [True]
        assert _received(sock) == ("WATCHDOG=1", os.getpid())


def test_child_with_inherited_watchdog_does_not_ping(short_dir: Path) -> None:
    """A subprocess inherits $WATCHDOG_PID of its parent and must stay silent (sd_watchdog_enabled semantics)."""
    path = short_dir / "notify"
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()),
           "PYTHONPATH": str(ROOT)}
    with _listener(str(path)) as sock:
        out = subprocess.run([sys.executable, "-c", "from agent.sdnotify import Notifier; "
                              "n = Notifier(); print(n.interval, n.ping(0.0))"],
                             env=env, capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.split() == ["None", "False"]
        assert _nothing_pending(sock)


# -- the agent process under the notify protocol ---------------------------------------------------
def _collect(sock: socket.socket, proc: subprocess.Popen[bytes], until: str, count: int, timeout: float,
             got: list[tuple[str, int]]) -> None:
    """Receive datagrams into ``got`` until ``count`` of them contain ``until`` (or fail)."""
    deadline = time.monotonic() + timeout
    while sum(until in m for m, _ in got) < count:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"no {count} x {until!r} in time; got {got}, exit {proc.poll()}"
        sock.settimeout(min(left, 1.0))
        try:
            got.append(_received(sock))
        except TimeoutError:
            pass


def test_agent_process_speaks_sd_notify(mqtt_broker: Broker, topic_prefix: str, short_dir: Path,
                                        tmp_path: Path) -> None:
    """READY=1, WATCHDOG=1 from the worker loop every WatchdogSec/2, STOPPING=1 on SIGTERM, exit 0.

    The acceptance test of the wiring in agent/service.py (AgentService.run_forever and _work):
    it is what systemd needs from ``Type=notify`` + ``WatchdogSec=`` in basket-agent.service.
    """
    path = short_dir / "notify"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
    got: list[tuple[str, int]] = []
    with _listener(str(path)) as sock, open(tmp_path / "agent.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_agent_proc.py"), "--host", mqtt_broker.host,
                                 "--port", str(mqtt_broker.port), "--prefix", topic_prefix, "--agent-id", "sd-1"],
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        try:
            _collect(sock, proc, "READY=1", 1, 30, got)
            _collect(sock, proc, "WATCHDOG=1", 3, 10, got)  # one every 0.5 s
            proc.send_signal(signal.SIGTERM)
            _collect(sock, proc, "STOPPING=1", 1, 10, got)
            assert proc.wait(15) == 0
        except AssertionError:
            log_text = (tmp_path / "agent.log").read_text(errors="replace")
            raise AssertionError(f"datagrams {got}\n--- agent log ---\n{log_text}") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert {pid for _, pid in got} == {proc.pid}  # NotifyAccess=main: all from the main process


def test_a_hung_worker_stops_the_watchdog_pings(mqtt_broker: Broker, topic_prefix: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The pings come from the worker loop: while it is stuck in a message, systemd hears nothing."""
    import paho.mqtt.client as paho
    from _agent_proc import service_config, tiny_snapshot
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.registry import ModelRegistry
    from agent.service import AgentService

    sent: list[tuple[float, str, str]] = []  # (time, thread, datagram)
    monkeypatch.setattr(sdnotify, "notify", lambda state: sent.append(
        (time.monotonic(), threading.current_thread().name, state)) or True)
    monkeypatch.setenv("NOTIFY_SOCKET", "@unused")
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s; the idle worker wakes every 0.5 s
    service = AgentService(ModelRegistry(tiny_snapshot()), service_config(
        host=mqtt_broker.host, port=mqtt_broker.port, prefix=topic_prefix, agent_id="sd-hang"))
    entered, release = threading.Event(), threading.Event()
    handle = service.handle

    def stuck(msg):  # type: ignore[no-untyped-def]
        if msg.topic.endswith("/cart"):
            entered.set()
            release.wait(10)
        handle(msg)

    monkeypatch.setattr(service, "handle", stuck)
    service.start()
    client = paho.Client(CallbackAPIVersion.VERSION2)
    try:
        assert service.wait_connected(10)
        time.sleep(1.2)
        pings = [t for t, _, m in sent if m == "WATCHDOG=1"]
        assert len(pings) >= 2, f"no watchdog pings from an idle worker: {sent}"
        client.connect(mqtt_broker.host, mqtt_broker.port)
        client.loop_start()
        client.publish(f"{topic_prefix}/basket/b-1/cart", '{"event_id": "e1", "cart": ["A"]}', qos=1)
        assert entered.wait(10)
        hung_at = time.monotonic()
        time.sleep(1.5)
        assert not any(m == "WATCHDOG=1" and t > hung_at + 0.05 for t, _, m in sent), "pinged while stuck"
        release.set()
        time.sleep(1.2)
        assert any(m == "WATCHDOG=1" and t > hung_at + 1.5 for t, _, m in sent), "no pings after the worker resumed"
    finally:
        release.set()
        client.loop_stop()
        client.disconnect()
        service.stop()
    assert {thread for _, thread, m in sent if m == "WATCHDOG=1"} == {"agent-worker"}

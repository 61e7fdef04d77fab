"""A dependency-free ``sd_notify(3)`` client: tell systemd we are ready, alive and stopping.

The agent's unit (``systemd/basket-agent.service``) is ``Type=notify`` with a
``WatchdogSec=``: systemd considers the agent started only once it sends
``READY=1`` (models loaded, worker running) and restarts it when the
``WATCHDOG=1`` pings stop. The pings must come from the worker loop
(:meth:`agent.service.AgentService._work`), not from a timer thread of their
own: a timer thread keeps pinging while the worker is stuck in a hung
publish or a deadlocked model, and that hung agent is exactly the one systemd
should kill and restart.

Outside systemd (tests, the demo, a shell) ``$NOTIFY_SOCKET`` is unset and
every call is a cheap no-op returning ``False``. Nothing here ever raises: a
notification that cannot be delivered is logged at debug level and must never
take the agent down.

Use::

    notifier = Notifier()                 # reads $NOTIFY_SOCKET / $WATCHDOG_USEC once
    notifier.ready("connecting to broker")
    while serving:                        # the worker loop
        ...
        notifier.ping(time.monotonic())   # WATCHDOG=1 at most every watchdog_interval()
    notifier.stopping()
"""

from __future__ import annotations

import logging
import os
import socket
import time

_LOG = logging.getLogger(__name__)

__all__ = ["Notifier", "notify", "watchdog_interval"]


def _address(path: str) -> str | bytes | None:
    """The socket address for ``$NOTIFY_SOCKET``: a path, or ``@name`` for the abstract namespace."""
    if path.startswith("@"):
        return b"\0" + path[1:].encode()  # Linux abstract socket: leading NUL, no file
    if path.startswith("/"):
        return path
    return None  # systemd only ever passes one of the two; anything else is not for us


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, several ``KEY=VALUE`` lines allowed) to systemd.

    Returns True when the datagram was sent, False when not running under
    systemd's notify protocol or the send failed. Never raises.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    try:
        address = _address(path)
        if address is None:
            _LOG.debug("sd_notify: ignoring NOTIFY_SOCKET=%r (neither absolute nor abstract)", path)
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
        return True
    except Exception as exc:  # OSError, ValueError (NUL in path), no AF_UNIX: never take the caller down
        _LOG.debug("sd_notify %r to %r failed: %s", state, path, exc)
        return False


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``; None when no watchdog applies.

    Half the period, as sd_watchdog_enabled(3) recommends, so one late ping is
    not yet fatal. ``$WATCHDOG_PID``, when set, names the process the watchdog
    is meant for; a child that inherited the environment must not ping.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        _LOG.debug("sd_notify: ignoring WATCHDOG_USEC=%r / WATCHDOG_PID=%r", usec, pid)
        return None
    if value <= 0:
        return None
    return value / 1_000_000 / 2


class Notifier:
    """sd_notify for one service: ready / status / stopping, and rate-limited watchdog pings.

    ``ping(now)`` is cheap enough for every turn of the worker loop: it sends
    ``WATCHDOG=1`` only when ``interval`` seconds have passed since the last
    ping (a float comparison otherwise). ``status(text)`` sends only when the
    text changed, so it can also be called on every status tick.
    """

    def __init__(self, interval: float | None = None, *, enabled: bool | None = None) -> None:
        """Read the environment once; ``interval``/``enabled`` override it (tests)."""
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET")) if enabled is None else enabled
        self.interval = watchdog_interval() if interval is None else interval
        self._last_ping: float | None = None
        self._last_status: str | None = None

    def _send(self, state: str) -> bool:
        return notify(state) if self.enabled else False

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (with a ``STATUS=``): the service is up; systemd's start job finishes now."""
        if status is not None:
            self._last_status = status
            return self._send(f"READY=1\nSTATUS={status}")
        return self._send("READY=1")

    def status(self, text: str) -> bool:
        """``STATUS=text``, shown by ``systemctl status``; skipped when unchanged."""
        if text == self._last_status:
            return False
        self._last_status = text
        return self._send(f"STATUS={text}")

    def stopping(self, status: str | None = "stopping") -> bool:
        """``STOPPING=1``: the shutdown is deliberate (systemd then waits up to TimeoutStopSec)."""
        return self._send("STOPPING=1" if status is None else f"STOPPING=1\nSTATUS={status}")

    def ping(self, now: float | None = None) -> bool:
        """``WATCHDOG=1`` if a watchdog is on and ``interval`` has passed since the last ping."""
        if not self.enabled or self.interval is None:
            return False
        if now is None:
            now = time.monotonic()
        if self._last_ping is not None and now - self._last_ping < self.interval:
            return False
        self._last_ping = now
        return notify("WATCHDOG=1")

"""Thread-safe counters and a latency reservoir, rendered for Prometheus and the status message.

One :class:`Metrics` instance is shared by the MQTT worker and the HTTP bridge.
Latency is kept as a ring buffer of the last ``reservoir_size`` observations;
p50/p99 are computed over it on demand (a summary, not a histogram).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from typing import Any

_LOG = logging.getLogger(__name__)

__all__ = ["LatencyReservoir", "Metrics"]

_NS = "smartbasket_agent"


class LatencyReservoir:
    """The last ``size`` latencies (seconds) in a ring buffer, plus lifetime sum and count."""

    def __init__(self, size: int = 2048) -> None:
        if size < 1:
            raise ValueError("reservoir size must be positive")
        self._buf: list[float] = []
        self._size = size
        self._next = 0
        self.count = 0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        if len(self._buf) < self._size:
            self._buf.append(seconds)
        else:
            self._buf[self._next] = seconds
        self._next = (self._next + 1) % self._size
        self.count += 1
        self.total += seconds

    def quantile(self, q: float) -> float | None:
        """Nearest-rank quantile over the reservoir, seconds; None when empty."""
        if not self._buf:
            return None
        data = sorted(self._buf)
        rank = max(1, math.ceil(q * len(data)))
        return data[rank - 1]


class Metrics:
    """Counters for the agent; every method may be called from any thread."""

    def __init__(self, reservoir_size: int = 2048) -> None:
        self._lock = threading.Lock()
        self.events = 0
        self.answered = 0
        self.duplicates = 0
        self.stale = 0
        self.checkouts = 0
        self.unknown_product_ids = 0
        self.reconnects = 0
        self.dropped = 0
        self.errors: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self._latency = LatencyReservoir(reservoir_size)

    # -- recording -------------------------------------------------------------------------
    def event(self) -> None:
        with self._lock:
            self.events += 1

    def answer(self, model: str, latency_s: float | None = None) -> None:
        with self._lock:
            self.answered += 1
            self.by_model[model] += 1
            if latency_s is not None:
                self._latency.add(latency_s)

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def duplicate(self) -> None:
        with self._lock:
            self.duplicates += 1

    def stale_event(self) -> None:
        with self._lock:
            self.stale += 1

    def checkout(self) -> None:
        with self._lock:
            self.checkouts += 1

    def unknown_ids(self, n: int) -> None:
        with self._lock:
            self.unknown_product_ids += n

    def reconnect(self) -> None:
        with self._lock:
            self.reconnects += 1

    def drop(self) -> None:
        with self._lock:
            self.dropped += 1

    # -- reading ---------------------------------------------------------------------------
    def latency_ms(self, q: float) -> float | None:
        with self._lock:
            v = self._latency.quantile(q)
        return None if v is None else round(v * 1000.0, 3)

    def snapshot(self) -> dict[str, Any]:
        """The status message's ``stats``: {"events", "errors", "p99_ms"} (+ "answered", "p50_ms")."""
        with self._lock:
            p50, p99 = self._latency.quantile(0.5), self._latency.quantile(0.99)
            return {"events": self.events, "errors": sum(self.errors.values()),
                    "p99_ms": None if p99 is None else round(p99 * 1000.0, 3),
                    "answered": self.answered,
                    "p50_ms": None if p50 is None else round(p50 * 1000.0, 3)}

    def render_prometheus(self) -> str:
        """All metrics in the Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            lat = self._latency
            q = {0.5: lat.quantile(0.5), 0.9: lat.quantile(0.9), 0.99: lat.quantile(0.99)}
            lines: list[str] = []

            def counter(name: str, help_: str, value: float | None = None,
                        labelled: dict[str, int] | None = None, label: str = "") -> None:
                lines.append(f"# HELP {_NS}_{name} {help_}")
                lines.append(f"# TYPE {_NS}_{name} counter")
                if labelled is None:
                    lines.append(f"{_NS}_{name} {value}")
                else:
                    for key, v in sorted(labelled.items()):
                        lines.append(f'{_NS}_{name}{{{label}="{_escape(key)}"}} {v}')

            counter("events_total", "Cart events received.", self.events)
            counter("answered_total", "Recommendations published, by model.",
                    labelled=dict(self.by_model), label="model")
            counter("errors_total", "Events answered with an error message, by kind.",
                    labelled=dict(self.errors), label="kind")
            counter("duplicates_total", "Events ignored as repeats of a seen event_id.", self.duplicates)
            counter("stale_total", "Events ignored because their seq was older than the last one.",
                    self.stale)
            counter("checkouts_total", "Checkout events (recommendations cleared).", self.checkouts)
            counter("unknown_product_ids_total", "Product ids in events that no model knows.",
                    self.unknown_product_ids)
            counter("reconnects_total", "Reconnections to the MQTT broker.", self.reconnects)
            counter("dropped_total", "Messages dropped because the work queue was full.", self.dropped)
            name = f"{_NS}_latency_seconds"
            lines.append(f"# HELP {name} Cart event receipt to recommendation publish, seconds "
                         f"(quantiles over the last {lat._size} events).")
            lines.append(f"# TYPE {name} summary")
            for quant, v in q.items():
                lines.append(f'{name}{{quantile="{quant}"}} {"NaN" if v is None else repr(v)}')
            lines.append(f"{name}_sum {lat.total!r}")
            lines.append(f"{name}_count {lat.count}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

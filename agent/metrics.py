"""Thread-safe counters and latency, exposed through prometheus-client and in the status message.

One :class:`Metrics` instance is shared by the MQTT worker and the HTTP bridge.
Latency is kept twice, both updated under the one lock of :meth:`Metrics.answer`:

- a Prometheus histogram ``smartbasket_agent_latency_seconds{model=...}`` with fixed buckets
  (:data:`LATENCY_BUCKETS`, suited to a sub-millisecond service); buckets of many agents add up, so a
  store's p99 is ``histogram_quantile(0.99, sum by (le) (rate(..._bucket[5m])))``;
- a ring buffer of the last ``reservoir_size`` observations, for the p50/p99 of the status message
  (:meth:`Metrics.snapshot`), computed on demand.

Each instance has its own ``CollectorRegistry`` (:attr:`Metrics.registry`), never the global default one;
``prometheus_client.generate_latest(metrics.registry)`` renders it. The instance itself is the registry's
collector: the counters stay plain integers behind the lock, and families are built only when scraped
(no ``_created`` samples).

Gauges (queue depth, connected, the broker's own drop count) belong to the MQTT
adapter; the service registers a function that reads them (:meth:`Metrics.set_gauges`),
so /metrics and the status show what the agent cannot see in its counters: a
broker that drops events for it. A gauge whose value is None is left out.
"""

from __future__ import annotations

import logging
import math
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

_LOG = logging.getLogger(__name__)

__all__ = ["LatencyReservoir", "Metrics", "GAUGES", "LATENCY_BUCKETS"]

_NS = "smartbasket_agent"

#: gauge name -> help; values come from the function given to Metrics.set_gauges
GAUGES = {
    "connected": "1 when connected (and subscribed) to the MQTT broker, else 0.",
    "queue_depth": "Messages received and not yet handled (reading stops while the work queue is full).",
    "unacked": "Handled events whose acknowledgement waits for their answer's PUBACK.",
    "broker_dropped": "The broker's $SYS/broker/publish/messages/dropped, all clients (absent when not readable).",
    "baskets": "Baskets whose state the agent keeps.",
    "basket_bytes": "Bytes of basket state, as accounted against baskets.max_bytes.",
}


#: upper bounds (seconds) of the latency histogram's buckets; +Inf is added after the last
LATENCY_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25, 1.0)
_LE = tuple(floatToGoString(b) for b in LATENCY_BUCKETS) + ("+Inf",)

#: counter attribute -> (exposed name, help), in exposition order; answered/errors are labelled, see collect()
_COUNTERS = (
    ("events", "events_total", "Cart events received."),
    ("duplicates", "duplicates_total", "Events ignored as repeats of a seen event_id."),
    ("stale", "stale_total", "Events ignored because their seq was older than the last one."),
    ("checkouts", "checkouts_total", "Checkout events (recommendations cleared)."),
    ("unknown_product_ids", "unknown_product_ids_total", "Product ids in events that no model knows."),
    ("reconnects", "reconnects_total", "Reconnections to the MQTT broker."),
    ("dropped", "dropped_total",
     "Messages the agent dropped (none by design: reading stops while the work queue is full)."),
    ("retained_ignored", "retained_ignored_total",
     "Retained messages on cart topics ignored (replays of old state)."),
    ("aged", "aged_total", "Snapshot events older than limits.max_event_age_s: applied, not answered."),
    ("redelivered_skipped", "redelivered_skipped_total",
     "Copies of events from an earlier connection left to the broker's redelivery."),
    ("left_unhandled", "left_unhandled_total", "Events left unacknowledged at shutdown for the next session."),
    ("evicted", "evicted_baskets_total",
     "Baskets evicted (least recently used) to stay within the memory budget."),
    ("unknown_fields", "unknown_fields_total", "Event fields the agent does not read (ignored)."),
    ("reused_ids", "reused_event_ids_total", "Duplicates whose bytes differ from the first event with that id."),
)


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
        self.retained_ignored = 0
        self.evicted = 0
        self.unknown_fields = 0
        self.reused_ids = 0
        self.aged = 0
        self.redelivered_skipped = 0
        self.left_unhandled = 0
        self.errors: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self._latency = LatencyReservoir(reservoir_size)
        # model -> per-bucket counts (not cumulative; the last one is +Inf) followed by the sum of latencies
        self._hist: dict[str, list[float]] = {}
        self._gauges: Callable[[], Mapping[str, float | int | None]] | None = None
        #: this instance's own registry (never prometheus_client's global REGISTRY): generate_latest(registry)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

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
                h = self._hist.get(model)
                if h is None:
                    h = self._hist[model] = [0] * (len(LATENCY_BUCKETS) + 2)
                h[bisect_left(LATENCY_BUCKETS, latency_s)] += 1  # the first bucket with latency <= le
                h[-1] += latency_s

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

    def evicted_baskets(self, n: int) -> None:
        """Baskets dropped to stay within baskets.max_bytes / max_baskets."""
        with self._lock:
            self.evicted += n

    def unknown_field(self, n: int) -> None:
        with self._lock:
            self.unknown_fields += n

    def reused_id(self) -> None:
        """An event_id repeated with other content in the same trip (a sensor bug)."""
        with self._lock:
            self.reused_ids += 1

    def retained(self) -> None:
        """A retained message on a cart topic: a replay of old state, ignored."""
        with self._lock:
            self.retained_ignored += 1

    def aged_event(self) -> None:
        """A snapshot older than limits.max_event_age_s: applied, not answered."""
        with self._lock:
            self.aged += 1

    def redelivered(self) -> None:
        """A message of an earlier connection the broker resends: this copy was not handled."""
        with self._lock:
            self.redelivered_skipped += 1

    def left(self, n: int) -> None:
        """Messages left unhandled (and unacknowledged) at shutdown, for the next session."""
        with self._lock:
            self.left_unhandled += n

    def set_gauges(self, read: Callable[[], Mapping[str, float | int | None]] | None) -> None:
        """``read()`` returns the current values of :data:`GAUGES` (None = not known); keep it cheap."""
        self._gauges = read

    def gauges(self) -> dict[str, float | int]:
        read = self._gauges
        if read is None:
            return {}
        try:
            values = read()
        except Exception:
            _LOG.exception("reading gauges failed")
            return {}
        return {k: v for k, v in values.items() if k in GAUGES and v is not None}

    # -- reading ---------------------------------------------------------------------------
    def latency_ms(self, q: float) -> float | None:
        with self._lock:
            v = self._latency.quantile(q)
        return None if v is None else round(v * 1000.0, 3)

    def snapshot(self) -> dict[str, Any]:
        """The status message's ``stats``: {"events", "errors", "p99_ms"} (+ "answered", "p50_ms",
        "dropped", "retained_ignored", "aged", and the gauges that are known)."""
        gauges = self.gauges()
        with self._lock:
            p50, p99 = self._latency.quantile(0.5), self._latency.quantile(0.99)
            return {"events": self.events, "errors": sum(self.errors.values()),
                    "p99_ms": None if p99 is None else round(p99 * 1000.0, 3),
                    "answered": self.answered,
                    "p50_ms": None if p50 is None else round(p50 * 1000.0, 3),
                    "dropped": self.dropped, "retained_ignored": self.retained_ignored, "aged": self.aged,
                    **gauges}

    def collect(self) -> Iterator[Metric]:
        """The metric families, for :attr:`registry` (prometheus-client's Collector protocol)."""
        gauges = self.gauges()
        with self._lock:
            plain = [(getattr(self, attr), name, help_) for attr, name, help_ in _COUNTERS]
            by_model, errors = dict(self.by_model), dict(self.errors)
            hist = {model: list(h) for model, h in self._hist.items()}
        yield CounterMetricFamily(f"{_NS}_{plain[0][1]}", plain[0][2], value=plain[0][0])
        answered = CounterMetricFamily(f"{_NS}_answered_total", "Recommendations published, by model.",
                                       labels=["model"])
        for model, n in sorted(by_model.items()):
            answered.add_metric([model], n)
        yield answered
        errs = CounterMetricFamily(f"{_NS}_errors_total", "Events answered with an error message, by kind.",
                                   labels=["kind"])
        for kind, n in sorted(errors.items()):
            errs.add_metric([kind], n)
        yield errs
        for value, name, help_ in plain[1:]:
            yield CounterMetricFamily(f"{_NS}_{name}", help_, value=value)
        for key, value in gauges.items():
            yield GaugeMetricFamily(f"{_NS}_{key}", GAUGES[key], value=value)
        latency = HistogramMetricFamily(f"{_NS}_latency_seconds",
                                        "Cart event receipt to recommendation publish, seconds.", labels=["model"])
        for model, h in sorted(hist.items()):
            cumulative, buckets = 0, []
            for le, n in zip(_LE, h):
                cumulative += n
                buckets.append((le, cumulative))
            latency.add_metric([model], buckets, sum_value=h[-1])
        yield latency

    def render_prometheus(self) -> str:
        """All metrics in the Prometheus text exposition format: ``generate_latest(self.registry)``."""
        return generate_latest(self.registry).decode("utf-8")

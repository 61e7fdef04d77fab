"""/metrics through prometheus-client: exact names, a real latency histogram, no shared state (issue 8, item 8).

Every check parses the exposition with prometheus-client's own parser, as a scraper would.
"""

from __future__ import annotations

import math
import threading

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.http import create_app
from agent.metrics import GAUGES, LATENCY_BUCKETS, Metrics
from agent.registry import ModelRegistry

NS = "smartbasket_agent"
LATENCY = f"{NS}_latency_seconds"

#: every counter /metrics exposed before prometheus-client (dashboards query these names)
COUNTERS = ["events_total", "answered_total", "errors_total", "duplicates_total", "stale_total",
            "checkouts_total", "unknown_product_ids_total", "reconnects_total", "dropped_total",
            "retained_ignored_total", "aged_total", "redelivered_skipped_total", "left_unhandled_total",
            "evicted_baskets_total", "unknown_fields_total", "reused_event_ids_total"]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, over every family of ``text``."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"sample {key} repeated"
            out[key] = s.value
    return out


def types(text: str) -> dict[str, str]:
    """Name on the ``# TYPE`` line -> type, as written (the text format keeps a counter's _total)."""
    return {parts[2]: parts[3] for line in text.splitlines()
            if line.startswith("# TYPE ") and (parts := line.split())}


def buckets(text: str, model: str) -> list[tuple[float, float]]:
    """The (le, cumulative count) pairs of ``model``'s latency histogram, in order of le."""
    got = [(float(dict(k)["le"]), v) for (name, k), v in samples(text).items()
           if name == f"{LATENCY}_bucket" and dict(k).get("model") == model]
    return sorted(got)


def test_histogram_buckets_are_cumulative_and_count_the_answers() -> None:
    m = Metrics()
    latencies = [i / 1e5 for i in range(1, 400)] + [0.3, 2.0, 7.5]  # 10 µs .. 4 ms, and a slow tail
    for s in latencies:
        m.answer("guest", s)
    m.answer("guest")  # an answer without a latency: answered, not observed
    text = m.render_prometheus()
    assert types(text)[LATENCY] == "histogram"
    got = buckets(text, "guest")
    assert [le for le, _ in got] == [*LATENCY_BUCKETS, math.inf]
    counts = [c for _, c in got]
    assert counts == sorted(counts), "buckets must be cumulative"
    for le, c in got:
        assert c == sum(1 for s in latencies if s <= le), le
    values = samples(text)
    assert values[(f"{LATENCY}_count", (("model", "guest"),))] == len(latencies) == counts[-1]
    assert values[(f"{LATENCY}_sum", (("model", "guest"),))] == pytest.approx(sum(latencies))
    assert values[(f"{NS}_answered_total", (("model", "guest"),))] == len(latencies) + 1


def test_bucket_placement_of_known_latencies() -> None:
    m = Metrics()
    m.answer("guest", 0.0003)  # 300 µs: above 0.00025, within 0.0005
    m.answer("member", 0.003)  # 3 ms: above 0.002, within 0.005
    m.answer("member", 0.001)  # exactly on a bound: le means <=, so it is in le="0.001"
    text = m.render_prometheus()
    guest = dict(buckets(text, "guest"))
    assert guest[0.00025] == 0 and guest[0.0005] == 1 and guest[math.inf] == 1
    member = dict(buckets(text, "member"))
    assert member[0.0005] == 0 and member[0.001] == 1 and member[0.002] == 1
    assert member[0.005] == 2 and member[1.0] == 2 and member[math.inf] == 2
    values = samples(text)
    assert values[(f"{LATENCY}_count", (("model", "member"),))] == 2
    assert values[(f"{LATENCY}_sum", (("model", "member"),))] == pytest.approx(0.004)


def test_counters_keep_their_names_and_values() -> None:
    m = Metrics()
    for _ in range(5):
        m.event()
    m.answer("guest", 0.0002)
    m.answer("member", 0.0004)
    m.answer("member", 0.0004)
    m.error("json")
    m.error("json")
    m.error("schema")
    m.duplicate()
    m.unknown_ids(3)
    m.evicted_baskets(2)
    m.reused_id()
    m.aged_event()
    m.left(4)
    text = m.render_prometheus()
    typed = types(text)
    for name in COUNTERS:
        assert typed[f"{NS}_{name}"] == "counter", name
    assert not [line for line in text.splitlines() if "_total_total" in line or "_created" in line]
    values = samples(text)
    assert values[(f"{NS}_events_total", ())] == 5
    assert values[(f"{NS}_answered_total", (("model", "guest"),))] == 1
    assert values[(f"{NS}_answered_total", (("model", "member"),))] == 2
    assert values[(f"{NS}_errors_total", (("kind", "json"),))] == 2
    assert values[(f"{NS}_errors_total", (("kind", "schema"),))] == 1
    assert values[(f"{NS}_duplicates_total", ())] == 1
    assert values[(f"{NS}_unknown_product_ids_total", ())] == 3
    assert values[(f"{NS}_evicted_baskets_total", ())] == 2
    assert values[(f"{NS}_reused_event_ids_total", ())] == 1
    assert values[(f"{NS}_aged_total", ())] == 1
    assert values[(f"{NS}_left_unhandled_total", ())] == 4
    assert values[(f"{NS}_stale_total", ())] == 0
    # the sample names, exactly: the unlabelled counters, the labelled ones, the histogram; nothing else
    names = {name for name, _ in values}
    assert names == {f"{NS}_{c}" for c in COUNTERS} | {f"{LATENCY}_bucket", f"{LATENCY}_count", f"{LATENCY}_sum"}


def test_label_values_are_escaped() -> None:
    m = Metrics()
    m.error('we"ird\\kind\nline')
    assert samples(m.render_prometheus())[(f"{NS}_errors_total", (("kind", 'we"ird\\kind\nline'),))] == 1


def test_gauges_appear_and_none_is_omitted() -> None:
    m = Metrics()
    m.set_gauges(lambda: {"connected": 1, "queue_depth": 7, "broker_dropped": None, "not_a_gauge": 3})
    text = m.render_prometheus()
    typed = types(text)
    assert typed[f"{NS}_connected"] == typed[f"{NS}_queue_depth"] == "gauge"
    values = samples(text)
    assert values[(f"{NS}_connected", ())] == 1 and values[(f"{NS}_queue_depth", ())] == 7
    assert f"{NS}_broker_dropped" not in text and "not_a_gauge" not in text
    assert set(GAUGES) >= {name.removeprefix(f"{NS}_") for name, t in typed.items() if t == "gauge"}


def test_a_failing_gauge_reader_leaves_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    m.event()

    def broken() -> dict[str, int]:
        raise RuntimeError("adapter gone")

    m.set_gauges(broken)
    text = m.render_prometheus()
    assert samples(text)[(f"{NS}_events_total", ())] == 1
    assert "gauge" not in types(text).values()
    assert "reading gauges failed" in caplog.text


def test_instances_do_not_share_state() -> None:
    a, b = Metrics(), Metrics()
    a.event()
    a.answer("guest", 0.0003)
    a.error("json")
    b.set_gauges(lambda: {"connected": 0})
    ta, tb = samples(a.render_prometheus()), samples(b.render_prometheus())
    assert ta[(f"{NS}_events_total", ())] == 1 and tb[(f"{NS}_events_total", ())] == 0
    assert (f"{NS}_errors_total", (("kind", "json"),)) not in tb
    assert not [k for k in tb if k[0].startswith(LATENCY)]
    assert (f"{NS}_connected", ()) in tb and (f"{NS}_connected", ()) not in ta
    assert a.registry is not b.registry
    # nothing lands in prometheus-client's global registry (tests and the service create many Metrics)
    assert NS not in generate_latest(REGISTRY).decode()


def test_status_percentiles_still_come_from_the_reservoir() -> None:
    m = Metrics()
    assert m.snapshot()["p50_ms"] is None and m.snapshot()["p99_ms"] is None
    for i in range(1, 101):
        m.answer("guest", i / 1e5)  # 0.01 .. 1.00 ms
    snap = m.snapshot()
    assert snap["p50_ms"] == pytest.approx(0.5) and snap["p99_ms"] == pytest.approx(0.99)
    assert snap["answered"] == 100


def test_concurrent_answers_are_all_counted() -> None:
    m = Metrics()

    def work() -> None:
        for i in range(2000):
            m.answer("guest", (i % 50 + 1) / 1e4)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    values = samples(m.render_prometheus())
    assert values[(f"{LATENCY}_count", (("model", "guest"),))] == 8000
    assert values[(f"{LATENCY}_bucket", (("le", "+Inf"), ("model", "guest")))] == 8000


def test_metrics_route_over_the_app() -> None:
    metrics = Metrics()
    metrics.event()
    metrics.answer("member", 0.0004)
    metrics.set_gauges(lambda: {"connected": 1, "baskets": None})
    client = TestClient(create_app(ModelRegistry(None), metrics))
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    values = samples(r.text)
    assert values[(f"{NS}_events_total", ())] == 1
    assert values[(f"{LATENCY}_count", (("model", "member"),))] == 1
    assert values[(f"{LATENCY}_bucket", (("le", "0.0005"), ("model", "member")))] == 1
    assert values[(f"{NS}_connected", ())] == 1 and f"{NS}_baskets" not in r.text
    assert types(r.text)[LATENCY] == "histogram"

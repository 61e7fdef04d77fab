"""Pure tests: topic names, cart event parsing, the per-basket state machine, metrics."""

from __future__ import annotations

import json
import re
import threading

import pytest

from agent.errors import EventError
from agent.events import BasketStates, CartEvent, EventLimits, InvalidEvent, parse_cart_event
from agent.metrics import Metrics
from agent.topics import BasketTopic, Topics


def ev(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def parse(**fields: object) -> CartEvent:
    return parse_cart_event(ev(**fields))


# -- topics ----------------------------------------------------------------------------------

def test_topics_build_and_parse() -> None:
    t = Topics("/smartbasket/store-17/")
    assert t.prefix == "smartbasket/store-17"
    assert t.cart("b-1") == "smartbasket/store-17/basket/b-1/cart"
    assert t.recommendations("b-1") == "smartbasket/store-17/basket/b-1/recommendations"
    assert t.errors("b-1") == "smartbasket/store-17/basket/b-1/errors"
    assert t.models_updated == "smartbasket/store-17/models/updated"
    assert t.status("jetson-07") == "smartbasket/store-17/agent/jetson-07/status"
    assert t.cart_subscription == "smartbasket/store-17/basket/+/cart"
    assert t.parse_cart("smartbasket/store-17/basket/b-1/cart") == "b-1"
    assert t.parse_basket(t.errors("x")) == BasketTopic("smartbasket/store-17", "x", "errors")


def test_topics_remember_only_what_passed_and_stay_bounded() -> None:
    """parse_cart and recommendations are cached per topic / basket (per event they were ~5 % of a
    guest event): the cache never answers for a topic that failed, nor grows without bound."""
    from agent import topics as topics_module

    t = Topics("s")
    for _ in range(2):  # the second time from the cache: the same answer
        assert t.parse_cart("s/basket/b-1/cart") == "b-1"
        assert t.recommendations("b-1") == "s/basket/b-1/recommendations"
        with pytest.raises(EventError):
            t.parse_cart("s/basket/b-1/errors")
        with pytest.raises(ValueError):
            t.recommendations("a/b")
    assert t == Topics("s") and hash(t) == hash(Topics("s"))  # the caches are not part of the value
    for i in range(topics_module._CACHED + 10):
        assert t.parse_cart(f"s/basket/b{i}/cart") == f"b{i}"
        assert t.recommendations(f"b{i}").endswith(f"/b{i}/recommendations")
    assert len(t._basket_of) <= topics_module._CACHED and len(t._answers_to) <= topics_module._CACHED


@pytest.mark.parametrize("topic", [
    "smartbasket/basket//cart",                  # empty basket id
    "smartbasket/basket/a/b/cart",               # id with '/'
    "smartbasket/basket/b-1/recommendations",    # not a cart topic
    "other/basket/b-1/cart",
    "smartbasket/basket/cart",
])
def test_parse_cart_rejects(topic: str) -> None:
    with pytest.raises(EventError):
        Topics().parse_cart(topic)


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x\x00"])
def test_ids_validated(bad: str) -> None:
    with pytest.raises(ValueError):
        Topics().cart(bad)
    with pytest.raises(ValueError):
        Topics().status(bad)


@pytest.mark.parametrize("prefix", ["", "/", "a/+/b", "a/#", "a//b"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(ValueError):
        Topics(prefix)


# -- parsing ---------------------------------------------------------------------------------

def test_full_snapshot_event() -> None:
    e = parse(event_id="e-1", seq=17, ts="2026-11-23T14:03:11+09:00",
              user={"user_id": "12345", "gender": 1, "age": 34}, cart=["1024", "2981", "1024"],
              wishlist=["1555"], top_k=3, extension="ignored")
    assert e.cart == ("1024", "2981")  # order kept, duplicate dropped
    assert e.wishlist == ("1555",) and e.top_k == 3 and e.seq == 17 and e.event_id == "e-1"
    assert (e.user.user_id, e.user.gender, e.user.age) == ("12345", 1, 34)
    assert e.is_snapshot and e.action is None


def test_defaults_and_guest() -> None:
    e = parse(cart=[])
    assert e.cart == () and e.top_k == 10 and e.user.user_id is None and e.wishlist is None
    assert parse(cart=["a"], user=None).user.user_id is None
    assert parse(cart=["a"], user={"user_id": "guest", "age": 30}).user.user_id is None
    assert parse(cart=["a"], user={"user_id": "u", "gender": None, "age": None}).user.user_id == "u"
    assert parse_cart_event(ev(cart=["a"]), EventLimits(default_top_k=4)).top_k == 4
    assert parse(event_id=7, cart=["a"]).event_id == 7


def test_delta_forms() -> None:
    assert parse(action="add", product_id="p").product_id == "p"
    assert parse(action="remove", product_id="p").action == "remove"
    assert parse(action="clear").product_id is None
    assert parse(action="checkout", product_id="p").product_id is None


BAD = [
    (b"\xff\xfe{}", "not valid UTF-8", "encoding"),
    (b"{not json", "not JSON", "json"),
    (b"", "not JSON", "json"),
    (b"[1, 2]", "must be a JSON object, got list", "schema"),
    (b'"cart"', "must be a JSON object, got string", "schema"),
    (b"null", "must be a JSON object, got null", "schema"),
    (ev(event_id="e"), "missing cart content", "schema"),
    (ev(event_id="e", wishlist=["a"]), "missing cart content", "schema"),
    (ev(cart="1024"), "'cart' must be a list", "schema"),
    (ev(cart={"a": 1}), "'cart' must be a list", "schema"),
    (ev(cart=[1024]), "'cart[0]' must be a product id string, got integer", "schema"),
    (ev(cart=["a", None]), "'cart[1]' must be a product id string, got null", "schema"),
    (ev(cart=[""]), "'cart[0]' must be a non-empty UTF-8 string", "schema"),
    (b'{"cart": ["\\ud800"]}', "'cart[0]' must be a non-empty UTF-8 string", "schema"),
    (b'{"event_id": "\\udc00", "cart": ["a"]}', "'event_id' must be", "schema"),
    (b'{"cart": ["a"], "user": {"user_id": "\\ud83d"}}', "user_id", "schema"),
    (b"[" * 50_000, "not JSON", "json"),
    (ev(cart=["a"], wishlist="b"), "'wishlist' must be a list", "schema"),
    (ev(cart=["a"], wishlist=[5]), "'wishlist[0]' must be a product id string", "schema"),
    (ev(cart=[str(i) for i in range(201)]), "'cart' has 201 items, more than the limit of 200", "schema"),
    (ev(cart=[], wishlist=[str(i) for i in range(201)]), "'wishlist' has 201 items", "schema"),
    (ev(action="buy", product_id="a"), "unknown action 'buy'", "schema"),
    (ev(action=3), "unknown action 3", "schema"),
    (ev(action="add"), "'product_id' must be a non-empty string for action 'add'", "schema"),
    (ev(action="remove", product_id=""), "'product_id' must be a non-empty string", "schema"),
    (ev(action="add", product_id=12), "'product_id' must be a non-empty string", "schema"),
    (ev(cart=["a"], action="add", product_id="b"), "not both", "schema"),
    (ev(cart=["a"], top_k=0), "'top_k' must be an integer 1..100, got 0", "schema"),
    (ev(cart=["a"], top_k=101), "'top_k' must be an integer 1..100, got 101", "schema"),
    (ev(cart=["a"], top_k="5"), "'top_k' must be an integer", "schema"),
    (ev(cart=["a"], top_k=2.5), "'top_k' must be an integer", "schema"),
    (ev(cart=["a"], top_k=True), "'top_k' must be an integer", "schema"),
    (ev(cart=["a"], user={"gender": 1}), "'user.user_id' must be a non-empty string", "schema"),
    (ev(cart=["a"], user={"user_id": ""}), "'user.user_id' must be a non-empty string", "schema"),
    (ev(cart=["a"], user={"user_id": 12345}), "'user.user_id' must be a non-empty string", "schema"),
    (ev(cart=["a"], user="12345"), "'user' must be an object or null", "schema"),
    (ev(cart=["a"], user={"user_id": "u", "gender": 2}), "'user.gender' must be 0, 1 or null", "schema"),
    (ev(cart=["a"], user={"user_id": "u", "gender": True}), "'user.gender' must be 0, 1", "schema"),
    (ev(cart=["a"], user={"user_id": "u", "gender": "f"}), "'user.gender'", "schema"),
    (ev(cart=["a"], user={"user_id": "u", "age": 121}), "'user.age' must be null or an integer 0..120",
     "schema"),
    (ev(cart=["a"], user={"user_id": "u", "age": -1}), "'user.age'", "schema"),
    (ev(cart=["a"], user={"user_id": "u", "age": 34.5}), "'user.age'", "schema"),
    (ev(cart=["a"], user={"user_id": "u", "age": False}), "'user.age'", "schema"),
    (ev(cart=["a"], seq=-1), "'seq' must be a non-negative integer", "schema"),
    (ev(cart=["a"], seq="3"), "'seq' must be a non-negative integer", "schema"),
    (ev(cart=["a"], seq=True), "'seq' must be a non-negative integer", "schema"),
    (ev(cart=["a"], event_id=["x"]), "'event_id' must be a non-empty string or an integer", "schema"),
    (ev(cart=["a"], event_id=""), "'event_id'", "schema"),
    (ev(cart=["a"], ts=5), "'ts' must be a string", "schema"),
    (b"[" * 100000 + b"]" * 100000, "over the limit of 65536 bytes", "too_large"),
]


@pytest.mark.parametrize(("payload", "message", "kind"), BAD, ids=[m for _, m, _ in BAD])
def test_bad_events(payload: bytes, message: str, kind: str) -> None:
    with pytest.raises(InvalidEvent, match=re.escape(message)) as info:
        parse_cart_event(payload)
    assert info.value.kind == kind
    assert isinstance(info.value, EventError)


def test_oversize_payload_and_limits() -> None:
    big = ev(cart=["x" * 100] * 700)
    assert len(big) > 65536
    with pytest.raises(InvalidEvent, match=f"payload of {len(big)} bytes is over the limit"):
        parse_cart_event(big)
    limits = EventLimits(max_payload_bytes=100, max_items=2, max_top_k=5, default_top_k=3)
    with pytest.raises(InvalidEvent, match="over the limit of 100 bytes"):
        parse_cart_event(ev(cart=["a" * 200]), limits)
    with pytest.raises(InvalidEvent, match="more than the limit of 2"):
        parse_cart_event(ev(cart=["a", "b", "c"]), limits)
    with pytest.raises(InvalidEvent, match=r"1\.\.5"):
        parse_cart_event(ev(cart=["a"], top_k=6), limits)
    with pytest.raises(ValueError):
        EventLimits(default_top_k=20, max_top_k=10)


def test_deep_nesting_is_not_json() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_cart_event(b"[" * 30000 + b"]" * 30000)
    assert info.value.kind == "json"


def test_event_id_echoed_in_errors() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_cart_event(ev(event_id="e-9", cart=[1]))
    assert info.value.event_id == "e-9"
    with pytest.raises(InvalidEvent) as info:
        parse_cart_event(b"not json")
    assert info.value.event_id is None


def test_accepts_config_limits() -> None:

    with pytest.raises(InvalidEvent, match="limit of 1"):
        parse_cart_event(ev(cart=["a", "b"]), EventLimits(max_items=1))


# -- state machine ---------------------------------------------------------------------------

def apply(states: BasketStates, now: float = 0.0, basket: str = "b", **fields: object):
    return states.apply(basket, parse(**fields), now)


def test_snapshot_and_delta_equivalent() -> None:
    snap, delta = BasketStates(), BasketStates()
    final = apply(snap, cart=["a", "c"], wishlist=["w"])
    apply(delta, action="add", product_id="a")
    apply(delta, action="add", product_id="b")
    apply(delta, action="add", product_id="a")     # already there: no duplicate
    apply(delta, action="add", product_id="c")
    apply(delta, action="remove", product_id="b")
    apply(delta, action="remove", product_id="zz")  # not there: no-op
    out = apply(delta, action="add", product_id="c", wishlist=["w"])
    assert out.kind == final.kind == "answer"
    assert out.cart == final.cart == ("a", "c")
    assert out.wishlist == final.wishlist == ("w",)
    assert apply(delta, action="clear").cart == ()
    assert apply(delta, action="add", product_id="x").wishlist == ("w",)  # wishlist kept
    assert apply(delta, cart=["y"]).cart == ("y",)                       # snapshot replaces


def test_duplicate_event_id_answered_once() -> None:
    s = BasketStates()
    assert apply(s, event_id="e1", action="add", product_id="a").kind == "answer"
    assert apply(s, event_id="e1", action="add", product_id="a").kind == "duplicate"
    assert apply(s, event_id="e1", cart=["q"]).kind == "duplicate"
    assert apply(s, event_id="e1", basket="other", cart=["a"]).kind == "answer"  # per basket
    assert apply(s, event_id="e2", action="add", product_id="b").cart == ("a", "b")


def test_recent_ids_bounded() -> None:
    s = BasketStates(recent_ids=3)
    for i in range(5):
        apply(s, event_id=f"e{i}", cart=["a"])
    assert apply(s, event_id="e4", cart=["a"]).kind == "duplicate"
    assert apply(s, event_id="e0", cart=["a"]).kind == "answer"  # forgotten: LRU of 3
    assert len(s.get("b").recent) == 3


def test_stale_seq_ignored_equal_seq_applied() -> None:
    s = BasketStates()
    assert apply(s, seq=5, event_id="e5", cart=["a"]).kind == "answer"
    assert apply(s, seq=4, event_id="e4", cart=["old"]).kind == "stale"
    assert s.get("b").cart == ["a"]
    # equal seq, different event_id: applied (documented in agent.events)
    out = apply(s, seq=5, event_id="e5b", action="add", product_id="b")
    assert out.kind == "answer" and out.cart == ("a", "b")
    assert apply(s, event_id="nos", action="add", product_id="c").kind == "answer"  # no seq: applied
    assert s.get("b").last_seq == 5
    assert apply(s, seq=6, event_id="out", action="checkout").kind == "checkout"
    assert s.get("b").cart == [] and s.get("b").last_seq is None
    # a redelivery is byte-identical (issue 7: the same id with other content after a checkout is a new trip's)
    assert apply(s, seq=5, event_id="e5b", action="add", product_id="b").kind == "duplicate"  # redelivery
    assert apply(s, seq=6, event_id="out", action="checkout").kind == "duplicate"
    # (issue 7) an id-less event with a seq below the checkout's was "stale" here for 60 s, which lost a new
    # trip restarting its seq; now only byte-identical redeliveries are: test_checkout_starts_a_new_sequence
    # after the grace period a new trip may restart its seq and its event ids
    assert apply(s, now=61, seq=1, event_id="e5", cart=["fresh"]).cart == ("fresh",)


def test_stale_checkout_ignored() -> None:
    s = BasketStates()
    apply(s, seq=10, cart=["a"])
    assert apply(s, seq=9, action="checkout").kind == "stale"
    assert "b" in s


def test_ttl_expiry_and_touch() -> None:
    s = BasketStates(idle_ttl_s=100)
    apply(s, now=0, basket="b1", cart=["a"])
    apply(s, now=50, basket="b2", cart=["a"])
    assert s.expire(99) == []
    apply(s, now=90, basket="b1", action="add", product_id="z")  # touched again
    assert s.expire(151) == ["b2"]
    assert s.expire(191) == ["b1"]
    assert len(s) == 0
    assert apply(s, now=200, basket="b1", action="add", product_id="n").cart == ("n",)


def test_bounded_baskets_evicts_least_recent() -> None:
    s = BasketStates(max_baskets=2)
    apply(s, now=1, basket="b1", cart=["a"])
    apply(s, now=2, basket="b2", cart=["a"])
    apply(s, now=3, basket="b1", cart=["a"])
    apply(s, now=4, basket="b3", cart=["a"])
    assert "b2" not in s and "b1" in s and "b3" in s and len(s) == 2


def test_delta_adds_bounded_by_max_items() -> None:
    s = BasketStates(max_items=2)
    apply(s, action="add", product_id="a")
    assert apply(s, action="add", product_id="b").cart == ("a", "b")
    with pytest.raises(InvalidEvent, match="limit"):
        apply(s, action="add", product_id="c")
    assert s.get("b").cart == ["a", "b"]
    assert apply(s, action="add", product_id="a").cart == ("a", "b")  # already there: fine


# -- metrics ---------------------------------------------------------------------------------

def test_metrics_threads_and_render() -> None:
    m = Metrics(reservoir_size=100)

    def work() -> None:
        for i in range(1000):
            m.event()
            m.answer("guest", (i % 100 + 1) / 1e5)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m.error("json")
    m.error("json")
    m.error("schema")
    m.unknown_ids(3)
    snap = m.snapshot()
    assert snap["events"] == 4000 and snap["errors"] == 3 and snap["answered"] == 4000
    assert snap["p50_ms"] == pytest.approx(0.5) and snap["p99_ms"] == pytest.approx(0.99)
    text = m.render_prometheus()
    assert "# TYPE smartbasket_agent_events_total counter" in text
    assert "smartbasket_agent_events_total 4000" in text
    assert 'smartbasket_agent_errors_total{kind="json"} 2' in text
    assert 'smartbasket_agent_answered_total{model="guest"} 4000' in text
    assert "# TYPE smartbasket_agent_latency_seconds histogram" in text
    assert 'smartbasket_agent_latency_seconds_count{model="guest"} 4000' in text
    label = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
    sample = re.compile(rf'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{{{label}(,{label})*\}})? \S+$')
    for line in text.splitlines():
        assert line.startswith(("# HELP ", "# TYPE ")) or sample.match(line), line


def test_metrics_empty() -> None:
    m = Metrics()
    assert m.snapshot()["p99_ms"] is None
    text = m.render_prometheus()
    assert "# TYPE smartbasket_agent_latency_seconds histogram" in text
    assert "smartbasket_agent_latency_seconds_bucket" not in text  # no answers yet: no series


# -- issue 7: state bounded in bytes -------------------------------------------------------------

#: Builds 10,000 baskets, each from one in-limit event of ~62 KB (120 cart + 120 wishlist ids of
#: 256 characters), with the default budget; prints RSS growth (from /proc) and the accounting.
RSS_PROBE = r"""
import json, sys
sys.path.insert(0, ".")
from agent.events import BasketStates, parse_cart_event

def rss(field="VmRSS"):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

budget = int(sys.argv[1])
states = BasketStates(max_bytes=budget)
base, evicted = rss(), 0
for i in range(10_000):
    ids = [f"{i:08d}-{j:04d}-" + "x" * 242 for j in range(240)]
    payload = json.dumps({"event_id": f"e-{i}", "seq": 1, "cart": ids[:120], "wishlist": ids[120:]}).encode()
    evicted += len(states.apply(f"b-{i}", parse_cart_event(payload), float(i)).evicted)
print(json.dumps({"event_bytes": len(payload), "growth": rss() - base, "peak": rss("VmHWM") - base,
                  "nbytes": states.nbytes, "baskets": len(states), "evicted": evicted}))
"""


def test_memory_budget_holds_in_real_rss_for_10000_max_size_baskets() -> None:
    """The finding: 10,000 such baskets took RSS from 102 to 806 MB. Now the budget holds in reality."""
    import subprocess
    import sys
    from pathlib import Path

    budget = 64 * 2**20
    run = subprocess.run([sys.executable, "-c", RSS_PROBE, str(budget)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    print(f"\n10,000 baskets x {out['event_bytes']} B events, budget {budget / 2**20:.0f} MiB: kept "
          f"{out['baskets']}, evicted {out['evicted']}, accounted {out['nbytes'] / 2**20:.1f} MiB, "
          f"RSS growth {out['growth'] / 2**20:.1f} MiB (peak {out['peak'] / 2**20:.1f} MiB)")
    assert out["event_bytes"] > 60_000
    assert out["nbytes"] <= budget
    assert out["baskets"] + out["evicted"] == 10_000 and out["baskets"] < 1_000
    assert out["peak"] <= budget * 1.25  # real memory, allocator slack included


def test_accounted_bytes_cover_real_allocations() -> None:
    """The cheap estimate (lengths + fixed overheads) is never below what tracemalloc sees the state hold."""
    import gc
    import tracemalloc

    for alphabet in ("x", "é", "한", "😀"):
        ids = [f"{j:04d}" + alphabet * 200 for j in range(150)]
        big = [json.dumps({"event_id": f"e-{i}", "seq": i, "cart": ids[:100], "wishlist": ids[100:]},
                          ensure_ascii=False).encode() for i in range(60)]
        small = [ev(event_id=f"e-{i}-{alphabet}", seq=i, action="add", product_id=f"p{i % 30}")
                 for i in range(3000)]
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        s = BasketStates()
        for i, p in enumerate(big):
            s.apply(f"basket-{i}", parse_cart_event(p, EventLimits(max_payload_bytes=2**20)), 0.0)
        for i, p in enumerate(small):  # small baskets: the fixed overheads and the remembered ids dominate
            s.apply(f"small-{i % 100}", parse_cart_event(p), 0.0)
        s.apply("small-0", parse_cart_event(ev(action="checkout")), 1.0)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert s.nbytes == s.recount()
        print(f"\n{alphabet!r}: accounted {s.nbytes}, traced {traced}, ratio {s.nbytes / traced:.2f}")
        assert s.nbytes >= traced, (alphabet, s.nbytes, traced)
        if alphabet == "x":
            assert s.nbytes <= 2 * traced, (s.nbytes, traced)  # conservative, not absurd
        del s


def _basket_cost(n_items: int) -> int:
    """Accounted bytes of one basket holding ``n_items`` 20-character ids (measured, not assumed)."""
    s = BasketStates()
    s.apply("b-0", parse(cart=[f"{j:020d}" for j in range(n_items)]), 0.0)
    return s.nbytes


def test_budget_evicts_oldest_reports_it_and_refuses_its_deltas() -> None:
    cost = _basket_cost(10)
    s = BasketStates(max_bytes=3 * cost + cost // 2)
    cart = [f"{j:020d}" for j in range(10)]
    for i in range(3):
        assert apply(s, now=i, basket=f"b{i}", cart=cart).evicted == ()
    apply(s, now=3, basket="b0", action="add", product_id=cart[0])   # touched: b1 is now the oldest
    out = apply(s, now=4, basket="b3", cart=cart)
    assert out.kind == "answer" and out.evicted == ("b1",) and s.evictions == 1
    assert "b1" not in s and s.nbytes <= s.max_bytes
    # the evicted shopper's next delta is refused with a clear reason, not answered from a partial cart
    for delta in ({"action": "add", "product_id": "p"}, {"action": "remove", "product_id": "p"},
                  {"action": "clear"}):
        with pytest.raises(InvalidEvent, match="dropped.*snapshot") as info:
            apply(s, now=5, basket="b1", event_id="e-7", **delta)
        assert info.value.kind == "evicted" and info.value.event_id == "e-7"
        assert "'wishlist': [...]" in str(info.value)  # a snapshot without it leaves the wishlist empty
        assert len(str(info.value)) <= 300
    # a snapshot re-creates it (and makes room again)
    out = apply(s, now=6, basket="b1", cart=cart[:2])
    assert out.kind == "answer" and out.cart == tuple(cart[:2]) and out.evicted == ("b2",)
    assert apply(s, now=7, basket="b1", action="add", product_id="q").cart == (*cart[:2], "q")
    # a checkout of an evicted basket is simply a checkout
    assert apply(s, now=8, basket="b2", action="checkout").kind == "checkout"
    assert apply(s, now=9, basket="b2", action="add", product_id="n").cart == ("n",)


def test_max_baskets_evictions_are_reported_too() -> None:
    s = BasketStates(max_baskets=2)
    apply(s, now=1, basket="b1", cart=["a"])
    apply(s, now=2, basket="b2", cart=[])
    assert apply(s, now=3, basket="b3", cart=["a"]).evicted == ("b1",)
    assert apply(s, now=4, basket="b4", cart=["a"]).evicted == ("b2",)
    with pytest.raises(InvalidEvent) as info:
        apply(s, now=5, basket="b1", action="add", product_id="x")
    assert info.value.kind == "evicted"
    # b2's cart was empty when it was evicted: nothing was lost, a delta starts from empty again
    assert apply(s, now=6, basket="b2", action="add", product_id="x").cart == ("x",)


def test_remembered_evictions_are_bounded_and_expire() -> None:
    s = BasketStates(max_baskets=1, remember_evicted=2, idle_ttl_s=100)
    for i in range(5):
        apply(s, now=i, basket=f"b{i}", cart=["a"])
    assert apply(s, now=5, basket="b0", action="add", product_id="x").cart == ("x",)  # forgotten: only 2 kept
    with pytest.raises(InvalidEvent):
        apply(s, now=6, basket="b3", action="add", product_id="x")
    s.expire(1000)
    assert apply(s, now=1000, basket="b3", action="add", product_id="x").cart == ("x",)  # idle as long as a TTL


def test_accounting_follows_every_change_and_returns_to_zero() -> None:
    s = BasketStates(idle_ttl_s=10)
    apply(s, now=0, basket="a", event_id="1", cart=["x" * 100, "y"])
    after_snapshot = s.nbytes
    apply(s, now=0, basket="a", event_id="2", action="add", product_id="z" * 50)
    assert s.nbytes > after_snapshot
    apply(s, now=0, basket="a", event_id="3", action="remove", product_id="z" * 50)
    apply(s, now=0, basket="a", event_id="4", action="clear", wishlist=["w" * 200])
    apply(s, now=0, basket="b", event_id="1", action="checkout")
    assert s.nbytes == s.recount()
    assert s.drop("b") and s.nbytes == s.recount()
    assert s.expire(100) == ["a"] and s.nbytes == 0 and len(s) == 0


def test_remembered_event_ids_bounded_by_bytes() -> None:
    s = BasketStates(recent_ids=10_000, recent_bytes=4096)
    for i in range(500):
        apply(s, event_id=f"{i:0256d}", action="add", product_id="a")
    state = s.get("b")
    assert 1 < len(state.recent) < 20
    assert apply(s, event_id=f"{499:0256d}", action="add", product_id="a").kind == "duplicate"


# -- issue 7: rejected values are not echoed whole ---------------------------------------------

HUGE = "6" * 60_000


@pytest.mark.parametrize("fields", [
    {"cart": ["a"], "top_k": HUGE},
    {"cart": ["a"], "seq": HUGE},
    {"cart": ["a"], "user": {"user_id": "u", "gender": HUGE}},
    {"cart": ["a"], "user": {"user_id": "u", "age": HUGE}},
    {"cart": ["a"], "gender": HUGE},
    {"action": HUGE},
    {"cart": ["a"], "top_k": [HUGE] * 3},
    {"cart": ["a"], "top_k": {HUGE: 1}},
], ids=["top_k", "seq", "user.gender", "user.age", "gender", "action", "list", "object"])
def test_rejected_values_are_truncated_in_messages(fields: dict) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_cart_event(json.dumps({"event_id": "e-1", **fields}).encode(), EventLimits(max_payload_bytes=10**6))
    message = str(info.value)
    assert len(message) <= 300 and "666666" in message and HUGE not in message, message
    if fields.get("top_k") == HUGE or fields.get("action") == HUGE:
        assert "…" in message and "60000 characters" in message
    assert info.value.event_id == "e-1"


def test_echoed_event_id_and_message_are_bounded() -> None:
    e = InvalidEvent("x" * 10_000, event_id="i" * 5000)
    assert len(str(e)) <= 300 and str(e).endswith("…")
    assert isinstance(e.event_id, str) and len(e.event_id) <= 100 and "5000 characters" in e.event_id
    assert InvalidEvent("m", event_id=10**40).event_id != 10**40
    assert InvalidEvent("m", event_id="e-0001").event_id == "e-0001"
    assert InvalidEvent("m", event_id=12).event_id == 12
    with pytest.raises(InvalidEvent, match="'event_id' must be a non-empty string or an integer") as info:
        parse(event_id=2**64, cart=["a"])
    assert info.value.event_id is None
    assert parse(event_id=2**63 - 1, cart=["a"]).event_id == 2**63 - 1


# -- issue 7: sequence numbers, trips, redelivery ----------------------------------------------

def test_seq_is_a_64_bit_signed_integer() -> None:
    assert parse(seq=2**63 - 1, cart=[]).seq == 2**63 - 1
    for bad in (2**63, 10**30):
        with pytest.raises(InvalidEvent, match="'seq' must be a non-negative integer") as info:
            parse(seq=bad, cart=[])
        assert len(str(info.value)) <= 300
    # the finding: a seq of 10**30 froze the basket; now it is refused and the basket carries on
    s = BasketStates()
    apply(s, seq=3, cart=["a"])
    with pytest.raises(InvalidEvent):
        apply(s, seq=10**30, cart=["b"])
    assert apply(s, seq=4, action="add", product_id="c").cart == ("a", "c")
    assert apply(s, seq=5, action="checkout").kind == "checkout"


def test_new_trip_reusing_event_ids_right_after_checkout_is_not_a_duplicate() -> None:
    """The finding: a sensor restarting its ids at e-0001 within 60 s of a checkout lost that trip's items."""
    s = BasketStates()
    old = [ev(event_id="e-0001", seq=1, action="add", product_id="A"),
           ev(event_id="e-0002", seq=2, action="add", product_id="B"),
           ev(event_id="e-0003", seq=3, action="checkout")]
    for i, p in enumerate(old):
        s.apply("b", parse_cart_event(p), float(i))
    new = s.apply("b", parse_cart_event(ev(event_id="e-0001", seq=1, action="add", product_id="C")), 10.0)
    assert new.kind == "answer" and new.cart == ("C",)
    assert s.apply("b", parse_cart_event(ev(event_id="e-0002", seq=2, action="add", product_id="D")),
                   11.0).cart == ("C", "D")
    # byte-identical redeliveries of the old trip are still ignored, whatever their ids now mean
    for p in old:
        assert s.apply("b", parse_cart_event(p), 12.0).kind == "duplicate"
    assert s.get("b").cart == ["C", "D"]


def test_checkout_starts_a_new_sequence() -> None:
    s = BasketStates()
    apply(s, seq=500, cart=["a"])
    apply(s, seq=501, action="checkout")
    assert apply(s, now=1, seq=1, action="add", product_id="n").cart == ("n",)  # id-less, low seq, new trip
    assert apply(s, now=2, seq=2, event_id="x", action="add", product_id="m").cart == ("n", "m")
    # an id-less event of the finished trip delivered again byte for byte is still a redelivery
    apply(s, now=3, seq=7, cart=["c"])
    apply(s, now=4, seq=8, action="checkout")
    assert apply(s, now=5, seq=7, cart=["c"]).kind == "duplicate"
    assert apply(s, now=6, seq=7, cart=["d"]).cart == ("d",)
    assert apply(s, now=70, seq=7, cart=["c"]).cart == ("c",)  # after the grace period: a new event


def test_same_id_different_content_before_checkout_is_a_flagged_duplicate() -> None:
    s = BasketStates()
    assert apply(s, event_id="e1", action="add", product_id="a").kind == "answer"
    redelivery = apply(s, event_id="e1", action="add", product_id="a")
    assert redelivery.kind == "duplicate" and not redelivery.id_reused
    reuse = apply(s, event_id="e1", action="add", product_id="other")
    assert reuse.kind == "duplicate" and reuse.id_reused
    assert s.get("b").cart == ["a"]


def test_digest_identifies_the_payload_bytes() -> None:
    a, b = parse_cart_event(b'{"cart": ["a"]}'), parse_cart_event(b'{"cart": ["a"]}')
    c = parse_cart_event(b'{"cart":["a"]}')
    assert a.digest == b.digest and a.digest != c.digest and isinstance(a.digest, bytes)
    from agent.events import event_from_obj
    assert event_from_obj({"cart": ["a"]}).digest is None
    assert event_from_obj({"cart": ["a"]}, digest=b"12345678").digest == b"12345678"


# -- issue 7: the member's flat form, encodings, HTTP bodies, unknown fields ------------------

def test_flat_member_fields_are_read_and_checked_like_the_nested_form() -> None:
    m = parse(user_id="12345", gender=1, age=34, cart=["a"])
    assert (m.user.user_id, m.user.gender, m.user.age) == ("12345", 1, 34)
    assert parse(user_id="guest", cart=["a"]).user.user_id is None
    assert parse(user_id=None, gender=0, cart=["a"]).user == parse(user={"user_id": "guest", "gender": 0},
                                                                   cart=["a"]).user
    assert parse(user={"user_id": "nested"}, user_id="flat", cart=["a"]).user.user_id == "nested"  # user wins
    assert parse(user=None, user_id="flat", cart=["a"]).user.user_id == "flat"  # null user = absent


@pytest.mark.parametrize(("fields", "message"), [
    ({"gender": 7}, "'gender' must be 0, 1 or null, got 7"),
    ({"user_id": "guest", "gender": 7, "age": 30}, "'gender' must be 0, 1 or null, got 7"),
    ({"age": 999}, "'age' must be null or an integer 0..120, got 999"),
    ({"user_id": "u", "age": True}, "'age'"),
    ({"user_id": 12345}, "'user_id' must be a non-empty string"),
    ({"user_id": ""}, "'user_id' must be a non-empty string"),
    ({"user_id": "u" * 257}, "'user_id' must be a non-empty string"),
    ({"user": {"user_id": "u"}, "gender": 7}, "'gender'"),  # the nested form wins, the flat one is still checked
    ({"user": {"user_id": "u", "gender": 2}, "gender": 1}, "'user.gender'"),
])
def test_flat_member_fields_rejected(fields: dict, message: str) -> None:
    with pytest.raises(InvalidEvent, match=re.escape(message)):
        parse(cart=["a"], **fields)


@pytest.mark.parametrize(("payload", "message"), [
    (b"\xef\xbb\xbf" + ev(cart=["a"]), "byte order mark"),
    (ev(cart=["a"]).decode().encode("utf-16"), "UTF-16"),
    (ev(cart=["a"]).decode().encode("utf-16-le"), "UTF-16"),
    (ev(cart=["a"]).decode().encode("utf-16-be"), "UTF-16"),
    (ev(cart=["a"]).decode().encode("utf-32"), "UTF-32"),
])
def test_only_utf8_json_without_bom(payload: bytes, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message) as info:
        parse_cart_event(payload)
    assert info.value.kind == "encoding" and "UTF-8" in str(info.value)


def test_http_bodies_follow_the_same_rules() -> None:
    from agent.events import event_from_obj

    def http(body: bytes) -> CartEvent:
        return parse_cart_event(body, source="http")

    assert http(b'{"cart_items": ["a"], "user_id": "guest"}').cart == ("a",)
    assert parse(cart_items=["a"]).cart == ("a",)  # the alias is the same on MQTT
    member = http(b'{"user": {"user_id": "nested"}, "user_id": "flat", "cart": []}')
    assert member.user.user_id == "nested"
    for body, message in [
        (b'{"cart": ["a"], "cart_items": ["b"]}', "either"),
        (b'{"user_id": "guest"}', "'cart' (or 'cart_items') is required"),
        (b'{"cart": null, "action": "add", "product_id": "p"}', "whole cart"),
        (b'{"gender": 7, "age": 999, "cart": []}', "'gender'"),
        (b'{"cart_items": [1]}', "'cart_items[0]'"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"not json", "not valid JSON"),
        (b"[" * 60_000, "not valid JSON"),
        (b'{"cart": ["' + b"x" * 70_000 + b'"]}', "exceeds"),
    ]:
        with pytest.raises(InvalidEvent, match=re.escape(message)):
            http(body)
    with pytest.raises(InvalidEvent, match="whole cart"):
        event_from_obj({"action": "clear"}, source="http")


def test_unknown_fields_are_counted_and_reported_once_per_basket() -> None:
    e = parse(cart=[], extension=1, session_id="s", user_id="u")
    assert e.unknown_fields == ("extension", "session_id")
    many = parse(cart=[], **{f"k{i}" + "x" * 100: i for i in range(100)})
    assert 0 < len(many.unknown_fields) <= 16 and all(len(f) <= 41 for f in many.unknown_fields)
    s = BasketStates()
    assert apply(s, cart=[], extension=1).unknown_fields == ("extension",)
    assert apply(s, cart=[], extension=2).unknown_fields == ()       # once per basket
    assert apply(s, basket="other", cart=[], extension=1).unknown_fields == ("extension",)
    assert apply(s, basket="other", cart=[]).unknown_fields == ()


def test_shared_states_take_a_new_trip_whose_checkout_another_agent_saw() -> None:
    """In a shared group the checkout may reach another agent: a new trip restarting seq and ids
    must still be answered here; only byte-identical redeliveries are duplicates."""
    def ev(payload: dict) -> CartEvent:
        return parse_cart_event(json.dumps(payload).encode())

    for shared, expected in ((False, ["duplicate", "stale"]), (True, ["answer", "answer"])):
        s = BasketStates(shared=shared)
        first = json.dumps({"event_id": "e-1", "seq": 5, "cart": ["A"]}).encode()
        assert s.apply("b", parse_cart_event(first), 0.0).kind == "answer"
        assert s.apply("b", parse_cart_event(first), 0.1).kind == "duplicate"  # a QoS 1 redelivery
        # (the checkout of that trip went to another agent of the group) the next trip starts over:
        got = [s.apply("b", ev({"event_id": "e-1", "seq": 1, "cart": ["B"]}), 1.0).kind,
               s.apply("b", ev({"event_id": "e-2", "seq": 0, "cart": ["C"]}), 2.0).kind]
        assert got == expected
        if shared:  # a redelivery of the new trip's e-1 (a reconnect) is known as one: the cart stays C
            assert s.apply("b", ev({"event_id": "e-1", "seq": 1, "cart": ["B"]}), 3.0).kind == "duplicate"
            assert s.get("b").cart == ["C"]
            assert s.nbytes == s.recount()


def test_answer_timestamps_are_datetime_isoformat_to_the_millisecond(monkeypatch):
    """The answer's ``ts`` formats only the milliseconds within a cached second; it must read exactly as
    ``datetime.isoformat(timespec="milliseconds")`` of the same instant, across seconds, at the rounding
    edges and when the local zone is looked up again."""
    import random
    from datetime import datetime

    from agent import service

    clock = [0.0]
    monkeypatch.setattr(service.time, "time", lambda: clock[0])
    monkeypatch.setattr(service, "_this_second", [(-1, "", "")])
    monkeypatch.setattr(service, "_local_zone", [float("-inf"), None])
    rng = random.Random(5)
    base = 1_795_590_000.0
    instants = sorted(base + rng.random() * 5 for _ in range(20_000))
    instants += [base + 5.9995, base + 5.99951, base + 6.0004999, base + 6.9999996, base + 200.25]
    for now in instants:
        clock[0] = now
        assert service._now_iso() == datetime.fromtimestamp(now, service._local_zone[1]).isoformat(
            timespec="milliseconds"), now

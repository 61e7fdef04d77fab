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
    assert apply(s, seq=5, event_id="e5b", action="add", product_id="z").kind == "duplicate"  # redelivery
    assert apply(s, seq=6, event_id="out", action="checkout").kind == "duplicate"
    assert apply(s, seq=5, cart=["late"]).kind == "stale"  # id-less and older than the checkout
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
    assert "# TYPE smartbasket_agent_latency_seconds summary" in text
    assert "smartbasket_agent_latency_seconds_count 4000" in text
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"\})? \S+$')
    for line in text.splitlines():
        assert line.startswith(("# HELP ", "# TYPE ")) or sample.match(line), line


def test_metrics_empty() -> None:
    m = Metrics()
    assert m.snapshot()["p99_ms"] is None
    assert 'smartbasket_agent_latency_seconds{quantile="0.99"} NaN' in m.render_prometheus()

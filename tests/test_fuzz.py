"""Property-based tests (hypothesis, schemathesis) of the cart event parser, the basket state machine
and the HTTP bridge.

* the parser, fed arbitrary bytes, arbitrary JSON and event-shaped objects, never raises anything but
  ``InvalidEvent`` (with a bounded message), agrees with itself across ``parse_cart_event`` /
  ``event_from_obj``, and reads the member exactly as a plain restatement of the contract does;
* the basket state machine, fed random add/remove/clear/checkout/snapshot traffic with byte-identical
  redeliveries, reordering, reused ids, time jumps, TTL expiry and a small memory budget, stays equal
  to :class:`Model` (the rules of ``agent/events.py``'s docstring with unbounded memory and raw
  bytes), and a sensor's real cart survives duplicate deliveries and trips that reuse event ids;
* the HTTP bridge, fuzzed from its OpenAPI schema (schemathesis; the bridge reads a raw body, so the
  contract §4 body is added to the schema here) and with hypothesis JSON bodies through FastAPI's
  TestClient: no 5xx, every 422 carries ``error``.

Case counts are bounded (``max_examples``) so the file runs in well under a minute, and printed
(``pytest -s``; also in ``COUNTS``). Examples are random on every run (no example database is
written); a failure prints the falsifying example.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from _agent_proc import tiny_snapshot
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent.http
from agent.config import HttpConfig
from agent.events import (
    ACTIONS,
    CHECKOUT_GRACE_S,
    INVALID_KINDS,
    BasketStates,
    CartEvent,
    EventLimits,
    InvalidEvent,
    UserInfo,
    event_from_obj,
    parse_cart_event,
)
from agent.http import create_app
from agent.metrics import Metrics
from agent.registry import ModelRegistry

COUNTS: dict[str, int] = {}
FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def _record(name: str, count: int, minimum: int) -> None:
    COUNTS[name] = count
    print(f"\n[fuzz] {name}: {count} cases")
    assert count >= minimum, f"{name}: only {count} cases ran"


# -- strategies ---------------------------------------------------------------------------------

PRODUCTS = ["A", "B", "C", "D", "E", "F", "G"]
scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats()
           | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
def mostly(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid three times in four: enough events get through to check what is accepted, not only refusals."""
    return st.one_of(valid, valid, valid, invalid)


product_ids = mostly(st.sampled_from(PRODUCTS), st.sampled_from(["", "p" * 256, "p" * 257, "\ud800", "상품"]))
id_lists = mostly(st.lists(st.sampled_from(PRODUCTS), max_size=6), st.lists(product_ids, max_size=6) | json_values)
user_ids = mostly(st.none() | st.sampled_from(["guest", "u-1", "u" * 256]) | st.text(min_size=1, max_size=4),
                  st.sampled_from(["", "u" * 257, "\udfff"]) | st.integers(-3, 3) | json_values)
genders = mostly(st.sampled_from([None, 0, 1]), st.sampled_from([2, 7, -1, True, False, "f", 0.0, 1.0]))
ages = mostly(st.none() | st.integers(0, 120), st.sampled_from([-1, 121, True, 34.5, "34", 999, 10**30]))
users = st.none() | st.fixed_dictionaries({}, optional={"user_id": user_ids, "gender": genders, "age": ages})
META = {
    "event_id": mostly(st.text(min_size=1, max_size=6) | st.integers(-5, 5) | st.just(2**63 - 1),
                       st.just("") | st.integers(2**63, 2**64) | json_values),
    "seq": mostly(st.integers(0, 20) | st.just(2**63 - 1), st.sampled_from([2**63, 10**30, -1, True, "3", 1.5])),
    "ts": mostly(st.text(max_size=10), json_values),
    "user": mostly(users, json_values),
    "user_id": user_ids, "gender": genders, "age": ages,
    "wishlist": mostly(st.none() | id_lists, json_values),
    "top_k": mostly(st.none() | st.integers(1, 100), st.integers(-1, 102) | json_values),
    "extension": json_values,
}
CONTENT = {
    "cart": st.none() | id_lists | json_values,
    "cart_items": st.none() | id_lists | json_values,
    "action": mostly(st.sampled_from(ACTIONS), st.sampled_from(["buy", ""]) | json_values),
    "product_id": st.none() | product_ids,
}


@st.composite
def event_objects(draw: st.DrawFn) -> dict[str, Any]:
    """Cart-event-shaped objects: every field in the contract, valid values mostly, anything at all sometimes."""
    obj = draw(st.fixed_dictionaries({}, optional=META))
    form = draw(st.sampled_from(["cart", "cart_items", "delta", "anything"]))
    if form in ("cart", "cart_items"):
        obj[form] = draw(id_lists)
    elif form == "delta":
        obj["action"] = draw(CONTENT["action"])
        if draw(st.booleans()):
            obj["product_id"] = draw(product_ids)
    else:
        obj.update(draw(st.fixed_dictionaries({}, optional=CONTENT)))
    return obj


def _valid_payloads() -> st.SearchStrategy[bytes]:
    body = st.fixed_dictionaries({"cart": st.lists(st.sampled_from(PRODUCTS), max_size=4)}, optional={
        "event_id": st.text(min_size=1, max_size=5), "seq": st.integers(0, 9), "user_id": user_ids,
        "top_k": st.integers(1, 10)})
    return body.map(lambda d: json.dumps(d).encode())


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    """A valid payload with bytes spliced in, dropped or re-encoded: the parser's near misses."""
    data = bytearray(draw(_valid_payloads()))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 3))
        data[at:at + cut] = draw(st.binary(max_size=3))
    encoding = draw(st.sampled_from(["utf-8"] * 4 + ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"]))
    if encoding == "utf-8":
        return bytes(data)
    return bytes(data).decode("utf-8", "replace").encode(encoding)


def _check_invalid(exc: InvalidEvent) -> None:
    assert exc.kind in INVALID_KINDS
    assert 0 < len(str(exc)) <= 300
    assert exc.event_id is None or isinstance(exc.event_id, (str, int))
    assert len(json.dumps(exc.event_id)) <= 300
    json.dumps({"error": str(exc), "event_id": exc.event_id}, ensure_ascii=False).encode("utf-8")  # publishable


def _check_event(e: CartEvent, source: str = "mqtt") -> None:
    assert (e.cart is None) != (e.action is None)
    if source == "http":
        assert e.cart is not None
    for items in (e.cart, e.wishlist):
        if items is not None:
            assert len(set(items)) == len(items) and all(isinstance(i, str) and 0 < len(i) <= 256 for i in items)
    assert e.action in (None, *ACTIONS)
    assert (e.product_id is not None) == (e.action in ("add", "remove"))
    assert e.seq is None or 0 <= e.seq < 2**63
    assert 1 <= e.top_k <= 100
    assert e.user.user_id != "guest" and e.user.gender in (None, 0, 1)
    assert e.user.age is None or 0 <= e.user.age <= 120
    assert len(e.unknown_fields) <= 16


def _parse(payload: bytes, source: str = "mqtt") -> CartEvent | InvalidEvent:
    try:
        return parse_cart_event(payload, source=source)
    except InvalidEvent as exc:
        return exc


# -- the parser ---------------------------------------------------------------------------------

def test_parser_on_arbitrary_and_mutated_bytes() -> None:
    count = 0

    @settings(FUZZ, max_examples=400)
    @given(st.binary(max_size=200) | mutated_payloads(), st.sampled_from(["mqtt", "http"]))
    def run(payload: bytes, source: str) -> None:
        nonlocal count
        count += 1
        result = _parse(payload, source)
        if isinstance(result, InvalidEvent):
            _check_invalid(result)
        else:
            _check_event(result, source)
            assert payload.decode("utf-8") and not payload.startswith(b"\xef\xbb\xbf")

    run()
    _record("parser: arbitrary / mutated bytes", count, 200)


def _member_oracle(d: dict[str, Any]) -> UserInfo | None:
    """Contract §3.1's member rules restated plainly; None = the event must be refused."""
    def good_id(u: object) -> bool:
        return type(u) is str and 0 < len(u) <= 256 and not any(0xD800 <= ord(c) <= 0xDFFF for c in u)

    def good_person(g: object, a: object) -> bool:
        return (g is None or (type(g) is int and g in (0, 1))) and (a is None or (type(a) is int and 0 <= a <= 120))

    if not ((d.get("user_id") is None or good_id(d["user_id"])) and good_person(d.get("gender"), d.get("age"))):
        return None
    nested = d.get("user")
    if nested is not None:
        if type(nested) is not dict or not good_id(nested.get("user_id")) or not good_person(
                nested.get("gender"), nested.get("age")):
            return None
        who = nested
    else:
        who = d
    user_id = who.get("user_id")
    return UserInfo(None if user_id in (None, "guest") else user_id, who.get("gender"), who.get("age"))


def test_parser_on_arbitrary_json_and_event_shaped_objects() -> None:
    count = accepted = 0

    @settings(FUZZ, max_examples=600)
    @given(event_objects() | json_values, st.sampled_from(["mqtt", "http"]))
    def run(obj: Any, source: str) -> None:
        nonlocal count, accepted
        count += 1
        try:
            direct: CartEvent | InvalidEvent = event_from_obj(obj, source=source)
        except InvalidEvent as exc:
            direct = exc
        payload = json.dumps(obj).encode()
        via_bytes = _parse(payload, source)
        if len(payload) <= EventLimits().max_payload_bytes:  # the same rules whichever entry point
            if isinstance(direct, InvalidEvent):
                assert isinstance(via_bytes, InvalidEvent) and str(via_bytes) == str(direct)
            else:
                assert via_bytes == direct
        if isinstance(direct, InvalidEvent):
            _check_invalid(direct)
            if isinstance(obj, dict):
                assert direct.kind == "schema"
            return
        accepted += 1
        _check_event(direct, source)
        assert isinstance(obj, dict)
        assert _member_oracle(obj) == direct.user
        cart = obj.get("cart") if obj.get("cart") is not None else obj.get("cart_items")
        assert direct.cart == (tuple(dict.fromkeys(cart)) if cart is not None else None)
        known = {"event_id", "seq", "ts", "user", "user_id", "gender", "age", "cart", "cart_items", "wishlist",
                 "action", "product_id", "top_k"}
        assert direct.unknown_fields == tuple(k for k in obj if k not in known)[:16]

    run()
    _record("parser: arbitrary JSON / event-shaped objects", count, 400)
    _record("parser: ... of which accepted", accepted, 30)


def test_member_oracle_refusals_are_refused() -> None:
    """The other direction of the oracle: whatever it refuses, the parser refuses."""
    count = 0

    @settings(FUZZ, max_examples=300)
    @given(st.fixed_dictionaries({"cart": st.just(["A"])},
                                 optional={"user": users, "user_id": user_ids, "gender": genders, "age": ages}))
    def run(obj: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        expected = _member_oracle(obj)
        try:
            assert event_from_obj(obj).user == expected
        except InvalidEvent:
            assert expected is None

    run()
    _record("parser: member forms", count, 200)


# -- the basket state machine -------------------------------------------------------------------

@dataclass
class _Trip:
    cart: list[str] = field(default_factory=list)
    wishlist: tuple[str, ...] = ()
    last_seq: int | None = None
    ids: dict[Any, bytes] = field(default_factory=dict)  # event id -> the payload first applied
    anon: set[bytes] = field(default_factory=set)         # id-less payloads with a seq
    closed: set[bytes] = field(default_factory=set)       # payloads (with an id or a seq) of finished trips
    closed_at: float | None = None
    touched: float = 0.0


class Model:
    """BasketStates as its docstring says, with unbounded memory and raw payloads instead of digests.

    Which baskets the byte budget evicts is taken from the implementation's ``Outcome.evicted``
    (the model does not estimate bytes); what an eviction means afterwards is the model's own.
    """

    def __init__(self, max_items: int, ttl: float) -> None:
        self.max_items, self.ttl = max_items, ttl
        self.baskets: dict[str, _Trip] = {}
        self.evicted: dict[str, float] = {}

    def apply(self, bid: str, payload: bytes, e: CartEvent, now: float) -> tuple[Any, ...]:
        if any(items is not None and len(items) > self.max_items for items in (e.cart, e.wishlist)):
            return ("error", "schema")
        b = self.baskets.get(bid)
        if b is None and bid in self.evicted:
            if now - self.evicted[bid] < self.ttl and e.cart is None and e.action != "checkout":
                return ("error", "evicted")
            del self.evicted[bid]
        if b is not None:
            if b.closed_at is not None and now - b.closed_at >= CHECKOUT_GRACE_S:
                b.closed, b.closed_at = set(), None
            if e.event_id is not None and e.event_id in b.ids:
                return ("duplicate", b.ids[e.event_id] != payload)
            if (e.event_id is not None or e.seq is not None) and payload in b.closed:
                return ("duplicate", False)
            if e.seq is not None and b.last_seq is not None and e.seq < b.last_seq:
                return ("stale",)
        if e.action == "add" and b is not None and e.product_id not in b.cart and len(b.cart) >= self.max_items:
            return ("error", "schema")
        if b is None:
            b = self.baskets[bid] = _Trip()
        b.touched = now
        if e.action == "checkout":
            b.closed |= set(b.ids.values()) | b.anon  # a trip closed moments before stays remembered
            if e.event_id is not None or e.seq is not None:
                b.closed.add(payload)
            b.closed_at = now
            b.ids, b.anon, b.cart, b.wishlist, b.last_seq = {}, set(), [], (), None
            return ("checkout",)
        if e.cart is not None:
            b.cart = list(e.cart)
        elif e.action == "add" and e.product_id not in b.cart:
            b.cart.append(e.product_id)
        elif e.action == "remove" and e.product_id in b.cart:
            b.cart.remove(e.product_id)
        elif e.action == "clear":
            b.cart = []
        if e.wishlist is not None:
            b.wishlist = e.wishlist
        if e.seq is not None:
            b.last_seq = e.seq
        if e.event_id is not None:
            b.ids[e.event_id] = payload
        elif e.seq is not None:
            b.anon.add(payload)
        return ("answer", tuple(b.cart), b.wishlist)

    def evict(self, bids: tuple[str, ...], now: float) -> None:
        for bid in bids:
            b = self.baskets.pop(bid)
            if b.cart or b.wishlist:
                self.evicted[bid] = now

    def expire(self, now: float) -> list[str]:
        gone = [bid for bid, b in self.baskets.items() if b.touched < now - self.ttl]
        for bid in gone:
            del self.baskets[bid]
        for bid in [bid for bid, at in self.evicted.items() if at < now - self.ttl]:
            del self.evicted[bid]
        return gone


def _deliver(states: BasketStates, bid: str, payload: bytes, now: float) -> tuple[Any, ...]:
    event = parse_cart_event(payload)
    try:
        out = states.apply(bid, event, now)
    except InvalidEvent as exc:
        return ("error", exc.kind), (), event
    if out.kind == "answer":
        return ("answer", out.cart, out.wishlist), out.evicted, event
    if out.kind == "duplicate":
        return ("duplicate", out.id_reused), out.evicted, event
    return (out.kind,), out.evicted, event


@st.composite
def sensor_event(draw: st.DrawFn, trip_counter: int) -> dict[str, Any]:
    op = draw(st.sampled_from(["add", "add", "add", "remove", "clear", "checkout", "snapshot"]))
    obj: dict[str, Any] = {}
    if draw(st.integers(0, 9)) < 7:  # ids restart with every trip (the finding), sometimes reused at random
        obj["event_id"] = f"e-{trip_counter}" if draw(st.integers(0, 9)) else f"e-{draw(st.integers(0, 3))}"
    if draw(st.integers(0, 9)) < 7:
        obj["seq"] = trip_counter if draw(st.integers(0, 9)) else draw(st.integers(0, 12))
    if op == "snapshot":
        # sometimes 6 or 7 distinct products, over max_items (5: "error:schema"), so every run sees that
        # error (hypothesis' own short, repetitive lists left one run in many without it)
        n = draw(st.integers(0, 7))
        obj["cart"] = draw(st.lists(st.sampled_from(PRODUCTS), min_size=n, max_size=n, unique=n >= 6))
    else:
        obj["action"] = op
        if op in ("add", "remove"):
            obj["product_id"] = draw(st.sampled_from(PRODUCTS))
    if draw(st.integers(0, 9)) == 0:
        obj["wishlist"] = draw(st.lists(st.sampled_from(PRODUCTS), max_size=3))
    return obj


def test_state_machine_equals_the_model() -> None:
    count = steps = 0
    seen: dict[str, int] = {}

    @settings(FUZZ, max_examples=150)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        nonlocal count, steps
        count += 1
        baskets = [f"b{i}" for i in range(data.draw(st.integers(1, 4), label="baskets"))]
        budget = data.draw(st.sampled_from([10**9, 2_500, 5_000]), label="max_bytes")  # a basket: ~1-4 KB here
        ttl = 500.0
        states = BasketStates(max_items=5, recent_ids=10**6, recent_bytes=10**9, max_bytes=budget, idle_ttl_s=ttl,
                              evicted_bytes=10**6)  # every eviction remembered, as in the model
        model = Model(max_items=5, ttl=ttl)
        counters = dict.fromkeys(baskets, 1)
        pending: list[tuple[str, bytes]] = []
        delivered: list[tuple[str, bytes]] = []
        now = 0.0
        for _ in range(data.draw(st.integers(1, 80), label="steps")):
            steps += 1
            move = data.draw(st.sampled_from(["send", "send", "send", "deliver", "deliver", "deliver",
                                              "late", "redeliver", "tick", "expire"]))
            if move == "send":
                bid = data.draw(st.sampled_from(baskets))
                obj = data.draw(sensor_event(counters[bid]))
                counters[bid] = 1 if obj.get("action") == "checkout" else counters[bid] + 1
                pending.append((bid, json.dumps(obj).encode()))
                continue
            if move == "tick":
                now += data.draw(st.sampled_from([0.5, 5.0, CHECKOUT_GRACE_S + 1, ttl + 1]))
                continue
            if move == "expire":
                assert sorted(states.expire(now)) == sorted(model.expire(now))
                continue
            if move in ("deliver", "late") and pending:  # "late": out of order
                bid, payload = pending.pop(0 if move == "deliver" else data.draw(st.integers(0, len(pending) - 1)))
            elif move == "redeliver" and delivered:     # byte-identical, any time later
                bid, payload = data.draw(st.sampled_from(delivered))
            else:
                continue
            delivered.append((bid, payload))
            got, evicted, event = _deliver(states, bid, payload, now)
            expected = model.apply(bid, payload, event, now)
            assert got == expected, (bid, payload, got, expected)
            outcome = ":".join(map(str, got[:2])) if got[0] == "error" else got[0]
            seen[outcome] = seen.get(outcome, 0) + 1
            seen["evictions"] = seen.get("evictions", 0) + len(evicted)
            model.evict(evicted, now)
            assert {b: (st_.cart, st_.wishlist, st_.last_seq) for b in baskets if (st_ := states.get(b))} == {
                b: (m.cart, m.wishlist, m.last_seq) for b, m in model.baskets.items()}
            assert states.nbytes == states.recount()
            assert states.nbytes <= budget or len(states) == 1

    run()
    _record("state machine vs model: runs", count, 100)
    _record("state machine vs model: steps", steps, 800)
    for kind in ("answer", "duplicate", "stale", "checkout", "error:schema", "error:evicted", "evictions"):
        assert seen.get(kind, 0) > 0, seen
    print(f"[fuzz] outcomes: {seen}")


def test_a_sensors_cart_survives_redelivery_and_trips_reusing_ids() -> None:
    """No reordering: whatever is redelivered (byte-identical, within a minute, as QoS 1 does), and however
    soon a new trip restarts its ids and seq after a checkout, the agent's cart is the sensor's cart."""
    count = 0

    @settings(FUZZ, max_examples=120)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        nonlocal count
        count += 1
        states = BasketStates()
        truth: dict[str, list[str]] = {}
        counters: dict[str, int] = {}
        log: list[tuple[float, str, bytes]] = []
        now = 0.0
        for _ in range(data.draw(st.integers(1, 60))):
            now += data.draw(st.sampled_from([0.0, 0.2, 3.0, 20.0]))
            if log and data.draw(st.integers(0, 3)) == 0:
                recent = [(bid, p) for t, bid, p in log if t >= now - 50]
                if recent:
                    bid, payload = data.draw(st.sampled_from(recent))
                    assert states.apply(bid, parse_cart_event(payload), now).kind in ("duplicate", "stale")
                    continue
            bid = data.draw(st.sampled_from(["b1", "b2"]))
            n = counters.get(bid, 1)
            op = data.draw(st.sampled_from(["add", "add", "remove", "clear", "checkout", "snapshot"]))
            obj: dict[str, Any] = {"event_id": f"e-{n:04d}", "seq": n, "ts": f"{now:012.3f}/{len(log)}"}
            cart = truth.setdefault(bid, [])
            if op == "snapshot":
                cart[:] = list(dict.fromkeys(data.draw(st.lists(st.sampled_from(PRODUCTS), max_size=5))))
                obj["cart"] = list(cart)
            else:
                obj["action"] = op
                if op in ("add", "remove"):
                    obj["product_id"] = pid = data.draw(st.sampled_from(PRODUCTS))
                    if op == "add" and pid not in cart:
                        cart.append(pid)
                    elif op == "remove" and pid in cart:
                        cart.remove(pid)
                else:
                    cart.clear()
            counters[bid] = 1 if op == "checkout" else n + 1
            payload = json.dumps(obj).encode()
            log.append((now, bid, payload))
            out = states.apply(bid, parse_cart_event(payload), now)
            assert out.kind == ("checkout" if op == "checkout" else "answer"), (obj, out)
            assert states.get(bid).cart == cart

    run()
    _record("sensor truth under redelivery and reused ids", count, 80)


# -- the HTTP bridge ----------------------------------------------------------------------------

#: Contract §4's body, for schemathesis: the bridge itself reads a raw body (any bytes), so FastAPI's
#: generated schema has no request body at all.
RECOMMEND_BODY = {
    "type": "object",
    "properties": {
        "user_id": {"type": ["string", "null"], "maxLength": 256},
        "gender": {"type": ["integer", "null"], "enum": [0, 1, None]},
        "age": {"type": ["integer", "null"], "minimum": 0, "maximum": 120},
        "cart": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 256}, "maxItems": 200},
        "cart_items": {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 200},
        "wishlist": {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 200},
        "top_k": {"type": "integer", "minimum": 1, "maximum": 100},
    },
}


def _client() -> TestClient:
    return TestClient(create_app(ModelRegistry(tiny_snapshot()), Metrics()))


def _check_response(r: Any) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    assert r.status_code in (200, 422), r.status_code
    body = r.json()
    if r.status_code == 422:
        assert isinstance(body.get("error"), str) and body["error"], body
    else:
        assert set(body) >= {"user_id", "recommendations", "model", "model_version"}


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_http_bridge_from_its_openapi_schema(mode: str) -> None:
    import schemathesis
    from schemathesis import GenerationMode

    # the schema is served only when asked for (issue 8: /docs, /redoc, /openapi.json off by default)
    app = create_app(ModelRegistry(tiny_snapshot()), Metrics(), settings=HttpConfig(docs=True))
    doc = app.openapi()
    op = doc["paths"]["/recommend"]["post"]
    op["requestBody"] = {"required": True, "content": {"application/json": {"schema": RECOMMEND_BODY}}}
    app.openapi_schema = doc
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    count = statuses = 0
    seen: dict[int, int] = {}

    @settings(FUZZ, max_examples=100)
    @given(schema["/recommend"]["POST"].as_strategy(generation_mode=GenerationMode(mode)))
    def run(case: Any) -> None:
        nonlocal count, statuses
        count += 1
        r = case.call()
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        _check_response(r)

    run()
    _record(f"http via schemathesis ({mode})", count, 50)
    print(f"[fuzz] statuses: {seen}")
    if mode == "positive":
        assert seen.get(200, 0) > 0


def test_http_bridge_with_json_bodies() -> None:
    client = _client()
    count = 0
    seen: dict[int, int] = {}

    @settings(FUZZ, max_examples=250)
    @given(event_objects() | json_values | st.binary(max_size=100).map(lambda b: ("raw", b)))
    def run(body: Any) -> None:
        nonlocal count
        count += 1
        raw = body[1] if isinstance(body, tuple) else json.dumps(body).encode()
        r = client.post("/recommend", content=raw, headers={"content-type": "application/json"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        _check_response(r)

    run()
    _record("http with hypothesis bodies", count, 150)
    print(f"[fuzz] statuses: {seen}")


@pytest.mark.xfail(hasattr(agent.http, "_as_event"), strict=True,
                   reason="agent/http.py still maps the body with _as_event: the lead replaces it with "
                          "parse_cart_event(raw, limits, source='http')")
def test_http_and_mqtt_apply_the_same_rules() -> None:
    """A body is answered exactly when parse_cart_event(body, source="http") accepts it, else refused with its
    message."""
    client = _client()
    count = 0

    @settings(FUZZ, max_examples=250)
    @given(event_objects() | mutated_payloads().map(lambda b: ("raw", b)))
    def run(body: Any) -> None:
        nonlocal count
        count += 1
        raw = body[1] if isinstance(body, tuple) else json.dumps(body).encode()
        expected = _parse(raw, "http")
        r = client.post("/recommend", content=raw, headers={"content-type": "application/json"})
        if isinstance(expected, InvalidEvent):
            assert r.status_code == 422 and r.json()["error"] == str(expected), (raw, r.text)
        else:
            assert r.status_code == 200, (raw, r.text)
            assert r.json()["user_id"] == (expected.user.user_id or "guest")

    run()
    _record("http = mqtt rules", count, 150)


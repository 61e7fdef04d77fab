"""Cart events (contract §3.1): parse + validate one payload, keep each basket's state.

Pure: no I/O, no clocks (the caller passes ``now``), no paho.

Two forms of event reach a basket's cart topic:

* snapshot: ``{"cart": [...], ...}`` holds the whole cart;
* delta: ``{"action": "add"|"remove"|"clear"|"checkout", "product_id": "..."}``
  (``product_id`` only for add/remove).

Everything else is optional: ``event_id`` (str or int, used for de-duplication
and echoed back), ``seq`` (int >= 0, ordering), ``ts`` (str, informational),
``user`` (absent/null = guest; an object needs a non-empty ``user_id``; a
``user_id`` of ``"guest"`` is a guest too), ``wishlist`` (replaces the stored
wishlist when present, kept when absent) and ``top_k``. Unknown keys are
ignored so senders may extend the payload.

:class:`BasketStates` decides what happens to a valid event:

* an ``event_id`` seen recently for that basket -> ``duplicate`` (not answered again);
* a ``seq`` lower than the last applied one -> ``stale`` (ignored). An *equal*
  ``seq`` with a different (or no) ``event_id`` **is applied**: the contract only
  drops events that are older, every state change here is idempotent (a
  snapshot, an add of an item already there, a remove of one not there), and
  a sensor may emit several events per cart version;
* ``checkout`` -> the state is dropped;
* anything else -> ``answer`` with the resulting cart and wishlist.

Events without ``seq`` are always applied and do not move ``last_seq``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import EventError

_LOG = logging.getLogger(__name__)

__all__ = ["Limits", "EventLimits", "UserInfo", "CartEvent", "InvalidEvent", "parse_cart_event", "event_from_obj",
           "Outcome", "BasketState", "BasketStates", "ACTIONS"]

ACTIONS = ("add", "remove", "clear", "checkout")
_MAX_ID_LENGTH = 256
_MAX_AGE = 120


class Limits(Protocol):
    """Anything with these four limits (:class:`EventLimits`)."""

    @property
    def max_payload_bytes(self) -> int: ...
    @property
    def max_items(self) -> int: ...
    @property
    def max_top_k(self) -> int: ...
    @property
    def default_top_k(self) -> int: ...


@dataclass(frozen=True)
class EventLimits:
    """Input limits (``limits:`` in the agent config)."""

    max_payload_bytes: int = 65536
    max_items: int = 200
    max_top_k: int = 100
    default_top_k: int = 10

    def __post_init__(self) -> None:
        for name in ("max_payload_bytes", "max_items", "max_top_k", "default_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limits.{name} must be a positive integer, got {value!r}")
        if self.default_top_k > self.max_top_k:
            raise ValueError("limits.default_top_k must not exceed limits.max_top_k")


class InvalidEvent(EventError):
    """Raised when a cart event payload is rejected; ``kind`` names the category for metrics.

    kinds: ``too_large``, ``encoding``, ``json``, ``schema``.
    """

    def __init__(self, message: str, event_id: object = None, kind: str = "schema") -> None:
        super().__init__(message, event_id)
        self.kind = kind


@dataclass(frozen=True)
class UserInfo:
    """Who is shopping; ``user_id`` None is a guest."""

    user_id: str | None = None
    gender: int | None = None
    age: int | None = None


@dataclass(frozen=True)
class CartEvent:
    """One validated cart event. Exactly one of ``cart`` / ``action`` is set."""

    cart: tuple[str, ...] | None = None
    action: str | None = None
    product_id: str | None = None
    wishlist: tuple[str, ...] | None = None
    user: UserInfo = field(default_factory=UserInfo)
    top_k: int = 10
    event_id: str | int | None = None
    seq: int | None = None
    ts: str | None = None

    @property
    def is_snapshot(self) -> bool:
        return self.cart is not None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _encodable(text: str) -> bool:
    """False for strings JSON escapes made un-encodable (lone surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _type_name(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _ids(name: str, value: object, limits: Limits, event_id: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidEvent(f"'{name}' must be a list of product id strings, got {_type_name(value)}",
                           event_id)
    if len(value) > limits.max_items:
        raise InvalidEvent(f"'{name}' has {len(value)} items, more than the limit of "
                           f"{limits.max_items}", event_id)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidEvent(f"'{name}[{i}]' must be a product id string, got {_type_name(item)}",
                               event_id)
        if not item or len(item) > _MAX_ID_LENGTH or not _encodable(item):
            raise InvalidEvent(f"'{name}[{i}]' must be a non-empty UTF-8 string of at most "
                               f"{_MAX_ID_LENGTH} characters", event_id)
    return tuple(dict.fromkeys(value))  # order kept, duplicates dropped


def _user(value: object, event_id: object) -> UserInfo:
    if value is None:
        return UserInfo()
    if not isinstance(value, dict):
        raise InvalidEvent(f"'user' must be an object or null, got {_type_name(value)}", event_id)
    user_id = value.get("user_id")
    if (not isinstance(user_id, str) or not user_id or len(user_id) > _MAX_ID_LENGTH
            or not _encodable(user_id)):
        raise InvalidEvent("'user.user_id' must be a non-empty string when 'user' is given "
                           "(send no 'user' or null for a guest)", event_id)
    gender = value.get("gender")
    if gender is not None and not (_is_int(gender) and gender in (0, 1)):
        raise InvalidEvent(f"'user.gender' must be 0, 1 or null, got {gender!r}", event_id)
    age = value.get("age")
    if age is not None and not (_is_int(age) and 0 <= age <= _MAX_AGE):
        raise InvalidEvent(f"'user.age' must be null or an integer 0..{_MAX_AGE}, got {age!r}",
                           event_id)
    return UserInfo(None if user_id == "guest" else user_id, gender, age)


def parse_cart_event(payload: bytes, limits: Limits | None = None) -> CartEvent:
    """Validate one cart-topic payload; raises :class:`InvalidEvent` (an EventError)."""
    if limits is None:
        limits = EventLimits()
    if len(payload) > limits.max_payload_bytes:
        raise InvalidEvent(f"payload of {len(payload)} bytes is over the limit of "
                           f"{limits.max_payload_bytes} bytes", kind="too_large")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"payload is not valid UTF-8 (byte {exc.start})", kind="encoding") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent(f"payload is not JSON: {exc}", kind="json") from None
    return event_from_obj(data, limits)


def event_from_obj(data: object, limits: Limits | None = None) -> CartEvent:
    """Validate an already-decoded event (the HTTP bridge's entry point; same rules as MQTT)."""
    if limits is None:
        limits = EventLimits()
    if not isinstance(data, dict):
        raise InvalidEvent(f"event must be a JSON object, got {_type_name(data)}")

    event_id = data.get("event_id")
    if event_id is not None and not (
            (isinstance(event_id, str) and 0 < len(event_id) <= _MAX_ID_LENGTH and _encodable(event_id))
            or _is_int(event_id)):
        raise InvalidEvent("'event_id' must be a non-empty string or an integer")
    seq = data.get("seq")
    if seq is not None and not (_is_int(seq) and seq >= 0):
        raise InvalidEvent(f"'seq' must be a non-negative integer, got {seq!r}", event_id)
    ts = data.get("ts")
    if ts is not None and not (isinstance(ts, str) and _encodable(ts)):
        raise InvalidEvent(f"'ts' must be a string, got {_type_name(ts)}", event_id)
    top_k = data.get("top_k")
    if top_k is None:
        top_k = limits.default_top_k
    elif not _is_int(top_k) or not 1 <= top_k <= limits.max_top_k:
        raise InvalidEvent(f"'top_k' must be an integer 1..{limits.max_top_k}, got {top_k!r}",
                           event_id)
    user = _user(data.get("user"), event_id)
    wishlist = None
    if data.get("wishlist") is not None:
        wishlist = _ids("wishlist", data["wishlist"], limits, event_id)

    cart = action = product_id = None
    has_cart, has_action = data.get("cart") is not None, data.get("action") is not None
    if has_cart and has_action:
        raise InvalidEvent("give either 'cart' (snapshot) or 'action' (delta), not both", event_id)
    if has_cart:
        cart = _ids("cart", data["cart"], limits, event_id)
    elif has_action:
        action = data["action"]
        if not isinstance(action, str) or action not in ACTIONS:
            raise InvalidEvent(f"unknown action {action!r}: expected one of {', '.join(ACTIONS)}",
                               event_id)
        product_id = data.get("product_id")
        if (action in ("add", "remove") or product_id is not None) and (
                not isinstance(product_id, str) or not product_id or len(product_id) > _MAX_ID_LENGTH
                or not _encodable(product_id)):
            raise InvalidEvent(f"'product_id' must be a non-empty string"
                               f"{' for action ' + repr(action) if action in ('add', 'remove') else ''}",
                               event_id)
        if action in ("clear", "checkout"):
            product_id = None
    else:
        raise InvalidEvent("missing cart content: give 'cart' (a list of product ids) or 'action'",
                           event_id)
    return CartEvent(cart=cart, action=action, product_id=product_id, wishlist=wishlist, user=user,
                     top_k=top_k, event_id=event_id, seq=seq, ts=ts)


@dataclass(frozen=True)
class Outcome:
    """What to do with an event: ``kind`` is answer | duplicate | stale | checkout."""

    kind: str
    cart: tuple[str, ...] = ()
    wishlist: tuple[str, ...] = ()

    @property
    def should_answer(self) -> bool:
        return self.kind == "answer"


@dataclass
class BasketState:
    """One basket: cart (ordered, no duplicates), wishlist, ordering and de-dup memory."""

    cart: list[str] = field(default_factory=list)
    wishlist: tuple[str, ...] = ()
    last_seq: int | None = None
    recent: OrderedDict[Any, None] = field(default_factory=OrderedDict)
    touched: float = 0.0
    # After a checkout, for CHECKOUT_GRACE_S: the finished trip's event ids and seq,
    # so a late QoS 1 redelivery cannot reopen the basket.
    closed_ids: frozenset[Any] = frozenset()
    closed_seq: int | None = None
    closed_at: float | None = None


#: How long a checked-out trip's event ids keep catching redeliveries. Long enough
#: for QoS 1 redelivery after a reconnect; short enough that a new trip which
#: numbers its events from "e-0001" again is not mistaken for one.
CHECKOUT_GRACE_S = 60.0


class BasketStates:
    """Every basket's state. Not thread-safe: one worker owns it.

    ``max_items`` bounds the cart a series of ``add`` deltas can build (further adds
    are ignored with a warning, like an oversized snapshot would be rejected).
    """

    def __init__(self, *, idle_ttl_s: float = 1800.0, max_baskets: int = 10000,
                 recent_ids: int = 256, max_items: int = 200) -> None:
        if idle_ttl_s <= 0 or max_baskets < 1 or recent_ids < 1 or max_items < 1:
            raise ValueError("idle_ttl_s, max_baskets, recent_ids and max_items must be positive")
        self.idle_ttl_s = idle_ttl_s
        self.max_baskets = max_baskets
        self.recent_ids = recent_ids
        self.max_items = max_items
        self._baskets: OrderedDict[str, BasketState] = OrderedDict()  # least recently touched first

    def __len__(self) -> int:
        return len(self._baskets)

    def __contains__(self, basket_id: object) -> bool:
        return basket_id in self._baskets

    def get(self, basket_id: str) -> BasketState | None:
        return self._baskets.get(basket_id)

    def apply(self, basket_id: str, event: CartEvent, now: float) -> Outcome:
        """Apply ``event`` to ``basket_id`` at time ``now`` (seconds, any monotonic origin)."""
        state = self._baskets.get(basket_id)
        if state is not None and event.event_id is not None and event.event_id in state.recent:
            state.recent.move_to_end(event.event_id)
            return Outcome("duplicate")
        if state is not None and state.closed_at is not None:
            if now - state.closed_at >= CHECKOUT_GRACE_S:
                state.closed_ids, state.closed_seq, state.closed_at = frozenset(), None, None
            elif event.event_id is not None and event.event_id in state.closed_ids:
                return Outcome("duplicate")
            elif (event.event_id is None and event.seq is not None and state.closed_seq is not None
                  and event.seq <= state.closed_seq):
                return Outcome("stale")
        if (state is not None and event.seq is not None and state.last_seq is not None
                and event.seq < state.last_seq):
            return Outcome("stale")
        if state is None:
            state = self._new(basket_id)
        if event.action == "checkout":
            # The trip is over: empty the basket and let a new trip start its seq
            # again; for a grace period remember the trip's event ids and seq, so a
            # QoS 1 redelivery of an old event cannot reopen the basket.
            state.closed_ids = frozenset(state.recent) | ({event.event_id} - {None})
            state.closed_seq = event.seq if event.seq is not None else state.last_seq
            state.closed_at = now
            state.cart, state.wishlist, state.last_seq = [], (), None
            state.recent.clear()
            state.touched = now
            self._baskets.move_to_end(basket_id)
            return Outcome("checkout")
        else:
            self._apply_content(state, basket_id, event)
            if event.seq is not None:
                state.last_seq = event.seq
        if event.event_id is not None:
            state.recent[event.event_id] = None
            while len(state.recent) > self.recent_ids:
                state.recent.popitem(last=False)
        state.touched = now
        self._baskets.move_to_end(basket_id)
        return Outcome("answer", tuple(state.cart), state.wishlist)

    def _new(self, basket_id: str) -> BasketState:
        while len(self._baskets) >= self.max_baskets:
            evicted, _ = self._baskets.popitem(last=False)
            _LOG.warning("basket limit %d reached: forgot least recently used basket %s",
                         self.max_baskets, evicted)
        state = BasketState()
        self._baskets[basket_id] = state
        return state

    def _apply_content(self, state: BasketState, basket_id: str, event: CartEvent) -> None:
        if event.cart is not None:
            state.cart = list(event.cart)
        elif event.action == "add":
            assert event.product_id is not None
            if event.product_id not in state.cart:
                if len(state.cart) >= self.max_items:
                    raise InvalidEvent(f"cart already holds {len(state.cart)} items, the limit: "
                                       f"add of {event.product_id!r} refused", event.event_id)
                state.cart.append(event.product_id)
        elif event.action == "remove":
            if event.product_id in state.cart:
                state.cart.remove(event.product_id)
        elif event.action == "clear":
            state.cart = []
        if event.wishlist is not None:
            state.wishlist = event.wishlist

    def drop(self, basket_id: str) -> bool:
        """Forget one basket; True when it was known."""
        return self._baskets.pop(basket_id, None) is not None

    def expire(self, now: float) -> list[str]:
        """Forget baskets idle for longer than ``idle_ttl_s``; returns their ids."""
        limit = now - self.idle_ttl_s
        expired = [bid for bid, st in self._baskets.items() if st.touched < limit]
        for bid in expired:
            del self._baskets[bid]
        return expired

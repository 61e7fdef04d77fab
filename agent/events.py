"""Cart events (contract §3.1): parse + validate one payload, keep each basket's state.

Pure: no I/O, no clocks (the caller passes ``now``), no paho.

Two forms of event reach a basket's cart topic:

* snapshot: ``{"cart": [...], ...}`` holds the whole cart (``cart_items``, the seed's HTTP name,
  is an alias: giving both is an error);
* delta: ``{"action": "add"|"remove"|"clear"|"checkout", "product_id": "..."}``
  (``product_id`` only for add/remove).

Everything else is optional: ``event_id`` (a string of at most 256 characters or a 64-bit integer,
used for de-duplication and echoed back), ``seq`` (integer 0..2**63-1, ordering), ``ts`` (str,
informational), the member, ``wishlist`` (replaces the stored wishlist when present, kept when
absent) and ``top_k``.

The member comes nested, ``"user": {"user_id", "gender", "age"}``, or flat as in the HTTP body and
the seed: ``user_id``, ``gender``, ``age`` at the top level. A ``user`` object wins when both are
given (``"user": null`` is the same as no ``user``); every member field that is present is checked,
flat or nested, member or guest (``gender`` 0/1/null, ``age`` 0..120/null), so a guest's
``"gender": 7`` is refused too. ``user_id`` absent, null or ``"guest"`` is a guest; a nested
``user`` object needs a non-empty ``user_id``.

Only UTF-8 JSON is read: a byte order mark, UTF-16 or UTF-32 is refused with a message that says so
(``json.loads`` on bytes would silently accept them, so HTTP and MQTT differed). Unknown top-level
keys are ignored so senders may extend the payload, and named in ``CartEvent.unknown_fields`` (at
most 16, each cut to 40 characters) so the agent can log them once per basket.

One entry point for both transports: :func:`parse_cart_event` (raw bytes) and
:func:`event_from_obj` (decoded JSON). ``source="http"`` only changes the wording of the byte-level
messages (the bridge's "body ...") and requires a whole cart: the bridge is stateless, so an
``action`` delta is refused there instead of being answered for an empty cart.

Error messages are bounded (at most 300 characters): a rejected value is echoed cut to 40
characters with an ellipsis and its original length, and an ``event_id`` echoed back that is not a
valid id is cut the same way. A 60 KB ``top_k`` costs a few hundred bytes of log, not 60 KB.

:class:`BasketStates` decides what happens to a valid event:

* an ``event_id`` seen in the basket's current trip -> ``duplicate`` (not answered again). A QoS 1
  redelivery is byte-identical; a *different* payload under an id already used in the same trip
  is a sensor bug (or an application-level retry with a fresh ``ts``). It is not applied either
  (every state change is idempotent, so skipping a retry loses nothing, and applying a stale
  retry could re-add a removed item); ``Outcome.id_reused`` flags it so the agent can count and
  log it;
* a ``seq`` lower than the last applied one -> ``stale`` (ignored). An *equal*
  ``seq`` with a different (or no) ``event_id`` **is applied**: the contract only
  drops events that are older, every state change here is idempotent (a
  snapshot, an add of an item already there, a remove of one not there), and
  a sensor may emit several events per cart version;
* ``checkout`` -> the trip is over: cart, wishlist and ``seq`` are dropped (the next trip's ``seq``
  may start low again) and, for :data:`CHECKOUT_GRACE_S`, the finished trip's events (those with an
  ``event_id`` or a ``seq``) are remembered by a digest of their bytes (:attr:`CartEvent.digest`;
  by ``event_id`` for events built without one). Within that time an event is a redelivery of the
  old trip only when it is byte-identical to one of them: a new trip that numbers its events from
  ``e-0001`` again, or restarts its ``seq``, is served. A trip closed moments before stays remembered
  too. The limit: a sensor that sends neither ``ts`` nor anything else that changes, and repeats
  an event byte for byte (same id, seq and content) within a minute of a checkout, cannot be told
  from a redelivery; that event is ignored;
* anything else -> ``answer`` with the resulting cart and wishlist.

Events without ``seq`` are always applied and do not move ``last_seq``.

Memory is bounded in bytes, not only in counts. Per basket: the cart and wishlist hold at most
``max_items`` ids of at most 256 characters, the remembered event ids at most ``recent_ids`` and
``recent_bytes`` (the current trip's, and as much again for finished trips). In total: each
basket's state (its id, cart, wishlist, remembered event ids) is estimated cheaply and
deterministically (string lengths, four bytes a character for non-ASCII, plus fixed per-object
overheads measured on CPython so that the estimate stays above the real allocation; the tests
check it with tracemalloc and in RSS) and the total is kept under ``max_bytes`` (default 64 MiB)
by evicting the least recently used baskets (also when ``max_baskets`` is reached).
``Outcome.evicted`` names them so the agent clears their retained recommendations. An evicted
basket that had items is remembered (the last ``remember_evicted`` ids, at most ``evicted_bytes``,
default ``max_bytes / 16``, for ``idle_ttl_s``): its next delta gets
``InvalidEvent(kind="evicted")`` asking for a snapshot instead of being answered from a silently
partial cart; a snapshot (or a checkout) re-creates it normally. The total may exceed
``max_bytes`` by at most the one basket being served when that basket alone is larger than the
budget.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import reprlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from .errors import EventError

__all__ = ["Limits", "EventLimits", "UserInfo", "CartEvent", "InvalidEvent", "parse_cart_event", "event_from_obj",
           "Outcome", "BasketState", "BasketStates", "ACTIONS", "CHECKOUT_GRACE_S", "INVALID_KINDS"]

ACTIONS = ("add", "remove", "clear", "checkout")
#: ``InvalidEvent.kind`` values (metric labels).
INVALID_KINDS = ("too_large", "encoding", "json", "schema", "evicted")
GUEST = "guest"
_MAX_ID_LENGTH = 256
_MAX_AGE = 120
_MAX_INT64 = 2**63 - 1
_MIN_INT64 = -(2**63)
_SHOW = 40            # characters of a rejected value echoed in a message
_MAX_MESSAGE = 300    # characters of any error message
_MAX_UNKNOWN = 16     # unknown field names kept per event
_SOURCES = ("mqtt", "http")
_KNOWN_FIELDS = frozenset({"event_id", "seq", "ts", "user", "user_id", "gender", "age", "cart", "cart_items",
                           "wishlist", "action", "product_id", "top_k"})


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


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 3, 3, 24, 24, 24


def _show(value: object) -> str:
    """A rejected value, short enough for a log line whatever the sender put in it."""
    if isinstance(value, str):
        return repr(value) if len(value) <= _SHOW else f"{value[:_SHOW]!r}… ({len(value)} characters)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (list, dict)):
        text = _REPR.repr(value)
        if len(text) > 2 * _SHOW:
            text = text[:2 * _SHOW] + "…"
        return f"{text} ({_type_name(value)} of {len(value)} items)" if len(value) > 3 else text
    text = repr(value)
    return text if len(text) <= 2 * _SHOW else text[:2 * _SHOW] + "…"


def _echo_id(event_id: object) -> object:
    """``event_id`` as it may be echoed back: a valid id whole, anything else cut short."""
    if event_id is None or (_is_int(event_id) and _MIN_INT64 <= event_id <= _MAX_INT64):  # type: ignore[operator]
        return event_id
    if isinstance(event_id, str) and len(event_id) <= _MAX_ID_LENGTH and _encodable(event_id):
        return event_id
    return _show(event_id)


class InvalidEvent(EventError):
    """Raised when a cart event payload is rejected; ``kind`` names the category for metrics.

    kinds (:data:`INVALID_KINDS`): ``too_large``, ``encoding``, ``json``, ``schema``, and
    ``evicted`` (a delta for a basket whose state was dropped to stay within the memory budget).
    The message is at most 300 characters and ``event_id`` is bounded, because both are logged and
    published on ``.../errors`` for every rejected event.
    """

    def __init__(self, message: str, event_id: object = None, kind: str = "schema") -> None:
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE - 1] + "…"
        super().__init__(message, _echo_id(event_id))
        self.kind = kind


@dataclass(frozen=True)
class UserInfo:
    """Who is shopping; ``user_id`` None is a guest."""

    user_id: str | None = None
    gender: int | None = None
    age: int | None = None


@dataclass(frozen=True)
class CartEvent:
    """One validated cart event. Exactly one of ``cart`` / ``action`` is set.

    ``digest`` identifies the payload's exact bytes (set by :func:`parse_cart_event`): a QoS 1
    redelivery is byte-identical, a new event reusing an old ``event_id`` is not.
    ``unknown_fields`` names top-level keys the agent does not read (at most 16, cut short).
    """

    cart: tuple[str, ...] | None = None
    action: str | None = None
    product_id: str | None = None
    wishlist: tuple[str, ...] | None = None
    user: UserInfo = field(default_factory=UserInfo)
    top_k: int = 10
    event_id: str | int | None = None
    seq: int | None = None
    ts: str | None = None
    digest: bytes | None = field(default=None, compare=False)
    unknown_fields: tuple[str, ...] = ()

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


def _valid_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_ID_LENGTH and _encodable(value)


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


def _demographics(prefix: str, gender: object, age: object, event_id: object) -> None:
    """The member checks shared by the nested and the flat form (``prefix`` "user." or "")."""
    if gender is not None and not (_is_int(gender) and gender in (0, 1)):
        raise InvalidEvent(f"'{prefix}gender' must be 0, 1 or null, got {_show(gender)}", event_id)
    if age is not None and not (_is_int(age) and 0 <= age <= _MAX_AGE):  # type: ignore[operator]
        raise InvalidEvent(f"'{prefix}age' must be null or an integer 0..{_MAX_AGE}, got {_show(age)}",
                           event_id)


def _user(value: object, event_id: object) -> UserInfo:
    """The nested form: ``"user": {...}``."""
    if value is None:
        return UserInfo()
    if not isinstance(value, dict):
        raise InvalidEvent(f"'user' must be an object or null, got {_type_name(value)}", event_id)
    user_id = value.get("user_id")
    if not _valid_id(user_id):
        raise InvalidEvent("'user.user_id' must be a non-empty string when 'user' is given "
                           "(send no 'user' or null for a guest)", event_id)
    gender, age = value.get("gender"), value.get("age")
    _demographics("user.", gender, age, event_id)
    return UserInfo(None if user_id == GUEST else user_id, gender, age)  # type: ignore[arg-type]


def _flat_user(data: dict[str, Any], event_id: object) -> UserInfo:
    """The flat form (HTTP body, seed): ``user_id``, ``gender``, ``age`` at the top level."""
    user_id, gender, age = data.get("user_id"), data.get("gender"), data.get("age")
    if user_id is not None and not _valid_id(user_id):
        raise InvalidEvent(f"'user_id' must be a non-empty string of at most {_MAX_ID_LENGTH} characters, "
                           f"or null or \"guest\" for a guest; got {_show(user_id)}", event_id)
    _demographics("", gender, age, event_id)
    return UserInfo(None if user_id in (None, GUEST) else user_id, gender, age)


_UNICODE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                 (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _decode(payload: bytes, limits: Limits, source: str) -> object:
    """Bytes -> JSON value, UTF-8 only; raises InvalidEvent (too_large, encoding, json)."""
    http = source == "http"
    noun = "body" if http else "payload"
    if len(payload) > limits.max_payload_bytes:
        raise InvalidEvent(f"body of {len(payload)} bytes exceeds {limits.max_payload_bytes}" if http else
                           f"payload of {len(payload)} bytes is over the limit of "
                           f"{limits.max_payload_bytes} bytes", kind="too_large")
    if payload.startswith(codecs.BOM_UTF8):
        raise InvalidEvent(f"{noun} starts with a byte order mark: send UTF-8 JSON without a BOM",
                           kind="encoding")
    for bom, name in _UNICODE_BOMS:
        if payload.startswith(bom):
            raise InvalidEvent(f"{noun} is not valid UTF-8: it is {name} (byte order mark); send UTF-8 JSON",
                               kind="encoding")
    head = payload[:4]
    if len(head) >= 2 and 0 in head:  # JSON starts with an ASCII character: NULs here mean UTF-16/32
        name = "UTF-32" if head.count(0) >= 3 else "UTF-16"
        raise InvalidEvent(f"{noun} is not valid UTF-8: it looks like {name} (NUL bytes at its start); "
                           f"send UTF-8 JSON", kind="encoding")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"{noun} is not valid UTF-8 (byte {exc.start})", kind="encoding") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent(f"body is not valid JSON: {type(exc).__name__}: {exc}" if http else
                           f"payload is not JSON: {exc}", kind="json") from None


def parse_cart_event(payload: bytes, limits: Limits | None = None, *, source: str = "mqtt") -> CartEvent:
    """Validate one cart-topic payload (or, ``source="http"``, a bridge body); raises :class:`InvalidEvent`.

    The event's ``digest`` is a short hash of ``payload``: redeliveries are byte-identical.
    """
    if limits is None:
        limits = EventLimits()
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
    data = _decode(payload, limits, source)
    return event_from_obj(data, limits, source=source, digest=hashlib.blake2b(payload, digest_size=8).digest())


def _field_name(key: str) -> str:
    return key if len(key) <= _SHOW else key[:_SHOW] + "…"


def event_from_obj(data: object, limits: Limits | None = None, *, source: str = "mqtt",
                   digest: bytes | None = None) -> CartEvent:
    """Validate an already-decoded event: the one place for the rules, whatever the transport.

    ``source="http"``: the body must hold a whole cart (``cart`` or ``cart_items``).
    ``digest`` identifies the payload bytes when the caller has them (:func:`parse_cart_event` does).
    """
    if limits is None:
        limits = EventLimits()
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
    if not isinstance(data, dict):
        raise InvalidEvent(f"event must be a JSON object, got {_type_name(data)}")

    event_id = data.get("event_id")
    if event_id is not None and not (_valid_id(event_id) or (
            _is_int(event_id) and _MIN_INT64 <= event_id <= _MAX_INT64)):
        raise InvalidEvent("'event_id' must be a non-empty string or an integer (a string of at most "
                           f"{_MAX_ID_LENGTH} characters, a 64-bit integer)")
    seq = data.get("seq")
    if seq is not None and not (_is_int(seq) and 0 <= seq <= _MAX_INT64):
        raise InvalidEvent(f"'seq' must be a non-negative integer (at most 2**63-1), got {_show(seq)}", event_id)
    ts = data.get("ts")
    if ts is not None and not (isinstance(ts, str) and _encodable(ts)):
        raise InvalidEvent(f"'ts' must be a string, got {_type_name(ts)}", event_id)
    top_k = data.get("top_k")
    if top_k is None:
        top_k = limits.default_top_k
    elif not _is_int(top_k) or not 1 <= top_k <= limits.max_top_k:
        raise InvalidEvent(f"'top_k' must be an integer 1..{limits.max_top_k}, got {_show(top_k)}",
                           event_id)
    flat = _flat_user(data, event_id)  # checked even when 'user' wins: garbage is never silently passed
    user = _user(data["user"], event_id) if data.get("user") is not None else flat
    wishlist = None
    if data.get("wishlist") is not None:
        wishlist = _ids("wishlist", data["wishlist"], limits, event_id)

    cart_key = "cart"
    if data.get("cart_items") is not None:
        if data.get("cart") is not None:
            raise InvalidEvent("give either 'cart' or 'cart_items', not both", event_id)
        cart_key = "cart_items"
    cart = action = product_id = None
    has_cart, has_action = data.get(cart_key) is not None, data.get("action") is not None
    if has_cart and has_action:
        raise InvalidEvent("give either 'cart' (snapshot) or 'action' (delta), not both", event_id)
    if source == "http" and not has_cart:
        raise InvalidEvent("the bridge answers a whole cart: give 'cart' (or 'cart_items'); 'action' deltas "
                           "are for MQTT" if has_action else "'cart' (or 'cart_items') is required", event_id)
    if has_cart:
        cart = _ids(cart_key, data[cart_key], limits, event_id)
    elif has_action:
        action = data["action"]
        if not isinstance(action, str) or action not in ACTIONS:
            raise InvalidEvent(f"unknown action {_show(action)}: expected one of {', '.join(ACTIONS)}",
                               event_id)
        product_id = data.get("product_id")
        if (action in ("add", "remove") or product_id is not None) and not _valid_id(product_id):
            raise InvalidEvent(f"'product_id' must be a non-empty string"
                               f"{' for action ' + repr(action) if action in ('add', 'remove') else ''}",
                               event_id)
        if action in ("clear", "checkout"):
            product_id = None
    else:
        raise InvalidEvent("missing cart content: give 'cart' (a list of product ids) or 'action'",
                           event_id)
    unknown: list[str] = []
    if len(data) > len(_KNOWN_FIELDS) or not data.keys() <= _KNOWN_FIELDS:
        for key in data:
            if key not in _KNOWN_FIELDS:
                unknown.append(_field_name(key))
                if len(unknown) == _MAX_UNKNOWN:
                    break
    return CartEvent(cart=cart, action=action, product_id=product_id, wishlist=wishlist, user=user,
                     top_k=top_k, event_id=event_id, seq=seq, ts=ts, digest=digest,
                     unknown_fields=tuple(unknown))


@dataclass(frozen=True)
class Outcome:
    """What to do with an event: ``kind`` is answer | duplicate | stale | checkout.

    ``evicted``: baskets whose state was just dropped to stay within ``max_bytes`` / ``max_baskets``
    (the agent clears their retained recommendations; may be set whatever the kind).
    ``id_reused``: a duplicate whose bytes differ from the event first seen under that id.
    ``unknown_fields``: set the first time a basket sends fields the agent does not know (log once).
    """

    kind: str
    cart: tuple[str, ...] = ()
    wishlist: tuple[str, ...] = ()
    evicted: tuple[str, ...] = ()
    id_reused: bool = False
    unknown_fields: tuple[str, ...] = ()

    @property
    def should_answer(self) -> bool:
        return self.kind == "answer"


# Estimated bytes (CPython, 64-bit; checked against tracemalloc in tests/test_events.py). Cheap and
# deterministic: no sys.getsizeof walks, the same number for the same state on every machine.
_STR = 72        # an ASCII str object's header (49 bytes), its NUL and allocator rounding
_WIDE_STR = 80   # the same for other strings (74..76 bytes), which are counted at 4 bytes a character
_SLOT = 16       # one reference in a list or tuple, with over-allocation
_ENTRY = 128     # one OrderedDict/dict entry: table slot, index, linked-list node, resize slack
_DIGEST = 48     # an 8-byte bytes object
_INT = 48        # a 64-bit int (or float) object
_BASKET = 640    # a BasketState, its containers' first tables, its entry in the basket table
_EVICTED = _ENTRY + _INT  # a remembered eviction: its entry and its time (plus the basket id)

_NO_IDS: Mapping[Any, None] = MappingProxyType({})


def _str_bytes(text: str) -> int:
    return _STR + len(text) if text.isascii() else _WIDE_STR + 4 * len(text)


def _items_bytes(items: tuple[str, ...] | list[str]) -> int:
    return sum(_str_bytes(s) for s in items) + _SLOT * len(items)


def _closed_bytes(mark: object) -> int:
    """One event of a finished trip: the digest of its bytes (or its id when it had no digest)."""
    return _ENTRY + (_DIGEST if isinstance(mark, bytes) else _entry_bytes(mark, None) - _ENTRY)


def _entry_bytes(key: object, digest: bytes | None) -> int:
    """One remembered event: its key (event id, or the digest itself for an id-less event) and digest."""
    if isinstance(key, str):
        size = _str_bytes(key)
    elif isinstance(key, bytes):
        return _ENTRY + _DIGEST  # the key is the digest
    else:
        size = _INT
    return _ENTRY + size + (_DIGEST if digest is not None else 0)


@dataclass(slots=True, eq=False)
class BasketState:
    """One basket: cart (ordered, no duplicates), wishlist, ordering and de-dup memory, accounted bytes."""

    cart: list[str] = field(default_factory=list)
    wishlist: tuple[str, ...] = ()
    last_seq: int | None = None
    # the current trip's events: event id (or, id-less with a seq, the digest) -> digest of the bytes
    recent: OrderedDict[Any, bytes | None] = field(default_factory=OrderedDict)
    touched: float = 0.0
    # After a checkout, for CHECKOUT_GRACE_S: the finished trips' events by the digest of their bytes
    # (by event id for events without a digest), so a late QoS 1 redelivery cannot reopen the basket.
    closed: Mapping[Any, None] = field(default_factory=lambda: _NO_IDS)
    closed_at: float | None = None
    unknown_reported: bool = False
    cart_bytes: int = 0
    wishlist_bytes: int = 0
    recent_bytes: int = 0
    closed_bytes: int = 0
    nbytes: int = 0  # everything above plus the basket id and fixed overhead (set by BasketStates)


#: How long a checked-out trip's events keep catching redeliveries: long enough for QoS 1
#: redelivery after a reconnect. Only byte-identical events are caught, so a new trip that numbers
#: its events from "e-0001" again is served even within this time.
CHECKOUT_GRACE_S = 60.0


class BasketStates:
    """Every basket's state, bounded in count and in bytes. Not thread-safe: one worker owns it.

    ``max_items`` bounds the cart a series of ``add`` deltas can build (further adds
    are refused, like an oversized snapshot would be). ``recent_ids`` / ``recent_bytes`` bound
    the event ids remembered per basket for de-duplication (and, after a checkout, the finished
    trip's); ``max_bytes`` bounds the total (baskets plus remembered evictions);
    ``remember_evicted`` / ``evicted_bytes`` (default ``max_bytes // 16``) bound the evicted
    baskets remembered so that their next delta can be refused.

    ``shared`` (the agent is one of a shared subscription group): other agents of the group see
    some of a basket's events, the checkout included, so this agent's ``seq`` and event ids of a
    basket may belong to a trip that already ended. Then only byte-identical redeliveries are
    duplicates and ``seq`` never makes an event stale (the service takes only snapshots then).
    """

    def __init__(self, *, idle_ttl_s: float = 1800.0, max_baskets: int = 10000,
                 recent_ids: int = 256, max_items: int = 200, max_bytes: int = 64 * 2**20,
                 recent_bytes: int = 32 * 2**10, remember_evicted: int = 10000,
                 evicted_bytes: int | None = None, shared: bool = False) -> None:
        if evicted_bytes is None:
            evicted_bytes = max_bytes // 16
        if (idle_ttl_s <= 0 or max_baskets < 1 or recent_ids < 1 or max_items < 1 or max_bytes < 1
                or recent_bytes < 1 or remember_evicted < 0 or evicted_bytes < 0):
            raise ValueError("idle_ttl_s, max_baskets, recent_ids, max_items, max_bytes and recent_bytes must "
                             "be positive, remember_evicted and evicted_bytes not negative")
        self.idle_ttl_s = idle_ttl_s
        self.max_baskets = max_baskets
        self.recent_ids = recent_ids
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.recent_bytes = recent_bytes
        self.remember_evicted = remember_evicted
        self.evicted_bytes = evicted_bytes
        self.shared = shared
        self.evictions = 0  # baskets evicted so far (budget or max_baskets), for metrics
        self._baskets: OrderedDict[str, BasketState] = OrderedDict()  # least recently touched first
        self._evicted: OrderedDict[str, float] = OrderedDict()  # evicted with items -> when
        self._evicted_bytes = 0
        self._nbytes = 0

    def __len__(self) -> int:
        return len(self._baskets)

    def __contains__(self, basket_id: object) -> bool:
        return basket_id in self._baskets

    def get(self, basket_id: str) -> BasketState | None:
        return self._baskets.get(basket_id)

    @property
    def nbytes(self) -> int:
        """Accounted bytes of every basket's state and of the remembered evictions."""
        return self._nbytes

    def apply(self, basket_id: str, event: CartEvent, now: float) -> Outcome:
        """Apply ``event`` to ``basket_id`` at time ``now`` (seconds, any monotonic origin).

        Raises :class:`InvalidEvent` for an add past ``max_items`` and (kind ``evicted``) for a
        delta to a basket whose state was evicted; the state is unchanged then.
        """
        for name, items in (("cart", event.cart), ("wishlist", event.wishlist)):
            if items is not None and len(items) > self.max_items:
                raise InvalidEvent(f"'{name}' has {len(items)} items, more than the limit of {self.max_items}",
                                   event.event_id)
        state = self._baskets.get(basket_id)
        if state is None:
            self._check_evicted(basket_id, event, now)
        else:
            if state.closed_at is not None and now - state.closed_at >= CHECKOUT_GRACE_S:
                state.closed, state.closed_bytes, state.closed_at = _NO_IDS, 0, None
                self._account(basket_id, state)
            seen = self._seen_bytes(state, event) if self.shared else self._seen(state, event)
            if seen is not None:
                return seen
            if (not self.shared and event.seq is not None and state.last_seq is not None
                    and event.seq < state.last_seq):
                return Outcome("stale")
        if state is None:
            state = self._new(basket_id)
        if event.action == "checkout":
            self._checkout(state, event, now)
            kind = "checkout"
        else:
            self._apply_content(state, event)
            if event.seq is not None:
                state.last_seq = event.seq
            self._remember(state, event)
            kind = "answer"
        state.touched = now
        self._baskets.move_to_end(basket_id)
        self._account(basket_id, state)
        unknown: tuple[str, ...] = ()
        if event.unknown_fields and not state.unknown_reported:
            state.unknown_reported, unknown = True, event.unknown_fields
        evicted = self._make_room(now)
        if kind == "checkout":
            return Outcome("checkout", evicted=evicted, unknown_fields=unknown)
        return Outcome("answer", tuple(state.cart), state.wishlist, evicted=evicted, unknown_fields=unknown)

    def _seen(self, state: BasketState, event: CartEvent) -> Outcome | None:
        """A redelivery (or a reused id) of an event this basket already applied, else None."""
        event_id, digest = event.event_id, event.digest
        if event_id is not None and event_id in state.recent:
            first = state.recent[event_id]
            state.recent.move_to_end(event_id)
            return Outcome("duplicate", id_reused=first is not None and digest is not None and first != digest)
        if state.closed and (event_id is not None or event.seq is not None):
            if (digest if digest is not None else event_id) in state.closed:
                return Outcome("duplicate")  # byte-identical to an event of a trip just finished
        return None

    @staticmethod
    def _seen_bytes(state: BasketState, event: CartEvent) -> Outcome | None:
        """``shared``: a duplicate only when byte-identical to a remembered event (a QoS 1 redelivery)."""
        digest = event.digest
        if digest is None:
            return None
        if digest in state.closed or any(d == digest for d in state.recent.values()):
            return Outcome("duplicate")
        return None

    def _check_evicted(self, basket_id: str, event: CartEvent, now: float) -> None:
        at = self._evicted.get(basket_id)
        if at is None:
            return
        if now - at < self.idle_ttl_s and event.cart is None and event.action != "checkout":
            raise InvalidEvent("this basket's state was dropped (the agent's memory for baskets was full), so a "
                               "delta cannot be applied: send a snapshot with the whole cart and the wishlist "
                               "('cart': [...], 'wishlist': [...]; the stored wishlist was dropped too)",
                               event.event_id, kind="evicted")
        self._forget_evicted(basket_id)

    def _new(self, basket_id: str) -> BasketState:
        state = BasketState()
        self._baskets[basket_id] = state
        self._account(basket_id, state)
        return state

    def _checkout(self, state: BasketState, event: CartEvent, now: float) -> None:
        """The trip is over: empty the basket, let a new trip start its seq again, remember the trip's events.

        A trip closed moments before (within the grace period) stays remembered too: two quick trips
        must not let the first one's redeliveries back in.
        """
        closed: OrderedDict[Any, None] = OrderedDict(state.closed)
        for key, digest in state.recent.items():
            mark = digest if digest is not None else key
            closed[mark] = None
            closed.move_to_end(mark)
        if self._key(event) is not None:
            closed[event.digest if event.digest is not None else event.event_id] = None
        size = sum(_closed_bytes(mark) for mark in closed)
        while len(closed) > 1 and (len(closed) > self.recent_ids or size > self.recent_bytes):
            size -= _closed_bytes(closed.popitem(last=False)[0])
        state.closed, state.closed_bytes, state.closed_at = closed, size, now
        state.recent, state.recent_bytes = OrderedDict(), 0
        state.cart, state.wishlist, state.last_seq = [], (), None
        state.cart_bytes = state.wishlist_bytes = 0

    @staticmethod
    def _key(event: CartEvent) -> Any:
        """What an event is remembered by: its id; an id-less event with a seq by its digest; else nothing."""
        if event.event_id is not None:
            return event.event_id
        return event.digest if event.seq is not None else None

    def _remember(self, state: BasketState, event: CartEvent) -> None:
        key = self._key(event)
        if key is None:
            return
        if key in state.recent:  # an id-less event delivered again before the checkout: applied, kept
            old = state.recent[key]
            if old != event.digest:  # an id reused by a new trip (shared group): its redelivery must match it
                state.recent_bytes += _entry_bytes(key, event.digest) - _entry_bytes(key, old)
                state.recent[key] = event.digest
            state.recent.move_to_end(key)
            return
        state.recent[key] = event.digest
        state.recent_bytes += _entry_bytes(key, event.digest)
        while len(state.recent) > 1 and (len(state.recent) > self.recent_ids
                                         or state.recent_bytes > self.recent_bytes):
            old, digest = state.recent.popitem(last=False)
            state.recent_bytes -= _entry_bytes(old, digest)

    def _apply_content(self, state: BasketState, event: CartEvent) -> None:
        if event.cart is not None:
            state.cart = list(event.cart)
            state.cart_bytes = _items_bytes(event.cart)
        elif event.action == "add":
            assert event.product_id is not None
            if event.product_id not in state.cart:
                if len(state.cart) >= self.max_items:
                    raise InvalidEvent(f"cart already holds {len(state.cart)} items, the limit: "
                                       f"add of {_show(event.product_id)} refused", event.event_id)
                state.cart.append(event.product_id)
                state.cart_bytes += _str_bytes(event.product_id) + _SLOT
        elif event.action == "remove":
            if event.product_id in state.cart:
                state.cart.remove(event.product_id)
                state.cart_bytes -= _str_bytes(event.product_id) + _SLOT
        elif event.action == "clear":
            state.cart, state.cart_bytes = [], 0
        if event.wishlist is not None:
            state.wishlist = event.wishlist
            state.wishlist_bytes = _items_bytes(event.wishlist)

    def _account(self, basket_id: str, state: BasketState) -> None:
        size = (_BASKET + _str_bytes(basket_id) + state.cart_bytes + state.wishlist_bytes + state.recent_bytes
                + state.closed_bytes)
        self._nbytes += size - state.nbytes
        state.nbytes = size

    def _make_room(self, now: float) -> tuple[str, ...]:
        """Evict least recently used baskets (never the one just served) until within both bounds."""
        evicted: list[str] = []
        while len(self._baskets) > 1 and (len(self._baskets) > self.max_baskets or self._nbytes > self.max_bytes):
            basket_id, state = self._baskets.popitem(last=False)
            self._nbytes -= state.nbytes
            self.evictions += 1
            evicted.append(basket_id)
            if state.cart or state.wishlist:  # an empty basket loses nothing: a delta may start from empty
                self._remember_evicted(basket_id, now)
        return tuple(evicted)

    def _remember_evicted(self, basket_id: str, now: float) -> None:
        if self.remember_evicted == 0:
            return
        self._evicted[basket_id] = now
        size = _EVICTED + _str_bytes(basket_id)
        self._evicted_bytes += size
        self._nbytes += size
        while self._evicted and (len(self._evicted) > self.remember_evicted
                                 or self._evicted_bytes > self.evicted_bytes):
            self._forget_evicted(next(iter(self._evicted)))

    def _forget_evicted(self, basket_id: str) -> None:
        if self._evicted.pop(basket_id, None) is not None:
            size = _EVICTED + _str_bytes(basket_id)
            self._evicted_bytes -= size
            self._nbytes -= size

    def drop(self, basket_id: str) -> bool:
        """Forget one basket; True when it was known."""
        self._forget_evicted(basket_id)
        state = self._baskets.pop(basket_id, None)
        if state is None:
            return False
        self._nbytes -= state.nbytes
        return True

    def expire(self, now: float) -> list[str]:
        """Forget baskets idle for longer than ``idle_ttl_s`` (and evictions as old); returns the baskets' ids."""
        limit = now - self.idle_ttl_s
        expired = [bid for bid, st in self._baskets.items() if st.touched < limit]
        for bid in expired:
            self._nbytes -= self._baskets.pop(bid).nbytes
        for bid in [bid for bid, at in self._evicted.items() if at < limit]:
            self._forget_evicted(bid)
        return expired

    def recount(self) -> int:
        """The accounted bytes computed afresh from every state (a check of the running total)."""
        total = sum(_EVICTED + _str_bytes(bid) for bid in self._evicted)
        for bid, st in self._baskets.items():
            total += (_BASKET + _str_bytes(bid) + _items_bytes(st.cart) + _items_bytes(st.wishlist)
                      + sum(_entry_bytes(k, d) for k, d in st.recent.items())
                      + sum(_closed_bytes(mark) for mark in st.closed))
        return total

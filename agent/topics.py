"""MQTT topic names (contract §3): build them and parse them, nothing else.

Pure: no I/O, no paho. ``PREFIX`` is configurable (``smartbasket/store-17``)::

    PREFIX/basket/{basket_id}/cart              sensor -> agent
    PREFIX/basket/{basket_id}/recommendations   agent -> display (retained)
    PREFIX/basket/{basket_id}/errors            agent -> anyone
    PREFIX/models/updated                       retrain server -> agents (retained)
    PREFIX/agent/{agent_id}/status              agent -> ops (retained, Last Will)

Ids (basket, agent) are one topic level: non-empty, no ``/``, ``+``, ``#`` or NUL.

Several agents may share one store's carts through a shared subscription
(``$share/{group}/PREFIX/basket/+/cart``, :meth:`Topics.cart_subscription_for`): the
broker gives each event to one member of the group, under its real topic.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from .errors import EventError

_LOG = logging.getLogger(__name__)

__all__ = ["Topics", "BasketTopic", "validate_prefix", "validate_id", "validate_shared_group", "BASKET_KINDS",
           "SHARED_GROUP_RULE"]

#: the per-basket topic kinds
BASKET_KINDS = ("cart", "recommendations", "errors")
_FORBIDDEN = ("/", "+", "#", "\x00")
_MAX_ID_LENGTH = 256
_SHARED_GROUP = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: what a shared subscription's group name may be (``broker.shared_group``)
SHARED_GROUP_RULE = "1 to 64 characters from A-Z, a-z, 0-9, '_' and '-' ([A-Za-z0-9_-]{1,64})"


def validate_id(what: str, value: object) -> str:
    """Return ``value`` when it is a valid single-level id; raises ValueError otherwise."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if any(c in value for c in _FORBIDDEN):
        raise ValueError(f"{what} must not contain '/', '+', '#' or NUL, got {value!r}")
    if len(value) > _MAX_ID_LENGTH:
        raise ValueError(f"{what} is longer than {_MAX_ID_LENGTH} characters")
    return value


def validate_shared_group(group: object) -> str:
    """Return ``group`` when it is a usable shared-subscription group name; raises ValueError otherwise."""
    if not isinstance(group, str) or not _SHARED_GROUP.fullmatch(group):
        raise ValueError(f"shared group must be {SHARED_GROUP_RULE}, got {group!r}")
    return group


def validate_prefix(prefix: object) -> str:
    """Return the normalised prefix (outer ``/`` stripped); raises ValueError when unusable."""
    if not isinstance(prefix, str):
        raise ValueError(f"topic prefix must be a string, got {prefix!r}")
    norm = prefix.strip("/")
    if not norm or any(c in norm for c in ("+", "#", "\x00")) or "//" in norm:
        raise ValueError(f"topic prefix must be a topic path without wildcards or empty levels, "
                         f"got {prefix!r}")
    return norm


_CACHED = 4096  # entries in each of Topics' caches


def _remember(cache: dict[str, str], key: str, value: str) -> None:
    if len(cache) >= _CACHED:
        cache.clear()
    cache[key] = value


@dataclass(frozen=True)
class BasketTopic:
    """One per-basket topic: ``PREFIX/basket/{basket_id}/{kind}``."""

    prefix: str
    basket_id: str
    kind: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", validate_prefix(self.prefix))
        validate_id("basket id", self.basket_id)
        if self.kind not in BASKET_KINDS:
            raise ValueError(f"basket topic kind must be one of {BASKET_KINDS}, got {self.kind!r}")

    def __str__(self) -> str:
        return f"{self.prefix}/basket/{self.basket_id}/{self.kind}"


@dataclass(frozen=True)
class Topics:
    """All topic names under one prefix. ``Topics("smartbasket/store-17").cart("b-1")``."""

    prefix: str = "smartbasket"
    # per event the agent parses a cart topic and names an answer topic: validating both each time
    # was ~5 % of a guest event's CPU. A store has hundreds of baskets; past _CACHED the caches restart.
    _basket_of: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    _answers_to: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", validate_prefix(self.prefix))

    def cart(self, basket_id: str) -> str:
        return str(BasketTopic(self.prefix, basket_id, "cart"))

    def recommendations(self, basket_id: str) -> str:
        topic = self._answers_to.get(basket_id)
        if topic is None:
            topic = str(BasketTopic(self.prefix, basket_id, "recommendations"))
            _remember(self._answers_to, basket_id, topic)
        return topic

    def errors(self, basket_id: str) -> str:
        return str(BasketTopic(self.prefix, basket_id, "errors"))

    @property
    def models_updated(self) -> str:
        return f"{self.prefix}/models/updated"

    def status(self, agent_id: str) -> str:
        return f"{self.prefix}/agent/{validate_id('agent id', agent_id)}/status"

    @property
    def cart_subscription(self) -> str:
        """The filter the agent subscribes to: every basket's cart topic."""
        return f"{self.prefix}/basket/+/cart"

    def cart_subscription_for(self, shared_group: str | None) -> str:
        """:attr:`cart_subscription`, or with ``shared_group`` the shared subscription
        ``$share/{group}/PREFIX/basket/+/cart``: the broker gives each event to one member of the
        group (MQTT 5; Mosquitto 2.0 also for MQTT 3.1.1 clients). Messages still arrive under their
        real topic (``PREFIX/basket/b-1/cart``), so :meth:`parse_cart` reads them as usual."""
        if shared_group is None:
            return self.cart_subscription
        return f"$share/{validate_shared_group(shared_group)}/{self.cart_subscription}"

    def parse_basket(self, topic: str) -> BasketTopic:
        """``PREFIX/basket/{id}/{kind}`` -> BasketTopic; raises EventError for anything else."""
        head = f"{self.prefix}/basket/"
        if not topic.startswith(head):
            raise EventError(f"topic {topic!r} is not under {head!r}")
        basket_id, sep, kind = topic[len(head):].rpartition("/")
        if not sep:
            raise EventError(f"topic {topic!r} has no basket id")
        try:
            return BasketTopic(self.prefix, basket_id, kind)
        except ValueError as exc:
            raise EventError(f"bad topic {topic!r}: {exc}") from exc

    def parse_cart(self, topic: str) -> str:
        """A cart topic -> its basket id; raises EventError when it is not one."""
        basket_id = self._basket_of.get(topic)
        if basket_id is not None:
            return basket_id
        parsed = self.parse_basket(topic)
        if parsed.kind != "cart":
            raise EventError(f"topic {topic!r} is not a cart topic")
        _remember(self._basket_of, topic, parsed.basket_id)  # only what passed every check
        return parsed.basket_id

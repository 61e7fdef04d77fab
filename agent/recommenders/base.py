"""What every recommender takes and the protocol it follows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["RecommendRequest", "Recommender"]


@dataclass(frozen=True)
class RecommendRequest:
    """One question to a recommender: who is shopping and what is in the basket.

    ``user_id`` None means a guest. ``gender`` (0 male, 1 female) and ``age`` may
    be None (unknown). Items in ``cart`` or ``wishlist`` are never recommended.
    """

    cart: tuple[str, ...] = ()
    wishlist: tuple[str, ...] = ()
    top_k: int = 10
    user_id: str | None = None
    gender: int | None = None
    age: int | None = None
    excluded: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "excluded", frozenset(self.cart) | frozenset(self.wishlist))


class Recommender(Protocol):
    """A trained model: pure, no I/O; ids in, ids out (best first)."""

    def recommend(self, request: RecommendRequest) -> list[str]: ...

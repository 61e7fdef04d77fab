"""The protocol and its metrics: time split, one held-out product per basket, HR@k / MRR@k.

The metric code knows nothing about how a model works; it only asks
recommender-like objects (``recommend(RecommendRequest) -> list[str]``) for
``k`` items.

1. **Time split** (:func:`split_by_time`): a basket belongs to the test window
   when its *last* row is at or after ``cutoff = latest timestamp - days``;
   every training row is therefore strictly older than the cutoff. A
   validation window is carved the same way out of the training rows, for
   tuning; the test window is never used for choosing anything. Data without
   a shared calendar (the Instacart sample: days between a shopper's orders
   only) use :func:`split_last_basket`: each member's last basket.
2. **Held-out item** (:func:`held_out_cases`): each test basket with at least
   two distinct products gives one case; one product, chosen by a seeded RNG,
   is hidden and the rest (in basket order) is the cart. Optionally a seeded
   sample of ``max_cases`` baskets.
3. **Metrics** (:func:`evaluate`): HR@k (hidden product among the k
   recommendations) and MRR@k (1/rank, 0 when not in the top k), averaged
   over cases, with the standard error of HR (:attr:`Metrics.se`) and of a
   difference between two methods on the same cases (:func:`paired_se`).
   Every target counts, including products never seen in training (a miss is
   a miss); :func:`unseen_targets` says how many there are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from agent.recommenders.base import RecommendRequest

from ..data import UNKNOWN, PurchaseLog

_LOG = logging.getLogger(__name__)

__all__ = ["Case", "Metrics", "DAY", "split_by_time", "split_last_basket", "held_out_cases", "rank_of",
           "hr_mrr", "evaluate", "unseen_targets", "paired_se"]

DAY = 86_400


def split_by_time(log: PurchaseLog, days: float, *,
                  end: int | None = None) -> tuple[PurchaseLog, PurchaseLog, int]:
    """(earlier rows, last-``days`` rows, cutoff epoch seconds), whole baskets.

    ``end`` defaults to the latest timestamp in ``log``. A basket goes to the
    second part when its last row is at or after ``cutoff = end - days``, so
    every row of the first part is strictly older than ``cutoff``.
    """
    if len(log) == 0:
        raise ValueError("cannot split an empty purchase log")
    end = int(log.timestamps.max()) if end is None else int(end)
    cutoff = end - int(round(days * DAY))
    _, inverse = np.unique(log.session_ids, return_inverse=True)
    last = np.full(inverse.max() + 1, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(last, inverse, log.timestamps)
    later = last[inverse] >= cutoff
    return log.select(~later), log.select(later), cutoff


def split_last_basket(log: PurchaseLog) -> tuple[PurchaseLog, PurchaseLog, int]:
    """(earlier rows, every member's last basket, the earliest timestamp of those baskets).

    For data whose timestamps are per shopper (no shared calendar): the
    "test month" is each member's newest basket; guests' baskets stay in the
    first part.
    """
    if len(log) == 0:
        raise ValueError("cannot split an empty purchase log")
    sessions, inverse = np.unique(log.session_ids, return_inverse=True)
    last = np.full(len(sessions), np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(last, inverse, log.timestamps)
    owner = np.full(len(sessions), "", dtype=log.user_ids.dtype)
    owner[inverse] = log.user_ids
    newest: dict[str, int] = {}
    for s in np.lexsort((sessions, last)).tolist():  # oldest first: the member's last one wins
        if owner[s]:
            newest[str(owner[s])] = s
    later_session = np.zeros(len(sessions), dtype=bool)
    later_session[list(newest.values())] = True
    later = later_session[inverse]
    cutoff = int(log.timestamps[later].min()) if later.any() else int(log.timestamps.max()) + 1
    return log.select(~later), log.select(later), cutoff


@dataclass(frozen=True)
class Case:
    """One held-out question: given ``cart``, is ``target`` recommended?"""

    session_id: str
    cart: tuple[str, ...]
    target: str
    user_id: str | None = None
    gender: int | None = None
    age: int | None = None
    #: when the basket was bought (epoch seconds of its first row; None: unknown)
    at: int | None = None

    def request(self, k: int = 10, *, hide_user: bool = False,
                user_id: str | None = None) -> RecommendRequest:
        """The recommender's question. ``hide_user``: ask as a guest (or as ``user_id``)."""
        if hide_user:
            return RecommendRequest(cart=self.cart, top_k=k, user_id=user_id,
                                    gender=self.gender if user_id else None,
                                    age=self.age if user_id else None)
        return RecommendRequest(cart=self.cart, top_k=k, user_id=self.user_id,
                                gender=self.gender, age=self.age)


def held_out_cases(log: PurchaseLog, *, min_items: int = 2, max_cases: int | None = None,
                   seed: int = 0) -> list[Case]:
    """One case per basket of ``log`` with >= ``min_items`` distinct products.

    Baskets are taken in time order; with ``max_cases`` a seeded random sample
    of them (still in time order). The hidden product is drawn with the same
    seeded RNG; the cart is the basket's other distinct products in row order.
    """
    if min_items < 2:
        raise ValueError("min_items must be >= 2 (one item is hidden, the cart must not be empty)")
    baskets: dict[str, list[int]] = {}
    for row, sid in enumerate(log.session_ids.tolist()):
        baskets.setdefault(sid, []).append(row)
    products = log.product_ids.tolist()
    eligible: list[tuple[str, list[str], int]] = []
    for sid, rows in baskets.items():
        items = list(dict.fromkeys(products[r] for r in rows))
        if len(items) >= min_items:
            eligible.append((sid, items, rows[0]))
    rng = np.random.default_rng(seed)
    if max_cases is not None and len(eligible) > max_cases:
        pick = np.sort(rng.choice(len(eligible), size=max_cases, replace=False))
        eligible = [eligible[i] for i in pick.tolist()]
    cases = []
    for sid, items, first in eligible:
        h = int(rng.integers(len(items)))
        uid = str(log.user_ids[first])
        g, a = int(log.genders[first]), int(log.ages[first])
        cases.append(Case(session_id=sid, cart=tuple(items[:h] + items[h + 1:]), target=items[h],
                          user_id=uid or None, gender=None if g == UNKNOWN else g,
                          age=None if a == UNKNOWN else a, at=int(log.timestamps[first])))
    return cases


def unseen_targets(cases: Sequence[Case], train: PurchaseLog) -> int:
    """How many targets were never bought in ``train`` (no model can know them well)."""
    seen = set(np.unique(train.product_ids).tolist())
    return sum(c.target not in seen for c in cases)


def rank_of(recommended: Sequence[str], target: str, k: int) -> int:
    """1-based rank of ``target`` in the first ``k`` items, 0 when absent."""
    for i, item in enumerate(list(recommended)[:k]):
        if item == target:
            return i + 1
    return 0


def hr_mrr(ranks: Iterable[int], k: int) -> tuple[float, float]:
    """(HR@k, MRR@k) from 1-based ranks (0 = not recommended)."""
    r = np.asarray(list(ranks), dtype=np.float64)
    if r.size == 0:
        return 0.0, 0.0
    hit = (r >= 1) & (r <= k)
    return float(hit.mean()), float(np.where(hit, 1.0 / np.maximum(r, 1), 0.0).mean())


@dataclass
class Metrics:
    """Result of :func:`evaluate` (``ranks`` kept for significance checks)."""

    hr: float
    mrr: float
    n: int
    k: int
    cart_violations: int = 0  # lists that contained a cart item (must be 0)
    short_lists: int = 0  # lists shorter than k
    seconds: float = 0.0
    ranks: list[int] = field(default_factory=list, repr=False)

    @property
    def se(self) -> float:
        """Standard error of HR: sqrt(HR (1 - HR) / n)."""
        return float(np.sqrt(self.hr * (1.0 - self.hr) / self.n)) if self.n else 0.0

    def hits(self) -> np.ndarray:
        """1.0 where the target was in the top k, per case (for paired comparisons)."""
        r = np.asarray(self.ranks)
        return ((r >= 1) & (r <= self.k)).astype(np.float64)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ranks")
        d["se"] = self.se
        return d


Recommend = Callable[[RecommendRequest], Sequence[str]]


def evaluate(recommender: Any, cases: Sequence[Case], *, k: int = 10, hide_user: bool = False,
             user_id: str | None = None, with_case: bool = False) -> Metrics:
    """HR@k and MRR@k of ``recommender`` (object with ``recommend`` or a callable).

    ``hide_user`` asks every case as a guest (``user_id`` None), or as the
    given stand-in ``user_id`` (e.g. an id the model has never seen).
    ``with_case``: ``recommender`` is a callable ``(request, case)`` (to answer
    as of the case's day).
    """
    fn: Any = getattr(recommender, "recommend", recommender)
    ranks, violations, short = [], 0, 0
    t0 = time.perf_counter()
    for case in cases:
        request = case.request(k, hide_user=hide_user, user_id=user_id)
        recs = list(fn(request, case) if with_case else fn(request))[:k]
        if set(recs) & set(case.cart):
            violations += 1
        if len(recs) < k:
            short += 1
        ranks.append(rank_of(recs, case.target, k))
    hr, mrr = hr_mrr(ranks, k)
    return Metrics(hr=hr, mrr=mrr, n=len(cases), k=k, cart_violations=violations,
                   short_lists=short, seconds=time.perf_counter() - t0, ranks=ranks)


def paired_se(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Standard error of mean(a) - mean(b) for per-case values of two methods on the same cases."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size < 2:
        return 0.0
    return float(d.std(ddof=1) / np.sqrt(d.size))

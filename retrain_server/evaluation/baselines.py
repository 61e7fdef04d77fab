"""The baselines every model is compared with, fitted on training rows only.

:class:`PopularRecommender` (most popular products), :class:`CoOccurrenceRecommender`
(raw session co-occurrence with the cart, no popularity correction) and
:class:`OwnFrequentRecommender` (the member's own most frequently bought
products; with ``half_life_days`` the same, time-decayed — a reference row, not
a baseline). None of them ever recommends what is in the cart.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp

from agent.recommenders.base import RecommendRequest

from ..counts import Decay, days_before
from ..data import PurchaseLog

_LOG = logging.getLogger(__name__)

__all__ = ["PopularRecommender", "CoOccurrenceRecommender", "OwnFrequentRecommender"]


def _basket_matrix(log: PurchaseLog) -> tuple[sp.csr_matrix, np.ndarray]:
    """Binary session x item matrix and the item ids (sorted) of its columns."""
    items, item_idx = np.unique(log.product_ids, return_inverse=True)
    _, sess_idx = np.unique(log.session_ids, return_inverse=True)
    m = sp.csr_matrix((np.ones(len(log), dtype=np.float32), (sess_idx, item_idx)),
                      shape=(int(sess_idx.max()) + 1 if len(log) else 0, len(items)))
    m.data[:] = 1.0
    return m, items


class PopularRecommender:
    """Most popular products (by number of training baskets), cart excluded."""

    def __init__(self, log: PurchaseLog) -> None:
        basket, self.item_ids_ = _basket_matrix(log)
        self.counts_ = np.asarray(basket.sum(axis=0)).ravel()
        self.order_ = np.lexsort((np.arange(len(self.counts_)), -self.counts_))
        self.index_ = {p: i for i, p in enumerate(self.item_ids_.tolist())}
        self.rank_ = np.empty_like(self.order_)
        self.rank_[self.order_] = np.arange(len(self.order_))

    def top(self, k: int, exclude: Iterable[str] = ()) -> list[str]:
        excl = set(exclude)
        out = []
        for i in self.order_[: k + len(excl)].tolist():
            pid = self.item_ids_[i]
            if pid not in excl:
                out.append(str(pid))
                if len(out) == k:
                    break
        return out

    def recommend(self, request: RecommendRequest) -> list[str]:
        return self.top(request.top_k, request.excluded)

    def _rank_scores(self, scores: np.ndarray, request: RecommendRequest,
                     extra: Iterable[str] = ()) -> list[str]:
        """Top items by ``scores`` (> 0; ties by popularity), filled with popular ones."""
        k = request.top_k
        excl = set(request.excluded)
        for pid in excl:
            i = self.index_.get(pid)
            if i is not None:
                scores[i] = 0.0
        pos = np.flatnonzero(scores > 0)
        if pos.size > k:
            kth = np.partition(scores[pos], pos.size - k)[pos.size - k]
            pos = pos[scores[pos] >= kth]
        pos = pos[np.lexsort((self.rank_[pos], -scores[pos]))][:k]
        out = self.item_ids_[pos].astype(str).tolist()
        if len(out) < k:
            out += self.top(k - len(out), excl | set(out))
        return out


class CoOccurrenceRecommender(PopularRecommender):
    """Raw session co-occurrence counts summed over the cart's products.

    ``score(j) = sum over cart items i of #baskets containing i and j``; no
    popularity correction. Ties by popularity; filled with popular products.
    """

    def __init__(self, log: PurchaseLog) -> None:
        super().__init__(log)
        basket, _ = _basket_matrix(log)
        co = (basket.T @ basket).tocsr()
        co.setdiag(0)
        co.eliminate_zeros()
        self.co_ = co.astype(np.float32)

    def recommend(self, request: RecommendRequest) -> list[str]:
        idx = [self.index_[p] for p in request.cart if p in self.index_]
        scores = (np.asarray(self.co_[idx].sum(axis=0)).ravel() if idx
                  else np.zeros(len(self.item_ids_), dtype=np.float32))
        return self._rank_scores(scores.astype(np.float64), request)


class OwnFrequentRecommender(PopularRecommender):
    """The member's own most frequently bought products (baskets containing it).

    Ties by popularity; guests, new members and short histories are filled
    with the most popular products. Cart excluded. ``half_life_days`` > 0
    weighs each basket by ``0.5 ** (age in days / half_life_days)``, the age
    counted back from the newest purchase in ``log``.
    """

    def __init__(self, log: PurchaseLog, half_life_days: float = 0.0) -> None:
        super().__init__(log)
        member = log.select(log.user_ids != "")
        basket, items = _basket_matrix(member)
        if half_life_days and len(member):
            _, s_first = np.unique(member.session_ids, return_index=True)
            age = days_before(member.timestamps[s_first], int(log.timestamps.max()))
            basket = sp.csr_matrix(sp.diags(Decay.weight(half_life_days, age).astype(np.float32)) @ basket)
        users, u_idx = np.unique(member.user_ids, return_inverse=True)
        _, s_idx = np.unique(member.session_ids, return_inverse=True)
        sess_user = np.zeros(basket.shape[0], dtype=np.int64)
        sess_user[s_idx] = u_idx
        to_user = sp.csr_matrix((np.ones(basket.shape[0], np.float32),
                                 (sess_user, np.arange(basket.shape[0]))),
                                shape=(len(users), basket.shape[0]))
        own = (to_user @ basket).tocsr()  # user x member-item: baskets with the item
        col = np.array([self.index_[p] for p in items.tolist()], dtype=np.int64)
        self.own_ = sp.csr_matrix((own.data, col[own.indices], own.indptr),
                                  shape=(len(users), len(self.item_ids_)))
        self.user_index_ = {u: i for i, u in enumerate(users.tolist())}

    def recommend(self, request: RecommendRequest) -> list[str]:
        u = self.user_index_.get(request.user_id) if request.user_id else None
        if u is None:
            return self.top(request.top_k, request.excluded)
        scores = np.zeros(len(self.item_ids_), dtype=np.float64)
        lo, hi = self.own_.indptr[u], self.own_.indptr[u + 1]
        scores[self.own_.indices[lo:hi]] = self.own_.data[lo:hi]
        return self._rank_scores(scores, request)

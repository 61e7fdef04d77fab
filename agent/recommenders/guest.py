"""Guest model: co-purchase candidates + TF-IDF tag similarity (the seed's algorithm).

All heavy work (TF-IDF, cosine nearest neighbours, co-purchase counting) is
done at training time; the edge serves from precomputed neighbour tables:

* ``co_`` (:class:`CoPartners`): item i's best co-purchase partners, best
  first, with popularity-damped co-purchase counts as scores, row after row
  (CSR). The bundle's ``co_partners_*.npy`` are served as they are (mapped);
  bundles without them carry only the padded ``co_neighbors`` / ``co_scores``
  tables (``-1`` padded, 83 % padding on a 50,000-product store), converted at
  load: 3.5 MB instead of 19 MB.
* ``sim_neighbors_[i]`` / ``sim_scores_[i]``: item i's most TF-IDF-similar items
  (cosine similarity, self excluded), best first, ``-1`` padded.
* ``popular_``: item indices by purchase count, for empty or unknown carts.
* ``baskets_`` (optional, :class:`RecentBaskets`): the store's recent baskets
  with an item -> baskets index, for the session-kNN term: the past baskets
  most like the whole cart vote for their other items (``basket_weight``).

A request then costs a handful of small numpy operations, independent of the
catalogue size.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import native
from .base import RecommendRequest
from .features import index_rows, shared_index

_LOG = logging.getLogger(__name__)

__all__ = ["GuestParams", "GuestRecommender", "CoPartners", "RecentBaskets", "sum_by_item"]


@dataclass(frozen=True)
class GuestParams:
    """Serving knobs (``guest:`` in the agent config)."""

    #: co-purchase candidates taken per cart item (the seed's co_top_k_per_item)
    co_top_k_per_item: int = 50
    #: how many of the best candidates are expanded with their TF-IDF neighbours
    expand_top: int = 10
    #: TF-IDF neighbours taken per expanded item
    sim_top_k: int = 5
    #: weight of a TF-IDF neighbour relative to the candidate it came from; 0 on
    #: measurement (Complete Journey's category tags added noise), raise it for
    #: catalogues whose tags say more than the co-purchases do
    sim_weight: float = 0.0
    #: fewer co-purchase candidates than this -> add neighbours of the cart items
    fallback_min_candidates: int = 10
    #: weight of the fallback (similar-to-cart) scores
    fallback_weight: float = 0.5
    #: weight of the recent baskets most like the cart (session kNN), relative to the best
    #: co-purchase score; 0 (or a bundle without ``baskets_*.npy``) turns the term off.
    #: Chosen on Complete Journey's validation month (README, "Evaluation").
    basket_weight: float = 10.0
    #: how many of the most similar recent baskets vote
    basket_neighbours: int = 50

    def __post_init__(self) -> None:
        for name in ("co_top_k_per_item", "expand_top", "sim_top_k", "fallback_min_candidates",
                     "basket_neighbours"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"guest.{name} must be a non-negative integer")
        for name in ("sim_weight", "fallback_weight", "basket_weight"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ValueError(f"guest.{name} must be a non-negative number")


@dataclass(frozen=True)
class CoPartners:
    """Each item's co-purchase partners, best first, and their scores: row ``i`` is
    ``items[indptr[i]:indptr[i+1]]`` (item indices) with ``scores[...]``."""

    indptr: np.ndarray  # int64 [n_items + 1]
    items: np.ndarray  # int32
    scores: np.ndarray  # float32

    @classmethod
    def from_table(cls, neighbors: np.ndarray, scores: np.ndarray) -> CoPartners:
        """From the padded tables (``[n_items, k]``, best first, ``-1`` after a row's last partner)."""
        neighbors, scores = np.asarray(neighbors), np.asarray(scores)
        if neighbors.ndim != 2 or neighbors.shape != scores.shape:
            raise ValueError(f"co_neighbors {neighbors.shape} and co_scores {scores.shape}: two equal [n, k] tables")
        real = neighbors >= 0
        if np.any(real[:, 1:] > real[:, :-1]):
            raise ValueError("co_neighbors: -1 padding must only end a row")
        indptr = np.zeros(len(neighbors) + 1, np.int64)
        np.cumsum(real.sum(axis=1), out=indptr[1:])
        return cls(indptr, neighbors[real].astype(np.int32, copy=False), scores[real].astype(np.float32, copy=False))

    def check(self, n_items: int) -> int:
        """The longest row's length; ValueError unless the rows fit a catalogue of ``n_items`` products."""
        p = self.indptr
        if p.dtype != np.int64 or self.items.dtype != np.int32 or self.scores.dtype != np.float32:
            raise ValueError(f"co-purchase partners: indptr int64, items int32, scores float32 expected, got "
                             f"{p.dtype}, {self.items.dtype}, {self.scores.dtype}")
        if p.ndim != 1 or len(p) != n_items + 1 or self.items.ndim != 1 or self.items.shape != self.scores.shape:
            raise ValueError("co-purchase partners: malformed rows")
        lengths = np.diff(p)
        if p[0] != 0 or np.any(lengths < 0) or p[-1] != len(self.items):
            raise ValueError("co-purchase partners: malformed rows")
        if self.items.size and (self.items.min() < 0 or self.items.max() >= n_items):
            raise ValueError("co-purchase partners hold indices outside the catalogue")
        if not np.all(np.isfinite(self.scores)):
            raise ValueError("co-purchase partners: non-finite scores")
        return int(lengths.max()) if n_items else 0


@dataclass(frozen=True)
class RecentBaskets:
    """The store's recent baskets and, per item, the baskets holding it (newest first, capped).

    ``items[starts[b]:starts[b+1]]`` are basket ``b``'s distinct products;
    ``postings[postings_indptr[i]:postings_indptr[i+1]]`` the baskets holding item ``i``.
    """

    starts: np.ndarray  # int64 [n_baskets + 1]
    items: np.ndarray  # int32 item indices
    postings_indptr: np.ndarray  # int64 [n_items + 1]
    postings: np.ndarray  # int32 basket indices

    def scores(self, cart: np.ndarray, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, votes) from the ``neighbours`` baskets most like the cart.

        A basket's similarity is the number of cart items it holds over the square
        root of its size (a big basket shares something with every cart); each
        voting basket gives its items its similarity over the voters' total, so a
        product's summed vote is the similarity-weighted share of the voting
        baskets that hold it (1: all of them). Of baskets equally similar at the
        cut, the lower-numbered vote (the newer: the table is newest first).
        Items repeat in the output; the caller sums them. The compiled kernel
        (:mod:`.native`) gives the same votes.
        """
        if not cart.size or not neighbours:
            return _EMPTY_I, _EMPTY_F
        kernels = native.KERNELS
        if kernels is not None:
            counts = native.scratch("basket_counts", len(self.starts) - 1, 0)
            return kernels.basket_votes(self.starts, self.items, self.postings_indptr, self.postings, cart,
                                        neighbours, counts)
        pi = self.postings_indptr
        hits = np.concatenate([self.postings[pi[c]:pi[c + 1]] for c in dict.fromkeys(cart.tolist())])
        if not hits.size:
            return _EMPTY_I, _EMPTY_F
        baskets, overlap = sum_by_item(hits, np.ones(hits.size, dtype=np.float64))  # ~1,000 hits: a sort is cheapest
        lo, hi = self.starts[baskets], self.starts[baskets + 1]
        sim = overlap / np.sqrt(hi - lo)
        if sim.size > neighbours:
            kth = np.partition(sim, sim.size - neighbours)[sim.size - neighbours]
            keep = sim > kth
            keep[np.flatnonzero(sim == kth)[:neighbours - np.count_nonzero(keep)]] = True  # baskets are sorted
            lo, hi, sim = lo[keep], hi[keep], sim[keep]
        sizes = hi - lo
        offsets = np.repeat(lo - np.cumsum(sizes) + sizes, sizes) + np.arange(int(sizes.sum()))
        return self.items[offsets].astype(np.int64), np.repeat(sim / sim.sum(), sizes)


_EMPTY_I = np.empty(0, dtype=np.int64)
_EMPTY_F = np.empty(0, dtype=np.float64)
_EMPTY_F32 = np.empty(0, dtype=np.float32)


class GuestRecommender:
    """Recommends from co-purchase and tag-similarity neighbour tables.

    Deterministic: equal scores are ordered by item index (catalogue order).
    Unknown product ids in a request are ignored; :meth:`unknown_ids` lists them.
    """

    def __init__(self, item_ids: Sequence[str], co_neighbors: np.ndarray | None, co_scores: np.ndarray | None,
                 sim_neighbors: np.ndarray, sim_scores: np.ndarray, popular: np.ndarray,
                 params: GuestParams | None = None, baskets: RecentBaskets | None = None,
                 co_partners: CoPartners | None = None) -> None:
        """``co_partners``, when given, replaces the padded ``co_neighbors``/``co_scores`` (then None)."""
        self.params = params or GuestParams()
        self.item_ids_ = np.asarray(item_ids)
        n = len(self.item_ids_)
        self.sim_neighbors_ = np.ascontiguousarray(sim_neighbors, dtype=np.int32)
        self.sim_scores_ = np.ascontiguousarray(sim_scores, dtype=np.float32)
        self.popular_ = np.asarray(popular, dtype=np.int32)
        for name, arr in (("sim_neighbors", self.sim_neighbors_), ("sim_scores", self.sim_scores_)):
            if arr.ndim != 2 or arr.shape[0] != n:
                raise ValueError(f"{name} must have shape ({n}, k), got {arr.shape}")
        if self.sim_neighbors_.shape != self.sim_scores_.shape:
            raise ValueError("sim_neighbors and sim_scores differ in shape")
        for name, arr in (("sim_neighbors", self.sim_neighbors_), ("popular", self.popular_)):
            if arr.size and (arr.max() >= n or arr.min() < -1):
                raise ValueError(f"{name} holds indices outside the catalogue")
        if (co_partners is None) == (co_neighbors is None or co_scores is None):
            raise ValueError("give the co-purchase partners once: co_neighbors and co_scores, or co_partners")
        if co_partners is None:
            co_neighbors = np.asarray(co_neighbors)
            if co_neighbors.ndim != 2 or co_neighbors.shape[0] != n or co_neighbors.dtype.kind not in "iu":
                raise ValueError(f"co_neighbors must be integers of shape ({n}, k), got {co_neighbors.dtype} "
                                 f"{co_neighbors.shape}")
            if co_neighbors.size and (co_neighbors.max() >= n or co_neighbors.min() < -1):
                raise ValueError("co_neighbors holds indices outside the catalogue")
            co_partners = CoPartners.from_table(co_neighbors, co_scores)
        #: the longest row: ``co_top_k_per_item`` at or above it takes every row whole
        self.co_width_ = co_partners.check(n)
        self.co_ = co_partners
        if baskets is not None:
            b = baskets
            n_b = len(b.starts) - 1
            if (b.starts.ndim != 1 or n_b < 0 or b.starts[0] != 0 or np.any(np.diff(b.starts) <= 0)
                    or b.starts[-1] != len(b.items) or len(b.postings_indptr) != n + 1 or b.postings_indptr[0] != 0
                    or np.any(np.diff(b.postings_indptr) < 0) or b.postings_indptr[-1] != len(b.postings)):
                raise ValueError("baskets: malformed recent-basket table")
            if (b.items.size and (b.items.min() < 0 or b.items.max() >= n)) or \
                    (b.postings.size and (b.postings.min() < 0 or b.postings.max() >= n_b)):
                raise ValueError("baskets: indices outside the catalogue or the basket table")
        self.baskets_ = baskets
        self.index_ = shared_index(self.item_ids_)  # shared with the version a swap replaces

    @property
    def n_items(self) -> int:
        return len(self.item_ids_)

    def unknown_ids(self, ids: Sequence[str]) -> list[str]:
        """The ids in ``ids`` that this model does not know."""
        if not ids:
            return []
        rows = index_rows(self.index_, ids, known_only=False)
        return [pid for pid, row in zip(ids, rows.tolist()) if row < 0] if (rows < 0).any() else []

    def indices(self, ids: Sequence[str]) -> np.ndarray:
        """Known ids -> item indices (unknown ids dropped, order kept)."""
        return index_rows(self.index_, ids)

    def recommend(self, request: RecommendRequest) -> list[str]:
        return self.item_ids_[self.recommend_indices(request)].tolist()

    def recommend_scored(self, request: RecommendRequest) -> list[tuple[str, float]]:
        """Like :meth:`recommend`, with each item's summed score (popular fill-ins score 0)."""
        picked, scores = self._recommend(request)
        return list(zip(self.item_ids_[picked].tolist(), scores.tolist()))

    def co_purchase_scores(self, cart: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Items co-purchased with the cart (indices) and their summed scores.

        The member model blends this evidence in (``MemberParams.co_weight``).
        """
        k = self.params.co_top_k_per_item
        kernels = native.KERNELS
        if kernels is not None:
            marks = native.scratch("item_marks", self.n_items, -1)
            return kernels.co_partner_sums(self.co_.indptr, self.co_.items, self.co_.scores, cart, k, marks)
        return sum_by_item(*self._co_partners(cart, k))

    def _co_partners(self, cart: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each cart item's best ``k`` co-purchase partners and their scores, row after row."""
        lo = self.co_.indptr.take(cart)
        sizes = self.co_.indptr.take(cart + 1) - lo
        if k < self.co_width_:
            sizes = np.minimum(sizes, k)
        ends = sizes.cumsum()
        if not ends.size or not ends[-1]:
            return _EMPTY_I, _EMPTY_F32
        at = np.arange(ends[-1]) + np.repeat(lo - ends + sizes, sizes)
        return self.co_.items.take(at), self.co_.scores.take(at)

    def recommend_indices(self, request: RecommendRequest) -> np.ndarray:
        """Like :meth:`recommend` but returns item indices."""
        return self._recommend(request)[0]

    def recommend_indices_and_unknown(self, request: RecommendRequest) -> tuple[np.ndarray, list[str]]:
        """:meth:`recommend_indices` and :meth:`unknown_ids` of the cart and wishlist, from one lookup of
        their ids (the agent needs both for every guest answer; two lookups were ~5 % of an event)."""
        ids = request.cart + request.wishlist
        rows = index_rows(self.index_, ids, known_only=False)
        found = rows.tolist()
        if -1 in found:
            unknown = [pid for pid, row in zip(ids, found) if row < 0]
            n_cart = len(request.cart)
            cart, wish = rows[:n_cart], rows[n_cart:]
            cart, wish = cart[cart >= 0], wish[wish >= 0]
            excluded = np.concatenate([cart, wish]) if wish.size else cart
        else:
            unknown = []
            cart = rows[:len(request.cart)]
            excluded = rows if request.wishlist else cart
        return self._recommend(request, (cart, excluded))[0], unknown

    def _recommend(self, request: RecommendRequest,
                   rows: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Item indices, best first, and their scores. ``rows``: the cart's known rows and the rows to
        exclude (cart + wishlist), when the caller looked them up already."""
        top_k = request.top_k
        if top_k <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        if rows is not None:
            cart, excluded = rows
        else:
            cart = self.indices(request.cart)
            excluded = np.concatenate([cart, self.indices(request.wishlist)]) if request.wishlist else cart
        ranked = self._rank_compiled(cart, excluded, top_k)
        if ranked is not None:
            picked, scores = ranked
        else:
            scratch = self._scratch()
            scratch.excluded[excluded] = True
            try:
                picked, scores = self._rank(cart, top_k, scratch)
            finally:
                scratch.reset(excluded)
        if picked.size < top_k:
            picked = self._fill_popular(picked, excluded, top_k)
            scores = np.concatenate([scores, np.zeros(picked.size - scores.size)])
        return picked, scores

    def _rank_compiled(self, cart: np.ndarray, excluded: np.ndarray,
                       top_k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`_rank` in one call of the compiled kernel, or None: no kernels, TF-IDF expansion configured,
        or too few candidates (then :meth:`_rank` adds the cart's TF-IDF neighbours; rare)."""
        kernels, p = native.KERNELS, self.params
        if kernels is None or not cart.size or (p.expand_top and p.sim_top_k and p.sim_weight):
            return None
        votes = (self.baskets_.scores(cart, p.basket_neighbours) if self.baskets_ is not None and p.basket_weight
                 else (_EMPTY_I, _EMPTY_F))
        return kernels.guest_rank(self.co_.indptr, self.co_.items, self.co_.scores, cart, p.co_top_k_per_item,
                                  *votes, float(p.basket_weight), excluded, top_k,
                                  max(p.fallback_min_candidates, top_k) if p.sim_top_k else 0,
                                  native.scratch("item_marks", self.n_items, -1))

    def _rank(self, cart: np.ndarray, top_k: int, scratch: "_Scratch") -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        if not cart.size:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        k = p.co_top_k_per_item
        cand, score = scratch.add(*self._co_partners(cart, k))
        if self.baskets_ is not None and p.basket_weight:
            items, votes = self.baskets_.scores(cart, p.basket_neighbours)
            if items.size:
                # a product every voting basket holds gets basket_weight x the best co-purchase score
                best_co = score.max() if score.size else 1.0
                cand, score = scratch.add_votes(items, votes * (p.basket_weight * best_co))
        if cand.size and p.expand_top and p.sim_top_k and p.sim_weight:
            top = _top(cand, score, p.expand_top)
            weight = score[top] * (p.sim_weight / score[top].max())
            cand, score = scratch.add(self.sim_neighbors_[cand[top], :p.sim_top_k],
                                      self.sim_scores_[cand[top], :p.sim_top_k] * weight[:, None])
        if cand.size < max(p.fallback_min_candidates, top_k) and p.sim_top_k:
            # Few co-purchase candidates: add items like the cart's own items.
            width = max(p.sim_top_k, top_k)
            base = p.fallback_weight * (score.max() if score.size else 1.0)
            cand, score = scratch.add(self.sim_neighbors_[cart, :width],
                                      self.sim_scores_[cart, :width] * base)
        top = _top(cand, score, top_k)
        return cand[top], score[top]

    def _scratch(self) -> "_Scratch":
        """Per-thread dense buffers: the MQTT worker and HTTP threads may call at once."""
        local = self.__dict__.get("_local")
        if local is None:
            local = self.__dict__.setdefault("_local", threading.local())
        s = getattr(local, "scratch", None)
        if s is None:
            s = local.scratch = _Scratch(self.n_items)
        return s

    def _fill_popular(self, picked: np.ndarray, excluded: np.ndarray, top_k: int) -> np.ndarray:
        need = top_k - picked.size
        taken = np.concatenate([picked, excluded])
        pop = self.popular_[: need + taken.size + 1]
        pop = pop[~np.isin(pop, taken)][:need]
        return np.concatenate([picked, pop]).astype(np.int64)


def sum_by_item(items: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct items (sorted) and their summed scores; ``-1`` padding must be removed first.

    Sorting a few hundred entries is cheaper than np.add.at or np.unique at this size.
    """
    if not items.size:
        return items, scores
    order = np.argsort(items, kind="stable")
    items, scores = items[order], scores[order]
    starts = np.empty(items.size, dtype=bool)
    starts[0] = True
    np.not_equal(items[1:], items[:-1], out=starts[1:])
    first = np.flatnonzero(starts)
    return items[first], np.add.reduceat(scores, first)


class _Scratch:
    """Dense score accumulator over the catalogue, reset after each request.

    Summing scores per item in a dense buffer avoids sorting/hashing the
    candidates; only the touched entries are cleared afterwards.
    """

    def __init__(self, n: int) -> None:
        self.score = np.zeros(n, dtype=np.float64)
        self.excluded = np.zeros(n, dtype=bool)
        self.seen = np.zeros(n, dtype=bool)
        self.touched: list[np.ndarray] = []
        self.cand = np.empty(0, dtype=np.int64)
        self.mark = np.zeros(n, dtype=np.int64)  # add_votes' dedup marks (any value)

    def add(self, items: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Accumulate; returns all candidates so far (excluded ones dropped) and their sums."""
        items, scores = items.ravel(), scores.ravel()
        ok = items >= 0
        items, scores = items[ok], scores[ok]
        ok = ~self.excluded[items]
        items, scores = items[ok], scores[ok]
        if items.size:
            items, sums = sum_by_item(items, scores)
            self.score[items] += sums
            new = items[~self.seen[items]]
            if new.size:
                self.seen[new] = True
                self.touched.append(new)
                self.cand = np.concatenate([self.cand, new])
        return self.cand, self.score[self.cand]

    def add_votes(self, items: np.ndarray, votes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`add` for thousands of repeated items: summed in place (``np.add.at``), not sorted."""
        ok = ~self.excluded[items]
        items, votes = items[ok], votes[ok]
        if items.size:
            np.add.at(self.score, items, votes)
            new = items[~self.seen[items]]
            if new.size:
                # one position per distinct item: whichever the repeated assignment kept
                at = np.arange(new.size)
                self.mark[new] = at
                new = new[self.mark[new] == at]
                self.seen[new] = True
                self.touched.append(new)
                self.cand = np.concatenate([self.cand, new])
        return self.cand, self.score[self.cand]

    def reset(self, excluded: np.ndarray) -> None:
        self.excluded[excluded] = False
        for t in self.touched:
            self.score[t] = 0.0
            self.seen[t] = False
        self.touched.clear()
        self.cand = np.empty(0, dtype=np.int64)


def _top(cand: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best: highest score, then lowest item index."""
    if cand.size > 4 * k:
        # Cheap pre-cut; ties at the boundary are kept so order stays exact.
        kth = np.partition(score, cand.size - k)[cand.size - k]
        pos = np.flatnonzero(score >= kth)
        order = np.lexsort((cand[pos], -score[pos]))[:k]
        return pos[order]
    return np.lexsort((cand, -score))[:k]

"""The member reranker: boosted trees reorder the blend's best candidates.

The blend adds a handful of terms with fixed weights. Trees see more about each
candidate — how often and how long ago the member bought it, their usual gap
between buying it, how popular it is and how often its buyers buy it again, its
tag similarity to the cart — and combine them non-linearly (Complete Journey:
HR@10 +0.018 over the blend, README "Evaluation").

Everything here is arrays: :class:`MemberStats` (per member-product pair, per
member, per product; ``rerank_*.npy``) and the trees as an ONNX
``TreeEnsembleRegressor`` (``rerank_trees.onnx``), which onnxruntime runs.
:func:`candidate_features` is the one definition of the features, used by the
edge and by the server that fits the trees.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import native
from .onnx import cpu_session

__all__ = ["FEATURES", "NEVER", "MemberStats", "TreeReranker", "candidate_features"]

#: one column per feature, in this order (``member_meta.json`` names them; a mismatch refuses the bundle)
FEATURES = ("two_tower", "repeat", "co", "basket", "store", "baskets_with_item", "share_of_baskets",
            "days_since_bought", "member_baskets", "log_popularity", "rebuy_rate", "cart_size", "age",
            "bought_before", "usual_gap_days", "days_since_over_gap", "days_since_member_shopped",
            "tag_similarity_to_cart")
#: days since / usual gap when the member never bought the product (or bought it once)
NEVER = 999.0
#: most candidates a bundle may ask to rerank (each costs the trees once)
MAX_CANDIDATES = 1000


@dataclass(frozen=True)
class MemberStats:
    """What the purchase log said about each (member, product) pair, member and product, as of its newest day.

    Pairs are keyed ``user * n_items + item`` (the member model's lookups' numbering), sorted.
    """

    n_items: int
    keys: np.ndarray  # int64, sorted
    baskets: np.ndarray  # float32 per pair: the member's baskets holding the product
    days_since: np.ndarray  # float32 per pair: days since the member last bought it
    gap_days: np.ndarray  # float32 per pair: mean days between those baskets (NEVER for one basket)
    member_baskets: np.ndarray  # float32 per member
    member_days_since: np.ndarray  # float32 per member: days since their last basket (NEVER: none)
    log_popularity: np.ndarray  # float32 per product: log(1 + rows)
    rebuy_rate: np.ndarray  # float32 per product: (members buying it in >= 2 baskets + 1) / (its buyers + 2)

    def check(self, n_users: int) -> None:
        """ValueError unless the arrays fit the model's numbering (``n_users`` rows of ``user_lookup``)."""
        n = len(self.keys)
        if self.keys.ndim != 1 or self.keys.dtype != np.int64 or (n and np.any(np.diff(self.keys) <= 0)):
            raise ValueError("rerank keys must be strictly increasing int64")
        if n and (self.keys[0] < 0 or self.keys[-1] >= n_users * self.n_items):
            raise ValueError("rerank keys name a member or product outside the lookups")
        for name, size in (("baskets", n), ("days_since", n), ("gap_days", n), ("member_baskets", n_users),
                           ("member_days_since", n_users), ("log_popularity", self.n_items),
                           ("rebuy_rate", self.n_items)):
            a = getattr(self, name)
            if a.shape != (size,) or a.dtype != np.float32 or not np.all(np.isfinite(a)):
                raise ValueError(f"rerank {name}: expected {size} finite float32 values, got {a.dtype} {a.shape}")

    def pairs(self, user: int, items: np.ndarray) -> tuple[np.ndarray, ...]:
        """(baskets, days since, usual gap, found) of ``user`` with each of ``items``.

        Two searches find the member's own rows, then the items are searched there: a request touches a few
        pages of the mapped keys, not a path through all of them per item.
        """
        base = user * self.n_items
        lo, hi = (int(i) for i in np.searchsorted(self.keys, (base, base + self.n_items)))
        if hi <= lo:
            none = np.zeros(len(items), np.float32)
            return none, none + NEVER, none + NEVER, none.astype(bool)
        row = self.keys[lo:hi]
        keys = base + items
        pos = np.minimum(np.searchsorted(row, keys), hi - lo - 1)
        found = row[pos] == keys
        pos += lo
        return (np.where(found, self.baskets[pos], 0.0), np.where(found, self.days_since[pos], NEVER),
                np.where(found, self.gap_days[pos], NEVER), found)


#: the blend's sparse terms read as features (``ScoreParts`` fields), then the tag similarity: their columns
_TERMS = ("repeat", "co", "basket", "store")
_TERM_COLUMNS = np.array([FEATURES.index(name) for name in _TERMS + ("tag_similarity_to_cart",)], np.int32)
#: no guest model: no TF-IDF neighbours, an empty cart in its numbering (the kernel's tag arguments)
_NO_NEIGHBOURS = (np.full((1, 1), -1, np.int32), np.zeros((1, 1), np.float32), np.empty(0, np.int64), None)


def _tag_neighbours(member: Any, cart: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(items, float32 cosine) of the cart's TF-IDF neighbours in the member model's numbering (repeats
    kept); ``cart`` in the guest model's numbering."""
    g = member.guest_
    if g is None or not cart.size:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    neighbours, scores = g.sim_neighbors_.take(cart, axis=0).ravel(), g.sim_scores_.take(cart, axis=0).ravel()
    real = neighbours >= 0  # rows are padded with -1 (dropped before renumbering: -1 would index the last row)
    items, scores = member.guest_indices_to_items(neighbours[real]), scores[real]
    known = items >= 0  # -1: a product the member model lacks
    return items[known], scores[known]


def candidate_features(member: Any, stats: MemberStats, request: Any, parts: Any, top: np.ndarray) -> np.ndarray:
    """The :data:`FEATURES` rows (float32) of candidates ``top`` for a member ``member`` knows.

    ``member`` is a :class:`~.member.MemberRecommender`, ``parts`` its
    :meth:`~.member.MemberRecommender.score_parts` for ``request``. The sparse
    terms (repeats summed) and the tag similarity (the best over the cart) are
    read at the candidates in one gather over all their items: the cost here
    is the number of numpy calls, not the data.
    """
    user = member.user_index_[request.user_id]
    n = len(top)
    X = np.zeros((n, len(FEATURES)), np.float32)
    kernels = native.KERNELS
    if kernels is not None:  # the same features in one call (tests/test_native.py)
        g = member.guest_
        tags = _NO_NEIGHBOURS if g is None else (g.sim_neighbors_, g.sim_scores_, parts.cart,
                                                  member.guest_to_item_)
        rows = native.scratch("item_marks", len(parts.two_tower), -1)
        kernels.rerank_features(
            X, top, rows, parts.two_tower, tuple(getattr(parts, name) for name in _TERMS), *tags,
            stats.keys, stats.baskets, stats.days_since, stats.gap_days, user, stats.member_baskets[user],
            stats.member_days_since[user], stats.log_popularity, stats.rebuy_rate, len(request.cart),
            request.age or 0, NEVER)
        return X
    pairs = [getattr(parts, name) for name in _TERMS]
    pairs.append(_tag_neighbours(member, parts.cart))
    sizes = [len(items) for items, _ in pairs]
    if n and sum(sizes):
        items = np.concatenate([items for items, _ in pairs])
        values = np.concatenate([values for _, values in pairs]).astype(np.float32, copy=False)
        rows = native.scratch("feature_cells", len(parts.two_tower), -1)  # item -> X cell; all -1 between calls
        rows[top] = np.arange(0, n * len(FEATURES), len(FEATURES))
        try:
            cell = rows[items]  # -1: not a candidate
        finally:
            rows[top] = -1
        hit = cell >= 0
        cell += np.repeat(_TERM_COLUMNS, sizes)  # flat position in X: row * width + column
        n_sparse = len(items) - sizes[-1]
        flat = X.reshape(-1)
        np.add.at(flat, cell[:n_sparse][hit[:n_sparse]], values[:n_sparse][hit[:n_sparse]])
        np.maximum.at(flat, cell[n_sparse:][hit[n_sparse:]], values[n_sparse:][hit[n_sparse:]])
    baskets, days, gap, found = stats.pairs(user, top)
    member_baskets = float(stats.member_baskets[user])
    X[:, 0] = parts.two_tower[top]
    X[:, 5] = baskets
    X[:, 6] = baskets / max(member_baskets, 1.0)
    X[:, 7] = days
    X[:, 9] = stats.log_popularity[top]
    X[:, 10] = stats.rebuy_rate[top]
    X[:, 13] = found
    X[:, 14] = gap
    X[:, 15] = days / np.maximum(gap, 1.0)
    X[:, (8, 11, 12, 16)] = (member_baskets, len(request.cart), float(request.age or 0),
                             stats.member_days_since[user])
    return X


class TreeReranker:
    """Boosted trees (ONNX ``TreeEnsembleRegressor``, input ``X`` [n, features]) scoring candidate rows."""

    def __init__(self, onnx_model: bytes, stats: MemberStats, candidates: int, threads: int = 1) -> None:
        if not 1 <= candidates <= MAX_CANDIDATES:
            raise ValueError(f"rerank candidates must be 1..{MAX_CANDIDATES}, got {candidates}")
        self.stats, self.candidates = stats, int(candidates)
        self.session_ = cpu_session(onnx_model, threads)
        inputs = self.session_.get_inputs()
        width = inputs[0].shape[-1] if len(inputs) == 1 and inputs[0].shape else None
        if len(inputs) != 1 or (isinstance(width, int) and width != len(FEATURES)):
            raise ValueError(f"rerank trees take one input of {len(FEATURES)} features, got "
                             f"{[(i.name, i.shape) for i in inputs]}")
        self.input_name_ = inputs[0].name
        self.output_name_ = self.session_.get_outputs()[0].name
        probe = self.scores(np.zeros((3, len(FEATURES)), np.float32))  # one score per row, or refused now
        if probe.shape != (3,) or not np.all(np.isfinite(probe)):
            raise ValueError(f"rerank trees must give one finite score per row, got {probe.shape}")

    def with_stats(self, stats: MemberStats) -> TreeReranker:
        """The same trees (one onnxruntime session) reading other statistics (a later day's)."""
        other = copy.copy(self)
        other.stats = stats
        return other

    def scores(self, X: np.ndarray) -> np.ndarray:
        """One score per row (higher: more likely the product the member wants next)."""
        return self.session_.run([self.output_name_], {self.input_name_: X})[0].reshape(-1)


if native.KERNELS is not None and tuple(native.KERNELS.FEATURES) != FEATURES:
    native.disable("the compiled kernels were built for another feature list: rebuild them (pip install -e .)")

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
        """(baskets, days since, usual gap, found) of ``user`` with each of ``items``."""
        keys = user * self.n_items + items
        if not len(self.keys):
            none = np.zeros(len(items), np.float32)
            return none, none + NEVER, none + NEVER, none.astype(bool)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[pos] == keys
        return (np.where(found, self.baskets[pos], 0.0), np.where(found, self.days_since[pos], NEVER),
                np.where(found, self.gap_days[pos], NEVER), found)


def _rows_of(items: np.ndarray, order: np.ndarray, sorted_top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which of ``items`` are candidates, their candidate rows): ``sorted_top = top[order]``."""
    pos = np.minimum(np.searchsorted(sorted_top, items), len(sorted_top) - 1)
    hit = sorted_top[pos] == items
    return hit, order[pos[hit]]


def _sparse_at(parts: Any, names: tuple[str, ...], order: np.ndarray, sorted_top: np.ndarray) -> np.ndarray:
    """The sparse terms ``names`` of ``parts`` (each ``(items, values)``, repeats summed in float32) read at
    the candidates: [len(names), n], candidates in ``top`` order (one search for all the terms)."""
    n = len(sorted_top)
    pairs = [getattr(parts, name) for name in names]
    sizes = [len(items) for items, _ in pairs]
    out = np.zeros(len(names) * n, np.float32)
    if sum(sizes):
        items = np.concatenate([items for items, _ in pairs])
        values = np.concatenate([values.astype(np.float32, copy=False) for _, values in pairs])
        term = np.repeat(np.arange(len(names)) * n, sizes)
        hit, rows = _rows_of(items, order, sorted_top)
        np.add.at(out, term[hit] + rows, values[hit])
    return out.reshape(len(names), n)


def candidate_features(member: Any, stats: MemberStats, request: Any, parts: Any, top: np.ndarray) -> np.ndarray:
    """The :data:`FEATURES` rows (float32) of candidates ``top`` for a member ``member`` knows.

    ``member`` is a :class:`~.member.MemberRecommender`, ``parts`` its
    :meth:`~.member.MemberRecommender.score_parts` for ``request``.
    """
    user = member.user_index_[request.user_id]
    n = len(top)
    order = np.argsort(top, kind="stable")
    sorted_top = top[order]
    baskets, days, gap, found = stats.pairs(user, top)
    sim = np.zeros(n, np.float32)
    g = member.guest_
    if g is not None and request.cart:
        cart = g.indices(request.cart)
        if cart.size:
            neighbours, scores = g.sim_neighbors_[cart].ravel(), g.sim_scores_[cart].ravel()
            real = neighbours >= 0  # rows are padded with -1
            items, scores = member.guest_indices_to_items(neighbours[real]), scores[real]
            known = items >= 0
            items, scores = items[known], scores[known].astype(np.float32)
            if items.size:
                hit, rows = _rows_of(items, order, sorted_top)
                np.maximum.at(sim, rows, scores[hit])
    member_baskets = float(stats.member_baskets[user])
    X = np.empty((n, len(FEATURES)), np.float32)
    X[:, 0] = parts.two_tower[top]
    X[:, 1:5] = _sparse_at(parts, ("repeat", "co", "basket", "store"), order, sorted_top).T
    X[:, 5] = baskets
    X[:, 6] = baskets / max(member_baskets, 1.0)
    X[:, 7] = days
    X[:, 8] = member_baskets
    X[:, 9] = stats.log_popularity[top]
    X[:, 10] = stats.rebuy_rate[top]
    X[:, 11] = len(request.cart)
    X[:, 12] = float(request.age or 0)
    X[:, 13] = found
    X[:, 14] = gap
    X[:, 15] = days / np.maximum(gap, 1.0)
    X[:, 16] = stats.member_days_since[user]
    X[:, 17] = sim
    return X


class TreeReranker:
    """Boosted trees (ONNX ``TreeEnsembleRegressor``, input ``X`` [n, features]) scoring candidate rows."""

    def __init__(self, onnx_model: bytes, stats: MemberStats, candidates: int, threads: int = 1) -> None:
        import onnxruntime as ort

        if not 1 <= candidates <= MAX_CANDIDATES:
            raise ValueError(f"rerank candidates must be 1..{MAX_CANDIDATES}, got {candidates}")
        self.stats, self.candidates = stats, int(candidates)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session_ = ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])
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

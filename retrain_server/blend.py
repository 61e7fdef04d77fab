"""The member blend: its weights, their unit, and the neighbour term's table.

The member score is ``two-tower dot + repeat_weight * log1p(own decayed count)
+ co_weight * normalised co-purchase + neighbour_weight * similar members'
score`` (:class:`agent.recommenders.member.ScoreParts`). Dot products have
whatever scale a training run produced, so the weights are chosen
(``retrain-server evaluate``) in *score units* — the median gap between a
member's best and 10th two-tower score, :func:`score_unit`, the one place that
defines it — and turned into absolute weights here, for each exported model.

The neighbour term follows TIFU-KNN (Hu et al., SIGIR 2020): a member's
(decayed) purchase vector is compared with every other member's by cosine
similarity, and the ``k`` most similar members' vectors, each scaled to a
maximum of 1 and weighted by their similarity, are summed. The server keeps
each member's best ``keep`` items of that sum (scaled to a maximum of 1) as a
small CSR table, so the edge adds them with one numpy scatter, like the
member's own history.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from agent.recommenders.base import RecommendRequest
from agent.recommenders.member import MemberRecommender, ScoreParts

from .data import PurchaseLog, basket_items

_LOG = logging.getLogger(__name__)

__all__ = ["TERMS", "BlendUnits", "calibration_requests", "score_unit", "serving_weights", "neighbour_table",
           "basket_table"]

#: The blend's sparse terms: ``<term>_units`` in :class:`BlendUnits`, ``<term>_weight`` in
#: :class:`~agent.recommenders.member.MemberParams` (named and ordered by ``ScoreParts.WEIGHTS``).
TERMS = tuple(w.removesuffix("_weight") for w in ScoreParts.WEIGHTS)

#: Entries of one dense block of member-member similarities (float64: 64 MiB).
_BLOCK_ENTRIES = 2**23


@dataclass(frozen=True)
class BlendUnits:
    """Blend weights in score units, and the neighbour table's shape (chosen on Complete Journey validation).

    ``neighbour_units`` 0 turns the neighbour term off: no table is written or shipped.
    """

    repeat_units: float = 10.0
    co_units: float = 10.0  # 30 without the history decay; chosen with it (validation, 30-day half-life)
    neighbour_units: float = 0.0
    #: "bought before" bonus (0: off)
    known_units: float = 0.0
    #: the member's own baskets with the cart (0: off, no table written); validation 0.1813 -> 0.1824
    basket_units: float = 3.0
    #: the store's recent baskets most like the cart (the guest model's table): validation kept 30 units
    #: (0.1824 -> 0.1846; test +0.0042). It costs a member request ~0.15 ms, paid for by reading the item
    #: embeddings column-major (member p99 0.91 ms on the 50,000-product bench, README); 0 turns it off
    store_units: float = 30.0
    #: similar members summed per member
    neighbours: int = 50
    #: items kept per member in the shipped table
    neighbour_items: int = 100
    #: half-life (days) of a basket's weight in the basket table
    basket_half_life_days: float = 60.0
    #: newest baskets kept per member in the basket table
    baskets_per_member: int = 50
    #: days of purchases the nightly job reads for the basket table (older baskets weigh < 2 % at 60 days)
    basket_window_days: int = 365


def calibration_requests(log: PurchaseLog, sample: int = 500, seed: int = 0) -> list[RecommendRequest]:
    """One request per sampled member: the items of their last basket (at most 10) as the cart, as the edge asks."""
    members = log.user_ids != ""
    if not members.any():
        return []
    last_session: dict[str, str] = {}
    for uid, sid in zip(log.user_ids[members].tolist(), log.session_ids[members].tolist()):
        last_session[uid] = sid  # rows are time-ordered: the last one wins
    carts: dict[str, list[str]] = {}
    for uid, sid, pid in zip(log.user_ids[members].tolist(), log.session_ids[members].tolist(),
                             log.product_ids[members].tolist()):
        if last_session[uid] == sid:
            carts.setdefault(uid, []).append(pid)
    users = sorted(carts)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(users), size=min(sample, len(users)), replace=False)
    return [RecommendRequest(cart=tuple(carts[users[i]][:10]), user_id=users[i]) for i in picked.tolist()]


def score_unit(member: MemberRecommender, requests: Sequence[RecommendRequest], k: int = 10) -> float:
    """Median gap between the best and the k-th two-tower score (cart excluded) over ``requests``; 1.0 if none."""
    gaps = []
    for req in requests:
        s = member.score_parts(req).two_tower
        s[member.item_indices(req.cart)] = -np.inf
        if s.size <= k:
            continue
        top = np.sort(np.partition(s, s.size - k)[s.size - k:])[::-1]
        gaps.append(float(top[0] - top[k - 1]))
    unit = float(np.median(gaps)) if gaps else 1.0
    return unit if np.isfinite(unit) and unit > 0 else 1.0


def serving_weights(member: MemberRecommender, log: PurchaseLog,
                    units: BlendUnits | None = None) -> dict[str, float]:
    """Absolute blend weights (``repeat_weight``, ``co_weight``, ...) for ``member_meta.json``."""
    units = units or BlendUnits()
    unit = score_unit(member, calibration_requests(log))
    weights: dict[str, float] = {}
    for term in TERMS:
        weights[f"{term}_weight"] = round(getattr(units, f"{term}_units") * unit, 6)
    weights["score_unit"] = round(unit, 6)
    for term in TERMS:
        weights[f"{term}_units"] = getattr(units, f"{term}_units")
    _LOG.info("member blend: score unit %.4g -> %s", unit,
              ", ".join(f"{t}_weight {weights[f'{t}_weight']:.4g}" for t in TERMS))
    return weights


def neighbour_table(history: sp.spmatrix, k: int = 50, keep: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each member's similar-member scores as CSR parts ``(indptr int64, items int32, scores float32)``.

    ``history``: members x items (decayed) purchase counts, rows and columns as
    the edge numbers them. A member without purchases gets an empty row; so do
    rows whose neighbours bought nothing else. Scores are in (0, 1], best first.
    """
    x = sp.csr_matrix(history, dtype=np.float64)
    x.eliminate_zeros()
    n_users = x.shape[0]
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    unit = sp.csr_matrix(sp.diags(inv) @ x)
    row_max = np.asarray(x.max(axis=1).todense()).ravel()
    scaled = sp.csr_matrix(sp.diags(np.divide(1.0, row_max, out=np.zeros_like(row_max), where=row_max > 0)) @ x)
    unit_t = unit.T.tocsr()
    indptr = [0]
    items_out: list[np.ndarray] = []
    scores_out: list[np.ndarray] = []
    k = max(0, min(k, n_users - 1))
    step = max(1, _BLOCK_ENTRIES // max(n_users, 1))
    for start in range(0, n_users, step):
        stop = min(start + step, n_users)
        sims = np.asarray((unit[start:stop] @ unit_t).todense())
        sims[np.arange(stop - start), np.arange(start, stop)] = 0.0  # not one's own neighbour
        if k:
            nb = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            w = np.take_along_axis(sims, nb, axis=1)
            w[w <= 0] = 0.0
            weights = sp.csr_matrix((w.ravel(), (np.repeat(np.arange(stop - start), k), nb.ravel())),
                                    shape=(stop - start, n_users))
            weights.eliminate_zeros()
            summed = (weights @ scaled).tocsr()
        else:
            summed = sp.csr_matrix((stop - start, x.shape[1]))
        for r in range(stop - start):
            lo, hi = summed.indptr[r], summed.indptr[r + 1]
            cols, vals = summed.indices[lo:hi], summed.data[lo:hi]
            if norms[start + r] == 0 or not cols.size:
                indptr.append(indptr[-1])
                continue
            order = np.lexsort((cols, -vals))[:keep]
            items_out.append(cols[order].astype(np.int32))
            scores_out.append((vals[order] / vals[order[0]]).astype(np.float32))
            indptr.append(indptr[-1] + order.size)
    items = np.concatenate(items_out) if items_out else np.zeros(0, np.int32)
    scores = np.concatenate(scores_out) if scores_out else np.zeros(0, np.float32)
    _LOG.info("neighbour table: %d members, k=%d, %d entries", n_users, k, items.size)
    return np.asarray(indptr, dtype=np.int64), items, scores


def basket_table(log: PurchaseLog, ages: np.ndarray, user_lookup: np.ndarray, item_lookup: np.ndarray, *,
                 half_life_days: float, max_baskets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each member's newest ``max_baskets`` baskets as the edge's two-level CSR (:class:`MemberBaskets`).

    ``ages``: whole days per row of ``log`` (a basket is as old as its newest
    row). Returns ``(indptr int64 [n_users + 1], starts int64, items int32,
    weights float32)``, members in ``user_lookup`` order, each member's baskets
    newest first, items in ``item_lookup`` numbering; guests, unknown members and
    products the lookups lack are left out, and so are baskets left empty.
    """
    from .counts import Decay

    users = {u: i for i, u in enumerate(np.asarray(user_lookup).tolist())}
    items = {p: i for i, p in enumerate(np.asarray(item_lookup).tolist())}
    u = np.fromiter((users.get(x, -1) if x else -1 for x in log.user_ids.tolist()), np.int64, len(log))
    it = np.fromiter((items.get(x, -1) for x in log.product_ids.tolist()), np.int64, len(log))
    ok = (u > 0) & (it >= 0)
    n_users = len(user_lookup)
    if not ok.any() or max_baskets <= 0:
        return np.zeros(n_users + 1, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
    sess, sess_of = np.unique(log.session_ids[ok], return_inverse=True)
    age = np.full(len(sess), np.inf)
    np.minimum.at(age, sess_of, np.asarray(ages, np.float64)[ok])
    owner = np.zeros(len(sess), np.int64)
    owner[sess_of] = u[ok]
    newest = np.full(len(sess), np.iinfo(np.int64).min)
    np.maximum.at(newest, sess_of, log.timestamps[ok])
    order = np.lexsort((sess, -newest, owner))  # by member, newest basket first
    first = np.searchsorted(owner[order], owner[order], side="left")
    keep = order[(np.arange(order.size) - first) < max_baskets]  # still by member, newest first
    rank = np.full(len(sess), -1, np.int64)
    rank[keep] = np.arange(keep.size)
    starts, basket_item = basket_items(rank[sess_of], it[ok], keep.size)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(owner[keep], minlength=n_users))]).astype(np.int64)
    weights = Decay.weight(half_life_days, age[keep]).astype(np.float32)
    _LOG.info("basket table: %d members, %d baskets, %d items", int((np.diff(indptr) > 0).sum()), keep.size,
              basket_item.size)
    return indptr, starts, basket_item, weights


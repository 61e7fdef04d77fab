"""Choosing on the validation month: the guest model's knobs, the member blend, decay, neighbours.

Everything here sees validation cases only (carved from the training months,
:mod:`.protocol`); the test month is never used for choosing.

* **Guest** (:func:`tune_guest`): stage 0 the co-purchase half-life, stage 1
  ``popularity_alpha`` x ``min_co_count``, stage 2 ``cart_alpha``, stage 3 the
  serving knobs, stage 4 the recent-baskets term (weight x voting baskets).
  The TF-IDF part depends on the catalogue only and is reused; only the
  co-purchase counts and tables (and the recent-basket table) are recomputed.
* **Member blend** (:class:`MemberGrid`): each case's score parts come from the
  model's public :meth:`~agent.recommenders.member.MemberRecommender.score_parts`;
  the rank of the target under any weights is then exact arithmetic over the
  items the sparse terms touch plus a cached top of the two-tower scores, so a
  few hundred weight combinations cost little more than one. Weights are in
  *score units* (:func:`retrain_server.blend.score_unit`, the same unit the
  shipped calibration uses), so they move from the validation model to the
  one trained on every month.
* **Two-Tower recency** (:func:`recency_resample`): training baskets resampled
  with a time-decayed weight (sample weights in expectation), tried on
  validation only.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from agent.recommenders.base import RecommendRequest
from agent.recommenders.member import ScoreParts

from ..blend import TERMS
from ..counts import Counts, Decay, days_before
from ..data import Catalog, PurchaseLog
from .protocol import DAY, Case, evaluate, hr_mrr

_LOG = logging.getLogger(__name__)

__all__ = ["GUEST_TRAINING_GRID", "GUEST_CART_GRID", "GUEST_PARAMS_GRID", "GUEST_BASKET_GRID", "SEED_GUEST_TRAINING",
           "SEED_GUEST_PARAMS", "MEMBER_GRID", "NEIGHBOUR_GRID", "KNOWN_GRID", "BASKET_GRID", "STORE_GRID",
           "CO_HALF_LIVES",
           "HISTORY_HALF_LIVES",
           "NEIGHBOUR_KS", "RECENCY_HALF_LIFE", "guest_recommender", "copurchase_counts",
           "retrain_guest_copurchase", "cart_damped", "tune_guest", "MemberGrid", "recency_resample",
           "history_counts", "around"]

#: Stage 0 of the guest search: half-life (days) of the co-purchase counts; 0 = no decay.
CO_HALF_LIVES = (0.0, 60.0, 120.0, 240.0, 480.0)
#: First stage of the guest search: partner damping and pair threshold (no cart damping).
GUEST_TRAINING_GRID = {"popularity_alpha": (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0),
                       "min_co_count": (1, 2, 3)}
#: Second stage: cart-item damping (divides item i's partner scores by count(i) ** cart_alpha,
#: so a popular cart item does not drown out the evidence of the rest of the cart).
GUEST_CART_GRID = {"cart_alpha": (0.0, 0.25, 0.5, 0.75, 1.0)}
#: Third stage: serving knobs. (co_neighbors, the partners kept per item in the shipped
#: arrays, stays 50: 92k items x 50 x 8 bytes.)
GUEST_PARAMS_GRID = {"co_top_k_per_item": (20, 50), "sim_weight": (0.0, 0.1, 0.3),
                     "fallback_weight": (0.0, 0.5)}
#: Fourth stage: the recent-baskets (session kNN) term's weight and how many baskets vote.
GUEST_BASKET_GRID = {"basket_weight": (0.0, 1.0, 3.0, 10.0, 30.0, 100.0), "basket_neighbours": (50, 100, 200)}
#: The seed's settings, evaluated as the "before tuning" row.
SEED_GUEST_TRAINING = {"popularity_alpha": 0.5, "cart_alpha": 0.0, "min_co_count": 1}
SEED_GUEST_PARAMS = {"co_top_k_per_item": 20, "sim_weight": 0.3, "basket_weight": 0.0}
#: Member blend weights (repeat and co-purchase), in score units.
MEMBER_GRID = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
#: Neighbour-term weights, in score units.
NEIGHBOUR_GRID = (0.0, 0.3, 1.0, 3.0, 10.0, 30.0)
#: "Bought before" and own-baskets term weights, in score units.
KNOWN_GRID = (0.0, 1.0, 3.0, 10.0, 30.0)
BASKET_GRID = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)
#: score units of the store's recent baskets' votes (the guest model's session kNN, 0..1)
STORE_GRID = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)
#: Half-lives (days) of the member's own history tried; 0 = no decay.
HISTORY_HALF_LIVES = (0.0, 15.0, 30.0, 60.0, 120.0, 240.0)
#: Similar members summed per member (TIFU-KNN's k) tried.
NEIGHBOUR_KS = (10, 50, 200)
#: Half-life (days) of the Two-Tower training-basket weights tried.
RECENCY_HALF_LIFE = 90.0


# --------------------------------------------------------------------------- guest

def guest_recommender(model: Any, params: Any, co_tables: tuple[np.ndarray, np.ndarray] | None = None) -> Any:
    """The edge's guest recommender from a :class:`~retrain_server.guest.GuestModel` (optionally other co tables)."""
    from agent.recommenders.guest import GuestRecommender, RecentBaskets

    a = model.edge_arrays()
    co_nb, co_sc = co_tables if co_tables is not None else (a["co_neighbors"], a["co_scores"])
    b = model.baskets
    baskets = None if b is None else RecentBaskets(b["starts"], b["items"], b["postings_indptr"], b["postings"])
    return GuestRecommender(a["item_ids"], co_nb, co_sc, a["sim_neighbors"], a["sim_scores"],
                            a["popular"], params, baskets)


def copurchase_counts(log: PurchaseLog, catalog: Catalog, co_half_life_days: float = 0.0) -> tuple[Any, np.ndarray]:
    """Co-purchase and per-product counts in catalogue order, decayed as of ``log``'s newest purchase.

    The same :class:`~retrain_server.counts.Counts` arithmetic the nightly job and
    ``retrain-server train`` use.
    """
    if not len(log):
        import scipy.sparse as sp

        return sp.csr_matrix((len(catalog), len(catalog)), dtype=np.float32), np.zeros(len(catalog), np.float32)
    counts = Counts.empty().add(log, ages=days_before(log.timestamps, int(log.timestamps.max())),
                                decay=Decay(history_half_life_days=0.0, co_half_life_days=co_half_life_days))
    return counts.for_catalog(catalog)


def history_counts(log: PurchaseLog, history_half_life_days: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(member id, product id, decayed count) triples, as of ``log``'s newest purchase."""
    members = log.select(log.user_ids != "")
    if not len(members):
        none = np.array([], dtype=str)
        return none, none, np.zeros(0, np.float32)
    ages = days_before(members.timestamps, int(log.timestamps.max()))
    w = Decay.weight(history_half_life_days, ages).astype(np.float32)
    return members.user_ids, members.product_ids, w


def retrain_guest_copurchase(model: Any, log: PurchaseLog, config: Any, co_half_life_days: float = 0.0,
                             counts: tuple[Any, np.ndarray] | None = None) -> Any:
    """``model`` with its co-purchase part recomputed from ``log`` under ``config`` (and a half-life).

    Same steps as :func:`retrain_server.guest.build_guest_model` except that the
    TF-IDF part (which depends on the catalogue only) is reused. ``counts``:
    precomputed :func:`copurchase_counts` of ``log``.
    """
    from ..guest import co_purchase_tables, recent_basket_arrays

    co, item_counts = counts if counts is not None else copurchase_counts(log, model.catalog, co_half_life_days)
    key = (id(log), config.recent_baskets, config.basket_postings)
    if key not in _BASKETS:
        if len(_BASKETS) >= 2:  # the fit and the train log alternate; the tables are a few MB each
            _BASKETS.pop(next(iter(_BASKETS)))
        _BASKETS[key] = (log, recent_basket_arrays(log, model.catalog.ids, max_baskets=config.recent_baskets,
                                                   postings_per_item=config.basket_postings))
    co_nb, co_sc = co_purchase_tables(co, item_counts, config.co_neighbors,
                                      config.popularity_alpha, config.min_co_count,
                                      cart_alpha=config.cart_alpha)
    popular = np.lexsort((np.arange(len(model.catalog)), -item_counts))[: config.n_popular]
    return replace(model, co_counts=co, item_counts=item_counts, co_neighbors=co_nb,
                   co_scores=co_sc, popular=popular.astype(np.int32), config=config, baskets=_BASKETS[key][1])


#: The last two recent-basket tables built by :func:`retrain_guest_copurchase` (each log is kept so its id stays
#: valid).
_BASKETS: dict[tuple[int, int, int], tuple[PurchaseLog, Any]] = {}


def cart_damped(tables: tuple[np.ndarray, np.ndarray], item_counts: np.ndarray,
                cart_alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Co-purchase tables built without cart damping, with row i divided by count(i) ** cart_alpha.

    What ``co_purchase_tables(..., cart_alpha=...)`` computes (the row scaling does
    not change the order of an item's partners), without recomputing the tables.
    """
    own = np.power(np.maximum(item_counts, 1.0), -cart_alpha)
    return tables[0], (tables[1] * own[:, None]).astype(np.float32)


def tune_guest(model: Any, cases: Sequence[Case], k: int, *, log: PurchaseLog | None = None,
               half_lives: Sequence[float] = CO_HALF_LIVES) -> dict[str, Any]:
    """Grid search of the guest model on validation cases, in five stages.

    ``model``: a guest model trained on the rows before the validation window
    (``log``); stage 0 recomputes its counts for each co-purchase half-life
    (skipped without ``log``), stage 1 re-scores them for ``popularity_alpha`` x
    ``min_co_count``, stage 2 ``cart_alpha``, stage 3 the serving knobs
    (:data:`GUEST_PARAMS_GRID`), all without the recent-baskets term, then stage 4
    that term (:data:`GUEST_BASKET_GRID`), kept only when it beats stage 3. A decay
    is kept only when it beats no decay.
    """
    from agent.recommenders.guest import GuestParams

    from ..guest import co_purchase_tables

    base = model.config
    t0 = time.perf_counter()

    def run(m: Any, tables: tuple[np.ndarray, np.ndarray], params: dict[str, Any], stage: list,
            choice: dict[str, Any]) -> tuple[float, float]:
        # stages 0-3 without the recent-baskets term (as before it existed); stage 4 adds it
        r = evaluate(guest_recommender(m, GuestParams(**{"basket_weight": 0.0, **params}), tables), cases, k=k,
                     hide_user=True)
        stage.append({**choice, "hr": r.hr, "mrr": r.mrr, "se": r.se})
        _LOG.info("guest val %s: HR %.4f MRR %.4f", choice, r.hr, r.mrr)
        return r.hr, r.mrr

    stage0: list[dict[str, Any]] = []
    best0: Any = None
    for hl in (half_lives if log is not None else (0.0,)):
        m = retrain_guest_copurchase(model, log, base, hl) if log is not None else model
        score = run(m, (m.co_neighbors, m.co_scores), {}, stage0, {"co_half_life_days": hl})
        if best0 is None or score > best0[0]:
            best0 = (score, hl, m)
    model = best0[2]
    stage1: list[dict[str, Any]] = []
    best1: Any = None
    for alpha in GUEST_TRAINING_GRID["popularity_alpha"]:
        for min_co in GUEST_TRAINING_GRID["min_co_count"]:
            tables = co_purchase_tables(model.co_counts, model.item_counts, base.co_neighbors,
                                        alpha, min_co, cart_alpha=0.0)
            choice = {"popularity_alpha": alpha, "min_co_count": min_co}
            score = run(model, tables, {}, stage1, choice)
            if best1 is None or score > best1[0]:
                best1 = (score, choice, tables)
    stage2: list[dict[str, Any]] = []
    best2: Any = None
    for ca in GUEST_CART_GRID["cart_alpha"]:
        tables = cart_damped(best1[2], model.item_counts, ca)
        score = run(model, tables, {}, stage2, {"cart_alpha": ca})
        if best2 is None or score > best2[0]:
            best2 = (score, {**best1[1], "cart_alpha": ca}, tables)
    stage3: list[dict[str, Any]] = []
    best3: Any = None
    for topk in GUEST_PARAMS_GRID["co_top_k_per_item"]:
        for sw in GUEST_PARAMS_GRID["sim_weight"]:
            for fw in GUEST_PARAMS_GRID["fallback_weight"]:
                params = {"co_top_k_per_item": topk, "sim_weight": sw, "fallback_weight": fw}
                score = run(model, best2[2], params, stage3, params)
                if best3 is None or score > best3[0]:
                    best3 = (score, params)
    stage4: list[dict[str, Any]] = []
    best4: Any = (best3[0], {**best3[1], "basket_weight": 0.0})
    if model.baskets is not None:
        for bw in GUEST_BASKET_GRID["basket_weight"]:
            for kn in GUEST_BASKET_GRID["basket_neighbours"] if bw else ():
                params = {**best3[1], "basket_weight": bw, "basket_neighbours": kn}
                score = run(model, best2[2], params, stage4, {"basket_weight": bw, "basket_neighbours": kn})
                if score > best4[0]:
                    best4 = (score, params)
    return {"training": best2[1], "params": best4[1], "co_half_life_days": best0[1],
            "val_hr": best4[0][0], "val_mrr": best4[0][1], "stage0_decay": stage0, "stage1": stage1,
            "stage2_cart": stage2, "stage3_serving": stage3, "stage4_baskets": stage4,
            "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- member

Term = tuple[np.ndarray, np.ndarray]
#: ScoreParts' sparse terms, in the order of a weight combination's columns
_TERMS = ScoreParts.SPARSE


@dataclass
class _Cached:
    """One case's two-tower scores where they matter: the target, a pool of items, the sorted top."""

    target: int  # item index, -1 when the member model does not know it
    target_tt: float
    pool: dict[int, int]  # item -> position in pool_tt
    pool_tt: np.ndarray  # two-tower score of pool items (-inf for cart items)
    top: np.ndarray  # ascending two-tower scores of the best len(top) non-cart items


class MemberGrid:
    """Exact HR@k of the member blend for many weight combinations and term variants at once.

    ``rec`` gives the two-tower part (its :meth:`score_parts`, asked once per
    case); each *variant* is a recommender built with other tables (history
    half-life, co-purchase counts, neighbour table, own-basket table) whose sparse terms are taken
    from its own :meth:`score_parts`. Only items a term touches can overtake the
    target by more than their two-tower score, so the cache keeps their
    two-tower scores and a sorted top of the rest.
    """

    def __init__(self, rec: Any, cases: Sequence[Case], k: int, variants: Mapping[str, Any]) -> None:
        t0 = time.perf_counter()
        self.k, self.cases = k, list(cases)
        requests = [c.request(k) for c in self.cases]
        self.terms: dict[str, list[dict[str, Term]]] = {}
        for name, variant in variants.items():
            rows = []
            for req in requests:
                p = variant.score_parts(req)
                rows.append({name: getattr(p, name) for name in _TERMS})
            self.terms[name] = rows
        self.cache = [self._cache(rec, req, case, i) for i, (req, case) in enumerate(zip(requests, self.cases))]
        self.seconds = time.perf_counter() - t0
        _LOG.info("member grid: %d cases, %d variants cached in %.1fs", len(self.cases), len(variants), self.seconds)

    def _cache(self, rec: Any, req: RecommendRequest, case: Case, i: int) -> _Cached:
        tt = np.asarray(rec.score_parts(req).two_tower, dtype=np.float64)
        tt[rec.item_indices(req.cart)] = -np.inf
        target = rec.item_indices([case.target])
        t = int(target[0]) if target.size else -1
        pool_items = {t} if t >= 0 else set()
        for rows in self.terms.values():
            for items, _ in rows[i].values():
                pool_items.update(items.tolist())
        pool_items.discard(-1)
        items = np.fromiter(pool_items, dtype=np.int64, count=len(pool_items))
        n_top = min(tt.size, items.size + 2 * self.k + 100)
        top = np.sort(np.partition(tt, tt.size - n_top)[tt.size - n_top:]) if n_top else np.zeros(0)
        return _Cached(t, float(tt[t]) if t >= 0 else -np.inf, {int(x): j for j, x in enumerate(items.tolist())},
                       tt[items], top)

    def ranks(self, variant: str, combos: np.ndarray) -> np.ndarray:
        """1-based ranks (0 = not in the top k) of every case's target, ``[len(combos), n_cases]``.

        ``combos``: absolute weights ``[C, len(TERMS)]`` for (repeat, co, neighbours, known, basket, store).
        """
        n_terms = len(_TERMS)
        combos = np.asarray(combos, dtype=np.float64).reshape(-1, n_terms)
        out = np.zeros((combos.shape[0], len(self.cases)), dtype=np.int64)
        for c_i, (cached, terms) in enumerate(zip(self.cache, self.terms[variant])):
            t = cached.target
            if t < 0:
                continue
            parts = [terms[name] for name in _TERMS]
            items = np.concatenate([p[0] for p in parts]).astype(np.int64)
            values = np.concatenate([np.asarray(p[1], dtype=np.float64) for p in parts])
            which = np.repeat(np.arange(n_terms), [p[0].size for p in parts])
            keys, inverse = np.unique(items, return_inverse=True)
            vals = np.zeros((keys.size, n_terms))
            np.add.at(vals, (inverse, which), values)
            is_t = keys == t
            st = cached.target_tt + combos @ (vals[is_t].sum(axis=0) if is_t.any() else np.zeros(n_terms))  # [C]
            keys, vals = keys[~is_t], vals[~is_t]
            tt_s = cached.pool_tt[[cached.pool[x] for x in keys.tolist()]] if keys.size else np.zeros(0)
            s = tt_s[None, :] + combos @ vals.T  # [C, S]
            above = (s > st[:, None]).sum(axis=1) + ((s == st[:, None]) & (keys < t)[None, :]).sum(axis=1)
            tt_above = (tt_s[None, :] > st[:, None]).sum(axis=1)
            # Items outside the support score their two-tower value alone; the cached top holds
            # every such item that can beat the target (the top is larger than support + k).
            top = cached.top
            rest = top.size - np.searchsorted(top, st, side="right") - tt_above
            rank = np.where(st >= (top[0] if top.size else -np.inf), 1 + above + rest, self.k + 1)
            out[:, c_i] = np.where(rank <= self.k, rank, 0)
        return out

    def search(self, variant: str, unit: float, repeat: Sequence[float] = MEMBER_GRID,
               co: Sequence[float] = MEMBER_GRID, neighbours: Sequence[float] = (0.0,),
               known: Sequence[float] = (0.0,), basket: Sequence[float] = (0.0,),
               store: Sequence[float] = (0.0,)) -> dict[str, Any]:
        """Best weights (in score units x ``unit``) for ``variant`` by (HR, MRR), with the whole grid."""
        names = [f"{t}_units" for t in TERMS]  # repeat, co, neighbour, known, basket, store
        grid = list(itertools.product(repeat, co, neighbours, known, basket, store))
        combos = np.array(grid, dtype=np.float64) * unit
        ranks = self.ranks(variant, combos)
        results = []
        best: tuple[float, float, int] | None = None
        for j, values in enumerate(grid):
            hr, mrr = hr_mrr(ranks[j].tolist(), self.k)
            results.append({**dict(zip(names, values)), "hr": hr, "mrr": mrr})
            if best is None or (hr, mrr) > best[:2]:
                best = (hr, mrr, j)
        assert best is not None
        units = dict(zip(names, grid[best[2]]))
        hits = ((ranks[best[2]] >= 1) & (ranks[best[2]] <= self.k)).astype(np.float64)
        _LOG.info("member val %s: best units %s: HR %.4f MRR %.4f", variant, units, best[0], best[1])
        return {"variant": variant, "units": units,
                "params": {f"{t}_weight": units[f"{t}_units"] * unit for t in TERMS},
                "val_hr": best[0], "val_mrr": best[1], "score_unit": unit, "hits": hits, "grid": results}


def around(value: float, grid: Sequence[float] = MEMBER_GRID) -> tuple[float, ...]:
    """``value`` and its neighbours in ``grid``: a local search once the other weights are known.

    The neighbour term's grid is searched with the repeat and co-purchase weights
    near the best ones without it (the full product costs minutes on 10,000 cases).
    """
    g = sorted(set(grid) | {value})
    i = g.index(value)
    return tuple(g[max(0, i - 1): i + 2])


def recency_resample(log: PurchaseLog, half_life_days: float, seed: int = 0) -> PurchaseLog:
    """``log`` with each basket repeated about ``w / mean(w)`` times, ``w = 0.5 ** (age / half_life)``.

    Time-decayed sample weights in expectation, for a trainer that takes none:
    the number of baskets stays about the same, recent baskets appear more
    often, old ones may drop out. Copies get their own session ids (``#r1``, ...).
    """
    if not len(log) or not half_life_days:
        return log
    sessions, first, inverse = np.unique(log.session_ids, return_index=True, return_inverse=True)
    age = (int(log.timestamps.max()) - log.timestamps[first]) / DAY
    w = Decay.weight(half_life_days, age)
    m = w / w.mean()
    rng = np.random.default_rng(seed)
    copies = np.floor(m).astype(np.int64) + (rng.random(len(m)) < (m - np.floor(m)))
    rows_of = copies[inverse]
    take = np.repeat(np.arange(len(log)), rows_of)
    copy_no = np.arange(take.size) - np.repeat(np.cumsum(rows_of) - rows_of, rows_of)
    sid = log.session_ids[take].astype(object)
    suffix = np.where(copy_no > 0, np.char.add("#r", copy_no.astype(str)), "")
    return PurchaseLog.from_columns(
        session_ids=np.char.add(sid.astype(str), suffix), user_ids=log.user_ids[take],
        product_ids=log.product_ids[take], genders=log.genders[take], ages=log.ages[take],
        timestamps=log.timestamps[take])

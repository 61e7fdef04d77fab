"""Offline evaluation: time split, held-out-item protocol, HR@k / MRR@k, baselines.

The metric code here knows nothing about how a model works; it only asks
recommender-like objects (``recommend(RecommendRequest) -> list[str]``) for
``k`` items. The protocol:

1. **Time split** (:func:`split_by_time`): a basket belongs to the test window
   when its *last* row is at or after ``cutoff = latest timestamp - days``;
   every training row is therefore strictly older than the cutoff. A
   validation window is carved the same way out of the training rows, for
   tuning; the test window is never used for choosing anything.
2. **Held-out item** (:func:`held_out_cases`): each test basket with at least
   two distinct products gives one case; one product, chosen by a seeded RNG,
   is hidden and the rest (in basket order) is the cart. Optionally a seeded
   sample of ``max_cases`` baskets.
3. **Metrics** (:func:`evaluate`): HR@k (hidden product among the k
   recommendations) and MRR@k (1/rank, 0 when not in the top k), averaged
   over cases. Every target counts, including products never seen in training
   (a miss is a miss); :func:`unseen_targets` says how many there are.

Baselines (:class:`PopularRecommender`, :class:`CoOccurrenceRecommender`,
:class:`OwnFrequentRecommender`) are fitted on training rows only and never
recommend what is in the cart. The whole Complete Journey protocol (training,
tuning on validation, the table) is :func:`main` / ``retrain-server evaluate``;
it imports the models lazily.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from agent.recommenders.base import RecommendRequest

from .data import UNKNOWN, Catalog, PurchaseLog

_LOG = logging.getLogger(__name__)

__all__ = ["Case", "Metrics", "DAY", "split_by_time", "held_out_cases", "rank_of", "hr_mrr",
           "evaluate", "unseen_targets", "PopularRecommender", "CoOccurrenceRecommender",
           "OwnFrequentRecommender", "EvaluationConfig", "retrain_guest_copurchase",
           "cart_damped", "tune_guest", "tune_member", "run_evaluation", "format_table",
           "build_parser", "config_from_args", "main"]

DAY = 86_400


# --------------------------------------------------------------------------- split + cases

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


@dataclass(frozen=True)
class Case:
    """One held-out question: given ``cart``, is ``target`` recommended?"""

    session_id: str
    cart: tuple[str, ...]
    target: str
    user_id: str | None = None
    gender: int | None = None
    age: int | None = None

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
                          age=None if a == UNKNOWN else a))
    return cases


def unseen_targets(cases: Sequence[Case], train: PurchaseLog) -> int:
    """How many targets were never bought in ``train`` (no model can know them well)."""
    seen = set(np.unique(train.product_ids).tolist())
    return sum(c.target not in seen for c in cases)


# --------------------------------------------------------------------------- metrics

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

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ranks")
        return d


Recommend = Callable[[RecommendRequest], Sequence[str]]


def evaluate(recommender: Any, cases: Sequence[Case], *, k: int = 10, hide_user: bool = False,
             user_id: str | None = None) -> Metrics:
    """HR@k and MRR@k of ``recommender`` (object with ``recommend`` or a callable).

    ``hide_user`` asks every case as a guest (``user_id`` None), or as the
    given stand-in ``user_id`` (e.g. an id the model has never seen).
    """
    fn: Recommend = getattr(recommender, "recommend", recommender)
    ranks, violations, short = [], 0, 0
    t0 = time.perf_counter()
    for case in cases:
        recs = list(fn(case.request(k, hide_user=hide_user, user_id=user_id)))[:k]
        if set(recs) & set(case.cart):
            violations += 1
        if len(recs) < k:
            short += 1
        ranks.append(rank_of(recs, case.target, k))
    hr, mrr = hr_mrr(ranks, k)
    return Metrics(hr=hr, mrr=mrr, n=len(cases), k=k, cart_violations=violations,
                   short_lists=short, seconds=time.perf_counter() - t0, ranks=ranks)


# --------------------------------------------------------------------------- baselines

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
    with the most popular products. Cart excluded.
    """

    def __init__(self, log: PurchaseLog) -> None:
        super().__init__(log)
        member = log.select(log.user_ids != "")
        basket, items = _basket_matrix(member)
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


# --------------------------------------------------------------------------- protocol

@dataclass
class EvaluationConfig:
    """Knobs of :func:`run_evaluation` (``retrain-server evaluate`` options)."""

    k: int = 10
    test_days: float = 30.0
    val_days: float = 30.0
    max_test_baskets: int | None = 5000
    max_val_baskets: int | None = None
    seed: int = 0
    epochs: int = 3  # chosen on validation (blended HR 0.159 vs 0.155 with 1 epoch)
    member: bool = True
    tune: bool = True
    households: int | None = None  # sample of households (quick runs)
    catalog: str = "all"
    member_config: dict[str, Any] = field(default_factory=dict)
    #: fixed choices instead of tuning (used when tune is False)
    guest_training: dict[str, Any] = field(default_factory=dict)
    guest_params: dict[str, Any] = field(default_factory=dict)
    member_params: dict[str, Any] = field(default_factory=dict)


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
#: The seed's settings, evaluated as the "before tuning" row.
SEED_GUEST_TRAINING = {"popularity_alpha": 0.5, "cart_alpha": 0.0, "min_co_count": 1}
SEED_GUEST_PARAMS = {"co_top_k_per_item": 20, "sim_weight": 0.3}
#: Member blend weights; ``repeat`` multiplies log1p(own count), ``co`` the max-normalised
#: guest co-purchase score. Both grids are in units of the two-tower score spread
#: (see retrain_server.blend.score_unit), so they fit whatever scale training produced.
MEMBER_GRID = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def _guest_recommender(model: Any, params: Any, co_tables: tuple[np.ndarray, np.ndarray] | None = None) -> Any:
    from agent.recommenders.guest import GuestRecommender

    a = model.edge_arrays()
    co_nb, co_sc = co_tables if co_tables is not None else (a["co_neighbors"], a["co_scores"])
    return GuestRecommender(a["item_ids"], co_nb, co_sc, a["sim_neighbors"], a["sim_scores"],
                            a["popular"], params)


def retrain_guest_copurchase(model: Any, log: PurchaseLog, config: Any) -> Any:
    """``model`` with its co-purchase part recomputed from ``log`` under ``config``.

    Same steps as :func:`retrain_server.guest.train_guest_model` except that the
    TF-IDF part (which depends on the catalogue only) is reused.
    """
    from .guest import co_purchase_counts, co_purchase_tables

    co, item_counts = co_purchase_counts(log, model.catalog)
    co_nb, co_sc = co_purchase_tables(co, item_counts, config.co_neighbors,
                                      config.popularity_alpha, config.min_co_count,
                                      cart_alpha=config.cart_alpha)
    popular = np.lexsort((np.arange(len(model.catalog)), -item_counts))[: config.n_popular]
    return replace(model, co_counts=co, item_counts=item_counts, co_neighbors=co_nb,
                   co_scores=co_sc, popular=popular.astype(np.int32), config=config)


def cart_damped(tables: tuple[np.ndarray, np.ndarray], item_counts: np.ndarray,
                cart_alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Co-purchase tables built without cart damping, with row i divided by count(i) ** cart_alpha.

    What ``co_purchase_tables(..., cart_alpha=...)`` computes (the row scaling does
    not change the order of an item's partners), without recomputing the tables.
    """
    own = np.power(np.maximum(item_counts, 1.0), -cart_alpha)
    return tables[0], (tables[1] * own[:, None]).astype(np.float32)


def tune_guest(model: Any, cases: Sequence[Case], k: int) -> dict[str, Any]:
    """Grid search of the guest model on validation cases, in three stages.

    ``model``: a guest model trained on the rows before the validation window;
    its co-purchase counts are re-scored for every training choice. Stage 1:
    ``popularity_alpha`` x ``min_co_count``; stage 2: ``cart_alpha``; stage 3:
    the serving knobs (:data:`GUEST_PARAMS_GRID`).
    """
    from agent.recommenders.guest import GuestParams

    from .guest import co_purchase_tables

    base = model.config
    t0 = time.perf_counter()

    def run(tables: tuple[np.ndarray, np.ndarray], params: dict[str, Any], stage: list,
            choice: dict[str, Any]) -> tuple[float, float]:
        m = evaluate(_guest_recommender(model, GuestParams(**params), tables), cases, k=k,
                     hide_user=True)
        stage.append({**choice, "hr": m.hr, "mrr": m.mrr})
        _LOG.info("guest val %s: HR %.4f MRR %.4f", choice, m.hr, m.mrr)
        return m.hr, m.mrr

    stage1: list[dict[str, Any]] = []
    best1: Any = None
    for alpha in GUEST_TRAINING_GRID["popularity_alpha"]:
        for min_co in GUEST_TRAINING_GRID["min_co_count"]:
            tables = co_purchase_tables(model.co_counts, model.item_counts, base.co_neighbors,
                                        alpha, min_co, cart_alpha=0.0)
            choice = {"popularity_alpha": alpha, "min_co_count": min_co}
            score = run(tables, {}, stage1, choice)
            if best1 is None or score > best1[0]:
                best1 = (score, choice, tables)
    stage2: list[dict[str, Any]] = []
    best2: Any = None
    for ca in GUEST_CART_GRID["cart_alpha"]:
        tables = cart_damped(best1[2], model.item_counts, ca)
        score = run(tables, {}, stage2, {"cart_alpha": ca})
        if best2 is None or score > best2[0]:
            best2 = (score, {**best1[1], "cart_alpha": ca}, tables)
    stage3: list[dict[str, Any]] = []
    best3: Any = None
    for topk in GUEST_PARAMS_GRID["co_top_k_per_item"]:
        for sw in GUEST_PARAMS_GRID["sim_weight"]:
            for fw in GUEST_PARAMS_GRID["fallback_weight"]:
                params = {"co_top_k_per_item": topk, "sim_weight": sw, "fallback_weight": fw}
                score = run(best2[2], params, stage3, params)
                if best3 is None or score > best3[0]:
                    best3 = (score, params)
    return {"training": best2[1], "params": best3[1], "val_hr": best3[0][0], "val_mrr": best3[0][1],
            "stage1": stage1, "stage2_cart": stage2, "stage3_serving": stage3,
            "seconds": time.perf_counter() - t0}


def _train_member(train: PurchaseLog, catalog: Catalog, cfg: EvaluationConfig,
                  out_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Train the Two-Tower, export it; returns (MemberRecommender factory inputs, timings)."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from .member import MemberTrainingConfig, export_member_model, train_member_model

    mcfg = MemberTrainingConfig(**{**cfg.member_config, "epochs": cfg.epochs, "seed": cfg.seed})
    t0 = time.perf_counter()
    state = train_member_model(train, catalog.ids, mcfg)
    t_train = time.perf_counter() - t0
    t1 = time.perf_counter()
    export_member_model(state, out_dir)
    t_export = time.perf_counter() - t1
    hist = dict(state.history)
    timings = {"train_seconds_total": t_train, "export_seconds": t_export,
               "examples": hist.get("examples"), "example_build_seconds": hist.get("build_seconds"),
               "fit_seconds": hist.get("train_seconds"), "loss": hist.get("loss"),
               "seconds_per_epoch": (hist.get("train_seconds") or 0.0) / max(mcfg.epochs, 1),
               "epochs": mcfg.epochs, "rows": len(train), "config": asdict(mcfg)}
    _LOG.info("member model: trained in %.1fs (%.1fs/epoch), exported in %.1fs", t_train,
              timings["seconds_per_epoch"], t_export)
    return state, timings


def _member_recommender(root: Path, train: PurchaseLog, guest: Any, params: Any) -> Any:
    """The member recommender from ``root/member_model/``, built the edge's way, with ``params``."""
    from agent.layout import MEMBER_ARRAYS, DirectorySource
    from agent.registry import member_from_source

    from .export import write_member_history

    source = DirectorySource(root)
    member_dir = root / "member_model"
    if not (member_dir / Path(MEMBER_ARRAYS["user_lookup"]).name).exists():
        raise FileNotFoundError(f"no member model in {member_dir}")
    write_member_history(train, source.array(MEMBER_ARRAYS["user_lookup"]),
                         source.array(MEMBER_ARRAYS["item_lookup"]), member_dir)
    return member_from_source(source, guest, asdict(params))


def _member_parts(rec: Any, case: Case, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-tower scores, the own-history term and the co-purchase term, as ``rec.scores`` adds them."""
    from agent.recommenders.member import MemberParams

    req = case.request(k)
    saved = rec.params
    try:
        rec.params = MemberParams(repeat_weight=0.0, co_weight=0.0)
        tt = rec.scores(req)
        rep = np.zeros_like(tt)
        if rec.history_ is not None and req.user_id in rec.user_index_:
            items, counts = rec.history_.row(rec.user_index_[req.user_id])
            rep[items] = np.log1p(counts)
        rec.params = MemberParams(repeat_weight=0.0, co_weight=1.0)
        co = rec.scores(req) - tt
    finally:
        rec.params = saved
    return tt, rep, co


#: The rows the goals are judged on: the defaults ``retrain-server train`` ships.
SHIPPED_GUEST = "guest model as shipped (GuestTrainingConfig / GuestParams defaults)"
SHIPPED_MEMBER = "member model as shipped (defaults; blend calibrated by retrain_server.blend)"


def tune_member(rec: Any, cases: Sequence[Case], k: int) -> dict[str, Any]:
    """Grid search of repeat_weight x co_weight on validation cases.

    Each case's score parts are computed once; a weight pair's rank of the
    target is then exact arithmetic (ties broken by lower item index, as
    :meth:`MemberRecommender.recommend` does). The grid is in units of the
    median gap between the best and the k-th two-tower score (``score_unit``)
    so it fits whatever scale training produced; the chosen weights are
    reported in absolute terms.
    """
    t0 = time.perf_counter()
    gaps = []
    for case in cases[: min(len(cases), 500)]:
        tt, _, _ = _member_parts(rec, case, k)
        excl = [rec.item_index_[p] for p in case.cart if p in rec.item_index_]
        tt[excl] = -np.inf
        top = -np.sort(np.partition(-tt, k)[: k + 1])
        gaps.append(float(top[0] - top[k - 1]))
    unit = float(np.median(gaps)) if gaps else 1.0
    combos = [(rw_u, cw_u, float(np.float32(rw_u * unit)), float(np.float32(cw_u * unit)))
              for rw_u in MEMBER_GRID for cw_u in MEMBER_GRID]
    ranks = np.zeros((len(combos), len(cases)), dtype=np.int64)
    for c_i, case in enumerate(cases):
        t = rec.item_index_.get(case.target, -1)
        if t < 0:
            continue
        tt, rep, co = _member_parts(rec, case, k)
        excl = [rec.item_index_[p] for p in case.cart if p in rec.item_index_]
        for j, (_, _, rw, cw) in enumerate(combos):
            s = tt + np.float32(rw) * rep + np.float32(cw) * co
            s[excl] = -np.inf
            st = s[t]
            r = 1 + int(np.count_nonzero(s > st)) + int(np.count_nonzero(s[:t] == st))
            ranks[j, c_i] = r if r <= k else 0
    results = []
    best: tuple[float, float, dict[str, float]] | None = None
    for j, (rw_u, cw_u, rw, cw) in enumerate(combos):
        hr, mrr = hr_mrr(ranks[j].tolist(), k)
        choice = {"repeat_weight": rw, "co_weight": cw}
        results.append({**choice, "repeat_units": rw_u, "co_units": cw_u, "hr": hr, "mrr": mrr})
        if best is None or (hr, mrr) > best[:2]:
            best = (hr, mrr, choice)
    assert best is not None
    _LOG.info("member val best %s: HR %.4f MRR %.4f (score unit %.4g)", best[2], best[0], best[1], unit)
    return {"params": best[2], "val_hr": best[0], "val_mrr": best[1], "score_unit": unit,
            "grid": results, "seconds": time.perf_counter() - t0}


def _row(name: str, m: Metrics, note: str = "") -> dict[str, Any]:
    return {"method": name, "hr": m.hr, "mrr": m.mrr, "n": m.n, "note": note,
            "cart_violations": m.cart_violations, "short_lists": m.short_lists,
            "seconds": round(m.seconds, 2)}


def run_evaluation(cfg: EvaluationConfig, *, data: Any = None,
                   work_dir: str | Path | None = None) -> dict[str, Any]:
    """The whole Complete Journey protocol; returns the JSON-able report.

    ``data``: a :class:`retrain_server.completejourney.CompleteJourney` (or any
    object with ``catalog``, ``log``, ``stats``); loaded when None.
    """
    from agent.recommenders.guest import GuestParams
    from agent.recommenders.member import MemberParams

    from .guest import GuestTrainingConfig, train_guest_model

    t_start = time.perf_counter()
    if data is None:
        from .completejourney import load_completejourney

        data = load_completejourney(households=cfg.households, seed=cfg.seed, catalog=cfg.catalog)
    catalog, log = data.catalog, data.log
    train, test, test_cutoff = split_by_time(log, cfg.test_days)
    fit, val, val_cutoff = split_by_time(train, cfg.val_days)
    test_cases = held_out_cases(test, max_cases=cfg.max_test_baskets, seed=cfg.seed)
    val_cases = held_out_cases(val, max_cases=cfg.max_val_baskets, seed=cfg.seed + 1)
    train_users = set(np.unique(train.user_ids).tolist()) - {""}
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
    report: dict[str, Any] = {
        "data": dict(data.stats),
        "split": {"test_cutoff": iso(test_cutoff), "val_cutoff": iso(val_cutoff),
                  "train_rows": len(train), "test_rows": len(test), "fit_rows": len(fit),
                  "val_rows": len(val), "test_cases": len(test_cases), "val_cases": len(val_cases),
                  "test_targets_unseen_in_train": unseen_targets(test_cases, train),
                  "val_targets_unseen_in_fit": unseen_targets(val_cases, fit),
                  "test_cases_member_unknown": sum(c.user_id not in train_users
                                                  for c in test_cases)},
        "config": asdict(cfg), "k": cfg.k,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "timings": {}, "tuning": {}, "rows": [],
    }
    _LOG.info("split: %s", report["split"])
    k = cfg.k
    rows = report["rows"]
    timings = report["timings"]

    # Baselines (fitted on training rows only).
    t0 = time.perf_counter()
    popular, co_base, own = (PopularRecommender(train), CoOccurrenceRecommender(train),
                             OwnFrequentRecommender(train))
    timings["baselines_fit_seconds"] = time.perf_counter() - t0
    base_rows = [
        _row("baseline: most popular", evaluate(popular, test_cases, k=k)),
        _row("baseline: item co-occurrence (raw counts)", evaluate(co_base, test_cases, k=k, hide_user=True)),
        _row("baseline: member's own most frequent", evaluate(own, test_cases, k=k)),
    ]
    for r in base_rows:
        r["kind"] = "baseline"
    rows.extend(base_rows)

    # Guest model: full training once (timed); the tuning search, the seed-settings row
    # and the tuned model re-score its co-purchase part (the TF-IDF part is catalogue-only).
    t0 = time.perf_counter()
    first_guest_model = train_guest_model(catalog, train, GuestTrainingConfig(**cfg.guest_training))
    timings["guest_train_seconds"] = time.perf_counter() - t0
    _LOG.info("guest model trained in %.1fs", timings["guest_train_seconds"])
    guest_training = first_guest_model.config
    guest_params = GuestParams(**cfg.guest_params)
    if cfg.tune:
        search = replace(guest_training, co_neighbors=max(guest_training.co_neighbors,
                                                          max(GUEST_PARAMS_GRID["co_top_k_per_item"])))
        tuned = tune_guest(retrain_guest_copurchase(first_guest_model, fit, search), val_cases, k)
        report["tuning"]["guest"] = tuned
        guest_training = replace(guest_training, **tuned["training"])
        guest_params = replace(guest_params, **tuned["params"])
    guest_training = replace(guest_training, co_neighbors=max(guest_training.co_neighbors,
                                                              guest_params.co_top_k_per_item))
    guest_model = retrain_guest_copurchase(first_guest_model, train, guest_training)
    guest = _guest_recommender(guest_model, guest_params)
    report["chosen"] = {"guest_training": asdict(guest_training), "guest_params": asdict(guest_params)}
    seed_model = retrain_guest_copurchase(first_guest_model, train,
                                          replace(first_guest_model.config, **SEED_GUEST_TRAINING))
    rows.append({**_row("guest model (seed settings: alpha 0.5, no cart damping, TF-IDF expansion)",
                        evaluate(_guest_recommender(seed_model, GuestParams(**SEED_GUEST_PARAMS)),
                                 test_cases, k=k, hide_user=True)), "kind": "guest"})
    rows.append({**_row("guest model (tuned)", evaluate(guest, test_cases, k=k, hide_user=True)),
                 "kind": "guest"})
    shipped_guest = _guest_recommender(
        retrain_guest_copurchase(first_guest_model, train, GuestTrainingConfig()), GuestParams())
    rows.append({**_row(SHIPPED_GUEST, evaluate(shipped_guest, test_cases, k=k, hide_user=True)),
                 "kind": "guest"})

    if cfg.member:
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            member_params = MemberParams(**cfg.member_params)
            if cfg.tune:
                val_guest_model = retrain_guest_copurchase(first_guest_model, fit, guest_training)
                val_guest = _guest_recommender(val_guest_model, guest_params)
                _, t_val = _train_member(fit, catalog, cfg, Path(tmp) / "val" / "member_model")
                timings["member_validation_model"] = t_val
                val_rec = _member_recommender(Path(tmp) / "val", fit, val_guest, MemberParams())
                tuned_m = tune_member(val_rec, val_cases, k)
                report["tuning"]["member"] = tuned_m
                member_params = replace(member_params, **tuned_m["params"])
            _, t_full = _train_member(train, catalog, cfg, Path(tmp) / "full" / "member_model")
            timings["member"] = t_full
            report["chosen"]["member_params"] = asdict(member_params)
            pure = _member_recommender(Path(tmp) / "full", train, guest, MemberParams())
            rows.append({**_row("member: two-tower only", evaluate(pure, test_cases, k=k)),
                         "kind": "member"})
            from .blend import serving_weights

            weights = serving_weights(pure, train)  # what retrain-server train ships
            shipped = _member_recommender(Path(tmp) / "full", train, shipped_guest, MemberParams(
                repeat_weight=weights["repeat_weight"], co_weight=weights["co_weight"]))
            report["chosen"]["shipped_member_serving"] = weights
            rows.append({**_row(SHIPPED_MEMBER, evaluate(shipped, test_cases, k=k)), "kind": "member"})
            blended = _member_recommender(Path(tmp) / "full", train, guest, member_params)
            rows.append({**_row("member: two-tower + own history + co-purchase (tuned)",
                                evaluate(blended, test_cases, k=k)), "kind": "member"})
            oov = "__evaluation_unknown_member__"
            rows.append({**_row("unknown member -> member model, OOV user (pure)",
                                evaluate(pure, test_cases, k=k, hide_user=True, user_id=oov)),
                         "kind": "fallback"})
            rows.append({**_row("unknown member -> member model, OOV user (blended)",
                                evaluate(blended, test_cases, k=k, hide_user=True, user_id=oov)),
                         "kind": "fallback"})
            rows.append({**_row("unknown member -> guest model (tuned)",
                                evaluate(guest, test_cases, k=k, hide_user=True)),
                         "kind": "fallback"})
    else:
        for name in ("member: two-tower only", "member: two-tower + own history + co-purchase (tuned)"):
            rows.append({"method": name, "hr": None, "mrr": None, "n": 0, "kind": "member",
                         "note": "skipped (--no-member)"})

    scored = [r for r in rows if r["kind"] == "baseline"]
    best = max(scored, key=lambda r: (r["hr"], r["mrr"]))
    co_hr = next(r["hr"] for r in scored if "co-occurrence" in r["method"])
    for r in rows:
        r["vs_best_baseline"] = None if r["hr"] is None or not best["hr"] else r["hr"] / best["hr"]
        r["vs_cooccurrence"] = None if r["hr"] is None or not co_hr else r["hr"] / co_hr
    report["best_baseline"] = best["method"]
    report["goals"] = _goals(rows)
    timings["total_seconds"] = time.perf_counter() - t_start
    return report


def _goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def get(name: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["method"] == name), None)

    out: dict[str, Any] = {}
    g = get(SHIPPED_GUEST) or get("guest model (tuned)")
    if g and g["vs_cooccurrence"] is not None:
        out["guest_vs_cooccurrence"] = g["vs_cooccurrence"]
        out["guest_goal_met (>=1.1)"] = g["vs_cooccurrence"] >= 1.1
    m = get(SHIPPED_MEMBER) or get("member: two-tower + own history + co-purchase (tuned)")
    if m and m["vs_best_baseline"] is not None:
        out["member_vs_best_baseline"] = m["vs_best_baseline"]
        out["member_goal_met (>=1.1)"] = m["vs_best_baseline"] >= 1.1
    return out


def format_table(report: dict[str, Any]) -> str:
    """Markdown table of the report's rows."""
    k = report["k"]
    lines = [f"| method | HR@{k} | MRR@{k} | × best baseline (HR) | × co-occurrence (HR) |",
             "|---|---:|---:|---:|---:|"]
    fmt = lambda v, p=4: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {fmt(r['hr'])} | {fmt(r['mrr'])} | "
                     f"{fmt(r['vs_best_baseline'], 2)} | {fmt(r['vs_cooccurrence'], 2)} |")
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of ``retrain-server evaluate`` (also usable as a sub-parser)."""
    p = parser or argparse.ArgumentParser(
        prog="retrain-server evaluate",
        description="HR@10 / MRR@10 of the guest and member models and baselines on Complete Journey.")
    p.add_argument("--max-test-baskets", type=int, default=5000, help="sample of test baskets (0 = all)")
    p.add_argument("--max-val-baskets", type=int, default=0, help="sample of validation baskets (0 = all)")
    p.add_argument("--epochs", type=int, default=3, help="Two-Tower training epochs")
    p.add_argument("--test-days", type=float, default=30.0)
    p.add_argument("--val-days", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--households", type=int, default=None, help="sample this many households")
    p.add_argument("--catalog", choices=("all", "purchased"), default="all")
    p.add_argument("--no-member", action="store_true", help="skip the Two-Tower model")
    p.add_argument("--no-tune", action="store_true", help="use defaults instead of the validation search")
    p.add_argument("--quick", action="store_true",
                   help="small slice for smoke tests: 200 households, 300 cases, tiny Two-Tower")
    p.add_argument("--member-config", default="{}", help="JSON overrides of MemberTrainingConfig")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--work-dir", type=Path, default=None, help="where temporary models go")
    return p


def config_from_args(args: argparse.Namespace) -> EvaluationConfig:
    cfg = EvaluationConfig(
        test_days=args.test_days, val_days=args.val_days,
        max_test_baskets=args.max_test_baskets or None, max_val_baskets=args.max_val_baskets or None,
        seed=args.seed, epochs=args.epochs, member=not args.no_member, tune=not args.no_tune,
        households=args.households, catalog=args.catalog,
        member_config=json.loads(args.member_config))
    if args.quick:
        cfg.households = cfg.households or 200
        cfg.max_test_baskets = min(cfg.max_test_baskets or 300, 300)
        cfg.max_val_baskets = min(cfg.max_val_baskets or 300, 300)
        cfg.catalog = "purchased"
        cfg.member_config = {"embedding_dim": 8, "batch_size": 1024, **cfg.member_config}
    return cfg


def main(argv: list[str] | None = None, *, default_json: Path | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_evaluation(config_from_args(args), work_dir=args.work_dir)
    table = format_table(report)
    print(table)
    print(json.dumps({"goals": report["goals"], "chosen": report.get("chosen"),
                      "timings": {k: v for k, v in report["timings"].items()
                                  if not isinstance(v, dict)}}, indent=2, default=str))
    out = args.json or default_json
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**report, "table_markdown": table}, indent=2, default=str),
                       encoding="utf-8")
        _LOG.info("wrote %s", out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

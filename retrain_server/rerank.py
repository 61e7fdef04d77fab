"""Fitting the member reranker (:mod:`agent.recommenders.rerank`) and writing it into a bundle.

The trees learn from a month of member baskets answered by a blend that has
not seen that month: one product of each basket is hidden, the blend's best
:attr:`RerankConfig.candidates` for the rest are the rows, the hidden product
is the one positive. The features are :func:`agent.recommenders.rerank.candidate_features`
(the edge's own code), the model scikit-learn's ``HistGradientBoostingClassifier``,
shipped as an ONNX ``TreeEnsembleRegressor`` whose raw score orders exactly as
the classifier's probability (thresholds rounded down to float32, so every
float32 feature takes the same branch).

Used by ``retrain-server evaluate`` (fitted on the validation month, reported on
the test month) and by ``retrain-server train`` and the nightly job
(:func:`fit_on_history`: fitted on the last month with a Two-Tower model trained
on the months before it). Each case reads the statistics as of its own day
(:class:`StatsHistory`), as fresh as the nightly-rebuilt ones a basket reads.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent import layout
from agent.recommenders.features import build_index
from agent.recommenders.rerank import FEATURES, NEVER, MemberStats, candidate_features

from .data import PurchaseLog

__all__ = ["GRID", "RerankConfig", "FittedReranker", "MIN_CASES", "StatsHistory", "member_stats", "training_rows",
           "fit_reranker", "trees_to_onnx", "write_reranker", "remove_reranker", "learning_window", "fit_on_history"]

_LOG = logging.getLogger(__name__)

#: the evaluation's search (``retrain-server evaluate``), on the held-out fifth of the validation cases
GRID = {"learning_rate": (0.03, 0.1), "max_leaf_nodes": (15, 63), "min_samples_leaf": (20, 200),
        "l2_regularization": (0.0, 1.0)}
#: fewer cases of known members than this: no reranker (its held-out fifth would say nothing)
MIN_CASES = 50


@dataclass(frozen=True)
class RerankConfig:
    """How the trees are fitted. The defaults: the best held-out HR@10 on Complete Journey's validation
    month among the settings whose cost at the edge (trees x candidates) fits ~0.1 ms, README "Evaluation".

    ``grid`` (setting -> values) is searched on a held-out fifth of the cases
    when given; otherwise the settings below are used and only the number of
    trees is chosen there (at most ``max_trees``: the edge pays ~16 ns per tree
    and candidate).
    """

    candidates: int = 50
    learning_rate: float = 0.1
    max_leaf_nodes: int = 15
    min_samples_leaf: int = 200
    l2_regularization: float = 1.0
    max_trees: int = 100
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    seed: int = 0

    def settings(self) -> dict[str, Any]:
        return {"learning_rate": self.learning_rate, "max_leaf_nodes": self.max_leaf_nodes,
                "min_samples_leaf": self.min_samples_leaf, "l2_regularization": self.l2_regularization}


@dataclass(frozen=True)
class FittedReranker:
    """Fitted trees (ONNX bytes), how they were fitted, and what was chosen; kept beside a member
    checkpoint (:meth:`save`) so the nights that fine-tune it ship the same trees."""

    trees: bytes
    config: RerankConfig
    info: dict[str, Any]

    TREES, FIT = "rerank_trees.onnx", "rerank_fit.json"

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self.TREES).write_bytes(self.trees)
        (directory / self.FIT).write_text(json.dumps({"config": asdict(self.config), "info": self.info}),
                                          encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> FittedReranker | None:
        """The reranker saved in ``directory``, None when there is none (or it cannot be read)."""
        try:
            doc = json.loads((directory / cls.FIT).read_text(encoding="utf-8"))
            config = RerankConfig(**{**doc["config"], "grid": {k: tuple(v) for k, v in
                                                              doc["config"].get("grid", {}).items()}})
            fitted = cls((directory / cls.TREES).read_bytes(), config, dict(doc["info"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if (directory / cls.FIT).exists():
                _LOG.warning("reranker in %s unreadable (%s): none", directory, exc)
            return None
        if fitted.info.get("features") != list(FEATURES):
            _LOG.warning("reranker in %s was fitted on other features than this server computes: none until the "
                         "next training from scratch", directory)
            return None
        return fitted


class StatsHistory:
    """A purchase log's :class:`MemberStats` as of any moment (rows numbered once, then numpy only).

    The edge's statistics are rebuilt every night, so a request sees every purchase up to the
    night before. Trees learn from cases spread over a month, so each case reads the statistics
    as of the start of its own day (UTC) — the same freshness (:meth:`for_case`).
    """

    def __init__(self, log: PurchaseLog, user_lookup: Any, item_lookup: Any) -> None:
        users = build_index(np.asarray(user_lookup).tolist())
        items = build_index(np.asarray(item_lookup).tolist())
        self.n_users, self.n_items = len(users), len(items)
        item = np.fromiter((items.get(p, -1) for p in log.product_ids.tolist()), np.int64, len(log))
        user = np.fromiter((users.get(u, -1) if u else -1 for u in log.user_ids.tolist()), np.int64, len(log))
        _, session = np.unique(log.session_ids, return_inverse=True)
        ts = log.timestamps.astype(np.int64)
        order = np.argsort(ts, kind="stable")
        self._ts, self._item, self._user = ts[order], item[order], user[order]
        self._session = session.reshape(-1)[order]
        self._by_day: dict[int | None, MemberStats] = {}

    def as_of(self, before: int | None = None) -> MemberStats:
        """The statistics of the rows strictly before ``before`` (epoch seconds; None: every row), with
        "days since" counted to ``before`` (None: the newest row)."""
        stop = len(self._ts) if before is None else int(np.searchsorted(self._ts, before, side="left"))
        ts, it, u, session = self._ts[:stop], self._item[:stop], self._user[:stop], self._session[:stop]
        end = (int(ts[-1]) if stop else 0) if before is None else int(before)
        n_users, n_items = self.n_users, self.n_items
        known = it >= 0
        log_popularity = np.log1p(np.bincount(it[known], minlength=n_items)).astype(np.float32)
        rows = known & (u > 0)  # row 0 is the unknown-user row
        u, it, ts, session = u[rows], it[rows], ts[rows], session[rows]
        key = u * n_items + it
        pairs = np.unique(np.stack([key, session]), axis=1) if len(key) else np.zeros((2, 0), np.int64)
        keys, baskets = np.unique(pairs[0], return_counts=True)
        pos = np.searchsorted(keys, key)
        last = np.zeros(len(keys), np.int64)
        first = np.full(len(keys), np.iinfo(np.int64).max, np.int64)
        np.maximum.at(last, pos, ts)
        np.minimum.at(first, pos, ts)
        gap = np.where(baskets >= 2, (last - first) / 86400.0 / np.maximum(baskets - 1, 1), NEVER)
        member_last = np.full(n_users, -1, np.int64)
        np.maximum.at(member_last, u, ts)
        member_pairs = np.unique(np.stack([u, session]), axis=1) if len(u) else np.zeros((2, 0), np.int64)
        member_baskets = np.bincount(member_pairs[0], minlength=n_users)
        buyer_item = keys % n_items
        buyers = np.bincount(buyer_item, minlength=n_items)
        rebuyers = np.bincount(buyer_item[baskets >= 2], minlength=n_items)
        return MemberStats(n_items=n_items, keys=keys.astype(np.int64), baskets=baskets.astype(np.float32),
                           days_since=((end - last) / 86400.0).astype(np.float32), gap_days=gap.astype(np.float32),
                           member_baskets=member_baskets.astype(np.float32),
                           member_days_since=np.where(member_last >= 0, (end - member_last) / 86400.0,
                                                      NEVER).astype(np.float32),
                           log_popularity=log_popularity,
                           rebuy_rate=((rebuyers + 1) / (buyers + 2)).astype(np.float32))

    def for_case(self, case: Any) -> MemberStats:
        """The statistics as of the start of the case's day (cached per day; no time: every row)."""
        day = None if case.at is None else int(case.at) - int(case.at) % 86400
        if day not in self._by_day:
            self._by_day[day] = self.as_of(day)
        return self._by_day[day]


def member_stats(log: PurchaseLog, user_lookup: Any, item_lookup: Any) -> MemberStats:
    """The statistics the features read, from ``log`` as of its newest purchase, in the lookups' numbering
    (what a bundle ships)."""
    return StatsHistory(log, user_lookup, item_lookup).as_of(None)


def training_rows(member: Any, stats: StatsHistory, cases: list[Any], *, k: int,
                  candidates: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per case: the candidates' feature rows (statistics as of the case's day) and whether each is the
    hidden product (the edge's candidates)."""
    X, y = [], []
    for case in cases:
        request = case.request(k)
        parts, top = member.candidates(request, max(k, candidates))
        target = member.item_indices([case.target])
        X.append(candidate_features(member, stats.for_case(case), request, parts, top))
        y.append((top == target[0]).astype(np.int8) if target.size else np.zeros(len(top), np.int8))
    return X, y


def _hits(model: Any, X: list[np.ndarray], y: list[np.ndarray], k: int) -> np.ndarray:
    """Per case: is the hidden product in the trees' best ``k``?"""
    return np.array([bool(t[np.argsort(-model.decision_function(f), kind="stable")[:k]].any()) if len(f)
                     else False for f, t in zip(X, y)], dtype=float)


def fit_reranker(member: Any, stats: StatsHistory, cases: list[Any], cfg: RerankConfig | None = None, *,
                 k: int = 10) -> tuple[Any, dict[str, Any]]:
    """Fit on the ``cases`` of members ``member`` knows; returns (the classifier, what was chosen).

    A fifth of the cases is held out (drawn at random, so one member's baskets can fall on both sides:
    the choice is a little optimistic). On the rest, each setting (``cfg.grid``, else ``cfg``'s own) is
    fitted with early stopping (log-loss on 15 % of the rows) for its number of trees; the setting with the
    best HR@k on the held-out fifth is refitted on every case with that many trees. ValueError below
    :data:`MIN_CASES` cases, or when the trees rank worse than the blend on the held-out fifth by more
    than two paired standard errors (the blend then ships alone).
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    cfg = cfg or RerankConfig()
    cases = [c for c in cases if member.knows_user(c.user_id)]
    if len(cases) < MIN_CASES:
        raise ValueError(f"{len(cases)} cases of known members (< {MIN_CASES}): too few to fit on")
    X, y = training_rows(member, stats, cases, k=k, candidates=cfg.candidates)
    if not any(t.any() for t in y):
        raise ValueError("no case's hidden product is among the blend's candidates: nothing to learn")
    order = np.random.default_rng(cfg.seed).permutation(len(cases))
    fit_idx, hold_idx = np.sort(order[len(cases) // 5:]), np.sort(order[:len(cases) // 5])
    fit_X, fit_y = np.concatenate([X[i] for i in fit_idx]), np.concatenate([y[i] for i in fit_idx])
    grid = cfg.grid or {name: (value,) for name, value in cfg.settings().items()}
    tried = []
    for values in itertools.product(*grid.values()):
        settings = {**cfg.settings(), **dict(zip(grid, values))}
        model = HistGradientBoostingClassifier(max_iter=cfg.max_trees, early_stopping=True,
                                               validation_fraction=0.15, random_state=cfg.seed,
                                               **settings).fit(fit_X, fit_y)
        hits = _hits(model, [X[i] for i in hold_idx], [y[i] for i in hold_idx], k)
        hr = float(hits.mean()) if len(hits) else 0.0
        tried.append({**settings, "trees": int(model.n_iter_), "holdout_hr": hr, "_hits": hits})
        _LOG.info("reranker %s: %d trees, held-out HR@%d %.4f", settings, model.n_iter_, k, hr)
    best = max(tried, key=lambda t: t["holdout_hr"])
    blend_hits = np.array([bool(y[i][:k].any()) for i in hold_idx], dtype=float)
    blend_hr = float(blend_hits.mean()) if len(blend_hits) else 0.0
    diff = best["_hits"] - blend_hits
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    for t in tried:
        del t["_hits"]
    if blend_hr - best["holdout_hr"] > 2 * se:  # clearly worse than the blend (not just noise): not shipped
        raise ValueError(f"the trees rank worse than the blend on held-out cases ({best['holdout_hr']:.4f} < "
                         f"{blend_hr:.4f}, paired SE {se:.4f})")
    settings = {n: best[n] for n in cfg.settings()}
    model = HistGradientBoostingClassifier(max_iter=best["trees"], early_stopping=False, random_state=cfg.seed,
                                           **settings).fit(np.concatenate(X), np.concatenate(y))
    return model, {"chosen": best, "tried": tried, "cases": len(cases), "features": list(FEATURES),
                   "candidates": cfg.candidates, "blend_holdout_hr": blend_hr}


def trees_to_onnx(model: Any) -> bytes:
    """A fitted ``HistGradientBoostingClassifier`` as an ONNX ``TreeEnsembleRegressor`` (input ``X``
    [n, features] float32, output ``Y`` [n, 1]: the raw score, whose order is the probability's)."""
    import onnx
    from onnx import TensorProto, helper

    if getattr(model, "n_trees_per_iteration_", 1) != 1:
        raise ValueError("only a binary classifier's trees can be exported")
    a: dict[str, list[Any]] = {k: [] for k in ("tree", "node", "feature", "value", "mode", "true", "false")}
    leaf_tree: list[int] = []
    leaf_node: list[int] = []
    leaf_weight: list[float] = []
    for t, (predictor,) in enumerate(model._predictors):
        for i, nd in enumerate(predictor.nodes):
            a["tree"].append(t)
            a["node"].append(i)
            if nd["is_leaf"]:
                a["feature"].append(0)
                a["value"].append(0.0)
                a["mode"].append("LEAF")
                a["true"].append(0)
                a["false"].append(0)
                leaf_tree.append(t)
                leaf_node.append(i)
                leaf_weight.append(float(nd["value"]))
            else:
                if nd["is_categorical"]:
                    raise ValueError("categorical splits cannot be exported")
                threshold = np.float32(nd["num_threshold"])
                if threshold > nd["num_threshold"]:  # x <= t (float64) must equal x <= t' for float32 x
                    threshold = np.nextafter(threshold, np.float32(-np.inf))
                a["feature"].append(int(nd["feature_idx"]))
                a["value"].append(float(threshold))
                a["mode"].append("BRANCH_LEQ")
                a["true"].append(int(nd["left"]))
                a["false"].append(int(nd["right"]))
    node = helper.make_node(
        "TreeEnsembleRegressor", ["X"], ["Y"], domain="ai.onnx.ml", n_targets=1,
        nodes_treeids=a["tree"], nodes_nodeids=a["node"], nodes_featureids=a["feature"],
        nodes_values=a["value"], nodes_modes=a["mode"], nodes_truenodeids=a["true"],
        nodes_falsenodeids=a["false"], nodes_missing_value_tracks_true=[0] * len(a["tree"]),
        target_ids=[0] * len(leaf_tree), target_nodeids=leaf_node, target_treeids=leaf_tree,
        target_weights=leaf_weight, base_values=[float(np.ravel(model._baseline_prediction)[0])],
        aggregate_function="SUM", post_transform="NONE")
    graph = helper.make_graph(
        [node], "member_rerank", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, len(FEATURES)])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])])
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                          helper.make_opsetid("ai.onnx.ml", 3)])
    onnx_model.ir_version = 8
    onnx.checker.check_model(onnx_model)
    return onnx_model.SerializeToString()


def write_reranker(member_dir: Path, trees: bytes, stats: MemberStats, cfg: RerankConfig,
                   info: dict[str, Any] | None = None) -> None:
    """``rerank_trees.onnx``, ``rerank_*.npy`` and ``member_meta.json``'s ``rerank`` into ``member_dir``."""
    (member_dir / Path(layout.MEMBER_RERANK_TREES).name).write_bytes(trees)
    for name, relpath in layout.MEMBER_RERANK_STATS.items():
        np.save(member_dir / Path(relpath).name, getattr(stats, name), allow_pickle=False)
    meta_path = member_dir / Path(layout.MEMBER_META).name
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    meta["rerank"] = {"features": list(FEATURES), "candidates": cfg.candidates, "config": asdict(cfg),
                      **({"fit": info} if info else {})}
    meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")


def remove_reranker(member_dir: Path) -> None:
    """Drop a reranker from ``member_dir`` (files and ``member_meta.json``'s entry)."""
    for relpath in (layout.MEMBER_RERANK_TREES, *layout.MEMBER_RERANK_STATS.values()):
        (member_dir / Path(relpath).name).unlink(missing_ok=True)
    meta_path = member_dir / Path(layout.MEMBER_META).name
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.pop("rerank", None) is not None:
            meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")


def learning_window(log: PurchaseLog, days: float) -> float:
    """Seconds of ``log``'s newest purchases the trees learn from: ``days``, at most a quarter of its span
    (the Two-Tower model they are fitted with learns from the rest)."""
    if not len(log):
        return 0.0
    span = float(log.timestamps.max() - log.timestamps.min())
    return min(days * 86400.0, span / 4)


def fit_on_history(log: PurchaseLog, catalog: Any, cfg: RerankConfig, *, days: float, guest_config: Any = None,
                   decay: Any = None, member_config: Any = None, max_cases: int = 20000,
                   k: int = 10) -> tuple[bytes, dict[str, Any]]:
    """Trees for a member model trained on ``log``, fitted the way the evaluation fits them.

    The newest :func:`learning_window` of ``log`` (whole baskets) is the month they learn from; everything
    before it builds the blend that answers it (guest model, decayed histories, baskets, and a Two-Tower
    model trained on it alone, so the Two-Tower feature is never read on its own training data). One
    product of each member basket is hidden, the blend's candidates for the rest are the rows, and the
    statistics are read as of the basket's day. Returns (ONNX bytes, what was fitted); ValueError when
    there is too little to learn from.
    """
    import tempfile

    from agent.layout import DirectorySource
    from agent.registry import guest_from_source, member_from_source

    from . import member as member_mod
    from .evaluation.protocol import held_out_cases, split_by_time
    from .export import write_parameters
    from .guest import build_guest_model, recent_basket_arrays
    from .train import decayed_counts, state_writer

    if not len(log):
        raise ValueError("no purchases")
    window = learning_window(log, days)
    before, month, _ = split_by_time(log, window / 86400.0)
    month = month.select(month.user_ids != "")
    if not len(month) or not (before.user_ids != "").any():
        raise ValueError("no member purchases on both sides of the reranker's learning window")
    cases = held_out_cases(month, max_cases=max_cases, seed=cfg.seed)
    if len(cases) < MIN_CASES:
        raise ValueError(f"{len(cases)} member baskets in the learning window (< {MIN_CASES}): too few")
    counts = decayed_counts(before, decay)
    guest = build_guest_model(catalog, *counts.for_catalog(catalog), guest_config)
    guest.baskets = recent_basket_arrays(before, catalog.ids, max_baskets=guest.config.recent_baskets,
                                         postings_per_item=guest.config.basket_postings)
    state = member_mod.train_member_model(before, catalog.ids.tolist(),
                                          member_config or member_mod.MemberTrainingConfig())
    with tempfile.TemporaryDirectory(prefix="rerank-") as tmp:
        root = Path(tmp) / "parameters"
        write_parameters(root, guest, member_writer=state_writer(state, guest, calibration_log=before,
                                                                 history=counts.history_triples()),
                         signing_key=None, scratch=True)
        source = DirectorySource(root)
        member = member_from_source(source, guest_from_source(source), {"rerank": False})
        if member is None:
            raise ValueError("the reranker's Two-Tower model could not be built")
        stats = StatsHistory(log, source.array(layout.MEMBER_ARRAYS["user_lookup"]), member.item_ids_)
        model, info = fit_reranker(member, stats, cases, cfg, k=k)
    info = {**info, "window_days": round(window / 86400.0, 2), "rows_before": len(before),
            "baskets_learned": len(cases)}
    return trees_to_onnx(model), info

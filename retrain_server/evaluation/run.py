"""The whole protocol on one data set: baselines, guest and member models, each change alone and together.

:func:`run_evaluation` splits the data (:mod:`.protocol`), fits the baselines
(:mod:`.baselines`), chooses everything on the validation month
(:mod:`.tuning`) and writes the rows (:mod:`.report`). The "as shipped" rows
are built exactly as ``retrain-server train`` builds the bundle (its
defaults: :class:`~retrain_server.guest.GuestTrainingConfig`,
:class:`~retrain_server.counts.Decay`, :class:`~retrain_server.blend.BlendUnits`),
so the table says what baskets get; the other rows say what each change did.
Models are imported lazily (TensorFlow only when a member model is trained).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..blend import TERMS, BlendUnits, calibration_requests, score_unit, serving_weights
from ..counts import Decay
from ..data import Catalog, PurchaseLog
from .baselines import CoOccurrenceRecommender, OwnFrequentRecommender, PopularRecommender
from .protocol import Case, evaluate, held_out_cases, paired_se, split_by_time, unseen_targets
from .report import MEMBER_BLEND, SHIPPED_GUEST, SHIPPED_MEMBER, finish, row, segments
from .tuning import (
    BASKET_GRID,
    HISTORY_HALF_LIVES,
    KNOWN_GRID,
    NEIGHBOUR_GRID,
    NEIGHBOUR_KS,
    RECENCY_HALF_LIFE,
    SEED_GUEST_PARAMS,
    SEED_GUEST_TRAINING,
    STORE_GRID,
    MemberGrid,
    around,
    copurchase_counts,
    guest_recommender,
    history_counts,
    recency_resample,
    retrain_guest_copurchase,
    tune_guest,
)

_LOG = logging.getLogger(__name__)

__all__ = ["EvaluationConfig", "run_evaluation"]

#: The guest row every guest change is compared with.
GUEST_BEFORE = "guest model before this change (defaults, no decay, no recent baskets)"
#: The stand-in id for "a member the model has never seen".
_OOV = "__evaluation_unknown_member__"


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
    dataset: str = "completejourney"
    #: try the Two-Tower model trained on recency-weighted baskets (two more trainings)
    recency: bool = True
    #: fit the member reranker (:mod:`retrain_server.rerank`, the shipped settings; the number of trees
    #: chosen on validation, as the nightly job does); False: the shipped member is the blend alone
    reranker: bool = True
    #: search the reranker's settings on validation (:data:`retrain_server.rerank.GRID`) instead
    rerank_grid: bool = False
    member_config: dict[str, Any] = field(default_factory=dict)
    #: fixed choices instead of tuning (used when tune is False)
    guest_training: dict[str, Any] = field(default_factory=dict)
    guest_params: dict[str, Any] = field(default_factory=dict)
    member_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Tables:
    """What a member variant adds to the Two-Tower score: history half-life, co-purchase guest, neighbours."""

    history_half_life: float = 0.0
    co_half_life: float = 0.0
    neighbours: int = 0  # k; 0 = no neighbour term
    baskets: bool = False  # the member's own baskets with the cart (BlendUnits' half-life and size)


def run_evaluation(cfg: EvaluationConfig, *, data: Any = None,
                   work_dir: str | Path | None = None) -> dict[str, Any]:
    """The whole protocol; returns the JSON-able report.

    ``data``: an object with ``catalog``, ``log``, ``stats`` and optionally
    ``split`` (a function like :func:`~.protocol.split_last_basket`; default: by
    time, ``test_days`` / ``val_days``); loaded from ``cfg.dataset`` when None.
    """
    t_start = time.perf_counter()
    if data is None:
        from .datasets import load_dataset

        data = load_dataset(cfg.dataset, households=cfg.households, seed=cfg.seed, catalog=cfg.catalog)
    catalog, log = data.catalog, data.log
    split = getattr(data, "split", None)
    if split is not None:
        train, test, test_cutoff = split(log)
        fit, val, val_cutoff = split(train)
    else:
        train, test, test_cutoff = split_by_time(log, cfg.test_days)
        fit, val, val_cutoff = split_by_time(train, cfg.val_days)
    test_cases = held_out_cases(test, max_cases=cfg.max_test_baskets, seed=cfg.seed)
    val_cases = held_out_cases(val, max_cases=cfg.max_val_baskets, seed=cfg.seed + 1)
    train_users = set(np.unique(train.user_ids).tolist()) - {""}
    train_products = set(np.unique(train.product_ids).tolist())
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
    report: dict[str, Any] = {
        "dataset": cfg.dataset, "data": dict(data.stats),
        "split": {"kind": "last basket per member" if split is not None else "time",
                  "test_cutoff": iso(test_cutoff), "val_cutoff": iso(val_cutoff),
                  "train_rows": len(train), "test_rows": len(test), "fit_rows": len(fit),
                  "val_rows": len(val), "test_cases": len(test_cases), "val_cases": len(val_cases),
                  "test_targets_unseen_in_train": unseen_targets(test_cases, train),
                  "val_targets_unseen_in_fit": unseen_targets(val_cases, fit),
                  "test_cases_member_unknown": sum(c.user_id not in train_users for c in test_cases)},
        "config": asdict(cfg), "k": cfg.k, "shipped": {"decay": asdict(Decay()), "blend": asdict(BlendUnits())},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "timings": {}, "tuning": {}, "rows": [],
    }
    _LOG.info("split: %s", report["split"])
    k, rows, timings = cfg.k, report["rows"], report["timings"]
    seg = lambda m: segments(m, test_cases, train_users, train_products)  # noqa: E731

    # Baselines (fitted on training rows only) and the decayed favourites as a reference.
    t0 = time.perf_counter()
    popular, co_base, own = (PopularRecommender(train), CoOccurrenceRecommender(train),
                             OwnFrequentRecommender(train))
    own_decayed = OwnFrequentRecommender(train, half_life_days=Decay().history_half_life_days)
    timings["baselines_fit_seconds"] = time.perf_counter() - t0
    rows.append(row("baseline: most popular", evaluate(popular, test_cases, k=k), "baseline"))
    rows.append(row("baseline: item co-occurrence (raw counts)",
                    evaluate(co_base, test_cases, k=k, hide_user=True), "baseline"))
    rows.append(row("baseline: member's own most frequent", evaluate(own, test_cases, k=k), "baseline"))
    rows.append(row(f"reference: member's own most frequent, time-decayed "
                    f"(half-life {Decay().history_half_life_days:g} days)",
                    evaluate(own_decayed, test_cases, k=k), "reference"))

    guest_parts = _guest_rows(cfg, catalog, fit, train, val_cases, test_cases, report, seg)
    if cfg.member:
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            _member_rows(cfg, catalog, fit, train, val_cases, test_cases, report, guest_parts, Path(tmp), seg, log)
    else:
        for name in ("member: two-tower only", MEMBER_BLEND, SHIPPED_MEMBER):
            rows.append({"method": name, "hr": None, "mrr": None, "se": None, "n": 0, "kind": "member",
                         "note": "skipped (--no-member)"})

    report.update(finish(rows, comparisons=report.pop("_comparisons", [])))
    timings["total_seconds"] = time.perf_counter() - t_start
    return report


# --------------------------------------------------------------------------- guest

def _guest_rows(cfg: EvaluationConfig, catalog: Catalog, fit: PurchaseLog, train: PurchaseLog,
                val_cases: list[Case], test_cases: list[Case], report: dict[str, Any], seg: Any) -> dict[str, Any]:
    """Guest rows; returns the trained pieces the member rows reuse."""
    from agent.recommenders.guest import GuestParams

    from ..guest import GuestTrainingConfig, train_guest_model

    k, rows, timings = cfg.k, report["rows"], report["timings"]
    t0 = time.perf_counter()
    first = train_guest_model(catalog, train, GuestTrainingConfig(**cfg.guest_training))
    timings["guest_train_seconds"] = time.perf_counter() - t0
    _LOG.info("guest model trained in %.1fs", timings["guest_train_seconds"])
    counts_cache: dict[tuple[str, float], Any] = {}

    def counts(which: str, hl: float) -> Any:
        if (which, hl) not in counts_cache:
            counts_cache[(which, hl)] = copurchase_counts(fit if which == "fit" else train, catalog, hl)
        return counts_cache[(which, hl)]

    def model(which: str, config: Any, hl: float) -> Any:
        return retrain_guest_copurchase(first, fit if which == "fit" else train, config, hl, counts(which, hl))

    guest_training, guest_params = first.config, GuestParams(**cfg.guest_params)
    co_hl, best_decay = 0.0, 120.0
    if cfg.tune:
        search = replace(guest_training, co_neighbors=max(guest_training.co_neighbors, 50))
        tuned = tune_guest(model("fit", search, 0.0), val_cases, k, log=fit)
        report["tuning"]["guest"] = tuned
        guest_training = replace(guest_training, **tuned["training"])
        guest_params = replace(guest_params, **tuned["params"])
        co_hl = tuned["co_half_life_days"]
        decayed = [s for s in tuned["stage0_decay"] if s["co_half_life_days"] > 0]
        if decayed:
            best_decay = max(decayed, key=lambda s: (s["hr"], s["mrr"]))["co_half_life_days"]
    guest_training = replace(guest_training, co_neighbors=max(guest_training.co_neighbors,
                                                              guest_params.co_top_k_per_item))
    report["chosen"] = {"guest_training": asdict(guest_training), "guest_params": asdict(guest_params),
                        "co_half_life_days": co_hl}
    seed = model("train", replace(first.config, **SEED_GUEST_TRAINING), 0.0)
    rows.append(row("guest model, seed settings (partner damping 0.5, no cart damping, TF-IDF expansion)",
                    evaluate(guest_recommender(seed, GuestParams(**SEED_GUEST_PARAMS)), test_cases, k=k,
                             hide_user=True), "guest"))
    no_baskets = GuestParams(basket_weight=0.0)
    before = guest_recommender(model("train", GuestTrainingConfig(), 0.0), no_baskets)
    m_before = evaluate(before, test_cases, k=k, hide_user=True)
    rows.append(row(GUEST_BEFORE, m_before, "guest", segments=seg(m_before)))
    decayed_model = guest_recommender(model("train", GuestTrainingConfig(), best_decay), no_baskets)
    kept = "kept" if co_hl == best_decay else "not kept: no better than no decay on validation"
    rows.append(row(f"guest + co-purchase decay (half-life {best_decay:g} days)",
                    evaluate(decayed_model, test_cases, k=k, hide_user=True), "guest", kept))
    basket_knobs = {n: getattr(guest_params, n) for n in ("basket_weight", "basket_neighbours")}
    with_baskets = guest_recommender(model("train", GuestTrainingConfig(), 0.0), GuestParams(**basket_knobs))
    rows.append(row(f"guest + recent baskets alone (session kNN, weight {basket_knobs['basket_weight']:g}, "
                    f"{basket_knobs['basket_neighbours']} baskets vote)",
                    evaluate(with_baskets, test_cases, k=k, hide_user=True), "guest",
                    "kept" if basket_knobs["basket_weight"] else "not kept: no weight won on validation"))
    report.setdefault("_comparisons", []).append((rows[-1]["method"], GUEST_BEFORE))
    tuned_model = model("train", guest_training, co_hl)
    guest = guest_recommender(tuned_model, guest_params)
    rows.append(row("guest model, every knob tuned on validation", evaluate(guest, test_cases, k=k, hide_user=True),
                    "guest"))
    shipped_cfg = GuestTrainingConfig()
    shipped_hl = Decay().co_half_life_days
    shipped = guest_recommender(model("train", shipped_cfg, shipped_hl), GuestParams())
    m_shipped = evaluate(shipped, test_cases, k=k, hide_user=True)
    rows.append(row(SHIPPED_GUEST, m_shipped, "guest", segments=seg(m_shipped)))
    report["_comparisons"].append((SHIPPED_GUEST, GUEST_BEFORE))
    return {"first": first, "model": model, "tuned_config": guest_training, "tuned_params": guest_params,
            "co_hl": co_hl, "best_co_decay": best_decay, "shipped": shipped, "shipped_hl": shipped_hl}


# --------------------------------------------------------------------------- member

def _train_member(train: PurchaseLog, catalog: Catalog, cfg: EvaluationConfig,
                  out_dir: Path) -> dict[str, Any]:
    """Train the Two-Tower on ``train`` and export it into ``out_dir``; returns timings."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from ..member import MemberTrainingConfig, export_member_model, train_member_model

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
    del state
    return timings


class _MemberBuilder:
    """Member recommenders from one exported model with any tables, built the edge's way.

    The tables are written into the model's directory (``agent.layout`` names)
    and loaded by :func:`agent.registry.member_from_source`, as on a basket.
    """

    def __init__(self, root: Path, log: PurchaseLog, guest_for: Any) -> None:
        from agent.layout import MEMBER_ARRAYS, DirectorySource

        self.root, self.log, self.guest_for = root, log, guest_for
        source = DirectorySource(root)
        self.user_lookup = source.array(MEMBER_ARRAYS["user_lookup"])
        self.item_lookup = source.array(MEMBER_ARRAYS["item_lookup"])
        self._history: dict[float, Any] = {}

    def history(self, half_life: float) -> Any:
        from ..export import history_matrix

        if half_life not in self._history:
            self._history[half_life] = history_matrix(*history_counts(self.log, half_life), self.user_lookup,
                                                      self.item_lookup)
        return self._history[half_life]

    def build(self, tables: _Tables, params: dict[str, float] | None = None,
              units: BlendUnits | None = None, *, rerank: bool = False) -> Any:
        from agent.layout import MEMBER_BASKETS, MEMBER_NEIGHBOURS, DirectorySource
        from agent.registry import member_from_source

        from ..counts import days_before
        from ..export import write_basket_arrays, write_member_table, write_neighbour_arrays

        member_dir = self.root / "member_model"
        matrix = self.history(tables.history_half_life)
        from agent.layout import MEMBER_HISTORY

        write_member_table(MEMBER_HISTORY, (matrix.indptr, matrix.indices, matrix.data), member_dir)
        for path in MEMBER_NEIGHBOURS.values():
            (self.root / path).unlink(missing_ok=True)
        b = units or BlendUnits()
        if tables.neighbours:
            write_neighbour_arrays(matrix, member_dir, tables.neighbours, b.neighbour_items)
        for path in MEMBER_BASKETS.values():
            (self.root / path).unlink(missing_ok=True)
        if tables.baskets and len(self.log):
            write_basket_arrays(self.log, days_before(self.log.timestamps, int(self.log.timestamps.max())),
                                self.user_lookup, self.item_lookup, member_dir,
                                half_life_days=b.basket_half_life_days, max_baskets=b.baskets_per_member)
        weights = {**{f"{t}_weight": 0.0 for t in TERMS}, **(params or {})}
        return member_from_source(DirectorySource(self.root), self.guest_for(tables.co_half_life),
                                  {**weights, "rerank": rerank})


def _shipped_member(builder: _MemberBuilder, log: PurchaseLog, tables: _Tables,
                    units: BlendUnits) -> tuple[Any, dict[str, Any]]:
    """The member recommender the way retrain-server ships it (blend calibrated on ``log``), and its weights."""
    serving = serving_weights(builder.build(tables, units=units), log, units)
    return builder.build(tables, {f"{t}_weight": serving[f"{t}_weight"] for t in TERMS}, units=units), serving


def _shipped_member_row(cfg: EvaluationConfig, val_b: _MemberBuilder, tb: _MemberBuilder, fit: PurchaseLog,
                        train: PurchaseLog, log: PurchaseLog, val_cases: list[Case], test_cases: list[Case],
                        tables: _Tables, units: BlendUnits, serving: dict[str, Any], blend: Any, guest: Any,
                        report: dict[str, Any], seg: Any) -> None:
    """The member model as shipped: the blend's best candidates reordered by trees (:mod:`retrain_server.rerank`)
    fitted on the validation month, written into the bundle and loaded as a basket loads them.

    The validation side is the shipped blend built the shipped way on the months before it; members the
    model does not know get the guest model, as agents do. Too few validation cases: no reranker, and the
    blend is what ships (as in the nightly job). The reranker's statistics are rebuilt every night on a
    basket, so each case (validation and test) reads them as of its own day; the rest of the model stays
    as trained, as in every other row.
    """
    from ..rerank import (
        GRID,
        RerankConfig,
        StatsHistory,
        fit_reranker,
        member_stats,
        remove_reranker,
        trees_to_onnx,
        write_reranker,
    )

    t0 = time.perf_counter()
    rcfg = RerankConfig(grid=GRID if cfg.rerank_grid else {}, seed=cfg.seed)
    member = blend
    try:
        if not cfg.reranker:
            raise ValueError("not fitted (--no-reranker)")
        val_member, _ = _shipped_member(val_b, fit, tables, units)
        model, info = fit_reranker(val_member, StatsHistory(train, val_b.user_lookup, val_b.item_lookup),
                                   val_cases, rcfg, k=cfg.k)
    except ValueError as exc:  # too few validation cases (a small sample of households)
        _LOG.warning("no reranker: %s", exc)
        report["tuning"]["reranker"] = {"skipped": str(exc)}
    else:
        member_dir = tb.root / "member_model"
        write_reranker(member_dir, trees_to_onnx(model), member_stats(train, tb.user_lookup, tb.item_lookup),
                       rcfg, info)
        member = tb.build(tables, {f"{t}_weight": serving[f"{t}_weight"] for t in TERMS}, units=units, rerank=True)
        remove_reranker(member_dir)
        assert member.reranker_ is not None
        report["tuning"]["reranker"] = info
    daily = StatsHistory(log, tb.user_lookup, tb.item_lookup)

    def as_agents_answer(request: Any, case: Case) -> list[str]:
        """Members the model was not trained on get the guest model (agent.registry.ModelSnapshot); the
        reranker reads the statistics a basket would have that day."""
        if not member.knows_user(request.user_id):
            return guest.recommend(request)
        return member.with_rerank_stats(daily.for_case(case)).recommend(request) \
            if member.reranker_ is not None else member.recommend(request)

    m = evaluate(as_agents_answer, test_cases, k=cfg.k, with_case=True)
    report["rows"].append(row(SHIPPED_MEMBER, m, "member", segments=seg(m)))
    report.setdefault("_comparisons", []).append((SHIPPED_MEMBER, MEMBER_BLEND))
    report["timings"]["reranker_seconds"] = time.perf_counter() - t0


def _member_rows(cfg: EvaluationConfig, catalog: Catalog, fit: PurchaseLog, train: PurchaseLog,
                 val_cases: list[Case], test_cases: list[Case], report: dict[str, Any], guest: dict[str, Any],
                 tmp: Path, seg: Any, log: PurchaseLog) -> None:
    from agent.recommenders.guest import GuestParams

    from ..guest import GuestTrainingConfig

    k, rows, timings, tuning = cfg.k, report["rows"], report["timings"], report["tuning"]
    shipped_decay, shipped_units = Decay(), BlendUnits()

    def guest_for(which: str) -> Any:
        """The guest recommender the co-purchase term reads, per co-purchase half-life (shipped knobs)."""
        cache: dict[float, Any] = {}

        def get(hl: float) -> Any:
            if hl not in cache:
                cache[hl] = guest_recommender(guest["model"](which, GuestTrainingConfig(), hl), GuestParams())
            return cache[hl]
        return get

    # --- the two-tower models: on the fit months (validation) and on every training month (test)
    models = {"val": (fit, tmp / "val"), "test": (train, tmp / "test")}
    if cfg.recency:
        models["val_recency"] = (recency_resample(fit, RECENCY_HALF_LIFE, cfg.seed), tmp / "val_recency")
        models["test_recency"] = (recency_resample(train, RECENCY_HALF_LIFE, cfg.seed), tmp / "test_recency")
    for name, (lg, root) in models.items():
        timings[f"member_{name}"] = _train_member(lg, catalog, cfg, root / "member_model")
    timings["member"] = timings["member_test"]
    builders = {name: _MemberBuilder(root, fit if name.startswith("val") else train,
                                     guest_for("fit" if name.startswith("val") else "train"))
                for name, (_, root) in models.items()}

    # --- validation: every variant's blend weights; half-life, neighbours and recency chosen here
    before = _Tables()
    co_decay = guest["best_co_decay"]
    variants: dict[str, _Tables] = {"before": before}
    for hl in HISTORY_HALF_LIVES:
        variants[f"history {hl:g}"] = _Tables(history_half_life=hl)
    variants[f"co {co_decay:g}"] = _Tables(co_half_life=co_decay)
    val_b = builders["val"]
    unit_val = score_unit(val_b.build(before), calibration_requests(fit))
    chosen: dict[str, Any] = {}
    t0 = time.perf_counter()
    grid = MemberGrid(val_b.build(before), val_cases, k, {n: val_b.build(t) for n, t in variants.items()})
    results = {n: grid.search(n, unit_val) for n in variants}
    best_hl = max(HISTORY_HALF_LIVES, key=lambda hl: (results[f"history {hl:g}"]["val_hr"],
                                                      results[f"history {hl:g}"]["val_mrr"]))
    kept = _Tables(history_half_life=best_hl, co_half_life=guest["co_hl"])
    # Neighbours: k chosen with the kept tables; alone = on the undecayed history.
    nb_variants = {f"neighbours k={kk}": replace(kept, neighbours=kk) for kk in NEIGHBOUR_KS}
    nb_grid = MemberGrid(val_b.build(before), val_cases, k,
                         {"kept": val_b.build(kept), **{n: val_b.build(t) for n, t in nb_variants.items()}})
    results["kept"] = nb_grid.search("kept", unit_val)

    def local(name: str, grid: MemberGrid, center: dict[str, Any]) -> dict[str, Any]:
        u = center["units"]
        return grid.search(name, unit_val, repeat=around(u["repeat_units"]), co=around(u["co_units"]),
                           neighbours=NEIGHBOUR_GRID)

    for n in nb_variants:
        results[n] = local(n, nb_grid, results["kept"])
    best_nb = max(NEIGHBOUR_KS, key=lambda kk: (results[f"neighbours k={kk}"]["val_hr"],
                                                results[f"neighbours k={kk}"]["val_mrr"]))
    nb_gain = results[f"neighbours k={best_nb}"]["val_hr"] - results["kept"]["val_hr"]
    nb_se = paired_se(results[f"neighbours k={best_nb}"]["hits"], results["kept"]["hits"])
    keep_nb = nb_gain > nb_se and results[f"neighbours k={best_nb}"]["units"]["neighbour_units"] > 0
    alone_nb = _Tables(neighbours=best_nb)
    nb_alone_grid = MemberGrid(val_b.build(before), val_cases, k, {"alone": val_b.build(alone_nb)})
    results["neighbours alone"] = local("alone", nb_alone_grid, results["before"])
    if keep_nb:
        kept = replace(kept, neighbours=best_nb)
    kept_name = f"neighbours k={best_nb}" if keep_nb else "kept"
    # Two-Tower recency: the same kept tables on the model trained on resampled baskets.
    keep_recency, rec_results = False, {}
    if cfg.recency:
        rb = builders["val_recency"]
        unit_rec = score_unit(rb.build(before), calibration_requests(fit))
        rgrid = MemberGrid(rb.build(before), val_cases, k, {"before": rb.build(before), "kept": rb.build(kept)})
        rec_results = {n: rgrid.search(n, unit_rec) for n in ("before", "kept")}
        if kept.neighbours:
            u = results[kept_name]["units"]
            rec_results["kept"] = rgrid.search("kept", unit_rec, repeat=around(u["repeat_units"]),
                                               co=around(u["co_units"]), neighbours=NEIGHBOUR_GRID)
        gain = rec_results["kept"]["val_hr"] - results[kept_name]["val_hr"]
        keep_recency = gain > paired_se(rec_results["kept"]["hits"], results[kept_name]["hits"])
    # The member's own baskets with the cart and the "bought before" bonus, on top of the kept tables
    # (weights searched near the kept ones; each kept only when it beats them by a paired SE).
    u_kept = results[kept_name]["units"]
    with_baskets = replace(kept, baskets=True)
    own_grid = MemberGrid(val_b.build(before), val_cases, k,
                          {"kept": val_b.build(kept), "baskets": val_b.build(with_baskets)})

    def own_search(variant: str, known: tuple[float, ...], basket: tuple[float, ...]) -> dict[str, Any]:
        return own_grid.search(variant, unit_val, repeat=around(u_kept["repeat_units"]),
                               co=around(u_kept["co_units"]), neighbours=(u_kept["neighbour_units"],),
                               known=known, basket=basket)

    results["known"] = own_search("kept", KNOWN_GRID, (0.0,))
    results["baskets"] = own_search("baskets", (0.0,), BASKET_GRID)
    results["known + baskets"] = own_search("baskets", KNOWN_GRID, BASKET_GRID)
    own_gains = {n: (results[n]["val_hr"] - results[kept_name]["val_hr"],
                     paired_se(results[n]["hits"], results[kept_name]["hits"]))
                 for n in ("known", "baskets", "known + baskets")}
    # Nested choice, simplest first: one term must beat the kept tables by a paired SE, and both
    # terms must beat that one term by a paired SE (a 270-combination search fits noise otherwise).
    singles = [n for n in ("known", "baskets") if own_gains[n][0] > own_gains[n][1]]
    final_name = max(singles, key=lambda n: (results[n]["val_hr"], results[n]["val_mrr"])) if singles else kept_name
    both = results["known + baskets"]
    if both["val_hr"] - results[final_name]["val_hr"] > paired_se(both["hits"], results[final_name]["hits"]):
        final_name = "known + baskets"
    # The store's recent baskets most like the cart (the guest model's session kNN, which lifted guests
    # by a sixth) on top of what was kept: kept only when it beats that by a paired SE.
    uf = results[final_name]["units"]
    results["store"] = own_grid.search("baskets" if uf["basket_units"] else "kept", unit_val,
                                       repeat=around(uf["repeat_units"]), co=around(uf["co_units"]),
                                       neighbours=(uf["neighbour_units"],), known=(uf["known_units"],),
                                       basket=around(uf["basket_units"], BASKET_GRID) if uf["basket_units"]
                                       else (0.0,), store=STORE_GRID)
    own_gains["store"] = (results["store"]["val_hr"] - results[final_name]["val_hr"],
                          paired_se(results["store"]["hits"], results[final_name]["hits"]))
    keep_store = own_gains["store"][0] > own_gains["store"][1] and results["store"]["units"]["store_units"] > 0
    store_base = final_name
    if keep_store:
        final_name = "store"
    final_tables = with_baskets if results[final_name]["units"]["basket_units"] else kept
    timings["member_tuning_seconds"] = time.perf_counter() - t0
    strip = lambda r: {k2: v for k2, v in r.items() if k2 not in ("hits", "grid")}  # noqa: E731
    tuning["member"] = {"score_unit": unit_val, "variants": {n: strip(r) for n, r in results.items()},
                        "recency": {n: strip(r) for n, r in rec_results.items()},
                        "history_half_life_days": best_hl, "neighbours": {
                            "best_k": best_nb, "val_gain": nb_gain, "paired_se": nb_se, "kept": keep_nb},
                        "recency_kept": keep_recency, "grids": {n: r["grid"] for n, r in results.items()},
                        "own_terms": {n: {"val_gain": g, "paired_se": se} for n, (g, se) in own_gains.items()}}
    chosen.update(history_half_life_days=best_hl, co_half_life_days=guest["co_hl"],
                  neighbours=best_nb if keep_nb else 0, two_tower_recency=keep_recency,
                  baskets=final_tables.baskets, units=results[final_name]["units"])
    report["chosen"]["member"] = chosen
    _LOG.info("member choices on validation: %s", chosen)

    # --- test rows: each variant with its validation weights, on the model trained on every month
    tb = builders["test"]
    unit_test = score_unit(tb.build(before), calibration_requests(train))
    report["chosen"]["member"]["score_unit_test"] = unit_test

    def weights(units: dict[str, float], unit: float) -> dict[str, float]:
        return {f"{t}_weight": units.get(f"{t}_units", 0.0) * unit for t in TERMS}

    def test_row(name: str, builder: _MemberBuilder, tables: _Tables, units: dict[str, float], unit: float,
                 note: str = "", **extra: Any) -> Any:
        rec = builder.build(tables, weights(units, unit))
        m = evaluate(rec, test_cases, k=k)
        rows.append(row(name, m, "member", note, units=units, **extra))
        return rec, m

    pure = tb.build(before)
    rows.append(row("member: two-tower only", evaluate(pure, test_cases, k=k), "member"))
    _, m_before = test_row("member before decay (two-tower + own history + co-purchase, weights tuned on validation)",
                           tb, before, results["before"]["units"], unit_test)
    rows[-1]["segments"] = seg(m_before)
    before_name = rows[-1]["method"]
    comparisons = report.setdefault("_comparisons", [])
    h = f"history {best_hl:g}"
    test_row(f"member + history decay alone (half-life {best_hl:g} days)", tb, variants[h], results[h]["units"],
             unit_test, "kept" if best_hl else "not kept: no decay was best on validation")
    comparisons.append((rows[-1]["method"], before_name))
    h_row = rows[-1]["method"]
    c = f"co {co_decay:g}"
    test_row(f"member + co-purchase decay alone (half-life {co_decay:g} days)", tb, variants[c], results[c]["units"],
             unit_test, "kept" if guest["co_hl"] == co_decay else "not kept (chosen on guest validation)")
    comparisons.append((rows[-1]["method"], before_name))
    test_row(f"member + neighbours alone (TIFU-KNN, k={best_nb})", tb, alone_nb,
             results["neighbours alone"]["units"], unit_test,
             "kept" if keep_nb else f"not kept: validation gain {nb_gain:+.4f} <= paired SE {nb_se:.4f}")
    comparisons.append((rows[-1]["method"], before_name))
    if cfg.recency:
        rtb = builders["test_recency"]
        unit_rtest = score_unit(rtb.build(before), calibration_requests(train))
        test_row(f"member + Two-Tower recency weights alone (half-life {RECENCY_HALF_LIFE:g} days)", rtb, before,
                 rec_results["before"]["units"], unit_rtest, "kept" if keep_recency else "not kept on validation")
        comparisons.append((rows[-1]["method"], before_name))
    own_names = {"known": "member + bought-before bonus (on the history decay)",
                 "baskets": "member + own baskets with the cart (on the history decay)"}
    for n, label in own_names.items():
        test_row(label, tb, with_baskets if n == "baskets" else kept, results[n]["units"], unit_test,
                 "kept" if n in store_base else
                 f"not kept: validation gain {own_gains[n][0]:+.4f} vs paired SE {own_gains[n][1]:.4f}")
        comparisons.append((rows[-1]["method"], h_row))
    base_tables = with_baskets if results[store_base]["units"]["basket_units"] else kept
    test_row("member, the terms kept before the store's baskets (test reference)", tb, base_tables,
             results[store_base]["units"], unit_test)
    base_row = rows[-1]["method"]
    test_row("member + the store's recent baskets with the cart (session kNN, on the kept terms)", tb, base_tables,
             results["store"]["units"], unit_test,
             "kept" if keep_store else
             f"not kept: validation gain {own_gains['store'][0]:+.4f} vs paired SE {own_gains['store'][1]:.4f}")
    comparisons.append((rows[-1]["method"], base_row))
    every = _Tables(history_half_life=best_hl or 60.0, co_half_life=co_decay, neighbours=best_nb, baskets=True)
    every_grid = MemberGrid(val_b.build(before), val_cases, k, {"every": val_b.build(every)})
    u_h = results[f"history {best_hl:g}"]["units"]
    every_units = every_grid.search("every", unit_val, repeat=around(u_h["repeat_units"]),
                                    co=around(u_h["co_units"]), neighbours=NEIGHBOUR_GRID,
                                    known=around(results[final_name]["units"]["known_units"], KNOWN_GRID),
                                    basket=around(results[final_name]["units"]["basket_units"] or 3.0,
                                                  BASKET_GRID),
                                    store=around(results["store"]["units"]["store_units"] or 10.0,
                                                 STORE_GRID))["units"]
    test_row("member, every change together (decays, neighbours, own and store baskets, bought-before; "
             "base Two-Tower)", tb, every, every_units, unit_test)
    comparisons.append((rows[-1]["method"], before_name))
    kept_builder = builders["test_recency"] if keep_recency else tb
    kept_units = {**(rec_results["kept"] if keep_recency else results[kept_name])["units"],
                  **{n: results[final_name]["units"][n] for n in ("known_units", "basket_units", "store_units")}}
    kept_unit = score_unit(kept_builder.build(before), calibration_requests(train)) if keep_recency else unit_test
    test_row("member, the changes kept on validation, weights tuned on validation", kept_builder, final_tables,
             kept_units, kept_unit)
    # --- as shipped: retrain-server train's defaults (the chosen ones, once written into the code)
    shipped_tables = _Tables(history_half_life=shipped_decay.history_half_life_days,
                             co_half_life=shipped_decay.co_half_life_days,
                             neighbours=shipped_units.neighbours if shipped_units.neighbour_units else 0,
                             baskets=bool(shipped_units.basket_units))
    shipped, serving = _shipped_member(tb, train, shipped_tables, shipped_units)

    def blend_answer(request: Any) -> list[str]:
        """Members the model was not trained on get the guest model (agent.registry.ModelSnapshot)."""
        return (shipped if shipped.knows_user(request.user_id) else guest["shipped"]).recommend(request)

    m_blend = evaluate(blend_answer, test_cases, k=k)
    rows.append(row(MEMBER_BLEND, m_blend, "member", segments=seg(m_blend)))
    report["chosen"]["shipped_member_serving"] = serving
    comparisons.append((MEMBER_BLEND, before_name))
    _shipped_member_row(cfg, val_b, tb, fit, train, log, val_cases, test_cases, shipped_tables, shipped_units,
                        serving, shipped, guest["shipped"], report, seg)
    comparisons.append((SHIPPED_MEMBER, "baseline: member's own most frequent"))
    rows.append(row("unknown member -> member model, unknown-user row, no blend",
                    evaluate(pure, test_cases, k=k, hide_user=True, user_id=_OOV), "fallback"))
    before_rec = tb.build(before, weights(results["before"]["units"], unit_test))
    rows.append(row("unknown member -> member model before decay, unknown-user row + blend",
                    evaluate(before_rec, test_cases, k=k, hide_user=True, user_id=_OOV), "fallback"))
    rows.append(row("unknown member -> member model as shipped, unknown-user row + blend",
                    evaluate(shipped, test_cases, k=k, hide_user=True, user_id=_OOV), "fallback"))
    comparisons.append(("unknown member -> member model as shipped, unknown-user row + blend",
                        "unknown member -> member model before decay, unknown-user row + blend"))
    rows.append(row("unknown member -> guest model as shipped",
                    evaluate(guest["shipped"], test_cases, k=k, hide_user=True), "fallback"))
    for root in {r for _, r in models.values()}:
        shutil.rmtree(root, ignore_errors=True)

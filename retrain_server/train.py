"""Full training: the seed's files in, a signed parameters directory out.

``retrain-server train`` and the demo call :func:`train_bundle`; the steps
themselves live in :mod:`.guest`, :mod:`.member`, :mod:`.blend` and
:mod:`.export`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent import layout
from agent.layout import DirectorySource

from .blend import BlendUnits
from .counts import Counts, Decay, days_before
from .data import Catalog, PurchaseLog, load_products, load_purchases
from .export import (
    write_basket_arrays,
    write_history_arrays,
    write_member_history,
    write_neighbour_arrays,
    write_parameters,
)
from .guest import GuestModel, GuestTrainingConfig, build_guest_model, recent_basket_arrays
from .rerank import FittedReranker, RerankConfig, fit_on_history, member_stats, write_reranker

#: days of purchases the member reranker learns from (``retrain-server train --rerank-days``,
#: ``training.rerank_days``); at most a quarter of the data's span
DEFAULT_RERANK_DAYS = 30.0

_LOG = logging.getLogger(__name__)

__all__ = ["train_bundle", "member_writer", "state_writer", "kept_serving", "default_checkpoint_dir", "decayed_counts",
           "reranker_for", "DEFAULT_RERANK_DAYS"]


def default_checkpoint_dir(out: Path) -> Path:
    """Where the server keeps the member model's TF checkpoint: beside the bundle, not in it."""
    return out.with_name(out.name + ".checkpoint")


def decayed_counts(log: PurchaseLog, decay: Decay | None = None) -> Counts:
    """The log's counts as of its newest purchase, time-decayed like the nightly job's (whole days)."""
    decay = decay or Decay()
    if not len(log):
        return Counts.empty()
    return Counts.empty().add(log, ages=days_before(log.timestamps, int(log.timestamps.max())), decay=decay)


def train_bundle(products: Path, purchases: Path, out: Path, signing_key: Path | None, *,
                 member: bool = True, epochs: int | None = None,
                 guest_config: GuestTrainingConfig | None = None,
                 member_config: Any = None, checkpoint_dir: Path | None = None,
                 decay: Decay | None = None, rerank_days: float = DEFAULT_RERANK_DAYS) -> dict[str, Any]:
    """Train both models from ``products.csv`` + ``purchase_history.jsonl`` into ``out``.

    Co-purchase counts and member histories are time-decayed (``decay``, default
    :class:`Decay`'s half-lives) as of the newest purchase, as the nightly job
    keeps them. The member model's TF checkpoint (for fine-tuning) goes to
    ``checkpoint_dir`` (default ``OUT.checkpoint``), outside the bundle the
    baskets download. The member reranker learns from the last ``rerank_days``
    (:func:`reranker_for`; 0: none).
    """
    catalog = load_products(products)
    log = load_purchases(purchases)
    t0 = time.perf_counter()
    counts = decayed_counts(log, decay)
    guest = build_guest_model(catalog, *counts.for_catalog(catalog), guest_config)
    guest.baskets = recent_basket_arrays(log, catalog.ids, max_baskets=guest.config.recent_baskets,
                                         postings_per_item=guest.config.basket_postings)
    timings = {"guest_train_s": round(time.perf_counter() - t0, 2)}
    writer = None
    if member:
        if not (log.user_ids != "").any():
            _LOG.warning("no member purchases: shipping the guest model only")
        else:
            reranker = reranker_for(log, catalog, rerank_days, guest_config=guest_config, decay=decay,
                                    member_config=_member_config(member_config, epochs), timings=timings)
            writer = member_writer(catalog, log, guest, epochs=epochs, config=member_config, timings=timings,
                                   checkpoint_dir=checkpoint_dir or default_checkpoint_dir(Path(out)),
                                   history=counts.history_triples(), reranker=reranker)
    return write_parameters(out, guest, member_writer=writer, metrics={"timings": timings},
                            signing_key=signing_key)


def _member_config(config: Any, epochs: int | None) -> Any:
    from . import member as member_mod  # TensorFlow: only when a member model is trained

    cfg = config or member_mod.MemberTrainingConfig()
    return dataclasses.replace(cfg, epochs=epochs) if epochs is not None else cfg


def reranker_for(log: PurchaseLog, catalog: Catalog, days: float, *, guest_config: Any = None,
                 decay: Decay | None = None, member_config: Any = None,
                 timings: dict[str, Any] | None = None) -> FittedReranker | None:
    """The member reranker for a model trained on ``log`` (:func:`retrain_server.rerank.fit_on_history`),
    or None when ``days`` is 0 or there is too little to learn from (the blend alone then ranks)."""
    if days <= 0:
        return None
    t0 = time.perf_counter()
    cfg = RerankConfig()
    try:
        trees, info = fit_on_history(log, catalog, cfg, days=days, guest_config=guest_config, decay=decay,
                                     member_config=member_config)
    except ValueError as exc:
        _LOG.warning("no member reranker: %s", exc)
        return None
    except Exception as exc:  # optional: a failed fit ships the blend alone, it never stops a training
        _LOG.exception("no member reranker: fitting failed (%s)", exc)
        return None
    finally:
        if timings is not None:
            timings["rerank_fit_s"] = round(time.perf_counter() - t0, 2)
    _LOG.info("member reranker: %d trees from %d baskets of the last %.1f days", info["chosen"]["trees"],
              info["baskets_learned"], info["window_days"])
    return FittedReranker(trees, cfg, info)


def member_writer(catalog: Catalog, log: PurchaseLog, guest: GuestModel, *, epochs: int | None = None,
                  config: Any = None, timings: dict[str, float] | None = None,
                  checkpoint_dir: Path | None = None,
                  history: tuple[Any, Any, Any] | None = None,
                  reranker: FittedReranker | None = None) -> Callable[[Path], dict[str, Any]]:
    """Train the Two-Tower model now; return the function that writes ``member_model/``."""
    from . import member as member_mod  # TensorFlow: only when a member model is trained

    cfg = _member_config(config, epochs)
    t0 = time.perf_counter()
    state = member_mod.train_member_model(log, catalog.ids.tolist(), cfg)
    if timings is not None:
        timings["member_train_s"] = round(time.perf_counter() - t0, 2)
    if checkpoint_dir is not None:
        member_mod.save_checkpoint(state, checkpoint_dir)
        _LOG.info("member checkpoint (for fine-tuning) in %s", checkpoint_dir)

    return state_writer(state, guest, calibration_log=log, history=history, reranker=reranker)


def state_writer(state: Any, guest: GuestModel, *, calibration_log: PurchaseLog,
                 history: tuple[Any, Any, Any] | None = None,
                 fallback_serving: dict[str, Any] | None = None,
                 units: BlendUnits | None = None,
                 baskets: tuple[PurchaseLog, Any] | None = None,
                 reranker: FittedReranker | None = None,
                 stats_log: PurchaseLog | None = None) -> Callable[[Path], dict[str, Any]]:
    """The function that exports a trained member ``state`` into ``member_model/``.

    ``history`` is (member ids, product ids, counts) for the repeat-purchase
    tables (the decayed counts); None takes plain counts from ``calibration_log``.
    The neighbour and basket tables are written when ``units`` give their term a
    weight; ``baskets`` is (purchases, age in days per row) for the basket table
    (None: ``calibration_log`` aged from its newest row). Blend weights
    are calibrated on ``calibration_log``'s members; when it has none,
    ``fallback_serving`` (the previous version's weights) is kept. ``reranker``
    is shipped with statistics from ``stats_log`` (None: ``calibration_log``):
    every purchase the member model may know about.
    """
    from . import member as member_mod

    units = units or BlendUnits()

    def write(member_dir: Path) -> dict[str, Any]:
        member_mod.export_member_model(state, member_dir)
        source = DirectorySource(member_dir.parent)
        user_lookup = source.array(layout.MEMBER_ARRAYS["user_lookup"])
        item_lookup = source.array(layout.MEMBER_ARRAYS["item_lookup"])
        if history is None:
            matrix = write_member_history(calibration_log, user_lookup, item_lookup, member_dir)
        else:
            matrix = write_history_arrays(*history, user_lookup, item_lookup, member_dir)
        if units.neighbour_units:
            write_neighbour_arrays(matrix, member_dir, units.neighbours, units.neighbour_items)
        if units.basket_units:
            recent, ages = baskets if baskets is not None else (
                calibration_log, days_before(calibration_log.timestamps, int(calibration_log.timestamps.max()))
                if len(calibration_log) else np.zeros(0, np.int64))
            write_basket_arrays(recent, ages, user_lookup, item_lookup, member_dir,
                                half_life_days=units.basket_half_life_days, max_baskets=units.baskets_per_member)
        if fallback_serving and not (calibration_log.user_ids != "").any():
            serving = kept_serving(fallback_serving, units)
        else:
            serving = _calibrate(member_dir, calibration_log, guest, units)
        meta_path = member_dir / Path(layout.MEMBER_META).name
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
        meta["serving"] = serving
        meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        described = {"n_users": int(len(user_lookup)), "n_items": int(len(item_lookup)),
                     "epochs": state.config.epochs, "serving": serving}
        if reranker is not None:
            stats = member_stats(stats_log if stats_log is not None else calibration_log, user_lookup, item_lookup)
            write_reranker(member_dir, reranker.trees, stats, reranker.config, reranker.info)
            described["rerank"] = {"trees": reranker.info["chosen"]["trees"],
                                   "candidates": reranker.config.candidates}
        return described

    return write


def kept_serving(previous: dict[str, Any], units: BlendUnits) -> dict[str, Any]:
    """The previous version's blend weights, with any term it predates weighted from ``units`` and its score unit.

    A night without member purchases cannot calibrate, so the published weights
    are kept; a term added since (e.g. ``basket_weight``) would otherwise load as
    0 and its table ship unused, and a term whose units changed since (the store
    term went from 0 to 30) would keep the old units until a night that calibrates.
    A weight recorded without its units is kept as it is.
    """
    from .blend import TERMS

    serving = dict(previous)
    unit = float(serving.get("score_unit") or 0.0)
    for term in TERMS:
        recorded = serving.get(f"{term}_units")
        if f"{term}_weight" not in serving or (recorded is not None
                                               and recorded != getattr(units, f"{term}_units")):
            serving[f"{term}_units"] = getattr(units, f"{term}_units")
            serving[f"{term}_weight"] = round(serving[f"{term}_units"] * unit, 6)
    return serving


def _calibrate(member_dir: Path, log: PurchaseLog, guest: GuestModel, units: BlendUnits) -> dict[str, float]:
    """Blend weights for the exported (int8) model, exactly as the edge will load it.

    ``member_dir`` sits in the parameters directory being written, beside the
    already written ``guest_model/``; the recommenders are built the edge's way.
    """
    from agent.registry import guest_from_source, member_from_source

    from .blend import TERMS, serving_weights

    source = DirectorySource(member_dir.parent)
    rec = member_from_source(source, guest_from_source(source), {f"{t}_weight": 0.0 for t in TERMS})
    if rec is None:
        raise RuntimeError(f"member model files missing in {member_dir}")
    return serving_weights(rec, log, units)

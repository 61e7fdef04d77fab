"""Immutable model snapshots and the one reference that is swapped.

A :class:`ModelSnapshot` holds everything needed to answer a request (guest
model, optional member model, product names, version). It is built fully and
smoke-tested *before* :meth:`ModelRegistry.swap` replaces the current
reference, so a failed load never disturbs the snapshot that is serving.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .bundle import verify_parameters
from .errors import BundleError
from .recommenders.base import RecommendRequest
from .recommenders.features import index_rows
from .recommenders.guest import CoPartners, GuestParams, GuestRecommender, RecentBaskets
from .recommenders.member import MemberBaskets, MemberHistory, MemberParams, MemberRecommender, ScoreParts
from .recommenders.rerank import FEATURES, MemberStats, TreeReranker

_LOG = logging.getLogger(__name__)

__all__ = ["Recommendation", "ModelSnapshot", "ModelRegistry", "ProductNames", "load_snapshot",
           "snapshot_from_source", "guest_from_source", "member_from_source"]

class ProductNames(Mapping[str, str]):
    """id -> display name over the guest model's index and a names array (no second dict)."""

    def __init__(self, index: Mapping[str, int], names: np.ndarray) -> None:
        if len(names) != len(index):
            raise BundleError("item_names.npy and item_ids.npy differ in length")
        if names.dtype.kind != "U":  # names go into JSON answers as text
            raise BundleError(f"item_names.npy must hold text (numpy unicode), not {names.dtype}")
        self._index, self._names = index, names

    def __getitem__(self, product_id: str) -> str:
        return str(self._names[self._index[product_id]])

    def get(self, product_id: str, default: Any = None) -> Any:  # Mapping.get's try/except is slower
        i = self._index.get(product_id)
        return default if i is None else str(self._names[i])

    def names_at(self, rows: np.ndarray) -> list[str]:
        """Display names of rows of the index this was made over (the guest model's item indices)."""
        return self._names[rows].tolist()

    def indexes(self, index: Mapping[str, int]) -> bool:
        """Whether rows of ``index`` are rows here (names_at may be given its indices)."""
        return index is self._index

    def names_of(self, product_ids: Sequence[str]) -> list[str]:
        """Display names of known ids (unknown ids name themselves), in one array lookup."""
        if not product_ids or not len(self._names):
            return list(product_ids)
        idx = index_rows(self._index, product_ids, known_only=False)
        names = self._names[idx].tolist()  # -1 (unknown) reads the last name: replaced below
        return [n if i >= 0 else p for n, i, p in zip(names, idx.tolist(), product_ids)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


@dataclass(frozen=True)
class Recommendation:
    """What a snapshot answers: ids best first, which model, which version."""

    ids: list[str]
    model: str  # "guest" | "member"
    version: str
    unknown: list[str] = field(default_factory=list)
    #: the guest model's item indices of ``ids`` when it answered (ModelSnapshot.names_for reads names by row)
    rows: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ModelSnapshot:
    """One loaded, verified set of models. Never mutated after construction."""

    version: str
    guest: GuestRecommender
    member: MemberRecommender | None = None
    names: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    #: model -> the version it was trained in, when not this one (a nightly run that kept the
    #: published member model beside a new guest model ships it under the new version)
    origins: Mapping[str, str] = field(default_factory=dict)

    @property
    def model_versions(self) -> dict[str, str | None]:
        """Which version each model was trained in (the agent's status and ``/health``)."""
        return {"guest": self.origins.get("guest", self.version),
                "member": self.origins.get("member", self.version) if self.member else None}

    def recommend(self, request: RecommendRequest) -> Recommendation:
        """Members the member model knows go to it; everyone else (guests, members it has not seen yet) to
        the guest model, which answers them better (README, "Evaluation": 0.133 vs 0.115 HR@10 for
        unknown members on Complete Journey, 0.293 vs 0.221 on Instacart)."""
        g = self.guest
        if request.user_id is not None and self.member is not None and self.member.knows_user(request.user_id):
            unknown = g.unknown_ids(request.cart + request.wishlist)
            return Recommendation(self.member.recommend(request), "member", self.version, unknown)
        rows, unknown = g.recommend_indices_and_unknown(request)
        return Recommendation(g.item_ids_[rows].tolist(), "guest", self.version, unknown, rows)

    def names_for(self, rec: Recommendation) -> list[str]:
        """Display names of ``rec.ids``: by row when the guest model answered (its rows are the names'
        rows; no second lookup by id, ~15 us an answer), else :meth:`names_of`."""
        names = self.names
        if rec.rows is not None and isinstance(names, ProductNames) and names.indexes(self.guest.index_):
            return names.names_at(rec.rows)
        return self.names_of(rec.ids)

    def name(self, product_id: str) -> str:
        return self.names.get(product_id, product_id)

    def names_of(self, product_ids: Sequence[str]) -> list[str]:
        """Display names for ``product_ids`` (an id without a name stands for itself)."""
        if isinstance(self.names, ProductNames):
            return self.names.names_of(product_ids)
        return [self.names.get(p, p) for p in product_ids]

    def smoke_test(self) -> None:
        """Ask every model once; raises BundleError when an answer is malformed."""
        probe = self.guest.item_ids_[:2].tolist()
        requests = [RecommendRequest(cart=tuple(probe), top_k=5)]
        if self.member is not None:
            # a member the model knows (row 0 is nobody's), so the blend and its reranker both answer once
            user = next((u for u, row in self.member.user_index_.items() if row > 0 and u), "smoke")
            requests.append(RecommendRequest(cart=tuple(probe), top_k=5, user_id=user))
        for req in requests:
            try:
                rec = self.recommend(req)
            except Exception as exc:  # any failure here means "do not swap in"
                raise BundleError(f"smoke recommendation failed: {exc!r}") from exc
            if len(rec.ids) != min(5, self.guest.n_items - len(probe)) or set(rec.ids) & set(probe):
                raise BundleError(f"smoke recommendation malformed: {rec.ids}")


def load_snapshot(root: str | Path, public_key: Any | None, *, allow_unsigned: bool = False,
                  guest_params: GuestParams | None = None,
                  member_overrides: Mapping[str, Any] | None = None, map_files: bool = False) -> ModelSnapshot:
    """Verify ``root`` (signature + hashes), then load and smoke-test its models.

    The member model's serving weights come from its ``member_meta.json``;
    ``member_overrides`` (MemberParams field -> value, None = keep) replace some.
    ``map_files``: ``root`` is a version the agent's store installed (never rewritten):
    its arrays are served from memory mappings (:mod:`agent.bundle`).
    """
    manifest = verify_parameters(root, public_key, allow_unsigned=allow_unsigned, map_files=map_files)
    origins = {name: d["version"] for name, d in manifest.models.items()
               if isinstance(d, Mapping) and isinstance(d.get("version"), str)}
    snap = snapshot_from_source(manifest, manifest.version, guest_params=guest_params,
                                member_overrides=member_overrides, metrics=manifest.metrics, origins=origins)
    manifest.forget_pages()
    _LOG.info("loaded models %s from %s (guest: %d items, member: %s, signed: %s, %d files mapped)",
              manifest.version, root, snap.guest.n_items,
              f"{len(snap.member.item_ids_)} items" if snap.member else "absent", manifest.signed,
              len(manifest.mapped))
    return snap


def snapshot_from_source(source: layout.Source, version: str, *, guest_params: GuestParams | None = None,
                         member_overrides: Mapping[str, Any] | None = None,
                         metrics: Mapping[str, Any] | None = None,
                         origins: Mapping[str, str] | None = None) -> ModelSnapshot:
    """Build and smoke-test a snapshot from a source's files (see :mod:`agent.layout`)."""
    guest = guest_from_source(source, guest_params)
    source.forget_pages()  # the guest's load-time checks read whole mapped tables: not counted at the peak
    member = member_from_source(source, guest, member_overrides or {})
    names = ProductNames(guest.index_, source.array(layout.GUEST_ARRAYS["item_names"]))
    snap = ModelSnapshot(version=version, guest=guest, member=member, names=names, metrics=dict(metrics or {}),
                         origins=dict(origins or {}))
    snap.smoke_test()
    return snap


def guest_from_source(source: layout.Source, params: GuestParams | None = None) -> GuestRecommender:
    """The guest recommender from ``guest_model/`` (raises BundleError when incomplete or invalid).

    The co-purchase partners come from ``co_partners_*.npy`` when the bundle has them (served as they
    are), else from the padded ``co_neighbors``/``co_scores`` (older bundles; converted at load).
    """
    co_partners = None
    names = [name for name in layout.GUEST_ARRAYS if name != "item_names"]
    if _optional_table(source, layout.GUEST_CO_PARTNERS, "co-purchase partner table"):
        p = layout.GUEST_CO_PARTNERS
        scores = source.array(p["scores"])
        if scores.ndim != 1 or scores.dtype != np.float32:
            raise BundleError(f"{p['scores']}: expected 1-D float32, got {scores.dtype} {scores.shape}")
        co_partners = CoPartners(_indices(source, p["indptr"], np.int64), _indices(source, p["items"], np.int32),
                                 scores)
        names = [name for name in names if name not in ("co_neighbors", "co_scores")]
    missing = [layout.GUEST_ARRAYS[name] for name in names + ["item_names"]
               if not source.has(layout.GUEST_ARRAYS[name])]
    if missing:
        raise BundleError(f"guest model incomplete, missing: {', '.join(missing)}")
    a = {name: source.array(layout.GUEST_ARRAYS[name]) for name in names}
    baskets = None
    if _optional_table(source, layout.GUEST_BASKETS, "recent-basket table"):  # older bundles have none
        p = layout.GUEST_BASKETS
        baskets = RecentBaskets(_indices(source, p["starts"], np.int64), _indices(source, p["items"], np.int32),
                                _indices(source, p["postings_indptr"], np.int64),
                                _indices(source, p["postings"], np.int32))
    try:
        return GuestRecommender(a["item_ids"], a.get("co_neighbors"), a.get("co_scores"),
                                a["sim_neighbors"], a["sim_scores"], a["popular"], params, baskets, co_partners)
    except ValueError as exc:
        raise BundleError(f"guest model invalid: {exc}") from exc


def member_from_source(source: layout.Source, guest: GuestRecommender | None,
                       overrides: Mapping[str, Any] | None = None) -> MemberRecommender | None:
    """The member recommender from ``member_model/``, or None when the bundle has none.

    Blend weights come from ``member_meta.json``; ``overrides`` (MemberParams
    field -> value, None = keep) replace some; ``"rerank": False`` ignores the
    bundle's reranker (members are then ranked by the blend alone).
    """
    required = [*layout.MEMBER_ARRAYS.values(), layout.MEMBER_ONNX]
    missing = [p for p in required if not source.has(p)]
    if missing:
        _LOG.warning("member model absent (%s): members are served by the guest model",
                     ", ".join(missing))
        return None
    meta = _member_meta(source)
    params = _member_params_from_meta(meta)
    overrides = dict(overrides or {})
    rerank = overrides.pop("rerank", True) is not False
    set_ = {k: v for k, v in overrides.items() if v is not None}
    if set_:
        params = dataclasses.replace(params, **set_)
    history = _member_table(source, layout.MEMBER_HISTORY, "counts")
    # Optional (older bundles, or a blend without the term, have none): the term is then off.
    neighbours = _member_table(source, layout.MEMBER_NEIGHBOURS, "scores")
    baskets = _member_baskets(source)
    a = {name: source.array(path) for name, path in layout.MEMBER_ARRAYS.items()}
    try:
        reranker = _member_reranker(source, meta, len(a["item_lookup"]), params.threads) if rerank else None
        return MemberRecommender(source.read_bytes(layout.MEMBER_ONNX), a["user_lookup"],
                                 a["context_lookup"], a["item_lookup"], a["item_embeddings"],
                                 history=history, guest=guest, params=params, neighbours=neighbours,
                                 baskets=baskets, reranker=reranker)
    except BundleError:
        raise
    except Exception as exc:  # onnxruntime raises its own types
        raise BundleError(f"member model invalid: {exc}") from exc


def _member_table(source: layout.Source, paths: Mapping[str, str], values: str) -> MemberHistory | None:
    """A per-member CSR table (``indptr``, ``items``, ``values``), or None when any part is missing."""
    if not all(source.has(p) for p in paths.values()):
        return None
    t = {name: source.array(path) for name, path in paths.items()}
    indptr, items, vals = (t["indptr"].astype(np.int64, copy=False), t["items"].astype(np.int32, copy=False),
                           t[values].astype(np.float32, copy=False))
    if indptr.ndim != 1 or not len(indptr) or indptr[0] != 0 or np.any(np.diff(indptr) < 0) \
            or indptr[-1] != len(items) or len(items) != len(vals):
        raise BundleError(f"{paths['indptr']}: malformed per-member table")
    return MemberHistory(indptr, items, vals)


def _optional_table(source: layout.Source, paths: Mapping[str, str], what: str) -> bool:
    """True when every part of an optional table is present, False when none is; a partial set is refused."""
    present = [p for p in paths.values() if source.has(p)]
    if present and len(present) != len(paths):
        missing = sorted(set(paths.values()) - set(present))
        raise BundleError(f"{what} incomplete, missing: {', '.join(missing)}")
    return bool(present)


def _indices(source: layout.Source, relpath: str, dtype: type) -> np.ndarray:
    """A 1-D integer array that fits ``dtype`` (checked before the cast, so nothing wraps around)."""
    a = source.array(relpath)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise BundleError(f"{relpath}: expected a 1-D integer array, got {a.dtype} {a.shape}")
    info = np.iinfo(dtype)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise BundleError(f"{relpath}: values outside {np.dtype(dtype).name}")
    return a.astype(dtype, copy=False)


def _member_baskets(source: layout.Source) -> MemberBaskets | None:
    """The members' recent baskets (``baskets_*.npy``), or None when the bundle has none."""
    paths = layout.MEMBER_BASKETS
    if not _optional_table(source, paths, "member basket table"):
        return None
    indptr, starts = _indices(source, paths["indptr"], np.int64), _indices(source, paths["starts"], np.int64)
    items = _indices(source, paths["items"], np.int32)
    weights = source.array(paths["weights"])
    if weights.ndim != 1 or weights.dtype.kind != "f" or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise BundleError(f"{paths['weights']}: expected finite weights >= 0 in a 1-D float array")
    weights = weights.astype(np.float32, copy=False)
    if (indptr.ndim != 1 or not len(indptr) or indptr[0] != 0 or np.any(np.diff(indptr) < 0)
            or indptr[-1] != len(starts) - 1 or starts.ndim != 1 or starts[0] != 0
            or np.any(np.diff(starts) <= 0) or starts[-1] != len(items) or len(weights) != len(starts) - 1):
        raise BundleError(f"{paths['indptr']}: malformed per-member basket table")
    return MemberBaskets(indptr, starts, items, weights)


def _member_reranker(source: layout.Source, member_meta: Mapping[str, Any], n_items: int,
                     threads: int) -> TreeReranker | None:
    """The trees and statistics of ``rerank_*`` (None when the bundle has none; a partial set is refused)."""
    stats_paths = layout.MEMBER_RERANK_STATS
    present = _optional_table(source, {**stats_paths, "trees": layout.MEMBER_RERANK_TREES}, "member reranker")
    if not present:
        return None
    meta = member_meta.get("rerank")
    if not isinstance(meta, dict) or list(meta.get("features") or ()) != list(FEATURES) \
            or not isinstance(meta.get("candidates"), int):
        raise BundleError(f"{layout.MEMBER_META}: 'rerank' must name the features {list(FEATURES)} in order "
                          f"and the number of candidates (this agent cannot use the bundle's reranker)")
    arrays = {name: source.array(path) for name, path in stats_paths.items()}
    try:
        stats = MemberStats(n_items=n_items, **arrays)
        return TreeReranker(source.read_bytes(layout.MEMBER_RERANK_TREES), stats, meta["candidates"], threads)
    except Exception as exc:  # onnxruntime raises its own types
        raise BundleError(f"member reranker invalid: {exc}") from exc


def _member_meta(source: layout.Source) -> dict[str, Any]:
    """``member_meta.json`` parsed ({} when absent; BundleError when it is not a JSON object)."""
    if not source.has(layout.MEMBER_META):
        return {}
    try:
        meta = json.loads(source.read_bytes(layout.MEMBER_META).decode("utf-8"))
    except ValueError as exc:
        raise BundleError(f"{layout.MEMBER_META} is malformed: {exc}") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{layout.MEMBER_META} is malformed: not an object")
    return meta


def _member_params_from_meta(meta: Mapping[str, Any]) -> MemberParams:
    """Blend weights chosen at training time travel in ``member_meta.json`` (``meta``, parsed)."""
    serving = meta.get("serving") or {}
    try:
        return MemberParams(**{w: float(serving.get(w, 0.0)) for w in ScoreParts.WEIGHTS})
    except (ValueError, TypeError, AttributeError) as exc:
        raise BundleError(f"{layout.MEMBER_META} is malformed: {exc}") from exc


class ModelRegistry:
    """Holds the serving snapshot; readers take ``current`` without locking."""

    def __init__(self, snapshot: ModelSnapshot | None = None) -> None:
        self._current = snapshot
        self._lock = threading.Lock()  # serialises swaps, not reads

    @property
    def current(self) -> ModelSnapshot | None:
        return self._current

    def swap(self, snapshot: ModelSnapshot) -> ModelSnapshot | None:
        """Make ``snapshot`` current in one step; returns the previous one."""
        with self._lock:
            old, self._current = self._current, snapshot
        _LOG.info("serving models %s (was %s)", snapshot.version, old.version if old else None)
        return old

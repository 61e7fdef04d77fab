"""Guest model training: TF-IDF over tags, cosine k-NN, per-session co-purchase.

Follows the seed's procedure and additionally precomputes the compact
neighbour tables the edge serves from (see ``agent.recommenders.guest``):

1. TF-IDF over ``tag`` (comma/space separated; Korean and English words).
2. ``NearestNeighbors(metric="cosine")`` fitted on the tag matrix (the seed's
   ``knn_model.pkl``); each item's ``sim_neighbors`` most cosine-similar items
   become ``sim_neighbors``/``sim_scores``, computed by :func:`similarity_tables`
   (the same neighbours as ``kneighbors``, in seconds instead of minutes).
3. Purchases grouped by session; items bought in the same session are
   co-purchased. Raw counts favour items everyone buys (milk, bananas), so
   the edge score damps them on both sides:
   ``count(i, j) / (count(j) ** popularity_alpha * count(i) ** cart_alpha)``,
   ignoring pairs seen fewer than ``min_co_count`` times. ``popularity_alpha``
   stops popular *partners* from winning everywhere; ``cart_alpha`` stops a
   popular *cart item* from drowning the evidence of the rest of the cart
   (it rescales item i's row, so it changes sums across a cart, not the
   order of one item's partners). Both were chosen on Complete Journey
   validation data (README, "Evaluation").
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from .data import Catalog, PurchaseLog, basket_items

_LOG = logging.getLogger(__name__)

__all__ = ["GuestTrainingConfig", "GuestModel", "train_guest_model", "build_guest_model", "co_purchase_counts",
           "co_purchase_tables", "similarity_tables", "recent_basket_arrays", "TAG_TOKEN_PATTERN"]

#: Tags are free text like "우유, 유제품, dairy milk": split on commas and spaces,
#: keep one-character words (many Korean nouns are one syllable).
TAG_TOKEN_PATTERN = r"(?u)[^,\s]+"


@dataclass(frozen=True)
class GuestTrainingConfig:
    """What training precomputes for the edge (``guest:`` in retrain.yaml)."""

    co_neighbors: int = 50  # co-purchase partners kept per item
    sim_neighbors: int = 20  # TF-IDF neighbours kept per item
    popularity_alpha: float = 0.375  # partner damping; 0 = raw co-purchase counts
    cart_alpha: float = 0.75  # cart-item damping; 0 = none
    min_co_count: int = 3
    n_popular: int = 500
    co_dict_partners: int = 100  # partners per item kept in co_purchase_dict.pkl
    recent_baskets: int = 50_000  # newest baskets shipped for the session-kNN term (0: none)
    basket_postings: int = 1_000  # newest baskets indexed per item


@dataclass
class GuestModel:
    """Everything training produced: the seed's objects and the edge arrays."""

    catalog: Catalog
    vectorizer: Any  # TfidfVectorizer
    knn: Any  # NearestNeighbors
    tag_matrix: sp.csr_matrix
    co_counts: sp.csr_matrix  # item x item co-purchase counts, diagonal zero
    item_counts: np.ndarray  # purchases per item
    co_neighbors: np.ndarray
    co_scores: np.ndarray
    sim_neighbors: np.ndarray
    sim_scores: np.ndarray
    popular: np.ndarray
    config: GuestTrainingConfig
    #: the recent-basket table (``layout.GUEST_BASKETS`` part name -> array); None: not shipped
    baskets: dict[str, np.ndarray] | None = None

    def edge_arrays(self) -> dict[str, np.ndarray]:
        """The pickle-free arrays the agent loads (file stem -> array)."""
        return {
            "item_ids": self.catalog.ids, "item_names": self.catalog.names,
            "co_neighbors": self.co_neighbors, "co_scores": self.co_scores,
            "sim_neighbors": self.sim_neighbors, "sim_scores": self.sim_scores,
            "popular": self.popular,
        }

    def co_purchase_dict(self) -> dict[str, dict[str, int]]:
        """The seed's ``co_purchase_dict``: id -> {partner id: count}, best partners first."""
        ids = self.catalog.ids.tolist()
        out: dict[str, dict[str, int]] = {}
        m = self.co_counts
        for i in range(m.shape[0]):
            lo, hi = m.indptr[i], m.indptr[i + 1]
            if lo == hi:
                continue
            cols, vals = m.indices[lo:hi], m.data[lo:hi]
            order = np.lexsort((cols, -vals))[: self.config.co_dict_partners]
            out[ids[i]] = {ids[c]: int(v) for c, v in zip(cols[order], vals[order])}
        return out

    def meta(self) -> dict[str, Any]:
        return {"n_items": len(self.catalog), "config": asdict(self.config)}


def co_purchase_counts(log: PurchaseLog, catalog: Catalog) -> tuple[sp.csr_matrix, np.ndarray]:
    """Item x item session co-occurrence counts and per-item purchase counts.

    Each session counts once per pair (repeats of an item within a basket do
    not inflate it). Products missing from the catalogue are dropped.
    """
    index = {pid: i for i, pid in enumerate(catalog.ids.tolist())}
    items = np.fromiter((index.get(p, -1) for p in log.product_ids.tolist()), dtype=np.int64,
                        count=len(log))
    known = items >= 0
    if not known.all():
        _LOG.info("co-purchase: %d rows name products not in the catalogue", int((~known).sum()))
    _, sessions = np.unique(log.session_ids[known], return_inverse=True)
    n = len(catalog)
    basket = sp.csr_matrix((np.ones(int(known.sum()), dtype=np.float32), (sessions, items[known])),
                           shape=(int(sessions.max()) + 1 if sessions.size else 0, n))
    basket.data[:] = 1.0  # duplicates were summed; a basket counts an item once
    item_counts = np.asarray(basket.sum(axis=0)).ravel()
    co = (basket.T @ basket).tocsr()
    co.setdiag(0)
    co.eliminate_zeros()
    return co.astype(np.float32), item_counts.astype(np.float32)


def co_purchase_tables(co: sp.csr_matrix, item_counts: np.ndarray, k: int, alpha: float,
                       min_count: int = 1, *, cart_alpha: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k partners per item by ``count / (partner_count ** alpha * own_count ** cart_alpha)``.

    Rows are ``-1`` padded.
    """
    n = co.shape[0]
    neighbors = np.full((n, k), -1, dtype=np.int32)
    scores = np.zeros((n, k), dtype=np.float32)
    counts = np.maximum(item_counts, 1.0)
    damp = np.power(counts, alpha)
    own = np.power(counts, -cart_alpha)
    for i in range(n):
        lo, hi = co.indptr[i], co.indptr[i + 1]
        if lo == hi:
            continue
        cols, vals = co.indices[lo:hi], co.data[lo:hi]
        keep = vals >= min_count
        cols, vals = cols[keep], vals[keep]
        s = vals / damp[cols]
        order = np.lexsort((cols, -s))[:k]
        neighbors[i, : order.size] = cols[order]
        scores[i, : order.size] = s[order] * own[i]
    return neighbors, scores


#: Entries of one dense block of similarities (float64: 64 MiB); bounds the memory of
#: :func:`similarity_tables` whatever the catalogue size.
_BLOCK_ENTRIES = 2**23
#: Similarities at or below this mean "no shared tag": such items are not neighbours.
_MIN_SIMILARITY = 1e-9


def _unit_rows(x: sp.csr_matrix) -> sp.csr_matrix:
    """``x`` with every non-zero row scaled to unit L2 norm, so cosine similarity is a dot product.

    TfidfVectorizer already normalises (norm="l2"); this only guards against a
    vectorizer configured otherwise. Zero rows stay zero (they have no neighbours).
    """
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    nonzero = norms > 0
    if np.allclose(norms[nonzero], 1.0, rtol=0.0, atol=1e-10):
        return x
    _LOG.debug("similarity: normalising %d tag rows", int(nonzero.sum()))
    inv = np.zeros_like(norms)
    inv[nonzero] = 1.0 / norms[nonzero]
    return sp.csr_matrix(sp.diags(inv) @ x)


def _distinct_rows(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """First row of each distinct row of a canonical CSR matrix, and each row's distinct number.

    Catalogues repeat tag strings (Complete Journey: 92k products, 21k distinct
    tag strings), and bitwise-equal rows have bitwise-equal similarities, so
    they are scored once.
    """
    keys: dict[bytes, int] = {}
    inverse = np.empty(x.shape[0], dtype=np.int64)
    ptr, ind, dat = x.indptr, x.indices, x.data
    for i in range(x.shape[0]):  # ~1 s per million rows
        lo, hi = ptr[i], ptr[i + 1]
        inverse[i] = keys.setdefault(ind[lo:hi].tobytes() + dat[lo:hi].tobytes(), len(keys))
    return np.unique(inverse, return_index=True)[1], inverse


def _block_top_items(sims: sp.csr_matrix, k: int, group_ptr: np.ndarray,
                     group_items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` best items for each row of a block of distinct-row similarities.

    ``sims[q, t]`` is the similarity of distinct rows q and t; the items with row t
    are ``group_items[group_ptr[t]:group_ptr[t + 1]]`` (ascending). Returns
    (row in block, rank, item, similarity), ranked by similarity desc then item
    asc, similarity <= 1e-9 left out. Only stored entries are ranked, packed row
    by row into a ``rows x longest row`` array padded with -inf: a fully dense
    block is mostly tied zeros, which made ``np.partition`` the bulk of the run.
    """
    n_rows = sims.shape[0]
    indptr, indices, data = sims.indptr, sims.indices, sims.data
    lengths = np.diff(indptr)
    width = max(int(lengths.max()), k)
    packed = np.full((n_rows, width), -np.inf)
    for i in range(n_rows):  # one memcpy per row: faster than a scatter over every entry
        packed[i, : lengths[i]] = data[indptr[i]:indptr[i + 1]]
    # The k best distinct rows hold at least k items, so nothing below the k-th best value is needed.
    kth = np.partition(packed, width - k, axis=1)[:, width - k]
    floor = np.nextafter(_MIN_SIMILARITY, np.inf)
    r, pos = np.nonzero(packed >= np.maximum(kth, floor)[:, None])
    t, v = indices[indptr[r] + pos], packed[r, pos]
    order = np.lexsort((t, -v, r))
    r, t, v = r[order], t[order], v[order]
    # Tighter: stop at the value where the rows seen so far hold k items; keep its ties.
    size = np.minimum(np.diff(group_ptr)[t], k)  # more than k items of one row are never needed
    cum = np.cumsum(size)
    row_first = np.searchsorted(r, np.arange(n_rows))
    held = cum - np.concatenate(([0], cum))[row_first][r]
    enough = np.flatnonzero(held >= k)
    rows_enough, first = np.unique(r[enough], return_index=True)
    cutoff = np.full(n_rows, -np.inf)
    cutoff[rows_enough] = v[enough[first]]
    keep = v >= cutoff[r]
    r, t, v, size = r[keep], t[keep], v[keep], size[keep]
    # Expand distinct rows into their items and rank items exactly.
    rep = np.repeat(np.arange(t.size), size)
    offset = np.arange(rep.size) - np.repeat(np.cumsum(size) - size, size)
    items = group_items[group_ptr[t[rep]] + offset]
    r, v = r[rep], v[rep]
    order = np.lexsort((items, -v, r))
    r, items, v = r[order], items[order], v[order]
    starts = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=n_rows), out=starts[1:])
    rank = np.arange(r.size) - starts[r]
    best = rank < k
    return r[best], rank[best], items[best], v[best]


def similarity_tables(tag_matrix: sp.spmatrix | np.ndarray, k: int, *,
                      block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each item's ``k`` most cosine-similar items: int32 neighbours and float32 scores, ``[n, k]``.

    Same neighbours as ``NearestNeighbors(metric="cosine").kneighbors`` (self
    excluded, similarity <= 1e-9 dropped, rows ``-1``/0 padded), ordered by
    similarity desc then lower index. kneighbors over a 92k-item catalogue took
    minutes of the nightly refit; here identical tag rows are scored once, as
    blocked sparse dot products of unit rows, and an item's neighbours are its
    tag row's ``k + 1`` best items minus itself. ``block_rows``: distinct tag
    rows per block (tests; by default a block's similarities fit 64 MiB).
    """
    x = sp.csr_matrix(tag_matrix, dtype=np.float64, copy=True)
    n = x.shape[0]
    neighbors = np.full((n, k), -1, dtype=np.int32)
    scores = np.zeros((n, k), dtype=np.float32)
    k_eff = min(k, n - 1)
    if k_eff <= 0:
        return neighbors, scores
    x.sum_duplicates()
    x.eliminate_zeros()
    x = _unit_rows(x)
    x.sort_indices()
    first, inverse = _distinct_rows(x)
    group_items = np.argsort(inverse, kind="stable")
    group_ptr = np.zeros(first.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(inverse, minlength=first.size), out=group_ptr[1:])
    rows = x[first]
    rows_t = rows.T.tocsr()
    k1 = k_eff + 1  # the row's best items include the item itself (or a twin)
    top = np.full((first.size, k1), -1, dtype=np.int64)
    top_sim = np.zeros((first.size, k1))
    step = block_rows if block_rows is not None else max(1, _BLOCK_ENTRIES // first.size)
    if step < 1:
        raise ValueError(f"block_rows must be >= 1, got {step}")
    for start in range(0, first.size, step):
        sims = (rows[start:start + step] @ rows_t).tocsr()
        if sims.nnz == 0:
            continue
        r, rank, items, v = _block_top_items(sims, k1, group_ptr, group_items)
        top[start + r, rank] = items
        top_sim[start + r, rank] = v
    cand = top[inverse]
    drop_self = np.argsort(cand == np.arange(n)[:, None], axis=1, kind="stable")[:, :k_eff]
    neighbors[:, :k_eff] = np.take_along_axis(cand, drop_self, axis=1)
    scores[:, :k_eff] = np.take_along_axis(top_sim[inverse], drop_self, axis=1)
    _LOG.debug("similarity: %d items, %d distinct tag rows", n, first.size)
    return neighbors, scores


def train_guest_model(catalog: Catalog, log: PurchaseLog,
                      config: GuestTrainingConfig | None = None) -> GuestModel:
    """Full guest training from a catalogue and purchase rows."""
    co, item_counts = co_purchase_counts(log, catalog)
    return build_guest_model(catalog, co, item_counts, config)


def build_guest_model(catalog: Catalog, co: sp.csr_matrix, item_counts: np.ndarray,
                      config: GuestTrainingConfig | None = None) -> GuestModel:
    """The guest model from co-purchase counts in catalogue order (the nightly job keeps them cumulative)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.neighbors import NearestNeighbors

    config = config or GuestTrainingConfig()
    if len(catalog) == 0:
        raise ValueError("cannot train the guest model on an empty catalogue")
    vectorizer = TfidfVectorizer(token_pattern=TAG_TOKEN_PATTERN, lowercase=True)
    analyzer = vectorizer.build_analyzer()
    tagged = np.array([bool(analyzer(t)) for t in catalog.tags.tolist()], dtype=bool)
    # "_" only keeps the vocabulary from being empty (a catalogue without a single tag, or tags of commas only);
    # the rows of untagged products are then zeroed: sharing the placeholder made every untagged product every
    # other's perfect tag neighbour (cosine 1.0)
    tags = [t if ok else "_" for t, ok in zip(catalog.tags.tolist(), tagged)]
    tag_matrix = vectorizer.fit_transform(tags).tocsr()
    if not tagged.all():
        tag_matrix = (sp.diags(tagged.astype(tag_matrix.dtype)) @ tag_matrix).tocsr()
        tag_matrix.eliminate_zeros()
    knn = NearestNeighbors(metric="cosine", algorithm="brute").fit(tag_matrix)
    # knn is kept for the seed's knn_model.pkl; the tables come from the faster blocked top-k.
    sim_nb, sim_sc = similarity_tables(tag_matrix, config.sim_neighbors)
    co_nb, co_sc = co_purchase_tables(co, item_counts, config.co_neighbors, config.popularity_alpha,
                                      config.min_co_count, cart_alpha=config.cart_alpha)
    popular = np.lexsort((np.arange(len(catalog)), -item_counts))[: config.n_popular]
    _LOG.info("guest model: %d items, %d co-purchase pairs, vocabulary %d",
              len(catalog), co.nnz // 2, len(vectorizer.vocabulary_))
    return GuestModel(catalog=catalog, vectorizer=vectorizer, knn=knn, tag_matrix=tag_matrix,
                      co_counts=co, item_counts=item_counts, co_neighbors=co_nb, co_scores=co_sc,
                      sim_neighbors=sim_nb, sim_scores=sim_sc, popular=popular.astype(np.int32),
                      config=config)


def recent_basket_arrays(log: PurchaseLog, item_ids: np.ndarray, *, max_baskets: int,
                         postings_per_item: int) -> dict[str, np.ndarray] | None:
    """The newest ``max_baskets`` baskets of ``log`` (guests' and members') for the edge's session kNN.

    Returns the :class:`agent.recommenders.guest.RecentBaskets` parts keyed like
    ``layout.GUEST_BASKETS``: each basket's distinct catalogue items, and for
    every item the newest ``postings_per_item`` baskets holding it. Products
    outside ``item_ids`` are left out (a basket left empty is dropped). None when
    ``max_baskets`` is 0 or nothing is left.
    """
    if max_baskets <= 0 or not len(log):
        return None
    pos = {p: i for i, p in enumerate(np.asarray(item_ids).tolist())}
    it = np.fromiter((pos.get(x, -1) for x in log.product_ids.tolist()), np.int64, len(log))
    ok = it >= 0
    if not ok.any():
        return None
    sess, sess_of = np.unique(log.session_ids[ok], return_inverse=True)
    newest = np.full(len(sess), np.iinfo(np.int64).min)
    np.maximum.at(newest, sess_of, log.timestamps[ok])
    order = np.lexsort((sess, -newest))[:max_baskets]  # newest first
    rank = np.full(len(sess), -1, np.int64)
    rank[order] = np.arange(order.size)
    starts, items = basket_items(rank[sess_of], it[ok], order.size)
    basket = np.repeat(np.arange(order.size), np.diff(starts))
    by_item = np.stack([basket, items], 1)[np.lexsort((basket, items))]  # by item, newest basket first
    n_items = len(item_ids)
    first = np.searchsorted(by_item[:, 1], by_item[:, 1], side="left")
    keep = (np.arange(len(by_item)) - first) < postings_per_item
    by_item = by_item[keep]
    postings_indptr = np.concatenate([[0], np.cumsum(np.bincount(by_item[:, 1], minlength=n_items))])
    _LOG.info("recent baskets: %d baskets, %d items, %d postings", order.size, len(items), len(by_item))
    return {"starts": starts, "items": items,
            "postings_indptr": postings_indptr.astype(np.int64), "postings": by_item[:, 0].astype(np.int32)}


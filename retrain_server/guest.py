"""Guest model training: TF-IDF over tags, cosine k-NN, per-session co-purchase.

Follows the seed's procedure and additionally precomputes the compact
neighbour tables the edge serves from (see ``agent.recommenders.guest``):

1. TF-IDF over ``tag`` (comma/space separated; Korean and English words).
2. ``NearestNeighbors(metric="cosine")`` fitted on the tag matrix; each item's
   ``sim_top_k`` nearest items become ``sim_neighbors``/``sim_scores``.
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

from .data import Catalog, PurchaseLog

_LOG = logging.getLogger(__name__)

__all__ = ["GuestTrainingConfig", "GuestModel", "train_guest_model", "co_purchase_counts",
           "co_purchase_tables", "TAG_TOKEN_PATTERN"]

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


def _similarity_tables(knn: Any, tag_matrix: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = tag_matrix.shape[0]
    k_eff = min(k + 1, n)
    neighbors = np.full((n, k), -1, dtype=np.int32)
    scores = np.zeros((n, k), dtype=np.float32)
    if n < 2:
        return neighbors, scores
    dist, idx = knn.kneighbors(tag_matrix, n_neighbors=k_eff)
    sim = 1.0 - dist
    for i in range(n):
        row = idx[i] != i  # drop self wherever it landed
        cols, s = idx[i][row][:k], sim[i][row][:k]
        good = s > 1e-9  # items with no shared tag are not "similar"
        cols, s = cols[good], s[good]
        order = np.lexsort((cols, -s))
        neighbors[i, : cols.size] = cols[order]
        scores[i, : cols.size] = s[order]
    return neighbors, scores


def train_guest_model(catalog: Catalog, log: PurchaseLog,
                      config: GuestTrainingConfig | None = None) -> GuestModel:
    """Full guest training from a catalogue and purchase rows."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.neighbors import NearestNeighbors

    config = config or GuestTrainingConfig()
    if len(catalog) == 0:
        raise ValueError("cannot train the guest model on an empty catalogue")
    vectorizer = TfidfVectorizer(token_pattern=TAG_TOKEN_PATTERN, lowercase=True)
    tags = [t if t.strip() else "_" for t in catalog.tags.tolist()]
    tag_matrix = vectorizer.fit_transform(tags).tocsr()
    knn = NearestNeighbors(metric="cosine", algorithm="brute").fit(tag_matrix)
    sim_nb, sim_sc = _similarity_tables(knn, tag_matrix, config.sim_neighbors)
    co, item_counts = co_purchase_counts(log, catalog)
    co_nb, co_sc = co_purchase_tables(co, item_counts, config.co_neighbors, config.popularity_alpha,
                                      config.min_co_count, cart_alpha=config.cart_alpha)
    popular = np.lexsort((np.arange(len(catalog)), -item_counts))[: config.n_popular]
    _LOG.info("guest model: %d items, %d co-purchase pairs, vocabulary %d",
              len(catalog), co.nnz // 2, len(vectorizer.vocabulary_))
    return GuestModel(catalog=catalog, vectorizer=vectorizer, knn=knn, tag_matrix=tag_matrix,
                      co_counts=co, item_counts=item_counts, co_neighbors=co_nb, co_scores=co_sc,
                      sim_neighbors=sim_nb, sim_scores=sim_sc, popular=popular.astype(np.int32),
                      config=config)

"""Cumulative purchase counts: the server-side state the nightly job adds each day to.

Kept on the server, never in a bundle (contract §2). Indexed by product and
member *ids*, not by catalogue rows, so they survive catalogue changes: a new
product simply gets a new index; a product dropped from the catalogue keeps
its counts but is not recommendable. Immutable: :meth:`Counts.add` returns a
new object, so a failed nightly run never leaves half-added counts behind.
Stored as ``.npy`` files (no pickle) in a generation directory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .data import Catalog, PurchaseLog

_LOG = logging.getLogger(__name__)

__all__ = ["Counts"]

_FILES = ("product_ids", "member_ids", "item", "co_indptr", "co_indices", "co_data",
          "hist_indptr", "hist_indices", "hist_data")


def _extend(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``vocab`` followed by the ids it lacks, in first-seen order."""
    if not len(ids):
        return vocab
    uniq, first = np.unique(ids, return_index=True)
    new = uniq[~np.isin(uniq, vocab)]
    if not len(new):
        return vocab
    first_of_new = first[np.isin(uniq, new)]
    return np.concatenate([vocab, new[np.argsort(first_of_new, kind="stable")]]).astype(str)


def _index(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each id in ``vocab`` (all must be present)."""
    order = np.argsort(vocab, kind="stable")
    return order[np.searchsorted(vocab, ids, sorter=order)]


def _grow(m: sp.csr_matrix, shape: tuple[int, int]) -> sp.csr_matrix:
    m = m.tocsr().copy()
    m.resize(shape)
    return m


@dataclass(frozen=True)
class Counts:
    """Co-purchase counts (sessions with both products), per-product session counts, member history."""

    product_ids: np.ndarray  # str: the numbering of item, co and the history columns
    item: np.ndarray  # float32 [n_products]: sessions that bought the product
    co: sp.csr_matrix  # float32 [n_products, n_products], symmetric, zero diagonal
    member_ids: np.ndarray  # str: rows of history
    history: sp.csr_matrix  # float32 [n_members, n_products]: times a member bought a product
    sessions: int = 0  # sessions counted so far
    rows: int = 0  # item rows counted so far

    @classmethod
    def empty(cls) -> "Counts":
        none = np.array([], dtype=str)
        return cls(none, np.zeros(0, np.float32), sp.csr_matrix((0, 0), dtype=np.float32), none,
                   sp.csr_matrix((0, 0), dtype=np.float32))

    def add(self, log: PurchaseLog) -> "Counts":
        """These counts plus ``log``'s sessions (each session counts a product or pair once)."""
        if not len(log):
            return self
        products = _extend(self.product_ids, log.product_ids)
        n = len(products)
        cols = _index(products, log.product_ids)
        sess, session_of_row = np.unique(log.session_ids, return_inverse=True)
        basket = sp.csr_matrix((np.ones(len(log), np.float32), (session_of_row, cols)), shape=(len(sess), n))
        basket.sum_duplicates()
        basket.data[:] = 1.0
        item = np.zeros(n, np.float32)
        item[: len(self.item)] = self.item
        item += np.asarray(basket.sum(axis=0), dtype=np.float32).ravel()
        co = (basket.T @ basket).tocsr()
        co.setdiag(0)
        co.eliminate_zeros()
        co = (_grow(self.co, (n, n)) + co).tocsr().astype(np.float32)
        members = log.user_ids != ""
        member_ids = _extend(self.member_ids, log.user_ids[members])
        hist = sp.csr_matrix((np.ones(int(members.sum()), np.float32),
                              (_index(member_ids, log.user_ids[members]), cols[members])),
                             shape=(len(member_ids), n))
        history = (_grow(self.history, (len(member_ids), n)) + hist).tocsr().astype(np.float32)
        return Counts(products, item, co, member_ids, history, self.sessions + len(sess), self.rows + len(log))

    def for_catalog(self, catalog: Catalog) -> tuple[sp.csr_matrix, np.ndarray]:
        """Co-purchase counts and item counts in catalogue row order (unseen products: zeros)."""
        n = len(catalog)
        pos = {p: i for i, p in enumerate(self.product_ids.tolist())}
        state_row = np.fromiter((pos.get(p, -1) for p in catalog.ids.tolist()), np.int64, n)
        known = state_row >= 0
        # A selection matrix: catalogue row <- state row.
        pick = sp.csr_matrix((np.ones(int(known.sum()), np.float32), (np.flatnonzero(known), state_row[known])),
                             shape=(n, len(self.product_ids)))
        co = (pick @ self.co @ pick.T).tocsr().astype(np.float32)
        co.eliminate_zeros()
        item = np.zeros(n, np.float32)
        item[known] = self.item[state_row[known]]
        return co, item

    def history_triples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(member id, product id, count) for every non-zero history entry."""
        h = self.history.tocoo()
        return self.member_ids[h.row], self.product_ids[h.col], h.data.astype(np.float32)

    # -- files -----------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        co, hist = self.co.tocsr(), self.history.tocsr()
        arrays = {"product_ids": self.product_ids.astype(str), "member_ids": self.member_ids.astype(str),
                  "item": self.item, "co_indptr": co.indptr, "co_indices": co.indices, "co_data": co.data,
                  "hist_indptr": hist.indptr, "hist_indices": hist.indices, "hist_data": hist.data}
        for name, arr in arrays.items():
            np.save(directory / f"{name}.npy", arr, allow_pickle=False)
        (directory / "counts.json").write_text(json.dumps({"sessions": self.sessions, "rows": self.rows}))

    @classmethod
    def load(cls, directory: Path) -> "Counts":
        a = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in _FILES}
        meta = json.loads((directory / "counts.json").read_text())
        n, m = len(a["product_ids"]), len(a["member_ids"])
        co = sp.csr_matrix((a["co_data"], a["co_indices"], a["co_indptr"]), shape=(n, n))
        hist = sp.csr_matrix((a["hist_data"], a["hist_indices"], a["hist_indptr"]), shape=(m, n))
        return cls(a["product_ids"].astype(str), a["item"].astype(np.float32), co, a["member_ids"].astype(str),
                   hist, int(meta["sessions"]), int(meta["rows"]))

    def equals(self, other: "Counts") -> bool:
        """Same ids, same numbers (for idempotence checks)."""
        return (np.array_equal(self.product_ids, other.product_ids)
                and np.array_equal(self.member_ids, other.member_ids)
                and np.array_equal(self.item, other.item)
                and (self.co != other.co).nnz == 0 and (self.history != other.history).nnz == 0
                and self.sessions == other.sessions and self.rows == other.rows)

"""Cumulative purchase counts: the server-side state the nightly job adds each day to.

Kept on the server, never in a bundle (contract §2). Indexed by product and
member *ids*, not by catalogue rows, so they survive catalogue changes: a new
product simply gets a new index; a product dropped from the catalogue keeps
its counts but is not recommendable. Immutable: :meth:`Counts.add` returns a
new object, so a failed nightly run never leaves half-added counts behind.
Stored as ``.npy`` files (no pickle) in a generation directory.

**Time decay.** A purchase made ``a`` days before the counts' day weighs
``0.5 ** (a / half_life)`` (:class:`Decay`; the co-purchase and per-product
counts and the member history have separate half-lives, 0 = no decay). The
nightly job keeps the counts "as of" their ``through_day``: to move them to
day D it multiplies them by the factor for ``D - through_day`` days
(:meth:`Counts.decayed`) and adds the new sessions weighted by their own age
(:meth:`Counts.add` with ``ages``), which is exactly "yesterday's counts times
a daily factor, plus today's", day by day, whether one day or several are
caught up in a run. Weights are whole days, so re-running gives the same
counts (to float tolerance).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import scipy.sparse as sp

from .data import Catalog, PurchaseLog

_LOG = logging.getLogger(__name__)

__all__ = ["Counts", "Decay", "ages_in_days", "days_before"]

DAY = 86_400


@dataclass(frozen=True)
class Decay:
    """Half-lives (days) of the counts' time decay; 0 means no decay.

    ``history_half_life_days``: the member's own purchases (the blend's repeat
    term, the edge's ``history_*`` arrays, the neighbour table).
    ``co_half_life_days``: co-purchase pairs and per-product counts (the guest
    model's tables, the member blend's co-purchase term). Both chosen on
    Complete Journey's validation month (README, "Evaluation").
    """

    history_half_life_days: float = 30.0  # validation HR@10 0.169 -> 0.181 on Complete Journey (best of 0-240)
    co_half_life_days: float = 0.0  # every half-life tried (60-480 days) lowered the guest's validation HR@10

    def __post_init__(self) -> None:
        for name in ("history_half_life_days", "co_half_life_days"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"decay.{name} must be a number >= 0 (0 = no decay), got {value!r}")

    @staticmethod
    def weight(half_life: float, ages: np.ndarray | float) -> np.ndarray:
        """``0.5 ** (ages / half_life)`` (float64), or ones when ``half_life`` is 0."""
        a = np.asarray(ages, dtype=np.float64)
        if not half_life:
            return np.ones_like(a)
        return np.power(0.5, a / float(half_life))

    def history_weight(self, ages: np.ndarray | float) -> np.ndarray:
        return self.weight(self.history_half_life_days, ages)

    def co_weight(self, ages: np.ndarray | float) -> np.ndarray:
        return self.weight(self.co_half_life_days, ages)


#: No decay at all (the counts are plain sums).
NO_DECAY = Decay(0.0, 0.0)


def ages_in_days(timestamps: np.ndarray, through_day: date, tz: str) -> np.ndarray:
    """Whole days from each timestamp's local date (``tz``) to ``through_day`` (0 = that day).

    Exact across DST changes: the local midnights of the days involved are
    computed once each and the timestamps placed between them.
    """
    ts = np.asarray(timestamps, dtype=np.int64)
    if not ts.size:
        return np.zeros(0, dtype=np.int64)
    zone = ZoneInfo(tz)

    def midnight(d: date) -> int:
        return int(datetime.combine(d, datetime.min.time(), zone).timestamp())

    end = midnight(through_day + timedelta(days=1))
    oldest = int(max(0, (end - int(ts.min())) // DAY)) + 2
    starts = np.array([midnight(through_day - timedelta(days=d)) for d in range(oldest, -2, -1)], dtype=np.int64)
    pos = np.searchsorted(starts, ts, side="right") - 1  # starts[pos] <= ts: day through_day - (oldest - pos)
    return np.maximum(oldest - pos, 0)


def days_before(timestamps: np.ndarray, end: int) -> np.ndarray:
    """Whole days from each timestamp to ``end`` (epoch seconds), UTC days; offline training and evaluation."""
    return np.maximum((int(end) - np.asarray(timestamps, dtype=np.int64)) // DAY, 0)


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
    """Co-purchase counts (sessions with both products), per-product session counts, member history.

    With a :class:`Decay` the numbers are decayed sums (each purchase weighted by
    its age, see the module docstring); ``through_day`` is the day they are
    "as of" (None: never decayed).
    """

    product_ids: np.ndarray  # str: the numbering of item, co and the history columns
    item: np.ndarray  # float32 [n_products]: sessions that bought the product
    co: sp.csr_matrix  # float32 [n_products, n_products], symmetric, zero diagonal
    member_ids: np.ndarray  # str: rows of history
    history: sp.csr_matrix  # float32 [n_members, n_products]: times a member bought a product
    sessions: int = 0  # sessions counted so far
    rows: int = 0  # item rows counted so far
    through_day: date | None = None  # the day the decayed counts are as of

    @classmethod
    def empty(cls) -> "Counts":
        none = np.array([], dtype=str)
        return cls(none, np.zeros(0, np.float32), sp.csr_matrix((0, 0), dtype=np.float32), none,
                   sp.csr_matrix((0, 0), dtype=np.float32))

    def decayed(self, days: int, decay: Decay, *, through_day: date | None = None) -> "Counts":
        """These counts ``days`` days later: co-purchase/product and history counts times their factors."""
        if days < 0:
            raise ValueError(f"cannot decay counts backwards ({days} days)")
        day = through_day if through_day is not None else (
            self.through_day + timedelta(days=days) if self.through_day is not None else None)
        f_co, f_hist = float(decay.co_weight(days)), float(decay.history_weight(days))
        item = self.item if f_co == 1.0 else (self.item * np.float32(f_co)).astype(np.float32)
        co = self.co if f_co == 1.0 else (self.co * np.float32(f_co)).tocsr().astype(np.float32)
        history = self.history if f_hist == 1.0 else (self.history * np.float32(f_hist)).tocsr().astype(np.float32)
        return Counts(self.product_ids, item, co, self.member_ids, history, self.sessions, self.rows, day)

    def add(self, log: PurchaseLog, *, ages: np.ndarray | None = None, decay: Decay | None = None,
            through_day: date | None = None) -> "Counts":
        """These counts plus ``log``'s sessions (each session counts a product or pair once).

        ``ages`` (whole days per row, 0 = the counts' day) with ``decay`` weight
        each purchase by its age: a session by its newest row for co-purchase
        and product counts, each row for the member history. Without them every
        purchase weighs 1. ``through_day`` is recorded as the counts' day.
        """
        day = through_day if through_day is not None else self.through_day
        if not len(log):
            return Counts(self.product_ids, self.item, self.co, self.member_ids, self.history, self.sessions,
                          self.rows, day)
        if ages is not None and len(ages) != len(log):
            raise ValueError("ages must have one entry per row of the log")
        decay = decay if decay is not None and ages is not None else NO_DECAY
        age = np.zeros(len(log), np.float64) if ages is None else np.asarray(ages, dtype=np.float64)
        products = _extend(self.product_ids, log.product_ids)
        n = len(products)
        cols = _index(products, log.product_ids)
        sess, session_of_row = np.unique(log.session_ids, return_inverse=True)
        session_age = np.full(len(sess), np.inf)
        np.minimum.at(session_age, session_of_row, age)
        basket = sp.csr_matrix((np.ones(len(log), np.float32), (session_of_row, cols)), shape=(len(sess), n))
        basket.sum_duplicates()
        basket.data[:] = 1.0
        weighted = basket
        if decay.co_half_life_days:
            weighted = sp.csr_matrix(sp.diags(decay.co_weight(session_age).astype(np.float32)) @ basket)
        item = np.zeros(n, np.float32)
        item[: len(self.item)] = self.item
        item += np.asarray(weighted.sum(axis=0), dtype=np.float32).ravel()
        co = (basket.T @ weighted).tocsr()
        co.setdiag(0)
        co.eliminate_zeros()
        co = (_grow(self.co, (n, n)) + co).tocsr().astype(np.float32)
        members = log.user_ids != ""
        member_ids = _extend(self.member_ids, log.user_ids[members])
        hist = sp.csr_matrix((decay.history_weight(age[members]).astype(np.float32),
                              (_index(member_ids, log.user_ids[members]), cols[members])),
                             shape=(len(member_ids), n))
        history = (_grow(self.history, (len(member_ids), n)) + hist).tocsr().astype(np.float32)
        return Counts(products, item, co, member_ids, history, self.sessions + len(sess), self.rows + len(log), day)

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

    def history_matrix(self, member_ids: np.ndarray, product_ids: np.ndarray) -> sp.csr_matrix:
        """The history with rows ``member_ids`` and columns ``product_ids`` (absent ones: zeros)."""
        return _select(self.history, self.member_ids, self.product_ids, member_ids, product_ids)

    # -- files -----------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        co, hist = self.co.tocsr(), self.history.tocsr()
        arrays = {"product_ids": self.product_ids.astype(str), "member_ids": self.member_ids.astype(str),
                  "item": self.item, "co_indptr": co.indptr, "co_indices": co.indices, "co_data": co.data,
                  "hist_indptr": hist.indptr, "hist_indices": hist.indices, "hist_data": hist.data}
        for name, arr in arrays.items():
            np.save(directory / f"{name}.npy", arr, allow_pickle=False)
        meta = {"sessions": self.sessions, "rows": self.rows,
                "through_day": self.through_day.isoformat() if self.through_day else None}
        (directory / "counts.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> "Counts":
        a = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in _FILES}
        meta = json.loads((directory / "counts.json").read_text())
        n, m = len(a["product_ids"]), len(a["member_ids"])
        co = sp.csr_matrix((a["co_data"], a["co_indices"], a["co_indptr"]), shape=(n, n))
        hist = sp.csr_matrix((a["hist_data"], a["hist_indices"], a["hist_indptr"]), shape=(m, n))
        day = meta.get("through_day")
        return cls(a["product_ids"].astype(str), a["item"].astype(np.float32), co, a["member_ids"].astype(str),
                   hist, int(meta["sessions"]), int(meta["rows"]), date.fromisoformat(day) if day else None)

    def equals(self, other: "Counts") -> bool:
        """Same ids, same numbers (for idempotence checks)."""
        return (np.array_equal(self.product_ids, other.product_ids)
                and np.array_equal(self.member_ids, other.member_ids)
                and np.array_equal(self.item, other.item)
                and (self.co != other.co).nnz == 0 and (self.history != other.history).nnz == 0
                and self.sessions == other.sessions and self.rows == other.rows)

    def allclose(self, other: "Counts", rtol: float = 1e-5, atol: float = 1e-6) -> bool:
        """Same ids and sessions, numbers equal to float tolerance (decayed counts summed in another order)."""
        if not (np.array_equal(self.product_ids, other.product_ids)
                and np.array_equal(self.member_ids, other.member_ids)
                and self.sessions == other.sessions and self.rows == other.rows):
            return False

        def close(a: sp.spmatrix, b: sp.spmatrix) -> bool:
            if a.shape != b.shape:
                return False
            diff = (a - b).tocoo()
            if not diff.nnz:
                return True
            ref = np.abs(np.asarray(b.tocsr()[diff.row, diff.col]).ravel())
            return bool(np.all(np.abs(diff.data) <= atol + rtol * ref))

        return bool(np.allclose(self.item, other.item, rtol=rtol, atol=atol)
                    and close(self.co.tocsr(), other.co.tocsr()) and close(self.history.tocsr(), other.history.tocsr()))


def _select(m: sp.csr_matrix, row_ids: np.ndarray, col_ids: np.ndarray, rows: np.ndarray,
            cols: np.ndarray) -> sp.csr_matrix:
    """``m`` (rows ``row_ids``, columns ``col_ids``) re-indexed to ``rows`` x ``cols``; absent ids give zeros."""
    def picker(have: np.ndarray, want: np.ndarray) -> sp.csr_matrix:
        pos = {p: i for i, p in enumerate(have.tolist())}
        src = np.fromiter((pos.get(p, -1) for p in np.asarray(want).tolist()), np.int64, len(want))
        ok = src >= 0
        return sp.csr_matrix((np.ones(int(ok.sum()), np.float32), (np.flatnonzero(ok), src[ok])),
                             shape=(len(want), len(have)))

    return (picker(row_ids, rows) @ m @ picker(col_ids, cols).T).tocsr().astype(np.float32)

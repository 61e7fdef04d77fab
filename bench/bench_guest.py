"""Guest ``recommend()`` latency on a 50,000-product catalogue with 10-item carts.

Side by side: the edge's precomputed-table recommender and a straightforward
implementation of the seed that calls ``NearestNeighbors.kneighbors`` and walks
the co-purchase dict per request. Run: ``.venv/bin/python bench/bench_guest.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter

import joblib

# first: it pins BLAS to one thread before numpy loads, as the agent does
from common import (
    large_parameters,
    plot_results,
    print_table,
    sample_carts,
    summary,
    time_calls,
    time_interleaved,
    without_kernels,
    write_json,
)

from agent.recommenders import native
from agent.recommenders.base import RecommendRequest
from agent.recommenders.guest import GuestRecommender
from agent.registry import load_snapshot


class SeedGuest:
    """The seed's algorithm done the obvious way: kneighbors per request."""

    def __init__(self, guest_dir, co_top_k_per_item=20, expand_top=10, sim_top_k=5) -> None:
        self.knn = joblib.load(guest_dir / "knn_model.pkl")
        self.tags = joblib.load(guest_dir / "tag_matrix.pkl")
        self.co = joblib.load(guest_dir / "co_purchase_dict.pkl")
        self.ids = joblib.load(guest_dir / "df_items.pkl")["id"].tolist()
        self.index = {p: i for i, p in enumerate(self.ids)}
        self.k, self.expand, self.sim_k = co_top_k_per_item, expand_top, sim_top_k

    def recommend(self, cart, top_k=10):
        scores: Counter = Counter()
        for item in cart:
            for other, c in list(self.co.get(item, {}).items())[: self.k]:
                scores[other] += c
        cand = [p for p, _ in scores.most_common(self.expand)]
        base = cand if cand else list(cart)
        rows = [self.index[p] for p in base if p in self.index]
        if rows:
            dist, idx = self.knn.kneighbors(self.tags[rows], n_neighbors=self.sim_k + 1)
            for d_row, i_row in zip(dist, idx):
                for d, i in zip(d_row, i_row):
                    scores[self.ids[i]] += 0.3 * (1 - d)
        excluded = set(cart)
        return [p for p, _ in scores.most_common() if p not in excluded][:top_k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--seed-calls", type=int, default=1_000, help="calls for the slow seed version")
    args = ap.parse_args()

    params = large_parameters(member=False)
    snap = load_snapshot(params, None, allow_unsigned=True)
    guest = snap.guest
    carts = sample_carts(params, args.calls)
    requests = [RecommendRequest(cart=c, top_k=10) for c in carts]
    assert native.KERNELS is not None, f"the recommenders' hot path is {native.status()}"
    ours, numpy_code = (summary(t) for t in time_interleaved([guest.recommend, without_kernels(guest.recommend)],
                                                            requests))
    no_baskets = dataclasses.replace(guest.params, basket_weight=0.0)
    plain_guest = GuestRecommender(guest.item_ids_, None, None, guest.sim_neighbors_, guest.sim_scores_,
                                   guest.popular_, no_baskets, co_partners=guest.co_)
    plain = summary(time_calls(plain_guest.recommend, requests))
    seed = SeedGuest(params / "guest_model")
    theirs = summary(time_calls(seed.recommend, carts[: args.seed_calls], warmup=20))
    ratio = round(theirs["p50_ms"] / ours["p50_ms"], 1)
    print_table(f"guest recommend(), {guest.n_items:,} products, 10-item cart, batch 1",
                ["implementation", "calls", "p50 ms", "p99 ms", "mean ms"],
                [[f"edge (precomputed tables{' + recent baskets' if guest.baskets_ is not None else ''})",
                  ours["calls"], ours["p50_ms"], ours["p99_ms"], ours["mean_ms"]],
                 ["edge, numpy code (no compiled kernels)", numpy_code["calls"], numpy_code["p50_ms"],
                  numpy_code["p99_ms"], numpy_code["mean_ms"]],
                 ["edge without the recent-baskets term", plain["calls"], plain["p50_ms"], plain["p99_ms"],
                  plain["mean_ms"]],
                 ["seed (kneighbors per request)", theirs["calls"], theirs["p50_ms"], theirs["p99_ms"],
                  theirs["mean_ms"]],
                 ["speed-up (p50)", "", f"{ratio}x", "", ""]])
    write_json("guest", {"n_items": guest.n_items, "cart_size": 10, "edge": ours, "edge_numpy": numpy_code,
                         "edge_no_baskets": plain,
                         "params": dataclasses.asdict(guest.params), "seed": theirs,
                         "speedup_p50": ratio,
                         "goal": {"p50_ms": 0.1, "p99_ms": 0.5}})
    plot_results("guest")


if __name__ == "__main__":
    main()

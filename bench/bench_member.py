"""Member ``recommend()`` latency on 50,000 products, batch 1, one thread.

Side by side: the edge recommender with the int8 ONNX user tower, the same
with the fp32 ONNX file, and calling the Keras user tower per request (what
serving without the export would cost). Also: file sizes, and the resident
memory of a fresh edge process with both models loaded.
Run: ``.venv/bin/python bench/bench_member.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

# first: it pins BLAS to one thread before numpy loads, as the agent does
from common import (
    ROOT,
    large_parameters,
    large_store_files,
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
from agent.recommenders.features import CONTEXT_LENGTH, age_bucket, encode_context, gender_index
from agent.recommenders.member import MemberRecommender
from agent.registry import load_snapshot

MEMORY_PROBE = """
import sys, json
sys.path.insert(0, {root!r})
from bench.common import rss_mb
before = rss_mb()
from agent.registry import load_snapshot
from agent.recommenders.base import RecommendRequest
snap = load_snapshot({params!r}, None, allow_unsigned=True)
user = next(iter(snap.member.user_index_))
for _ in range(200):
    snap.recommend(RecommendRequest(cart=tuple(snap.guest.item_ids_[:10].tolist()), user_id=user))
print(json.dumps({{"python_mb": before, "loaded_mb": rss_mb()}}))
"""


def requests_for(snap, n: int, params) -> list[RecommendRequest]:
    users = [u for u in snap.member.user_index_ if u != "[UNK]"]
    rng = np.random.default_rng(1)
    carts = sample_carts(params, n)
    return [RecommendRequest(cart=c, user_id=users[int(rng.integers(len(users)))],
                             gender=int(rng.integers(2)), age=int(rng.integers(18, 80))) for c in carts]


def keras_recommender(state, snap):
    """Serve with the Keras user tower per request (+ the same numpy scoring)."""
    emb = snap.member.item_embeddings_
    user_index = {u: i for i, u in enumerate(state.user_lookup.tolist())}
    ctx_index = {p: i for i, p in enumerate(state.context_lookup.tolist())}
    ids = snap.member.item_ids_

    def recommend(req: RecommendRequest) -> list[str]:
        feed = {"user_index": np.array([user_index.get(req.user_id, 0)]),
                "gender_index": np.array([gender_index(req.gender)]),
                "age_bucket": np.array([age_bucket(req.age)]),
                "context_index": encode_context(req.cart + req.wishlist, ctx_index).reshape(1, CONTEXT_LENGTH)}
        u = state.user_model(feed, training=False).numpy()[0]
        s = emb @ u
        s[[snap.member.item_index_[p] for p in req.excluded if p in snap.member.item_index_]] = -np.inf
        top = np.argpartition(-s, req.top_k)[: req.top_k]
        return ids[top[np.argsort(-s[top])]].tolist()

    return recommend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--keras-calls", type=int, default=500)
    args = ap.parse_args()

    params = large_parameters(member=True)
    snap = load_snapshot(params, None, allow_unsigned=True)
    member = snap.member
    reqs = requests_for(snap, args.calls, params)
    assert native.KERNELS is not None, f"the recommenders' hot path is {native.status()}"
    int8, int8_numpy = (summary(t) for t in time_interleaved([member.recommend, without_kernels(member.recommend)],
                                                            reqs))
    md = params / "member_model"
    lookups = np.load(md / "user_lookup.npy").tolist(), np.load(md / "context_lookup.npy").tolist()
    assert member.reranker_ is not None, "the benchmark bundle has no reranker"
    # the reranker turned off (member.rerank: false in agent.yaml): the blend alone
    no_rerank = load_snapshot(params, None, allow_unsigned=True, member_overrides={"rerank": False}).member
    int8_no_rerank = summary(time_calls(no_rerank.recommend, reqs))
    # the store's-baskets term turned off too (member.store_weight: 0)
    no_store = load_snapshot(params, None, allow_unsigned=True,
                             member_overrides={"store_weight": 0.0, "rerank": False}).member
    int8_no_store = summary(time_calls(no_store.recommend, reqs))
    # the item embeddings row-major, as bundles were written before (a private copy here)
    row_major = MemberRecommender(md.joinpath("two_tower_model_quantized.onnx").read_bytes(), *lookups,
                                  member.item_ids_, np.ascontiguousarray(member.item_embeddings_),
                                  history=member.history_, guest=snap.guest, params=member.params,
                                  baskets=member.baskets_, reranker=member.reranker_)
    assert row_major.item_embeddings_.flags.c_contiguous and member.item_embeddings_.flags.f_contiguous
    int8_row_major = summary(time_calls(row_major.recommend, reqs))
    fp32_rec = MemberRecommender((md / "two_tower_model.onnx").read_bytes(), *lookups,
                                 np.load(md / "item_lookup.npy"), np.load(md / "item_embeddings.npy"),
                                 history=member.history_, guest=snap.guest, params=member.params,
                                 baskets=member.baskets_, reranker=member.reranker_)
    fp32 = summary(time_calls(fp32_rec.recommend, reqs))
    tower_int8 = summary(time_calls(member.user_vector, reqs))
    tower_fp32 = summary(time_calls(fp32_rec.user_vector, reqs))

    # The Keras model itself: train the same architecture on the same store (default epochs).
    from retrain_server import member as member_train
    from retrain_server.data import load_products, load_purchases

    prod, purch = large_store_files()
    t0 = time.perf_counter()
    train_cfg = member_train.MemberTrainingConfig()
    state = member_train.train_member_model(load_purchases(purch), load_products(prod).ids.tolist(), train_cfg)
    train_s = time.perf_counter() - t0
    keras = summary(time_calls(keras_recommender(state, snap), reqs[: args.keras_calls], warmup=20))

    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(root=str(ROOT), params=str(params))],
                           capture_output=True, text=True, check=True, cwd=ROOT)
    mem = json.loads(probe.stdout.strip().splitlines()[-1])
    sizes = {f: round((md / f).stat().st_size / 2**20, 2)
             for f in ("two_tower_model_quantized.onnx", "two_tower_model.onnx", "item_embeddings.npy")}
    n_items = len(member.item_ids_)
    print_table(f"member recommend(), {n_items:,} products, batch 1, 1 thread",
                ["implementation", "calls", "p50 ms", "p99 ms", "mean ms"],
                [["edge, int8 ONNX (shipped: reranker, store's baskets on, column-major)", int8["calls"],
                  int8["p50_ms"], int8["p99_ms"], int8["mean_ms"]],
                 ["edge, int8, shipped, numpy code (no compiled kernels)", int8_numpy["calls"],
                  int8_numpy["p50_ms"], int8_numpy["p99_ms"], int8_numpy["mean_ms"]],
                 ["edge, int8, reranker off (member.rerank: false)", int8_no_rerank["calls"],
                  int8_no_rerank["p50_ms"], int8_no_rerank["p99_ms"], int8_no_rerank["mean_ms"]],
                 ["edge, int8, reranker and store's baskets off", int8_no_store["calls"],
                  int8_no_store["p50_ms"], int8_no_store["p99_ms"], int8_no_store["mean_ms"]],
                 ["edge, int8, item embeddings row-major (bundles before)", int8_row_major["calls"],
                  int8_row_major["p50_ms"], int8_row_major["p99_ms"], int8_row_major["mean_ms"]],
                 ["edge, fp32 ONNX", fp32["calls"], fp32["p50_ms"], fp32["p99_ms"], fp32["mean_ms"]],
                 ["Keras user tower per request", keras["calls"], keras["p50_ms"], keras["p99_ms"], keras["mean_ms"]],
                 ["user tower only, int8", tower_int8["calls"], tower_int8["p50_ms"], tower_int8["p99_ms"], ""],
                 ["user tower only, fp32", tower_fp32["calls"], tower_fp32["p50_ms"], tower_fp32["p99_ms"], ""]])
    print_table("files and memory", ["what", "value"],
                [["int8 ONNX size (MB)", sizes["two_tower_model_quantized.onnx"]],
                 ["fp32 ONNX size (MB)", sizes["two_tower_model.onnx"]],
                 ["item_embeddings.npy (MB)", sizes["item_embeddings.npy"]],
                 ["edge process RSS, both models loaded (MB)", mem["loaded_mb"]],
                 ["  of which bare Python + numpy (MB)", mem["python_mb"]],
                 [f"Two-Tower training, {train_cfg.epochs} epochs on the 1M-row store (s)", round(train_s, 1)]])
    write_json("member", {"n_items": n_items, "int8": int8, "int8_numpy": int8_numpy,
                          "int8_without_reranker": int8_no_rerank,
                          "int8_without_reranker_and_store_term": int8_no_store,
                          "rerank_trees": int(json.loads((md / "member_meta.json").read_text())["rerank"]["fit"]
                                              ["chosen"]["trees"]),
                          "int8_row_major_embeddings": int8_row_major,
                          "fp32": fp32, "keras": keras,
                          "user_tower_int8": tower_int8, "user_tower_fp32": tower_fp32,
                          "sizes_mb": sizes, "memory_mb": mem, "train_s": round(train_s, 1),
                          "train_epochs": train_cfg.epochs,
                          "goal": {"p50_ms": 0.3, "p99_ms": 1.0, "rss_mb": 150}})
    plot_results("member")


if __name__ == "__main__":
    main()

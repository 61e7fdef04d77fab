"""Answers with the compiled kernels equal the numpy code's, here (run by scripts/check_aarch64.sh on aarch64).

Loads a parameters directory as the agent does, asks guest and member requests
(random carts, wishlists and unknown ids; every other one from a random member) with the kernels and again
with ``native.KERNELS = None``, and exits 1 unless every answer is the same.
``python scripts/aarch64_answers.py PARAMETERS [N]``.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent.recommenders import native
from agent.recommenders.base import RecommendRequest
from agent.registry import load_snapshot


def requests(snap, n: int, seed: int = 9) -> list[RecommendRequest]:
    ids = snap.guest.item_ids_
    members = [] if snap.member is None else [u for u, row in snap.member.user_index_.items() if row > 0 and u]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cart = tuple(ids[rng.integers(0, len(ids), rng.integers(0, 12))].tolist())
        wish = tuple(ids[rng.integers(0, len(ids), rng.integers(0, 3))].tolist())
        if i % 7 == 0:
            cart += ("no-such-product",)
        member = members[int(rng.integers(0, len(members)))] if members and i % 2 else None
        out.append(RecommendRequest(cart=cart, wishlist=wish, top_k=int(rng.integers(1, 20)), user_id=member))
    return out


def main() -> int:
    root = Path(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    snap = load_snapshot(root, None, allow_unsigned=True)
    kernels = native.KERNELS
    if kernels is None:
        print(f"{platform.machine()}: the compiled kernels are not loaded ({native.status()})")
        return 1
    reqs = requests(snap, n)
    t0 = time.perf_counter()
    fast = [snap.recommend(r) for r in reqs]
    t1 = time.perf_counter()
    native.KERNELS = None
    try:
        slow = [snap.recommend(r) for r in reqs]
    finally:
        native.KERNELS = kernels
    t2 = time.perf_counter()
    by_model: dict[str, list[int]] = {}
    for a, b in zip(fast, slow):
        same = a.ids == b.ids and a.model == b.model and a.unknown == b.unknown
        by_model.setdefault(a.model, [0, 0])[0 if same else 1] += 1
    print(f"{platform.machine()} ({root.name}): " + ", ".join(
        f"{model} {ok}/{ok + bad} identical" for model, (ok, bad) in sorted(by_model.items()))
        + f"; {(t1 - t0) / n * 1e3:.2f} ms a request with the kernels, {(t2 - t1) / n * 1e3:.2f} without")
    return 0 if all(bad == 0 for _, bad in by_model.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared benchmark plumbing: the 50k-product store, timing, table + JSON output."""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as the agent does (agent/cli.py): batch 1, one thread

import json
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data"
RESULTS = ROOT / "bench" / "results"

sys.path.insert(0, str(ROOT))


def large_store_files(products: int = 50_000, rows: int = 1_000_000) -> tuple[Path, Path]:
    """products.csv + purchase_history.jsonl for the benchmark store (cached)."""
    from retrain_server.data import write_products, write_purchases
    from retrain_server.synth import make_store

    d = DATA / f"store-{products}"
    prod, purch = d / "products.csv", d / "purchase_history.jsonl"
    if not (prod.exists() and purch.exists()):
        d.mkdir(parents=True, exist_ok=True)
        store = make_store(products, rows, max(100, products // 10), n_families=max(20, products // 50))
        write_products(prod, store.catalog)
        write_purchases(purch, store.purchases)
    return prod, purch


def large_parameters(member: bool, products: int = 50_000) -> Path:
    """A trained, unsigned parameters dir for the benchmark store (cached)."""
    from retrain_server.train import train_bundle

    out = DATA / f"params-{products}-{'member' if member else 'guest'}"
    if not (out / "manifest.json").exists():
        prod, purch = large_store_files(products)
        t0 = time.perf_counter()
        train_bundle(prod, purch, out, None, member=member)
        print(f"trained {out.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def sample_carts(params: Path, n: int, size: int = 10, seed: int = 0) -> list[tuple[str, ...]]:
    """Carts of ``size`` products drawn from the store's own baskets' families."""
    ids = np.load(params / "guest_model" / "item_ids.npy")
    co = np.load(params / "guest_model" / "co_neighbors.npy")
    rng = np.random.default_rng(seed)
    carts = []
    for _ in range(n):
        first = int(rng.integers(len(ids)))
        partners = co[first][co[first] >= 0]
        pool = np.concatenate([[first], partners[: size * 2]])
        pick = pool if len(pool) <= size else np.concatenate([[first], rng.choice(pool[1:], size - 1, replace=False)])
        if len(pick) < size:
            pick = np.concatenate([pick, rng.choice(len(ids), size - len(pick), replace=False)])
        carts.append(tuple(ids[pick].tolist()))
    return carts


def time_calls(fn: Callable[[Any], Any], args: Sequence[Any], warmup: int = 200) -> np.ndarray:
    """Per-call wall time in ms for ``fn(a)`` over ``args``."""
    for a in args[:warmup]:
        fn(a)
    out = np.empty(len(args))
    clock = time.perf_counter_ns
    for i, a in enumerate(args):
        t = clock()
        fn(a)
        out[i] = (clock() - t) / 1e6
    return out


def summary(ms: np.ndarray) -> dict[str, float]:
    return {"calls": int(ms.size), "p50_ms": round(float(np.percentile(ms, 50)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4), "mean_ms": round(float(ms.mean()), 4)}


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process (this one by default), from /proc."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return round(kb / 1024, 1)


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path.relative_to(ROOT)}")
    return path

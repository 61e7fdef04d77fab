"""Shared benchmark plumbing: the 50k-product store, timing, table + JSON + PNG output.

Every benchmark writes ``bench/results/<name>.json`` and, from that JSON alone,
``bench/results/<name>.png`` (:func:`plot_results`), so a plot can be redrawn
without measuring again: ``python bench/common.py [NAME ...]`` redraws the
plots of every result present. matplotlib (the ``server`` extra) is imported
only when plotting; the edge never needs it.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # as the agent does (agent/cli.py): batch 1, one thread

import json
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    from agent import layout
    from retrain_server.train import train_bundle

    out = DATA / f"params-{products}-{'member' if member else 'guest'}"
    if (out / "manifest.json").exists() and (not (out / layout.GUEST_BASKETS["starts"]).exists()
                                             or not (out / layout.GUEST_CO_PARTNERS["indptr"]).exists()
                                             or (member and not (_serving_is_current(out)
                                                                 and _column_major_embeddings(out)
                                                                 and _rerank_is_current(out)))):
        shutil.rmtree(out)  # trained before the recent-basket tables, the unpadded co-purchase partners,
        # today's blend units, column-major embeddings or the reranker
    if not (out / "manifest.json").exists():
        prod, purch = large_store_files(products)
        t0 = time.perf_counter()
        train_bundle(prod, purch, out, None, member=member)
        print(f"trained {out.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def _serving_is_current(params: Path) -> bool:
    """True when the member blend weights in ``params`` name every term the edge knows, in today's units."""
    from agent import layout
    from agent.recommenders.member import ScoreParts
    from retrain_server.blend import TERMS, BlendUnits

    try:
        serving = json.loads((params / layout.MEMBER_META).read_text()).get("serving") or {}
    except (OSError, ValueError):
        return False
    units = BlendUnits()
    return all(w in serving for w in ScoreParts.WEIGHTS) and all(
        serving.get(f"{t}_units") == getattr(units, f"{t}_units") for t in TERMS)


def _rerank_is_current(params: Path) -> bool:
    """True when ``params`` has a member reranker fitted with today's :class:`RerankConfig` defaults."""
    from dataclasses import asdict

    from agent import layout
    from retrain_server.rerank import RerankConfig

    try:
        meta = json.loads((params / layout.MEMBER_META).read_text()).get("rerank") or {}
    except (OSError, ValueError):
        return False
    return (params / layout.MEMBER_RERANK_TREES).exists() and meta.get("config") == json.loads(
        json.dumps(asdict(RerankConfig())))


def _column_major_embeddings(params: Path) -> bool:
    """True when ``item_embeddings.npy`` is stored column-major, as retrain-server writes it now."""
    from agent import layout

    try:
        return bool(np.load(params / layout.MEMBER_ARRAYS["item_embeddings"], mmap_mode="r").flags.f_contiguous)
    except (OSError, ValueError):
        return False


def stop_process(proc: Any, timeout: float = 15.0) -> None:
    """SIGTERM a child (an agent draining its queue), SIGKILL it after ``timeout``; None or exited: nothing."""
    import signal
    import subprocess

    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def read_only_copy(params: Path, dest: Path) -> Path:
    """A copy of a parameters dir with read-only files, as the agent's store installs versions."""
    import shutil

    if not dest.exists():
        shutil.copytree(params, dest, ignore=shutil.ignore_patterns("versions"))
        for p in dest.rglob("*"):
            if p.is_file():
                p.chmod(0o444)
    return dest


def installed_copy(params: Path, parameters_dir: Path) -> Path:
    """A parameters dir holding ``params`` as a version its store installed (``versions/<version>/``,
    read-only files): what a basket serves after its first update, memory-mapped (agent.bundle)."""
    version = json.loads((params / "manifest.json").read_text())["version"]
    read_only_copy(params, parameters_dir / "versions" / version)
    return parameters_dir


def sample_carts(params: Path, n: int, size: int = 10, seed: int = 0) -> list[tuple[str, ...]]:
    """Carts of ``size`` products drawn from the store's own baskets' families."""
    from agent import layout

    ids = np.load(params / layout.GUEST_ARRAYS["item_ids"])
    indptr = np.load(params / layout.GUEST_CO_PARTNERS["indptr"])
    co = np.load(params / layout.GUEST_CO_PARTNERS["items"])  # best partners first, as the padded rows
    rng = np.random.default_rng(seed)
    carts = []
    for _ in range(n):
        first = int(rng.integers(len(ids)))
        partners = co[indptr[first]:indptr[first + 1]]
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


def time_interleaved(fns: Sequence[Callable[[Any], Any]], args: Sequence[Any], rounds: int = 4,
                     warmup: int = 200) -> list[np.ndarray]:
    """:func:`time_calls` of several functions over the same ``args``, in ``rounds`` slices taken in turn
    (order reversed every other round), so a slow minute of the machine falls on all of them."""
    out: list[list[np.ndarray]] = [[] for _ in fns]
    bounds = np.linspace(0, len(args), rounds + 1).astype(int)
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            out[i].append(time_calls(fns[i], args[bounds[r]:bounds[r + 1]], warmup=warmup if r == 0 else 20))
    return [np.concatenate(parts) for parts in out]


def without_kernels(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``fn`` served by the recommenders' numpy code (as with SMART_BASKET_NATIVE=0 or no compiler)."""
    from agent.recommenders import native

    def call(a: Any) -> Any:
        kernels, native.KERNELS = native.KERNELS, None
        try:
            return fn(a)
        finally:
            native.KERNELS = kernels
    return call


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


# -- plots ------------------------------------------------------------------------------------
_PCTS = (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9"), ("max_ms", "max"))
_KIND_COLORS = {"baseline": "#9aa3ad", "guest": "#1f5fbf", "member": "#c2570c", "fallback": "#e3a46f"}
_PCT_COLORS = ("#0b3d91", "#3f76c4", "#86b3e3", "#b9d3ef", "#dfe8f4")


def _plain_log_axis(axis: Any) -> None:
    """A log axis labelled 0.1, 1, 10 (not 10^-1), minor ticks included."""
    import math

    from matplotlib.ticker import FuncFormatter

    def minor(v: float, _pos: Any) -> str:
        lo, hi = sorted(axis.get_view_interval())
        if v <= 0 or lo <= 0:
            return ""
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        return f"{v:g}" if math.log10(hi / lo) < 0.8 or mantissa in (2, 5) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def _scenario_color(name: str, i: int) -> str:
    for kind in ("member", "guest"):
        if kind in name:
            return _KIND_COLORS[kind]
    return ("#5b6472", "#2a9d8f", "#8e44ad")[i % 3]


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None (with a note) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[server]'): no plot written", file=sys.stderr)
        return None
    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def plot_latency_bars(path: Path, title: str, series: Mapping[str, Mapping[str, Any]],
                      goals: Mapping[str, float] | None = None) -> Path | None:
    """Grouped horizontal bars, one group per implementation, one bar per percentile present (log ms axis).

    ``goals`` ({"p50": 0.1, "p99": 0.5}) become dashed vertical lines.
    """
    plt = _pyplot()
    if plt is None:
        return None
    keys = [(k, label) for k, label in _PCTS if any(s.get(k) is not None for s in series.values())]
    names = list(series)
    fig, ax = plt.subplots(figsize=(8, max(2.4, 0.42 * len(names) * max(1, len(keys)) ** 0.5 + 1.2)))
    height = 0.8 / len(keys)
    for j, (k, label) in enumerate(keys):
        ys = [i + (j - (len(keys) - 1) / 2) * height for i in range(len(names))]
        vals = [float(series[n].get(k) or float("nan")) for n in names]
        bars = ax.barh(ys, vals, height=height * 0.92, color=_PCT_COLORS[j % len(_PCT_COLORS)],
                       edgecolor="#0b3d91", linewidth=0.5, label=label)
        ax.bar_label(bars, labels=[f"{v:.3g}" if v == v else "" for v in vals], padding=2, fontsize=7)
    for g, (label, ms) in enumerate((goals or {}).items()):
        ax.axvline(ms, color="#b3261e", linestyle=(0, (4, 2 + 2 * g)), linewidth=1)
        ax.text(ms, -0.62, f" goal {label} {ms:g} ms", color="#b3261e", fontsize=7, va="bottom")
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.95 if goals else -0.5)  # inverted: first name on top, room for goals
    ax.set_xscale("log")
    _plain_log_axis(ax.xaxis)
    ax.set_xlabel("milliseconds (log scale)")
    ax.set_title(title, loc="left", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def plot_latency_ladder(path: Path, title: str, panels: Mapping[str, Mapping[str, Mapping[str, Any]]],
                        goal_ms: float | None = None) -> Path | None:
    """Latency distributions as percentile ladders (p50 .. max), one line per scenario, one panel per group."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items()):
        for i, (name, row) in enumerate(series.items()):
            pts = [(label, row[k]) for k, label in _PCTS if row.get(k) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                        color=_scenario_color(name, i))
        if goal_ms is not None and panel.startswith("paced"):
            ax.axhline(goal_ms, color="#b3261e", linestyle="--", linewidth=1)
            ax.text(0, goal_ms, f" goal p99 {goal_ms:g} ms", color="#b3261e", fontsize=7, va="bottom")
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
        ax.set_ylabel("ms (log scale)")
        ax.set_title(panel, loc="left", fontsize=9)
        ax.grid(axis="y", color="#e6e9ef")
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title, x=0.01, ha="left", fontsize=10)
    return _save(fig, path)


def plot_hit_rates(path: Path, title: str, rows: Sequence[Mapping[str, Any]]) -> Path | None:
    """HR@10 by method as horizontal bars coloured by kind (baseline, guest, member, fallback)."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = [r for r in rows if r.get("hr") is not None]
    fig, ax = plt.subplots(figsize=(9.5, 0.32 * len(rows) + 1.3))
    names = [str(r["method"]) if len(str(r["method"])) <= 70 else str(r["method"])[:67] + "..." for r in rows]
    vals = [float(r["hr"]) for r in rows]
    bars = ax.barh(range(len(rows)), vals, color=[_KIND_COLORS.get(r.get("kind"), "#666") for r in rows])
    ax.bar_label(bars, labels=[f"{v:.4f}" for v in vals], padding=2, fontsize=7)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.set_xlabel("HR@10 (higher is better)")
    fig.suptitle(title, x=0.01, ha="left", fontsize=10)
    # Issue 10's goals: guest >= 1.5x item co-occurrence, member >= 1.4x the member's own favourites.
    base = [r for r in rows if r.get("kind") == "baseline"]
    co = next((float(r["hr"]) for r in base if "co-occurrence" in str(r["method"])), None)
    own = next((float(r["hr"]) for r in base if "own most frequent" in str(r["method"])), None)
    goal_lines = []
    for ref, factor, label, color in ((co, 1.5, "guest goal: 1.5x co-occurrence", _KIND_COLORS["guest"]),
                                      (own, 1.4, "member goal: 1.4x own favourites", _KIND_COLORS["member"])):
        if ref:
            goal_lines.append(ax.axvline(factor * ref, color=color, linestyle=":", linewidth=1.2, label=label))
    ax.set_ylim(len(rows) - 0.5, -0.5)
    from matplotlib.patches import Patch

    kinds = [k for k in _KIND_COLORS if any(r.get("kind") == k for r in rows)]
    ax.legend(handles=[Patch(color=_KIND_COLORS[k], label=k) for k in kinds] + goal_lines, loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax.set_xlim(0, max(vals) * 1.18 if vals else 1)
    return _save(fig, path)


def _plot_guest(doc: Mapping[str, Any], out: Path) -> Path | None:
    goal = doc.get("goal", {})
    return plot_latency_bars(out, f"guest recommend(), {doc.get('n_items', 0):,} products, 10-item cart, batch 1",
                             {k: v for k, v in {"edge: precomputed tables (shipped)": doc["edge"],
                                                "edge, numpy code (no compiled kernels)": doc.get("edge_numpy") or {},
                                                "seed: kneighbors per request": doc["seed"]}.items() if v},
                             {"p50": goal.get("p50_ms", 0.1), "p99": goal.get("p99_ms", 0.5)})


def _plot_member(doc: Mapping[str, Any], out: Path) -> Path | None:
    goal = doc.get("goal", {})
    series = {"edge, int8 ONNX (shipped)": doc["int8"],
              "edge, numpy code (no compiled kernels)": doc.get("int8_numpy") or {},
              "edge, int8, reranker off": doc.get("int8_without_reranker") or {},
              "edge, int8, reranker and store's baskets off": doc.get("int8_without_reranker_and_store_term") or {},
              "edge, int8, row-major embeddings": doc.get("int8_row_major_embeddings") or {},
              "edge, fp32 ONNX": doc["fp32"],
              "Keras user tower per request": doc.get("keras") or {},
              "user tower only, int8": doc.get("user_tower_int8") or {},
              "user tower only, fp32": doc.get("user_tower_fp32") or {}}
    return plot_latency_bars(out, f"member recommend(), {doc.get('n_items', 0):,} products, batch 1, 1 thread",
                             {k: v for k, v in series.items() if v},
                             {"p50": goal.get("p50_ms", 0.3), "p99": goal.get("p99_ms", 1.0)})


def _plot_e2e(doc: Mapping[str, Any], out: Path) -> Path | None:
    rows = doc.get("rows", [])
    paced = {r["scenario"]: r for r in rows if not r["scenario"].endswith("saturation")}
    sat = {r["scenario"]: r for r in rows if r["scenario"].endswith("saturation")}
    panels = {f"paced, {doc.get('rate', 500):g} events/s": paced}
    if sat:
        panels[f"saturation, {doc.get('window', 64)} in flight"] = sat
    return plot_latency_ladder(out, "sensor publish -> recommendation received, through Mosquitto (QoS 1)", panels,
                               doc.get("goal", {}).get("p99_ms_at_500"))


def _plot_eval(doc: Mapping[str, Any], out: Path) -> Path | None:
    k, rows = doc.get("k", 10), doc.get("rows", [])
    n = max((r.get("n") or 0 for r in rows), default=0)
    return plot_hit_rates(out, f"Complete Journey, test month: HR@{k} by method ({n:,} test baskets)", rows)


_PLOTTERS: dict[str, Callable[[Mapping[str, Any], Path], Path | None]] = {
    "guest": _plot_guest, "member": _plot_member, "e2e": _plot_e2e, "eval_completejourney": _plot_eval}


def plot_results(name: str, json_path: Path | None = None) -> Path | None:
    """Draw ``<name>.png`` next to the result JSON (``bench/results/<name>.json`` unless given)."""
    path = Path(json_path) if json_path is not None else RESULTS / f"{name}.json"
    plotter = _PLOTTERS.get(name)
    if plotter is None:
        raise ValueError(f"no plot for {name!r}; known: {', '.join(_PLOTTERS)}")
    doc = json.loads(path.read_text(encoding="utf-8"))
    return plotter(doc, path.with_suffix(".png"))


if __name__ == "__main__":
    wanted = sys.argv[1:] or [n for n in _PLOTTERS if (RESULTS / f"{n}.json").exists()]
    if not wanted:
        print(f"no results in {RESULTS} to plot", file=sys.stderr)
    for result in wanted:
        plot_results(result)

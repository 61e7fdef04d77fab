"""The evaluation table: rows, standard errors, goals, segments, markdown.

A row is a plain dict (method, HR, MRR, n, standard error, kind, note); ratios
to the baselines are added once every row is in (:func:`finish`). The goals
are judged on the shipped rows: the member model against the member's own
favourites, the guest model against raw co-occurrence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .protocol import Case, Metrics, paired_se

_LOG = logging.getLogger(__name__)

__all__ = ["SHIPPED_GUEST", "SHIPPED_MEMBER", "MEMBER_BLEND", "GOALS", "row", "segments", "finish", "goals",
           "format_table"]

#: The rows the goals are judged on: the defaults ``retrain-server train`` ships.
SHIPPED_GUEST = "guest model as shipped (GuestTrainingConfig / GuestParams / Decay defaults)"
SHIPPED_MEMBER = ("member model as shipped (defaults: blend calibrated by retrain_server.blend, its best candidates "
                  "reordered by the reranker)")
#: The shipped blend alone (``member.rerank: false``; the reranker's candidates).
MEMBER_BLEND = "member blend as shipped, without the reranker (defaults; blend calibrated by retrain_server.blend)"
#: Issue 10's goals: member HR@10 vs the member's own favourites, guest vs raw co-occurrence.
GOALS = {"member_vs_own_favourites": 1.4, "guest_vs_cooccurrence": 1.5}


def row(name: str, m: Metrics, kind: str, note: str = "", **extra: Any) -> dict[str, Any]:
    """One table row from :class:`Metrics` (per-case hits kept for paired comparisons, not written out)."""
    return {"method": name, "hr": m.hr, "mrr": m.mrr, "se": m.se, "n": m.n, "kind": kind, "note": note,
            "cart_violations": m.cart_violations, "short_lists": m.short_lists,
            "seconds": round(m.seconds, 2), "_hits": m.hits(), **extra}


def segments(m: Metrics, cases: Sequence[Case], known_users: set[str], known_products: set[str]) -> dict[str, Any]:
    """HR@k on the cases that test the fallbacks: unknown members, new products in the cart, new targets."""
    hits = m.hits()
    masks = {
        "member_unknown": np.array([c.user_id is not None and c.user_id not in known_users for c in cases]),
        "cart_has_new_product": np.array([any(p not in known_products for p in c.cart) for c in cases]),
        "target_new": np.array([c.target not in known_products for c in cases]),
    }
    out: dict[str, Any] = {}
    for name, mask in masks.items():
        n = int(mask.sum()) if mask.size else 0
        hr = float(hits[mask].mean()) if n else None
        out[name] = {"n": n, "hr": hr,
                     "se": float(np.sqrt(hr * (1 - hr) / n)) if n and hr is not None else None}
    return out


def finish(rows: list[dict[str, Any]], comparisons: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Ratios to the best baseline and to co-occurrence, paired gains, goals; drops the per-case hits.

    ``comparisons``: (row, reference row) pairs whose HR difference gets a paired
    standard error (same cases, so much tighter than either row's own).
    """
    scored = [r for r in rows if r["kind"] == "baseline" and r["hr"] is not None]
    best = max(scored, key=lambda r: (r["hr"], r["mrr"]))
    co_hr = next(r["hr"] for r in scored if "co-occurrence" in r["method"])
    own_hr = next((r["hr"] for r in scored if "own most frequent" in r["method"]), None)
    by_name = {r["method"]: r for r in rows}
    gains = []
    for name, ref in comparisons:
        a, b = by_name.get(name), by_name.get(ref)
        if a is None or b is None or a.get("_hits") is None or b.get("_hits") is None:
            continue
        gains.append({"method": name, "reference": ref, "hr_gain": a["hr"] - b["hr"],
                      "paired_se": paired_se(a["_hits"], b["_hits"])})
    for r in rows:
        r.pop("_hits", None)
        r["vs_best_baseline"] = None if r["hr"] is None or not best["hr"] else r["hr"] / best["hr"]
        r["vs_cooccurrence"] = None if r["hr"] is None or not co_hr else r["hr"] / co_hr
        r["vs_own_favourites"] = None if r["hr"] is None or not own_hr else r["hr"] / own_hr
    return {"best_baseline": best["method"], "gains": gains, "goals": goals(rows)}


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The shipped rows' ratios against issue 10's goals (:data:`GOALS`)."""
    def get(name: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["method"] == name), None)

    out: dict[str, Any] = {}
    g = get(SHIPPED_GUEST)
    if g and g.get("vs_cooccurrence") is not None:
        out["guest_vs_cooccurrence"] = g["vs_cooccurrence"]
        out[f"guest_goal_met (>={GOALS['guest_vs_cooccurrence']})"] = (
            g["vs_cooccurrence"] >= GOALS["guest_vs_cooccurrence"])
    m = get(SHIPPED_MEMBER)
    if m and m.get("vs_own_favourites") is not None:
        out["member_vs_own_favourites"] = m["vs_own_favourites"]
        out[f"member_goal_met (>={GOALS['member_vs_own_favourites']})"] = (
            m["vs_own_favourites"] >= GOALS["member_vs_own_favourites"])
    return out


def format_table(report: dict[str, Any]) -> str:
    """Markdown table of the report's rows (HR with its standard error), then the paired gains."""
    k = report["k"]
    lines = [f"| method | HR@{k} | ± SE | MRR@{k} | × own favourites | × co-occurrence |",
             "|---|---:|---:|---:|---:|---:|"]
    fmt = lambda v, p=4: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in report["rows"]:
        lines.append(f"| {r['method']} | {fmt(r['hr'])} | {fmt(r.get('se'))} | {fmt(r['mrr'])} | "
                     f"{fmt(r.get('vs_own_favourites'), 2)} | {fmt(r.get('vs_cooccurrence'), 2)} |")
    gains = report.get("gains") or []
    if gains:
        lines += ["", "| change (same cases) | reference | HR gain | ± paired SE |", "|---|---|---:|---:|"]
        for g in gains:
            lines.append(f"| {g['method']} | {g['reference']} | {g['hr_gain']:+.4f} | {g['paired_se']:.4f} |")
    return "\n".join(lines)

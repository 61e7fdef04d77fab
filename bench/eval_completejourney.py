"""HR@10 / MRR@10 on the Complete Journey data: guest, member and baselines.

Runs the protocol of :mod:`retrain_server.evaluation` (time split, one hidden
product per test basket, tuning on a validation month carved from the training
months) and writes ``bench/results/eval_completejourney.json``::

    python bench/eval_completejourney.py                      # 5,000 test baskets, 1 epoch
    python bench/eval_completejourney.py --max-test-baskets 0 --epochs 3
    python bench/eval_completejourney.py --quick --no-member  # smoke run, ~1 minute

Same options as ``retrain-server evaluate`` (``--help``). Then draws HR@10 by
method next to the JSON (``eval_completejourney.png``, :func:`common.plot_results`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from retrain_server.evaluate import build_parser, main

if __name__ == "__main__":
    default = ROOT / "bench" / "results" / "eval_completejourney.json"
    code = main(sys.argv[1:], default_json=default)
    if code == 0:
        # Only now: common pins BLAS to one thread at import, which must not touch the evaluation's training.
        from common import plot_results

        plot_results("eval_completejourney", build_parser().parse_known_args(sys.argv[1:])[0].json or default)
    raise SystemExit(code)

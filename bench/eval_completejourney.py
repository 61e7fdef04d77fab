"""HR@10 / MRR@10 on the Complete Journey data: guest, member and baselines.

Runs the protocol of :mod:`retrain_server.evaluate` (time split, one hidden
product per test basket, tuning on a validation month carved from the training
months) and writes ``bench/results/eval_completejourney.json``::

    python bench/eval_completejourney.py                      # 5,000 test baskets, 1 epoch
    python bench/eval_completejourney.py --max-test-baskets 0 --epochs 3
    python bench/eval_completejourney.py --quick --no-member  # smoke run, ~1 minute

Same options as ``retrain-server evaluate`` (``--help``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from retrain_server.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], default_json=ROOT / "bench" / "results" / "eval_completejourney.json"))

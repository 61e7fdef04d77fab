#!/usr/bin/env bash
# The demo command: set up, then generate a store, train, start a broker and the
# agent, and show simulated baskets getting recommendations. See --help.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --demo
export TF_CPP_MIN_LOG_LEVEL=3
exec .venv/bin/python -m scripts.demo "$@"

#!/usr/bin/env bash
# The test command: set up (scripts/bootstrap.sh), lint (ruff), then run the whole suite
# against real Mosquitto, onnxruntime and TensorFlow. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONDONTWRITEBYTECODE=1
# Lint first: a style or import error fails the run in seconds, before the slow tests.
.venv/bin/ruff check --quiet agent retrain_server scripts tests bench
exec .venv/bin/python -m pytest tests "$@"

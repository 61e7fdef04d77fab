#!/usr/bin/env bash
# The test command: set up (scripts/bootstrap.sh), then run the whole suite
# against real Mosquitto, onnxruntime and TensorFlow. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONDONTWRITEBYTECODE=1
exec .venv/bin/python -m pytest tests "$@"

"""The edge stays light: no TensorFlow, no pandas, no pickle (``__all__``: tests/test_public_api.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serving_a_request_imports_no_training_library(trained):
    code = f"""
import sys
from agent import cli, service, http, registry, events, mqtt
from agent.bundle import load_public_key
from agent.recommenders.base import RecommendRequest
snap = registry.load_snapshot({str(trained.parameters)!r}, load_public_key({str(trained.public_key)!r}))
snap.recommend(RecommendRequest(cart=("x",), user_id={trained.member_id!r}))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in
               ("tensorflow", "tf_keras", "keras", "pandas", "sklearn", "tf2onnx", "joblib", "scipy"))
print(",".join(heavy))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_agent_source_never_unpickles():
    for path in (ROOT / "agent").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for needle in ("import pickle", "joblib", "allow_pickle=True", "pd.read_pickle"):
            assert needle not in text, f"{path}: {needle}"

"""The README's demo command and the standalone bridge, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from scripts.brokers import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_to_completion_and_exits_0(tmp_path):
    r = subprocess.run([sys.executable, "-m", "scripts.demo", "--baskets", "2", "--workdir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "agent online" in out and "agent status: offline" in out
    assert "[guest" in out and "[member" in out  # both models answered over MQTT
    assert "POST /recommend -> 200" in out
    assert (tmp_path / "parameters" / "manifest.sig").is_file()


def _get(url: str, data: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_standalone_bridge_process(trained):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "bridge", "--parameters", str(trained.parameters),
                             "--public-key", str(trained.public_key), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                status, body = _get(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert status == 200 and body["models"]["member"]
        status, body = _get(f"http://127.0.0.1:{port}/recommend", json.dumps(
            {"user_id": trained.member_id, "gender": 1, "age": 30, "cart": trained.family_items(2)[:2]}).encode())
        assert status == 200 and body["model"] == "member" and len(body["recommendations"]) == 10
        status, body = _get(f"http://127.0.0.1:{port}/recommend", b'{"cart": 5}')
        assert status == 422
    finally:
        proc.terminate()
        proc.wait(10)


def test_bridge_refuses_badly_signed_parameters(trained, tmp_path):
    from retrain_server.sign import keygen

    _, other = keygen(tmp_path)
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bridge", "--parameters", str(trained.parameters),
                        "--public-key", str(other), "--port", str(free_port())],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "signature does not match" in r.stderr

"""Secrets never reach a log line or /metrics: the MQTT password and a DSN's password, at DEBUG level."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from scripts.brokers import free_port

ROOT = Path(__file__).resolve().parents[1]
MQTT_SECRET = "mqtt-Secret-4711"
DSN_SECRET = "dsn-Secret-0815"


def test_agent_never_logs_or_exports_the_mqtt_password(trained, mqtt_broker, topic_prefix):
    port = free_port()
    env = {**os.environ, "BASKET_MQTT_USERNAME": "agent-user", "BASKET_MQTT_PASSWORD": MQTT_SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--broker", f"{mqtt_broker.host}:{mqtt_broker.port}",
         "--prefix", topic_prefix, "--agent-id", "secret-test", "--parameters", str(trained.parameters),
         "--public-key", str(trained.public_key), "--http-port", str(port), "--log-level", "DEBUG",
         "--update-jitter-s", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        metrics = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    metrics = resp.read().decode()
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    health = resp.read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                time.sleep(0.3)
        assert metrics, "the bridge never answered"
        assert MQTT_SECRET not in metrics and MQTT_SECRET not in health
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    log = out.decode(errors="replace")
    assert "configuration:" in log  # the DEBUG dump of the (redacted) configuration was written
    assert MQTT_SECRET not in log


def test_retrain_server_never_logs_the_dsn_password(tmp_path, postgres_dsn, mqtt_broker, topic_prefix):
    """A whole nightly run at DEBUG with a password in the DSN (the test cluster trusts localhost)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from retrain_server.data import write_products, write_purchases
    from retrain_server.serve import BundleServer, create_app
    from retrain_server.sign import keygen
    from retrain_server.sources import postgres
    from retrain_server.synth import make_store

    name = f"secret_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(make_conninfo(postgres_dsn, dbname=name))
    dsn = f"postgresql://{params.get('user', 'postgres')}:{DSN_SECRET}@{params['host']}:{params['port']}/{name}"
    store = make_store(n_products=100, n_rows=1500, n_users=10, n_families=10, seed=4)
    write_products(tmp_path / "products.csv", store.catalog)
    write_purchases(tmp_path / "purchases.jsonl", store.purchases)
    with postgres.connect(dsn) as conn:
        postgres.migrate(conn)
        postgres.load_files(conn, tmp_path / "products.csv", tmp_path / "purchases.jsonl")
        _, last = postgres.purchase_days(conn, "Asia/Seoul")
    key, _ = keygen(tmp_path / "keys")
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    server = BundleServer(create_app(bundles, lambda: {"status": "ok"}), "127.0.0.1", 0)
    server.start()
    try:
        cfg = tmp_path / "retrain.yaml"
        cfg.write_text(json.dumps({
            "broker": {"host": mqtt_broker.host, "port": mqtt_broker.port}, "prefix": topic_prefix,
            "parameters": str(tmp_path / "parameters"), "state_dir": str(tmp_path / "state"),
            "bundle_dir": str(bundles), "signing_key": str(key), "public_url": server.url,
            "training": {"member": False}, "log_level": "DEBUG"}))
        r = subprocess.run([sys.executable, "-m", "retrain_server.cli", "nightly", "--config", str(cfg),
                            "--date", last.isoformat()], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "RETRAIN_DB_DSN": dsn})
    finally:
        server.stop()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "configuration:" in r.stderr and "published" in r.stdout
    assert DSN_SECRET not in r.stderr and DSN_SECRET not in r.stdout

"""``retrain-server db`` / ``nightly`` as a user runs them: real PostgreSQL, clear one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg

from retrain_server.data import write_products, write_purchases
from retrain_server.synth import make_store

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "retrain_server.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, **(env or {})})


def test_db_init_twice_and_load_twice(tmp_path, pg_db):
    store = make_store(n_products=120, n_rows=1500, n_users=20, n_families=10, seed=3)
    write_products(tmp_path / "products.csv", store.catalog)
    write_purchases(tmp_path / "purchases.jsonl", store.purchases)
    for _ in range(2):
        r = _cli("db", "init", "--dsn", pg_db)
        assert r.returncode == 0, r.stderr
    r = _cli("db", "load", "--products", str(tmp_path / "products.csv"),
             "--purchases", str(tmp_path / "purchases.jsonl"), env={"RETRAIN_DB_DSN": pg_db})
    assert r.returncode == 0, r.stderr
    again = _cli("db", "load", "--dsn", pg_db, "--products", str(tmp_path / "products.csv"),
                 "--purchases", str(tmp_path / "purchases.jsonl"))
    assert again.returncode == 0, again.stderr
    with psycopg.connect(pg_db) as conn:
        sessions = conn.execute("SELECT count(*) FROM purchases").fetchone()[0]
        products = conn.execute("SELECT count(*) FROM products").fetchone()[0]
    assert sessions == len(set(store.purchases.session_ids.tolist())) and products == 120


def test_database_errors_are_one_line_without_the_password(tmp_path):
    r = _cli("db", "init", "--dsn", "postgresql://smartbasket:s3cret-pw@127.0.0.1:1/nope")
    assert r.returncode == 4
    assert "s3cret-pw" not in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_nightly_config_errors_name_every_problem(tmp_path):
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text("database: {dsn: 'postgresql://u:topsecret@h/db'}\nbroker: {host: h}\ngate: {tolerance: -1}\n"
                   "bogus: 1\n")
    r = _cli("nightly", "--config", str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    for needle in ("parameters is required", "signing_key is required", "public_url is required",
                   "gate.tolerance", "unknown key 'bogus'"):
        assert needle in line
    assert "topsecret" not in line
    assert _cli("nightly", "--help").returncode == 0
    assert _cli("serve", "--help").returncode == 0
    assert _cli("nightly", "--date", "yesterday").returncode == 2

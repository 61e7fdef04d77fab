"""Shared fixtures."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# --- MQTT broker (scripts/brokers.py) -------------------------------------------------------
from scripts.brokers import Broker, MosquittoBroker, external_broker


def _private_broker(workdir) -> MosquittoBroker:
    try:
        return MosquittoBroker(workdir)
    except RuntimeError as exc:  # not installed: fail loudly, never skip silently
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker for the whole session: MQTT_HOST/MQTT_PORT if set, else a private Mosquitto."""
    ext = external_broker()
    if ext is not None:
        yield ext
        return
    broker = _private_broker(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    try:
        yield broker.broker
    finally:
        broker.stop()


@pytest.fixture
def restartable_broker(tmp_path) -> Iterator[MosquittoBroker]:
    """A private Mosquitto this test may stop and restart on the same port."""
    broker = _private_broker(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A unique topic prefix, so tests sharing a broker never see each other's messages."""
    return f"test-{uuid.uuid4().hex[:12]}/store"


# --- PostgreSQL (scripts/postgres.py) -------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server for the whole session: TEST_DATABASE_DSN if set, else a private throwaway cluster."""
    from scripts.postgres import PostgresServer, external_postgres

    ext = external_postgres()
    if ext is not None:
        yield ext
        return
    try:
        server = PostgresServer(tmp_path_factory.mktemp("postgres"))
        server.start()
    except RuntimeError as exc:  # not installed or cannot start: fail loudly, never skip silently
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server.dsn
    finally:
        server.close()


@pytest.fixture
def pg_db(postgres_dsn: str) -> Iterator[str]:
    """A fresh, empty database of this test's own on the session's server; yields its DSN."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    name = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(postgres_dsn, dbname=name)
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# --- trained models (real training: TF-IDF/co-purchase + TFRS two-tower -> int8 ONNX) ----------
class Trained:
    """A signed parameters dir trained by ``retrain-server train`` on a synthetic store."""

    def __init__(self, root, store) -> None:
        self.root = root
        self.store = store
        self.data = root / "data"
        self.parameters = root / "parameters"
        self.signing_key = root / "keys" / "signing.key"
        self.public_key = root / "keys" / "signing.pub"
        users = [u for u in store.purchases.user_ids.tolist() if u]
        self.member_id = max(set(users), key=users.count)

    def family_items(self, family: int) -> list[str]:
        """Products of a planted family (product i is in family i % n_families)."""
        return self.store.catalog.ids[family::self.store.n_families].tolist()


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from retrain_server.cli import main as retrain_main
    from retrain_server.data import write_products, write_purchases
    from retrain_server.synth import make_store

    root = tmp_path_factory.mktemp("trained")
    store = make_store(n_products=300, n_rows=6000, n_users=50, n_families=20, seed=21)
    t = Trained(root, store)
    t.data.mkdir()
    write_products(t.data / "products.csv", store.catalog)
    write_purchases(t.data / "purchase_history.jsonl", store.purchases)
    assert retrain_main(["keygen", "--out", str(root / "keys")]) == 0
    assert retrain_main(["--log-level", "WARNING", "train", "--products", str(t.data / "products.csv"),
                         "--purchases", str(t.data / "purchase_history.jsonl"),
                         "--out", str(t.parameters), "--signing-key", str(t.signing_key)]) == 0
    return t


# --- a browser (tests/test_display.py, tests/test_console.py) --------------------------------------
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless system Chromium; fails (never skips) when it is missing: bootstrap.sh installs it.

    Per module: Playwright's sync API keeps an event loop running in this thread while it is open,
    and other tests call asyncio.run()."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed (pip install -e '.[test]')", pytrace=False)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium fonts-noto-cjk (scripts/bootstrap.sh)",
                    pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def screenshot_path(tmp_path: Path) -> Callable[[str], Path]:
    """``screenshot_path("x.png")``: in $SCREENSHOT_DIR when set (docs/ screenshots), else tmp_path."""
    def where(name: str) -> Path:
        d = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    return where


# --- the recommenders' two implementations (agent/recommenders/native.py) -----------------------------
@pytest.fixture(params=["compiled", "numpy"])
def hot_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the compiled kernels and again with the numpy code they stand in for."""
    from agent.recommenders import native

    if request.param == "numpy":
        monkeypatch.setattr(native, "KERNELS", None)
    elif native.KERNELS is None:
        pytest.skip(f"compiled kernels: {native.status()} (tests/test_native.py says why this fails)")
    return request.param

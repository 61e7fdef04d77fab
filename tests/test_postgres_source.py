"""The PostgreSQL adapter (retrain_server.sources.postgres) against a real server.

Each test gets its own fresh database (``pg_db``) on the session's private
cluster (or on TEST_DATABASE_DSN's server).
"""

from __future__ import annotations

import json
import threading
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from retrain_server.data import DataError, load_purchases, write_products, write_purchases
from retrain_server.errors import DatabaseError as ProjectDatabaseError
from retrain_server.sources import postgres as pgsrc
from retrain_server.synth import make_store


@pytest.fixture
def conn(pg_db: str):
    with pgsrc.connect(pg_db) as c:
        yield c


@pytest.fixture
def migrated(conn):
    pgsrc.migrate(conn)
    return conn


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _count(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_migrate_twice_is_a_noop_and_records_versions(conn) -> None:
    assert pgsrc.schema_versions(conn) == []
    assert pgsrc.migrate(conn) == [1, 2]
    assert pgsrc.migrate(conn) == []
    assert pgsrc.schema_versions(conn) == [1, 2]
    rows = conn.execute("SELECT version, applied_at FROM schema_version ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [1, 2] and all(r[1] is not None for r in rows)


def test_concurrent_migrations_apply_each_version_once(pg_db: str) -> None:
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with pgsrc.connect(pg_db) as c:
                results.append(pgsrc.migrate(c))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(v for r in results for v in r) == [1, 2]


def test_schema_matches_the_contract(migrated) -> None:
    cols = migrated.execute("""
        SELECT table_name, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name IN ('products', 'members', 'purchases')
        ORDER BY table_name, ordinal_position""").fetchall()
    got = {(t, c): (typ, nullable, default) for t, c, typ, nullable, default in cols}
    assert {k: v[:2] for k, v in got.items()} == {
        ("products", "id"): ("text", "NO"),
        ("products", "name"): ("text", "NO"),
        ("products", "tag"): ("text", "NO"),
        ("members", "user_id"): ("text", "NO"),
        ("members", "gender"): ("smallint", "YES"),
        ("members", "age"): ("integer", "YES"),
        ("purchases", "purchase_id"): ("bigint", "NO"),
        ("purchases", "session_id"): ("text", "NO"),
        ("purchases", "user_id"): ("text", "YES"),
        ("purchases", "product_list"): ("jsonb", "NO"),
        ("purchases", "purchased_at"): ("timestamp with time zone", "NO"),
    }
    assert got[("products", "tag")][2] == "''::text"
    assert got[("purchases", "purchase_id")][2].startswith("nextval(")  # BIGSERIAL
    pks = dict(migrated.execute("""
        SELECT tc.table_name, string_agg(kcu.column_name, ',')
        FROM information_schema.table_constraints tc
        JOIN information_schema.key_column_usage kcu
          ON kcu.constraint_name = tc.constraint_name AND kcu.table_schema = tc.table_schema
        WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_schema = current_schema()
        GROUP BY tc.table_name""").fetchall())
    assert pks["products"] == "id" and pks["members"] == "user_id" and pks["purchases"] == "purchase_id"
    assert pks["retrain_state"] == "id" and pks["retrain_days"] == "day" and pks["model_versions"] == "version"
    indexdefs = [r[0] for r in migrated.execute(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'purchases'").fetchall()]
    assert any("(purchased_at)" in d for d in indexdefs)
    state_cols = {r[0] for r in migrated.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'model_versions'").fetchall()}
    assert {"version", "published", "metrics", "timings", "bundle_sha256", "url"} <= state_cols


def test_load_files_counts_and_loading_twice_adds_nothing(migrated, tmp_path: Path) -> None:
    store = make_store(n_products=60, n_rows=600, n_users=12, n_families=6, seed=3)
    write_products(tmp_path / "products.csv", store.catalog)
    write_purchases(tmp_path / "purchase_history.jsonl", store.purchases)
    log = store.purchases
    n_sessions = len(set(log.session_ids.tolist()))
    n_members = len({u for u in log.user_ids.tolist() if u})

    counts = pgsrc.load_files(migrated, tmp_path / "products.csv", tmp_path / "purchase_history.jsonl")
    assert counts["products_inserted"] == len(store.catalog) == _count(migrated, "products")
    assert counts["sessions_inserted"] == n_sessions == _count(migrated, "purchases")
    assert counts["items_inserted"] == len(log)
    assert counts["members_inserted"] == n_members == _count(migrated, "members")
    assert _count(migrated, "purchases WHERE user_id IS NULL") == len(
        {s for s, u in zip(log.session_ids.tolist(), log.user_ids.tolist()) if not u})

    again = pgsrc.load_files(migrated, tmp_path / "products.csv", tmp_path / "purchase_history.jsonl")
    assert again["sessions_inserted"] == again["items_inserted"] == 0
    assert again["sessions_skipped"] == n_sessions
    assert again["products_inserted"] == again["products_updated"] == 0
    assert again["members_inserted"] == again["members_updated"] == 0
    assert (_count(migrated, "products"), _count(migrated, "purchases"), _count(migrated, "members")) == \
        (len(store.catalog), n_sessions, n_members)

    # What comes back is what the file loader gives, per item (times are the session's earliest).
    back = pgsrc.read_purchases_until(migrated, date(2100, 1, 1))
    from_file = load_purchases(tmp_path / "purchase_history.jsonl")
    for field in ("session_ids", "user_ids", "product_ids", "genders", "ages"):
        assert np.array_equal(getattr(back, field), getattr(from_file, field)), field
    assert np.all(back.timestamps <= from_file.timestamps)
    assert np.all(from_file.timestamps - back.timestamps < 600)
    catalog = pgsrc.read_products(migrated)
    assert catalog.ids.tolist() == sorted(store.catalog.ids.tolist())


def test_reload_updates_product_names_and_member_attributes(migrated, tmp_path: Path) -> None:
    csv1 = _write_csv(tmp_path / "p1.csv", "id,name,tag\n1,old,a\n2,two,b\n")
    csv2 = _write_csv(tmp_path / "p2.csv", "id,name,tag\n1,new,a b\n3,three,c\n")
    j1 = _write_jsonl(tmp_path / "h1.jsonl", [
        {"session_id": "a", "user_id": "u1", "id": "1", "gender": 1, "age": 30,
         "timestamp": "2026-03-01T10:00:00+09:00"},
        {"session_id": "b", "user_id": "u1", "id": "2", "gender": None, "age": 31,
         "timestamp": "2026-03-05T10:00:00+09:00"},
    ])
    j2 = _write_jsonl(tmp_path / "h2.jsonl", [
        {"session_id": "c", "user_id": "u1", "id": "3", "gender": None, "age": None,
         "timestamp": "2026-03-06T10:00:00+09:00"},
    ])
    pgsrc.load_files(migrated, csv1, j1)
    assert migrated.execute("SELECT gender, age FROM members WHERE user_id = 'u1'").fetchone() == (1, 31)
    counts = pgsrc.load_files(migrated, csv2, j2)
    assert (counts["products_inserted"], counts["products_updated"]) == (1, 1)
    assert counts["members_updated"] == 0  # unknown values keep the stored ones
    assert migrated.execute("SELECT gender, age FROM members WHERE user_id = 'u1'").fetchone() == (1, 31)
    assert dict(migrated.execute("SELECT id, name FROM products").fetchall()) == {"1": "new", "2": "two",
                                                                                  "3": "three"}


def test_day_boundaries_are_kst_whatever_the_server_time_zone(migrated, tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "p.csv", "id,name,tag\n1,a,x\n2,b,y\n3,c,z\n4,d,w\n")
    rows = [
        {"session_id": "before", "user_id": None, "id": "1", "timestamp": "2026-02-28T23:59:59+09:00"},
        {"session_id": "first", "user_id": "u1", "id": "2", "gender": 0, "age": 40,
         "timestamp": "2026-03-01T00:00:00+09:00"},
        {"session_id": "last", "user_id": None, "id": "3", "timestamp": "2026-03-01T23:59:59+09:00"},
        {"session_id": "last", "user_id": None, "id": "1", "timestamp": "2026-03-01T23:59:59.500000+09:00"},
        {"session_id": "next", "user_id": None, "id": "4", "timestamp": "2026-03-02T00:00:00+09:00"},
        # No offset: the store's local time (KST), i.e. 2026-03-01 15:00 UTC -> day 2026-03-02.
        {"session_id": "naive", "user_id": None, "id": "2", "timestamp": "2026-03-02T00:00:00"},
        # 2026-03-01T15:00:00Z is 2026-03-02 00:00 KST.
        {"session_id": "utc", "user_id": None, "id": "3", "timestamp": "2026-03-01T15:00:00Z"},
    ]
    pgsrc.load_files(migrated, csv, _write_jsonl(tmp_path / "h.jsonl", rows))
    migrated.execute("SET TimeZone = 'America/Los_Angeles'")  # must not matter

    day = pgsrc.read_purchases(migrated, date(2026, 3, 1), date(2026, 3, 2))
    assert day.session_ids.tolist() == ["first", "last", "last"]
    assert day.product_ids.tolist() == ["2", "3", "1"]
    assert day.user_ids.tolist() == ["u1", "", ""]
    assert day.genders.tolist() == [0, -1, -1] and day.ages.tolist() == [40, -1, -1]
    assert day.timestamps[0] == 1772290800  # 2026-03-01T00:00:00+09:00

    nxt = pgsrc.read_purchases(migrated, date(2026, 3, 2), date(2026, 3, 3))
    assert sorted(set(nxt.session_ids.tolist())) == ["naive", "next", "utc"]
    assert pgsrc.read_purchases_until(migrated, date(2026, 3, 1)).session_ids.tolist() == ["before"]
    assert len(pgsrc.read_purchases(migrated, date(2026, 3, 3), date(2026, 3, 4))) == 0
    assert pgsrc.purchase_days(migrated) == (date(2026, 2, 28), date(2026, 3, 2))


def test_purchase_days_on_an_empty_database(migrated) -> None:
    assert pgsrc.purchase_days(migrated) is None
    assert len(pgsrc.read_products(migrated)) == 0
    assert len(pgsrc.read_purchases_until(migrated, date(2026, 1, 1))) == 0


def test_redacted_dsn_hides_the_password() -> None:
    cases = {
        "postgresql://alice:s3cret@db.example:5432/store": "postgresql://alice:***@db.example:5432/store",
        "postgres://alice:s3cr%40t@db/store?sslmode=require": "postgres://alice:***@db/store?sslmode=require",
        "postgresql://alice@db/store?password=s3cret&sslmode=require":
            "postgresql://alice@db/store?password=***&sslmode=require",
        "host=db user=alice password=s3cret dbname=store": "host=db user=alice password=*** dbname=store",
        "host=db password='s3 cret' dbname=store": "host=db password=*** dbname=store",
        "postgresql://postgres@127.0.0.1:5432/store": "postgresql://postgres@127.0.0.1:5432/store",
    }
    for dsn, want in cases.items():
        assert pgsrc.redact_dsn(dsn) == want


@pytest.mark.parametrize("dsn", [
    "postgresql://alice:s3cretPW@127.0.0.1:{port}/store",
    "host=127.0.0.1 port={port} user=alice password=s3cretPW dbname=store",
    "host=127.0.0.1 password=s3cretPW bogus",  # malformed: libpq echoes parts of it
])
def test_connection_failure_never_shows_the_password(dsn: str) -> None:
    from scripts.brokers import free_port

    with pytest.raises(pgsrc.DatabaseError) as info:
        pgsrc.connect(dsn.format(port=free_port()), connect_timeout=3)
    assert "s3cretPW" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ProjectDatabaseError)


def test_korean_names_round_trip(migrated, tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "p.csv", "id,name,tag\n1024,서울우유 1L,\"우유, 유제품, dairy milk\"\n"
                                         "김치-7,종가집 포기김치,\"김치, side kimchi\"\n")
    jsonl = _write_jsonl(tmp_path / "h.jsonl", [
        {"session_id": "세션-1", "user_id": "회원1", "id": "김치-7", "gender": 1, "age": 29,
         "timestamp": "2026-03-01T12:00:00+09:00"},
        {"session_id": "세션-1", "user_id": "회원1", "id": "1024", "gender": 1, "age": 29,
         "timestamp": "2026-03-01T12:00:01+09:00"},
    ])
    pgsrc.load_files(migrated, csv, jsonl)
    catalog = pgsrc.read_products(migrated)
    names = dict(zip(catalog.ids.tolist(), catalog.names.tolist()))
    assert names == {"1024": "서울우유 1L", "김치-7": "종가집 포기김치"}
    assert dict(zip(catalog.ids.tolist(), catalog.tags.tolist()))["1024"] == "우유, 유제품, dairy milk"
    log = pgsrc.read_purchases(migrated, date(2026, 3, 1), date(2026, 3, 2))
    assert log.product_ids.tolist() == ["김치-7", "1024"]
    assert set(log.session_ids.tolist()) == {"세션-1"} and set(log.user_ids.tolist()) == {"회원1"}


def test_bad_purchase_file_writes_nothing(migrated, tmp_path: Path) -> None:
    csv = _write_csv(tmp_path / "p.csv", "id,name,tag\n1,a,x\n")
    jsonl = tmp_path / "h.jsonl"
    jsonl.write_text('{"session_id": "a", "user_id": null, "id": "1", "timestamp": "2026-03-01T00:00:00+09:00"}\n'
                     '{"session_id": "b", "user_id": null, "id": "1", "timestamp": "yesterday"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"h\.jsonl:2: bad timestamp"):
        pgsrc.load_files(migrated, csv, jsonl)
    assert _count(migrated, "products") == _count(migrated, "purchases") == 0


def test_query_errors_are_database_errors(conn) -> None:
    with pytest.raises(pgsrc.DatabaseError, match="reading products failed"):
        pgsrc.read_products(conn)  # not migrated: no products table

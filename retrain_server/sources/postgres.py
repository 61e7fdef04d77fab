"""The store's PostgreSQL as a training-data source (contract §8), with psycopg 3.

Plain functions over one connection, so the CLI, the nightly job and tests can
compose them inside their own transactions:

* :func:`connect` / :func:`redact_dsn`: connection errors become
  :class:`DatabaseError` and never show the password;
* :func:`migrate`: versioned, idempotent schema migrations (the contract's
  tables, then the retrain server's own state tables);
* :func:`load_files`: bulk-load the seed files with COPY, one ``purchases`` row
  per session, skipping sessions already present (loading twice adds nothing);
* :func:`read_products` / :func:`read_purchases`: the same
  :class:`~retrain_server.data.Catalog` / :class:`~retrain_server.data.PurchaseLog`
  arrays the file loaders give, for a range of store-local (KST) days.

Days are :class:`datetime.date`; a day means [00:00, next 00:00) in the store's
time zone (``Asia/Seoul`` unless told otherwise), whatever the server's TimeZone.
"""

from __future__ import annotations

import json
import logging
import re
import time as _time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import psycopg
from psycopg.conninfo import conninfo_to_dict

from .. import errors as _errors
from ..data import UNKNOWN, Catalog, DataError, PurchaseLog, load_products

_LOG = logging.getLogger(__name__)

__all__ = ["STORE_TZ", "MIGRATIONS", "DatabaseError", "connect", "redact_dsn", "migrate", "schema_versions",
           "load_files", "read_products", "read_purchases", "read_purchases_until", "purchase_days",
           "day_start"]

#: The store's time zone: a "day" of purchases is a calendar day here (contract §8).
STORE_TZ = "Asia/Seoul"

# Advisory lock keys (any constant unique to this application): migrations and bulk loads run one at a time.
_MIGRATION_LOCK = 0x5B_A5_E7_01
_LOAD_LOCK = 0x5B_A5_E7_02


class DatabaseError(_errors.DatabaseError, RuntimeError):
    """PostgreSQL unreachable or a statement failed; the message never contains the DSN's password.

    A subclass of the project-wide :class:`retrain_server.errors.DatabaseError`, so the CLI
    maps it to its exit code, and of :class:`RuntimeError` for callers that only know that.
    """


# --- connections ---------------------------------------------------------------------------------
_URL_PW = re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/?#\s]*:)(?P<pw>[^@\s]*)(?=@)")
_QUERY_PW = re.compile(r"(?P<pre>[?&]password=)(?P<pw>[^&#\s]*)", re.IGNORECASE)
_KV_PW = re.compile(r"(?P<pre>(?<![\w?&])password\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'?|[^\s']\S*|)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (URL, URL query and key=value forms), safe to log.

    Errs on the side of masking too much when the DSN is malformed.
    """
    out = _URL_PW.sub(r"\g<pre>***", dsn)
    out = _QUERY_PW.sub(r"\g<pre>***", out)
    return _KV_PW.sub(r"\g<pre>***", out)


def _passwords(dsn: str) -> set[str]:
    found: set[str] = set()
    for rx in (_URL_PW, _QUERY_PW, _KV_PW):
        for m in rx.finditer(dsn):
            pw = m.group("pw")
            found |= {pw, pw.strip("'"), unquote(pw)}
    try:
        found.add(conninfo_to_dict(dsn).get("password") or "")
    except (psycopg.Error, ValueError, TypeError):
        pass
    return {p for p in found if p}


def _scrub(message: str, dsn: str) -> str:
    """``message`` on one line, without any password of ``dsn`` in it (libpq may echo parts of a bad DSN)."""
    message = redact_dsn(" ".join(message.split()))
    for pw in sorted(_passwords(dsn), key=len, reverse=True):
        message = message.replace(pw, "***")
    return message


def connect(dsn: str, *, connect_timeout: int = 10, autocommit: bool = True) -> psycopg.Connection:
    """Open a connection; any failure is a :class:`DatabaseError` naming the redacted DSN.

    Autocommit by default, so reads never leave an idle transaction open on a
    long-running server; the functions here that write open their own transactions.
    """
    if not dsn:
        raise DatabaseError("no database DSN given (set RETRAIN_DB_DSN or the configuration's DSN)")
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise DatabaseError(f"invalid database DSN {redact_dsn(dsn)}: {_scrub(str(exc), dsn)}") from None
    extra: dict[str, object] = {}
    if "connect_timeout" not in params:
        extra["connect_timeout"] = connect_timeout
    if "application_name" not in params:
        extra["application_name"] = "smart-basket-retrain"
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, **extra)
    except psycopg.Error as exc:
        # `from None`: the original exception (and a traceback of it) would carry the unscrubbed text.
        raise DatabaseError(f"cannot connect to {redact_dsn(dsn)}: {_scrub(str(exc), dsn)}") from None
    _LOG.debug("connected to %s", redact_dsn(dsn))
    return conn


@contextmanager
def _db_errors(what: str) -> Iterator[None]:
    """Turn psycopg errors into one-line :class:`DatabaseError`s (statements never contain the DSN)."""
    try:
        yield
    except psycopg.Error as exc:
        raise DatabaseError(f"{what} failed: {' '.join(str(exc).split())}") from exc


# --- migrations ----------------------------------------------------------------------------------
_SCHEMA_VERSION_DDL = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    INT PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""

#: (version, description, SQL). Append only: a released migration is never edited.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "contract schema: products, members, purchases", """
CREATE TABLE IF NOT EXISTS products (id TEXT PRIMARY KEY, name TEXT NOT NULL, tag TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS members (user_id TEXT PRIMARY KEY, gender SMALLINT NULL, age INT NULL);
CREATE TABLE IF NOT EXISTS purchases (purchase_id BIGSERIAL PRIMARY KEY, session_id TEXT NOT NULL,
                                      user_id TEXT NULL, product_list JSONB NOT NULL,
                                      purchased_at TIMESTAMPTZ NOT NULL);
CREATE INDEX IF NOT EXISTS purchases_purchased_at_idx ON purchases (purchased_at);
"""),
    (2, "retrain server state: retrain_state, retrain_days, model_versions", """
CREATE TABLE retrain_state (id SMALLINT PRIMARY KEY CHECK (id = 1), generation TEXT NOT NULL,
                            through_day DATE NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE retrain_days (day DATE PRIMARY KEY, generation TEXT NOT NULL, sessions INT NOT NULL,
                           items INT NOT NULL, processed_at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE model_versions (version TEXT PRIMARY KEY, created_at TIMESTAMPTZ NOT NULL,
                             through_day DATE NOT NULL, published BOOLEAN NOT NULL DEFAULT false,
                             announced_at TIMESTAMPTZ NULL, reason TEXT NULL,
                             metrics JSONB NOT NULL DEFAULT '{}', timings JSONB NOT NULL DEFAULT '{}',
                             bundle_bytes BIGINT NULL, bundle_sha256 TEXT NULL, url TEXT NULL);
"""),
)


def migrate(conn: psycopg.Connection) -> list[int]:
    """Apply the migrations not yet recorded in ``schema_version``; returns the versions applied now.

    Each migration runs in its own transaction holding an advisory lock, so two
    servers starting at once apply each migration exactly once and a failure
    leaves the earlier ones in place. Migration 1 uses IF NOT EXISTS because the
    store's database may already have the contract's tables.
    """
    applied: list[int] = []
    known = max(v for v, _, _ in MIGRATIONS)
    with _db_errors("database migration"):
        for version, description, sql in MIGRATIONS:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                cur.execute("SELECT to_regclass('schema_version') IS NOT NULL")
                if not cur.fetchone()[0]:
                    cur.execute(_SCHEMA_VERSION_DDL)
                cur.execute("SELECT EXISTS (SELECT 1 FROM schema_version WHERE version = %s)", (version,))
                if cur.fetchone()[0]:
                    continue
                cur.execute(sql)
                cur.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
            applied.append(version)
            _LOG.info("applied database migration %d (%s)", version, description)
        newest = max(schema_versions(conn), default=0)
    if newest > known:
        _LOG.warning("database schema version %d is newer than this program knows (%d)", newest, known)
    return applied


def schema_versions(conn: psycopg.Connection) -> list[int]:
    """The migration versions recorded in the database (empty before the first :func:`migrate`)."""
    with _db_errors("reading schema_version"), conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_version') IS NOT NULL")
        if not cur.fetchone()[0]:
            return []
        cur.execute("SELECT version FROM schema_version ORDER BY version")
        return [r[0] for r in cur.fetchall()]


# --- time zones ----------------------------------------------------------------------------------
def _zone(tz: str | tzinfo) -> tzinfo:
    if isinstance(tz, tzinfo):
        return tz
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(tz)
    except ZoneInfoNotFoundError:
        if tz == STORE_TZ:  # no tz database installed: Korea has had no DST since 1988
            _LOG.warning("time zone data not found; using a fixed +09:00 for %s", tz)
            return timezone(timedelta(hours=9), "KST")
        raise DataError(f"unknown time zone {tz!r}") from None


def day_start(day: date, tz: str | tzinfo = STORE_TZ) -> datetime:
    """00:00 of ``day`` in ``tz``, as an aware datetime (what the SQL range bounds are)."""
    return datetime.combine(day, time(0), tzinfo=_zone(tz))


# --- bulk load -----------------------------------------------------------------------------------
def _parse_ts(value: object, zone: tzinfo) -> datetime:
    if isinstance(value, str):
        text = value.strip()
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"  # fromisoformat before Python 3.11 does not take "Z"
        dt = datetime.fromisoformat(text)
        return dt if dt.tzinfo is not None else dt.replace(tzinfo=zone)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, timezone.utc)
    raise ValueError(value)


def _opt_int(value: object, lo: int, hi: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or not lo <= int(value) <= hi:
        raise ValueError(value)
    return int(value)


def _read_jsonl(path: Path, zone: tzinfo) -> tuple[dict[str, list], dict[str, list], int]:
    """Group item lines into sessions and collect each member's latest known gender/age.

    Returns ``sessions`` {session_id: [user_id|None, earliest datetime, [product ids in line order]]},
    ``members`` {user_id: [gender_time, gender, age_time, age]} and the number of item lines.
    """
    sessions: dict[str, list] = {}
    members: dict[str, list] = {}
    n_items = 0
    mixed_users = 0
    last_raw: object = None
    last_dt: datetime | None = None
    loads = json.loads
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = loads(line)
                sid, pid, raw_ts = row["session_id"], row["id"], row["timestamp"]
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not JSON ({exc.msg})") from None
            except KeyError as exc:
                raise DataError(f"{path}:{n}: missing field {exc}") from None
            except TypeError:
                raise DataError(f"{path}:{n}: not a JSON object") from None
            if sid is None or pid is None:
                raise DataError(f"{path}:{n}: session_id and id must not be null")
            if raw_ts == last_raw:  # consecutive items of a basket often share the time
                dt = last_dt
            else:
                try:
                    dt = last_dt = _parse_ts(raw_ts, zone)
                except (ValueError, TypeError, OverflowError, OSError):
                    raise DataError(f"{path}:{n}: bad timestamp {raw_ts!r}") from None
                last_raw = raw_ts
            uid = row.get("user_id")
            uid = None if uid is None else str(uid)
            sid = str(sid)
            n_items += 1
            sess = sessions.get(sid)
            if sess is None:
                sessions[sid] = [uid, dt, [str(pid)]]
            else:
                sess[2].append(str(pid))
                if dt < sess[1]:
                    sess[1] = dt
                if uid is not None and sess[0] != uid:
                    if sess[0] is not None:
                        mixed_users += 1
                    else:
                        sess[0] = uid
            if uid is None:
                continue
            try:
                gender = _opt_int(row.get("gender"), 0, 1)
                age = _opt_int(row.get("age"), 0, 150)
            except ValueError as exc:
                raise DataError(f"{path}:{n}: gender must be 0, 1 or null and age 0..150 or null, "
                                f"got {exc.args[0]!r}") from None
            mem = members.get(uid)
            if mem is None:
                members[uid] = mem = [None, None, None, None]
            if gender is not None and (mem[0] is None or dt >= mem[0]):
                mem[0], mem[1] = dt, gender
            if age is not None and (mem[2] is None or dt >= mem[2]):
                mem[2], mem[3] = dt, age
    if mixed_users:
        _LOG.warning("%s: %d item line(s) name a different user than their session's first; kept the first",
                     path, mixed_users)
    return sessions, members, n_items


def load_files(conn: psycopg.Connection, products_csv: str | Path, purchases_jsonl: str | Path,
               tz: str | tzinfo = STORE_TZ) -> dict[str, int]:
    """Bulk-load the seed files (contract §1) into the contract tables; returns counts.

    Both files are parsed and validated before the database is touched; then one
    transaction (under an advisory lock, so concurrent loads cannot both insert a
    session) COPYs them into temporary tables and merges:

    * products are upserted (a re-load updates names and tags);
    * item lines become one ``purchases`` row per ``session_id`` (``product_list`` in
      line order, ``purchased_at`` the session's earliest time; a time without an
      offset is in ``tz``); sessions already in ``purchases`` are skipped, so loading
      the same file twice adds nothing;
    * members get their latest known gender/age (a known value replaces the stored one,
      an unknown one keeps it).
    """
    started = _time.monotonic()
    zone = _zone(tz)
    catalog = load_products(products_csv)
    sessions, members, n_items = _read_jsonl(Path(purchases_jsonl), zone)
    parsed = _time.monotonic()
    counts = {"products": len(catalog), "item_rows": n_items, "sessions": len(sessions), "members": len(members)}
    with _db_errors("loading the seed files"), conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOAD_LOCK,))
        cur.execute("CREATE TEMP TABLE _sb_products (id TEXT, name TEXT, tag TEXT) ON COMMIT DROP")
        with cur.copy("COPY _sb_products (id, name, tag) FROM STDIN") as copy:
            for row in zip(catalog.ids.tolist(), catalog.names.tolist(), catalog.tags.tolist()):
                copy.write_row(row)
        cur.execute("""
            WITH up AS (
                INSERT INTO products (id, name, tag) SELECT id, name, tag FROM _sb_products
                ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, tag = EXCLUDED.tag
                WHERE (products.name, products.tag) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.tag)
                RETURNING (xmax = 0) AS inserted)
            SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up""")
        counts["products_inserted"], counts["products_updated"] = cur.fetchone()

        cur.execute("CREATE TEMP TABLE _sb_purchases (session_id TEXT, user_id TEXT, product_list JSONB, "
                    "purchased_at TIMESTAMPTZ, ord INT) ON COMMIT DROP")
        dumps = json.dumps
        with cur.copy("COPY _sb_purchases (session_id, user_id, product_list, purchased_at, ord) "
                      "FROM STDIN") as copy:
            for ord_, (sid, (uid, dt, pids)) in enumerate(sessions.items()):
                copy.write_row((sid, uid, dumps(pids, ensure_ascii=False), dt, ord_))
        cur.execute("ANALYZE _sb_purchases")
        cur.execute("""
            WITH ins AS (
                INSERT INTO purchases (session_id, user_id, product_list, purchased_at)
                SELECT t.session_id, t.user_id, t.product_list, t.purchased_at FROM _sb_purchases t
                WHERE NOT EXISTS (SELECT 1 FROM purchases p WHERE p.session_id = t.session_id)
                ORDER BY t.purchased_at, t.ord
                RETURNING jsonb_array_length(product_list) AS n)
            SELECT count(*), coalesce(sum(n), 0) FROM ins""")
        counts["sessions_inserted"], counts["items_inserted"] = (int(x) for x in cur.fetchone())
        counts["sessions_skipped"] = len(sessions) - counts["sessions_inserted"]

        cur.execute("CREATE TEMP TABLE _sb_members (user_id TEXT, gender SMALLINT, age INT) ON COMMIT DROP")
        with cur.copy("COPY _sb_members (user_id, gender, age) FROM STDIN") as copy:
            for uid, (_, gender, _, age) in members.items():
                copy.write_row((uid, gender, age))
        cur.execute("""
            WITH up AS (
                INSERT INTO members (user_id, gender, age) SELECT user_id, gender, age FROM _sb_members
                ON CONFLICT (user_id) DO UPDATE
                    SET gender = COALESCE(EXCLUDED.gender, members.gender), age = COALESCE(EXCLUDED.age, members.age)
                WHERE (members.gender, members.age) IS DISTINCT FROM
                      (COALESCE(EXCLUDED.gender, members.gender), COALESCE(EXCLUDED.age, members.age))
                RETURNING (xmax = 0) AS inserted)
            SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up""")
        counts["members_inserted"], counts["members_updated"] = cur.fetchone()
    _LOG.info("loaded %d products, %d of %d sessions (%d items), %d members in %.1fs (parsing %.1fs)",
              len(catalog), counts["sessions_inserted"], len(sessions), counts["items_inserted"], len(members),
              _time.monotonic() - started, parsed - started)
    return counts


# --- reads ---------------------------------------------------------------------------------------
def read_products(conn: psycopg.Connection) -> Catalog:
    """All products, ordered by ``id`` (the database's text order: a stable order for model indices)."""
    with _db_errors("reading products"), conn.cursor() as cur:
        cur.execute("SELECT id, name, tag FROM products ORDER BY id")
        rows = cur.fetchall()
    ids, names, tags = (list(col) for col in zip(*rows)) if rows else ([], [], [])
    _LOG.info("read %d products from the database", len(ids))
    return Catalog(np.asarray(ids, dtype=str), np.asarray(names, dtype=str), np.asarray(tags, dtype=str))


def read_purchases(conn: psycopg.Connection, start_day: date | None, end_day_exclusive: date,
                   tz: str | tzinfo = STORE_TZ) -> PurchaseLog:
    """Purchases of the days [``start_day``, ``end_day_exclusive``) in ``tz``, one row per product.

    ``start_day=None`` means from the first purchase. Rows are ordered by
    ``purchased_at``, then ``purchase_id``, then position in ``product_list``;
    gender/age come from ``members`` (-1 when unknown or out of range), guests
    have user id ``""`` and timestamps are epoch seconds. The bounds are computed
    here as aware datetimes, so the server's TimeZone setting does not matter.
    """
    zone = _zone(tz)
    end = day_start(end_day_exclusive, zone)
    where, params = "p.purchased_at < %s", [end]
    if start_day is not None:
        if start_day > end_day_exclusive:
            raise DataError(f"day range [{start_day}, {end_day_exclusive}) ends before it starts")
        where, params = "p.purchased_at >= %s AND p.purchased_at < %s", [day_start(start_day, zone), end]
    sql = f"""
        SELECT p.session_id, coalesce(p.user_id, ''), p.product_list,
               CASE WHEN m.gender IN (0, 1) THEN m.gender ELSE {UNKNOWN} END,
               CASE WHEN m.age BETWEEN 0 AND 150 THEN m.age ELSE {UNKNOWN} END,
               floor(extract(epoch FROM p.purchased_at))::bigint
        FROM purchases p LEFT JOIN members m ON m.user_id = p.user_id
        WHERE {where}
        ORDER BY p.purchased_at, p.purchase_id"""
    with _db_errors("reading purchases"), conn.cursor() as cur:
        cur.execute(sql, params)
        rows = cur.fetchall()
    sids, uids, genders, ages, stamps, counts, products = [], [], [], [], [], [], []
    bad = 0
    for sid, uid, plist, gender, age, ts in rows:
        if not isinstance(plist, list):
            bad += 1
            continue
        items = [x if isinstance(x, str) else str(x) for x in plist if x is not None]
        if not items:
            continue
        products.extend(items)
        counts.append(len(items))
        sids.append(sid)
        uids.append(uid)
        genders.append(gender)
        ages.append(age)
        stamps.append(ts)
    if bad:
        _LOG.warning("skipped %d purchase(s) whose product_list is not a JSON array", bad)
    reps = np.asarray(counts, dtype=np.int64)
    log = PurchaseLog.from_columns(
        session_ids=np.repeat(np.asarray(sids, dtype=str), reps),
        user_ids=np.repeat(np.asarray(uids, dtype=str), reps),
        product_ids=np.asarray(products, dtype=str),
        genders=np.repeat(np.asarray(genders, dtype=np.int8), reps),
        ages=np.repeat(np.asarray(ages, dtype=np.int16), reps),
        timestamps=np.repeat(np.asarray(stamps, dtype=np.int64), reps),
    )
    _LOG.info("read %d purchases (%d items) for [%s, %s) %s", len(counts), len(log), start_day or "start",
              end_day_exclusive, getattr(zone, "key", zone))
    return log


def read_purchases_until(conn: psycopg.Connection, end_day_exclusive: date,
                         tz: str | tzinfo = STORE_TZ) -> PurchaseLog:
    """Every purchase before ``end_day_exclusive`` (the first full training)."""
    return read_purchases(conn, None, end_day_exclusive, tz)


def purchase_days(conn: psycopg.Connection, tz: str | tzinfo = STORE_TZ) -> tuple[date, date] | None:
    """(first day, last day) with purchases, as dates in ``tz``; ``None`` when there are none (for catch-up)."""
    zone = _zone(tz)
    with _db_errors("reading the purchase date range"), conn.cursor() as cur:
        cur.execute("SELECT min(purchased_at), max(purchased_at) FROM purchases")
        first, last = cur.fetchone()
    if first is None:
        return None
    return first.astimezone(zone).date(), last.astimezone(zone).date()

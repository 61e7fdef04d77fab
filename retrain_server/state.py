"""The nightly job's bookkeeping in PostgreSQL: watermark, generations, model versions.

Tables (created by :func:`retrain_server.sources.postgres.migrate`, migration 2):
``retrain_state`` (one row: the current state *generation* directory and the
last day it has counted), ``retrain_days`` (one row per counted day) and
``model_versions`` (every candidate: gate metrics, published or why not).

The counts themselves live in immutable generation directories on disk; the
row in ``retrain_state`` names the one in force. :func:`commit_run` moves the
watermark, the generation and the version record in one transaction, so a
crash before it leaves the previous state in force and a crash after it
leaves the new one — never a mix, never a day counted twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

_LOG = logging.getLogger(__name__)

__all__ = ["ServerState", "read_state", "commit_run", "pending_versions", "mark_published",
           "published_version", "model_history", "last_run"]


@dataclass(frozen=True)
class ServerState:
    generation: str
    through_day: date


def read_state(conn: Any) -> ServerState | None:
    row = conn.execute("SELECT generation, through_day FROM retrain_state WHERE id = 1").fetchone()
    return ServerState(row[0], row[1]) if row else None


def commit_run(conn: Any, *, generation: str, through_day: date, days: Sequence[tuple[date, int, int]],
               version: dict[str, Any] | None) -> None:
    """Advance the watermark to ``through_day`` under ``generation`` and record the candidate, atomically."""
    with conn.transaction():
        conn.execute("""INSERT INTO retrain_state (id, generation, through_day, updated_at) VALUES (1, %s, %s, now())
                        ON CONFLICT (id) DO UPDATE SET generation = EXCLUDED.generation,
                        through_day = EXCLUDED.through_day, updated_at = now()""", (generation, through_day))
        for day, sessions, items in days:
            conn.execute("""INSERT INTO retrain_days (day, generation, sessions, items) VALUES (%s, %s, %s, %s)
                            ON CONFLICT (day) DO UPDATE SET generation = EXCLUDED.generation,
                            sessions = EXCLUDED.sessions, items = EXCLUDED.items, processed_at = now()""",
                         (day, generation, sessions, items))
        if version is not None:
            conn.execute("""INSERT INTO model_versions (version, created_at, through_day, published, reason,
                                                        metrics, timings)
                            VALUES (%s, %s, %s, false, %s, %s::jsonb, %s::jsonb)""",
                         (version["version"], version["created_at"], through_day, version.get("reason"),
                          json.dumps(version.get("metrics") or {}), json.dumps(version.get("timings") or {})))


def pending_versions(conn: Any) -> list[str]:
    """Versions that passed the gate but were never announced, newer than the published one, newest first."""
    rows = conn.execute("""SELECT version FROM model_versions
                           WHERE reason IS NULL AND NOT published
                             AND created_at > COALESCE((SELECT max(created_at) FROM model_versions WHERE published),
                                                       '-infinity')
                           ORDER BY created_at DESC""").fetchall()
    return [r[0] for r in rows]


def mark_published(conn: Any, version: str, *, url: str, sha256: str, size: int,
                   timings: dict[str, Any] | None = None) -> None:
    with conn.transaction():
        conn.execute("""UPDATE model_versions SET published = true, announced_at = now(), url = %s,
                        bundle_sha256 = %s, bundle_bytes = %s,
                        timings = timings || %s::jsonb WHERE version = %s""",
                     (url, sha256, size, json.dumps(timings or {}), version))


def published_version(conn: Any) -> str | None:
    row = conn.execute("""SELECT version FROM model_versions WHERE published
                          ORDER BY created_at DESC LIMIT 1""").fetchone()
    return row[0] if row else None


def model_history(conn: Any, limit: int = 100) -> list[dict[str, Any]]:
    """Newest first, in the shape of contract §9's ``/api/models``."""
    rows = conn.execute("""SELECT version, created_at, through_day, published, announced_at, reason, metrics,
                                  timings, bundle_bytes FROM model_versions
                           ORDER BY created_at DESC LIMIT %s""", (limit,)).fetchall()
    return [{"version": r[0], "created_at": _iso(r[1]), "through_day": _iso(r[2]), "published": r[3],
             "announced_at": _iso(r[4]), "reason": r[5], "metrics": r[6], "timings": r[7],
             "bundle_bytes": r[8]} for r in rows]


def last_run(conn: Any) -> dict[str, Any] | None:
    rows = model_history(conn, 1)
    return rows[0] if rows else None


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, (date, datetime)) else value

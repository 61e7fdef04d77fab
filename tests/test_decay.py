"""Time-decayed counts: the arithmetic, day boundaries, and the nightly job's per-day decay and idempotence."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from retrain_server.counts import DAY, Counts, Decay, ages_in_days, days_before
from retrain_server.data import PurchaseLog

KST = ZoneInfo("Asia/Seoul")


def _log(rows: list[tuple[str, str, str, int]]) -> PurchaseLog:
    """rows: (session, user, product, timestamp)."""
    s, u, p, t = zip(*rows)
    n = len(rows)
    return PurchaseLog.from_columns(session_ids=s, user_ids=u, product_ids=p, genders=[-1] * n, ages=[-1] * n,
                                    timestamps=t)


def _random_days(n_days: int = 6, seed: int = 0) -> list[PurchaseLog]:
    """One log per day: members and guests buying from 12 products."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(n_days):
        rows = []
        for s in range(int(rng.integers(3, 9))):
            user = "" if rng.random() < 0.3 else f"u{int(rng.integers(5))}"
            for p in rng.choice(12, size=int(rng.integers(1, 5)), replace=False).tolist():
                rows.append((f"d{d}-s{s}", user, f"p{p}", d * DAY + s * 60))
        out.append(_log(rows))
    return out


def test_weight_is_a_half_life_and_zero_means_none():
    d = Decay(history_half_life_days=10, co_half_life_days=0)
    assert d.history_weight(10) == pytest.approx(0.5)
    assert d.history_weight(np.array([0, 20])).tolist() == pytest.approx([1.0, 0.25])
    assert d.co_weight(1000).tolist() == 1.0
    with pytest.raises(ValueError):
        Decay(history_half_life_days=-1)


def test_decaying_twice_is_decaying_once_by_the_sum():
    counts = Counts.empty().add(_random_days(1)[0])
    d = Decay(history_half_life_days=7, co_half_life_days=30)
    assert counts.decayed(3, d).decayed(4, d).allclose(counts.decayed(7, d))
    halved = counts.decayed(7, d)
    np.testing.assert_allclose(halved.history.toarray(), counts.history.toarray() * 0.5, rtol=1e-6)
    np.testing.assert_allclose(halved.co.toarray(), counts.co.toarray() * 0.5 ** (7 / 30), rtol=1e-6)
    assert counts.decayed(5, Decay(0, 0)).equals(counts)


def test_day_by_day_equals_one_catch_up_add():
    """Yesterday's counts times a daily factor plus today's == every day added at once, weighted by age."""
    days = _random_days(6)
    d = Decay(history_half_life_days=3, co_half_life_days=5)
    step = Counts.empty()
    for i, day_log in enumerate(days):
        step = (step.decayed(1, d) if i else step).add(day_log, ages=np.zeros(len(day_log)), decay=d)
    everything = PurchaseLog.from_columns(**{f: np.concatenate([getattr(lg, f) for lg in days]) for f in (
        "session_ids", "user_ids", "product_ids", "genders", "ages", "timestamps")})
    at_once = Counts.empty().add(everything, ages=days_before(everything.timestamps, 5 * DAY + DAY - 1), decay=d)
    assert at_once.allclose(step)
    # ... and equals two catch-up runs split anywhere (runs of 2 and 4 days)
    first = PurchaseLog.from_columns(**{f: np.concatenate([getattr(lg, f) for lg in days[:2]]) for f in (
        "session_ids", "user_ids", "product_ids", "genders", "ages", "timestamps")})
    rest = PurchaseLog.from_columns(**{f: np.concatenate([getattr(lg, f) for lg in days[2:]]) for f in (
        "session_ids", "user_ids", "product_ids", "genders", "ages", "timestamps")})
    two = Counts.empty().add(first, ages=days_before(first.timestamps, 2 * DAY - 1), decay=d)
    two = two.decayed(4, d).add(rest, ages=days_before(rest.timestamps, 6 * DAY - 1), decay=d)
    assert two.allclose(step)
    # Without decay the weighted add is the plain add.
    assert Counts.empty().add(everything, ages=np.arange(len(everything)), decay=Decay(0, 0)).equals(
        Counts.empty().add(everything))


def test_a_session_decays_by_its_newest_row_and_history_by_each_row():
    log = _log([("a", "u", "p1", 0), ("a", "u", "p2", DAY)])  # one session over two days
    d = Decay(history_half_life_days=1, co_half_life_days=1)
    c = Counts.empty().add(log, ages=np.array([1, 0]), decay=d)
    i1, i2 = (c.product_ids.tolist().index(p) for p in ("p1", "p2"))
    assert c.co[i1, i2] == pytest.approx(1.0) and c.item.tolist() == pytest.approx([1.0, 1.0])
    assert sorted(c.history.toarray().ravel().tolist()) == pytest.approx([0.5, 1.0])


def test_ages_follow_the_store_day_not_utc():
    day = date(2026, 3, 10)
    midnight = datetime.combine(day, datetime.min.time(), KST)
    ts = np.array([midnight.timestamp(), midnight.timestamp() - 1, (midnight + timedelta(hours=23)).timestamp(),
                   (midnight - timedelta(days=40)).timestamp()], dtype=np.int64)
    assert ages_in_days(ts, day, "Asia/Seoul").tolist() == [0, 1, 0, 40]
    # A zone with a DST change inside the window (Berlin, 2026-03-29): still whole local days.
    berlin = ZoneInfo("Europe/Berlin")
    noon = datetime(2026, 3, 28, 12, tzinfo=berlin).timestamp()
    late = datetime(2026, 3, 29, 23, 30, tzinfo=berlin).timestamp()
    assert ages_in_days(np.array([noon, late], dtype=np.int64), date(2026, 3, 30), "Europe/Berlin").tolist() == [2, 1]


def test_saved_counts_remember_their_day(tmp_path):
    c = Counts.empty().add(_random_days(2)[1], through_day=date(2026, 1, 2))
    c.save(tmp_path / "counts")
    back = Counts.load(tmp_path / "counts")
    assert back.through_day == date(2026, 1, 2) and back.equals(c)


# --------------------------------------------------------------------------- the nightly job (PostgreSQL)

@pytest.fixture
def world(tmp_path, pg_db, mqtt_broker, topic_prefix):
    from tests.test_nightly import World

    w = World(tmp_path, pg_db, mqtt_broker, topic_prefix)
    yield w
    w.close()


def test_nightly_decays_per_day_and_a_catch_up_equals_the_nights_one_by_one(world):
    """Three missed days caught up in one run give the counts of three nightly runs (float tolerance)."""
    from retrain_server.sources import postgres

    decay = {"decay.history_half_life_days": 5.0, "decay.co_half_life_days": 9.0, "gate.holdout_percent": 0}
    d0 = world.last_day
    world.job(**decay).run(d0)
    base = world.counts()
    assert base.through_day == d0
    ids = world.store.catalog.ids.tolist()
    start = datetime.combine(d0, datetime.min.time(), KST)
    world.insert([(f"late-{k}-{i}", f"u{i % 7}" if i % 3 else None, [ids[i], ids[i + 1], ids[(i * 7) % 50]],
                   start + timedelta(days=k, hours=9, minutes=i)) for k in (1, 2, 3) for i in range(15)])
    d3 = d0 + timedelta(days=3)
    result = world.job(**decay).run(d3)
    assert result.days == [d0 + timedelta(days=1), d0 + timedelta(days=2), d3]
    got = world.counts()
    assert got.through_day == d3
    # The same nights one by one, in memory: yesterday's counts times the daily factor, plus the day.
    d = Decay(history_half_life_days=5.0, co_half_life_days=9.0)
    expected, undecayed = base, base
    with postgres.connect(world.dsn) as conn:
        for k in (1, 2, 3):
            day = d0 + timedelta(days=k)
            day_log = postgres.read_purchases(conn, day, day + timedelta(days=1), "Asia/Seoul")
            expected = expected.decayed(1, d).add(day_log, ages=np.zeros(len(day_log)), decay=d, through_day=day)
            undecayed = undecayed.add(day_log)
    assert got.allclose(expected)
    assert not got.allclose(undecayed)  # the decay really happened
    current, _ = world.state()
    info = json.loads((world.tmp / "state" / "generations" / current.generation / "generation.json").read_text())
    assert info["through_day"] == d3.isoformat() and info["decay"]["co_half_life_days"] == 9.0
    # Re-running the day changes nothing.
    again = world.job(**decay).run(d3)
    assert again.version is None and world.counts().equals(got)
    # The published member history is the decayed one (guest-only here: the co-purchase tables are).
    snap = world.snapshot()
    assert snap.version == result.version


def test_the_first_night_weighs_old_purchases_by_age(world):
    d0 = world.last_day
    world.job(**{"decay.history_half_life_days": 1.0, "decay.co_half_life_days": 0.0,
                 "gate.holdout_percent": 0}).run(d0)
    c = world.counts()
    plain = Counts.empty()
    from retrain_server.sources import postgres

    with postgres.connect(world.dsn) as conn:
        log = postgres.read_purchases(conn, None, d0 + timedelta(days=1), "Asia/Seoul")
    plain = plain.add(log)
    np.testing.assert_array_equal(c.item, plain.item)  # co-purchase: no decay
    assert c.history.sum() < plain.history.sum()  # history: halved per day of age
    ages = ages_in_days(log.timestamps, d0, "Asia/Seoul")
    members = log.user_ids != ""
    assert c.history.sum() == pytest.approx(float((0.5 ** ages[members]).sum()), rel=1e-4)

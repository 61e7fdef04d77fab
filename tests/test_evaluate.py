"""Offline evaluation: metrics, split, held-out protocol, baselines, the blend tuner, end-to-end run."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest

from agent.recommenders.base import RecommendRequest
from retrain_server.completejourney import age_from_band
from retrain_server.data import Catalog, PurchaseLog
from retrain_server.evaluate import (
    DAY,
    SHIPPED_GUEST,
    SHIPPED_MEMBER,
    Case,
    CoOccurrenceRecommender,
    EvaluationConfig,
    OwnFrequentRecommender,
    PopularRecommender,
    evaluate,
    format_table,
    held_out_cases,
    hr_mrr,
    paired_se,
    rank_of,
    run_evaluation,
    split_by_time,
    split_last_basket,
    unseen_targets,
)
from retrain_server.evaluation.run import GUEST_BEFORE


def _log(rows: list[tuple[str, str, str, int]]) -> PurchaseLog:
    """rows: (session, user, product, timestamp)."""
    s, u, p, t = zip(*rows)
    n = len(rows)
    return PurchaseLog.from_columns(session_ids=s, user_ids=u, product_ids=p,
                                    genders=[-1] * n, ages=[-1] * n, timestamps=t)


def _synthetic(n_users: int = 120, n_items: int = 120, days: int = 120,
               seed: int = 0, newcomers: int = 0) -> SimpleNamespace:
    """Households with favourite products and product clusters sharing tags; ``newcomers`` more
    households shop only in the last 10 days (members the model meets first in the test month)."""
    rng = np.random.default_rng(seed)
    n_clusters = 12
    cluster = np.arange(n_items) % n_clusters
    ids = [f"p{i}" for i in range(n_items)]
    catalog = Catalog(np.array(ids), np.array([f"item {i}" for i in range(n_items)]),
                      np.array([f"c{c}, kind{i % 5}" for i, c in enumerate(cluster)]))
    pop = rng.zipf(1.6, n_items).astype(float)
    cols: dict[str, list] = {k: [] for k in ("session_ids", "user_ids", "product_ids", "genders",
                                              "ages", "timestamps")}
    sid = 0
    for u in range(n_users + newcomers):
        first_day = 0 if u < n_users else days - 10
        fav = rng.choice(n_items, 4, replace=False)
        age = int(rng.integers(20, 70))
        for _ in range(int(rng.integers(4, 12))):
            c = int(rng.integers(n_clusters))
            members = np.flatnonzero(cluster == c)
            w = pop[members] / pop[members].sum()
            items = set(rng.choice(members, int(rng.integers(1, 5)), replace=False, p=w).tolist())
            items |= set(rng.choice(fav, int(rng.integers(0, 3)), replace=False).tolist())
            ts = int(rng.integers(first_day * DAY, days * DAY))
            for i in items:
                cols["session_ids"].append(f"s{sid}")
                cols["user_ids"].append(f"u{u}")
                cols["product_ids"].append(ids[i])
                cols["genders"].append(-1)
                cols["ages"].append(age)
                cols["timestamps"].append(ts)
            sid += 1
    return SimpleNamespace(catalog=catalog, log=PurchaseLog.from_columns(**cols),
                           stats={"source": "synthetic"})


# --------------------------------------------------------------------------- metrics

def test_rank_of() -> None:
    assert rank_of(["a", "b", "c"], "a", 10) == 1
    assert rank_of(["a", "b", "c"], "c", 10) == 3
    assert rank_of(["a", "b", "c"], "c", 2) == 0
    assert rank_of([], "c", 10) == 0


def test_hr_mrr_known_values() -> None:
    hr, mrr = hr_mrr([1, 0, 3, 11], k=10)
    assert hr == pytest.approx(0.5)
    assert mrr == pytest.approx((1 + 1 / 3) / 4)
    assert hr_mrr([], 10) == (0.0, 0.0)
    assert hr_mrr([2, 2], 1) == (0.0, 0.0)


def test_evaluate_with_fixed_lists() -> None:
    cases = [Case("s1", ("x",), "a"), Case("s2", ("x",), "b"), Case("s3", ("x",), "z")]
    fixed = lambda req: ["a", "b", "c"]  # noqa: E731
    m = evaluate(fixed, cases, k=2)
    assert (m.hr, m.n) == (pytest.approx(2 / 3), 3)
    assert m.mrr == pytest.approx((1 + 0.5 + 0) / 3)
    assert m.ranks == [1, 2, 0]
    assert m.cart_violations == 0
    bad = evaluate(lambda req: ["x", "a"], cases, k=2)
    assert bad.cart_violations == 3


# --------------------------------------------------------------------------- split + cases

def test_split_has_no_leakage_and_keeps_baskets_whole() -> None:
    data = _synthetic()
    train, test, cutoff = split_by_time(data.log, 30)
    assert len(train) + len(test) == len(data.log)
    assert train.timestamps.max() < cutoff <= test.timestamps.max()
    assert cutoff == data.log.timestamps.max() - 30 * DAY
    assert not set(train.session_ids.tolist()) & set(test.session_ids.tolist())
    fit, val, val_cut = split_by_time(train, 30)
    assert fit.timestamps.max() < val_cut < cutoff


def test_split_assigns_straddling_basket_to_later_part() -> None:
    log = _log([("a", "u", "p1", 0), ("b", "u", "p1", 10 * DAY - 5), ("b", "u", "p2", 10 * DAY + 5),
                ("c", "u", "p3", 20 * DAY)])
    train, test, cutoff = split_by_time(log, 10)
    assert cutoff == 10 * DAY
    assert set(test.session_ids.tolist()) == {"b", "c"}
    assert train.timestamps.max() < cutoff


def test_held_out_item_never_in_cart_and_deterministic() -> None:
    data = _synthetic()
    _, test, _ = split_by_time(data.log, 30)
    cases = held_out_cases(test, seed=3)
    assert cases
    baskets: dict[str, set[str]] = {}
    for s, p in zip(test.session_ids.tolist(), test.product_ids.tolist()):
        baskets.setdefault(s, set()).add(p)
    assert {c.session_id for c in cases} == {s for s, items in baskets.items() if len(items) >= 2}
    for c in cases:
        assert c.target not in c.cart
        assert len(c.cart) >= 1 and len(set(c.cart)) == len(c.cart)
        assert set(c.cart) | {c.target} == baskets[c.session_id]
        assert c.user_id is not None
        assert c.request(hide_user=True).user_id is None
    assert held_out_cases(test, seed=3) == cases
    sample = held_out_cases(test, seed=3, max_cases=5)
    assert len(sample) == 5 and sample == held_out_cases(test, seed=3, max_cases=5)


def test_unseen_targets_counted() -> None:
    train = _log([("a", "u", "p1", 0), ("a", "u", "p2", 0)])
    cases = [Case("s", ("p1",), "p2"), Case("t", ("p1",), "new")]
    assert unseen_targets(cases, train) == 1


# --------------------------------------------------------------------------- baselines

def _baseline_log() -> PurchaseLog:
    rows = []
    # p1 in every basket; p2 with p1 three times; p3 with p4 twice; u1 buys p5 often.
    for i in range(3):
        rows += [(f"a{i}", "u0", "p1", i), (f"a{i}", "u0", "p2", i)]
    for i in range(2):
        rows += [(f"b{i}", "u2", "p1", 10 + i), (f"b{i}", "u2", "p3", 10 + i), (f"b{i}", "u2", "p4", 10 + i)]
    for i in range(2):
        rows += [(f"c{i}", "u1", "p5", 20 + i), (f"c{i}", "u1", "p1", 20 + i)]
    return _log(rows)


def test_baselines_rank_as_defined_and_exclude_cart() -> None:
    log = _baseline_log()
    pop, co, own = PopularRecommender(log), CoOccurrenceRecommender(log), OwnFrequentRecommender(log)
    assert pop.recommend(RecommendRequest(top_k=2)) == ["p1", "p2"]
    assert pop.recommend(RecommendRequest(cart=("p1",), top_k=2)) == ["p2", "p3"]
    # co-occurrence with p3: p1 (2), p4 (2) -> tie broken by popularity (p1 first)
    assert co.recommend(RecommendRequest(cart=("p3",), top_k=2)) == ["p1", "p4"]
    assert co.recommend(RecommendRequest(cart=("p2",), top_k=3)) == ["p1", "p3", "p4"]  # filled
    assert own.recommend(RecommendRequest(cart=("p1",), top_k=2, user_id="u1")) == ["p5", "p2"]
    assert own.recommend(RecommendRequest(cart=("p1",), top_k=2, user_id="nobody")) == ["p2", "p3"]
    for rec in (pop, co, own):
        for cart in (("p1",), ("p1", "p2", "p5"), ("p3", "p4")):
            for user in (None, "u0", "u1"):
                out = rec.recommend(RecommendRequest(cart=cart, top_k=5, user_id=user))
                assert not set(out) & set(cart)
                assert len(out) == len(set(out)) == min(5, 5 - len(cart))


def test_age_band_midpoints() -> None:
    assert age_from_band("35-44") == 39
    assert age_from_band("19-24") == 21
    assert age_from_band("65+") == 70
    assert age_from_band(None) == -1
    assert age_from_band("unknown") == -1


# --------------------------------------------------------------------------- end to end

_HAS_TF = all(importlib.util.find_spec(m) for m in ("tensorflow_recommenders", "tf2onnx"))


@pytest.mark.parametrize("member", [pytest.param(True, marks=pytest.mark.skipif(
    not _HAS_TF, reason="TensorFlow / TFRS not installed")), False])
def test_end_to_end_table_has_every_row(tmp_path, member: bool) -> None:
    data = _synthetic(newcomers=8)
    cfg = EvaluationConfig(max_test_baskets=150, max_val_baskets=150, member=member, epochs=1,
                           member_config={"embedding_dim": 8, "batch_size": 256})
    report = run_evaluation(cfg, data=data, work_dir=tmp_path)
    methods = [r["method"] for r in report["rows"]]
    for expected in ("baseline: most popular", "baseline: item co-occurrence (raw counts)",
                     "baseline: member's own most frequent", GUEST_BEFORE,
                     "guest model, every knob tuned on validation", SHIPPED_GUEST,
                     "member: two-tower only", SHIPPED_MEMBER):
        assert expected in methods
    for r in report["rows"]:
        if r["hr"] is None:
            assert not member and r["kind"] == "member"
            continue
        assert 0.0 <= r["mrr"] <= r["hr"] <= 1.0
        assert r["cart_violations"] == 0
        assert r["n"] == report["split"]["test_cases"] > 0
        assert r["se"] == pytest.approx(np.sqrt(r["hr"] * (1 - r["hr"]) / r["n"]))
        assert "_hits" not in r
    shipped_guest = next(r for r in report["rows"] if r["method"] == SHIPPED_GUEST)
    assert set(shipped_guest["segments"]) == {"member_unknown", "cart_has_new_product", "target_new"}
    assert "co_half_life_days" in report["tuning"]["guest"]
    assert any(m.startswith("guest + recent baskets alone") for m in methods)
    assert report["tuning"]["guest"]["stage4_baskets"]  # the session-kNN term was searched
    if member:
        assert "unknown member -> guest model as shipped" in methods
        assert any(m.startswith("member + history decay alone") for m in methods)
        assert any(m.startswith("member + neighbours alone") for m in methods)
        assert any(m.startswith("member + Two-Tower recency weights alone") for m in methods)
        assert any(m.startswith("member + own baskets with the cart") for m in methods)
        assert any(m.startswith("member + bought-before bonus") for m in methods)
        assert any(m.startswith("member + the store's recent baskets") for m in methods)
        assert report["tuning"]["member"]["own_terms"]["store"]["paired_se"] >= 0
        # the reranker: fitted on validation cases, shipped in the bundle, reported as the shipped row
        from agent.recommenders.rerank import FEATURES
        from retrain_server.evaluation.report import MEMBER_BLEND
        from retrain_server.rerank import RerankConfig

        assert MEMBER_BLEND in methods and SHIPPED_MEMBER in methods
        rr = report["tuning"]["reranker"]
        shipped = RerankConfig()
        assert rr["cases"] > 0 and len(rr["tried"]) == 1 and rr["candidates"] == shipped.candidates
        assert rr["features"] == list(FEATURES) and 1 <= rr["chosen"]["trees"] <= shipped.max_trees
        assert report["timings"]["member"]["seconds_per_epoch"] > 0
        # members the model was not trained on are answered by the guest model, as agents do
        unknown = next(r for r in report["rows"] if r["method"] == SHIPPED_MEMBER)["segments"]["member_unknown"]
        assert unknown["n"] > 0 and unknown["hr"] == shipped_guest["segments"]["member_unknown"]["hr"]
        chosen = report["chosen"]["member"]
        assert set(chosen["units"]) == {"repeat_units", "co_units", "neighbour_units", "known_units",
                                        "basket_units", "store_units"}
        assert isinstance(chosen["baskets"], bool)
        assert chosen["history_half_life_days"] in (0.0, 15.0, 30.0, 60.0, 120.0, 240.0)
        assert report["gains"] and all(g["paired_se"] >= 0 for g in report["gains"])
    table = format_table(report)
    assert table.count("\n") == len(report["rows"]) + 1 + (len(report["gains"]) + 3 if report["gains"] else 0)


def test_member_stats_match_a_count_by_hand() -> None:
    """The reranker's per-(member, item) statistics against the log read row by row."""
    from retrain_server.rerank import member_stats

    day = 86400
    log = _log([("a", "u1", "p1", 0), ("a", "u1", "p1", 5), ("b", "u1", "p1", 10 * day), ("c", "u1", "p2", 20 * day),
                ("d", "u2", "p1", 4 * day), ("e", "", "p3", 30 * day), ("f", "u2", "p9", 30 * day)])
    users, items = np.array(["", "u1", "u2"]), np.array(["p1", "p2", "p3"])
    st = member_stats(log, users, items)
    st.check(len(users))
    baskets, days, gap, found = st.pairs(1, np.array([0, 1, 2]))
    assert baskets.tolist() == [2, 1, 0] and found.tolist() == [True, True, False]
    assert days.tolist() == [20.0, 10.0, 999.0]  # as of the log's newest purchase (day 30)
    assert gap.tolist() == [10.0, 999.0, 999.0]  # p1 bought on day 0 and day 10; p2 once
    baskets, days, _, _ = st.pairs(2, np.array([0]))
    assert baskets.tolist() == [1] and days.tolist() == [26.0]
    # products outside the lookups do not count (u2's basket f holds only p9)
    assert st.member_baskets.tolist() == [0, 3, 1] and st.member_days_since.tolist()[1:] == [10.0, 26.0]
    assert np.allclose(st.log_popularity, np.log1p([4, 1, 1]))
    # p1: two buyers, one of them in two baskets -> (1 + 1) / (2 + 2)
    assert st.rebuy_rate.tolist() == pytest.approx([0.5, 1 / 3, 0.5])


def test_last_basket_split_takes_each_members_newest_basket() -> None:
    log = _log([("a", "u1", "p1", 0), ("b", "u1", "p2", 10), ("c", "u2", "p1", 5), ("g", "", "p3", 50),
                ("d", "u2", "p3", 7), ("d", "u2", "p4", 8)])
    earlier, later, cutoff = split_last_basket(log)
    assert set(later.session_ids.tolist()) == {"b", "d"} and cutoff == 7
    assert set(earlier.session_ids.tolist()) == {"a", "c", "g"}


def test_paired_standard_error() -> None:
    a, b = np.array([1, 0, 1, 1, 0, 1.0]), np.array([1, 0, 0, 1, 0, 1.0])
    assert paired_se(a, b) == pytest.approx(np.std(a - b, ddof=1) / np.sqrt(6))
    assert paired_se(a, a) == 0.0


def test_member_grid_ranks_match_the_recommender(trained) -> None:
    """The tuner's arithmetic ranks each target exactly where the edge recommender would."""
    from agent.bundle import load_public_key
    from agent.registry import load_snapshot
    from retrain_server.evaluation.tuning import MemberGrid

    snap = load_snapshot(trained.parameters, load_public_key(trained.public_key))
    rec = snap.member
    log = trained.store.purchases
    _, recent, _ = split_by_time(log, 5)
    cases = held_out_cases(recent, max_cases=60, seed=2)
    grid = MemberGrid(rec, cases, 10, {"as loaded": rec})
    p = rec.params
    assert rec.baskets_ is not None and p.basket_weight > 0  # the shipped blend has the own-baskets term
    assert snap.guest.baskets_ is not None  # the store's recent baskets, for the store term
    # columns: repeat, co, neighbours, known, basket, store (ScoreParts.SPARSE)
    weights = np.array([[0.0] * 6, [p.repeat_weight, p.co_weight, 0.0, p.known_weight, p.basket_weight,
                                    p.store_weight],
                        [5.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 50.0, 0.0, 0.0, 0.0, 0.0],
                        [0.0, 0.0, 0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 20.0, 0.0],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 30.0], [1.0, 2.0, 0.0, 0.5, 4.0, 6.0]])
    ranks = grid.ranks("as loaded", weights)
    for j, (rw, cw, _, kw, bw, sw) in enumerate(weights.tolist()):
        variant = load_snapshot(trained.parameters, load_public_key(trained.public_key),
                                member_overrides={"repeat_weight": rw, "co_weight": cw, "known_weight": kw,
                                                  "basket_weight": bw, "store_weight": sw,
                                                  "rerank": False}).member
        expected = evaluate(variant, cases, k=10).ranks
        agree = np.mean(np.asarray(expected) == ranks[j])
        assert agree >= 0.95, (j, agree)  # float32 vs float64 ties may differ in a rare case


def test_cart_damped_matches_training_tables() -> None:
    from retrain_server.evaluate import cart_damped
    from retrain_server.guest import co_purchase_counts, co_purchase_tables

    data = _synthetic(n_users=40)
    co, counts = co_purchase_counts(data.log, data.catalog)
    plain = co_purchase_tables(co, counts, 10, 0.25, 2, cart_alpha=0.0)
    nb, sc = cart_damped(plain, counts, 0.75)
    ref_nb, ref_sc = co_purchase_tables(co, counts, 10, 0.25, 2, cart_alpha=0.75)
    np.testing.assert_array_equal(nb, ref_nb)
    np.testing.assert_allclose(sc, ref_sc, rtol=1e-5)


@pytest.mark.parametrize("name", ["retrain_server.evaluation", "retrain_server.evaluation.protocol",
                                  "retrain_server.evaluation.baselines", "retrain_server.evaluation.tuning",
                                  "retrain_server.evaluation.report", "retrain_server.evaluation.run",
                                  "retrain_server.evaluation.datasets", "retrain_server.evaluation.cli"])
def test_evaluation_modules_list_their_public_api(name: str) -> None:
    """As tests/test_public_api.py does for top-level modules (it does not walk sub-packages)."""
    import importlib
    import inspect

    module = importlib.import_module(name)
    listed = module.__all__
    assert len(set(listed)) == len(listed) and all(hasattr(module, n) for n in listed)
    defined = [k for k, v in vars(module).items() if not k.startswith("_") and (
        inspect.isfunction(v) or inspect.isclass(v)) and getattr(v, "__module__", None) == name]
    assert not [d for d in defined if d not in listed]

"""The member reranker: trees exported to ONNX, the edge's features, loading and serving it from a bundle."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from agent import layout
from agent.bundle import load_public_key
from agent.errors import BundleError
from agent.layout import DirectorySource
from agent.recommenders.base import RecommendRequest
from agent.recommenders.member import top_k
from agent.recommenders.rerank import FEATURES, candidate_features
from agent.registry import guest_from_source, load_snapshot, member_from_source


@pytest.fixture(scope="module")
def snapshot(trained):
    return load_snapshot(trained.parameters, load_public_key(trained.public_key))


def _requests(trained, member, n=40):
    """Carts of known members: a few products of their own baskets, as a basket's sensors would send."""
    log = trained.store.purchases
    rng = np.random.default_rng(3)
    sessions = np.unique(log.session_ids[log.user_ids != ""])
    out = []
    for sid in rng.choice(sessions, n, replace=False).tolist():
        rows = log.session_ids == sid
        user = str(log.user_ids[rows][0])
        if member.knows_user(user):
            out.append(RecommendRequest(cart=tuple(dict.fromkeys(log.product_ids[rows].tolist()))[:3],
                                        user_id=user, age=int(log.ages[rows][0]), top_k=10))
    assert len(out) >= 20
    return out


def test_onnx_trees_score_exactly_as_the_fitted_classifier_orders():
    """The exported trees give scikit-learn's raw score (so its order), even for features lying exactly
    on a split threshold (float64 thresholds rounded down to float32)."""
    import onnxruntime as ort
    from sklearn.ensemble import HistGradientBoostingClassifier

    from retrain_server.rerank import trees_to_onnx

    rng = np.random.default_rng(0)
    X = rng.standard_normal((6000, len(FEATURES))).astype(np.float32)
    X[:, 3] = rng.integers(0, 5, len(X))  # small integer features: many rows sit on a threshold
    X[:, 13] = rng.integers(0, 2, len(X))
    y = ((X[:, 0] + 0.5 * X[:, 3] - X[:, 13] + 0.3 * rng.standard_normal(len(X))) > 0.5).astype(int)
    model = HistGradientBoostingClassifier(max_iter=60, max_leaf_nodes=15, random_state=0).fit(X, y)
    session = ort.InferenceSession(trees_to_onnx(model), providers=["CPUExecutionProvider"])
    test = np.concatenate([X[:500], rng.standard_normal((500, len(FEATURES))).astype(np.float32)])
    # also every split threshold itself, as float32, in its own feature
    for predictor, in model._predictors[:5]:
        for node in predictor.nodes:
            if not node["is_leaf"]:
                row = test[0].copy()
                row[node["feature_idx"]] = np.float32(node["num_threshold"])
                test = np.vstack([test, row])
    got = session.run(None, {"X": test})[0].reshape(-1)
    want = model.decision_function(test)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.argsort(-got, kind="stable")[:50], np.argsort(-want, kind="stable")[:50])


def test_the_trained_bundle_reranks_known_members_only(snapshot, trained):
    m = snapshot.member
    r = m.reranker_
    from retrain_server.rerank import RerankConfig

    assert r is not None and r.candidates == RerankConfig().candidates
    meta = json.loads((trained.parameters / layout.MEMBER_META).read_text())
    assert meta["rerank"]["features"] == list(FEATURES) and meta["rerank"]["fit"]["chosen"]["trees"] >= 1
    blend_only = member_from_source(DirectorySource(trained.parameters), snapshot.guest, {"rerank": False})
    assert blend_only.reranker_ is None
    reordered = 0
    for req in _requests(trained, m):
        got = m.recommend_scored(req)
        # by hand: the blend's best candidates (cart excluded), scored by the trees, best first
        parts = m.score_parts(req)
        total = parts.total(m.params)
        total[m.item_indices(req.cart)] = -np.inf
        top = top_k(total, r.candidates)
        tree = r.session_.run(None, {"X": candidate_features(m, r.stats, req, parts, top)})[0].reshape(-1)
        want = top[np.argsort(-tree, kind="stable")[:10]]
        assert [p for p, _ in got] == m.item_ids_[want].tolist()
        assert [s for _, s in got] == pytest.approx(np.sort(tree)[::-1][:10].tolist(), rel=1e-6)
        assert not set(req.cart) & {p for p, _ in got}
        blend = blend_only.recommend(req)
        assert blend == m.item_ids_[top[:10]].tolist()  # the blend alone: its own best 10
        reordered += blend != [p for p, _ in got]
    assert reordered  # the trees do change the order
    # guests, members the model does not know and empty carts (the trees never learned one): the blend
    some = tuple(trained.family_items(3)[:3])
    for user, cart in ((None, some), ("nobody-knows-me", some), (trained.member_id, ())):
        req = RecommendRequest(cart=cart, user_id=user, top_k=10)
        assert m.recommend(req) == blend_only.recommend(req)


def test_candidate_features_match_the_terms_and_statistics_read_one_by_one(snapshot, trained):
    """Each column against its definition, computed the slow way (dense arrays, dict lookups)."""
    from retrain_server.rerank import member_stats

    m = snapshot.member
    stats = m.reranker_.stats
    again = member_stats(trained.store.purchases, np.array(sorted(m.user_index_, key=m.user_index_.get)),
                         m.item_ids_)
    for name in layout.MEMBER_RERANK_STATS:  # the shipped statistics are the log's (retrain-server train reads it all)
        np.testing.assert_array_equal(getattr(stats, name), getattr(again, name))
    col = {name: i for i, name in enumerate(FEATURES)}
    for req in _requests(trained, m)[:10]:
        parts = m.score_parts(req)
        top = top_k(parts.total(m.params), 100)
        X = candidate_features(m, stats, req, parts, top)
        assert X.shape == (100, len(FEATURES)) and X.dtype == np.float32
        np.testing.assert_array_equal(X[:, col["two_tower"]], parts.two_tower[top])
        for name in ("repeat", "co", "basket", "store"):
            dense = np.zeros(len(m.item_ids_), np.float32)
            items, values = getattr(parts, name)
            np.add.at(dense, items, values.astype(np.float32))
            np.testing.assert_allclose(X[:, col[name]], dense[top], rtol=1e-6)
        user = m.user_index_[req.user_id]
        pairs = dict(zip(stats.keys.tolist(), range(len(stats.keys))))
        for row, item in enumerate(top.tolist()):
            at = pairs.get(user * stats.n_items + item)
            assert X[row, col["bought_before"]] == (at is not None)
            assert X[row, col["baskets_with_item"]] == (stats.baskets[at] if at is not None else 0)
            assert X[row, col["days_since_bought"]] == (stats.days_since[at] if at is not None else 999)
        assert np.all(X[:, col["member_baskets"]] == stats.member_baskets[user])
        assert np.all(X[:, col["cart_size"]] == len(req.cart)) and np.all(X[:, col["age"]] == req.age)
        # tag similarity: the best TF-IDF similarity of the candidate to any cart product
        g = m.guest_
        sim = np.zeros(len(m.item_ids_), np.float32)
        for c in g.indices(req.cart).tolist():
            for nb, sc in zip(g.sim_neighbors_[c].tolist(), g.sim_scores_[c].tolist()):
                if nb >= 0:
                    sim[nb] = max(sim[nb], sc)
        np.testing.assert_array_equal(X[:, col["tag_similarity_to_cart"]], sim[top])


def test_a_partial_or_mismatched_reranker_is_refused_at_load(tmp_path, trained):
    def fresh():
        root = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
        shutil.copytree(trained.parameters, root)
        return DirectorySource(root)

    def load(source):
        return member_from_source(source, guest_from_source(source))

    source = fresh()
    (source.root / layout.MEMBER_RERANK_STATS["gap_days"]).unlink()
    with pytest.raises(BundleError, match="member reranker incomplete.*rerank_gap_days"):
        load(source)
    source = fresh()
    meta_path = source.root / layout.MEMBER_META
    meta = json.loads(meta_path.read_text())
    meta["rerank"]["features"] = list(FEATURES[::-1])  # a newer server's features: this agent cannot use them
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="'rerank' must name the features"):
        load(source)
    for name, mutate, needle in (("keys", lambda a: a[::-1].copy(), "strictly increasing"),
                                 ("keys", lambda a: a + 10**9, "outside the lookups"),
                                 ("rebuy_rate", lambda a: a[:-1], "rebuy_rate"),
                                 ("days_since", lambda a: np.where(np.arange(a.size) == 0, np.nan, a)
                                  .astype(np.float32), "finite"),
                                 ("baskets", lambda a: a.astype(np.float64), "float32")):
        source = fresh()
        path = source.root / layout.MEMBER_RERANK_STATS[name]
        np.save(path, mutate(np.load(path)))
        with pytest.raises(BundleError, match=needle):
            load(source)
    source = fresh()
    (source.root / layout.MEMBER_RERANK_TREES).write_bytes(b"not onnx")
    with pytest.raises(BundleError, match="member reranker invalid"):
        load(source)
    # none at all: an older bundle, the blend alone ranks
    source = fresh()
    for relpath in (layout.MEMBER_RERANK_TREES, *layout.MEMBER_RERANK_STATS.values()):
        (source.root / relpath).unlink()
        assert layout.is_edge_file(relpath)
    assert load(source).reranker_ is None


def test_kept_trees_fitted_on_other_features_are_not_shipped(tmp_path):
    """Trees kept beside a checkpoint for the fine-tuning nights load back as they were saved, unless the
    server now computes other features (an upgrade): then none until the next training from scratch."""
    from retrain_server.rerank import FittedReranker, RerankConfig

    fitted = FittedReranker(b"trees", RerankConfig(candidates=30), {"features": list(FEATURES), "chosen": {"trees": 3}})
    fitted.save(tmp_path / "a")
    assert FittedReranker.load(tmp_path / "a") == fitted
    FittedReranker(b"trees", RerankConfig(), {"features": list(FEATURES[:-1])}).save(tmp_path / "b")
    assert FittedReranker.load(tmp_path / "b") is None
    assert FittedReranker.load(tmp_path / "none") is None


def test_trees_clearly_worse_than_the_blend_are_not_shipped():
    """The blend's first candidate is always the hidden product here, and the features say nothing about
    it: trees can only lose to the blend, so fitting refuses them (the blend then ships alone)."""
    from agent.recommenders.member import ScoreParts
    from agent.recommenders.rerank import MemberStats
    from retrain_server.evaluation.protocol import Case
    from retrain_server.rerank import RerankConfig, fit_reranker

    n_items, rng = 400, np.random.default_rng(0)
    stats = MemberStats(n_items=n_items, keys=np.zeros(0, np.int64), baskets=np.zeros(0, np.float32),
                        days_since=np.zeros(0, np.float32), gap_days=np.zeros(0, np.float32),
                        member_baskets=np.ones(2, np.float32), member_days_since=np.ones(2, np.float32),
                        log_popularity=np.ones(n_items, np.float32), rebuy_rate=np.ones(n_items, np.float32))
    cases = [Case(f"s{i}", (f"cart{i}",), f"i{rng.integers(n_items)}", user_id="u") for i in range(300)]
    target_of = {c.cart[0]: int(c.target[1:]) for c in cases}

    class Blend:  # candidates like MemberRecommender.candidates: the hidden product first, the rest at random
        user_index_, guest_ = {"u": 1}, None

        def knows_user(self, user_id):
            return user_id == "u"

        def item_indices(self, ids):
            return np.array([int(p[1:]) for p in ids], np.int64)

        def candidates(self, request, n):
            target = target_of[request.cart[0]]
            rest = rng.permutation(np.setdiff1d(np.arange(n_items), [target]))[:n - 1]
            return ScoreParts(rng.random(n_items).astype(np.float32)), np.concatenate([[target], rest])

    class SameEveryDay:
        def for_case(self, case):
            return stats

    with pytest.raises(ValueError, match="worse than the blend"):
        fit_reranker(Blend(), SameEveryDay(), cases, RerankConfig(candidates=50, min_samples_leaf=20), k=10)


def test_member_stats_pairs_finds_each_members_own_rows_only():
    """Lookups search the member's own rows: members without rows, the first and the last member, items
    on either side of a row, all as a dict of the keys says."""
    from agent.recommenders.rerank import NEVER, MemberStats

    n_users, n_items = 6, 10
    rng = np.random.default_rng(5)
    keys = np.array(sorted({1 * n_items + 0, 1 * n_items + 9, 2 * n_items + 4, 5 * n_items + 0, 5 * n_items + 3,
                            5 * n_items + 9}), np.int64)
    stats = MemberStats(n_items=n_items, keys=keys, baskets=rng.integers(1, 9, len(keys)).astype(np.float32),
                        days_since=rng.random(len(keys)).astype(np.float32),
                        gap_days=rng.random(len(keys)).astype(np.float32),
                        member_baskets=np.ones(n_users, np.float32), member_days_since=np.ones(n_users, np.float32),
                        log_popularity=np.zeros(n_items, np.float32), rebuy_rate=np.zeros(n_items, np.float32))
    stats.check(n_users)
    at = {k: i for i, k in enumerate(keys.tolist())}
    items = np.arange(n_items)
    for user in range(n_users):
        baskets, days, gap, found = stats.pairs(user, items)
        rows = [at.get(user * n_items + i) for i in items.tolist()]
        assert found.tolist() == [r is not None for r in rows]
        assert baskets.tolist() == [0.0 if r is None else float(stats.baskets[r]) for r in rows]
        assert days.tolist() == [NEVER if r is None else float(stats.days_since[r]) for r in rows]
        assert gap.tolist() == [NEVER if r is None else float(stats.gap_days[r]) for r in rows]


def test_tag_similarity_when_the_guest_numbers_products_differently(snapshot, trained):
    """A guest model whose catalogue order differs from the member model's (its tag neighbours renumbered,
    padding scored non-zero): the feature is still the best similarity of each candidate to the cart, and
    padding never counts as a product."""
    from agent.recommenders.guest import CoPartners, GuestRecommender

    g0 = snapshot.guest
    n = len(g0.item_ids_)
    perm = np.arange(n)[::-1]  # new row r is old product perm[r]
    new_of = np.argsort(perm)

    def renumber(table):
        t = table[perm]
        return np.where(t >= 0, new_of[np.maximum(t, 0)], -1)

    sim_nb = np.concatenate([renumber(g0.sim_neighbors_), np.full((n, 1), -1)], axis=1)
    sim_sc = np.concatenate([g0.sim_scores_[perm], np.full((n, 1), 0.9, np.float32)], axis=1)
    rows = [g0.co_.items[g0.co_.indptr[o]:g0.co_.indptr[o + 1]] for o in perm.tolist()]
    scores = [g0.co_.scores[g0.co_.indptr[o]:g0.co_.indptr[o + 1]] for o in perm.tolist()]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    co = CoPartners(indptr, new_of[np.concatenate(rows)].astype(np.int32), np.concatenate(scores))
    guest = GuestRecommender(g0.item_ids_[perm], None, None, sim_nb, sim_sc, new_of[g0.popular_], g0.params,
                             co_partners=co)
    m = member_from_source(DirectorySource(trained.parameters), guest)
    assert m.guest_to_item_ is not None and m.reranker_ is not None
    col = FEATURES.index("tag_similarity_to_cart")
    for req in _requests(trained, m)[:10]:
        parts = m.score_parts(req)
        top = top_k(parts.total(m.params), 100)
        X = candidate_features(m, m.reranker_.stats, req, parts, top)
        sim = np.zeros(len(m.item_ids_), np.float32)
        for c in guest.indices(req.cart).tolist():
            for nb, sc in zip(sim_nb[c].tolist(), sim_sc[c].tolist()):
                if nb >= 0:
                    j = m.item_index_[guest.item_ids_[nb]]
                    sim[j] = max(sim[j], sc)
        np.testing.assert_array_equal(X[:, col], sim[top])


def test_feature_cells_are_reset_even_when_a_request_fails(snapshot, trained, monkeypatch):
    """The per-thread item -> cell table is all -1 between calls, also after a call that raised (the numpy
    code; tests/test_native.py checks the compiled kernel's own table)."""
    from agent.recommenders import native

    monkeypatch.setattr(native, "KERNELS", None)

    m = snapshot.member
    req = _requests(trained, m)[0]
    parts = m.score_parts(req)
    top = top_k(parts.total(m.params), 50)
    candidate_features(m, m.reranker_.stats, req, parts, top)
    assert np.all(native.scratch("feature_cells", len(m.item_ids_), -1) == -1)
    broken = dataclasses.replace(parts, co=(np.array([len(m.item_ids_) + 5]), np.ones(1, np.float32)))
    with pytest.raises(IndexError):
        candidate_features(m, m.reranker_.stats, req, broken, top)
    assert np.all(native.scratch("feature_cells", len(m.item_ids_), -1) == -1)


def test_onnx_sessions_do_not_keep_a_copy_of_the_model(snapshot):
    """onnxruntime's private copy of the model bytes is released (1.7 MB for the int8 user tower); this fails
    if an onnxruntime upgrade renames what :func:`agent.recommenders.onnx.cpu_session` clears."""
    for session in (snapshot.member.session_, snapshot.member.reranker_.session_):
        assert hasattr(session, "_model_bytes") and session._model_bytes is None
        assert session.run(None, {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape],
                                                   np.int64 if "int64" in i.type else np.float32)
                                  for i in session.get_inputs()})

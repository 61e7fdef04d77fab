"""The member blend's public interface: scores with ids, the score's parts, the neighbour table, optional files."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import scipy.sparse as sp

from agent import layout
from agent.bundle import load_public_key
from agent.recommenders.base import RecommendRequest
from agent.recommenders.guest import sum_by_item
from agent.recommenders.member import MemberParams
from agent.registry import load_snapshot, member_from_source
from retrain_server.blend import BlendUnits, calibration_requests, neighbour_table, score_unit, serving_weights


@pytest.fixture(scope="module")
def snapshot(trained):
    return load_snapshot(trained.parameters, load_public_key(trained.public_key))


def test_parts_add_up_to_the_served_score(snapshot, trained):
    m = snapshot.member
    req = RecommendRequest(cart=tuple(trained.family_items(3)[:4]), user_id=trained.member_id, top_k=10)
    parts = m.score_parts(req)
    assert parts.repeat[0].size and parts.co[0].size  # the trained member has a history; the cart has partners
    assert parts.neighbours[0].size == 0  # no neighbour table shipped by default
    assert parts.co[1].max() == pytest.approx(1.0)
    np.testing.assert_allclose(parts.total(m.params), m.scores(req), rtol=1e-5, atol=1e-5)
    off = parts.total(MemberParams())
    np.testing.assert_allclose(off, parts.two_tower)


def test_recommend_scored_is_recommend_with_scores(snapshot, trained):
    for model, user in ((snapshot.member, trained.member_id), (snapshot.guest, None)):
        req = RecommendRequest(cart=tuple(trained.family_items(5)[:3]), user_id=user, top_k=15)
        scored = model.recommend_scored(req)
        assert [p for p, _ in scored] == model.recommend(req)
        scores = [s for _, s in scored]
        assert scores == sorted(scores, reverse=True)


def test_score_unit_is_the_one_calibration(snapshot, trained):
    m = snapshot.member
    log = trained.store.purchases
    unit = score_unit(m, calibration_requests(log))
    assert unit > 0
    w = serving_weights(m, log, BlendUnits(repeat_units=2.0, co_units=3.0, neighbour_units=0.5))
    assert w["score_unit"] == pytest.approx(unit, rel=1e-5)
    assert w["neighbour_weight"] == pytest.approx(0.5 * unit, rel=1e-4)


def test_products_no_longer_sold_are_not_recommended_to_members(snapshot, trained):
    """The member model keeps every product it was trained on; one the store stopped selling (gone from the
    catalogue, so from tonight's guest model) was still recommended to members, named by its bare id."""
    from agent.layout import DirectorySource
    from agent.recommenders.guest import GuestParams
    from retrain_server.data import Catalog
    from retrain_server.evaluation.tuning import guest_recommender
    from retrain_server.guest import train_guest_model

    req = RecommendRequest(cart=tuple(trained.family_items(3)[:2]), user_id=trained.member_id, top_k=10)
    before = snapshot.member.recommend(req)
    gone = set(before[:3])
    cat = trained.store.catalog
    keep = ~np.isin(cat.ids, list(gone))
    catalogue = Catalog(ids=cat.ids[keep], names=cat.names[keep], tags=cat.tags[keep])
    log = trained.store.purchases
    guest = guest_recommender(train_guest_model(catalogue, log.select(np.isin(log.product_ids, catalogue.ids))),
                              GuestParams())
    for rerank in (True, False):
        member = member_from_source(DirectorySource(trained.parameters), guest, {"rerank": rerank})
        assert set(member.item_ids_[member.outside_catalogue_].tolist()) == gone
        after = member.recommend(req)
        assert len(after) == 10 and not set(after) & gone, (rerank, after)
    assert snapshot.member.outside_catalogue_.size == 0  # the same catalogue: nothing excluded


def test_neighbour_table_sums_similar_members():
    # members 1 and 2 buy alike; member 3 is different; row 0 (unknown user) is empty
    h = sp.csr_matrix(np.array([[0, 0, 0, 0, 0],
                                [3, 1, 0, 0, 0],
                                [2, 1, 4, 0, 0],
                                [0, 0, 0, 5, 1]], dtype=np.float32))
    indptr, items, scores = neighbour_table(h, k=1, keep=3)
    assert indptr[0] == indptr[1] == 0
    row1 = dict(zip(items[indptr[1]:indptr[2]].tolist(), scores[indptr[1]:indptr[2]].tolist()))
    assert set(row1) == {0, 1, 2} and max(row1.values()) == pytest.approx(1.0)
    assert row1[2] == pytest.approx(1.0)  # member 2's favourite
    row3 = items[indptr[3]:indptr[4]].tolist()
    assert row3 == []  # nobody is like member 3
    assert scores.dtype == np.float32 and items.dtype == np.int32 and indptr.dtype == np.int64


def test_neighbour_files_are_optional_and_loaded_when_present(tmp_path, snapshot, trained):
    from agent.layout import DirectorySource
    from retrain_server.export import history_matrix, write_neighbour_arrays

    root = tmp_path / "params"
    shutil.copytree(trained.parameters, root)
    source = DirectorySource(root)
    assert not any(source.has(p) for p in layout.MEMBER_NEIGHBOURS.values())
    plain = member_from_source(source, snapshot.guest)
    assert plain.neighbours_ is None  # an older bundle: the term is off
    user_lookup = source.array(layout.MEMBER_ARRAYS["user_lookup"])
    item_lookup = source.array(layout.MEMBER_ARRAYS["item_lookup"])
    log = trained.store.purchases
    members = log.user_ids != ""
    hist = history_matrix(log.user_ids[members], log.product_ids[members], np.ones(int(members.sum())),
                          user_lookup, item_lookup)
    assert write_neighbour_arrays(hist, root / layout.MEMBER_DIR, k=5, keep=20) > 0
    for p in layout.MEMBER_NEIGHBOURS.values():
        assert layout.is_edge_file(p)
    with_nb = member_from_source(DirectorySource(root), snapshot.guest, {"neighbour_weight": 1e6, "rerank": False})
    assert with_nb.neighbours_ is not None
    req = RecommendRequest(cart=tuple(trained.family_items(1)[:2]), user_id=trained.member_id, top_k=5)
    items, scores = with_nb.score_parts(req).neighbours
    best = set(with_nb.item_ids_[items[np.argsort(-scores, kind="stable")]].tolist()) - set(req.cart)
    assert set(with_nb.recommend(req)) <= best  # a huge weight: the neighbours' items lead


# --------------------------------------------------------------------------- the member's own baskets

def _log(rows):
    """A PurchaseLog from (session, user, product, day) tuples (day -> timestamp)."""
    from retrain_server.data import PurchaseLog

    return PurchaseLog.from_columns(
        session_ids=np.array([r[0] for r in rows]), user_ids=np.array([r[1] for r in rows]),
        product_ids=np.array([r[2] for r in rows]), genders=np.full(len(rows), -1, np.int8),
        ages=np.full(len(rows), -1, np.int16), timestamps=np.array([r[3] * 86_400 for r in rows], np.int64))


def _brute_force(log, ages, user, cart, half_life, max_baskets):
    """The personal co-occurrence, written the slow obvious way."""
    baskets = {}
    for sid, uid, pid, age, ts in zip(log.session_ids.tolist(), log.user_ids.tolist(), log.product_ids.tolist(),
                                      ages.tolist(), log.timestamps.tolist()):
        if uid == user:
            b = baskets.setdefault(sid, {"items": set(), "age": age, "ts": ts})
            b["items"].add(pid)
            b["age"], b["ts"] = min(b["age"], age), max(b["ts"], ts)
    newest = sorted(baskets.items(), key=lambda kv: (-kv[1]["ts"], kv[0]))[:max_baskets]
    score = {}
    for _, b in newest:
        share = len(b["items"] & set(cart)) / len(b["items"]) * 0.5 ** (b["age"] / half_life)
        for p in b["items"]:
            score[p] = score.get(p, 0.0) + share
    top = max(score.values(), default=0.0)
    return {p: s / top for p, s in score.items() if s > 0} if top > 0 else {}


def test_basket_table_matches_the_brute_force_personal_co_occurrence():
    from agent.recommenders.member import MemberBaskets
    from retrain_server.blend import basket_table

    rng = np.random.default_rng(5)
    users = ["", "u1", "u2", "u3", "ghost"]  # "" = guest; "ghost" is not in the lookup
    rows = []
    for s in range(120):
        uid = users[rng.integers(len(users))]
        day = int(rng.integers(0, 200))
        for p in rng.choice(12, size=int(rng.integers(1, 6)), replace=False).tolist():
            rows.append((f"s{s:03d}", uid, f"p{p}", day))
    rows.append(("s999", "u1", "p_unknown", 10))  # a product the lookup lacks: left out
    rows.sort(key=lambda r: r[3])
    log = _log(rows)
    ages = 200 - log.timestamps // 86_400
    user_lookup = np.array(["[UNK]", "u1", "u2", "u3"])
    item_lookup = np.array([f"p{i}" for i in range(12)])
    parts = basket_table(log, ages, user_lookup, item_lookup, half_life_days=30.0, max_baskets=7)
    table = MemberBaskets(*parts)
    assert table.indptr[1] == 0  # the unknown-user row is empty
    assert np.all(np.diff(table.indptr) <= 7)  # at most max_baskets per member
    assert np.all(np.diff(table.starts) > 0)  # no empty basket
    for u, user in enumerate(user_lookup.tolist()[1:], start=1):
        for cart in (["p1"], ["p2", "p5", "p9"], ["p11"]):
            expect = _brute_force(log, ages, user, cart, 30.0, 7)
            items, values = table.scores(u, np.array([int(c[1:]) for c in cart]))
            got = dict(zip(item_lookup[items].tolist(), values.tolist()))
            assert got.keys() == expect.keys(), (user, cart)
            for p in expect:
                assert got[p] == pytest.approx(expect[p], rel=1e-5)
    assert table.scores(0, np.array([1]))[0].size == 0  # no baskets: nothing
    assert table.scores(2, np.zeros(0, np.int64))[0].size == 0  # empty cart: nothing


def test_known_and_basket_terms_are_loaded_weighted_and_validated(tmp_path, snapshot, trained):
    from agent.errors import BundleError
    from agent.layout import DirectorySource
    from retrain_server.counts import days_before
    from retrain_server.export import write_basket_arrays

    root = tmp_path / "params"
    shutil.copytree(trained.parameters, root)
    source = DirectorySource(root)
    user_lookup = source.array(layout.MEMBER_ARRAYS["user_lookup"])
    item_lookup = source.array(layout.MEMBER_ARRAYS["item_lookup"])
    log = trained.store.purchases
    for p in layout.MEMBER_BASKETS.values():
        (root / p).unlink(missing_ok=True)
        assert layout.is_edge_file(p)
    assert member_from_source(source, snapshot.guest).baskets_ is None  # an older bundle: the term is off
    n = write_basket_arrays(log, days_before(log.timestamps, int(log.timestamps.max())), user_lookup, item_lookup,
                            root / layout.MEMBER_DIR, half_life_days=60.0, max_baskets=20)
    assert n > 0
    m = member_from_source(source, snapshot.guest, {"basket_weight": 1e6, "known_weight": 0.0, "rerank": False})
    own = log.product_ids[log.user_ids == trained.member_id]
    req = RecommendRequest(cart=(str(own[-1]),), user_id=trained.member_id, top_k=5)  # a product they bought
    parts = m.score_parts(req)
    items, scores = parts.basket
    assert items.size and scores.max() == pytest.approx(1.0)
    assert parts.known[0].tolist() == parts.repeat[0].tolist() and np.all(parts.known[1] == 1.0)
    np.testing.assert_allclose(parts.total(m.params), m.scores(req), rtol=1e-5, atol=1e-3)
    by_item = dict(zip(m.item_ids_[items].tolist(), scores.tolist()))
    fifth = sorted((v for p, v in by_item.items() if p not in req.cart), reverse=True)[4]
    got = m.recommend(req)
    assert len(got) == 5 and all(by_item.get(p, 0.0) >= fifth - 1e-6 for p in got)  # huge weight: own baskets lead
    # a guest or an unknown member has no baskets
    assert m.score_parts(RecommendRequest(cart=req.cart)).basket[0].size == 0
    # malformed tables are refused at load, with the file named
    starts = root / layout.MEMBER_BASKETS["starts"]
    good = np.load(starts)
    np.save(starts, good[:-1])
    with pytest.raises(BundleError, match="baskets_indptr"):
        member_from_source(source, snapshot.guest)
    np.save(starts, good)
    items_path = root / layout.MEMBER_BASKETS["items"]
    bad = np.load(items_path)
    bad[0] = len(item_lookup) + 7
    np.save(items_path, bad)
    with pytest.raises(BundleError, match="outside item_lookup"):
        member_from_source(source, snapshot.guest)


def test_store_term_is_the_guest_models_recent_basket_votes(snapshot, trained):
    """The member blend's ``store`` term: the store's recent baskets most like the cart vote (the guest
    model's session kNN, summed per product)."""
    g, m = snapshot.guest, snapshot.member
    unit = json.loads((trained.parameters / layout.MEMBER_META).read_text())["serving"]["score_unit"]
    assert g.baskets_ is not None and m.params.store_weight == pytest.approx(BlendUnits().store_units * unit,
                                                                              rel=1e-4)  # shipped on
    assert BlendUnits().store_units > 0
    cart = tuple(trained.family_items(2)[:3])
    req = RecommendRequest(cart=cart, user_id=trained.member_id, top_k=10)
    rep_items, rep_votes = m.score_parts(req).store  # one entry per voting basket and product
    raw_items, raw_votes = g.baskets_.scores(g.indices(cart), g.params.basket_neighbours)
    expected: dict[str, float] = {}
    for i, v in zip(g.item_ids_[raw_items].tolist(), raw_votes.tolist()):
        expected[i] = expected.get(i, 0.0) + v
    items, votes = sum_by_item(rep_items, rep_votes)
    assert items.size < rep_items.size  # repeats are there, and summed by every consumer
    assert items.size and dict(zip(m.item_ids_[items].tolist(), votes.tolist())) == pytest.approx(expected)
    assert 0 < votes.max() <= 1.0 + 1e-9  # a share of the voting baskets
    # total() sums the repeats: the term's contribution is weight x the summed vote
    w = MemberParams(store_weight=2.5)
    np.testing.assert_allclose(m.score_parts(req).total(w) - m.score_parts(req).two_tower,
                               np.bincount(items, 2.5 * votes, minlength=len(m.item_ids_)), rtol=1e-5, atol=1e-6)
    assert m.score_parts(RecommendRequest(user_id=trained.member_id)).store[0].size == 0  # empty cart
    # a huge weight: the member's answer is the guest model's session-kNN ranking
    key = load_public_key(trained.public_key)
    strong = load_snapshot(trained.parameters, key, member_overrides={"store_weight": 1e6, "rerank": False}).member
    assert strong.params.store_weight == 1e6
    by_vote = sorted(((v, -i) for i, v in zip(items.tolist(), votes.tolist()) if m.item_ids_[i] not in cart),
                     reverse=True)
    tenth = by_vote[min(9, len(by_vote) - 1)][0]
    got = strong.recommend(req)
    vote_of = dict(zip(m.item_ids_[items].tolist(), votes.tolist()))
    assert all(vote_of.get(p, 0.0) >= tenth - 1e-6 for p in got[:min(10, len(by_vote))])
    np.testing.assert_allclose(strong.score_parts(req).total(strong.params), strong.scores(req), rtol=1e-5, atol=1e-2)
    # the shipped weight: the served score is the blend with the term; member.store_weight: 0 turns it off
    np.testing.assert_allclose(m.scores(req), m.score_parts(req).total(m.params), rtol=1e-5, atol=1e-5)
    off = load_snapshot(trained.parameters, key, member_overrides={"store_weight": 0.0}).member
    np.testing.assert_allclose(off.scores(req), m.score_parts(req).total(dataclasses.replace(m.params,
                               store_weight=0.0)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(off.scores(req), m.scores(req))


def test_serving_weights_cover_every_term(snapshot, trained):
    from retrain_server.blend import TERMS

    w = serving_weights(snapshot.member, trained.store.purchases,
                        BlendUnits(repeat_units=1.0, co_units=2.0, known_units=3.0, basket_units=4.0, store_units=5.0))
    unit = w["score_unit"]
    for term, units in zip(TERMS, (1.0, 2.0, 0.0, 3.0, 4.0, 5.0)):
        assert w[f"{term}_weight"] == pytest.approx(units * unit, rel=1e-4)
        assert w[f"{term}_units"] == units


def test_malformed_or_partial_basket_tables_are_refused_at_load(tmp_path, trained):
    """Arrays that would crash a request later (wrong shape, wrapping values, bad weights, a missing part)
    are refused when the bundle loads, naming the file."""
    from agent.errors import BundleError
    from agent.layout import DirectorySource
    from agent.registry import guest_from_source

    def fresh() -> DirectorySource:
        root = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
        shutil.copytree(trained.parameters, root)
        return DirectorySource(root)

    source = fresh()
    assert guest_from_source(source).baskets_ is not None and member_from_source(source, None).baskets_ is not None
    cases = [
        (layout.GUEST_BASKETS["items"], lambda a: a.reshape(-1, 1), "1-D integer"),
        (layout.GUEST_BASKETS["postings_indptr"], lambda a: a.astype(np.float64), "1-D integer"),
        (layout.GUEST_BASKETS["postings"], lambda a: a.astype(np.int64) + 2**32, "outside int32"),
        (layout.MEMBER_BASKETS["weights"], lambda a: np.where(np.arange(a.size) == 0, np.inf, a), "finite"),
        (layout.MEMBER_BASKETS["weights"], lambda a: a.reshape(-1, 1), "1-D float"),
    ]
    for relpath, mutate, needle in cases:
        source = fresh()
        np.save(source.root / relpath, mutate(np.load(source.root / relpath)))
        with pytest.raises(BundleError, match=needle):
            guest = guest_from_source(source)
            member_from_source(source, guest)
    for paths, what in ((layout.GUEST_BASKETS, "recent-basket table"), (layout.MEMBER_BASKETS, "member basket")):
        source = fresh()
        (source.root / next(iter(paths.values()))).unlink()
        with pytest.raises(BundleError, match=f"{what}.*incomplete"):
            guest = guest_from_source(source)
            member_from_source(source, guest)


def test_the_unknown_user_row_is_nobodys(snapshot, trained):
    m = snapshot.member
    placeholder = m.user_ids_[0] if hasattr(m, "user_ids_") else next(iter(m.user_index_))
    assert m.user_index_[placeholder] == 0 and not m.knows_user(placeholder)
    assert m.knows_user(trained.member_id) and not m.knows_user(None) and not m.knows_user("stranger")
    rec = snapshot.recommend(RecommendRequest(cart=tuple(trained.family_items(2)[:2]), user_id=placeholder))
    assert rec.model == "guest"


def test_kept_weights_gain_the_terms_their_version_predates():
    from retrain_server.train import kept_serving

    old = {"repeat_weight": 1.5, "co_weight": 1.5, "neighbour_weight": 0.0, "score_unit": 0.15,
           "repeat_units": 10.0, "co_units": 10.0, "neighbour_units": 0.0}
    got = kept_serving(old, BlendUnits(basket_units=3.0, known_units=0.0))
    assert got["repeat_weight"] == 1.5 and got["co_weight"] == 1.5  # what the version had is kept as it was
    assert got["basket_weight"] == pytest.approx(0.45) and got["basket_units"] == 3.0
    assert got["known_weight"] == 0.0
    assert kept_serving({**old, "basket_weight": 0.2}, BlendUnits(basket_units=3.0))["basket_weight"] == 0.2
    # units changed since the version was calibrated (the store term shipped off, then on): today's units
    off = {**old, "store_weight": 0.0, "store_units": 0.0}
    got = kept_serving(off, BlendUnits(store_units=30.0))
    assert got["store_units"] == 30.0 and got["store_weight"] == pytest.approx(4.5)
    assert got["repeat_weight"] == 1.5  # unchanged units: the weight as it was


def test_among_is_isin_for_carts():
    """The cart-membership test the own-baskets term uses agrees with ``np.isin`` (repeats, empties, edges)."""
    from agent.recommenders.member import among

    rng = np.random.default_rng(0)
    for n_items, n_values in ((0, 3), (50, 0), (1, 1), (400, 12), (400, 1), (30, 30)):
        items = rng.integers(0, 60, n_items)
        values = rng.integers(0, 60, n_values)
        assert np.array_equal(among(items, values), np.isin(items, values))

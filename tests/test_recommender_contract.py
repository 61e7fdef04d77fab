"""The contract every recommender keeps, run against each trained model."""

from __future__ import annotations

import numpy as np
import pytest

from agent.bundle import load_public_key
from agent.recommenders.base import RecommendRequest
from agent.recommenders.member import top_k
from agent.registry import load_snapshot


@pytest.fixture(scope="module")
def snapshot(trained):
    return load_snapshot(trained.parameters, load_public_key(trained.public_key))


@pytest.fixture(params=["guest", "member"])
def model(request, snapshot):
    return getattr(snapshot, request.param)


@pytest.fixture
def user(snapshot, trained, model):
    return trained.member_id if model is snapshot.member else None


def test_returns_k_distinct_known_ids(model, trained, user):
    ids = set(trained.store.catalog.ids.tolist())
    for k in (1, 5, 10, 50):
        out = model.recommend(RecommendRequest(cart=tuple(trained.family_items(1)[:3]), top_k=k, user_id=user))
        assert len(out) == k == len(set(out)) and set(out) <= ids


def test_never_recommends_cart_or_wishlist(model, trained, user):
    for fam in range(0, 20, 3):
        cart, wish = trained.family_items(fam)[:4], trained.family_items(fam)[4:6]
        out = model.recommend(RecommendRequest(cart=tuple(cart), wishlist=tuple(wish), top_k=20, user_id=user))
        assert not set(out) & set(cart + wish)


def test_deterministic(model, trained, user):
    req = RecommendRequest(cart=tuple(trained.family_items(7)[:2]), top_k=10, user_id=user)
    first = model.recommend(req)
    assert all(model.recommend(req) == first for _ in range(5))


def test_unknown_ids_are_ignored(model, trained, user):
    cart = tuple(trained.family_items(2)[:2])
    assert (model.recommend(RecommendRequest(cart=cart + ("nope",), user_id=user))
            == model.recommend(RecommendRequest(cart=cart, user_id=user)))


def test_empty_cart_is_answered(model, user):
    assert len(model.recommend(RecommendRequest(cart=(), user_id=user))) == 10


def test_asking_for_more_than_the_catalogue(model, trained, user):
    n = len(trained.store.catalog)
    cart = tuple(trained.family_items(0)[:3])
    out = model.recommend(RecommendRequest(cart=cart, top_k=n + 50, user_id=user))
    assert len(out) == len(set(out)) and not set(out) & set(cart)
    assert len(out) >= n - 3 - 1  # everything but the cart (guest pads with popular items)


def test_member_context_moves_the_answer(snapshot, trained):
    """The member's cart is part of the user tower's input: different carts, different answers."""
    m = snapshot.member
    a = m.recommend(RecommendRequest(cart=tuple(trained.family_items(3)[:5]), user_id=trained.member_id))
    b = m.recommend(RecommendRequest(cart=tuple(trained.family_items(12)[:5]), user_id=trained.member_id))
    assert a != b


def test_unknown_member_gets_a_context_only_answer(snapshot, trained):
    m = snapshot.member
    assert not m.knows_user("stranger")
    out = m.recommend(RecommendRequest(cart=tuple(trained.family_items(4)[:3]), user_id="stranger"))
    assert len(out) == 10
    # the OOV user row is trained (user dropout): the answer follows the cart
    from retrain_server.synth import family_of
    assert sum(family_of(p) in (4, 5) for p in out) >= 3


def test_gender_and_age_are_inputs(snapshot, trained):
    m = snapshot.member
    base = RecommendRequest(cart=tuple(trained.family_items(4)[:3]), user_id=trained.member_id)
    v = m.user_vector(base)
    import dataclasses
    assert not np.allclose(v, m.user_vector(dataclasses.replace(base, age=75, gender=1)))
    assert np.isfinite(m.user_vector(dataclasses.replace(base, age=None, gender=None))).all()


def test_top_k_is_exact_with_ties_and_infinities():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 30000))
        s = rng.normal(size=n).astype(np.float32)
        if trial % 3 == 0:
            s = np.round(s, 1)  # many ties
        if trial % 4 == 0:
            s[rng.integers(0, n, n // 2)] = -np.inf
        k = min(int(rng.integers(1, 40)), n)
        expected = np.lexsort((np.arange(n), -s))[:k]
        assert top_k(s, k).tolist() == expected.tolist()


def test_serving_weights_come_from_the_bundle_and_can_be_overridden(trained, snapshot):
    key = load_public_key(trained.public_key)
    trained_weights = snapshot.member.params
    boosted = load_snapshot(trained.parameters, key, member_overrides={"repeat_weight": 50.0, "co_weight": None})
    assert boosted.member.params.repeat_weight == 50.0
    assert boosted.member.params.co_weight == trained_weights.co_weight  # None keeps the trained value
    # a huge repeat weight turns the answer into the member's own most bought products
    log = trained.store.purchases
    own = [p for p, u in zip(log.product_ids.tolist(), log.user_ids.tolist()) if u == trained.member_id]
    top_own = {p for p, _ in sorted(((p, own.count(p)) for p in set(own)), key=lambda x: -x[1])[:10]}
    out = boosted.member.recommend(RecommendRequest(user_id=trained.member_id, top_k=5))
    assert set(out) <= set(own) and len(set(out) & top_own) >= 3
    # basket-agent's loader takes every blend weight from agent.yaml's member.* (left out: as trained)
    from agent.cli import make_loader
    from agent.config import parse_config

    cfg = parse_config({"broker": {"host": "localhost"}, "agent_id": "t", "parameters": str(trained.parameters),
                        "public_key": str(trained.public_key),
                        "member": {"known_weight": 7.5, "basket_weight": 0, "neighbour_weight": 0.25}})
    p = make_loader(cfg)(trained.parameters).member.params
    assert (p.known_weight, p.basket_weight, p.neighbour_weight) == (7.5, 0.0, 0.25)
    assert (p.repeat_weight, p.co_weight) == (trained_weights.repeat_weight, trained_weights.co_weight)
    # member.rerank: false ignores the bundle's reranker (the blend alone ranks members)
    assert make_loader(cfg)(trained.parameters).member.reranker_ is not None
    cfg = parse_config({"broker": {"host": "localhost"}, "agent_id": "t", "parameters": str(trained.parameters),
                        "public_key": str(trained.public_key), "member": {"rerank": False}})
    assert make_loader(cfg)(trained.parameters).member.reranker_ is None


def test_co_purchase_blend_follows_the_guest_evidence(trained):
    key = load_public_key(trained.public_key)
    snap = load_snapshot(trained.parameters, key, member_overrides={"co_weight": 1e6, "repeat_weight": 0.0,
                                                                    "rerank": False})
    cart = tuple(trained.family_items(6)[:3])
    items, co = snap.guest.co_purchase_scores(snap.guest.indices(cart))
    keep = ~np.isin(snap.guest.item_ids_[items], cart)
    best = snap.guest.item_ids_[items[keep][np.argsort(-co[keep], kind="stable")[:5]]].tolist()
    out = snap.member.recommend(RecommendRequest(cart=cart, user_id=trained.member_id, top_k=5))
    assert set(out) == set(best)


def test_member_context_is_cart_first_then_wishlist(snapshot, trained):
    """A full cart is not pushed out by the wishlist (training never saw such a mix)."""
    import dataclasses

    m = snapshot.member
    cart = tuple(trained.store.catalog.ids[:12].tolist())
    wish = tuple(trained.store.catalog.ids[100:105].tolist())
    base = RecommendRequest(cart=cart, user_id=trained.member_id)
    assert np.allclose(m.user_vector(base), m.user_vector(dataclasses.replace(base, wishlist=wish)))
    short = RecommendRequest(cart=cart[:3], user_id=trained.member_id)
    assert not np.allclose(m.user_vector(short), m.user_vector(dataclasses.replace(short, wishlist=wish)))


def test_concurrent_callers_get_the_serial_answers(snapshot, trained):
    """The MQTT worker and the HTTP threadpool share one snapshot."""
    from concurrent.futures import ThreadPoolExecutor

    reqs = []
    for i in range(200):
        fam = i % 20
        user = trained.member_id if i % 2 else None
        reqs.append(RecommendRequest(cart=tuple(trained.family_items(fam)[: 1 + i % 5]), user_id=user,
                                     wishlist=tuple(trained.family_items((fam + 7) % 20)[:1]), top_k=1 + i % 15))
    serial = [snapshot.recommend(r).ids for r in reqs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(lambda r: snapshot.recommend(r).ids, reqs)) == serial


def test_the_snapshot_names_its_answers_as_names_of_would(snapshot, trained):
    """A guest answer carries its rows, and its display names are read by row, not looked up by id
    again; a member answer's by id. Either way the names are those of ``names_of``."""
    for fam in range(0, 20, 4):
        cart = tuple(trained.family_items(fam)[:3])
        for user in (None, trained.member_id):
            rec = snapshot.recommend(RecommendRequest(cart=cart, top_k=10, user_id=user))
            assert (rec.rows is not None) == (rec.model == "guest")
            names = snapshot.names_for(rec)
            assert names == snapshot.names_of(rec.ids) and all(isinstance(n, str) for n in names)

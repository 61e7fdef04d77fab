"""The member blend's public interface: scores with ids, the score's parts, the neighbour table, optional files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.sparse as sp

from agent import layout
from agent.bundle import load_public_key
from agent.recommenders.base import RecommendRequest
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
    with_nb = member_from_source(DirectorySource(root), snapshot.guest, {"neighbour_weight": 1e6})
    assert with_nb.neighbours_ is not None
    req = RecommendRequest(cart=tuple(trained.family_items(1)[:2]), user_id=trained.member_id, top_k=5)
    items, scores = with_nb.score_parts(req).neighbours
    best = set(with_nb.item_ids_[items[np.argsort(-scores, kind="stable")]].tolist()) - set(req.cart)
    assert set(with_nb.recommend(req)) <= best  # a huge weight: the neighbours' items lead

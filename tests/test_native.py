"""The compiled kernels (agent/recommenders/_native.c) answer as the numpy code they stand in for."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from agent.bundle import load_public_key
from agent.recommenders import native
from agent.recommenders.guest import RecentBaskets
from agent.recommenders.member import top_k
from agent.recommenders.rerank import candidate_features
from agent.registry import load_snapshot

if native.KERNELS is None and os.environ.get("SMART_BASKET_NATIVE", "1").strip() == "0":
    pytest.skip("SMART_BASKET_NATIVE=0: the compiled kernels are switched off", allow_module_level=True)

K = native.KERNELS


def test_the_kernels_are_built_where_the_tests_run():
    """bootstrap.sh installs a compiler and Python's headers, so a missing build is a failed build."""
    assert K is not None, f"hot path: {native.status()} (pip install -e . builds agent/recommenders/_native.c)"
    assert native.status() == "compiled kernels"


@pytest.fixture
def numpy_path(monkeypatch):
    """Run the recommenders' numpy code (as where the kernels are not built)."""
    monkeypatch.setattr(native, "KERNELS", None)


def _random_baskets(rng, n_items=60, n_baskets=400, max_size=6) -> RecentBaskets:
    """Small baskets of few products: many baskets are equally similar to a cart (ties at the cut)."""
    sizes = rng.integers(1, max_size + 1, n_baskets)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    items = np.concatenate([rng.choice(n_items, s, replace=False) for s in sizes.tolist()]).astype(np.int32)
    basket_of = np.repeat(np.arange(n_baskets), sizes)
    order = np.lexsort((-basket_of, items))  # per item, newest (highest) basket first
    postings = basket_of[order].astype(np.int32)
    indptr = np.zeros(n_items + 1, np.int64)
    np.cumsum(np.bincount(items, minlength=n_items), out=indptr[1:])
    return RecentBaskets(starts, items, indptr, postings)


def _summed(items, votes):
    out: dict[int, float] = {}
    for i, v in zip(items.tolist(), votes.tolist()):
        out[i] = out.get(i, 0.0) + v
    return out


@pytest.mark.parametrize("neighbours", [0, 1, 3, 50, 10_000])
def test_basket_votes_equal_numpy_including_ties_at_the_cut(neighbours, monkeypatch):
    rng = np.random.default_rng(neighbours)
    b = _random_baskets(rng)
    for _ in range(60):
        cart = rng.integers(0, 60, int(rng.integers(0, 8)))  # repeats included: each counts once
        items, votes = b.scores(cart, neighbours)
        with monkeypatch.context() as m:
            m.setattr(native, "KERNELS", None)
            ref_items, ref_votes = b.scores(cart, neighbours)
        assert items.dtype == ref_items.dtype == np.int64 and votes.dtype == ref_votes.dtype == np.float64
        np.testing.assert_array_equal(items, ref_items)  # the same baskets, in the same order
        np.testing.assert_allclose(votes, ref_votes, rtol=1e-12)  # the total may be summed in another order
        got, ref = _summed(items, votes), _summed(ref_items, ref_votes)
        assert got.keys() == ref.keys() and all(abs(got[i] - ref[i]) <= 1e-12 for i in ref)
        assert all(0 < v <= 1 + 1e-12 for v in got.values())  # a share of the voting baskets
    assert not native.scratch("basket_counts", 400, 0).any()  # the scratch counts are zero again


def test_basket_votes_refuse_indices_outside_the_tables_and_leave_the_scratch_clean():
    b = _random_baskets(np.random.default_rng(1))
    counts = native.scratch("basket_counts", 400, 0)
    with pytest.raises(ValueError, match="cart"):
        K.basket_votes(b.starts, b.items, b.postings_indptr, b.postings, np.array([3, 60]), 10, counts)
    bad = b.postings.copy()
    bad[b.postings_indptr[5]] = 400  # basket 400 of 400
    with pytest.raises(ValueError, match="postings"):
        K.basket_votes(b.starts, b.items, b.postings_indptr, bad, np.array([2, 5]), 10, counts)
    assert not counts.any()
    with pytest.raises(TypeError, match="starts"):  # a float table is refused, never read as integers
        K.basket_votes(b.starts.astype(np.float64), b.items, b.postings_indptr, b.postings, np.array([1]), 10,
                       counts)
    with pytest.raises(TypeError, match="counts"):
        K.basket_votes(b.starts, b.items, b.postings_indptr, b.postings, np.array([1]), 10, counts[::2])


@pytest.fixture(scope="module")
def snapshot(trained):
    return load_snapshot(trained.parameters, load_public_key(trained.public_key))


def _member_requests(trained, member, n=40):
    from tests.test_rerank import _requests

    return _requests(trained, member, n)


def test_rerank_features_equal_numpy_exactly(snapshot, trained, monkeypatch):
    """Bit for bit: the trees read the same rows whichever code computed them."""
    m = snapshot.member
    for req in _member_requests(trained, m):
        parts = m.score_parts(req)
        for n in (1, 50, 200):
            top = top_k(parts.total(m.params), n)
            X = candidate_features(m, m.reranker_.stats, req, parts, top)
            with monkeypatch.context() as mp:
                mp.setattr(native, "KERNELS", None)
                ref = candidate_features(m, m.reranker_.stats, req, parts, top)
            np.testing.assert_array_equal(X, ref)
    assert np.all(native.scratch("item_marks", len(m.item_ids_), -1) == -1)


def test_rerank_features_with_a_differently_numbered_guest(snapshot, trained, monkeypatch):
    """The tag similarity renumbers the guest's TF-IDF neighbours (padding dropped first) as numpy does."""
    from tests.test_rerank import test_tag_similarity_when_the_guest_numbers_products_differently as check

    check(snapshot, trained)  # with the kernels: the feature is checked against a slow definition there


def test_a_failing_feature_call_leaves_the_row_table_clean(snapshot, trained):
    m = snapshot.member
    req = _member_requests(trained, m)[0]
    parts = m.score_parts(req)
    top = top_k(parts.total(m.params), 50)
    broken = dataclasses.replace(parts, co=(np.array([len(m.item_ids_) + 5]), np.ones(1, np.float32)))
    with pytest.raises(ValueError, match="term"):
        candidate_features(m, m.reranker_.stats, req, broken, top)
    assert np.all(native.scratch("item_marks", len(m.item_ids_), -1) == -1)
    st, g = m.reranker_.stats, m.guest_

    def call(X, keys=st.keys):
        K.rerank_features(X, top, native.scratch("item_marks", len(m.item_ids_), -1), parts.two_tower, (),
                          g.sim_neighbors_, g.sim_scores_, parts.cart, None, keys, st.baskets, st.days_since,
                          st.gap_days, 0, 1.0, 1.0, st.log_popularity, st.rebuy_rate, 1.0, 0.0, 999.0)

    call(np.zeros((50, 18), np.float32))
    with pytest.raises(TypeError, match="X"):  # wrong types are refused, never read as something else
        call(np.zeros((50, 18), np.float64))
    with pytest.raises(TypeError, match="keys"):
        call(np.zeros((50, 18), np.float32), st.keys.astype(np.int32))
    with pytest.raises(ValueError, match="mismatched"):
        call(np.zeros((49, 18), np.float32))


def test_answers_are_the_same_with_and_without_the_kernels(snapshot, trained, monkeypatch):
    """Guests and members, reranked or not: the same products in the same order."""
    from agent.recommenders.base import RecommendRequest

    m = snapshot.member
    requests = _member_requests(trained, m)
    requests += [dataclasses.replace(r, user_id=None) for r in requests]  # guests
    requests += [RecommendRequest(cart=r.cart, user_id=r.user_id, top_k=r.top_k) for r in requests[:10]]
    with_kernels = [snapshot.recommend(r) for r in requests]
    monkeypatch.setattr(native, "KERNELS", None)
    without = [snapshot.recommend(r) for r in requests]
    assert with_kernels == without
    assert any(with_kernels)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_k_equals_numpy_with_ties_and_excluded_products(dtype, monkeypatch):
    from agent.recommenders import member

    rng = np.random.default_rng(7)
    for n, k in ((50_000, 50), (50_000, 10), (300, 300), (300, 1), (10, 3), (1_000, 999)):
        scores = np.round(rng.normal(size=n), 2).astype(dtype)  # many equal scores
        scores[rng.choice(n, n // 10, replace=False)] = -np.inf  # cart and wishlist
        got = member.top_k(scores, k)
        with monkeypatch.context() as m:
            m.setattr(native, "KERNELS", None)
            ref = member.top_k(scores, k)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, ref)


def test_co_partner_sums_equal_numpy(snapshot, trained, monkeypatch):
    g = snapshot.guest
    rng = np.random.default_rng(5)
    for size in (0, 1, 3, 10, 40):
        cart = rng.integers(0, g.n_items, size)
        cart[: size // 4] = cart[size - 1] if size else 0  # repeats: a product twice counts twice
        for k in (0, 1, 5, g.params.co_top_k_per_item):
            got = K.co_partner_sums(g.co_.indptr, g.co_.items, g.co_.scores, cart, k,
                                    native.scratch("item_marks", g.n_items, -1))
            with monkeypatch.context() as m:
                m.setattr(native, "KERNELS", None)
                ref = g.__class__._co_partners(g, cart, k)
                from agent.recommenders.guest import sum_by_item

                ref = sum_by_item(*ref)
            assert got[0].dtype == np.int32 and got[1].dtype == np.float32
            np.testing.assert_array_equal(got[0], ref[0])
            np.testing.assert_allclose(got[1], ref[1], rtol=1e-6)  # float32 sums, maybe in another order
    assert np.all(native.scratch("item_marks", g.n_items, -1) == -1)
    with pytest.raises(ValueError, match="cart"):
        K.co_partner_sums(g.co_.indptr, g.co_.items, g.co_.scores, np.array([g.n_items]), 5,
                          native.scratch("item_marks", g.n_items, -1))


def test_member_basket_scores_equal_numpy(snapshot, trained, monkeypatch):
    m = snapshot.member
    table = m.baskets_
    assert table is not None
    rng = np.random.default_rng(11)
    n_users = len(table.indptr) - 1
    compared = 0
    for user in list(range(n_users)) + [n_users, n_users + 5]:  # members past the table: nothing
        rows = table.items[table.starts[table.indptr[min(user, n_users)]]:table.starts[table.indptr[min(user,
                                                                                                      n_users)]]]
        own = table.items[table.starts[table.indptr[user]]:table.starts[table.indptr[user + 1]]] \
            if user < n_users else rows
        for cart in (own[:2], np.concatenate([own[:1], own[:1], rng.integers(0, len(m.item_ids_), 3)]),
                     rng.integers(0, len(m.item_ids_), 4), np.zeros(0, np.int64)):
            cart = np.asarray(cart, np.int64)
            got = table.scores(user, cart)
            with monkeypatch.context() as mp:
                mp.setattr(native, "KERNELS", None)
                ref = table.scores(user, cart)
            assert got[0].dtype == ref[0].dtype == np.int64 and got[1].dtype == ref[1].dtype == np.float32
            np.testing.assert_array_equal(got[0], ref[0])
            np.testing.assert_allclose(got[1], ref[1], rtol=1e-6)
            compared += bool(ref[0].size)
    assert compared >= 20
    assert np.all(native.scratch("item_marks", len(m.item_ids_), -1) == -1)


def test_guest_answers_equal_numpy_for_carts_wishlists_and_thin_carts(snapshot, trained, monkeypatch):
    """The guest kernel (co-purchase + recent baskets + the best k) answers as the numpy code, also where
    too few candidates hand the request to the numpy path's TF-IDF fallback."""
    from agent.recommenders.base import RecommendRequest

    g = snapshot.guest
    ids = g.item_ids_.tolist()
    rng = np.random.default_rng(2)
    requests = []
    for _ in range(150):
        cart = tuple(rng.choice(ids, int(rng.integers(1, 6)), replace=False).tolist())
        wish = tuple(rng.choice(ids, int(rng.integers(0, 4)), replace=False).tolist())
        requests.append(RecommendRequest(cart=cart, wishlist=wish, top_k=int(rng.choice([1, 5, 10, 40]))))
    thin = int(np.argmin(np.diff(g.co_.indptr)))  # the product with the fewest partners
    requests.append(RecommendRequest(cart=(ids[thin],), top_k=30))
    cart = g.indices([ids[thin]])
    assert g._rank_compiled(cart, cart, 30) is None  # too few candidates: this one takes the numpy path
    requests.append(RecommendRequest(cart=("not-a-product",), top_k=5))
    got = [g.recommend_scored(r) for r in requests]
    monkeypatch.setattr(native, "KERNELS", None)
    ref = [g.recommend_scored(r) for r in requests]
    for a, b in zip(got, ref):
        assert [i for i, _ in a] == [i for i, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-6)
    assert np.all(native.scratch("item_marks", g.n_items, -1) == -1)


def test_guest_kernel_refuses_bad_indices_and_leaves_the_marks_clean(snapshot):
    g = snapshot.guest
    marks = native.scratch("item_marks", g.n_items, -1)
    none_i, none_f = np.empty(0, np.int64), np.empty(0, np.float64)
    args = (g.co_.indptr, g.co_.items, g.co_.scores)
    assert K.guest_rank(*args, np.array([1, 2]), 50, none_i, none_f, 10.0, np.array([1, 2]), 10, 10, marks)
    with pytest.raises(ValueError, match="excluded"):
        K.guest_rank(*args, np.array([1, 2]), 50, none_i, none_f, 10.0, np.array([1, g.n_items]), 10, 10, marks)
    with pytest.raises(ValueError, match="vote_items"):
        K.guest_rank(*args, np.array([1]), 50, np.array([-1]), np.ones(1), 10.0, np.array([1]), 10, 10, marks)
    with pytest.raises(TypeError, match="votes"):
        K.guest_rank(*args, np.array([1]), 50, np.array([3]), np.ones(1, np.float32), 10.0, np.array([1]), 10,
                     10, marks)
    assert np.all(marks == -1)


def test_blend_top_k_equals_total_then_top_k_bit_for_bit(snapshot, trained, monkeypatch):
    """The blend's best k without the dense copy: the same items and float32 scores as ``total()``, the
    excluded products at -inf and ``top_k``; the terms are left untouched."""
    from agent.recommenders.member import ScoreParts

    m = snapshot.member
    rng = np.random.default_rng(4)
    n = len(m.item_ids_)
    for req in _member_requests(trained, m)[:20]:
        parts = m.score_parts(req)
        before = parts.two_tower.copy()
        for weights in (ScoreParts.weights(m.params), (0.7, 0.0, 1.3, 2.0, 0.25, 3.0), (0.0,) * 6):
            params = dataclasses.replace(m.params, **dict(zip(ScoreParts.WEIGHTS, weights)))
            excluded = np.unique(rng.integers(0, n, 4))
            for k in (1, 10, 50, n - len(excluded)):
                terms = tuple((w, *getattr(parts, name)) for w, name in zip(weights, ScoreParts.SPARSE))
                top, scores = K.blend_top_k(parts.two_tower, terms, excluded, k,
                                            native.scratch("item_marks", n, -1))
                s = parts.total(params)
                s[excluded] = -np.inf
                with monkeypatch.context() as mp:
                    mp.setattr(native, "KERNELS", None)
                    want = top_k(s, k)
                np.testing.assert_array_equal(top, want)
                np.testing.assert_array_equal(scores, s[want])
        np.testing.assert_array_equal(parts.two_tower, before)
    assert np.all(native.scratch("item_marks", n, -1) == -1)
    with pytest.raises(TypeError, match="values"):  # float64 values: the numpy path's business, not ours
        K.blend_top_k(parts.two_tower, ((1.0, np.array([1]), np.ones(1)),), np.empty(0, np.int64), 5,
                      native.scratch("item_marks", n, -1))


def test_member_answers_without_the_reranker_are_the_same_with_and_without_the_kernels(trained, monkeypatch):
    snap = load_snapshot(trained.parameters, load_public_key(trained.public_key), member_overrides={"rerank": False})
    m = snap.member
    assert m.reranker_ is None
    requests = _member_requests(trained, m)
    requests += [dataclasses.replace(r, cart=()) for r in requests[:10]]  # empty carts
    got = [m.recommend_scored(r) for r in requests]
    monkeypatch.setattr(native, "KERNELS", None)
    ref = [m.recommend_scored(r) for r in requests]
    assert [[i for i, _ in a] for a in got] == [[i for i, _ in b] for b in ref]
    # the sparse terms' sums may be added in another order (co-purchase, own and store baskets): last bits
    np.testing.assert_allclose([s for a in got for _, s in a], [s for b in ref for _, s in b], rtol=1e-6)


def test_scratch_and_outputs_must_be_writeable_and_indices_in_range():
    """A read-only scratch table is refused (not written through a read-only mapping); a member index past
    the table is nobody, even one that would overflow."""
    import sys

    ro = np.full(8, -1, np.int32)
    ro.flags.writeable = False
    one = np.array([0], np.int64)
    with pytest.raises(TypeError, match="writeable"):
        K.co_partner_sums(np.arange(9, dtype=np.int64) * 0 + np.r_[0, [1] * 8], np.array([1], np.int32),
                          np.ones(1, np.float32), one, 5, ro)
    with pytest.raises(TypeError, match="writeable"):
        K.blend_top_k(np.zeros(8, np.float32), (), one, 2, ro)
    indptr = np.array([0, 1, 1], np.int64)[1:]  # one member, no baskets, after a value the kernel must not read
    for user in (1, 5, sys.maxsize):
        assert K.member_basket_scores(indptr, np.array([0, 2]), np.array([0, 1], np.int32), np.ones(1, np.float32),
                                      user, one, native.scratch("item_marks", 4, -1)) == ()


def test_nan_scores_never_push_an_excluded_product_into_the_answer():
    """A broken model's NaN ranks as the lowest finite score: below every number, above the excluded (-inf)."""
    marks = native.scratch("item_marks", 64, -1)
    top, _ = K.blend_top_k(np.array([0, np.nan, 1], np.float32), (), np.array([0]), 2, marks)
    assert top.tolist() == [2, 1]
    s = np.full(50, np.nan, np.float32)
    s[[3, 40]] = -np.inf  # the cart
    s[17] = 2.0
    assert K.top_k(s, 48).tolist()[:2] == [17, 0] and not {3, 40} & set(K.top_k(s, 48).tolist())
    for n in (40, 50_000):  # short and long (vectorised) scans
        s = np.random.default_rng(n).normal(size=n).astype(np.float32)
        s[::7] = np.nan
        excluded = np.arange(1, n, 7)
        got, _ = K.blend_top_k(s, (), excluded, n - len(excluded), marks if n < 64 else
                               native.scratch("item_marks", n, -1))
        assert not set(excluded.tolist()) & set(got.tolist())
        finite = np.flatnonzero(np.isfinite(s) & ~np.isin(np.arange(n), excluded))
        assert got[:len(finite)].tolist() == finite[np.lexsort((finite, -s[finite]))].tolist()


def test_a_member_model_with_non_finite_embeddings_is_refused(trained):
    from agent.errors import BundleError
    from agent.layout import DirectorySource
    from agent.registry import guest_from_source, member_from_source

    class Spoiled(DirectorySource):
        def array(self, path):
            a = super().array(path)
            if path.endswith("item_embeddings.npy"):
                a = np.array(a)
                a[3, 1] = np.nan
            return a

    source = Spoiled(trained.parameters)
    with pytest.raises(BundleError, match="non-finite"):
        member_from_source(source, guest_from_source(source))


def test_numpy_float_weights_blend_as_python_floats(snapshot, trained, monkeypatch):
    """Weights given as numpy scalars (a tuning script's) rank as the same Python floats on both paths."""
    from agent.recommenders.member import ScoreParts

    m = snapshot.member
    heavy = dataclasses.replace(m.params, **{w: np.float64(getattr(m.params, w)) * np.float64(1.1)
                                             for w in ScoreParts.WEIGHTS})
    assert all(type(w) is float for w in ScoreParts.weights(heavy))
    req = _member_requests(trained, m)[0]
    parts = m.score_parts(req)
    excluded = m.item_indices(req.excluded)
    with monkeypatch.context() as mp:
        mp.setattr(m, "params", heavy)
        top, scores = m._best(parts, excluded, 50)
        mp.setattr(native, "KERNELS", None)
        ref_top, ref_scores = m._best(parts, excluded, 50)  # a copy: parts stay as they are
    np.testing.assert_array_equal(top, ref_top)
    np.testing.assert_array_equal(scores, ref_scores)


def _id_index_cases():
    rng = np.random.default_rng(5)
    ids = [f"p{int(i)}" for i in rng.integers(0, 400, 300)]  # repeats: the last row wins, as in a dict
    ids += ["", "\u00e9t\u00e9", "\uc0ac\uacfc", "\U0001f34e", "a\x00b", "x" * 256]
    return np.array(ids)


def test_id_index_answers_as_the_dict_it_replaces():
    """IdIndex (the kernels' hash table over the lookup array) against build_index's dict, key by key."""
    from agent.recommenders.features import IdIndex, build_index, index_rows

    ids = _id_index_cases()
    index, reference = IdIndex(ids, K), build_index(ids.tolist())
    assert len(index) == len(reference) and list(index) == list(reference) and index == reference
    probes = list(reference) + ["p-1", "a", "a\x00", "p1\x00", "\u00e9t\u00e9 ", "x" * 257, "P1"]
    for key in probes:
        assert index.get(key) == reference.get(key), key
        assert index.get(key, -7) == reference.get(key, -7)
        assert (key in index) == (key in reference)
        if key in reference:
            assert index[key] == reference[key]
        else:
            with pytest.raises(KeyError):
                index[key]
    for not_text in (3, None, b"p1", ("p1",)):
        assert index.get(not_text) is None and not_text not in index
    rows = index_rows(index, probes, known_only=False)
    assert rows.dtype == np.int64 and rows.tolist() == [reference.get(k, -1) for k in probes]
    assert index_rows(index, probes).tolist() == [reference[k] for k in probes if k in reference]
    assert index_rows(index, iter(["p-1", "zz"])).tolist() == [] and index_rows(index, ()).size == 0
    assert index_rows(reference, probes, known_only=False).tolist() == rows.tolist()  # the dict's way: the same
    with pytest.raises(TypeError):
        index["new"] = 1  # read-only, as the shared dicts are
    empty = IdIndex(np.array([], dtype="<U4"), K)
    assert len(empty) == 0 and empty.get("a") is None and index_rows(empty, ["a"]).size == 0


def test_id_index_refuses_tables_that_do_not_fit_its_ids():
    ids = np.array(["a", "b", "c"])
    hashes, slots = K.id_table(ids)
    with pytest.raises(ValueError):
        K.id_find(ids, hashes[:2], slots, "a")
    with pytest.raises(ValueError):
        K.id_find(ids, hashes, slots[:3], "a")  # not a power of two above n
    bad = slots.copy()
    bad[bad >= 0] = 99
    with pytest.raises(ValueError, match="outside"):
        K.id_find(ids, hashes, bad, "a")
    full = np.arange(len(slots), dtype=np.int32) % len(ids)  # no free slot: the probe still ends
    assert K.id_find(ids, hashes, full, "absent") == -1
    with pytest.raises(TypeError):
        K.id_table(np.array([b"a", b"b"]))  # bytes, not text


def test_models_with_kernels_index_ids_without_dicts(snapshot):
    """The memory this saves: no dict of 50,000 str keys per catalogue (4.6 MB); a hash and two to four
    slots a product instead."""
    from agent.recommenders.features import IdIndex

    g, m = snapshot.guest, snapshot.member
    assert isinstance(g.index_, IdIndex) and isinstance(m.user_index_, IdIndex)
    assert m.item_index_ is g.index_  # one numbering: one index
    assert g.index_._hashes.nbytes + g.index_._slots.nbytes <= 24 * len(g.item_ids_)
    assert g.indices(g.item_ids_.tolist()).tolist() == list(range(len(g.item_ids_)))

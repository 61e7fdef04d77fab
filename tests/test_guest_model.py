"""Guest model: training on a synthetic store with planted structure, then serving."""

from __future__ import annotations

import numpy as np
import pytest

from agent.recommenders.base import RecommendRequest
from agent.recommenders.guest import GuestParams, GuestRecommender
from retrain_server.guest import co_purchase_counts, co_purchase_tables, train_guest_model
from retrain_server.synth import family_of, make_store, partner_of


@pytest.fixture(scope="module")
def store():
    return make_store(n_products=400, n_rows=8000, n_users=60, n_families=20, seed=3)


@pytest.fixture(scope="module")
def model(store):
    return train_guest_model(store.catalog, store.purchases)


def recommender(model, **params) -> GuestRecommender:
    a = model.edge_arrays()
    return GuestRecommender(a["item_ids"], a["co_neighbors"], a["co_scores"], a["sim_neighbors"],
                            a["sim_scores"], a["popular"], GuestParams(**params))


def test_co_purchase_counts_match_a_brute_force_count(store, model):
    ids = store.catalog.ids.tolist()
    baskets: dict[str, set[str]] = {}
    for s, p in zip(store.purchases.session_ids.tolist(), store.purchases.product_ids.tolist()):
        baskets.setdefault(s, set()).add(p)
    a, b = ids[0], ids[20]  # same family (0): often bought together
    expected = sum(1 for items in baskets.values() if a in items and b in items)
    assert model.co_counts[0, 20] == expected
    assert model.co_counts[0, 0] == 0


def test_popularity_alpha_zero_ranks_by_raw_count():
    import scipy.sparse as sp

    co = sp.csr_matrix(np.array([[0, 5, 3], [5, 0, 1], [3, 1, 0]], dtype=np.float32))
    counts = np.array([8.0, 100.0, 3.0])
    nb0, _ = co_purchase_tables(co, counts, k=2, alpha=0.0)
    assert nb0[0].tolist() == [1, 2]  # raw counts: 5 > 3
    nb1, sc1 = co_purchase_tables(co, counts, k=2, alpha=1.0)
    assert nb1[0].tolist() == [2, 1]  # damped: 3/3 > 5/100
    assert sc1[0, 0] == pytest.approx(1.0)
    # cart_alpha rescales a row by its own count: same order, smaller voice for popular items
    nb2, sc2 = co_purchase_tables(co, counts, k=2, alpha=1.0, cart_alpha=1.0)
    assert nb2.tolist() == nb1.tolist()
    assert sc2[0].tolist() == pytest.approx((sc1[0] / 8.0).tolist())
    assert sc2[1, 0] == pytest.approx(sc1[1, 0] / 100.0)


def test_tfidf_neighbours_stay_in_the_family(model):
    fams = np.array([family_of(p) for p in model.catalog.ids])
    nb = model.sim_neighbors[:, :5]
    same = (fams[nb] == fams[:, None]).mean()
    assert same > 0.95


def test_cart_of_a_family_gets_that_family_or_its_partner(store, model):
    rec = recommender(model)
    hits = 0
    for fam in range(store.n_families):
        cart = tuple(store.catalog.ids[fam::store.n_families][:3])  # product i is in family i % n
        out = rec.recommend(RecommendRequest(cart=cart, top_k=10))
        assert len(out) == 10 and not set(out) & set(cart)
        ok = {fam, partner_of(fam, store.n_families)}
        hits += sum(family_of(p) in ok for p in out)
    assert hits / (10 * store.n_families) > 0.9


def test_cart_and_wishlist_are_never_recommended(model):
    rec = recommender(model)
    ids = model.catalog.ids.tolist()
    cart, wish = tuple(ids[0:5]), tuple(ids[20:25])
    for k in (1, 10, 50):
        out = rec.recommend(RecommendRequest(cart=cart, wishlist=wish, top_k=k))
        assert len(out) == k and len(set(out)) == k
        assert not set(out) & (set(cart) | set(wish))


def test_unknown_ids_are_ignored_and_reported(model):
    rec = recommender(model)
    ids = model.catalog.ids.tolist()
    with_unknown = rec.recommend(RecommendRequest(cart=(ids[0], "no-such-id", ids[1])))
    assert with_unknown == rec.recommend(RecommendRequest(cart=(ids[0], ids[1])))
    assert rec.unknown_ids([ids[0], "no-such-id"]) == ["no-such-id"]


def test_one_lookup_answers_as_the_two_it_replaces(model, hot_path):
    """The agent's guest answers look the cart's and wishlist's ids up once
    (``recommend_indices_and_unknown``): same rows and same unknown ids as ``recommend_indices`` +
    ``unknown_ids``, with unknown ids anywhere, repeats, empty parts and wishlists."""
    rec = recommender(model)
    ids = model.catalog.ids.tolist()
    rng = np.random.default_rng(11)
    pool = ids + ["no-such-id", "", "ghost-2"]
    for _ in range(300):
        cart = tuple(pool[i] for i in rng.integers(0, len(pool), rng.integers(0, 12)))
        wish = tuple(pool[i] for i in rng.integers(0, len(pool), rng.integers(0, 4)))
        req = RecommendRequest(cart=cart, wishlist=wish, top_k=int(rng.integers(0, 15)))
        rows, unknown = rec.recommend_indices_and_unknown(req)
        assert rows.tolist() == rec.recommend_indices(req).tolist()
        assert unknown == rec.unknown_ids(cart + wish)


def test_empty_or_unknown_cart_gets_popular_items(model):
    rec = recommender(model)
    popular = model.catalog.ids[model.popular[:10]].tolist()
    assert rec.recommend(RecommendRequest(cart=())) == popular
    assert rec.recommend(RecommendRequest(cart=("x", "y"))) == popular
    # popular items already in the basket are skipped
    out = rec.recommend(RecommendRequest(cart=(popular[0],), top_k=3))
    assert popular[0] not in out


def test_deterministic_with_ties():
    # Items 1 and 2 tie as partners of 0; the lower index must come first, every time.
    ids = ["a", "b", "c", "d"]
    co_nb = np.array([[2, 1], [-1, -1], [-1, -1], [-1, -1]])
    co_sc = np.array([[1.0, 1.0], [0, 0], [0, 0], [0, 0]], dtype=np.float32)
    empty = np.full((4, 1), -1)
    rec = GuestRecommender(ids, co_nb, co_sc, empty, np.zeros((4, 1)), np.array([3, 2, 1, 0]),
                           GuestParams(fallback_min_candidates=0))
    for _ in range(5):
        assert rec.recommend(RecommendRequest(cart=("a",), top_k=3)) == ["b", "c", "d"]


def test_fallback_uses_items_similar_to_the_cart():
    # No co-purchase data at all: the answer comes from TF-IDF neighbours of the cart.
    ids = ["a", "b", "c", "d", "e"]
    none = np.full((5, 1), -1)
    sim_nb = np.array([[3, 4], [-1, -1], [-1, -1], [-1, -1], [-1, -1]])
    sim_sc = np.array([[0.9, 0.5], [0, 0], [0, 0], [0, 0], [0, 0]], dtype=np.float32)
    rec = GuestRecommender(ids, none, np.zeros((5, 1)), sim_nb, sim_sc, np.array([1, 2, 0, 3, 4]))
    assert rec.recommend(RecommendRequest(cart=("a",), top_k=3)) == ["d", "e", "b"]


def test_rejects_inconsistent_arrays():
    with pytest.raises(ValueError, match="outside the catalogue"):
        GuestRecommender(["a"], np.array([[5]]), np.ones((1, 1)), np.array([[-1]]),
                         np.zeros((1, 1)), np.array([0]))


def test_co_purchase_rows_are_served_without_their_padding(hot_path):
    """The model keeps only real partners (CSR); what it reads for a cart is what the padded table says,
    for every ``co_top_k_per_item`` (shorter and longer than rows) and carts with repeats (float32 sums: the
    compiled kernel may add a product's scores in another order)."""
    from agent.recommenders.guest import sum_by_item

    rng = np.random.default_rng(7)
    n, width = 40, 6
    lengths = rng.integers(0, width + 1, n)
    co_nb = np.full((n, width), -1)
    co_sc = np.zeros((n, width), np.float32)
    for i, m in enumerate(lengths.tolist()):
        co_nb[i, :m] = rng.choice(n, m, replace=False)
        co_sc[i, :m] = np.sort(rng.random(m))[::-1]
    ids = [f"p{i}" for i in range(n)]
    empty = np.full((n, 1), -1)
    for k in (1, 3, width, width + 4):
        rec = GuestRecommender(ids, co_nb, co_sc, empty, np.zeros((n, 1)), np.arange(n),
                               GuestParams(co_top_k_per_item=k))
        for cart in ([0], [3, 3, 17], list(range(0, n, 3)), [int(np.argmin(lengths))]):
            cart = np.array(cart)
            nb, sc = co_nb[cart, :k].ravel(), co_sc[cart, :k].ravel()
            want = sum_by_item(nb[nb >= 0], sc[nb >= 0])
            got = rec.co_purchase_scores(cart)
            assert got[0].tolist() == want[0].tolist()
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    holed = co_nb.copy()
    row = int(np.argmax(lengths))
    holed[row, 0] = -1  # padding before a real partner: not a table training writes
    with pytest.raises(ValueError, match="padding"):
        GuestRecommender(ids, holed, co_sc, empty, np.zeros((n, 1)), np.arange(n))


def test_korean_tags_tokenise(model):
    vocab = model.vectorizer.vocabulary_
    assert "우유" in vocab and "쌀" in vocab and "dairy" in vocab


def test_co_counts_ignore_products_missing_from_the_catalogue(store):
    from retrain_server.data import PurchaseLog

    log = PurchaseLog.from_rows([
        {"session_id": "s1", "id": store.catalog.ids[0]},
        {"session_id": "s1", "id": "ghost"},
        {"session_id": "s1", "id": store.catalog.ids[1]},
    ])
    co, counts = co_purchase_counts(log, store.catalog)
    assert co[0, 1] == 1 and co.sum() == 2 and counts.sum() == 2


# --------------------------------------------------------------------------- recent baskets (session kNN)

def _baskets_of(log, ids, n_newest):
    """{session: (newest timestamp, set of catalogue items)} of the n newest sessions, the slow way."""
    known = set(ids)
    out: dict[str, list] = {}
    for s, p, t in zip(log.session_ids.tolist(), log.product_ids.tolist(), log.timestamps.tolist()):
        if p in known:
            b = out.setdefault(s, [t, set()])
            b[0] = max(b[0], t)
            b[1].add(p)
    newest = sorted(out.items(), key=lambda kv: (-kv[1][0], kv[0]))[:n_newest]
    return dict(newest)


def test_recent_baskets_vote_like_a_brute_force_session_knn(store, hot_path):
    from agent.recommenders.guest import RecentBaskets
    from retrain_server.guest import recent_basket_arrays

    ids = store.catalog.ids
    parts = recent_basket_arrays(store.purchases, ids, max_baskets=300, postings_per_item=10_000)
    rb = RecentBaskets(**parts)
    baskets = _baskets_of(store.purchases, ids.tolist(), 300)
    assert len(rb.starts) - 1 == 300 and len(rb.items) == sum(len(b[1]) for b in baskets.values())
    pos = {p: i for i, p in enumerate(ids.tolist())}
    for cart_ids in (ids[:2].tolist(), ids[20:23].tolist(), [ids[5]]):
        cart = np.array([pos[p] for p in cart_ids])
        expect: dict[int, float] = {}
        total = sum(len(held & set(cart_ids)) / np.sqrt(len(held)) for _, held in baskets.values())
        for _, held in baskets.values():  # every basket votes (neighbours larger than the table)
            sim = len(held & set(cart_ids)) / np.sqrt(len(held))
            if not sim:
                continue
            for p in held:  # a vote is the basket's share of the voters' similarity
                expect[pos[p]] = expect.get(pos[p], 0.0) + sim / total
        items, votes = rb.scores(cart, 10_000)
        got: dict[int, float] = {}
        for i, v in zip(items.tolist(), votes.tolist()):
            got[i] = got.get(i, 0.0) + v
        assert got.keys() == expect.keys()
        for i in expect:
            assert got[i] == pytest.approx(expect[i], rel=1e-9)
        assert max(got[pos[p]] for p in cart_ids) <= 1.0 + 1e-12  # at most every voter holds a product
    # only the `neighbours` most similar baskets vote
    items, votes = rb.scores(np.array([pos[p] for p in ids[:3].tolist()]), 5)
    assert len(np.unique(votes)) <= 5 and items.size <= 5 * max(len(b[1]) for b in baskets.values())
    assert rb.scores(np.zeros(0, np.int64), 300)[0].size == 0


def test_postings_keep_the_newest_baskets_per_item(store):
    from retrain_server.guest import recent_basket_arrays

    parts = recent_basket_arrays(store.purchases, store.catalog.ids, max_baskets=10_000, postings_per_item=3)
    pi, post = parts["postings_indptr"], parts["postings"]
    assert np.all(np.diff(pi) <= 3)
    for i in range(20):
        row = post[pi[i]:pi[i + 1]]
        holding = [b for b in range(len(parts["starts"]) - 1)
                   if i in parts["items"][parts["starts"][b]:parts["starts"][b + 1]]]
        assert row.tolist() == holding[:3]  # baskets are numbered newest first


def test_recent_baskets_term_raises_what_similar_baskets_hold(store, model):
    from agent.recommenders.guest import RecentBaskets
    from retrain_server.guest import recent_basket_arrays

    parts = recent_basket_arrays(store.purchases, store.catalog.ids, max_baskets=2_000, postings_per_item=1_000)
    a = model.edge_arrays()
    plain = recommender(model)
    with_b = GuestRecommender(a["item_ids"], a["co_neighbors"], a["co_scores"], a["sim_neighbors"],
                              a["sim_scores"], a["popular"], GuestParams(basket_weight=100.0),
                              RecentBaskets(**parts))
    req = RecommendRequest(cart=tuple(store.catalog.ids[[0, 20]].tolist()), top_k=10)
    items, votes = with_b.baskets_.scores(with_b.indices(req.cart), with_b.params.basket_neighbours)
    summed: dict[str, float] = {}
    for i, v in zip(store.catalog.ids[items].tolist(), votes.tolist()):
        summed[i] = summed.get(i, 0.0) + v
    best = sorted((p for p in summed if p not in req.cart), key=lambda p: -summed[p])
    got = with_b.recommend(req)
    assert set(got) <= set(best[:15]) and got[0] == best[0]  # a huge weight: the votes lead
    assert with_b.recommend(RecommendRequest(cart=req.cart, top_k=10)) == got  # deterministic
    assert plain.baskets_ is None and len(plain.recommend(req)) == 10
    off = GuestRecommender(a["item_ids"], a["co_neighbors"], a["co_scores"], a["sim_neighbors"], a["sim_scores"],
                           a["popular"], GuestParams(basket_weight=0.0), RecentBaskets(**parts))
    assert off.recommend(req) == plain.recommend(req)  # weight 0: the term is off
    bad = dict(parts, postings=parts["postings"].copy())
    bad["postings"][0] = len(parts["starts"]) + 5
    with pytest.raises(ValueError, match="baskets"):
        GuestRecommender(a["item_ids"], a["co_neighbors"], a["co_scores"], a["sim_neighbors"], a["sim_scores"],
                         a["popular"], GuestParams(), RecentBaskets(**bad))


def test_bundles_ship_co_partners_unpadded_and_older_bundles_still_load(tmp_path, trained):
    """A bundle's ``co_partners_*.npy`` are served as they are (the padded pair is not even read); a bundle
    from before them loads the padded tables with the same answers; a partial or malformed table is
    refused, naming it; a bundle with only the new table loads."""
    import shutil

    from agent import layout
    from agent.errors import BundleError
    from agent.layout import DirectorySource
    from agent.recommenders.guest import CoPartners
    from agent.registry import guest_from_source

    def fresh(name: str) -> DirectorySource:
        shutil.copytree(trained.parameters, tmp_path / name)
        return DirectorySource(tmp_path / name)

    source = fresh("now")
    paths = layout.GUEST_CO_PARTNERS
    assert all(source.has(p) and layout.is_edge_file(p) for p in paths.values())
    served = guest_from_source(source)
    padded = CoPartners.from_table(source.array(layout.GUEST_ARRAYS["co_neighbors"]),
                                   source.array(layout.GUEST_ARRAYS["co_scores"]))
    for name in paths:
        assert np.array_equal(getattr(served.co_, name), np.load(source.root / paths[name]))
        assert np.array_equal(getattr(served.co_, name), getattr(padded, name))
    older = fresh("older")
    for p in paths.values():
        (older.root / p).unlink()
    before = guest_from_source(older)
    only_new = fresh("only-new")
    for name in ("co_neighbors", "co_scores"):
        (only_new.root / layout.GUEST_ARRAYS[name]).unlink()
    newer = guest_from_source(only_new)
    carts = [tuple(trained.family_items(f)[:3]) for f in range(5)]
    for cart in carts:
        req = RecommendRequest(cart=cart, top_k=10)
        assert served.recommend_scored(req) == before.recommend_scored(req) == newer.recommend_scored(req)
    broken = [(paths["items"], lambda a: a + len(served.item_ids_), "outside the catalogue"),
              (paths["scores"], lambda a: a.astype(np.float64), "1-D float32"),
              (paths["indptr"], lambda a: a[:-1], "malformed rows"),
              (paths["items"], lambda a: a.astype(np.int64) + 2**32, "outside int32"),
              (paths["scores"], lambda a: np.where(np.arange(a.size) == 0, np.nan, a).astype(np.float32),
               "non-finite"),
              (paths["indptr"], lambda a: np.concatenate([[0, a[-1]], a[2:]]), "malformed rows"),
              (paths["indptr"], lambda a: a + 1, "malformed rows"),
              (paths["indptr"], lambda a: np.where(np.arange(a.size) == 1, 2**40, a), "malformed rows")]
    for i, (relpath, mutate, needle) in enumerate(broken):
        source = fresh(f"broken{i}")
        np.save(source.root / relpath, mutate(np.load(source.root / relpath)))
        with pytest.raises(BundleError, match=needle):
            guest_from_source(source)
    source = fresh("partial")
    (source.root / paths["scores"]).unlink()
    with pytest.raises(BundleError, match="co-purchase partner table incomplete"):
        guest_from_source(source)

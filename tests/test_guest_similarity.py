"""TF-IDF neighbour tables: the blocked sparse top-k gives what sklearn's cosine kneighbors gives."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import normalize

from retrain_server.guest import TAG_TOKEN_PATTERN, similarity_tables, train_guest_model
from retrain_server.synth import make_store

_WORDS = ["우유", "치즈", "빵", "잼", "쌀", "김치", "두부", "dairy", "milk", "snack", "chips", "drink",
          "coffee", "bakery", "rice", "fresh", "meat", "fish", "soap", "tissue"] + [f"w{i}" for i in range(40)]


def random_tfidf(n: int, seed: int) -> sp.csr_matrix:
    """A real TfidfVectorizer matrix over random 2-5 word tag strings, weights jittered so no similarities tie.

    Also holds rows that share no tag with anyone (a unique word) and an all-separator
    row that TF-IDF maps to zeros.
    """
    rng = np.random.default_rng(seed)
    tags = []
    for i in range(n):
        words = rng.choice(_WORDS, size=int(rng.integers(2, 6)), replace=False).tolist()
        sep = ", " if i % 2 else " "
        tags.append(sep.join(words))
    tags[3] = "uniqueword"
    tags[n // 2] = "lonely, 외톨이"
    tags[n - 2] = " , ,"
    x = TfidfVectorizer(token_pattern=TAG_TOKEN_PATTERN, lowercase=True).fit_transform(tags).tocsr()
    x.data *= rng.uniform(0.5, 1.5, x.nnz)  # continuous weights: no exact ties anywhere
    return normalize(x).tocsr()


def sklearn_tables(x: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: a full cosine kneighbors ranking, self and "no shared tag" removed, first k kept."""
    n = x.shape[0]
    dist, idx = NearestNeighbors(metric="cosine", algorithm="brute").fit(x).kneighbors(x, n_neighbors=n)
    neighbors = np.full((n, k), -1, dtype=np.int32)
    scores = np.zeros((n, k), dtype=np.float32)
    for i in range(n):
        sim = 1.0 - dist[i]
        keep = (idx[i] != i) & (sim > 1e-9)
        cols, s = idx[i][keep][:k], sim[keep][:k]
        neighbors[i, : cols.size] = cols
        scores[i, : cols.size] = s
    return neighbors, scores


@pytest.fixture(scope="module")
def tfidf() -> sp.csr_matrix:
    return random_tfidf(300, seed=11)


@pytest.mark.parametrize("k", [1, 10, 40])
def test_matches_sklearn_cosine_kneighbors(tfidf, k):
    ref_nb, ref_sc = sklearn_tables(tfidf, k)
    nb, sc = similarity_tables(tfidf, k)
    assert nb.dtype == np.int32 and sc.dtype == np.float32 and nb.shape == sc.shape == (300, k)
    np.testing.assert_array_equal(nb, ref_nb)
    np.testing.assert_allclose(sc, ref_sc, rtol=0, atol=1e-5)
    # the fixture exercises the edge cases: lonely rows are empty, some rows are short of k
    assert (nb[3] == -1).all() and (nb[150] == -1).all() and (nb[298] == -1).all()
    assert (sc[nb == -1] == 0).all()


def test_rows_need_not_be_normalised(tfidf):
    """A vectorizer without l2 norm gives different dot products but the same cosine neighbours."""
    scale = np.random.default_rng(5).uniform(0.1, 10.0, tfidf.shape[0])
    scaled = sp.csr_matrix(sp.diags(scale) @ tfidf)
    nb, sc = similarity_tables(scaled, 10)
    ref_nb, ref_sc = similarity_tables(tfidf, 10)
    np.testing.assert_array_equal(nb, ref_nb)
    np.testing.assert_allclose(sc, ref_sc, rtol=0, atol=1e-6)


def test_block_size_does_not_change_the_result(tfidf):
    n = tfidf.shape[0]
    base_nb, base_sc = similarity_tables(tfidf, 15)
    for rows in (1, 7, n, 10 * n):
        nb, sc = similarity_tables(tfidf, 15, block_rows=rows)
        np.testing.assert_array_equal(nb, base_nb)
        np.testing.assert_array_equal(sc, base_sc)


def test_block_size_does_not_change_ties():
    """Synthetic families are full of identical tag rows: ties everywhere, across block borders."""
    x = TfidfVectorizer(token_pattern=TAG_TOKEN_PATTERN).fit_transform(
        make_store(n_products=600, n_rows=600, n_families=12).catalog.tags.tolist())
    base = similarity_tables(x, 20)
    for rows in (1, 7, 600):
        got = similarity_tables(x, 20, block_rows=rows)
        np.testing.assert_array_equal(got[0], base[0])
        np.testing.assert_array_equal(got[1], base[1])


def exact_tables(x: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The definition, brute force: all dot products, self out, similarity desc then index asc, > 1e-9."""
    n = x.shape[0]
    sims = (x @ x.T).toarray()  # the same sparse products as similarity_tables: ties stay bitwise ties
    neighbors = np.full((n, k), -1, dtype=np.int32)
    scores = np.zeros((n, k), dtype=np.float32)
    for i in range(n):
        s = sims[i].copy()
        s[i] = -np.inf
        order = np.lexsort((np.arange(n), -s))
        order = order[s[order] > 1e-9][:k]
        neighbors[i, : order.size] = order
        scores[i, : order.size] = s[order]
    return neighbors, scores


@pytest.mark.parametrize("k,block_rows", [(5, None), (20, None), (20, 3)])
def test_duplicate_tag_rows_and_ties_match_the_definition(k, block_rows):
    """Real catalogues repeat tag strings (and similarity_tables scores each distinct row once):
    twins, a 30-item group larger than k + 1, equal similarities between different rows."""
    rng = np.random.default_rng(8)
    pool = [" ".join(rng.choice(_WORDS[:12], size=int(rng.integers(1, 4)), replace=False)) for _ in range(40)]
    tags = rng.choice(pool, size=250).tolist() + ["snack chips"] * 30 + ["solo"]
    tags = [tags[i] for i in rng.permutation(len(tags))]
    x = TfidfVectorizer(token_pattern=TAG_TOKEN_PATTERN).fit_transform(tags).tocsr()
    assert len(set(tags)) < len(tags) // 5
    nb, sc = similarity_tables(x, k, block_rows=block_rows)
    ref_nb, ref_sc = exact_tables(x, k)
    np.testing.assert_array_equal(nb, ref_nb)
    np.testing.assert_array_equal(sc, ref_sc)


def test_ties_go_to_the_lower_index_and_self_is_never_a_neighbour():
    tags = ["a b", "c", "a b", "a b", "a b", "c d", "e", "a b", ", "]
    x = TfidfVectorizer(token_pattern=TAG_TOKEN_PATTERN).fit_transform(tags)
    nb, sc = similarity_tables(x, 3, block_rows=2)
    assert nb[0].tolist() == [2, 3, 4]  # four identical rows tie at 1.0: lowest indices win
    assert nb[4].tolist() == [0, 2, 3]
    assert nb[7].tolist() == [0, 2, 3]
    assert sc[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert nb[1].tolist() == [5, -1, -1] and sc[1, 1:].tolist() == [0.0, 0.0]
    assert nb[6].tolist() == [-1, -1, -1] and sc[6].tolist() == [0.0, 0.0, 0.0]  # shares no tag
    assert nb[8].tolist() == [-1, -1, -1]  # no tag at all (zero row)
    assert not (nb == np.arange(len(tags))[:, None]).any()


def test_self_is_dropped_from_random_rows(tfidf):
    nb, _ = similarity_tables(tfidf, 40, block_rows=13)
    assert not (nb == np.arange(tfidf.shape[0])[:, None]).any()
    valid = nb >= 0
    assert (valid[:, :-1] | ~valid[:, 1:]).all()  # -1 only as padding at the end of a row


def test_tiny_catalogues():
    one = TfidfVectorizer(token_pattern=TAG_TOKEN_PATTERN).fit_transform(["a"])
    nb, sc = similarity_tables(one, 5)
    assert nb.tolist() == [[-1] * 5] and sc.tolist() == [[0.0] * 5]
    two = TfidfVectorizer(token_pattern=TAG_TOKEN_PATTERN).fit_transform(["a b", "a"])
    nb, sc = similarity_tables(two, 3)
    assert nb.tolist() == [[1, -1, -1], [0, -1, -1]]
    assert sc[0, 0] == pytest.approx(sc[1, 0]) and 0 < sc[0, 0] < 1


def test_training_uses_the_new_tables_and_still_fits_the_seed_knn():
    store = make_store(n_products=300, n_rows=3000, n_users=30, n_families=15, seed=4)
    model = train_guest_model(store.catalog, store.purchases)
    assert isinstance(model.knn, NearestNeighbors) and model.knn.n_samples_fit_ == 300
    nb, sc = similarity_tables(model.tag_matrix, model.config.sim_neighbors)
    np.testing.assert_array_equal(model.sim_neighbors, nb)
    np.testing.assert_array_equal(model.sim_scores, sc)
    # Families tie, so compare what is tie-invariant with the old kneighbors path: the scores,
    # and that every chosen neighbour really has that cosine similarity.
    _, ref_sc = sklearn_tables(model.tag_matrix, model.config.sim_neighbors)
    np.testing.assert_allclose(sc, ref_sc, rtol=0, atol=1e-5)
    dense = normalize(model.tag_matrix).toarray()
    rows = np.repeat(np.arange(300), nb.shape[1])
    ok = nb.ravel() >= 0
    true = np.einsum("ij,ij->i", dense[rows[ok]], dense[nb.ravel()[ok]])
    np.testing.assert_allclose(sc.ravel()[ok], true, rtol=0, atol=1e-5)


def test_untagged_products_are_nobody_s_tag_neighbours():
    """The empty tag's placeholder made every untagged product every other's perfect neighbour (cosine 1.0);
    a catalogue whose tags are all commas crashed the vectorizer (empty vocabulary)."""
    from retrain_server.data import Catalog, PurchaseLog

    tags = np.array(["milk dairy", "", " ", "bread", ", ,", "milk"])
    catalog = Catalog(ids=np.array([f"p{i}" for i in range(6)]), names=np.array([f"n{i}" for i in range(6)]),
                      tags=tags)
    log = PurchaseLog.from_columns(session_ids=["s1", "s1"], user_ids=["", ""], product_ids=["p0", "p3"],
                                   genders=[-1, -1], ages=[-1, -1], timestamps=[1, 2])
    model = train_guest_model(catalog, log)
    untagged = [1, 2, 4]
    for i in untagged:
        assert (model.sim_neighbors[i] == -1).all() and (model.sim_scores[i] == 0).all()
    assert not set(model.sim_neighbors[[0, 3, 5]].ravel().tolist()) & set(untagged)
    assert model.sim_neighbors[0][0] == 5 and model.sim_neighbors[5][0] == 0  # "milk" still finds "milk"
    commas = Catalog(ids=np.array(["a", "b"]), names=np.array(["a", "b"]), tags=np.array([",", ", ,"]))
    lone = train_guest_model(commas, log.select(np.zeros(len(log), dtype=bool)))
    assert (lone.sim_neighbors == -1).all()

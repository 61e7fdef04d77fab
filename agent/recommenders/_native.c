/* Compiled kernels for the recommenders' hot path (optional: see native.py).
 *
 * Each function does in one call what the numpy code beside it does in a few
 * dozen small array operations, on the same arrays (mapped .npy files, no copy).
 * A member request's cost was numpy's per-call overhead, not the data: these
 * loops touch a few thousand values.
 *
 * The numpy code stays the definition: tests/test_native.py checks that both
 * give the same answers. Every index read from an array is bounds-checked, so a
 * wrong table raises ValueError instead of reading outside it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* The features' columns, in the order of agent.recommenders.rerank.FEATURES (checked at import there). */
static const char *FEATURES[] = {
    "two_tower", "repeat", "co", "basket", "store", "baskets_with_item", "share_of_baskets",
    "days_since_bought", "member_baskets", "log_popularity", "rebuy_rate", "cart_size", "age",
    "bought_before", "usual_gap_days", "days_since_over_gap", "days_since_member_shopped",
    "tag_similarity_to_cart"};
#define N_FEATURES 18
#define COL_TAG 17

/* ---- argument checks ---------------------------------------------------------------------- */

/* A 1-D or 2-D C-contiguous array of one of the given types; sets a TypeError naming ``name``. */
static int want(PyObject *o, const char *name, int ndim, int type_a, int type_b) {
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s: a numpy array expected", name);
        return 0;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    int t = PyArray_TYPE(a);
    if (PyArray_NDIM(a) != ndim || !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a) ||
        !(t == type_a || t == type_b) || !PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_TypeError, "%s: a %d-D contiguous array of the expected type", name, ndim);
        return 0;
    }
    return 1;
}

static inline npy_intp len(PyObject *o) { return PyArray_SIZE((PyArrayObject *)o); }
static inline void *data(PyObject *o) { return PyArray_DATA((PyArrayObject *)o); }

/* An index array that may be int32 or int64. */
typedef struct {
    const void *p;
    int wide;
    npy_intp n;
} Index;

static int index_arg(PyObject *o, const char *name, Index *out) {
    if (!want(o, name, 1, NPY_INT32, NPY_INT64)) return 0;
    out->p = data(o);
    out->wide = PyArray_TYPE((PyArrayObject *)o) == NPY_INT64;
    out->n = len(o);
    return 1;
}

static inline int64_t at(const Index *ix, npy_intp i) {
    return ix->wide ? ((const int64_t *)ix->p)[i] : (int64_t)((const int32_t *)ix->p)[i];
}

/* A value array that may be float32 or float64 (read as float32: the features' type). */
typedef struct {
    const void *p;
    int wide;
    npy_intp n;
} Values;

static int values_arg(PyObject *o, const char *name, Values *out) {
    if (!want(o, name, 1, NPY_FLOAT32, NPY_FLOAT64)) return 0;
    out->p = data(o);
    out->wide = PyArray_TYPE((PyArrayObject *)o) == NPY_FLOAT64;
    out->n = len(o);
    return 1;
}

static inline float value_at(const Values *v, npy_intp i) {
    return v->wide ? (float)((const double *)v->p)[i] : ((const float *)v->p)[i];
}

static PyObject *out_of_range(const char *what) {
    PyErr_Format(PyExc_ValueError, "%s holds an index outside its table", what);
    return NULL;
}

/* ---- the store's recent baskets: session-kNN votes ------------------------------------------ */

typedef struct {
    double sim;
    int64_t basket;
} Voter;

/* a ranks after b: lower similarity, or equal and a higher basket index */
static inline int after(const Voter *a, const Voter *b) {
    return a->sim < b->sim || (a->sim == b->sim && a->basket > b->basket);
}

static void sift_down(Voter *heap, npy_intp n, npy_intp i) { /* root: the voter ranking last */
    for (;;) {
        npy_intp l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && after(&heap[l], &heap[m])) m = l;
        if (r < n && after(&heap[r], &heap[m])) m = r;
        if (m == i) return;
        Voter t = heap[i];
        heap[i] = heap[m];
        heap[m] = t;
        i = m;
    }
}

static int by_basket(const void *a, const void *b) {
    int64_t x = ((const Voter *)a)->basket, y = ((const Voter *)b)->basket;
    return (x > y) - (x < y);
}

PyDoc_STRVAR(basket_votes_doc,
"basket_votes(starts, items, postings_indptr, postings, cart, neighbours, counts) -> (items, votes)\n\n"
"RecentBaskets.scores in one pass. ``counts`` is an int32 scratch array, one entry per basket,\n"
"all zero; it is zero again on return. Voting baskets: the ``neighbours`` most similar, ties to\n"
"the lower basket index.");

static PyObject *basket_votes(PyObject *self, PyObject *args) {
    PyObject *starts_o, *items_o, *pind_o, *post_o, *cart_o, *counts_o;
    Py_ssize_t neighbours;
    if (!PyArg_ParseTuple(args, "OOOOOnO", &starts_o, &items_o, &pind_o, &post_o, &cart_o, &neighbours,
                          &counts_o))
        return NULL;
    Index items, post, cart;
    if (!want(starts_o, "starts", 1, NPY_INT64, NPY_INT64) || !index_arg(items_o, "items", &items) ||
        !want(pind_o, "postings_indptr", 1, NPY_INT64, NPY_INT64) || !index_arg(post_o, "postings", &post) ||
        !index_arg(cart_o, "cart", &cart) || !want(counts_o, "counts", 1, NPY_INT32, NPY_INT32))
        return NULL;
    const int64_t *starts = data(starts_o), *pind = data(pind_o);
    int32_t *counts = data(counts_o);
    npy_intp n_baskets = len(starts_o) - 1, n_items = len(pind_o) - 1;
    if (n_baskets < 0 || n_items < 0 || len(counts_o) < n_baskets) {
        PyErr_SetString(PyExc_ValueError, "basket_votes: tables of mismatched sizes");
        return NULL;
    }
    npy_intp hits = 0;
    for (npy_intp c = 0; c < cart.n; c++) {
        int64_t i = at(&cart, c);
        if (i < 0 || i >= n_items) return out_of_range("cart");
        if (pind[i] < 0 || pind[i + 1] < pind[i] || pind[i + 1] > post.n) return out_of_range("postings_indptr");
        hits += pind[i + 1] - pind[i];
    }
    PyObject *result = NULL;
    Voter *voters = NULL;
    int64_t *touched = malloc(sizeof(int64_t) * (hits ? hits : 1));
    npy_intp n_touched = 0;
    if (!touched) return PyErr_NoMemory();
    int bad = 0;
    for (npy_intp c = 0; c < cart.n && !bad; c++) {
        int64_t i = at(&cart, c);
        int repeat = 0; /* a product twice in the cart counts once */
        for (npy_intp d = 0; d < c && !repeat; d++) repeat = at(&cart, d) == i;
        if (repeat) continue;
        for (int64_t k = pind[i]; k < pind[i + 1]; k++) {
            int64_t b = at(&post, k);
            if (b < 0 || b >= n_baskets) { bad = 1; break; }
            if (counts[b]++ == 0) touched[n_touched++] = b;
        }
    }
    npy_intp keep = 0;
    if (bad) { out_of_range("postings"); goto done; }
    if (neighbours <= 0 || !n_touched) { keep = 0; }
    else {
        keep = n_touched < neighbours ? n_touched : neighbours;
        voters = malloc(sizeof(Voter) * keep);
        if (!voters) { PyErr_NoMemory(); goto done; }
        npy_intp filled = 0;
        for (npy_intp t = 0; t < n_touched; t++) {
            int64_t b = touched[t];
            int64_t size = starts[b + 1] - starts[b];
            if (size <= 0 || starts[b] < 0 || starts[b + 1] > items.n) { out_of_range("starts"); goto done; }
            Voter v = {(double)counts[b] / sqrt((double)size), b};
            if (filled < keep) {
                voters[filled++] = v;
                if (filled == keep)
                    for (npy_intp h = keep / 2; h-- > 0;) sift_down(voters, keep, h);
            } else if (after(&voters[0], &v)) {
                voters[0] = v;
                sift_down(voters, keep, 0);
            }
        }
        qsort(voters, keep, sizeof(Voter), by_basket);
    }
    {
        double total = 0.0;
        npy_intp n_out = 0;
        for (npy_intp v = 0; v < keep; v++) {
            total += voters[v].sim;
            n_out += starts[voters[v].basket + 1] - starts[voters[v].basket];
        }
        npy_intp dims[1] = {n_out};
        PyObject *out_items = PyArray_SimpleNew(1, dims, NPY_INT64);
        PyObject *out_votes = PyArray_SimpleNew(1, dims, NPY_FLOAT64);
        if (!out_items || !out_votes) {
            Py_XDECREF(out_items);
            Py_XDECREF(out_votes);
            goto done;
        }
        int64_t *oi = data(out_items);
        double *ov = data(out_votes);
        npy_intp w = 0;
        for (npy_intp v = 0; v < keep; v++) {
            double vote = voters[v].sim / total;
            for (int64_t k = starts[voters[v].basket]; k < starts[voters[v].basket + 1]; k++) {
                int64_t item = at(&items, k);
                if (item < 0 || item >= n_items) {
                    Py_DECREF(out_items);
                    Py_DECREF(out_votes);
                    out_of_range("items");
                    goto done;
                }
                oi[w] = item;
                ov[w++] = vote;
            }
        }
        result = Py_BuildValue("(NN)", out_items, out_votes);
    }
done:
    for (npy_intp t = 0; t < n_touched; t++) counts[touched[t]] = 0;
    free(touched);
    free(voters);
    return result;
}

/* ---- the reranker's features ----------------------------------------------------------------- */

static npy_intp lower_bound(const int64_t *keys, npy_intp lo, npy_intp hi, int64_t key) {
    while (lo < hi) {
        npy_intp mid = lo + (hi - lo) / 2;
        if (keys[mid] < key) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

PyDoc_STRVAR(rerank_features_doc,
"rerank_features(X, top, rows, two_tower, terms, sim_neighbors, sim_scores, cart, guest_to_item,\n"
"                keys, baskets, days_since, gap_days, user, member_baskets, member_days_since,\n"
"                log_popularity, rebuy_rate, cart_size, age, never) -> None\n\n"
"Fills X (float32 [len(top), 18], zeros) as rerank.candidate_features does. ``terms`` is a tuple\n"
"of (items, values) pairs, summed per candidate in order; the cart's TF-IDF neighbours give the\n"
"tag similarity (the best). ``rows``: int32 scratch, one entry per product, all -1 (again on return).");

static PyObject *rerank_features(PyObject *self, PyObject *args) {
    PyObject *X_o, *top_o, *rows_o, *tt_o, *terms, *sn_o, *ss_o, *cart_o, *g2i_o, *keys_o, *bk_o, *ds_o, *gap_o,
        *lp_o, *rr_o;
    Py_ssize_t user;
    float member_baskets, member_days_since, cart_size, age, never;
    if (!PyArg_ParseTuple(args, "OOOOO!OOOOOOOOnffOOfff", &X_o, &top_o, &rows_o, &tt_o, &PyTuple_Type, &terms,
                          &sn_o, &ss_o, &cart_o, &g2i_o, &keys_o, &bk_o, &ds_o, &gap_o, &user, &member_baskets,
                          &member_days_since, &lp_o, &rr_o, &cart_size, &age, &never))
        return NULL;
    Index top, cart, g2i = {NULL, 1, 0};
    if (!want(X_o, "X", 2, NPY_FLOAT32, NPY_FLOAT32) || !index_arg(top_o, "top", &top) ||
        !want(rows_o, "rows", 1, NPY_INT32, NPY_INT32) || !want(tt_o, "two_tower", 1, NPY_FLOAT32, NPY_FLOAT32) ||
        !want(sn_o, "sim_neighbors", 2, NPY_INT32, NPY_INT32) ||
        !want(ss_o, "sim_scores", 2, NPY_FLOAT32, NPY_FLOAT32) || !index_arg(cart_o, "cart", &cart) ||
        (g2i_o != Py_None && !index_arg(g2i_o, "guest_to_item", &g2i)) ||
        !want(keys_o, "keys", 1, NPY_INT64, NPY_INT64) || !want(bk_o, "baskets", 1, NPY_FLOAT32, NPY_FLOAT32) ||
        !want(ds_o, "days_since", 1, NPY_FLOAT32, NPY_FLOAT32) ||
        !want(gap_o, "gap_days", 1, NPY_FLOAT32, NPY_FLOAT32) ||
        !want(lp_o, "log_popularity", 1, NPY_FLOAT32, NPY_FLOAT32) ||
        !want(rr_o, "rebuy_rate", 1, NPY_FLOAT32, NPY_FLOAT32))
        return NULL;
    npy_intp n = top.n, n_items = len(tt_o), n_keys = len(keys_o);
    npy_intp *xdim = PyArray_DIMS((PyArrayObject *)X_o), *sdim = PyArray_DIMS((PyArrayObject *)sn_o);
    if (xdim[0] != n || xdim[1] != N_FEATURES || len(rows_o) < n_items || len(lp_o) != n_items ||
        len(rr_o) != n_items || len(bk_o) != n_keys || len(ds_o) != n_keys || len(gap_o) != n_keys ||
        !PyArray_SAMESHAPE((PyArrayObject *)sn_o, (PyArrayObject *)ss_o) ||
        (g2i_o != Py_None && g2i.n != sdim[0])) {
        PyErr_SetString(PyExc_ValueError, "rerank_features: arrays of mismatched sizes");
        return NULL;
    }
    Py_ssize_t n_terms = PyTuple_GET_SIZE(terms);
    for (Py_ssize_t t = 0; t < n_terms; t++) {
        PyObject *pair = PyTuple_GET_ITEM(terms, t);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "rerank_features: terms are (items, values) pairs");
            return NULL;
        }
    }
    if (1 + n_terms > COL_TAG) {
        PyErr_SetString(PyExc_ValueError, "rerank_features: too many terms");
        return NULL;
    }
    float *X = data(X_o);
    int32_t *rows = data(rows_o);
    const float *tt = data(tt_o), *bk = data(bk_o), *ds = data(ds_o), *gap = data(gap_o), *lp = data(lp_o),
                *rr = data(rr_o), *ss = data(ss_o);
    const int32_t *sn = data(sn_o);
    const int64_t *keys = data(keys_o);
    npy_intp marked = 0;
    PyObject *result = NULL;
    for (; marked < n; marked++) {
        int64_t i = at(&top, marked);
        if (i < 0 || i >= n_items) { out_of_range("top"); goto done; }
        rows[i] = (int32_t)marked;
    }
    /* the blend's sparse terms, summed per candidate in order (as np.add.at) */
    for (Py_ssize_t t = 0; t < n_terms; t++) {
        PyObject *pair = PyTuple_GET_ITEM(terms, t);
        Index items;
        Values values;
        if (!index_arg(PyTuple_GET_ITEM(pair, 0), "term items", &items) ||
            !values_arg(PyTuple_GET_ITEM(pair, 1), "term values", &values))
            goto done;
        if (items.n != values.n) {
            PyErr_SetString(PyExc_ValueError, "rerank_features: a term's items and values differ in length");
            goto done;
        }
        for (npy_intp k = 0; k < items.n; k++) {
            int64_t i = at(&items, k);
            if (i < 0 || i >= n_items) { out_of_range("a term's items"); goto done; }
            int32_t r = rows[i];
            if (r >= 0) X[(npy_intp)r * N_FEATURES + 1 + t] += value_at(&values, k);
        }
    }
    /* the best TF-IDF similarity to a cart product (cart in the guest model's numbering) */
    {
        npy_intp width = sdim[1], n_guest = sdim[0];
        for (npy_intp c = 0; c < cart.n; c++) {
            int64_t g = at(&cart, c);
            if (g < 0 || g >= n_guest) { out_of_range("cart"); goto done; }
            for (npy_intp k = 0; k < width; k++) {
                int64_t j = sn[g * width + k];
                if (j < 0) continue; /* padding */
                if (j >= n_guest) { out_of_range("sim_neighbors"); goto done; }
                if (g2i_o != Py_None) j = at(&g2i, j);
                if (j < 0) continue; /* a product the member model lacks */
                if (j >= n_items) { out_of_range("guest_to_item"); goto done; }
                int32_t r = rows[j];
                if (r < 0) continue; /* not a candidate */
                float v = ss[g * width + k], *cell = &X[(npy_intp)r * N_FEATURES + COL_TAG];
                if (v > *cell) *cell = v;
            }
        }
    }
    /* the member's own statistics: one search for the member's range, then one per candidate */
    {
        int64_t base = (int64_t)user * n_items;
        npy_intp lo = lower_bound(keys, 0, n_keys, base), hi = lower_bound(keys, lo, n_keys, base + n_items);
        float share_of = member_baskets > 1.0f ? member_baskets : 1.0f;
        for (npy_intp r = 0; r < n; r++) {
            int64_t i = at(&top, r);
            npy_intp pos = lower_bound(keys, lo, hi, base + i);
            int found = pos < hi && keys[pos] == base + i;
            float b = found ? bk[pos] : 0.0f, days = found ? ds[pos] : never, g = found ? gap[pos] : never;
            float *x = &X[r * N_FEATURES];
            x[0] = tt[i];
            x[5] = b;
            x[6] = b / share_of;
            x[7] = days;
            x[8] = member_baskets;
            x[9] = lp[i];
            x[10] = rr[i];
            x[11] = cart_size;
            x[12] = age;
            x[13] = found ? 1.0f : 0.0f;
            x[14] = g;
            x[15] = days / (g > 1.0f ? g : 1.0f);
            x[16] = member_days_since;
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    for (npy_intp r = 0; r < marked; r++) rows[at(&top, r)] = -1;
    return result;
}

/* ---- module ------------------------------------------------------------------------------------ */

static PyMethodDef methods[] = {
    {"basket_votes", basket_votes, METH_VARARGS, basket_votes_doc},
    {"rerank_features", rerank_features, METH_VARARGS, rerank_features_doc},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "Compiled kernels for the recommenders' hot path.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    import_array();
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *features = PyTuple_New(N_FEATURES);
    if (!features) { Py_DECREF(m); return NULL; }
    for (int i = 0; i < N_FEATURES; i++) PyTuple_SET_ITEM(features, i, PyUnicode_FromString(FEATURES[i]));
    if (PyModule_AddObject(m, "FEATURES", features) < 0) { Py_DECREF(features); Py_DECREF(m); return NULL; }
    return m;
}

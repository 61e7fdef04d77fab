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
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* ``want``, and the kernel may write into it (a scratch table or an output). */
static int want_writeable(PyObject *o, const char *name, int ndim, int type) {
    if (!want(o, name, ndim, type, type)) return 0;
    if (!PyArray_ISWRITEABLE((PyArrayObject *)o)) {
        PyErr_Format(PyExc_TypeError, "%s: a writeable array expected", name);
        return 0;
    }
    return 1;
}

static inline npy_intp len(PyObject *o) { return PyArray_SIZE((PyArrayObject *)o); }
static inline void *data(PyObject *o) { return PyArray_DATA((PyArrayObject *)o); }

/* A 1-D array of one of two widths: indices (int32 or int64) or values (float32 or float64). */
typedef struct {
    const void *p;
    int wide;
    npy_intp n;
} Column;
typedef Column Index;
typedef Column Values;

/* A Column of `narrow` or `wide` elements (the two numpy types it may have). */
static int column_arg(PyObject *o, const char *name, int narrow, int wide, Column *out) {
    if (!want(o, name, 1, narrow, wide)) return 0;
    out->p = data(o);
    out->wide = PyArray_TYPE((PyArrayObject *)o) == wide;
    out->n = len(o);
    return 1;
}

static int index_arg(PyObject *o, const char *name, Index *out) {
    return column_arg(o, name, NPY_INT32, NPY_INT64, out);
}

static inline int64_t at(const Index *ix, npy_intp i) {
    return ix->wide ? ((const int64_t *)ix->p)[i] : (int64_t)((const int32_t *)ix->p)[i];
}

/* Values are read as float32: the features' type. */
static int values_arg(PyObject *o, const char *name, Values *out) {
    return column_arg(o, name, NPY_FLOAT32, NPY_FLOAT64, out);
}

static inline float value_at(const Values *v, npy_intp i) {
    return v->wide ? (float)((const double *)v->p)[i] : ((const float *)v->p)[i];
}

/* (a, b), or NULL after letting both go when either is missing (its exception is set). Kernels build
 * their result tuple only after their scratch is clean: a tuple may start the garbage collector, and
 * a finalizer could call a kernel again on this thread. */
static PyObject *pair(PyObject *a, PyObject *b) {
    if (!a || !b) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        return NULL;
    }
    return Py_BuildValue("(NN)", a, b);
}

static PyObject *out_of_range(const char *what) {
    PyErr_Format(PyExc_ValueError, "%s holds an index outside its table", what);
    return NULL;
}

/* ---- the store's recent baskets: session-kNN votes ------------------------------------------ */

/* A score and its product (or basket) index; ranked by score, ties to the lower index. */
typedef struct {
    double score;
    int64_t index;
} Ranked;

/* a ranks after b: lower score, or equal and a higher index */
static inline int ranks_after(const Ranked *a, const Ranked *b) {
    return a->score < b->score || (a->score == b->score && a->index > b->index);
}

static void sift_ranked(Ranked *heap, npy_intp n, npy_intp i) { /* root: the one ranking last */
    for (;;) {
        npy_intp l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && ranks_after(&heap[l], &heap[m])) m = l;
        if (r < n && ranks_after(&heap[r], &heap[m])) m = r;
        if (m == i) return;
        Ranked t = heap[i];
        heap[i] = heap[m];
        heap[m] = t;
        i = m;
    }
}

/* Offers r to a heap of the best k (*filled so far): pushed while there is room (a heap once full),
 * else it takes the root's place when it ranks before it. */
static inline void offer(Ranked *heap, npy_intp *filled, npy_intp k, Ranked r) {
    if (*filled < k) {
        heap[(*filled)++] = r;
        if (*filled == k)
            for (npy_intp h = k / 2; h-- > 0;) sift_ranked(heap, k, h);
    } else if (k && ranks_after(&heap[0], &r)) {
        heap[0] = r;
        sift_ranked(heap, k, 0);
    }
}

static int best_first(const void *a, const void *b) {
    return ranks_after(a, b) ? 1 : (ranks_after(b, a) ? -1 : 0);
}

static int by_index(const void *a, const void *b) {
    int64_t x = ((const Ranked *)a)->index, y = ((const Ranked *)b)->index;
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
        !index_arg(cart_o, "cart", &cart) || !want_writeable(counts_o, "counts", 1, NPY_INT32))
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
    PyObject *out_items = NULL, *out_votes = NULL;
    Ranked *voters = NULL;
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
        voters = malloc(sizeof(Ranked) * keep);
        if (!voters) { PyErr_NoMemory(); goto done; }
        npy_intp filled = 0;
        for (npy_intp t = 0; t < n_touched; t++) {
            int64_t b = touched[t];
            int64_t size = starts[b + 1] - starts[b];
            if (size <= 0 || starts[b] < 0 || starts[b + 1] > items.n) { out_of_range("starts"); goto done; }
            offer(voters, &filled, keep, (Ranked){(double)counts[b] / sqrt((double)size), b});
        }
        qsort(voters, keep, sizeof(Ranked), by_index);
    }
    {
        double total = 0.0;
        npy_intp n_out = 0;
        for (npy_intp v = 0; v < keep; v++) {
            total += voters[v].score;
            n_out += starts[voters[v].index + 1] - starts[voters[v].index];
        }
        npy_intp dims[1] = {n_out};
        out_items = PyArray_SimpleNew(1, dims, NPY_INT64);
        out_votes = PyArray_SimpleNew(1, dims, NPY_FLOAT64);
        if (!out_items || !out_votes) goto done;
        int64_t *oi = data(out_items);
        double *ov = data(out_votes);
        npy_intp w = 0;
        for (npy_intp v = 0; v < keep; v++) {
            double vote = voters[v].score / total;
            for (int64_t k = starts[voters[v].index]; k < starts[voters[v].index + 1]; k++) {
                int64_t item = at(&items, k);
                if (item < 0 || item >= n_items) {
                    Py_CLEAR(out_items);
                    out_of_range("items");
                    goto done;
                }
                oi[w] = item;
                ov[w++] = vote;
            }
        }
    }
done:
    for (npy_intp t = 0; t < n_touched; t++) counts[touched[t]] = 0;
    free(touched);
    free(voters);
    return pair(out_items, out_votes);
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
    if (!want_writeable(X_o, "X", 2, NPY_FLOAT32) || !index_arg(top_o, "top", &top) ||
        !want_writeable(rows_o, "rows", 1, NPY_INT32) || !want(tt_o, "two_tower", 1, NPY_FLOAT32, NPY_FLOAT32) ||
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
    if (user < 0 || (n_items && user > (INT64_MAX - n_items) / n_items)) {
        PyErr_SetString(PyExc_ValueError, "rerank_features: member index out of range");
        return NULL;
    }
    Py_ssize_t n_terms = PyTuple_GET_SIZE(terms);
    for (Py_ssize_t t = 0; t < n_terms; t++) {
        PyObject *term = PyTuple_GET_ITEM(terms, t);
        if (!PyTuple_Check(term) || PyTuple_GET_SIZE(term) != 2) {
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
        PyObject *term = PyTuple_GET_ITEM(terms, t);
        Index items;
        Values values;
        if (!index_arg(PyTuple_GET_ITEM(term, 0), "term items", &items) ||
            !values_arg(PyTuple_GET_ITEM(term, 1), "term values", &values))
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

/* ---- sparse sums: the member's own baskets, the cart's co-purchase partners ----------------- */

/* Sorts n non-negative int64 values below 2^32 (item indices), 8 bits a pass; tmp holds n. */
static void sort_items(int64_t *a, int64_t *tmp, npy_intp n) {
    if (n < 32) { /* insertion sort: a cart's few items */
        for (npy_intp i = 1; i < n; i++) {
            int64_t v = a[i];
            npy_intp j = i;
            for (; j > 0 && a[j - 1] > v; j--) a[j] = a[j - 1];
            a[j] = v;
        }
        return;
    }
    for (int shift = 0; shift < 32; shift += 8) {
        npy_intp count[257] = {0};
        for (npy_intp i = 0; i < n; i++) count[((a[i] >> shift) & 255) + 1]++;
        for (int b = 0; b < 256; b++) count[b + 1] += count[b];
        for (npy_intp i = 0; i < n; i++) tmp[count[(a[i] >> shift) & 255]++] = a[i];
        int64_t *t = a;
        a = tmp;
        tmp = t;
    } /* four passes: the result is back in the caller's array */
}

/* Sorts the touched items into new arrays: (items, values[mark[item]] as float32 / divisor); 0 on failure. */
static int sorted_sums(int64_t *touched, int64_t *tmp, npy_intp n, const double *sums, const int32_t *mark,
                       double divisor, int item_type, PyObject **keys, PyObject **values) {
    sort_items(touched, tmp, n);
    npy_intp dims[1] = {n};
    *keys = PyArray_SimpleNew(1, dims, item_type);
    *values = PyArray_SimpleNew(1, dims, NPY_FLOAT32);
    if (!*keys || !*values) return 0;
    float *vo = data(*values);
    for (npy_intp t = 0; t < n; t++) {
        vo[t] = (float)(sums[mark[touched[t]]] / divisor);
        if (item_type == NPY_INT64) ((int64_t *)data(*keys))[t] = touched[t];
        else ((int32_t *)data(*keys))[t] = (int32_t)touched[t];
    }
    return 1;
}

PyDoc_STRVAR(member_basket_scores_doc,
"member_basket_scores(indptr, starts, items, weights, user, cart, marks) -> (items, scores) or ()\n\n"
"MemberBaskets.scores: items sorted (int64), score / max score (float32); () when no basket of\n"
"the member shares a product with the cart. ``marks``: int32 scratch, one per product, all -1\n"
"(again on return).");

static PyObject *member_basket_scores(PyObject *self, PyObject *args) {
    PyObject *indptr_o, *starts_o, *items_o, *weights_o, *cart_o, *marks_o;
    Py_ssize_t user;
    if (!PyArg_ParseTuple(args, "OOOOnOO", &indptr_o, &starts_o, &items_o, &weights_o, &user, &cart_o, &marks_o))
        return NULL;
    Index items, cart;
    if (!want(indptr_o, "indptr", 1, NPY_INT64, NPY_INT64) || !want(starts_o, "starts", 1, NPY_INT64, NPY_INT64) ||
        !index_arg(items_o, "items", &items) || !want(weights_o, "weights", 1, NPY_FLOAT32, NPY_FLOAT32) ||
        !index_arg(cart_o, "cart", &cart) || !want_writeable(marks_o, "marks", 1, NPY_INT32))
        return NULL;
    const int64_t *indptr = data(indptr_o), *starts = data(starts_o);
    const float *weights = data(weights_o);
    int32_t *mark = data(marks_o);
    npy_intp n_items = len(marks_o);
    if (user < 0 || user >= len(indptr_o) - 1 || !cart.n) return PyTuple_New(0);
    int64_t b0 = indptr[user], b1 = indptr[user + 1];
    if (b0 < 0 || b1 < b0 || b1 >= len(starts_o) || len(weights_o) < b1) return out_of_range("indptr");
    if (b1 == b0) return PyTuple_New(0);
    if (starts[b0] < 0 || starts[b1] < starts[b0] || starts[b1] > items.n) return out_of_range("starts");
    for (npy_intp c = 0; c < cart.n; c++) {
        int64_t i = at(&cart, c);
        if (i < 0 || i >= n_items) return out_of_range("cart");
    }
    npy_intp most = starts[b1] - starts[b0];
    int64_t *touched = malloc(sizeof(int64_t) * 2 * (most ? most : 1));
    double *sums = malloc(sizeof(double) * (most ? most : 1));
    npy_intp n_touched = 0;
    PyObject *keys = NULL, *scores = NULL;
    int nothing = 0;
    if (!touched || !sums) { PyErr_NoMemory(); goto done; }
    for (int64_t b = b0; b < b1; b++) {
        int64_t lo = starts[b], hi = starts[b + 1];
        if (hi <= lo || hi > starts[b1]) { out_of_range("starts"); goto done; }
        npy_intp overlap = 0;
        for (int64_t k = lo; k < hi; k++) {
            int64_t item = at(&items, k);
            if (item < 0 || item >= n_items) { out_of_range("items"); goto done; }
            for (npy_intp c = 0; c < cart.n; c++)
                if (at(&cart, c) == item) { overlap++; break; }
        }
        /* as numpy: float64 share of the basket in the cart times its (float32) weight */
        double share = (double)overlap / (double)(hi - lo) * (double)weights[b];
        if (!(share > 0)) continue; /* only the baskets sharing a product vote */
        for (int64_t k = lo; k < hi; k++) {
            int64_t item = at(&items, k);
            if (mark[item] < 0) {
                mark[item] = (int32_t)n_touched;
                sums[n_touched] = 0.0;
                touched[n_touched++] = item;
            }
            sums[mark[item]] += share;
        }
    }
    if (!n_touched) { nothing = 1; goto done; }
    {
        double best = sums[0];
        for (npy_intp t = 1; t < n_touched; t++)
            if (sums[t] > best) best = sums[t];
        sorted_sums(touched, touched + most, n_touched, sums, mark, best, NPY_INT64, &keys, &scores);
    }
done:
    if (touched)
        for (npy_intp t = 0; t < n_touched; t++) mark[touched[t]] = -1;
    free(touched);
    free(sums);
    return nothing ? PyTuple_New(0) : pair(keys, scores);
}

PyDoc_STRVAR(co_partner_sums_doc,
"co_partner_sums(indptr, items, scores, cart, k, marks) -> (items, sums)\n\n"
"GuestRecommender.co_purchase_scores: every cart entry's best ``k`` partners, summed per item\n"
"(float32), items sorted (int32). ``marks``: int32 scratch, one per product, all -1 (again on return).");

static PyObject *co_partner_sums(PyObject *self, PyObject *args) {
    PyObject *indptr_o, *items_o, *scores_o, *cart_o, *marks_o;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "OOOOnO", &indptr_o, &items_o, &scores_o, &cart_o, &k, &marks_o)) return NULL;
    Index cart;
    if (!want(indptr_o, "indptr", 1, NPY_INT64, NPY_INT64) || !want(items_o, "items", 1, NPY_INT32, NPY_INT32) ||
        !want(scores_o, "scores", 1, NPY_FLOAT32, NPY_FLOAT32) || !index_arg(cart_o, "cart", &cart) ||
        !want_writeable(marks_o, "marks", 1, NPY_INT32))
        return NULL;
    const int64_t *indptr = data(indptr_o);
    const int32_t *items = data(items_o);
    const float *scores = data(scores_o);
    int32_t *mark = data(marks_o);
    npy_intp n_items = len(indptr_o) - 1, n_partners = len(items_o);
    if (n_items < 0 || len(marks_o) < n_items || len(scores_o) != n_partners) {
        PyErr_SetString(PyExc_ValueError, "co_partner_sums: tables of mismatched sizes");
        return NULL;
    }
    if (k < 0) k = 0;
    npy_intp most = 0;
    for (npy_intp c = 0; c < cart.n; c++) {
        int64_t i = at(&cart, c);
        if (i < 0 || i >= n_items) return out_of_range("cart");
        if (indptr[i] < 0 || indptr[i + 1] < indptr[i] || indptr[i + 1] > n_partners) return out_of_range("indptr");
        npy_intp size = indptr[i + 1] - indptr[i];
        most += size < k ? size : k;
    }
    int64_t *touched = malloc(sizeof(int64_t) * 2 * (most ? most : 1));
    double *sums = malloc(sizeof(double) * (most ? most : 1));
    npy_intp n_touched = 0;
    PyObject *keys = NULL, *values = NULL;
    if (!touched || !sums) { PyErr_NoMemory(); goto done; }
    for (npy_intp c = 0; c < cart.n; c++) { /* a product twice in the cart counts twice, as in numpy */
        int64_t i = at(&cart, c), hi = indptr[i + 1];
        if (hi - indptr[i] > k) hi = indptr[i] + k;
        for (int64_t p = indptr[i]; p < hi; p++) {
            int32_t j = items[p];
            if (j < 0 || j >= n_items) { out_of_range("items"); goto done; }
            if (mark[j] < 0) {
                mark[j] = (int32_t)n_touched;
                sums[n_touched] = 0.0f;
                touched[n_touched++] = j;
            }
            sums[mark[j]] = (float)(sums[mark[j]] + scores[p]); /* summed in float32, as numpy */
        }
    }
    sorted_sums(touched, touched + most, n_touched, sums, mark, 1.0, NPY_INT32, &keys, &values);
done:
    if (touched)
        for (npy_intp t = 0; t < n_touched; t++) mark[touched[t]] = -1;
    free(touched);
    free(sums);
    return pair(keys, values);
}

/* ---- the guest model's ranking ---------------------------------------------------------------- */

PyDoc_STRVAR(guest_rank_doc,
"guest_rank(co_indptr, co_items, co_scores, cart, k, vote_items, votes, basket_weight, excluded,\n"
"           top_k, min_candidates, marks) -> (items, scores) or None\n\n"
"GuestRecommender._rank without TF-IDF expansion: every cart entry's best ``k`` co-purchase partners\n"
"summed per item (float32, then float64), plus the recent baskets' votes times basket_weight x the\n"
"best co-purchase sum; excluded products never count. The ``top_k`` best (score, then lower index).\n"
"None when fewer than ``min_candidates`` products scored (the caller adds the cart's TF-IDF\n"
"neighbours: the numpy path). ``marks``: int32 scratch, one per product, all -1 (again on return).");

static PyObject *guest_rank(PyObject *self, PyObject *args) {
    PyObject *indptr_o, *items_o, *scores_o, *cart_o, *vitems_o, *votes_o, *excl_o, *marks_o;
    Py_ssize_t k, top_k, min_candidates;
    double basket_weight;
    if (!PyArg_ParseTuple(args, "OOOOnOOdOnnO", &indptr_o, &items_o, &scores_o, &cart_o, &k, &vitems_o, &votes_o,
                          &basket_weight, &excl_o, &top_k, &min_candidates, &marks_o))
        return NULL;
    Index cart, vitems, excl;
    if (!want(indptr_o, "co_indptr", 1, NPY_INT64, NPY_INT64) ||
        !want(items_o, "co_items", 1, NPY_INT32, NPY_INT32) ||
        !want(scores_o, "co_scores", 1, NPY_FLOAT32, NPY_FLOAT32) || !index_arg(cart_o, "cart", &cart) ||
        !index_arg(vitems_o, "vote_items", &vitems) || !want(votes_o, "votes", 1, NPY_FLOAT64, NPY_FLOAT64) ||
        !index_arg(excl_o, "excluded", &excl) || !want_writeable(marks_o, "marks", 1, NPY_INT32))
        return NULL;
    const int64_t *indptr = data(indptr_o);
    const int32_t *items = data(items_o);
    const float *scores = data(scores_o);
    const double *votes = data(votes_o);
    int32_t *mark = data(marks_o);
    npy_intp n_items = len(indptr_o) - 1, n_partners = len(items_o);
    if (n_items < 0 || len(marks_o) < n_items || len(scores_o) != n_partners || len(votes_o) != vitems.n) {
        PyErr_SetString(PyExc_ValueError, "guest_rank: tables of mismatched sizes");
        return NULL;
    }
    if (k < 0) k = 0;
    npy_intp most = vitems.n;
    for (npy_intp c = 0; c < cart.n; c++) {
        int64_t i = at(&cart, c);
        if (i < 0 || i >= n_items) return out_of_range("cart");
        if (indptr[i] < 0 || indptr[i + 1] < indptr[i] || indptr[i + 1] > n_partners) return out_of_range("indptr");
        npy_intp size = indptr[i + 1] - indptr[i];
        most += size < k ? size : k;
    }
    for (npy_intp e = 0; e < excl.n; e++) {
        int64_t i = at(&excl, e);
        if (i < 0 || i >= n_items) return out_of_range("excluded");
    }
    for (npy_intp v = 0; v < vitems.n; v++) {
        int64_t i = at(&vitems, v);
        if (i < 0 || i >= n_items) return out_of_range("vote_items");
    }
    Ranked *cand = malloc(sizeof(Ranked) * (most ? most : 1));
    float *co_sum = malloc(sizeof(float) * (most ? most : 1));
    npy_intp n_cand = 0, n_excl = 0;
    PyObject *out_items = NULL, *out_scores = NULL;
    int too_few = 0;
    if (!cand || !co_sum) { PyErr_NoMemory(); goto done; }
    for (; n_excl < excl.n; n_excl++) mark[at(&excl, n_excl)] = -2;
    for (npy_intp c = 0; c < cart.n; c++) { /* a product twice in the cart counts twice, as in numpy */
        int64_t i = at(&cart, c), hi = indptr[i + 1];
        if (hi - indptr[i] > k) hi = indptr[i] + k;
        for (int64_t p = indptr[i]; p < hi; p++) {
            int32_t j = items[p];
            if (j < 0 || j >= n_items) { out_of_range("co_items"); goto done; }
            if (mark[j] == -2) continue;
            if (mark[j] < 0) {
                mark[j] = (int32_t)n_cand;
                co_sum[n_cand] = 0.0f;
                cand[n_cand++].index = j;
            }
            co_sum[mark[j]] += scores[p]; /* float32, as numpy sums a product's partners */
        }
    }
    double best_co = 0.0;
    for (npy_intp t = 0; t < n_cand; t++) {
        cand[t].score = 0.0 + (double)co_sum[t];
        if (t == 0 || cand[t].score > best_co) best_co = cand[t].score;
    }
    if (!n_cand) best_co = 1.0;
    if (vitems.n) {
        double scale = basket_weight * best_co;
        for (npy_intp v = 0; v < vitems.n; v++) {
            int64_t j = at(&vitems, v);
            if (mark[j] == -2) continue;
            if (mark[j] < 0) {
                mark[j] = (int32_t)n_cand;
                cand[n_cand].index = j;
                cand[n_cand++].score = 0.0;
            }
            cand[mark[j]].score += votes[v] * scale;
        }
    }
    if (n_cand < min_candidates) {
        too_few = 1;
        goto done;
    }
    {
        npy_intp keep = 0; /* the best top_k, kept in place at the front of cand */
        for (npy_intp t = 0; t < n_cand; t++) offer(cand, &keep, top_k > 0 ? top_k : 0, cand[t]);
        qsort(cand, keep, sizeof(Ranked), best_first);
        npy_intp dims[1] = {keep};
        out_items = PyArray_SimpleNew(1, dims, NPY_INT64);
        out_scores = PyArray_SimpleNew(1, dims, NPY_FLOAT64);
        if (!out_items || !out_scores) goto done;
        int64_t *oi = data(out_items);
        double *os = data(out_scores);
        for (npy_intp t = 0; t < keep; t++) {
            oi[t] = cand[t].index;
            os[t] = cand[t].score;
        }
    }
done:
    /* every marked product is a candidate (its item kept in cand[mark], even after the heap moved
       entries: reset from the excluded list and a scan of the co and vote inputs instead) */
    for (npy_intp e = 0; e < n_excl; e++) mark[at(&excl, e)] = -1;
    for (npy_intp c = 0; c < cart.n; c++) {
        int64_t i = at(&cart, c), hi = indptr[i + 1];
        if (hi - indptr[i] > k) hi = indptr[i] + k;
        for (int64_t p = indptr[i]; p < hi; p++)
            if (items[p] >= 0 && items[p] < n_items) mark[items[p]] = -1;
    }
    for (npy_intp v = 0; v < vitems.n; v++) mark[at(&vitems, v)] = -1;
    free(cand);
    free(co_sum);
    if (too_few) Py_RETURN_NONE;
    return pair(out_items, out_scores);
}

/* ---- the best k of a dense score vector ------------------------------------------------------- */

/* The rank of a score: NaN (a broken model) counts as the lowest finite score, so an excluded product
 * (-inf) never takes a NaN product's place. */
static inline double rank_of(double x) { return isnan(x) ? -FLT_MAX : x; }

#if defined(__GNUC__) /* GCC and Clang: vector extensions, SSE on x86-64, NEON on aarch64 */
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

static inline int any_above(const float *s, float worst) {
    f32x4 a, b, c, d, w = {worst, worst, worst, worst};
    memcpy(&a, s, 16);
    memcpy(&b, s + 4, 16);
    memcpy(&c, s + 8, 16);
    memcpy(&d, s + 12, 16);
    i32x4 m = (a > w) | (b > w) | (c > w) | (d > w);
    return (m[0] | m[1] | m[2] | m[3]) != 0;
}
#else
static inline int any_above(const float *s, float worst) {
    int any = 0;
    for (int j = 0; j < 16; j++) any |= s[j] > worst;
    return any;
}
#endif

/* Offers s[i] for i in [from, n) to a full heap of k (its root the worst), in index order, skipping
 * products with mark[i] >= 0 (when mark is given). Sixteen scores are compared at once (vectorised);
 * once the heap holds good scores nearly every block is skipped whole. */
static void scan_f32(const float *s, npy_intp from, npy_intp n, const int32_t *mark, Ranked *heap, npy_intp k) {
    float worst = (float)heap[0].score; /* a float32 rank (or -inf): exact */
    npy_intp i = from;
    for (; i < n; i += 16) {
        npy_intp end = i + 16 < n ? i + 16 : n;
        /* a block is skipped whole unless a score beats the worst kept; while that is an excluded
           product (-inf), a NaN (ranked as the lowest finite score) does too, so no block is skipped */
        if (end - i == 16 && worst > -INFINITY && !any_above(s + i, worst)) continue;
        for (npy_intp j = i; j < end; j++) { /* an equal rank at a later index ranks after */
            float x = isnan(s[j]) ? -FLT_MAX : s[j];
            if (x > worst && (!mark || mark[j] < 0)) {
                heap[0].score = (double)x;
                heap[0].index = j;
                sift_ranked(heap, k, 0);
                worst = (float)heap[0].score;
            }
        }
    }
}

PyDoc_STRVAR(top_k_doc,
"top_k(scores, k) -> indices\n\n"
"member.top_k: indices (int64) of the k highest scores, best first, ties to the lower index;\n"
"NaN ranks as the lowest finite score (above -inf: excluded products).");

#define TOP_K_LOOP(T)                                                                                      \
    {                                                                                                       \
        const T *s = data(scores_o);                                                                        \
        npy_intp i = 0;                                                                                     \
        for (; i < n && filled < k; i++) offer(heap, &filled, k, (Ranked){rank_of((double)s[i]), i});      \
        if (sizeof(T) == sizeof(float)) {                                                                   \
            scan_f32((const float *)s, i, n, NULL, heap, k);                                                \
        } else {                                                                                            \
            double worst = heap[0].score;                                                                   \
            for (; i < n; i++) {                                                                            \
                if (rank_of((double)s[i]) > worst) {                                                        \
                    heap[0].score = rank_of((double)s[i]);                                                  \
                    heap[0].index = i;                                                                      \
                    sift_ranked(heap, k, 0);                                                                \
                    worst = heap[0].score;                                                                  \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
    }

static PyObject *top_k(PyObject *self, PyObject *args) {
    PyObject *scores_o;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "On", &scores_o, &k)) return NULL;
    if (!want(scores_o, "scores", 1, NPY_FLOAT32, NPY_FLOAT64)) return NULL;
    npy_intp n = len(scores_o);
    if (k < 0) k = 0;
    if (k > n) k = n;
    Ranked *heap = malloc(sizeof(Ranked) * (k ? k : 1));
    if (!heap) return PyErr_NoMemory();
    npy_intp filled = 0;
    if (k) {
        if (PyArray_TYPE((PyArrayObject *)scores_o) == NPY_FLOAT32) TOP_K_LOOP(float)
        else TOP_K_LOOP(double)
    }
    qsort(heap, filled, sizeof(Ranked), best_first);
    npy_intp dims[1] = {filled};
    PyObject *out = PyArray_SimpleNew(1, dims, NPY_INT64);
    if (out) {
        int64_t *o = data(out);
        for (npy_intp i = 0; i < filled; i++) o[i] = heap[i].index;
    }
    free(heap);
    return out;
}

PyDoc_STRVAR(blend_top_k_doc,
"blend_top_k(two_tower, terms, excluded, k, marks) -> (indices, scores)\n\n"
"ScoreParts.total, excluded products at -inf, then top_k, without copying the dense scores: ``terms``\n"
"is a tuple of (weight, items, float32 values), each added as np.add.at(s, items, weight * values)\n"
"(float32), in order. ``marks``: int32 scratch, one per product, all -1 (again on return).");

static PyObject *blend_top_k(PyObject *self, PyObject *args) {
    PyObject *tt_o, *terms, *excl_o, *marks_o;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "OO!OnO", &tt_o, &PyTuple_Type, &terms, &excl_o, &k, &marks_o)) return NULL;
    Index excl;
    if (!want(tt_o, "two_tower", 1, NPY_FLOAT32, NPY_FLOAT32) || !index_arg(excl_o, "excluded", &excl) ||
        !want_writeable(marks_o, "marks", 1, NPY_INT32))
        return NULL;
    const float *tt = data(tt_o);
    int32_t *mark = data(marks_o);
    npy_intp n = len(tt_o);
    if (len(marks_o) < n) {
        PyErr_SetString(PyExc_ValueError, "blend_top_k: marks shorter than the scores");
        return NULL;
    }
    Py_ssize_t n_terms = PyTuple_GET_SIZE(terms);
    npy_intp most = excl.n;
    double weight[16]; /* read before any mark is set: a weight's __float__ may run Python code */
    if (n_terms > 16) {
        PyErr_SetString(PyExc_ValueError, "blend_top_k: at most 16 terms");
        return NULL;
    }
    for (Py_ssize_t t = 0; t < n_terms; t++) {
        PyObject *term = PyTuple_GET_ITEM(terms, t);
        if (!PyTuple_Check(term) || PyTuple_GET_SIZE(term) != 3 ||
            !want(PyTuple_GET_ITEM(term, 2), "term values", 1, NPY_FLOAT32, NPY_FLOAT32)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "blend_top_k: terms are (weight, items, values)");
            return NULL;
        }
        weight[t] = PyFloat_AsDouble(PyTuple_GET_ITEM(term, 0));
        if (weight[t] == -1.0 && PyErr_Occurred()) return NULL;
        most += len(PyTuple_GET_ITEM(term, 2));
    }
    if (k < 0) k = 0;
    if (k > n) k = n;
    int64_t *touched = malloc(sizeof(int64_t) * (most ? most : 1));
    float *value = malloc(sizeof(float) * (most ? most : 1));
    Ranked *heap = malloc(sizeof(Ranked) * (k ? k : 1));
    npy_intp n_touched = 0, filled = 0;
    PyObject *idx = NULL, *scores = NULL;
    if (!touched || !value || !heap) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t t = 0; t < n_terms; t++) {
        PyObject *term = PyTuple_GET_ITEM(terms, t);
        double w = weight[t];
        Index items;
        if (!index_arg(PyTuple_GET_ITEM(term, 1), "term items", &items)) goto done;
        const float *v = data(PyTuple_GET_ITEM(term, 2));
        if (items.n != len(PyTuple_GET_ITEM(term, 2))) {
            PyErr_SetString(PyExc_ValueError, "blend_top_k: a term's items and values differ in length");
            goto done;
        }
        if (w == 0.0) continue; /* as total(): a term weighted 0 is not added */
        float wf = (float)w;    /* weight * values: a Python float times float32 is float32 */
        for (npy_intp j = 0; j < items.n; j++) {
            int64_t i = at(&items, j);
            if (i < 0 || i >= n) { out_of_range("a term's items"); goto done; }
            if (mark[i] < 0) {
                mark[i] = (int32_t)n_touched;
                value[n_touched] = tt[i];
                touched[n_touched++] = i;
            }
            value[mark[i]] += wf * v[j];
        }
    }
    for (npy_intp e = 0; e < excl.n; e++) {
        int64_t i = at(&excl, e);
        if (i < 0 || i >= n) { out_of_range("excluded"); goto done; }
        if (mark[i] < 0) {
            mark[i] = (int32_t)n_touched;
            touched[n_touched++] = i;
        }
        value[mark[i]] = -INFINITY;
    }
    if (k) {
        /* the untouched products straight from the dense scores (one compare each), in index order ... */
        npy_intp i = 0;
        for (; i < n && filled < k; i++)
            if (mark[i] < 0) offer(heap, &filled, k, (Ranked){rank_of((double)tt[i]), i});
        if (filled == k) scan_f32(tt, i, n, mark, heap, k);
        /* ... then the few products the terms or the exclusions touched, with their own values */
        for (npy_intp t = 0; t < n_touched; t++) {
            offer(heap, &filled, k, (Ranked){rank_of((double)value[t]), touched[t]});
        }
    }
    qsort(heap, filled, sizeof(Ranked), best_first);
    {
        npy_intp dims[1] = {filled};
        idx = PyArray_SimpleNew(1, dims, NPY_INT64);
        scores = PyArray_SimpleNew(1, dims, NPY_FLOAT32);
        if (!idx || !scores) goto done;
        int64_t *io = data(idx);
        float *so = data(scores);
        for (npy_intp t = 0; t < filled; t++) {
            io[t] = heap[t].index;
            so[t] = mark[heap[t].index] >= 0 ? value[mark[heap[t].index]] : tt[heap[t].index];
        }
    }
done:
    if (touched)
        for (npy_intp t = 0; t < n_touched; t++) mark[touched[t]] = -1;
    free(touched);
    free(value);
    free(heap);
    return pair(idx, scores);
}

/* ---- ids -> rows without a dict ---------------------------------------------------------------- */

/* A product or member id lookup (features.IdIndex): an open-addressing table of rows over the lookup array
 * itself (numpy 'U', UCS4 rows padded with zeros), keyed by Python's own str hash. A dict of 50,000 ids cost
 * 4.6 MB (its key strings and int objects); the table costs 16 to 24 bytes a row (a hash, two to four slots). */

static int ids_arg(PyObject *o, const Py_UCS4 **base, npy_intp *width) {
    if (!want(o, "ids", 1, NPY_UNICODE, NPY_UNICODE)) return 0; /* numpy str: UCS4 rows */
    *base = (const Py_UCS4 *)PyArray_DATA((PyArrayObject *)o);
    *width = PyArray_ITEMSIZE((PyArrayObject *)o) / 4;
    return 1;
}

static inline npy_intp id_length(const Py_UCS4 *row, npy_intp width) { /* numpy drops trailing NULs */
    while (width > 0 && row[width - 1] == 0) width--;
    return width;
}

static int same_id(PyObject *key, const Py_UCS4 *row, npy_intp width) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(key);
    if (n > width || id_length(row, width) != n) return 0;
    int kind = PyUnicode_KIND(key);
    const void *d = PyUnicode_DATA(key);
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyUnicode_READ(kind, d, i) != row[i]) return 0;
    return 1;
}

typedef struct {
    const Py_UCS4 *base;
    npy_intp width, n;
    const int64_t *hashes;
    const int32_t *slots;
    npy_intp mask;
} IdTable;

static int table_arg(PyObject *ids_o, PyObject *hashes_o, PyObject *slots_o, IdTable *t) {
    if (!ids_arg(ids_o, &t->base, &t->width) || !want(hashes_o, "hashes", 1, NPY_INT64, NPY_INT64) ||
        !want(slots_o, "slots", 1, NPY_INT32, NPY_INT32))
        return 0;
    t->n = len(ids_o);
    npy_intp m = len(slots_o);
    if (len(hashes_o) != t->n || m < 1 || (m & (m - 1)) || m <= t->n) {
        PyErr_SetString(PyExc_ValueError, "id table: hashes [n], slots [a power of two > n]");
        return 0;
    }
    t->hashes = data(hashes_o);
    t->slots = data(slots_o);
    t->mask = m - 1;
    return 1;
}

/* The row of ``key`` (the last of equal ids, as a dict built in order keeps), -1 when absent, -2 on error. */
static npy_intp find_id(const IdTable *t, PyObject *key) {
    if (!PyUnicode_Check(key)) return -1; /* a dict of str keys holds no other type either */
    Py_hash_t h = PyObject_Hash(key);     /* cached in the str object */
    if (h == -1 && PyErr_Occurred()) return -2;
    npy_intp i = (npy_intp)((uint64_t)h & (uint64_t)t->mask);
    for (npy_intp probes = 0; probes <= t->mask; probes++, i = (i + 1) & t->mask) { /* bounded: a table
                                                                                      without a free slot */
        int32_t r = t->slots[i];
        if (r < 0) return -1;
        if (r >= t->n) {
            out_of_range("an id table's slot");
            return -2;
        }
        if (t->hashes[r] == (int64_t)h && same_id(key, t->base + r * t->width, t->width)) return r;
    }
    return -1;
}

PyDoc_STRVAR(id_table_doc,
"id_table(ids) -> (hashes, slots)\n\n"
"features.IdIndex: each id's str hash (int64 [n]) and an open-addressing table of rows (int32, a power of\n"
"two at least twice n, -1 empty). Equal ids keep the last row, as a dict built in order does.");

static PyObject *id_table(PyObject *self, PyObject *args) {
    PyObject *ids_o;
    if (!PyArg_ParseTuple(args, "O", &ids_o)) return NULL;
    const Py_UCS4 *base;
    npy_intp width;
    if (!ids_arg(ids_o, &base, &width)) return NULL;
    npy_intp n = len(ids_o), m = 1;
    while (m < 2 * n + 1) m <<= 1;
    if (n >= INT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "id_table: too many ids");
        return NULL;
    }
    npy_intp dh[1] = {n}, ds[1] = {m};
    PyObject *hashes_o = PyArray_SimpleNew(1, dh, NPY_INT64), *slots_o = PyArray_SimpleNew(1, ds, NPY_INT32);
    if (!hashes_o || !slots_o) goto fail;
    int64_t *hashes = data(hashes_o);
    int32_t *slots = data(slots_o);
    for (npy_intp i = 0; i < m; i++) slots[i] = -1;
    for (npy_intp r = 0; r < n; r++) {
        const Py_UCS4 *row = base + r * width;
        PyObject *key = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, row, id_length(row, width));
        if (!key) goto fail;
        Py_hash_t h = PyObject_Hash(key);
        if (h == -1 && PyErr_Occurred()) {
            Py_DECREF(key);
            goto fail;
        }
        hashes[r] = (int64_t)h;
        npy_intp i = (npy_intp)((uint64_t)h & (uint64_t)(m - 1));
        for (; slots[i] >= 0; i = (i + 1) & (m - 1))
            if (hashes[slots[i]] == (int64_t)h && same_id(key, base + (npy_intp)slots[i] * width, width)) break;
        slots[i] = (int32_t)r; /* new, or an equal id before it: the last one wins */
        Py_DECREF(key);
    }
    return pair(hashes_o, slots_o);
fail:
    Py_XDECREF(hashes_o);
    Py_XDECREF(slots_o);
    return NULL;
}

PyDoc_STRVAR(id_find_doc,
"id_find(ids, hashes, slots, key) -> row\n\n"
"The row of ``key`` in ``ids`` (see id_table), -1 when absent or not a str.");

static PyObject *id_find(PyObject *self, PyObject *args) {
    PyObject *ids_o, *hashes_o, *slots_o, *key;
    if (!PyArg_ParseTuple(args, "OOOO", &ids_o, &hashes_o, &slots_o, &key)) return NULL;
    IdTable t;
    if (!table_arg(ids_o, hashes_o, slots_o, &t)) return NULL;
    npy_intp r = find_id(&t, key);
    return r == -2 ? NULL : PyLong_FromSsize_t(r);
}

PyDoc_STRVAR(id_find_many_doc,
"id_find_many(ids, hashes, slots, keys, known_only) -> int64 array\n\n"
"The row of each of ``keys`` (any iterable), in order: -1 for an absent one, or, with ``known_only``,\n"
"absent ones left out.");

static PyObject *id_find_many(PyObject *self, PyObject *args) {
    PyObject *ids_o, *hashes_o, *slots_o, *keys_o;
    int known_only;
    if (!PyArg_ParseTuple(args, "OOOOp", &ids_o, &hashes_o, &slots_o, &keys_o, &known_only)) return NULL;
    IdTable t;
    if (!table_arg(ids_o, hashes_o, slots_o, &t)) return NULL;
    PyObject *keys = PySequence_Fast(keys_o, "id_find_many: keys must be iterable");
    if (!keys) return NULL;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(keys);
    npy_intp dims[1] = {k};
    PyObject *out = PyArray_SimpleNew(1, dims, NPY_INT64);
    if (!out) {
        Py_DECREF(keys);
        return NULL;
    }
    int64_t *o = data(out);
    npy_intp filled = 0;
    for (Py_ssize_t j = 0; j < k; j++) {
        npy_intp r = find_id(&t, PySequence_Fast_GET_ITEM(keys, j));
        if (r == -2) {
            Py_DECREF(keys);
            Py_DECREF(out);
            return NULL;
        }
        if (r >= 0 || !known_only) o[filled++] = r;
    }
    Py_DECREF(keys);
    if (filled < k) { /* a view of the first ``filled`` would keep the whole buffer: shrink in place */
        PyArray_Dims shape = {(npy_intp[]){filled}, 1};
        PyObject *res = PyArray_Resize((PyArrayObject *)out, &shape, 0, NPY_CORDER);
        if (!res) {
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(res);
    }
    return out;
}

/* ---- module ------------------------------------------------------------------------------------ */

static PyMethodDef methods[] = {
    {"basket_votes", basket_votes, METH_VARARGS, basket_votes_doc},
    {"rerank_features", rerank_features, METH_VARARGS, rerank_features_doc},
    {"member_basket_scores", member_basket_scores, METH_VARARGS, member_basket_scores_doc},
    {"co_partner_sums", co_partner_sums, METH_VARARGS, co_partner_sums_doc},
    {"top_k", top_k, METH_VARARGS, top_k_doc},
    {"blend_top_k", blend_top_k, METH_VARARGS, blend_top_k_doc},
    {"id_table", id_table, METH_VARARGS, id_table_doc},
    {"id_find", id_find, METH_VARARGS, id_find_doc},
    {"id_find_many", id_find_many, METH_VARARGS, id_find_many_doc},
    {"guest_rank", guest_rank, METH_VARARGS, guest_rank_doc},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "Compiled kernels for the recommenders' hot path.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    import_array();
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *features = PyTuple_New(N_FEATURES);
    if (!features) { Py_DECREF(m); return NULL; }
    for (int i = 0; i < N_FEATURES; i++) {
        PyObject *name = PyUnicode_FromString(FEATURES[i]);
        if (!name) { Py_DECREF(features); Py_DECREF(m); return NULL; }
        PyTuple_SET_ITEM(features, i, name);
    }
    if (PyModule_AddObject(m, "FEATURES", features) < 0) { Py_DECREF(features); Py_DECREF(m); return NULL; }
    return m;
}

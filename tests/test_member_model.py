"""Member Two-Tower model: training, lookups, ONNX export parity, checkpoints, quality.

Real TensorFlow on a small synthetic shop with planted structure: 300 products in
10 families, 60 members who each buy from 1-2 favourite families.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

member = pytest.importorskip("retrain_server.member")
ort = pytest.importorskip("onnxruntime")

from agent.recommenders.features import CONTEXT_LENGTH, OOV, PAD, age_bucket, build_index, encode_context, gender_index
from retrain_server.data import PurchaseLog

N_FAMILIES, PER_FAMILY, N_USERS = 10, 30, 60


def member_catalog() -> list[str]:
    """Product ids; family of product p is int(p[1:]) // PER_FAMILY. Last 5 never sold."""
    return [f"p{i:03d}" for i in range(N_FAMILIES * PER_FAMILY + 5)]


def family(pid: str) -> int:
    return int(pid[1:]) // PER_FAMILY


def member_synthetic_log(n_baskets: int = 1500, seed: int = 0, n_users: int = N_USERS,
                         user_prefix: str = "u", guests: bool = True,
                         extra_products: tuple[str, ...] = ()) -> PurchaseLog:
    """Baskets of 3-8 items; 90% from the member's 1-2 families, 10% anywhere."""
    rng = np.random.default_rng(seed)
    favs = [rng.choice(N_FAMILIES, size=rng.integers(1, 3), replace=False) for _ in range(n_users)]
    genders = rng.integers(-1, 2, size=n_users)
    ages = np.where(rng.random(n_users) < 0.2, -1, rng.integers(15, 80, size=n_users))
    cols: dict[str, list] = {k: [] for k in ("session_ids", "user_ids", "product_ids", "genders",
                                             "ages", "timestamps")}
    for b in range(n_baskets):
        guest = guests and rng.random() < 0.15
        u = int(rng.integers(n_users))
        fam = rng.choice(favs[u])
        for _ in range(int(rng.integers(3, 9))):
            if extra_products and rng.random() < 0.3:
                pid = str(rng.choice(extra_products))
            elif rng.random() < 0.9:
                pid = f"p{fam * PER_FAMILY + rng.integers(PER_FAMILY):03d}"
            else:
                pid = f"p{rng.integers(N_FAMILIES * PER_FAMILY):03d}"
            cols["session_ids"].append(f"{user_prefix}s{seed}-{b}")
            cols["user_ids"].append("" if guest else f"{user_prefix}{u}")
            cols["product_ids"].append(pid)
            cols["genders"].append(-1 if guest else genders[u])
            cols["ages"].append(-1 if guest else ages[u])
            cols["timestamps"].append(1_700_000_000 + b * 60)
    return PurchaseLog.from_columns(**cols)


@pytest.fixture(scope="module")
def member_trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train once, export once; shared by every test of this module."""
    log = member_synthetic_log()
    cfg = member.MemberTrainingConfig(epochs=8, batch_size=256, learning_rate=0.1, seed=1)
    state = member.train_member_model(log, member_catalog(), cfg)
    out = tmp_path_factory.mktemp("member_model")
    files = member.export_member_model(state, out)
    return {"log": log, "state": state, "out": out, "files": files, "cfg": cfg}


def test_export_drops_only_the_quantizers_preprocessing_advice(member_trained, tmp_path, caplog) -> None:
    """``quantize_dynamic`` advises a pre-pass on the root logger at every export; the export drops that one
    line and leaves the root logger as it found it (other warnings still show)."""
    caplog.set_level(logging.WARNING)
    root_filters = list(logging.getLogger().filters)
    member.export_member_model(member_trained["state"], tmp_path / "again")
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert logging.getLogger().filters == root_filters
    with member._without_preprocessing_advice():
        logging.warning("Please consider to run pre-processing before quantization. Refer to example: x")
        logging.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]


def member_random_inputs(state, n: int = 256, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ctx = rng.integers(0, len(state.context_lookup), size=(n, CONTEXT_LENGTH))
    lengths = rng.integers(0, CONTEXT_LENGTH + 1, size=n)
    ctx[np.arange(CONTEXT_LENGTH)[None, :] >= lengths[:, None]] = PAD  # left-aligned, padded
    return {
        "user_index": rng.integers(0, len(state.user_lookup), size=n).astype(np.int64),
        "gender_index": rng.integers(0, 3, size=n).astype(np.int64),
        "age_bucket": rng.integers(0, 13, size=n).astype(np.int64),
        "context_index": ctx.astype(np.int64),
    }


def member_onnx(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["user_embedding"], feeds)[0]


def test_public_api_matches_all() -> None:
    public = {n for n in dir(member) if not n.startswith("_")}
    assert set(member.__all__) <= public
    for name in ("MemberTrainingConfig", "train_member_model", "save_checkpoint",
                 "load_checkpoint", "fine_tune_member_model", "export_member_model",
                 "user_tower_numpy"):
        assert name in member.__all__


def test_context_examples_hide_item_and_fill_history() -> None:
    log = PurchaseLog.from_columns(
        session_ids=["a", "a", "g", "b", "b", "b"], user_ids=["u", "u", "", "u", "u", "u"],
        product_ids=["x1", "x2", "g1", "y1", "y2", "y3"], genders=[0] * 6, ages=[30] * 6,
        timestamps=[1, 1, 2, 3, 3, 3])
    rows, ctx = member.build_context_examples(log, history=True)
    got = {log.product_ids[r]: sorted(log.product_ids[c] for c in row if c >= 0)
           for r, row in zip(rows, ctx)}
    assert "g1" not in got  # guests are not training examples
    assert got["x1"] == ["x2"]
    assert got["y1"] == ["x1", "x2", "y2", "y3"]  # same basket + previous basket
    _, ctx_nohist = member.build_context_examples(log, history=False)
    assert (ctx_nohist >= 0).sum(axis=1).max() == 2


def test_context_examples_long_basket_keeps_last_ten_others() -> None:
    n = 15
    log = PurchaseLog.from_columns(
        session_ids=["s"] * n, user_ids=["u"] * n, product_ids=[f"x{i}" for i in range(n)],
        genders=[-1] * n, ages=[-1] * n, timestamps=list(range(n)))
    rows, ctx = member.build_context_examples(log)
    for r, row in zip(rows, ctx):
        others = [f"x{i}" for i in range(n) if i != r]
        assert sorted(log.product_ids[row].tolist()) == sorted(others[-CONTEXT_LENGTH:])


def test_vectorised_encoding_matches_shared_features() -> None:
    g = np.array([-1, 0, 1])
    a = np.array([-1, 0, 19, 20, 34, 69, 70, 150])
    assert member._gender_indices(g).tolist() == [gender_index(int(x)) for x in g]
    assert member._age_buckets(a).tolist() == [age_bucket(int(x)) for x in a]


def test_onnx_inputs_and_outputs(member_trained: dict) -> None:
    for name in ("two_tower_model.onnx", "two_tower_model_quantized.onnx"):
        sess = ort.InferenceSession(str(member_trained["out"] / name),
                                    providers=["CPUExecutionProvider"])
        inputs = {i.name: (i.type, i.shape) for i in sess.get_inputs()}
        assert list(inputs) == ["user_index", "gender_index", "age_bucket", "context_index"]
        assert all(t == "tensor(int64)" for t, _ in inputs.values())
        assert inputs["context_index"][1][1] == CONTEXT_LENGTH
        assert len(inputs["user_index"][1]) == 1
        (out,) = sess.get_outputs()
        assert out.name == "user_embedding" and out.type == "tensor(float)"
    names = sorted(p.name for p in member_trained["files"])
    assert names == sorted(["two_tower_model.onnx", "two_tower_model_quantized.onnx",
                            "user_lookup.npy", "context_lookup.npy", "item_lookup.npy",
                            "item_embeddings.npy", "member_meta.json"])
    meta = json.loads((member_trained["out"] / "member_meta.json").read_text())
    assert meta["embedding_dim"] == 32 and meta["context_length"] == CONTEXT_LENGTH


def test_onnx_fp32_matches_keras(member_trained: dict) -> None:
    state, out = member_trained["state"], member_trained["out"]
    feeds = member_random_inputs(state, n=512)
    ref = member.user_tower_numpy(state, **feeds)
    got = member_onnx(out / "two_tower_model.onnx", feeds)
    assert got.shape == (512, 32) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-4


def test_int8_close_to_fp32(member_trained: dict) -> None:
    state, out = member_trained["state"], member_trained["out"]
    feeds = member_random_inputs(state, n=512, seed=5)
    fp = member_onnx(out / "two_tower_model.onnx", feeds)
    q = member_onnx(out / "two_tower_model_quantized.onnx", feeds)
    cos = (fp * q).sum(1) / (np.linalg.norm(fp, axis=1) * np.linalg.norm(q, axis=1))
    items = np.load(out / "item_embeddings.npy")
    top_fp = np.argsort(-(fp @ items.T), axis=1)[:, :10]
    top_q = np.argsort(-(q @ items.T), axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_fp, top_q)])
    print(f"int8 vs fp32: min cosine {cos.min():.4f}, mean top-10 overlap {overlap:.3f}")
    assert cos.min() >= 0.99
    assert overlap >= 0.7


def test_lookups_numbered_as_in_training(member_trained: dict) -> None:
    state, out, log = member_trained["state"], member_trained["out"], member_trained["log"]
    users = np.load(out / "user_lookup.npy", allow_pickle=False)
    ctx = np.load(out / "context_lookup.npy", allow_pickle=False)
    items = np.load(out / "item_lookup.npy", allow_pickle=False)
    emb = np.load(out / "item_embeddings.npy", allow_pickle=False)
    assert users[0] == "[UNK]" and ctx[PAD] == "" and ctx[OOV] == "[UNK]"
    assert set(member_catalog()) <= set(items.tolist())  # never-sold products included
    assert emb.shape == (len(items), 32) and emb.dtype == np.float32
    # the graph uses row user_lookup.index("u7") etc.: re-implement the tower in numpy
    # from the weight tables and compare with the exported ONNX graph.
    u7 = users.tolist().index("u7")
    w = {n: state.user_model.get_layer(n).get_weights() for n in (
        "user_embedding_table", "gender_embedding_table", "age_embedding_table",
        "context_embedding_table", "user_embedding")}
    cart = ["p001", "p002", "p100"]
    ctx_idx = encode_context(cart, build_index(ctx.tolist()))
    c_rows = w["context_embedding_table"][0][[ctx.tolist().index(p) for p in cart]]
    x = np.concatenate([w["user_embedding_table"][0][u7], w["gender_embedding_table"][0][2],
                        w["age_embedding_table"][0][age_bucket(34)],
                        c_rows.mean(0) * state.config.context_weight])
    manual = x @ w["user_embedding"][0] + w["user_embedding"][1]
    got = member_onnx(out / "two_tower_model.onnx", {
        "user_index": np.array([u7]), "gender_index": np.array([gender_index(1)]),
        "age_bucket": np.array([age_bucket(34)]), "context_index": ctx_idx[None]})[0]
    np.testing.assert_allclose(got, manual, atol=1e-5)
    # the training encoder uses exactly the saved numbering
    feats = member._encode_examples(
        log, users, items, member.MemberTrainingConfig(user_dropout=0, context_dropout=0),
        np.random.default_rng(0))
    rows, ctx_rows = member.build_context_examples(log)
    assert [users[i] for i in feats["user_index"][:50]] == log.user_ids[rows[:50]].tolist()
    assert [items[i] for i in feats["item_index"][:50]] == log.product_ids[rows[:50]].tolist()
    index = build_index(ctx.tolist())
    for k in range(50):
        ids = log.product_ids[ctx_rows[k][ctx_rows[k] >= 0]]
        assert feats["context_index"][k].tolist() == encode_context(ids, index).tolist()
    # item_embeddings rows = item tower output for the same ids
    pick = np.array([0, 7, 150, len(items) - 1])
    tower = np.asarray(state.item_model(pick.astype(np.int64)))
    np.testing.assert_array_equal(emb[pick], tower)
    assert ctx[2:].tolist() == items.tolist()


def member_family_hits(user_vecs: np.ndarray, items: np.ndarray, emb: np.ndarray,
                       fam: int, exclude: list[str]) -> int:
    scores = user_vecs @ emb.T
    scores[:, [items.tolist().index(p) for p in exclude]] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :10]
    return int(np.mean([sum(family(items[i]) == fam for i in row) for row in top]) + 0.5)


def test_quality_context_family_dominates_top10(member_trained: dict) -> None:
    _state, out = member_trained["state"], member_trained["out"]
    items = np.load(out / "item_lookup.npy")
    emb = np.load(out / "item_embeddings.npy")
    index = build_index(np.load(out / "context_lookup.npy").tolist())
    sess = ort.InferenceSession(str(out / "two_tower_model_quantized.onnx"),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(11)
    hits, floor = [], []
    rand_emb = rng.normal(size=emb.shape).astype(np.float32)
    for fam in range(N_FAMILIES):
        cart = [f"p{fam * PER_FAMILY + j:03d}" for j in rng.choice(PER_FAMILY, 4, replace=False)]
        feeds = {"user_index": np.array([0]), "gender_index": np.array([0]),  # unknown member
                 "age_bucket": np.array([0]), "context_index": encode_context(cart, index)[None]}
        vec = sess.run(["user_embedding"], feeds)[0]
        hits.append(member_family_hits(vec, items, emb, fam, cart))
        floor.append(member_family_hits(vec, items, rand_emb, fam, cart))
    print(f"family hits in top-10: trained {hits}, random items {floor}")
    assert np.mean(hits) >= 5 and min(hits) >= 3
    assert np.mean(hits) > np.mean(floor) + 3


def test_checkpoint_round_trip_and_fine_tune(member_trained: dict, tmp_path: Path) -> None:
    state = member_trained["state"]
    ckpt = member.save_checkpoint(state, tmp_path / "ckpt")
    loaded = member.load_checkpoint(ckpt)
    for a, b in zip(state.user_model.weights + state.item_model.weights,
                    loaded.user_model.weights + loaded.item_model.weights):
        assert a.name == b.name
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    feeds = member_random_inputs(state, n=64)
    np.testing.assert_array_equal(member.user_tower_numpy(state, **feeds),
                                  member.user_tower_numpy(loaded, **feeds))
    for name in ("user_lookup", "context_lookup", "item_lookup"):
        np.testing.assert_array_equal(getattr(state, name), getattr(loaded, name))

    new_log = member_synthetic_log(n_baskets=120, seed=9, n_users=N_USERS + 2,
                                   extra_products=("p999",))
    catalog = member_catalog() + ["p999", "p998"]  # p998: in catalog, never sold
    # epochs=0: only the vocabulary growth; old rows untouched, new rows as documented
    grown = member.fine_tune_member_model(ckpt, new_log, catalog,
                                          member.MemberTrainingConfig(epochs=0))
    n_u, n_c = len(state.user_lookup), len(state.context_lookup)
    old_u = state.user_model.get_layer("user_embedding_table").get_weights()[0]
    new_u = grown.user_model.get_layer("user_embedding_table").get_weights()[0]
    np.testing.assert_array_equal(new_u[:n_u], old_u)
    np.testing.assert_array_equal(new_u[n_u:], np.repeat(old_u[:1], len(new_u) - n_u, axis=0))
    old_c = state.user_model.get_layer("context_embedding_table").get_weights()[0]
    new_c = grown.user_model.get_layer("context_embedding_table").get_weights()[0]
    np.testing.assert_array_equal(new_c[:n_c], old_c)
    np.testing.assert_array_equal(new_c[n_c:], np.repeat(old_c[OOV:OOV + 1], len(new_c) - n_c, 0))
    np.testing.assert_array_equal(grown.item_embeddings()[:len(state.item_lookup)],
                                  state.item_embeddings())
    old_feeds = {k: v for k, v in feeds.items()}
    np.testing.assert_allclose(member.user_tower_numpy(grown, **old_feeds),
                               member.user_tower_numpy(state, **old_feeds), atol=1e-6)

    cfg = member.MemberTrainingConfig(epochs=1, batch_size=256)
    tuned = member.fine_tune_member_model(ckpt, new_log, catalog, cfg)
    n_u, n_i = len(state.user_lookup), len(state.item_lookup)
    assert tuned.user_lookup[:n_u].tolist() == state.user_lookup.tolist()
    assert tuned.item_lookup[:n_i].tolist() == state.item_lookup.tolist()
    assert {"u60", "u61"} <= set(tuned.user_lookup[n_u:].tolist())
    assert {"p999", "p998"} <= set(tuned.item_lookup[n_i:].tolist())
    assert tuned.context_lookup.tolist() == ["", "[UNK]"] + tuned.item_lookup.tolist()
    out = member.export_member_model(tuned, tmp_path / "tuned")
    emb = np.load(tmp_path / "tuned" / "item_embeddings.npy")
    assert emb.shape == (len(tuned.item_lookup), 32)
    assert len(out) == 7 and np.isfinite(emb).all()
    assert tuned.history["examples"] > 0


def test_models_built_from_equal_lookups_share_one_index_until_none_uses_it(trained, monkeypatch):
    """Without the compiled kernels: a hot swap to a bundle with yesterday's catalogue and members reuses the
    serving version's id -> row dicts (4.6 MB each on 50,000 products) instead of holding two; another
    catalogue gets its own; the shared dict goes when its last model does. (With the kernels each model
    has its own IdIndex of 0.9 MB: tests/test_native.py.)"""
    import gc
    import weakref

    from agent.bundle import load_public_key
    from agent.recommenders import features, native
    from agent.registry import load_snapshot

    monkeypatch.setattr(native, "KERNELS", None)
    key = load_public_key(trained.public_key)
    a, b = load_snapshot(trained.parameters, key), load_snapshot(trained.parameters, key)
    assert a.guest.index_ is b.guest.index_ and a.member.user_index_ is b.member.user_index_
    assert a.member.item_index_ is a.guest.index_
    other = features.shared_index(np.asarray(a.guest.item_ids_[::-1]))
    assert other is not a.guest.index_ and other[a.guest.item_ids_[-1]] == 0
    # a vocabulary only this test uses: shared while referenced, gone with its last user
    mine = np.char.add(a.guest.item_ids_, "-only-here")
    first, second = features.shared_index(mine), features.shared_index(mine.copy())
    assert first is second and first == {p: i for i, p in enumerate(mine.tolist())}
    with pytest.raises(TypeError, match="read-only"):
        first["new product"] = len(first)  # another snapshot would see it
    assert features.shared_index(np.array([1, 2])) == {1: 0, 2: 1}  # not text: built, not shared
    gone = weakref.ref(first)
    del first, second
    gc.collect()
    assert gone() is None

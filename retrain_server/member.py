"""Member model: a TensorFlow Recommenders Two-Tower model, exported to int8 ONNX.

Training runs on the server (TensorFlow); the edge only runs the exported user
tower with onnxruntime and dots it with ``item_embeddings.npy``. So the graph
takes integer indices, never strings: every id -> index lookup happens in numpy
here and on the edge, with the vocabularies saved as ``*_lookup.npy``:

- ``user_lookup.npy``: row 0 is the unknown user (``"[UNK]"``), then member ids.
- ``item_lookup.npy``: product ids; row ``i`` of ``item_embeddings.npy`` is
  product ``item_lookup[i]``. Catalog products first (catalog order), then
  purchased ids missing from the catalog, then (after fine-tuning) new ids.
- ``context_lookup.npy``: ``""`` (padding, 0), ``"[UNK]"`` (OOV, 1), then
  ``item_lookup`` -- so context index = item index + 2.

Gender, age and context use the shared encoding of
:mod:`agent.recommenders.features`.

User tower: concat(user-id embedding, gender embedding, age-bucket embedding,
``context_weight`` x masked mean of the context item embeddings) -> Dense to
``embedding_dim``. Item tower: a product-id embedding. Loss: in-batch sampled
softmax (``tfrs.tasks.Retrieval``) with log-Q correction and accidental hits
removed; FactorizedTopK metrics are attached but not computed while training
(too slow for 1.3M rows on 2 cores).

TensorFlow (legacy tf-keras, which TFRS needs) is imported only by this module.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from agent import layout
from agent.recommenders.features import AGE_EDGES, CONTEXT_LENGTH, N_AGE_BUCKETS, N_GENDERS, OOV, PAD
from retrain_server.data import PurchaseLog

if os.environ.get("TF_USE_LEGACY_KERAS") != "1":  # pragma: no cover - set above
    raise ImportError("retrain_server.member needs TF_USE_LEGACY_KERAS=1 before TensorFlow loads")

import tensorflow as tf
import tensorflow_recommenders as tfrs

_LOG = logging.getLogger(__name__)

__all__ = ["MemberTrainingConfig", "MemberModelState", "train_member_model", "save_checkpoint",
           "load_checkpoint", "fine_tune_member_model", "export_member_model",
           "user_tower_numpy", "build_context_examples", "INPUT_NAMES", "OUTPUT_NAME"]

#: Names of the exported user tower's int64 inputs, in this order.
INPUT_NAMES = ("user_index", "gender_index", "age_bucket", "context_index")
#: Name of its float32 [N, dim] output.
OUTPUT_NAME = "user_embedding"
#: Vocabulary entries for "unknown" and "padding".
UNK, PAD_ID = "[UNK]", ""

_CKPT_PREFIX = "member"
_STATE_FILE = "member_state.json"


@dataclass
class MemberTrainingConfig:
    """Hyper-parameters of the member model (stored with checkpoints and exports).

    ``user_dropout`` / ``context_dropout``: share of training examples whose user id
    (resp. each context item) is replaced by the unknown index, so the OOV rows the
    edge uses for new members / new products are trained instead of random.
    ``context_history``: fill free context slots with the member's previous purchases.
    ``logq_correction``: subtract log(item frequency) from in-batch logits, so popular
    products are not punished for showing up often as negatives.
    ``min_steps_per_epoch``: on small data the batch shrinks (to no less than 32) so an
    epoch still takes this many gradient steps; one 4096-row batch learns nothing.
    """

    embedding_dim: int = 32
    context_weight: float = 1.0
    epochs: int = 3  # the seed's 1, raised: blended HR@10 on Complete Journey validation
    batch_size: int = 4096
    learning_rate: float = 0.1
    seed: int = 42
    gender_dim: int = 4
    age_dim: int = 8
    temperature: float = 0.1
    user_dropout: float = 0.1
    context_dropout: float = 0.02
    context_history: bool = True
    logq_correction: bool = True
    min_steps_per_epoch: int = 200

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemberTrainingConfig":
        """Build from a stored dict, ignoring unknown keys (older/newer versions)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class MemberModelState:
    """A trained model with the vocabularies it was trained with.

    ``user_model`` is the standalone user tower (the thing exported to ONNX);
    ``item_model`` maps item index -> embedding; ``model`` is the tfrs.Model.
    """

    config: MemberTrainingConfig
    user_lookup: np.ndarray
    context_lookup: np.ndarray
    item_lookup: np.ndarray
    model: Any
    user_model: Any
    item_model: Any
    history: dict[str, Any] = field(default_factory=dict)

    def item_embeddings(self) -> np.ndarray:
        """Item tower output for every ``item_lookup`` entry, float32 [n_items, dim]."""
        idx = np.arange(len(self.item_lookup), dtype=np.int64)
        return np.asarray(self.item_model(idx, training=False), dtype=np.float32)


# --------------------------------------------------------------------------- lookups

def _lookup(vocab: np.ndarray, values: np.ndarray, default: int) -> np.ndarray:
    """Vectorised ``vocab.index(v)`` for every value; ``default`` when absent."""
    values = np.asarray(values, dtype=str)
    out = np.full(len(values), default, dtype=np.int64)
    if len(vocab) == 0 or len(values) == 0:
        return out
    order = np.argsort(vocab, kind="stable")
    pos = np.searchsorted(vocab, values, sorter=order)
    pos = np.minimum(pos, len(vocab) - 1)
    found = vocab[order[pos]] == values
    out[found] = order[pos[found]]
    return out


def _gender_indices(genders: np.ndarray) -> np.ndarray:
    """Vectorised :func:`features.gender_index`."""
    g = np.asarray(genders, dtype=np.int64)
    return np.where(g < 0, 0, g + 1)


def _age_buckets(ages: np.ndarray) -> np.ndarray:
    """Vectorised :func:`features.age_bucket`."""
    a = np.asarray(ages, dtype=np.int64)
    return np.where(a < 0, 0, 1 + np.searchsorted(AGE_EDGES, a, side="right")).astype(np.int64)


def _unique_in_order(ids: Sequence[str]) -> np.ndarray:
    arr = np.asarray(list(ids), dtype=str)
    _, first = np.unique(arr, return_index=True)
    return arr[np.sort(first)]


def _extend_vocab(vocab: np.ndarray, new_ids: np.ndarray) -> np.ndarray:
    """``vocab`` followed by the ids of ``new_ids`` it lacks (first-seen order)."""
    new_ids = _unique_in_order(new_ids.tolist()) if len(new_ids) else new_ids
    missing = new_ids[_lookup(vocab, new_ids, -1) < 0] if len(new_ids) else new_ids
    return np.concatenate([vocab.astype(str), missing.astype(str)]).astype(str)


# --------------------------------------------------------------------------- examples

def build_context_examples(log: PurchaseLog, history: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Member rows and their context item rows: (rows [N], context [N, 10], -1 = empty).

    Why this context: at serving time the context is the cart (+ wishlist), and the
    evaluation hides one item of a basket and gives the rest as the cart. So the
    context of purchased item ``i`` is the last 10 OTHER items of the same basket
    (exactly what ``encode_context`` keeps of "basket minus i"); if fewer than 10,
    the free slots take the member's most recent items from earlier baskets (the
    stand-in for the wishlist). ``rows`` index the log; context entries index it too.
    Fully vectorised (no per-row Python).
    """
    L = CONTEXT_LENGTH
    member = np.flatnonzero(log.user_ids != "")
    if len(member) == 0:
        return member, np.full((0, L), -1, dtype=np.int64)
    users = log.user_ids[member]
    sessions = log.session_ids[member]
    # Baskets contiguous, in time order per user: sort by (user, basket start, session, row).
    _, sess_code = np.unique(sessions, return_inverse=True)
    sess_start = np.full(sess_code.max() + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(sess_start, sess_code, np.arange(len(member)))  # rows are time-sorted
    _, user_code = np.unique(users, return_inverse=True)
    order = np.lexsort((np.arange(len(member)), sess_code, sess_start[sess_code], user_code))
    rows = member[order]
    sc, uc = sess_code[order], user_code[order]
    n = len(rows)
    pos = np.arange(n)
    # Basket boundaries (a basket = one session of one user).
    new_b = np.ones(n, dtype=bool)
    new_b[1:] = (sc[1:] != sc[:-1]) | (uc[1:] != uc[:-1])
    b_id = np.cumsum(new_b) - 1
    b_start = np.flatnonzero(new_b)
    b_end = np.append(b_start[1:], n)
    start, end = b_start[b_id], b_end[b_id]
    # Last 11 basket positions; drop the item itself (or the oldest) -> 10 candidates.
    cand = end[:, None] - (L + 1) + np.arange(L + 1)[None, :]
    drop = np.where(pos >= end - (L + 1), pos - (end - (L + 1)), 0)
    keep = np.ones_like(cand, dtype=bool)
    keep[np.arange(n), drop] = False
    basket_ctx = cand[keep].reshape(n, L)
    basket_ok = basket_ctx >= start[:, None]
    parts, ok = [basket_ctx], [basket_ok]
    if history:
        new_u = np.ones(n, dtype=bool)
        new_u[1:] = uc[1:] != uc[:-1]
        u_start = np.flatnonzero(new_u)[np.cumsum(new_u) - 1]
        room = L - basket_ok.sum(axis=1)
        hist = start[:, None] - L + np.arange(L)[None, :]  # most recent last
        hist_ok = (hist >= u_start[:, None]) & (np.arange(L)[None, :] >= L - room[:, None])
        parts.append(hist)
        ok.append(hist_ok)
    ctx_pos = np.concatenate(parts, axis=1)
    ctx_ok = np.concatenate(ok, axis=1)
    # Left-align the valid slots (at most L of them by construction).
    slot = np.argsort(~ctx_ok, axis=1, kind="stable")[:, :L]
    ctx_pos = np.take_along_axis(ctx_pos, slot, axis=1)
    ctx_ok = np.take_along_axis(ctx_ok, slot, axis=1)
    context = np.where(ctx_ok, rows[np.clip(ctx_pos, 0, n - 1)], -1)
    return rows, context


def _encode_examples(log: PurchaseLog, user_lookup: np.ndarray, item_lookup: np.ndarray,
                     config: MemberTrainingConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Model inputs (int64 index arrays) for every member row of ``log``."""
    rows, ctx_rows = build_context_examples(log, history=config.context_history)
    item_of_row = _lookup(item_lookup, log.product_ids, -1)
    feats = {
        "user_index": np.maximum(_lookup(user_lookup, log.user_ids[rows], 0), 0),
        "gender_index": _gender_indices(log.genders[rows]),
        "age_bucket": _age_buckets(log.ages[rows]),
        "item_index": item_of_row[rows],
    }
    ctx_item = np.where(ctx_rows >= 0, item_of_row[np.maximum(ctx_rows, 0)], -1)
    context = np.where(ctx_rows < 0, PAD, np.where(ctx_item < 0, OOV, ctx_item + 2))
    if config.user_dropout > 0:
        feats["user_index"][rng.random(len(rows)) < config.user_dropout] = 0
    if config.context_dropout > 0:
        hit = (rng.random(context.shape) < config.context_dropout) & (context != PAD)
        context[hit] = OOV
    feats["context_index"] = context.astype(np.int64)
    keep = feats["item_index"] >= 0  # always true: item_lookup covers purchased ids
    return {k: np.ascontiguousarray(v[keep], dtype=np.int64) for k, v in feats.items()}


# --------------------------------------------------------------------------- model

def _build_user_model(n_users: int, n_context: int, cfg: MemberTrainingConfig) -> Any:
    """Functional user tower with the exported input/output names."""
    inputs = {name: tf.keras.Input(shape=(CONTEXT_LENGTH,) if name == "context_index" else (),
                                   dtype=tf.int64, name=name) for name in INPUT_NAMES}
    user = tf.keras.layers.Embedding(n_users, cfg.embedding_dim, name="user_embedding_table")(
        inputs["user_index"])
    gender = tf.keras.layers.Embedding(N_GENDERS, cfg.gender_dim, name="gender_embedding_table")(
        inputs["gender_index"])
    age = tf.keras.layers.Embedding(N_AGE_BUCKETS, cfg.age_dim, name="age_embedding_table")(
        inputs["age_bucket"])
    ctx_emb = tf.keras.layers.Embedding(n_context, cfg.embedding_dim,
                                        name="context_embedding_table")(inputs["context_index"])
    context = _MaskedMean(cfg.context_weight, name="context_mean")([ctx_emb, inputs["context_index"]])
    x = tf.keras.layers.Concatenate(name="user_features")([user, gender, age, context])
    out = tf.keras.layers.Dense(cfg.embedding_dim, name=OUTPUT_NAME)(x)
    return tf.keras.Model(inputs=[inputs[n] for n in INPUT_NAMES], outputs=out, name="user_tower")


class _MaskedMean(tf.keras.layers.Layer):
    """Mean of context embeddings over non-PAD slots, times ``weight`` (0 if empty)."""

    def __init__(self, weight: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.weight = float(weight)

    def call(self, inputs: list[Any]) -> Any:
        emb, idx = inputs
        mask = tf.cast(tf.not_equal(idx, PAD), emb.dtype)[:, :, None]
        total = tf.reduce_sum(emb * mask, axis=1)
        count = tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
        return total / count * self.weight

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "weight": self.weight}


def _build_item_model(n_items: int, cfg: MemberTrainingConfig) -> Any:
    idx = tf.keras.Input(shape=(), dtype=tf.int64, name="item_index")
    out = tf.keras.layers.Embedding(n_items, cfg.embedding_dim, name="item_embedding_table")(idx)
    return tf.keras.Model(inputs=idx, outputs=out, name="item_tower")


class _TwoTower(tfrs.Model):
    """Two-Tower retrieval model over index features (see module docstring)."""

    def __init__(self, user_model: Any, item_model: Any, n_items: int,
                 cfg: MemberTrainingConfig) -> None:
        super().__init__()
        self.user_model = user_model
        self.item_model = item_model
        candidates = tf.data.Dataset.range(n_items).batch(4096).map(item_model)
        self.task = tfrs.tasks.Retrieval(
            metrics=tfrs.metrics.FactorizedTopK(candidates=candidates),
            temperature=cfg.temperature or None,
            remove_accidental_hits=True)

    def compute_loss(self, features: dict[str, Any], training: bool = False) -> Any:
        query = self.user_model([features[n] for n in INPUT_NAMES])
        candidate = self.item_model(features["item_index"])
        return self.task(query, candidate,
                         candidate_sampling_probability=features.get("sampling_probability"),
                         candidate_ids=features["item_index"],
                         compute_metrics=not training, compute_batch_metrics=False)


def _new_state(cfg: MemberTrainingConfig, user_lookup: np.ndarray,
               item_lookup: np.ndarray) -> MemberModelState:
    tf.keras.utils.set_random_seed(cfg.seed)
    context_lookup = np.concatenate([[PAD_ID, UNK], item_lookup]).astype(str)
    user_model = _build_user_model(len(user_lookup), len(context_lookup), cfg)
    item_model = _build_item_model(len(item_lookup), cfg)
    model = _TwoTower(user_model, item_model, len(item_lookup), cfg)
    model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=cfg.learning_rate))
    return MemberModelState(cfg, np.asarray(user_lookup, dtype=str), context_lookup,
                            np.asarray(item_lookup, dtype=str), model, user_model, item_model)


def _fit(state: MemberModelState, log: PurchaseLog) -> MemberModelState:
    """Train ``state.model`` on the member rows of ``log`` for ``config.epochs``."""
    cfg = state.config
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    feats = _encode_examples(log, state.user_lookup, state.item_lookup, cfg, rng)
    n = len(feats["item_index"])
    t_build = time.perf_counter() - t0
    _LOG.info("member model: %d examples built in %.1fs", n, t_build)
    if n == 0:
        _LOG.warning("member model: no member rows to train on; weights unchanged")
        return state
    if cfg.logq_correction:
        freq = np.bincount(feats["item_index"], minlength=len(state.item_lookup))
        feats["sampling_probability"] = (freq[feats["item_index"]] / n).astype(np.float32)
    batch = int(min(cfg.batch_size, max(32, -(-n // cfg.min_steps_per_epoch))))
    losses = []
    t1 = time.perf_counter()
    for epoch in range(cfg.epochs):
        perm = rng.permutation(n)
        ds = tf.data.Dataset.from_tensor_slices({k: v[perm] for k, v in feats.items()})
        ds = ds.batch(batch).prefetch(tf.data.AUTOTUNE)
        hist = state.model.fit(ds, epochs=1, verbose=0)
        losses.append(float(hist.history["loss"][-1]))
        _LOG.info("member model: epoch %d/%d loss %.4f (%.1fs, batch %d)", epoch + 1, cfg.epochs,
                  losses[-1], time.perf_counter() - t1, batch)
    state.history = {"examples": n, "build_seconds": t_build,
                     "train_seconds": time.perf_counter() - t1, "loss": losses}
    return state


# --------------------------------------------------------------------------- public API

def train_member_model(log: PurchaseLog, catalog_ids: Sequence[str],
                       config: MemberTrainingConfig | None = None) -> MemberModelState:
    """Train from scratch on the member rows of ``log``.

    Every catalog product gets an item row (never-purchased ones keep their
    initial "cold" vector), so the edge can score the whole catalog.
    """
    cfg = config or MemberTrainingConfig()
    members = log.user_ids[log.user_ids != ""]
    user_lookup = np.concatenate([[UNK], np.unique(members)]).astype(str)
    item_lookup = _extend_vocab(_unique_in_order(catalog_ids),
                                np.unique(log.product_ids[log.user_ids != ""]))
    _LOG.info("member model: %d users, %d items", len(user_lookup) - 1, len(item_lookup))
    return _fit(_new_state(cfg, user_lookup, item_lookup), log)


def save_checkpoint(state: MemberModelState, directory: str | Path) -> Path:
    """Write weights (TF checkpoint), lookups and config to ``directory``.

    Written to a temp dir beside it and renamed, so a crash never leaves a
    half-written checkpoint.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not (directory / _STATE_FILE).exists():
        raise ValueError(f"{directory} is not empty and holds no {_STATE_FILE}: refusing to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        tf.train.Checkpoint(user_model=state.user_model, item_model=state.item_model).write(
            str(tmp / _CKPT_PREFIX))
        for name in ("user_lookup", "context_lookup", "item_lookup"):
            np.save(tmp / f"{name}.npy", getattr(state, name))
        (tmp / _STATE_FILE).write_text(json.dumps(
            {"config": asdict(state.config), "history": state.history}, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _LOG.info("member checkpoint saved to %s", directory)
    return directory


def load_checkpoint(directory: str | Path) -> MemberModelState:
    """Rebuild the model with the saved vocab sizes and restore its weights exactly."""
    directory = Path(directory)
    meta = json.loads((directory / _STATE_FILE).read_text())
    cfg = MemberTrainingConfig.from_dict(meta["config"])
    lookups = {n: np.load(directory / f"{n}.npy", allow_pickle=False)
               for n in ("user_lookup", "context_lookup", "item_lookup")}
    state = _new_state(cfg, lookups["user_lookup"], lookups["item_lookup"])
    if not np.array_equal(state.context_lookup, lookups["context_lookup"]):
        raise ValueError(f"{directory}: context_lookup is not [PAD, UNK] + item_lookup")
    tf.train.Checkpoint(user_model=state.user_model, item_model=state.item_model).read(
        str(directory / _CKPT_PREFIX)).assert_existing_objects_matched()
    state.history = meta.get("history", {})
    return state


def fine_tune_member_model(checkpoint_dir: str | Path, new_log: PurchaseLog,
                           catalog_ids: Sequence[str],
                           config: MemberTrainingConfig | None = None) -> MemberModelState:
    """Continue training a saved model on ``new_log`` (the nightly retrain).

    Existing lookup numbering never changes. New members and new products are
    APPENDED (old indices stay valid): a new user row / new context row starts as
    a copy of the trained unknown-user / OOV-product row (what the edge used for
    them so far), a new item row starts from the initializer (cold) and learns if
    the product was bought. Catalog products not yet known get a row too, so
    ``item_lookup`` covers the whole current catalog. A fresh Adagrad optimizer is
    used; context history comes from ``new_log`` only. ``config`` overrides the
    saved training knobs (epochs, learning rate, ...); architecture sizes and
    ``context_weight`` are kept from the checkpoint.
    """
    old = load_checkpoint(checkpoint_dir)
    cfg = old.config
    if config is not None:
        keep = {"embedding_dim", "gender_dim", "age_dim", "context_weight"}
        cfg = MemberTrainingConfig.from_dict(
            {**asdict(config), **{k: getattr(old.config, k) for k in keep}})
    members = new_log.user_ids[new_log.user_ids != ""]
    user_lookup = _extend_vocab(old.user_lookup, np.unique(members))
    item_lookup = _extend_vocab(_extend_vocab(old.item_lookup, np.asarray(list(catalog_ids), str)),
                                np.unique(new_log.product_ids[new_log.user_ids != ""]))
    _LOG.info("member fine-tune: +%d users, +%d items", len(user_lookup) - len(old.user_lookup),
              len(item_lookup) - len(old.item_lookup))
    state = _new_state(cfg, user_lookup, item_lookup)
    _copy_weights(old, state)
    return _fit(state, new_log)


def _copy_weights(old: MemberModelState, new: MemberModelState) -> None:
    """Copy trained weights into a (possibly larger) model; grown rows as documented."""
    n_u, n_c, n_i = len(old.user_lookup), len(old.context_lookup), len(old.item_lookup)
    for layer in old.user_model.layers + old.item_model.layers:
        if not layer.weights:
            continue
        target = (new.user_model if layer in old.user_model.layers else new.item_model
                  ).get_layer(layer.name)
        values = [w.numpy() for w in layer.weights]
        if layer.name == "user_embedding_table":
            grown = target.get_weights()[0]
            grown[:n_u] = values[0]
            grown[n_u:] = values[0][0]
            values = [grown]
        elif layer.name == "context_embedding_table":
            grown = target.get_weights()[0]
            grown[:n_c] = values[0]
            grown[n_c:] = values[0][OOV]
            values = [grown]
        elif layer.name == "item_embedding_table":
            grown = target.get_weights()[0]
            grown[:n_i] = values[0]
            values = [grown]
        target.set_weights(values)


def user_tower_numpy(state: MemberModelState, user_index: np.ndarray, gender_index: np.ndarray,
                     age_bucket: np.ndarray, context_index: np.ndarray) -> np.ndarray:
    """Keras forward pass of the user tower (reference for ONNX parity tests)."""
    args = [np.asarray(a, dtype=np.int64) for a in (user_index, gender_index, age_bucket)]
    ctx = np.asarray(context_index, dtype=np.int64).reshape(-1, CONTEXT_LENGTH)
    return np.asarray(state.user_model([*args, ctx], training=False), dtype=np.float32)


class _PreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing before quantization")


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """Drop the root-logger advice ``quantize_dynamic`` prints on every export.

    It recommends onnxruntime's shape-inference pre-pass for static quantization of image models; the
    int8 tower here is dynamic and checked against the float32 one instead (tests/test_member_model.py),
    and the line only alarmed every nightly run's and the demo's output.
    """
    advice = _PreprocessingAdvice()
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def export_member_model(state: MemberModelState, out_dir: str | Path) -> list[Path]:
    """Write the edge artifacts (seed layout) into ``out_dir`` (``member_model/``).

    Files: ``two_tower_model.onnx`` (fp32), ``two_tower_model_quantized.onnx``
    (dynamic QInt8), ``user_lookup.npy``, ``context_lookup.npy``,
    ``item_lookup.npy``, ``item_embeddings.npy``, ``member_meta.json``.
    """
    import tf2onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = out_dir / Path(layout.MEMBER_ONNX_FP32).name
    int8 = out_dir / Path(layout.MEMBER_ONNX).name
    spec = [tf.TensorSpec([None, CONTEXT_LENGTH] if n == "context_index" else [None],
                          tf.int64, name=n) for n in INPUT_NAMES]
    tf2onnx.convert.from_keras(state.user_model, input_signature=spec, opset=13,
                               output_path=str(fp32))
    _rename_onnx_output(fp32)
    with _without_preprocessing_advice():
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    written = [fp32, int8]
    for name in ("user_lookup", "context_lookup", "item_lookup"):
        path = out_dir / Path(layout.MEMBER_ARRAYS[name]).name
        np.save(path, np.asarray(getattr(state, name), dtype=str))
        written.append(path)
    emb = out_dir / Path(layout.MEMBER_ARRAYS["item_embeddings"]).name
    # Column-major (``fortran_order`` in the .npy header; np.load gives the same [items, dim] array):
    # the edge maps the file as is, and its per-request matrix-vector product runs ~35 % faster
    # reading each dimension's scores contiguously than row by row.
    np.save(emb, np.asfortranarray(state.item_embeddings()))
    written.append(emb)
    meta = out_dir / Path(layout.MEMBER_META).name
    meta.write_text(json.dumps({
        "embedding_dim": state.config.embedding_dim,
        "context_length": CONTEXT_LENGTH,
        "inputs": {n: {"dtype": "int64", "shape": ["N", CONTEXT_LENGTH]
                       if n == "context_index" else ["N"]} for n in INPUT_NAMES},
        "output": {"name": OUTPUT_NAME, "dtype": "float32",
                   "shape": ["N", state.config.embedding_dim]},
        "n_users": len(state.user_lookup), "n_items": len(state.item_lookup),
        "context_offset": 2, "pad_index": PAD, "oov_index": OOV, "unknown_user_index": 0,
        "config": asdict(state.config), "history": state.history,
    }, indent=2, ensure_ascii=False))
    written.append(meta)
    _LOG.info("member model exported to %s", out_dir)
    return written


def _rename_onnx_output(path: Path) -> None:
    """Make the graph output name exactly OUTPUT_NAME (tf2onnx may add suffixes)."""
    import onnx

    model = onnx.load(str(path))
    old = model.graph.output[0].name
    if old == OUTPUT_NAME:
        return
    for node in model.graph.node:
        node.output[:] = [OUTPUT_NAME if o == old else o for o in node.output]
        node.input[:] = [OUTPUT_NAME if i == old else i for i in node.input]
    model.graph.output[0].name = OUTPUT_NAME
    onnx.save(model, str(path))

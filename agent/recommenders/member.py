"""Member model: the Two-Tower user tower in ONNX, scored against item embeddings.

The user tower (int8-quantized ONNX, run by onnxruntime) turns a member's id,
gender, age bucket and context (cart + wishlist) into a vector; every product
is scored by its dot product with the precomputed ``item_embeddings``. The
lookup arrays are the exact id -> index numbering the graph was trained with.

Grocery shoppers rebuy, so the score can be blended with the member's own
purchase counts (``repeat_weight``) and with co-purchase evidence from the
guest model (``co_weight``); both weights are chosen by measurement
(``retrain-server evaluate``) and 0 turns them off.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import RecommendRequest
from .features import CONTEXT_LENGTH, age_bucket, build_index, encode_context, gender_index
from .guest import GuestRecommender

_LOG = logging.getLogger(__name__)

__all__ = ["MemberParams", "MemberHistory", "MemberRecommender", "top_k"]

INPUT_NAMES = ("user_index", "gender_index", "age_bucket", "context_index")


@dataclass(frozen=True)
class MemberParams:
    """Serving knobs (``member:`` in the agent config / ``member_meta.json``)."""

    #: weight of log(1 + times the member bought the item)
    repeat_weight: float = 0.0
    #: weight of the guest model's co-purchase score of the cart
    co_weight: float = 0.0
    #: onnxruntime intra-op threads (1: latency at batch 1, leaves cores free)
    threads: int = 1


@dataclass(frozen=True)
class MemberHistory:
    """Per-member purchase counts as CSR rows indexed like ``user_lookup``."""

    indptr: np.ndarray  # int64 [n_users + 1]
    items: np.ndarray  # int32 item indices (item_lookup numbering)
    counts: np.ndarray  # float32

    def row(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.indptr[user], self.indptr[user + 1]
        return self.items[lo:hi], self.counts[lo:hi]


class MemberRecommender:
    """Scores all items for a member; cart and wishlist are excluded."""

    def __init__(self, onnx_model: bytes, user_lookup: Sequence[str], context_lookup: Sequence[str],
                 item_lookup: Sequence[str], item_embeddings: np.ndarray,
                 history: MemberHistory | None = None, guest: GuestRecommender | None = None,
                 params: MemberParams | None = None) -> None:
        import onnxruntime as ort

        self.params = params or MemberParams()
        self.item_ids_ = np.asarray(item_lookup)
        self.item_embeddings_ = np.ascontiguousarray(item_embeddings, dtype=np.float32)
        if self.item_embeddings_.shape[0] != len(self.item_ids_):
            raise ValueError("item_embeddings rows != item_lookup length")
        self.user_index_ = build_index(list(user_lookup))
        self.history_ = history
        self.guest_ = guest
        # Memory: a 50k-product catalogue costs ~6 MB per id -> index dict, so the
        # guest model's dict is reused when the numbering agrees (it does when both
        # were trained from the same catalogue), and the context index is derived
        # from the item index when context_lookup is ["", "[UNK]"] + item_lookup.
        if guest is not None and np.array_equal(guest.item_ids_, self.item_ids_):
            self.item_index_ = guest.index_
            self.guest_to_item_ = None  # same numbering
        else:
            self.item_index_ = build_index(self.item_ids_.tolist())
            self.guest_to_item_ = (None if guest is None else np.array(
                [self.item_index_.get(p, -1) for p in guest.item_ids_.tolist()], dtype=np.int64))
        ctx = np.asarray(context_lookup)
        if len(ctx) == len(self.item_ids_) + 2 and np.array_equal(ctx[2:], self.item_ids_):
            self.context_index_ = None  # context index = item index + 2
        else:
            self.context_index_ = build_index(ctx.tolist())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.params.threads
        opts.inter_op_num_threads = 1
        self.session_ = ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session_.get_inputs()]
        if sorted(names) != sorted(INPUT_NAMES):
            raise ValueError(f"ONNX inputs {names} != expected {list(INPUT_NAMES)}")
        self.output_name_ = self.session_.get_outputs()[0].name
        dim = self.session_.get_outputs()[0].shape[-1]
        if isinstance(dim, int) and dim != self.item_embeddings_.shape[1]:
            raise ValueError(f"user tower dim {dim} != item embedding dim {self.item_embeddings_.shape[1]}")

    def knows_user(self, user_id: str | None) -> bool:
        return user_id is not None and user_id in self.user_index_

    def user_vector(self, request: RecommendRequest) -> np.ndarray:
        """The user tower's output for this request (unknown member -> OOV row).

        Products the model does not know are left out of the context (ignored, as
        the guest model ignores them) rather than fed as the OOV index.
        """
        if self.context_index_ is None:
            index, offset = self.item_index_, 2
        else:
            index, offset = self.context_index_, 0
        # As in training: the basket's own items first (the last CONTEXT_LENGTH), then
        # the wishlist fills free slots (training fills them with earlier purchases).
        cart = [p for p in request.cart if p in index][-CONTEXT_LENGTH:]
        room = CONTEXT_LENGTH - len(cart)
        wish = [p for p in request.wishlist if p in index and p not in request.cart][:room] if room else []
        context = encode_context(cart + wish, index, offset)
        feed = {
            "user_index": np.array([self.user_index_.get(request.user_id or "", 0)], dtype=np.int64),
            "gender_index": np.array([gender_index(request.gender)], dtype=np.int64),
            "age_bucket": np.array([age_bucket(request.age)], dtype=np.int64),
            "context_index": context.reshape(1, CONTEXT_LENGTH),
        }
        return self.session_.run([self.output_name_], feed)[0][0]

    def scores(self, request: RecommendRequest) -> np.ndarray:
        """Blended score of every item (item_lookup order)."""
        s = self.item_embeddings_ @ self.user_vector(request)
        p = self.params
        if p.repeat_weight and self.history_ is not None and request.user_id in self.user_index_:
            items, counts = self.history_.row(self.user_index_[request.user_id])
            s[items] += p.repeat_weight * np.log1p(counts)  # a few hundred items: cheap
        if p.co_weight and self.guest_ is not None and request.cart:
            cart = self.guest_.indices(request.cart)
            items, co = self.guest_.co_purchase_scores(cart) if cart.size else (cart, None)
            if items.size:
                if self.guest_to_item_ is not None:
                    items = self.guest_to_item_[items]
                    co = co[items >= 0]
                    items = items[items >= 0]
                if items.size and co.max() > 0:
                    s[items] += p.co_weight * co / co.max()
        return s

    def recommend(self, request: RecommendRequest) -> list[str]:
        k = request.top_k
        if k <= 0:
            return []
        s = self.scores(request)
        excluded = [self.item_index_[p] for p in request.excluded if p in self.item_index_]
        if excluded:
            s[excluded] = -np.inf
        k = min(k, s.shape[0] - len(excluded))
        if k <= 0:
            return []
        return self.item_ids_[top_k(s, k)].tolist()


def top_k(scores: np.ndarray, k: int, stride: int = 25) -> np.ndarray:
    """Indices of the k highest scores, best first (ties: lower index first).

    Exact, but avoids a full partition of the catalogue: the k-th best score of
    every ``stride``-th item is a lower bound for the k-th best overall, so only
    items at or above it (about ``k * stride``) need ranking.
    """
    n = scores.shape[0]
    if n > 8 * k * stride:
        sample = scores[::stride]
        bound = np.partition(sample, sample.size - k)[sample.size - k]
        cand = np.flatnonzero(scores >= bound)
    else:
        cand = np.arange(n)
    if cand.size > k:
        part = np.argpartition(scores[cand], cand.size - k)[cand.size - k:]
        kth = scores[cand[part]].min()
        cand = cand[scores[cand] >= kth]  # keep boundary ties so the order below is exact
    order = np.lexsort((cand, -scores[cand]))[:k]
    return cand[order]

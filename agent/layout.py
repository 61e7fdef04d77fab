"""The parameters layout (contract §2): one home for every file name.

A server's parameters directory keeps the seed's full layout; the bundle a
basket downloads carries only :data:`EDGE_FILES` (plus its own signed
manifest). Everything that reads or writes model files — the agent's
registry, the server's export, training, evaluation and the bundle packer —
takes the names from here, and builds recommenders through a :class:`Source`
(a verified :class:`~agent.bundle.Manifest` on the edge, a
:class:`DirectorySource` over its own fresh output on the server).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["GUEST_DIR", "MEMBER_DIR", "GUEST_ARRAYS", "GUEST_META", "GUEST_BASKETS", "GUEST_CO_PARTNERS",
           "MEMBER_ARRAYS", "MEMBER_ONNX",
           "MEMBER_ONNX_FP32", "MEMBER_HISTORY", "MEMBER_NEIGHBOURS", "MEMBER_BASKETS", "MEMBER_META",
           "MEMBER_RERANK_TREES", "MEMBER_RERANK_STATS",
           "SEED_GUEST_FILES", "EDGE_FILES",
           "SERVER_ONLY_FILES", "is_edge_file", "Source", "DirectorySource"]

GUEST_DIR = "guest_model"
MEMBER_DIR = "member_model"

#: Guest model arrays the edge loads: array name -> path in the bundle.
GUEST_ARRAYS = {name: f"{GUEST_DIR}/{name}.npy" for name in (
    "item_ids", "item_names", "co_neighbors", "co_scores", "sim_neighbors", "sim_scores", "popular")}
GUEST_META = f"{GUEST_DIR}/guest_meta.json"
#: The store's recent baskets and their item -> baskets index (the session-kNN term): part name
#: -> path. Optional: older bundles have none, and the term is then off.
GUEST_BASKETS = {name: f"{GUEST_DIR}/baskets_{name}.npy" for name in ("starts", "items", "postings_indptr",
                                                                      "postings")}
#: The co-purchase partners without their padding (CSR: row i is ``items[indptr[i]:indptr[i+1]]``, best
#: first, with ``scores``): part name -> path. Optional, all or none. Agents serve these as they are
#: (mapped, shared by processes) and then never read the padded ``co_neighbors``/``co_scores``, which
#: bundles still carry for agents older than these files.
GUEST_CO_PARTNERS = {name: f"{GUEST_DIR}/co_partners_{name}.npy" for name in ("indptr", "items", "scores")}
#: The seed's pickled files (server side: the edge never unpickles).
SEED_GUEST_FILES = tuple(f"{GUEST_DIR}/{name}" for name in (
    "tfidf_vectorizer.pkl", "knn_model.pkl", "df_items.pkl", "tag_matrix.pkl", "co_purchase_dict.pkl"))

#: Member model lookups and embeddings: array name -> path.
MEMBER_ARRAYS = {name: f"{MEMBER_DIR}/{name}.npy" for name in (
    "user_lookup", "context_lookup", "item_lookup", "item_embeddings")}
MEMBER_ONNX = f"{MEMBER_DIR}/two_tower_model_quantized.onnx"
#: The fp32 user tower: parity checks and benchmarks on the server, never shipped.
MEMBER_ONNX_FP32 = f"{MEMBER_DIR}/two_tower_model.onnx"
#: Per-member purchase counts (CSR): part name -> path. Optional.
MEMBER_HISTORY = {name: f"{MEMBER_DIR}/history_{name}.npy" for name in ("indptr", "items", "counts")}
#: Per-member scores from similar members' purchases (CSR, same rows as the history): part
#: name -> path. Optional: written only when the blend gives the term a weight; older
#: bundles have none.
MEMBER_NEIGHBOURS = {name: f"{MEMBER_DIR}/neighbours_{name}.npy" for name in ("indptr", "items", "scores")}
#: Each member's recent baskets (two-level CSR: member -> baskets -> items, a decay weight per
#: basket): part name -> path. Optional: written only when the blend gives the term a weight.
MEMBER_BASKETS = {name: f"{MEMBER_DIR}/baskets_{name}.npy" for name in ("indptr", "starts", "items", "weights")}
MEMBER_META = f"{MEMBER_DIR}/member_meta.json"
#: The member reranker (:mod:`agent.recommenders.rerank`): boosted trees as ONNX, and the statistics their
#: features read (array name -> path). Optional, all or none; ``member_meta.json``'s ``rerank`` names the
#: features and the number of candidates.
MEMBER_RERANK_TREES = f"{MEMBER_DIR}/rerank_trees.onnx"
MEMBER_RERANK_STATS = {name: f"{MEMBER_DIR}/rerank_{name}.npy" for name in (
    "keys", "baskets", "days_since", "gap_days", "member_baskets", "member_days_since", "log_popularity",
    "rebuy_rate")}

#: What a basket downloads and loads.
EDGE_FILES = frozenset([*GUEST_ARRAYS.values(), GUEST_META, *GUEST_BASKETS.values(), *GUEST_CO_PARTNERS.values(),
                        *MEMBER_ARRAYS.values(),
                        MEMBER_ONNX,
                        *MEMBER_HISTORY.values(), *MEMBER_NEIGHBOURS.values(), *MEMBER_BASKETS.values(),
                        MEMBER_META, MEMBER_RERANK_TREES, *MEMBER_RERANK_STATS.values()])
#: What stays on the server (bundles never carry these).
SERVER_ONLY_FILES = frozenset([*SEED_GUEST_FILES, MEMBER_ONNX_FP32])


def is_edge_file(relpath: str) -> bool:
    """True for files a basket loads; everything else stays on the server."""
    return relpath in EDGE_FILES


class Source(Protocol):
    """Where model files come from; paths are relative to the parameters root."""

    def has(self, relpath: str) -> bool: ...

    def array(self, relpath: str) -> np.ndarray: ...

    def read_bytes(self, relpath: str) -> bytes: ...

    def forget_pages(self) -> None:
        """Let go of mapped pages read so far (a source that maps nothing does nothing)."""


class DirectorySource:
    """Files of a directory the caller wrote itself (server side: training, evaluation).

    No signature check — the edge reads through a verified manifest instead — but
    arrays are still loaded without pickle.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def has(self, relpath: str) -> bool:
        return (self.root / relpath).is_file()

    def array(self, relpath: str) -> np.ndarray:
        return np.load(self.root / relpath, allow_pickle=False)

    def read_bytes(self, relpath: str) -> bytes:
        return (self.root / relpath).read_bytes()

    def forget_pages(self) -> None:
        """Nothing is mapped: arrays are read into memory."""

    def json(self, relpath: str) -> Any:
        return json.loads(self.read_bytes(relpath).decode("utf-8"))

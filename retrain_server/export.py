"""Write a parameters directory in the seed's layout, with a signed manifest.

Everything is written into a temporary sibling directory first and renamed
into place at the end, so a crash never leaves a half-written ``parameters/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import scipy.sparse as sp

from agent import layout
from agent.bundle import MANIFEST, SIGNATURE, file_sha256
from agent.recommenders.guest import CoPartners

from .data import PurchaseLog
from .guest import GuestModel
from .sign import load_private_key, sign_bytes

_LOG = logging.getLogger(__name__)

__all__ = ["write_parameters", "write_guest_model", "write_member_history", "history_matrix",
           "write_history_arrays", "write_member_table", "write_neighbour_arrays", "write_basket_arrays",
           "write_manifest",
           "install_directory", "recover_directory", "sync_tree", "sync_dir"]


def write_guest_model(model: GuestModel, out: Path) -> None:
    """The seed's five joblib files plus the pickle-free edge arrays."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    cat = model.catalog
    df_items = pd.DataFrame({"id": cat.ids, "name": cat.names, "tag": cat.tags})
    seed_objects = (model.vectorizer, model.knn, df_items, model.tag_matrix, model.co_purchase_dict())
    for relpath, obj in zip(layout.SEED_GUEST_FILES, seed_objects):
        joblib.dump(obj, out / Path(relpath).name)
    for name, arr in model.edge_arrays().items():
        np.save(out / Path(layout.GUEST_ARRAYS[name]).name, arr, allow_pickle=False)
    for name, arr in (model.baskets or {}).items():
        np.save(out / Path(layout.GUEST_BASKETS[name]).name, arr, allow_pickle=False)
    co = CoPartners.from_table(model.co_neighbors, model.co_scores)  # what agents serve (the padded pair: older ones)
    for name in layout.GUEST_CO_PARTNERS:
        np.save(out / Path(layout.GUEST_CO_PARTNERS[name]).name, getattr(co, name), allow_pickle=False)
    (out / Path(layout.GUEST_META).name).write_text(json.dumps(model.meta(), indent=2), encoding="utf-8")


def write_member_history(log: PurchaseLog, user_lookup: np.ndarray, item_lookup: np.ndarray,
                         out: Path, weights: np.ndarray | None = None) -> sp.csr_matrix:
    """Per-member purchase counts (CSR by user_lookup row) for repeat-purchase blending.

    ``weights`` (one per row of ``log``, e.g. a time decay) replace the count of 1 per purchase.
    """
    members = log.user_ids != ""
    w = np.ones(int(members.sum()), np.float32) if weights is None else np.asarray(weights, np.float32)[members]
    return write_history_arrays(log.user_ids[members], log.product_ids[members], w, user_lookup, item_lookup, out)


def history_matrix(user_ids: np.ndarray, product_ids: np.ndarray, counts: np.ndarray,
                   user_lookup: np.ndarray, item_lookup: np.ndarray) -> sp.csr_matrix:
    """(member, product, count) triples as a CSR matrix in the edge's numbering; duplicates are summed.

    Rows follow ``user_lookup`` (row 0, the unknown user, stays empty), columns
    ``item_lookup``; members or products the lookups lack are left out.
    """
    users = {u: i for i, u in enumerate(user_lookup.tolist())}
    items = {p: i for i, p in enumerate(item_lookup.tolist())}
    u = np.fromiter((users.get(x, -1) for x in user_ids.tolist()), np.int64, len(user_ids))
    it = np.fromiter((items.get(x, -1) for x in product_ids.tolist()), np.int64, len(product_ids))
    ok = (u > 0) & (it >= 0)
    m = sp.csr_matrix((np.asarray(counts, np.float32)[ok], (u[ok], it[ok])),
                      shape=(len(user_lookup), len(item_lookup)))
    m.sum_duplicates()
    m.eliminate_zeros()
    return m


def write_history_arrays(user_ids: np.ndarray, product_ids: np.ndarray, counts: np.ndarray,
                         user_lookup: np.ndarray, item_lookup: np.ndarray, out: Path) -> sp.csr_matrix:
    """``history_*.npy`` from (member, product, count) triples (:func:`history_matrix`); returns the matrix."""
    m = history_matrix(user_ids, product_ids, counts, user_lookup, item_lookup)
    write_member_table(layout.MEMBER_HISTORY, (m.indptr, m.indices, m.data), out)
    return m


def write_member_table(paths: Mapping[str, str], parts: tuple[np.ndarray, np.ndarray, np.ndarray],
                       out: Path) -> None:
    """A per-member CSR table (indptr int64, items int32, values float32) under the layout's names."""
    names = list(paths)  # indptr, items, counts|scores
    arrays = (np.asarray(parts[0], np.int64), np.asarray(parts[1], np.int32), np.asarray(parts[2], np.float32))
    for name, arr in zip(names, arrays):
        np.save(out / Path(paths[name]).name, arr, allow_pickle=False)


def write_neighbour_arrays(history: sp.csr_matrix, out: Path, k: int, keep: int) -> int:
    """``neighbours_*.npy`` from the history matrix (edge numbering); returns the number of entries."""
    from .blend import neighbour_table

    parts = neighbour_table(history, k=k, keep=keep)
    write_member_table(layout.MEMBER_NEIGHBOURS, parts, out)
    return int(parts[1].size)


def write_basket_arrays(log: PurchaseLog, ages: np.ndarray, user_lookup: np.ndarray, item_lookup: np.ndarray,
                        out: Path, *, half_life_days: float, max_baskets: int) -> int:
    """``baskets_*.npy``, each member's newest baskets (:func:`~retrain_server.blend.basket_table`); returns
    the number of baskets."""
    from .blend import basket_table

    parts = basket_table(log, ages, user_lookup, item_lookup, half_life_days=half_life_days,
                         max_baskets=max_baskets)
    for name, arr in zip(layout.MEMBER_BASKETS, parts):
        np.save(out / Path(layout.MEMBER_BASKETS[name]).name, arr, allow_pickle=False)
    return int(len(parts[1]) - 1)


def write_manifest(root: Path, *, metrics: Mapping[str, Any] | None = None,
                   models: Mapping[str, Any] | None = None, signing_key: str | Path | None,
                   created_at: datetime | None = None, version: str | None = None,
                   extra: Mapping[str, Any] | None = None, scratch: bool = False) -> dict[str, Any]:
    """List every file under ``root`` with sha256 + size, then sign the manifest.

    The version is ``created_at`` (UTC) plus a digest of the file list unless
    ``version`` is given (a bundle keeps the version of the parameters it was
    packed from). ``extra`` adds top-level fields (e.g. ``"kind": "bundle"``). ``scratch``: a private
    directory that is never published (the reranker's fitting): unsigned without a warning.
    """
    created = created_at or datetime.now(timezone.utc)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in (MANIFEST, SIGNATURE):
            continue
        files[rel] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:6]
    utc = created.astimezone(timezone.utc) if created.tzinfo else created
    doc = {
        "format": 1,
        "version": version or f"{utc.strftime('%Y%m%dT%H%M%SZ')}-{digest}",
        "created_at": created.isoformat(timespec="seconds"),
        "files": files,
        "metrics": dict(metrics or {}),
        "models": dict(models or {}),
        **dict(extra or {}),
    }
    raw = json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8")
    (root / MANIFEST).write_bytes(raw)
    if signing_key is not None:
        (root / SIGNATURE).write_bytes(sign_bytes(load_private_key(signing_key), raw))
    elif not scratch:
        _LOG.warning("manifest of %s is UNSIGNED (no signing key given)", root)
    return doc


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a directory that is not a parameters bundle (``--out ~`` typo)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    contents = {p.name for p in out.iterdir()} - {"README.md"}
    if contents and MANIFEST not in contents:
        raise ValueError(f"{out} is not empty and holds no {MANIFEST}: refusing to replace it "
                         f"(choose an empty or new directory)")


def install_directory(new: Path, out: Path) -> None:
    """Put the finished directory ``new`` at ``out``, replacing what was there.

    Two renames: ``out`` -> ``.out.old``, ``new`` -> ``out``. A crash between
    them leaves no ``out`` but an intact ``.out.old``, which the next install
    (and :func:`recover_directory`) puts back; readers never see a mix.
    """
    _check_replaceable(out)
    keep = out / "README.md"
    if keep.exists() and not (new / "README.md").exists():
        shutil.copy2(keep, new / "README.md")  # documentation, not part of the manifest
    new.chmod(0o755)
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        if out.exists():
            shutil.rmtree(old)
        else:
            old.rename(out)  # a crash between the two renames last time
    if out.exists():
        out.rename(old)
    new.rename(out)
    sync_dir(out.parent)  # the renames themselves, before anything announces the new contents
    shutil.rmtree(old, ignore_errors=True)


def sync_tree(root: Path) -> None:
    """Every file and directory under ``root`` on disk (fsync), and ``root``'s own entry in its parent.

    Before PostgreSQL records a run as done: a power cut after the commit must not find the generation's
    counts or the candidate half written (the next runs read them), since ext4 writes back late."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_dir(Path(dirpath))
    sync_dir(Path(root).parent)


def sync_dir(path: Path) -> None:
    """A directory's entries (a rename or a new file in it) on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_directory(out: Path) -> None:
    """Undo a crash between :func:`install_directory`'s two renames."""
    old = out.with_name(f".{out.name}.old")
    if old.exists() and not out.exists():
        old.rename(out)
        _LOG.warning("restored %s after an interrupted install", out)


def write_parameters(out_dir: str | Path, guest: GuestModel, *,
                     member_writer: Callable[[Path], Mapping[str, Any]] | None = None,
                     metrics: Mapping[str, Any] | None = None,
                     signing_key: str | Path | None, scratch: bool = False) -> dict[str, Any]:
    """Write a complete, signed parameters directory and swap it into ``out_dir``.

    ``member_writer(member_dir)`` writes the member model files and returns its
    description for the manifest; None ships a guest-only bundle. ``out_dir``
    must be missing, empty (but for a README.md) or a previous bundle: anything
    else is refused rather than replaced. ``scratch``: see :func:`write_manifest`.
    """
    out = Path(out_dir)
    _check_replaceable(out)
    if signing_key is not None:
        load_private_key(signing_key)  # fail before the long writes, not after
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_guest_model(guest, tmp / layout.GUEST_DIR)
        models: dict[str, Any] = {"guest": guest.meta()}
        if member_writer is not None:
            (tmp / layout.MEMBER_DIR).mkdir()
            models["member"] = dict(member_writer(tmp / layout.MEMBER_DIR))
        doc = write_manifest(tmp, metrics=metrics, models=models, signing_key=signing_key, scratch=scratch)
        install_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _LOG.info("wrote parameters %s to %s", doc["version"], out)
    return doc

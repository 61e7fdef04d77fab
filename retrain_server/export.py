"""Write a parameters directory in the seed's layout, with a signed manifest.

Everything is written into a temporary sibling directory first and renamed
into place at the end, so a crash never leaves a half-written ``parameters/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from agent.bundle import MANIFEST, SIGNATURE, file_sha256

from .data import PurchaseLog
from .guest import GuestModel
from .sign import load_private_key, sign_bytes

_LOG = logging.getLogger(__name__)

__all__ = ["write_parameters", "write_guest_model", "write_member_history", "write_manifest"]


def write_guest_model(model: GuestModel, out: Path) -> None:
    """The seed's five joblib files plus the pickle-free edge arrays."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    cat = model.catalog
    df_items = pd.DataFrame({"id": cat.ids, "name": cat.names, "tag": cat.tags})
    joblib.dump(model.vectorizer, out / "tfidf_vectorizer.pkl")
    joblib.dump(model.knn, out / "knn_model.pkl")
    joblib.dump(df_items, out / "df_items.pkl")
    joblib.dump(model.tag_matrix, out / "tag_matrix.pkl")
    joblib.dump(model.co_purchase_dict(), out / "co_purchase_dict.pkl")
    for stem, arr in model.edge_arrays().items():
        np.save(out / f"{stem}.npy", arr, allow_pickle=False)
    (out / "guest_meta.json").write_text(json.dumps(model.meta(), indent=2), encoding="utf-8")


def write_member_history(log: PurchaseLog, user_lookup: np.ndarray, item_lookup: np.ndarray,
                         out: Path) -> None:
    """Per-member purchase counts (CSR by user_lookup row) for repeat-purchase blending."""
    users = {u: i for i, u in enumerate(user_lookup.tolist())}
    items = {p: i for i, p in enumerate(item_lookup.tolist())}
    u = np.fromiter((users.get(x, -1) for x in log.user_ids.tolist()), np.int64, len(log))
    it = np.fromiter((items.get(x, -1) for x in log.product_ids.tolist()), np.int64, len(log))
    ok = (u > 0) & (it >= 0) & (log.user_ids != "")
    import scipy.sparse as sp

    m = sp.csr_matrix((np.ones(int(ok.sum()), np.float32), (u[ok], it[ok])),
                      shape=(len(user_lookup), len(item_lookup)))
    m.sum_duplicates()
    np.save(out / "history_indptr.npy", m.indptr.astype(np.int64), allow_pickle=False)
    np.save(out / "history_items.npy", m.indices.astype(np.int32), allow_pickle=False)
    np.save(out / "history_counts.npy", m.data.astype(np.float32), allow_pickle=False)


def write_manifest(root: Path, *, metrics: Mapping[str, Any] | None = None,
                   models: Mapping[str, Any] | None = None, signing_key: str | Path | None,
                   created_at: datetime | None = None) -> dict[str, Any]:
    """List every file under ``root`` with sha256 + size, then sign the manifest."""
    created = created_at or datetime.now(timezone.utc)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in (MANIFEST, SIGNATURE):
            continue
        files[rel] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:6]
    doc = {
        "format": 1,
        "version": f"{created.strftime('%Y%m%dT%H%M%SZ')}-{digest}",
        "created_at": created.isoformat(timespec="seconds"),
        "files": files,
        "metrics": dict(metrics or {}),
        "models": dict(models or {}),
    }
    raw = json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8")
    (root / MANIFEST).write_bytes(raw)
    if signing_key is not None:
        (root / SIGNATURE).write_bytes(sign_bytes(load_private_key(signing_key), raw))
    else:
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


def write_parameters(out_dir: str | Path, guest: GuestModel, *,
                     member_writer: Callable[[Path], Mapping[str, Any]] | None = None,
                     metrics: Mapping[str, Any] | None = None,
                     signing_key: str | Path | None) -> dict[str, Any]:
    """Write a complete, signed parameters directory and swap it into ``out_dir``.

    ``member_writer(member_dir)`` writes the member model files and returns its
    description for the manifest; None ships a guest-only bundle. ``out_dir``
    must be missing, empty (but for a README.md) or a previous bundle: anything
    else is refused rather than replaced.
    """
    out = Path(out_dir)
    _check_replaceable(out)
    if signing_key is not None:
        load_private_key(signing_key)  # fail before the long writes, not after
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_guest_model(guest, tmp / "guest_model")
        models: dict[str, Any] = {"guest": guest.meta()}
        if member_writer is not None:
            (tmp / "member_model").mkdir()
            models["member"] = dict(member_writer(tmp / "member_model"))
        doc = write_manifest(tmp, metrics=metrics, models=models, signing_key=signing_key)
        keep = out / "README.md"
        if keep.exists():
            shutil.copy2(keep, tmp / "README.md")  # documentation, not part of the manifest
        tmp.chmod(0o755)
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _LOG.info("wrote parameters %s to %s", doc["version"], out)
    return doc

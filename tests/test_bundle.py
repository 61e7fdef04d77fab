"""Signed parameters: written by training, verified before anything is opened."""

from __future__ import annotations

import json
import logging
import os
import pickle
import stat

import numpy as np
import pytest

from agent.bundle import load_public_key, verify_parameters
from agent.errors import BundleError, SignatureError
from agent.recommenders.base import RecommendRequest
from agent.registry import ModelRegistry, load_snapshot
from retrain_server.export import write_manifest, write_parameters
from retrain_server.guest import train_guest_model
from retrain_server.sign import keygen
from retrain_server.synth import make_store


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    key, pub = keygen(d)
    return key, pub


@pytest.fixture(scope="module")
def guest_model():
    store = make_store(n_products=120, n_rows=2000, n_users=20, n_families=12)
    return train_guest_model(store.catalog, store.purchases)


@pytest.fixture
def params(tmp_path, keys, guest_model):
    out = tmp_path / "parameters"
    write_parameters(out, guest_model, signing_key=keys[0])
    return out


def test_keygen_writes_private_key_mode_600_and_refuses_overwrite(keys):
    key, pub = keys
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in pub.read_bytes()
    with pytest.raises(FileExistsError):
        keygen(key.parent)


def test_seed_layout_and_manifest(params):
    for name in ("tfidf_vectorizer.pkl", "knn_model.pkl", "df_items.pkl", "tag_matrix.pkl",
                 "co_purchase_dict.pkl"):
        assert (params / "guest_model" / name).is_file()
    doc = json.loads((params / "manifest.json").read_text())
    assert set(doc) >= {"version", "created_at", "files", "metrics"}
    for rel, info in doc["files"].items():
        assert (params / rel).stat().st_size == info["size"]
    assert (params / "manifest.sig").is_file()


def test_signed_parameters_load_and_serve(params, keys):
    snap = load_snapshot(params, load_public_key(keys[1]))
    assert snap.member is None  # guest-only bundle
    rec = snap.recommend(RecommendRequest(cart=(snap.guest.item_ids_[0],), user_id="u1"))
    assert rec.model == "guest" and len(rec.ids) == 10  # members fall back to guest


def test_wrong_key_is_refused(params, tmp_path):
    _, other_pub = keygen(tmp_path / "other")
    with pytest.raises(SignatureError, match="does not match"):
        verify_parameters(params, load_public_key(other_pub))


def test_missing_signature_is_refused_unless_allowed(params, keys):
    (params / "manifest.sig").unlink()
    with pytest.raises(SignatureError, match="unsigned"):
        verify_parameters(params, load_public_key(keys[1]))
    assert not verify_parameters(params, None, allow_unsigned=True).signed


def test_unsigned_parameters_are_announced_unless_they_are_private_scratch(tmp_path, guest_model, caplog):
    """Parameters written without a key warn (someone may ship them); the reranker's private scratch copy,
    never published, does not (it alarmed every nightly run's and the demo's output)."""
    caplog.set_level(logging.WARNING, logger="retrain_server.export")
    write_parameters(tmp_path / "shipped", guest_model, signing_key=None)
    (record,) = caplog.records
    assert "is UNSIGNED (no signing key given)" in record.getMessage() and record.levelno == logging.WARNING
    caplog.clear()
    write_parameters(tmp_path / "scratch", guest_model, signing_key=None, scratch=True)
    assert not caplog.records
    assert not verify_parameters(tmp_path / "scratch", None, allow_unsigned=True).signed


def test_no_key_is_refused_without_allow_unsigned(params):
    with pytest.raises(SignatureError, match="no public key"):
        verify_parameters(params, None)


def test_tampered_file_is_refused(params, keys):
    path = params / "guest_model" / "co_scores.npy"
    arr = np.load(path)
    arr[0, 0] += 1
    np.save(path, arr)
    with pytest.raises(BundleError, match="co_scores.npy"):
        load_snapshot(params, load_public_key(keys[1]))


def test_tampered_manifest_is_refused(params, keys):
    raw = (params / "manifest.json").read_text().replace('"format": 1', '"format": 2')
    (params / "manifest.json").write_text(raw)
    with pytest.raises(SignatureError):
        verify_parameters(params, load_public_key(keys[1]))


class _Boom:
    """Unpickling this creates a marker file: proof that something unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_nothing_is_unpickled_even_from_a_valid_bundle(params, keys, tmp_path):
    marker = tmp_path / "unpickled"
    for name in ("tfidf_vectorizer.pkl", "knn_model.pkl", "co_purchase_dict.pkl"):
        (params / "guest_model" / name).write_bytes(pickle.dumps(_Boom(str(marker))))
    # An attacker's pickle under a wrong signature is refused before anything is read...
    with pytest.raises(BundleError):
        load_snapshot(params, load_public_key(keys[1]))
    # ...and even when properly signed, the edge never unpickles.
    write_manifest(params, signing_key=keys[0])
    load_snapshot(params, load_public_key(keys[1]))
    assert not marker.exists()


def test_object_arrays_are_refused(params, keys):
    np.save(params / "guest_model" / "item_names.npy", np.array([{"x": 1}], dtype=object),
            allow_pickle=True)
    write_manifest(params, signing_key=keys[0])
    with pytest.raises(BundleError, match="object arrays are refused"):
        load_snapshot(params, load_public_key(keys[1]))


def test_path_escape_in_manifest_is_refused(params, keys, tmp_path):
    (tmp_path / "outside.txt").write_text("x")
    doc = json.loads((params / "manifest.json").read_text())
    doc["files"]["../outside.txt"] = {"sha256": "0", "size": 1}
    raw = json.dumps(doc).encode()
    (params / "manifest.json").write_bytes(raw)
    from retrain_server.sign import load_private_key, sign_bytes

    (params / "manifest.sig").write_bytes(sign_bytes(load_private_key(keys[0]), raw))
    with pytest.raises(BundleError, match="outside the bundle"):
        verify_parameters(params, load_public_key(keys[1]))


def test_failed_load_keeps_the_old_snapshot_serving(params, keys, tmp_path, guest_model):
    registry = ModelRegistry(load_snapshot(params, load_public_key(keys[1])))
    old = registry.current
    bad = tmp_path / "bad"
    write_parameters(bad, guest_model, signing_key=keys[0])
    (bad / "guest_model" / "popular.npy").write_bytes(b"garbage")
    with pytest.raises(BundleError):
        registry.swap(load_snapshot(bad, load_public_key(keys[1])))
    assert registry.current is old


def test_rewrite_is_atomic_and_keeps_readme(tmp_path, keys, guest_model):
    out = tmp_path / "parameters"
    out.mkdir()
    (out / "README.md").write_text("layout doc")
    first = write_parameters(out, guest_model, signing_key=keys[0])
    second = write_parameters(out, guest_model, signing_key=keys[0])
    assert (out / "README.md").read_text() == "layout doc"
    assert not any(p.name.startswith(".parameters.") for p in tmp_path.iterdir())
    assert json.loads((out / "manifest.json").read_text())["version"] == second["version"]
    assert first["files"] == second["files"]  # training is deterministic


def test_bad_signing_key_fails_before_writing(tmp_path, guest_model):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(ValueError, match="private key"):
        write_parameters(tmp_path / "p", guest_model, signing_key=bad)
    assert not (tmp_path / "p").exists()


def test_refuses_to_replace_a_directory_that_is_not_a_bundle(tmp_path, keys, guest_model):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="refusing to replace"):
        write_parameters(home, guest_model, signing_key=keys[0])
    assert (home / "thesis.txt").read_text() == "years of work"


def test_what_is_loaded_is_what_was_verified(params, keys):
    """A file swapped on disk after verification is never served (the bytes were hashed and kept)."""
    from agent.layout import GUEST_ARRAYS
    from agent.registry import snapshot_from_source

    manifest = verify_parameters(params, load_public_key(keys[1]))
    names_path = params / GUEST_ARRAYS["item_names"]
    original = np.load(names_path).tolist()
    np.save(names_path, np.array(["HACKED"] * len(original)))  # after the check, before the load
    snap = snapshot_from_source(manifest, manifest.version)
    ids = snap.guest.item_ids_.tolist()
    assert [snap.name(i) for i in ids] == original
    assert "HACKED" not in {snap.name(i) for i in ids}


def test_an_array_header_claiming_billions_of_rows_is_a_clean_error(params, keys, tmp_path):
    """The header is checked against the file size before anything is allocated: exit 3, one line."""
    import subprocess
    import sys

    from agent.layout import GUEST_ARRAYS

    path = params / GUEST_ARRAYS["popular"]
    raw = path.read_bytes()
    header_end = raw.index(b"\n") + 1
    arr = np.load(path)
    header = raw[:header_end].decode("latin1").replace(f"({arr.shape[0]},)", "(4000000000,)")
    header = header[:-1].ljust(header_end - 1) + "\n" if len(header) <= header_end else header
    path.write_bytes(header.encode("latin1") + raw[header_end:])
    write_manifest(params, signing_key=keys[0])
    with pytest.raises(BundleError, match="header claims shape"):
        load_snapshot(params, load_public_key(keys[1]))
    r = subprocess.run([sys.executable, "-m", "agent.cli", "bridge", "--parameters", str(params),
                        "--public-key", str(keys[1]), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "header claims shape" in r.stderr
    assert "Traceback" not in r.stderr


def _make_read_only(root) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            p.chmod(0o444)


def test_store_versions_are_memory_mapped_and_serve_the_same(params, keys):
    """In a version the store installed (map_files) read-only files are mapped (no private copy);
    writable files, and any file outside the store (a seed), are read; the answers agree."""
    import mmap

    from agent.layout import GUEST_ARRAYS, is_edge_file

    key = load_public_key(keys[1])
    copied = verify_parameters(params, key, map_files=True)
    assert copied.mapped == []  # writable files are never mapped
    copied_snap = load_snapshot(params, key)
    _make_read_only(params)
    assert verify_parameters(params, key).mapped == []  # a read-only seed: still read (root may rewrite it)
    mapped = verify_parameters(params, key, map_files=True)
    edge = sorted(rel for rel in mapped.files if is_edge_file(rel))
    assert mapped.mapped == edge and edge  # every edge file, nothing server-only
    co = mapped.array(GUEST_ARRAYS["co_neighbors"])
    assert not co.flags.writeable and not co.flags.owndata
    base = co
    while isinstance(base, np.ndarray):  # the array's memory is the mapping itself
        base = base.base
    assert isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)
    snap = load_snapshot(params, key, map_files=True)
    for item in snap.guest.item_ids_[:20].tolist():
        req = RecommendRequest(cart=(item,), top_k=10)
        assert snap.recommend(req).ids == copied_snap.recommend(req).ids


def _resident_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, current = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and not head[0].endswith(":"):  # a mapping's first line: address perms offset dev inode [path]
            current = len(head) > 5 and head[5] == str(path)
        elif current and head[0] == "Rss:":
            total += int(head[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
def test_a_mapped_version_counts_only_the_pages_serving_touches(tmp_path, keys):
    """Verifying hashes every byte and loading checks every index, through the mapping; those pages are
    let go after loading (they stay in the page cache), so RSS grows only with what requests read."""
    from agent.layout import GUEST_ARRAYS, GUEST_CO_PARTNERS

    # tables well above the kernel's fault-around (16 pages mapped per fault)
    store = make_store(n_products=4000, n_rows=20000, n_users=20, n_families=40)
    params = tmp_path / "parameters"
    write_parameters(params, train_guest_model(store.catalog, store.purchases), signing_key=keys[0])
    _make_read_only(params)
    snap = load_snapshot(params, load_public_key(keys[1]), map_files=True)
    co, sim, names = (params / GUEST_ARRAYS[n] for n in ("co_neighbors", "sim_neighbors", "item_names"))
    partners = params / GUEST_CO_PARTNERS["items"]
    assert sim.stat().st_size >= 256 * 1024 and names.stat().st_size > 4096  # fault-around maps 64 kB
    assert _resident_kb(co) == _resident_kb(sim) == _resident_kb(names) == _resident_kb(partners) == 0
    # a product nobody bought: no co-purchase partners, so the answer falls back to its tag neighbours
    g = snap.guest
    unbought = np.flatnonzero(np.diff(g.co_.indptr) == 0)
    if g.baskets_ is not None:
        unbought = unbought[np.diff(g.baskets_.postings_indptr)[unbought] == 0]
    assert unbought.size
    item = g.item_ids_[unbought[len(unbought) // 2]]
    assert snap.recommend(RecommendRequest(cart=(item,), top_k=10)).ids
    assert 0 < _resident_kb(sim) < sim.stat().st_size // 1024  # the cart's rows, not the table
    assert _resident_kb(names) == 0
    # a bought product: its co-purchase partners are read from the unpadded table, served where it is mapped;
    # the padded pair (for older agents) is never read
    bought = g.item_ids_[int(np.argmax(np.diff(g.co_.indptr)))]
    assert snap.recommend(RecommendRequest(cart=(bought,), top_k=10)).ids
    assert _resident_kb(partners) > 0 and _resident_kb(co) == 0


def test_a_mapped_file_that_does_not_match_its_hash_is_refused(params, keys):
    from agent.layout import GUEST_ARRAYS

    path = params / GUEST_ARRAYS["co_scores"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    _make_read_only(params)
    with pytest.raises(BundleError, match="sha256 does not match"):
        verify_parameters(params, load_public_key(keys[1]), map_files=True)


def test_a_mapped_file_of_the_wrong_size_is_refused(params, keys):
    from agent.layout import GUEST_ARRAYS

    path = params / GUEST_ARRAYS["popular"]
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    _make_read_only(params)
    with pytest.raises(BundleError, match="size"):
        verify_parameters(params, load_public_key(keys[1]), map_files=True)


def test_the_agent_maps_only_versions_its_store_installed(tmp_path, keys, guest_model, caplog):
    """basket-agent's loader: versions/* (written 0444 by the store) mapped, the seed read."""
    import shutil

    from agent.cli import make_loader
    from agent.config import parse_config
    from agent.store import VersionStore

    root = tmp_path / "parameters"
    write_parameters(root, guest_model, signing_key=keys[0])
    version = json.loads((root / "manifest.json").read_text())["version"]
    installed = root / "versions" / version
    shutil.copytree(root, installed, ignore=shutil.ignore_patterns("versions"))
    _make_read_only(installed)
    _make_read_only(root / "guest_model")  # even a read-only seed is not mapped
    cfg = parse_config({"broker": {"host": "localhost"}, "agent_id": "t", "parameters": str(root),
                        "public_key": str(keys[1])})
    store = VersionStore(root)
    assert store.owns(installed) and not store.owns(root)
    load = make_loader(cfg)
    mapped = {}
    for path in (installed, root):
        caplog.clear()
        with caplog.at_level("INFO", logger="agent.registry"):
            assert load(path).recommend(RecommendRequest(cart=("x",))).ids  # both serve
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded models"))
        mapped[path] = int(line.rsplit(", ", 1)[1].split()[0])
    assert mapped[installed] > 0 and mapped[root] == 0

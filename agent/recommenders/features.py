"""Feature encoding shared by member-model training and the edge.

Training (``retrain_server.member``) and serving (``agent.recommenders.member``)
must turn a member's gender, age and context items into exactly the same
integers; this module is the one place that says how.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from . import native

__all__ = ["CONTEXT_LENGTH", "AGE_EDGES", "N_AGE_BUCKETS", "N_GENDERS", "PAD", "OOV",
           "gender_index", "age_bucket", "encode_context", "build_index", "shared_index", "IdIndex",
           "index_rows"]

#: Context items fed to the user tower (the seed's padding length).
CONTEXT_LENGTH = 10
#: Age bucket boundaries; bucket 0 is "unknown", 1 is "< 20", ..., last is ">= 70".
AGE_EDGES = np.array([20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70])
N_AGE_BUCKETS = len(AGE_EDGES) + 2
#: Gender index: 0 unknown, 1 male (contract value 0), 2 female (contract value 1).
N_GENDERS = 3
#: Context index 0 is padding (masked out), 1 is an out-of-vocabulary product.
PAD, OOV = 0, 1


def gender_index(gender: int | None) -> int:
    """Contract gender (0 male, 1 female, None/-1 unknown) -> 0..2."""
    return 0 if gender is None or gender < 0 else int(gender) + 1


def age_bucket(age: int | None) -> int:
    """Age in years (None/-1 unknown) -> bucket 0..N_AGE_BUCKETS-1."""
    if age is None or age < 0:
        return 0
    return 1 + int(np.searchsorted(AGE_EDGES, age, side="right"))


def build_index(vocabulary: Sequence[str]) -> dict[str, int]:
    """id -> row for a lookup array as stored in ``*_lookup.npy``."""
    return {v: i for i, v in enumerate(vocabulary)}


class _Index(dict):
    """A read-only id -> row dict that :func:`shared_index` can hold weakly (several models read it)."""

    __slots__ = ("__weakref__",)

    def _read_only(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a shared id index is read-only")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = __ior__ = _read_only  # type: ignore


_SHARED: weakref.WeakValueDictionary[bytes, _Index] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


class IdIndex(Mapping[str, int]):
    """id -> row of a lookup array, read-only, without a dict: the compiled kernels' hash table over
    the array itself (``id_table``: each id's str hash and an open-addressing table of rows).

    A dict of 50,000 product ids cost 4.6 MB (the key strings and the int objects); this costs
    0.9 MB (a hash and two to four slots a row), and the ids stay in the (memory-mapped) array.
    Lookups use the hash a str caches, so :meth:`get` costs about what ``dict.get`` does;
    :meth:`rows` looks up many at once. Equal ids keep the last row, as :func:`build_index` does.
    """

    __slots__ = ("_ids", "_hashes", "_slots", "_kernels", "_len", "__weakref__")

    def __init__(self, ids: np.ndarray, kernels: Any) -> None:
        self._ids = ids
        self._kernels = kernels  # kept: the numpy fallback switched on later (tests) must not break it
        self._hashes, self._slots = kernels.id_table(ids)
        self._len = int(np.count_nonzero(self._slots >= 0))  # distinct ids

    def get(self, key: object, default: Any = None) -> Any:
        row = self._kernels.id_find(self._ids, self._hashes, self._slots, key)
        return default if row < 0 else row

    def __getitem__(self, key: str) -> int:
        row = self._kernels.id_find(self._ids, self._hashes, self._slots, key)
        if row < 0:
            raise KeyError(key)
        return row

    def __contains__(self, key: object) -> bool:
        return self._kernels.id_find(self._ids, self._hashes, self._slots, key) >= 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[str]:  # rare (a smoke test, benchmarks): the ids' own strings
        return iter(dict.fromkeys(self._ids.tolist()))

    def rows(self, keys: Iterable[str], known_only: bool = True) -> np.ndarray:
        """int64 rows of ``keys`` in order: unknown ones left out, or -1 with ``known_only=False``."""
        return self._kernels.id_find_many(self._ids, self._hashes, self._slots, keys, known_only)


def index_rows(index: Mapping[str, int], keys: Iterable[str], known_only: bool = True) -> np.ndarray:
    """int64 rows of ``keys`` in ``index`` (an :class:`IdIndex` or a dict), unknown ones left out (or -1)."""
    if isinstance(index, IdIndex):
        return index.rows(keys, known_only)
    get = index.get
    if known_only:
        return np.fromiter((i for i in map(get, keys) if i is not None), dtype=np.int64)
    return np.fromiter((-1 if i is None else i for i in map(get, keys)), dtype=np.int64)


def shared_index(vocabulary: np.ndarray) -> Mapping[str, int]:
    """The id -> row index of a lookup array: an :class:`IdIndex` with the compiled kernels, else
    :func:`build_index`'s dict, the same one for every live model built from an equal array.

    A 50,000-product dict costs 4.6 MB (the dict and its key strings). Tonight's
    models usually keep yesterday's catalogue and members, so a hot swap reuses
    the serving version's dict instead of holding two; it is dropped when no
    model uses it any more. Keyed by a hash of the array's bytes, dtype and shape.
    (An :class:`IdIndex` costs 0.9 MB and reads the array it was built on: each
    model has its own.)
    """
    a = np.ascontiguousarray(vocabulary)
    kernels = native.KERNELS
    if kernels is not None and a.ndim == 1 and a.dtype.kind == "U" and a.dtype.isnative:
        return IdIndex(a, kernels)
    if a.ndim != 1 or a.dtype.kind not in "US":  # only text lookups are shared (a hash of pointers is not a key)
        return build_index(a.tolist())
    h = hashlib.blake2b(a, digest_size=20)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    key = h.digest()
    with _SHARED_LOCK:
        index = _SHARED.get(key)
        if index is None:
            index = _SHARED[key] = _Index((v, i) for i, v in enumerate(a.tolist()))
    return index


def encode_context(items: Iterable[str], index: Mapping[str, int], offset: int = 0) -> np.ndarray:
    """Most recent CONTEXT_LENGTH items -> int64 indices, left-aligned, PAD-filled.

    ``index`` maps product id -> context index (see ``context_lookup.npy``:
    position 0 is padding, 1 is OOV), or, with ``offset=2``, product id -> item
    index (``context_lookup`` is ``["", "[UNK]"] + item_lookup``). Unknown ids
    become OOV.
    """
    items = list(items)[-CONTEXT_LENGTH:]
    out = np.zeros(CONTEXT_LENGTH, dtype=np.int64)
    for k, pid in enumerate(items):
        i = index.get(pid)
        out[k] = OOV if i is None else i + offset
    return out

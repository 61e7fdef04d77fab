"""The optional compiled kernels (``_native.c``) and the per-thread scratch tables they use.

A request used to be a few dozen numpy calls on arrays of tens to hundreds of
values, each costing 1-3 µs of numpy's own overhead. The kernels do each step
in one call, on the same arrays: the session-kNN votes
(:meth:`.guest.RecentBaskets.scores`), the guest ranking, the co-purchase
sums, the member's own baskets, the reranker's features
(:func:`.rerank.candidate_features`) and the best k of the blend. The numpy
code stays the definition and the fallback: the kernels are built at install
when a C compiler and Python's headers are there (``setup.py``, optional), and
``SMART_BASKET_NATIVE=0`` switches them off. tests/test_native.py checks both
give the same answers.
"""

from __future__ import annotations

import os
import threading
from types import ModuleType

import numpy as np

__all__ = ["KERNELS", "disable", "status", "scratch"]


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("SMART_BASKET_NATIVE", "1").strip() == "0":
        return None, "SMART_BASKET_NATIVE=0"
    try:
        from . import _native
    except ImportError as e:
        return None, f"not built: {e}"
    return _native, ""


#: the compiled module, or None (numpy); read at each call, so tests can switch it
KERNELS, _why_not = _load()


def disable(reason: str) -> None:
    """Serve with numpy from now on (a build that does not match this code)."""
    global KERNELS, _why_not
    KERNELS, _why_not = None, reason


def status() -> str:
    """What serves the hot path, for the start-up log."""
    return "compiled kernels" if KERNELS is not None else f"numpy ({_why_not})"


_LOCAL = threading.local()


def scratch(name: str, size: int, fill: int) -> np.ndarray:
    """This thread's int32 table ``name`` of at least ``size`` entries, all ``fill`` between calls (the
    kernels restore every entry they change, also when they raise)."""
    table = getattr(_LOCAL, name, None)
    if table is None or table.size < size:
        table = np.full(max(size, 1), fill, np.int32)
        setattr(_LOCAL, name, table)
    return table

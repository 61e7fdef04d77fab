"""Model memory: copied vs memory-mapped parameters, one and several processes, and a swap.

Loads the 50,000-product guest + member parameters the way the agent does
(``agent.registry.load_snapshot``) in separate processes and reads
``/proc/<pid>/smaps_rollup``:

* **copied**: the parameters' files are writable, so :mod:`agent.bundle` reads them
  into private memory (what every version loaded before memory mapping);
* **mapped**: the same files without write permission, loaded as a version the agent's
  store installed (``map_files=True``), so they are mapped and served from the page cache.

For each mode, ``--processes`` processes load the same directory, each answers
``--requests`` guest and member requests (touching the pages a store's traffic
would), then each loads a *second* version (a copy of the directory: a swap) and
keeps both, as the agent does for the moment of a swap. RSS counts every resident
page a process maps; PSS splits shared pages between the processes sharing them,
so PSS summed over processes is what the machine really spends.

Run: ``.venv/bin/python bench/bench_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, large_parameters, print_table, read_only_copy, write_json

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import numpy as np
from agent.registry import load_snapshot
from agent.recommenders.base import RecommendRequest

def rollup():
    out = {{}}
    for line in open("/proc/self/smaps_rollup"):
        parts = line.split()
        if parts[0] in ("Rss:", "Pss:", "Pss_Anon:", "Pss_File:", "Anonymous:"):
            out[parts[0][:-1]] = int(parts[1]) / 1024
    return out

first, second, n, mapped = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "mapped"
base = rollup()
snap = load_snapshot(first, None, allow_unsigned=True, map_files=mapped)
ids = snap.guest.item_ids_
users = list(snap.member.user_index_)[:500] if snap.member is not None else []
rng = np.random.default_rng(os.getpid())
def traffic(s):
    for i in range(n):
        cart = tuple(ids[rng.integers(len(ids), size=10)].tolist())
        s.recommend(RecommendRequest(cart=cart, top_k=10))
        if users:
            s.recommend(RecommendRequest(cart=cart, top_k=10, user_id=users[i % len(users)]))
traffic(snap)
loaded = rollup()
snap2 = load_snapshot(second, None, allow_unsigned=True, map_files=mapped)  # the swap: both held for a moment
traffic(snap2)
swapped = rollup()
print(json.dumps({{"base": base, "loaded": loaded, "swapped": swapped}}), flush=True)
sys.stdin.read()  # stay alive until the parent has read every process
"""


def copy_of(src: Path, dst: Path, writable: bool) -> Path:
    """A second directory of the same files: writable (read into memory) or read-only (mapped)."""
    if not writable:
        return read_only_copy(src, dst)
    shutil.copytree(src, dst)
    return dst


def run_mode(mode: str, first: Path, second: Path, processes: int, requests: int) -> list[dict]:
    code = CHILD.format(root=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(first), str(second), str(requests), mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    try:
        results = [json.loads(p.stdout.readline()) for p in procs]  # all alive at this point
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(60)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    params = large_parameters(member=True)
    rows, doc = [], {"processes": args.processes, "requests": args.requests, "params": params.name}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for mode in ("copied", "mapped"):
            writable = mode == "copied"
            first = copy_of(params, Path(tmp) / f"{mode}-v1", writable)
            second = copy_of(params, Path(tmp) / f"{mode}-v2", writable)
            # the page cache starts cold for nobody: read both once
            for d in (first, second):
                for p in d.rglob("*.npy"):
                    p.read_bytes()
            t0 = time.perf_counter()
            res = run_mode(mode, first, second, args.processes, args.requests)
            one = res[0]
            pss_loaded = sum(r["loaded"]["Pss"] for r in res)
            pss_swapped = sum(r["swapped"]["Pss"] for r in res)
            row = {"mode": mode,
                   "rss_interpreter_mb": round(one["base"]["Rss"], 1),
                   "rss_loaded_mb": round(one["loaded"]["Rss"], 1),
                   "anon_loaded_mb": round(one["loaded"]["Anonymous"], 1),
                   "rss_two_versions_mb": round(one["swapped"]["Rss"], 1),
                   "anon_two_versions_mb": round(one["swapped"]["Anonymous"], 1),
                   "pss_sum_loaded_mb": round(pss_loaded, 1),
                   "pss_sum_two_versions_mb": round(pss_swapped, 1),
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            for d in (first, second):
                for p in d.rglob("*"):
                    if p.is_file():
                        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    doc["rows"] = rows
    print_table(f"model memory, 50,000 products, guest + member, {args.processes} processes "
                f"({args.requests} guest + {args.requests} member requests each)",
                ["mode", "RSS python+libs", "RSS loaded", "anon loaded", "RSS 2 versions", "anon 2 versions",
                 f"PSS sum x{args.processes}", f"PSS sum x{args.processes}, 2 versions"],
                [[r["mode"], r["rss_interpreter_mb"], r["rss_loaded_mb"], r["anon_loaded_mb"],
                  r["rss_two_versions_mb"], r["anon_two_versions_mb"], r["pss_sum_loaded_mb"],
                  r["pss_sum_two_versions_mb"]] for r in rows])
    print(f"wrote {write_json('memory', doc)}")


if __name__ == "__main__":
    main()

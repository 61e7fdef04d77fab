"""The nightly loop on the 50,000-product synthetic store, from PostgreSQL to an agent's hot swap.

Everything real and private to this run: a throwaway PostgreSQL
(``scripts/postgres.py``), a private Mosquitto (``scripts/brokers.py``), the
bundle server (``retrain_server.serve.BundleServer``, in this process) and, for
the agent side, ``basket-agent run`` as its own process.

1. ``retrain-server synth --large`` (50,000 products, ~1 M purchase rows), then
   ``load_files`` of it into PostgreSQL (COPY): seconds and rows/s;
2. the first nightly run for the last loaded day: the initial, full training
   (member model ``--epochs`` epochs, default 1; ``--no-member``: guest only);
3. a new day of ~50,000 item rows (sessions of the store resampled, with new
   session ids and times on the day after the last one), loaded with
   ``load_files`` from a JSONL written here; then the measured run: the nightly
   job for that day (fine-tuning from the checkpoint), each step's seconds from
   ``NightlyResult.timings``, the bundle size and whether it was published
   (goal: total <= 600 s);
4. the agent (``--update-jitter-s 0``) started on the first version: time from
   publishing the new version's update message to the agent's retained status
   showing ``last_update.result == "applied"`` for it (goal <= 2 s), then
   ``--swaps`` more swaps alternating the two parameter sets, each re-signed
   under a later ``created_at`` (so each is a new version: download, verify,
   load, swap), with the agent's VmRSS after each.

Prints tables and writes ``bench/results/nightly.json`` (``nightly-small.json``
with ``--small``: a 5,000-product store for a quick check; ``--gate-tolerance``,
``--agent-env`` and ``--profile`` add a suffix, so they never overwrite it).
With the default gate (tolerance 0.02) the measured run may be refused and then
packs and publishes nothing: ``--gate-tolerance 1`` makes it publish whatever the
gate measures, to time the pack/publish steps and the agent's swap to it.
Run: ``.venv/bin/python bench/bench_nightly.py [--small] [--workdir DIR] [--keep]``.
"""

from __future__ import annotations

import os

# The nightly job runs as a server process (systemd/retrain-nightly.service), which does not
# pin BLAS to one thread as the agent does; bench/common.py would (setdefault) without this.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, str(os.cpu_count() or 1))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import argparse
import cProfile
import io
import json
import logging
import pstats
import queue
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import uuid
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, print_table, stop_process, write_json  # (puts the repository on sys.path)

_LOG = logging.getLogger("bench_nightly")

STORE_TZ = "Asia/Seoul"
STEPS = ("read_s", "count_s", "guest_refit_s", "member_train_s", "export_s", "gate_s", "pack_s", "publish_s",
         "total_s")
GOALS = {"nightly_total_s": 600.0, "update_applied_s": 2.0}
AGENT_ID = "bench-nightly"


# -- small helpers -----------------------------------------------------------------------------
def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def proc_status_mb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_self_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class LogCapture(logging.Handler):
    """Keeps the records of some loggers (e.g. load_files' own "parsing" time)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def code_version() -> dict[str, Any]:
    """The commit and the uncommitted changes of the code measured (others edit the tree meanwhile)."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "agent", "retrain_server", "scripts")
    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "uncommitted": [line[3:] for line in changed.splitlines()]}


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


# -- the store ---------------------------------------------------------------------------------
def store_files(data_dir: Path, small: bool) -> dict[str, Any]:
    """products.csv + purchase_history.jsonl via the CLI (reused when already in ``data_dir``)."""
    prod, purch = data_dir / "products.csv", data_dir / "purchase_history.jsonl"
    if prod.exists() and purch.exists():
        return {"products_csv": str(prod), "purchases_jsonl": str(purch), "synth_s": None, "reused": True}
    partial = data_dir.with_name(data_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cli = Path(sys.executable).with_name("retrain-server")
    if small:  # the --large proportions at a tenth: 5,000 products, 100,000 rows, 500 members
        cmd = [sys.executable, "-m", "retrain_server.synth", "--out", str(partial), "--products", "5000",
               "--rows", "100000", "--users", "500"]
    elif cli.exists():
        cmd = [str(cli), "synth", "--out", str(partial), "--large"]
    else:
        cmd = [sys.executable, "-m", "retrain_server.synth", "--out", str(partial), "--large"]
    print(f"$ {' '.join(cmd)}", file=sys.stderr)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    synth_s = round(time.perf_counter() - t0, 2)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(data_dir, ignore_errors=True)
    partial.rename(data_dir)
    return {"products_csv": str(prod), "purchases_jsonl": str(purch), "synth_s": synth_s, "reused": False,
            "command": " ".join(cmd)}


def write_new_day(purchases_jsonl: Path, day: date, target_rows: int, out: Path, seed: int = 11) -> dict[str, Any]:
    """Whole sessions of the store, resampled, with new ids and times spread over ``day`` (store time)."""
    from zoneinfo import ZoneInfo

    from retrain_server.data import PurchaseLog, load_purchases, write_purchases

    log = load_purchases(purchases_jsonl)
    uniq, inverse, counts = np.unique(log.session_ids, return_inverse=True, return_counts=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    n_take = int(np.searchsorted(np.cumsum(counts[order]), target_rows) + 1)
    n_take = min(n_take, len(uniq))
    chosen = order[:n_take]  # session index -> its rank k on the new day
    rank = np.full(len(uniq), -1, dtype=np.int64)
    rank[chosen] = np.arange(n_take)
    rows = rank[inverse] >= 0
    sub = log.select(rows)
    k = rank[inverse[rows]]
    first_ts = np.full(len(uniq), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_ts, inverse, log.timestamps)
    offset = np.clip(sub.timestamps - first_ts[inverse[rows]], 0, 59)  # items of a basket: seconds apart
    start = int(datetime.combine(day, datetime.min.time(), ZoneInfo(STORE_TZ)).timestamp())
    spacing = (86_400 - 120) / n_take
    ts = start + 30 + (k * spacing).astype(np.int64) + offset
    tag = day.strftime("%Y%m%d")
    new = PurchaseLog.from_columns(session_ids=np.char.add(f"d{tag}-", k.astype(str)), user_ids=sub.user_ids,
                                   product_ids=sub.product_ids, genders=sub.genders, ages=sub.ages, timestamps=ts)
    write_purchases(out, new)
    return {"day": day.isoformat(), "sessions": n_take, "item_rows": len(new),
            "member_rows": int((new.user_ids != "").sum())}


# -- MQTT ----------------------------------------------------------------------------------------
def mqtt_client(port: int, subscribe: str | None = None, on_message=None):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-nightly-{uuid.uuid4().hex[:8]}",
                    protocol=paho.MQTTv5)
    ready = threading.Event()

    def on_connect(client, userdata, flags, rc, props) -> None:
        if subscribe:
            client.subscribe(subscribe, qos=1)
        else:
            ready.set()

    c.on_connect = on_connect
    c.on_subscribe = lambda *a: ready.set()
    if on_message is not None:
        c.on_message = on_message
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    if not ready.wait(10):
        raise RuntimeError("MQTT client did not connect")
    return c


def close_client(c) -> None:
    if c is not None:
        c.loop_stop()
        c.disconnect()


def retained_payload(port: int, topic: str, timeout: float = 5.0) -> bytes | None:
    got: queue.Queue = queue.Queue()
    c = mqtt_client(port, topic, lambda cl, u, m: got.put(m.payload))
    try:
        return got.get(timeout=timeout)
    except queue.Empty:
        return None
    finally:
        close_client(c)


def publish_wait(c, topic: str, payload: bytes, retain: bool = True) -> None:
    info = c.publish(topic, payload, qos=1, retain=retain)
    info.wait_for_publish(10)


# -- the nightly part ---------------------------------------------------------------------------
def run_nightly(cfg: Any, day: date, profile: Path | None = None,
                full: bool | None = None) -> tuple[Any, dict[str, Any]]:
    from retrain_server.nightly import NightlyJob

    load0, cpu0, t0 = loadavg(), cpu_self_s(), time.perf_counter()
    job = NightlyJob(cfg)
    if profile is not None:
        prof = cProfile.Profile()
        result = prof.runcall(job.run, day, full=full)
        prof.dump_stats(profile)
    else:
        result = job.run(day, full=full)
    wall = time.perf_counter() - t0
    cpu = cpu_self_s() - cpu0
    b = result.bundle
    row = {"day": day.isoformat(), "days": [d.isoformat() for d in result.days], "version": result.version,
           "published": result.published, "reason": result.reason,
           "timings": {k: result.timings.get(k) for k in STEPS},
           "bundle_mb": round(b.bytes / 1e6, 2) if b is not None else None,
           "bundle_files": b.files if b is not None else None,
           "metrics": {k: v for k, v in result.metrics.items() if not isinstance(v, (dict, list))},
           "wall_s": round(wall, 2), "bench_process_cpu_s": round(cpu, 1),
           "cpu_per_wall": round(cpu / wall, 2) if wall else None,
           "loadavg_1m_before": load0, "loadavg_1m_after": loadavg()}
    return result, row


def timed_load(dsn: str, products_csv: Path, purchases_jsonl: Path) -> dict[str, Any]:
    from retrain_server.sources import postgres

    cap = LogCapture()
    lg = logging.getLogger("retrain_server.sources.postgres")
    lg.addHandler(cap)
    try:
        with postgres.connect(dsn) as conn:
            postgres.migrate(conn)
            t0 = time.perf_counter()
            counts = postgres.load_files(conn, products_csv, purchases_jsonl)
            secs = time.perf_counter() - t0
    finally:
        lg.removeHandler(cap)
    parse_s = None
    for rec in cap.records:
        if rec.getMessage().startswith("loaded ") and "parsing" in rec.getMessage():
            parse_s = round(float(rec.args[-1]), 2)
    rows = counts["item_rows"]
    return {"seconds": round(secs, 2), "parse_s": parse_s, "item_rows": rows, "rows_per_s": round(rows / secs),
            "sessions": counts["sessions"], "sessions_inserted": counts["sessions_inserted"],
            "products": counts["products"], "members": counts["members"]}


# -- the agent part -----------------------------------------------------------------------------
class StatusWatch:
    """The agent's retained status messages, with their receive time."""

    def __init__(self, port: int, topic: str) -> None:
        self.q: queue.Queue = queue.Queue()
        self.client = mqtt_client(port, topic, self._on)

    def _on(self, client, userdata, msg) -> None:
        t = time.perf_counter()
        try:
            doc = json.loads(msg.payload) if msg.payload else {}
        except ValueError:
            doc = {}
        self.q.put((t, doc))

    def drain(self) -> None:
        while True:
            try:
                self.q.get_nowait()
            except queue.Empty:
                return

    def wait(self, pred, timeout: float) -> tuple[float, dict] | None:
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            try:
                t, doc = self.q.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if pred(doc):
                return t, doc

    def close(self) -> None:
        close_client(self.client)


def extract_bundle(bundle: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(bundle) as tar:
        for m in tar.getmembers():
            if not m.isfile() or m.name.startswith("/") or ".." in m.name.split("/"):
                raise RuntimeError(f"unexpected member {m.name!r} in {bundle}")
            out = dest / m.name
            out.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst)


def resign_and_pack(src: Path, work: Path, bundle_dir: Path, key: Path, created_at: datetime) -> Any:
    """The same parameters under a new version: links, a new signed manifest, pack_bundle."""
    from agent.bundle import MANIFEST, SIGNATURE
    from retrain_server.bundles import pack_bundle
    from retrain_server.export import write_manifest

    d = work / f"resign-{uuid.uuid4().hex[:8]}"
    for p in src.rglob("*"):
        if p.is_file() and p.name not in (MANIFEST, SIGNATURE):
            dst = d / p.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, dst)
    doc = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
    write_manifest(d, metrics=doc.get("metrics"), models=doc.get("models"), signing_key=key, created_at=created_at)
    try:
        return pack_bundle(d, bundle_dir, key)
    finally:
        shutil.rmtree(d, ignore_errors=True)


_AGENT_LINE = re.compile(r"update (?P<v>\S+): (?:downloaded (?P<bytes>\d+) bytes in (?P<dl>\d+) ms|"
                         r"unpacked \d+ bytes in (?P<up>\d+) ms|"
                         r"signature, hashes, load and smoke test passed in (?P<load>\d+) ms)")


def agent_step_ms(log_text: str) -> dict[str, dict[str, float]]:
    """Per version: download / unpack / verify+load ms, from the agent's own INFO lines."""
    out: dict[str, dict[str, float]] = {}
    for m in _AGENT_LINE.finditer(log_text):
        d = out.setdefault(m.group("v"), {})
        for k in ("dl", "up", "load"):
            if m.group(k) is not None:
                d[{"dl": "download_ms", "up": "unpack_ms", "load": "verify_load_ms"}[k]] = float(m.group(k))
    return out


def agent_part(args: argparse.Namespace, run: Path, broker_port: int, prefix: str, public_url: str,
               bundle_dir: Path, key: Path, pub: Path, v1_bundle: Path, v2: Any) -> dict[str, Any]:
    """Steps 4: first swap to the nightly's bundle, then ``args.swaps`` alternating re-signed ones."""
    try:
        from agent import store as _store  # noqa: F401
        from agent import updater as _updater  # noqa: F401
        from agent.cli import make_updater  # noqa: F401
        from agent.topics import Topics
    except Exception as exc:  # another engineer's work in progress
        return {"skipped": f"agent updater not importable: {type(exc).__name__}: {exc}"}

    topics = Topics(prefix)
    agent_dir = run / "agent"
    src_v1, src_v2 = run / "sources" / "v1", run / "sources" / "v2"
    extract_bundle(v1_bundle, agent_dir / "parameters")
    extract_bundle(v1_bundle, src_v1)
    v2_bundle = bundle_dir / f"{v2.version}.tar.gz" if v2 is not None and v2.published else None
    if v2_bundle is not None:
        extract_bundle(v2_bundle, src_v2)

    # The nightly's own message for the new version (retained), then cleared so the agent
    # starts on the first version and the publish below is what it reacts to.
    announced = retained_payload(broker_port, topics.models_updated)
    c = mqtt_client(broker_port)
    try:
        publish_wait(c, topics.models_updated, b"")
        return _agent_swaps(args, run, agent_dir, broker_port, topics, public_url, bundle_dir, key, pub,
                            src_v1, src_v2, v2, v2_bundle, announced, c)
    finally:
        close_client(c)


def _agent_swaps(args: argparse.Namespace, run: Path, agent_dir: Path, broker_port: int, topics: Any,
                 public_url: str, bundle_dir: Path, key: Path, pub: Path, src_v1: Path, src_v2: Path, v2: Any,
                 v2_bundle: Path | None, announced: bytes | None, c: Any) -> dict[str, Any]:
    from retrain_server.publish import UpdateMessage, bundle_url

    out: dict[str, Any] = {"swaps_requested": args.swaps}

    # Re-signed bundles, prepared before the agent starts (they are what the server would publish).
    t0 = time.perf_counter()
    base = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(minutes=5)
    prepared: list[tuple[str, bytes, int, str]] = []
    for i in range(args.swaps):
        src = src_v1 if (v2_bundle is None or i % 2 == 0) else src_v2
        info = resign_and_pack(src, run, bundle_dir, key, base + timedelta(minutes=i + 1))
        msg = UpdateMessage(version=info.version, url=bundle_url(public_url, info.version), sha256=info.sha256,
                            created_at=info.created_at, metrics={}, size=info.bytes)
        prepared.append((info.version, msg.to_json(), info.bytes, "v1" if src is src_v1 else "v2"))
    prep_s = time.perf_counter() - t0
    out["resign_pack_s_each"] = round(prep_s / max(1, args.swaps), 2)
    print(f"[agent] {args.swaps} re-signed bundles packed in {prep_s:.0f} s", file=sys.stderr)

    log_path = agent_dir / "agent.log"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                              "MKL_NUM_THREADS")}
    env.update(e.split("=", 1) for e in args.agent_env)
    cmd = [sys.executable, "-m", "agent.cli", "run", "--broker", f"127.0.0.1:{broker_port}", "--prefix", topics.prefix,
           "--agent-id", AGENT_ID, "--parameters", str(agent_dir / "parameters"), "--public-key", str(pub),
           "--http-port", "0", "--update-jitter-s", "0", "--log-level", "INFO"]
    out["agent_command"] = "basket-agent " + " ".join(cmd[3:])
    watch = StatusWatch(broker_port, topics.status(AGENT_ID))
    proc = None
    try:
        t0 = time.perf_counter()
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=logf, env=env)
        got = None
        deadline = time.perf_counter() + 180
        while got is None and time.perf_counter() < deadline and proc.poll() is None:
            got = watch.wait(lambda d: d.get("state") == "online", 1.0)
        if got is None:
            tail = log_path.read_text(errors="replace")[-2000:]
            return {**out, "skipped": f"agent did not come online (exit {proc.poll()}): {tail}"}
        pid = proc.pid
        out["startup_s"] = round(got[0] - t0, 2)
        time.sleep(1.0)
        out["rss_start_mb"] = proc_status_mb(pid, "VmRSS")
        out["rss_start_anon_mb"] = proc_status_mb(pid, "RssAnon")
        out["rss_start_file_mb"] = proc_status_mb(pid, "RssFile")
        first_version = (got[1].get("models") or {}).get("guest")
        out["serving_at_start"] = got[1].get("models")

        def swap(version: str, payload: bytes, timeout: float = 120.0) -> dict[str, Any]:
            watch.drain()
            t_pub = time.perf_counter()
            c.publish(topics.models_updated, payload, qos=1, retain=True)

            def done(d: dict) -> bool:
                lu = d.get("last_update") or {}
                return lu.get("version") == version and lu.get("result") in ("applied", "rejected")

            res = watch.wait(done, timeout)
            if res is None:
                return {"version": version, "result": "timeout", "seconds": None}
            t, doc = res
            lu = doc["last_update"]
            return {"version": version, "result": lu["result"], "reason": lu.get("reason"),
                    "seconds": round(t - t_pub, 3), "models": doc.get("models")}

        # 4a. the nightly's new version, with the nightly's own message
        if v2_bundle is not None and announced:
            first = swap(v2.version, announced)
            time.sleep(0.5)
            first["rss_mb"] = proc_status_mb(pid, "VmRSS")
            out["first_update"] = first
            print(f"[agent] nightly version {v2.version}: {first}", file=sys.stderr)
            if first["result"] != "applied":
                out["skipped"] = f"the agent did not apply the nightly's bundle: {first}"
                return out
        else:
            out["first_update"] = {"skipped": "the measured run published no bundle" if v2_bundle is None
                                   else "no retained update message found"}
        # 4b. alternating re-signed versions
        swaps: list[dict[str, Any]] = []
        for i, (version, payload, size, which) in enumerate(prepared):
            r = swap(version, payload)
            time.sleep(0.5)  # let the old snapshot go; then read the resident set
            r.update(i=i + 1, params=which, bundle_bytes=size, rss_mb=proc_status_mb(pid, "VmRSS"),
                     rss_anon_mb=proc_status_mb(pid, "RssAnon"))
            swaps.append(r)
            print(f"[agent] swap {i + 1}/{len(prepared)}: {r['result']} in {r['seconds']} s, "
                  f"RSS {r['rss_mb']} MB", file=sys.stderr)
            if r["result"] != "applied":
                break
        out["rss_peak_mb"] = proc_status_mb(pid, "VmHWM")
        out["rss_end_file_mb"] = proc_status_mb(pid, "RssFile")
        steps = agent_step_ms(log_path.read_text(errors="replace"))
        for r in [out.get("first_update", {}), *swaps]:
            if r.get("version") in steps:
                r["agent_ms"] = steps[r["version"]]
        out["swaps"] = swaps
        out["first_version"] = first_version
        return out
    finally:
        stop_process(proc)
        watch.close()


def summarize_agent(a: dict[str, Any]) -> dict[str, Any]:
    swaps = [s for s in a.get("swaps", []) if s.get("result") == "applied"]
    if not swaps:
        return {}
    secs = np.array([s["seconds"] for s in swaps])
    rss = np.array([s["rss_mb"] for s in swaps], dtype=float)
    n = len(rss)
    w = max(1, min(10, n // 3))
    slope = float(np.polyfit(np.arange(n), rss, 1)[0]) if n >= 3 else 0.0
    half = rss[n // 2:]
    slope_half = float(np.polyfit(np.arange(len(half)), half, 1)[0]) if len(half) >= 3 else slope
    first_w, last_w = float(rss[:w].mean()), float(rss[-w:].mean())
    # A leak keeps growing; an allocator settling (two versions live during each swap) levels off.
    grows = slope_half > 0.1
    settled_at = next((i + 1 for i in range(n) if rss[i:].max() - rss[i:].min() <= 2.0), n)
    steps = [s.get("agent_ms", {}) for s in swaps]

    def med(key: str) -> float | None:
        vals = [s[key] for s in steps if key in s]
        return round(float(np.median(vals)), 1) if vals else None

    return {"applied": n, "failed": len(a.get("swaps", [])) - n,
            "seconds_p50": round(float(np.median(secs)), 3), "seconds_p90": round(float(np.percentile(secs, 90)), 3),
            "seconds_max": round(float(secs.max()), 3),
            "rss_first_mb": float(rss[0]), "rss_last_mb": float(rss[-1]), "rss_max_mb": float(rss.max()),
            "rss_min_mb": float(rss.min()), f"rss_first{w}_mean_mb": round(first_w, 1),
            f"rss_last{w}_mean_mb": round(last_w, 1), "rss_slope_mb_per_swap": round(slope, 3),
            "rss_slope_second_half_mb_per_swap": round(slope_half, 3), "rss_grows": bool(grows),
            "rss_grows_rule": "still growing: slope over the second half of the swaps > 0.1 MB/swap",
            "rss_within_2mb_from_swap": settled_at,
            "agent_download_ms_p50": med("download_ms"), "agent_unpack_ms_p50": med("unpack_ms"),
            "agent_verify_load_ms_p50": med("verify_load_ms")}


# -- main ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a 5,000-product store (100,000 rows) for a quick check")
    ap.add_argument("--workdir", type=Path, help="work here (kept; the store files in DIR/data are reused)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--epochs", type=int, default=1, help="member epochs of the initial full training (default 1)")
    ap.add_argument("--fine-tune-epochs", type=int, default=1, help="member epochs of the nightly fine-tuning")
    ap.add_argument("--no-member", action="store_true", help="guest model only (no Two-Tower)")
    ap.add_argument("--day-rows", type=int, help="item rows of the new day (default 50,000; 5,000 with --small)")
    ap.add_argument("--swaps", type=int, default=50, help="alternating re-signed swaps after the first update")
    ap.add_argument("--skip-agent", action="store_true", help="no agent part")
    ap.add_argument("--full-night", action="store_true",
                    help="also time a night of the periodic full member retraining (nightly --full)")
    ap.add_argument("--gate-tolerance", type=float,
                    help="gate.tolerance of the nightly job (default: the config's 0.02); e.g. 1 to have the "
                         "measured run publish whatever the gate measures")
    ap.add_argument("--agent-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the agent process (e.g. MALLOC_ARENA_MAX=2); repeatable")
    ap.add_argument("--profile", action="store_true",
                    help="run the measured nightly under cProfile (slower!) and print the top functions")
    args = ap.parse_args()
    if args.epochs < 1 or args.fine_tune_epochs < 1:
        ap.error("--epochs and --fine-tune-epochs must be at least 1")
    if any("=" not in e for e in args.agent_env):
        ap.error("--agent-env takes NAME=VALUE")
    day_rows = args.day_rows or (5_000 if args.small else 50_000)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "uvicorn", "uvicorn.error", "tensorflow", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from retrain_server.config import parse_config
    from retrain_server.serve import BundleServer, create_app
    from retrain_server.sign import keygen
    from retrain_server.sources import postgres
    from scripts.brokers import MosquittoBroker
    from scripts.postgres import PostgresServer

    tmp_owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench-nightly-")) if tmp_owned else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run = workdir / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    print(f"work directory: {workdir}", file=sys.stderr)
    size = "small" if args.small else "large"
    result: dict[str, Any] = {"size": size, "epochs": args.epochs, "fine_tune_epochs": args.fine_tune_epochs,
                              "member": not args.no_member, "loadavg_1m_start": loadavg(),
                              "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                              "gate_tolerance": args.gate_tolerance, "agent_env": args.agent_env,
                              "code": code_version()}
    pg = broker = server = None
    ok = False
    try:
        store = store_files(workdir / f"data-{size}", args.small)
        result["store"] = store
        pg = PostgresServer(run / "pg")
        pg.start()
        broker = MosquittoBroker(run / "mosquitto")
        broker.start()
        key, pub = keygen(run / "keys")
        bundle_dir = run / "bundles"
        bundle_dir.mkdir()
        server = BundleServer(create_app(bundle_dir, lambda: {"status": "ok"}), "127.0.0.1", 0)
        server.start()
        prefix = f"bench-nightly/{uuid.uuid4().hex[:8]}"
        cfg = parse_config({
            "database": {"dsn": pg.dsn}, "broker": {"host": broker.host, "port": broker.port}, "prefix": prefix,
            "parameters": str(run / "parameters"), "state_dir": str(run / "state"),
            "bundle_dir": str(bundle_dir), "signing_key": str(key), "public_url": server.url,
            "training": {"member": not args.no_member, "epochs": args.epochs,
                         "fine_tune_epochs": args.fine_tune_epochs},
            **({"gate": {"tolerance": args.gate_tolerance}} if args.gate_tolerance is not None else {})}, env={})
        result["gate_config"] = {"tolerance": cfg.gate.tolerance, "holdout_percent": cfg.gate.holdout_percent,
                                 "min_cases": cfg.gate.min_cases}

        # 1. bulk load
        print("[1] load_files of the store ...", file=sys.stderr)
        result["load"] = timed_load(pg.dsn, Path(store["products_csv"]), Path(store["purchases_jsonl"]))
        print(f"[1] {result['load']}", file=sys.stderr)
        with postgres.connect(pg.dsn) as conn:
            first_day, last_day = postgres.purchase_days(conn, STORE_TZ)
        result["days_loaded"] = [first_day.isoformat(), last_day.isoformat()]

        # 2. the initial, full training
        print(f"[2] first nightly run for {last_day} (full training) ...", file=sys.stderr)
        r1, result["initial_run"] = run_nightly(cfg, last_day)
        print(f"[2] {result['initial_run']}", file=sys.stderr)
        if not r1.published:
            raise RuntimeError(f"the initial run published nothing: {r1.reason}")
        keep_v1 = run / "sources" / f"{r1.version}.tar.gz"
        keep_v1.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(r1.bundle.path, keep_v1)

        # 3. a new day, then the measured run
        new_day = last_day + timedelta(days=1)
        t0 = time.perf_counter()
        result["new_day"] = write_new_day(Path(store["purchases_jsonl"]), new_day, day_rows, run / "new_day.jsonl")
        result["new_day"]["generate_s"] = round(time.perf_counter() - t0, 2)
        result["new_day_load"] = timed_load(pg.dsn, Path(store["products_csv"]), run / "new_day.jsonl")
        print(f"[3] new day {result['new_day']}; loaded {result['new_day_load']}", file=sys.stderr)
        print(f"[3] measured nightly run for {new_day} (fine-tune) ...", file=sys.stderr)
        prof_path = run / "nightly.prof" if args.profile else None
        r2, result["measured_run"] = run_nightly(cfg, new_day, prof_path)
        print(f"[3] {result['measured_run']}", file=sys.stderr)
        if prof_path is not None:
            s = io.StringIO()
            pstats.Stats(str(prof_path), stream=s).sort_stats("cumulative").print_stats(40)
            result["profile"] = str(prof_path)
            print(s.getvalue(), file=sys.stderr)

        # 3b. a night of the periodic full retraining (training.full_retrain_days), on one more day
        if args.full_night:
            full_day = new_day + timedelta(days=1)
            result["full_day"] = write_new_day(Path(store["purchases_jsonl"]), full_day, day_rows,
                                               run / "full_day.jsonl", seed=12)
            timed_load(pg.dsn, Path(store["products_csv"]), run / "full_day.jsonl")
            print(f"[3b] nightly run for {full_day} with the member model trained from scratch ...", file=sys.stderr)
            _, result["full_run"] = run_nightly(cfg, full_day, full=True)
            print(f"[3b] {result['full_run']}", file=sys.stderr)

        # 4. the agent
        if args.skip_agent:
            result["agent"] = {"skipped": "--skip-agent"}
        else:
            print("[4] agent hot swaps ...", file=sys.stderr)
            try:
                result["agent"] = agent_part(args, run, broker.port, prefix, server.url, bundle_dir, key, pub,
                                             keep_v1, r2)
            except Exception as exc:  # the agent side must not sink the nightly figures
                traceback.print_exc()
                result["agent"] = {"skipped": f"agent part failed: {type(exc).__name__}: {exc}"}
            result["agent_summary"] = summarize_agent(result["agent"])
        ok = True
    finally:
        for closer in (lambda: server and server.stop(), lambda: broker and broker.stop(),
                       lambda: pg and pg.close()):
            try:
                closer()
            except Exception as exc:  # cleanup must not hide the real error
                print(f"cleanup: {exc}", file=sys.stderr)
        if tmp_owned and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not ok or args.keep or not tmp_owned:
            print(f"work directory kept: {workdir}", file=sys.stderr)

    report(result, args)
    return 0


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    ld, nd = result["load"], result["new_day_load"]
    n_products = ld["products"]
    print_table(f"load_files (COPY) into PostgreSQL ({n_products:,} products)",
                ["data", "item rows", "sessions", "seconds", "of which parsing s", "rows/s"],
                [["synthetic store", f"{ld['item_rows']:,}", f"{ld['sessions']:,}", ld["seconds"], fmt(ld["parse_s"]),
                  f"{ld['rows_per_s']:,}"],
                 [f"new day {result['new_day']['day']}", f"{nd['item_rows']:,}", f"{nd['sessions']:,}", nd["seconds"],
                  fmt(nd["parse_s"]), f"{nd['rows_per_s']:,}"]])
    i, m = result["initial_run"], result["measured_run"]
    rows = [[k, fmt(i["timings"].get(k)), fmt(m["timings"].get(k))] for k in STEPS]
    rows += [["rows learned", f"{i['metrics'].get('rows_learned', 0):,}", f"{m['metrics'].get('rows_learned', 0):,}"],
             ["guest hr@10 (gate)", fmt(i["metrics"].get("guest_hr@10")), fmt(m["metrics"].get("guest_hr@10"))],
             ["member hr@10 (gate)", fmt(i["metrics"].get("member_hr@10")), fmt(m["metrics"].get("member_hr@10"))],
             ["gate questions (guest / member)",
              f"{i['metrics'].get('guest_cases')} / {i['metrics'].get('member_cases')}",
              f"{m['metrics'].get('guest_cases')} / {m['metrics'].get('member_cases')}"],
             ["published model hr@10 (guest / member)", "-",
              f"{fmt(m['metrics'].get('published_guest_hr@10'))} / {fmt(m['metrics'].get('published_member_hr@10'))}"],
             ["gate", fmt(i["metrics"].get("gate")), fmt(m["metrics"].get("gate"))],
             ["bundle MB", fmt(i["bundle_mb"]), fmt(m["bundle_mb"])],
             ["published", fmt(i["published"]), fmt(m["published"])],
             ["bench process CPU s / wall", f"{i['bench_process_cpu_s']} / {i['wall_s']}",
              f"{m['bench_process_cpu_s']} / {m['wall_s']}"],
             ["1-min load before/after", f"{i['loadavg_1m_before']} / {i['loadavg_1m_after']}",
              f"{m['loadavg_1m_before']} / {m['loadavg_1m_after']}"]]
    member = f"member {result['epochs']} epoch(s) full / {result['fine_tune_epochs']} fine-tune" \
        if result["member"] else "guest only (--no-member)"
    gate = result.get("gate_config", {})
    print_table(f"nightly job, seconds per step ({n_products:,} products; {member}; "
                f"gate tolerance {gate.get('tolerance')})",
                ["step", f"initial run {i['day']} (full training)", f"measured run {m['day']} (fine-tune)"], rows)
    if m["reason"]:
        print(f"measured run not published: {m['reason']}")
    a, s = result.get("agent", {}), result.get("agent_summary", {})
    agent_rows: list[list[str]] = []
    if a.get("skipped"):
        print(f"\nagent part skipped: {a['skipped']}")
    if "startup_s" in a:
        agent_rows.append(["agent start-up on the first version", f"{a['startup_s']} s", f"RSS {a['rss_start_mb']} MB"])
    f = a.get("first_update") or {}
    if "seconds" in f:
        am = f.get("agent_ms", {})
        agent_rows.append([f"nightly bundle ({m['bundle_mb']} MB): publish -> status applied",
                           f"{f['seconds']} s ({f['result']})",
                           f"download {fmt(am.get('download_ms'))} ms, unpack {fmt(am.get('unpack_ms'))} ms, "
                           f"verify+load {fmt(am.get('verify_load_ms'))} ms; RSS {f.get('rss_mb')} MB"])
    elif f.get("skipped"):
        agent_rows.append(["nightly bundle", "skipped", f["skipped"]])
    if s:
        agent_rows.append([f"{s['applied']} alternating re-signed swaps: publish -> applied",
                           f"p50 {s['seconds_p50']} s, p90 {s['seconds_p90']} s, max {s['seconds_max']} s",
                           f"agent p50: download {fmt(s['agent_download_ms_p50'])} ms, unpack "
                           f"{fmt(s['agent_unpack_ms_p50'])} ms, verify+load {fmt(s['agent_verify_load_ms_p50'])} ms"])
        agent_rows.append(["agent RSS after each swap (VmRSS)",
                           f"first {s['rss_first_mb']} / last {s['rss_last_mb']} / max {s['rss_max_mb']} MB",
                           f"start {a.get('rss_start_mb')} MB; within 2 MB of its final level from swap "
                           f"{s['rss_within_2mb_from_swap']}; 2nd-half slope {s['rss_slope_second_half_mb_per_swap']} "
                           f"MB/swap -> still growing: {fmt(s['rss_grows'])}; VmHWM {a.get('rss_peak_mb')} MB"])
        if s["failed"]:
            agent_rows.append(["swaps not applied", str(s["failed"]), json.dumps(a["swaps"][-1])[:200]])
    if agent_rows:
        print_table("agent hot swap (basket-agent run, --update-jitter-s 0, loopback Mosquitto + bundle server)",
                    ["what", "measured", "detail"], agent_rows)
    total = m["timings"].get("total_s")
    met = {"nightly_total": total is not None and total <= GOALS["nightly_total_s"]}
    if "seconds" in f and f.get("result") == "applied":
        met["update_applied"] = f["seconds"] <= GOALS["update_applied_s"]
    if s:
        met["update_applied_all_swaps"] = s["seconds_max"] <= GOALS["update_applied_s"] and not s["failed"]
    goal_txt = [f"measured nightly total <= {GOALS['nightly_total_s']:.0f} s: "
                f"{'met' if met['nightly_total'] else 'NOT met'} ({total} s"
                + ("" if m["published"] else ", but nothing was published: no pack/publish step") + ")"]
    if "update_applied" in met:
        goal_txt.append(f"nightly bundle applied <= {GOALS['update_applied_s']} s after its message: "
                        f"{'met' if met['update_applied'] else 'NOT met'}")
    if "update_applied_all_swaps" in met:
        goal_txt.append(f"every re-signed swap <= {GOALS['update_applied_s']} s: "
                        f"{'met' if met['update_applied_all_swaps'] else 'NOT met'}")
    print("\ngoal: " + "; ".join(goal_txt))
    if i["metrics"].get("guest_cases", 0) < 30:
        print(f"note: the initial run's gate figures rest on {i['metrics'].get('guest_cases')} held-out questions "
              "(the synthetic store's last day is a partial one): not meaningful")
    code = result.get("code") or {}
    dirty = ", ".join(code.get("uncommitted") or []) or "none"
    print(f"code: commit {code.get('commit')}; uncommitted changes (agent/, retrain_server/, scripts/): {dirty}")
    print(f"machine: {os.cpu_count()} CPUs shared with other work (1-min load at start {result['loadavg_1m_start']}); "
          "PostgreSQL, Mosquitto, the bundle server and the agent run on the same cores: timings are noisy")
    result["goal"] = GOALS
    result["goal_met"] = met
    result["note"] = ("timings on a shared 2-CPU machine, noisy; PostgreSQL (fsync off), Mosquitto, the bundle "
                      "server (in the bench process) and the agent process all run on it")
    name = "nightly" + ("-small" if args.small else "") + ("-profile" if args.profile else "")
    if args.gate_tolerance is not None:
        name += f"-gate-tol-{args.gate_tolerance:g}"
    if args.agent_env:
        name += "-agent-env-" + "-".join(re.sub(r"[^A-Za-z0-9]+", "", e.split("=", 1)[0]).lower()
                                         for e in args.agent_env)
    write_json(name, result)


if __name__ == "__main__":
    sys.exit(main())

"""The nightly job (the seed's daily retraining), from PostgreSQL to a published bundle.

For day D (default: yesterday in the store's time zone), one run:

1. reads the purchases of the days not yet counted (the watermark is in
   PostgreSQL: a day is never counted twice; days missed while the server was
   down are caught up oldest first, in the same run);
2. adds their sessions to the cumulative counts (server state, not shipped),
   time-decayed day by day (``decay.*``, :mod:`.counts`);
3. refits TF-IDF + tag neighbours from the ``products`` table (new products
   become recommendable) and rebuilds the co-purchase tables from the counts;
4. fine-tunes the Two-Tower model from the checkpoint of the published member
   model (a refused night's checkpoint is not built on when an earlier one
   exists; a refused training from scratch is retried), keeping its
   lookups (new members and products appended), exports ONNX, quantizes, and
   rebuilds the member history tables; the member reranker's trees are fitted
   with each training from scratch (:mod:`.rerank`: a second Two-Tower model
   trained on the purchases before ``training.rerank_days``) and kept with the
   checkpoint on the nights that fine-tune it; their statistics are rebuilt
   from every purchase each night;
5. gates the candidate against the published models on the newest day's
   held-out sessions (:mod:`.gate`; those sessions are counted the next night);
   when only one of the two models is refused, the other ships beside the
   published version of the refused one (gated again as that mix);
6. commits the new state and watermark in one transaction, then — when the
   gate passed — packs the signed bundle, installs the new parameters,
   checks the bundle is reachable at its URL and announces it on
   ``PREFIX/models/updated`` (retained).

Everything new is written beside the old (new generation directory, new
candidate directory, temporary bundle name) and switched at the end, so a
crash anywhere leaves the published version and the counts as they were. A
version that passed but could not be announced (broker down) is announced
by the next run or by ``serve`` at start-up.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from agent import layout
from agent.bundle import MANIFEST, SIGNATURE
from agent.registry import load_snapshot, snapshot_from_source

from . import state as db_state
from .blend import BlendUnits
from .bundles import BundleInfo, pack_bundle
from .config import RetrainConfig
from .counts import Counts, ages_in_days
from .data import PurchaseLog
from .errors import RetrainError
from .export import install_directory, recover_directory, sync_tree, write_manifest, write_parameters
from .gate import GateResult, gate_cases, holdout_mask, judge, score_snapshot
from .rerank import FittedReranker

_LOG = logging.getLogger(__name__)

__all__ = ["NightlyJob", "NightlyResult", "yesterday", "load_public_key_from_private"]

_LOCK_KEY = 0x5B_A5_E7  # pg advisory lock: one nightly run at a time per database


@dataclass
class NightlyResult:
    """What a run did; ``version`` None when there was nothing to do."""

    through_day: date | None
    days: list[date] = field(default_factory=list)
    version: str | None = None
    published: bool = False
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    bundle: BundleInfo | None = None

    def summary(self) -> str:
        if self.version is None:
            return f"nothing to do: {self.reason}"
        days = f"{self.days[0]}..{self.days[-1]}" if len(self.days) > 1 else str(self.days[0])
        verdict = "published" if self.published else f"NOT published ({self.reason})"
        hr = ", ".join(f"{k} {v}" for k, v in self.metrics.items() if k.endswith("hr@10"))
        return f"version {self.version} for {days}: {verdict}; {hr}; {self.timings.get('total_s')} s"


def yesterday(tz: str, now: datetime | None = None) -> date:
    """The last complete day in ``tz``."""
    local = (now or datetime.now(ZoneInfo(tz))).astimezone(ZoneInfo(tz))
    return local.date() - timedelta(days=1)


def _concat(logs: list[PurchaseLog]) -> PurchaseLog:
    logs = [lg for lg in logs if len(lg)]
    if not logs:
        return PurchaseLog.from_columns(session_ids=[], user_ids=[], product_ids=[], genders=[], ages=[],
                                        timestamps=[])
    return PurchaseLog.from_columns(**{f: np.concatenate([getattr(lg, f) for lg in logs]) for f in (
        "session_ids", "user_ids", "product_ids", "genders", "ages", "timestamps")})


class NightlyJob:
    """One configured nightly pipeline; :meth:`run` is one night (or a catch-up of several).

    ``announce`` (default :func:`retrain_server.publish` based) is how a packed
    bundle reaches the baskets; tests and the demo use the real one.
    ``after_step(name)`` is called after each step (crash tests kill the job there).
    """

    def __init__(self, cfg: RetrainConfig, *, after_step: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.after_step = after_step or (lambda _name: None)
        self.generations = cfg.state_dir / "generations"
        self.candidates = cfg.state_dir / "candidates"

    # -- the run ---------------------------------------------------------------------------
    def run(self, day: date | None = None, *, full: bool | None = None) -> NightlyResult:
        """Count ``day`` (default: yesterday) and any missed days, retrain, gate, publish.

        ``full``: train the member model from scratch on every purchase instead of fine-tuning
        (None: when ``training.full_retrain_days`` have passed since the last full training).
        """
        from .sources import postgres

        cfg = self.cfg
        t_start = time.perf_counter()
        conn = postgres.connect(cfg.dsn)
        try:
            conn.autocommit = True
            postgres.migrate(conn)
            if not conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_KEY,)).fetchone()[0]:
                raise RetrainError("another nightly run holds the lock; try again when it has finished")
            recover_directory(cfg.parameters)
            self.announce_pending(conn)
            result = self._run(conn, day or yesterday(cfg.timezone), full)
            self._prune(conn)
        finally:
            conn.close()
        result.timings["total_s"] = round(time.perf_counter() - t_start, 2)
        _LOG.info("nightly: %s", result.summary())
        return result

    def _run(self, conn: Any, day: date, full: bool | None = None) -> NightlyResult:
        from .sources import postgres

        cfg, timings = self.cfg, {}
        current = db_state.read_state(conn)
        if current is not None and day <= current.through_day:
            return NightlyResult(current.through_day, reason=f"already counted through {current.through_day}")
        # 1. read: the previous night's held-out sessions, the days in between, day D minus its hold-out.
        t0 = time.perf_counter()
        parts: list[PurchaseLog] = []
        days: list[tuple[date, int, int]] = []
        if current is None:
            older = postgres.read_purchases(conn, None, day, cfg.timezone)
            parts.append(older)
            first = day
        else:
            prev = postgres.read_purchases(conn, current.through_day, current.through_day + timedelta(days=1),
                                           cfg.timezone)
            # Held out with the share in force that night (the config may have changed since).
            held_before = self._generation_info(current.generation).get("holdout_percent", cfg.gate.holdout_percent)
            parts.append(prev.select(holdout_mask(prev.session_ids, held_before)))
            first = current.through_day + timedelta(days=1)
        d = first
        while d < day:
            log_d = postgres.read_purchases(conn, d, d + timedelta(days=1), cfg.timezone)
            parts.append(log_d)
            days.append((d, len(np.unique(log_d.session_ids)), len(log_d)))
            d += timedelta(days=1)
        today = postgres.read_purchases(conn, day, day + timedelta(days=1), cfg.timezone)
        held = holdout_mask(today.session_ids, cfg.gate.holdout_percent)
        parts.append(today.select(~held))
        days.append((day, len(np.unique(today.session_ids)), len(today)))
        learn, gate_log = _concat(parts), today.select(held)
        # the member model's periodic training from scratch: everything in the database but the
        # sessions held out for tonight's gate (the first night's "learn" already is that)
        last_full = shipped_full = self._last_full(current)
        if full is None:
            full = cfg.full_retrain_days > 0 and (last_full is None or (day - last_full).days >= cfg.full_retrain_days)
        # every purchase but tonight's held-out sessions: a training from scratch learns it, and the
        # reranker's statistics are read from it each night
        everything = learn
        old_trees = current is not None and (
            self.generations / current.generation / "checkpoint" / FittedReranker.FIT).exists()
        if current is not None and cfg.train_member and (full or (cfg.rerank_days > 0 and old_trees)):
            everything = _concat([postgres.read_purchases(conn, None, first, cfg.timezone), *parts[1:]])
        full_log = everything if full and current is not None and cfg.train_member else None
        catalog = postgres.read_products(conn)
        timings["read_s"] = round(time.perf_counter() - t0, 2)
        if len(catalog) == 0:
            raise RetrainError("the products table is empty: nothing to train")
        _LOG.info("nightly %s: %d rows to learn (%d days), %d held out for the gate, %d products",
                  day, len(learn), len(days), len(gate_log), len(catalog))
        self.after_step("read")
        # 2. counts
        t0 = time.perf_counter()
        old_gen = self.generations / current.generation if current is not None else None
        counts = self._counts(old_gen, current.through_day if current is not None else None, day, learn)
        co, item_counts = counts.for_catalog(catalog)
        timings["count_s"] = round(time.perf_counter() - t0, 2)
        self.after_step("count")
        # 3. guest refit
        from .guest import build_guest_model, recent_basket_arrays

        t0 = time.perf_counter()
        guest = build_guest_model(catalog, co, item_counts, cfg.guest_training)
        recent = self._recent_baskets(conn, day, gate_log)
        guest.baskets = recent_basket_arrays(recent[0], catalog.ids, max_baskets=cfg.guest_training.recent_baskets,
                                             postings_per_item=cfg.guest_training.basket_postings)
        timings["guest_refit_s"] = round(time.perf_counter() - t0, 2)
        self.after_step("guest")
        # 4. member fine-tune
        t0 = time.perf_counter()
        member_state, member_training = self._member_state(old_gen, learn, catalog, full_log)
        timings["member_train_s"] = round(time.perf_counter() - t0, 2)
        if member_training == "full":
            last_full = day
        reranker = self._reranker(member_training, old_gen, everything, catalog, timings)
        self.after_step("member")
        # 5. export the candidate (full seed layout) and the new generation, beside the old ones
        t0 = time.perf_counter()
        generation = f"g-{day.isoformat()}-{uuid.uuid4().hex[:8]}"
        gen_dir = self.generations / generation
        counts.save(gen_dir / "counts")
        (gen_dir / "generation.json").write_text(json.dumps({
            "through_day": day.isoformat(), "holdout_percent": cfg.gate.holdout_percent,
            "days": [d.isoformat() for d, _, _ in days], "decay": asdict(cfg.decay),
            "member_training": member_training,
            "member_full_through": last_full.isoformat() if last_full is not None else None}))
        writer = None
        if member_state is not None:
            from . import member as member_mod
            from .train import state_writer

            member_mod.save_checkpoint(member_state, gen_dir / "checkpoint")
            if reranker is not None:  # beside the model it was fitted for (kept with it when it is kept)
                reranker.save(gen_dir / "checkpoint")
            writer = state_writer(member_state, guest, calibration_log=learn, history=counts.history_triples(),
                                  fallback_serving=self._published_serving(),
                                  baskets=recent, reranker=reranker, stats_log=everything)
        candidate = self.candidates / f"run-{generation}"
        doc = write_parameters(candidate, guest, member_writer=writer, metrics={}, signing_key=cfg.signing_key)
        version, created_at = doc["version"], datetime.fromisoformat(doc["created_at"])
        timings["export_s"] = round(time.perf_counter() - t0, 2)
        self.after_step("export")
        # 6. gate (one model refused: the candidate with the published version of that model in its place)
        t0 = time.perf_counter()
        cases = gate_cases(gate_log)
        published = self._published_scores(cases)
        verdict = self._gate(candidate, version, cases, published)
        if not verdict.passed:
            try:
                kept = self._keep_published(candidate, verdict, cases, published)
            except Exception as exc:  # the mix is a second chance: failing to build it is a refusal, not a crash
                _LOG.warning("could not try the candidate with a published model (%s): refused as it is", exc)
                kept = None
            if kept is not None:
                candidate, doc, verdict = kept
                version, created_at = doc["version"], datetime.fromisoformat(doc["created_at"])
        timings["gate_s"] = round(time.perf_counter() - t0, 2)
        if member_state is not None and not (verdict.passed and "member" not in verdict.metrics.get("kept", {})):
            self._keep_published_checkpoint(old_gen, gen_dir, shipped_full)
        metrics = {**verdict.metrics, "through_day": day.isoformat(), "rows_learned": len(learn),
                   "sessions_total": counts.sessions, "member_training": member_training}
        if reranker is not None and "member" not in verdict.metrics.get("kept", {}):
            metrics["member_rerank"] = {"trees": reranker.info["chosen"]["trees"],
                                        "fitted_through": reranker.info.get("fitted_through")}
        if full_log is not None:
            metrics["member_rows_trained"] = len(full_log)
        write_manifest(candidate, metrics={**metrics, "timings": timings}, models=doc["models"],
                       signing_key=cfg.signing_key, created_at=created_at, version=version)
        final = self.candidates / version
        candidate.rename(final)
        self.after_step("gate")
        # 7. commit state + watermark + version record together, once what they name is on disk
        sync_tree(gen_dir)
        sync_tree(final)
        db_state.commit_run(conn, generation=generation, through_day=day, days=days, version={
            "version": version, "created_at": datetime.now(created_at.tzinfo), "reason": verdict.reason,
            "metrics": metrics, "timings": timings})
        self.after_step("commit")
        result = NightlyResult(day, [dd for dd, _, _ in days], version, False, verdict.reason, metrics, timings)
        if not verdict.passed:
            _LOG.warning("nightly %s: candidate %s NOT published: %s", day, version, verdict.reason)
            shutil.rmtree(final, ignore_errors=True)
            return result
        # 8. publish
        result.bundle = self.publish(conn, version, timings)
        result.published = True
        return result

    # -- steps -----------------------------------------------------------------------------
    def _counts(self, old_gen: Path | None, counted_through: date | None, day: date, learn: PurchaseLog) -> Counts:
        """The counts as of ``day``: the old ones decayed by the days since, plus ``learn`` weighted by age.

        Equal, to float tolerance, to adding each day's sessions and decaying one
        day at a time, so a catch-up run and a run per day give the same counts.
        """
        decay = self.cfg.decay
        counts = Counts.empty()
        if old_gen is not None:
            counts = Counts.load(old_gen / "counts")
            since = counts.through_day or counted_through  # generations written before decay: the watermark
            if since is not None:
                counts = counts.decayed((day - since).days, decay, through_day=day)
        ages = ages_in_days(learn.timestamps, day, self.cfg.timezone)
        return counts.add(learn, ages=ages, decay=decay, through_day=day)

    def _last_full(self, current: Any) -> date | None:
        """The day through which the member model was last trained from scratch (None: unknown)."""
        if current is None:
            return None
        value = self._generation_info(current.generation).get("member_full_through")
        try:
            return date.fromisoformat(value) if value else None
        except ValueError:
            return None

    def _member_state(self, old_gen: Path | None, learn: PurchaseLog, catalog: Any,
                      full_log: PurchaseLog | None = None) -> tuple[Any, str]:
        """(member model state, how it was made: "full" | "fine-tune" | "kept" | "none")."""
        cfg = self.cfg
        if not cfg.train_member:
            return None, "none"
        from . import member as member_mod

        if full_log is not None and bool((full_log.user_ids != "").any()):
            _LOG.info("member model: full training from scratch on %d rows (training.full_retrain_days %d)",
                      len(full_log), cfg.full_retrain_days)
            return member_mod.train_member_model(full_log, catalog.ids.tolist(),
                                                 member_mod.MemberTrainingConfig(epochs=cfg.epochs)), "full"
        has_members = bool((learn.user_ids != "").any())
        checkpoint = old_gen / "checkpoint" if old_gen is not None else None
        if checkpoint is not None and checkpoint.exists():
            if not has_members:
                _LOG.info("no member purchases to learn: member model kept as it was")
                return member_mod.load_checkpoint(checkpoint), "kept"
            # A gentle step from where the published model is: a fresh Adagrad at the full
            # training's rate on one day's rows in many small batches moved the 50,000-product
            # model far enough that the gate refused it every night (bench/bench_nightly.py).
            saved = json.loads((checkpoint / "member_state.json").read_text())
            tune_cfg = replace(member_mod.MemberTrainingConfig.from_dict(saved["config"]),
                               epochs=cfg.fine_tune_epochs, learning_rate=cfg.fine_tune_learning_rate,
                               min_steps_per_epoch=cfg.fine_tune_min_steps)
            return member_mod.fine_tune_member_model(checkpoint, learn, catalog.ids.tolist(), tune_cfg), "fine-tune"
        if not has_members:
            _LOG.warning("no member purchases yet: shipping the guest model only")
            return None, "none"
        return member_mod.train_member_model(learn, catalog.ids.tolist(),
                                             member_mod.MemberTrainingConfig(epochs=cfg.epochs)), "full"

    def _reranker(self, member_training: str, old_gen: Path | None, log: PurchaseLog, catalog: Any,
                  timings: dict[str, float]) -> FittedReranker | None:
        """Trees for tonight's member model: fitted anew when it was trained from scratch, else the ones
        fitted for the model it was fine-tuned from (None: no reranker; the blend alone ranks)."""
        cfg = self.cfg
        if cfg.rerank_days <= 0 or member_training == "none":
            return None
        if member_training != "full":
            return FittedReranker.load(old_gen / "checkpoint") if old_gen is not None else None
        from . import member as member_mod
        from .train import reranker_for

        fitted = reranker_for(log, catalog, cfg.rerank_days, guest_config=cfg.guest_training, decay=cfg.decay,
                              member_config=member_mod.MemberTrainingConfig(epochs=cfg.epochs), timings=timings)
        if fitted is None:
            return None
        through = datetime.fromtimestamp(int(log.timestamps.max()), ZoneInfo(cfg.timezone)).date()
        return replace(fitted, info={**fitted.info, "fitted_through": through.isoformat()})

    def _keep_published_checkpoint(self, old_gen: Path | None, gen_dir: Path, shipped_full: date | None) -> None:
        """Tonight's member model does not ship: the new generation keeps the checkpoint agents' model
        came from, so the next night fine-tunes from the published model rather than building on a
        refused one (and a refused training from scratch is tried again: ``member_full_through``
        stays where the last shipped one left it). Tonight's rows stay in PostgreSQL; the next
        training from scratch learns them.
        """
        published = old_gen / "checkpoint" if old_gen is not None else None
        info_path = gen_dir / "generation.json"
        info = json.loads(info_path.read_text())
        info["member_full_through"] = shipped_full.isoformat() if shipped_full is not None else None
        if published is None or not published.is_dir():
            # No earlier checkpoint (the first night with members): nothing better to keep; with no
            # shipped training from scratch on record the next night trains from scratch again.
            _LOG.warning("tonight's member model is not shipped and no earlier checkpoint exists: "
                         "keeping tonight's")
            info["member_checkpoint"] = "tonight's (not shipped; no earlier checkpoint)"
        else:
            shutil.rmtree(gen_dir / "checkpoint")
            shutil.copytree(published, gen_dir / "checkpoint")
            info["member_checkpoint"] = f"kept from {old_gen.name} (tonight's member model was not shipped)"
            _LOG.info("member checkpoint: tonight's model was not shipped; the next night fine-tunes from the "
                      "published one (%s)", old_gen.name)
        info_path.write_text(json.dumps(info))

    def _generation_info(self, generation: str) -> dict[str, Any]:
        try:
            return json.loads((self.generations / generation / "generation.json").read_text())
        except (OSError, ValueError):
            return {}

    def _published_serving(self) -> dict[str, Any] | None:
        meta = self.cfg.parameters / "member_model" / "member_meta.json"
        try:
            return json.loads(meta.read_text(encoding="utf-8")).get("serving")
        except (OSError, ValueError):
            return None

    def _recent_baskets(self, conn: Any, day: date, gate_log: PurchaseLog) -> tuple[PurchaseLog, np.ndarray]:
        """Purchases of the basket tables' window up to ``day`` without tonight's held-out sessions, with ages.

        The guest model's recent baskets and the member blend's own baskets come
        from here, read whole from PostgreSQL each night (not accumulated), so
        re-running a day builds the same tables.
        """
        from .sources import postgres

        cfg = self.cfg
        first = day - timedelta(days=BlendUnits().basket_window_days - 1)
        recent = postgres.read_purchases(conn, first, day + timedelta(days=1), cfg.timezone)
        recent = recent.select(~np.isin(recent.session_ids, np.unique(gate_log.session_ids)))
        return recent, ages_in_days(recent.timestamps, day, cfg.timezone)

    def _published_scores(self, cases: list[Any]) -> dict[str, Any] | None:
        """The published models' gate scores, None when there are none (or they cannot be loaded)."""
        if not (self.cfg.parameters / MANIFEST).exists():
            return None
        try:
            key = load_public_key_from_private(self.cfg.signing_key)
            return score_snapshot(load_snapshot(self.cfg.parameters, key), cases)
        except Exception as exc:  # an unreadable published version must not block a good one
            _LOG.warning("published models could not be loaded for the gate (%s): not compared", exc)
            return None

    def _gate(self, candidate: Path, version: str, cases: list[Any], published: dict[str, Any] | None) -> GateResult:
        new = score_snapshot(snapshot_from_source(layout.DirectorySource(candidate), version), cases)
        verdict = judge(new, published, self.cfg.gate)
        _LOG.info("gate: %s (%s)", "passed" if verdict.passed else "REFUSED",
                  ", ".join(f"{k}={v}" for k, v in verdict.metrics.items()))
        return verdict

    def _keep_published(self, candidate: Path, verdict: GateResult, cases: list[Any],
                        published: dict[str, Any] | None) -> tuple[Path, dict[str, Any], GateResult] | None:
        """One model refused: the candidate with the published version of the refused model in its
        place, gated again (the member blend reads the guest's co-purchase and recent-basket tables,
        so the mix is judged, not assumed). Both refused: the same with the published guest model (a worse guest
        model also lowers the members' score). None when that is not possible or not good enough.

        A day unlike the others (a sale many times the usual size) can move one model past the
        tolerance; the other model's night of learning still ships. The manifest's ``models`` entry
        of the kept model names the version it came from (agents report it in their status).
        """
        if published is None or not verdict.failed:
            return None
        # Both refused: the guest model may be the only cause (members the member model does not know are
        # answered by it, and the member blend reads its co-purchase and recent-basket tables), so try
        # the published guest.
        failed = verdict.failed[0] if len(verdict.failed) == 1 else "guest"
        model_dir = {"guest": layout.GUEST_DIR, "member": layout.MEMBER_DIR}[failed]
        other = layout.MEMBER_DIR if failed == "guest" else layout.GUEST_DIR
        source = self.cfg.parameters / model_dir
        if not source.is_dir() or not (candidate / other).is_dir():
            return None  # nothing of the candidate would ship
        installed = json.loads((self.cfg.parameters / MANIFEST).read_text(encoding="utf-8"))
        origin = dict((installed.get("models") or {}).get(failed) or {})
        origin.setdefault("version", installed["version"])
        mixed = self.candidates / f"{candidate.name}-kept-{failed}"
        shutil.rmtree(mixed, ignore_errors=True)
        top = {MANIFEST, SIGNATURE, model_dir}
        shutil.copytree(candidate, mixed,
                        ignore=lambda d, names: [n for n in names if Path(d) == candidate and n in top])
        shutil.copytree(source, mixed / model_dir)
        doc = json.loads((candidate / MANIFEST).read_text(encoding="utf-8"))
        models = {**doc.get("models", {}), failed: origin}
        doc = write_manifest(mixed, metrics={}, models=models, signing_key=self.cfg.signing_key)
        again = self._gate(mixed, doc["version"], cases, published)
        if not again.passed:
            _LOG.warning("the candidate with the published %s model (%s) is refused too: %s", failed,
                         origin["version"], again.reason)
            shutil.rmtree(mixed, ignore_errors=True)
            return None
        key = f"{failed}_hr@10"
        metrics = {**again.metrics, "gate": f"passed with the published {failed} model",
                   "kept": {failed: {"version": origin["version"], "candidate_hr@10": verdict.metrics.get(key),
                                     "reason": verdict.reason}}}
        _LOG.warning("nightly: the candidate's %s model is refused (%s); shipping the published one (%s) with "
                     "tonight's %s model", failed, verdict.reason, origin["version"], other.split("_")[0])
        shutil.rmtree(candidate, ignore_errors=True)
        return mixed, doc, GateResult(True, None, metrics)

    def publish(self, conn: Any, version: str, timings: dict[str, float] | None = None) -> BundleInfo:
        """Pack, install as the server's parameters, check the URL, announce; mark published."""
        cfg = self.cfg
        timings = timings if timings is not None else {}
        candidate = self.candidates / version
        t0 = time.perf_counter()
        info = pack_bundle(candidate, cfg.bundle_dir, cfg.signing_key)
        timings["pack_s"] = round(time.perf_counter() - t0, 2)
        self.after_step("pack")
        install_directory(candidate, cfg.parameters)
        self.after_step("install")
        t0 = time.perf_counter()
        doc = json.loads((cfg.parameters / MANIFEST).read_text(encoding="utf-8"))
        url = self._announce(info, doc.get("metrics") or {})
        timings["publish_s"] = round(time.perf_counter() - t0, 2)
        db_state.mark_published(conn, version, url=url, sha256=info.sha256, size=info.bytes,
                                timings={k: timings[k] for k in ("pack_s", "publish_s") if k in timings})
        _LOG.info("published %s (%.1f MB) at %s", version, info.bytes / 1e6, url)
        return info

    def finish_interrupted(self, conn: Any) -> bool:
        """At the server's start: publish what a crash left pending, under the nightly lock (a timer may start
        a run at the same moment, which does the same: both would pack and announce). False when a run holds
        the lock: it finishes the publication itself."""
        conn.autocommit = True
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_KEY,)).fetchone()[0]:
            _LOG.info("a nightly run holds the lock: it publishes whatever an interrupted run left pending")
            return False
        try:
            recover_directory(self.cfg.parameters)
            self.announce_pending(conn)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
        return True

    def announce_pending(self, conn: Any) -> None:
        """Finish a publication a crash or a broker outage interrupted (newest pending version only)."""
        for version in db_state.pending_versions(conn)[:1]:
            cfg = self.cfg
            if (self.candidates / version).exists():
                _LOG.info("version %s passed the gate but was never published: publishing it now", version)
                self.publish(conn, version)
                return
            installed = json.loads((cfg.parameters / MANIFEST).read_text()) if (
                cfg.parameters / MANIFEST).exists() else {}
            if installed.get("version") == version:
                info = pack_bundle(cfg.parameters, cfg.bundle_dir, cfg.signing_key)
                url = self._announce(info, installed.get("metrics") or {})
                db_state.mark_published(conn, version, url=url, sha256=info.sha256, size=info.bytes)
                _LOG.info("announced %s, which an earlier run had installed but not announced", version)

    def _announce(self, info: BundleInfo, metrics: dict[str, Any]) -> str:
        """Check the bundle answers at its public URL, then publish the retained update message."""
        from .publish import Announcer, UpdateMessage, bundle_url

        cfg = self.cfg
        shipped = {k: v for k, v in metrics.items() if k.endswith("hr@10") or k == "through_day"}
        message = UpdateMessage(version=info.version, url=bundle_url(cfg.public_url, info.version),
                                sha256=info.sha256, created_at=info.created_at, metrics=shipped, size=info.bytes)
        Announcer(cfg.broker, prefix=cfg.prefix).announce(message)
        return message.url

    def _prune(self, conn: Any) -> None:
        """Keep the generation in force and the one before; candidates only while pending."""
        current = db_state.read_state(conn)
        if current is not None and self.generations.exists():
            gens = sorted((p for p in self.generations.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
            keep = {current.generation}
            older = [p for p in gens if p.name != current.generation]
            if older:
                keep.add(older[-1].name)
            for p in gens:
                if p.name not in keep:
                    shutil.rmtree(p, ignore_errors=True)
        if self.candidates.exists():
            pending = set(db_state.pending_versions(conn))
            for p in self.candidates.iterdir():
                if p.name not in pending:
                    shutil.rmtree(p, ignore_errors=True)
        try:
            from .serve import prune_bundles

            published = db_state.published_version(conn)
            prune_bundles(self.cfg.bundle_dir, self.cfg.keep_bundles, {published} if published else set())
        except OSError as exc:
            _LOG.warning("could not prune bundles: %s", exc)


def load_public_key_from_private(path: Path) -> Any:
    """The server checks its published parameters with the public half of its own key."""
    from .sign import load_private_key

    return load_private_key(path).public_key()


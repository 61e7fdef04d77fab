"""``retrain-server``: keys, training, the database, the nightly job, serving, evaluation.

Only here is logging configured. Every :class:`~retrain_server.errors.RetrainError`
ends in one line on stderr and its ``exit_code`` (2 config/data, 4 database,
5 gate refused, 6 publishing); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from .errors import ConfigError, GateRefused, RetrainError

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # onnxruntime (export, quantization) phones home otherwise

_LOG = logging.getLogger("retrain_server")

__all__ = ["build_parser", "main"]


def _cmd_keygen(args: argparse.Namespace) -> int:
    from .sign import keygen

    key, pub = keygen(args.out)
    print(f"wrote {key} (private, mode 600) and {pub}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from . import synth

    argv = ["--out", str(args.out), "--seed", str(args.seed)]
    if args.large:
        argv.append("--large")
    return synth.main(argv)


def _cmd_train(args: argparse.Namespace) -> int:
    for flag in ("products", "purchases"):
        if not getattr(args, flag).is_file():
            raise SystemExit(f"retrain-server train: --{flag}: no such file {getattr(args, flag)}")
    if args.signing_key is None and not args.allow_unsigned:
        raise SystemExit("retrain-server train: --signing-key is required "
                         "(or --allow-unsigned for development)")
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit("retrain-server train: --epochs must be at least 1")
    if args.signing_key is not None and not args.signing_key.is_file():
        raise SystemExit(f"retrain-server train: --signing-key: no such file {args.signing_key}")
    from .train import DEFAULT_RERANK_DAYS, train_bundle

    if args.rerank_days is not None and args.rerank_days < 0:
        raise SystemExit("retrain-server train: --rerank-days must be >= 0")
    doc = train_bundle(args.products, args.purchases, args.out, args.signing_key,
                       member=not args.guest_only, epochs=args.epochs, checkpoint_dir=args.checkpoint_dir,
                       rerank_days=DEFAULT_RERANK_DAYS if args.rerank_days is None else args.rerank_days)
    print(f"trained parameters {doc['version']} -> {args.out} "
          f"({len(doc['files'])} files, models: {', '.join(doc['models'])})")
    return 0


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from agent.config import parse_hostport

    overrides: dict[str, Any] = {
        "database.dsn": getattr(args, "dsn", None), "prefix": getattr(args, "prefix", None),
        "parameters": _str(getattr(args, "parameters", None)), "state_dir": _str(getattr(args, "state_dir", None)),
        "bundle_dir": _str(getattr(args, "bundle_dir", None)),
        "signing_key": _str(getattr(args, "signing_key", None)), "http.port": getattr(args, "http_port", None),
        "public_url": getattr(args, "public_url", None), "log_level": getattr(args, "log_level_cfg", None)}
    if getattr(args, "broker", None):
        try:
            host, port = parse_hostport(args.broker)
        except ValueError as exc:
            raise ConfigError(f"--broker: {exc}") from None
        overrides.update({"broker.host": host, "broker.port": port})
    return overrides


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _load(args: argparse.Namespace) -> Any:
    from .config import load_config

    cfg = load_config(args.config, _config_overrides(args))
    logging.getLogger().setLevel(cfg.log_level if args.log_level == "INFO" else args.log_level)
    _LOG.debug("configuration: %s", cfg.redacted())
    return cfg


def _dsn(args: argparse.Namespace) -> str:
    """The DSN for ``db`` commands: --dsn, else the config file's, else RETRAIN_DB_DSN."""
    if args.dsn:
        return args.dsn
    if args.config is not None:
        from .config import read_yaml

        dsn = (read_yaml(args.config).get("database") or {}).get("dsn")
        if dsn:
            return str(dsn)
    if os.environ.get("RETRAIN_DB_DSN"):
        return os.environ["RETRAIN_DB_DSN"]
    raise ConfigError("no database: give --dsn, --config with database.dsn, or RETRAIN_DB_DSN")


def _cmd_db(args: argparse.Namespace) -> int:
    from .sources import postgres

    conn = postgres.connect(_dsn(args))
    try:
        applied = postgres.migrate(conn)
        if args.db_command == "init":
            print(f"schema ready (versions {postgres.schema_versions(conn)}; applied now: {applied or 'none'})")
            return 0
        for flag in ("products", "purchases"):
            if not getattr(args, flag).is_file():
                raise ConfigError(f"--{flag}: no such file {getattr(args, flag)}")
        counts = postgres.load_files(conn, args.products, args.purchases)
        print("loaded " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return 0
    finally:
        conn.close()


def _parse_day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def _cmd_nightly(args: argparse.Namespace) -> int:
    from .nightly import NightlyJob, yesterday

    cfg = _load(args)
    last = yesterday(cfg.timezone)
    if args.date is not None and args.date > last:  # its later purchases would never be counted: the watermark
        raise ConfigError(f"--date {args.date} is not over yet in {cfg.timezone}: the last complete day is {last}")
    result = NightlyJob(cfg).run(args.date, full=True if args.full else None)
    print(result.summary())
    if result.version is not None and not result.published:
        return GateRefused.exit_code
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .console import AgentDirectory, add_console_routes
    from .nightly import NightlyJob
    from .serve import BundleServer, Scheduler, create_app, next_run, ttl_cached
    from .sources import postgres
    from .state import model_history, published_version

    cfg = _load(args)
    job = NightlyJob(cfg)
    cfg.bundle_dir.mkdir(parents=True, exist_ok=True)
    scheduler = Scheduler(lambda: job.run(), cfg.schedule_at, cfg.schedule_timezone)

    def health() -> dict[str, Any]:
        upcoming = None
        if cfg.schedule_enabled:
            upcoming = scheduler.next_run_at or next_run(datetime.now(timezone.utc), cfg.schedule_at,
                                                         cfg.schedule_timezone)
        doc: dict[str, Any] = {"status": "ok", "published": None, "last_run": None, "last_refusal": None,
                               "next_run_at": upcoming.isoformat() if upcoming else None,
                               "last_error": scheduler.last_error}
        try:
            conn = postgres.connect(cfg.dsn, connect_timeout=3)
        except RetrainError as exc:  # unauthenticated: the log has the reason, which may name the address
            _LOG.warning("health: %s", exc)
            return {**doc, "status": "degraded", "database": "unreachable (the server's log says why)"}
        try:
            history = model_history(conn, 30)
            doc["published"] = published_version(conn)
        finally:
            conn.close()
        doc["last_run"] = history[0] if history else None
        doc["last_refusal"] = next((h for h in history if h["reason"]), None)
        if doc["last_run"] and doc["last_run"]["reason"]:
            doc["status"] = "degraded"  # the newest candidate was refused: someone should look
        if scheduler.last_error:
            doc["status"] = "degraded"
        return doc

    def models() -> list[dict[str, Any]]:
        conn = postgres.connect(cfg.dsn, connect_timeout=3)
        try:
            return model_history(conn, 100)
        finally:
            conn.close()

    # one PostgreSQL connection a second at most, however many ask (both routes are unauthenticated)
    health, models = ttl_cached(health, 1.0), ttl_cached(models, 1.0)
    app = create_app(cfg.bundle_dir, health)
    # The operations console (contract §9) on the same port: agents from their retained statuses,
    # the nightly history from PostgreSQL. Read-only.
    directory = AgentDirectory.from_config(cfg)
    add_console_routes(app, directory, models)
    server = BundleServer(app, cfg.http_host, cfg.http_port)
    server.start()
    directory.start()
    conn = postgres.connect(cfg.dsn)
    try:
        postgres.migrate(conn)
        job.finish_interrupted(conn)
    except RetrainError as exc:
        _LOG.error("could not finish an interrupted publication: %s", exc)
    except Exception:  # the bundles are served anyway; the next nightly run tries again
        _LOG.exception("could not finish an interrupted publication")
    finally:
        conn.close()
    if cfg.schedule_enabled:
        scheduler.start()
    else:
        _LOG.info("schedule disabled: run 'retrain-server nightly' from a timer")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: done.set())
    _LOG.info("retrain server: bundles at %s/bundles/, health at %s/health, operations console at %s/",
              server.url, server.url, server.url)
    try:
        while not done.wait(1.0):
            pass
    finally:
        scheduler.stop()
        directory.stop()
        server.stop()
    return 0


def _cmd_evaluate(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from . import evaluate

    return evaluate.main(list(rest))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="retrain-server",
                                 description="Smart Basket training server: keys, training, evaluation.")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="write an Ed25519 key pair (signing.key, signing.pub)")
    p.add_argument("--out", type=Path, required=True, help="directory for the key files")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("train", help="full training of both models from the seed's files")
    p.add_argument("--products", type=Path, required=True, help="products.csv")
    p.add_argument("--purchases", type=Path, required=True, help="purchase_history.jsonl")
    p.add_argument("--out", type=Path, required=True, help="parameters directory to write")
    p.add_argument("--signing-key", type=Path, help="Ed25519 private key (retrain-server keygen)")
    p.add_argument("--allow-unsigned", action="store_true", help="development: write an unsigned manifest")
    p.add_argument("--guest-only", action="store_true", help="skip the member (Two-Tower) model")
    p.add_argument("--epochs", type=int, help="member model epochs (default 3; the seed used 1)")
    p.add_argument("--checkpoint-dir", type=Path,
                   help="where the member model's TF checkpoint goes (default: OUT.checkpoint, beside the bundle)")
    p.add_argument("--rerank-days", type=float, default=None,
                   help="days of the newest purchases the member reranker learns from (default 30, at most a "
                        "quarter of the data's span; 0: no reranker). Trains a second Two-Tower model on the "
                        "purchases before them")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("db", help="the PostgreSQL schema and bulk loads")
    dbsub = p.add_subparsers(dest="db_command", required=True)
    for name, text in (("init", "create or upgrade the schema (idempotent)"),
                       ("load", "bulk-load products.csv + purchase_history.jsonl (COPY)")):
        q = dbsub.add_parser(name, help=text)
        q.add_argument("--dsn", help="PostgreSQL DSN (default: --config's database.dsn, env RETRAIN_DB_DSN)")
        q.add_argument("--config", type=Path, help="retrain.yaml (for database.dsn)")
        if name == "load":
            q.add_argument("--products", type=Path, required=True, help="products.csv")
            q.add_argument("--purchases", type=Path, required=True, help="purchase_history.jsonl")
        q.set_defaults(func=_cmd_db)

    for name, text in (("nightly", "one nightly retrain for a day (default: yesterday), gate, sign, publish"),
                       ("serve", "long-running: bundle HTTP server, nightly schedule, publisher")):
        p = sub.add_parser(name, help=text, description=text + ". Flags override the config file.")
        p.add_argument("--config", type=Path, help="retrain.yaml (see config/retrain.yaml)")
        if name == "nightly":
            p.add_argument("--date", type=_parse_day, help="the day to count, YYYY-MM-DD (store time zone)")
            p.add_argument("--full", action="store_true",
                           help="train the member model from scratch on every purchase (not fine-tune); gated "
                                "like any night (default: when training.full_retrain_days have passed)")
        p.add_argument("--dsn", help="PostgreSQL DSN (prefer env RETRAIN_DB_DSN: it may hold a password)")
        p.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker for the update message")
        p.add_argument("--prefix", help="topic prefix")
        p.add_argument("--parameters", type=Path, help="published parameters directory")
        p.add_argument("--state-dir", type=Path, help="server state: counts, checkpoint, candidates")
        p.add_argument("--signing-key", type=Path, help="Ed25519 private key")
        p.add_argument("--bundle-dir", type=Path, help="where bundles are written and served from")
        p.add_argument("--http-port", type=int, help="bundle server port")
        p.add_argument("--public-url", help="base URL of the bundle server as baskets reach it")
        p.set_defaults(func=_cmd_nightly if name == "nightly" else _cmd_serve)

    p = sub.add_parser("synth", help="write a synthetic store in the seed's formats")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--large", action="store_true", help="50,000 products, 1,000,000 rows")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("evaluate", add_help=False,
                       help="Complete Journey evaluation (see 'retrain-server evaluate --help')")
    p.set_defaults(func=None)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "evaluate":
        return _cmd_evaluate(args, rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args))
    except RetrainError as exc:
        print(f"retrain-server {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (OSError, ValueError) as exc:  # FileExistsError is an OSError
        print(f"retrain-server {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

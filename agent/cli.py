"""``basket-agent``: the MQTT agent (``run``) and the standalone HTTP bridge (``bridge``).

Only here is logging configured. Errors a user can fix (bad config, bad
parameters) end in one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import os

# Batch-1 inference: one BLAS thread is fastest and leaves the other cores to
# the network loop and the HTTP bridge. Must be set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .bundle import load_public_key
from .config import AgentConfig, load_config, parse_hostport
from .errors import AgentError, BundleError, ConfigError
from .metrics import Metrics
from .registry import ModelRegistry, ModelSnapshot, load_snapshot

_LOG = logging.getLogger("agent")

EXIT_CONFIG = 2
EXIT_MODELS = 3


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def load_models(cfg: AgentConfig) -> ModelSnapshot:
    key = load_public_key(cfg.public_key) if cfg.public_key is not None else None
    overrides = {"repeat_weight": cfg.member.repeat_weight, "co_weight": cfg.member.co_weight,
                 "threads": cfg.member.threads}
    return load_snapshot(cfg.parameters, key, allow_unsigned=cfg.allow_unsigned,
                         guest_params=cfg.guest, member_overrides=overrides)


def _cmd_run(args: argparse.Namespace) -> int:
    from .service import AgentService, AgentSettings

    # paho's network thread and the worker share the GIL; with the default 5 ms
    # switch interval a message can wait a whole interval for the other thread.
    sys.setswitchinterval(0.0005)

    overrides: dict[str, Any] = {
        "prefix": args.prefix, "agent_id": args.agent_id,
        "parameters": str(args.parameters) if args.parameters else None,
        "public_key": str(args.public_key) if args.public_key else None,
        "http.port": args.http_port, "broker.protocol": args.protocol, "log_level": args.log_level,
        "allow_unsigned": True if args.allow_unsigned else None,
    }
    if args.broker:
        try:
            host, port = parse_hostport(args.broker)
        except ValueError as exc:
            raise ConfigError(f"--broker: {exc}") from None
        overrides.update({"broker.host": host, "broker.port": port})
    cfg = load_config(args.config, overrides)
    _configure_logging(cfg.log_level)
    _LOG.debug("configuration: %s", cfg.redacted())
    registry = ModelRegistry(load_models(cfg))
    metrics = Metrics()
    service = AgentService(registry, AgentSettings.from_config(cfg), metrics=metrics)
    bridge = None
    if cfg.http_port:
        from .http import HttpBridge, create_app  # FastAPI costs ~30 MB: only when enabled

        bridge = HttpBridge(create_app(registry, metrics, cfg.limits), cfg.http_host, cfg.http_port)
        bridge.start()
        _LOG.info("HTTP bridge on http://%s:%d", cfg.http_host, cfg.http_port)
    _LOG.info("agent %s: broker %s:%d (MQTT %s), prefix %s", cfg.agent_id, cfg.broker.host,
              cfg.broker.port, cfg.broker.protocol, cfg.prefix)
    try:
        service.run_forever()
    finally:
        if bridge is not None:
            bridge.stop()
    return 0


def _cmd_bridge(args: argparse.Namespace) -> int:
    import uvicorn

    from .http import create_app

    cfg = load_config(None, {
        "broker.host": "unused", "agent_id": "bridge", "parameters": str(args.parameters),
        "public_key": str(args.public_key) if args.public_key else None,
        "allow_unsigned": True if args.allow_unsigned else None, "log_level": args.log_level})
    _configure_logging(cfg.log_level)
    registry = ModelRegistry(load_models(cfg))
    app = create_app(registry, Metrics(), cfg.limits)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="basket-agent",
                                 description="Smart Basket edge agent: cart events in, recommendations out.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the MQTT agent (and the HTTP bridge when http.port is set)",
                       description="Serve cart events from MQTT. Flags override the config file; "
                                   "without a file the flags must say enough (broker, agent id, "
                                   "parameters, public key).")
    p.add_argument("--config", type=Path, help="YAML config (see config/agent.yaml)")
    p.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker")
    p.add_argument("--protocol", choices=["5", "3.1.1"], help="MQTT protocol version (default 5)")
    p.add_argument("--prefix", help="topic prefix, e.g. smartbasket/store-17")
    p.add_argument("--agent-id", help="this agent's id")
    p.add_argument("--parameters", type=Path, help="parameters directory")
    p.add_argument("--public-key", type=Path, help="Ed25519 public key (signing.pub)")
    p.add_argument("--http-port", type=int, help="HTTP bridge port; 0 = no bridge")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="development only: accept unsigned parameters (logs a warning)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bridge", help="the HTTP bridge alone")
    p.add_argument("--parameters", type=Path, required=True, help="parameters directory")
    p.add_argument("--public-key", type=Path, help="Ed25519 public key (signing.pub)")
    p.add_argument("--allow-unsigned", action="store_true", help="development only")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_cmd_bridge)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"basket-agent {args.command}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BundleError as exc:
        print(f"basket-agent {args.command}: cannot load models: {exc}", file=sys.stderr)
        return EXIT_MODELS
    except AgentError as exc:
        print(f"basket-agent {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

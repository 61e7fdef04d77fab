"""``basket-agent``: the MQTT agent (``run``) and the standalone HTTP bridge (``bridge``).

Only here is logging configured. Errors a user can fix (bad config, bad
parameters) end in one line on stderr and a non-zero exit (2 config, 3 models).

Both commands load the newest verified version of the parameters directory
(:class:`agent.store.VersionStore`: the top-level bundle and ``versions/*``),
falling back to an older one when the newest is corrupt, and follow model
updates on ``PREFIX/models/updated`` (:class:`agent.updater.Updater`); the
bridge only when given ``--broker``.
"""

from __future__ import annotations

import os

# Batch-1 inference: one BLAS thread is fastest and leaves the other cores to
# the network loop and the HTTP bridge. Must be set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # onnxruntime sends usage telemetry otherwise

import argparse
import dataclasses
import logging
import queue
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bundle import load_public_key
from .config import AgentConfig, HttpConfig, load_config, parse_hostport
from .errors import AgentError, BundleError, ConfigError
from .metrics import Metrics
from .recommenders import native
from .registry import ModelRegistry, ModelSnapshot, load_snapshot
from .store import StartupResult, VersionStore
from .updater import ReportFn, Updater

if TYPE_CHECKING:
    from .http import Readiness
    from .service import AgentService

_LOG = logging.getLogger("agent")

__all__ = ["main", "build_parser", "make_loader", "make_store", "load_models", "make_updater",
           "startup_rejection", "EXIT_CONFIG", "EXIT_MODELS"]

EXIT_CONFIG = 2
EXIT_MODELS = 3


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def make_loader(cfg: AgentConfig, store: VersionStore | None = None) -> Callable[[Path], ModelSnapshot]:
    """Verify + load + smoke-test one version directory, the same way at start-up and on update.

    ``store`` (default: :func:`make_store`) says which directories it installed: those are mapped.
    """
    key = load_public_key(cfg.public_key) if cfg.public_key is not None else None
    overrides = {**cfg.member.weights(), "threads": cfg.member.threads, "rerank": cfg.member.rerank}

    store = store or make_store(cfg)

    def load(root: Path) -> ModelSnapshot:
        # versions the store installed are never rewritten: their files are memory-mapped
        return load_snapshot(root, key, allow_unsigned=cfg.allow_unsigned, guest_params=cfg.guest,
                             member_overrides=overrides, map_files=store.owns(root))

    return load


def make_store(cfg: AgentConfig) -> VersionStore:
    b = cfg.updates.max_bundle_bytes
    return VersionStore(cfg.parameters, keep_versions=cfg.updates.keep_versions,
                        max_file_bytes=2 * b, max_total_bytes=4 * b)


def load_models(cfg: AgentConfig, store: VersionStore | None = None,
                loader: Callable[[Path], ModelSnapshot] | None = None) -> StartupResult:
    """The newest version that verifies; raises BundleError when none does."""
    store = store or make_store(cfg)
    try:
        store.cleanup()
    except OSError as exc:  # a read-only parameters dir still serves; it just cannot update
        _LOG.warning("cannot clean %s: %s", store.versions, exc)
    return store.load_newest(loader or make_loader(cfg, store))


def startup_rejection(result: StartupResult) -> tuple[str, str] | None:
    """(version, reason) of the newest version skipped at start-up, for the status' last_update."""
    if not result.rejected:
        return None
    cand, reason = result.rejected[0]
    return cand.version, f"at start-up: {reason} (serving {result.candidate.version})"


def make_updater(cfg: AgentConfig, store: VersionStore, registry: ModelRegistry,
                 loader: Callable[[Path], ModelSnapshot], report: ReportFn | None) -> Updater:
    u = cfg.updates
    return Updater(store, registry, loader, report, jitter_s=u.jitter_s, max_bundle_bytes=u.max_bundle_bytes,
                   timeout_s=u.download_timeout_s)


def _cmd_run(args: argparse.Namespace) -> int:
    from .service import AgentService

    # paho's network thread and the worker share the GIL; with the default 5 ms
    # switch interval a message can wait a whole interval for the other thread.
    sys.setswitchinterval(0.0005)

    overrides: dict[str, Any] = {
        "prefix": args.prefix, "agent_id": args.agent_id,
        "parameters": str(args.parameters) if args.parameters else None,
        "public_key": str(args.public_key) if args.public_key else None,
        "http.port": args.http_port, "broker.protocol": args.protocol, "log_level": args.log_level,
        "allow_unsigned": True if args.allow_unsigned else None,
        "updates.jitter_s": args.update_jitter_s,
    }
    overrides.update(_broker_overrides(args.broker))
    cfg = load_config(args.config, overrides)
    assert cfg.service is not None  # require_broker (the default): a broker and an agent id
    _configure_logging(cfg.log_level)
    import faulthandler

    faulthandler.enable()  # the watchdog's SIGABRT dumps every thread's traceback to the journal
    _LOG.debug("configuration: %s", cfg.redacted())
    store = make_store(cfg)
    loader = make_loader(cfg, store)
    started = load_models(cfg, store, loader)
    registry = ModelRegistry(started.snapshot)
    metrics = Metrics()
    service = AgentService(registry, cfg.service, metrics=metrics)
    skipped = startup_rejection(started)
    if skipped is not None:
        service.report_update(skipped[0], "rejected", skipped[1])
    if cfg.updates.enabled:
        service.attach_updater(make_updater(cfg, store, registry, loader, service.report_update))
        _LOG.info("following model updates on %s (jitter up to %g s)", service.topics.models_updated,
                  cfg.updates.jitter_s)
    else:
        _LOG.info("model updates disabled (updates.enabled: false)")
    bridge = None
    if cfg.http.port:
        from .display import DisplayHub
        from .http import HttpBridge, create_app  # FastAPI costs ~30 MB: only when enabled

        http = _http_config(cfg.http)
        # The basket display: every answer the worker publishes also goes to the page's event stream.
        # Streams get at most 3/4 of the connections, so /recommend and /health always have room.
        hub = DisplayHub(max_baskets=cfg.service.baskets.max_baskets,
                         max_subscribers=max(1, http.max_connections * 3 // 4))
        service.add_answer_listener(hub.publish)
        app = create_app(registry, metrics, cfg.limits, display=hub, readiness=_readiness(service),
                         settings=http)
        bridge = HttpBridge(app, http.host, http.port, http)
        bridge.start()
        _LOG.info("HTTP bridge on http://%s:%d (basket display: /display/<basket id>)", http.host, http.port)
    b = cfg.service.broker
    _LOG.info("agent %s: broker %s:%d (MQTT %s), prefix %s; recommenders: %s", cfg.service.agent_id, b.host,
              b.port, b.protocol, cfg.prefix, native.status())
    try:
        service.run_forever()
    finally:
        if bridge is not None:
            bridge.stop()
    return 0


def _http_config(http: HttpConfig) -> HttpConfig:
    """``http.*`` with the ``Host`` names to accept completed (:func:`agent.http.allowed_hosts_for`: the
    configured ones, the bind address, the loopback names). Raises ConfigError (exit 2) for a
    wildcard bind without configured names.
    """
    from .http import allowed_hosts_for

    return dataclasses.replace(http, allowed_hosts=allowed_hosts_for(http.host, http.allowed_hosts or ()))


def _readiness(service: AgentService) -> Readiness:
    """What /health reports of the MQTT side; not ready (503) unless both connections are up and the
    broker granted every subscription (a refused cart subscription would leave the agent idle)."""
    def ready() -> dict[str, Any]:
        events, answers = service.mqtt, service.out
        return {"ready": events.connected and answers.connected and not events.refused,
                "mqtt": {"connected": events.connected and answers.connected, "events_connection": events.connected,
                         "refused_subscriptions": list(events.refused),
                         "answers_connection": answers.connected, "queue_depth": events.queue_depth,
                         "unacked": events.unacked, "reading_paused": events.paused,
                         "broker_dropped": events.broker_dropped}}

    return ready


def _broker_overrides(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        host, port = parse_hostport(value)
    except ValueError as exc:
        raise ConfigError(f"--broker: {exc}") from None
    return {"broker.host": host, "broker.port": port}


class _BridgeUpdates:
    """The standalone bridge's MQTT side: subscribed to models/updated only, feeding an Updater."""

    def __init__(self, cfg: AgentConfig, updater: Updater) -> None:
        from .mqtt import MqttClient
        from .topics import Topics

        assert cfg.broker is not None
        self.updater = updater
        self.topic = Topics(cfg.prefix).models_updated
        self.mqtt = MqttClient.for_broker(cfg.broker, client_id=f"smartbasket-bridge-{uuid.uuid4().hex[:8]}",
                                          subscriptions=[(self.topic, 1)], queue_size=16)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="bridge-updates", daemon=True)

    def start(self) -> None:
        self.updater.start()
        self._thread.start()
        self.mqtt.start()
        _LOG.info("following model updates on %s at %s:%d", self.topic, self.mqtt.host, self.mqtt.port)

    def stop(self) -> None:
        self._stop.set()
        self.mqtt.stop()
        self._thread.join(2)
        self.updater.stop()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.mqtt.messages.get(timeout=0.5)
            except queue.Empty:
                continue
            if msg.topic == self.topic:
                self.updater.submit(msg.payload, msg.received)


def _log_update(version: Any, result: str, reason: Any) -> None:
    _LOG.info("model update %s: %s%s", version, result, f" ({reason})" if reason else "")


def _cmd_bridge(args: argparse.Namespace) -> int:
    from .http import create_app, make_server, server_config

    overrides: dict[str, Any] = {
        "parameters": str(args.parameters), "public_key": str(args.public_key) if args.public_key else None,
        "allow_unsigned": True if args.allow_unsigned else None, "log_level": args.log_level,
        "prefix": args.prefix, "updates.jitter_s": args.update_jitter_s, "http.host": args.host,
        "http.port": args.port}
    overrides.update(_broker_overrides(args.broker))
    # a broker only from --broker (not from BASKET_MQTT_HOST); the credentials may come from the environment
    env = {k: v for k, v in os.environ.items() if k != "BASKET_MQTT_HOST"}
    cfg = load_config(None, overrides, env, require_broker=False)
    _configure_logging(cfg.log_level)
    store = make_store(cfg)
    loader = make_loader(cfg, store)
    started = load_models(cfg, store, loader)
    registry = ModelRegistry(started.snapshot)
    follower = None
    if cfg.broker is not None and cfg.updates.enabled:
        follower = _BridgeUpdates(cfg, make_updater(cfg, store, registry, loader, _log_update))
        follower.start()
    http = _http_config(cfg.http)
    app = create_app(registry, Metrics(), cfg.limits, settings=http)
    try:
        make_server(server_config(app, http.host, http.port, http)).run()
    finally:
        if follower is not None:
            follower.stop()
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
    p.add_argument("--update-jitter-s", type=_seconds, metavar="S",
                   help="longest random wait before downloading a model update; 0 = none (default 30)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bridge", help="the HTTP bridge alone")
    p.add_argument("--parameters", type=Path, required=True, help="parameters directory")
    p.add_argument("--public-key", type=Path, help="Ed25519 public key (signing.pub)")
    p.add_argument("--allow-unsigned", action="store_true", help="development only")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--broker", metavar="HOST:PORT",
                   help="follow model updates on PREFIX/models/updated from this MQTT broker")
    p.add_argument("--prefix", help="topic prefix, e.g. smartbasket/store-17 (with --broker)")
    p.add_argument("--update-jitter-s", type=_seconds, metavar="S",
                   help="longest random wait before downloading a model update; 0 = none (default 30)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_cmd_bridge)
    return ap


def _seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not s >= 0 or s == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value!r}")
    return s


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

"""The retrain server's configuration (``config/retrain.yaml``), validated like the agent's.

Every key is described in :data:`SCHEMA_DOC` (also in the README). Things that
matter have no silent default: the database DSN, the directories, the signing
key, the broker and the public URL must be given (file, flags or environment).
All problems are collected into one :class:`~retrain_server.errors.ConfigError`.
Secrets come from the environment (``RETRAIN_DB_DSN``, ``RETRAIN_MQTT_USERNAME``,
``RETRAIN_MQTT_PASSWORD``) and :meth:`RetrainConfig.redacted` masks them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.config import BrokerConfig, ConfigReader, deep_copy, field_default, read_broker, read_section, set_dotted
from agent.topics import validate_prefix

from .counts import Decay
from .errors import ConfigError
from .guest import GuestTrainingConfig

_LOG = logging.getLogger(__name__)

__all__ = ["RetrainConfig", "GateConfig", "load_config", "read_yaml", "parse_config", "SCHEMA_DOC"]

SCHEMA_DOC = """\
database.dsn           PostgreSQL DSN (required; env RETRAIN_DB_DSN; its password is never logged)
broker.host            MQTT broker for the update message (required; env RETRAIN_MQTT_HOST)
broker.port / protocol / keepalive / username / password / tls.*   as in agent.yaml
                       (env RETRAIN_MQTT_USERNAME, RETRAIN_MQTT_PASSWORD)
prefix                 topic prefix, default "smartbasket"
parameters             the published models, the seed's full layout (required)
state_dir              cumulative counts, member checkpoint, candidates (required)
bundle_dir             signed <version>.tar.gz bundles served to baskets (required)
signing_key            Ed25519 private key (required)
public_url             base URL baskets download bundles from, e.g. http://retrain-host:8700 (required)
http.host / http.port  bundle server + /health, default 127.0.0.1:8700
timezone               the store's day boundary, default Asia/Seoul
schedule.enabled       serve runs the nightly job itself, default true (false: use the systemd timer)
schedule.at            local time of the nightly run in schedule.timezone, default "03:00"
schedule.timezone      default Asia/Seoul
gate.tolerance         refuse a candidate whose HR@10 (guest or member) is lower by more than this, default 0.02
gate.holdout_percent   share of the newest day's sessions held out for the gate (learned next night), default 10
gate.min_cases         fewer held-out questions than this: publish without comparing, default 30
bundles.keep           bundles kept on disk (never the published one), default 5
training.member        train the member (Two-Tower) model, default true
training.epochs        epochs of a full member training (first run), default 3
training.fine_tune_epochs   epochs of the nightly fine-tuning, default 1
training.fine_tune_learning_rate   Adagrad rate of the fine-tuning, default 0.02 (full training: 0.1)
training.fine_tune_min_steps   gradient steps per fine-tuning epoch at least (smaller batches), default 20
training.full_retrain_days   train the member model from scratch on every purchase in the database (gated like
                       any night) once its last full training is this many days old, default 7 (0: never;
                       nightly fine-tuning alone drifts a little each night); `nightly --full` forces it
training.rerank_days   days of the newest purchases the member reranker learns from, default 30 (at most a
                       quarter of the data's span; 0: no reranker, the blend alone ranks). Fitted on the
                       nights that train from scratch, with a second Two-Tower model trained on the
                       purchases before those days; the nights in between ship the same trees
guest_training.*       co_neighbors, sim_neighbors, popularity_alpha, cart_alpha, min_co_count, n_popular,
                       recent_baskets (50000; 0 = no recent-basket table), basket_postings (1000)
decay.history_half_life_days   half-life of a member's own purchases in the counts (repeat term, history
                       tables), default 30; 0 = no decay
decay.co_half_life_days        half-life of co-purchase and per-product counts (guest tables, co-purchase
                       term), default 0 = no decay
log_level              DEBUG | INFO (default) | WARNING | ERROR
"""


@dataclass(frozen=True)
class GateConfig:
    tolerance: float = 0.02
    holdout_percent: float = 10.0
    min_cases: int = 30


@dataclass(frozen=True)
class RetrainConfig:
    dsn: str = field(repr=False)
    broker: BrokerConfig
    parameters: Path
    state_dir: Path
    bundle_dir: Path
    signing_key: Path
    public_url: str
    prefix: str = "smartbasket"
    http_host: str = "127.0.0.1"
    http_port: int = 8700
    timezone: str = "Asia/Seoul"
    schedule_enabled: bool = True
    schedule_at: str = "03:00"
    schedule_timezone: str = "Asia/Seoul"
    gate: GateConfig = GateConfig()
    keep_bundles: int = 5
    train_member: bool = True
    epochs: int = 3
    fine_tune_epochs: int = 1
    fine_tune_learning_rate: float = 0.02
    fine_tune_min_steps: int = 20
    full_retrain_days: int = 7  # member model trained from scratch when its last full training is this old
    rerank_days: float = 30.0  # the member reranker's learning window (0: no reranker)
    guest_training: GuestTrainingConfig = GuestTrainingConfig()
    decay: Decay = Decay()
    log_level: str = "INFO"

    def redacted(self) -> dict[str, Any]:
        """The config as a dict with secrets masked, for logging."""
        from .sources.postgres import redact_dsn

        d = dataclasses.asdict(self)
        d["dsn"] = redact_dsn(self.dsn)
        if d["broker"].get("password"):
            d["broker"]["password"] = "***"
        return d


def parse_config(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, base_dir: Path | None = None) -> RetrainConfig:
    """Validate ``data`` (parsed YAML) with CLI ``overrides`` (dotted keys) and the environment."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = deep_copy(data)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(merged, key, value)
    for key, var in (("database.dsn", "RETRAIN_DB_DSN"), ("broker.host", "RETRAIN_MQTT_HOST"),
                     ("broker.username", "RETRAIN_MQTT_USERNAME"), ("broker.password", "RETRAIN_MQTT_PASSWORD")):
        if env.get(var) and not (overrides or {}).get(key):
            set_dotted(merged, key, env[var])
    r = ConfigReader(merged)
    base = base_dir or Path.cwd()

    def path(key: str) -> Path:
        value = r.get(key, str, required=True)
        return Path() if value is None else (Path(value) if Path(value).is_absolute() else base / value)

    dsn = r.get("database.dsn", str, "", required=True)
    broker = read_broker(r, agent_keys=False)  # the agent's keys and checks, without its session keys
    d = RetrainConfig  # the defaults: its fields'
    prefix = r.get("prefix", str, field_default(d, "prefix"))
    try:
        prefix = validate_prefix(prefix)
    except ValueError as exc:
        r.problems.append(f"prefix: {exc}")
    parameters, state_dir, bundle_dir = path("parameters"), path("state_dir"), path("bundle_dir")
    signing_key = path("signing_key")
    if r.get("signing_key", str) and not signing_key.is_file():
        r.problems.append(f"signing_key: no such file {signing_key}")
    public_url = r.get("public_url", str, "", required=True)
    if public_url and not re.match(r"^https?://[^/\s]+", public_url):
        r.problems.append(f"public_url must be an http(s) URL, got {public_url!r}")
    http_port = r.get("http.port", int, field_default(d, "http_port"), minimum=0)
    if http_port is not None and http_port > 65535:
        r.problems.append(f"http.port must be <= 65535, got {http_port}")
    tz = r.get("timezone", str, field_default(d, "timezone"))
    sched_tz = r.get("schedule.timezone", str, field_default(d, "schedule_timezone"))
    for key, value in (("timezone", tz), ("schedule.timezone", sched_tz)):
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            r.problems.append(f"{key}: unknown time zone {value!r}")
    at = r.get("schedule.at", str, field_default(d, "schedule_at"))
    if not re.match(r"^([01]\d|2[0-3]):[0-5]\d$", at or ""):
        r.problems.append(f"schedule.at must be HH:MM, got {at!r}")
    gate = GateConfig(**read_section(r, "gate", GateConfig, tolerance=0, holdout_percent=0, min_cases=1))
    if gate.holdout_percent >= 100:
        r.problems.append("gate.holdout_percent must be below 100")
    guest_kwargs = read_section(r, "guest_training", GuestTrainingConfig,
                            **{f.name: 0 for f in dataclasses.fields(GuestTrainingConfig)})
    decay_kwargs = read_section(r, "decay", Decay, history_half_life_days=0, co_half_life_days=0)
    log_level = str(r.get("log_level", str, field_default(d, "log_level"))).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        r.problems.append(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    cfg_kwargs = dict(
        dsn=dsn, broker=broker, parameters=parameters, state_dir=state_dir, bundle_dir=bundle_dir,
        signing_key=signing_key, public_url=(public_url or "").rstrip("/"), prefix=prefix,
        http_host=r.get("http.host", str, field_default(d, "http_host")), http_port=http_port, timezone=tz,
        schedule_enabled=r.get("schedule.enabled", bool, field_default(d, "schedule_enabled")), schedule_at=at,
        schedule_timezone=sched_tz, gate=gate,
        keep_bundles=r.get("bundles.keep", int, field_default(d, "keep_bundles"), minimum=1),
        train_member=r.get("training.member", bool, field_default(d, "train_member")),
        epochs=r.get("training.epochs", int, field_default(d, "epochs"), minimum=1),
        fine_tune_epochs=r.get("training.fine_tune_epochs", int, field_default(d, "fine_tune_epochs"), minimum=1),
        fine_tune_learning_rate=r.get("training.fine_tune_learning_rate", float,
                                      field_default(d, "fine_tune_learning_rate"), minimum=1e-6),
        fine_tune_min_steps=r.get("training.fine_tune_min_steps", int, field_default(d, "fine_tune_min_steps"),
                                  minimum=1),
        full_retrain_days=r.get("training.full_retrain_days", int, field_default(d, "full_retrain_days"),
                                minimum=0),
        rerank_days=r.get("training.rerank_days", float, field_default(d, "rerank_days"), minimum=0),
        guest_training=GuestTrainingConfig(**guest_kwargs),
        decay=Decay(**decay_kwargs),
        log_level=log_level)
    for key in r.unknown_keys():
        r.problems.append(f"unknown key {key!r}")
    if r.problems:
        raise ConfigError(r.problems)
    return RetrainConfig(**cfg_kwargs)


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None) -> RetrainConfig:
    """Read a YAML file (or none) and validate it with overrides; raises ConfigError."""
    data = read_yaml(path) if path is not None else {}
    return parse_config(data, overrides, env, Path.cwd())


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The agent's config-file reader, with the retrain server's ConfigError."""
    from agent.config import read_config_file
    from agent.errors import ConfigError as AgentConfigError

    try:
        return read_config_file(path)
    except AgentConfigError as exc:
        raise ConfigError(exc.problems) from None

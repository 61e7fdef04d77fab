"""The agent's configuration: one schema, validated and normalised at start-up.

Every key is described in :data:`SCHEMA_DOC` (also printed in the README).
Things that matter have no silent default: the broker host, the parameters
directory and the public key (or an explicit ``allow_unsigned``) must be
given, by the YAML file or by command-line flags. All problems are collected
into one :class:`~agent.errors.ConfigError`. Secrets may come from the
environment (``BASKET_MQTT_USERNAME``, ``BASKET_MQTT_PASSWORD``) and are
redacted by :meth:`AgentConfig.redacted`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .events import EventLimits
from .mqtt import TLSSettings
from .recommenders.guest import GuestParams
from .topics import validate_id, validate_prefix

_LOG = logging.getLogger(__name__)

__all__ = ["BrokerConfig", "UpdatesConfig", "MemberOverrides", "AgentConfig", "load_config", "read_config_file",
           "machine_agent_id", "parse_config", "parse_hostport", "SCHEMA_DOC"]

SCHEMA_DOC = """\
broker.host            MQTT broker host (required; env BASKET_MQTT_HOST)
broker.port            MQTT port, default 1883 (8883 with TLS)
broker.protocol        "5" (default) or "3.1.1"
broker.keepalive       seconds, default 30
broker.username        optional; env BASKET_MQTT_USERNAME
broker.password        optional; env BASKET_MQTT_PASSWORD (never logged)
broker.reconnect_min_s / reconnect_max_s   reconnect back-off, default 0.5 / 30
broker.session_expiry_s   keep this agent's MQTT session (and the events queued for it)
                       this long while it is away, default 86400 (0 = clean session: lost)
broker.receive_maximum    MQTT 5: unacknowledged events in flight to the agent, default 100
broker.tls.enabled     default false; tls.ca_file, tls.cert_file, tls.key_file, tls.insecure
prefix                 topic prefix, default "smartbasket" (e.g. smartbasket/store-17)
agent_id               this agent's id (required; status topic, client id): unique per basket, or
                       "auto" = "jetson-" + the first 12 hex digits of /etc/machine-id (else the host name)
parameters             parameters directory (required)
public_key             Ed25519 public key file (required unless allow_unsigned)
allow_unsigned         development only: accept unsigned parameters (logs a warning)
http.port              HTTP bridge port inside the agent; 0 = no bridge (default 0)
http.host              bind address, default 127.0.0.1
http.token             bearer token: every route but /health and the display page needs it
                       (env BASKET_HTTP_TOKEN; >= 16 characters; never logged)
http.allowed_hosts     Host names/addresses clients use; required when http.host is 0.0.0.0 or ::
                       (env BASKET_HTTP_ALLOWED_HOSTS, comma-separated)
http.max_connections   open HTTP connections, default 256 (+16 for the machine itself)
http.max_connections_per_client   from one address, default 64 (0 = no limit)
http.header_timeout_s / body_timeout_s / keepalive_timeout_s   default 10 / 10 / 5
limits.max_payload_bytes  default 65536     limits.max_items  default 200
limits.max_top_k          default 100       limits.default_top_k  default 10
limits.max_event_age_s    a snapshot whose ts is older is applied, not answered; default 0
                          (off); config/agent.yaml: 300 (sensor and Jetson clocks on NTP)
drain_timeout_s        at shutdown, longest time spent on events already received, default 5
baskets.idle_ttl_s     forget a basket after this idle time, default 1800
baskets.max_baskets    at most this many baskets kept, default 10000
baskets.max_bytes      all baskets' state (carts, wishlists, remembered event ids) in bytes, default
                       67108864 (64 MiB); beyond it the least recently used baskets are evicted
status_interval_s      status republish period, default 30
guest.*                guest model knobs: co_top_k_per_item, expand_top, sim_top_k,
                       sim_weight, fallback_min_candidates, fallback_weight
member.*               repeat_weight, co_weight (default: the values trained into
                       member_meta.json), threads (onnxruntime threads, default 1)
updates.enabled        follow PREFIX/models/updated: download, verify, swap (default true)
updates.jitter_s       longest random wait before downloading an update, default 30 (0 = none)
updates.max_bundle_bytes   largest bundle download, default 67108864 (64 MiB); unpacked
                       contents at most 4x that, one file at most 2x
updates.download_timeout_s connect/read timeout of a bundle download, default 30
updates.keep_versions  versions kept on disk (the serving one included, >= 2), default 3
log_level              DEBUG | INFO (default) | WARNING | ERROR
"""


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int = 1883
    protocol: str = "5"
    keepalive: int = 30
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    tls: TLSSettings | None = None  # None: plain TCP
    session_expiry_s: int = 86400
    receive_maximum: int = 100


@dataclass(frozen=True)
class MemberOverrides:
    repeat_weight: float | None = None
    co_weight: float | None = None
    threads: int = 1


@dataclass(frozen=True)
class UpdatesConfig:
    """Model updates (contract §5); see :mod:`agent.updater`."""

    enabled: bool = True
    jitter_s: float = 30.0
    max_bundle_bytes: int = 64 << 20
    download_timeout_s: float = 30.0
    keep_versions: int = 3


@dataclass(frozen=True)
class AgentConfig:
    broker: BrokerConfig
    agent_id: str
    parameters: Path
    public_key: Path | None
    allow_unsigned: bool = False
    prefix: str = "smartbasket"
    http_host: str = "127.0.0.1"
    http_port: int = 0
    limits: EventLimits = EventLimits()
    idle_ttl_s: float = 1800.0
    max_baskets: int = 10000
    max_bytes: int = 64 * 2**20
    status_interval_s: float = 30.0
    guest: GuestParams = GuestParams()
    member: MemberOverrides = MemberOverrides()
    updates: UpdatesConfig = UpdatesConfig()
    log_level: str = "INFO"
    max_event_age_s: float = 0.0
    drain_timeout_s: float = 5.0
    http_token: str | None = field(default=None, repr=False)
    http_allowed_hosts: tuple[str, ...] | None = None
    http_max_connections: int = 256
    http_max_connections_per_client: int = 64
    http_header_timeout_s: float = 10.0
    http_body_timeout_s: float = 10.0
    http_keepalive_timeout_s: float = 5.0

    def redacted(self) -> dict[str, Any]:
        """The config as a dict with secrets masked, for logging."""
        d = dataclasses.asdict(self)
        if d["broker"].get("password"):
            d["broker"]["password"] = "***"
        if d.get("http_token"):
            d["http_token"] = "***"
        return d


def machine_agent_id() -> str:
    """``agent_id: auto``: an id two devices cannot share (the machine id, else the host name)."""
    import socket

    try:
        mid = Path("/etc/machine-id").read_text(encoding="ascii").strip()
    except OSError:
        mid = ""
    if len(mid) >= 12 and all(c in "0123456789abcdef" for c in mid[:12]):
        agent_id = f"jetson-{mid[:12]}"
    else:
        agent_id = socket.gethostname().split(".")[0] or "agent"
    _LOG.info("agent_id: auto -> %s", agent_id)
    return agent_id


def parse_hostport(value: str, default_port: int = 1883) -> tuple[str, int]:
    """``"host:port"`` / ``"host"`` / ``"[::1]:1883"`` -> (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, str(default_port)
    if not host:
        raise ValueError(f"no host in {value!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port)


class _Reader:
    """Pulls typed values out of nested dicts, collecting every problem."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data
        self.problems: list[str] = []
        self.used: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, *,
            required: bool = False, minimum: float | None = None) -> Any:
        self.used.add(key)
        node: Any = self.data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
            if node is None:
                break
        if node is None:
            if required:
                self.problems.append(f"{key} is required")
            return default
        if kind is float and isinstance(node, int) and not isinstance(node, bool):
            node = float(node)
        if isinstance(node, bool) and kind is not bool:
            self.problems.append(f"{key} must be {_kind_name(kind)}, got {node!r}")
            return default
        if not isinstance(node, kind):
            self.problems.append(f"{key} must be {_kind_name(kind)}, got {node!r}")
            return default
        if minimum is not None and node < minimum:
            self.problems.append(f"{key} must be >= {minimum}, got {node!r}")
            return default
        return node

    def unknown_keys(self) -> list[str]:
        """Every key path in the data that no ``get`` asked for (typos at any depth)."""
        known = set(self.used)
        parents = {".".join(k.split(".")[:i]) for k in known for i in range(1, k.count(".") + 1)}
        out: list[str] = []

        def walk(node: Mapping[str, Any], path: str) -> None:
            for key, value in node.items():
                full = f"{path}{key}"
                if full in known:
                    continue
                if full in parents and isinstance(value, Mapping):
                    walk(value, full + ".")
                else:
                    out.append(full)

        walk(self.data, "")
        return out


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "a string", "int": "an integer", "float": "a number",
                        "bool": "true/false", "dict": "a mapping"}.get(k.__name__, k.__name__)
                       for k in kinds)


def parse_config(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, base_dir: Path | None = None) -> AgentConfig:
    """Validate ``data`` (parsed YAML) with CLI ``overrides`` (dotted keys) and env."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = _deep_copy(data)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(merged, key, value)
    for key, var in (("broker.host", "BASKET_MQTT_HOST"), ("broker.username", "BASKET_MQTT_USERNAME"),
                     ("broker.password", "BASKET_MQTT_PASSWORD"), ("http.token", "BASKET_HTTP_TOKEN"),
                     ("http.allowed_hosts", "BASKET_HTTP_ALLOWED_HOSTS")):
        if env.get(var) and not (overrides or {}).get(key):
            _set_dotted(merged, key, env[var])
    r = _Reader(merged)
    base = base_dir or Path.cwd()

    def path(key: str, required: bool) -> Path | None:
        value = r.get(key, str, required=required)
        return None if value is None else (base / value if not Path(value).is_absolute() else Path(value))

    tls_enabled = r.get("broker.tls.enabled", bool, False)
    tls = TLSSettings(
        ca_file=r.get("broker.tls.ca_file", str), cert_file=r.get("broker.tls.cert_file", str),
        key_file=r.get("broker.tls.key_file", str), insecure=r.get("broker.tls.insecure", bool, False))
    protocol = str(r.get("broker.protocol", (str, int, float), "5"))
    if protocol in ("5.0", "5"):
        protocol = "5"
    elif protocol not in ("3.1.1", "311"):
        r.problems.append(f"broker.protocol must be \"5\" or \"3.1.1\", got {protocol!r}")
    else:
        protocol = "3.1.1"
    port = r.get("broker.port", int, 8883 if tls_enabled else 1883, minimum=1)
    if port is not None and port > 65535:
        r.problems.append(f"broker.port must be <= 65535, got {port}")
    broker = BrokerConfig(
        host=r.get("broker.host", str, "", required=True), port=port, protocol=protocol,
        keepalive=r.get("broker.keepalive", int, 30, minimum=5),
        username=r.get("broker.username", str), password=r.get("broker.password", str),
        reconnect_min_s=r.get("broker.reconnect_min_s", float, 0.5, minimum=0.01),
        reconnect_max_s=r.get("broker.reconnect_max_s", float, 30.0, minimum=0.1),
        tls=tls if tls_enabled else None,
        session_expiry_s=r.get("broker.session_expiry_s", int, 86400, minimum=0),
        receive_maximum=r.get("broker.receive_maximum", int, 100, minimum=1))
    if broker.receive_maximum is not None and broker.receive_maximum > 65535:
        r.problems.append(f"broker.receive_maximum must be <= 65535, got {broker.receive_maximum}")
    if broker.session_expiry_s is not None and broker.session_expiry_s > 0xFFFFFFFF:
        r.problems.append(f"broker.session_expiry_s must be <= {0xFFFFFFFF}, got {broker.session_expiry_s}")
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(tls, key)
        if tls_enabled and value and not Path(value).is_file():
            r.problems.append(f"broker.tls.{key}: no such file {value}")
    allow_unsigned = r.get("allow_unsigned", bool, False)
    public_key = path("public_key", required=False)
    if public_key is None and not allow_unsigned:
        r.problems.append("public_key is required (or allow_unsigned: true for development)")
    elif public_key is not None and not public_key.is_file():
        r.problems.append(f"public_key: no such file {public_key}")
    parameters = path("parameters", required=True)
    prefix = r.get("prefix", str, "smartbasket")
    try:
        prefix = validate_prefix(prefix)
    except ValueError as exc:
        r.problems.append(f"prefix: {exc}")
    agent_id = r.get("agent_id", str, None, required=True)
    if agent_id == "auto":
        agent_id = machine_agent_id()
    if agent_id is not None:
        try:
            validate_id("agent_id", agent_id)
        except ValueError as exc:
            r.problems.append(str(exc))
    limit_values = {
        "max_payload_bytes": r.get("limits.max_payload_bytes", int, 65536, minimum=64),
        "max_items": r.get("limits.max_items", int, 200, minimum=1),
        "max_top_k": r.get("limits.max_top_k", int, 100, minimum=1),
        "default_top_k": r.get("limits.default_top_k", int, 10, minimum=1)}
    if limit_values["default_top_k"] > limit_values["max_top_k"]:
        r.problems.append(f"limits.default_top_k ({limit_values['default_top_k']}) must not exceed "
                          f"limits.max_top_k ({limit_values['max_top_k']})")
        limit_values["default_top_k"] = limit_values["max_top_k"]
    guest_kwargs = {}
    for f in dataclasses.fields(GuestParams):
        kind = float if f.type in ("float", float) else int
        value = r.get(f"guest.{f.name}", kind, None, minimum=0)
        if value is not None:
            guest_kwargs[f.name] = value
    member = MemberOverrides(
        repeat_weight=r.get("member.repeat_weight", float, None, minimum=0),
        co_weight=r.get("member.co_weight", float, None, minimum=0),
        threads=r.get("member.threads", int, 1, minimum=1))
    http_port = r.get("http.port", int, 0, minimum=0)
    if http_port is not None and http_port > 65535:
        r.problems.append(f"http.port must be <= 65535, got {http_port}")
    http_host = r.get("http.host", str, "127.0.0.1")
    http_token = r.get("http.token", str)
    hosts = r.get("http.allowed_hosts", (list, str))
    if isinstance(hosts, str):
        hosts = hosts.split(",")
    if hosts is not None and not all(isinstance(h, str) for h in hosts):
        r.problems.append("http.allowed_hosts must be a list of host names")
        hosts = None
    http_allowed_hosts = tuple(h.strip() for h in hosts if h.strip()) if hosts else None
    http_max_connections = r.get("http.max_connections", int, 256, minimum=1)
    http_max_connections_per_client = r.get("http.max_connections_per_client", int, 64, minimum=0)
    http_header_timeout_s = r.get("http.header_timeout_s", float, 10.0, minimum=0.1)
    http_body_timeout_s = r.get("http.body_timeout_s", float, 10.0, minimum=0.1)
    http_keepalive_timeout_s = r.get("http.keepalive_timeout_s", float, 5.0, minimum=0.1)
    idle_ttl_s = r.get("baskets.idle_ttl_s", float, 1800.0, minimum=1)
    max_baskets = r.get("baskets.max_baskets", int, 10000, minimum=1)
    max_bytes = r.get("baskets.max_bytes", int, 64 * 2**20, minimum=2**20)
    status_interval_s = r.get("status_interval_s", float, 30.0, minimum=0.1)
    max_event_age_s = r.get("limits.max_event_age_s", float, 0.0, minimum=0)
    drain_timeout_s = r.get("drain_timeout_s", float, 5.0, minimum=0)
    updates = UpdatesConfig(
        enabled=r.get("updates.enabled", bool, True),
        jitter_s=r.get("updates.jitter_s", float, 30.0, minimum=0),
        max_bundle_bytes=r.get("updates.max_bundle_bytes", int, 64 << 20, minimum=1024),
        download_timeout_s=r.get("updates.download_timeout_s", float, 30.0, minimum=0.1),
        keep_versions=r.get("updates.keep_versions", int, 3, minimum=2))
    log_level = str(r.get("log_level", str, "INFO")).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        r.problems.append(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    for key in r.unknown_keys():
        r.problems.append(f"unknown key {key!r}")
    if r.problems:
        raise ConfigError(r.problems)
    return AgentConfig(
        broker=broker, agent_id=agent_id, parameters=parameters,  # type: ignore[arg-type]
        public_key=public_key, allow_unsigned=allow_unsigned, prefix=prefix,
        http_host=http_host, http_port=http_port, limits=EventLimits(**limit_values), idle_ttl_s=idle_ttl_s,
        max_baskets=max_baskets, max_bytes=max_bytes, status_interval_s=status_interval_s,
        guest=GuestParams(**guest_kwargs), member=member, updates=updates, log_level=log_level,
        max_event_age_s=max_event_age_s, drain_timeout_s=drain_timeout_s, http_token=http_token,
        http_allowed_hosts=http_allowed_hosts, http_max_connections=http_max_connections,
        http_max_connections_per_client=http_max_connections_per_client,
        http_header_timeout_s=http_header_timeout_s, http_body_timeout_s=http_body_timeout_s,
        http_keepalive_timeout_s=http_keepalive_timeout_s)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping; ConfigError (one line, with the line number) otherwise.

    The retrain server reads its config through this too.
    """
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read a YAML file (or none) and validate it with overrides; raises ConfigError."""
    data = read_config_file(path) if path is not None else {}
    try:
        return parse_config(data, overrides, env, Path.cwd())
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from None


def _deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(d.get(part), dict):
            d[part] = {}
        d = d[part]
    d[parts[-1]] = value

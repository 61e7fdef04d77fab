"""The agent's configuration: one schema, typed sections, validated and normalised at start-up.

Every key is described in :data:`SCHEMA_DOC` (also printed in the README;
tests/test_config.py keeps the parser, SCHEMA_DOC and the README equal).
Things that matter have no silent default: the broker host, the agent id, the
parameters directory and the public key (or an explicit ``allow_unsigned``)
must be given, by the YAML file or by command-line flags. All problems are
collected into one :class:`~agent.errors.ConfigError`. Secrets may come from
the environment (``BASKET_MQTT_USERNAME``, ``BASKET_MQTT_PASSWORD``,
``BASKET_HTTP_TOKEN``) and are redacted by :meth:`AgentConfig.redacted`.

Each section is a frozen dataclass, and its field defaults are the only place a
default is written: :func:`parse_config` takes the default of a missing key
from the field (:func:`field_default`). The sections are what the code uses, with
no copying in between:

* :class:`BrokerConfig` (``broker.*``): :meth:`agent.mqtt.MqttClient.for_broker`
  connects to it (the retrain server's config has one too);
* :class:`BasketsConfig` (``baskets.*``), :class:`~agent.events.EventLimits` (``limits.*``);
* :class:`ServiceConfig`: everything :class:`agent.service.AgentService` needs;
* :class:`HttpConfig` (``http.*``): the HTTP bridge (:mod:`agent.http`);
* :class:`UpdatesConfig` (``updates.*``), :class:`MemberOverrides` (``member.*``),
  :class:`~agent.recommenders.guest.GuestParams` (``guest.*``);
* :class:`AgentConfig`: all of it, for ``basket-agent run`` and ``bridge``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .events import EventLimits
from .mqtt import TLSSettings
from .recommenders.guest import GuestParams
from .topics import validate_id, validate_prefix, validate_shared_group

_LOG = logging.getLogger(__name__)

__all__ = ["BrokerConfig", "BasketsConfig", "HttpConfig", "ServiceConfig", "UpdatesConfig", "MemberOverrides",
           "AgentConfig", "load_config", "read_config_file", "machine_agent_id", "parse_config", "parse_hostport",
           "SCHEMA_DOC",
           # the building blocks the retrain server's config reader shares (retrain_server/config.py)
           "ConfigReader", "field_default", "read_section", "read_broker", "deep_copy", "set_dotted"]

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
broker.shared_group    share this store's cart events with the other agents of this group: each event
                       goes to one of them ($share/<group>/PREFIX/basket/+/cart; snapshot sensors only,
                       README "Scaling out"); [A-Za-z0-9_-]{1,64}; default none: every agent gets every event
broker.tls.enabled     default false
broker.tls.ca_file / cert_file / key_file   PEM files: the CA, this client's certificate and key
broker.tls.insecure    development only: skip the broker certificate's host name check, default false
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
limits.max_payload_bytes / max_items / max_top_k / default_top_k   default 65536 / 200 / 100 / 10
limits.max_event_age_s    a snapshot whose ts is older is applied, not answered; default 0
                          (off); config/agent.yaml: 300 (sensor and Jetson clocks on NTP)
drain_timeout_s        at shutdown, longest time spent on events already received, default 5
baskets.idle_ttl_s     forget a basket after this idle time, default 1800
baskets.max_baskets    at most this many baskets kept, default 10000
baskets.max_bytes      all baskets' state (carts, wishlists, remembered event ids) in bytes, default
                       67108864 (64 MiB); beyond it the least recently used baskets are evicted
status_interval_s      status republish period, default 30
guest.co_top_k_per_item / expand_top / sim_top_k / sim_weight / fallback_min_candidates / fallback_weight
                       guest model knobs, default 50 / 10 / 5 / 0 / 10 / 0.5 (agent/recommenders/guest.py)
guest.basket_weight / basket_neighbours
                       the recent-baskets (session kNN) term: weight relative to the best co-purchase
                       score and baskets that vote, default 10 / 50 (off without baskets_*.npy);
                       basket_neighbours also sets the members' store term (0: off for both)
member.repeat_weight / co_weight / neighbour_weight / known_weight / basket_weight / store_weight
                       the blend's weights, default: the values trained into member_meta.json
member.threads         onnxruntime threads, default 1
member.rerank          the bundle's member reranker orders members' candidates, default true (false: the
                       blend alone ranks them, ~0.3 ms less per member request)
updates.enabled        follow PREFIX/models/updated: download, verify, swap (default true)
updates.jitter_s       longest random wait before downloading an update, default 30 (0 = none)
updates.max_bundle_bytes   largest bundle download, default 67108864 (64 MiB); unpacked
                       contents at most 4x that, one file at most 2x
updates.download_timeout_s   connect/read timeout of a bundle download, default 30 (a whole
                       download is abandoned after 15 minutes, however slowly the server sends)
updates.keep_versions  versions kept on disk (the serving one included, >= 2), default 3
log_level              DEBUG | INFO (default) | WARNING | ERROR
"""

_TLS_PORT = 8883  # broker.port when TLS is on and no port is given


@dataclass(frozen=True)
class BrokerConfig:
    """An MQTT broker and how to reach it (``broker.*``); :meth:`agent.mqtt.MqttClient.for_broker` connects.

    ``session_expiry_s`` / ``receive_maximum`` apply to the agent's events connection only.
    """

    host: str
    port: int = 1883
    protocol: str = "5"  # "5" | "3.1.1"
    keepalive: int = 30
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    tls: TLSSettings | None = None  # None: plain TCP
    session_expiry_s: int = 86400  # persistent session (0 = clean: events sent while away are lost)
    receive_maximum: int = 100  # MQTT 5: unacknowledged events the broker may send the agent at once


@dataclass(frozen=True)
class BasketsConfig:
    """The agent's basket state (``baskets.*``; :class:`agent.events.BasketStates`)."""

    idle_ttl_s: float = 1800.0
    max_baskets: int = 10000
    max_bytes: int = 64 * 2**20  # all baskets' state; the least recently used are evicted beyond it
    recent_event_ids: int = 256  # per basket, for de-duplication (not a config key)


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP bridge (``http.*``): where it listens, its limits and access rules (README "Security").

    ``port`` 0: no bridge inside ``basket-agent run``. ``token``: when set, every
    route but ``/health`` and the display page needs ``Authorization: Bearer
    <token>``. ``allowed_hosts``: accepted ``Host`` names (``*.example`` matches
    subdomains); None = no check. The config gives the names clients use; the
    commands complete them with :func:`agent.http.allowed_hosts_for` (the bind
    address, the loopback names). ``max_header_bytes`` and ``docs`` (serve
    ``/docs``, ``/redoc``, ``/openapi.json``) are not config keys.
    """

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = field(default=None, repr=False)
    allowed_hosts: tuple[str, ...] | None = None
    max_connections: int = 256
    max_connections_per_client: int = 64  # 0 = no per-address limit
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    keepalive_timeout_s: float = 5.0
    max_header_bytes: int = 16384
    docs: bool = False

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("http.token must be at least 16 characters (e.g. `openssl rand -hex 24`)")
        if self.max_connections < 1 or self.max_connections_per_client < 0:
            raise ConfigError("http.max_connections must be >= 1 and http.max_connections_per_client >= 0")
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"http.{name} must be > 0")


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the MQTT agent (:class:`agent.service.AgentService`) needs besides the models.

    ``prefix`` is normalised (outer ``/`` stripped); ``agent_id`` and the broker
    host are checked (ValueError). ``client_id`` defaults to
    ``smartbasket-agent-{agent_id}``. ``shared_group`` (config key ``broker.shared_group``):
    subscribe to the carts as a member of this MQTT shared-subscription group
    (:meth:`agent.topics.Topics.cart_subscription_for`); None: a plain subscription.
    """

    broker: BrokerConfig
    agent_id: str
    prefix: str = "smartbasket"
    limits: EventLimits = EventLimits()
    baskets: BasketsConfig = BasketsConfig()
    status_interval_s: float = 30.0
    summary_interval_s: float = 60.0  # not a config key
    queue_size: int = 1000  # reading stops while this many messages wait for the worker (not a config key)
    drain_timeout_s: float = 5.0  # at stop: longest time spent handling what had arrived
    max_event_age_s: float = 0.0  # older snapshots are applied, not answered (0 = off: clocks may be wrong)
    watch_broker_drops: bool = True  # read $SYS/broker/publish/messages/dropped (when allowed)
    client_id: str | None = None
    shared_group: str | None = None  # each cart event goes to one agent of the group (snapshots only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", validate_prefix(self.prefix))
        validate_id("agent_id", self.agent_id)
        if self.shared_group is not None:
            validate_shared_group(self.shared_group)
        if not self.broker.host:
            raise ValueError("MQTT host is required")


@dataclass(frozen=True)
class MemberOverrides:
    """``member.*``: the serving blend weights (None: as trained) and onnxruntime threads."""

    repeat_weight: float | None = None
    co_weight: float | None = None
    neighbour_weight: float | None = None
    known_weight: float | None = None
    basket_weight: float | None = None
    store_weight: float | None = None
    threads: int = 1
    #: False: ignore the bundle's reranker (members ranked by the blend alone; README "Benchmarks" has the cost)
    rerank: bool = True

    def weights(self) -> dict[str, float | None]:
        """The blend weights to override (MemberParams field -> value; None keeps the trained one)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.endswith("_weight")}


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
    """The whole configuration of ``basket-agent run`` / ``basket-agent bridge``.

    ``broker``, ``prefix`` and ``limits`` are what the agent and the standalone
    bridge share; ``service`` is the MQTT agent's section and holds those very
    objects (checked here). ``service`` is None only for a bridge
    (:func:`parse_config` with ``require_broker=False``), whose ``broker`` is
    None too unless it follows model updates.
    """

    parameters: Path
    public_key: Path | None
    prefix: str
    limits: EventLimits
    broker: BrokerConfig | None
    service: ServiceConfig | None
    allow_unsigned: bool = False
    http: HttpConfig = HttpConfig()
    guest: GuestParams = GuestParams()
    member: MemberOverrides = MemberOverrides()
    updates: UpdatesConfig = UpdatesConfig()
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        s = self.service
        if s is not None and (s.broker, s.prefix, s.limits) != (self.broker, self.prefix, self.limits):
            raise ValueError("AgentConfig: service.broker/prefix/limits differ from broker/prefix/limits")

    def redacted(self) -> dict[str, Any]:
        """The config as a dict with secrets masked, for logging."""
        d = dataclasses.asdict(self)
        for broker in (d["broker"], (d["service"] or {}).get("broker")):
            if broker and broker.get("password"):
                broker["password"] = "***"
        if d["http"].get("token"):
            d["http"]["token"] = "***"
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


class ConfigReader:
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
            try:
                node = float(node)
            except OverflowError:  # an integer of hundreds of digits
                self.problems.append(f"{key} must be a finite number, got an integer of {len(str(node))} digits")
                return default
        if isinstance(node, float) and not math.isfinite(node):  # YAML's .nan / .inf pass every comparison
            self.problems.append(f"{key} must be a finite number, got {node!r}")
            return default
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


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls``: the one place it is written."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise TypeError(f"{cls.__name__}.{name} has no default")
    raise TypeError(f"{cls.__name__} has no field {name!r}")


_KINDS: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}


def read_section(r: ConfigReader, section: str, cls: type, **minimum: float | None) -> dict[str, Any]:
    """``section.NAME`` for every NAME given (with its minimum, None: none), typed (``int``, ``float``,
    ``bool``, ``str``, optionally ``| None``) and defaulted by the field of ``cls`` of that name."""
    kinds = {f.name: f.type if isinstance(f.type, type) else _KINDS[f.type.removesuffix(" | None")]
             for f in dataclasses.fields(cls) if f.name in minimum}
    prefix = f"{section}." if section else ""
    return {name: r.get(prefix + name, kinds[name], field_default(cls, name), minimum=low)
            for name, low in minimum.items()}


def read_broker(r: ConfigReader, *, required: bool = True, agent_keys: bool = True) -> BrokerConfig | None:
    """``broker.*``; None when the host is not given and not ``required``. ``agent_keys``: also the
    agent's back-off and session keys (the retrain server reads the rest through this too)."""
    tls_enabled = r.get("broker.tls.enabled", bool, False)
    tls = TLSSettings(ca_file=r.get("broker.tls.ca_file", str), cert_file=r.get("broker.tls.cert_file", str),
                      key_file=r.get("broker.tls.key_file", str),
                      **read_section(r, "broker.tls", TLSSettings, insecure=None))
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(tls, key)
        if tls_enabled and value and not Path(value).is_file():
            r.problems.append(f"broker.tls.{key}: no such file {value}")
    protocol = str(r.get("broker.protocol", (str, int, float), field_default(BrokerConfig, "protocol")))
    protocol = {"5": "5", "5.0": "5", "3.1.1": "3.1.1", "311": "3.1.1"}.get(protocol, protocol)
    if protocol not in ("5", "3.1.1"):
        r.problems.append(f"broker.protocol must be \"5\" or \"3.1.1\", got {protocol!r}")
    port = r.get("broker.port", int, _TLS_PORT if tls_enabled else field_default(BrokerConfig, "port"), minimum=1)
    values: dict[str, Any] = dict(
        port=port, protocol=protocol, username=r.get("broker.username", str),
        password=r.get("broker.password", str), tls=tls if tls_enabled else None,
        **read_section(r, "broker", BrokerConfig, keepalive=5))
    if agent_keys:
        values.update(read_section(r, "broker", BrokerConfig, reconnect_min_s=0.01, reconnect_max_s=0.1,
                               session_expiry_s=0, receive_maximum=1))
    for key, most in (("port", 65535), ("keepalive", 65535), ("receive_maximum", 65535),
                      ("session_expiry_s", 0xFFFFFFFF)):
        if values.get(key) is not None and values[key] > most:
            r.problems.append(f"broker.{key} must be <= {most}, got {values[key]}")
    host = r.get("broker.host", str, None, required=required)
    if host is not None and not host.strip():
        r.problems.append("broker.host must not be empty")
    return None if host is None else BrokerConfig(host=host, **values)


def parse_config(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, base_dir: Path | None = None, *,
                 require_broker: bool = True) -> AgentConfig:
    """Validate ``data`` (parsed YAML) with CLI ``overrides`` (dotted keys) and env.

    ``require_broker=False`` (the standalone bridge): ``broker.host`` and ``agent_id``
    may be left out; then ``broker`` (without a host) and ``service`` (without either) are None.
    """
    env = os.environ if env is None else env
    merged: dict[str, Any] = deep_copy(data)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(merged, key, value)
    for key, var in (("broker.host", "BASKET_MQTT_HOST"), ("broker.username", "BASKET_MQTT_USERNAME"),
                     ("broker.password", "BASKET_MQTT_PASSWORD"), ("http.token", "BASKET_HTTP_TOKEN"),
                     ("http.allowed_hosts", "BASKET_HTTP_ALLOWED_HOSTS")):
        if env.get(var) and not (overrides or {}).get(key):
            set_dotted(merged, key, env[var])
    r = ConfigReader(merged)
    base = base_dir or Path.cwd()

    def path(key: str, required: bool) -> Path | None:
        value = r.get(key, str, required=required)
        return None if value is None else (base / value if not Path(value).is_absolute() else Path(value))

    broker = read_broker(r, required=require_broker)
    allow_unsigned = r.get("allow_unsigned", bool, field_default(AgentConfig, "allow_unsigned"))
    public_key = path("public_key", required=False)
    if public_key is None and not allow_unsigned:
        r.problems.append("public_key is required (or allow_unsigned: true for development)")
    elif public_key is not None and not public_key.is_file():
        r.problems.append(f"public_key: no such file {public_key}")
    parameters = path("parameters", required=True)
    prefix = r.get("prefix", str, field_default(ServiceConfig, "prefix"))
    try:
        prefix = validate_prefix(prefix)
    except ValueError as exc:
        r.problems.append(f"prefix: {exc}")
    agent_id = r.get("agent_id", str, None, required=require_broker)
    if agent_id == "auto":
        agent_id = machine_agent_id()
    if agent_id is not None:
        try:
            validate_id("agent_id", agent_id)
        except ValueError as exc:
            r.problems.append(str(exc))
    limits = read_section(r, "limits", EventLimits, max_payload_bytes=64, max_items=1, max_top_k=1, default_top_k=1)
    if limits["default_top_k"] > limits["max_top_k"]:
        r.problems.append(f"limits.default_top_k ({limits['default_top_k']}) must not exceed "
                          f"limits.max_top_k ({limits['max_top_k']})")
        limits["default_top_k"] = limits["max_top_k"]
    timing = read_section(r, "", ServiceConfig, status_interval_s=0.1, drain_timeout_s=0)
    timing["max_event_age_s"] = r.get("limits.max_event_age_s", float, field_default(ServiceConfig, "max_event_age_s"),
                                      minimum=0)
    shared_group = r.get("broker.shared_group", str, field_default(ServiceConfig, "shared_group"))
    if shared_group is not None:
        try:
            validate_shared_group(shared_group)
        except ValueError as exc:
            r.problems.append(f"broker.shared_group: {exc}")
    baskets = read_section(r, "baskets", BasketsConfig, idle_ttl_s=1, max_baskets=1, max_bytes=2**20)
    guest = read_section(r, "guest", GuestParams, **{f.name: 0 for f in dataclasses.fields(GuestParams)})
    member = read_section(r, "member", MemberOverrides, threads=1, rerank=None,
                          **{f.name: 0 for f in dataclasses.fields(MemberOverrides) if f.name.endswith("_weight")})
    http = read_section(r, "http", HttpConfig, host=None, port=0, max_connections=1, max_connections_per_client=0,
                    header_timeout_s=0.1, body_timeout_s=0.1, keepalive_timeout_s=0.1)
    if http["port"] is not None and http["port"] > 65535:
        r.problems.append(f"http.port must be <= 65535, got {http['port']}")
    hosts = r.get("http.allowed_hosts", (list, str))
    if isinstance(hosts, str):
        hosts = hosts.split(",")
    if hosts is not None and not all(isinstance(h, str) for h in hosts):
        r.problems.append("http.allowed_hosts must be a list of host names")
        hosts = None
    token = r.get("http.token", str)
    if token is not None and len(token) < 16:
        if http["port"] or not require_broker:  # a bridge will run: its token must be usable
            r.problems.append("http.token must be at least 16 characters (e.g. `openssl rand -hex 24`)")
        else:
            _LOG.warning("http.token ignored: it is too short, and no HTTP bridge runs (http.port 0)")
        token = None
    http.update(token=token, allowed_hosts=tuple(h.strip() for h in hosts if h.strip()) if hosts else None)
    updates = read_section(r, "updates", UpdatesConfig, enabled=None, jitter_s=0, max_bundle_bytes=1024,
                       download_timeout_s=0.1, keep_versions=2)
    log_level = str(r.get("log_level", str, field_default(AgentConfig, "log_level"))).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        r.problems.append(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    for key in r.unknown_keys():
        r.problems.append(f"unknown key {key!r}")
    if r.problems:
        raise ConfigError(r.problems)
    event_limits = EventLimits(**limits)
    return AgentConfig(
        parameters=parameters, public_key=public_key, prefix=prefix, limits=event_limits,  # type: ignore[arg-type]
        broker=broker, allow_unsigned=allow_unsigned, http=HttpConfig(**http), guest=GuestParams(**guest),
        member=MemberOverrides(**member), updates=UpdatesConfig(**updates), log_level=log_level,
        service=None if broker is None or agent_id is None else ServiceConfig(
            broker=broker, agent_id=agent_id, prefix=prefix, limits=event_limits,
            baskets=BasketsConfig(**baskets), shared_group=shared_group, **timing))


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
                env: Mapping[str, str] | None = None, *, require_broker: bool = True) -> AgentConfig:
    """Read a YAML file (or none) and validate it with overrides; raises ConfigError."""
    data = read_config_file(path) if path is not None else {}
    try:
        return parse_config(data, overrides, env, Path.cwd(), require_broker=require_broker)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from None


def deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(d.get(part), dict):
            d[part] = {}
        d = d[part]
    d[parts[-1]] = value

"""Agent configuration: validated at start-up, every problem named at once."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import agent.config as config_module
from agent.config import (
    SCHEMA_DOC,
    AgentConfig,
    BasketsConfig,
    BrokerConfig,
    HttpConfig,
    ServiceConfig,
    UpdatesConfig,
    load_config,
    parse_config,
    parse_hostport,
)
from agent.errors import ConfigError
from agent.events import EventLimits
from agent.recommenders.guest import GuestParams

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pub(tmp_path):
    p = tmp_path / "signing.pub"
    p.write_text("key")
    return p


def base(pub, **extra):
    d = {"broker": {"host": "127.0.0.1"}, "agent_id": "jetson-1", "parameters": "params",
         "public_key": str(pub)}
    d.update(extra)
    return d


def test_minimal_config_gets_documented_defaults(pub):
    cfg = parse_config(base(pub), env={})
    assert cfg.broker.port == 1883 and cfg.broker.protocol == "5"
    assert cfg.prefix == "smartbasket" and cfg.http.port == 0
    assert cfg.limits.max_items == 200 and cfg.guest.co_top_k_per_item == 50


def test_all_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config({"broker": {"port": "x", "protocol": "4"}, "prefix": "a/#",
                      "limits": {"max_items": -1}, "colour": "blue"}, env={})
    msg = str(err.value)
    for needle in ("broker.host is required", "broker.port must be an integer",
                   'broker.protocol must be "5" or "3.1.1"', "agent_id is required",
                   "parameters is required", "public_key is required", "prefix must be",
                   "limits.max_items must be >= 1", "unknown key 'colour'"):
        assert needle in msg
    assert len(err.value.problems) >= 9


def test_numbers_that_pass_a_comparison_but_break_later_are_config_errors(pub):
    """NaN passed every `>= minimum` check (baskets never expired with idle_ttl_s .nan; stop() raised with
    drain_timeout_s .inf); a 400-digit integer raised OverflowError, a traceback instead of this one-line error;
    keepalive 70000 was accepted and every connection then failed inside paho."""
    with pytest.raises(ConfigError) as err:
        parse_config(base(pub, baskets={"idle_ttl_s": float("nan")}, drain_timeout_s=float("inf"),
                          guest={"sim_weight": float("nan")}, limits={"max_event_age_s": 10 ** 400},
                          broker={"host": "h", "keepalive": 70000}), env={})
    msg = str(err.value)
    assert "baskets.idle_ttl_s must be a finite number, got nan" in msg
    assert "drain_timeout_s must be a finite number, got inf" in msg
    assert "guest.sim_weight must be a finite number, got nan" in msg
    assert "limits.max_event_age_s must be a finite number, got an integer of 401 digits" in msg
    assert "broker.keepalive must be <= 65535, got 70000" in msg


def test_typos_at_any_depth_are_errors(pub):
    with pytest.raises(ConfigError) as err:
        parse_config(base(pub, broker={"host": "h", "prot": 3}, guest={"sim_weigth": 0.5},
                          limits={"max_top_k": 5}, http={"port": 70000}), env={})
    msg = str(err.value)
    assert "unknown key 'broker.prot'" in msg and "unknown key 'guest.sim_weigth'" in msg
    assert "default_top_k (10) must not exceed limits.max_top_k (5)" in msg
    assert "http.port must be <= 65535" in msg


@pytest.mark.parametrize("prefix", ["a//b", "", "x/+/y", "#"])
def test_prefixes_the_agent_could_not_use_are_config_errors(pub, prefix):
    with pytest.raises(ConfigError, match="prefix"):
        parse_config(base(pub, prefix=prefix), env={})


def test_public_key_may_be_skipped_only_explicitly(pub):
    d = base(pub)
    del d["public_key"]
    with pytest.raises(ConfigError, match="public_key is required"):
        parse_config(d, env={})
    assert parse_config({**d, "allow_unsigned": True}, env={}).public_key is None


def test_overrides_and_environment(pub):
    cfg = parse_config(base(pub), overrides={"broker.port": 1999, "prefix": "smartbasket/store-17"},
                       env={"BASKET_MQTT_PASSWORD": "s3cret", "BASKET_MQTT_USERNAME": "basket"})
    assert cfg.broker.port == 1999 and cfg.prefix == "smartbasket/store-17"
    assert cfg.broker.username == "basket" and cfg.broker.password == "s3cret"
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.redacted())


def test_no_file_needed_when_flags_say_enough(pub):
    cfg = load_config(None, overrides={"broker.host": "localhost", "agent_id": "a",
                                       "parameters": "p", "public_key": str(pub)}, env={})
    assert cfg.broker.host == "localhost"


def test_bad_yaml_names_the_file_and_line(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("broker:\n  host: [unclosed\n")
    with pytest.raises(ConfigError, match=r"agent.yaml line \d+: not valid YAML"):
        load_config(f)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_config_is_valid(pub):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "config" / "agent.yaml"
    cfg = load_config(shipped, overrides={"public_key": str(pub)}, env={})
    assert cfg.service is not None and cfg.service.agent_id


@pytest.mark.parametrize("value,expected", [
    ("localhost:1884", ("localhost", 1884)), ("10.0.0.5", ("10.0.0.5", 1883)),
    ("[::1]:1885", ("::1", 1885)),
])
def test_parse_hostport(value, expected):
    assert parse_hostport(value) == expected


@pytest.mark.parametrize("value", [":1883", "host:0", "host:99999", "host:abc"])
def test_parse_hostport_rejects(value):
    with pytest.raises(ValueError):
        parse_hostport(value)


# --- one typed configuration path ---------------------------------------------------------------
def test_defaults_come_from_the_sections(pub):
    """A minimal config is every section's dataclass defaults: parse_config restates none of them."""
    cfg = parse_config(base(pub), env={})
    s = cfg.service
    assert s is not None and s.broker is cfg.broker and s.prefix == cfg.prefix and s.limits is cfg.limits
    assert cfg.broker == BrokerConfig(host="127.0.0.1")
    assert s.baskets == BasketsConfig() and cfg.limits == EventLimits() and cfg.guest == GuestParams()
    assert cfg.updates == UpdatesConfig() and cfg.http == HttpConfig()
    assert s == ServiceConfig(broker=cfg.broker, agent_id="jetson-1")
    assert cfg.log_level == AgentConfig.__dataclass_fields__["log_level"].default


def test_every_key_reaches_its_section(pub):
    cfg = parse_config(base(pub, broker={"host": "h", "reconnect_min_s": 1, "reconnect_max_s": 9, "keepalive": 60},
                            baskets={"idle_ttl_s": 60, "max_baskets": 7, "max_bytes": 2**21},
                            http={"port": 8080, "host": "0.0.0.0", "allowed_hosts": ["basket-7"],
                                  "max_connections": 9, "header_timeout_s": 2},
                            limits={"max_event_age_s": 300, "max_top_k": 20}, status_interval_s=5,
                            drain_timeout_s=1, guest={"sim_weight": 0.25}, member={"threads": 2, "basket_weight": 0.5},
                            updates={"keep_versions": 5}), env={"BASKET_HTTP_TOKEN": "t" * 16})
    s = cfg.service
    assert s is not None
    assert (s.broker.reconnect_min_s, s.broker.reconnect_max_s, s.broker.keepalive) == (1.0, 9.0, 60)
    assert s.baskets == BasketsConfig(idle_ttl_s=60.0, max_baskets=7, max_bytes=2**21)
    assert (s.max_event_age_s, s.status_interval_s, s.drain_timeout_s, s.limits.max_top_k) == (300.0, 5.0, 1.0, 20)
    assert cfg.http == HttpConfig(host="0.0.0.0", port=8080, token="t" * 16, allowed_hosts=("basket-7",),
                                  max_connections=9, header_timeout_s=2.0)
    assert (cfg.guest.sim_weight, cfg.member.threads, cfg.updates.keep_versions) == (0.25, 2, 5)
    from agent.recommenders.member import ScoreParts

    # every weight of the blend can be overridden; those left out keep the trained value (None)
    assert cfg.member.weights() == {**dict.fromkeys(ScoreParts.WEIGHTS), "basket_weight": 0.5}
    shown = str(cfg.redacted())
    assert "t" * 16 not in repr(cfg) and "t" * 16 not in shown and "***" in shown


def test_tls_moves_the_default_port(pub, tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    cfg = parse_config(base(pub, broker={"host": "h", "tls": {"enabled": True, "ca_file": str(ca)}}), env={})
    assert cfg.broker is not None and cfg.broker.port == 8883 and cfg.broker.tls is not None
    assert cfg.broker.tls.ca_file == str(ca) and not cfg.broker.tls.insecure


def test_a_short_http_token_is_a_config_error_where_a_bridge_runs(pub):
    with pytest.raises(ConfigError, match="at least 16"):
        parse_config({**base(pub), "http": {"port": 8080}}, env={"BASKET_HTTP_TOKEN": "short"})
    with pytest.raises(ConfigError, match="at least 16"):  # the standalone bridge
        parse_config(base(pub), env={"BASKET_HTTP_TOKEN": "short"}, require_broker=False)
    # no bridge (http.port 0): a stray short token in the environment does not stop the agent
    assert parse_config(base(pub), env={"BASKET_HTTP_TOKEN": "short"}).http.token is None


def test_the_bridge_needs_no_broker_and_no_agent_id(pub):
    d = {"parameters": "params", "public_key": str(pub), "http": {"port": 8080}}
    with pytest.raises(ConfigError, match="broker.host is required"):
        parse_config(d, env={})
    cfg = parse_config(d, env={"BASKET_MQTT_USERNAME": "u"}, require_broker=False)
    assert cfg.broker is None and cfg.service is None and cfg.http.port == 8080 and cfg.limits == EventLimits()
    cfg = parse_config({**d, "broker": {"host": "mqtt.local", "port": 1884}, "prefix": "s/store-1"},
                       env={"BASKET_MQTT_USERNAME": "u"}, require_broker=False)
    assert cfg.service is None and cfg.prefix == "s/store-1"
    assert cfg.broker == BrokerConfig(host="mqtt.local", port=1884, username="u")
    with pytest.raises(ConfigError, match="broker.port must be an integer"):  # still checked
        parse_config({**d, "broker": {"port": "x"}}, env={}, require_broker=False)


def test_service_and_shared_sections_cannot_differ(pub):
    cfg = parse_config(base(pub), env={})
    with pytest.raises(ValueError, match="differ"):
        dataclasses.replace(cfg, prefix="elsewhere")


def _parser_keys(monkeypatch, pub) -> set[str]:
    """Every key parse_config reads (it reads each one whether or not the config has it)."""
    readers: list[config_module.ConfigReader] = []

    class Recording(config_module.ConfigReader):
        def __init__(self, data):  # type: ignore[no-untyped-def]
            super().__init__(data)
            readers.append(self)

    monkeypatch.setattr(config_module, "ConfigReader", Recording)
    parse_config(base(pub), env={})
    (reader,) = readers
    return set(reader.used)


def _documented_keys(doc: str) -> set[str]:
    """The keys in the first column of a schema table: ``a.b / c / d`` is a.b, a.c, a.d."""
    keys = set()
    for line in doc.splitlines():
        if not line or line[0].isspace():
            continue  # a continuation line
        first, *more = re.match(r"\S+(?: / \S+)*", line).group(0).split(" / ")
        parent = first.rpartition(".")[0]
        keys.add(first)
        keys.update(k if "." in k or not parent else f"{parent}.{k}" for k in more)
    return keys


def test_the_readme_table_is_the_parsers_schema(monkeypatch, pub):
    parsed = _parser_keys(monkeypatch, pub)
    documented = _documented_keys(SCHEMA_DOC)
    assert parsed - documented == set(), "keys parse_config accepts but SCHEMA_DOC does not describe"
    assert documented - parsed == set(), "keys SCHEMA_DOC describes but parse_config does not accept"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Configuration"):]
    block = section[section.index("```\n") + 4:]
    assert block[:block.index("```")] == SCHEMA_DOC, "README's configuration table differs from SCHEMA_DOC"
    shipped = set(_flatten(__import__("yaml").safe_load((ROOT / "config" / "agent.yaml").read_text("utf-8"))))
    assert shipped <= parsed


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


# --- broker.shared_group (README "Scaling out within a store, and beyond one broker") -------------
def test_shared_group_defaults_to_a_plain_subscription(pub):
    service = parse_config(base(pub), env={}).service
    assert service is not None and service.shared_group is None
    from agent.topics import Topics
    assert Topics("s/store-1").cart_subscription_for(None) == "s/store-1/basket/+/cart"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])  # Mosquitto 2.0.11 shares with 3.1.1 clients too
def test_shared_group_is_carried_into_the_service_config(pub, protocol):
    cfg = parse_config(base(pub, prefix="s/store-1",
                            broker={"host": "h", "protocol": protocol, "shared_group": "store-1_agents"}), env={})
    assert cfg.service is not None and cfg.service.shared_group == "store-1_agents"
    from agent.topics import Topics
    assert (Topics(cfg.service.prefix).cart_subscription_for(cfg.service.shared_group)
            == "$share/store-1_agents/s/store-1/basket/+/cart")


@pytest.mark.parametrize("group", ["", "a/b", "a+b", "a#", "store 1", "g" * 65, "$share", "ü"])
def test_a_bad_shared_group_is_a_config_error_naming_the_rule(pub, group):
    with pytest.raises(ConfigError) as err:
        parse_config(base(pub, broker={"host": "h", "shared_group": group}), env={})
    assert "broker.shared_group" in str(err.value) and "[A-Za-z0-9_-]{1,64}" in str(err.value)


def test_a_shared_group_must_be_a_string(pub):
    with pytest.raises(ConfigError, match="broker.shared_group must be a string"):
        parse_config(base(pub, broker={"host": "h", "shared_group": 7}), env={})


def test_service_config_checks_the_shared_group_itself():
    with pytest.raises(ValueError, match=r"\[A-Za-z0-9_-\]\{1,64\}"):
        ServiceConfig(BrokerConfig("h"), agent_id="a", shared_group="a/b")
    assert ServiceConfig(BrokerConfig("h"), agent_id="a", shared_group="g-1").shared_group == "g-1"

"""Agent configuration: validated at start-up, every problem named at once."""

from __future__ import annotations

import pytest

from agent.config import load_config, parse_config, parse_hostport
from agent.errors import ConfigError


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
    assert cfg.prefix == "smartbasket" and cfg.http_port == 0
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
    assert cfg.agent_id


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

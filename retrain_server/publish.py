"""Announce a new bundle: the update message (contract §5), the reachability check, the MQTT publish.

Order matters: agents download a bundle as soon as they see its message, so the
message is sent only after the bundle answers at its URL with the right size and
sha256 (:func:`check_reachable`, done by :meth:`Announcer.announce` unless told
otherwise). The message is retained QoS 1 on ``PREFIX/models/updated``: an agent
that connects later still finds the newest version, and the publish counts as
done only when the broker's PUBACK arrived.

The MQTT side reuses the agent's :class:`~agent.mqtt.MqttClient` (paho 2,
TCP_NODELAY, TLS); one short-lived connection per announcement, since the
server announces once a night.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import re
import secrets
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.config import BrokerConfig
from agent.errors import AgentError
from agent.mqtt import MqttClient
from agent.topics import Topics

from .errors import ConfigError, PublishError

_LOG = logging.getLogger(__name__)

__all__ = ["UpdateMessage", "bundle_url", "check_reachable", "Announcer", "publish_update", "VERSION_RE",
           "BUNDLE_NAME_RE", "BUNDLE_SUFFIX"]

BUNDLE_SUFFIX = ".tar.gz"
#: a version is one URL path segment and one file name: no '/', no leading dot
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: the only file names the bundle server serves and the pruner deletes
BUNDLE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.tar\.gz$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def _one_line(text: object, limit: int = 300) -> str:
    """Errors end up in one log line and in /health: no newlines, bounded length."""
    return " ".join(str(text).split())[:limit]


def _redact(url: str) -> str:
    """The URL without any ``user:password@`` part, for messages and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class UpdateMessage:
    """The retained model update message (contract §5); ``size`` goes out as the optional ``"bytes"``.

    ``bytes`` lets an agent refuse an oversized bundle before downloading it.
    """

    version: str
    url: str
    sha256: str
    created_at: str
    metrics: dict[str, Any] = field(default_factory=dict, hash=False)
    size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.version, str) or not VERSION_RE.match(self.version):
            raise ValueError(f"version must match {VERSION_RE.pattern}, got {self.version!r}")
        if not isinstance(self.url, str) or urllib.parse.urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError(f"url must be an http(s) URL, got {self.url!r}")
        if not isinstance(self.sha256, str) or not _SHA256_RE.match(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        try:
            created = datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError):
            raise ValueError(f"created_at must be an ISO 8601 time, got {self.created_at!r}") from None
        if created.tzinfo is None:
            raise ValueError(f"created_at must carry its UTC offset, got {self.created_at!r}")
        if not isinstance(self.metrics, dict) or not all(isinstance(k, str) for k in self.metrics):
            raise ValueError("metrics must be a dict with string keys")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int)
                                      or self.size < 0):
            raise ValueError(f"size must be a non-negative int, got {self.size!r}")

    @classmethod
    def for_bundle(cls, path: Path, public_url: str, metrics: dict[str, Any] | None = None,
                   created_at: datetime | None = None) -> UpdateMessage:
        """The message for a bundle file ``<version>.tar.gz``: hashes it and reads its size."""
        path = Path(path)
        if not BUNDLE_NAME_RE.match(path.name):
            raise ValueError(f"bundle file name must match {BUNDLE_NAME_RE.pattern}, got {path.name!r}")
        version = path.name[:-len(BUNDLE_SUFFIX)]
        digest = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        created = created_at or datetime.now(timezone.utc)
        if created.tzinfo is None:
            raise ValueError("created_at must be an aware datetime")
        return cls(version=version, url=bundle_url(public_url, version), sha256=digest.hexdigest(),
                   created_at=created.isoformat(timespec="seconds"), metrics=dict(metrics or {}), size=size)

    def to_dict(self) -> dict[str, Any]:
        """Contract §5 fields, plus ``bytes`` when known. Non-finite metrics become null (strict JSON)."""
        doc: dict[str, Any] = {
            "version": self.version,
            "url": self.url,
            "sha256": self.sha256,
            "created_at": self.created_at,
            "metrics": {k: _finite(v) for k, v in self.metrics.items()},
        }
        if self.size is not None:
            doc["bytes"] = self.size
        return doc

    def to_json(self) -> bytes:
        """UTF-8 JSON, compact; raises ValueError when a metric is not JSON-serialisable."""
        try:
            return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"),
                              allow_nan=False).encode("utf-8")
        except TypeError as exc:
            raise ValueError(f"update message is not JSON-serialisable: {exc}") from exc

    @classmethod
    def from_json(cls, payload: bytes | str) -> UpdateMessage:
        """Parse a message (for tools and tests); raises ValueError when it is not a valid one."""
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"update message is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ValueError("update message must be a JSON object")
        missing = [k for k in ("version", "url", "sha256", "created_at") if k not in doc]
        if missing:
            raise ValueError(f"update message lacks {', '.join(missing)}")
        return cls(version=doc["version"], url=doc["url"], sha256=doc["sha256"], created_at=doc["created_at"],
                   metrics=doc.get("metrics") or {}, size=doc.get("bytes"))


def _finite(value: Any) -> Any:
    """NaN/inf -> None, at any depth: strict JSON parsers (and agents) refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def bundle_url(public_url: str, version: str) -> str:
    """``{public_url}/bundles/{version}.tar.gz``: where agents download a version from."""
    parts = urllib.parse.urlsplit(public_url) if isinstance(public_url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"public URL must be an http(s) URL with a host, got {public_url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"public URL must not have a query or fragment, got {_redact(public_url)!r}")
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ValueError(f"version must match {VERSION_RE.pattern}, got {version!r}")
    return f"{public_url.rstrip('/')}/bundles/{version}{BUNDLE_SUFFIX}"


def check_reachable(url: str, *, size: int, sha256: str | None = None, timeout: float = 10) -> None:
    """GET ``url`` (streamed) as an agent would; PublishError unless it is 200 with ``size`` bytes (and sha256).

    ``timeout`` bounds each connect and read, not the whole download. Reading
    stops as soon as more than ``size`` bytes arrived.
    """
    shown = _redact(url)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise PublishError(f"bundle URL {shown} is not http(s)")
    request = urllib.request.Request(url, headers={"Accept-Encoding": "identity",
                                                   "User-Agent": "smartbasket-retrain-check"})
    digest = hashlib.sha256()
    got = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if resp.status != 200:
                raise PublishError(f"bundle URL {shown} answered HTTP {resp.status}, expected 200")
            length = resp.headers.get("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) != size:
                raise PublishError(f"bundle URL {shown} announces {int(length)} bytes, expected {size}")
            while chunk := resp.read(_CHUNK):
                got += len(chunk)
                if got > size:
                    raise PublishError(f"bundle URL {shown} sent more than the expected {size} bytes")
                digest.update(chunk)
    except PublishError:
        raise
    except urllib.error.HTTPError as exc:
        raise PublishError(f"bundle URL {shown} answered HTTP {exc.code}, expected 200") from None
    except urllib.error.URLError as exc:
        raise PublishError(f"bundle URL {shown} unreachable: {_one_line(exc.reason)}") from None
    except TimeoutError:
        raise PublishError(f"bundle URL {shown} timed out after {timeout:g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise PublishError(f"bundle URL {shown} failed: {type(exc).__name__}: {_one_line(exc)}") from None
    if got != size:
        raise PublishError(f"bundle URL {shown} sent {got} bytes, expected {size}")
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        raise PublishError(f"bundle URL {shown} serves sha256 {digest.hexdigest()}, expected {sha256.lower()}")
    _LOG.debug("bundle %s reachable: %d bytes", shown, got)


class Announcer:
    """Publishes update messages, retained QoS 1, on ``PREFIX/models/updated`` of one broker.

    Each :meth:`announce` opens its own connection and closes it cleanly; the
    password is kept only to hand it to paho and appears in no log or repr.
    """

    def __init__(self, broker: BrokerConfig | str, port: int | None = None, *, prefix: str = "smartbasket",
                 connect_timeout: float = 10.0, ack_timeout: float = 10.0, **fields: Any) -> None:
        """``broker``: a :class:`~agent.config.BrokerConfig` (the retrain config's), or a host name
        with ``port`` and other BrokerConfig ``fields`` (``protocol``, ``username``, ``password``,
        ``tls``, ``keepalive``; the rest as BrokerConfig's defaults)."""
        if isinstance(broker, BrokerConfig):
            if port is not None or fields:
                raise TypeError("Announcer: give a BrokerConfig or a host with its fields, not both")
        else:
            broker = BrokerConfig(broker, **({} if port is None else {"port": port}), **fields)
        try:
            self.topic = Topics(prefix).models_updated
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if broker.protocol not in ("5", "3.1.1"):
            raise ConfigError(f"MQTT protocol must be 5 or 3.1.1, got {broker.protocol!r}")
        if not isinstance(broker.port, int) or not 0 < broker.port < 65536:
            raise ConfigError(f"MQTT port must be 1..65535, got {broker.port!r}")
        self.broker = broker  # its password is repr=False
        self.connect_timeout, self.ack_timeout = connect_timeout, ack_timeout

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    def __repr__(self) -> str:
        b = self.broker
        return (f"Announcer(host={b.host!r}, port={b.port}, topic={self.topic!r}, "
                f"protocol={b.protocol!r}, username={b.username!r}, tls={b.tls is not None})")

    def announce(self, message: UpdateMessage, *, verify: bool = True, http_timeout: float = 10.0) -> None:
        """Check the bundle is downloadable (when ``verify``), then publish and wait for the PUBACK.

        Raises PublishError with one line naming what failed; nothing was announced then
        (or, after a PUBACK timeout, the broker may still hold it).
        """
        payload = message.to_json()
        if verify:
            if message.size is None:
                raise ValueError("verifying the bundle needs UpdateMessage.size")
            check_reachable(message.url, size=message.size, sha256=message.sha256, timeout=http_timeout)
        where = f"MQTT broker {self.host}:{self.port}"
        self._probe(where)
        client_id = f"smartbasket-retrain-{secrets.token_hex(4)}"
        try:
            # one announcement waits connect_timeout at most: retries within it come quickly
            client = MqttClient.for_broker(self.broker, client_id=client_id,
                                           reconnect_max_s=min(self.broker.reconnect_max_s, 2.0))
        except AgentError as exc:
            raise ConfigError(str(exc)) from None
        # MqttClient exposes no PUBACK hook; paho's on_publish is unused there, so it is ours.
        acks: dict[int, Any] = {}
        acks_lock = threading.Lock()

        def on_publish(_c: Any, _u: Any, mid: int, reason_code: Any, _p: Any) -> None:
            with acks_lock:
                acks[mid] = reason_code

        client._client.on_publish = on_publish
        try:
            client.start()
            if not client.wait_connected(self.connect_timeout):
                raise PublishError(f"{where} did not accept the connection within {self.connect_timeout:g} s "
                                   f"(refused credentials or TLS? see the log)")
            info = client.publish(self.topic, payload, qos=1, retain=True)
            try:
                info.wait_for_publish(self.ack_timeout)
            except (RuntimeError, ValueError) as exc:
                raise PublishError(f"{where}: publish failed: {_one_line(exc)}") from None
            if not info.is_published():
                raise PublishError(f"{where} did not acknowledge the update message within "
                                   f"{self.ack_timeout:g} s")
            with acks_lock:
                reason = acks.get(info.mid)
            if reason is not None and getattr(reason, "is_failure", False):
                raise PublishError(f"{where} refused the update message on {self.topic}: {reason}")
        except AgentError as exc:  # MqttError from start() or publish()
            raise PublishError(f"{where}: {_one_line(exc)}") from None
        finally:
            client.stop()
        _LOG.info("announced model %s on %s (retained, QoS 1, %s bytes)", message.version, self.topic,
                  message.size if message.size is not None else "?")

    def _probe(self, where: str) -> None:
        """Fail in milliseconds with the OS's reason when nothing listens, instead of waiting for paho."""
        try:
            with socket.create_connection((self.host, self.port), timeout=min(self.connect_timeout, 5.0)):
                pass
        except OSError as exc:
            raise PublishError(f"{where} unreachable: {_one_line(exc.strerror or exc)}") from None


def publish_update(message: UpdateMessage, host: BrokerConfig | str, port: int | None = None, *,
                   verify: bool = True, **settings: Any) -> None:
    """One-call form of ``Announcer(host, port, **settings).announce(message, verify=verify)``."""
    Announcer(host, port, **settings).announce(message, verify=verify)

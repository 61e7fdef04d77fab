"""Exceptions raised by the agent.

Hierarchy::

    AgentError
    ├── ConfigError            bad or missing configuration (start-up)
    ├── EventError             one cart event / request is invalid (reported, not fatal)
    ├── MqttError              the broker connection refused an operation
    └── BundleError            model parameters failed verification or loading
        ├── SignatureError     manifest signature missing or wrong
        └── StorageError       the agent's own disk failed (full, read-only, I/O): not the bundle's fault
"""

from __future__ import annotations

__all__ = ["AgentError", "ConfigError", "EventError", "MqttError", "BundleError", "SignatureError", "StorageError"]


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """Raised when the configuration is invalid; ``problems`` lists every issue found."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class EventError(AgentError):
    """Raised when a cart event or HTTP request is invalid.

    ``event_id`` is echoed on the errors topic when it could be read.
    """

    def __init__(self, message: str, event_id: object = None) -> None:
        self.event_id = event_id
        super().__init__(message)


class MqttError(AgentError):
    """Raised when paho refuses to connect or publish (mapped at the adapter boundary)."""


class BundleError(AgentError):
    """Raised when a parameters directory or bundle cannot be verified or loaded."""


class SignatureError(BundleError):
    """Raised when ``manifest.sig`` is missing or does not match the public key."""


class StorageError(BundleError):
    """Raised when the agent's own disk fails while a bundle is unpacked or installed (disk full, a read-only
    or failing file system): the bundle may be fine, so an update is tried again on its next delivery."""

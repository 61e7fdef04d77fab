"""Exceptions raised by the retrain server, and the exit code each one means.

Hierarchy::

    RetrainError               root; exit code 1 unless a subclass says otherwise
    ├── ConfigError            bad or missing configuration or arguments (exit 2)
    ├── DataError              training input (files, database rows) is unusable (exit 2)
    ├── DatabaseError          PostgreSQL unreachable or a query failed (exit 4)
    ├── GateRefused            the candidate is worse than the published models (exit 5)
    └── PublishError           the bundle could not be served or announced (exit 6)

The CLI maps each class to its ``exit_code``, prints one line and never a
traceback for these; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["RetrainError", "ConfigError", "DataError", "DatabaseError", "GateRefused", "PublishError"]


class RetrainError(Exception):
    """Root of every error the retrain server raises on purpose."""

    exit_code = 1


class ConfigError(RetrainError):
    """Raised when the configuration or a command-line argument is invalid; ``problems`` lists all."""

    exit_code = 2

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DataError(RetrainError, ValueError):
    """Raised when training input (a file, the products table) is missing columns or has bad rows."""

    exit_code = 2


class DatabaseError(RetrainError):
    """Raised when PostgreSQL cannot be reached or a statement fails (the DSN's password is never shown)."""

    exit_code = 4


class GateRefused(RetrainError):
    """Raised when the quality gate keeps the published models: the candidate is worse."""

    exit_code = 5


class PublishError(RetrainError):
    """Raised when a bundle is not reachable at its URL or the update message is not acknowledged."""

    exit_code = 6

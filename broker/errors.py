"""Errors the broker raises on purpose: every one is a ``SharedGPUError`` with a hint.

``broker.config.loader`` raises ``ConfigError``; ``gpu-broker check-config`` and ``serve`` print it
as it is (one line per problem, each naming file, line and key), never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpu_kernel.errors import SharedGPUError


class BrokerError(SharedGPUError):
    """Base of the broker's own errors."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file: where it is (file, line, dotted key) and what to do."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(BrokerError):
    """The config file has one or more problems; ``issues`` lists all of them, in file order."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = list(issues)
        count = len(self.issues)
        head = f"{count} problem{'s' if count != 1 else ''} in the broker config:"
        body = "\n".join(f"  {issue}" for issue in self.issues)
        super().__init__(
            f"{head}\n{body}",
            hint="fix the lines above, then run `gpu-broker check-config FILE` again "
            "(docs/configuration.md lists every key)",
        )


class BrokerUnreachable(BrokerError):
    """The broker's URL did not answer (refused, timed out, DNS). Raised by ``BrokerClient``."""


class BrokerAuthError(BrokerError):
    """The broker answered 401: the token is missing, unknown or revoked."""


class BrokerRequestError(BrokerError):
    """The broker answered with an error (4xx/5xx other than 401): ``status``, ``code``."""

    def __init__(self, status: int, code: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code

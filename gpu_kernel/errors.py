"""The error hierarchy shared by every part of jupyter-shared-gpu.

Each error carries a message that says what went wrong and a ``hint`` that says what to do next;
``str(err)`` joins both, so callers can show it to a user as it is, without a traceback.
"""

from __future__ import annotations


class SharedGPUError(Exception):
    """Base of every error this project raises on purpose (a user or admin can act on it)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class RemoteHostError(SharedGPUError):
    """A GPU host could not be reached or used."""


class HostUnreachable(RemoteHostError):
    """The TCP connection to the host's sshd failed or timed out."""


class HostKeyError(RemoteHostError):
    """The host's key is unknown or does not match known_hosts (strict checking)."""


class SSHAuthError(RemoteHostError):
    """The host refused our key."""


class LaunchError(RemoteHostError):
    """The launcher on the host failed to start a kernel."""


class ProtocolMismatch(LaunchError):
    """The host's installed gpu_kernel speaks another launch protocol than this side."""


class BadRequest(SharedGPUError):
    """A launch-protocol message (request, reply or ctl argument) is malformed."""

    code = "bad_request"


class CommandTimeout(RemoteHostError):
    """A command on the host did not finish within its timeout."""


class KernelControlError(RemoteHostError):
    """``python -m gpu_kernel ctl`` on the host failed (bad kernel id, unreadable reply)."""
